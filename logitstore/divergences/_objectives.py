"""Every distillation objective as a pure function of bucket tensors.

Each function takes a :class:`~logitstore.divergences._buckets.Buckets` (student and teacher
log-probabilities ``(N, B)`` on ``B`` buckets, the present-bucket mask, the token mask and the
label's bucket ``(N,)``) plus its own parameters, and returns the per-token value ``(N,)``.
Dense mode passes the whole vocabulary as buckets. Formulas, defaults and what is detached follow
docs/divergences.md, section 2; the comments name the subsection. Nothing here reduces over
tokens or scales by ``tau^2``: the callers do that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from logitstore.divergences._buckets import LOG_FLOOR, NEG, Buckets, masked_logsumexp


def _sum(x: Tensor, valid: Tensor | None) -> Tensor:
    """Sum over buckets, absent ones excluded."""
    if valid is not None:
        x = torch.where(valid, x, torch.zeros_like(x))
    return x.sum(dim=-1)


def _safe(x: Tensor, valid: Tensor | None) -> Tensor:
    """Replace absent entries by 0 so that powers with negative exponents stay finite."""
    return x if valid is None else torch.where(valid, x, torch.zeros_like(x))


def _renorm(logx: Tensor, valid: Tensor | None) -> Tensor:
    """Normalise unnormalised bucket log-weights ``(N, B)`` into log-probabilities."""
    out = logx - masked_logsumexp(logx, valid)[:, None]
    return out if valid is None else torch.where(valid, out, torch.full_like(out, NEG))


def kl(loga: Tensor, logb: Tensor, valid: Tensor | None) -> Tensor:
    """``KL(a || b) = sum_i a_i (log a_i - log b_i)`` from log-probabilities ``(N, B)``."""
    return _sum(loga.exp() * (loga - logb), valid)


#: The largest exponent a power is taken at. With a negative exponent a bucket of probability
#: near 0 has a power near infinity, so such buckets are floored (see :func:`ab_divergence`);
#: ``e^60`` (about 1e26) keeps every sum finite in float32.
MAX_POWER_EXP = 60.0


def log_mix(w: float, loga: Tensor, logb: Tensor) -> Tensor:
    """``log(w a + (1 - w) b)``: a mixture in probability space, computed by log-sum-exp."""
    if w <= 0.0:
        return logb
    if w >= 1.0:
        return loga
    return torch.logaddexp(loga + math.log(w), logb + math.log1p(-w))


def ab_divergence(
    loga: Tensor, logb: Tensor, alpha: float, beta: float, valid: Tensor | None
) -> Tensor:
    """Alpha-beta divergence ``D_AB(a || b)`` with its closed-form limit cases.

    Defined in docs/divergences.md, 2.6. Powers are taken in the log domain:
    ``a^alpha = exp(alpha log a)``.

    Args:
        loga: ``(N, B)`` log-probabilities of the first argument.
        logb: ``(N, B)`` log-probabilities of the second argument.
        alpha: the exponent on ``a``.
        beta: the exponent on ``b``.
        valid: ``(N, B)`` present buckets, or None.

    Returns:
        ``(N,)`` divergences. ``(1, 0)`` gives ``KL(a || b)``, ``(0, 1)`` gives ``KL(b || a)``.
    """
    la, lb = _safe(loga, valid), _safe(logb, valid)
    s = alpha + beta
    # A negative exponent gives a near-zero probability a power near infinity: both arguments'
    # probabilities are floored so no power exceeds e^MAX_POWER_EXP. The floored arguments are
    # still positive measures, for which D_AB >= 0 holds; a floored bucket has no gradient.
    worst = max(-min(alpha, 0.0) - min(beta, 0.0), -min(s, 0.0))
    if worst > 0.0:
        floor = -MAX_POWER_EXP / worst
        la, lb = la.clamp(min=floor), lb.clamp(min=floor)
    # Each power enters as expm1(.) = x^c - 1: the constants cancel exactly in every case, and
    # near the limit cases (small alpha, beta or alpha + beta) no large terms cancel.
    if alpha != 0.0 and beta != 0.0 and s != 0.0:
        terms = (
            torch.expm1(alpha * la + beta * lb)
            - alpha / s * torch.expm1(s * la)
            - beta / s * torch.expm1(s * lb)
        )
        return -_sum(terms, valid) / (alpha * beta)
    if alpha != 0.0 and beta == 0.0:
        aa = torch.expm1(alpha * la)
        terms = (aa + 1.0) * alpha * (la - lb) - aa + torch.expm1(alpha * lb)
        return _sum(terms, valid) / alpha**2
    if alpha == 0.0 and beta != 0.0:
        bb = torch.expm1(beta * lb)
        terms = (bb + 1.0) * beta * (lb - la) - bb + torch.expm1(beta * la)
        return _sum(terms, valid) / beta**2
    if alpha != 0.0:  # alpha = -beta != 0
        r = alpha * (lb - la)
        return _sum(torch.expm1(-r) + r, valid) / alpha**2
    return 0.5 * _sum((la - lb) ** 2, valid)


# --- 2.1 FKL and RKL -------------------------------------------------------------------------


def fkl(b: Buckets) -> Tensor:
    """Forward KL ``KL(p || q)``, the true KL (not the cross-entropy)."""
    return kl(b.logp, b.logq, b.valid)


def rkl(b: Buckets) -> Tensor:
    """Reverse KL ``KL(q || p)``."""
    return kl(b.logq, b.logp, b.valid)


# --- 2.2 Generalised JSD ---------------------------------------------------------------------


def jsd(b: Buckets, *, beta: float) -> Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (not detached).

    ``beta = 0`` is exact FKL and ``beta = 1`` exact RKL, as in TRL.
    """
    if beta == 0.0:
        return fkl(b)
    if beta == 1.0:
        return rkl(b)
    logm = log_mix(beta, b.logp, b.logq)
    return beta * kl(b.logp, logm, b.valid) + (1.0 - beta) * kl(b.logq, logm, b.valid)


# --- 2.3 TVD ---------------------------------------------------------------------------------


def tvd(b: Buckets) -> Tensor:
    """Total variation ``1/2 sum |p - q|``."""
    return 0.5 * _sum((b.logp.exp() - b.logq.exp()).abs(), b.valid)


# --- 2.4 Skew KL and skew reverse KL ---------------------------------------------------------


def skl(b: Buckets, *, alpha: float) -> Tensor:
    """``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM; mixture not detached)."""
    return kl(b.logp, log_mix(alpha, b.logp, b.logq), b.valid)


def srkl(b: Buckets, *, alpha: float) -> Tensor:
    """``KL(q || (1 - alpha) p + alpha q)`` (DistiLLM; mixture not detached)."""
    return kl(b.logq, log_mix(1.0 - alpha, b.logp, b.logq), b.valid)


# --- 2.5 Adaptive KL -------------------------------------------------------------------------


def akl_head(logp: Tensor, valid: Tensor | None, token: Tensor | None, mu: float) -> Tensor:
    """``(N, B)`` bool head mask: the smallest teacher-sorted prefix reaching mass ``mu``.

    The token at which the cumulative mass first reaches ``mu`` is in the head. The tail bucket
    is never in the head, so a support holding less than ``mu`` is all head.
    """
    ok = torch.ones_like(logp, dtype=torch.bool)
    if valid is not None:
        ok = ok & valid
    if token is not None:
        ok = ok & token
    key = torch.where(ok, logp, torch.full_like(logp, -math.inf))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    p_sorted = key.gather(-1, order).exp()
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass strictly before each token
    head_sorted = (before < mu) & ok.gather(-1, order)
    return torch.zeros_like(ok).scatter(-1, order, head_sorted)


def akl(b: Buckets, *, mu: float) -> Tensor:
    """Adaptive KL: ``FKL`` and ``RKL`` weighted by the detached head and tail gaps."""
    with torch.no_grad():
        head = akl_head(b.logp, b.valid, b.token, mu)
        gap = (b.logp.exp() - b.logq.exp()).abs()
        tail = ~head if b.valid is None else (~head & b.valid)
        g_head = _sum(gap, head)
        g_tail = _sum(gap, tail)
        total = g_head + g_tail
        # At q = p both gaps vanish; any weights do, since both KLs are 0 there.
        w_head = torch.where(total > 0, g_head / total.clamp(min=1e-30), 0.5)
    return w_head * fkl(b) + (1.0 - w_head) * rkl(b)


# --- 2.6 Alpha-beta divergence ---------------------------------------------------------------


def abkd(b: Buckets, *, alpha: float, beta: float) -> Tensor:
    """``D_AB(p || q)`` (ABKD)."""
    return ab_divergence(b.logp, b.logq, alpha, beta, b.valid)


# --- 2.7 TAID --------------------------------------------------------------------------------


def taid(b: Buckets, *, t: float) -> Tensor:
    """``KL(p_t || q)``, ``p_t = softmax((1 - t) stopgrad(log q) + t log p)``, on buckets."""
    logpt = _renorm((1.0 - t) * b.logq.detach() + t * _safe(b.logp, b.valid), b.valid)
    return kl(logpt, b.logq, b.valid)


# --- 2.8 AMiD --------------------------------------------------------------------------------


def amid_assistant(
    logp: Tensor, logq: Tensor, valid: Tensor | None, a: float, lam: float
) -> Tensor:
    """``log r``: the alpha-mixture of ``p`` and ``q`` (student not detached), normalised."""
    lp, lq = _safe(logp, valid), _safe(logq, valid)
    if a == 1.0:
        logr = lam * lp + (1.0 - lam) * lq
    elif lam >= 1.0:
        logr = lp
    elif lam <= 0.0:
        logr = lq
    else:
        c = (1.0 - a) / 2.0
        logr = torch.logaddexp(math.log(lam) + c * lp, math.log1p(-lam) + c * lq) / c
    return _renorm(logr, valid)


def amid(
    b: Buckets,
    *,
    alpha: float,
    lam: float,
    divergence: str,
    order: str,
    ab_alpha: float,
    ab_beta: float,
) -> Tensor:
    """AMiD: a divergence between the assistant ``r`` and ``p`` or ``q``."""
    logr = amid_assistant(b.logp, b.logq, b.valid, alpha, lam)
    first, second = {
        "pr": (b.logp, logr),
        "qr": (b.logq, logr),
        "rp": (logr, b.logp),
        "rq": (logr, b.logq),
    }[order]
    if divergence == "kl":
        return kl(first, second, b.valid)
    return ab_divergence(first, second, ab_alpha, ab_beta, b.valid)


# --- 2.9 DKD and DRKL ------------------------------------------------------------------------


def _decouple(logx: Tensor, target: Tensor, rest: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log x_y (N,), log(1 - x_y) (N,), log x̂ (N, B))``: the target's log-prob, the
    others', and the non-target distribution, from the buckets ``rest`` (all but the target).

    ``log(1 - x_y)`` is the log-sum-exp of the other buckets, not ``log1mexp(log x_y)``: a
    confident teacher's ``p_y`` rounds to 1 in float32 while its other tokens keep their
    log-probs (``1 - p_y = 5e-12`` as ``log p = -26.1``); from ``log p_y = 0`` the rest's mass
    would be the floor, and ``p̂`` would sum to more than 1 (DRKL came out negative)."""
    lx_y = logx.gather(-1, target[:, None]).squeeze(-1)
    l1x = masked_logsumexp(logx, rest).clamp(min=LOG_FLOOR)
    return lx_y, l1x, logx - l1x[:, None]


def _binary_kl(la: Tensor, l1a: Tensor, lb: Tensor, l1b: Tensor) -> Tensor:
    """``KL((a, 1 - a) || (b, 1 - b))`` from ``log a``, ``log(1 - a)``, ``log b``,
    ``log(1 - b)`` ``(N,)``."""
    return la.exp() * (la - lb) + l1a.exp() * (l1a - l1b)


def _non_target(b: Buckets, target: Tensor) -> Tensor:
    """``(N, B)`` bool: present buckets other than the target."""
    cols = torch.arange(b.logq.shape[-1], device=b.logq.device)
    mask = cols[None, :] != target[:, None]
    return mask if b.valid is None else mask & b.valid


def dkd(b: Buckets, *, alpha: float, beta: float) -> Tensor:
    """DKD: ``alpha KL(b^p || b^q) + beta KL(p̂ || q̂)`` around the label."""
    rest = _non_target(b, b.target)
    lq_y, lq_rest, lq_hat = _decouple(b.logq, b.target, rest)
    lp_y, lp_rest, lp_hat = _decouple(b.logp, b.target, rest)
    return alpha * _binary_kl(lp_y, lp_rest, lq_y, lq_rest) + beta * kl(lp_hat, lq_hat, rest)


def teacher_argmax(b: Buckets) -> Tensor:
    """``(N,)`` the token bucket with the largest teacher probability (never the tail); of
    tied ones, the lowest vocabulary id, as over the dense vocabulary, so that a sparse support
    in any order picks the same token."""
    ok = torch.ones_like(b.logp, dtype=torch.bool)
    if b.valid is not None:
        ok = ok & b.valid
    if b.token is not None:
        ok = ok & b.token
    masked = torch.where(ok, b.logp, torch.full_like(b.logp, -math.inf))
    if b.ids is None:
        return masked.argmax(dim=-1)
    best = masked == masked.max(dim=-1, keepdim=True).values
    return torch.where(best & ok, b.ids, torch.iinfo(b.ids.dtype).max).argmin(dim=-1)


def drkl(b: Buckets, *, gamma: float, target: str) -> Tensor:
    """DRKL: ``KL(b^q || b^p) + gamma KL(q̂ || p̂)``; the non-target weight is a constant."""
    y = b.target if target == "label" else teacher_argmax(b)
    rest = _non_target(b, y)
    lq_y, lq_rest, lq_hat = _decouple(b.logq, y, rest)
    lp_y, lp_rest, lp_hat = _decouple(b.logp, y, rest)
    return _binary_kl(lq_y, lq_rest, lp_y, lp_rest) + gamma * kl(lq_hat, lp_hat, rest)
