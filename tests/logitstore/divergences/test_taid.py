"""TAID's adaptive schedule (spec 2.7): first step, momentum rule, bounds, resume."""

from __future__ import annotations

import math
import random

import pytest
import torch

from logitstore.divergences import TAIDSchedule, dense_loss
from logitstore.errors import ConfigError


def losses(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [3.0 * math.exp(-i / 40) + rng.uniform(-0.3, 0.3) for i in range(n)]


def test_first_update_only_stores_the_loss():
    s = TAIDSchedule(100)
    assert s.update(2.5) == pytest.approx(0.4)
    assert s.momentum == 0.0 and s.prev_loss == 2.5


def test_update_follows_the_momentum_rule_step_by_step():
    s = TAIDSchedule(10_000, t_start=0.4, t_end=1.0, alpha=0.05, beta=0.9)
    t, m, prev = 0.4, 0.0, None
    for step, j in enumerate([2.0, 1.5, 1.6, 1.0, 0.9], start=1):
        got = s.update(j)
        if prev is not None:  # the rule, written out again
            d = (prev - j) / (prev + 1e-15)
            m = 0.9 * m + 0.1 * d
            linear = 0.4 + 0.6 * step / 10_000
            t = min(1.0, max(t, t + 0.05 * (1 / (1 + math.exp(-m))) * (1 - t), linear))
        prev = j
        assert got == pytest.approx(t, abs=1e-15)


def test_t_is_monotone_bounded_by_the_linear_schedule_and_t_end():
    total = 200
    s = TAIDSchedule(total, t_start=0.2, t_end=0.9, alpha=0.02)
    seen = []
    for step, j in enumerate(losses(260, seed=1), start=1):
        t = s.update(j)
        if step > 1:  # the first step only stores J
            assert t >= 0.2 + 0.7 * min(step / total, 1.0) - 1e-12
        assert t <= 0.9
        seen.append(t)
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    assert seen[-1] == pytest.approx(0.9)
    # Improving losses move t faster than the linear floor early on.
    assert seen[20] > 0.2 + 0.7 * 21 / total


def test_state_round_trip_resumes_identically():
    seq = losses(50, seed=2)
    a = TAIDSchedule(80, alpha=0.01)
    for j in seq[:30]:
        a.update(j)
    b = TAIDSchedule(1)
    b.load_state_dict(a.state_dict())
    assert [a.update(j) for j in seq[30:]] == [b.update(j) for j in seq[30:]]
    with pytest.raises(ConfigError):
        b.load_state_dict({"t": 0.5})


def test_bad_settings_raise():
    for kw in ({"t_start": 0.8, "t_end": 0.5}, {"alpha": 2.0}, {"beta": 1.0}):
        with pytest.raises(ConfigError):
            TAIDSchedule(10, **kw)
    with pytest.raises(ConfigError):
        TAIDSchedule(0)
    with pytest.raises(ConfigError):
        TAIDSchedule(10).update(float("nan"))


def test_schedule_t_feeds_the_objective_and_t_one_is_fkl():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64)
    lp = torch.randn(4, 9, generator=g, dtype=torch.float64).log_softmax(-1)
    labels = torch.arange(4)
    s = TAIDSchedule(10, t_start=1.0, t_end=1.0)
    torch.testing.assert_close(
        dense_loss("taid", z, lp, labels, t=s.t), dense_loss("fkl", z, lp, labels)
    )


def test_a_step_of_loss_near_zero_does_not_overflow_the_momentum():
    # After J = 0 the relative change of the next step is about -J / 1e-15: the momentum is of
    # order -1e13, where exp(-m) overflows a float. Its sigmoid is 0: t only follows the floor.
    s = TAIDSchedule(100, t_start=0.4, t_end=1.0, alpha=0.5)
    for j in (1.0, 0.0, 1.0, 2.0):
        t = s.update(j)
    assert s.momentum < -1e12
    # Step 2 improved by 100 %: m = 0.01 (beta 0.99); steps 3 and 4 add nothing but the floor.
    t2 = max(0.4 + 0.5 * (1 / (1 + math.exp(-0.01))) * 0.6, 0.4 + 0.6 * 2 / 100)
    assert t == pytest.approx(max(t2, 0.4 + 0.6 * 4 / 100), abs=1e-15)
