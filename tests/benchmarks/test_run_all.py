"""The benchmark report generator, driven by tiny fake benchmark scripts (no real benchmark)."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitstore.benchmarks import run_all as ra

FAKE = ra.Section("fake", "Fake benchmark", "fake_bench", note="a fake for the tests")


def fake_script(tmp_path: Path, body: str) -> list[str]:
    """A benchmark command running ``body`` (Python source) in a fresh interpreter."""
    path = tmp_path / f"bench_{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body))
    return ["python", str(path)]


def test_parse_output_reads_ratio_lines_and_json_figures():
    rng = random.Random(7)
    a, b, c = (round(rng.uniform(0.01, 50), 3) for _ in range(3))
    tps = round(rng.uniform(1e3, 1e6), 1)
    text = "\n".join(
        [
            "codec                    B/token  x base",  # a header: no ratio in it
            f"topk k=64 q8   {b * 10:.1f}   {tps} tokens/s",  # numbers but no ratio
            f"  ratio pass / bare: {a}x (best), {b}x (median)",
            f"fkl    12.0 ms/step   {c}x",
            "version 2.0xyz and 3x4 matrix",  # not ratios: followed by a word character
            f"zarr read_shard 0.39 M tokens/s (x{c} of floor; more)",
            json.dumps({"figures": {"tokens_per_s": tps, "ratio": a, "name": "skip"}}),
            "{not json",
        ]
    )
    ratios, figures = ra.parse_output(text)
    assert ratios == [
        (f"ratio pass / bare: {a}x (best), {b}x (median)", [a, b]),
        (f"fkl 12.0 ms/step {c}x", [c]),
        (f"zarr read_shard 0.39 M tokens/s (x{c} of floor; more)", [c]),
    ]
    assert figures == {"tokens_per_s": tps, "ratio": a}


def test_report_from_fake_benchmarks(tmp_path):
    rng = random.Random(11)
    mem, speed = round(rng.uniform(0.01, 1), 4), round(rng.uniform(1, 9), 3)
    ok = fake_script(
        tmp_path,
        f"""
        import json, sys
        print("objective  naive MiB  fused MiB  mem ratio  time ratio")
        print("fkl  {mem * 1000:.1f}  1000.0  {mem}x  {speed}x")
        print(json.dumps({{"figures": {{"tokens_per_s": {speed * 1e4}}}}}))
        print("progress noise", file=sys.stderr)
        """,
    )
    bad = fake_script(tmp_path, 'import sys\nprint("half a table 0.5x")\nsys.exit(3)\n')
    good = ra.run_section(FAKE, quick=False, timeout=60, command=ok)
    failed = ra.run_section(FAKE, quick=True, timeout=60, command=bad)

    assert good.returncode == 0 and good.status.startswith("ok")
    assert good.ratios == [(f"fkl {mem * 1000:.1f} 1000.0 {mem}x {speed}x", [mem, speed])]
    assert good.figures == {"tokens_per_s": pytest.approx(speed * 1e4)}
    assert "progress noise" in good.stderr and "progress noise" not in good.stdout
    assert failed.returncode == 3 and "exit status 3" in failed.status
    assert failed.ratios == [("half a table 0.5x", [0.5])]

    info = {"CPU": "Test CPU | 2 cores", "GPU": "none"}
    report = ra.format_report([good, failed], info, quick=False)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(report)
    lines = out.read_text().splitlines()
    assert "| CPU | Test CPU \\| 2 cores |" in lines  # table cells escape '|'
    assert f"| fkl {mem * 1000:.1f} 1000.0 {mem}x {speed}x | {mem:g}x, {speed:g}x |" in lines
    assert f"| tokens_per_s | {speed * 1e4:g} |" in lines
    assert f"Reproduce: `{' '.join(ok)}`" in lines
    assert "Status: FAILED with exit status 3" in report
    # The output appears verbatim, inside a code block.
    block = report.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert block.splitlines()[1] == f"fkl  {mem * 1000:.1f}  1000.0  {mem}x  {speed}x"


def test_timeout_kills_the_benchmark(tmp_path):
    slow = fake_script(tmp_path, 'import time\nprint("started", flush=True)\ntime.sleep(60)\n')
    result = ra.run_section(FAKE, quick=False, timeout=1.0, command=slow)
    assert result.returncode is None and result.status.startswith("TIMED OUT")
    assert result.seconds < 30 and result.stdout.strip() == "started"


def test_update_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "report.md"
    ra.update_section(path, "quality", "## Q\n\nfirst")
    ra.update_section(path, "other", "## O\n\nkept")
    ra.update_section(path, "quality", "## Q\n\nsecond")
    text = path.read_text()
    assert text.count("<!-- quality:start -->") == 1 and "first" not in text
    assert (
        ra.extract_section(text, "quality")
        == "<!-- quality:start -->\n## Q\n\nsecond\n<!-- quality:end -->"
    )
    assert "kept" in ra.extract_section(text, "other")


def test_cli_bench_writes_report_keeps_quality_and_reports_failure(tmp_path, monkeypatch):
    from logitstore.cli import main

    value = round(random.Random(3).uniform(0.1, 5), 3)
    ok = fake_script(tmp_path, f'print("step ratio {value}x")\n')
    bad = fake_script(tmp_path, "raise SystemExit(2)\n")
    sections = [
        ra.Section("one", "First", "x"),
        ra.Section("two", "Second", "y"),
        ra.Section("three", "Third", "z"),
    ]
    commands = {"one": ok, "two": bad, "three": ok}
    real = ra.run_section

    def fake_run(section, *, quick, timeout):
        return real(section, quick=quick, timeout=timeout, command=commands[section.key])

    monkeypatch.setattr(ra, "SECTIONS", sections)
    monkeypatch.setattr(ra, "run_section", fake_run)
    out = tmp_path / "BENCHMARKS.md"
    ra.update_section(out, "quality", "## Distillation quality\n\n| a | b |")
    ra.update_section(out, "quality-objectives", "## Objectives\n\n| c | d |")
    ra.update_section(out, "notquality", "## Other\n\nnot kept")
    result = CliRunner().invoke(main, ["bench", "--out", str(out), "--only", "one,two"])
    assert result.exit_code == 1, result.output
    assert "two" in result.output
    text = out.read_text()
    assert "## First" in text and "## Second" in text and "## Third" not in text
    assert f"| step ratio {value}x | {value:g}x |" in text
    # Both quality sections survive, in their order; other marked blocks are not kept.
    assert text.index("## Distillation quality\n\n| a | b |") < text.index(
        "## Objectives\n\n| c | d |"
    )
    assert "not kept" not in text
    assert "## Machine" in text and "| GPU |" in text

    bad_only = CliRunner().invoke(main, ["bench", "--out", str(out), "--only", "nope"])
    assert bad_only.exit_code == 2 and "unknown benchmarks ['nope']" in bad_only.output


def test_machine_info_names_the_real_machine():
    import os

    import torch

    info = ra.machine_info()
    assert info["torch"] == torch.__version__
    assert int(info["cores available"]) == len(os.sched_getaffinity(0))
    assert (info["GPU"] == "none") == (not torch.cuda.is_available())
    assert float(info["memory"].split()[0]) > 0


def test_parse_columns_reads_ratio_columns_of_aligned_tables():
    rng = random.Random(5)
    rows = [(name, rng.uniform(0, 9), rng.uniform(0, 2), rng.uniform(0, 3)) for name in "abc"]
    head = f"{'objective':<12}{'naive MiB':>11}{'mem ratio':>11}{'fused s':>10}{'time ratio':>11}"
    lines = [head]  # 'fused s' and 'time ratio' are one space apart: alignment decides
    for name, mib, mem, t in rows:
        lines.append(f"{'obj ' + name:<12}{mib * 100:>11.0f}{mem:>11.3f}{t:>10.2f}{t / 2:>11.2f}")
    lines.append("aim: ratio <= 0.15, time <= 1.2")  # no blank line, but not under the columns
    lines += ["", f"{'codec':<20}{'B/token':>8}{'x base':>8}  per field", "", "x 1 2 3"]
    lines.append(f"{'TopK(k=8, q8)':<20}{12.5:8.1f}{0.25:8.3f}  ids0=3.0 values=2.0")
    cells = ra.parse_columns("\n".join(lines))
    expected = []
    for name, _, mem, t in rows:
        expected += [
            (f"obj {name}", "mem ratio", round(mem, 3)),
            (f"obj {name}", "time ratio", round(t / 2, 2)),
        ]
    assert cells == expected  # the blank line after the codec header ends its table
    table = "\n".join([f"{'codec':<20}{'B/token':>8}{'x base':>8}  per field"] + lines[-1:])
    assert ra.parse_columns(table) == [("TopK(k=8, q8)", "x base", 0.25)]
