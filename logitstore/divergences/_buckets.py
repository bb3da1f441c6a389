"""The bucket model: a sparse teacher and the student, both seen on ``S' = S ∪ {y}`` plus a tail.

Every objective is evaluated on ``B = K + 2`` buckets per token (docs/divergences.md, section 3):

- columns ``0 .. K-1``: the stored support ``S`` (padding id ``-1`` makes a column absent);
- column ``K``: the label ``y`` when it is not in ``S`` (absent otherwise);
- column ``K + 1``: the tail bucket ``T = V \\ S'`` (absent when ``S'`` is the whole vocabulary).

Absent buckets carry the log-probability :data:`NEG` (``exp(NEG) == 0`` exactly) and are masked
out of every sum, so they contribute neither value nor gradient. Dense mode is the same model
with the whole vocabulary as buckets and no tail.

The student side is a function of two small tensors only, the logits gathered at ``S'`` and the
log-sum-exp over the vocabulary. That is what lets the fused loss compute the exact gradient on
the head without ever holding ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from logitstore.errors import (
    ConfigError,
    DataError,
    NonFiniteTeacherError,
    TemperatureNotCapturedError,
)

#: Log-probability given to absent buckets: finite (no NaN in gradients), exp() is exactly 0.
NEG = -1.0e4
#: Floor on tail-bucket probabilities (docs/divergences.md, section 3), representable in float32.
FLOOR = 1.0e-12
LOG_FLOOR = math.log(FLOOR)
IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for any lower precision, float64 kept (tests use it)."""
    return torch.promote_types(dtype, torch.float32)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable (two branches cut at ``log 1/2``).

    ``x`` is clamped to at most ``log(1 - FLOOR)`` first, so the result is at least about
    ``log FLOOR``; the clamp is part of the graph, so backward sees the same clamp as forward.
    """
    x = x.clamp(max=math.log1p(-FLOOR))
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x.clamp(max=-math.log(2.0)))),
    )


def log_sub(a: Tensor, b: Tensor) -> Tensor:
    """``log(max(exp(a) - exp(b), FLOOR))``, elementwise, for the teacher's tail (no gradient)."""
    diff = a + log1mexp(torch.minimum(b - a, torch.zeros_like(a)))
    return torch.where(b < a, diff, torch.full_like(a, LOG_FLOOR)).clamp(min=LOG_FLOOR)


def masked_logsumexp(x: Tensor, valid: Tensor | None, dim: int = -1) -> Tensor:
    """Log-sum-exp over the present entries of ``x`` along ``dim``."""
    if valid is not None:
        x = torch.where(valid, x, torch.full_like(x, NEG))
    return torch.logsumexp(x, dim=dim)


@dataclass(frozen=True)
class Buckets:
    """Teacher and student log-probabilities on buckets, plus what the objectives need.

    Attributes:
        logq: ``(N, B)`` student log-probabilities per bucket (``NEG`` where absent).
        logp: ``(N, B)`` teacher log-probabilities per bucket (``NEG`` where absent).
        valid: ``(N, B)`` bool, present buckets; ``None`` means all present (dense mode).
        token: ``(N, B)`` bool, buckets that are single tokens (not the tail); ``None``: all.
        target: ``(N,)`` int64, the bucket of the label (or of the chosen target token).
        ids: ``(N, B)`` int64 vocabulary ids of the token buckets, which break ties between
            them as the dense argmax does (the lowest id); ``None``: bucket ``j`` is id ``j``.
    """

    logq: Tensor
    logp: Tensor
    valid: Tensor | None
    token: Tensor | None
    target: Tensor
    ids: Tensor | None = None


@dataclass(frozen=True)
class TeacherBuckets:
    """The teacher side of the bucket model for valid tokens only, computed once per batch.

    Attributes:
        ids: ``(n, K + 1)`` int64 vocabulary ids of the token buckets (absent ones point at 0).
        valid: ``(n, K + 2)`` bool, present buckets.
        logp: ``(n, K + 2)`` teacher log-probabilities at the training temperature.
    """

    ids: Tensor
    valid: Tensor
    logp: Tensor

    def rows(self, start: int, stop: int) -> TeacherBuckets:
        """The same buckets for tokens ``start:stop``."""
        return replace(
            self, ids=self.ids[start:stop], valid=self.valid[start:stop], logp=self.logp[start:stop]
        )


def check_sparse_shapes(
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
) -> None:
    """Raise :class:`DataError` when the sparse teacher tensors do not line up."""
    n = labels.shape[0]
    if support_ids.dim() != 2 or support_ids.shape != support_logprobs.shape:
        raise DataError(
            "support_ids and support_logprobs must both be (N, K); found "
            f"{tuple(support_ids.shape)} and {tuple(support_logprobs.shape)}"
        )
    for name, t in (("tail_logmass", tail_logmass), ("label_logprob", label_logprob)):
        if t.shape != (n,):
            raise DataError(f"{name} must be (N,) = ({n},); found {tuple(t.shape)}")
    if support_ids.shape[0] != n:
        raise DataError(f"support has {support_ids.shape[0]} rows, labels have {n}")


def teacher_buckets(
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    vocab_size: int,
    *,
    temperature: float,
    dtype: torch.dtype,
    tail_logsumexp: Tensor | None = None,
    approximate_tail: bool = False,
    support_counts: Tensor | None = None,
) -> TeacherBuckets:
    """Build the teacher buckets for tokens whose label is not ignored.

    Args:
        support_ids: ``(n, K)`` int64, padding ``-1``.
        support_logprobs: ``(n, K)`` teacher log-probs at temperature 1, ``-inf`` on padding.
        tail_logmass: ``(n,)`` ``log(1 - sum_S p)``, relative to ``S`` only; may be ``-inf``.
        label_logprob: ``(n,)`` ``log p_y`` at temperature 1.
        labels: ``(n,)`` int64 labels, none ignored.
        vocab_size: ``V``.
        temperature: training temperature ``tau``.
        dtype: compute dtype.
        tail_logsumexp: ``(n,)`` ``logsumexp_{i not in S}(log p_i / tau)`` as captured, or None.
        approximate_tail: at an uncaptured ``tau``, spread the tail uniformly over ``V - |S'|``.
        support_counts: ``(n, K)`` RS-KD draw counts; the teacher becomes ``c / n`` on ``S``.

    Returns:
        The buckets; see :class:`TeacherBuckets`.
    """
    n, k = support_ids.shape
    dev = support_logprobs.device
    ids = support_ids.long()
    present = ids >= 0
    # A repeated id would be two buckets of one token: its teacher and student mass counted
    # twice, and the student's tail short by that much. One host sync for both checks.
    srt = ids.sort(dim=1).values
    checks = torch.stack(
        [
            ((ids >= vocab_size) | (ids < -1)).any(),
            ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(),
        ]
    )
    out_of_range, repeated = checks.tolist()
    if out_of_range:
        raise DataError(f"support ids must be -1 (padding) or in [0, {vocab_size})")
    if repeated:
        raise DataError("support ids must be distinct within a row (padding -1 aside)")
    y = labels.long()
    label_in_s = ((ids == y[:, None]) & present).any(dim=1)
    all_ids = torch.cat([ids.clamp(min=0), y[:, None]], dim=1)
    token_valid = torch.cat([present, ~label_in_s[:, None]], dim=1)
    n_tokens = token_valid.sum(dim=1)
    tail_valid = n_tokens < vocab_size
    valid = torch.cat([token_valid, tail_valid[:, None]], dim=1)

    if support_counts is not None:
        if temperature != 1.0:
            raise ConfigError(f"support_counts estimate p at temperature 1; found {temperature}")
        counts = torch.where(present, support_counts.to(dtype), torch.zeros((), dtype=dtype))
        total = counts.sum(dim=1, keepdim=True)
        if bool((total <= 0).any()):
            raise DataError("support_counts must hold at least one draw per token")
        p_hat = counts / total
        zeros = torch.zeros(n, 2, dtype=dtype, device=dev)
        weights = torch.cat([p_hat, zeros], dim=1)
        valid = torch.cat([present, torch.zeros(n, 2, dtype=torch.bool, device=dev)], dim=1)
        logp = torch.where(weights > 0, weights.log(), torch.full_like(weights, NEG))
        return TeacherBuckets(ids=all_ids, valid=valid, logp=logp)

    sup = support_logprobs.to(dtype)
    lab = label_logprob.to(dtype)
    tail = tail_logmass.to(dtype)
    # NaN or +inf (no log-probability) would make every bucket of the row NaN; -inf is p = 0.
    given = [sup[present], lab, tail] + ([] if tail_logsumexp is None else [tail_logsumexp])
    if any(torch.stack([(t.isnan() | (t == math.inf)).any() for t in given]).tolist()):
        raise NonFiniteTeacherError(
            "teacher log-probabilities and tail log-sum-exps must not be NaN or +inf; found one"
        )
    tau = float(temperature)
    # A present id with probability 0 (-inf) becomes an ordinary bucket with p = exp(NEG) = 0.
    head = (torch.cat([sup, lab[:, None]], dim=1) / tau).clamp(min=NEG)
    head = torch.where(token_valid, head, torch.full_like(head, NEG))
    if tail_logsumexp is not None:
        tail_lse = tail_logsumexp.to(dtype)
    elif tau == 1.0:
        tail_lse = tail
    elif approximate_tail:
        # Uniform tail over the m = V - |S'| tokens it covers: each holds r_T / m at tau = 1.
        r_t = _tail_without_label(tail, lab, label_in_s)
        m = (vocab_size - n_tokens).clamp(min=1).to(dtype)
        tail_lse = m.log() + (r_t - m.log()) / tau
        label_in_s = torch.ones_like(label_in_s)  # r_T already excludes the label
    else:
        raise TemperatureNotCapturedError(
            f"training at temperature {tau} needs the teacher's tail log-sum-exp at that "
            "temperature (tail_logsumexp=); the cache captured none. Pass approximate_tail=True "
            "to spread the tail uniformly (approximate)."
        )
    # The stored tail is relative to S; the label's own mass leaves it when y is not in S.
    log_t = torch.where(label_in_s, tail_lse, log_sub(tail_lse, lab / tau))
    log_t = torch.where(tail_valid, log_t.clamp(min=LOG_FLOOR), torch.full_like(log_t, NEG))
    raw = torch.cat([head, log_t[:, None]], dim=1)
    log_z = masked_logsumexp(raw, valid)
    logp = torch.where(valid, raw - log_z[:, None], torch.full_like(raw, NEG))
    return TeacherBuckets(ids=all_ids, valid=valid, logp=logp)


def _tail_without_label(tail: Tensor, lab: Tensor, label_in_s: Tensor) -> Tensor:
    """``log(r - p_y)`` when the label is outside ``S``, else ``log r``."""
    return torch.where(label_in_s, tail, log_sub(tail, lab))


def token_ids(teacher: TeacherBuckets) -> Tensor:
    """``(n, K + 1)`` the ids of the token buckets, each absent one replaced by a present id of
    its row: indexing with it reaches exactly ``S'`` (every row has a present token bucket,
    the label's or a support entry's), so a scatter over it never touches the tail."""
    tok_valid = teacher.valid[:, :-1]
    first = tok_valid.int().argmax(dim=1, keepdim=True)
    return torch.where(tok_valid, teacher.ids, teacher.ids.gather(1, first))


class _TailLogSumExp(torch.autograd.Function):
    """``logsumexp`` over the tail columns; saves nothing of ``(n, V)`` size but ``zt`` itself
    (``torch.logsumexp`` of a masked copy would keep the copy until backward)."""

    @staticmethod
    def forward(ctx: Any, zt: Tensor, at: Tensor) -> Tensor:  # type: ignore[override]
        # S' gets the most negative finite value, not -inf: an empty tail stays finite.
        out = torch.logsumexp(zt.scatter(1, at, torch.finfo(zt.dtype).min), dim=-1)
        ctx.save_for_backward(zt, at, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        zt, at, out = ctx.saved_tensors
        # softmax over the tail; the clamp only touches S' (zeroed next), so no exp overflows.
        g = (zt - out[:, None]).clamp_(max=0.0).exp_().mul_(grad[:, None])
        return g.scatter_(1, at, 0.0), None


def student_tail_lse(zt: Tensor, teacher: TeacherBuckets) -> Tensor:
    """``(n,)`` ``logsumexp`` of the student logits ``zt`` ``(n, V)`` over the tail ``V \\ S'``
    (where the tail is empty, a finite value of no consequence: the bucket is absent)."""
    return _TailLogSumExp.apply(zt, token_ids(teacher))


def student_buckets(
    zt_gathered: Tensor, lse: Tensor, tail_lse: Tensor, teacher: TeacherBuckets
) -> Tensor:
    """Student log-probabilities on the teacher's buckets.

    Args:
        zt_gathered: ``(n, K + 1)`` student logits divided by ``tau`` at ``teacher.ids``.
        lse: ``(n,)`` ``logsumexp(z / tau)`` over the whole vocabulary.
        tail_lse: ``(n,)`` ``logsumexp(z / tau)`` over the tail ``V \\ S'`` (any value where
            the tail is absent).
        teacher: the teacher buckets (their ``valid`` mask decides what is present).

    Returns:
        ``(n, K + 2)`` log-probabilities, ``NEG`` where absent. The tail is floored at
        ``FLOOR`` and computed in two branches, like :func:`log1mexp`: below ``1/2`` as
        ``tail_lse - lse``, the tail's own log-sum-exp, and above as
        ``log1mexp(LSE(z_S') - LSE(z))``. Either one alone loses the tail in float32 at one
        end: the first leaves a tail near 1 with the error of ``lse``; the second rounds a tail
        below about ``1e-6`` (the two log-sum-exps agree to their last bits), which left the
        student's tail mass, and so its pull towards the teacher's, wrong or zero.
    """
    tok_valid = teacher.valid[:, :-1]
    head = zt_gathered - lse[:, None]
    # Absent buckets, and tokens whose student logit is -inf (q = 0, no gradient), get NEG.
    head = torch.where(tok_valid & (head > -math.inf), head, torch.full_like(head, NEG))
    own = tail_lse - lse
    log_t = torch.where(
        own < -math.log(2.0), own, log1mexp(masked_logsumexp(head, tok_valid))
    ).clamp(min=LOG_FLOOR, max=0.0)
    log_t = torch.where(teacher.valid[:, -1], log_t, torch.full_like(log_t, NEG))
    return torch.cat([head, log_t[:, None]], dim=1)


def sparse_buckets(logq: Tensor, teacher: TeacherBuckets, target: Tensor) -> Buckets:
    """Bundle student and teacher buckets for an objective."""
    token = torch.ones_like(teacher.valid)
    token[:, -1] = False
    ids = torch.cat([teacher.ids, torch.zeros_like(teacher.ids[:, :1])], dim=1)  # tail: no id
    return Buckets(logq=logq, logp=teacher.logp, valid=teacher.valid, token=token, target=target,
                   ids=ids)  # fmt: skip


def label_bucket(support_ids: Tensor, labels: Tensor) -> Tensor:
    """``(n,)`` the bucket holding the label: its column in ``S``, else column ``K``."""
    match = (support_ids.long() == labels.long()[:, None]) & (support_ids >= 0)
    k = support_ids.shape[1]
    return torch.where(match.any(dim=1), match.int().argmax(dim=1), torch.full_like(labels, k))
