"""The fused linear + sparse-teacher loss: never materialises ``[tokens, vocab]`` logits.

Why it chunks: the student's logits for a batch are ``N x V`` floats (8192 x 128256 float32 is
4 GiB, twice that with their gradient), yet every bucket objective needs from them only the
log-sum-exp over the vocabulary and over the tail ``T = V \\ S'``, and the ``K + 1`` logits on
``S'`` (docs/divergences.md, sections 3 and 8). So the tokens are processed ``chunk_size`` at a
time: compute the chunk's float32 logits, take the two log-sum-exps and the gathered logits,
evaluate the objective on ``[chunk, K + 2]`` buckets with plain autograd, and turn its three
small gradients into the chunk's logit gradient

    dL/dz_v = (dL/dlse * softmax(z / tau)_v + [v in T] dL/dlse_T * softmax_T(z / tau)_v) / tau
              + [v in S'] dL/dz_v(gathered),

which is then pushed through the matmul into the hidden-state and weight gradients. The
gradients are computed during the forward pass (as Liger-Kernel's fused linear losses do), so
backward only scales them; memory is one ``chunk_size x V`` buffer plus ``O(N K + N H + V H)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from logitstore.divergences._buckets import TeacherBuckets, compute_dtype, token_ids
from logitstore.divergences._losses import (
    bucket_loss,
    check_temperature,
    prepare_teacher,
    valid_rows,
)
from logitstore.divergences._registry import Objective, resolve
from logitstore.errors import ConfigError, DataError

DEFAULT_CHUNK_SIZE = 1024


def _chunk_grads(
    objective: Objective,
    params: dict,
    logits: Tensor,
    teacher: TeacherBuckets,
    target: Tensor,
    tau: float,
    scale: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Loss sum of one chunk and, if asked, the gradient on its logits (written in place).

    Args:
        logits: ``(c, V)`` float logits of the chunk; overwritten with the gradient.
        scale: factor on every per-token value (``tau^2`` option and ``1 / num_items``).

    Returns:
        The chunk's scaled loss sum (0-dim) and ``logits`` holding ``dL/dz`` (or None).
    """
    if tau != 1.0:
        logits.mul_(1.0 / tau)
    zg = logits.gather(1, teacher.ids)
    # Log-sum-exps in place: the buffer becomes e = exp(z / tau - m), then e with S' zeroed,
    # whose sum is the tail's own (no cancellation when the tail is tiny), then the gradient.
    m = logits.amax(dim=1, keepdim=True)
    logits.sub_(m).exp_()
    tok_valid = teacher.valid[:, :-1]
    at = token_ids(teacher)
    e_head = torch.where(tok_valid, logits.gather(1, at), torch.zeros((), dtype=logits.dtype))
    logits.scatter_(1, at, 0.0)
    s_tail = logits.sum(dim=1)
    s = s_tail + e_head.sum(dim=1)
    lse = m.squeeze(1) + s.log()
    tail_lse = m.squeeze(1) + s_tail.log()  # -inf for an empty tail: absent, no gradient
    with torch.enable_grad():
        zg = zg.detach().requires_grad_(need_grad)
        lse_leaf = lse.detach().requires_grad_(need_grad)
        tail_leaf = tail_lse.detach().requires_grad_(need_grad)
        total = bucket_loss(objective, params, zg, lse_leaf, tail_leaf, teacher, target)
        total = total.sum() * scale
        if not need_grad:
            return total.detach(), None
        g_zg, g_lse, g_tail = torch.autograd.grad(total, (zg, lse_leaf, tail_leaf))
    # dL/dz_v = g_lse e_v / s + [v in T] g_tail e_v / s_tail + [v in S'] g_zg(v).
    c_lse = g_lse / s
    c_tail = torch.where(s_tail > 0, g_tail / s_tail.clamp(min=torch.finfo(s.dtype).tiny), 0.0)
    grad = logits.mul_((c_lse + c_tail)[:, None])  # the tail tokens; S' is still 0 here
    grad.scatter_add_(1, at, e_head * c_lse[:, None])
    grad.scatter_add_(1, teacher.ids, g_zg)
    if tau != 1.0:
        grad.mul_(1.0 / tau)
    return total.detach(), grad


class _FusedLinearBucketLoss(torch.autograd.Function):
    """Scalar loss of ``hidden @ weight.T`` against teacher buckets; gradients made in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        objective: Objective,
        params: dict,
        teacher: TeacherBuckets,
        target: Tensor,
        tau: float,
        scale: float,
        chunk_size: int,
        want: tuple[bool, bool],
        softcap: float | None = None,
    ) -> Tensor:
        # Logits in float32 even under autocast (docs/divergences.md, section 1): autocast would
        # run the matmul in bf16 here.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            grad_h, grad_w, total = _FusedLinearBucketLoss._run(
                hidden,
                weight,
                objective,
                params,
                teacher,
                target,
                tau,
                scale,
                chunk_size,
                want,
                softcap,
            )
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w)))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.want = want
        return total

    @staticmethod
    def _run(
        hidden: Tensor,
        weight: Tensor,
        objective: Objective,
        params: dict,
        teacher: TeacherBuckets,
        target: Tensor,
        tau: float,
        scale: float,
        chunk_size: int,
        want: tuple[bool, bool],
        softcap: float | None = None,
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """The chunk loop: ``(grad_hidden (n, H) | None, grad_weight (V, H) | None, loss)``."""
        dtype = compute_dtype(torch.promote_types(hidden.dtype, weight.dtype))
        w = weight.to(dtype)  # no copy when weight is already float32
        need_h, need_w = want
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop].to(dtype)
            logits = h @ w.T
            capped = None
            if softcap is not None and (need_h or need_w):
                # Gemma 2's cap: z = c tanh(x / c), so dz/dx = 1 - tanh^2 (kept for the gradient).
                capped = logits.div(softcap).tanh_()
                torch.mul(capped, softcap, out=logits)
            elif softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            part, grad = _chunk_grads(
                objective,
                params,
                logits,
                teacher.rows(start, stop),
                target[start:stop],
                tau,
                scale,
                need_h or need_w,
            )
            total += part
            if grad is not None:
                if capped is not None:
                    grad.mul_(capped.square_().neg_().add_(1.0))
                if grad_h is not None:
                    grad_h[start:stop] = grad @ w
                if grad_w is not None:
                    grad_w.addmm_(grad.T, h)
            del logits, grad, capped
        return grad_h, grad_w, total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.want
        # The usual case is loss.backward() with grad_out = 1: hand the gradients over without
        # another V x H copy.
        one = bool(grad_out.eq(1).all())
        gh = (grad_h if one else grad_h * grad_out).to(ctx.dtypes[0]) if need_h else None
        gw = (grad_w if one else grad_w * grad_out).to(ctx.dtypes[1]) if need_w else None
        return (gh, gw) + (None,) * 9


def fused_sparse_loss(
    name: str,
    hidden: Tensor,
    lm_head_weight: Tensor,
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    *,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    tail_logsumexp: Tensor | None = None,
    approximate_tail: bool = False,
    support_counts: Tensor | None = None,
    tau_squared: bool = False,
    softcap: float | None = None,
    **params: Any,
) -> Tensor:
    """Sum of per-token sparse losses over ``num_items``, from hidden states, chunked.

    Equal in value and in gradients (to ``hidden`` and ``lm_head_weight``) to
    ``sparse_loss(name, hidden @ lm_head_weight.T, ...).sum() / num_items`` with float32 logits,
    but holds at most ``chunk_size x V`` logits at once. Ignored tokens (label ``-100``) are
    dropped before the matmul.

    Args:
        name: a name in ``DIVERGENCES``.
        hidden: ``(N, H)`` final hidden states (after the final norm), any float dtype.
        lm_head_weight: ``(V, H)`` output projection (tied or not); no bias.
        support_ids: ``(N, K)`` int64 teacher support, padding ``-1``.
        support_logprobs: ``(N, K)`` teacher log-probs at temperature 1.
        tail_logmass: ``(N,)`` ``log(1 - sum_S p)``.
        label_logprob: ``(N,)`` ``log p_y``.
        labels: ``(N,)`` int64 labels, ``-100`` ignored.
        num_items: divisor: the valid-token count of the whole optimizer step (so gradient
            accumulation and data parallelism match one big batch). Default: this call's
            valid tokens (1 if there are none).
        chunk_size: tokens per chunk; memory is about ``chunk_size * V * 4`` bytes plus the
            float32 weight gradient ``V * H * 4``.
        temperature, tail_logsumexp, approximate_tail, support_counts, tau_squared: as in
            ``sparse_loss``.
        softcap: the student's logits are ``softcap * tanh(hidden @ lm_head_weight.T /
            softcap)``, as Gemma 2's forward caps them (``final_logit_softcapping``); None:
            the product itself.
        **params: the objective's parameters.

    Returns:
        A 0-dim float32 loss (float64 for float64 inputs). With no valid token it is 0, still
        connected to ``hidden`` and ``lm_head_weight``, with zero gradients.
    """
    objective, resolved = resolve(name, params)
    return fused_bucket_loss(
        objective,
        resolved,
        hidden,
        lm_head_weight,
        support_ids,
        support_logprobs,
        tail_logmass,
        label_logprob,
        labels,
        num_items=num_items,
        chunk_size=chunk_size,
        temperature=temperature,
        tail_logsumexp=tail_logsumexp,
        approximate_tail=approximate_tail,
        support_counts=support_counts,
        tau_squared=tau_squared,
        softcap=softcap,
    )


def fused_bucket_loss(
    objective: Objective,
    resolved: dict,
    hidden: Tensor,
    lm_head_weight: Tensor,
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    *,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    tail_logsumexp: Tensor | None = None,
    approximate_tail: bool = False,
    support_counts: Tensor | None = None,
    tau_squared: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """:func:`fused_sparse_loss` for an already resolved objective and parameters (what a
    :class:`~logitstore.divergences.DistillationLoss` calls on every micro-batch)."""
    name = objective.name
    tau = check_temperature(temperature)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise DataError(
            "hidden must be (N, H) and lm_head_weight (V, H); found "
            f"{tuple(hidden.shape)} and {tuple(lm_head_weight.shape)}"
        )
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive integer; found {chunk_size!r}")
    softcap = check_softcap(softcap)
    n = hidden.shape[0]
    if labels.shape != (n,):
        raise DataError(f"labels must be ({n},); found {tuple(labels.shape)}")
    v = lm_head_weight.shape[0]
    rows = valid_rows(labels, v)
    if num_items is None:
        denom = float(max(int(rows.numel()), 1))
    else:
        denom = float(num_items)
        if not denom > 0:
            raise ConfigError(f"num_items must be positive; found {num_items!r}")
    dtype = compute_dtype(lm_head_weight.dtype)
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
    scale = (tau**2 if tau_squared else 1.0) / denom
    h = hidden if rows.numel() == n else hidden[rows]
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and lm_head_weight.requires_grad)
    return _FusedLinearBucketLoss.apply(
        h,
        lm_head_weight,
        objective,
        resolved,
        teacher,
        target,
        tau,
        scale,
        int(chunk_size),
        want,
        softcap,
    )


def check_softcap(softcap: float | None) -> float | None:
    """``softcap`` as a float, or None; a clean error for anything but a finite positive one."""
    if softcap is None:
        return None
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"softcap must be a positive number or None; found {softcap!r}")
    return value
