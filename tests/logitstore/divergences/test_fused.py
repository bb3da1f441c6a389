"""The fused, chunked loss against ``sparse_loss`` on materialised logits (spec section 3.5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from logitstore.divergences import DIVERGENCES, fused_sparse_loss, sparse_loss
from logitstore.errors import ConfigError

N, H, V, K = 37, 16, 50, 5
PARAMS = {"jsd": {"beta": 0.3}, "amid": {"order": "qr"}, "drkl": {"target": "teacher_argmax"}}


def batch(seed: int, dtype=torch.float32):
    """Hidden states, weight, and a sampled-style sparse cache with padding and masked labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    u = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    lp = u.log_softmax(-1)
    vals, ids = lp.topk(K, dim=-1)
    n_keep = torch.randint(1, K + 1, (N,), generator=g)
    keep = torch.arange(K)[None] < n_keep[:, None]
    ids = torch.where(keep, ids, -1)
    vals = torch.where(keep, vals, -math.inf)
    tail = torch.log1p(-torch.where(keep, vals.exp(), 0.0).sum(-1))
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:6]] = -100
    lab = lp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    tail_lse2 = torch.where(
        torch.ones(N, V, dtype=torch.bool).scatter(1, ids.clamp(min=0), ~keep), lp / 2.0, -math.inf
    ).logsumexp(-1)
    cache = (ids, vals.float(), tail.float(), lab.float(), labels)
    return hidden, weight, cache, tail_lse2.float()


def reference(name, hidden, weight, cache, num_items, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = h.float() @ w.float().T
    loss = sparse_loss(name, logits, *cache, **kw).sum() / num_items
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def fused(name, hidden, weight, cache, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fused_sparse_loss(name, h, w, *cache, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the tensor's scale: entries near 0 are judged against its largest entry."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_fused_equals_unfused_values_and_both_gradients(name):
    hidden, weight, cache, _ = batch(seed=1)
    prm = PARAMS.get(name, {})
    n_valid = int((cache[-1] != -100).sum())
    want = reference(name, hidden, weight, cache, n_valid, **prm)
    got = fused(name, hidden, weight, cache, chunk_size=8, **prm)  # 31 tokens: uneven chunks
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.parametrize("name", ["fkl", "rkl", "drkl", "akl"])
def test_fused_with_temperature_tau_squared_and_step_level_num_items(name):
    hidden, weight, cache, tail_lse = batch(seed=2)
    kw = {"temperature": 2.0, "tail_logsumexp": tail_lse, "tau_squared": True}
    want = reference(name, hidden, weight, cache, 100, **kw)
    got = fused(name, hidden, weight, cache, num_items=100, chunk_size=5, **kw)
    for a, b in zip(got, want):
        close(a, b)


def test_gradient_accumulation_matches_one_big_batch():
    hidden, weight, cache, _ = batch(seed=3)
    n_valid = int((cache[-1] != -100).sum())
    whole = fused("rkl", hidden, weight, cache, chunk_size=7)
    halves = [slice(0, 20), slice(20, N)]
    parts = [
        fused("rkl", hidden[s], weight, tuple(c[s] for c in cache), num_items=n_valid)
        for s in halves
    ]
    close(parts[0][0] + parts[1][0], whole[0])
    close(torch.cat([parts[0][1], parts[1][1]]), whole[1])
    close(parts[0][2] + parts[1][2], whole[2])


def test_masked_tokens_are_dropped_and_all_masked_gives_connected_zero():
    hidden, weight, cache, _ = batch(seed=4)
    labels = cache[-1]
    _, gh, _ = fused("drkl", hidden, weight, cache, chunk_size=4)
    assert (gh[labels == -100] == 0).all()

    none = (*cache[:-1], torch.full_like(labels, -100))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fused_sparse_loss("srkl", h, w, *none)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_bf16_weights_compute_in_float32_and_frozen_inputs_get_no_gradient():
    hidden, weight, cache, _ = batch(seed=5)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    n_valid = int((cache[-1] != -100).sum())
    # Reference: the same bf16 values, upcast, on materialised float32 logits.
    want = reference("fkl", hb.float(), wb.float(), cache, n_valid)
    h = hb.clone().requires_grad_(True)
    w = wb.clone().requires_grad_(True)
    loss = fused_sparse_loss("fkl", h, w, *cache, chunk_size=16)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    close(loss.detach(), want[0])
    close(h.grad.float(), want[1], rtol=1e-2)  # bf16 rounding of the returned gradient
    close(w.grad.float(), want[2], rtol=1e-2)

    w_frozen = weight.clone()  # e.g. a frozen, tied embedding
    h = hidden.clone().requires_grad_(True)
    fused_sparse_loss("rkl", h, w_frozen, *cache).backward()
    assert w_frozen.grad is None and h.grad is not None
    with torch.no_grad():
        value = fused_sparse_loss("rkl", hidden, weight, *cache)
    close(value, reference("rkl", hidden, weight, cache, n_valid)[0])


def test_rs_kd_counts_through_the_fused_path():
    hidden, weight, cache, _ = batch(seed=6)
    ids = cache[0]
    counts = torch.where(ids >= 0, torch.randint(1, 9, ids.shape), 0)
    n_valid = int((cache[-1] != -100).sum())
    want = reference("fkl", hidden, weight, cache, n_valid, support_counts=counts)
    got = fused("fkl", hidden, weight, cache, support_counts=counts, chunk_size=6)
    for a, b in zip(got, want):
        close(a, b)


def test_bad_arguments():
    hidden, weight, cache, _ = batch(seed=7)
    with pytest.raises(ConfigError):
        fused_sparse_loss("fkl", hidden, weight, *cache, chunk_size=0)
    with pytest.raises(ConfigError):
        fused_sparse_loss("fkl", hidden, weight, *cache, num_items=0)
    with pytest.raises(ValueError):  # DataError: shapes
        fused_sparse_loss("fkl", hidden[:, :3], weight, *cache)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_operator_ever_produces_more_than_chunk_by_vocab_values():
    g = torch.Generator().manual_seed(8)
    n, h, v, chunk = 96, 8, 400, 16  # V * H (weight gradient) < chunk * V < N * V
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(v, generator=g)[:4] for _ in range(n)])
    vals = torch.log(torch.tensor([0.4, 0.2, 0.1, 0.05])).expand(n, 4)
    tail = torch.full((n,), math.log(0.25))
    labels = torch.randint(0, v, (n,), generator=g)
    lab = torch.full((n,), math.log(1e-3))
    with _LargestOutput() as probe:
        loss = fused_sparse_loss(
            "drkl", hidden, weight, ids, vals, tail, lab, labels, chunk_size=chunk
        )
        loss.backward()
    assert probe.largest <= chunk * v
    with _LargestOutput() as naive:
        sparse_loss("drkl", hidden @ weight.T, ids, vals, tail, lab, labels).sum().backward()
    assert naive.largest >= n * v  # the probe sees what materialising costs


def test_autocast_does_not_lower_the_logit_precision():
    hidden, weight, cache, _ = batch(seed=9)
    n_valid = int((cache[-1] != -100).sum())
    want = reference("rkl", hidden, weight, cache, n_valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused("rkl", hidden, weight, cache, chunk_size=8)
    for a, b in zip(got, want):
        close(a, b)


def capped_reference(name, hidden, weight, cache, num_items, cap, **kw):
    """``reference`` with Gemma 2's cap on the materialised logits, through plain autograd."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = cap * torch.tanh((h.float() @ w.float().T) / cap)
    loss = sparse_loss(name, logits, *cache, **kw).sum() / num_items
    gh, gw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("name", ["fkl", "rkl", "drkl", "jsd", "tvd"])
def test_a_softcap_caps_the_logits_in_value_and_in_both_gradients(name):
    # Gemma 2's forward gives cap * tanh(hidden @ head.T / cap); the fused loss took the bare
    # product. A cap of 1.5 on weights * 6 keeps most logits in tanh's bend.
    hidden, weight, cache, tail_lse = batch(seed=7)
    weight = weight * 6.0
    n_valid = int((cache[-1] != -100).sum())
    prm = PARAMS.get(name, {})
    want = capped_reference(name, hidden, weight, cache, n_valid, 1.5, **prm)
    got = fused(name, hidden, weight, cache, chunk_size=8, softcap=1.5, **prm)
    for a, b in zip(got, want):
        close(a, b)
    assert not torch.allclose(fused(name, hidden, weight, cache, **prm)[0], want[0], rtol=1e-2)
    kw = {"temperature": 2.0, "tail_logsumexp": tail_lse}
    want = capped_reference(name, hidden, weight, cache, n_valid, 1.5, **prm, **kw)
    got = fused(name, hidden, weight, cache, chunk_size=5, softcap=1.5, **prm, **kw)
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.parametrize("softcap", [0.0, -1.0, math.inf, math.nan, "cap"])
def test_a_softcap_must_be_a_positive_number(softcap):
    hidden, weight, cache, _ = batch(seed=8)
    with pytest.raises(ConfigError, match="softcap"):
        fused_sparse_loss("fkl", hidden, weight, *cache, softcap=softcap)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_the_ce_term_is_cross_entropy_of_the_students_own_logits(cap):
    from logitstore.divergences.loss import cross_entropy

    hidden, weight, cache, _ = batch(seed=9)
    weight = weight * 6.0
    labels = cache[-1]
    h = hidden.clone().requires_grad_(True)
    logits = h @ weight.T
    logits = logits if cap is None else cap * torch.tanh(logits / cap)
    want = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    (want_grad,) = torch.autograd.grad(want, h)
    h = hidden.clone().requires_grad_(True)
    got = cross_entropy(h, weight, labels, chunk_size=8, softcap=cap)
    (got_grad,) = torch.autograd.grad(got, h)
    close(got.detach(), want.detach())
    close(got_grad, want_grad)
