"""Documents in any order, decoded as one block (``LogitStore.read_block``).

The encoded rows of the listed documents are gathered into the order asked for (a few bytes per
support entry), then decoded and checked in one call, so consecutive documents are consecutive
rows of one decoded ``Positions``: a batch of them is a slice, not a copy.

The gathered rows live only until the decode has read them, so the store keeps their buffer
for its next block (:class:`GatherBuffer`): fresh memory costs a page fault per 4 KiB on first
touch, which made the gather of a shuffled window about ten times dearer than the copy itself.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from logitstore.codecs.base import FieldSpec, Positions
from logitstore.document import Document

if TYPE_CHECKING:  # the reader imports this module
    from logitstore.reader import LogitStore


@dataclass(frozen=True)
class Piece:
    """Where a run of decoded rows comes from: document ``index`` of shard ``shard``, whose
    positions are rows ``start:stop`` of the decoded block."""

    shard: str
    index: int
    doc_id: str
    start: int
    stop: int


class GatherBuffer:
    """One reusable buffer for the gathered per-entry fields of :func:`read_block` (a pool of
    one: a thread that finds it taken allocates its own).

    The buffer is handed back only when nothing decoded from it still points into it (a codec
    may return a stored field as it is); it grows to the largest block read and is freed with
    the store.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            buffer, self._buffer = self._buffer, None
        if buffer is None or buffer.nbytes < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
        return buffer

    def give(self, buffer: np.ndarray, decoded: Positions) -> None:
        for f in dataclasses.fields(decoded):
            value = getattr(decoded, f.name)
            if value is not None and np.may_share_memory(value, buffer):
                return  # the decoded block owns it now
        with self._lock:
            if self._buffer is None or self._buffer.nbytes < buffer.nbytes:
                self._buffer = buffer


_ALIGN = 64


def _gather(
    specs: Mapping[str, FieldSpec],
    sources: list[tuple[Mapping[str, np.ndarray], int, int]],
    rows: int,
    buffer: GatherBuffer,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Rows ``a:b`` of each source's fields, concatenated; fields with more than one value per
    row (the bulk) are written into a buffer taken from ``buffer``, which is returned too."""
    sizes = {  # bytes of each field with more than one value per row
        name: rows * int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
        for name, spec in specs.items()
        if int(np.prod(spec.shape)) > 1
    }
    starts, total = {}, 0  # where each starts in the buffer, 64-byte aligned
    for name, size in sizes.items():
        starts[name] = total
        total += -(-size // _ALIGN) * _ALIGN
    scratch = buffer.take(total) if total else None
    fields: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        parts = [f[name][a:b] for f, a, b in sources] or [
            np.zeros((0, *spec.shape), dtype=spec.dtype)
        ]
        if scratch is not None and name in starts:
            at = starts[name]
            out = scratch[at : at + sizes[name]].view(spec.dtype).reshape(rows, *spec.shape)
            fields[name] = np.concatenate(parts, out=out)
        else:
            fields[name] = np.concatenate(parts)
    return fields, scratch


def read_block(
    store: LogitStore, indices: Sequence[int] | np.ndarray
) -> tuple[list[Document], Positions]:
    """:meth:`LogitStore.read_block` (documented there)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and not (idx.min() >= 0 and idx.max() < store.num_documents):
        raise IndexError(f"document indices must lie in [0, {store.num_documents})")
    shard_of = np.searchsorted(store._doc_starts, idx, side="right") - 1
    arrays = {j: store.read_shard_arrays(j) for j in dict.fromkeys(shard_of.tolist())}
    starts = {j: a.position_offsets() for j, a in arrays.items()}
    pieces: list[Piece] = []  # one per document
    sources: list[list[int]] = []  # [shard, first row, end row] of adjacent documents
    row = 0
    for i, j in zip(idx.tolist(), shard_of.tolist()):
        d = i - int(store._doc_starts[j])
        a, b = int(starts[j][d]), int(starts[j][d + 1])
        pieces.append(Piece(store.manifest["shards"][j]["path"], d, arrays[j].doc_ids[d],
                             row, row + b - a))  # fmt: skip
        if sources and sources[-1][0] == j and sources[-1][2] == a:
            sources[-1][2] = b  # adjacent in the shard: one slice
        else:
            sources.append([j, a, b])
        row += b - a
    whole = len(sources) == 1 and sources[0][1:] == [0, arrays[sources[0][0]].num_positions]
    scratch = None
    if whole:
        fields = arrays[sources[0][0]].fields  # one whole shard in store order: no gather
    else:
        fields, scratch = _gather(
            store.specs, [(arrays[j].fields, a, b) for j, a, b in sources], row, store._gather
        )
    ends = np.fromiter((p.stop for p in pieces), dtype=np.int64, count=len(pieces))
    names = list(dict.fromkeys(p.shard for p in pieces))
    where = ("shard " if len(names) == 1 else "shards ") + ", ".join(names)

    def locate(row: int) -> Piece:  # side="right": a bad row is in a non-empty document
        return pieces[min(int(np.searchsorted(ends, row, side="right")), len(pieces) - 1)]

    block = store._decode(fields, locate, where)
    if scratch is not None:
        store._gather.give(scratch, block)
    docs = []
    for p, j in zip(pieces, shard_of.tolist()):
        off = arrays[j].offsets
        docs.append(Document(
            doc_id=p.doc_id,
            input_ids=arrays[j].input_ids[off[p.index] : off[p.index + 1]],
            loss_mask=arrays[j].loss_mask[starts[j][p.index] : starts[j][p.index + 1]],
            positions=block.slice(p.start, p.stop),
        ))  # fmt: skip
    return docs, block
