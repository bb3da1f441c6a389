"""Peak memory and time of ``fused_sparse_loss`` against the naive path, forward + backward.

The naive path materialises float32 logits ``hidden @ W.T`` (N x V), calls ``sparse_loss`` and
backpropagates. The fused path goes from hidden states to the loss chunk by chunk. Both get the
same inputs (a sparse top-K teacher cache with the label often outside the support) and must
give the same loss; the table prints ratios fused / naive measured in the same run.

How memory is measured, honestly:
- CPU: every (method, objective) runs in a fresh subprocess. After the inputs are built, the
  process resets its peak resident set size (writing ``5`` to ``/proc/self/clear_refs`` resets
  ``VmHWM`` on Linux), runs forward + backward once, and reports ``VmHWM - VmRSS(before)``:
  the extra resident memory the loss needed at its peak, inputs excluded. Where the reset is not
  available it falls back to ``ru_maxrss`` and says so (then the figure includes set-up).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated before the call.
Time is the best of ``--repeats`` forward + backward runs in that same process.

Usage:
    python benchmarks/bench_fused_loss.py                    # N=8192, H=576, V=49152, CPU
    python benchmarks/bench_fused_loss.py --n 1024           # a quick run
    python benchmarks/bench_fused_loss.py --device cuda --vocab 128256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(args, device):
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    n, h, v, k = args.n, args.hidden, args.vocab, args.k
    hidden = (torch.randn(n, h, generator=g) / h**0.25).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.25).to(device, dtype).requires_grad_(True)
    # A peaked sparse teacher: descending top-K log-probs, random distinct ids, a tail.
    head = torch.log_softmax(torch.randn(n, k + 1, generator=g).sort(-1, descending=True)[0], -1)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))])
    ids = ids.repeat((n + 63) // 64, 1)[:n]
    labels = torch.where(
        torch.rand(n, generator=g) < 0.6, ids[:, 0], torch.randint(0, v, (n,), generator=g)
    )
    labels[:: max(n // 16, 1)] = -100  # some masked positions
    lab = torch.where(labels == ids[:, 0], head[:, 0], head[:, k] - 3.0)
    cache = (ids, head[:, :k], head[:, k], lab, labels)
    return hidden, weight, tuple(t.to(device) for t in cache)


def _worker(args) -> None:
    import torch

    from logitstore.divergences import fused_sparse_loss, sparse_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    hidden, weight, cache = _inputs(args, device)
    n_valid = int((cache[-1] != -100).sum())

    def run():
        hidden.grad = weight.grad = None
        if args.method == "naive":
            logits = hidden.float() @ weight.float().T
            loss = sparse_loss(args.objective, logits, *cache).sum() / n_valid
        else:
            loss = fused_sparse_loss(
                args.objective, hidden, weight, *cache, chunk_size=args.chunk_size
            )
        loss.backward()
        return float(loss)

    cuda = device.type == "cuda"
    peaks, times, loss = [], [], float("nan")
    exact_reset = True
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _status_kib("VmRSS") * 1024
            exact_reset = _reset_peak_rss() and exact_reset
        t0 = time.perf_counter()
        loss = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() - before)
        elif exact_reset:
            peaks.append(_status_kib("VmHWM") * 1024 - before)
        else:
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(
        json.dumps(
            {"peak": max(peaks), "time": min(times), "loss": loss, "exact_reset": exact_reset}
        )
    )


def _spawn(args, method: str, objective: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--objective", objective]
    for key in ("n", "hidden", "vocab", "k", "chunk_size", "device", "dtype", "repeats"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method}/{objective} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="tokens")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--k", type=int, default=32, help="teacher support size")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--objectives", default="fkl,rkl,drkl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["naive", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--objective", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU: not run (no CUDA device available)")
        return
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"N={args.n} H={args.hidden} V={args.vocab} K={args.k} chunk={args.chunk_size} "
        f"dtype={args.dtype} device={where} repeats={args.repeats}"
    )
    print(f"{'objective':<10}{'naive MiB':>11}{'fused MiB':>11}{'mem ratio':>11}"
          f"{'naive s':>10}{'fused s':>10}{'time ratio':>11}{'|dloss|':>10}")  # fmt: skip
    exact = True
    for objective in args.objectives.split(","):
        naive = _spawn(args, "naive", objective)
        fused = _spawn(args, "fused", objective)
        exact = exact and naive["exact_reset"] and fused["exact_reset"]
        mib = 2.0**20
        print(
            f"{objective:<10}{naive['peak'] / mib:>11.0f}{fused['peak'] / mib:>11.0f}"
            f"{fused['peak'] / naive['peak']:>11.3f}{naive['time']:>10.2f}{fused['time']:>10.2f}"
            f"{fused['time'] / naive['time']:>11.2f}{abs(fused['loss'] - naive['loss']):>10.1e}"
        )
    if args.device == "cpu":
        how = "VmHWM - VmRSS, peak reset per run" if exact else "ru_maxrss (includes set-up)"
        print(f"memory: extra resident memory at peak ({how}); aim: ratio <= 0.15, time <= 1.2")
        if not torch.cuda.is_available():
            print("GPU: not run (no CUDA device available)")


if __name__ == "__main__":
    main()
