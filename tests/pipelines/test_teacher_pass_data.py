"""The teacher pass's data: a resumed run reads its windows from the cache, new sources work.

Tokenizer calls are counted by wrapping ``logitstore.pipelines._data.tokenize_text``; a cached run makes
none. The tiny teacher is the one of ``tests/conftest.py``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore.pipelines._data import tokenize_text
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"k": 8, "max_length": 48, "docs_per_shard": 3, "batch_size": 4, "limit": 3}


def run(teacher, data, out, **kw):
    cfg = TeacherPassConfig(teacher=str(teacher), data=str(data), out=str(out), progress=False,
                            **{**SETTINGS, **kw})  # fmt: skip
    return run_teacher_pass(cfg)


def test_a_resumed_run_does_not_tokenize_again(
    tmp_path, tiny_teacher_dir, text_jsonl, tokenizer_calls
):
    calls = tokenizer_calls
    cache, out = str(tmp_path / "cache"), tmp_path / "store"
    first = run(tiny_teacher_dir, text_jsonl, out, cache_dir=cache)
    assert len(calls) == 3 and first["shards"] > 1
    before = [d.doc_id for d in logitstore.open_store(str(out)).iter_documents()]
    # An interrupted run: the last shard was never committed.
    last = first["shards"] - 1
    (out / "records" / f"{last:06d}.json").unlink()
    (out / "manifest.json").unlink()
    resumed = run(tiny_teacher_dir, text_jsonl, out, cache_dir=cache, resume=True)
    assert resumed["shards_written"] == [last]
    assert len(calls) == 3  # the windows came from the cache
    assert [d.doc_id for d in logitstore.open_store(str(out)).iter_documents()] == before
    # With a cold cache the same resume tokenizes every row again: the count can move.
    run(tiny_teacher_dir, text_jsonl, out, cache_dir=str(tmp_path / "cold"), resume=True)
    assert len(calls) == 6


def test_a_split_of_a_hub_layout_folder_goes_into_the_store(
    tmp_path, tiny_teacher_dir, tiny_tokenizer
):
    texts = [topics[k][:300] for k in sorted(topics)[:5]]
    folder = tmp_path / "clone"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:3]}), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": texts[3:]}), folder / "data" / "test-00000-of-00001.parquet")
    out = tmp_path / "store"
    run(tiny_teacher_dir, folder, out, split="test", limit=None, cache_dir=str(tmp_path / "c"))
    store = logitstore.open_store(str(out))
    assert store.manifest["source"]["split"] == "test"
    rows: dict[str, list[np.ndarray]] = {}
    for doc in store.iter_documents():
        rows.setdefault(doc.doc_id.rsplit("/", 2)[0], []).append(doc.input_ids)
    assert list(rows) == [f"data/test-00000-of-00001.parquet:{i}" for i in range(2)]
    for text, parts in zip(texts[3:], rows.values()):  # only the test rows, whole and in order
        joined = np.concatenate([parts[0], *[p[1:] for p in parts[1:]]])
        np.testing.assert_array_equal(joined, tokenize_text(tiny_tokenizer, text)[0])


def test_existing_stores_keep_their_source_and_ids(tmp_path, tiny_teacher_dir, text_jsonl):
    """A JSON lines store made before datasets read the data keeps the same section and ids."""
    out = tmp_path / "store"
    run(tiny_teacher_dir, text_jsonl, out, cache_dir=str(tmp_path / "c"))
    source = logitstore.open_store(str(out)).manifest["source"]
    digest = hashlib.sha256(b"docs.jsonl\0" + text_jsonl.read_bytes()).hexdigest()
    assert {k: source[k] for k in ("name", "kind", "fingerprint", "split")} == {
        "name": "docs.jsonl", "kind": "files", "fingerprint": digest, "split": None}  # fmt: skip
    assert "subset" not in source and "revision" not in source
    ids = [d.doc_id for d in logitstore.open_store(str(out)).iter_documents()]
    # Rows named by their line in the file, as the old reader named them.
    assert {i.split("/")[0] for i in ids} == {"docs.jsonl:1", "docs.jsonl:2", "docs.jsonl:3"}


COUNTING_LAUNCHER = """
import os, sys, time
import logitstore.pipelines._data as data

real = data.tokenize_text


def counted(tokenizer, text):
    if os.environ["RANK"] == "0":  # a slow rank 0: without it first, rank 1 would tokenize too
        time.sleep(0.5)
    with open(os.path.join(os.environ["CALLS_DIR"], "calls-" + os.environ["RANK"]), "a") as f:
        f.write("1\\n")
    return real(tokenizer, text)


data.tokenize_text = counted
import logitstore.cli as cli

cli.main(["teacher-pass", *sys.argv[1:]])
"""


@pytest.mark.integration
def test_under_torchrun_only_rank_0_tokenizes(tmp_path, tiny_teacher_dir, text_jsonl):
    launcher = tmp_path / "launch.py"
    launcher.write_text(COUNTING_LAUNCHER)
    out, calls = tmp_path / "store", tmp_path / "calls"
    calls.mkdir()
    args = ["--teacher", tiny_teacher_dir, "--data", text_jsonl, "--out", out, "--no-progress",
            "--cache-dir", tmp_path / "cache", "--k", 8, "--max-length", 48, "--limit", 4,
            "--docs-per-shard", 3]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(launcher), *map(str, args)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CALLS_DIR": str(calls),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 tokenized every row once; rank 1 read rank 0's windows from the cache.
    assert (calls / "calls-0").read_text().count("1") == 4
    assert not (calls / "calls-1").exists()
    store = logitstore.open_store(str(out))
    assert {d.doc_id.split("/")[0] for d in store.iter_documents()} == {
        f"docs.jsonl:{i}" for i in range(1, 5)
    }


@pytest.mark.parametrize(
    ("rank", "local_rank", "cached", "turn"),
    [(0, 0, True, 0), (1, 1, True, 2), (2, 0, True, 1), (3, 1, True, 2),
     (2, 0, False, 2)],  # a stream is read again by every rank: a node's first rank waits for none
)  # fmt: skip
def test_each_node_tokenizes_after_rank_0_and_before_its_other_ranks(
    monkeypatch, rank, local_rank, cached, turn
):
    """Two nodes of two ranks: the turn (collectives waited for before it) each rank works in."""
    import logitstore.pipelines.teacher_pass as tp

    waited: list[str] = []
    monkeypatch.setattr(tp, "agree", lambda error, world, what: waited.append(what))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert tp._rank_0_first(lambda: len(waited), rank, 4, "work", cached=cached) == turn
    assert waited == ["work"] * 3  # every rank takes part in every turn's check
