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


def test_row_cumsum_matches_numpy():
    rng = np.random.default_rng(0)
    deltas = rng.integers(0, 4, (100, 60)).astype(np.uint8)  # row sums stay below 256
    np.testing.assert_array_equal(row_cumsum(deltas), np.cumsum(deltas.astype(np.int64), axis=1))
