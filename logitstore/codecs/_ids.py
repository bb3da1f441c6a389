"""Id coding shared by the codecs: ids sorted ascending, delta-coded, split into byte planes.

A row of ``K`` ids is cut into runs (groups) in which ids ascend; the first id of a run is stored
as ``g = i`` and every other as ``g_j = i_j - i_{j-1} - 1`` (so adjacent ids cost a zero). The
``topk`` codec's runs are its quantization levels (it orders entries by (code, id), so decoding
needs no sort); ``sampled`` has one run per row. Where runs start is not stored here: the caller
knows it (from the codes). Gap ``g`` is split into byte planes
``plane_b = (g >> 8b) & 0xFF``, ``b = 0 .. n_planes(V) - 1``, each its own uint8 ``(K,)`` field,
so the store's zstd entropy-codes the low plane (small gaps: BPE ids are roughly
frequency-ordered, so likely tokens have small ids) separately from the mostly-zero high planes.
The number of planes follows from the vocabulary size; no id width is fixed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch

from logitstore.errors import BadValueError


def n_planes(vocab_size: int) -> int:
    """Bytes needed for a gap below ``vocab_size``."""
    return max(1, (max(vocab_size - 1, 1).bit_length() + 7) // 8)


def plane_names(prefix: str, vocab_size: int) -> list[str]:
    return [f"{prefix}{b}" for b in range(n_planes(vocab_size))]


def encode_sorted_ids(
    ids: torch.Tensor,
    valid: torch.Tensor | None,
    prefix: str,
    vocab_size: int,
    starts: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Byte planes of ids ascending within runs.

    Args:
        ids: int64 ``(P, K)`` ascending within each run over the valid entries.
        valid: bool ``(P, K)`` or ``None``; invalid entries must come last and store gap 0.
        prefix: field name prefix (planes are ``prefix0``, ``prefix1``, ...).
        vocab_size: ``V``; decides the number of planes.
        starts: bool ``(P, K)``, where runs start besides column 0; ``None``: one run per row.
    """
    prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)
    if starts is not None:
        prev = torch.where(starts, torch.full_like(prev, -1), prev)
    gaps = ids - prev - 1
    if valid is not None:
        gaps = torch.where(valid, gaps, torch.zeros_like(gaps))
    return {
        name: ((gaps >> (8 * b)) & 0xFF).to(torch.uint8)
        for b, name in enumerate(plane_names(prefix, vocab_size))
    }


# Rows are decoded in blocks of about this many entries, so a block's temporaries stay in a
# core's cache between the passes instead of running from memory.
BLOCK_ENTRIES = 2**18


def decode_sorted_ids(
    fields: Mapping[str, np.ndarray],
    prefix: str,
    starts: np.ndarray | None = None,
    limit: int | None = None,
    table: np.ndarray | None = None,
) -> np.ndarray:
    """Int64 ``(P, K)`` ids from the planes written by :func:`encode_sorted_ids`.

    Args:
        fields: the stored arrays (planes ``prefix0``, ``prefix1``, ... uint8 ``(P, K)``).
        prefix: field name prefix.
        starts: bool ``(P, K)`` run starts (column 0 must be True), or ``None``: one run per row.
        limit: if given, every id must be below it (checked block by block, in cache).
        table: int64 ``(limit + 1,)`` or ``None``: each decoded id ``i`` becomes
            ``table[i + 1]``, block by block once its ids are checked (the hot order's
            :func:`inverse_table`; looked up one past the id, which saves a pass).

    Raises:
        BadValueError: an id at or beyond ``limit``, with the first such row.
    """
    planes: list[np.ndarray] = []
    while f"{prefix}{len(planes)}" in fields:
        planes.append(np.asarray(fields[f"{prefix}{len(planes)}"]))
    if not planes:
        raise KeyError(f"no id planes named {prefix}0, {prefix}1, ...")
    if table is not None and (limit is None or len(table) != limit + 1):
        raise ValueError("an id table needs the limit its ids are checked against")
    shape = planes[0].shape
    if planes[0].size == 0:
        return np.zeros(shape, dtype=np.int64)
    out = np.empty(shape, dtype=np.int64)  # every block is written whole below
    rows = max(1, BLOCK_ENTRIES // max(shape[1], 1))
    scratch = _Scratch(min(rows, shape[0]) * shape[1])
    for a in range(0, shape[0], rows):
        b = min(shape[0], a + rows)
        block = out[a:b]  # each id plus one, first
        _decode_block(
            [plane[a:b] for plane in planes],
            None if starts is None else starts[a:b],
            block,
            scratch,
        )
        if limit is not None and block.max() > limit:
            row = int(np.argmax(block.max(axis=1) > limit))
            raise BadValueError(
                f"support_ids: expected token ids in [0, {limit}), found {out[a + row].max() - 1}",
                a + row,
                "support_ids",
            )
        if table is not None:  # every id is in [0, limit) now
            np.take(table, block, out=block, mode="clip")
        else:
            block -= 1
    return out


class _Scratch:
    """Block-sized temporaries of :func:`_decode_block`, allocated once per decode."""

    def __init__(self, entries: int) -> None:
        self.step = np.empty(entries, dtype=np.uint32)
        self.before = np.empty(entries, dtype=np.int64)


def _decode_block(
    planes: list[np.ndarray], starts: np.ndarray | None, out: np.ndarray, scratch: _Scratch
) -> None:
    """Decode one block of rows into ``out`` (int64, the planes' shape), each id plus one.

    With ``c`` the running sum of ``gap + 1`` over the flattened block, an id is
    ``c - c_before(latest run start) - 1``. The totals before run starts are spread forward as
    a second running sum, of their increments placed at the run starts: a sequential
    ``maximum.accumulate`` fill did the same at about 3 ns an entry, six times a cumsum's cost.
    Every pass reads and writes one dtype: numpy's cumsum from uint32 into int64 is several
    times slower than a cast followed by an int64 one.
    """
    shape = planes[0].shape
    n = out.size
    flat = out.reshape(-1)
    step = scratch.step[:n].reshape(shape)
    np.copyto(step, planes[-1])  # most significant plane first, widened in place
    for plane in planes[-2::-1]:
        step <<= 8
        step |= plane
    step += 1  # gap + 1
    np.copyto(flat, step.reshape(-1))
    np.cumsum(flat, out=flat)  # one cumsum over all rows of the block
    if starts is None:  # one run per row: each row loses the total of the rows before it
        out[1:] -= out[:-1, -1:]  # (numpy buffers overlapping operands)
        return
    at = np.flatnonzero(starts.reshape(-1)[1:]) + 1  # run starts after the block's first entry
    totals = flat[at - 1]  # the running total before each run start
    before = scratch.before[:n]
    before.fill(0)
    before[at] = np.diff(totals, prepend=0)
    np.cumsum(before, out=before)  # the latest run start's total, at every entry
    flat -= before


@functools.lru_cache(maxsize=8)
def inverse_table(hot_ids: tuple[int, ...], vocab_size: int) -> np.ndarray | None:
    """Int64 ``(V + 1,)``, read-only: entry ``i + 1`` is the token id of stored id ``i`` in the
    hot order (entry 0 is unused); ``None`` where :func:`hot_inverse` must do without a table
    (a hot id outside the vocabulary, or a vocabulary so large its table would outweigh the
    shards).

    Built once per id order and vocabulary, not per shard or per open: the key is the list
    itself (a manifest's ``hot_ids``), so every store written with one fitted order shares it.
    """
    if not hot_ids or vocab_size > TABLE_LIMIT:
        return None
    hot = np.asarray(hot_ids, dtype=np.int64)
    if hot.min() < 0 or hot.max() >= vocab_size or len(np.unique(hot)) != len(hot):
        return None
    cold = np.ones(vocab_size, dtype=bool)
    cold[hot] = False
    table = np.concatenate([[-1], hot, np.flatnonzero(cold)])
    table.flags.writeable = False
    return table


TABLE_LIMIT = 2**20
"""Largest vocabulary :func:`inverse_table` builds a table for (8 MiB; real ones are < 2^19)."""


def hot_forward(hot_ids: tuple[int, ...], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Int64 ``(V,)`` map from token id to stored id: hot ids first, in list order, then the rest.

    Storing ids in this order packs the ids a teacher puts in its top-k most often (function
    words, punctuation, whitespace) into a dense block at the front, so their gaps are small.
    """
    hot = torch.tensor(hot_ids, dtype=torch.int64, device=device)
    fwd = torch.empty(vocab_size, dtype=torch.int64, device=device)
    cold = torch.ones(vocab_size, dtype=torch.bool, device=device)
    cold[hot] = False
    fwd[hot] = torch.arange(len(hot_ids), device=device)
    fwd[cold] = torch.arange(len(hot_ids), vocab_size, device=device)
    return fwd


def hot_inverse(hot_ids: tuple[int, ...], stored: np.ndarray) -> np.ndarray:
    """Token ids of stored ids (inverse of :func:`hot_forward`); negative entries pass through.

    Every id above the largest hot id is stored as itself, so the work and memory follow the
    hot list, never the stored ids (a damaged or hostile row may hold huge ones; the reader's
    value checks refuse ids beyond the vocabulary afterwards).
    """
    if not hot_ids or stored.size == 0:
        return stored
    hot = np.asarray(hot_ids, dtype=np.int64)
    top = int(hot.max())
    if top >= 16 * len(hot) + 2**16:  # a sparse list: no table as large as its largest id
        return _hot_inverse_sparse(hot, stored)
    # Token ids of stored ids 0 .. top: the hot list, then the other ids ascending.
    cold = np.ones(top + 1, dtype=bool)
    cold[hot] = False
    table = np.concatenate([hot, np.flatnonzero(cold)])
    out = np.take(table, stored, mode="clip")  # wrong above the table and below 0: fixed here
    outside = stored > top
    if stored.min() < 0:
        outside |= stored < 0
    np.copyto(out, stored, where=outside)
    return out


def _hot_inverse_sparse(hot: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """:func:`hot_inverse` without a table: the ``r``-th id not in the list (ascending) is
    ``r`` plus the number of hot ids ``h_i`` (sorted) with ``h_i - i <= r``."""
    m = len(hot)
    rank = stored - m
    ranks_below = np.sort(hot) - np.arange(m)
    out = rank + np.searchsorted(ranks_below, rank, side="right")
    is_hot = (stored >= 0) & (stored < m)
    out[is_hot] = hot[stored[is_hot]]
    return np.where(stored < 0, stored, out)
