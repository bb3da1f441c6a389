"""Distillation objectives, dense and sparse, and the fused memory-efficient loss.

Every objective of docs/divergences.md is registered in :data:`DIVERGENCES` and evaluated on the
bucket model: the teacher's stored support, the label, and one tail bucket. :func:`dense_loss`
is the reference on full distributions, :func:`sparse_loss` works on materialised student
logits, and :func:`fused_sparse_loss` goes from hidden states to the loss without ever holding
``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from logitstore.divergences._fused import DEFAULT_CHUNK_SIZE, fused_sparse_loss
from logitstore.divergences._losses import dense_loss, sparse_loss
from logitstore.divergences._registry import DIVERGENCES, Objective
from logitstore.divergences.loss import DistillationLoss
from logitstore.divergences.metrics import (
    DistillationMetrics,
    MetricTotals,
    batch_metrics,
    distillation_metrics,
)
from logitstore.divergences.taid import TAIDSchedule

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIVERGENCES",
    "DistillationLoss",
    "DistillationMetrics",
    "MetricTotals",
    "Objective",
    "TAIDSchedule",
    "batch_metrics",
    "dense_loss",
    "distillation_metrics",
    "fused_sparse_loss",
    "sparse_loss",
]
