"""The streaming loader: coverage across ranks and workers, determinism, budgets, resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from logitstore.codecs.base import Positions
from logitstore.dataset import IGNORE_INDEX, StoreDataset, collate_documents
from logitstore.document import Document
from logitstore.errors import ConfigError


class MemoryStore:
    """The reader's interface over documents held in memory (shards of varying size)."""

    def __init__(self, shard_sizes: list[int], k: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.shards: list[list[Document]] = []
        self.reads: list[int] = []
        index = 0
        for size in shard_sizes:
            docs = []
            for _ in range(size):
                length = int(rng.integers(2, 40))
                p = length - 1
                positions = Positions(
                    support_ids=rng.integers(0, 50, (p, k)),
                    support_logprobs=rng.normal(size=(p, k)).astype(np.float32),
                    tail_logmass=rng.normal(size=p).astype(np.float32),
                    label_logprob=rng.normal(size=p).astype(np.float32),
                    tail_logsumexp=rng.normal(size=(p, 1)).astype(np.float32),
                    entropy=rng.random(p).astype(np.float32),
                )
                docs.append(
                    Document(
                        doc_id=f"doc-{index}",
                        input_ids=rng.integers(0, 50, length),
                        loss_mask=rng.random(p) < 0.7,
                        positions=positions,
                    )
                )
                index += 1
            self.shards.append(docs)
        self.starts = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(int)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_documents(self) -> int:
        return int(self.starts[-1])

    def shard_document_range(self, j: int) -> tuple[int, int]:
        return int(self.starts[j]), int(self.starts[j + 1])

    def read_shard(self, j: int) -> list[Document]:
        self.reads.append(j)
        return self.shards[j]


def epoch_ids(ds: StoreDataset, workers: int = 0) -> list[str]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [i for batch in loader for i in batch["doc_ids"]]


SIZES = [5, 0, 7, 3, 9, 4, 6, 2]


@pytest.mark.parametrize(
    ("world", "workers", "sizes"),
    [(1, 0, SIZES), (2, 0, SIZES), (3, 2, SIZES), (2, 2, [6, 5]), (4, 0, [3, 8])],
)
def test_ranks_and_workers_cover_every_document_once(world, workers, sizes):
    store = MemoryStore(sizes)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = StoreDataset(store, tokens_per_batch=64, seed=3, rank=rank, world_size=world)
            ds.set_epoch(epoch)
            seen += epoch_ids(ds, workers)
        expected = [d.doc_id for shard in store.shards for d in shard]
        assert sorted(seen) == sorted(expected)
        assert len(seen) == len(set(seen))


def test_order_is_a_function_of_seed_and_epoch():
    store = MemoryStore(SIZES)

    def order(seed, epoch):
        ds = StoreDataset(store, tokens_per_batch=64, seed=seed, rank=0, world_size=1)
        ds.set_epoch(epoch)
        return epoch_ids(ds)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    unshuffled = StoreDataset(store, shuffle=False, rank=0, world_size=1)
    assert epoch_ids(unshuffled) == [d.doc_id for shard in store.shards for d in shard]


def test_batches_respect_the_token_budget_and_line_up_with_documents():
    store = MemoryStore(SIZES)
    by_id = {d.doc_id: d for shard in store.shards for d in shard}
    budget = 70
    for batch in StoreDataset(store, tokens_per_batch=budget, rank=0, world_size=1):
        docs = [by_id[i] for i in batch["doc_ids"]]
        b, t = batch["input_ids"].shape
        assert t == max(d.num_tokens for d in docs)
        assert b * t <= budget or b == 1
        reference = np.concatenate([d.support_logprobs for d in docs])
        np.testing.assert_array_equal(batch["support_logprobs"].numpy(), reference)
        assert batch["position_mask"].sum() == len(batch["labels"]) == len(reference)
        # The label at every real position is the next input token, or ignored.
        next_tokens = batch["input_ids"][:, 1:][batch["position_mask"]]
        trained = np.concatenate([d.loss_mask for d in docs])
        expected = torch.where(torch.from_numpy(trained), next_tokens, IGNORE_INDEX)
        assert torch.equal(batch["labels"], expected)
        assert batch["num_tokens"] == trained.sum()


def test_collate_pads_with_attention_mask():
    store = MemoryStore([3])
    batch = collate_documents(store.shards[0])
    for row, doc in enumerate(store.shards[0]):
        n = doc.num_tokens
        assert batch["attention_mask"][row].sum() == n
        assert torch.equal(batch["input_ids"][row, :n], torch.from_numpy(doc.input_ids))


def test_a_batch_never_shares_read_only_memory_of_the_store(tmp_path):
    """A parquet shard's decoded label log-probs are the stored column as it is, in memory
    pyarrow lends read-only; a batch of the whole shard wrapped it in a tensor (a warning, and
    a loss writing to the tensor wrote into the decoded block). A batch a caller may write to
    never changes what the store decoded."""
    from logitstore import EncodedDocument, StoreWriter, open_store
    from logitstore.codecs import get_codec

    codec = get_codec("topk", k=4)
    g = torch.Generator().manual_seed(0)
    meta = {"teacher": {}, "tokenizer": {}, "capture": {}, "source": {}}
    writer = StoreWriter(str(tmp_path / "s"), codec=codec, backend="parquet", metadata=meta,
                         vocab_size=50)  # fmt: skip
    docs = []
    for d in range(2):
        ids = torch.randint(0, 50, (6,), generator=g)
        lp = torch.log_softmax(torch.randn(5, 50, generator=g), -1)
        fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:]).items()}
        docs.append(EncodedDocument(f"d{d}", ids.numpy(), np.ones(5, bool), fields))
    writer.write_shard(0, docs)
    writer.finalize(1)
    store = open_store(str(tmp_path / "s"))
    docs, block = store.read_block([0, 1])  # a whole shard in order: what a batch slices
    assert not block.label_logprob.flags.writeable  # (the stored column, as pyarrow lends it)
    before = np.array(block.label_logprob)
    batch = collate_documents(docs, block)
    batch["label_logprob"].add_(1.0)  # a loss may write to its inputs
    np.testing.assert_array_equal(block.label_logprob, before)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_exactly_what_was_consumed(workers):
    store = MemoryStore(SIZES, seed=5)

    def fresh():
        ds = StoreDataset(
            store, tokens_per_batch=48, seed=7, shuffle_window=2, rank=0, world_size=1
        )
        ds.set_epoch(2)
        return ds

    full = [b["doc_ids"] for b in DataLoader(fresh(), batch_size=None, num_workers=workers)]
    for stop in (1, 4, len(full) - 1, len(full)):
        first = fresh()
        loader = DataLoader(first, batch_size=None, num_workers=workers)
        for batch in itertools.islice(loader, stop):
            first.record(batch)
        state = first.state_dict()
        assert state["epoch"] == 2 and state["seed"] == 7
        resumed = StoreDataset(
            store, tokens_per_batch=48, seed=7, shuffle_window=2, rank=0, world_size=1
        )
        resumed.load_state_dict(state)
        rest = [b["doc_ids"] for b in DataLoader(resumed, batch_size=None, num_workers=workers)]
        assert rest == full[stop:]


def test_resume_skips_whole_windows_without_decoding():
    store = MemoryStore(SIZES)
    ds = StoreDataset(
        store, shuffle=False, shuffle_window=1, tokens_per_batch=10_000, rank=0, world_size=1
    )
    ds.load_state_dict({"seed": 0, "epoch": 0, "samples_consumed": [5 + 0 + 7]})
    list(ds)
    assert store.reads == [3, 4, 5, 6, 7]


def test_wrong_worker_count_or_seed_is_refused():
    store = MemoryStore(SIZES)
    ds = StoreDataset(store, seed=1, rank=0, world_size=1)
    with pytest.raises(ConfigError):
        ds.load_state_dict({"seed": 2, "epoch": 0, "samples_consumed": [1]})
    ds.load_state_dict({"seed": 1, "epoch": 0, "samples_consumed": [1, 2]})
    with pytest.raises(ConfigError, match="workers"):
        list(ds)


def test_errors_in_the_prefetch_thread_reach_the_consumer():
    class Broken(MemoryStore):
        def read_shard(self, j):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(StoreDataset(Broken([2, 2]), rank=0, world_size=1))


@pytest.mark.parametrize("items", [1, 5])
def test_closing_the_prefetching_iterator_ends_its_thread(items):
    # A thread left decoding when the interpreter exits is stopped inside native code, which
    # aborts the process; closing the iterator (as a finished training loop does) ends it.
    import threading
    import time

    from logitstore import dataset

    def slow():
        for i in range(items):
            time.sleep(0.05)
            yield i

    it = dataset._prefetched(slow(), depth=1)
    assert next(it) == 0
    time.sleep(0.2)  # the thread has the next item in hand, or its end waits in a full queue
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "logitstore-prefetch"]
    assert not dataset._LIVE
