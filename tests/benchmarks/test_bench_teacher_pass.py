"""The teacher-pass benchmark's ratios: each pass against the bare runs on either side of it."""

from __future__ import annotations

import pytest

from logitstore.benchmarks.bench_teacher_pass import sandwich


def test_a_steady_drift_cancels_and_the_control_shows_it():
    # The machine slows by 10 % per run; the pass does 0.9x the work rate of the bare forward.
    runs = []
    for n, mode in enumerate(["bare", "pass", "bare", "pass", "bare"]):
        speed = 100.0 * 0.9**n * (0.9 if mode == "pass" else 1.0)
        runs.append((mode, 1000 / speed, 2000 / speed))
    for col in (0, 1):
        got = sandwich(runs, col=col)
        assert got["pass"] == pytest.approx([0.9, 0.9])  # the drift is gone
        assert got["bare"] == pytest.approx([0.81, 0.81])  # two runs of drift apart


def test_kinds_of_pass_are_kept_apart():
    runs = [("bare", 1.0, 1.0), ("pass", 2.0, 2.0), ("bare", 1.0, 1.0)]
    runs += [("pass-torch-topk", 4.0, 4.0), ("bare", 1.0, 1.0)]
    got = sandwich(runs, col=0)
    assert got == {"pass": [0.5], "pass-torch-topk": [0.25], "bare": [1.0, 1.0]}
