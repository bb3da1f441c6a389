"""Fidelity against a direct per-position computation written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitstore.codecs import (
    Sampled,
    TopK,
    fidelity_sums,
    merge_fidelity,
    position_fidelity,
    summarize_fidelity,
)


def direct(true_lp: torch.Tensor, dec, labels: torch.Tensor) -> dict[str, list[float]]:
    """The definitions in fidelity.py's docstring, one position and one id at a time."""
    out: dict[str, list[float]] = {k: [] for k in ("mass", "bkl", "skl", "err", "top1")}
    true = true_lp.double().tolist()
    for row, y in enumerate(labels.tolist()):
        p = [math.exp(v) for v in true[row]]
        pairs = [
            (int(i), float(v))
            for i, v in zip(dec.support_ids[row], dec.support_logprobs[row])
            if i >= 0
        ]
        support = [i for i, _ in pairs]
        q = {i: math.exp(v) for i, v in pairs}
        pb = {i: p[i] for i in support}
        if y not in q:
            q[y] = math.exp(float(dec.label_logprob[row]))
            pb[y] = p[y]
        q_tail = math.exp(float(dec.tail_logmass[row])) - (q[y] if y not in support else 0.0)
        pb["T"] = max(1 - sum(pb.values()), 1e-12)
        q["T"] = max(q_tail, 1e-12)
        z = sum(q.values())
        out["bkl"].append(sum(pb[b] * math.log(pb[b] / (q[b] / z)) for b in pb if pb[b] > 0))
        ps, qs = sum(p[i] for i in support), sum(math.exp(v) for _, v in pairs)
        out["skl"].append(
            sum(p[i] / ps * math.log((p[i] / ps) / (math.exp(v) / qs)) for i, v in pairs)
        )
        out["mass"].append(ps)
        out["err"].append(max(abs(v - true[row][i]) for i, v in pairs))
        best = max(pairs, key=lambda t: t[1])[0]
        out["top1"].append(float(best == max(range(len(p)), key=lambda i: p[i])))
    return out


@pytest.mark.parametrize(
    "codec", [TopK(k=6, values="q4"), TopK(k=6, values="bfloat16"), Sampled(n=8)], ids=repr
)
def test_position_fidelity_matches_direct(codec):
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(2.5 * torch.randn(12, 40, generator=g), dim=1)
    labels = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
    labels[:3] = lp.argsort(dim=1)[:3, 0]  # least probable: certainly outside the support
    enc = codec.encode(lp, labels, generator=torch.Generator().manual_seed(0))
    dec = codec.decode({k: v.numpy() for k, v in enc.items()})
    got = position_fidelity(lp, dec, labels)
    want = direct(lp, dec, labels)
    for key, ref in (
        ("mass_captured", "mass"),
        ("bucket_kl", "bkl"),
        ("support_kl", "skl"),
        ("max_logprob_error", "err"),
        ("top1_agreement", "top1"),
    ):
        np.testing.assert_allclose(got[key], want[ref], rtol=1e-6, atol=1e-12, err_msg=key)
    if isinstance(codec, TopK) and codec.values == "q4":
        assert (got["bucket_kl"] > 0).all()  # quantized values are not exact


def test_exact_values_have_zero_kl():
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(3 * torch.randn(20, 100, generator=g), dim=1)
    labels = torch.randint(0, 100, (20,), generator=g)
    codec = TopK(k=10, values="float32")
    dec = codec.decode({k: v.numpy() for k, v in codec.encode(lp, labels).items()})
    got = position_fidelity(lp, dec, labels)
    # Only the float16 tail is inexact: its relative error 2^-11 |log r| bounds the KL by
    # about r * (2^-11 |log r|)^2 / 2 per position, a few 1e-8 here.
    assert got["support_kl"].max() < 1e-12
    assert got["bucket_kl"].max() < 1e-7
    assert (got["top1_agreement"] == 1).all()
    # A wrong argmax is caught: swap the first two decoded ids.
    dec.support_ids[:, [0, 1]] = dec.support_ids[:, [1, 0]]
    assert (position_fidelity(lp, dec, labels)["top1_agreement"] == 0).all()


def test_sums_merge_and_summary():
    g = torch.Generator().manual_seed(2)
    lp = torch.log_softmax(3 * torch.randn(30, 50, generator=g), dim=1)
    labels = torch.randint(0, 50, (30,), generator=g)
    codec = TopK(k=5, values="q4")
    dec = codec.decode({k: v.numpy() for k, v in codec.encode(lp, labels).items()})
    per = position_fidelity(lp, dec, labels)
    parts = [fidelity_sums(lp[a:b], dec.slice(a, b), labels[a:b]) for a, b in ((0, 11), (11, 30))]
    merged = merge_fidelity(parts)
    assert merged["count"] == 30
    summary = summarize_fidelity(merged)
    for key, values in per.items():
        assert summary[key] == pytest.approx(values.mean(), rel=1e-12)
    assert summary["bucket_kl_max"] == pytest.approx(per["bucket_kl"].max())
    assert summary["max_logprob_error_max"] == pytest.approx(per["max_logprob_error"].max())
    assert summarize_fidelity(merge_fidelity([])) == {"positions": 0.0}
