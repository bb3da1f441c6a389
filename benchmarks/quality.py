"""Distillation quality: what the stored teacher costs or buys a student, on a real teacher.

One teacher (SmolLM2-135M-Instruct, GGUF) runs over real English text (Python's own
documentation); every student has the same architecture (a few of the teacher's layers kept),
the same data, steps, learning rate and seed, and is evaluated on the SAME held-out store.
Only the store or the objective changes between rows:

1. the cache: a dense 8-bit store (``dense``) against the top-k store with its tail bucket
   (``topk``, aim: held-out teacher KL within 2 % of dense) and the sampled store (``sampled``,
   Random-Sampling KD: FKL against the draw counts);
2. the objective on the top-k store: RKL against DRKL, overconfidence (student mean top-1
   probability minus the teacher's) and teacher KL;
3. the tail: the top-k store with the bucket model against the same store with the tail
   dropped (``droptail``: support log-probs renormalised over the support, ``tail_logmass =
   -inf``), written as its own store with the same codec, so the divergences are unchanged.

Held-out metrics come from ``logitstore.pipelines.evaluate`` against a top-k store of the held-out
documents (bucket model: teacher KL there is a lower bound of the full-vocabulary KL).

    python -m logitstore.benchmarks.quality [--steps 30] [--train-docs 8] [--student-layers 4]

Prints a markdown table and writes it into ``BENCHMARKS.md`` ("Distillation quality").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: Students, in table order: name -> (train store, divergence, extra training settings).
RUNS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dense": ("dense", "fkl", {}),
    "topk": ("topk", "fkl", {}),
    "sampled": ("sampled", "fkl", {"use_counts": True}),
    "droptail": ("droptail", "fkl", {}),
    "rkl": ("topk", "rkl", {}),
    "drkl": ("topk", "drkl", {}),
}
STORE_LABELS = {
    "dense": "dense 8-bit",
    "topk": "top-k + tail bucket",
    "sampled": "sampled (RS-KD counts)",
    "droptail": "top-k, tail dropped (renormalised)",
}
COLUMNS = [
    ("fkl", "teacher KL (FKL)"),
    ("rkl", "teacher RKL"),
    ("top1_agreement", "top-1 agree"),
    ("student_top1_prob", "student p(top1)"),
    ("teacher_top1_prob", "teacher p(top1)"),
    ("gap", "overconf. gap"),
    ("student_ece", "student ECE"),
    ("student_entropy", "student entropy"),
    ("teacher_entropy", "teacher entropy"),
]
SECTION = "quality"


class MemoForward:
    """The teacher's forward, remembered by its input: the train stores hold the same windows,
    so their passes (with ``batch_size=1``, hence identical batches whatever the shard policy)
    run the teacher once per window instead of once per store.

    Holds every window's logits (``T x V`` float32 each) until dropped: keep the corpus small.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: dict[bytes, Any] = {}

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        key = repr(tuple(input_ids.shape)).encode() + input_ids.cpu().numpy().tobytes()
        key += attention_mask.cpu().numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self.cache[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def drop_tail_store(source: str, out: str) -> dict[str, Any]:
    """Write a copy of a top-k store whose teacher has no tail: what "renormalised top-k" is.

    Each position's support log-probs become ``logp_i - logsumexp_S(logp)`` (the support holds
    all the mass), ``tail_logmass = -inf``, and the label's log-prob is its renormalised value
    when the label is in the support, else ``-inf``. Under the bucket model this teacher puts
    mass 0 (the floor) on the tail bucket, so the unchanged divergences train exactly the
    truncated, renormalised objective. The positions are re-encoded with the source store's
    own codec (the values move by one constant per position, which a codec relative to the
    top-1 represents exactly).

    Args:
        source: URL of a finalized top-k store.
        out: where to write the derived store (must be empty or absent).

    Returns:
        The derived store's manifest.
    """
    from logitstore import EncodedDocument, StoreWriter, open_store
    from logitstore.errors import ConfigError
    from logitstore.format import METADATA_KEYS

    src = open_store(source)
    meta = {key: copy.deepcopy(src.manifest[key]) for key in METADATA_KEYS}
    meta["capture"]["derived"] = "support renormalised, tail dropped (benchmarks/quality.py)"
    # The extra capture temperatures, whose tail sums the codec stores (FORMAT.md).
    temps = [float(t) for t in meta["capture"].get("temperatures", [])]
    if len(temps) != src.manifest["num_temperatures"]:
        raise ConfigError(
            f"expected {src.manifest['num_temperatures']} capture temperatures in the "
            f"manifest, found {temps}"
        )
    vocab = src.vocab_size
    writer = StoreWriter(
        out,
        codec=src.codec,
        backend=src.manifest["backend"],
        metadata=meta,
        vocab_size=vocab,
        mode="create",
    )
    for j in range(src.num_shards):
        encoded = []
        for doc in src.read_shard(j):
            ids = torch.from_numpy(doc.support_ids.astype("int64"))
            sup = torch.from_numpy(doc.support_logprobs.astype("float32"))
            present = ids >= 0
            sup = torch.where(present, sup, torch.full_like(sup, -math.inf))
            renorm = sup - torch.logsumexp(sup, dim=1, keepdim=True)
            logprobs = torch.full((ids.shape[0], vocab), -math.inf)
            rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
            logprobs[rows[present], ids[present]] = renorm[present]
            labels = torch.from_numpy(doc.input_ids[1:].astype("int64"))
            fields = src.codec.encode(logprobs, labels, temperatures=temps)
            arrays = {name: t.numpy() for name, t in fields.items()}
            encoded.append(EncodedDocument(doc.doc_id, doc.input_ids, doc.loss_mask, arrays))
        writer.write_shard(j, encoded)
    return writer.finalize(src.num_shards)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per student; the last column is teacher KL relative to dense."""
    titles = [title for _, title in COLUMNS]
    lines = [
        "| student | train store | objective | " + " | ".join(titles) + " | KL vs dense |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    base = rows.get("dense", {}).get("fkl")
    for name, m in rows.items():
        cells = [f"{m[key]:.4f}" if key in m else "-" for key, _ in COLUMNS]
        rel = f"{m['fkl'] / base - 1:+.1%}" if base and "fkl" in m else "-"
        if "error" in m:
            cells[0] = "failed: " + m["error"].replace("|", "/")[:80]
        lines.append(
            f"| {name} | {STORE_LABELS[m['store']]} | {m['divergence']} | "
            + " | ".join(cells)
            + f" | {rel} |"
        )
    return "\n".join(lines)


def findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per question of the experiment, from the measured rows only."""
    out = []

    def kl(name: str) -> float | None:
        return rows.get(name, {}).get("fkl")

    dense, topk, sampled, drop = kl("dense"), kl("topk"), kl("sampled"), kl("droptail")
    if dense and topk is not None:
        rel = topk / dense - 1
        verdict = "within" if abs(rel) <= 0.02 else "NOT within"
        out.append(
            f"- (1) top-k + tail vs dense 8-bit: teacher KL {topk:.4f} vs {dense:.4f} "
            f"({rel:+.1%}, {verdict} the 2 % aim)."
        )
    if dense and sampled is not None:
        out.append(
            f"- (1) sampled (RS-KD) vs dense 8-bit: teacher KL {sampled:.4f} vs {dense:.4f} "
            f"({sampled / dense - 1:+.1%})."
        )
    if kl("rkl") is not None and kl("drkl") is not None:
        r, d = rows["rkl"], rows["drkl"]
        out.append(
            f"- (2) RKL vs DRKL: overconfidence gap {r['gap']:+.4f} vs {d['gap']:+.4f}; "
            f"teacher KL {r['fkl']:.4f} vs {d['fkl']:.4f}."
        )
    if topk is not None and drop is not None:
        out.append(
            f"- (3) tail dropped vs bucket model (both FKL on the same top-k support): teacher KL "
            f"{drop:.4f} vs {topk:.4f} ({drop / topk - 1:+.1%}); overconfidence gap "
            f"{rows['droptail']['gap']:+.4f} vs {rows['topk']['gap']:+.4f}."
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/quality", help="work folder (stores, students)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"students, from {list(RUNS)}")
    p.add_argument("--train-docs", type=int, default=8)
    p.add_argument("--heldout-docs", type=int, default=6)
    p.add_argument("--max-chars", type=int, default=2000, help="characters kept per document")
    p.add_argument("--max-length", type=int, default=512, help="teacher window in tokens")
    p.add_argument("--k", type=int, default=128, help="top-k support size")
    p.add_argument("--values", default="q8", help="top-k value coding")
    p.add_argument("--draws", type=int, default=50, help="sampled store: draws per position")
    p.add_argument("--dense-bits", type=int, default=8)
    p.add_argument("--eval-k", type=int, default=256, help="held-out store support size")
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens-per-step", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--report", default="BENCHMARKS.md", help="report to update ('' for none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {list(RUNS)}")

    from logitstore.pipelines._teacher import load_teacher
    from logitstore.pipelines.demo import (
        find_gguf_teacher,
        save_plain_copy,
        spread,
        student_config,
        write_corpus,
    )
    from logitstore.pipelines.evaluate import evaluate
    from logitstore.pipelines.teacher_pass import (
        TeacherPassConfig,
        format_summary,
        run_teacher_pass,
    )
    from logitstore.pipelines.train import TrainConfig, latest_checkpoint, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()

    def stamp(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    # ---- the stores: one teacher, loaded once; every train store holds the same documents
    gguf = find_gguf_teacher()
    teacher = load_teacher(str(gguf.parent), gguf_file=gguf.name, device=device)
    stamp(f"loaded teacher {gguf.name} on {device}")
    train_jsonl, heldout_jsonl = write_corpus(
        out, args.train_docs, args.heldout_docs, args.max_chars
    )
    needed = {RUNS[r][0] for r in runs} | ({"topk"} if "droptail" in runs else set())
    codecs = {
        "topk": {"codec": "topk", "k": args.k, "values": args.values},
        "dense": {"codec": "dense", "bits": args.dense_bits},
        "sampled": {"codec": "sampled", "draws": args.draws},
    }
    passes = [("train", name, train_jsonl, codecs[name]) for name in codecs if name in needed]
    passes.append(("heldout", "topk", heldout_jsonl, {"codec": "topk", "k": args.eval_k}))
    memo = dataclasses.replace(teacher, model=MemoForward(teacher.model))
    stores: dict[str, str] = {}
    for split, name, data, codec in passes:
        # Dense positions decode to (V,) arrays each: small shards keep a shard's decode small.
        per_shard = 2 if codec["codec"] == "dense" else 16
        cfg = TeacherPassConfig(
            teacher=str(gguf.parent), gguf_file=gguf.name, data=str(data),
            out=str(out / f"store_{split}_{name}"), max_length=args.max_length, batch_size=1,
            docs_per_shard=per_shard, resume=True, device=device, seed=args.seed,
            progress=False, **codec,
        )  # fmt: skip
        summary = run_teacher_pass(cfg, teacher=memo if split == "train" else teacher)
        stores[f"{split}_{name}"] = cfg.out
        stamp(f"teacher pass {split} {name}:\n{format_summary(summary)}")
    del memo  # frees the remembered logits
    if "droptail" in runs:
        target = out / "store_train_droptail"
        if not (target / "manifest.json").exists():
            import shutil

            shutil.rmtree(target, ignore_errors=True)
            drop_tail_store(stores["train_topk"], str(target))
        stores["train_droptail"] = str(target)
        stamp("derived the tail-dropped store from the top-k store")

    teacher_dir = out / "teacher_hf"
    if not (teacher_dir / "config.json").exists():
        save_plain_copy(teacher.model, teacher.tokenizer, teacher_dir)
    del teacher
    config_file = student_config(teacher_dir, args.student_layers, out)
    total_layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    keep = spread(total_layers, args.student_layers)

    # ---- the students: identical settings but for the store or the objective
    rows: dict[str, dict[str, Any]] = {}
    for name in runs:
        store, divergence, extra = RUNS[name]
        run_dir = out / f"student_{name}"
        train_cfg = TrainConfig(
            store=stores[f"train_{store}"], student=str(config_file), tokenizer=str(teacher_dir),
            init_from=str(teacher_dir), keep_layers=keep, out=str(run_dir), divergence=divergence,
            max_steps=args.steps, tokens_per_step=args.tokens_per_step,
            tokens_per_batch=args.tokens_per_step, lr=args.lr,
            warmup_steps=max(1, args.steps // 10), seed=args.seed, resume=True, device=device,
            progress=False, **extra,
        )  # fmt: skip
        rows[name] = {"store": store, "divergence": divergence}
        try:  # one failing student (e.g. out of memory) leaves the others' rows
            train(train_cfg)
            checkpoint = str(latest_checkpoint(run_dir))
            metrics = evaluate(checkpoint, stores["heldout_topk"], device=device)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows[name]["error"] = f"{type(exc).__name__}: {exc}"
            stamp(f"student {name} FAILED: {rows[name]['error']}")
            continue
        metrics["gap"] = metrics["student_top1_prob"] - metrics["teacher_top1_prob"]
        rows[name].update(metrics)
        stamp(f"student {name}: held-out teacher KL {metrics['fkl']:.4f}")

    command = "python -m logitstore.benchmarks.quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    body = report_body(rows, args, command.strip(), time.perf_counter() - start)
    print("\n" + body)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    if args.report:
        from logitstore.benchmarks.run_all import update_section

        update_section(Path(args.report), SECTION, body)
        stamp(f"updated {args.report}")
    return rows


def report_body(
    rows: dict[str, dict[str, Any]], args: argparse.Namespace, command: str, seconds: float
) -> str:
    """The "Distillation quality" section: setup, table, findings, command."""
    tokens = max((m.get("tokens", 0) for m in rows.values()), default=0)
    setup = (
        f"Teacher SmolLM2-135M-Instruct (GGUF Q4_1); students keep {args.student_layers} of its "
        f"layers; {args.train_docs} training documents (Python documentation text, windows of "
        f"{args.max_length} tokens), {args.steps} steps of {args.tokens_per_step} tokens, "
        f"lr {args.lr}, seed {args.seed}, the same for every student. Top-k stores: k = "
        f"{args.k}, values {args.values}; sampled: {args.draws} draws; dense: "
        f"{args.dense_bits}-bit. Evaluated on {args.heldout_docs} held-out documents "
        f"({int(tokens)} positions) from one top-k store (k = {args.eval_k}, with tail bucket: "
        f"the KL there is a lower bound). Gap = student mean top-1 probability minus the "
        f"teacher's. Whole run: {seconds / 60:.1f} min."
    )
    return "\n\n".join(
        [
            "## Distillation quality",
            setup,
            format_table(rows),
            "\n".join(findings(rows)),
            f"Reproduce: `{command}`",
        ]
    )


if __name__ == "__main__":
    main()
