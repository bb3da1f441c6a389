"""Document ids that more than one shard holds, found in about 12 bytes per document.

``verify`` reads every shard once. Keeping each id it has seen until the end took a dict entry
per document (about 100 bytes: a gigabyte for ten million documents). Here each shard leaves
an 8-byte hash per id and its shard's number; repeats are found at the end by sorting the
hashes, and only the shards that hold a repeated hash are read again for the ids' text, so a
hash collision is never reported as a repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Repeat:
    """Of one shard: the first of its ids an earlier shard holds, that shard, and how many of
    its ids earlier shards hold."""

    doc_id: str
    earlier_shard: int
    count: int


class IdLedger:
    """The ids of each shard read, as hashes (Python's ``hash``: one process, one seed)."""

    def __init__(self) -> None:
        self._hashes: list[np.ndarray] = []
        self._shards: list[np.ndarray] = []

    def add(self, shard: int, doc_ids: Sequence[str]) -> None:
        """Shard ``shard``'s ids (repeats inside one shard are the caller's to report)."""
        distinct = dict.fromkeys(doc_ids)
        self._hashes.append(np.fromiter(map(hash, distinct), dtype=np.int64, count=len(distinct)))
        self._shards.append(np.full(len(distinct), shard, dtype=np.int32))

    def repeats(self, doc_ids_of: Callable[[int], Sequence[str] | None]) -> dict[int, Repeat]:
        """Each shard holding an id that a shard added before it holds, in shard order.

        Args:
            doc_ids_of: shard ``j``'s ids, read again (``None`` when it no longer reads: it is
                then left out).
        """
        if not self._hashes:
            return {}
        hashes = np.concatenate(self._hashes)
        shards = np.concatenate(self._shards)
        ordered = np.sort(hashes)
        twice = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not len(twice):
            return {}
        candidates = set(twice.tolist())
        first: dict[str, int] = {}  # only the ids whose hash repeats
        found: dict[int, list[tuple[str, int]]] = {}
        for j in np.unique(shards[np.isin(hashes, twice)]).tolist():
            ids = doc_ids_of(j)
            for doc_id in dict.fromkeys(ids or ()):
                if hash(doc_id) in candidates and first.setdefault(doc_id, j) != j:
                    found.setdefault(j, []).append((doc_id, first[doc_id]))
        return {j: Repeat(got[0][0], got[0][1], len(got)) for j, got in sorted(found.items())}
