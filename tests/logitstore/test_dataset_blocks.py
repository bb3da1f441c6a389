"""The streaming loader on a real store: windows decoded as one block, in emission order.

``test_dataset.py`` checks order, budgets and resume against an in-memory double; here the same
guarantees are checked on a store written to disk, whose reader decodes each window with
``LogitStore.read_block``, against batches collated from documents read one by one.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.codecs.base import Positions
from logitstore.dataset import StoreDataset, collate_documents

V = 64
SIZES = [5, 1, 7, 3, 9, 4, 6, 2]
META = {"teacher": {"model": "t"}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}
# Every tensor of a batch: the teacher's (a top-k store has no draw counts) and the tokens'.
FIELDS = [f.name for f in dataclasses.fields(Positions) if f.name != "support_counts"]
FIELDS += ["labels", "input_ids", "attention_mask", "position_mask"]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("blocks") / "store")
    codec = get_codec("topk", k=4, values="q8")
    g = torch.Generator().manual_seed(0)
    writer = StoreWriter(url, codec=codec, metadata=META, vocab_size=V)
    index = 0
    for j, size in enumerate(SIZES):
        docs = []
        for _ in range(size):
            t = int(torch.randint(2, 40, (1,), generator=g))
            ids = torch.randint(0, V, (t,), generator=g)
            logprobs = torch.log_softmax(2 * torch.randn(t - 1, V, generator=g), -1)
            fields = {k: v.numpy() for k, v in codec.encode(logprobs, ids[1:]).items()}
            mask = (torch.rand(t - 1, generator=g) < 0.7).numpy()
            docs.append(EncodedDocument(f"doc-{index}", ids.numpy(), mask, fields))
            index += 1
        writer.write_shard(j, docs)
    writer.finalize(len(SIZES))
    return url


def by_id(url: str) -> dict[str, object]:
    """Every document, read shard by shard (``read_shard``: not the block path)."""
    store = open_store(url)
    return {d.doc_id: d for j in range(store.num_shards) for d in store.read_shard(j)}


def assert_batch_matches(batch: dict, docs: dict) -> None:
    reference = collate_documents([docs[i] for i in batch["doc_ids"]])
    for name in FIELDS:
        assert torch.equal(batch[name], reference[name]), name
    assert batch["num_tokens"] == reference["num_tokens"]


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (3, 2), (1, 2)])
def test_batches_equal_documents_read_one_by_one(store_url, world, workers):
    docs = by_id(store_url)
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            ds = StoreDataset(
                store_url, tokens_per_batch=90, seed=4, shuffle_window=3, rank=rank,
                world_size=world,
            )  # fmt: skip
            ds.set_epoch(epoch)
            for batch in DataLoader(ds, batch_size=None, num_workers=workers):
                assert_batch_matches(batch, docs)
                seen += batch["doc_ids"]
        assert sorted(seen) == sorted(docs) and len(seen) == len(set(seen))


def test_fewer_shards_than_streams_still_covers_each_document_once(store_url):
    docs = by_id(store_url)
    seen = []
    for rank in range(12):  # 12 streams, 8 shards: every stream keeps every 12th document
        ds = StoreDataset(store_url, tokens_per_batch=64, seed=1, rank=rank, world_size=12)
        for batch in ds:
            assert_batch_matches(batch, docs)
            seen += batch["doc_ids"]
    assert sorted(seen) == sorted(docs) and len(seen) == len(set(seen))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_a_real_store_continues_exactly(store_url, workers):
    def fresh() -> StoreDataset:
        ds = StoreDataset(
            store_url, tokens_per_batch=60, seed=7, shuffle_window=2, rank=0, world_size=1
        )
        ds.set_epoch(1)
        return ds

    full = [b["doc_ids"] for b in DataLoader(fresh(), batch_size=None, num_workers=workers)]
    for stop in (1, 3, len(full) - 1):
        first = fresh()
        for batch in itertools.islice(
            DataLoader(first, batch_size=None, num_workers=workers), stop
        ):
            first.record(batch)
        resumed = fresh()
        resumed.load_state_dict(first.state_dict())
        rest = [b["doc_ids"] for b in DataLoader(resumed, batch_size=None, num_workers=workers)]
        assert rest == full[stop:]


def test_batches_of_one_window_are_slices_of_one_decode(store_url):
    """Collation copies nothing: consecutive batches of one window lie back to back in memory
    (a copy per batch would put each in its own allocation)."""
    ds = StoreDataset(
        store_url, tokens_per_batch=70, seed=2, shuffle_window=len(SIZES), rank=0, world_size=1
    )
    batches = list(ds)
    assert len(batches) > 3
    for name in ("support_ids", "support_logprobs", "entropy"):
        for a, b in itertools.pairwise(batches):
            end = a[name].data_ptr() + a[name].numel() * a[name].element_size()
            assert b[name].data_ptr() == end, name


def test_read_block_decodes_the_listed_documents_in_order(store_url, monkeypatch):
    store = open_store(store_url)
    docs = by_id(store_url)
    order = [7, 0, 20, 6, 36, 12, 13, 1]  # across shards, out of store order
    decoded = []
    real = type(store.codec).decode

    def counting(self, fields, vocab_size=None):
        decoded.append(len(fields["top1"]))
        return real(self, fields, vocab_size)

    monkeypatch.setattr(type(store.codec), "decode", counting)
    got, block = store.read_block(order)
    assert decoded == [sum(docs[f"doc-{i}"].num_tokens - 1 for i in order)]  # one call, these
    assert [d.doc_id for d in got] == [f"doc-{i}" for i in order]
    row = 0
    for doc in got:
        ref = docs[doc.doc_id]
        n = doc.num_tokens - 1
        np.testing.assert_array_equal(doc.input_ids, ref.input_ids)
        np.testing.assert_array_equal(doc.loss_mask, ref.loss_mask)
        for name in ("support_ids", "support_logprobs", "tail_logmass", "label_logprob"):
            np.testing.assert_array_equal(getattr(doc, name), getattr(ref, name))
            np.testing.assert_array_equal(getattr(block, name)[row : row + n], getattr(ref, name))
        row += n
    assert len(block) == row
    empty, nothing = store.read_block([])
    assert empty == [] and len(nothing) == 0 and nothing.support_ids.shape == (0, 4)
    with pytest.raises(IndexError):
        store.read_block([0, store.num_documents])


def test_read_block_names_the_document_of_a_bad_value(tmp_path):
    codec = get_codec("topk", k=4, values="q8")
    writer = StoreWriter(str(tmp_path / "s"), codec=codec, metadata=META, vocab_size=V)
    g = torch.Generator().manual_seed(3)
    for j in range(2):
        docs = []
        for d in range(3):
            ids = torch.randint(0, V, (10,), generator=g)
            lp = torch.log_softmax(torch.randn(9, V, generator=g), -1)
            fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:]).items()}
            if (j, d) == (1, 2):
                fields["top1"][5] = 3.0  # a probability above 1
            docs.append(EncodedDocument(f"d{j}{d}", ids.numpy(), np.ones(9, bool), fields))
        writer.write_shard(j, docs)
    writer.finalize(2)
    store = open_store(str(tmp_path / "s"))
    with pytest.raises(
        Exception, match=r"shard shards/000001\.zarr: document 2 \('d12'\), position 5: "
    ):
        store.read_block([4, 0, 5, 1])
    assert [d.doc_id for d in store.read_block([4, 0, 1])[0]] == ["d11", "d00", "d01"]


def test_shards_are_read_and_fetched_ahead_in_the_order_their_documents_come(store_url):
    store = open_store(store_url)
    starts = np.array([store.shard_document_range(j)[0] for j in range(store.num_shards)])
    events: list[tuple[str, object]] = []
    real_prefetch, real_read = store.prefetch, store.read_shard_arrays

    def prefetch(shards, **options):
        events.append(("fetch", list(shards)))
        real_prefetch(shards, **options)

    store.prefetch = prefetch
    store.read_shard_arrays = lambda j: events.append(("read", j)) or real_read(j)
    index = {f"doc-{i}": i for i in range(store.num_documents)}
    for rank, world in ((0, 1), (5, 12)):  # by shard, and the document-split fallback
        events.clear()
        ds = StoreDataset(store, tokens_per_batch=64, seed=3, rank=rank, world_size=world)
        emitted = [index[i] for b in ds for i in b["doc_ids"]]
        for window in ds.plan(0, rank, world):  # shards as their documents first name them
            owners = np.searchsorted(starts, window.docs, side="right") - 1
            assert window.shards == list(dict.fromkeys(owners.tolist()))
        read = [j for kind, j in events if kind == "read"]
        owners = np.searchsorted(starts, emitted, side="right") - 1
        assert sorted(read) == sorted(set(owners.tolist()))  # each once, and only those
        # Every read is of a shard the latest read-ahead request listed, in the listed order.
        listed: list = []
        for kind, value in events:
            if kind == "fetch":
                listed = list(value)
            else:
                assert listed and listed.pop(0) == value


def _snapshot(block: Positions) -> dict[str, np.ndarray]:
    return {name: getattr(block, name).copy() for name in FIELDS if hasattr(block, name)}


def test_read_block_reuses_its_gather_buffer_without_touching_earlier_blocks(store_url):
    """The gathered encoded rows of one block live in a buffer the next block reuses; the
    blocks already handed out (slices of their own decode) are unchanged by it."""
    store = open_store(store_url)
    docs = by_id(store_url)
    first_order = [9, 2, 30, 17, 5, 0, 36]  # several shards, out of store order
    got, block = store.read_block(first_order)
    before = _snapshot(block)
    buffer = store._gather._buffer
    assert buffer is not None
    for order in ([4, 35, 1], [3, 12, 8, 21, 0, 33]):  # smaller blocks than the first
        store.read_block(order)
        assert store._gather._buffer is buffer  # the same memory, gathered into again
    after = _snapshot(block)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for doc, index in zip(got, first_order):
        np.testing.assert_array_equal(doc.support_ids, docs[f"doc-{index}"].support_ids)


def test_a_decode_that_keeps_a_view_of_the_gathered_rows_keeps_the_buffer(store_url, monkeypatch):
    """A codec may return a stored field as it is (a view of the gathered rows); that block
    then owns the buffer, and the next block gathers into fresh memory."""
    store = open_store(store_url)
    real = type(store.codec).decode

    def keeping_a_view(self, fields, vocab_size=None):
        pos = real(self, fields, vocab_size)
        return dataclasses.replace(pos, support_counts=fields["values"])  # a view

    monkeypatch.setattr(type(store.codec), "decode", keeping_a_view)
    _, first = store.read_block([9, 2, 30, 17])
    kept = first.support_counts.copy()
    assert store._gather._buffer is None
    _, second = store.read_block([4, 35, 1, 12, 8])
    np.testing.assert_array_equal(first.support_counts, kept)
    assert not np.may_share_memory(first.support_counts, second.support_counts)
