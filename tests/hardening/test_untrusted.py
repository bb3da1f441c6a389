"""Untrusted stores: reading one never unpickles, never runs code, never leaves its root.

The hostile stores here are consistent: their manifests carry the right sizes and checksums
for the crafted files (an attacker writes both), and a file a path escapes to holds a valid
shard, so a refusal can only come from the safety checks, not from a checksum or a missing
file. ``trust_remote_code`` is never turned on unless the user asks.
"""

from __future__ import annotations

import json
import os
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
    ManifestError,
    UnknownNameError,
    UnsafePathError,
)

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


@pytest.mark.parametrize("form", ["long-name", "long-path", "long-escape", "long-file"])
def test_names_too_long_for_any_filesystem_are_refused_in_a_short_line(store, form, kit):
    """A path no filesystem or bucket holds (a name past 255 bytes, a path past 1024) is
    refused when the store is opened, and the message quotes it cut short: every message
    naming the shard used to carry the whole name (a 100,000-character line)."""
    data = manifest(store)
    entry = data["shards"][0]
    new = {
        "long-name": "shards/" + "a" * 100_000,
        "long-path": "shards/" + "/".join(["d" * 200] * 6) + "/000000",
        "long-escape": "../" + "é" * 50_000,
        "long-file": entry["path"],
    }[form]
    old = entry["path"]
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    if form == "long-file":
        entry["files"][0][0] = f"{new}/{'x' * 300}"
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="bytes long") as info:
        open_store(str(store))
    assert len(str(info.value)) < 400, len(str(info.value))
    result = kit.invoke("verify", store, "--no-progress")
    assert result.exit_code == 2, result.output
    assert len(result.output) < 400 and "bytes long" in result.output, result.output[:500]


@pytest.mark.parametrize("device", ["CON", "nul.parquet", "COM1", "lpt9.zarr", "AUX"])
def test_windows_device_names_in_manifest_paths_are_refused(store, device):
    """On Windows a file named CON (with any extension, in any folder) is the console: a
    read of it waits for typing; NUL, COM1, LPT9 are devices too. Such a name is refused when
    the store is opened, on every platform (a writer never makes one)."""
    data = manifest(store)
    entry = data["shards"][0]
    old, new = entry["path"], f"shards/{device}"
    entry["path"] = new
    entry["files"] = [[new + n[len(old) :], size] for n, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="Windows device"):
        open_store(str(store))


def test_a_file_entry_outside_its_shard_is_refused(store):
    data = manifest(store)
    data["shards"][0]["files"][0][0] = data["shards"][1]["files"][0][0]
    rewrite(store, data)
    with pytest.raises(LogitstoreError, match="outside the shard") as info:
        open_store(str(store))
    assert r"shards[0].files[0]" in str(info.value)  # the field, to find it by


def test_a_shard_path_given_twice_is_refused_naming_both_entries(store):
    data = manifest(store)
    data["shards"][1] = dict(data["shards"][0], index=1)
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[1\]\.path: .* of shards\[0\] too"):
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


def hub_cache_download(store: Path, cache: Path) -> Path:
    """``store`` laid out as ``huggingface_hub`` downloads a repository into its cache: each
    file a blob named by its hash, and the revision's folder of links to the blobs."""
    import hashlib

    repo = cache / "datasets--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(store)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_store_downloaded_into_the_hub_cache_reads_through_its_links(store, tmp_path, kit):
    snapshot = hub_cache_download(store, tmp_path / "hub")
    opened = open_store(str(snapshot))
    assert opened.verify() == []
    assert [d.doc_id for d in opened] == [d.doc_id for d in open_store(str(store))]
    result = kit.invoke("verify", snapshot, "--no-progress")
    assert result.exit_code == 0, result.output

    # Only links into that repository's own blobs are the store's: one to another file, or
    # through a blobs folder that is itself a link, still is refused.
    shard = snapshot / manifest(store)["shards"][0]["files"][0][0]
    target = shard.resolve()
    shard.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(target, elsewhere / target.name)
    shard.symlink_to(elsewhere / target.name)
    with pytest.raises(UnsafePathError, match="outside the store's root"):
        open_store(str(snapshot)).read_shard(0)
    shard.unlink()
    shard.symlink_to(target)
    blobs = snapshot.parent.parent / "blobs"
    shutil.move(blobs, elsewhere / "blobs")
    blobs.symlink_to(elsewhere / "blobs", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the store's root"):
        open_store(str(snapshot))


LONG = "x" * 100_000
LONG_EDITS = {
    "codec-name": lambda m: m["codec"].update(name=LONG),
    "codec-version": lambda m: m["codec"].update(version=LONG),
    "backend": lambda m: m.update(backend=LONG),
    "format-version": lambda m: m.update(format_version=LONG),
    "parameters": lambda m: m["codec"]["configuration"].update(dict.fromkeys(
        (f"p{i}" * 20 for i in range(2_000)), 1)),
    "values": lambda m: m["codec"]["configuration"].update(values=LONG),
    "k": lambda m: m["codec"]["configuration"].update(k=list(range(20_000))),
}  # fmt: skip


@pytest.mark.parametrize("edit", sorted(LONG_EDITS))
def test_long_manifest_values_are_quoted_cut_short(store, edit, kit):
    """A refusal quotes the manifest's value cut short: a codec name, backend, version or
    parameter of 100,000 characters was quoted whole, in a line as long."""
    data = manifest(store)
    LONG_EDITS[edit](data)
    rewrite(store, data)
    with pytest.raises(LogitstoreError) as info:
        open_store(str(store))
    assert len(str(info.value)) < 300, str(info.value)[:300]
    result = kit.invoke("inspect", store)
    assert result.exit_code == 2 and len(result.output) < 300, result.output[:300]


@pytest.mark.parametrize(
    ("owner", "key", "first"),
    [("", "shards", []), ("codec", "name", "dense"), ("shards[0]", "sha256", "0" * 64)],
)
def test_a_key_given_twice_in_the_manifest_is_refused(store, owner, key, first, kit):
    """JSON leaves a repeated key's meaning open: Python takes the last value, another checker
    may take the first (a store one tool verifies and another reads otherwise). A manifest
    that repeats a key is refused, naming the key."""
    data = manifest(store)
    obj = data if not owner else data["codec"] if owner == "codec" else data["shards"][0]
    twice = "{" + f"{json.dumps(key)}: {json.dumps(first)}, " + json.dumps(obj)[1:]
    if not owner:
        raw = twice
    else:
        if owner == "codec":
            data["codec"] = "@@"
        else:
            data["shards"][0] = "@@"
        raw = json.dumps(data).replace('"@@"', twice)
    (store / "manifest.json").write_text(raw)
    with pytest.raises(ManifestError, match=f"key '{key}' appears twice"):
        open_store(str(store))
    result = kit.invoke("inspect", store)
    assert result.exit_code == 2 and "appears twice" in result.output, result.output


def test_an_error_in_a_dataloader_worker_keeps_its_one_line_message(store):
    """A damaged shard read in a DataLoader worker process: PyTorch rebuilds the error in the
    main process from its whole traceback ("Caught CorruptShardError in DataLoader worker
    process 0. Original Traceback ..."), which the CLI printed as one line of traceback. It
    is the error's own message again, with where it was raised."""
    from torch.utils.data import DataLoader

    entry = manifest(store)["shards"][0]
    path = store / max(entry["files"], key=lambda f: f[1])[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dataset = StoreDataset(str(store), tokens_per_batch=64, shuffle=False)
    with pytest.raises(CorruptShardError) as info:
        list(DataLoader(dataset, batch_size=None, num_workers=1))
    message = str(info.value)
    assert message.startswith(f"shard {entry['path']}: checksum mismatch"), message
    assert message.endswith("(in DataLoader worker process 0)"), message
    assert "Traceback" not in message and "\n" not in message, message


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


def test_a_zarr_object_array_with_a_pickle_filter_is_refused(tmp_path, no_unpickling, kit):
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
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="input_ids") as info:
        open_store(str(root)).read_shard(0)
    assert manifest(root)["shards"][0]["path"] in str(info.value)
    assert not Path(payload.marker).exists() and no_unpickling == []


def test_a_string_field_instead_of_numbers_is_refused(tmp_path, no_unpickling, kit):
    import zarr

    root = build(tmp_path / "store", "zarr")
    shard = root / manifest(root)["shards"][0]["path"]
    shutil.rmtree(shard / "loss_mask")
    arr = zarr.create_array(str(shard / "loss_mask"), shape=(19,), dtype=str, chunks=(19,))
    arr[...] = np.array(["x"] * 19)
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="shards/000000.zarr"):
        open_store(str(root)).read_shard(0)
    assert no_unpickling == []


def test_a_parquet_python_extension_type_is_never_unpickled(tmp_path, no_unpickling, kit):
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
    kit.reseal(root, 0)
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


# -- values that wrap around when widened or subtracted --------------------------------------


def _replace_input_ids(root: Path, ids: np.ndarray) -> None:
    """Shard 0's ``input_ids`` replaced by ``ids`` (any unsigned dtype)."""
    import pyarrow as pa
    import zarr

    path = root / manifest(root)["shards"][0]["path"]
    if path.is_file():
        table = pq.read_table(path)
        old = table["input_ids"].combine_chunks()
        item = pa.field("item", pa.from_numpy_dtype(ids.dtype), nullable=False)
        column = pa.ListArray.from_arrays(old.offsets, pa.array(ids), type=pa.list_(item))
        index = table.schema.get_field_index("input_ids")
        field = pa.field("input_ids", column.type, nullable=False)
        pq.write_table(table.set_column(index, field, column), path, compression="zstd")
    else:
        shutil.rmtree(path / "input_ids")
        arr = zarr.create_array(str(path / "input_ids"), shape=ids.shape, dtype=ids.dtype,
                                chunks=ids.shape, fill_value=0)  # fmt: skip
        arr[...] = ids


def test_uint64_token_ids_that_wrap_negative_are_refused(store, kit):
    # Any unsigned id type reads; a uint64 id of 2^64 - 1 became -1 as int64, below the
    # vocabulary check, and reached training (an embedding lookup of -1).
    ids = open_store(str(store)).read_shard_arrays(0).input_ids.astype(np.uint64)
    ids[3] = 2**64 - 1
    _replace_input_ids(store, ids)
    kit.reseal(store, 0)
    opened = open_store(str(store))
    with pytest.raises(CorruptShardError, match="token ids reach beyond the vocabulary"):
        opened.read_shard(0)
    assert len(opened.verify()) == 1 and "shards/000000" in opened.verify()[0]
    with pytest.raises(CorruptShardError, match="token ids"):
        list(StoreDataset(str(store), tokens_per_batch=64, shuffle=False))


def test_offsets_whose_differences_wrap_around_are_refused(tmp_path, kit):
    from logitstore.storage import BACKENDS
    from logitstore.storage.base import ShardArrays

    root = build(tmp_path / "store", "zarr")
    opened = open_store(str(root))
    arrays = opened.read_shard_arrays(0)
    n, docs = arrays.num_tokens, 4
    # every int64 difference is >= 1 (2^62 each, wrapped), yet the offsets are not increasing
    offsets = np.array([0, 2**62, -(2**63), -(2**62), n], dtype=np.int64)
    assert np.all(np.diff(offsets) >= 1)
    hostile = ShardArrays(
        doc_ids=["a", "b", "c", "d"], offsets=offsets, input_ids=arrays.input_ids,
        loss_mask=arrays.loss_mask[: n - docs],
        fields={k: v[: n - docs] for k, v in arrays.fields.items()},
    )  # fmt: skip
    path = manifest(root)["shards"][0]["path"]
    files = BACKENDS["zarr"].encode(path, hostile, opened.specs, vocab_size=VOCAB,
                                    compression_level=3)  # fmt: skip
    shutil.rmtree(root / path)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    kit.reseal(root, 0, documents=docs, tokens=n, positions=n - docs)
    with pytest.raises(CorruptShardError, match="offsets must be increasing"):
        open_store(str(root)).read_shard(0)
    assert any("offsets must be increasing" in p for p in open_store(str(root)).verify())
    # (documents of 2^62 tokens and of none, whose positions did not match their tokens)
    with pytest.raises(CorruptShardError, match="offsets"):
        list(StoreDataset(str(root), tokens_per_batch=64, shuffle=False))


# -- JSON that parses to far more than its bytes ---------------------------------------------


@pytest.mark.parametrize("unit", ["{},", "[],", '"ab",', "0.5,"])
def test_json_of_many_tiny_values_is_refused_before_parsing(store, unit, kit):
    # 2 MB of "{}," parse to 48 MB of dicts; the 64 MiB a JSON file may hold, to 1.5 GiB.
    # Refused from a count on the bytes: what a file parses to stays within a small multiple.
    text = json.dumps(manifest(store))
    extra = "[" + unit * (2 * 2**20 // len(unit)) + "0]"
    (store / "manifest.json").write_text(text[:-1] + f', "extra": {extra}}}')
    with pytest.raises(ManifestError, match="objects and lists .* parsed"):
        open_store(str(store))

    if (store / "shards" / "000000.zarr").exists():  # a shard's zarr.json alike
        rewrite(store, json.loads(text))
        group = store / "shards" / "000000.zarr" / "zarr.json"
        group.write_text(group.read_text().rstrip()[:-1] + f', "extra": {extra}}}')
        kit.reseal(store, 0)
        opened = open_store(str(store))
        with pytest.raises(CorruptShardError, match="zarr.json holds .* parsed"):
            opened.read_shard(0)


def test_json_as_the_format_writes_it_is_read_at_any_size(store):
    # A large manifest of the kind a store has (many [name, size] pairs, long id lists),
    # compact or indented, stays within the bound.
    data = manifest(store)
    data["extra"] = {
        "files": [[f"shards/{i:06d}.zarr/values/c/0/0", 123456] for i in range(40_000)],
        "ids": list(range(100_000, 300_000)),
    }
    for indent in (None, 2):
        (store / "manifest.json").write_text(json.dumps(data, indent=indent))
        assert (store / "manifest.json").stat().st_size > 2**21
        assert len(open_store(str(store))) == 4


# -- paths fsspec would read as patterns -----------------------------------------------------


@pytest.mark.parametrize("glob", ["*", "?", "[0]"])
def test_glob_characters_in_manifest_paths_are_refused(store, glob):
    # fsspec's cat expands a pattern: on a remote store, a shard file named "shards/**" would
    # list and download every file of the store, on every read of that shard.
    data = manifest(store)
    entry = data["shards"][0]
    old = entry["path"]
    entry["path"] = old.replace("000000", f"00000{glob}")
    entry["files"] = [[entry["path"] + name[len(old) :], size] for name, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="glob character"):
        open_store(str(store))


def test_a_remote_store_never_globs(tmp_path):
    import fsspec

    root = build(tmp_path / "store", "parquet")
    fs = fsspec.filesystem("memory")
    fs.put(str(root), "/globbed", recursive=True)
    try:
        data = manifest(root)
        entry = data["shards"][0]
        entry["files"] = [["shards/**", entry["files"][0][1]]]
        entry["path"] = "shards"
        fs.pipe("/globbed/manifest.json", json.dumps(data).encode())
        with pytest.raises(UnsafePathError, match="glob character"):
            open_store("memory:///globbed")
    finally:
        fs.rm("/globbed", recursive=True)


# -- a resumed store's settings and records --------------------------------------------------


def _resume(root: Path, backend: str) -> StoreWriter:
    return StoreWriter(str(root), codec=get_codec("topk", k=8), backend=backend, metadata=META,
                       vocab_size=VOCAB, mode="resume")  # fmt: skip


@pytest.mark.parametrize(
    ("form", "error", "words"),
    [
        ("deep-settings", ManifestError, "settings.json nests"),
        ("settings-linked-out", UnsafePathError, "outside the store's root"),
        ("deep-record", ManifestError, "records/000000.json nests"),
        ("record-without-a-field", ManifestError, "records/000000.json is missing the field"),
        ("record-of-the-wrong-type", ManifestError, "records/000001.json field files"),
        ("record-path-out", UnsafePathError, "records/000000.json field files[0]"),
    ],
)
def test_malformed_settings_and_records_refuse_a_resume_cleanly(
    store, tmp_path, form, error, words
):
    # A store's settings.json and records/ are read back when a writer resumes it (or
    # finalizes it): they were parsed unbounded, so a deep file raised RecursionError and a
    # record missing a field a KeyError or TypeError.
    backend = "zarr" if (store / "shards" / "000000.zarr").exists() else "parquet"
    records = store / "records"
    deep = "[" * 100_000 + "]" * 100_000
    if form == "deep-settings":
        (store / "settings.json").write_text('{"format_version": 2, "x": ' + deep + "}")
    elif form == "settings-linked-out":
        outside = tmp_path / "elsewhere.json"
        shutil.move(store / "settings.json", outside)
        (store / "settings.json").symlink_to(outside)
    elif form == "deep-record":
        (records / "000000.json").write_text(deep)
    else:
        name = "000001.json" if form == "record-of-the-wrong-type" else "000000.json"
        record = json.loads((records / name).read_text())
        if form == "record-without-a-field":
            del record["num_temperatures"]
        elif form == "record-of-the-wrong-type":
            record["files"] = 5
        else:
            record["files"][0][0] = "../../outside"
        (records / name).write_text(json.dumps(record))
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        _resume(store, backend).finalize(2)


# -- messages a stranger's file cannot stretch -----------------------------------------------


@pytest.mark.parametrize("form", ["many-columns", "wrong-type"])
def test_a_parquet_schema_mismatch_is_told_in_one_short_line(tmp_path, form, kit):
    import pyarrow as pa

    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    if form == "many-columns":  # the whole schema was printed: thousands of lines
        for i in range(2000):
            table = table.append_column(f"extra{i}", pa.array([0] * table.num_rows, pa.int8()))
    else:
        index = table.schema.get_field_index("input_ids")
        column = table["input_ids"].cast(pa.large_list(pa.field("item", pa.uint8(), False)))
        table = table.set_column(index, pa.field("input_ids", column.type, False), column)
    pq.write_table(table, path, compression="zstd")
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError) as info:
        open_store(str(root)).read_shard(0)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message[:2000]
    assert "shards/000000.parquet: schema" in message
    assert ("2009 columns, expected 9" if form == "many-columns" else "'input_ids'") in message


@pytest.mark.parametrize("column", ["input_ids", "doc_id", "values"])
def test_a_parquet_column_named_twice_is_refused(tmp_path, column, kit):
    # pyarrow's lookup by name raises a KeyError when a file names a column twice
    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    table = table.append_column(table.schema.field(column), table[column])
    pq.write_table(table, path, compression="zstd")
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="shards/000000.parquet: schema"):
        open_store(str(root)).read_shard(0)


@pytest.mark.parametrize("control", ["\n", "\r", "\x1b[2J", "\x9b"])
def test_control_characters_in_manifest_paths_are_refused(store, control):
    # A path is named in messages as it is; a newline or an escape sequence in one reached
    # the terminal (a forged second "error:" line, a cleared screen).
    data = manifest(store)
    entry = data["shards"][0]
    old = entry["path"]
    entry["path"] = old + control
    entry["files"] = [[entry["path"] + name[len(old) :], size] for name, size in entry["files"]]
    rewrite(store, data)
    with pytest.raises(UnsafePathError, match="control character") as info:
        open_store(str(store))
    assert control not in str(info.value)


ESCAPE = "\x1b[2J\x1b[31m"  # clear the screen, then red


@pytest.mark.parametrize("form", ["zarr-error", "manifest-key", "link-target", "parquet-type"])
def test_a_stores_escape_sequences_never_reach_a_message(tmp_path, form, kit):
    # Messages quote what a library said about a file, a JSON key or a link's target: each
    # of those is the store's text, now shown escaped.
    import pyarrow as pa

    backend = "parquet" if form == "parquet-type" else "zarr"
    root = build(tmp_path / "store", backend)
    shard = root / manifest(root)["shards"][0]["path"]
    if form == "zarr-error":  # zarr-python's message quotes the separator it refuses
        meta = json.loads((shard / "values" / "zarr.json").read_text())
        meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": ESCAPE}}
        (shard / "values" / "zarr.json").write_text(json.dumps(meta))
        kit.reseal(root, 0)
    elif form == "manifest-key":
        text = (root / "manifest.json").read_text()
        key = json.dumps(ESCAPE)[1:-1]  # (a JSON string holds it escaped, parsed it is raw)
        (root / "manifest.json").write_text(text[:-2] + f', "{key}": NaN}}')
    elif form == "link-target":
        outside = tmp_path / f"out{ESCAPE}"
        outside.mkdir()
        shutil.move(shard, outside / shard.name)
        shard.symlink_to(outside / shard.name, target_is_directory=True)
    else:  # a struct type's field names are printed with the type
        table = pq.read_table(shard)
        index = table.schema.get_field_index("top1")
        column = pa.array([{ESCAPE: 1}] * table.num_rows)
        pq.write_table(table.set_column(index, "top1", column), shard)
        kit.reseal(root, 0)
    with pytest.raises(LogitstoreError) as info:
        open_store(str(root)).read_shard(0)
    message = str(info.value)
    assert "\x1b" not in message and ("\\x1b" in message or "\\u001b" in message), message


# -- counts a reader sizes tables from -------------------------------------------------------


@pytest.mark.parametrize("documents", [20_000_000, 2**39])
def test_document_counts_beyond_the_shards_bytes_are_refused_at_opening(store, documents):
    # StoreDataset plans an epoch from the manifest's document counts before any shard is
    # read: 2e8 documents declared for a shard of 21 tokens took 3 GB, then a MemoryError
    # (the size bound counted positions and tokens, not documents).
    data = manifest(store)
    data["shards"][0]["documents"] = documents
    data["statistics"]["documents"] = sum(s["documents"] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[0\].positions: .* documents \("):
        open_store(str(store))
    with pytest.raises(ManifestError, match="times the shard's"):
        next(iter(StoreDataset(str(store), tokens_per_batch=64)))

    data["shards"][0]["documents"] = 3  # (a count off by one is the shard's to refuse)
    data["statistics"]["documents"] = sum(s["documents"] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(CorruptShardError, match="documents, tokens, positions"):
        next(iter(StoreDataset(str(store), tokens_per_batch=64, shuffle=False)))


@pytest.mark.parametrize("shuffle", [True, False])
def test_document_counts_of_declared_file_sizes_are_read_before_a_loader_plans_them(store, shuffle):
    """A manifest may declare a file of 512 GiB for a shard of a few KB, and 2^34 documents in
    it, within the bound of 256 times the declared bytes. The loader sized its plan of the epoch
    from those counts before reading a shard: 128 GiB of document indices. Now a window's
    counts beyond a million are read from its shards first, which refuse them."""
    data = manifest(store)
    entry = data["shards"][0]
    entry["documents"], entry["tokens"] = 2**34, 2**34 + entry["positions"]
    entry["files"][0][1] = 2**39
    entry["bytes"] = sum(size for _, size in entry["files"])
    for key in ("documents", "tokens", "bytes"):
        data["statistics"][key] = sum(s[key] for s in data["shards"])
    rewrite(store, data)
    assert len(open_store(str(store))) > 2**34  # opens: the bound holds for what is declared
    dataset = StoreDataset(str(store), tokens_per_batch=64, shuffle=shuffle, shuffle_window=2)
    with pytest.raises(CorruptShardError, match=entry["path"]):
        next(iter(dataset))


def test_document_offsets_count_toward_a_shards_declared_size(store):
    # Consistent counts, with as many one-token documents as the shard's bytes allow tokens:
    # each needs an 8-byte offset too.
    data = manifest(store)
    entry = data["shards"][0]
    on_disk = sum(size for _, size in entry["files"])
    entry["documents"] = 256 * on_disk // 2
    entry["tokens"] = entry["documents"] + entry["positions"]
    for key in ("documents", "tokens"):
        data["statistics"][key] = sum(s[key] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[0\].positions: .* documents \("):
        open_store(str(store))


# -- strings that are not Unicode ------------------------------------------------------------


def test_a_lone_surrogate_in_a_document_id_is_refused(tmp_path, kit):
    # JSON's "\ud800" parses to a str no UTF-8 writer takes: the store read and verified,
    # then convert and export failed with a UnicodeEncodeError writing the id to Parquet.
    from logitstore.storage.convert import convert_store

    root = build(tmp_path / "store", "zarr")
    group = root / "shards" / "000000.zarr" / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["doc_ids"] = ["\ud800", "0/1"]
    group.write_text(json.dumps(meta))  # (written escaped, as any JSON writer would)
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="doc_ids is not valid Unicode"):
        open_store(str(root)).read_shard(0)
    with pytest.raises(CorruptShardError, match="doc_ids is not valid Unicode"):
        convert_store(str(root), str(tmp_path / "out"), backend="parquet")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_document_ids_are_quoted_cut_short(tmp_path, backend, kit):
    """A document id is the store's string, of any length: verify's repeated-id problems and
    mix's refusals quote it cut to 60 characters (they carried it whole: a line per id of
    100,000 characters)."""
    long = "r" * 100_000
    root = build(tmp_path / "store", backend)
    for j in range(2):  # both shards hold the long id (as their first document)
        group = root / "shards" / f"00000{j}.zarr" / "zarr.json"
        if backend == "zarr":
            meta = json.loads(group.read_text())
            meta["attributes"]["doc_ids"][0] = long
            group.write_text(json.dumps(meta))
        else:
            path = root / "shards" / f"00000{j}.parquet"
            table = pq.read_table(path)
            ids = table.column("doc_id").to_pylist()
            table = table.set_column(0, table.schema.field(0), [[long, *ids[1:]]])
            pq.write_table(table, path, compression="zstd")
    kit.reseal(root)
    problems = open_store(str(root)).verify()
    assert len(problems) == 1 and "is held by shard" in problems[0], problems
    assert len(problems[0]) < 400, len(problems[0])
    other = build(tmp_path / "other", backend)
    result = kit.invoke("mix", root, other, "--out", tmp_path / "mixed", "--no-progress")
    assert result.exit_code == 2, result.output[:500]
    assert "appears twice" in result.output and len(result.output) < 400, result.output[:500]


@pytest.mark.parametrize("where", ["teacher.model", "source.key"])
def test_a_lone_surrogate_in_the_manifest_is_refused(store, tmp_path, where):
    # inspect printed it (UnicodeEncodeError on the terminal) and export wrote it into the
    # dataset card (UnicodeEncodeError); refused when the manifest is parsed instead.
    from logitstore.hub import export_store

    data = manifest(store)
    section, name = where.split(".")
    if name == "key":
        data[section]["\udc00"] = 1
    else:
        data[section][name] = "\ud800teacher"
    rewrite(store, data)
    text = (store / "manifest.json").read_text()
    assert "\\ud800" in text or "\\udc00" in text
    with pytest.raises(ManifestError, match=rf"field {section}\..* lone surrogate"):
        open_store(str(store))
    with pytest.raises(ManifestError, match="lone surrogate"):
        export_store(str(store), str(tmp_path / "export"))


# -- files larger than what they store -------------------------------------------------------


def test_a_sparse_shard_file_is_refused_before_it_is_read(store):
    # A file made by truncate (or a tar's sparse member) takes a few KB on disk whatever size
    # it declares: with the manifest agreeing, a reader read all of it (2^33 bytes: a
    # MemoryError, or gigabytes of zeros). Its size is no measure of the store's bytes.
    data = manifest(store)
    entry = data["shards"][0]
    name = entry["files"][-1][0]
    size = 2**28
    with open(store / name, "r+b") as f:
        f.truncate(size)
    if (store / name).stat().st_blocks * 512 * 16 >= size:
        pytest.skip("this filesystem stores no holes")
    entry["files"][-1][1] = size
    entry["bytes"] = sum(s for _, s in entry["files"])
    data["statistics"]["bytes"] = sum(s["bytes"] for s in data["shards"])
    rewrite(store, data)
    opened = open_store(str(store))
    with pytest.raises(CorruptShardError, match=f"file {name} is a sparse file of {size} bytes"):
        opened.read_shard(0)
    assert len(opened.read_shard(1)) == 2  # the rest of the store still reads


def test_the_hole_check_leaves_the_file_read_from_its_start(tmp_path):
    # The check seeks to the first hole; a file found not sparse (a compressing filesystem's
    # few blocks, no hole) must still be read from byte 0, whole.
    from logitstore.storage._fs import _sparse

    path = tmp_path / "blob"
    path.write_bytes(b"head" + bytes(4096))
    with open(path, "r+b") as f:
        f.truncate(2**26)
        st = os.fstat(f.fileno())
        if st.st_blocks * 512 * 16 >= st.st_size:
            pytest.skip("this filesystem stores no holes")
        assert _sparse(f.fileno(), st)
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 0
        assert f.read(4) == b"head"


# -- keys the format does not define ---------------------------------------------------------


def test_unknown_fidelity_keys_are_carried_past_by_convert(store, tmp_path):
    # A shard's fidelity is an object of finite numbers, any keys (a newer writer may add
    # some); summing them for the converted store's statistics raised a KeyError.
    from logitstore.storage.convert import convert_store

    data = manifest(store)
    data["shards"][0]["fidelity"] = {"count": 4.0, "mass_captured_sum": 2.0, "newer_sum": 1.0}
    data["shards"][1]["fidelity"] = {"count": 4.0, "mass_captured_sum": 4.0, "x_max": 9.0}
    rewrite(store, data)
    other = "parquet" if (store / "shards" / "000000.zarr").exists() else "zarr"
    out = convert_store(str(store), str(tmp_path / "out"), backend=other)
    assert out["statistics"]["fidelity"]["positions"] == 8.0
    assert out["statistics"]["fidelity"]["mass_captured"] == 0.75
    assert out["shards"][0]["fidelity"] == data["shards"][0]["fidelity"]  # copied as found
