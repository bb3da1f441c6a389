"""The quality experiment's report: per-arm means, paired differences, curves, and the plot.

``results`` is ``{arm: {seed: run}}`` where a run is ``{"curve": [point, ...], "final": point,
"tokens", "train_s"}`` (or ``{"error": message}``) and a point holds ``step`` and the held-out
metrics of ``logitstore.pipelines.evaluate`` plus ``gap`` (student minus teacher mean top-1
probability); the objective arms' final point also holds ``train_fkl``, ``train_gap`` and
``train_ece``, the same student on its own training store. Every figure printed here is
computed from those runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._quality_stats import Interval, curve, mean_interval, paired, per_seed

Results = Mapping[str, Mapping[int, Mapping[str, Any]]]

#: Per-arm table columns: metric key, title.
COLUMNS = [
    ("fkl", "teacher KL"),
    ("rkl", "teacher RKL"),
    ("top1_agreement", "top-1 agree"),
    ("student_top1_prob", "student p(top1)"),
    ("gap", "overconf. gap"),
    ("student_ece", "ECE"),
    ("student_entropy", "entropy"),
    ("distinct_2", "distinct-2"),
    ("self_bleu", "self-BLEU"),
    ("train_gap", "gap, training text"),
]
STORE_LABELS = {
    "dense": "dense 8-bit",
    "topk": "top-k + tail bucket",
    "sampled": "sampled (RS-KD counts)",
    "droptail": "top-k, tail dropped",
}
#: The objective comparisons' metrics: key, title, relative.
OBJECTIVE_METRICS = [
    ("fkl", "teacher KL", True),
    ("gap", "overconf. gap", False),
    ("student_ece", "ECE", False),
    ("student_entropy", "entropy", False),
    ("distinct_2", "distinct-2", False),
    ("self_bleu", "self-BLEU", False),
    # The final checkpoint on its own training store: where the student matches the teacher.
    ("train_fkl", "teacher KL, training text", True),
    ("train_gap", "overconf. gap, training text", False),
    ("train_ece", "ECE, training text", False),
]


def fkl_baseline(results: Results) -> str:
    """The FKL arm of the store the objective arms trained on: ``topk``, or ``droptail`` (a run
    with ``--objective-store droptail``); each is named like its store."""
    stores = {run["store"] for run in results.get("rkl", {}).values() if "store" in run}
    return stores.pop() if len(stores) == 1 else "topk"


def comparisons(
    arms: list[str], base: str = "topk"
) -> list[tuple[str, str, str, list[tuple[str, str, bool]]]]:
    """``(a, b, question, metrics)``: the paired comparisons whose two arms were both run;
    ``base``: the FKL arm the objective arms are compared with (:func:`fkl_baseline`)."""
    kl = [("fkl", "teacher KL", True), ("gap", "overconf. gap", False)]
    store = "top-k store" if base == "topk" else "tail-dropped top-k store"
    out = [
        ("topk", "dense", "top-k + tail bucket vs dense 8-bit", kl),
        ("sampled", "dense", "sampled (RS-KD) vs dense 8-bit", kl),
        ("droptail", "topk", "top-k: tail dropped vs tail bucket", kl),
        ("rkl", base, f"RKL vs FKL ({store})", OBJECTIVE_METRICS),
    ]
    drkl = sorted((a for a in arms if a.startswith("drkl-")), key=lambda a: float(a[5:]))
    out += [(d, "rkl", f"DRKL (gamma {d[5:]}) vs RKL", OBJECTIVE_METRICS) for d in drkl]
    return [c for c in out if c[0] in arms and c[1] in arms]


def _cell(iv: Interval, digits: int = 4) -> str:
    if iv.n == 0:
        return "-"
    if math.isnan(iv.low):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} ± {(iv.high - iv.low) / 2:.{digits}f}"


def arms_table(results: Results) -> str:
    """Mean ± 95 % half-width over seeds of each arm's final held-out metrics."""
    titles = " | ".join(title for _, title in COLUMNS)
    lines = [
        f"| arm | train store | objective | seeds | {titles} |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    for arm, runs in results.items():
        ok = [r for r in runs.values() if "final" in r]
        if not ok:
            lines.append(f"| {arm} | - | - | 0 | failed: {_first_error(runs)} |")
            continue
        final = ok[0]["final"]
        cells = [
            _cell(mean_interval(per_seed(results, arm, key).values())) if key in final else "-"
            for key, _ in COLUMNS
        ]
        store, objective = ok[0].get("store", "-"), ok[0].get("divergence", "-")
        lines.append(
            f"| {arm} | {STORE_LABELS.get(store, store)} | {objective} | {len(ok)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _first_error(runs: Mapping[int, Mapping[str, Any]]) -> str:
    errors = [r["error"] for r in runs.values() if "error" in r]
    return (errors[0] if errors else "no run").replace("|", "/")[:80]


def paired_table(results: Results) -> tuple[str, dict[tuple[str, str, str], Interval]]:
    """One row per comparison and metric: the mean paired difference and its 95 % interval
    (relative for teacher KL: ``a / b - 1``); also the intervals by ``(a, b, metric)``."""
    lines = [
        "| comparison (a vs b) | metric | a | b | paired a - b, mean [95 % CI] | seeds |",
        "|---|---|---|---|---|---|",
    ]
    found: dict[tuple[str, str, str], Interval] = {}
    for a, b, question, metrics in comparisons(list(results), fkl_baseline(results)):
        for key, title, relative in metrics:
            xa, xb = per_seed(results, a, key), per_seed(results, b, key)
            iv = paired(xa, xb, relative=relative)
            if iv.n == 0:
                continue
            found[(a, b, key)] = iv
            unit = "a / b - 1, " if relative else ""
            lines.append(
                f"| {question} | {title} | {mean_interval(xa.values()).mean:.4f} | "
                f"{mean_interval(xb.values()).mean:.4f} | {unit}{iv.format(percent=relative)} "
                f"| {iv.n} |"
            )
    return "\n".join(lines), found


def curve_table(results: Results, metric: str = "fkl") -> str:
    """Held-out ``metric`` per arm at each evaluated step (mean over seeds), and the paired
    relative change over the last interval (how flat the curve has become)."""
    steps = sorted({p["step"] for runs in results.values() for r in runs.values()
                    for p in r.get("curve", [])})  # fmt: skip
    lines = [
        "| arm | " + " | ".join(f"step {s}" for s in steps) + " | last interval, mean [95 % CI] |",
        "|" + "---|" * (len(steps) + 2),
    ]
    for arm in results:
        arm_steps, means = curve(results, arm, metric)
        by_step = dict(zip(arm_steps, means))
        cells = [f"{by_step[s].mean:.4f}" if s in by_step else "-" for s in steps]
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {last_change(results, arm, metric)} |"
        )
    return "\n".join(lines)


def last_change(results: Results, arm: str, metric: str = "fkl") -> str:
    """Relative change of ``metric`` between the last two evaluations, paired per seed."""
    changes = []
    for run in results.get(arm, {}).values():
        points = [p for p in run.get("curve", []) if metric in p]
        if len(points) >= 2:
            changes.append(points[-1][metric] / points[-2][metric] - 1)
    iv = mean_interval(changes)
    return iv.format(percent=True) if iv.n > 1 else "-"


def _verdict(iv: Interval, lower: str = "lower", higher: str = "higher") -> str:
    """What the interval says about the sign of a difference."""
    if iv.n < 2:
        return "one seed: no interval"
    return lower if iv.high < 0 else higher if iv.low > 0 else "interval includes 0"


def findings(results: Results, found: Mapping[tuple[str, str, str], Interval]) -> list[str]:
    """The answers the experiment was built for, in words, from the measured intervals only."""
    out = []
    aim = found.get(("topk", "dense", "fkl"))
    if aim is not None and aim.n > 1:
        if aim.high <= 0.02:
            verdict = "the whole interval is below +2 %: the aim is met"
        elif aim.low > 0.02:
            verdict = "the whole interval is above +2 %: the aim is NOT met"
        else:
            verdict = "the interval straddles +2 %: these seeds do not settle the aim"
        out.append(
            f"- Top-k + tail bucket vs dense 8-bit: held-out teacher KL "
            f"{aim.format(percent=True)} (paired, {aim.n} seeds); {verdict}."
        )
    for a, b, title in (
        ("sampled", "dense", "Sampled (RS-KD) vs dense 8-bit"),
        ("droptail", "topk", "Top-k with the tail dropped vs with the tail bucket"),
    ):
        iv = found.get((a, b, "fkl"))
        if iv is not None:
            word = _verdict(iv, "better", "worse")
            out.append(f"- {title}: held-out teacher KL {iv.format(percent=True)} ({word}).")
    moves = {arm: last_change(results, arm) for arm in results}
    moves = {arm: m for arm, m in moves.items() if m != "-"}
    if moves:
        listed = "; ".join(f"{arm} {m}" for arm, m in moves.items())
        out.append(
            f"- Flattening: change of held-out teacher KL over the last interval, per arm "
            f"(paired over seeds): {listed}."
        )
    base = fkl_baseline(results)
    on = "" if base == "topk" else " (tail-dropped store)"
    for (arm, name), (key, text) in itertools.product(
        ((base, f"FKL{on}"), ("rkl", f"RKL{on}")),
        (("gap", "held-out"), ("train_gap", "training")),
    ):
        gap = mean_interval(per_seed(results, arm, key).values())
        if gap.n > 1:
            regime = (
                "over-confident (the whole interval above 0)"
                if gap.low > 0
                else "under-confident (the whole interval below 0)"
                if gap.high < 0
                else "not measurably over- or under-confident"
            )
            out.append(
                f"- Regime: the {name} student's over-confidence gap on {text} text is "
                f"{gap.format()}: {regime}."
            )
    drkl = sorted({a for a, _, _ in found if a.startswith("drkl-")}, key=lambda a: float(a[5:]))
    for arm in drkl:
        parts = []
        for key, title in (("fkl", "teacher KL"), ("gap", "gap"), ("student_ece", "ECE"),
                           ("distinct_2", "distinct-2"),
                           ("train_fkl", "teacher KL on training text"),
                           ("train_gap", "gap on training text")):  # fmt: skip
            iv = found.get((arm, "rkl", key))
            if iv is not None:
                text = iv.format(percent=key in ("fkl", "train_fkl"))
                parts.append(f"{title} {text} ({_verdict(iv)})")
        out.append(f"- {arm} vs RKL (paired): " + "; ".join(parts) + ".")
    return out


def report_body(
    results: Results, args: Mapping[str, Any], command: str, seconds: float, reused: int = 0
) -> str:
    """The "Distillation quality" section: setup, tables, findings, command and wall time
    (``seconds`` of the invocation that trained all but ``reused`` of the students)."""
    runs = [r for arm in results.values() for r in arm.values() if "final" in r]
    students = sum(len(arm) for arm in results.values())
    wall = f"wall time {seconds / 60:.1f} min"
    if reused:
        wall += (
            f", training {students - reused} of the {students} students (the other {reused} "
            f"were read from earlier runs with the same settings in the work folder)"
        )
    tokens = max((r.get("tokens", 0) for r in runs), default=0)
    positions = max((r["final"].get("tokens", 0) for r in runs), default=0)
    teacher_top1 = runs[0]["final"]["teacher_top1_prob"] if runs else math.nan
    train_min = sum(r.get("train_s", 0) for r in runs) / 60
    setup = (
        f"Teacher SmolLM2-135M-Instruct (GGUF Q4_1); students keep {args['student_layers']} of "
        f"its 30 layers; {args['train_docs']} training documents (Python documentation text, "
        f"at most {args['max_chars']} characters, windows of {args['max_length']} tokens), "
        f"{args['steps']} steps of {args['tokens_per_step']} tokens ({int(tokens)} trained "
        f"tokens per student), lr {args['lr']}, seeds {list(range(args['seeds']))} (a seed "
        f"fixes the data order; every arm sees the same order per seed). Top-k store: k = "
        f"{args['k']}, values {args['values']}; sampled: {args['draws']} draws; dense: "
        f"{args['dense_bits']}-bit. Evaluated every {args['eval_every']} steps on "
        f"{args['heldout_docs']} held-out documents ({int(positions)} positions, none of "
        f"them in a training store) from one top-k store (k = {args['eval_k']}, tail bucket: "
        f"the KL there is a lower bound); teacher mean top-1 probability there "
        f"{teacher_top1:.4f}. Gap = student mean top-1 probability minus the teacher's. "
        f"Diversity: 4 samples of 32 tokens (temperature 1) from the opening words of each "
        f"held-out document. Device {args['device']}, {args['jobs']} students at a time; "
        f"{wall}; {train_min:.1f} min of student training summed over all {len(runs)}."
    )
    table, found = paired_table(results)
    return "\n\n".join(
        [
            f"## {args.get('title', 'Distillation quality')}",
            setup,
            "Per arm, final checkpoint, mean ± 95 % half-width over seeds:",
            arms_table(results),
            "Paired differences (same seed, same data order), mean and 95 % t-interval over "
            "seeds; teacher KL as a relative difference:",
            table,
            "Held-out teacher KL during training (mean over seeds), and its change over the "
            "last interval:",
            curve_table(results),
            "\n".join(findings(results, found)),
            f"Reproduce: `{command}`",
        ]
    )


def plot_curves(results: Results, path: Path) -> None:
    """Held-out teacher KL and over-confidence gap against steps, one line per arm (mean over
    seeds), the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, title in (
        (axes[0], "fkl", "held-out teacher KL (bucket model)"),
        (axes[1], "gap", "over-confidence gap (student - teacher p(top1))"),
    ):
        for arm in results:
            by_step: dict[int, list[float]] = {}
            for run in results[arm].values():
                for p in run.get("curve", []):
                    by_step.setdefault(p["step"], []).append(p[metric])
            if not by_step:
                continue
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            (line,) = ax.plot(steps, means, marker="o", markersize=3, label=arm)
            ax.fill_between(
                steps,
                [min(by_step[s]) for s in steps],
                [max(by_step[s]) for s in steps],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("Students per arm: mean over seeds, shaded: range over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
