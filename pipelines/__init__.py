"""The two stages: the teacher pass (stage one) and student training (stage two)."""
