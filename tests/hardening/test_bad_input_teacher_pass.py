"""Bad input to the teacher pass, through the ``logitstore`` CLI: unknown names, settings that
cannot work, empty or over-long data, a teacher producing NaN, and an output location that
cannot be written (for training too) or already holds something else. Each is refused with a
message naming the problem, a non-zero exit and no traceback, and whatever existed before (a
store, the file in the way) is byte-for-byte unchanged.

Teachers are the tiny real models of ``tests/conftest.py``; a NaN or "different" teacher is one
of them edited and saved with ``save_pretrained``. The helpers (``kit``) and the store are in
``conftest.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- unknown names -------------------------------------------------------------------------------

PASS_UNKNOWN = [
    (["--codec", "zip"], {}, ["'zip'", "topk"]),
    ([], {"codec": "zip"}, ["unknown codec 'zip'", "dense, sampled, topk"]),
    ([], {"backend": "hdf5"}, ["unknown backend 'hdf5'", "parquet, zarr"]),
    (["--values", "q7"], {}, ["'q7' is not one of", "'q6'"]),
    ([], {"codec": {"name": "topk", "values": "q7"}}, ["values must be one of", "'q7'"]),
    (["--codec", "dense"], {}, ["k applies to codec topk, not to 'dense'"]),  # PASS has --k
    ([], {"batchsize": 4}, ["batchsize", "batch_size"]),
]


@pytest.mark.parametrize(("args", "config", "words"), PASS_UNKNOWN)
def test_teacher_pass_refuses_unknown_names(
    args, config, words, store_copy, tiny_teacher_dir, text_jsonl, tmp_path, kit
):
    before = kit.snapshot(store_copy)
    if config:  # names the command line cannot even spell go through a YAML config
        path = tmp_path / "pass.yaml"
        path.write_text(yaml.safe_dump({"teacher": str(tiny_teacher_dir), "data": str(text_jsonl),
                                        "out": str(store_copy), **config}))  # fmt: skip
        result = kit.invoke("teacher-pass", "--config", path, *kit.PASS, "--resume", *args)
    else:
        result = kit.teacher_pass(tiny_teacher_dir, text_jsonl, store_copy, "--resume", *args)
    kit.refused(result, *words)
    assert kit.snapshot(store_copy) == before


# ---- settings that cannot work -------------------------------------------------------------------


def test_k_larger_than_the_vocabulary(store_copy, tiny_teacher_dir, text_jsonl, tmp_path, kit):
    vocab = kit.teacher_vocab(tiny_teacher_dir)
    before = kit.snapshot(store_copy)
    for out, extra in ((store_copy, ["--resume"]), (tmp_path / "new", [])):
        result = kit.teacher_pass(tiny_teacher_dir, text_jsonl, out, *extra, "--k", vocab + 1)
        kit.refused(result, f"k={vocab + 1}", f"exceeds the vocabulary size {vocab}")
    assert kit.snapshot(store_copy) == before and not (tmp_path / "new").exists()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


EMPTY = {
    "empty file": (lambda d: _write(d / "e.jsonl", ""), ["the data source is empty"]),
    "blank lines": (lambda d: _write(d / "e.jsonl", "\n\n  \n"), ["the data source is empty"]),
    "no usable files": (lambda d: _write(d / "dir" / "notes.md", "# hi\n").parent,
                        ["found none usable"]),
    "one token each": (lambda d: _write(d / "e.jsonl", '{"text": "a"}\n{"text": ""}\n'),
                       ["no document has two or more tokens"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_dataset(case, store_copy, tiny_teacher_dir, tiny_tokenizer, tmp_path, kit):
    make, words = EMPTY[case]
    data = make(tmp_path / "data")
    if case == "one token each":  # independently: no row has a next-token position
        for line in data.read_text().splitlines():
            assert len(tiny_tokenizer(json.loads(line)["text"])["input_ids"]) < 2
    before = kit.snapshot(store_copy)
    for out, extra in ((tmp_path / "new", []), (store_copy, ["--resume"])):
        kit.refused(kit.teacher_pass(tiny_teacher_dir, data, out, *extra), *words)
    assert kit.snapshot(store_copy) == before and not (tmp_path / "new").exists()


def test_document_longer_than_max_length_without_windowing(
    tiny_teacher_dir, tiny_tokenizer, tmp_path, kit
):
    texts = ["Short text.", "A much longer document " * 12]
    data = _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = [len(tiny_tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[0] <= 16 < lengths[1]
    out = tmp_path / "store"
    result = kit.invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", data, "--out", out,
                        "--no-windowing", "--max-length", "16", "--no-progress")  # fmt: skip
    kit.refused(
        result, "'docs.jsonl:2'", f"has {lengths[1]} tokens", "max_length=16", "windowing is off"
    )
    assert not out.exists()


# ---- a teacher that produces NaN ----------------------------------------------------------------


def _poisoned_teacher(source: Path, target: Path, poison: Callable[[Any], None]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        poison(model)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def test_teacher_with_nan_logits_is_refused_before_anything_is_written(
    tiny_teacher_dir, text_jsonl, tmp_path, kit
):
    nan_teacher = _poisoned_teacher(
        tiny_teacher_dir, tmp_path / "nan", lambda m: m.lm_head.weight.fill_(float("nan"))
    )
    out = tmp_path / "store"
    kit.refused(
        kit.teacher_pass(nan_teacher, text_jsonl, out), "NaN or Inf", "expected finite logits"
    )
    assert not out.exists()


def test_teacher_nan_on_one_document_keeps_committed_shards_finite(
    tiny_teacher_dir, tiny_tokenizer, tmp_path, kit
):
    poison_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    teacher = _poisoned_teacher(
        tiny_teacher_dir, tmp_path / "half-nan",
        lambda m: m.model.embed_tokens.weight[poison_id].fill_(float("nan")),
    )  # fmt: skip
    texts = [f"Document number {i} talks about lists, tuples and sets." for i in range(4)]
    texts.append("Fine until <|im_end|> here.")
    data = _write(tmp_path / "data.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids = np.asarray(tiny_tokenizer(texts[-1])["input_ids"], dtype="<i8")
    bad_id = f"data.jsonl:5/w0/{hashlib.sha256(ids.tobytes()).hexdigest()[:16]}"
    out = tmp_path / "store"
    result = kit.invoke("teacher-pass", "--teacher", teacher, "--data", data, "--out", out,
                        "--k", "8", "--max-length", "64", "--docs-per-shard", "2",
                        "--batch-size", "2", "--no-progress")  # fmt: skip
    kit.refused(result, f"'{bad_id}'", "NaN or Inf")
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json", "000001.json"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.zarr", "000001.zarr"]
    assert not (out / "claims").exists() or not any((out / "claims").iterdir())
    for j in (0, 1):  # the committed shards are whole, and hold no NaN
        record = json.loads((out / "records" / f"{j:06d}.json").read_text())
        assert kit.tree_checksum(out, record["files"]) == record["sha256"]
        group = zarr.open_group(str(out / "shards" / f"{j:06d}.zarr"), mode="r")
        for name, array in group.arrays():
            values = array[...]
            if values.dtype.kind == "f":
                assert not np.isnan(values).any(), (j, name)


# ---- where the output goes -----------------------------------------------------------------------


def test_output_location_that_cannot_be_written(
    store, tiny_teacher_dir, tiny_student_dir, text_jsonl, tmp_path, kit
):
    blocker = _write(tmp_path / "a-file", "not a directory\n")
    before = kit.snapshot(blocker)
    kit.refused(kit.teacher_pass(tiny_teacher_dir, text_jsonl, blocker / "store"),
                "cannot open the store", "Not a directory")  # fmt: skip
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir,
                        "--out", blocker / "run", *kit.TRAIN)  # fmt: skip
    kit.refused(result, "cannot write the run directory", "is a file")
    assert kit.snapshot(blocker) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_output_directory_without_write_permission(tiny_teacher_dir, text_jsonl, tmp_path, kit):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        kit.refused(
            kit.teacher_pass(tiny_teacher_dir, text_jsonl, locked / "store"), "Permission denied"
        )
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_already_holding_a_different_store(
    store_copy, tiny_teacher_dir, text_jsonl, tmp_path, kit
):
    other_data = _write(tmp_path / "other.jsonl", json.dumps({"text": "Other text, other store."}))
    other_teacher = _poisoned_teacher(
        tiny_teacher_dir, tmp_path / "other-teacher", lambda m: m.lm_head.weight.mul_(0.5)
    )
    before = kit.snapshot(store_copy)
    cases = [
        ((tiny_teacher_dir, text_jsonl), [], ["is not empty", "--resume"]),
        ((tiny_teacher_dir, text_jsonl), ["--resume", "--max-length", "40"],
         ["different settings", "capture.max_length is 32", "40"]),
        ((tiny_teacher_dir, text_jsonl), ["--resume", "--k", "12"],
         ["different settings", "codec configuration.k is 8", "12"]),
        ((tiny_teacher_dir, text_jsonl), ["--resume", "--backend", "parquet"],
         ["different settings", "backend", "'zarr'", "'parquet'"]),
        ((tiny_teacher_dir, other_data), ["--resume"], ["different settings", "source"]),
        ((other_teacher, text_jsonl), ["--resume"], ["different settings", "teacher"]),
    ]  # fmt: skip
    for (teacher, data), extra, words in cases:
        kit.refused(kit.teacher_pass(teacher, data, store_copy, *extra), *words)
        assert kit.snapshot(store_copy) == before, extra
    converted = kit.invoke("convert", store_copy, "--backend", "zarr", store_copy)
    kit.refused(converted, "is not empty")
    assert kit.snapshot(store_copy) == before
    unrelated = tmp_path / "my-notes"
    _write(unrelated / "todo.txt", "keep me\n")
    notes = kit.snapshot(unrelated)
    kit.refused(
        kit.teacher_pass(tiny_teacher_dir, text_jsonl, unrelated), "is not empty", "todo.txt"
    )
    assert kit.snapshot(unrelated) == notes
