"""Untrusted stores: reading one never unpickles, never runs code, never leaves its root.

The hostile stores here are consistent: their manifests carry the right sizes and checksums
for the crafted files (an attacker writes both), and a file a path escapes to holds a valid
shard, so a refusal can only come from the safety checks, not from a checksum or a missing
file. ``trust_remote_code`` is never turned on unless the user asks.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.dataset import StoreDataset
from logitstore.errors import (
    CorruptShardError,
    LogitstoreError,
    UnknownNameError,
    UnsafePathError,
)
from logitstore.storage._fs import tree_checksum

VOCAB = 256
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": []}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
BACKENDS = ["zarr", "parquet"]


def build(root: Path, backend: str) -> Path:
    codec = get_codec("topk", k=8)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=VOCAB)
    for j in range(2):
        docs = []
        for d in range(2):
            ids = torch.randint(0, VOCAB, (10 + d,), generator=g)
            lp = torch.log_softmax(3 * torch.randn(len(ids) - 1, VOCAB, generator=g), -1)
            fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:]).items()}
            docs.append(
                EncodedDocument(f"{j}/{d}", ids.numpy(), np.ones(len(ids) - 1, bool), fields)
            )
        w.write_shard(j, docs)
    w.finalize(2)
    return root


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Path:
    return build(tmp_path / "store", request.param)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def rewrite(root: Path, data: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def reseal(root: Path, j: int) -> None:
    """Recompute shard ``j``'s files, sizes and checksum in the manifest (as an attacker would)."""
    data = manifest(root)
    entry = data["shards"][j]
    base = root / entry["path"]
    found = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    files = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in found]
    entry["files"] = [[n, len(b)] for n, b in sorted(files)]
    entry["bytes"] = sum(len(b) for _, b in files)
    entry["sha256"] = tree_checksum(files)
    data["statistics"]["bytes"] = sum(s["bytes"] for s in data["shards"])
    rewrite(root, data)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything unpickles (or loads a pickled array) while it runs."""
    import _pickle

    calls: list[str] = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while reading a store")

        return fail

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    real_np_load = np.load

    def np_load(*args, **kwargs):
        if kwargs.get("allow_pickle"):
            calls.append("numpy.load(allow_pickle=True)")
            raise AssertionError("numpy.load with pickles while reading a store")
        return real_np_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", np_load)
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    return calls


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dotdot", "absolute", "url", "backslash", "dot"])
def test_manifest_paths_outside_the_root_are_refused(store, tmp_path, form):
    data = manifest(store)
    entry = data["shards"][0]
    name = Path(entry["path"]).name
    outside = tmp_path / "outside"
    outside.mkdir()
    src = store / entry["path"]
    shutil.copytree(src, outside / name) if src.is_dir() else shutil.copy(src, outside / name)
    new = {
        "dotdot": f"../outside/{name}",
        "absolute": str(outside / name),
        "url": f"file://{outside / name}",
        "backslash": f"..\\outside\\{name}",
        "dot": f"./../outside/{name}",
    }[form]
    old = entry["path"]
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="escapes the store root"):
        open_store(str(store))


def test_a_file_entry_outside_its_shard_is_refused(store):
    data = manifest(store)
    data["shards"][0]["files"][0][0] = data["shards"][1]["files"][0][0]
    rewrite(store, data)
    with pytest.raises(LogitstoreError, match="outside the shard"):
        open_store(str(store))


def test_symlinks_out_of_the_root_are_refused(store, tmp_path):
    entry = manifest(store)["shards"][0]
    shard = store / entry["path"]
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shutil.move(shard, outside)  # identical bytes: the checksum would pass
    shard.symlink_to(outside, target_is_directory=outside.is_dir())
    opened = open_store(str(store))
    with pytest.raises(UnsafePathError, match="outside the store's root") as info:
        opened.read_shard(0)
    assert entry["path"] in str(info.value)
    assert len(opened.read_shard(1)) == 2  # the rest of the store still reads
    assert opened.verify() == [str(info.value)]

    # A link that stays inside the root is an ordinary file.
    shard.unlink()
    inside = store / "elsewhere" / shard.name
    inside.parent.mkdir()
    shutil.move(outside, inside)
    shard.symlink_to(inside, target_is_directory=inside.is_dir())
    assert len(open_store(str(store)).read_shard(0)) == 2


def test_a_linked_shards_folder_is_refused(store, tmp_path):
    shutil.move(store / "shards", tmp_path / "shards")
    (store / "shards").symlink_to(tmp_path / "shards", target_is_directory=True)
    with pytest.raises(UnsafePathError):
        open_store(str(store)).read_shard(0)


# -- no code from the store ----------------------------------------------------------------


def test_reading_a_store_never_unpickles(store, no_unpickling):
    opened = open_store(str(store))
    assert len(list(opened.iter_documents())) == 4
    assert opened.verify() == []
    batches = list(StoreDataset(str(store), tokens_per_batch=64, shuffle=False))
    assert sum(len(b["input_ids"]) for b in batches) == 4
    assert no_unpickling == []


class _Payload:
    """Unpickling this creates a marker file: evidence that store bytes ran as code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_zarr_object_array_with_a_pickle_filter_is_refused(tmp_path, no_unpickling):
    root = build(tmp_path / "store", "zarr")
    shard = root / manifest(root)["shards"][0]["path"]
    payload = _Payload()
    payload.marker = str(tmp_path / "ran")
    # Replace input_ids with a Zarr v2 object array whose only chunk is a pickle.
    shutil.rmtree(shard / "input_ids")
    (shard / "input_ids").mkdir()
    (shard / "input_ids" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [21], "chunks": [21], "dtype": "|O", "compressor": None,
        "fill_value": None, "filters": [{"id": "pickle", "protocol": 5}], "order": "C",
    }))  # fmt: skip
    real_dumps = pickle.dumps  # dumps is not patched: only loading must never happen
    (shard / "input_ids" / "0").write_bytes(real_dumps(np.array([payload] * 21, dtype=object)))
    reseal(root, 0)
    with pytest.raises(CorruptShardError, match="input_ids") as info:
        open_store(str(root)).read_shard(0)
    assert manifest(root)["shards"][0]["path"] in str(info.value)
    assert not Path(payload.marker).exists() and no_unpickling == []


def test_a_string_field_instead_of_numbers_is_refused(tmp_path, no_unpickling):
    import zarr

    root = build(tmp_path / "store", "zarr")
    shard = root / manifest(root)["shards"][0]["path"]
    shutil.rmtree(shard / "loss_mask")
    arr = zarr.create_array(str(shard / "loss_mask"), shape=(19,), dtype=str, chunks=(19,))
    arr[...] = np.array(["x"] * 19)
    reseal(root, 0)
    with pytest.raises(CorruptShardError, match="shards/000000.zarr"):
        open_store(str(root)).read_shard(0)
    assert no_unpickling == []


def test_a_parquet_python_extension_type_is_never_unpickled(tmp_path, no_unpickling):
    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    payload = _Payload()
    payload.marker = str(tmp_path / "ran")
    # The field metadata pyarrow's old PyExtensionType used: a pickle it would have loaded.
    field = table.schema.field("input_ids").with_metadata({
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(payload),
    })  # fmt: skip
    table = table.cast(table.schema.set(table.schema.get_field_index("input_ids"), field))
    pq.write_table(table, path, compression="zstd")
    reseal(root, 0)
    opened = open_store(str(root))
    try:
        docs = opened.read_shard(0)  # plain lists with extra metadata: read as numbers, or
        assert len(docs) == 2
    except CorruptShardError as exc:  # refused as a schema mismatch; never executed
        assert manifest(root)["shards"][0]["path"] in str(exc)
    assert not Path(payload.marker).exists() and no_unpickling == []


@pytest.mark.parametrize(("key", "value"), [
    ("codec", {"name": "builtins.eval", "version": 1, "configuration": {}}),
    ("codec", {"name": "pickle", "version": 1, "configuration": {}}),
    ("backend", "os.system"),
])  # fmt: skip
def test_codec_and_backend_names_are_looked_up_never_imported(store, key, value):
    data = manifest(store)
    data[key] = value
    rewrite(store, data)
    with pytest.raises(UnknownNameError) as info:
        open_store(str(store))
    assert "known" in str(info.value)


# -- trust_remote_code ---------------------------------------------------------------------


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record the kwargs of every transformers ``from_pretrained`` call, then call through."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_the_teacher_loads_without_remote_code_unless_asked(
    tiny_teacher_dir, from_pretrained_calls
):
    from logitstore.pipelines._teacher import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    assert {name for name, _ in from_pretrained_calls} >= {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(kw.get("trust_remote_code") is False for _, kw in from_pretrained_calls)
    assert teacher.metadata["trust_remote_code"] is False

    from_pretrained_calls.clear()
    asked = load_teacher(str(tiny_teacher_dir), device="cpu", trust_remote_code=True)
    assert from_pretrained_calls and all(
        kw["trust_remote_code"] is True for _, kw in from_pretrained_calls
    )
    assert asked.metadata["trust_remote_code"] is True


def test_the_cli_passes_trust_remote_code_only_when_given(
    tiny_teacher_dir, text_jsonl, tmp_path, from_pretrained_calls
):
    from click.testing import CliRunner

    from logitstore.cli import main

    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        from_pretrained_calls.clear()
        out = tmp_path / f"s{expected}"
        args = ["teacher-pass", "--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl),
                "--out", str(out), "--k", "4", "--max-length", "16", "--limit", "1",
                "--no-progress", *flag]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        teacher_calls = [kw for name, kw in from_pretrained_calls if name != "AutoConfig"]
        assert teacher_calls and all(kw["trust_remote_code"] is expected for kw in teacher_calls)


def test_the_student_is_never_loaded_with_remote_code(tiny_student_dir, from_pretrained_calls):
    from logitstore.pipelines._student import load_student, load_tokenizer

    load_student(str(tiny_student_dir))
    load_tokenizer(str(tiny_student_dir))
    assert len(from_pretrained_calls) >= 2
    assert all(kw.get("trust_remote_code") in (None, False) for _, kw in from_pretrained_calls)
