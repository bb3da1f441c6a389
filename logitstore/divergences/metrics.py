"""Per-token quantities worth logging during distillation, computed chunk by chunk.

From the student's hidden states and output weight plus the cached sparse teacher (the same
arguments as :func:`~logitstore.divergences.fused_sparse_loss`), at temperature 1 and without
ever holding ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from logitstore.divergences._buckets import NEG, compute_dtype
from logitstore.divergences._fused import DEFAULT_CHUNK_SIZE
from logitstore.divergences._losses import bucket_loss, prepare_teacher, valid_rows
from logitstore.divergences._registry import resolve
from logitstore.errors import ConfigError, DataError


@dataclass(frozen=True)
class DistillationMetrics:
    """Per-token metrics for the tokens whose label is not ignored.

    Attributes:
        rows: ``(n,)`` int64 positions (into the ``N`` inputs) the values below belong to.
        teacher_kl: ``(n,)`` bucket forward KL(p || q) (a lower bound on the full KL).
        student_top1_prob: ``(n,)`` the student's largest probability.
        teacher_top1_prob: ``(n,)`` the teacher's largest probability (support or label).
        student_entropy: ``(n,)`` the student's entropy in nats, over the full vocabulary.
        top1_agreement: ``(n,)`` bool, student argmax equals the teacher's most probable id.
    """

    rows: Tensor
    teacher_kl: Tensor
    student_top1_prob: Tensor
    teacher_top1_prob: Tensor
    student_entropy: Tensor
    top1_agreement: Tensor

    def summary(self) -> dict[str, float]:
        """Means over tokens, as plain floats (NaN when there is no token)."""
        if self.rows.numel() == 0:
            return dict.fromkeys(
                ("teacher_kl", "student_top1_prob", "teacher_top1_prob", "student_entropy"),
                math.nan,
            ) | {"top1_agreement": math.nan}
        return {
            "teacher_kl": float(self.teacher_kl.mean()),
            "student_top1_prob": float(self.student_top1_prob.mean()),
            "teacher_top1_prob": float(self.teacher_top1_prob.mean()),
            "student_entropy": float(self.student_entropy.mean()),
            "top1_agreement": float(self.top1_agreement.float().mean()),
        }


@torch.no_grad()
def distillation_metrics(
    hidden: Tensor,
    lm_head_weight: Tensor,
    support_ids: Tensor,
    support_logprobs: Tensor,
    tail_logmass: Tensor,
    label_logprob: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> DistillationMetrics:
    """Teacher KL, top-1 probabilities, student entropy and top-1 agreement, per token.

    Args:
        hidden: ``(N, H)`` final hidden states.
        lm_head_weight: ``(V, H)`` output projection.
        support_ids: ``(N, K)`` int64 teacher support, padding ``-1``.
        support_logprobs: ``(N, K)`` teacher log-probs, ``-inf`` on padding.
        tail_logmass: ``(N,)`` ``log(1 - sum_S p)``.
        label_logprob: ``(N,)`` ``log p_y``.
        labels: ``(N,)`` int64 labels, ``-100`` ignored.
        chunk_size: tokens per chunk (memory about ``chunk_size * V * 4`` bytes).

    Returns:
        A :class:`DistillationMetrics` of the valid tokens.
    """
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive integer; found {chunk_size!r}")
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise DataError(
            f"hidden (N, H) and lm_head_weight (V, H) disagree: {tuple(hidden.shape)}, "
            f"{tuple(lm_head_weight.shape)}"
        )
    v = lm_head_weight.shape[0]
    rows = valid_rows(labels, v)
    dtype = compute_dtype(lm_head_weight.dtype)
    objective, params = resolve("fkl", {})
    teacher, target = prepare_teacher(
        "fkl",
        support_ids,
        support_logprobs,
        tail_logmass,
        label_logprob,
        labels,
        rows,
        v,
        temperature=1.0,
        dtype=dtype,
        tail_logsumexp=None,
        approximate_tail=False,
        support_counts=None,
    )
    # The teacher's most probable id: the best support entry, unless the label beats it.
    sup = support_logprobs[rows].to(dtype)
    sup = torch.where(support_ids[rows] >= 0, sup, torch.full_like(sup, NEG))
    best, col = sup.max(dim=1)
    lab = label_logprob[rows].to(dtype)
    teacher_top = torch.maximum(best, lab).exp()
    teacher_id = torch.where(
        lab > best, labels[rows].long(), support_ids[rows].long().gather(1, col[:, None]).squeeze(1)
    )

    w = lm_head_weight.to(dtype)
    h_all = hidden[rows]
    out: dict[str, list[Tensor]] = {k: [] for k in ("kl", "top", "ent", "arg")}
    for start in range(0, h_all.shape[0], int(chunk_size)):
        stop = min(start + int(chunk_size), h_all.shape[0])
        z = h_all[start:stop].to(dtype) @ w.T
        zg = z.gather(1, teacher.ids[start:stop])
        zmax, arg = z.max(dim=1)
        z.sub_(zmax[:, None])
        e = z.exp()
        s = e.sum(dim=1)
        lse = zmax + s.log()
        # H = lse - sum softmax(z) z, written with the shifted logits to stay exact.
        ent = s.log() - (e * z).sum(dim=1) / s
        del e, z
        sub = teacher.rows(start, stop)
        out["kl"].append(bucket_loss(objective, params, zg, lse, sub, target[start:stop]))
        out["top"].append((-s.log()).exp())
        out["ent"].append(ent)
        out["arg"].append(arg)
    cat = {k: torch.cat(vs) if vs else hidden.new_zeros(0, dtype=dtype) for k, vs in out.items()}
    arg = cat["arg"].long() if out["arg"] else teacher_id.new_zeros(0)
    return DistillationMetrics(
        rows=rows,
        teacher_kl=cat["kl"],
        student_top1_prob=cat["top"],
        teacher_top1_prob=teacher_top,
        student_entropy=cat["ent"],
        top1_agreement=arg == teacher_id,
    )
