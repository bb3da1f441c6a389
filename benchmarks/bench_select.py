"""``top_k`` (``logitstore/codecs/_select.py``) against ``torch.topk``, on one CPU thread.

Rows are float32 logits shaped like a teacher's: a normal bulk (standard deviation 2) with a
peak of 32 likely tokens 4 to 16 above it, as real teacher rows are peaked (``--rows normal``
drops the peak). Each call takes ``P`` rows, as the top-k codec's blocks do (``P = 10`` at
``V = 49152``: ``CPU_BLOCK_ELEMENTS / V``); ``P = 256`` is a whole batch at once. Both
functions get the same rows: each call takes the next ``P`` rows of a pool of at least 64 MiB,
more than the last-level cache, so the rows come from memory, as a teacher batch's logits do
when the codec reaches them. (Rows already in cache, a pool of two blocks of 10 rows, measured
within run-to-run noise of this on the development machine, so no second setting is printed.)

Each figure is microseconds per row (``us``), the best of ``--repeats`` passes over the pool
(the two functions alternate, pass by pass); ratio = torch.topk / top_k, measured in the same
run. On a shared machine the ratios move by about 10 % from run to run.
``same`` says whether the values were equal to torch.topk's on the first block. Not a test:
figures and ratios only.

Usage:
    python -m logitstore.benchmarks.bench_select                 # V=49152, k=64,128, P=10 and 256
    python -m logitstore.benchmarks.bench_select --vocab 151936 --k 128 --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from logitstore.codecs._select import top_k

COLD_BYTES = 64 * 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.machine()


def logit_rows(rows: int, vocab: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """float32 ``(rows, vocab)``: a normal bulk and, for ``peaked``, 32 tokens 4-16 above it."""
    z = torch.randn(rows, vocab, generator=gen) * 2
    if kind == "peaked":
        ids = torch.randint(0, vocab, (rows, 32), generator=gen)
        z[torch.arange(rows)[:, None], ids] += 4 + 12 * torch.rand(rows, 32, generator=gen)
    return z


def per_row_us(fn: Callable[[torch.Tensor], object], pool: list[torch.Tensor]) -> float:
    """Microseconds per row of one pass of ``fn`` over the blocks of ``pool``."""
    start = time.perf_counter()
    for block in pool:
        fn(block)
    return (time.perf_counter() - start) / sum(len(b) for b in pool) * 1e6


def compare(pool: list[torch.Tensor], k: int, repeats: int) -> tuple[float, float, bool]:
    """(torch.topk us/row, top_k us/row, whether the values agree on the first block)."""
    same = torch.equal(top_k(pool[0], k)[0], torch.topk(pool[0], k, dim=1).values)
    base = ours = float("inf")
    for _ in range(repeats):
        base = min(base, per_row_us(lambda z: torch.topk(z, k, dim=1), pool))
        ours = min(ours, per_row_us(lambda z: top_k(z, k), pool))
    return base, ours, same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--k", default="64,128", help="comma-separated support sizes")
    p.add_argument("--p", default="10,256", help="comma-separated rows per call")
    p.add_argument("--rows", default="peaked", choices=["peaked", "normal"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(
        f"V={args.vocab} rows={args.rows} threads=1 torch {torch.__version__} "
        f"numpy {np.__version__} {cpu_name()}"
    )
    print(f"{'P':>5}{'k':>6}{'torch.topk':>12}{'top_k':>9}{'ratio':>8}  same")
    for rows in (int(v) for v in args.p.split(",")):
        blocks = -(-COLD_BYTES // (rows * args.vocab * 4))
        pool = [logit_rows(rows, args.vocab, args.rows, gen) for _ in range(blocks)]
        for k in (int(v) for v in args.k.split(",")):
            base, ours, same = compare(pool, k, args.repeats)
            print(
                f"{rows:>5}{k:>6}{base:>10.1f}us{ours:>7.1f}us{base / ours:>7.2f}x"
                f"  {'yes' if same else 'NO'}"
            )


if __name__ == "__main__":
    main()
