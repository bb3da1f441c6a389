"""``logitstore bench``: run the benchmark scripts and write ``BENCHMARKS.md``."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes: a smoke run of every script.")
@click.option(
    "--out",
    default="BENCHMARKS.md",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Report file (its distillation-quality section is kept).",
)
@click.option("--only", default="", help="Comma-separated benchmarks, e.g. codecs,loader.")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds per benchmark.")
def command(quick: bool, out: str, only: str, timeout: float) -> None:
    """Run every benchmark as its own process and write the report.

    Each script's figures and ratios are copied as printed, with the machine and the
    command that reproduces them. Exits 1 when a benchmark failed (the report still lists it).

    \b
    Examples:
      logitstore bench --quick
      logitstore bench --out BENCHMARKS.md
    """
    from logitstore.benchmarks.run_all import run_all

    results = run_all(Path(out), quick=quick, only=only, timeout=timeout)
    failed = [r.section.key for r in results if r.returncode != 0]
    if failed:
        click.echo(f"{len(failed)} benchmark(s) did not finish: {', '.join(failed)}", err=True)
        sys.exit(1)
