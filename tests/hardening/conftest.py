"""Shared by the bad-input tests (``test_bad_input_*.py``): driving the ``logitstore`` CLI,
checking that a refusal is clean, hashing what must stay unchanged, and the store they are
refused against.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from logitstore.cli import main

PASS = ["--k", "8", "--max-length", "32", "--limit", "3", "--docs-per-shard", "8",
        "--temperatures", "1.0,2.0", "--no-progress"]  # fmt: skip
TRAIN = ["--max-steps", "1", "--tokens-per-step", "64", "--tokens-per-batch", "64",
         "--device", "cpu", "--no-progress"]  # fmt: skip


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result: Result, *words: str) -> None:
    """A clean refusal: exit 2 from the CLI's error handler (or click's), no traceback, and a
    message holding every one of ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def snapshot(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every directory under ``root`` (and ``root`` itself)."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def teacher_vocab(teacher_dir: Path) -> int:
    return int(json.loads((teacher_dir / "config.json").read_text())["vocab_size"])


def teacher_pass(teacher: Path, data: Path, out: Path, *extra: Any) -> Result:
    return invoke("teacher-pass", "--teacher", teacher, "--data", data, "--out", out, *PASS, *extra)


def tree_checksum(root: Path, files: list[list[Any]]) -> str:
    """FORMAT.md's shard checksum, written out independently of the library."""
    h = hashlib.sha256()
    for name, _ in sorted(files):
        data = (root / name).read_bytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@pytest.fixture(scope="session")
def kit():
    """The helpers above as one object (test modules cannot import a conftest)."""
    import types

    return types.SimpleNamespace(
        PASS=PASS,
        TRAIN=TRAIN,
        invoke=invoke,
        refused=refused,
        snapshot=snapshot,
        teacher_vocab=teacher_vocab,
        teacher_pass=teacher_pass,
        tree_checksum=tree_checksum,
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tiny models (a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(one_thread, tmp_path_factory, tiny_teacher_dir, text_jsonl) -> Path:
    """A small finished store (zarr, k = 8, temperatures 1 and 2), one per test module."""
    out = tmp_path_factory.mktemp("bad-input") / "store"
    result = invoke("teacher-pass", "--teacher", tiny_teacher_dir, "--data", text_jsonl,
                    "--out", out, *PASS)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def store_copy(store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


# ---- hostile stores: read in a child process under a memory limit ---------------------------

LIMIT_BYTES = 1536 * 2**20  # 1.5 GiB of address space beyond what the child starts with

_CHILD = r"""
import json, resource, sys, traceback
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]), hard))
from click.testing import CliRunner
from logitstore.cli import main
result = CliRunner().invoke(main, sys.argv[2:], catch_exceptions=True)
exc = result.exception
print(json.dumps({
    "exit_code": result.exit_code,
    "output": result.output,
    "exception": None if exc is None or isinstance(exc, SystemExit) else type(exc).__name__,
    "mro": [] if exc is None else [c.__name__ for c in type(exc).__mro__],
    "traceback": "" if exc is None or isinstance(exc, SystemExit)
        else "".join(traceback.format_exception(exc)),
}))
"""


def run_limited(*args: Any, limit: int = LIMIT_BYTES, timeout: float = 120) -> dict[str, Any]:
    """Run ``logitstore ARGS`` in a child process whose address space may grow by at most
    ``limit`` bytes; return its exit code, output and the class of any uncaught exception.

    A MemoryError (or a kill) in the child shows as a failed refusal, not as a crash of the
    test run.
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(limit), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refused_limited(report: dict[str, Any], *words: str) -> None:
    """``run_limited``'s report is a clean refusal: exit 2, no traceback, ``words`` said."""
    assert report["exception"] is None, report["traceback"][-3000:]
    assert report["exit_code"] == 2, report
    assert "Traceback" not in report["output"], report["output"]
    for word in words:
        assert word in report["output"], (word, report["output"])
