"""Untrusted stores, code: reading one never unpickles and never runs code from the store.

Pickles in Zarr object arrays and in Parquet extension-type metadata, string fields where
numbers belong, codec and backend names that look like importable objects; and
``trust_remote_code``, which is never turned on unless the user asks. The hostile stores are
consistent (resealed into the manifest, as an attacker writes both), so a refusal can only come
from the safety checks. The store builder is in ``../_hostile.py``, ``kit`` in ``../conftest.py``.
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

from logitstore import open_store
from logitstore.dataset import StoreDataset
from logitstore.errors import CorruptShardError, UnknownNameError
from tests.hardening._hostile import build, manifest, rewrite


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
