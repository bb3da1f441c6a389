"""The data side of ``logitstore.hf``: a store's batches, endless, for ``Trainer``.

``Trainer`` takes a dataloader and a collator; a store's loader (``StoreDataset``) already
yields collated batches of whole documents, so :class:`StoreBatches` only runs it epoch after
epoch, records the read position and marks each epoch's last batch, and :class:`KDCollator`
passes batches through.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from logitstore.dataset import StoreDataset, collate_documents
from logitstore.errors import ConfigError, DataError


class KDCollator:
    """Collate :class:`~logitstore.document.Document` lists into a batch; pass batches through.

    The store's loader already yields collated batches (``collate_documents``); this collator
    makes ``Trainer``'s ``data_collator`` slot harmless and serves users who batch documents
    themselves.
    """

    def __call__(self, items: Any) -> dict[str, Any]:
        if isinstance(items, dict):
            return items
        return collate_documents(list(items))


class StoreBatches:
    """Endless batches of a :class:`StoreDataset`, epoch after epoch, for ``Trainer``.

    Each batch is recorded as consumed when handed out, so :meth:`state_dict` after an
    optimizer step is the exact read position. With ``num_workers`` the documents are decoded
    in DataLoader worker processes. The next batch is read before one is handed out, so each
    says whether it ends its epoch (``epoch_ends``): Trainer's "epoch" strategies act on it.
    """

    def __init__(self, dataset: StoreDataset, num_workers: int = 0) -> None:
        if not (isinstance(num_workers, int) and not isinstance(num_workers, bool)) or (
            num_workers < 0
        ):
            raise ConfigError(
                f"num_workers must be an integer >= 0 (DataLoader workers); found {num_workers!r}"
            )
        self.dataset = dataset
        self.num_workers = int(num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        data = self.dataset
        while True:
            source: Any = (
                DataLoader(data, batch_size=None, num_workers=self.num_workers)
                if self.num_workers
                else data
            )
            pending = None
            for batch in source:
                if pending is not None:
                    data.record(pending)
                    yield {**pending, "epoch_ends": False}
                pending = batch
            if pending is not None:
                data.record(pending)
                yield {**pending, "epoch_ends": True}
            elif data.state_dict()["samples_consumed"] == [0] * max(1, self.num_workers):
                raise DataError(f"rank {data.rank} has no documents in epoch {data.epoch}")
            data.set_epoch(data.epoch + 1)

    def state_dict(self) -> Any:
        return self.dataset.state_dict()

    def adopt_workers(self, saved: Any, configured: str) -> None:
        """Read with the number of workers checkpoint state ``saved`` was written with (its read
        position is one count per worker), warning that ``configured`` is not followed.
        Checkpoints of versions that ignored dataloader_num_workers were written by one."""
        consumed = saved.get("samples_consumed") if isinstance(saved, dict) else None
        if not consumed or len(consumed) == max(1, self.num_workers):
            return
        workers = 0 if len(consumed) == 1 else len(consumed)
        warnings.warn(
            f"resuming with {workers} DataLoader workers, as the checkpoint was written, not "
            f"{configured}: the read position is one count per worker (pass num_workers to "
            "KDTrainer to be told instead)",
            stacklevel=4,
        )
        self.num_workers = workers

    def load_state_dict(self, state: Any) -> None:
        # The read position is one count per reading stream (DataLoader worker): refused here,
        # in one line, rather than by the first worker, inside torch's traceback of it.
        consumed = list(state.get("samples_consumed") or [])
        streams = max(1, self.num_workers)
        if any(consumed) and len(consumed) != streams:
            raise ConfigError(
                f"the checkpoint's read position was written by {len(consumed)} reader(s) per "
                f"process (DataLoader workers); this run has {streams} (num_workers="
                f"{self.num_workers}): resume with the num_workers of the run that wrote it"
            )
        self.dataset.load_state_dict(state)
