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
import re
import shutil
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


def test_a_batch_too_big_for_device_memory_says_which_settings_shrink_it(
    tiny_teacher_dir, text_jsonl, tmp_path, kit, monkeypatch
):
    """Running out of device memory is a one-line refusal naming --batch-size and --max-length;
    the committed shards stay and a --resume with a smaller batch finishes the store."""
    from transformers import LlamaForCausalLM

    real = LlamaForCausalLM.forward

    def forward(self, input_ids=None, **kwargs):  # a device that holds two windows at most
        if input_ids is not None and input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\n...")
        return real(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    out = tmp_path / "store"
    args = ["teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl, "--out", out,
            "--k", "8", "--max-length", "64", "--limit", "4", "--no-progress"]  # fmt: skip
    result = kit.invoke(*args, "--batch-size", "4")
    kit.refused(result, "out of device memory on a batch of 4 windows of up to 64 tokens",
                "CUDA out of memory. Tried to allocate 20.00 GiB.", "--batch-size")  # fmt: skip
    assert not (out / "manifest.json").exists()
    result = kit.invoke(*args, "--batch-size", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()


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


# ---- a teacher that is not there, or not a model ------------------------------------------------

NOT_A_TEACHER = {
    "missing folder": (lambda d: d / "no-such-model", [], ["does not exist", "expected a Hub id"]),
    "missing gguf": (lambda d: d / "model.Q4.gguf", [], ["does not exist", ".gguf file"]),
    "folder of data": (lambda d: _write(d / "data" / "a.jsonl", "{}\n").parent, [],
                       ["is a folder without config.json", "not a model directory"]),
    "data file": (lambda d: _write(d / "a.jsonl", "{}\n"), [], ["is a file, not a model"]),
    "config file": (lambda d: _write(d / "m" / "config.json", "{}"), [],
                    ["is a file, not a model"]),
    "truncated gguf": (lambda d: _write(d / "t.gguf", "GGUF" + "\0" * 60), [],
                       ["cannot load the teacher", "t.gguf"]),
    "not gguf bytes": (lambda d: _write(d / "x.gguf", "certainly not a model"), [],
                       ["cannot load the teacher", "GGUF"]),
    "gguf-file not in folder": (lambda d: _write(d / "g" / "a.gguf", "GGUF").parent,
                                ["--gguf-file", "b.gguf"], ["has no GGUF file 'b.gguf'", "a.gguf"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(NOT_A_TEACHER))
def test_teacher_that_is_missing_or_not_a_model(case, text_jsonl, tmp_path, kit):
    make, extra, words = NOT_A_TEACHER[case]
    teacher = make(tmp_path / "in")
    out = tmp_path / "store"
    kit.refused(kit.teacher_pass(teacher, text_jsonl, out, *extra), *words)
    assert not out.exists()


# ---- chat rows no template renders faithfully ----------------------------------------------------

_USER = {"role": "user", "content": "What does a list hold?"}
_REPLY = {"role": "assistant", "content": "Any objects, in order."}
BAD_CHATS = {
    "empty conversation": ([{"messages": [_USER, _REPLY]}, {"messages": []}],
                           ["'chats.jsonl:2'", "empty conversation"]),
    "message not a mapping": ([{"messages": ["hello", "world"]}],
                              ["'chats.jsonl:1'", "message 0", "is str", "'role'"]),
    "message without role": ([{"messages": [{"content": "hi"}, _REPLY]}],
                             ["'chats.jsonl:1'", "message 0", "has no role"]),
    "message without content": ([{"messages": [{"role": "user"}, _REPLY]}],
                                ["'chats.jsonl:1'", "message 0", "(user) has no content"]),
    "no assistant anywhere": ([{"messages": [_USER]}, {"messages": [_USER, _USER]}],
                              ["no conversation", "assistant turn", "loss mask is empty"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CHATS))
def test_chat_rows_the_template_cannot_render_faithfully(case, tiny_teacher_dir, tmp_path, kit):
    rows, words = BAD_CHATS[case]
    data = _write(tmp_path / "chats.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "store"
    result = kit.teacher_pass(tiny_teacher_dir, data, out, "--messages-field", "messages")
    kit.refused(result, *words)
    assert not out.exists()


# ---- settings the teacher or the pass cannot honour ----------------------------------------------


def test_windows_longer_than_the_teachers_positions(tiny_teacher_dir, text_jsonl, tmp_path, kit):
    positions = json.loads((tiny_teacher_dir / "config.json").read_text())
    limit = positions["max_position_embeddings"]
    out = tmp_path / "store"
    # The first documents are longer than the teacher's positions: one window each at 4 * limit.
    result = kit.invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl,
                        "--out", out, "--k", "8", "--limit", "3", "--max-length", 4 * limit,
                        "--no-progress")  # fmt: skip
    kit.refused(result, f"more than the teacher's {limit} positions", f"--max-length {limit}")
    assert not out.exists()


def test_a_tokenizer_with_tokens_the_teacher_lacks(tiny_teacher_dir, tmp_path, kit):
    """Tokens added to the tokenizer but not to the teacher's embedding: refused before the
    forward (which fails with an index error, on CUDA a device-side assert)."""
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<tool_call>"], special_tokens=True)
    tokenizer.save_pretrained(teacher)
    rows = json.loads((teacher / "config.json").read_text())["vocab_size"]
    added = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert added >= rows  # the premise: an id the embedding has no row for
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "a call <tool_call> to a tool"}) + "\n")
    out = tmp_path / "store"
    result = kit.invoke("teacher-pass", "--teacher", teacher, "--data", data, "--out", out,
                        "--k", "8", "--no-progress")  # fmt: skip
    kit.refused(result, f"token id {added} ('<tool_call>')", f"vocabulary of {rows}",
                f"the tokenizer has {len(tokenizer)} tokens")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"fidelity_positions": -1}, ["fidelity_positions must be an integer >= 0", "-1"]),
        ({"batch_size": "eight"}, ["batch_size must be an integer >= 1", "'eight'"]),
        ({"temperatures": ["warm"]}, ["temperatures must be a list of positive numbers"]),
        ("max_length: [32", ["is not valid YAML"]),
        ({"device": "tpu9"}, ["device must be a torch device", "'tpu9'"]),
        pytest.param(
            {"device": "cuda:0"},
            ["device cuda:0 asked for, but CUDA is not available"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here"),
        ),
    ],
)
def test_settings_of_the_wrong_value_or_type(setting, words, tiny_teacher_dir, text_jsonl,
                                             tmp_path, kit):  # fmt: skip
    out = tmp_path / "store"
    base = {"teacher": str(tiny_teacher_dir), "data": str(text_jsonl), "out": str(out)}
    path = tmp_path / "pass.yaml"
    if isinstance(setting, str):  # a file that is not YAML at all
        path.write_text(yaml.safe_dump(base) + setting + "\n")
    else:
        path.write_text(yaml.safe_dump({**base, **setting}))
    kit.refused(kit.invoke("teacher-pass", "--config", path), *words)
    assert not out.exists()


# ---- an interrupted pass -------------------------------------------------------------------------


def test_interrupted_pass_keeps_its_shards_and_says_how_to_resume(
    tiny_teacher_dir, text_jsonl, tmp_path, kit, monkeypatch
):
    import logitstore.pipelines.teacher_pass as pass_module

    calls = {"n": 0}
    forward = pass_module.forward_batch

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the second shard's forward
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(pass_module, "forward_batch", interrupted)
    out = tmp_path / "store"
    args = ["--k", "8", "--max-length", "32", "--limit", "4", "--docs-per-shard", "2",
            "--batch-size", "2", "--no-progress"]  # fmt: skip
    result = kit.invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl,
                        "--out", out, *args)  # fmt: skip
    assert result.exit_code == 130, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "interrupted" in result.output and "--resume" in result.output
    committed = sorted(p.name for p in (out / "records").iterdir())
    assert committed and "000000.json" in committed  # what was done before Ctrl-C is kept
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(pass_module, "forward_batch", forward)
    resumed = kit.invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl,
                         "--out", out, *args, "--resume")  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    written, total = map(int, re.search(r"wrote (\d+) of (\d+) shards", resumed.output).groups())
    assert written >= 1 and written == total - len(committed)  # only the missing ones
    assert kit.invoke("verify", out).exit_code == 0


def _teacher_with_template(source: Path, target: Path, template: str | None) -> Path:
    shutil.copytree(source, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


TEMPLATES = {
    "no chat template": (None, [_USER, _REPLY], ["needs a teacher tokenizer with a chat template"]),
    "prefix not a prefix": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "[{{ messages | length }} turns]",
        [_USER, _REPLY], ["does not render a prefix of the conversation as a prefix"]),
    "template raises": (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        [{"role": "system", "content": "Be brief."}, _USER, _REPLY],
        ["'chats.jsonl:1'", "the chat template cannot render it", "System role not supported"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_chat_template_that_cannot_locate_the_assistant_turns(
    case, tiny_teacher_dir, tmp_path, kit
):
    template, messages, words = TEMPLATES[case]
    teacher = _teacher_with_template(tiny_teacher_dir, tmp_path / "teacher", template)
    data = _write(tmp_path / "chats.jsonl", json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "store"
    kit.refused(kit.teacher_pass(teacher, data, out, "--messages-field", "messages"), *words)
    assert not out.exists()
