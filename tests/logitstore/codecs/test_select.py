"""``top_k`` against ``torch.topk``: equal values, valid ids, the documented tie rule.

The fast path needs a vocabulary of at least ``MIN_VOCAB`` tokens; the property tests shrink
``GROUP``, ``PIECE``, ``CHUNK_ROWS`` and ``MIN_VOCAB`` so that small rows (ties, ``-inf``,
ragged ends, several chunks) run through the same code, and assert that they did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitstore.codecs import _select
from logitstore.codecs._select import top_k

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(z: torch.Tensor, k: int, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Assert the contract of ``top_k(z, k)`` against ``torch.topk``; return its result."""
    assert _select._fast_path(z, k) == fast
    values, ids = top_k(z, k)
    ref = torch.topk(z, k, dim=1)
    assert values.dtype == z.dtype and ids.dtype == torch.int64
    assert values.shape == ids.shape == (z.shape[0], k)
    assert torch.equal(values, ref.values)  # the same multiset, in the same (descending) order
    assert ((ids >= 0) & (ids < z.shape[1])).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct within each row
    # The input's own values, bit for bit (-0.0 stays -0.0).
    taken = z.gather(1, ids).contiguous()
    assert torch.equal(taken.view(torch.int32), values.contiguous().view(torch.int32))
    return values, ids


def by_value_then_id(z: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of each row's ``k`` largest entries, equal values by ascending id (stable sort)."""
    return torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("vocab", [49152, 50257, 32000 + 17, 16384])
@pytest.mark.parametrize("k", [1, 64, 128])
def test_distinct_rows_match_topk_exactly(vocab, k):
    z = torch.randn(37, vocab, generator=torch.Generator().manual_seed(vocab + k)) * 2
    z[:, 7] += 12  # a peaked row's top-1
    _, ids = check(z, k)
    assert torch.equal(ids, torch.topk(z, k, dim=1).indices)  # no ties: the order is unique


@pytest.mark.parametrize(
    ("vocab", "k"),
    [(1000, 5), (16383, 1), (49152, 1536), (8192, 128), (300, 300)],
)
def test_small_vocabularies_and_large_k_use_torch(vocab, k):
    z = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0))
    values, ids = check(z, k, fast=False)
    assert torch.equal(ids, torch.topk(z, k, dim=1).indices)


def test_fast_path_boundary():
    k = 256  # 2 * k * GROUP = 16384 = MIN_VOCAB
    z = torch.randn(3, 2 * k * _select.GROUP, generator=torch.Generator().manual_seed(1))
    check(z, k)
    check(z[:, 1:], k, fast=False)


def test_other_dtypes_and_autograd_use_torch():
    z = torch.randn(4, 20000, generator=torch.Generator().manual_seed(2))
    for other in (z.double(), z.bfloat16(), z.requires_grad_(True)):
        values, ids = top_k(other, 64)
        ref = torch.topk(other, 64, dim=1)
        assert torch.equal(values, ref.values) and torch.equal(ids, ref.indices)
        assert values.requires_grad == other.requires_grad


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(3)
    tall = torch.randn(20000, 40, generator=gen)
    wide = torch.randn(6, 2 * 20000, generator=gen)
    for view in (tall.t(), wide[:, ::2], wide[::2, 3:20003]):
        assert not view.is_contiguous()
        check(view, 50)


def test_empty_batch_and_inference_mode():
    assert top_k(torch.empty(0, 20000), 8)[0].shape == (0, 8)
    with torch.inference_mode():
        check(torch.randn(3, 20000), 8)


def test_masked_rows():
    """Rows that are mostly -inf: exactly k finite entries, fewer than k, none, all in a group."""
    vocab, k = 20000, 100
    gen = torch.Generator().manual_seed(5)
    z = torch.full((5, vocab), float("-inf"))
    z[0, torch.randperm(vocab, generator=gen)[:k]] = torch.randn(k, generator=gen)
    z[1, torch.randperm(vocab, generator=gen)[: k // 3]] = torch.randn(k // 3, generator=gen)
    n = vocab // _select.GROUP
    z[3, 5 + n * torch.arange(_select.GROUP)] = torch.randn(_select.GROUP, generator=gen)
    z[4, : vocab // 2] = torch.randn(vocab // 2, generator=gen)  # half the vocabulary masked
    values, ids = check(z, k)
    assert torch.isfinite(values[0]).all()
    assert torch.isfinite(values[1, : k // 3]).all() and (values[1, k // 3 :] == -np.inf).all()
    assert (values[2] == -np.inf).all()
    assert torch.equal(ids[0].sort().values, torch.topk(z[0], k).indices.sort().values)


def test_nan_rows_are_left_to_torch():
    z = torch.randn(4, 20000, generator=torch.Generator().manual_seed(6))
    z[2, 11] = float("nan")
    for vocab in (20000, 19999):  # NaN in a group, and in the ragged end
        z[3, vocab - 1] = float("nan")
        values, ids = top_k(z[:, :vocab], 16)
        ref = torch.topk(z[:, :vocab], 16, dim=1)
        torch.testing.assert_close(values, ref.values, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(ids, ref.indices)


def test_signed_zeros_and_infinities():
    z = torch.zeros(2, 20000)
    z[0, ::2] = -0.0
    z[1, 100:140] = float("inf")
    z[1, 3] = float("-inf")
    check(z, 64)


def test_deterministic_and_independent_of_other_rows():
    z = torch.randint(0, 5, (40, 20000), generator=torch.Generator().manual_seed(7)).float()
    values, ids = check(z, 128)  # heavy ties
    again = top_k(z.clone(), 128)
    assert torch.equal(again[0], values) and torch.equal(again[1], ids)
    part = top_k(z[13:29], 128)
    assert torch.equal(part[0], values[13:29]) and torch.equal(part[1], ids[13:29])


def rows_of(kind: str, rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of one (possibly degenerate) family."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        z = rng.normal(size=(rows, vocab)) * rng.choice([0.01, 1.0, 30.0])
    elif kind == "ties":
        z = rng.integers(0, rng.choice([1, 2, 3, 20]), size=(rows, vocab)).astype(float)
    elif kind == "masked":
        z = np.where(rng.random((rows, vocab)) < rng.choice([0.5, 0.95, 1.0]), -np.inf, 0.0)
        z += rng.integers(0, 3, size=(rows, vocab))
    else:  # "spikes": many equal large entries over a flat bulk
        z = np.zeros((rows, vocab))
        z[:, rng.integers(0, vocab, size=rng.integers(1, 3 * vocab // 4))] = 5.0
    return torch.from_numpy(z.astype(np.float32))


@SETTINGS
@given(
    kind=st.sampled_from(["normal", "ties", "masked", "spikes"]),
    group_piece=st.sampled_from([(4, 1), (4, 2), (8, 4), (8, 8), (16, 4)]),
    k=st.integers(1, 12),
    extra=st.integers(0, 300),
    rows=st.integers(1, 9),
    chunk=st.sampled_from([1, 3, 16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_small_layouts(kind, group_piece, k, extra, rows, chunk, seed):
    group, piece = group_piece
    vocab = 2 * k * group + extra  # ragged ends included
    z = rows_of(kind, rows, vocab, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_select, "GROUP", group)
        mp.setattr(_select, "PIECE", piece)
        mp.setattr(_select, "CHUNK_ROWS", chunk)
        mp.setattr(_select, "MIN_VOCAB", 0)
        values, ids = check(z, k)
    # Equal values come out by ascending id.
    same = values[:, 1:] == values[:, :-1]
    assert (ids[:, 1:] > ids[:, :-1])[same].all()
    # Where the k-th value is no group's maximum, no group was passed over at it: the smallest
    # ids among the tied entries are returned, as a stable sort by value would.
    n = vocab // group
    maxima = z[:, : n * group].reshape(rows, group, n).amax(dim=1)
    clear = ~(maxima == values[:, -1:]).any(dim=1)
    assert torch.equal(ids[clear], by_value_then_id(z, k)[clear])
