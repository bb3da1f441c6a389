"""Run every benchmark script and write ``BENCHMARKS.md``: ``python -m logitstore.benchmarks.run_all``.

Each script runs as its own subprocess (its own process group), so one that fails, runs out
of memory or out of time is reported as such and the others still run. The report holds the
machine it ran on and, per section, the command that reproduces it, the lines that carry
ratios (parsed from the output) and the script's output verbatim: every figure and ratio is
exactly what the script printed, measured in this run.

A script may also print machine-readable lines, one JSON object each, of the form
``{"figures": {"name": value, ...}}``; their figures are tabulated by name.

The "Distillation quality" section (``benchmarks/quality.py``, minutes of training) is not run
here; when ``BENCHMARKS.md`` already holds one, it is kept as it was.

    python -m logitstore.benchmarks.run_all [--quick] [--out BENCHMARKS.md] [--only codecs,loader]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from logitstore.errors import ConfigError

#: A ratio as the scripts print it in text: ``0.93x``, ``12x`` or ``x0.65``.
RATIO = re.compile(r"(?<![\w.])(?:(\d+(?:\.\d+)?)x|x(\d+(?:\.\d+)?))(?![\w.])")
#: A column of a printed table that holds ratios: ``mem ratio``, ``x base``.
RATIO_COLUMN = re.compile(r"ratio|^x ", re.IGNORECASE)


@dataclass(frozen=True)
class Section:
    """One benchmark script and how the report runs it.

    Attributes:
        key: short name (``--only``).
        title: the section heading.
        module: the script, run as ``python -m module``.
        args: arguments of the full run.
        quick_args: arguments of ``--quick`` (a smoke run: small sizes, same script).
        note: one line printed under the heading (what the figures mean, what was reduced).
    """

    key: str
    title: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    note: str = ""

    def command(self, quick: bool) -> list[str]:
        return ["python", "-m", self.module, *(self.quick_args if quick else self.args)]


SECTIONS = [
    Section(
        "codecs",
        "Codecs: bytes per token and fidelity (k = 50, 64, 128) against float16 + zstd",
        "logitstore.benchmarks.bench_codecs",
        ("--tokens", "2000"),
        ("--tokens", "600", "--speed-positions", "8192"),
        "Real teacher over held-out real text (2000 positions, to keep the report's run "
        "short); `x base` is bytes/token over the plain float16 log-probs + uint16 ids + "
        "zstd baseline at the same k.",
    ),
    Section(
        "id_bounds",
        "Store size at k = 128: where the bytes go, and bounds for other layouts",
        "logitstore.benchmarks.bench_id_bounds",
        ("--tokens", "4000"),
        ("--tokens", "600"),
        "Real teacher over held-out real text: the shipped top-k layout field by field, the "
        "support set alone under other coders and models (entropy bounds, an oracle "
        "per-token model, the previous position, block dictionaries) and the values at a "
        "bucket-KL target, against the 156 B/token aim.",
    ),
    Section(
        "teacher_pass",
        "Teacher pass against a bare forward",
        "logitstore.benchmarks.bench_teacher_pass",
        ("--tokens", "12000"),
        ("--tokens", "512", "--repeats", "1"),
        "The same teacher over the same batches: forward only vs the whole pass "
        "(setup, codec fit, encode, write, manifest). 12,000 tokens, so the pass's fixed "
        "costs weigh less, as in a real run. Each pass runs between two bare forwards and is "
        "set against their geometric mean; the median of those ratios is the figure.",
    ),
    Section(
        "fused_loss",
        "Fused loss against naive (memory and time)",
        "logitstore.benchmarks.bench_fused_loss",
        ("--n", "2048"),
        ("--n", "256", "--repeats", "1"),
        "The full report uses N = 2048 tokens (the naive path needs about 9 GB at the "
        "script's default of 8192); "
        "the memory ratio of the naive path grows with N, the fused one does not.",
    ),
    Section(
        "loader",
        "Loader throughput (tokens/s)",
        "logitstore.benchmarks.bench_loader",
        (),
        ("--tokens", "8192"),
    ),
    Section(
        "store_read",
        "Store read throughput (tokens/s)",
        "logitstore.benchmarks.bench_store_read",
        (),
        ("--tokens", "8192"),
    ),
    Section(
        "train_step",
        "Offline-KD training step against a cross-entropy step",
        "logitstore.benchmarks.bench_train_step",
        (),
        ("--docs", "1", "--length", "128", "--repeats", "1"),
    ),
]


@dataclass
class Result:
    """What one benchmark run gave: exit status, output, parsed figures."""

    section: Section
    command: list[str]
    returncode: int | None  # None: timed out
    seconds: float
    stdout: str
    stderr: str
    ratios: list[tuple[str, list[float]]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    columns: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.returncode is None:
            return f"TIMED OUT after {self.seconds:.0f} s (output so far below)"
        if self.returncode < 0:
            how = " (out of memory?)" if self.returncode == -signal.SIGKILL else ""
            return f"KILLED by signal {-self.returncode}{how} after {self.seconds:.0f} s"
        if self.returncode:
            return f"FAILED with exit status {self.returncode} after {self.seconds:.0f} s"
        return f"ok, {self.seconds:.0f} s"


def parse_output(text: str) -> tuple[list[tuple[str, list[float]]], dict[str, float]]:
    """The figures a benchmark printed.

    Args:
        text: the script's standard output.

    Returns:
        ``(ratios, figures)``: ``ratios`` lists each line that prints a ratio (``1.23x``), as
        ``(line, [values in order])``, whitespace runs collapsed; ``figures`` maps the names of
        machine-readable lines (``{"figures": {...}}``) to their values, later lines winning.
    """
    ratios: list[tuple[str, list[float]]] = []
    figures: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("figures"), dict):
                figures.update(
                    {str(k): float(v) for k, v in data["figures"].items() if _is_number(v)}
                )
                continue
        values = [float(a or b) for a, b in RATIO.findall(line)]
        if values:
            ratios.append((" ".join(line.split()), values))
    return ratios, figures


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_columns(text: str) -> list[tuple[str, str, float]]:
    """Ratio columns of the right-aligned tables a benchmark printed.

    A header is a line without numbers naming a ratio column (``mem ratio``, ``x base``); the
    rows under it, up to a blank line, are a label (the words before the first number) and
    numbers, each right-aligned under its column: a value's column name is the header text
    between the end of the previous value and the end of this one.

    Returns:
        ``(row label, column name, value)`` for every ratio cell, in printed order.
    """
    cells: list[tuple[str, str, float]] = []
    header: str | None = None
    for line in text.splitlines():
        tokens = list(re.finditer(r"\S+", line))
        numeric = [_number(t.group()) is not None for t in tokens]
        if not tokens:
            header = None
        elif not any(numeric):
            names = re.split(r"\s{2,}", line.strip())
            header = line if len(names) >= 3 and any(map(RATIO_COLUMN.search, names)) else None
        elif header is not None and not numeric[0]:
            first = numeric.index(True)
            label = " ".join(t.group() for t in tokens[:first])
            prev = len(header.split()[0]) if header.split() else 0
            for tok, is_num in zip(tokens[first:], numeric[first:]):
                if not is_num:
                    break
                end = tok.end()
                if not (header[end - 1 : end].strip() and not header[end : end + 1].strip()):
                    header = None  # not under a column's end: the table is over
                    break
                name = header[prev:end].strip()
                prev = end
                if RATIO_COLUMN.search(name):
                    cells.append((label, name, float(tok.group())))
    return cells


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_section(
    section: Section, *, quick: bool, timeout: float, command: list[str] | None = None
) -> Result:
    """Run one benchmark in its own process group and parse what it printed.

    Args:
        section: the benchmark.
        quick: use its smoke-run arguments.
        timeout: seconds before the whole process group is killed.
        command: run this instead of the section's own command (tests use a fake benchmark);
            ``python`` as the first word means this interpreter.
    """
    command = command or section.command(quick)
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: worker processes die with it
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    returncode: int | None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        returncode = None
    ratios, figures = parse_output(stdout)
    seconds = time.perf_counter() - start
    columns = parse_columns(stdout)
    return Result(section, command, returncode, seconds, stdout, stderr, ratios, figures, columns)


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, Python, torch, GPU (or "none") of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "CPU": cpu,
        "cores available": str(cores),
        "memory": memory,
        "OS": platform.platform(),
        "Python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["GPU"] = ", ".join(gpus) if gpus else "none"
    except ImportError:
        info["torch"] = info["GPU"] = "not installed"
    return info


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def format_result(result: Result) -> str:
    """One report section: heading, command, status, ratio table, verbatim output."""
    s = result.section
    parts = [f"## {s.title}", f"Reproduce: `{shlex.join(result.command)}`"]
    if s.note:
        parts.append(s.note)
    parts.append(f"Status: {result.status}.")
    if result.figures:
        rows = "\n".join(f"| {_cell(k)} | {v:g} |" for k, v in result.figures.items())
        parts.append("| figure | value |\n|---|---|\n" + rows)
    if result.ratios:
        rows = "\n".join(
            f"| {_cell(line)} | {', '.join(f'{v:g}x' for v in values)} |"
            for line, values in result.ratios
        )
        parts.append("Lines with ratios, as printed:\n\n| line | ratio |\n|---|---|\n" + rows)
    if result.columns:
        rows = "\n".join(f"| {_cell(r)} | {_cell(c)} | {v:g} |" for r, c, v in result.columns)
        parts.append(
            "Ratio columns of the printed tables:\n\n| row | column | value |\n|---|---|---|\n"
            + rows
        )
    output = result.stdout.rstrip() or "(no output)"
    parts.append(f"Output:\n\n```text\n{output}\n```")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.rstrip().splitlines()[-15:]) or "(no error output)"
        parts.append(f"Error output (last lines):\n\n```text\n{tail}\n```")
    return "\n\n".join(parts)


def format_report(results: Sequence[Result], info: dict[str, str], quick: bool) -> str:
    """The whole benchmark part of ``BENCHMARKS.md``."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    how = "python -m logitstore.benchmarks.run_all" + (" --quick" if quick else "")
    head = [
        "# Benchmarks",
        f"Generated by `{how}` (or `logitstore bench`) on {when}. Every figure and ratio "
        "below was printed by the benchmark script in this one run, against a baseline "
        "measured in the same run; each section gives the command that reproduces it."
        + (" QUICK run: reduced sizes, for a smoke test only." if quick else ""),
        "## Machine",
        "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(v)} |" for k, v in info.items()),
    ]
    return "\n\n".join(head + [format_result(r) for r in results]) + "\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def extract_section(text: str, name: str) -> str | None:
    """The marked block ``name`` of ``text``, markers included, or None."""
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    return text[i : j + len(end)] if 0 <= i < j else None


def quality_sections(text: str) -> list[str]:
    """Every marked ``quality`` or ``quality-NAME`` block of ``text``, in order."""
    names = re.findall(r"<!-- (quality(?:-[\w-]+)?):start -->", text)
    return [block for name in names if (block := extract_section(text, name))]


def update_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` into ``path`` between the markers of ``name`` (appended when absent)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    old = extract_section(text, name)
    text = text.replace(old, block) if old else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="BENCHMARKS.md", help="report file")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated, from {[s.key for s in SECTIONS]}"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    args = parser.parse_args(argv)
    return run_all(Path(args.out), quick=args.quick, only=args.only, timeout=args.timeout)


def run_all(
    out: Path, *, quick: bool = False, only: str = "", timeout: float = 900.0
) -> list[Result]:
    """Run the benchmarks (all, or the keys in ``only``) and write the report to ``out``.

    The quality sections already in ``out`` (``quality`` and any ``quality-NAME`` a run of
    ``benchmarks/quality.py --section`` wrote) are kept, in their order. Returns the results.
    """
    keys = [k.strip() for k in only.split(",") if k.strip()]
    known = [s.key for s in SECTIONS]
    if unknown := sorted(set(keys) - set(known)):
        raise ConfigError(f"unknown benchmarks {unknown}; known: {known}")
    results = []
    for section in SECTIONS:
        if keys and section.key not in keys:
            continue
        print(f"running {shlex.join(section.command(quick))} ...", flush=True)
        result = run_section(section, quick=quick, timeout=timeout)
        print(f"  {result.status}", flush=True)
        results.append(result)
    kept = quality_sections(out.read_text()) if out.exists() else []
    report = format_report(results, machine_info(), quick)
    out.write_text(report + "".join(f"\n{block}\n" for block in kept))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
