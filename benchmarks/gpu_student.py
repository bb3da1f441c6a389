"""The student stage on one GPU: fused-loss memory, a bf16 FSDP run and ZeRO-3 if installed.

One command, a few minutes on one GPU (``python -m logitstore.benchmarks.gpu_student``):

1. ``bench_fused_loss`` on CUDA at a 128k vocabulary in bf16: the fused loss's extra peak
   memory and time against materialised logits (forward + backward).
2. A synthetic top-k store (LM-like teacher rows, vocabulary 49152, k = 128, written with
   ``StoreWriter``), and ``KDTrainer`` on it under ``torchrun --nproc-per-node 1`` with
   ``bf16=True`` and FSDP2 (``fsdp=True``): tokens per second and peak memory; then the same
   with DeepSpeed ZeRO-3 when ``deepspeed`` imports.
3. The same run without FSDP, as the baseline of the ratio.

Without CUDA it says so and exits 0 (the test suite never needs a GPU). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB, K = 49152, 128


def write_store(root: Path, docs: int = 64, length: int = 512) -> None:
    """A top-k store of LM-like synthetic teacher rows (a shuffled Zipf prior plus noise)."""
    from logitstore import EncodedDocument, StoreWriter
    from logitstore.codecs import get_codec

    codec = get_codec("topk", k=K)
    meta = {
        "teacher": {"model": "synthetic"},
        "tokenizer": {"vocab_size": VOCAB},
        "capture": {"temperatures": []},
        "source": {"path": "synthetic"},
    }
    writer = StoreWriter(str(root), codec=codec, backend="zarr", metadata=meta, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(0)
    prior = -1.1 * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    prior = prior[torch.randperm(VOCAB, generator=g)]
    per_shard = 16
    for shard in range(docs // per_shard):
        out = []
        for d in range(per_shard):
            ids = torch.randint(0, VOCAB, (length,), generator=g)
            logits = prior + 2.0 * torch.randn(length - 1, VOCAB, generator=g)
            fields = {k: v.numpy() for k, v in codec.encode(logits, ids[1:]).items()}
            mask = np.ones(length - 1, bool)
            out.append(EncodedDocument(f"{shard}/{d}", ids.numpy(), mask, fields))
        writer.write_shard(shard, out)
    writer.finalize(docs // per_shard)


RUN = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
from logitstore.hf import KDTrainer
store, out, mode = sys.argv[1:4]
config = LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096,
                     num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
model = LlamaForCausalLM(config)
extra = {}
if mode == "fsdp":
    extra = {"fsdp": True, "fsdp_config": {"version": 2}}
elif mode == "zero3":
    extra = {"deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}}
marks = []
class Clock(TrainerCallback):
    def on_step_end(self, *a, **k):
        torch.cuda.synchronize(); marks.append(time.perf_counter())
args = TrainingArguments(out, max_steps=12, learning_rate=1e-4, bf16=True, logging_steps=4,
                         save_strategy="no", report_to="none", disable_tqdm=True, **extra)
trainer = KDTrainer(model=model, args=args, train_dataset=store, divergence="drkl",
                    tokens_per_batch=8192, callbacks=[Clock()])
torch.cuda.reset_peak_memory_stats()
trainer.train()
steps = [b - a for a, b in zip(marks[2:], marks[3:])]
tokens = trainer.kd_tokens / len(marks)
print(json.dumps({"mode": mode, "s_per_step": sorted(steps)[len(steps) // 2],
                  "tokens_per_step": tokens,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
"""


def trainer_run(store: Path, mode: str, work: Path) -> dict | None:
    script = work / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    done = subprocess.run(
        [*cmd, str(script), str(store), str(work / mode), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith('{"mode"')]
    if done.returncode != 0 or not rows:
        print(f"{mode}: failed (exit {done.returncode})\n{done.stderr[-2000:]}")
        return None
    return json.loads(rows[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (this script is for a GPU machine)")
        return
    print(f"device: {torch.cuda.get_device_name()}")
    subprocess.run(
        [sys.executable, "-m", "logitstore.benchmarks.bench_fused_loss", "--device", "cuda",
         "--vocab", "128256", "--dtype", "bfloat16"],
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_store(work / "store")
        base = trainer_run(work / "store", "plain", work)
        modes = ["fsdp"]
        try:
            import deepspeed  # noqa: F401

            modes.append("zero3")
        except Exception as exc:  # noqa: BLE001
            print(f"zero3: skipped, deepspeed does not import ({exc!r})")
        for mode in modes:
            row = trainer_run(work / "store", mode, work)
            if row is None:
                continue
            ratio = row["s_per_step"] / base["s_per_step"] if base else float("nan")
            print(
                f"{mode}: {row['tokens_per_step'] / row['s_per_step']:.0f} tokens/s, "
                f"peak {row['peak_gib']:.2f} GiB, {ratio:.2f}x the unsharded step"
            )
        if base:
            print(
                f"plain: {base['tokens_per_step'] / base['s_per_step']:.0f} tokens/s, "
                f"peak {base['peak_gib']:.2f} GiB"
            )


if __name__ == "__main__":
    main()
