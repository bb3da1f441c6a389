"""The teacher pass's encoder: forwarded batches in, committed shards out, beside the forward.

The main thread only runs forwards (and the NaN check); a :class:`Worker` takes each batch's
logits, encodes every window with the codec on the device, copies only the encoded arrays to
the host, measures fidelity on a deterministic sample of positions and commits each finished
shard through the writer.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from logitstore.codecs import Codec, fidelity_sums, merge_fidelity
from logitstore.pipelines._data import Window
from logitstore.pipelines._teacher import memory_hint, window_logits
from logitstore.writer import EncodedDocument, StoreWriter


def digest_int(*parts: object) -> int:
    """A 63-bit integer from ``parts``: seeds that depend on names, not on run order."""
    raw = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << 63) - 1)


def fidelity_rows(
    windows: Sequence[Window], count: int, seed: int, shard: int
) -> dict[int, np.ndarray]:
    """A deterministic sample of up to ``count`` positions of one shard, by window index."""
    sizes = np.array([w.num_tokens - 1 for w in windows])
    total = int(sizes.sum())
    rng = np.random.default_rng(digest_int(seed, "fidelity", shard))
    chosen = np.sort(rng.choice(total, size=min(count, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.searchsorted(starts, chosen, side="right") - 1
    return {int(j): chosen[owner == j] - starts[j] for j in np.unique(owner)}


class ShardBuffer:
    """One shard being encoded: its windows, their encoded documents and fidelity sums."""

    def __init__(
        self, index: int, windows: Sequence[Window], *, fidelity_positions: int, seed: int
    ) -> None:
        self.index = index
        self.windows = windows
        self.slot = {id(w): j for j, w in enumerate(windows)}
        self.sample = fidelity_rows(windows, fidelity_positions, seed, index)
        self.docs: list[EncodedDocument | None] = [None] * len(windows)
        self.fidelity: list[dict[str, float]] = []


class Worker:
    """Encodes forwarded batches and commits finished shards on a thread.

    Encoding on the device, the copy of encoded arrays to the host and the shard commits
    overlap the next forward. The queue is bounded (``depth`` batches of logits wait at most).
    An error in the thread is re-raised in the main thread at its next ``submit`` or at
    ``close``; after one, no later shard is committed.
    """

    def __init__(
        self,
        writer: StoreWriter,
        codec: Codec,
        *,
        temperatures: Sequence[float],
        seed: int,
        depth: int = 1,
    ) -> None:
        self.writer, self.codec = writer, codec
        self.temperatures, self.seed = list(temperatures), seed
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="logitstore-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():  # thread-local, so entered here too
            while (job := self._queue.get()) is not None:
                if self.error is not None:
                    continue
                try:
                    if len(job) == 4:
                        with memory_hint(job[1]):
                            self._encode(*job)
                    else:
                        self._commit(*job)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc

    def _encode(
        self,
        shard: ShardBuffer,
        windows: Sequence[Window],
        logits: torch.Tensor,
        ids: torch.Tensor,
    ) -> None:
        device = logits.device  # encoded where the forward left them (a device map's head)
        for b, rows, labels in window_logits(logits, ids, windows):
            w = windows[b]
            gen = torch.Generator(device=device).manual_seed(digest_int(self.seed, w.doc_id))
            encoded = self.codec.encode(rows, labels, temperatures=self.temperatures, generator=gen)
            fields = {name: t.cpu().numpy() for name, t in encoded.items()}
            j = shard.slot[id(w)]
            shard.docs[j] = EncodedDocument(w.doc_id, w.input_ids, w.loss_mask, fields)
            if j in shard.sample:
                sample = shard.sample[j]
                decoded = self.codec.decode({k: v[sample] for k, v in fields.items()})
                picked = torch.from_numpy(sample).to(device)
                dense = rows[picked].log_softmax(dim=-1)
                shard.fidelity.append(fidelity_sums(dense, decoded, labels[picked]))

    def _commit(self, shard: ShardBuffer) -> None:
        docs = [d for d in shard.docs if d is not None]
        assert len(docs) == len(shard.windows), "every window of a shard is encoded before commit"
        fidelity = merge_fidelity(shard.fidelity) if shard.fidelity else None
        self.records.append(self.writer.write_shard(shard.index, docs, fidelity))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, *job: Any) -> None:
        """Queue ``(shard, windows, logits, ids)`` to encode or ``(shard,)`` to commit."""
        self._raise()
        while True:
            try:
                self._queue.put(job, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Finish the queued jobs (complete shards are still committed), then re-raise."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
