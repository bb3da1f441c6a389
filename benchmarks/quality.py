"""Distillation quality over seeds: what the stored teacher costs or buys a student.

One teacher (SmolLM2-135M-Instruct, GGUF) runs over real English text (Python's own
documentation); every student has the same architecture (a few of the teacher's layers kept)
and the same steps and learning rate; every arm is trained once per seed (the seed fixes the
data order) and evaluated on the SAME held-out store, at several checkpoints. Arms:

- the cache, all FKL: the dense 8-bit store (``dense``), the top-k store with its tail bucket
  (``topk``; aim: held-out teacher KL within 2 % of dense), the sampled store (``sampled``,
  Random-Sampling KD against the draw counts) and the top-k store with the tail dropped
  (``droptail``: support renormalised, ``tail_logmass = -inf``, written as its own store);
- the objective, on the top-k store: FKL (``topk``), RKL (``rkl``) and DRKL at several
  ``gamma`` (``drkl-0.5`` ...), compared on over-confidence gap (student mean top-1 probability
  minus the teacher's), ECE, entropy and generation diversity (distinct-2, self-BLEU). With
  ``--objective-store droptail`` RKL and DRKL train on the tail-dropped store instead and are
  compared with its FKL arm (``droptail``): a renormalised support is a sharper target, and its
  students are over-confident on held-out text.

Comparisons are paired (same seed, same data order) with a 95 % t-interval over the seeds
(``_quality_stats``). The held-out documents are split off before any teacher pass and no
training store holds one of their windows (checked on the stores before training).

    python -m logitstore.benchmarks.quality --preset cpu          # 2 CPU cores, about 60 min
    python -m logitstore.benchmarks.quality --preset cpu-regime   # the objectives, ~60 min
    python -m logitstore.benchmarks.quality --preset gpu          # one GPU (sized for < 8 min)

Stores and students are kept in ``OUT`` under names that carry their store settings
(``store_train_topk-k128-q6``, ``student_topk-k128-q6_seed0``), so a sweep such as
``--arms dense,topk --k 256 --section quality-k256`` in the same ``OUT`` trains only the new
top-k students and reuses the dense ones. Writes ``OUT/results-SECTION.json``, the marked
section of ``BENCHMARKS.md`` and the curves plot; each preset names its own work folder, section
and plot (``cpu``: ``runs/quality``, "quality", ``docs/quality.png``). Every curve starts at
step 0, the student as initialised from the teacher's layers (:func:`initial_point`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._quality_data import (
    build_stores,
    captured_store,
    check_disjoint,
    corpus_texts,
    drop_tail_store,
    split_documents,
    store_label,
)
from ._quality_report import plot_curves, report_body
from ._quality_students import (
    TRAINING_SETTINGS,
    Arm,
    gap,
    initial_point,
    run_all_students,
    run_student,
    stop_on_sigterm,
    training_text,
)

__all__ = [
    "PRESETS",
    "TRAINING_SETTINGS",
    "Arm",
    "check_disjoint",
    "corpus_texts",
    "drop_tail_store",
    "gap",
    "initial_point",
    "main",
    "make_arms",
    "publish",
    "run_all_students",
    "run_label",
    "run_student",
    "split_documents",
    "stop_on_sigterm",
    "store_label",
    "training_text",
]


#: The stores the objective arms can train on (``--objective-store``).
OBJECTIVE_STORES = ("topk", "droptail")


def make_arms(gammas: Sequence[float], objective_store: str = "topk") -> dict[str, Arm]:
    """Every arm, in table order; one DRKL arm per ``gamma``. The objective arms (``rkl``,
    ``drkl-*``) train on ``objective_store`` (``topk`` or ``droptail``), whose FKL arm is named
    like the store and is their baseline."""
    if objective_store not in OBJECTIVE_STORES:
        raise SystemExit(f"--objective-store: topk or droptail, found {objective_store!r}")
    on = objective_store
    arms = {
        "dense": Arm("dense", "fkl"),
        "topk": Arm("topk", "fkl", diversity=on == "topk"),
        "sampled": Arm("sampled", "fkl", use_counts=True),
        "droptail": Arm("droptail", "fkl", diversity=on == "droptail"),
        "rkl": Arm(on, "rkl", diversity=True),
    }
    for gamma in gammas:
        arms[f"drkl-{gamma:g}"] = Arm(on, "drkl", {"gamma": gamma}, diversity=True)
    return arms


def run_label(name: str, arm: Arm, args: argparse.Namespace) -> str:
    """A student's folder name (before ``_seed<N>``): its training store's :func:`store_label`,
    preceded by the arm's name when the arm is an objective on that store
    (``rkl-topk-k128-q6``). Students whose store settings did not change keep their folder."""
    store = store_label(arm.store, args)
    return store if name == arm.store else f"{name}-{store}"


#: Settings of the two presets; any option given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    # 2 shared CPU cores, two students at a time: a 4-layer student, 4 documents (about 1,800
    # tokens, 14 steps an epoch), 40 steps (about 3 epochs); about 60 min wall.
    "cpu": {
        "train_docs": 4, "heldout_docs": 3, "max_chars": 2000, "max_length": 512,
        "student_layers": 4, "steps": 40, "eval_every": 10, "tokens_per_step": 128,
        "lr": 3e-3, "seeds": 3, "gammas": "0.25,0.5,1", "jobs": 2, "device": "cpu",
        "arms": "", "out": "runs/quality", "section": "quality",
        "title": "Distillation quality", "plot": "docs/quality.png",
    },
    # The objectives where the students come closest to the teacher that 2 CPU cores can
    # train: 28 of the 30 layers kept (held-out teacher KL 0.35 and gap -0.08 before any step),
    # lr 1e-4 (at 1e-3 such a student first moves away from the teacher: KL 1.0-1.2 at step
    # 25); FKL, RKL and DRKL at three gammas, 3 seeds; about 60 min wall.
    "cpu-regime": {
        "train_docs": 4, "heldout_docs": 3, "max_chars": 2000, "max_length": 512,
        "student_layers": 28, "steps": 40, "eval_every": 10, "tokens_per_step": 128,
        "lr": 1e-4, "seeds": 3, "gammas": "0.25,0.5,1", "jobs": 2, "device": "cpu",
        "arms": "topk,rkl,drkl-0.25,drkl-0.5,drkl-1", "out": "runs/quality_regime",
        "section": "quality-regime", "plot": "docs/quality_regime.png",
        "title": "Distillation quality: the objectives with a student near the teacher",
    },
    # One GPU, four students at a time: 8x the corpus, 8x the tokens per step, 5x the steps.
    "gpu": {
        "train_docs": 32, "heldout_docs": 12, "max_chars": 4000, "max_length": 1024,
        "student_layers": 4, "steps": 300, "eval_every": 50, "tokens_per_step": 2048,
        "lr": 3e-3, "seeds": 3, "gammas": "0.25,0.5,1", "jobs": 4, "device": "cuda",
        "arms": "", "out": "runs/quality_gpu", "section": "quality-gpu",
        "title": "Distillation quality on one GPU", "plot": "docs/quality_gpu.png",
    },
}  # fmt: skip


#: What every store and student of a work folder shares (the corpus, its split, the held-out
#: store and the students' architecture): fixed when the folder is first used.
FOLDER_SETTINGS = ("train_docs", "heldout_docs", "max_chars", "max_length", "eval_k",
                   "student_layers")  # fmt: skip


def check_folder(out: Path, args: argparse.Namespace) -> None:
    """Record the folder's settings on first use; refuse a run that changes them (its stores
    and students would be reused for another corpus or architecture)."""
    path = out / "settings.json"
    settings = {key: getattr(args, key) for key in FOLDER_SETTINGS}
    if not path.exists():
        path.write_text(json.dumps(settings, indent=1))
        return
    recorded = json.loads(path.read_text())
    changed = sorted(k for k in settings if recorded.get(k) != settings[k])
    if changed:
        raise SystemExit(
            f"{out} holds stores and students built with other settings "
            f"({', '.join(f'{k} {recorded.get(k)} there, {settings[k]} here' for k in changed)});"
            " use another --out"
        )


# ---- the command -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", help="work folder (stores, students); default: the preset's")
    p.add_argument("--arms", help="comma-separated arms (default: the preset's, else all)")
    p.add_argument("--seeds", type=int, help="seeds per arm (0, 1, ...)")
    p.add_argument("--gammas", help="DRKL gamma values, comma-separated")
    p.add_argument("--train-docs", type=int)
    p.add_argument("--heldout-docs", type=int)
    p.add_argument("--max-chars", type=int, help="characters kept per document")
    p.add_argument("--max-length", type=int, help="teacher window in tokens")
    p.add_argument("--k", type=int, default=128, help="top-k support size")
    p.add_argument("--values", default="q6", help="top-k value coding")
    p.add_argument("--draws", type=int, default=50, help="sampled store: draws per position")
    p.add_argument("--dense-bits", type=int, default=8)
    p.add_argument("--eval-k", type=int, default=256, help="held-out store support size")
    p.add_argument(
        "--objective-store",
        default="topk",
        choices=OBJECTIVE_STORES,
        help="the store RKL and DRKL train on (droptail: the top-k store with its "
        "support renormalised, whose students are over-confident)",
    )
    p.add_argument("--student-layers", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--tokens-per-step", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device")
    p.add_argument("--jobs", type=int, help="students trained at once (one thread each)")
    p.add_argument("--report", default="BENCHMARKS.md", help="report to update ('' for none)")
    p.add_argument("--plot", help="curves plot ('' for none); default: the preset's")
    p.add_argument("--section", help="marked section of the report to write")
    p.add_argument("--title", help="the section's heading")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from logitstore.pipelines.demo import spread, student_config

    stop_on_sigterm()

    gammas = [float(g) for g in str(args.gammas).split(",") if g.strip()]
    every = make_arms(gammas, args.objective_store)
    names = [a.strip() for a in args.arms.split(",") if a.strip()] or list(every)
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {list(every)}")
    arms = {name: every[name] for name in names}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def stamp(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    check_folder(out, args)
    urls = build_stores(args, {arm.store for arm in arms.values()}, out)
    windows = [check_disjoint(urls[arm.store], urls["heldout"]) for arm in arms.values()][0]
    stamp(f"stores ready; no training store holds one of the {windows} held-out windows")
    teacher_dir = Path(urls["teacher_dir"])
    total = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    student = student_config(teacher_dir, args.student_layers, out)
    keep = spread(total, args.student_layers)
    jobs = [
        {
            "name": name,
            "arm": dataclasses.asdict(arm),
            "seed": seed,
            "run_dir": str(out / f"student_{run_label(name, arm, args)}_seed{seed}"),
            "store": urls[arm.store],
            "train_text": urls[captured_store(arm.store)],
            "heldout": urls["heldout"],
            "prompts": urls["prompts"],
            "student": str(student),
            "teacher_dir": str(teacher_dir),
            "keep": keep,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "tokens_per_step": args.tokens_per_step,
            "lr": args.lr,
            "device": args.device,
            "threads": max(1, torch.get_num_threads() // args.jobs),
        }  # fmt: skip
        for seed in range(args.seeds)
        for name, arm in arms.items()
    ]
    reused = sum((Path(job["run_dir"]) / "heldout.json").exists() for job in jobs)
    start_point = initial_point(out, student, teacher_dir, keep, urls["heldout"], args.device)
    stamp(f"the initialised student (step 0): held-out teacher KL {start_point['fkl']:.4f}, "
          f"gap {start_point['gap']:+.4f}")  # fmt: skip
    finished = run_all_students(jobs, args.jobs, stamp)
    results: dict[str, dict[int, Any]] = {name: {} for name in arms}
    for job, result in zip(jobs, finished):
        if isinstance(result, Exception):
            result = {"error": f"{type(result).__name__}: {result}"}
        elif result["curve"][0]["step"] != 0:  # every curve starts at the initialised student
            result = {**result, "curve": [start_point, *result["curve"]]}
        results[job["name"]][job["seed"]] = result
    # The wall time of the invocation that trained this section's students, and how many it
    # read from earlier runs in the folder instead (a sweep reuses the dense students): a rerun
    # that only reads cached results reports that one, not its own few seconds.
    wall = out / f"wall-{args.section}.json"
    timing = {"seconds": time.perf_counter() - start, "reused": reused}
    if reused == len(jobs) and wall.exists():
        timing = json.loads(wall.read_text())
    else:
        wall.write_text(json.dumps(timing))
    (out / f"results-{args.section}.json").write_text(json.dumps(results, indent=1, default=float))
    command = "python -m logitstore.benchmarks.quality " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    body = report_body(
        results, vars(args), command.strip(), timing["seconds"], int(timing.get("reused", 0))
    )
    print("\n" + body)
    publish(results, args, body, stamp)
    return results


def publish(
    results: dict[str, dict[int, Any]],
    args: argparse.Namespace,
    body: str,
    stamp: Callable[[str], None] = print,
) -> None:
    """Draw the plot and put ``body`` into the report's section, when every student finished.
    A student that failed (a full disk, a killed worker, a non-finite loss) leaves both as they
    were: a committed section is never replaced by a run with holes in it."""
    failed = [
        f"{arm} seed {seed}: {run['error']}"
        for arm, runs in results.items()
        for seed, run in runs.items()
        if "error" in run
    ]
    if failed:
        raise SystemExit(
            f"{len(failed)} student(s) failed (first: {failed[0][:300]}); the report and the "
            "plot were left as they were. Run the same command again: finished students are "
            "reused and a failed one resumes from its last complete checkpoint."
        )
    if args.plot:
        plot_curves(results, Path(args.plot))
        stamp(f"wrote {args.plot}")
    if args.report:
        from .run_all import update_section

        update_section(Path(args.report), args.section, body)
        stamp(f"updated {args.report}")


if __name__ == "__main__":
    main()
