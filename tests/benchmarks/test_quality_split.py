"""The quality experiment: held-out documents never reach a training store, and the paired
intervals and tables it reports are computed as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter
from logitstore.benchmarks._quality_report import arms_table, findings, paired_table, report_body
from logitstore.benchmarks._quality_stats import mean_interval, paired, t975
from logitstore.benchmarks.quality import (
    PRESETS,
    TRAINING_SETTINGS,
    check_disjoint,
    check_folder,
    corpus_texts,
    make_arms,
    parse_args,
    publish,
    run_label,
    run_student,
    split_documents,
)
from logitstore.codecs import get_codec

META = {
    "teacher": {"model": "tiny"},
    "tokenizer": {"vocab_hash": "abc"},
    "capture": {"temperatures": []},
    "source": {"path": "x.jsonl"},
}


@pytest.mark.parametrize("preset", list(PRESETS), ids=[f"{p}-preset" for p in PRESETS])
def test_no_held_out_document_is_a_training_document(preset):
    settings = PRESETS[preset]
    texts = corpus_texts(settings["max_chars"])
    train, heldout = split_documents(texts, settings["train_docs"], settings["heldout_docs"])
    assert len(train) == settings["train_docs"] and len(heldout) == settings["heldout_docs"]
    assert not set(train) & set(heldout)
    # No held-out document shares its opening (its first window) with a training document.
    assert not {t[:200] for t in train} & {t[:200] for t in heldout}


def test_split_refuses_a_corpus_too_small():
    with pytest.raises(SystemExit, match="need 3 \\+ 2 documents"):
        split_documents(["a", "b", "c", "d"], 3, 2)


def write_store(url, windows):
    codec = get_codec("topk", k=4, values="q8")
    writer = StoreWriter(str(url), codec=codec, metadata=META, vocab_size=50)
    docs = []
    rng = np.random.default_rng(0)
    for i, ids in enumerate(windows):
        ids = np.asarray(ids, dtype=np.int64)
        lp = np.log(rng.dirichlet(np.ones(50), size=len(ids) - 1)).astype(np.float32)
        fields = codec.encode(torch.from_numpy(lp), torch.from_numpy(ids[1:]), temperatures=())
        mask = np.ones(len(ids) - 1, dtype=bool)
        docs.append(EncodedDocument(f"d{i}", ids, mask, {k: v.numpy() for k, v in fields.items()}))
    writer.write_shard(0, docs)
    writer.finalize(1)


def test_check_disjoint_refuses_a_training_store_holding_a_held_out_window(tmp_path):
    held = [[1, 2, 3, 4], [5, 6, 7]]
    write_store(tmp_path / "held", held)
    write_store(tmp_path / "train_ok", [[1, 2, 3, 5], [9, 8, 7, 6]])
    write_store(tmp_path / "train_bad", [[9, 9, 9], [5, 6, 7]])
    assert check_disjoint(str(tmp_path / "train_ok"), str(tmp_path / "held")) == 2
    with pytest.raises(SystemExit, match="1 held-out windows are also in the training store"):
        check_disjoint(str(tmp_path / "train_bad"), str(tmp_path / "held"))


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    a = {0: 3.0, 1: 5.0, 2: 7.0, 3: 1.0}  # seed 3 has no partner: left out
    b = {0: 2.0, 1: 3.0, 2: 4.0}
    iv = paired(a, b)
    half = 4.303 * 1.0 / math.sqrt(3)  # differences 1, 2, 3: sd 1, t(0.975, 2) = 4.303
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-9)
    rel = paired(a, b, relative=True)
    assert rel.mean == pytest.approx(np.mean([3 / 2 - 1, 5 / 3 - 1, 7 / 4 - 1]))
    one = mean_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and not one.excludes_zero


def student_t_mass(q: float, df: int, steps: int = 20000) -> float:
    """P(0 < T < q) for Student's t with ``df`` degrees of freedom (Simpson's rule)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    xs = np.linspace(0.0, q, steps + 1)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(xs**2 / df))
    return float((q / steps / 3) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


@pytest.mark.parametrize("df", range(1, 31))
def test_t975_is_the_quantile_of_the_t_distribution(df):
    # The tabulated value is the quantile rounded to 3 decimals: the quantile lies within 0.0005.
    q = t975(df)
    assert student_t_mass(q - 0.0005, df) < 0.475 < student_t_mass(q + 0.0005, df)


def fake_results():
    def run(fkl, gap, store="topk", divergence="fkl"):
        point = {"step": 10, "fkl": fkl, "gap": gap, "student_top1_prob": 0.5 + gap,
                 "teacher_top1_prob": 0.5, "tokens": 100}  # fmt: skip
        return {"final": point, "curve": [dict(point, step=5, fkl=2 * fkl), point],
                "store": store, "divergence": divergence, "tokens": 1000}  # fmt: skip

    return {
        "dense": {s: run(2.0 + 0.1 * s, 0.0, "dense") for s in range(3)},
        "topk": {s: run((2.0 + 0.1 * s) * (1.01 + 0.001 * s), 0.0) for s in range(3)},
        "rkl": {s: run(3.0, 0.05 + 0.01 * s, divergence="rkl") for s in range(3)},
        "drkl-0.5": {0: {"error": "RuntimeError: a | b"}},
    }


def test_tables_and_findings_come_from_the_paired_runs():
    results = fake_results()
    table, found = paired_table(results)
    aim = found[("topk", "dense", "fkl")]
    assert aim.mean == pytest.approx(0.011) and aim.high < 0.02
    assert "top-k + tail bucket vs dense 8-bit | teacher KL" in table
    text = "\n".join(findings(results, found))
    assert "the whole interval is below +2 %: the aim is met" in text
    assert "over-confident (the whole interval above 0)" in text
    assert "drkl" not in text  # the DRKL student failed: no comparison is claimed
    rows = arms_table(results).splitlines()
    assert rows[2].startswith("| dense | dense 8-bit | fkl | 3 | 2.1000 ± ")
    assert "failed: RuntimeError: a / b" in rows[-1]


def test_training_text_metrics_are_reported_beside_the_held_out_ones():
    results = fake_results()
    for seed, run in results["rkl"].items():  # under-confident held out, over on training text
        run["final"].update(gap=-0.05 - 0.01 * seed, train_gap=0.02 + 0.001 * seed,
                            train_fkl=0.1, train_ece=0.05)  # fmt: skip
    for seed, run in results["topk"].items():
        run["final"].update(train_gap=-0.001 * seed, train_fkl=0.05, train_ece=0.04)
    table, found = paired_table(results)
    assert found[("rkl", "topk", "train_gap")].mean == pytest.approx(0.022)
    assert found[("rkl", "topk", "train_fkl")].mean == pytest.approx(1.0)  # relative: 0.1/0.05
    assert "RKL vs FKL (top-k store) | overconf. gap, training text |" in table
    text = "\n".join(findings(results, found))
    assert "the RKL student's over-confidence gap on held-out text is -0.0600" in text
    assert "under-confident (the whole interval below 0)" in text
    assert "the RKL student's over-confidence gap on training text is +0.0210" in text
    assert "gap, training text" in arms_table(results).splitlines()[0]


def test_on_the_tail_dropped_store_the_objectives_are_compared_with_its_fkl_arm():
    arms = make_arms([1.0], "droptail")
    assert {arms[a].store for a in ("rkl", "drkl-1", "droptail")} == {"droptail"}
    assert arms["droptail"].diversity and not arms["topk"].diversity
    assert run_label("rkl", arms["rkl"], parse_args([])) == "rkl-droptail-k128-q6"
    results = fake_results()
    # FKL on the tail-dropped store: 20 % further from the teacher, over-confident; RKL on it.
    results["droptail"] = {s: dict(r, store="droptail") for s, r in results["topk"].items()}
    for s, run in results["droptail"].items():
        run["final"] = dict(run["final"], fkl=run["final"]["fkl"] * 1.2, gap=0.04 + 0.001 * s)
    for run in results["rkl"].values():
        run["store"] = "droptail"
    table, found = paired_table(results)
    assert ("rkl", "droptail", "gap") in found and ("rkl", "topk", "gap") not in found
    assert found[("rkl", "droptail", "gap")].mean == pytest.approx(0.06 - 0.041)
    assert found[("droptail", "topk", "fkl")].mean == pytest.approx(0.2)
    assert "RKL vs FKL (tail-dropped top-k store) | overconf. gap |" in table
    text = "\n".join(findings(results, found))
    assert (
        "the FKL (tail-dropped store) student's over-confidence gap on held-out text is +0.0410"
        in text
    )
    assert "the RKL (tail-dropped store) student's over-confidence gap" in text
    with pytest.raises(SystemExit, match="topk or droptail"):
        make_arms([1.0], "dense")


def test_a_run_with_a_failed_student_leaves_the_report_and_plot_as_they_were(tmp_path):
    report, plot = tmp_path / "BENCHMARKS.md", tmp_path / "curves.png"
    report.write_text("<!-- quality-x:start -->\nthe committed figures\n<!-- quality-x:end -->\n")
    args = parse_args(["--report", str(report), "--plot", str(plot), "--section", "quality-x"])
    results = fake_results()
    results["topk"][1] = {"error": "OSError: No space left on device"}
    with pytest.raises(SystemExit, match="topk seed 1: OSError: No space left.*left as they were"):
        publish(results, args, "the new figures")
    assert "the committed figures" in report.read_text() and not plot.exists()
    del results["drkl-0.5"]
    results["topk"][1] = results["topk"][0]
    publish(results, args, "the new figures", stamp=lambda message: None)
    assert "the new figures" in report.read_text() and plot.stat().st_size > 0


def test_every_drkl_gamma_is_an_arm():
    arms = make_arms([0.25, 0.5, 1.0])
    assert [a for a in arms if a.startswith("drkl")] == ["drkl-0.25", "drkl-0.5", "drkl-1"]
    assert arms["drkl-1"].params == {"gamma": 1.0} and arms["sampled"].use_counts


def test_folders_carry_the_store_settings_so_a_sweep_reuses_the_dense_students():
    arms = make_arms([0.5])
    base = parse_args([])
    sweeps = {
        "k": parse_args(["--k", "256"]),
        "values": parse_args(["--values", "float32"]),
        "draws": parse_args(["--draws", "200"]),
        "bits": parse_args(["--dense-bits", "4"]),
    }
    labels = {name: run_label(name, arm, base) for name, arm in arms.items()}
    assert len(set(labels.values())) == len(arms)  # no two arms of a run share a folder
    assert labels["topk"] == "topk-k128-q6" and labels["dense"] == "dense-bits8"
    assert labels["rkl"] == "rkl-topk-k128-q6"
    # The stores each setting makes (droptail is derived from topk): only the students of
    # those stores get new folders.
    makes = {"k": {"topk", "droptail"}, "values": {"topk", "droptail"}, "draws": {"sampled"},
             "bits": {"dense"}}  # fmt: skip
    for setting, args in sweeps.items():
        changed = {n for n, arm in arms.items() if run_label(n, arm, args) != labels[n]}
        assert changed == {n for n, arm in arms.items() if arm.store in makes[setting]}, setting
    assert run_label("droptail", arms["droptail"], sweeps["k"]) == "droptail-k256-q6"


def test_report_says_how_many_students_were_read_from_earlier_runs():
    args = vars(parse_args([]))
    fresh = report_body(fake_results(), args, "cmd", 600.0)
    assert "wall time 10.0 min; " in fresh and "earlier runs" not in fresh
    swept = report_body(fake_results(), args, "cmd", 600.0, reused=3)
    assert "wall time 10.0 min, training 7 of the 10 students (the other 3 were read" in swept


def test_a_work_folder_refuses_a_run_with_another_corpus_or_architecture(tmp_path):
    check_folder(tmp_path, parse_args([]))
    check_folder(tmp_path, parse_args(["--k", "256", "--steps", "80"]))  # per-student settings
    with pytest.raises(SystemExit, match="student_layers 4 there, 28 here"):
        check_folder(tmp_path, parse_args(["--preset", "cpu-regime"]))
    with pytest.raises(SystemExit, match="max_chars 2000 there, 500 here"):
        check_folder(tmp_path, parse_args(["--max-chars", "500"]))


def test_a_cached_student_is_reused_only_with_its_training_settings(tmp_path):
    job = {"threads": 1, "run_dir": str(tmp_path), "keep": [0, 29], "steps": 40,
           "eval_every": 10, "tokens_per_step": 128, "lr": 3e-3,
           "arm": {"store": "dense", "divergence": "fkl"}}  # fmt: skip
    cached = {"curve": [], "final": {}, "settings": {k: job[k] for k in TRAINING_SETTINGS}}
    (tmp_path / "heldout.json").write_text(json.dumps(cached))
    assert run_student(job) == cached  # nothing trained
    with pytest.raises(RuntimeError, match=r"other settings \(lr, steps\)"):
        run_student({**job, "steps": 100, "lr": 1e-3})
    legacy = {"curve": [], "final": {}}  # written before settings were recorded: reused
    (tmp_path / "heldout.json").write_text(json.dumps(legacy))
    assert run_student({**job, "steps": 100}) == legacy
