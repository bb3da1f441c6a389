"""Hub export and push, and remote reading (read-ahead, local cache, ``hf://`` through fsspec)."""

from __future__ import annotations

import inspect
import re
import shutil
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

import logitstore.hub as hub
from logitstore import open_store
from logitstore._hub_card import base_models, size_category, source_datasets
from logitstore.cli import main
from logitstore.codecs import fidelity_sums, get_codec, merge_fidelity
from logitstore.errors import HubAuthError
from logitstore.writer import EncodedDocument, StoreWriter

V = 300
TEMPS = (2.0,)
METADATA = {
    "teacher": {"model": "tiny/Teacher-1M", "dtype": "float32"},
    "tokenizer": {"vocab_sha256": "ef" * 8, "vocab_size": V},
    "capture": {"temperatures": list(TEMPS), "max_length": 64},
    "source": {"name": "org/corpus", "kind": "hub", "split": "train"},
}


def make_store(
    url: str, codec_name: str, params: dict, storage_options=None, backend="zarr", shards=3
):
    """``shards`` shards of random peaked documents; ``doc_id`` in the teacher pass's form."""
    codec = get_codec(codec_name, **params)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(
        url,
        codec=codec,
        backend=backend,
        metadata=METADATA,
        vocab_size=V,
        storage_options=storage_options,
    )
    for j in range(shards):
        docs, sums = [], []
        for d in range(3):
            t = int(torch.randint(2, 30, (1,), generator=g))
            ids = torch.randint(0, V, (t,), generator=g)
            lp = torch.log_softmax(3.0 * torch.randn(t - 1, V, generator=g), dim=-1)
            enc = codec.encode(lp, ids[1:], temperatures=TEMPS, generator=g)
            decoded = codec.decode({k: v.numpy() for k, v in enc.items()})
            sums.append(fidelity_sums(lp, decoded, ids[1:]))
            docs.append(
                EncodedDocument(
                    f"docs.jsonl:{3 * j + d}/w0/{j:08x}{d:08x}",
                    ids.numpy(),
                    (ids[1:] % 3 != 0).numpy(),
                    {k: v.numpy() for k, v in enc.items()},
                )
            )
        w.write_shard(j, docs, fidelity=merge_fidelity(sums))
    w.finalize(shards)
    return url


@pytest.fixture(scope="module", params=[("sampled", {"n": 12}), ("topk", {"k": 16})])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    src = make_store(str(root / "src"), *request.param)
    out = root / "out"
    hub.export_store(src, str(out), repo_id="org/name")
    return src, out


def test_export_loads_with_datasets_and_equals_the_store(exported):
    import datasets

    src, out = exported
    # A cache of its own: datasets keys its cache by folder name and settings, so a shared
    # one can hand back rows of an earlier export with other values.
    rows = datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "cache"))
    docs = list(open_store(src))
    assert rows.num_rows == len(docs)
    for row, doc in zip(rows, docs, strict=True):
        assert row["doc_id"] == doc.doc_id
        assert row["source_row"] == doc.doc_id.split("/")[0] and row["window"] == 0
        np.testing.assert_array_equal(row["input_ids"], doc.input_ids)
        np.testing.assert_array_equal(row["loss_mask"], doc.loss_mask)
        np.testing.assert_array_equal(row["support_ids"], doc.support_ids)
        np.testing.assert_array_equal(row["support_logprobs"], doc.support_logprobs)
        for key in ("tail_logmass", "label_logprob", "entropy", "tail_logsumexp"):
            np.testing.assert_array_equal(np.asarray(row[key], np.float32), getattr(doc, key))
        if doc.support_counts is not None:
            np.testing.assert_array_equal(row["support_counts"], doc.support_counts)


def test_export_is_a_store_with_a_card(exported):
    src, out = exported
    again = open_store(str(out))
    assert again.manifest["backend"] == "parquet" and again.verify() == []
    for a, b in zip(open_store(src), again, strict=True):
        np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)
        np.testing.assert_array_equal(a.tail_logmass, b.tail_logmass)
    assert not (out / "records").exists() and not (out / "settings.json").exists()
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    paths = {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]}
    assert paths == {"default": "data/*.parquet", "encoded": "shards/*.parquet"}
    view = pq.read_schema(out / "data" / "000000.parquet")
    assert [f["name"] for f in meta["dataset_info"]["features"]] == view.names
    assert meta["dataset_info"]["splits"][0]["num_examples"] == again.num_documents
    stats = again.manifest["statistics"]
    for needle in (
        "tiny/Teacher-1M",
        "ef" * 8,
        again.manifest["codec"]["name"],
        f"| documents | {stats['documents']} |",
        f"| tokens | {stats['tokens']} |",
        f"{stats['bytes_per_token']:.2f}",
        "logitstore train --store hf://datasets/org/name",
        "| capture temperatures | " + ", ".join(str(float(t)) for t in (1.0, *TEMPS)) + " |",
    ):
        assert needle in body


def test_view_truncation_moves_mass_into_the_tail(tmp_path, monkeypatch):
    src = make_store(str(tmp_path / "src"), "topk", {"k": 16, "values": "float32"})
    monkeypatch.setattr(hub, "VIEW_ROW_GROUP_BYTES", 300)  # forces several row groups
    hub.export_store(src, str(tmp_path / "out"), max_support=5)
    view = pq.ParquetFile(tmp_path / "out" / "data" / "000000.parquet")
    assert view.metadata.num_row_groups > 1
    rows = view.read().to_pylist()
    for row, doc in zip(rows, list(open_store(src))[:3], strict=True):
        lp = doc.support_logprobs.astype(np.float64)
        tail = np.log(np.exp(doc.tail_logmass.astype(np.float64)) + np.exp(lp[:, 5:]).sum(1))
        np.testing.assert_allclose(row["tail_logmass"], tail, rtol=1e-6)
        np.testing.assert_array_equal(row["support_ids"], doc.support_ids[:, :5])
        tls = np.logaddexp(
            doc.tail_logsumexp[:, 0].astype(np.float64), np.log(np.exp(lp[:, 5:] / TEMPS[0]).sum(1))
        )
        np.testing.assert_allclose(np.asarray(row["tail_logsumexp"])[:, 0], tls, rtol=1e-6)


def test_card_metadata_through_huggingface_hub(tmp_path):
    from huggingface_hub import DatasetCard

    hot = tuple(range(V - 1, -1, -1))  # a fitted id table: V numbers in the manifest
    src = make_store(str(tmp_path / "src"), "topk", {"k": 16, "values": "q6", "hot_ids": hot})
    hub.export_store(src, str(tmp_path / "out"), repo_id="org/name", license="apache-2.0")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0"
    assert meta["pretty_name"] == "Teacher-1M teacher logits on corpus"
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]  # 9 documents
    assert meta["source_datasets"] == ["org/corpus"]
    assert meta["base_model"] == ["tiny/Teacher-1M"]
    assert meta["configs"][0]["config_name"] == "default"
    manifest = open_store(str(tmp_path / "out")).manifest
    assert manifest["codec"]["configuration"]["hot_ids"] == list(hot)  # the table is kept ...
    text = (tmp_path / "out" / "README.md").read_text()
    assert not re.search(r"\d+(\s*,\s*\d+){15}", text)  # ... but never printed in the card
    assert f"{V:,} entries" in card.text and "6-bit codes" in card.text
    assert "`k=16`" in card.text and "`values=q6`" in card.text
    stats = manifest["statistics"]
    assert f"| bytes/token | {stats['bytes_per_token']:.2f} |" in card.text
    assert re.search(r"\| fidelity: mass_captured \| [0-9.e-]+ \|", card.text)


def test_card_names_only_hub_repositories():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10**4, 10**12 - 1, 10**12)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "1K<n<10K",
        "10K<n<100K",
        "100B<n<1T",
        "n>1T",
    ]
    local = {"id": "my-teacher", "weights": {"kind": "full", "sha256": "ab" * 32}}
    hub_teacher = {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "c0ffee", "weights": None}
    assert base_models(local) == [] and base_models(hub_teacher) == [hub_teacher["id"]]
    mixture = {"mixture": {"stores": [{"teacher": hub_teacher}, {"teacher": local}]}}
    assert base_models(mixture) == [hub_teacher["id"]]
    assert source_datasets({"name": "HuggingFaceTB/smoltalk", "kind": "hub"}) == [
        "HuggingFaceTB/smoltalk"
    ]
    assert source_datasets({"name": "docs.jsonl", "kind": "files"}) == []


def test_push_without_license_or_token_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    result = CliRunner().invoke(main, ["push", src, "org/name"])
    assert result.exit_code == 2 and "--license" in result.output
    assert len(result.output.strip().splitlines()) == 1 and FakeApi.calls == []
    result = CliRunner().invoke(main, ["push", src, "org/name", "--license", "Apache 2"])
    assert result.exit_code == 2 and "license identifier" in result.output
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubAuthError, match="HF_TOKEN"):
        hub.push_store(src, "org/name", license="mit")
    result = CliRunner().invoke(main, ["push", src, "org/name", "--license", "mit"])
    assert result.exit_code == 2 and "token" in result.output
    assert not (tmp_path / "src" / "README.md").exists() and FakeApi.calls == []


class FakeApi:
    """Stands in for ``huggingface_hub.HfApi`` (2.x: ``upload_folder`` is the resumable
    upload) at the network boundary; records the calls and keeps a copy of what was sent."""

    calls: list = []
    snapshot: Path | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        FakeApi.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, folder_path, **kw):
        FakeApi.calls.append(("upload_folder", {"folder_path": folder_path, **kw}))
        shutil.copytree(folder_path, FakeApi.snapshot)
        return "https://hub.example/commit/1"


class FakeLargeApi(FakeApi):
    """``HfApi`` of ``huggingface_hub`` before 2.0, which has ``upload_large_folder``."""

    def upload_large_folder(self, repo_id, folder_path, **kw):
        FakeApi.calls.append(
            ("upload_large_folder", {"repo_id": repo_id, "folder_path": folder_path, **kw})
        )
        shutil.copytree(folder_path, FakeApi.snapshot)


def _binds_to_installed_hfapi(kind: str, kwargs: dict) -> None:
    """The arguments push passed are accepted by the installed ``HfApi`` method, if it has it."""
    import huggingface_hub

    method = getattr(huggingface_hub.HfApi, kind, None)
    if method is not None:
        inspect.signature(method).bind(None, **kwargs)


@pytest.mark.parametrize("api", [FakeApi, FakeLargeApi], ids=["upload_folder", "large_folder"])
def test_push_exports_then_uploads_resumably(tmp_path, monkeypatch, api):
    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    args = ["push", src, "org/name", "--private", "--revision", "v1", "--license", "mit"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "resumable" in result.output and "run the same push again" in result.output
    upload = "upload_folder" if api is FakeApi else "upload_large_folder"
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ["init", "create_repo", "create_branch", upload]
    assert FakeApi.calls[0][1] == "hf_secret"
    assert FakeApi.calls[1][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert FakeApi.calls[2][2]["branch"] == "v1"
    sent = FakeApi.calls[3][1]
    assert sent["revision"] == "v1" and sent["repo_type"] == "dataset"
    _binds_to_installed_hfapi(upload, sent)
    uploaded = open_store(str(FakeApi.snapshot))
    assert uploaded.verify() == [] and len(uploaded) == len(open_store(src))
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(FakeApi.snapshot / "README.md")
    assert card.data.license == "mit" and "hf://datasets/org/name" in card.text
    # an existing export is uploaded as it is; its card's license serves without --license
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded2"
    hub.push_store(str(tmp_path / "uploaded"), "org/name")
    assert FakeApi.calls[-1][1]["folder_path"] == str(tmp_path / "uploaded")
    assert sorted(p.name for p in FakeApi.snapshot.iterdir()) == sorted(
        p.name for p in (tmp_path / "uploaded").iterdir()
    )


def test_push_sets_the_license_of_an_export_without_one(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import DatasetCard

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8})
    hub.export_store(src, str(tmp_path / "export"))
    before = DatasetCard.load(tmp_path / "export" / "README.md")
    assert before.data.license is None
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    with pytest.raises(hub.ConfigError, match="--license"):
        hub.push_store(str(tmp_path / "export"), "org/name")
    hub.push_store(str(tmp_path / "export"), "org/name", license="cc-by-4.0")
    after = DatasetCard.load(FakeApi.snapshot / "README.md")
    assert after.data.license == "cc-by-4.0" and after.text == before.text
    assert after.data.to_dict()["dataset_info"] == before.data.to_dict()["dataset_info"]


# -- remote reading --------------------------------------------------------------------------


class CountingMemory(MemoryFileSystem):
    """An in-memory filesystem of its own that counts whole-file reads."""

    protocol = "countmem"
    store: dict = {}
    pseudo_dirs = [""]
    reads: list = []

    def cat_file(self, path, start=None, end=None, **kw):
        CountingMemory.reads.append(path)
        return super().cat_file(path, start, end, **kw)


def test_readahead_and_local_cache(tmp_path, monkeypatch):
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


def test_prefetched_errors_surface_when_read(tmp_path):
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


def test_hf_urls_use_the_same_reader(monkeypatch):
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


def test_fsspec_cache_chaining_reads_the_same(tmp_path):
    url = make_store(f"memory://{tmp_path.name}-chain/store", "topk", {"k": 8})
    cache = tmp_path / "simplecache"
    opts = {"simplecache": {"cache_storage": str(cache)}}
    chained = open_store(f"simplecache::{url}", opts)
    direct = open_store(url)
    for a, b in zip(chained, direct, strict=True):
        assert a.doc_id == b.doc_id
        np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)
    assert len(list(cache.iterdir())) > 3  # manifest plus the shards' files


def test_export_cli(tmp_path):
    src = make_store(str(tmp_path / "src"), "dense", {"bits": 8})
    out = str(tmp_path / "out")
    result = CliRunner().invoke(
        main, ["export", src, out, "--max-support", "4", "--license", "mit"]
    )
    assert result.exit_code == 0, result.output
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(tmp_path / "out" / "README.md").data.license == "mit"
    view = pq.read_table(tmp_path / "out" / "data" / "000001.parquet")
    assert view.schema.field("support_ids").type.value_type.list_size == 4
    assert open_store(str(tmp_path / "out")).num_documents == 9


def test_storage_options_must_be_a_json_object(tmp_path):
    result = CliRunner().invoke(main, ["verify", str(tmp_path), "--storage-options", "[1]"])
    assert result.exit_code == 2 and "JSON object" in result.output


def test_prefetch_fetches_before_the_read(monkeypatch):
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


def test_store_with_readahead_pickles_for_workers(tmp_path):
    import pickle

    url = make_store(f"memory://{tmp_path.name}-pickle/store", "topk", {"k": 8})
    store = open_store(url, readahead=2)
    store.prefetch([0, 1])
    copy = pickle.loads(pickle.dumps(store))
    assert [d.doc_id for d in copy] == [d.doc_id for d in store]


def test_card_of_a_mixture_counts_its_teachers_tables(tmp_path):
    from huggingface_hub import DatasetCard

    from logitstore.mixture import mix_stores

    hot = tuple(range(V - 1, -1, -1))
    a = make_store(str(tmp_path / "a"), "topk", {"k": 16, "hot_ids": hot})
    b = make_store(str(tmp_path / "b"), "topk", {"k": 8})
    mix_stores([a, b], str(tmp_path / "mix"), weights=[0.5, 0.5])
    hub.export_store(str(tmp_path / "mix"), str(tmp_path / "out"), license="other")
    text = (tmp_path / "out" / "README.md").read_text()
    assert not re.search(r"\d+(\s*,\s*\d+){15}", text)  # no store's hot_ids printed
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["tiny/Teacher-1M"]  # both teachers, named once
    assert card.data.pretty_name == "Mixed logits of 2 teachers on corpus"
    assert "## Mixture of teachers" in card.text


def test_the_shard_read_at_once_is_fetched_by_the_reader_and_the_next_ahead(tmp_path):
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


@pytest.mark.parametrize(
    "mixture",
    [
        {"stores": 5},
        {"stores": "ab"},
        {"stores": {"a": {"teacher": {"id": "org/x"}}}},
        {"stores": [1, None, "x", [], {"teacher": 5}, {"teacher": [1]}, {}]},
        {"stores": [{"teacher": {"mixture": {"stores": 7}}}], "weights": {"a": [1]}},
    ],
)
def test_a_malformed_mixture_section_still_makes_a_card(tmp_path, mixture):
    """``teacher`` is the store's own JSON, checked by no schema: a ``mixture`` of any shape
    gives a card (its teachers unnamed), never a TypeError or AttributeError."""
    import json

    from huggingface_hub import DatasetCard

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, backend="parquet", shards=1)
    path = tmp_path / "src" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["teacher"] = {"model": "org/teacher", "mixture": mixture}
    path.write_text(json.dumps(manifest))
    hub.export_store(src, str(tmp_path / "out"), license="mit")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert "base_model" not in card.data.to_dict()  # no teacher named by a Hub id
    assert card.data.pretty_name.startswith("Mixed logits of ")
    assert "## Mixture of teachers" in card.text


@pytest.mark.parametrize(
    "front",
    [
        b"license: " + b"[" * 5000 + b"]" * 5000,  # nested past Python's recursion limit
        b"license: [mit",  # not YAML
        b"license: \xff",  # not UTF-8
        b"license: [mit, apache-2.0]",  # not one identifier
        b"license: '../x y'",
    ],
)
def test_pushing_an_export_whose_card_is_malformed_is_a_clear_error(tmp_path, monkeypatch, front):
    """An export folder may be a stranger's (downloaded to be re-published): its card is
    refused with a ConfigError, never a RecursionError, YAML or Unicode error."""
    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, shards=1)
    hub.export_store(src, str(tmp_path / "export"))
    card = tmp_path / "export" / "README.md"
    card.write_bytes(b"---\n" + front + b"\n---\n" + card.read_bytes().split(b"\n---\n", 1)[1])
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    result = CliRunner().invoke(main, ["push", str(tmp_path / "export"), "org/name"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "README.md" in result.output and "Traceback" not in result.output
    assert FakeApi.calls == []


@pytest.mark.parametrize("link", ["file", "folder", "fifo"])
def test_pushing_an_export_with_a_link_out_of_it_uploads_nothing(tmp_path, monkeypatch, link):
    """An export folder is uploaded as it is, and the upload reads each file through its
    links: one leading outside the folder (to a key, a home folder) is refused before anything
    is sent, as is a FIFO (which would block the upload)."""
    import os

    import huggingface_hub

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, shards=1)
    export = tmp_path / "export"
    hub.export_store(src, str(export), license="mit")
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET KEY")
    if link == "file":
        (export / "data" / "extra.parquet").symlink_to(secret)
    elif link == "folder":
        (export / "data" / "more").symlink_to(secret.parent, target_is_directory=True)
    else:
        os.mkfifo(export / "data" / "extra.parquet")
    FakeApi.calls, FakeApi.snapshot = [], tmp_path / "uploaded"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    result = CliRunner().invoke(main, ["push", str(export), "org/name"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and "SECRET" not in result.output
    assert "data/" in result.output and len(result.output.strip().splitlines()) == 1
    assert FakeApi.calls == [] and not FakeApi.snapshot.exists()


def test_document_ids_of_any_form_give_a_view(tmp_path):
    """A store's document ids are its own strings: a window part of Unicode digits or beyond
    int32 is no window (the id is kept whole as ``source_row``), never a ValueError."""
    codec = get_codec("topk", k=8)
    w = StoreWriter(
        str(tmp_path / "src"), codec=codec, backend="parquet", metadata=METADATA, vocab_size=V
    )
    ids = [
        "r/w\u00b2/h",
        "r/w\u0663/h",
        "r/w99999999999/h",
        "r/w" + "9" * 5000 + "/h",
        "r/w012/h",
        "r/w12/h",
    ]
    g = torch.Generator().manual_seed(0)
    docs = []
    for doc_id in ids:
        tokens = torch.randint(0, V, (4,), generator=g)
        lp = torch.log_softmax(torch.randn(3, V, generator=g), dim=-1)
        enc = codec.encode(lp, tokens[1:], temperatures=TEMPS)
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(doc_id, tokens.numpy(), np.ones(3, bool), fields))
    w.write_shard(0, docs)
    w.finalize(1)
    hub.export_store(str(tmp_path / "src"), str(tmp_path / "out"))
    view = pq.read_table(tmp_path / "out" / "data" / "000000.parquet")
    assert view["source_row"].to_pylist() == [*ids[:4], "r", "r"]
    assert view["window"].to_pylist() == [0, 0, 0, 0, 12, 12]
