"""Distillation metrics against an independent computation on full float64 logits.

The reference below works token by token from the dense teacher and student distributions:
buckets written out as Python sets, KL sums over them, top-1s by search over the ids the store
knows, calibration bins by interval tests. Nothing of the library's bucket code is used.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitstore.divergences import MetricTotals, batch_metrics, distillation_metrics

N, H, V, K = 29, 8, 40, 4
IGNORED = [5, 9, 17]


def setup(seed: int, *, sampled: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Random student and teacher; top-k support, or random ids as a sampled store holds."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    lp = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    if sampled:
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
        vals = lp.gather(1, ids)
    else:
        vals, ids = lp.topk(K, dim=-1)
    ids[0, 2:] = -1
    vals[0, 2:] = -math.inf
    tail = torch.log1p(-torch.where(ids >= 0, vals.exp(), 0.0).sum(-1))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 2, 3]] = lp[[1, 2, 3]].argmax(-1)  # the label is the teacher's argmax
    labels[4] = ids[4, 1]  # the label is in the support
    labels[IGNORED] = -100
    lab = lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    batch = {
        "support_ids": ids,
        "support_logprobs": vals,
        "tail_logmass": tail,
        "label_logprob": lab,
        "labels": labels,
        "entropy": -(lp.exp() * lp).sum(-1),
    }
    return hidden, weight, batch, {"teacher": lp}


def reference(hidden, weight, batch, lp, cap: float | None = None) -> list[dict]:
    """Per valid token, every metric from dense float64 distributions (logits capped as
    ``cap * tanh(z / cap)`` with a ``cap``)."""
    z = hidden @ weight.T
    logq = torch.log_softmax(z if cap is None else cap * torch.tanh(z / cap), dim=-1).numpy()
    logp = lp.numpy()
    out = []
    for i, y in enumerate(batch["labels"].tolist()):
        if y == -100:
            continue
        p, q = np.exp(logp[i]), np.exp(logq[i])
        support = [j for j in batch["support_ids"][i].tolist() if j >= 0]
        tokens = sorted(set(support) | {y})
        rest = [j for j in range(V) if j not in tokens]
        pb = [p[j] for j in tokens] + ([p[rest].sum()] if rest else [])
        qb = [q[j] for j in tokens] + ([q[rest].sum()] if rest else [])
        known = {j: logp[i, j] for j in support}
        t_id = max(known, key=known.get)
        if logp[i, y] > known[t_id]:
            t_id = y
        out.append(
            {
                "fkl": sum(a * math.log(a / b) for a, b in zip(pb, qb)),
                "rkl": sum(b * math.log(b / a) for a, b in zip(pb, qb)),
                "student_top1": int(q.argmax()),
                "student_top1_prob": q.max(),
                "teacher_top1": t_id,
                "teacher_top1_prob": p[t_id],
                "student_entropy": -(q * logq[i]).sum(),
                "teacher_entropy": -(p * logp[i]).sum(),
                "label": y,
            }
        )
    return out


def reference_summary(ref: list[dict]) -> dict[str, float]:
    def mean(values) -> float:
        return float(np.mean(values))

    def ece(who: str) -> float:
        conf = np.array([r[f"{who}_top1_prob"] for r in ref])
        hit = np.array([r[f"{who}_top1"] == r["label"] for r in ref], dtype=float)
        total = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            inside = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
            if inside.any():
                total += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
        return total

    keys = ("fkl", "rkl", "student_top1_prob", "teacher_top1_prob")
    return {k: mean([r[k] for r in ref]) for k in keys} | {
        "tokens": len(ref),
        "top1_agreement": mean([r["student_top1"] == r["teacher_top1"] for r in ref]),
        "student_accuracy": mean([r["student_top1"] == r["label"] for r in ref]),
        "teacher_accuracy": mean([r["teacher_top1"] == r["label"] for r in ref]),
        "student_entropy": mean([r["student_entropy"] for r in ref]),
        "teacher_entropy": mean([r["teacher_entropy"] for r in ref]),
        "student_ece": ece("student"),
        "teacher_ece": ece("teacher"),
    }


@pytest.mark.parametrize("sampled", [False, True])
def test_per_token_metrics_match_full_logit_computation(sampled):
    hidden, weight, batch, dense = setup(0, sampled=sampled)
    m = batch_metrics(hidden, weight, batch, chunk_size=5)
    ref = reference(hidden, weight, batch, dense["teacher"])
    assert m.rows.tolist() == [i for i in range(N) if i not in IGNORED]
    assert m.tokens == len(ref)
    for key in ref[0]:
        want = torch.tensor([r[key] for r in ref])
        got = m.labels if key == "label" else getattr(m, key)
        assert got is not None
        if key in ("student_top1", "teacher_top1", "label"):
            assert got.tolist() == want.tolist(), key
        else:
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-9, atol=1e-10)
    assert m.top1_agreement.tolist() == [r["student_top1"] == r["teacher_top1"] for r in ref]
    assert m.student_hit.tolist() == [r["student_top1"] == r["label"] for r in ref]
    assert m.teacher_hit.tolist() == [r["teacher_top1"] == r["label"] for r in ref]


def test_a_softcap_is_measured_on_the_capped_logits():
    # Gemma 2's logits are cap * tanh(hidden @ head.T / cap): evaluation measured the bare product.
    hidden, weight, batch, dense = setup(3)
    m = batch_metrics(hidden, weight, batch, chunk_size=4, softcap=2.0)
    ref = reference(hidden, weight, batch, dense["teacher"], cap=2.0)
    for key in ("fkl", "rkl", "student_top1_prob", "student_entropy"):
        want = torch.tensor([r[key] for r in ref], dtype=torch.float64)
        torch.testing.assert_close(getattr(m, key), want, rtol=1e-9, atol=1e-10)
    bare = batch_metrics(hidden, weight, batch, chunk_size=4)
    assert not torch.allclose(bare.fkl, m.fkl, rtol=1e-2)


def test_sampled_support_lets_the_label_be_the_teachers_top1():
    hidden, weight, batch, dense = setup(0, sampled=True)
    m = batch_metrics(hidden, weight, batch)
    # Rows 1-3 have the teacher's argmax as label; where it was not sampled, the label wins.
    argmax = dense["teacher"].argmax(-1)
    unsampled = [r for r in (1, 2, 3) if int(argmax[r]) not in batch["support_ids"][r].tolist()]
    assert unsampled
    for row in (1, 2, 3):
        i = m.rows.tolist().index(row)
        assert int(m.teacher_top1[i]) == int(argmax[row])
        assert bool(m.teacher_hit[i])


@pytest.mark.parametrize("sampled", [False, True])
def test_summary_matches_independent_means_and_ece(sampled):
    hidden, weight, batch, dense = setup(1, sampled=sampled)
    want = reference_summary(reference(hidden, weight, batch, dense["teacher"]))
    got = batch_metrics(hidden, weight, batch, chunk_size=7).summary()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_confident_student_lands_in_the_last_calibration_bin():
    # Scaled hidden states make the student's top-1 probability 1 on some tokens, and
    # confidences of exactly 1 belong to the last bin.
    hidden, weight, batch, _ = setup(2)
    hidden = hidden * 1e3
    valid = batch["labels"] != -100
    q = torch.softmax(hidden @ weight.T, dim=-1)[valid]
    conf, hit = q.max(-1).values, (q.argmax(-1) == batch["labels"][valid]).double()
    assert bool((conf == 1.0).any())
    want = 0.0
    for b in range(15):
        inside = (conf >= b / 15) & ((conf < (b + 1) / 15) if b < 14 else (conf <= 1.0))
        want += float((conf[inside] - hit[inside]).sum().abs()) / len(conf)
    got = batch_metrics(hidden, weight, batch).summary()
    assert got["student_ece"] == pytest.approx(want, rel=1e-9)


def test_chunking_does_not_change_any_value():
    hidden, weight, batch, _ = setup(3)
    whole = batch_metrics(hidden, weight, batch, chunk_size=1000)
    for chunk in (1, 3, 8):
        part = batch_metrics(hidden, weight, batch, chunk_size=chunk)
        for key in ("fkl", "rkl", "student_top1_prob", "student_entropy", "teacher_top1_prob"):
            torch.testing.assert_close(getattr(part, key), getattr(whole, key), rtol=0, atol=1e-12)
        assert part.student_top1.tolist() == whole.student_top1.tolist()


def test_ignored_positions_are_never_read():
    hidden, weight, batch, _ = setup(4)
    a = batch_metrics(hidden, weight, batch)
    poisoned = hidden.clone()
    poisoned[IGNORED] = math.nan
    b = batch_metrics(poisoned, weight, batch)
    assert a.summary() == b.summary()


def test_no_valid_token_gives_nan_means_and_zero_tokens():
    hidden, weight, batch, _ = setup(5)
    batch["labels"] = torch.full((N,), -100)
    m = batch_metrics(hidden, weight, batch)
    assert m.tokens == 0 and m.fkl.shape == (0,) and m.student_top1.dtype == torch.int64
    summary = m.summary()
    assert summary.pop("tokens") == 0
    assert all(math.isnan(v) for v in summary.values())
    assert MetricTotals().summary()["tokens"] == 0
    assert MetricTotals().sums()["fkl"] == 0.0


def test_totals_over_batches_equal_one_batch_and_merge_like_ranks():
    hidden, weight, batch, _ = setup(6)
    whole = MetricTotals().add(batch_metrics(hidden, weight, batch))
    halves = [slice(0, 11), slice(11, N)]
    per_rank = [
        MetricTotals().add(
            batch_metrics(hidden[s], weight, {k: v[s] for k, v in batch.items()}, chunk_size=4)
        )
        for s in halves
    ]
    merged = per_rank[0].merge(per_rank[1])
    torch.testing.assert_close(merged.values, whole.values, rtol=1e-12, atol=1e-12)
    assert merged.tokens == N - len(IGNORED)
    m = batch_metrics(hidden, weight, batch)
    assert whole.sums()["fkl"] == pytest.approx(float(m.fkl.sum()), rel=1e-12)


def test_teacher_entropy_averages_over_the_batches_that_have_it():
    hidden, weight, batch, _ = setup(7)
    totals = MetricTotals().add(batch_metrics(hidden, weight, batch))
    without = batch_metrics(hidden, weight, {k: v for k, v in batch.items() if k != "entropy"})
    assert without.teacher_entropy is None
    assert math.isnan(without.summary()["teacher_entropy"])
    both = MetricTotals().add(without).add(batch_metrics(hidden, weight, batch))
    assert both.summary()["teacher_entropy"] == pytest.approx(totals.summary()["teacher_entropy"])
    assert both.tokens == 2 * totals.tokens


def test_float32_inputs_agree_with_float64():
    hidden, weight, batch, _ = setup(8)
    exact = batch_metrics(hidden, weight, batch).summary()
    low = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    got = distillation_metrics(
        hidden.float(),
        weight.float(),
        low["support_ids"],
        low["support_logprobs"],
        low["tail_logmass"],
        low["label_logprob"],
        low["labels"],
        entropy=low["entropy"],
    ).summary()
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_float32_kl_of_a_confident_student_keeps_its_tail():
    # A student far more confident than the teacher (tail mass 1e-7 .. 1e-11 against 0.2): the
    # float32 bucket KLs lost the student's tail (fkl 2.6 for 3.6 at 1e-9). The reference is the
    # bucket fkl and rkl summed directly from float64 softmaxes.
    g = torch.Generator().manual_seed(17)
    n, v, k = 5, 200, 3
    u = torch.randn(n, v, generator=g, dtype=torch.float64)
    u[:, :k] += 5.0
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    z[:, :k] += torch.arange(n, dtype=torch.float64)[:, None] * 2.5 + 20.0
    labels = torch.zeros(n, dtype=torch.long)
    lp = u.log_softmax(-1)
    p, q = lp.exp(), z.softmax(-1)
    pb = torch.cat([p[:, :k], p[:, k:].sum(-1, keepdim=True)], 1)
    qb = torch.cat([q[:, :k], q[:, k:].sum(-1, keepdim=True)], 1)
    assert qb[:, -1].max() < 1e-6 and qb[:, -1].min() > 1e-11
    got = distillation_metrics(
        z.float(),
        torch.eye(v),
        torch.arange(k).repeat(n, 1),
        lp[:, :k].float(),
        torch.log1p(-p[:, :k].sum(-1)).float(),
        lp[:, 0].float(),
        labels,
    )
    fkl, rkl = (pb * (pb / qb).log()).sum(-1), (qb * (qb / pb).log()).sum(-1)
    torch.testing.assert_close(got.fkl.double(), fkl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rkl.double(), rkl, rtol=1e-5, atol=1e-5)
