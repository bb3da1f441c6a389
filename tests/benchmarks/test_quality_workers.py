"""The quality experiment's workers stop with it: a student trains for minutes, and a worker
left running after ``kill`` would go on writing into the work folder beside a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

WORKER = """
import os, time
from pathlib import Path

def train(job):
    Path(job["folder"], f"{os.getpid()}.pid").write_text("")
    time.sleep(120)
    return {}
"""

PARENT = """
import sys
sys.path.insert(0, {here!r})
from logitstore.benchmarks.quality import run_all_students, stop_on_sigterm
import slow_worker

stop_on_sigterm()
jobs = [dict(name="a", seed=s, folder={folder!r}) for s in range(4)]
run_all_students(jobs, 2, print, train=slow_worker.train)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_the_training_workers(tmp_path):
    (tmp_path / "slow_worker.py").write_text(textwrap.dedent(WORKER))
    folder = tmp_path / "pids"
    folder.mkdir()
    script = PARENT.format(here=str(tmp_path), folder=str(folder))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("*.pid"))) < 2:  # both workers are training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = [int(p.stem) for p in folder.glob("*.pid")]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers)
        assert len(list(folder.glob("*.pid"))) == 2  # no queued job started after the signal
    finally:
        parent.kill()
        for pid in [int(p.stem) for p in Path(folder).glob("*.pid")]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
