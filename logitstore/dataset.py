"""Stream a logit store into training batches: a resumable PyTorch ``IterableDataset``.

Order. The order of one epoch is a pure function of ``(seed, epoch)`` and the topology
(ranks x DataLoader workers): shards are permuted, split across the ``streams = world_size *
num_workers`` readers, grouped into windows of ``shuffle_window`` shards, and the documents of
each window are permuted. A reader decodes one window at a time, so memory is bounded by a few
shards, never by the store. A store reader decodes a window's documents together, in the order
they are emitted (``LogitStore.read_block``): a batch's teacher arrays are then one slice of the
decoded window, not a copy, and documents another stream or a resume skips are not decoded.
When the store has fewer shards than streams, every stream reads the same globally ordered
documents and keeps every ``streams``-th one instead (correct, but each stream fetches every
shard; it decodes only its own documents).

Batches. Documents are grouped, in stream order, into batches whose padded size
``num_docs * longest`` stays within ``tokens_per_batch`` (a document longer than the budget
is a batch of its own). Grouping is greedy and memoryless, so resuming at a batch boundary
reproduces the uninterrupted batches exactly.

Context. Every document is one row, starting at position 0 and right-padded: the student sees,
at every trained position, exactly the tokens the teacher saw, and nothing from other
documents. Padding costs compute on ragged batches; packing with per-document masks would not,
but needs attention kernels that honour block-diagonal masks, which plain ``transformers``
models on CPU do not guarantee. Padding was chosen for exactness and simplicity.

Resume. The state is ``{"seed", "epoch", "samples_consumed", "next_worker", "shuffle",
"shuffle_window", "layout"}`` with one count per DataLoader worker (a single entry without
workers); the last three fix the order (with the seed), and a loader whose order differs
refuses the state rather than skip other documents than those trained. Each batch says which
worker made it and how many of that worker's documents it has handed out, so
:meth:`StoreDataset.record` keeps the counts in the main process, and resuming skips exactly
those documents (whole windows without decoding). The DataLoader takes batches from its
workers in turn, so the state also says whose turn is next.

Prefetch. Each reader decodes and collates in a background thread, ``prefetch`` batches ahead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

# (_LIVE and _stop_prefetching too, as before they moved: tests read dataset._LIVE)
from logitstore._prefetching import _LIVE, _prefetched, _stop_prefetching  # noqa: F401
from logitstore._windows import _Window
from logitstore.codecs.base import Positions
from logitstore.document import Document
from logitstore.errors import ConfigError

__all__ = ["StoreDataset", "collate_documents", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class _Item:
    """A document to batch and, when it was decoded with others, their block and its first
    row there."""

    doc: Document
    block: Positions | None
    row: int


def _block_rows(items: Sequence[_Item]) -> Positions | None:
    """The items' positions as one slice of their block, if they are consecutive rows of one."""
    block, row = items[0].block, items[0].row
    if block is None:
        return None
    for item in items:
        if item.block is not block or item.row != row:
            return None
        row += item.doc.num_tokens - 1
    return block.slice(items[0].row, row)


VERIFY_WINDOW_DOCUMENTS = 1 << 20
"""A window whose shards the manifest says hold more documents than this has those counts read
from the shards themselves before its document indices (8 bytes each, then permuted) are built:
a manifest is anyone's file, and one claiming 2^34 documents in a 5 KB store made the loader
allocate 128 GiB before reading a shard."""


def _range(r: Any) -> tuple[int, int]:
    if isinstance(r, range):
        return r.start, r.stop
    start, stop = r
    return int(start), int(stop)


def collate_documents(
    docs: Sequence[Document], positions: Positions | None = None
) -> dict[str, Any]:
    """Pad documents into one batch; teacher arrays stay flat over real positions.

    Teacher arrays are not padded: they are the concatenation of the documents' positions, in
    row-major order of ``position_mask``, so ``hidden[:, :-1][position_mask]`` lines up with
    them. This avoids padding ``(B, T - 1, K)`` arrays that the loss would discard.

    Args:
        docs: ``B`` documents of lengths ``T_b``.
        positions: the documents' positions already as one block, in order (e.g. a slice of
            :meth:`LogitStore.read_block`'s block); the teacher tensors then share its memory
            instead of being concatenated (a tensor's storage covers its own rows only, so a
            DataLoader worker still sends just the batch).

    Returns:
        ``input_ids`` int64 ``(B, T)`` (padding 0), ``attention_mask`` int64 ``(B, T)``,
        ``position_mask`` bool ``(B, T - 1)`` (real positions), and over the ``N = sum(T_b - 1)``
        real positions: ``labels`` int64 ``(N,)`` (``-100`` where the loss mask is False),
        ``support_ids`` int64 ``(N, K)``, ``support_logprobs`` float32 ``(N, K)``,
        ``tail_logmass``, ``label_logprob``, ``entropy`` float32 ``(N,)``,
        ``tail_logsumexp`` float32 ``(N, n_temps)``, ``support_counts`` int32 ``(N, K)`` or
        ``None``; ``num_tokens`` (trained positions) and ``doc_ids``.
    """
    width = max(d.num_tokens for d in docs)
    input_ids = np.zeros((len(docs), width), dtype=np.int64)
    attention = np.zeros((len(docs), width), dtype=np.int64)
    for row, d in enumerate(docs):
        input_ids[row, : d.num_tokens] = d.input_ids
        attention[row, : d.num_tokens] = 1
    labels = np.concatenate(
        [np.where(d.loss_mask, d.input_ids[1:], IGNORE_INDEX) for d in docs]
    ).astype(np.int64)

    def cat(name: str) -> torch.Tensor:
        if positions is None:
            return torch.from_numpy(np.concatenate([getattr(d.positions, name) for d in docs]))
        values = getattr(positions, name)
        # A decoded field may be a stored array as it is, read-only where the backend lends
        # its buffer (parquet's label_logprob): the batch gets a copy a loss may write to
        # (torch wraps read-only memory with a warning, and a write to it is undefined).
        return torch.from_numpy(values if values.flags.writeable else values.copy())

    counts = docs[0].positions.support_counts
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "position_mask": torch.from_numpy(attention[:, 1:].astype(bool)),
        "labels": torch.from_numpy(labels),
        "support_ids": cat("support_ids").long(),
        "support_logprobs": cat("support_logprobs").float(),
        "tail_logmass": cat("tail_logmass").float(),
        "label_logprob": cat("label_logprob").float(),
        "tail_logsumexp": cat("tail_logsumexp").float(),
        "entropy": cat("entropy").float(),
        "support_counts": None if counts is None else cat("support_counts"),
        "num_tokens": int((labels != IGNORE_INDEX).sum()),
        "doc_ids": [d.doc_id for d in docs],
    }


class StoreDataset(IterableDataset):
    """Batches of whole documents from a logit store, deterministic and resumable.

    Args:
        store: an opened store (``logitstore.open_store``) or its URL.
        tokens_per_batch: budget on the padded batch size ``num_docs * longest``.
        seed: shuffling seed; with ``epoch`` it fixes the order.
        shuffle: permute shards and documents; False reads in store order.
        shuffle_window: shards whose documents are shuffled together (memory: this many
            decoded shards per reader, plus the prefetched batches).
        prefetch: batches decoded ahead by the background thread.
        rank, world_size: this process's share; default from ``torch.distributed`` if it is
            initialised, else ``0, 1``.
        storage_options: passed to ``open_store`` when ``store`` is a URL.
    """

    def __init__(
        self,
        store: Any,
        *,
        tokens_per_batch: int = 8192,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        prefetch: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        sizes = (tokens_per_batch, shuffle_window, prefetch)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise ConfigError(
                "tokens_per_batch, shuffle_window and prefetch must be positive integers; found "
                f"{tokens_per_batch!r}, {shuffle_window!r}, {prefetch!r}"
            )
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}); found {rank}")
        self._url = store if isinstance(store, str) else None
        self._store = None if isinstance(store, str) else store
        self._storage_options = storage_options
        self.tokens_per_batch = tokens_per_batch
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window
        self.prefetch = prefetch
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._consumed: list[int] | None = None
        self._next_worker = 0

    @classmethod
    def for_process(
        cls,
        source: Any,
        rank: int,
        world_size: int,
        *,
        what: str = "the dataset",
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> StoreDataset:
        """``source`` (a store URL, an opened store or a ``StoreDataset``) as the share of
        process ``rank`` of ``world_size``; ``kwargs`` as for the class. A ``StoreDataset``
        is returned as it is, and must read as that rank already.

        Raises:
            ConfigError: naming ``what`` for a source of another kind or another rank's.
        """
        if isinstance(source, StoreDataset):
            if (source.rank, source.world_size) != (rank, world_size):
                raise ConfigError(
                    f"{what} reads as rank {source.rank} of {source.world_size}; this process "
                    f"is rank {rank} of {world_size}"
                )
            return source
        if isinstance(source, (str, os.PathLike)):
            from logitstore.reader import open_store

            source = open_store(str(source), storage_options=storage_options)
        elif not hasattr(source, "manifest"):
            raise ConfigError(
                f"{what} must be a store URL, an opened store or a StoreDataset; found "
                f"{type(source).__name__}"
            )
        return cls(source, rank=rank, world_size=world_size, **kwargs)

    @property
    def store(self) -> Any:
        if self._store is None:
            # Imported late: the reader imports the package that re-exports this module.
            from logitstore.reader import open_store

            assert self._url is not None  # one of store or URL is always set
            self._store = open_store(self._url, storage_options=self._storage_options)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        # Workers re-open a store given by URL rather than pickling open file handles.
        state = self.__dict__.copy()
        if self._url is not None:
            state["_store"] = None
        return state

    # -- resume state ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)
        self._consumed = None
        self._next_worker = 0

    def record(self, batch: dict[str, Any]) -> None:
        """Count ``batch`` as consumed; call in the main process for every batch used."""
        workers = int(batch["num_workers"])
        if self._consumed is None or len(self._consumed) != workers:
            self._consumed = [0] * workers
        self._consumed[int(batch["worker"])] = int(batch["consumed"])
        self._next_worker = (int(batch["worker"]) + 1) % workers

    def state_dict(self) -> dict[str, Any]:
        """The read position (``epoch``, ``samples_consumed``, ``next_worker``) and what fixes
        the order it counts in (``seed``, ``shuffle``, ``shuffle_window``, ``layout``)."""
        consumed = list(self._consumed) if self._consumed is not None else [0]
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_consumed": consumed,
            "next_worker": self._next_worker,
            **self._order(),
        }

    def _order(self) -> dict[str, Any]:
        """What, besides the seed and the epoch, fixes the order of the documents: shuffling,
        the window, and the shards' document ranges (``layout``, a digest)."""
        ranges = [list(self.store.shard_document_range(j)) for j in range(self.store.num_shards)]
        layout = hashlib.sha256(json.dumps(ranges).encode()).hexdigest()[:16]
        return {"shuffle": self.shuffle, "shuffle_window": self.shuffle_window, "layout": layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration skips the documents ``state`` counts as consumed.

        Raises:
            ConfigError: the state was written by a loader of another order (seed, shuffling,
                window, or a store whose shards hold other document ranges): skipping its
                count of documents would skip others than those it trained.
        """
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        ours = self._order()
        for key in ("shuffle", "shuffle_window", "layout"):  # absent from older states
            if key in state and state[key] != ours[key]:
                what = "shard layout (another store)" if key == "layout" else key
                raise ConfigError(
                    f"loader state was written with {what} {state[key]!r}, this loader has "
                    f"{ours[key]!r}: the read position counts documents in another order"
                )
        self.epoch = int(state["epoch"])
        consumed = [int(c) for c in state["samples_consumed"]]
        self._consumed = consumed if any(consumed) else None
        self._next_worker = int(state.get("next_worker", 0))

    # -- order -------------------------------------------------------------------------------

    def plan(self, epoch: int, stream: int, num_streams: int) -> list[_Window]:
        """The windows one stream reads in ``epoch``: shards to decode, documents to emit."""
        store = self.store
        ranges = [_range(store.shard_document_range(j)) for j in range(store.num_shards)]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(ranges)) if self.shuffle else np.arange(len(ranges))
        by_shard = len(ranges) >= num_streams
        mine = order[stream::num_streams] if by_shard else order
        first_docs = np.array([r[0] for r in ranges], dtype=np.int64)

        def build(w: int, shards: list[int], position: int) -> tuple[list[int], np.ndarray]:
            read = getattr(store, "read_shard_arrays", None)
            if read and sum(ranges[j][1] - ranges[j][0] for j in shards) > VERIFY_WINDOW_DOCUMENTS:
                for j in shards:  # the counts, as the shards hold them (raises if they differ)
                    read(j)
            docs = np.concatenate(
                [np.arange(*ranges[j], dtype=np.int64) for j in shards] or [np.zeros(0, np.int64)]
            )
            if self.shuffle:
                seq = [self.seed, epoch, w] + ([stream, num_streams] if by_shard else [])
                docs = docs[np.random.default_rng(seq).permutation(len(docs))]
            if not by_shard:
                docs = docs[(position + np.arange(len(docs))) % num_streams == stream]
            # The shards in the order their documents first come (the order they are read and
            # fetched ahead in); a shard none of whose documents this stream keeps is not read.
            owner = np.searchsorted(first_docs, docs, side="right") - 1
            _, first = np.unique(owner, return_index=True)  # (no Python int per document)
            return owner[np.sort(first)].tolist(), docs

        windows = []
        position = 0  # position in the global stream, for the document-split fallback
        for w, start in enumerate(range(0, len(mine), self.shuffle_window)):
            shards = [int(j) for j in mine[start : start + self.shuffle_window]]
            n = sum(ranges[j][1] - ranges[j][0] for j in shards)
            count = n
            if not by_shard:  # positions p in [position, position + n) with p % streams == stream
                count = len(range(position + (stream - position) % num_streams, position + n,
                                  num_streams))  # fmt: skip
            windows.append(_Window(count, functools.partial(build, w, shards, position)))
            position += n
        return windows

    def _documents(self, windows: list[_Window], skip: int) -> Iterator[_Item]:
        store = self.store
        # Read-ahead: the store fetches the next shards of this stream's order in background
        # threads while these are decoded and trained on (it matters for remote stores); the
        # shard read first is fetched by that read, here, unless it is in flight already.
        ahead = getattr(store, "readahead", 0)
        by_block = hasattr(store, "read_block")

        def order(w: int, first: int, count: int) -> list[int]:
            """``count`` shards of the read order from window ``w``'s shard ``first`` on (the
            windows ahead are built as the read-ahead reaches them)."""
            out: list[int] = []
            while w < len(windows) and len(out) < count:
                out += windows[w].shards[first : first + count - len(out)]
                w, first = w + 1, 0
            return out

        for w, window in enumerate(windows):
            if skip >= window.count:  # (resuming: a window read before is not built)
                skip -= window.count
                continue
            wanted = window.docs[skip:]
            skip = 0
            if by_block:
                # The window's documents decoded in the order they are emitted: a batch of
                # consecutive ones is then one slice of the block (collation copies nothing).
                if ahead:
                    store.prefetch(order(w, 0, len(window.shards) + ahead), caller_reads_first=True)
                docs, block = store.read_block(wanted)
                window.release()
                row = 0
                for doc in docs:
                    yield _Item(doc, block, row)
                    row += doc.num_tokens - 1
                continue
            decoded: dict[int, Document] = {}
            for i, j in enumerate(window.shards):
                if ahead:
                    store.prefetch(order(w, i, 1 + ahead), caller_reads_first=True)
                start, _ = _range(store.shard_document_range(j))
                for offset, doc in enumerate(store.read_shard(j)):
                    decoded[start + offset] = doc
            window.release()
            for index in wanted:
                yield _Item(decoded[int(index)], None, 0)

    def _batches(self, items: Iterator[_Item]) -> Iterator[list[_Item]]:
        current: list[_Item] = []
        longest = 0
        for item in items:
            length = item.doc.num_tokens
            grown = max(longest, length)
            if current and (len(current) + 1) * grown > self.tokens_per_batch:
                yield current
                current, grown = [], length
            current.append(item)
            longest = grown
        if current:
            yield current

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader always asks worker 0 first; rotate the roles so that the worker whose
        # turn came next before the interruption is asked first.
        worker = (worker + self._next_worker) % workers
        consumed = self._consumed or [0] * workers
        if len(consumed) != workers:
            raise ConfigError(
                f"loader state was saved with {len(consumed)} DataLoader workers; "
                f"this loader has {workers}"
            )
        stream, streams = self.rank * workers + worker, self.world_size * workers
        windows = self.plan(self.epoch, stream, streams)
        start = consumed[worker]
        extra = {"epoch": self.epoch, "worker": worker, "num_workers": workers}
        return _prefetched(self._collated(windows, start, extra), self.prefetch)

    def _collated(
        self, windows: list[_Window], start: int, extra: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        count = start
        for items in self._batches(self._documents(windows, start)):
            count += len(items)
            batch = collate_documents([item.doc for item in items], _block_rows(items))
            yield {**batch, **extra, "consumed": count}
