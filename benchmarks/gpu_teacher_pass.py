"""Teacher pass with ``--device-map auto`` on CUDA against the bare forward of the same placed model.

The teacher is placed by accelerate (``device_map="auto"``, optionally under ``--max-memory``, so
that some layers go to the CPU or disk), then, as in ``benchmarks/bench_teacher_pass.py``, runs
alternate ``bare, pass, bare, pass, ..., bare``:

* ``bare``: the placed teacher's forward only (no KV cache, as the pass runs it), over exactly
  the batches the pass forms, inputs on the device the logits come out on (the pass's own
  choice), logits left there;
* ``pass``: ``run_teacher_pass`` end to end with that same loaded teacher.

Each pass is set against the geometric mean of the two bare runs beside it; the median of those
ratios is the figure to read (aim: >= 0.97x). Prints tokens/s of each and one
``{"figures": ...}`` line. Without CUDA it prints why it skipped and exits 0.

One command, a few minutes on one GPU (SmolLM2-135M by default; ``--teacher`` takes any local
model directory or GGUF file):

    python -m logitstore.benchmarks.gpu_teacher_pass [--teacher PATH] [--max-memory 0=40GiB,cpu=60GiB]
        [--tokens 60000] [--repeats 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from logitstore.benchmarks.bench_teacher_pass import default_gguf, sandwich, timed, write_texts
from logitstore.pipelines._data import build_windows, load_rows
from logitstore.pipelines._placement import Placement
from logitstore.pipelines._teacher import load_teacher
from logitstore.pipelines.teacher_pass import (
    TeacherPassConfig,
    plan_batches,
    plan_shards,
    run_teacher_pass,
)


def bare_forward(teacher, shards, batch_size: int) -> None:
    """The placed model's forward alone over the pass's batches, called as the pass calls it."""
    with torch.inference_mode():
        for windows in shards:
            for batch in plan_batches(windows, batch_size):
                ws = [windows[i] for i in batch]
                ids = torch.zeros(len(ws), max(w.num_tokens for w in ws), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, w in enumerate(ws):
                    ids[b, : w.num_tokens] = torch.from_numpy(w.input_ids)
                    mask[b, : w.num_tokens] = 1
                ids, mask = ids.to(teacher.device), mask.to(teacher.device)
                _ = teacher.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)


def placed_on(model) -> str:
    """``"cuda:0 x30, cpu x2"``: where accelerate put the modules of its device map."""
    device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    counts = collections.Counter(str(d) for d in device_map.values())
    return ", ".join(f"{d} x{n}" for d, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, default=None, help="model directory or .gguf")
    parser.add_argument("--max-memory", default=None, help="accelerate budget, 0=40GiB,cpu=60GiB")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=60000, help="about this many tokens of text")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--docs-per-shard", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="pass runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device visible; this benchmark measures the pass on a GPU")
        return 0

    teacher_path = args.teacher or default_gguf()
    t0 = time.perf_counter()
    placement = Placement.resolve("auto", args.max_memory)
    teacher = load_teacher(str(teacher_path), dtype=args.dtype, placement=placement)
    print(
        f"teacher {teacher_path.name} ({teacher.dtype}) placed by device_map=auto"
        f"{f' under {args.max_memory}' if args.max_memory else ''} on {placed_on(teacher.model)}; "
        f"logits on {teacher.device}; loaded in {time.perf_counter() - t0:.1f} s"
    )
    print(f"GPU: {torch.cuda.get_device_name(teacher.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        write_texts(data, teacher.tokenizer, args.tokens)
        cfg = TeacherPassConfig(
            teacher=str(teacher_path), data=str(data), out="", max_length=args.max_length,
            batch_size=args.batch_size, docs_per_shard=args.docs_per_shard,
            fidelity_positions=args.docs_per_shard, progress=False,
        )  # fmt: skip
        windows = build_windows(load_rows(str(data)), teacher.tokenizer, max_length=args.max_length)
        shards = plan_shards(windows, args.docs_per_shard)
        tokens = sum(w.num_tokens for w in windows)
        print(
            f"{len(windows)} windows, {len(shards)} shards, {tokens} tokens, batch {args.batch_size}"
        )
        bare_forward(teacher, shards[:1], args.batch_size)  # warm-up: kernels, allocator
        runs: list[tuple[str, float, float]] = []
        summary: dict = {}
        for n, mode in enumerate(["bare"] + ["pass", "bare"] * args.repeats):
            if mode == "bare":
                _, wall, cpu = timed(bare_forward, teacher, shards, args.batch_size)
            else:
                cfg.out = str(Path(tmp) / f"store{n}")
                summary, wall, cpu = timed(run_teacher_pass, cfg, teacher=teacher)
                assert summary["tokens"] == tokens
            runs.append((mode, wall, cpu))
            print(f"  run {n:2d} {mode:5s} {tokens / wall:10,.0f} tok/s", flush=True)
    ratios = sandwich(runs, 0)
    best_bare = min(r[1] for r in runs if r[0] == "bare")
    best_pass = min(r[1] for r in runs if r[0] == "pass")
    median = statistics.median(ratios["pass"])
    print(f"bare forward (placed model): {tokens / best_bare:10,.0f} tok/s (best)")
    print(f"teacher pass --device-map auto: {tokens / best_pass:10,.0f} tok/s (best)")
    print(
        f"ratio pass / bare: {median:.3f}x (median of {len(ratios['pass'])}, each against the "
        f"bare runs beside it), {best_bare / best_pass:.3f}x (best of each); aim >= 0.97x"
    )
    stats = summary["manifest"]["statistics"]
    print(f"store: {stats['bytes_per_token']:.1f} bytes/token")
    figures = {
        "bare_tok_s": round(tokens / best_bare),
        "pass_tok_s": round(tokens / best_pass),
        "ratio_median": round(median, 4),
    }
    print(json.dumps({"figures": figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
