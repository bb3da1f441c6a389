"""Per-token losses on materialised logits: dense (reference) and sparse (bucket model)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from logitstore.divergences._buckets import (
    IGNORE_INDEX,
    NEG,
    Buckets,
    TeacherBuckets,
    check_sparse_shapes,
    compute_dtype,
    label_bucket,
    sparse_buckets,
    student_buckets,
    student_tail_lse,
    teacher_buckets,
)
from logitstore.divergences._registry import DIVERGENCES, Objective, resolve
from logitstore.errors import ConfigError, DataError


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float; it must be finite and positive."""
    tau = float(temperature)
    if not (tau > 0.0 and tau < float("inf")):
        raise ConfigError(f"temperature must be a positive finite number; found {temperature!r}")
    return tau


def valid_rows(labels: Tensor, vocab_size: int) -> Tensor:
    """``(n,)`` indices of the tokens whose label is not ``-100``; other labels are checked."""
    if labels.dim() != 1:
        raise DataError(f"labels must be (N,); found {tuple(labels.shape)}")
    keep = labels != IGNORE_INDEX
    bad = keep & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise DataError(f"labels must be -100 or in [0, {vocab_size}); found {labels[bad][:5]}")
    return keep.nonzero().squeeze(1)


def scatter_rows(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """``(n,)`` zeros with ``values`` at ``rows``; stays connected to the graph when empty."""
    return values.new_zeros(n).index_put((rows,), values)


def prepare_teacher(
    name: str,
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    rows: Tensor,
    vocab_size: int,
    *,
    temperature: float,
    dtype: torch.dtype,
    tail_logsumexp: Tensor | None,
    approximate_tail: bool,
    support_counts: Tensor | None,
) -> tuple[TeacherBuckets, Tensor]:
    """Teacher buckets and label buckets ``(n,)`` for the valid ``rows`` (see ``sparse_loss``)."""
    check_sparse_shapes(support_ids, support_logprobs, tail_logmass, label_logprob, labels)
    if support_counts is not None:
        if not DIVERGENCES[name].counts:
            raise ConfigError(
                f"support_counts (RS-KD count estimator) is defined for 'fkl' only; found {name!r}"
            )
        if support_counts.shape != support_ids.shape:
            raise DataError(
                f"support_counts must match support_ids {tuple(support_ids.shape)}; "
                f"found {tuple(support_counts.shape)}"
            )
        support_counts = support_counts[rows]
    ids = support_ids[rows]
    teacher = teacher_buckets(
        ids,
        support_logprobs[rows].detach(),
        tail_logmass[rows].detach(),
        label_logprob[rows].detach(),
        labels[rows],
        vocab_size,
        temperature=temperature,
        dtype=dtype,
        tail_logsumexp=None if tail_logsumexp is None else tail_logsumexp[rows].detach(),
        approximate_tail=approximate_tail,
        support_counts=support_counts,
    )
    return teacher, label_bucket(ids, labels[rows])


def bucket_loss(
    objective: Objective,
    params: dict,
    zt_gathered: Tensor,
    lse: Tensor,
    tail_lse: Tensor,
    teacher: TeacherBuckets,
    target: Tensor,
) -> Tensor:
    """Per-token objective values ``(n,)`` from the student's gathered logits and log-sum-exps.

    Args:
        objective: the resolved objective.
        params: its validated parameters.
        zt_gathered: ``(n, K + 1)`` student logits over ``tau`` at ``teacher.ids``.
        lse: ``(n,)`` log-sum-exp of the student logits over ``tau``.
        tail_lse: ``(n,)`` the same over the tail bucket's tokens only.
        teacher: teacher buckets of the same tokens.
        target: ``(n,)`` label buckets.
    """
    logq = student_buckets(zt_gathered, lse, tail_lse, teacher)
    return objective(sparse_buckets(logq, teacher, target), params)


def dense_loss(
    name: str,
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    tau_squared: bool = False,
    **params: Any,
) -> Tensor:
    """Per-token divergence against a full teacher distribution (the reference path).

    Args:
        name: a name in ``DIVERGENCES``.
        student_logits: ``(N, V)`` student logits, any float dtype.
        teacher_logprobs: ``(N, V)`` teacher log-probabilities (or logits) at temperature 1;
            detached.
        labels: ``(N,)`` int64 next-token labels, ``-100`` for ignored positions.
        temperature: ``tau``; both distributions are ``softmax(. / tau)``.
        tau_squared: multiply by ``tau^2`` (Hinton-style); off by default
            (docs/divergences.md, section 1).
        **params: the objective's parameters (see ``DIVERGENCES[name].defaults``).

    Returns:
        ``(N,)`` per-token values, float32 (float64 for float64 inputs), 0 where ignored.
    """
    objective, resolved = resolve(name, params)
    tau = check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logprobs.shape:
        raise DataError(
            "student_logits and teacher_logprobs must both be (N, V); found "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    n, v = student_logits.shape
    if labels.shape != (n,):
        raise DataError(f"labels must be ({n},); found {tuple(labels.shape)}")
    rows = valid_rows(labels, v)
    dtype = compute_dtype(student_logits.dtype)
    # A -inf logit (a token the student rules out) is q = 0: NEG like an absent bucket, so that
    # 0 * log 0 terms are 0, not NaN.
    logq = F.log_softmax(student_logits[rows].to(dtype) / tau, dim=-1)
    logq = logq.masked_fill(logq == -math.inf, NEG)
    logp = F.log_softmax(teacher_logprobs[rows].detach().to(dtype) / tau, dim=-1).clamp(min=NEG)
    values = objective(Buckets(logq, logp, None, None, labels[rows].long()), resolved)
    if tau_squared:
        values = values * tau**2
    return scatter_rows(values, rows, n)


def sparse_loss(
    name: str,
    student_logits: Tensor,
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    tail_logsumexp: Tensor | None = None,
    approximate_tail: bool = False,
    support_counts: Tensor | None = None,
    tau_squared: bool = False,
    **params: Any,
) -> Tensor:
    """Per-token divergence against a sparse teacher, on the bucket model.

    Buckets are the support ``S``, the label ``y`` when outside ``S``, and one tail bucket
    (docs/divergences.md, section 3).

    Args:
        name: a name in ``DIVERGENCES``.
        student_logits: ``(N, V)`` student logits, any float dtype (computed in float32).
        support_ids: ``(N, K)`` int64 teacher support, most probable first, padding ``-1``.
        support_logprobs: ``(N, K)`` teacher log-probs at temperature 1, ``-inf`` on padding.
        tail_logmass: ``(N,)`` ``log(1 - sum_S p)`` relative to ``S``; ``-inf`` for no tail.
        label_logprob: ``(N,)`` ``log p_y``.
        labels: ``(N,)`` int64 labels, ``-100`` for ignored positions.
        temperature: ``tau``. At ``tau != 1`` the teacher is re-tempered on buckets, which needs
            ``tail_logsumexp`` (or ``approximate_tail=True``).
        tail_logsumexp: ``(N,)`` ``logsumexp_{i not in S}(log p_i / tau)`` captured by the cache.
        approximate_tail: without ``tail_logsumexp`` at ``tau != 1``, spread the tail uniformly
            over ``V - |S'|`` tokens. Approximate: the result is not the tempered teacher.
        support_counts: ``(N, K)`` RS-KD draw counts (``fkl`` only): the teacher becomes the
            unbiased plug-in ``c / n`` on ``S``, no tail bucket; the gradient is ``q - c / n``.
        tau_squared: multiply by ``tau^2``; off by default.
        **params: the objective's parameters.

    Returns:
        ``(N,)`` per-token values, float32 (float64 for float64 inputs), 0 where ignored.
    """
    objective, resolved = resolve(name, params)
    tau = check_temperature(temperature)
    if student_logits.dim() != 2:
        raise DataError(f"student_logits must be (N, V); found {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    rows = valid_rows(labels, v)
    dtype = compute_dtype(student_logits.dtype)
    teacher, target = prepare_teacher(
        name,
        support_ids,
        support_logprobs,
        tail_logmass,
        label_logprob,
        labels,
        rows,
        v,
        temperature=tau,
        dtype=dtype,
        tail_logsumexp=tail_logsumexp,
        approximate_tail=approximate_tail,
        support_counts=support_counts,
    )
    # No copies of the (N, V) logits beyond what the maths needs: skip the row selection when
    # every token counts, and the division at tau = 1.
    zt = student_logits if rows.numel() == n else student_logits[rows]
    zt = zt.to(dtype)
    if tau != 1.0:
        zt = zt / tau
    lse = torch.logsumexp(zt, dim=-1)
    tail_lse = student_tail_lse(zt, teacher)
    zg = zt.gather(1, teacher.ids)
    values = bucket_loss(objective, resolved, zg, lse, tail_lse, teacher, target)
    if tau_squared:
        values = values * tau**2
    return scatter_rows(values, rows, n)
