"""Logging metrics against a direct computation on full float64 logits."""

from __future__ import annotations

import math

import torch

from logitstore.divergences import distillation_metrics, sparse_loss

N, H, V, K = 23, 8, 40, 4


def setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    lp = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    vals, ids = lp.topk(K, dim=-1)
    ids[0, 2:] = -1
    vals[0, 2:] = -math.inf
    tail = torch.log1p(-torch.where(ids >= 0, vals.exp(), 0.0).sum(-1))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = lp[3].argmax()
    labels[[5, 9]] = -100
    lab = lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return hidden, weight, (ids, vals, tail, lab, labels), lp


def test_metrics_match_full_logit_computation():
    hidden, weight, cache, lp = setup(0)
    labels = cache[-1]
    m = distillation_metrics(hidden, weight, *cache, chunk_size=5)
    rows = (labels != -100).nonzero().squeeze(1)
    assert m.rows.tolist() == rows.tolist()
    logits = hidden @ weight.T
    q = logits.softmax(-1)[rows]
    torch.testing.assert_close(m.student_top1_prob, q.max(-1).values)
    torch.testing.assert_close(m.student_entropy, -(q * q.log()).sum(-1))
    # Teacher's top-1 among what the cache knows: the support and the label.
    known = torch.where(cache[0] >= 0, cache[1], -math.inf)[rows]
    best = torch.maximum(known.max(-1).values, cache[3][rows]).exp()
    torch.testing.assert_close(m.teacher_top1_prob, best)
    kl = sparse_loss("fkl", logits, *cache)[rows]
    torch.testing.assert_close(m.teacher_kl, kl)
    teacher_arg = lp.argmax(-1)[rows]
    assert m.top1_agreement.tolist() == (q.argmax(-1) == teacher_arg).tolist()
    summary = m.summary()
    assert summary["student_entropy"] == float(m.student_entropy.mean())


def test_metrics_chunking_and_no_tokens():
    hidden, weight, cache, _ = setup(1)
    a = distillation_metrics(hidden, weight, *cache, chunk_size=3)
    b = distillation_metrics(hidden, weight, *cache, chunk_size=1000)
    for f in ("teacher_kl", "student_entropy", "student_top1_prob"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    none = (*cache[:-1], torch.full((N,), -100))
    empty = distillation_metrics(hidden, weight, *none)
    assert empty.rows.numel() == 0 and math.isnan(empty.summary()["teacher_kl"])
