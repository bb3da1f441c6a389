"""Shared by the bad-input tests (``test_bad_input_*.py``): driving the ``logitstore`` CLI,
checking that a refusal is clean, hashing what must stay unchanged, and the store they are
refused against.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from logitstore.cli import main
from tests.hardening import _hostile

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
    assert "RuntimeWarning" not in result.output, result.output  # numpy said nothing either
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


def reseal(root: Path, shard: int | None = None, **counts: int) -> None:
    """The manifest made to match the files again, as an attacker who writes both would.

    Shard ``shard`` (every shard when None): its files as found under its path, their sizes and
    FORMAT.md's checksum (``tree_checksum``), and any ``counts`` given (``documents``,
    ``tokens``, ``positions``); then the store's statistics, summed again over its shards.
    """
    data = json.loads((root / "manifest.json").read_text())
    for j, entry in enumerate(data["shards"]):
        if shard is not None and j != shard:
            continue
        entry.update(counts)
        base = root / entry["path"]
        found = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        files = sorted([p.relative_to(root).as_posix(), p.stat().st_size] for p in found)
        entry.update(files=files, sha256=tree_checksum(root, files), bytes=sum(n for _, n in files))
    for key in ("documents", "tokens", "positions", "bytes"):
        data["statistics"][key] = sum(s[key] for s in data["shards"])
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.fixture(scope="session")
def kit():
    """The helpers above as one object (test modules cannot import a conftest)."""
    import types

    return types.SimpleNamespace(
        PASS=PASS,
        TRAIN=TRAIN,
        invoke=invoke,
        refused=refused,
        reseal=reseal,
        snapshot=snapshot,
        teacher_vocab=teacher_vocab,
        teacher_pass=teacher_pass,
        tree_checksum=tree_checksum,
    )


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
out = sys.stdout
print("READY", file=out, flush=True)
for line in sys.stdin:  # one command per line, one report per command
    result = CliRunner().invoke(main, json.loads(line), catch_exceptions=True)
    exc = result.exception
    print("REPORT " + json.dumps({
        "exit_code": result.exit_code,
        "output": result.output,
        "exception": None if exc is None or isinstance(exc, SystemExit) else type(exc).__name__,
        "mro": [] if exc is None else [c.__name__ for c in type(exc).__mro__],
        "traceback": "" if exc is None or isinstance(exc, SystemExit)
            else "".join(traceback.format_exception(exc)),
    }), file=out, flush=True)
"""


class _LimitedChild:
    """One child process under the memory limit that runs ``logitstore`` commands one after
    another (starting a child costs seconds, mostly importing torch; a command costs far less).

    The limit is on the child's whole address space, so a command that leaked would show in the
    ones after it as a failure, never as a pass. A child that dies or hangs is replaced.
    """

    def __init__(self, limit: int) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        assert self._line(120) == "READY", "the limited child did not start"

    def _line(self, timeout: float) -> str | None:
        """The child's next protocol line, skipping anything else it printed; None when it
        died or stayed silent for ``timeout`` seconds."""
        import select
        import time

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith(("READY", "REPORT ")):
                return line.rstrip("\n")

    def run(self, args: list[str], timeout: float) -> dict[str, Any] | str:
        """The command's report, or why there is none."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(args) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return f"the child had exited ({self.proc.poll()})"
        line = self._line(timeout)
        if line is None:
            self.close()
            return f"no report within {timeout} s (exit {self.proc.poll()})"
        return json.loads(line.removeprefix("REPORT "))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


_children: dict[tuple[str, int], _LimitedChild] = {}


def run_limited(
    *args: Any, limit: int = LIMIT_BYTES, timeout: float = 120, pool: str = "storage"
) -> dict[str, Any]:
    """Run ``logitstore ARGS`` in a child process whose address space may grow by at most
    ``limit`` bytes; return its exit code, output and the class of any uncaught exception.

    A MemoryError in the child shows as a failed refusal, a kill or a hang as a failed
    assertion, never as a crash of the test run. Each ``pool`` has a child of its own, so
    commands that load models (and keep their modules) do not eat the headroom of the
    storage cases.
    """
    child = _children.get((pool, limit))
    if child is None or not child.alive():
        child = _children[pool, limit] = _LimitedChild(limit)
    report = child.run([str(a) for a in args], timeout)
    assert isinstance(report, dict), report
    return report


@pytest.fixture(scope="session")
def limited_cli() -> Callable[..., dict[str, Any]]:
    """:func:`run_limited`, for test modules (a test module cannot import a conftest)."""
    return run_limited


@pytest.fixture(scope="session", autouse=True)
def _close_limited_children():
    yield
    for child in _children.values():
        child.close()


def refused_limited(report: dict[str, Any], *words: str) -> None:
    """``run_limited``'s report is a clean refusal: exit 2, no traceback, ``words`` said."""
    assert report["exception"] is None, report["traceback"][-3000:]
    assert report["exit_code"] == 2, report
    assert "Traceback" not in report["output"], report["output"]
    assert "RuntimeWarning" not in report["output"], report["output"]
    for word in words:
        assert word in report["output"], (word, report["output"])


@pytest.fixture
def zarr_store(tmp_path) -> Path:
    """A fresh zarr store of the hostile-store tests (``_hostile.build``), one per test: they
    rewrite its files."""
    return _hostile.build(tmp_path / "store", "zarr")
