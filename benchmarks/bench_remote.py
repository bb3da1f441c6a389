"""Remote reading: read-ahead and the local shard cache against a slow object store.

A store is written to an in-memory filesystem that adds a fixed latency per request and a
bandwidth limit (the shape of S3 or the Hub seen from one machine); a consumer then iterates
it while spending a fixed time per shard (standing in for training). Printed: wall time per
pass for read-ahead off and on, and a second pass served by ``cache_dir``, with ratios against
the no-read-ahead baseline measured in the same run.

    python benchmarks/bench_remote.py --latency 0.05 --mbps 100 --work 0.1
"""

from __future__ import annotations

import argparse
import tempfile
import time

import fsspec
import torch
from fsspec.implementations.memory import MemoryFileSystem

from logitstore import StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.writer import EncodedDocument


class SlowMemory(MemoryFileSystem):
    """In-memory files behind a per-request latency and a bandwidth limit."""

    protocol = "slowmem"
    store: dict = {}
    pseudo_dirs = [""]
    latency = 0.05
    bytes_per_second = 100e6

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start, end, **kwargs)
        time.sleep(self.latency + len(data) / self.bytes_per_second)
        return data


def build(url: str, shards: int, docs: int, tokens: int, vocab: int) -> None:
    codec = get_codec("topk", k=128, values="q8")
    g = torch.Generator().manual_seed(0)
    meta = {
        "teacher": {"model": "synthetic"},
        "tokenizer": {"vocab_size": vocab},
        "capture": {"temperatures": []},
        "source": {"path": "synthetic"},
    }
    w = StoreWriter(url, codec=codec, backend="parquet", metadata=meta, vocab_size=vocab)
    for j in range(shards):
        batch = []
        for d in range(docs):
            ids = torch.randint(0, vocab, (tokens,), generator=g)
            lp = torch.log_softmax(4.0 * torch.randn(tokens - 1, vocab, generator=g), dim=-1)
            enc = codec.encode(lp, ids[1:])
            fields = {k: v.numpy() for k, v in enc.items()}
            batch.append(EncodedDocument(f"{j}-{d}", ids.numpy(), (ids[1:] >= 0).numpy(), fields))
        w.write_shard(j, batch)
    w.finalize(shards)


def one_pass(url: str, work: float, **kwargs) -> float:
    store = open_store(url, **kwargs)
    start = time.perf_counter()
    last = None
    for doc in store.iter_documents():
        shard = doc.doc_id.split("-")[0]
        if shard != last:  # simulated training time per shard
            time.sleep(work)
            last = shard
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    ap.add_argument("--mbps", type=float, default=100.0, help="MB/s")
    ap.add_argument("--work", type=float, default=0.1, help="consumer seconds per shard")
    args = ap.parse_args()
    fsspec.register_implementation("slowmem", SlowMemory, clobber=True)
    SlowMemory.latency, SlowMemory.bytes_per_second = 0.0, 1e12
    url = "slowmem://bench/store"
    build(url, args.shards, args.docs, args.tokens, args.vocab)
    SlowMemory.latency, SlowMemory.bytes_per_second = args.latency, args.mbps * 1e6
    size = sum(s["bytes"] for s in open_store(url).manifest["shards"])
    print(
        f"store: {args.shards} shards, {size / 1e6:.2f} MB; latency {args.latency * 1e3:.0f} ms, "
        f"{args.mbps:.0f} MB/s; consumer {args.work * 1e3:.0f} ms per shard"
    )
    base = one_pass(url, args.work, readahead=0)
    print(f"readahead=0        {base:7.3f} s   1.00x")
    for n in (1, 2):
        t = one_pass(url, args.work, readahead=n)
        print(f"readahead={n}        {t:7.3f} s   {base / t:.2f}x faster")
    with tempfile.TemporaryDirectory() as cache:
        cold = one_pass(url, args.work, readahead=1, cache_dir=cache)
        warm = one_pass(url, args.work, readahead=1, cache_dir=cache)
    print(f"cache, first pass  {cold:7.3f} s   {base / cold:.2f}x")
    print(f"cache, second pass {warm:7.3f} s   {base / warm:.2f}x")


if __name__ == "__main__":
    main()
