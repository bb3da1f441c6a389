"""logitstore: offline knowledge distillation with a compressed teacher-logit store."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
