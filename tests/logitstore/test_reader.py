"""LogitStore: opening, vectorised shard reads, verification, never unpickling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.errors import ManifestError, StoreNotFoundError

V = 200
META = {"teacher": {"model": "t"}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}


def build(url: str, shards=(2, 3, 1), backend="zarr", finalize=True):
    codec = get_codec("sampled", n=12)
    g = torch.Generator().manual_seed(1)
    w = StoreWriter(url, codec=codec, backend=backend, metadata=META, vocab_size=V)
    expected = []
    for j, n in enumerate(shards):
        docs = []
        for d in range(n):
            t = 5 + 3 * d + j
            ids = torch.randint(0, V, (t,), generator=g)
            lp = torch.log_softmax(2 * torch.randn(t - 1, V, generator=g), -1)
            enc = codec.encode(lp, ids[1:], generator=g)
            docs.append(
                EncodedDocument(
                    f"{j}-{d}",
                    ids.numpy(),
                    np.zeros(t - 1, bool),
                    {k: v.numpy() for k, v in enc.items()},
                )
            )
        w.write_shard(j, docs)
        expected += docs
    if finalize:
        w.finalize(len(shards))
    return codec, expected


def test_missing_and_unfinished_stores_are_named(tmp_path):
    # A mistyped path said "(no manifest.json)", as if a folder were there without one.
    with pytest.raises(StoreNotFoundError, match="no store at .*nothing: the path does not exist"):
        open_store(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match=r"no store at .*empty \(no manifest.json\)"):
        open_store(str(tmp_path / "empty"))
    build(str(tmp_path / "s"), finalize=False)
    with pytest.raises(StoreNotFoundError, match="unfinished"):
        open_store(str(tmp_path / "s"))


def test_read_shard_decodes_once_per_shard(tmp_path, monkeypatch):
    codec, expected = build(str(tmp_path / "s"))
    store = open_store(str(tmp_path / "s"))
    calls = []
    real = type(store.codec).decode

    def counting(self, fields, vocab_size=None):
        calls.append(len(next(iter(fields.values()))))
        return real(self, fields, vocab_size)

    monkeypatch.setattr(type(store.codec), "decode", counting)
    docs = store.read_shard(1)
    assert len(calls) == 1 and calls[0] == sum(len(e.input_ids) - 1 for e in expected[2:5])
    assert [d.doc_id for d in docs] == ["1-0", "1-1", "1-2"]
    assert store.shard_document_range(1) == (2, 5)
    assert store.shard_document_range(-1) == (5, 6)
    for doc, enc in zip(docs, expected[2:5]):
        ref = codec.decode(enc.fields)
        np.testing.assert_array_equal(doc.support_counts, ref.support_counts)
        np.testing.assert_array_equal(doc.support_ids, ref.support_ids)


def test_summary_and_sizes(tmp_path):
    _, expected = build(str(tmp_path / "s"))
    store = open_store(str(tmp_path / "s"))
    s = store.summary()
    assert s["documents"] == len(store) == len(expected)
    assert s["tokens"] == store.num_tokens == sum(len(e.input_ids) for e in expected)
    assert s["codec"]["name"] == "sampled" and s["teacher"] == {"model": "t"}
    assert store.vocab_size == V and store.num_shards == 3


def test_verify_reports_inconsistent_totals(tmp_path):
    build(str(tmp_path / "s"))
    path = tmp_path / "s" / "manifest.json"
    m = json.loads(path.read_text())
    m["statistics"]["tokens"] += 2
    m["shards"][1]["documents"] += 1  # positions = tokens - documents still holds
    m["shards"][1]["tokens"] += 1
    path.write_text(json.dumps(m))
    problems = open_store(str(tmp_path / "s")).verify()
    assert any("statistics.tokens" in p for p in problems)
    assert any("shards/000001.zarr" in p and "documents" in p for p in problems)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_verify_names_a_document_id_held_by_two_shards(tmp_path, backend):
    codec, expected = build(str(tmp_path / "s"), backend=backend, finalize=False)
    w = StoreWriter(str(tmp_path / "s"), mode="resume", codec=codec, backend=backend,
                    metadata=META, vocab_size=V)  # fmt: skip
    again = expected[1]  # shard 0's second document, written once more into a fourth shard
    w.write_shard(3, [again])
    w.finalize(4)
    store = open_store(str(tmp_path / "s"))
    assert [d.doc_id for d in store.iter_documents()].count(again.doc_id) == 2  # readers read it
    assert store.verify() == [
        f"shard shards/000003.{backend}: document id {again.doc_id!r} is held by shard "
        f"shards/000000.{backend} too (ids of this shard held by earlier shards: 1); an id names "
        "one document"
    ]


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_reading_never_unpickles(tmp_path, monkeypatch, backend):
    build(str(tmp_path / "s"), backend=backend)

    def refuse(*a, **k):
        raise AssertionError("the reader unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(np, "load", refuse)
    store = open_store(str(tmp_path / "s"))
    assert len(list(store.iter_documents())) == 6
    assert store.verify() == []


def test_codec_set_up_happens_once_per_codec_entry(tmp_path, monkeypatch):
    """Opening stores of one codec entry builds the codec once; a different entry builds anew,
    and a bad one is still refused on every open."""
    from logitstore.codecs import Sampled

    build(str(tmp_path / "a"))
    build(str(tmp_path / "b"), shards=(1,))
    built = []
    real = Sampled.__post_init__

    def counted(self):
        built.append(self.n)
        real(self)

    monkeypatch.setattr(Sampled, "__post_init__", counted)
    first = open_store(str(tmp_path / "a"))
    assert open_store(str(tmp_path / "a")).codec is first.codec
    assert open_store(str(tmp_path / "b")).codec is first.codec  # same entry, other store
    assert len(built) <= 1
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["codec"]["configuration"]["n"] = 13
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert open_store(str(tmp_path / "b")).codec.n == 13
    manifest["codec"]["configuration"]["n"] = 0
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    for _ in range(2):
        with pytest.raises(ManifestError, match="codec.configuration"):
            open_store(str(tmp_path / "b"))
    # The cache key tells JSON values apart exactly: 12.0 and true are not the 12 cached above.
    for bad in (12.0, True):
        manifest["codec"]["configuration"]["n"] = bad
        (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match="codec.configuration"):
            open_store(str(tmp_path / "b"))
