"""Id planes and run-restarted gaps against a direct per-row reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore.codecs import _ids
from logitstore.codecs.topk import row_cumsum


@pytest.mark.parametrize("block_rows", [None, 1, 7])
@pytest.mark.parametrize("vocab", [7, 256, 257, 65536, 70000, 1 << 20])
def test_runs_round_trip(vocab, block_rows, monkeypatch):
    if block_rows is not None:  # decoding goes block by block; blocks must not leak into rows
        monkeypatch.setattr(_ids, "BLOCK_ENTRIES", block_rows * min(12, vocab))
    rng = np.random.default_rng(vocab)
    rows, width = 50, min(12, vocab)
    ids = np.stack([rng.choice(vocab, width, replace=False) for _ in range(rows)])
    starts = rng.random((rows, width)) < 0.3
    starts[:, 0] = True
    # Ascending within runs, as the codecs lay them out.
    run = np.cumsum(starts, axis=1)
    for r in range(rows):
        for g in np.unique(run[r]):
            sel = run[r] == g
            ids[r, sel] = np.sort(ids[r, sel])
    planes = _ids.encode_sorted_ids(
        torch.from_numpy(ids), None, "ids", vocab, torch.from_numpy(starts)
    )
    assert len(planes) == max(1, ((vocab - 1).bit_length() + 7) // 8)
    fields = {k: v.numpy() for k, v in planes.items()}
    assert all(v.dtype == np.uint8 and v.shape == ids.shape for v in fields.values())
    np.testing.assert_array_equal(_ids.decode_sorted_ids(fields, "ids", starts), ids)
    # One run per row.
    one = np.sort(ids, axis=1)
    planes = _ids.encode_sorted_ids(torch.from_numpy(one), None, "ids", vocab)
    np.testing.assert_array_equal(
        _ids.decode_sorted_ids({k: v.numpy() for k, v in planes.items()}, "ids"), one
    )


def _reference_ids(planes: list[np.ndarray], starts: np.ndarray | None) -> np.ndarray:
    """Ids from gap planes one entry at a time: a run starts at its gap, others follow the
    previous id by ``gap + 1``."""
    gaps = sum(p.astype(np.int64) << (8 * b) for b, p in enumerate(planes))
    ids = np.zeros(gaps.shape, dtype=np.int64)
    for r in range(gaps.shape[0]):
        for c in range(gaps.shape[1]):
            new_run = c == 0 or (starts is not None and starts[r, c])
            ids[r, c] = gaps[r, c] if new_run else ids[r, c - 1] + 1 + gaps[r, c]
    return ids


@pytest.mark.parametrize("block_rows", [None, 1, 3])
@pytest.mark.parametrize("n_planes", [1, 2, 3])
@pytest.mark.parametrize("runs", ["one per row", "sparse", "dense", "every entry"])
def test_any_planes_decode_as_the_entry_by_entry_reading(n_planes, runs, block_rows, monkeypatch):
    """Arbitrary bytes (not only what the encoder writes: a damaged or hostile shard) decode
    to exactly the ids an entry-by-entry reading gives, whatever the run starts and blocks."""
    rows, width = 23, 17
    if block_rows is not None:
        monkeypatch.setattr(_ids, "BLOCK_ENTRIES", block_rows * width)
    rng = np.random.default_rng([n_planes, len(runs)])
    planes = [rng.integers(0, 256, (rows, width), dtype=np.uint8) for _ in range(n_planes)]
    fields = {f"ids{b}": p for b, p in enumerate(planes)}
    starts = None
    if runs != "one per row":
        share = {"sparse": 0.1, "dense": 0.6, "every entry": 1.0}[runs]
        starts = rng.random((rows, width)) < share
        starts[:, 0] = True
    np.testing.assert_array_equal(
        _ids.decode_sorted_ids(fields, "ids", starts), _reference_ids(planes, starts)
    )


def test_row_cumsum_matches_numpy():
    rng = np.random.default_rng(0)
    deltas = rng.integers(0, 4, (100, 60)).astype(np.uint8)  # row sums stay below 256
    np.testing.assert_array_equal(row_cumsum(deltas), np.cumsum(deltas.astype(np.int64), axis=1))


def test_row_cumsum_of_wide_rows_with_large_deltas():
    rng = np.random.default_rng(1)
    deltas = rng.integers(0, 256, (37, 300)).astype(np.uint8)  # row sums far beyond 2^8
    np.testing.assert_array_equal(row_cumsum(deltas), np.cumsum(deltas.astype(np.int64), axis=1))


@pytest.mark.parametrize("block_rows", [None, 1, 7])
@pytest.mark.parametrize("vocab", [7, 300, 70000])
def test_ids_through_the_hot_table_match_the_inverse_map(vocab, block_rows, monkeypatch):
    """Ids mapped block by block through the cached table equal the forward map inverted by
    brute force, for every stored id of the vocabulary."""
    width = min(12, vocab)
    if block_rows is not None:
        monkeypatch.setattr(_ids, "BLOCK_ENTRIES", block_rows * width)
    rng = np.random.default_rng(vocab)
    hot = tuple(int(i) for i in rng.permutation(vocab)[: vocab // 3])
    fwd = _ids.hot_forward(hot, vocab, torch.device("cpu")).numpy()
    inv = np.empty_like(fwd)
    inv[fwd] = np.arange(vocab)
    stored = np.stack([np.sort(rng.choice(vocab, width, replace=False)) for _ in range(40)])
    stored[0, -1] = vocab - 1  # the last id has a table entry too
    planes = _ids.encode_sorted_ids(torch.from_numpy(stored), None, "ids", vocab)
    fields = {k: v.numpy() for k, v in planes.items()}
    table = _ids.inverse_table(hot, vocab)
    assert table is not None and not table.flags.writeable
    got = _ids.decode_sorted_ids(fields, "ids", limit=vocab, table=table)
    np.testing.assert_array_equal(got, inv[stored])
    np.testing.assert_array_equal(got, _ids.hot_inverse(hot, stored))


def test_inverse_table_is_built_once_per_order_and_only_for_a_valid_one():
    hot = (5, 1, 3)
    assert _ids.inverse_table(hot, 10) is _ids.inverse_table(tuple(list(hot)), 10)
    assert _ids.inverse_table(hot, 10).tolist() == [-1, 5, 1, 3, 0, 2, 4, 6, 7, 8, 9]
    assert _ids.inverse_table((), 10) is None
    assert _ids.inverse_table((12, 1), 10) is None  # a hot id outside the vocabulary
    assert _ids.inverse_table((1, 1), 10) is None  # repeats: not a permutation
    assert _ids.inverse_table((1,), _ids.TABLE_LIMIT + 1) is None  # no table that large


def test_ids_beyond_the_limit_are_refused_before_the_table():
    from logitstore.errors import BadValueError

    vocab = 300
    stored = np.array([[1, 2, 3], [4, 5, 299], [6, 7, 301]])
    planes = _ids.encode_sorted_ids(torch.from_numpy(stored), None, "ids", 302)
    fields = {k: v.numpy() for k, v in planes.items()}
    table = _ids.inverse_table((2, 1), vocab)
    with pytest.raises(BadValueError, match=r"in \[0, 300\), found 301") as err:
        _ids.decode_sorted_ids(fields, "ids", limit=vocab, table=table)
    assert err.value.row == 2
