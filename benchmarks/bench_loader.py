"""Loader throughput on stores the real teacher wrote: tokens per CPU second, one core.

By default it reads two stores written by the teacher pass from the real teacher
(``_teacher_store.py``: SmolLM2-135M-Instruct over Python's own documentation, about 36k tokens,
one shard each) at k = 64 and k = 128, the pass's defaults otherwise (q6 values, id order
fitted on the first batch); the first run writes them, later runs reuse them. ``--store PATH``
(repeatable) reads other stores instead. ``--synthetic`` adds a store of synthetic
distributions (a shuffled Zipf prior plus noise, q8 values, no fitted id order), labelled as
such: its ids spread over the vocabulary unlike a teacher's, so its figures are not the loader's.

Per store, in one thread and one run, the paths alternate round by round; each line gives the
best of ``--repeats`` rounds by CPU time, the median round, and the page faults of the best
round (on a machine where the kernel's page faults are dear, a round whose allocator handed
freed memory back and faulted it in again costs up to a third more):

* ``arrays``: ``read_shard_arrays`` of every shard: fetch, size and SHA-256 checks, backend
  decode and shape checks, before any codec decoding (what every path below pays; the
  baseline of the ratios);
* ``read_shard``: every shard decoded and checked (``codecs/_checks.py``: ids, NaN, signs,
  mass) into documents, on a store opened once (its one-shard cache cleared each time);
* ``iter_documents``: ``open_store(path).iter_documents()`` from a fresh open: manifest, codec
  set-up, read-ahead thread, decoding and checks;
* ``StoreDataset``: one epoch of a fresh ``StoreDataset`` over a freshly opened store: shuffled
  windows decoded in emission order (``read_block``), background decode, batches by token
  budget, collation into torch tensors (slices of the decoded window);
* ``per shard``: the same epoch over a store that hides ``read_block``, so shards are decoded
  whole and collation concatenates (how the loader read before); ``StoreDataset``'s line gives
  its CPU time against this one.

Tokens are trained positions (tokens minus documents). Tokens per CPU second count the whole
process's CPU time (every thread): the per-core figure; the aim is >= 1M at k = 64. Each store
line gives the bytes per token of the manifest's statistics and the shard size. Not a test.

    python -m logitstore.benchmarks.bench_loader [--store PATH ...] [--synthetic] [--repeats 7]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from logitstore import open_store
from logitstore.dataset import StoreDataset

from ._teacher_store import add_store_options, describe, stores_to_read


def paths(url: str, tokens_per_batch: int) -> dict[str, Callable[[], int]]:
    """Each measured path: a function returning the positions it read."""
    opened, kept = open_store(url), open_store(url)

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

    def dataset(store: Any) -> int:
        ds = StoreDataset(store, tokens_per_batch=tokens_per_batch, rank=0, world_size=1)
        return sum(len(b["labels"]) for b in ds)

    return {
        "arrays": arrays,
        "read_shard": read_shard,
        "iter_documents": iter_documents,
        "StoreDataset": lambda: dataset(open_store(url)),
        "kept open": lambda: dataset(kept),
        "per shard": lambda: dataset(PerShard(open_store(url))),
    }


class PerShard:
    """A store without ``read_block``: ``StoreDataset`` then decodes whole shards in store
    order and collation concatenates each batch's documents (the loader before windows were
    decoded in emission order); the baseline of the ``StoreDataset`` row."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name == "read_block":
            raise AttributeError(name)
        return getattr(self._store, name)


Timing = tuple[float, float, int, int]  # CPU seconds, wall seconds, positions, page faults


def measure(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[Timing]]:
    """Every round's timing per path; paths alternate each round, in a rotated order, so a
    drift of the machine's speed hits them alike."""
    runs: dict[str, list[Timing]] = {name: [] for name in fns}
    names = list(fns)
    for name in names:
        fns[name]()  # warm: first-use costs (imports, caches of the process) are not timed
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            n = fns[name]()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            runs[name].append((cpu, wall, n, faults))
    return runs


def report(runs: dict[str, list[Timing]]) -> None:
    """Per path the best round (by CPU time), the median round's CPU figure, and the page
    faults of the best round: freshly faulted pages are most of the spread between rounds."""
    base = min(runs["arrays"])[0]
    for name, timings in runs.items():
        cpu, wall, n, faults = min(timings)
        median = statistics.median(t[0] for t in timings)
        ratio = "(baseline)" if name == "arrays" else f"CPU time {cpu / base:.2f}x arrays"
        if name == "StoreDataset" and "per shard" in runs:
            ratio += f", {cpu / min(runs['per shard'])[0]:.2f}x per shard"
        if name == "kept open":
            ratio += f", {cpu / min(runs['StoreDataset'])[0]:.2f}x StoreDataset"
        print(
            f"  {name:>14}: {n / cpu / 1e6:5.2f} M tokens/CPU-s (median round "
            f"{n / median / 1e6:4.2f}), {n / wall / 1e6:5.2f} M tokens/s wall, "
            f"{1e3 * cpu:6.1f} ms CPU for {n} tokens, {faults} page faults; {ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_store_options(parser, repeats_help="rounds (best of)")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for url, label in stores_to_read(args, tmp):
            print(describe(open_store(url), f"{label} {url}"))
            report(measure(paths(url, args.tokens_per_batch), args.repeats))


if __name__ == "__main__":
    main()
