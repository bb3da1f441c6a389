"""Store read throughput: tokens per CPU second of ``LogitStore.read_shard`` on one core.

By default it reads the stores the real teacher wrote (``_teacher_store.py``: SmolLM2-135M-
Instruct over Python's own documentation, about 36k tokens, one shard, the teacher pass's
defaults: q6 values and the fitted id order) at k = 64 and k = 128; ``--store PATH``
(repeatable) reads other stores, ``--synthetic`` adds a store of synthetic distributions
(labelled as such; see ``_teacher_store.py``). For the first shard of each store it times, in
the same run, by CPU time (best of ``--repeats``):

* ``floor``: ``codec.decode`` of the shard's arrays already in memory as the reader runs it,
  every value checked (``codecs/_checks.py``: ids, NaN, signs, mass; the ids and the mass
  bound while decoding, in cache); alternated with the decode without a vocabulary (no checks,
  ids mapped to token ids afterwards), and the checks as a pass of their own (an upper bound
  of what they add);
* per backend (the store's own, and a lossless copy in the other backend made by
  ``convert_store``): ``read_shard`` (fetch, size and SHA-256 checks, backend decode,
  ``codec.decode``, value checks, documents), alternated with the fetch, checks and backend
  decode alone (``read_shard_arrays``).

Tokens are positions (tokens minus documents). Not a test: it prints figures and ratios
against the floor measured in the same run. The loader's aim is >= 1M tokens/s per core.

    python -m logitstore.benchmarks.bench_store_read [--store PATH ...] [--k 64 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from logitstore import open_store
from logitstore.codecs._checks import check_positions
from logitstore.reader import LogitStore
from logitstore.storage.convert import convert_store

from ._teacher_store import add_store_options, describe, stores_to_read


def alternate(i: int, a, b) -> tuple[float, float]:
    """``(a(), b())``, run in turn a-b, then b-a: neither always runs after the other."""
    if i % 2:
        tb = b()
        return a(), tb
    return a(), b()


def cpu_time(fn) -> float:
    """CPU time of this process for one call: on a shared machine, time spent waiting for a
    core would swamp a few percent."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def cpu_best_of(fn, repeats: int) -> float:
    return min(cpu_time(fn) for _ in range(repeats))


def floor_lines(store: LogitStore, repeats: int) -> float:
    """Print the in-memory decode figures of shard 0; return the floor (CPU seconds)."""
    codec, vocab = store.codec, store.vocab_size
    fields = store.read_shard_arrays(0).fields
    tokens = len(fields["top1"])
    decoded = codec.decode(fields)
    # Alternated, so a drift of the machine's speed hits both alike.
    pairs = [
        alternate(i, lambda: cpu_time(lambda: codec.decode(fields, vocab)), lambda: cpu_time(
            lambda: codec.decode(fields)
        ))
        for i in range(repeats)
    ]  # fmt: skip
    floor, plain = min(p[0] for p in pairs), min(p[1] for p in pairs)
    alone = cpu_best_of(lambda: check_positions(codec, decoded, vocab), repeats)
    print(
        f"  floor (codec.decode in memory, value checks on, as the reader runs it): "
        f"{tokens / floor / 1e6:.2f} M tokens/s (CPU time)"
    )
    print(
        f"  codec.decode without a vocabulary (no checks; ids mapped to token ids after "
        f"decoding): {tokens / plain / 1e6:.2f} M tokens/s, x{floor / plain:.2f} of the floor"
    )
    print(
        f"  value checks as a pass of their own: {1e3 * alone:.2f} ms, {100 * alone / floor:.1f} "
        "% of the floor (an upper bound: decoding does part of them in cache)"
    )
    return floor


def backend_lines(store: LogitStore, floor: float, repeats: int, note: str = "") -> None:
    """Print ``read_shard`` figures of shard 0 of ``store``, against ``floor``."""
    tokens = store.manifest["shards"][0]["positions"]
    backend = store.manifest["backend"]

    def read() -> None:
        store._cache = None  # time a cold decode, not the one-shard cache
        store.read_shard(0)

    # Alternated, so a drift of the machine's speed hits both alike.
    pairs = [
        alternate(i, lambda: cpu_time(read), lambda: cpu_time(lambda: store.read_shard_arrays(0)))
        for i in range(repeats)
    ]
    total, arrays = min(p[0] for p in pairs), min(p[1] for p in pairs)
    bpt = store.manifest["statistics"]["bytes_per_token"]
    print(
        f"  {backend:8s} read_shard {tokens / total / 1e6:.2f} M tokens/s "
        f"(x{floor / total:.2f} of floor; fetch+verify+backend decode alone "
        f"{tokens / arrays / 1e6:.2f} M tokens/s), {bpt:.1f} bytes/token{note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_store_options(parser, repeats_help="timings per figure (best)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (url, label) in enumerate(stores_to_read(args, tmp)):
            store = open_store(url)
            print(describe(store, f"{label} {url}"))
            floor = floor_lines(store, args.repeats)
            backend_lines(store, floor, args.repeats)
            other = "parquet" if store.manifest["backend"] == "zarr" else "zarr"
            t0 = time.perf_counter()
            convert_store(url, f"{tmp}/{other}{n}", backend=other)
            seconds = time.perf_counter() - t0
            tokens = sum(s["positions"] for s in store.manifest["shards"])
            note = f"; converted at {tokens / seconds / 1e3:.0f} k tokens/s (wall)"
            backend_lines(open_store(f"{tmp}/{other}{n}"), floor, args.repeats, note)


if __name__ == "__main__":
    main()
