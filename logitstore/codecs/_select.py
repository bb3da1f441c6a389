"""Exact top-k of float32 rows on the CPU, 2-3x faster than ``torch.topk`` over a vocabulary.

``torch.topk`` on the CPU copies every entry of a row into a (value, index) pair and selects
among all ``V`` pairs (about 2.5 ns an entry at ``V = 49152`` on one core). Almost none of a row
can be in its top ``k``, and one pass of maxima, at memory speed, rules most of it out:

1. The first ``n * G`` entries of a row (``G = GROUP``, ``n = V // G``) are viewed as ``G`` rows
   of ``n``: group ``j`` is column ``j`` (entries ``j, n + j, 2n + j, ...``), cut into pieces of
   ``PIECE`` consecutive rows of that view. A maximum over rows of the view is one vectorised
   pass; a maximum over short contiguous runs is several times slower in numpy and in torch.
2. ``np.argpartition`` (a vectorised selection, about a quarter of ``torch.topk``'s cost per
   entry) picks the ``k`` groups with the largest maxima; ``tau`` is the k-th largest maximum.
3. Candidates are the entries ``>= tau`` of the chosen groups' pieces whose maximum is
   ``>= tau``, and of the ``V - n * G`` entries left over at the end of the row.
4. The candidates of all rows are sorted at once by one 64-bit key (row, value descending, id),
   and each row's first ``k`` are its result.

Exact: the ``k`` chosen maxima are ``k`` entries ``>= tau``, so the row's k-th largest value
``t >= tau``. An entry ``>= tau`` outside the candidates lies in a group that was not chosen, whose
maximum is ``<= tau``, so the entry equals ``tau``; and the candidates hold ``k`` entries
``>= tau`` themselves. Either way the ``k`` largest candidates have the row's ``k`` largest values.

Rows are done ``CHUNK_ROWS`` at a time, so the entries the later steps read are still in cache.
Measured by ``benchmarks/bench_select.py`` (one core of an AMD EPYC virtual machine, V = 49152,
rows from memory): 2.2-2.3x at k = 64 and 2.5-2.6x at k = 128 for calls of 10 rows (the
codec's blocks), 2.6-2.9x for 256 rows. At 10 rows a call, about a third of the time left is
the one pass over the rows (bound by memory bandwidth) and a fifth is a fixed cost of about
0.1 ms a call (some 50 numpy calls).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

GROUP = 32  # entries per group; 16 and 64 measured a few per cent slower at k = 128
PIECE = 8  # entries per piece: only pieces whose maximum reaches tau are read again
CHUNK_ROWS = 16  # rows per pass; 16 rows of a 49152-token vocabulary are 3 MiB
MIN_VOCAB = 16384  # below this, the fixed cost of a call (about 0.1 ms) outweighs the gain
_LOW31 = np.uint32(0x7FFFFFFF)


def top_k(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values, indices (P, k), most probable first, like z.topk(k, dim=1).

    Exact: the values are the input's own (bit for bit) and equal ``z.topk(k, dim=1).values``.
    Equal values come out by ascending id. Of several entries equal to the k-th largest value,
    the ones with the smallest ids are returned, except where a group that was not chosen has
    its maximum equal to that value (its entries are not looked at). Either way the result is
    deterministic and does not depend on the other rows; ``torch.topk`` promises nothing
    about ties.

    Args:
        z: ``(P, V)`` logits or log-probs. The fast path takes float32 CPU tensors with
            ``V >= MIN_VOCAB`` and ``V >= 2 * k * GROUP``, rows without NaN (``-inf`` entries
            are fine, however many); anything else (another device or dtype, a small
            vocabulary, a row with NaN, a tensor that requires grad) is handed to
            ``z.topk(k, dim=1)``. Non-contiguous input is copied first.
        k: entries per row, ``1 <= k``.

    Returns:
        values ``(P, k)`` of ``z``'s dtype, sorted descending, and int64 indices ``(P, k)``.
    """
    if not _fast_path(z, k):
        return z.topk(k, dim=1)
    x = np.ascontiguousarray(z.detach().numpy())
    values = np.empty((x.shape[0], k), dtype=np.float32)
    ids = np.empty((x.shape[0], k), dtype=np.int64)
    for a in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[a : a + CHUNK_ROWS]
        lay = _layout(chunk.shape[0], chunk.shape[1], k, GROUP, PIECE)
        found = _candidates(chunk, k, lay)
        if found is None:  # NaN: left to torch.topk, which puts it first
            return z.topk(k, dim=1)
        values[a : a + CHUNK_ROWS], ids[a : a + CHUNK_ROWS] = _best(chunk, *found, lay)
    return torch.from_numpy(values), torch.from_numpy(ids)


def _fast_path(z: torch.Tensor, k: int) -> bool:
    """Whether the grouped selection applies and wins (see ``top_k``'s ``z``)."""
    if z.device.type != "cpu" or z.dtype != torch.float32 or z.dim() != 2 or z.shape[0] == 0:
        return False
    if z.requires_grad:  # the fast path's values come from numpy and carry no gradient
        return False
    vocab = z.shape[1]
    # The sort key holds the row within a chunk, 32 value bits and the id, in 63 bits.
    key_bits = (CHUNK_ROWS - 1).bit_length() + 32 + (vocab - 1).bit_length()
    return k >= 1 and vocab >= max(MIN_VOCAB, 2 * k * GROUP) and key_bits <= 63


class _Layout(NamedTuple):
    """Sizes and index arrays that depend only on a chunk's shape and ``k``, computed once."""

    group: int  # GROUP and PIECE when the layout was made
    piece: int
    groups: int  # n, groups per row (columns of the (group, n) view)
    group_starts: np.ndarray  # (R,): flat index of each row's first group maximum
    pieces: np.ndarray  # (R, GROUP // PIECE, 1): flat index of each row's pieces of group 0
    piece_rows: np.ndarray  # (PIECE,): offsets of a piece's entries from its first
    row_starts: np.ndarray  # (R, 1): flat index of each row's first entry
    id_bits: int
    key_starts: np.ndarray  # (R,): smallest sort key of each row
    first_k: np.ndarray  # (k,): 0 .. k - 1


@functools.lru_cache(maxsize=16)
def _layout(rows: int, vocab: int, k: int, group: int, piece: int) -> _Layout:
    n, per = vocab // group, group // piece
    r = np.arange(rows)
    id_bits = max(1, (vocab - 1).bit_length())
    out = _Layout(
        group=group,
        piece=piece,
        groups=n,
        group_starts=r * n,
        pieces=(r[:, None, None] * per + np.arange(per)[:, None]) * n,
        piece_rows=np.arange(0, piece * n, n),
        row_starts=(r * vocab)[:, None],
        id_bits=id_bits,
        key_starts=r << (32 + id_bits),
        first_k=np.arange(k),
    )
    for array in out:
        if isinstance(array, np.ndarray):
            array.flags.writeable = False  # shared between calls
    return out


def _candidates(x: np.ndarray, k: int, lay: _Layout) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat indices (``row * V + id``) and values of the entries of ``x (R, V)`` that can be in
    their row's top ``k``, at least ``k`` a row; ``None`` if ``x`` holds NaN."""
    rows, vocab = x.shape
    group, piece, n = lay.group, lay.piece, lay.groups
    per = group // piece
    pieces = x[:, : n * group].reshape(rows, per, piece, n).max(axis=2)  # (R, per, n)
    groups = pieces.max(axis=1)  # (R, n)
    chosen = np.argpartition(groups, n - k, axis=1)[:, n - k :]  # the k-th largest comes first
    tau = groups.reshape(-1)[lay.group_starts + chosen[:, 0]]
    where = lay.pieces + chosen[:, None, :]  # (R, per, k): the chosen groups' pieces
    maxima = pieces.reshape(-1)[where]
    # NaN is the largest to argpartition, so a NaN anywhere in a row's groups is among these.
    if np.isnan(maxima.max()):
        return None
    hit = where.reshape(-1)[np.flatnonzero(maxima >= tau[:, None, None])]
    q, col = np.divmod(hit, n)  # q = row * per + the piece's place in its group
    row = q // per
    first = q * (piece * n) + col + row * (vocab - n * group)  # flat index of the first entry
    flat = first[:, None] + lay.piece_rows  # (H, piece)
    values = x.reshape(-1)[flat]
    keep = np.flatnonzero(values >= tau[row, None])
    found = flat.reshape(-1)[keep], values.reshape(-1)[keep]
    if n * group == vocab:
        return found
    left = _leftover(x[:, n * group :], tau, n * group)
    if left is None:
        return None
    return np.concatenate([found[0], left[0]]), np.concatenate([found[1], left[1]])


def _leftover(
    rest: np.ndarray, tau: np.ndarray, start: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat indices and values of the entries ``>= tau`` of ``rest (R, r)``, the ragged end of
    the rows from id ``start`` on; ``None`` if it holds NaN."""
    if np.isnan(rest.max()):
        return None
    flat = np.flatnonzero(rest >= tau[:, None])
    row, col = np.divmod(flat, rest.shape[1])
    return row * (start + rest.shape[1]) + start + col, rest.reshape(-1)[flat]


def _best(
    x: np.ndarray, flat: np.ndarray, values: np.ndarray, lay: _Layout
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest candidates, ``(values, ids)`` of shape ``(R, k)``, by one sort.

    The key is ``row | descending(value bits) | id``: ascending keys run through the rows in
    order, each row's values largest first and equal values by ascending id. Every row has at
    least ``k`` candidates (its chosen groups' maxima).
    """
    vocab = x.shape[1]
    row = flat // vocab
    key = row << (32 + lay.id_bits)
    key |= _descending(values).astype(np.int64) << lay.id_bits
    key |= flat - row * vocab
    key.sort()
    top = key[np.searchsorted(key, lay.key_starts)[:, None] + lay.first_k]
    ids = top & ((1 << lay.id_bits) - 1)
    return x.reshape(-1)[lay.row_starts + ids], ids


def _descending(values: np.ndarray) -> np.ndarray:
    """uint32 that ascend as the float32 ``values`` descend (-0.0 after 0.0).

    Negative floats (sign bit set) already ascend in bits as they descend in value; the others
    have the bits below the sign complemented, which puts them first and reverses them.
    """
    bits = values.view(np.uint32)
    return bits ^ ((~bits >> 31) * _LOW31)
