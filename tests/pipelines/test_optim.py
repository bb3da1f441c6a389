"""The learning-rate schedule of training (``pipelines/_optim.py``)."""

from __future__ import annotations

import pytest

from pipelines._optim import lr_factor
from pipelines.train import TrainConfig


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(
        store="s", student="s", out="o", max_steps=20, warmup_steps=4, min_lr_ratio=0.1
    )
    factors = [lr_factor(s, cfg) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == pytest.approx(0.1)
