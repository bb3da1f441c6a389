"""The built wheel, installed into a fresh virtual environment as a user would.

The repository keeps ``pipelines/``, ``cli/`` and ``benchmarks/`` at its root; the wheel must
install them under the project's name only, and the command and the benchmarks must work from
it (no source checkout on ``sys.path``). The fresh environment sees the dependencies of this one
through a ``.pth`` path entry (a path entry's own ``.pth`` files are not run, so this
environment's editable install of the project stays invisible), and the wheel is installed with
``--no-deps --no-index``: nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")
    # A copy of the tracked tree, so the build never writes into the checkout.
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            dst = build / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    proc = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(build),
        ],
        cwd=build,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("logitstore-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory, wheel) -> Path:
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(home)
    python = home / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=home,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=home,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home


def test_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names}
        (dist,) = (t for t in top if t.endswith(".dist-info"))
        assert top == {"logitstore", dist}
        if f"{dist}/top_level.txt" in names:
            assert zf.read(f"{dist}/top_level.txt").decode().split() == ["logitstore"]
        entry = zf.read(f"{dist}/entry_points.txt").decode()
    assert "logitstore = logitstore.cli:main" in entry
    for module in ("pipelines/teacher_pass.py", "cli/__init__.py", "benchmarks/run_all.py"):
        assert f"logitstore/{module}" in names
    assert not any(n.startswith(("tests/", "pipelines/", "cli/", "benchmarks/")) for n in names)


def test_installed_command_and_benchmarks_work_without_the_checkout(fresh_env, tmp_path):
    bindir = fresh_env / "bin"
    python = str(bindir / "python")
    # The checkout is not importable from here: cwd is elsewhere and no path points at it.
    where = run(
        [
            python,
            "-c",
            "import logitstore, logitstore.pipelines, logitstore.benchmarks.run_all as r;"
            "print(logitstore.__file__); print(r.__file__)",
        ],
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    for line in where.stdout.split():
        assert Path(line).is_relative_to(fresh_env), line
        assert not Path(line).is_relative_to(ROOT), line
    for generic in ("pipelines", "cli", "benchmarks"):
        proc = run([python, "-c", f"import {generic}"], cwd=tmp_path)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, generic
    top = run([str(bindir / "logitstore"), "--help"], cwd=tmp_path)
    assert top.returncode == 0, top.stderr[-3000:]
    for sub in ("teacher-pass", "train", "bench", "verify", "push"):
        assert sub in top.stdout
    bench = run([str(bindir / "logitstore"), "bench", "--help"], cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "--only" in bench.stdout
    # The benchmark runner resolves its scripts inside the installed package.
    listed = run(
        [
            python,
            "-c",
            "from logitstore.benchmarks.run_all import SECTIONS; import importlib.util;"
            "print(all(importlib.util.find_spec(s.module) for s in SECTIONS))",
        ],
        cwd=tmp_path,
    )
    assert listed.returncode == 0 and listed.stdout.strip() == "True", listed.stderr[-3000:]
