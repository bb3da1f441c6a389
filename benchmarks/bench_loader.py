"""Loader throughput: trained tokens per second per core from a local store at k = 64.

Builds a local store of synthetic teacher distributions at a real vocabulary size (49152, as
SmolLM2) with the ``topk`` codec (k = 64, 8-bit values), then, in the same run, measures:

* ``read_shard``: the reader alone, decoding every shard (the baseline);
* ``loader``: ``StoreDataset`` end to end: shuffled windows, background decode, batching by
  token budget and collation into torch tensors.

For each: tokens per wall second, and tokens per CPU second of the whole process (all its
threads), which is the per-core figure. The aim is >= 1M tokens/s per core. Not a test.

    python -m logitstore.benchmarks.bench_loader [--tokens 65536] [--backend zarr]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.dataset import StoreDataset

VOCAB = 49152
DOC_TOKENS = 512


def synthetic_documents(codec, tokens: int, seed: int = 0) -> list[EncodedDocument]:
    """LM-like distributions: a Zipf prior over a shuffled vocabulary plus per-position noise."""
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


def timed(fn) -> tuple[float, float, int]:
    """Best of three: (wall seconds, process CPU seconds, tokens)."""
    best = None
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = fn()
        result = (time.perf_counter() - wall, time.process_time() - cpu, tokens)
        best = result if best is None or result[0] < best[0] else best
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens in the store")
    # 64 documents of 512 tokens: 32k-token shards (the teacher pass writes 256 documents a
    # shard by default); smaller shards pay per-file costs (open, checksum setup) more often.
    parser.add_argument("--docs-per-shard", type=int, default=64)
    parser.add_argument("--backend", default="zarr")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(1)

    codec = get_codec("topk", k=64, values="q8")
    docs = synthetic_documents(codec, args.tokens)
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}
    with tempfile.TemporaryDirectory() as tmp:
        writer = StoreWriter(
            tmp, codec=codec, backend=args.backend, metadata=meta, vocab_size=VOCAB
        )
        shards = [
            docs[i : i + args.docs_per_shard] for i in range(0, len(docs), args.docs_per_shard)
        ]
        for index, shard in enumerate(shards):
            writer.write_shard(index, shard)
        writer.finalize(len(shards))
        store = open_store(tmp)

        def read_all() -> int:
            return sum(
                d.num_tokens - 1 for j in range(store.num_shards) for d in store.read_shard(j)
            )

        def load_all() -> int:
            ds = StoreDataset(store, tokens_per_batch=args.tokens_per_batch, rank=0, world_size=1)
            return sum(len(b["labels"]) for b in ds)

        print(
            f"store: {args.tokens} tokens, {store.num_shards} shards, k=64 q8, "
            f"vocab {VOCAB}, backend {args.backend}"
        )
        base = None
        for name, fn in (("read_shard", read_all), ("loader", load_all)):
            wall, cpu, tokens = timed(fn)
            print(
                f"{name:>10}: {tokens / wall / 1e6:6.2f} M tokens/s wall, "
                f"{tokens / cpu / 1e6:6.2f} M tokens/s per CPU second"
            )
            base = base or wall
        print(f"loader / read_shard wall time: {wall / base:.2f}x")


if __name__ == "__main__":
    main()
