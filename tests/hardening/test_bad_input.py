"""Bad input through the ``logitstore`` CLI: each is refused with a message naming the problem,
a non-zero exit and no traceback, and whatever existed before (a store, a run directory, the
file in the way) is byte-for-byte unchanged.

Teachers and students are the tiny real models of ``tests/conftest.py``; a "different" student
or a NaN teacher is one of them edited and saved with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner, Result

from cli import main
from logitstore import EncodedDocument, StoreWriter
from logitstore.codecs import get_codec
from logitstore.errors import DataError
from logitstore.storage import _fs

PASS = ["--k", "8", "--max-length", "32", "--limit", "3", "--docs-per-shard", "8",
        "--temperatures", "1.0,2.0", "--no-progress"]  # fmt: skip
TRAIN = ["--max-steps", "1", "--tokens-per-step", "64", "--tokens-per-batch", "64",
         "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result: Result, *words: str) -> None:
    """A clean refusal: exit 2 from the CLI's error handler (or click's), no traceback, and a
    message holding every one of ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def snapshot(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every directory under ``root`` (and ``root`` itself)."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def teacher_vocab(teacher_dir: Path) -> int:
    return int(json.loads((teacher_dir / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "store"
    result = invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl,
                    "--out", out, *PASS)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run_dir(store, tiny_student_dir, tmp_path_factory) -> Path:
    """A finished one-step training run: what a bad ``--resume`` must leave alone."""
    out = tmp_path_factory.mktemp("bad-input-run") / "run"
    result = invoke("train", "--store", store, "--student", tiny_student_dir, "--out", out, *TRAIN)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def store_copy(store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


def teacher_pass(teacher: Path, data: Path, out: Path, *extra: Any) -> Result:
    return invoke("teacher-pass", "--teacher", teacher, "--data", data, "--out", out, *PASS, *extra)


# ---- the student does not fit the teacher ------------------------------------------------------


def test_student_vocabulary_differs_from_the_teachers(store, tiny_teacher_dir, tmp_path):
    student = tmp_path / "student.json"
    student.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 400, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    }))  # fmt: skip
    before = snapshot(store)
    result = invoke("train", "--store", store, "--student", student, "--out", tmp_path / "run",
                    *TRAIN)  # fmt: skip
    refused(result, "vocabulary size", str(teacher_vocab(tiny_teacher_dir)), "400")
    assert snapshot(store) == before and not (tmp_path / "run").exists()


def test_student_tokenizer_differs_from_the_teachers(store, tiny_student_dir, tmp_path):
    from transformers import AutoTokenizer

    student = tmp_path / "student"
    shutil.copytree(tiny_student_dir, student)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # same size, two ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    theirs, ours = (AutoTokenizer.from_pretrained(p) for p in (tiny_student_dir, student))
    assert len(theirs) == len(ours)
    assert theirs.convert_tokens_to_ids(a) == ours.convert_tokens_to_ids(b)
    before = snapshot(store)
    result = invoke("train", "--store", store, "--student", student, "--out", tmp_path / "run",
                    *TRAIN)  # fmt: skip
    refused(result, "vocab_sha256", "teacher", "student")
    assert snapshot(store) == before and not (tmp_path / "run").exists()


# ---- unknown names -------------------------------------------------------------------------------

PASS_UNKNOWN = [
    (["--codec", "zip"], {}, ["'zip'", "topk"]),
    ([], {"codec": "zip"}, ["unknown codec 'zip'", "dense, sampled, topk"]),
    ([], {"backend": "hdf5"}, ["unknown backend 'hdf5'", "parquet, zarr"]),
    (["--values", "q7"], {}, ["values must be one of", "'q7'"]),
    (["--codec", "dense", "--bits", "5"], {}, ["bits must be 8 or 4", "5"]),
    ([], {"batchsize": 4}, ["batchsize", "batch_size"]),
]


@pytest.mark.parametrize(("args", "config", "words"), PASS_UNKNOWN)
def test_teacher_pass_refuses_unknown_names(
    args, config, words, store_copy, tiny_teacher_dir, text_jsonl, tmp_path
):
    before = snapshot(store_copy)
    if config:  # names the command line cannot even spell go through a YAML config
        path = tmp_path / "pass.yaml"
        path.write_text(yaml.safe_dump({"teacher": str(tiny_teacher_dir), "data": str(text_jsonl),
                                        "out": str(store_copy), **config}))  # fmt: skip
        result = invoke("teacher-pass", "--config", path, *PASS, "--resume", *args)
    else:
        result = teacher_pass(tiny_teacher_dir, text_jsonl, store_copy, "--resume", *args)
    refused(result, *words)
    assert snapshot(store_copy) == before


TRAIN_UNKNOWN = [
    (["--divergence", "nope"], {}, ["unknown divergence 'nope'", "drkl", "fkl"]),
    (["--divergence", "drkl", "--param", "gama=0.3"], {}, ["gama", "known: gamma, target"]),
    (["--divergence", "fkl", "--param", "beta=0.5"], {}, ["beta", "'fkl'", "known: none"]),
    (["--divergence", "jsd", "--param", "beta=2"], {}, ["jsd beta", "2"]),
    ([], {"learning_rate": 0.1}, ["unknown training settings", "learning_rate"]),
]


@pytest.mark.parametrize(("args", "config", "words"), TRAIN_UNKNOWN)
def test_train_refuses_unknown_names(
    args, config, words, store, run_dir, tiny_student_dir, tmp_path
):
    before = snapshot(store), snapshot(run_dir)
    common = ["--store", store, "--student", tiny_student_dir, "--out", run_dir, "--resume", *TRAIN]
    if config:
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(config))
        result = invoke("train", "--config", path, *common, *args)
    else:
        result = invoke("train", *common, *args)
    refused(result, *words)
    assert (snapshot(store), snapshot(run_dir)) == before


# ---- manifests that cannot be trusted ------------------------------------------------------------


def _edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(manifest: Path) -> None:
        data = json.loads(manifest.read_text())
        change(data)
        manifest.write_text(json.dumps(data))

    return apply


def _text(text: str) -> Callable[[Path], None]:
    return lambda manifest: manifest.write_text(text)


def _shard_path(path: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        old = m["shards"][0]["path"]
        m["shards"][0]["path"] = path
        m["shards"][0]["files"] = [[path + n[len(old) :], s] for n, s in m["shards"][0]["files"]]

    return change


MANIFESTS = {
    "truncated": (_text('{"format_version": 1, "backend"'), ["not valid JSON"]),
    "not an object": (_text("[1, 2, 3]"), ["JSON object", "list"]),
    "NaN": (lambda p: p.write_text(p.read_text().replace('"vocab_size": 384', '"vocab_size": NaN')),
            ["not valid JSON", "NaN"]),
    "no codec": (_edit(lambda m: m.pop("codec")), ["missing the field 'codec'"]),
    "no checksum": (_edit(lambda m: m["shards"][0].pop("sha256")), ["shards[0]", "'sha256'"]),
    "mistyped": (_edit(lambda m: m.update(vocab_size="384")), ["vocab_size"]),
    "future format": (_edit(lambda m: m.update(format_version=2)),
                      ["format version 2", "supports 1"]),
    "future codec": (_edit(lambda m: m["codec"].update(version=9)),
                     ["version 9", "knows version 1"]),
    "unknown codec": (_edit(lambda m: m["codec"].update(name="zip")),
                      ["unknown codec 'zip'", "topk"]),
    "unknown backend": (_edit(lambda m: m.update(backend="hdf5")),
                        ["unknown backend 'hdf5'", "zarr"]),
    "parent": (_edit(_shard_path("../outside.zarr")), ["'../outside.zarr'", "escapes"]),
    "absolute": (_edit(_shard_path("/tmp/outside.zarr")), ["'/tmp/outside.zarr'", "escapes"]),
    "inner parent": (_edit(_shard_path("shards/../../x.zarr")), ["escapes"]),
    "url": (_edit(_shard_path("file:///etc")), ["escapes"]),
    "drive": (_edit(_shard_path("C:/x.zarr")), ["escapes"]),
    "home": (_edit(_shard_path("~/x.zarr")), ["escapes"]),
    "backslash": (_edit(_shard_path("shards\\..\\..\\x.zarr")), ["escapes"]),
    "file escapes": (
        _edit(lambda m: m["shards"][0]["files"][0].__setitem__(
            0, m["shards"][0]["path"] + "/../../../outside")),
        ["escapes"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_untrustworthy_manifests_are_refused_by_every_reader(case, store_copy, tmp_path):
    break_it, words = MANIFESTS[case]
    break_it(store_copy / "manifest.json")
    outside = tmp_path / "outside.zarr"  # what an escaping path would point at, if followed
    outside.mkdir()
    before = snapshot(tmp_path)
    commands = {
        "verify": ["verify", store_copy],
        "inspect": ["inspect", store_copy],
        "train": ["train", "--store", store_copy, "--student", "unused", "--out", tmp_path / "r"],
        "convert": ["convert", store_copy, "--backend", "parquet", tmp_path / "converted"],
        "export": ["export", store_copy, tmp_path / "exported"],
    }
    for name, args in commands.items():
        result = invoke(*args)
        refused(result, "error:", *words)
        assert snapshot(tmp_path) == before, name  # nothing written, nothing changed


def test_settings_from_the_future_or_unreadable_refuse_a_resume(
    store_copy, tiny_teacher_dir, text_jsonl
):
    settings = store_copy / "settings.json"
    data = json.loads(settings.read_text())
    for text, words in (
        (json.dumps({**data, "format_version": 3}), ["settings.json", "format version 3"]),
        ('{"format_version": 1', ["settings.json is not valid JSON"]),
    ):
        settings.write_text(text)
        before = snapshot(store_copy)
        refused(teacher_pass(tiny_teacher_dir, text_jsonl, store_copy, "--resume"), *words)
        assert snapshot(store_copy) == before


# ---- settings that cannot work ---------------------------------------------------------------------


def test_k_larger_than_the_vocabulary(store_copy, tiny_teacher_dir, text_jsonl, tmp_path):
    vocab = teacher_vocab(tiny_teacher_dir)
    before = snapshot(store_copy)
    for out, extra in ((store_copy, ["--resume"]), (tmp_path / "new", [])):
        result = teacher_pass(tiny_teacher_dir, text_jsonl, out, *extra, "--k", vocab + 1)
        refused(result, f"k={vocab + 1}", f"exceeds the vocabulary size {vocab}")
    assert snapshot(store_copy) == before and not (tmp_path / "new").exists()


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
def test_empty_dataset(case, store_copy, tiny_teacher_dir, tiny_tokenizer, tmp_path):
    make, words = EMPTY[case]
    data = make(tmp_path / "data")
    if case == "one token each":  # independently: no row has a next-token position
        for line in data.read_text().splitlines():
            assert len(tiny_tokenizer(json.loads(line)["text"])["input_ids"]) < 2
    before = snapshot(store_copy)
    for out, extra in ((tmp_path / "new", []), (store_copy, ["--resume"])):
        refused(teacher_pass(tiny_teacher_dir, data, out, *extra), *words)
    assert snapshot(store_copy) == before and not (tmp_path / "new").exists()


def test_document_longer_than_max_length_without_windowing(
    tiny_teacher_dir, tiny_tokenizer, tmp_path
):
    texts = ["Short text.", "A much longer document " * 12]
    data = _write(tmp_path / "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = [len(tiny_tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[0] <= 16 < lengths[1]
    out = tmp_path / "store"
    result = invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", data, "--out", out,
                    "--no-windowing", "--max-length", "16", "--no-progress")  # fmt: skip
    refused(
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
    tiny_teacher_dir, text_jsonl, tmp_path
):
    nan_teacher = _poisoned_teacher(
        tiny_teacher_dir, tmp_path / "nan", lambda m: m.lm_head.weight.fill_(float("nan"))
    )
    out = tmp_path / "store"
    refused(teacher_pass(nan_teacher, text_jsonl, out), "NaN or Inf", "expected finite logits")
    assert not out.exists()


def _tree_checksum(root: Path, files: list[list[Any]]) -> str:
    """FORMAT.md's shard checksum, written out independently of the library."""
    h = hashlib.sha256()
    for name, _ in sorted(files):
        data = (root / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def test_teacher_nan_on_one_document_keeps_committed_shards_finite(
    tiny_teacher_dir, tiny_tokenizer, tmp_path
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
    result = invoke("teacher-pass", "--teacher", teacher, "--data", data, "--out", out, "--k", "8",
                    "--max-length", "64", "--docs-per-shard", "2", "--batch-size", "2",
                    "--no-progress")  # fmt: skip
    refused(result, f"'{bad_id}'", "NaN or Inf")
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json", "000001.json"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.zarr", "000001.zarr"]
    assert not (out / "claims").exists() or not any((out / "claims").iterdir())
    for j in (0, 1):  # the committed shards are whole, and hold no NaN
        record = json.loads((out / "records" / f"{j:06d}.json").read_text())
        assert _tree_checksum(out, record["files"]) == record["sha256"]
        group = zarr.open_group(str(out / "shards" / f"{j:06d}.zarr"), mode="r")
        for name, array in group.arrays():
            values = array[...]
            if values.dtype.kind == "f":
                assert not np.isnan(values).any(), (j, name)


# ---- where the output goes ------------------------------------------------------------------------


def test_output_location_that_cannot_be_written(
    store, tiny_teacher_dir, tiny_student_dir, text_jsonl, tmp_path
):
    blocker = _write(tmp_path / "a-file", "not a directory\n")
    before = snapshot(blocker)
    refused(teacher_pass(tiny_teacher_dir, text_jsonl, blocker / "store"),
            "cannot open the store", "Not a directory")  # fmt: skip
    result = invoke("train", "--store", store, "--student", tiny_student_dir,
                    "--out", blocker / "run", *TRAIN)  # fmt: skip
    refused(result, "cannot write the run directory", "is a file")
    assert snapshot(blocker) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_output_directory_without_write_permission(tiny_teacher_dir, text_jsonl, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(teacher_pass(tiny_teacher_dir, text_jsonl, locked / "store"), "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_already_holding_a_different_store(
    store_copy, tiny_teacher_dir, text_jsonl, tmp_path
):
    other_data = _write(tmp_path / "other.jsonl", json.dumps({"text": "Other text, other store."}))
    other_teacher = _poisoned_teacher(
        tiny_teacher_dir, tmp_path / "other-teacher", lambda m: m.lm_head.weight.mul_(0.5)
    )
    before = snapshot(store_copy)
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
        refused(teacher_pass(teacher, data, store_copy, *extra), *words)
        assert snapshot(store_copy) == before, extra
    converted = invoke("convert", store_copy, "--backend", "zarr", store_copy)
    refused(converted, "is not empty")
    assert snapshot(store_copy) == before
    unrelated = tmp_path / "my-notes"
    _write(unrelated / "todo.txt", "keep me\n")
    notes = snapshot(unrelated)
    refused(teacher_pass(tiny_teacher_dir, text_jsonl, unrelated), "is not empty", "todo.txt")
    assert snapshot(unrelated) == notes


# ---- training against a store it does not fit ---------------------------------------------------


def test_training_temperature_the_cache_did_not_capture(store, run_dir, tiny_student_dir, tmp_path):
    captured = json.loads((store / "manifest.json").read_text())["capture"]["temperatures"]
    assert captured == [2.0]
    before = snapshot(store), snapshot(run_dir)
    result = invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run_dir,
                    "--resume", "--temperature", "3", *TRAIN)  # fmt: skip
    refused(result, "temperature 3.0 was not captured", "[2.0]")
    assert (snapshot(store), snapshot(run_dir)) == before
    # The captured one is accepted: the refusal is about 3.0, not about temperatures.
    ok = invoke("train", "--store", store, "--student", tiny_student_dir, "--out", tmp_path / "t2",
                "--temperature", "2.0", *TRAIN)  # fmt: skip
    assert ok.exit_code == 0, ok.output


# ---- two writers, one shard --------------------------------------------------------------------------


def test_two_writers_claiming_the_same_shard(tiny_teacher_dir, text_jsonl, tmp_path, monkeypatch):
    """A rival writer (another process of the same store) claims shard 1 just before this run
    commits it: this run stops with a clear error, leaves the rival's claim and its own shard 0
    alone, and a later ``--resume`` (once the rival is gone) finishes a store that verifies."""
    from logitstore import format as fmt

    out = tmp_path / "store"
    real = StoreWriter.write_shard
    rival_claim = out / "claims" / "000001.claim"

    def contested(self, index, documents, fidelity=None):
        if index == 1 and not rival_claim.exists():
            rival = StoreWriter(str(out), mode="join", codec=self.codec, backend="zarr",
                                metadata={k: self.settings[k] for k in fmt.METADATA_KEYS},
                                vocab_size=self.vocab_size)  # fmt: skip
            rival._claim(1, rival._path(fmt.record_name(1)))  # held, as by a live writer
        return real(self, index, documents, fidelity)

    monkeypatch.setattr(StoreWriter, "write_shard", contested)
    args = ["--teacher", tiny_teacher_dir, "--data", text_jsonl, "--out", out, "--k", "8",
            "--max-length", "32", "--limit", "2", "--docs-per-shard", "3", "--no-progress"]  # fmt: skip
    result = invoke("teacher-pass", *args)
    refused(result, "shard 1 is claimed by another writer", f"pid {os.getpid()}")
    monkeypatch.undo()
    assert rival_claim.read_text().startswith(f"pid {os.getpid()} on ")  # the rival's, intact
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json"]
    record = json.loads((out / "records" / "000000.json").read_text())
    assert _tree_checksum(out, record["files"]) == record["sha256"]
    assert not any(p.name.startswith(_fs.TMP_PREFIX) for p in out.rglob("*"))

    rival_claim.unlink()  # the rival is gone
    resumed = invoke("teacher-pass", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    checked = invoke("verify", out)
    assert checked.exit_code == 0 and "ok:" in checked.output, checked.output


# ---- the writer's field check (documents vs the capture's temperatures) --------------------------


def test_writer_requires_the_exact_fields_the_capture_declares(tmp_path):
    """``capture.temperatures`` names the ``tail_logsumexp`` columns, so a document with another
    number of columns, or with a field the codec does not produce, is refused and nothing of the
    shard is written."""
    vocab, codec = 50, get_codec("topk", k=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (9,), generator=g)
    lp = torch.log_softmax(torch.randn(8, vocab, generator=g), -1)

    def doc(temps: tuple[float, ...], **extra: np.ndarray) -> EncodedDocument:
        fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:], temperatures=temps).items()}
        return EncodedDocument("d", ids.numpy(), np.ones(8, bool), {**fields, **extra})

    cases = [
        ([2.0], doc(()), ["lists 1 extra temperature", "no tail_logsumexp"]),
        ([], doc((2.0,)), ["lists 0 extra temperature", "(8, 1)"]),
        ([2.0, 4.0], doc((2.0,)), ["lists 2 extra temperature", "(8, 1)"]),
        ([2.0], doc((2.0,), bogus=np.zeros(8, np.float32)), ["unexpected ['bogus']"]),
    ]
    for j, (temps, document, words) in enumerate(cases):
        root = tmp_path / f"s{j}"
        meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": temps}, "source": {}}
        writer = StoreWriter(str(root), codec=codec, metadata=meta, vocab_size=vocab)
        with pytest.raises(DataError) as info:
            writer.write_shard(0, [document])
        for word in words:
            assert word in str(info.value), (word, str(info.value))
        assert sorted(p.name for p in root.rglob("*")) == ["settings.json"]
    # The matching layout is accepted and recorded with its number of columns.
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": [2.0]}, "source": {}}
    writer = StoreWriter(str(tmp_path / "ok"), codec=codec, metadata=meta, vocab_size=vocab)
    writer.write_shard(0, [doc((2.0,))])
    assert writer.finalize(1)["num_temperatures"] == 1
