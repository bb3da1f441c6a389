"""The teacher pass as real processes: killed with SIGKILL and resumed, and under torchrun."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"k": 8, "max_length": 48, "docs_per_shard": 4, "batch_size": 4, "limit": 6}


def cli_args(teacher: Path, data: Path, out: Path, **settings) -> list[str]:
    args = ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def reference(
    tmp_path: Path, teacher: Path, data: Path, threads: int | None = None, **settings
) -> Path:
    out = tmp_path / "reference"
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # the thread count can change float rounding
    try:
        cfg = TeacherPassConfig(
            teacher=str(teacher), data=str(data), out=str(out), progress=False, **settings
        )
        run_teacher_pass(cfg)
    finally:
        torch.set_num_threads(before)
    return out


def test_sigkill_then_resume_gives_a_byte_identical_store(tmp_path, tiny_teacher_dir, text_jsonl):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "logitstore.pipelines.teacher_pass",
        *cli_args(tiny_teacher_dir, text_jsonl, out, **SETTINGS),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # A random moment: after a random number of commits, plus a random delay that often lands
    # inside the next shard's commit.
    wanted, delay = random.randint(1, 3), random.uniform(0.0, 0.02)
    deadline = time.monotonic() + 180
    records = out / "records"
    while not records.exists() or len(list(records.iterdir())) < wanted:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the pass committed no shard in time"
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), f"the pass finished before the kill ({delay=:.3f})"
    committed = len(list((out / "records").iterdir()))

    summary = run_teacher_pass(
        TeacherPassConfig(teacher=str(tiny_teacher_dir), data=str(text_jsonl), out=str(out),
                          resume=True, progress=False, **SETTINGS)
    )  # fmt: skip
    assert len(summary["shards_written"]) == summary["shards"] - committed > 0
    ref = reference(tmp_path, tiny_teacher_dir, text_jsonl, **SETTINGS)
    got, want = tree(out), tree(ref)
    assert sorted(got) == sorted(want), f"{delay=:.3f}"
    for name in want:
        assert got[name] == want[name], f"{name} differs ({wanted=}, {delay=:.3f})"
    ids = [d.doc_id for d in logitstore.open_store(str(out)).iter_documents()]
    assert len(ids) == len(set(ids)) == summary["manifest"]["statistics"]["documents"]


def test_torchrun_two_processes_write_one_store(tmp_path, tiny_teacher_dir, text_jsonl):
    settings = {**SETTINGS, "docs_per_shard": 10}
    out = tmp_path / "ranks"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "logitstore.pipelines.teacher_pass", *cli_args(tiny_teacher_dir, text_jsonl, out, **settings),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [int(m) for m in re.findall(r"wrote (\d+) of \d+ shards", result.stdout)]
    store = logitstore.open_store(str(out))
    assert len(written) == 2 and all(written) and sum(written) == store.num_shards

    # torchrun runs each rank with one thread; so does the single-process reference.
    ref_path = reference(tmp_path, tiny_teacher_dir, text_jsonl, threads=1, **settings)
    ref = logitstore.open_store(str(ref_path))
    assert store.num_documents == ref.num_documents
    for a, b in zip(store.iter_documents(), ref.iter_documents()):
        assert a.doc_id == b.doc_id
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.support_ids, b.support_ids)
        np.testing.assert_allclose(a.support_logprobs, b.support_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.label_logprob, b.label_logprob, atol=1e-5)
    got, want = tree(out), tree(ref_path)
    assert got == want  # byte-identical, manifest included


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs, and setting the current one is recorded (this runs on any machine)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_each_rank_of_a_node_takes_its_own_gpu_and_an_index_is_refused(monkeypatch, two_gpus):
    from logitstore.errors import ConfigError
    from logitstore.pipelines._distributed import pick_device

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("cuda") == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match=r"device cuda:0: with 2 processes .* GPU 0"):
        pick_device("cuda:0")  # both ranks would have run on GPU 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # one process: its index is obeyed


SLOW_RANK_0 = """
import os, sys, time
from datetime import timedelta

import torch.distributed.distributed_c10d as c10d

# A short timeout for the collectives of the default group (NCCL's is ten minutes)
c10d.default_pg_timeout = timedelta(seconds=2)

import logitstore.pipelines.teacher_pass as tp
from logitstore.cli import main


def slow(work):
    slept = []

    def run(*args, **kwargs):
        if os.environ["RANK"] == "0" and not slept:
            time.sleep(4)
            slept.append(True)
        return work(*args, **kwargs)
    return run


tp._windows = slow(tp._windows)  # the others wait for rank 0's tokens
tp._submit = slow(tp._submit)  # rank 1, with no shard, waits at the end for rank 0's
main(["teacher-pass", *sys.argv[1:]])
"""


def test_ranks_wait_for_a_slow_rank_past_the_collective_timeout(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    """Waits longer than the process group's timeout: rank 0 tokenizing, rank 0's last shard.

    One shard, so rank 1 has none and waits for rank 0 at the end of the pass. The default
    group's timeout is cut to 2 s and rank 0 sleeps 4 s at each wait; the store is the one a
    single process writes.
    """
    settings = {**SETTINGS, "docs_per_shard": 1000}
    script, out = tmp_path / "slow.py", tmp_path / "ranks"
    script.write_text(SLOW_RANK_0)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), *cli_args(tiny_teacher_dir, text_jsonl, out, **settings),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"wrote (\d+) of 1 shards", result.stdout)) == ["0", "1"]
    ref = reference(tmp_path, tiny_teacher_dir, text_jsonl, threads=1, **settings)
    assert tree(out) == tree(ref)


COUNT_TOKENIZING = """
import os, sys

import logitstore.pipelines._data as data
from logitstore.cli import main

texts = []
real = data.tokenize_text
data.tokenize_text = lambda tokenizer, text: texts.append(text) or real(tokenizer, text)
main(["teacher-pass", *sys.argv[1:]], standalone_mode=False)
print(f"rank {os.environ['RANK']} tokenized {len(texts)} texts")
"""


@pytest.mark.slow  # four ranks, about 20 s on two cores: make test-all
def test_a_node_without_rank_0s_cache_tokenizes_once_not_once_per_rank(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    """Two nodes of two ranks, each node with its own datasets cache (a node's local disk)."""
    import socket

    settings = {**SETTINGS, "docs_per_shard": 10}
    script, out = tmp_path / "count.py", tmp_path / "ranks"
    script.write_text(COUNT_TOKENIZING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = "-m torch.distributed.run --nnodes 2 --nproc-per-node 2 --master-addr 127.0.0.1"
    launch = [sys.executable, *options.split(), "--master-port", str(port)]
    args = [str(script), *cli_args(tiny_teacher_dir, text_jsonl, out, **settings)]
    nodes = [
        subprocess.Popen(
            [*launch, "--node-rank", str(node), *args],
            cwd=ROOT,
            env={**env(), "HF_DATASETS_CACHE": str(tmp_path / f"cache-{node}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    counts = dict(re.findall(r"rank (\d) tokenized (\d+) texts", "".join(o for o, _ in outputs)))
    rows = settings["limit"]
    assert {r: int(n) for r, n in counts.items()} == {"0": rows, "1": 0, "2": rows, "3": 0}
    ref = reference(tmp_path, tiny_teacher_dir, text_jsonl, threads=1, **settings)
    assert tree(out) == tree(ref)


def test_an_out_the_ranks_do_not_share_is_refused_saying_so(tiny_teacher_dir, text_jsonl):
    """memory:// is each process's own, as a local disk is each machine's: rank 1 cannot join
    the store rank 0 created (it said 'no store to join ... the first process must open it
    with mode='create' or 'resume'', a mode the user never chose)."""
    args = cli_args(tiny_teacher_dir, text_jsonl, Path("x"), **SETTINGS)
    args[args.index("--out") + 1] = "memory://unshared-store"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "logitstore.pipelines.teacher_pass", *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (
        "error: rank 1 does not see the store rank 0 has just opened at memory://unshared-store: "
        "every rank writes into one store, so --out must be storage they all share"
    ) in result.stderr, result.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr)


def _gloo_threads() -> list[str]:
    """Names of this process's threads that gloo runs (Linux names them in /proc)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.exists() else []
    return [n for n in names if "gloo" in n]


@pytest.mark.parametrize("default_group", [True, False])
def test_ending_the_processes_frees_every_group_while_the_interpreter_runs(
    monkeypatch, default_group, request
):
    """Both stages end with ``end_processes``: every group destroyed (only the waits' group
    where the caller made the default one), the waits' group let go and its gloo threads gone
    before the interpreter shuts down (a gloo group freed during shutdown can abort a
    finished torchrun job)."""
    import torch.distributed as dist

    from logitstore.pipelines import _distributed

    before = _gloo_threads()
    request.getfixturevalue("one_process_group")
    waits = dist.new_group(timeout=timedelta(hours=1))
    monkeypatch.setattr(_distributed, "_waits", waits)
    dist.barrier(group=waits)
    assert len(_gloo_threads()) > len(before)
    _distributed.end_processes(default_group=default_group)
    assert dist.is_initialized() != default_group and _distributed._waits is None
    assert waits not in dist.distributed_c10d._world.pg_map
    del waits
    if default_group:
        assert _gloo_threads() == before
