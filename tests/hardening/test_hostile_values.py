"""Hostile values: stores whose bytes are consistent (sizes and checksums match, as an attacker
writes them) but whose manifest fields or decoded numbers break the format.

One class of hostile store per kind: malformed manifest fields of every type (wrong type, out of
range, overflowing, NaN or infinite, huge counts), codec configurations that do not fit (huge
``hot_ids`` among them), ids beyond the vocabulary, NaN in the top-1, label or tail (signalling
NaNs too), log-probabilities above 0 or beyond float32's ``exp``, and support plus tail mass
above 1. Each is read by the ``logitstore`` CLI in a child process under a 1.5 GiB address-space
limit, and must be refused with a one-line message naming the field (and, for values, the shard,
document and position), never a traceback, a numpy warning or a memory blow-up. ``verify`` lists
value problems (exit 1); every other command refuses with exit 2, and training refuses before
its first step.

The CLI runs share one long-lived child process of their own (``conftest.run_limited`` with
the pool ``values``: training loads a model, whose modules stay), under the same limit as the
storage cases.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter
from logitstore.codecs import Dense, Sampled, TopK

VOCAB = 256
WIDE = 300  # two id planes: a gap can reach ids far beyond the vocabulary
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": [2.0]}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
STUDENT = {
    "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
}  # fmt: skip
TRAIN = ["--max-steps", "1", "--tokens-per-step", "64", "--tokens-per-batch", "64",
         "--device", "cpu", "--no-progress"]  # fmt: skip


def run_values(limited_cli: Callable[..., dict[str, Any]], args: list[Any]) -> dict[str, Any]:
    """``logitstore ARGS`` in the long-lived child of this module's pool, under the limit."""
    return limited_cli(*args, pool="values", timeout=300)


def clean_refusal(report: dict[str, Any], exit_code: int, *words: str) -> None:
    """No traceback, the expected exit, every error on one line, and ``words`` said."""
    assert not report["traceback"], report["traceback"][-3000:]
    assert report["exit_code"] == exit_code, report
    assert "Traceback" not in report["output"], report["output"]
    assert "RuntimeWarning" not in report["output"], report["output"]  # numpy overflow
    errors = [line for line in report["output"].splitlines() if line.startswith("error:")]
    assert len(errors) == (exit_code == 2), report["output"]
    for word in words:
        assert word in report["output"], (word, report["output"])


# ---- building consistent stores ----------------------------------------------------------------


def documents(
    codec, n_docs: int, seed: int, vocab: int = VOCAB, name: str = "doc"
) -> list[EncodedDocument]:
    """``name-0``, ``name-1``, ...: a store's shards take different names (ids are unique)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n_docs):
        ids = torch.randint(0, min(vocab, VOCAB), (12 + 3 * d,), generator=g)
        lp = torch.log_softmax(3 * torch.randn(len(ids) - 1, vocab, generator=g), -1)
        enc = codec.encode(lp, ids[1:], temperatures=(2.0,), generator=g)
        fields = {k: v.numpy().copy() for k, v in enc.items()}
        docs.append(
            EncodedDocument(f"{name}-{d}", ids.numpy(), np.ones(len(ids) - 1, bool), fields)
        )
    return docs


def write(root: Path, codec, shards: list[list[EncodedDocument]], *, backend="zarr",
          vocab: int = VOCAB) -> Path:  # fmt: skip
    """A finished store whose files, sizes and checksums all agree (the writer computes them)."""
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=vocab)
    for j, docs in enumerate(shards):
        w.write_shard(j, docs)
    w.finalize(len(shards))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    codec = TopK(k=8, values="q8")
    root = tmp_path_factory.mktemp("hostile") / "clean"
    return write(root, codec, [documents(codec, 2, 0, name="first"), documents(codec, 3, 1)])


def _set(data: Any, where: str, value: Any) -> None:
    """``data[where] = value`` for a path like ``shards[1].files[0][1]``."""
    import re

    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", where)]
    for key in keys[:-1]:
        if isinstance(key, str) and data.get(key) is None:
            data[key] = {}  # a section the clean store lacks (fidelity, a new key)
        data = data[key]
    data[keys[-1]] = value


# ---- malformed manifest fields, every type ------------------------------------------------------

BIG = 2**64  # overflows int64: an OverflowError in numpy unless the schema refuses it first
MANIFEST_FIELDS = [
    ("format_version", "1"),
    ("vocab_size", "256"), ("vocab_size", 0), ("vocab_size", BIG), ("vocab_size", 2.5),
    ("vocab_size", None), ("num_temperatures", -1), ("num_temperatures", 10**9),
    ("num_temperatures", [1]), ("backend", 1), ("codec", "topk"), ("codec.name", ["topk"]),
    ("codec.version", "1"), ("codec.configuration", [8]), ("teacher", []), ("capture", 3),
    ("tail_temperatures", "2.0"), ("tail_temperatures", [-2.0]), ("tail_temperatures", [0]),
    ("tail_temperatures", [True]), ("tail_temperatures", ["2"]), ("tail_temperatures", None),
    ("tail_temperatures", [2.0, 2.0]), ("tail_temperatures", [2.0] + [3.0] * 64),
    ("tail_temperatures", [2.0, 3.0]), ("source", None), ("statistics", []),
    ("statistics.tokens", "x"), ("statistics.bytes_per_token", "fast"),
    ("statistics.fidelity", "good"), ("statistics.fidelity.top1_agreement", "high"),
    ("statistics.fidelity.bucket_kl", [0.1]), ("shards", {}), ("shards[1]", []),
    ("shards[1].documents", "3"), ("shards[1].documents", -3), ("shards[1].tokens", BIG),
    ("shards[1].tokens", 10**30), ("shards[1].positions", 1.5), ("shards[1].bytes", True),
    ("shards[1].sha256", 5), ("shards[1].sha256", "../../etc"), ("shards[1].files", {}),
    ("shards[1].files[0]", "x"), ("shards[1].files[0][1]", BIG), ("shards[1].files[0][1]", -1),
    ("shards[1].files[0][0]", None), ("shards[1].index", "1"), ("shards[1].fidelity", 0.5),
    ("shards[1].fidelity.count", None), ("statistics.bytes_per_token", 10**400),
    ("tail_temperatures", [10**400]), ("statistics.fidelity.bucket_kl", -(10**400)),
]  # fmt: skip
NON_FINITE = [  # (field, JSON text): parsed to a float that is not finite
    ("vocab_size", "NaN"), ("statistics.bytes_per_token", "Infinity"),
    ("statistics.fidelity.bucket_kl", "-Infinity"), ("tail_temperatures[0]", "1e999"),
    ("teacher.temperature", "NaN"), ("shards[0].fidelity.count", "1e400"),
]  # fmt: skip
HUGE_COUNTS = [  # consistent counts (positions = tokens - documents), far beyond the bytes
    (10**6, 10**6 + 3),
    (2**31, 2**31 + 3),
    (2**39, 2**39 + 3),
]
CODEC_CONFIGS = [  # (configuration change, a word the message must hold)
    ({"k": 0}, "k"), ({"k": "8"}, "k"), ({"k": 10**6}, "k"), ({"k": BIG}, "k"),
    ({"values": "q9"}, "values"), ({"values": ["q8"]}, "values"), ({"hot_ids": "x"}, "hot_ids"),
    ({"hot_ids": [1, 1]}, "hot_ids"), ({"hot_ids": [2**40]}, "hot_ids"),
    ({"hot_ids": list(range(VOCAB - 5, VOCAB + 5))}, "hot_ids"), ({"hot_ids": [-1]}, "hot_ids"),
    ({"hot_ids": [1.5]}, "hot_ids"), ({"extra": 1}, "extra"),
]  # fmt: skip


def _copy(base: Path, root: Path, change: Callable[[dict], Any], text: str | None = None) -> Path:
    shutil.copytree(base, root)
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    raw = json.dumps(manifest)
    if text is not None:
        raw = raw.replace('"@@"', text)
    (root / "manifest.json").write_text(raw)
    return root


@pytest.fixture(scope="module")
def manifest_reports(base, tmp_path_factory, limited_cli) -> dict[str, dict[str, Any]]:
    """Every malformed-manifest store, read by inspect, verify, convert, export, train or mix
    in turn (one child process); the report of each, by case id."""
    tmp = tmp_path_factory.mktemp("manifests")
    student = tmp / "student.json"
    student.write_text(json.dumps(STUDENT))
    cases: dict[str, Path] = {}
    for i, (where, value) in enumerate(MANIFEST_FIELDS):
        cases[f"field {where}={value!r}"] = _copy(
            base, tmp / f"f{i}", lambda m, w=where, v=value: _set(m, w, v)
        )
    for i, (where, text) in enumerate(NON_FINITE):
        cases[f"nonfinite {where}"] = _copy(
            base, tmp / f"n{i}", lambda m, w=where: _set(m, w, "@@"), text
        )
    for i, (positions, tokens) in enumerate(HUGE_COUNTS):

        def huge(m: dict, p: int = positions, t: int = tokens) -> None:
            m["shards"][1].update(documents=3, tokens=t, positions=p)
            m["statistics"].update(tokens=t + m["shards"][0]["tokens"])

        cases[f"huge {positions}"] = _copy(base, tmp / f"h{i}", huge)
    for i, (config, _) in enumerate(CODEC_CONFIGS):
        cases[f"codec {config}"] = _copy(
            base, tmp / f"c{i}", lambda m, c=config: m["codec"]["configuration"].update(c)
        )
    readers = [
        lambda s, i: ["inspect", s],
        lambda s, i: ["verify", s],
        lambda s, i: ["convert", s, "--backend", "parquet", tmp / f"out{i}"],
        lambda s, i: ["export", s, tmp / f"exp{i}"],
        lambda s, i: ["train", "--store", s, "--student", student, "--out", tmp / f"run{i}",
                      *TRAIN],
        lambda s, i: ["mix", s, base, "--out", tmp / f"mix{i}"],
    ]  # fmt: skip
    commands = {case: readers[i % len(readers)](s, i) for i, (case, s) in enumerate(cases.items())}
    for case, s in cases.items():  # inspect prints fidelity: it must refuse, not crash
        if "fidelity" in case:
            commands[f"inspect {case}"] = ["inspect", s]
    reports = {name: run_values(limited_cli, args) for name, args in commands.items()}
    for i in range(len(cases)):  # nothing written by a refused command
        for name in ("out", "exp", "run", "mix"):
            assert not (tmp / f"{name}{i}").exists() or not any((tmp / f"{name}{i}").rglob("*"))
    return reports


@pytest.mark.parametrize(
    ("where", "value"), MANIFEST_FIELDS, ids=[f"{w}={v!r}"[:40] for w, v in MANIFEST_FIELDS]
)
def test_malformed_manifest_fields_are_refused_naming_them(manifest_reports, where, value):
    report = manifest_reports[f"field {where}={value!r}"]
    if where == "format_version":
        clean_refusal(report, 2, "format version '1'")
    elif where == "tail_temperatures" and value == [2.0, 3.0]:
        clean_refusal(report, 2, "field tail_temperatures: expected num_temperatures = 1")
    else:
        clean_refusal(report, 2, f"manifest.json field {where}")


@pytest.mark.parametrize(("where", "text"), NON_FINITE, ids=[w for w, _ in NON_FINITE])
def test_non_finite_numbers_are_refused_naming_the_field(manifest_reports, where, text):
    clean_refusal(manifest_reports[f"nonfinite {where}"], 2, f"field {where} holds {text}")


@pytest.mark.parametrize(("positions", "tokens"), HUGE_COUNTS)
def test_huge_declared_counts_are_refused_before_allocating(manifest_reports, positions, tokens):
    clean_refusal(manifest_reports[f"huge {positions}"], 2, "field shards[1]", "times the shard's")


@pytest.mark.parametrize(
    ("config", "word"), CODEC_CONFIGS, ids=[str(c)[:30] for c, _ in CODEC_CONFIGS]
)
def test_codec_configurations_that_do_not_fit_are_refused(manifest_reports, config, word):
    clean_refusal(manifest_reports[f"codec {config}"], 2, "field codec.configuration", word)


# ---- values the format forbids, in shards whose bytes are consistent ---------------------------

NAN = float("nan")
Q8, F16, SAMPLED = TopK(k=8, values="q8"), TopK(k=8, values="float16"), Sampled(n=16)
# Signalling NaNs, as hostile bytes can hold: numpy warns on arithmetic with them
SNAN = np.frombuffer(b"\x01\x00\x80\x7f", np.float32)[0]
SNAN16 = np.frombuffer(b"\x01\x7c", np.float16)[0]
DENSE = Dense(bits=8)
# case: (codec, vocabulary, stored field, index in document 1, value, decoded field named)
VALUES = {
    "id beyond V, q8": (Q8, WIDE, "ids1", (4, 3), 5, "support_ids"),
    "id beyond V, float16": (F16, WIDE, "ids1", (4, 3), 5, "support_ids"),
    "id beyond V, sampled": (SAMPLED, WIDE, "ids1", (4, 0), 5, "support_ids"),
    "NaN top-1": (Q8, VOCAB, "top1", (4,), NAN, "support_logprobs"),
    "NaN label": (Q8, VOCAB, "label_logprob", (4,), NAN, "label_logprob"),
    "NaN tail": (Q8, VOCAB, "tail_logmass", (4,), NAN, "tail_logmass"),
    "NaN tail at T=2": (Q8, VOCAB, "tail_logsumexp", (4, 0), NAN, "tail_logsumexp"),
    "NaN entropy": (Q8, VOCAB, "entropy", (4,), NAN, "entropy"),
    "NaN float value": (F16, VOCAB, "values", (4, 2), NAN, "support_logprobs"),
    "NaN sampled log-prob": (SAMPLED, VOCAB, "logprobs", (4, 0), NAN, "support_logprobs"),
    "top-1 above 0": (Q8, VOCAB, "top1", (4,), 0.5, "support_logprobs"),
    "top-1 beyond float32's exp": (Q8, VOCAB, "top1", (4,), 1000.0, "support_logprobs"),
    "signalling NaN top-1": (Q8, VOCAB, "top1", (4,), SNAN, "support_logprobs"),
    "signalling NaN float16 value": (F16, VOCAB, "values", (4, 2), SNAN16, "support_logprobs"),
    "top-1 at -inf, float16": (F16, VOCAB, "top1", (4,), -np.inf, "support and tail mass"),
    "signalling NaN dense top-1": (DENSE, VOCAB, "top1", (4,), SNAN, "support_logprobs"),
    "float value above the top-1": (F16, VOCAB, "values", (4, 2), 50.0, "support_logprobs"),
    "label above 0": (Q8, VOCAB, "label_logprob", (4,), 0.3, "label_logprob"),
    "tail above 0": (Q8, VOCAB, "tail_logmass", (4,), 0.2, "tail_logmass"),
    "sampled log-prob above 0": (SAMPLED, VOCAB, "logprobs", (4, 0), 0.7, "support_logprobs"),
    "tail holding everything": (Q8, VOCAB, "tail_logmass", (4,), 0.0, "support and tail mass"),
    "support all at the top-1": (Q8, VOCAB, "values", (4, slice(None)), 0, "support and tail mass"),
    "draws beyond n": (SAMPLED, VOCAB, "counts", (4, 0), 200, "support_counts"),
}
PARQUET = ["id beyond V, q8", "NaN label", "support all at the top-1"]
TRAINED = ["id beyond V, q8", "NaN top-1", "label above 0", "tail holding everything"]


def hostile_documents(case: str, seed: int) -> list[EncodedDocument]:
    codec, vocab, field, index, value, _ = VALUES[case]
    docs = documents(codec, 3, seed, vocab)
    fields = docs[1].fields
    fields[field][index] = value
    if case == "support all at the top-1":  # eight entries of 1/2 each, ids 0 .. 7 (one run)
        fields["top1"][4] = np.log(0.5)
        fields["ids0"][4] = 0
    return docs


@pytest.fixture(scope="module")
def value_reports(tmp_path_factory, limited_cli) -> dict[str, dict[str, Any]]:
    """``verify`` of every hostile-value store (two shards, the second spoiled), ``export`` of
    some, and ``train`` on one-shard ones; all in one child process."""
    tmp = tmp_path_factory.mktemp("values")
    students = {}
    for vocab in (VOCAB, WIDE):  # the student's head must fit the store's vocabulary
        students[vocab] = tmp / f"student{vocab}.json"
        students[vocab].write_text(json.dumps({**STUDENT, "vocab_size": vocab}))
    commands: dict[str, list[Any]] = {}
    for i, case in enumerate(VALUES):
        codec, vocab = VALUES[case][:2]
        for backend in ["zarr", "parquet"] if case in PARQUET else ["zarr"]:
            shards = [documents(codec, 2, 10 + i, vocab, "first"), hostile_documents(case, i)]
            store = write(tmp / f"{backend}{i}", codec, shards, backend=backend, vocab=vocab)
            commands[f"verify {backend} {case}"] = ["verify", store]
            commands[f"export {backend} {case}"] = ["export", store, tmp / f"exp-{backend}{i}"]
        if case in TRAINED:
            one = write(tmp / f"one{i}", codec, [hostile_documents(case, i)], vocab=vocab)
            run = tmp / f"run{i}"
            commands[f"train {case}"] = ["train", "--store", one, "--student", students[vocab],
                                         "--out", run, *TRAIN]  # fmt: skip
    reports = {name: run_values(limited_cli, args) for name, args in commands.items()}
    for i, case in enumerate(VALUES):
        if case in TRAINED:  # refused before the first step: no checkpoint
            found = list((tmp / f"run{i}").glob("**/checkpoint-*"))
            found += list((tmp / f"run{i}").glob("**/*.safetensors"))
            reports[f"train {case}"]["checkpoints"] = [str(p) for p in found]
    return reports


def _where(backend: str, shard: int) -> str:
    suffix = ".zarr" if backend == "zarr" else ".parquet"
    return f"shard shards/00000{shard}{suffix}: document 1 ('doc-1'), position 4: "


CHECKED = [
    (case, b) for case in VALUES for b in (["zarr", "parquet"] if case in PARQUET else ["zarr"])
]


@pytest.mark.parametrize(("case", "backend"), CHECKED)
def test_verify_names_the_first_bad_value(value_reports, case, backend):
    named = VALUES[case][-1]
    clean_refusal(
        value_reports[f"verify {backend} {case}"],
        1,
        f"problem: {_where(backend, 1)}{named}: expected",
    )
    assert value_reports[f"verify {backend} {case}"]["output"].count("problem:") == 1


@pytest.mark.parametrize(("case", "backend"), CHECKED)
def test_export_refuses_bad_values(value_reports, case, backend):
    # (export converts to a parquet store first, whose shard the message names)
    named = VALUES[case][-1]
    where = _where("parquet", 1).removeprefix("shard ")
    clean_refusal(value_reports[f"export {backend} {case}"], 2, f"{where}{named}: expected")


@pytest.mark.parametrize("case", TRAINED)
def test_training_refuses_bad_values_before_its_first_step(value_reports, case):
    report = value_reports[f"train {case}"]
    clean_refusal(report, 2, f"error: {_where('zarr', 0)}{VALUES[case][-1]}")
    assert report["checkpoints"] == []


def test_huge_ids_with_a_hot_list_are_refused_without_a_huge_table(tmp_path, limited_cli):
    """Three id planes (V = 2^24) of 0xFF decode to ids up to 8 * 2^24: the hot list's inverse
    table must not follow them (it would take gigabytes)."""
    vocab = 2**24
    codec = TopK(k=8, values="q8", hot_ids=(vocab - 1, 0, 7))
    n = 40
    fields = {f"ids{b}": np.full((n - 1, 8), 0xFF, np.uint8) for b in range(3)}
    fields["values"] = np.zeros((n - 1, 8), np.uint8)
    fields["top1"] = np.full(n - 1, -0.1, np.float32)
    fields["label_logprob"] = np.full(n - 1, -1.0, np.float32)
    for name in ("entropy", "tail_logmass"):
        fields[name] = np.full(n - 1, -1.0 if name == "tail_logmass" else 1.0, np.float16)
    fields["tail_logsumexp"] = np.zeros((n - 1, 1), np.float16)
    doc = EncodedDocument("doc-0", np.arange(n) % VOCAB, np.ones(n - 1, bool), fields)
    store = write(tmp_path / "s", codec, [[doc]], vocab=vocab)
    verify = run_values(limited_cli, ["verify", store])
    export = run_values(limited_cli, ["export", store, tmp_path / "e"])
    clean_refusal(verify, 1, "position 0: support_ids: expected token ids in [0, 16777216)")
    clean_refusal(export, 2, "support_ids")


FIDELITY = [(w, v) for w, v in MANIFEST_FIELDS if "fidelity" in w]


@pytest.mark.parametrize(("where", "value"), FIDELITY, ids=[f"{w}={v!r}" for w, v in FIDELITY])
def test_inspect_refuses_fidelity_of_the_wrong_type(manifest_reports, where, value):
    clean_refusal(manifest_reports[f"inspect field {where}={value!r}"], 2, f"field {where}")
