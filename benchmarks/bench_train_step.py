"""Time of one training step with the offline-KD loss against a plain cross-entropy step.

Same student, same batch, same optimizer (AdamW), both in one run:

* ``ce``: ``model(input_ids, attention_mask, labels=...)``, the ``transformers`` loss on full
  ``[batch, seq, vocab]`` logits (the baseline);
* ``kd``: the trainer's step: final hidden states through ``fused_sparse_loss`` against a k = 64
  sparse teacher (synthetic, LM-like), never forming full logits;
* ``kd+ce``: the same with a cross-entropy term (``ce_weight``), computed the same fused way;
* ``trainer``: the step as ``logitstore train`` runs it, inside Hugging Face ``Trainer``
  (``logitstore.hf.KDTrainer``: its loop, callbacks, gradient clipping, LR schedule and the
  fused loss in the patched forward), over the same batch; timed per optimizer step between
  ``on_step_begin`` and ``on_step_end``. Its baseline is ``kd`` plus the clipping and the LR
  schedule the bare loop also needs (``loop``), the loop logitstore had before Trainer.

Prints the median step time of each and the ratios; the aims are ``kd / ce <= 1.10`` and
``trainer / loop <= 1.05``. On CUDA the bare steps run under bf16 autocast and the trainer
with ``bf16=True``. Not a test.

    python -m logitstore.benchmarks.bench_train_step [--hidden 256 --layers 4 --vocab 49152 --tokens 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from logitstore.divergences import DistillationLoss
from logitstore.hf import (
    TEACHER_FIELDS,
    KDTrainer,
    StoreBatches,
    TeacherBatch,
    patch_for_distillation,
)


def synthetic_batch(vocab: int, docs: int, length: int, k: int, seed: int = 0) -> dict:
    """A collated batch (see ``logitstore.dataset.collate_documents``) with a top-k teacher."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (docs, length), generator=g)
    n = docs * (length - 1)
    labels = input_ids[:, 1:].reshape(-1)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    prior = prior[torch.randperm(vocab, generator=g)]
    logp = torch.log_softmax(prior + 2.0 * torch.randn(n, vocab, generator=g), -1)
    top, ids = logp.topk(k, dim=-1)
    mass = torch.logsumexp(top, -1).clamp(max=-1e-7)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "position_mask": torch.ones(docs, length - 1, dtype=torch.bool),
        "labels": labels,
        "support_ids": ids,
        "support_logprobs": top,
        "tail_logmass": torch.log(-torch.expm1(mass)),
        "label_logprob": logp.gather(1, labels[:, None])[:, 0],
        "tail_logsumexp": torch.zeros(n, 0),
        "support_counts": None,
        "num_tokens": n,
    }


def median_time(step, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    batch = {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in synthetic_batch(args.vocab, args.docs, args.length, args.k).items()
    }
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    ce_labels = torch.cat([batch["input_ids"][:, :1] * 0 - 100, batch["input_ids"][:, 1:]], 1)

    def ce_step() -> None:
        with autocast:
            loss = lm(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=ce_labels,
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    teacher = TeacherBatch(
        batch["position_mask"], {k: batch.get(k) for k in TEACHER_FIELDS}, metrics=False
    )

    def kd_step(ce_weight: float, clip: bool = False):
        loss_fn = DistillationLoss.create("fkl", ce_weight=ce_weight, chunk_size=args.chunk_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

        def step() -> None:
            patch_for_distillation(lm, loss_fn)
            with autocast:
                out = lm(
                    batch["input_ids"],
                    batch["attention_mask"],
                    kd_batch=teacher,
                    num_items_in_batch=float(batch["num_tokens"]),
                )
            out.loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            optimizer.step()
            if clip:
                schedule.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    tokens = args.docs * (args.length - 1)
    print(
        f"student: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.docs} x {args.length}; k={args.k}; {device}, {args.threads} thread(s)"
    )
    base = median_time(ce_step, device, args.repeats)
    print(f"{'ce':>6}: {base * 1e3:8.1f} ms/step  {tokens / base:9.0f} tokens/s  1.00x")
    for name, step in (("kd", kd_step(0.0)), ("kd+ce", kd_step(0.1))):
        t = median_time(step, device, args.repeats)
        print(f"{name:>6}: {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tokens/s  {t / base:.2f}x")
    # The engine against the bare loop, alternated so that drift of the machine's speed
    # falls on both.
    loops, trainers = [], []
    for _ in range(3):
        loops.append(median_time(kd_step(0.0, clip=True), device, args.repeats))
        trainers.append(trainer_step_time(lm, batch, device, args.repeats, args.chunk_size))
    loop, trained = statistics.median(loops), statistics.median(trainers)
    print(f"{'loop':>7}: {loop * 1e3:8.1f} ms/step  {tokens / loop:9.0f} tokens/s  1.00x")
    print(
        f"{'trainer':>7}: {trained * 1e3:8.1f} ms/step  {tokens / trained:9.0f} tokens/s  "
        f"{trained / loop:.2f}x the bare loop (aim <= 1.05x; median of 3 alternated rounds)"
    )


class _Repeat(StoreBatches):
    """The same collated batch, forever: the trainer reads what the bare loop reads."""

    def __init__(self, batch: dict) -> None:
        from types import SimpleNamespace

        self.batch = batch
        manifest = {"vocab_size": int(batch["vocab_size"])}
        self.dataset = SimpleNamespace(epoch=0, store=SimpleNamespace(manifest=manifest))

    def __iter__(self):
        while True:
            yield dict(self.batch)

    def state_dict(self) -> dict:
        return {}


def trainer_step_time(lm, batch: dict, device: torch.device, repeats: int, chunk) -> float:
    """Median seconds per optimizer step of ``KDTrainer`` on ``batch`` (after 2 warm-up steps)."""
    import tempfile

    from transformers import TrainerCallback, TrainingArguments

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            max_steps=repeats + 2,
            learning_rate=1e-5,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
        )
        trainer = KDTrainer(
            model=lm,
            args=args,
            train_dataset=_Repeat({**batch, "vocab_size": lm.config.vocab_size}),
            divergence=DistillationLoss.create("fkl", chunk_size=chunk),
            callbacks=[Clock()],
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.train()
    steps = [b - a for a, b in zip(marks[::2], marks[1::2])][2:]
    return statistics.median(steps)


if __name__ == "__main__":
    main()
