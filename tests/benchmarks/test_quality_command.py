"""The quality experiment's command end to end, at a toy size: the real teacher over real text,
students of every kind of arm trained from its stores, evaluated on the held-out store, and the
report section written from the paired runs; a second invocation reuses every student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from logitstore import open_store
from logitstore.benchmarks.quality import main

pytestmark = pytest.mark.integration

T975_DF1 = 12.706  # Student's t, 97.5 % quantile, 1 degree of freedom (2 seeds)


def command(out: Path, report: Path, plot: Path) -> list[str]:
    return [
        "--out", str(out), "--arms", "dense,topk,rkl,drkl-1", "--seeds", "2",
        "--train-docs", "2", "--heldout-docs", "1", "--max-chars", "500", "--max-length", "64",
        "--student-layers", "1", "--steps", "2", "--eval-every", "2", "--tokens-per-step", "64",
        "--jobs", "1", "--k", "16", "--eval-k", "32", "--report", str(report),
        "--section", "quality-toy", "--title", "Toy quality", "--plot", str(plot),
    ]  # fmt: skip


def windows(url: Path) -> set[tuple[int, ...]]:
    return {tuple(doc.input_ids.tolist()) for doc in open_store(str(url)).iter_documents()}


def test_the_command_trains_every_arm_and_reports_the_paired_runs(tmp_path, gguf_teacher_path):
    out, report, plot = tmp_path / "work", tmp_path / "REPORT.md", tmp_path / "curves.png"
    report.write_text("before\n<!-- quality-toy:start -->\nold\n<!-- quality-toy:end -->\nafter\n")
    results = main(command(out, report, plot))

    # No training store holds a held-out window.
    heldout = windows(out / "store_heldout")
    for store in ("store_train_dense-bits8", "store_train_topk-k16-q6"):
        assert heldout and not heldout & windows(out / store)
    # Every arm and seed trained; every curve starts at the one initialised student.
    saved = json.loads((out / "results-quality-toy.json").read_text())
    assert sorted(saved) == ["dense", "drkl-1", "rkl", "topk"]
    starts = set()
    for arm, runs in saved.items():
        assert sorted(runs) == ["0", "1"] and sorted(results[arm]) == [0, 1]
        for run in runs.values():
            assert [p["step"] for p in run["curve"]] == [0, 2]
            starts.add(run["curve"][0]["fkl"])
            assert run["final"]["fkl"] < run["curve"][0]["fkl"] or arm in ("rkl", "drkl-1")
    assert len(starts) == 1
    assert (
        "distinct_2" in saved["drkl-1"]["0"]["final"] and "train_gap" in saved["rkl"]["1"]["final"]
    )

    # The aim's paired interval, computed here from the saved per-seed results.
    ratios = [
        saved["topk"][s]["final"]["fkl"] / saved["dense"][s]["final"]["fkl"] - 1 for s in "01"
    ]
    mean, half = np.mean(ratios), T975_DF1 * np.std(ratios, ddof=1) / math.sqrt(2)
    text = report.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "\nold\n" not in text
    row = f"a / b - 1, {mean:+.1%} [{mean - half:+.1%}, {mean + half:+.1%}] | 2 |"
    assert "| top-k + tail bucket vs dense 8-bit | teacher KL |" in text and row in text, text
    assert "| DRKL (gamma 1) vs RKL | overconf. gap |" in text
    assert "--arms dense,topk,rkl,drkl-1" in text and "## Toy quality" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second invocation trains nothing: every student is read back, the section is the same.
    finished = {p: p.stat().st_mtime_ns for p in out.glob("student_*/heldout.json")}
    assert len(finished) == 8
    assert main(command(out, report, plot)) == results
    assert {p: p.stat().st_mtime_ns for p in out.glob("student_*/heldout.json")} == finished
    assert report.read_text() == text
