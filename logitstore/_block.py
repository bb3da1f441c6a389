"""Documents in any order, decoded as one block (``LogitStore.read_block``).

The encoded rows of the listed documents are gathered into the order asked for (a few bytes per
support entry), then decoded and checked in one call, so consecutive documents are consecutive
rows of one decoded ``Positions``: a batch of them is a slice, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from logitstore.codecs.base import Positions
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
    if whole:
        fields = arrays[sources[0][0]].fields  # one whole shard in store order: no gather
    else:
        fields = {
            name: np.concatenate(
                [arrays[j].fields[name][a:b] for j, a, b in sources]
                or [np.zeros((0, *spec.shape), dtype=spec.dtype)]
            )
            for name, spec in store.specs.items()
        }
    ends = np.fromiter((p.stop for p in pieces), dtype=np.int64, count=len(pieces))
    names = list(dict.fromkeys(p.shard for p in pieces))
    where = ("shard " if len(names) == 1 else "shards ") + ", ".join(names)

    def locate(row: int) -> Piece:  # side="right": a bad row is in a non-empty document
        return pieces[min(int(np.searchsorted(ends, row, side="right")), len(pieces) - 1)]

    block = store._decode(fields, locate, where)
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
