"""Distillation metrics: the one implementation that evaluation, training logs and benchmarks use.

From the student's hidden states and output weight plus the cached sparse teacher (the same
arguments as :func:`~logitstore.divergences.fused_sparse_loss`), at temperature 1 and without
ever holding more than ``chunk_size x V`` logits, :func:`distillation_metrics` gives per valid
token (label not ``-100``):

- bucket forward KL(p || q) and reverse KL(q || p), the registered ``fkl`` and ``rkl`` on the
  bucket model (docs/divergences.md, sections 3 and 5): exact when the support is the whole
  vocabulary, a lower bound on the full divergence otherwise;
- the student's top-1 id and probability, and its entropy over the full vocabulary;
- the teacher's top-1 id and probability (below), and its entropy as the store recorded it;
- top-1 agreement, and whether each top-1 is the label.

**The teacher's top-1** is the most probable id the store knows of: the best support entry,
or the label when its stored log-prob is higher (a tie keeps the support entry). For a top-k
store that is the teacher's argmax. For a sampled store the support holds only the sampled
ids, so it is the most probable id among the samples and the label, which can miss the argmax
when the teacher is flat.

:class:`MetricTotals` sums these over tokens, batches and ranks in one float64 tensor, and its
:meth:`~MetricTotals.summary` gives the means and the expected calibration error against the
labels (15 equal-width confidence bins) for the student and the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from logitstore.divergences._buckets import NEG, compute_dtype, token_ids
from logitstore.divergences._fused import DEFAULT_CHUNK_SIZE, check_softcap
from logitstore.divergences._losses import bucket_loss, prepare_teacher, valid_rows
from logitstore.divergences._registry import resolve
from logitstore.errors import ConfigError, DataError

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15


@dataclass(frozen=True)
class DistillationMetrics:
    """Per-token metrics for the ``n`` tokens whose label is not ignored.

    Attributes:
        rows: ``(n,)`` int64 positions (into the ``N`` inputs) the values below belong to.
        labels: ``(n,)`` int64 labels of those positions.
        fkl: ``(n,)`` bucket forward KL(p || q), the teacher KL.
        rkl: ``(n,)`` bucket reverse KL(q || p).
        student_top1: ``(n,)`` int64 the student's argmax.
        student_top1_prob: ``(n,)`` the student's largest probability.
        teacher_top1: ``(n,)`` int64 the teacher's top-1 (support or label; module docstring).
        teacher_top1_prob: ``(n,)`` its probability.
        student_entropy: ``(n,)`` the student's entropy in nats, over the full vocabulary.
        teacher_entropy: ``(n,)`` the teacher's entropy as stored, or None when not given.
    """

    rows: Tensor
    labels: Tensor
    fkl: Tensor
    rkl: Tensor
    student_top1: Tensor
    student_top1_prob: Tensor
    teacher_top1: Tensor
    teacher_top1_prob: Tensor
    student_entropy: Tensor
    teacher_entropy: Tensor | None

    @property
    def tokens(self) -> int:
        """``n``, the number of valid tokens."""
        return int(self.rows.numel())

    @property
    def top1_agreement(self) -> Tensor:
        """``(n,)`` bool, the student's argmax is the teacher's top-1."""
        return self.student_top1 == self.teacher_top1

    @property
    def student_hit(self) -> Tensor:
        """``(n,)`` bool, the student's argmax is the label."""
        return self.student_top1 == self.labels

    @property
    def teacher_hit(self) -> Tensor:
        """``(n,)`` bool, the teacher's top-1 is the label."""
        return self.teacher_top1 == self.labels

    def summary(self) -> dict[str, float]:
        """Means and ECE over these tokens; see :meth:`MetricTotals.summary`."""
        return MetricTotals(device=self.rows.device).add(self).summary()


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
    entropy: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: float | None = None,
) -> DistillationMetrics:
    """Every metric of the module docstring, per valid token, in one chunked pass.

    Args:
        hidden: ``(N, H)`` final hidden states.
        lm_head_weight: ``(V, H)`` output projection.
        support_ids: ``(N, K)`` int64 teacher support, padding ``-1``.
        support_logprobs: ``(N, K)`` teacher log-probs, ``-inf`` on padding.
        tail_logmass: ``(N,)`` ``log(1 - sum_S p)``.
        label_logprob: ``(N,)`` ``log p_y``.
        labels: ``(N,)`` int64 labels, ``-100`` ignored.
        entropy: ``(N,)`` the teacher's entropy in nats as stored, or None.
        chunk_size: tokens per chunk (memory about ``chunk_size * V * 4`` bytes).
        softcap: the student's logits are ``softcap * tanh(hidden @ lm_head_weight.T /
            softcap)`` (Gemma 2's ``final_logit_softcapping``); None: the product itself.

    Returns:
        A :class:`DistillationMetrics` of the valid tokens.
    """
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be a positive integer; found {chunk_size!r}")
    softcap = check_softcap(softcap)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise DataError(
            f"hidden (N, H) and lm_head_weight (V, H) disagree: {tuple(hidden.shape)}, "
            f"{tuple(lm_head_weight.shape)}"
        )
    if entropy is not None and entropy.shape != labels.shape:
        raise DataError(f"entropy must be (N,) like labels; found {tuple(entropy.shape)}")
    v = lm_head_weight.shape[0]
    rows = valid_rows(labels, v)
    if hidden.shape[0] != labels.shape[0]:
        raise DataError(f"hidden has {hidden.shape[0]} rows, labels have {labels.shape[0]}")
    dtype = compute_dtype(lm_head_weight.dtype)
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
    objectives = {name: resolve(name, {}) for name in ("fkl", "rkl")}
    y = labels[rows].long()
    # The teacher's top-1: the best support entry, unless the label beats it.
    sup = support_logprobs[rows].to(dtype)
    sup = torch.where(support_ids[rows] >= 0, sup, torch.full_like(sup, NEG))
    best, col = sup.max(dim=1)
    lab = label_logprob[rows].to(dtype)
    teacher_id = torch.where(lab > best, y, support_ids[rows].long().gather(1, col[:, None])[:, 0])

    w = lm_head_weight.to(dtype)
    h_all = hidden[rows]
    out: dict[str, list[Tensor]] = {k: [] for k in ("fkl", "rkl", "top", "ent", "arg")}
    for start in range(0, h_all.shape[0], int(chunk_size)):
        stop = min(start + int(chunk_size), h_all.shape[0])
        # One (c, V) buffer: logits, then shifted logits, then exp, then exp * log(exp).
        z = h_all[start:stop].to(dtype) @ w.T
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        zg = z.gather(1, teacher.ids[start:stop])
        zmax, arg = z.max(dim=1)
        s = z.sub_(zmax[:, None]).exp_().sum(dim=1)
        # The tail's own sum: S' zeroed for one pass, then put back (see student_buckets).
        sub = teacher.rows(start, stop)
        at = token_ids(sub)
        kept = z.gather(1, at)
        s_tail = z.scatter_(1, at, 0.0).sum(dim=1)
        z.scatter_(1, at, kept)
        # H = log s - sum_v e_v z_v / s with e = exp(z - max); e log e is 0 where e underflows.
        ent = s.log() - z.xlogy_(z).sum(dim=1) / s
        del z
        lse = zmax + s.log()
        tail_lse = zmax + s_tail.log()
        for name, (objective, params) in objectives.items():
            values = bucket_loss(objective, params, zg, lse, tail_lse, sub, target[start:stop])
            out[name].append(values)
        out["top"].append(s.reciprocal())
        out["ent"].append(ent)
        out["arg"].append(arg)
    empty = {"arg": rows.new_zeros(0)} | {k: w.new_zeros(0) for k in out if k != "arg"}
    cat = {k: torch.cat(vs) if vs else empty[k] for k, vs in out.items()}
    return DistillationMetrics(
        rows=rows,
        labels=y,
        fkl=cat["fkl"],
        rkl=cat["rkl"],
        student_top1=cat["arg"].long(),
        student_top1_prob=cat["top"],
        teacher_top1=teacher_id,
        teacher_top1_prob=torch.maximum(best, lab).exp(),
        student_entropy=cat["ent"],
        teacher_entropy=None if entropy is None else entropy[rows].to(dtype),
    )


def batch_metrics(
    hidden: Tensor,
    lm_head_weight: Tensor,
    batch: Mapping[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: float | None = None,
) -> DistillationMetrics:
    """:func:`distillation_metrics` on one collated batch (``logitstore.dataset``).

    Args:
        hidden: ``(N, H)`` final hidden states over the batch's ``N`` real positions.
        lm_head_weight: ``(V, H)`` output projection.
        batch: from ``collate_documents``: ``support_ids``, ``support_logprobs``,
            ``tail_logmass``, ``label_logprob``, ``labels`` and, if present, ``entropy``.
        chunk_size: tokens per chunk.
        softcap: as in :func:`distillation_metrics`.
    """
    return distillation_metrics(
        hidden,
        lm_head_weight,
        batch["support_ids"],
        batch["support_logprobs"],
        batch["tail_logmass"],
        batch["label_logprob"],
        batch["labels"],
        entropy=batch.get("entropy"),
        chunk_size=chunk_size,
        softcap=softcap,
    )


#: The sums kept by :class:`MetricTotals`, in the order of its ``values``.
SUMS = (
    "tokens",
    "fkl",
    "rkl",
    "top1_agreement",
    "student_top1_prob",
    "teacher_top1_prob",
    "student_entropy",
    "teacher_entropy",
    "teacher_entropy_tokens",
    "student_accuracy",
    "teacher_accuracy",
)


class MetricTotals:
    """Sums of :class:`DistillationMetrics` over tokens, batches and ranks.

    Everything is in one float64 tensor, ``values``: the :data:`SUMS` in order, then per
    calibration bin the token count, the summed confidence and the summed hits, for the
    student and then the teacher (``2 x 3 x ECE_BINS``). Sums combine by addition, so ranks
    combine with one ``torch.distributed.all_reduce(totals.values)`` before :meth:`summary`.

    Args:
        device: where ``values`` lives; adding metrics from the same device does not sync.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.values = torch.zeros(len(SUMS) + 2 * 3 * ECE_BINS, dtype=torch.float64, device=device)

    @property
    def bins(self) -> Tensor:
        """``(2, 3, ECE_BINS)`` view: student/teacher x count/confidence/hits x bin."""
        return self.values[len(SUMS) :].view(2, 3, ECE_BINS)

    @property
    def tokens(self) -> int:
        """Tokens added so far."""
        return int(self.values[0])

    def add(self, metrics: DistillationMetrics) -> MetricTotals:
        """Add one batch's per-token metrics; returns ``self``."""
        f64 = torch.float64
        ent = metrics.teacher_entropy
        sums = [
            float(metrics.tokens),
            metrics.fkl.sum(dtype=f64),
            metrics.rkl.sum(dtype=f64),
            metrics.top1_agreement.sum(dtype=f64),
            metrics.student_top1_prob.sum(dtype=f64),
            metrics.teacher_top1_prob.sum(dtype=f64),
            metrics.student_entropy.sum(dtype=f64),
            0.0 if ent is None else ent.sum(dtype=f64),
            0.0 if ent is None else float(metrics.tokens),
            metrics.student_hit.sum(dtype=f64),
            metrics.teacher_hit.sum(dtype=f64),
        ]
        dev = metrics.rows.device
        part = torch.stack([torch.as_tensor(x, dtype=f64, device=dev) for x in sums])
        bins = torch.zeros(2, 3, ECE_BINS, dtype=f64, device=dev)
        for who, conf, hit in (
            (0, metrics.student_top1_prob, metrics.student_hit),
            (1, metrics.teacher_top1_prob, metrics.teacher_hit),
        ):
            # Bin b holds confidences in [b / 15, (b + 1) / 15); the last one also holds 1.
            index = (conf * ECE_BINS).long().clamp(0, ECE_BINS - 1)
            source = torch.stack([torch.ones_like(conf), conf, hit.to(conf.dtype)]).to(f64)
            bins[who].index_add_(1, index, source)
        self.values += torch.cat([part, bins.flatten()]).to(self.values.device)
        return self

    def merge(self, other: MetricTotals) -> MetricTotals:
        """Add another accumulator's sums (another rank's, another run's); returns ``self``."""
        self.values += other.values.to(self.values.device)
        return self

    def sums(self) -> dict[str, float]:
        """The raw :data:`SUMS` as plain floats (e.g. ``sums()["fkl"]`` for a summed KL)."""
        return dict(zip(SUMS, self.values[: len(SUMS)].tolist(), strict=True))

    def summary(self) -> dict[str, float]:
        """``tokens`` and per-token means, plus ``student_ece`` and ``teacher_ece``.

        Means are NaN without tokens; ``teacher_entropy`` is NaN when no batch gave it. ECE is
        ``sum_b |sum of confidences - sum of hits| / tokens`` over the bins.
        """
        sums = self.sums()
        n, m = sums["tokens"], sums["teacher_entropy_tokens"]

        def mean(key: str, count: float = n) -> float:
            return sums[key] / count if count else math.nan

        def ece(who: int) -> float:
            _, conf, hits = self.bins[who]
            return float((conf - hits).abs().sum()) / n if n else math.nan

        return {
            "tokens": int(n),
            "fkl": mean("fkl"),
            "rkl": mean("rkl"),
            "top1_agreement": mean("top1_agreement"),
            "student_top1_prob": mean("student_top1_prob"),
            "teacher_top1_prob": mean("teacher_top1_prob"),
            "student_ece": ece(0),
            "teacher_ece": ece(1),
            "student_accuracy": mean("student_accuracy"),
            "teacher_accuracy": mean("teacher_accuracy"),
            "student_entropy": mean("student_entropy"),
            "teacher_entropy": mean("teacher_entropy", m),
        }
