"""Remote reading: read-ahead, the local shard cache, ``hf://`` through fsspec.

The stores are written by ``make_store`` of ``conftest.py``.
"""

from __future__ import annotations

import threading

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

from logitstore import open_store
from logitstore.cli import main


class CountingMemory(MemoryFileSystem):
    """An in-memory filesystem of its own that counts whole-file reads."""

    protocol = "countmem"
    store: dict = {}
    pseudo_dirs = [""]
    reads: list = []

    def cat_file(self, path, start=None, end=None, **kw):
        CountingMemory.reads.append(path)
        return super().cat_file(path, start, end, **kw)


def test_readahead_and_local_cache(tmp_path, monkeypatch, make_store):
    monkeypatch.setattr(CountingMemory, "store", {})
    fsspec.register_implementation("countmem", CountingMemory, clobber=True)
    url = make_store("countmem://bucket/store", "topk", {"k": 8})
    expected = [(d.doc_id, d.support_logprobs.copy()) for d in open_store(url, readahead=0)]
    cache = tmp_path / "cache"
    store = open_store(url, readahead=2, cache_dir=cache)
    got = [(d.doc_id, d.support_logprobs.copy()) for d in store.iter_documents()]
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, expected, strict=True))
    assert len(list(cache.glob("*/*"))) == 3  # one verified entry per shard
    # a damaged entry is dropped and fetched again
    victim = next(cache.glob("*/*")) / "0"
    good = victim.read_bytes()
    victim.write_bytes(b"x" + good[1:])
    assert open_store(url, cache_dir=cache).verify() == []
    assert victim.read_bytes() == good
    # with the shards gone from the remote, the cache still serves them (and is verified)
    for entry in store.manifest["shards"]:
        store.fs.rm(f"{store.root}/{entry['path']}", recursive=True)
    CountingMemory.reads.clear()
    again = open_store(url, cache_dir=cache)
    assert [d.doc_id for d in again] == [e[0] for e in expected]
    assert not [p for p in CountingMemory.reads if "/shards/" in p]
    # a damaged cache entry is ignored: the shard is fetched again (here: missing, reported)
    victim = next(cache.glob("*/*")) / "0"
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    assert len(open_store(url, cache_dir=cache).verify()) == 1


def test_prefetched_errors_surface_when_read(tmp_path, make_store):
    url = make_store(f"memory://{tmp_path.name}/store", "topk", {"k": 8})
    store = open_store(url, readahead=2)
    store.fs.rm(f"/{tmp_path.name}/store/shards/000002.zarr", recursive=True)
    store.prefetch([1, 2])
    assert len(store.read_shard(1)) == 3
    with pytest.raises(Exception, match="000002"):
        store.read_shard(2)


class HubLike(MemoryFileSystem):
    """Plays ``hf://`` here: the Hub is not reachable, the protocol and URL form are kept."""

    protocol = "hf"
    store: dict = {}
    pseudo_dirs = [""]


def test_hf_urls_use_the_same_reader(monkeypatch, make_store):
    monkeypatch.setattr(HubLike, "store", {})
    fsspec.register_implementation("hf", HubLike, clobber=True)
    try:
        url = make_store("hf://datasets/org/name", "sampled", {"n": 10}, backend="parquet")
        store = open_store(url)
        assert isinstance(store.fs, HubLike) and store.root.endswith("datasets/org/name")
        assert store.verify() == [] and len(store) == 9
        result = CliRunner().invoke(main, ["verify", url])
        assert result.exit_code == 0 and "9 documents" in result.output
    finally:
        from huggingface_hub import HfFileSystem

        fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def test_fsspec_cache_chaining_reads_the_same(tmp_path, make_store):
    url = make_store(f"memory://{tmp_path.name}-chain/store", "topk", {"k": 8})
    cache = tmp_path / "simplecache"
    opts = {"simplecache": {"cache_storage": str(cache)}}
    chained = open_store(f"simplecache::{url}", opts)
    direct = open_store(url)
    for a, b in zip(chained, direct, strict=True):
        assert a.doc_id == b.doc_id
        np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)
    assert len(list(cache.iterdir())) > 3  # manifest plus the shards' files


def test_storage_options_must_be_a_json_object(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "--storage-options", "[1]"])
    assert result.exit_code == 2 and "JSON object" in result.output


def test_prefetch_fetches_before_the_read(monkeypatch, make_store):
    monkeypatch.setattr(CountingMemory, "store", {})
    fsspec.register_implementation("countmem", CountingMemory, clobber=True)
    url = make_store("countmem://bucket/ahead", "topk", {"k": 8}, backend="parquet")
    store = open_store(url, readahead=1)
    CountingMemory.reads.clear()
    documents = store.iter_documents()
    next(documents)  # reading shard 0 has scheduled shard 1
    store._pending[1].result()  # wait for the background fetch, as training time would
    assert any(p.endswith("shards/000001.parquet") for p in CountingMemory.reads)
    before = len(CountingMemory.reads)
    rest = list(documents)
    fetched_now = CountingMemory.reads[before:]
    assert not any(p.endswith("shards/000001.parquet") for p in fetched_now)
    assert len(rest) == 8 and any(p.endswith("shards/000002.parquet") for p in fetched_now)


def test_store_with_readahead_pickles_for_workers(tmp_path, make_store):
    import pickle

    url = make_store(f"memory://{tmp_path.name}-pickle/store", "topk", {"k": 8})
    store = open_store(url, readahead=2)
    store.prefetch([0, 1])
    copy = pickle.loads(pickle.dumps(store))
    assert [d.doc_id for d in copy] == [d.doc_id for d in store]


def test_the_shard_read_at_once_is_fetched_by_the_reader_and_the_next_ahead(tmp_path, make_store):
    """``iter_documents`` fetches the shard it reads in its own thread (unless a read-ahead
    has it in flight) and only the next ones in the background: a one-shard store starts no
    read-ahead thread at all."""
    url = make_store(f"memory://{tmp_path.name}-first/store", "topk", {"k": 8})
    store = open_store(url, readahead=1)
    fetched_in: dict[str, str] = {}
    real = store._fetch

    def fetch(entry):
        fetched_in[entry["path"]] = threading.current_thread().name
        return real(entry)

    store._fetch = fetch
    docs = list(store.iter_documents())
    assert len(docs) == 9 and len(fetched_in) == 3
    main = threading.current_thread().name
    assert fetched_in["shards/000000.zarr"] == main  # nothing was in flight for it
    assert all(fetched_in[f"shards/00000{j}.zarr"] != main for j in (1, 2))  # ahead

    one = make_store(f"memory://{tmp_path.name}-one/store", "topk", {"k": 8}, shards=1)
    single = open_store(one, readahead=2)
    assert len(list(single.iter_documents())) == 3
    assert single._executor is None  # no thread for a store of one shard
    fresh = open_store(one, readahead=2)
    fresh.prefetch([0])  # asked for explicitly, it is still fetched ahead
    assert fresh._executor is not None and 0 in fresh._pending
