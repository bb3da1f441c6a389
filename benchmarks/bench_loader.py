"""Loader throughput on stores the real teacher wrote: tokens per CPU second, one core.

By default it reads two stores written by the teacher pass from the real teacher
(``_teacher_store.py``: SmolLM2-135M-Instruct over Python's own documentation, about 36k tokens,
one shard each) at k = 64 and k = 128, the pass's defaults otherwise (q6 values, id order
fitted on the first batch); the first run writes them, later runs reuse them. ``--store PATH``
(repeatable) reads other stores instead. ``--synthetic`` adds a store of synthetic
distributions (a shuffled Zipf prior plus noise, q8 values, no fitted id order), labelled as
such: its ids spread over the vocabulary unlike a teacher's, so its figures are not the loader's.

Per store, in one thread and one run, the paths alternate round by round (best of
``--repeats``, by CPU time):

* ``arrays``: ``read_shard_arrays`` of every shard: fetch, size and SHA-256 checks, backend
  decode and shape checks, before any codec decoding (what every path below pays; the
  baseline of the ratios);
* ``read_shard``: every shard decoded and checked (``codecs/_checks.py``: ids, NaN, signs,
  mass) into documents, on a store opened once (its one-shard cache cleared each time);
* ``iter_documents``: ``open_store(path).iter_documents()`` from a fresh open: manifest, codec
  set-up, read-ahead thread, decoding and checks;
* ``StoreDataset``: one epoch of a fresh ``StoreDataset`` over a freshly opened store: shuffled
  windows, background decode, batches by token budget, collation into torch tensors.

Tokens are trained positions (tokens minus documents). Tokens per CPU second count the whole
process's CPU time (every thread): the per-core figure; the aim is >= 1M at k = 64. Each store
line gives the bytes per token of the manifest's statistics and the shard size. Not a test.

    python -m logitstore.benchmarks.bench_loader [--store PATH ...] [--synthetic] [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.dataset import StoreDataset
from logitstore.reader import LogitStore

from ._teacher_store import teacher_stores

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


def paths(url: str, tokens_per_batch: int) -> dict[str, Callable[[], int]]:
    """Each measured path: a function returning the positions it read."""
    opened = open_store(url)

    def arrays() -> int:
        return sum(opened.read_shard_arrays(j).num_positions for j in range(opened.num_shards))

    def read_shard() -> int:
        total = 0
        for j in range(opened.num_shards):
            opened._cache = None  # a cold decode, not the one-shard cache
            total += sum(d.num_tokens - 1 for d in opened.read_shard(j))
        return total

    def iter_documents() -> int:
        return sum(d.num_tokens - 1 for d in open_store(url).iter_documents())

    def dataset() -> int:
        ds = StoreDataset(open_store(url), tokens_per_batch=tokens_per_batch, rank=0, world_size=1)
        return sum(len(b["labels"]) for b in ds)

    return {
        "arrays": arrays,
        "read_shard": read_shard,
        "iter_documents": iter_documents,
        "StoreDataset": dataset,
    }


def measure(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, float, int]]:
    """Best ``(CPU seconds, wall seconds, positions)`` per path; paths alternate each round,
    in a rotated order, so a drift of the machine's speed hits them alike."""
    best: dict[str, tuple[float, float, int]] = {}
    names = list(fns)
    for name in names:
        fns[name]()  # warm: first-use costs (imports, caches of the process) are not timed
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cpu, wall = time.process_time(), time.perf_counter()
            n = fns[name]()
            got = (time.process_time() - cpu, time.perf_counter() - wall, n)
            if name not in best or got[0] < best[name][0]:
                best[name] = got
    return best


def report(results: dict[str, tuple[float, float, int]]) -> None:
    base = results["arrays"][0]
    for name, (cpu, wall, n) in results.items():
        ratio = "(baseline)" if name == "arrays" else f"CPU time {cpu / base:.2f}x arrays"
        print(
            f"  {name:>14}: {n / cpu / 1e6:5.2f} M tokens/CPU-s, {n / wall / 1e6:5.2f} M tokens/s "
            f"wall, {1e3 * cpu:6.1f} ms CPU for {n} tokens; {ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", help="a store to read (repeatable)")
    parser.add_argument("--k", type=int, nargs="+", default=[64, 128], help="teacher stores' k")
    parser.add_argument("--tokens", type=int, default=36000, help="text per teacher store")
    parser.add_argument("--synthetic", action="store_true", help="add a synthetic store")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (best of)")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.store:
        stores = [(path, "store") for path in args.store]
    else:
        found = teacher_stores(args.k, args.tokens)
        stores = [(str(found[k]), f"real teacher store (k = {k})") for k in args.k]
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            write_synthetic(str(Path(tmp) / "synthetic"), args.tokens)
            stores.append((str(Path(tmp) / "synthetic"), "SYNTHETIC store (not a teacher's)"))
        for url, label in stores:
            print(describe(open_store(url), f"{label} {url}"))
            report(measure(paths(url, args.tokens_per_batch), args.repeats))


if __name__ == "__main__":
    main()
