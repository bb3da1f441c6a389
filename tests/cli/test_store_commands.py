"""`logitstore inspect`, `verify` and `convert` through the click group (exit codes, messages)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.cli import main
from logitstore.codecs import get_codec

V = 256
META = {
    "teacher": {"model": "tiny-teacher", "dtype": "float32"},
    "tokenizer": {"vocab_size": V},
    "capture": {"temperatures": [1.0]},
    "source": {"path": "docs.jsonl"},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "store"
    codec = get_codec("topk", k=8)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(str(root), codec=codec, metadata=META, vocab_size=V)
    for j in range(3):
        docs = []
        for d in range(2):
            ids = torch.randint(0, V, (12 + d,), generator=g)
            lp = torch.log_softmax(torch.randn(len(ids) - 1, V, generator=g), -1)
            enc = {k: v.numpy() for k, v in codec.encode(lp, ids[1:], temperatures=(1.0,)).items()}
            docs.append(EncodedDocument(f"{j}/{d}", ids.numpy(), np.ones(len(ids) - 1, bool), enc))
        w.write_shard(j, docs)
    w.finalize(3)
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_prints_the_manifest_summary(store):
    result = run("inspect", store)
    assert result.exit_code == 0, result.output
    tokens = sum(len(d.input_ids) for d in open_store(str(store)).iter_documents())
    assert re.search(rf"^tokens +{tokens}$", result.output, re.M)
    assert "topk v1 (k=8, values=q6)" in result.output
    assert "model=tiny-teacher" in result.output
    assert re.search(r"^temperatures +1, tail columns at 1$", result.output, re.M)
    as_json = json.loads(run("inspect", store, "--json").output)
    assert as_json["documents"] == 6 and as_json["tokens"] == tokens
    manifest = json.loads((store / "manifest.json").read_text())
    assert as_json["bytes_per_token"] == manifest["statistics"]["bytes"] / tokens


def test_verify_ok_and_damaged(store, tmp_path):
    ok = run("verify", store)
    assert ok.exit_code == 0 and "ok: 3 shards, 6 documents" in ok.output
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    shutil.rmtree(damaged / "shards" / "000002.zarr")
    chunk = damaged / "shards" / "000000.zarr" / "input_ids" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    result = run("verify", damaged)
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2
    assert "shards/000000.zarr" in problems[0] and "bytes" in problems[0]
    assert "shards/000002.zarr" in problems[1] and "missing" in problems[1]


@pytest.mark.parametrize("command", ["verify", "convert", "export", "mix"])
def test_long_commands_report_progress_shard_by_shard(store, tmp_path, monkeypatch, command):
    from logitstore.pipelines import _progress

    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)  # no terminal here: a line a refresh
    args = {
        "verify": ["verify", store],
        "convert": ["convert", store, "--backend", "parquet", tmp_path / "out"],
        "export": ["export", store, tmp_path / "out"],
        "mix": ["mix", store, store, "--out", tmp_path / "out"],
    }[command]
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(f"{command}:")]
    shards = open_store(str(store)).num_shards
    assert lines and f"{shards}/{shards}" in lines[-1] and "\r" not in result.output, lines
    quiet = run(*args[:-1], tmp_path / "quiet", "--no-progress") if command != "verify" else None
    quiet = quiet or run(*args, "--no-progress")
    assert quiet.exit_code == 0 and not any(
        line.startswith(f"{command}:") for line in quiet.output.splitlines()
    )


def test_unreadable_manifest_is_an_error(store, tmp_path):
    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 7
    (bad / "manifest.json").write_text(json.dumps(m))
    for command in ("verify", "inspect"):
        result = run(command, bad)
        assert result.exit_code == 2
        assert "error: manifest.json has format version 7" in result.output


def test_convert_round_trip_and_refusals(store, tmp_path):
    out, back = tmp_path / "pq", tmp_path / "zarr"
    result = run("convert", store, "--backend", "parquet", out)
    assert result.exit_code == 0, result.output
    assert "6 documents" in result.output
    assert run("convert", out, "--backend", "zarr", back).exit_code == 0
    for name in ("manifest.json", "shards/000001.zarr/values/c/0/0"):
        assert (back / name).read_bytes() == (store / name).read_bytes()
    again = run("convert", store, "--backend", "parquet", out)
    assert again.exit_code == 2 and "is not empty" in again.output
    bogus = run("convert", store, "--backend", "csv", tmp_path / "x")
    assert bogus.exit_code != 0 and "csv" in bogus.output


def test_interrupted_convert_resumes(store, tmp_path, monkeypatch):
    from logitstore.storage import _parquet

    out = tmp_path / "pq"
    real = _parquet.ParquetBackend.encode
    calls = []

    def crash_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like a kill between shards
        return real(self, *a, **k)

    monkeypatch.setattr(_parquet.ParquetBackend, "encode", crash_on_third)
    result = run("convert", store, "--backend", "parquet", out)
    assert result.exit_code != 0
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    assert run("convert", store, "--backend", "parquet", out).exit_code == 2
    resumed = run("convert", store, "--backend", "parquet", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    fresh = tmp_path / "fresh"
    run("convert", store, "--backend", "parquet", fresh)
    assert (out / "manifest.json").read_bytes() == (fresh / "manifest.json").read_bytes()
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in fresh.rglob("*"))


def test_inspect_summarises_long_codec_settings():
    from logitstore.cli.inspect import _codec

    codec = {"name": "topk", "version": 1, "configuration": {"k": 4, "hot_ids": list(range(900))}}
    line = _codec(codec)
    assert line == "topk v1 (hot_ids=[900 values], k=4)"
    short = {"name": "topk", "version": 1, "configuration": {"hot_ids": [3, 1]}}
    assert _codec(short) == "topk v1 (hot_ids=[3, 1])"


def test_inspect_shows_escape_sequences_in_a_stores_metadata_without_obeying_them(tmp_path):
    # The teacher's metadata is the store's own text: a stranger's store may hold terminal
    # escape sequences (clear the screen, rewrite the line) in it.
    root = tmp_path / "store"
    codec = get_codec("topk", k=8)
    meta = {**META, "teacher": {"model": "evil\x1b[2J\x1b[1A", "dtype": "float32"}}
    w = StoreWriter(str(root), codec=codec, metadata=meta, vocab_size=V)
    ids = torch.arange(6)
    lp = torch.log_softmax(torch.randn(5, V, generator=torch.Generator().manual_seed(0)), -1)
    enc = {k: v.numpy() for k, v in codec.encode(lp, ids[1:], temperatures=(1.0,)).items()}
    w.write_shard(0, [EncodedDocument("a", ids.numpy(), np.ones(5, bool), enc)])
    w.finalize(1)
    result = run("inspect", root)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "model=evil\\x1b[2J\\x1b[1A" in result.output
    assert json.loads(run("inspect", root, "--json").output)["teacher"]["model"].startswith("evil")


def test_inspect_of_a_mixture_summarises_each_mixed_stores_long_codec_settings(tmp_path):
    order = list(range(V))[::-1]  # a fitted id order: V values in the codec's settings
    roots = []
    for name, codec in (("a", get_codec("topk", k=8, hot_ids=tuple(order))), ("b", None)):
        root = tmp_path / name
        codec = codec or get_codec("topk", k=4)
        w = StoreWriter(str(root), codec=codec, metadata=META, vocab_size=V)
        ids = torch.arange(10) * 7
        lp = torch.log_softmax(torch.randn(9, V, generator=torch.Generator().manual_seed(1)), -1)
        enc = {k: v.numpy() for k, v in codec.encode(lp, ids[1:], temperatures=(1.0,)).items()}
        w.write_shard(0, [EncodedDocument("d", ids.numpy(), np.ones(9, bool), enc)])
        w.finalize(1)
        roots.append(root)
    assert run("mix", *roots, "--out", tmp_path / "mix", "--no-progress").exit_code == 0
    result = run("inspect", tmp_path / "mix")
    assert result.exit_code == 0, result.output
    (teacher,) = [line for line in result.output.splitlines() if line.startswith("teacher")]
    assert str(order[:9])[1:-1] not in teacher  # the id order is not printed
    assert f"hot_ids: [{V} values], k: 8" in teacher and "k: 4" in teacher
    assert f"url: {roots[0]}" in teacher and f"url: {roots[1]}" in teacher
