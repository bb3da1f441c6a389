"""ABKD at negative exponents: powers of near-zero probabilities are floored, never inf or NaN.

The alpha-beta divergence is defined for every real ``(alpha, beta)``; with a negative exponent a
bucket of probability near 0 has a power near infinity. Checked: finite, non-negative values
and finite gradients on very peaked distributions, and, where no probability is small enough to
be floored, agreement with the textbook formula computed in float64 with plain powers.
"""

from __future__ import annotations

import math

import pytest
import torch

from logitstore.divergences._objectives import MAX_POWER_EXP, ab_divergence

EXPONENTS = [(-0.5, 0.2), (0.5, -1.2), (-1.0, -0.5), (2.0, -3.0), (0.0, -2.0), (-1.5, 1.5),
             (-0.3, 0.0), (0.2, 0.7), (1.0, 0.0)]  # fmt: skip


def reference(logp: torch.Tensor, logq: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Cichocki's D_AB in float64 from plain powers (the generic case only)."""
    p, q = logp.double().exp(), logq.double().exp()
    s = a + b
    terms = p**a * q**b - a / s * p**s - b / s * q**s
    return -terms.sum(-1) / (a * b)


@pytest.mark.parametrize("alpha,beta", EXPONENTS)
def test_peaked_distributions_give_finite_non_negative_values_and_gradients(alpha, beta):
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(40 * torch.randn(6, 500, generator=g), -1)
    z = (40 * torch.randn(6, 500, generator=g)).requires_grad_()
    logq = torch.log_softmax(z, -1)
    assert logp.min() < -MAX_POWER_EXP  # probabilities far below any floor are present
    value = ab_divergence(logp, logq, alpha, beta, None)
    assert torch.isfinite(value).all(), value
    assert (value >= -1e-4 * value.abs().clamp(min=1.0)).all(), value
    value.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("alpha,beta", [e for e in EXPONENTS if 0 not in (e[0], e[1], sum(e))])
def test_without_flooring_the_value_is_the_textbook_formula(alpha, beta):
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(1.5 * torch.randn(4, 64, generator=g), -1)
    logq = torch.log_softmax(1.5 * torch.randn(4, 64, generator=g), -1)
    worst = max(-min(alpha, 0) - min(beta, 0), -min(alpha + beta, 0), 1e-9)
    assert min(logp.min(), logq.min()) > -MAX_POWER_EXP / worst  # nothing is floored here
    got = ab_divergence(logp, logq, alpha, beta, None).double()
    torch.testing.assert_close(got, reference(logp, logq, alpha, beta), rtol=1e-4, atol=1e-6)


def test_flooring_changes_only_the_buckets_below_the_floor():
    # One bucket far below the floor for (0.5, -1.2): the value is the formula on the measures
    # with that bucket raised to the floor, computed independently in float64.
    alpha, beta = 0.5, -1.2
    floor = -MAX_POWER_EXP / 1.2
    logq = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0, -200.0]]), -1)
    logp = torch.log_softmax(torch.tensor([[1.0, 0.5, 0.0, -1.0]]), -1)
    got = ab_divergence(logp, logq, alpha, beta, None).double()
    want = reference(logp, logq.clamp(min=floor), alpha, beta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert math.isfinite(got.item()) and got.item() > 0
