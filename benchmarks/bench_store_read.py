"""Store read throughput: tokens per second of ``LogitStore.read_shard`` on one core.

Builds a store of synthetic teacher distributions at a real vocabulary size (49152, as
SmolLM2) with the default ``topk`` codec, then times, per shard and in the same run:

* ``floor``: ``codec.decode`` of the arrays already in memory (what any reader must pay);
* ``read_shard``: fetch + size and SHA-256 checks + backend decode + ``codec.decode`` + value
  checks + slicing;
* ``read_shard`` without the value checks (ids, NaN, signs, mass; ``codecs/_checks.py``),
  timed alternately with the above, and the checks alone on the shard's decoded positions
  as a share of ``read_shard`` without them (aim: <= 5 %). Both in CPU time, best of
  ``--repeats``: on a shared machine the difference of two totals is noisier than the part.

and prints tokens/s and the ratio ``read_shard / floor`` for each backend. Not a test: it
prints figures. The loader's aim is >= 1M tokens/s per core.

    python -m logitstore.benchmarks.bench_store_read [--tokens 131072] [--k 128] [--backend zarr parquet]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.codecs._checks import check_positions

VOCAB = 49152
DOC_TOKENS = 512


def synthetic_documents(codec, tokens: int, seed: int = 0) -> list[EncodedDocument]:
    """Documents whose distributions look like an LM's: a Zipf prior plus per-position noise."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    prior = prior[torch.randperm(VOCAB, generator=g)]
    docs = []
    for d in range(tokens // DOC_TOKENS):
        ids = torch.randint(0, VOCAB, (DOC_TOKENS,), generator=g)
        logits = prior + 2.0 * torch.randn(DOC_TOKENS - 1, VOCAB, generator=g)
        enc = codec.encode(torch.log_softmax(logits, -1), ids[1:], temperatures=(), generator=g)
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(f"doc{d}", ids.numpy(), np.ones(DOC_TOKENS - 1, bool), fields))
    return docs


def alternate(i: int, a, b) -> tuple[float, float]:
    """``(a(), b())``, run in turn a-b, then b-a: neither always runs after the other."""
    if i % 2:
        tb = b()
        return a(), tb
    return a(), b()


def checked(codec, fields) -> None:
    """Decoding as the reader does it: every value checked, partly while decoding."""
    codec.decode(fields, VOCAB)


def best_of(fn, repeats: int = 5, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def cpu_best_of(fn, repeats: int = 5) -> float:
    """Best CPU time of this process: on a shared machine, time spent waiting for a core
    would swamp a few percent."""
    return best_of(fn, repeats, time.process_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per shard")
    parser.add_argument("--backend", nargs="+", default=["zarr", "parquet"])
    parser.add_argument("--k", type=int, default=128, help="topk support size")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure (best)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = get_codec("topk", k=args.k)
    docs = synthetic_documents(codec, args.tokens)
    tokens = sum(len(d.input_ids) for d in docs)
    fields = {k: np.concatenate([d.fields[k] for d in docs]) for k in docs[0].fields}
    decoded = codec.decode(fields)
    # Alternated, so a drift of the machine's speed hits both alike.
    pairs = [
        alternate(
            i,
            lambda: cpu_best_of(lambda: codec.decode(fields), 1),
            lambda: cpu_best_of(lambda: checked(codec, fields), 1),
        )
        for i in range(args.repeats)
    ]
    floor, with_checks = min(p[0] for p in pairs), min(p[1] for p in pairs)
    check_alone = cpu_best_of(lambda: check_positions(codec, decoded, VOCAB), args.repeats)
    print(f"codec {codec.to_json()['configuration']}, vocab {VOCAB}, {tokens} tokens per shard")
    print(f"floor (codec.decode in memory): {tokens / floor / 1e6:.2f} M tokens/s (CPU time)")
    print(
        f"floor + value checks: {tokens / with_checks / 1e6:.2f} M tokens/s, "
        f"x{floor / with_checks:.3f} ({100 * (with_checks / floor - 1):+.1f} % time; the "
        f"checks alone {1e3 * check_alone:.2f} ms per shard, {100 * check_alone / floor:.1f} % "
        "of the floor)"
    )
    for backend in args.backend:
        time_backend(backend, codec, docs, floor, args.repeats)


def time_backend(
    backend: str, codec, docs: list[EncodedDocument], floor: float, repeats: int
) -> None:
    """Write one shard in ``backend``, then print its read and write throughput."""
    tokens = sum(len(d.input_ids) for d in docs)
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}
    with tempfile.TemporaryDirectory() as tmp:
        w = StoreWriter(tmp + "/s", codec=codec, backend=backend, metadata=meta, vocab_size=VOCAB)
        t0 = time.perf_counter()
        w.write_shard(0, docs)
        write = time.perf_counter() - t0
        w.finalize(1)
        store = open_store(tmp + "/s")

        def read(checks: bool) -> float:
            store._cache = None  # time a cold decode, not the one-shard cache
            store._check_values = checks
            t0 = time.process_time()
            store.read_shard(0)
            return time.process_time() - t0

        # Alternated, so a drift of the machine's speed or an after-effect hits both alike.
        pairs = [alternate(i, lambda: read(False), lambda: read(True)) for i in range(repeats)]
        unchecked, total = min(p[0] for p in pairs), min(p[1] for p in pairs)
        arrays = cpu_best_of(lambda: store.read_shard_arrays(0), repeats)
        bpt = store.manifest["statistics"]["bytes_per_token"]
        print(
            f"{backend:8s} read_shard {tokens / total / 1e6:.2f} M tokens/s "
            f"(x{floor / total:.2f} of floor; fetch+verify+backend decode alone "
            f"{tokens / arrays / 1e6:.2f} M tokens/s), write {tokens / write / 1e3:.0f} k tokens/s, "
            f"{bpt:.1f} bytes/token"
        )
        store._check_values = False
        decoded = store.decode_shard(0, store.read_shard_arrays(0))
        # Ids compared in a pass of their own here: an upper bound of what decoding pays.
        alone = cpu_best_of(lambda: check_positions(codec, decoded, VOCAB), 3 * repeats)
        print(
            f"{backend:8s} value checks (CPU time): {1e3 * alone:.2f} ms per shard as a pass of "
            "their own (an upper bound), "
            f"{100 * alone / unchecked:.1f} % of read_shard without them "
            f"({tokens / unchecked / 1e6:.2f} M tokens/s); read_shard with them, timed in turn: "
            f"{tokens / total / 1e6:.2f} M tokens/s ({100 * (total / unchecked - 1):+.1f} % time)"
        )


if __name__ == "__main__":
    main()
