"""Time of one training step with the offline-KD loss against a plain cross-entropy step.

Same student, same batch, same optimizer (AdamW), both in one run:

* ``ce``: ``model(input_ids, attention_mask, labels=...)``, the ``transformers`` loss on full
  ``[batch, seq, vocab]`` logits (the baseline);
* ``kd``: the trainer's step: final hidden states through ``fused_sparse_loss`` against a k = 64
  sparse teacher (synthetic, LM-like), never forming full logits;
* ``kd+ce``: the same with a cross-entropy term (``ce_weight``), computed the same fused way.

Prints the median step time of each and the ratio to ``ce``; the aim is ``kd / ce <= 1.10``.
On CUDA both run under bf16 autocast. Not a test.

    python -m benchmarks.bench_train_step [--hidden 256 --layers 4 --vocab 49152 --tokens 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.train import Distiller


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

    def kd_step(ce_weight: float):
        model = Distiller(
            lm,
            divergence="fkl",
            params={},
            temperature=1.0,
            temperature_index=None,
            ce_weight=ce_weight,
            chunk_size=args.chunk_size,
        )

        def step() -> None:
            with autocast:
                loss, _ = model(batch, float(batch["num_tokens"]))
            loss.backward()
            optimizer.step()
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


if __name__ == "__main__":
    main()
