"""Crashes: SIGKILL a real teacher pass, ``convert`` and training at seeded random moments.

Each operation runs as the real ``logitstore`` command in a subprocess and is killed with
SIGKILL at three moments drawn from a seeded RNG (after its first file appears plus a delay,
after ``k`` commits plus a delay, and at the first temporary name seen, i.e. inside a commit).
The kills land on the same output: each later run is a ``--resume`` that is killed again, and
a last ``--resume`` finishes it. The result must equal an uninterrupted run:

* stores (teacher pass, convert): every file byte for byte, the manifest included (nothing
  committed carries a timestamp or a duration, so no field is excluded);
* training: ``metrics.jsonl`` line for line and the final weights bit for bit. The only field
  left out is ``tokens_per_s``, a wall-clock throughput. Losses are compared exactly, not
  within a tolerance: resume restores the weights, optimizer, scheduler, RNG and loader state
  exactly, and every process runs one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads
  (1)`` here), so the same deterministic CPU kernels run in the same order.

After every kill the partial output must hold only committed, intact shards (and no manifest);
after the last resume no temporary name (``.tmp-``, the prefix of ``storage._fs.temp_name``
and of unfinished checkpoints) and no claim is left anywhere.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.cli import main
from logitstore.codecs import get_codec
from logitstore.errors import StoreNotFoundError
from logitstore.format import record_index
from logitstore.hf import STATE_NAME
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.pipelines.train import TrainConfig, train
from logitstore.storage._fs import TMP_PREFIX, tree_checksum

# One torch thread (tests/hardening/conftest.py); the subprocesses run one thread too (see
# env()), so float rounding matches.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
PASS = {"k": "8", "max-length": "48", "docs-per-shard": "4", "batch-size": "4", "limit": "6"}


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def logitstore_cmd(*args: object) -> list[str]:
    """The installed ``logitstore`` entry point (or the same click group through ``-c``)."""
    script = Path(sys.executable).with_name("logitstore")
    head = (
        [str(script)] if script.exists() else [sys.executable, "-c", "from cli import main; main()"]
    )
    return [*head, *map(str, args)]


def run_and_kill(
    cmd: list[str], trigger: Callable[[], bool], delay: float, log: Path, timeout: float = 300
) -> None:
    """Start ``cmd``, wait until ``trigger()``, sleep ``delay`` seconds, then SIGKILL it."""
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not trigger():
                assert proc.poll() is None, f"exited {proc.returncode} early: {log.read_text()}"
                assert time.monotonic() < deadline, "the kill point was never reached"
                time.sleep(0.003)
            time.sleep(delay)
            assert proc.poll() is None, f"finished before the kill ({delay=:.3f})"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def count(folder: Path) -> int:
    try:
        return len([n for n in os.listdir(folder) if not n.startswith(TMP_PREFIX)])
    except FileNotFoundError:
        return 0


def has_temporary(*folders: Path) -> bool:
    for folder in folders:
        try:
            if any(n.startswith(TMP_PREFIX) for n in os.listdir(folder)):
                return True
        except FileNotFoundError:
            pass
    return False


def kill_points(seed: int) -> list[tuple[str, int, float]]:
    """Three moments: (trigger kind, commits to wait for, delay in seconds), seeded."""
    rng = random.Random(seed)
    first = rng.randint(1, 3)
    return [
        ("started", 0, rng.uniform(0.0, 0.3)),
        ("commits", first, rng.uniform(0.0, 0.02)),
        ("temporary", first + rng.randint(2, 3), 0.0),
    ]


def trigger_for(kind: str, k: int, root: Path, commits: Path, started: Path) -> Callable[[], bool]:
    if kind == "started":
        return started.exists
    if kind == "commits":
        return lambda: count(commits) >= k
    # A temporary name in sight means a commit is in flight; else fall back to k commits.
    return lambda: has_temporary(root / "shards", commits) or count(commits) >= k


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.name.startswith(TMP_PREFIX) or p.suffix == ".claim"
    ]


def assert_only_committed_shards(root: Path) -> int:
    """A killed store: no manifest, readers refuse it, and every record's files are intact."""
    assert not (root / "manifest.json").exists()
    unfinished = (root / "settings.json").exists()
    with pytest.raises(StoreNotFoundError, match="unfinished" if unfinished else "no store"):
        open_store(str(root))
    records = sorted(p for p in (root / "records").glob("*") if record_index(p.name) is not None)
    for path in records:
        record = json.loads(path.read_text())
        files = [(name, (root / name).read_bytes()) for name, _ in record["files"]]
        assert [len(b) for _, b in files] == [size for _, size in record["files"]], path.name
        assert tree_checksum(files) == record["sha256"], f"{path.name}: committed but damaged"
    return len(records)


def assert_identical_stores(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run"


def teacher_pass_args(teacher: Path, data: Path, out: Path, backend: str) -> list[str]:
    args = ["teacher-pass", "--teacher", teacher, "--data", data, "--out", out, "--no-progress"]
    args += ["--backend", backend]
    for key, value in PASS.items():
        args += [f"--{key}", value]
    return [str(a) for a in args]


def test_teacher_pass_killed_three_times_then_resumed_equals_one_run(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    out = tmp_path / "killed"
    args = teacher_pass_args(tiny_teacher_dir, text_jsonl, out, "zarr")
    committed = []
    for i, (kind, k, delay) in enumerate(kill_points(seed=1)):
        resume = ["--resume"] if i else []
        trigger = trigger_for(kind, k, out, out / "records", out / "settings.json")
        run_and_kill(logitstore_cmd(*args, *resume), trigger, delay, tmp_path / f"pass{i}.log")
        committed.append(assert_only_committed_shards(out))
    assert committed == sorted(committed)  # a resumed run never loses a committed shard

    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    shards = open_store(str(out)).num_shards
    assert committed[-1] < shards
    assert f"wrote {shards - committed[-1]} of {shards} shards" in result.output

    reference = tmp_path / "reference"
    assert CliRunner().invoke(main, teacher_pass_args(
        tiny_teacher_dir, text_jsonl, reference, "zarr")).exit_code == 0  # fmt: skip
    assert_identical_stores(out, reference)
    assert leftovers(out) == [] and not (out / "claims").exists()
    ids = [d.doc_id for d in open_store(str(out)).iter_documents()]
    assert len(ids) == len(set(ids)) == open_store(str(reference)).num_documents


@pytest.fixture(scope="module")
def parquet_store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> Path:
    """A parquet store of many one-document shards (a conversion lasts long enough to kill)."""
    out = tmp_path_factory.mktemp("crash-src") / "store"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir), data=str(text_jsonl), out=str(out), k=8,
            max_length=48, limit=2, docs_per_shard=1, batch_size=8, backend="parquet",
            progress=False,
        )
    )  # fmt: skip
    return out


def test_convert_killed_three_times_then_resumed_equals_one_conversion(parquet_store, tmp_path):
    out = tmp_path / "zarr"
    convert = ["convert", str(parquet_store), str(out), "--backend", "zarr"]
    committed = []
    for i, (kind, k, delay) in enumerate(kill_points(seed=2)):
        resume = ["--resume"] if i else []
        trigger = trigger_for(kind, k, out, out / "records", out / "settings.json")
        run_and_kill(logitstore_cmd(*convert, *resume), trigger, delay, tmp_path / f"cv{i}.log")
        committed.append(assert_only_committed_shards(out))
    assert committed == sorted(committed)

    # Without --resume the partial output is refused, and left as it was.
    before = tree(out)
    refused = CliRunner().invoke(main, convert)
    assert refused.exit_code == 2 and "--resume" in refused.output
    assert tree(out) == before

    resumed = CliRunner().invoke(main, [*convert, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    assert CliRunner().invoke(main, ["convert", str(parquet_store), str(reference),
                                     "--backend", "zarr"]).exit_code == 0  # fmt: skip
    assert_identical_stores(out, reference)
    assert leftovers(out) == [] and not (out / "claims").exists()


TRAIN = {
    "divergence": "fkl", "max-steps": "8", "tokens-per-step": "200", "tokens-per-batch": "256",
    "lr": "0.01", "warmup-steps": "2", "save-every": "1", "seed": "3",
}  # fmt: skip


def train_args(store: Path, student: Path, out: Path) -> list[str]:
    args = ["train", "--store", str(store), "--student", str(student), "--out", str(out)]
    for key, value in TRAIN.items():
        args += [f"--{key}", value]
    return [*args, "--no-progress"]


def curve(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "checkpoint-8" / "model.safetensors")


@pytest.mark.slow  # three training processes and two runs: about 20 s on two cores
def test_training_killed_three_times_then_resumed_equals_one_run(
    parquet_store, tiny_student_dir, tmp_path
):
    out = tmp_path / "run"
    args = train_args(parquet_store, tiny_student_dir, out)
    rng = random.Random(3)
    first = rng.randint(1, 2)
    checkpoints = out / "checkpoints"
    points = [
        (lambda: (out / "metrics.jsonl").exists(), rng.uniform(0.0, 0.05)),
        (lambda: count(checkpoints) >= 1 and _latest(checkpoints) >= first, rng.uniform(0, 0.05)),
        (lambda: _torn(checkpoints) or _latest(checkpoints) >= first + 3, 0.0),
    ]
    steps_done = []
    for i, (trigger, delay) in enumerate(points):
        resume = ["--resume"] if i else []
        run_and_kill(logitstore_cmd(*args, *resume), trigger, delay, tmp_path / f"train{i}.log")
        steps_done.append(_latest(checkpoints))
        assert steps_done[-1] < 8, "the run finished before the kill"
    assert steps_done == sorted(steps_done)

    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    assert (
        CliRunner().invoke(main, train_args(parquet_store, tiny_student_dir, reference)).exit_code
        == 0
    )

    got, want = curve(out), curve(reference)
    assert [row["step"] for row in got] == list(range(1, 9))  # nothing lost or duplicated
    assert got == want
    a, b = final_weights(out), final_weights(reference)
    assert sorted(a) == sorted(b)
    for name in b:
        assert torch.equal(a[name], b[name]), name
    assert leftovers(out) == [] and not _torn(checkpoints)


def _checkpoints(checkpoints: Path) -> list[str]:
    try:
        return [n for n in os.listdir(checkpoints) if n.startswith("checkpoint-")]
    except FileNotFoundError:
        return []


def _torn(checkpoints: Path) -> bool:
    """A checkpoint being written (or cut short): its completion file is not there yet."""
    return any(not (checkpoints / n / STATE_NAME).exists() for n in _checkpoints(checkpoints))


def _latest(checkpoints: Path) -> int:
    """Step of the newest complete checkpoint (0 when none)."""
    done = [n for n in _checkpoints(checkpoints) if (checkpoints / n / STATE_NAME).exists()]
    return max((int(n.removeprefix("checkpoint-")) for n in done), default=0)


def test_a_torn_metrics_line_is_dropped_on_resume(parquet_store, tiny_student_dir, tmp_path):
    # SIGKILL during the append of a metrics line leaves it torn; resume must redo that step
    # rather than fail to parse the file.
    kw = dict(store=str(parquet_store), student=str(tiny_student_dir), divergence="fkl",
              max_steps=4, tokens_per_step=200, tokens_per_batch=256, save_every=2,
              warmup_steps=1, progress=False, device="cpu")  # fmt: skip
    train(TrainConfig(out=str(tmp_path / "a"), **kw))
    train(TrainConfig(out=str(tmp_path / "b"), stop_after=2, **kw))
    metrics = tmp_path / "b" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 0.12')  # torn mid-write
    train(TrainConfig(out=str(tmp_path / "b"), resume=True, **kw))
    assert curve(tmp_path / "b") == curve(tmp_path / "a")
    assert [row["step"] for row in curve(tmp_path / "b")] == [1, 2, 3, 4]
    assert leftovers(tmp_path / "b") == []


# -- a kill before and after every file-system operation of the writer ---------------------

VOCAB = 300
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": []}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
# Everything the writer can change the disk with; a kill lands before or after each call.
_MUTATING = [(os, "open"), (os, "replace"), (os, "rename"), (os, "link"), (os, "remove"),
             (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync"), (shutil, "rmtree")]  # fmt: skip


def _documents(seed: int) -> list[EncodedDocument]:
    codec = get_codec("topk", k=8)
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(2):
        ids = torch.randint(0, VOCAB, (9 + d,), generator=g)
        logprobs = torch.log_softmax(3 * torch.randn(len(ids) - 1, VOCAB, generator=g), -1)
        fields = {k: v.numpy() for k, v in codec.encode(logprobs, ids[1:]).items()}
        docs.append(EncodedDocument(f"{seed}/{d}", ids.numpy(), (ids[1:] % 2 == 0).numpy(), fields))
    return docs


def _write(root: Path, backend: str, shards: list[list[EncodedDocument]]) -> None:
    """What a resumable writing run does: open with resume, skip committed shards, finalize."""
    w = StoreWriter(str(root), codec=get_codec("topk", k=8), backend=backend, metadata=META,
                    vocab_size=VOCAB, mode="resume")  # fmt: skip
    done = w.committed_shards()
    for j, docs in enumerate(shards):
        if j not in done:
            w.write_shard(j, docs)
    w.finalize(len(shards))


def _instrument(on_event: Callable[[], None]) -> None:
    """Call ``on_event`` before and after every mutating file-system call (this process)."""

    def wrap(fn):
        def inner(*args, **kwargs):
            on_event()
            out = fn(*args, **kwargs)
            on_event()
            return out

        return inner

    for module, name in _MUTATING:
        setattr(module, name, wrap(getattr(module, name)))
    real_open = builtins.open

    def writing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wxa+"):
            return wrap(real_open)(file, mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = writing_open


def _killed_at(event: int, root: Path, backend: str, shards) -> bool:
    """Run the writer in a forked child that SIGKILLs itself at the ``event``-th event."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            seen = [0]

            def on_event() -> None:
                seen[0] += 1
                if seen[0] == event:
                    os.kill(os.getpid(), signal.SIGKILL)

            _instrument(on_event)
            _write(root, backend, shards)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize(
    ("backend", "sample"),
    [
        ("parquet", None),
        ("zarr", 24),  # every opening event, then a seeded sample (each zarr kill is slower)
        pytest.param("zarr", None, marks=pytest.mark.slow),
    ],
)
def test_writer_killed_at_every_file_operation_resumes_to_the_same_store(
    backend, sample, tmp_path, monkeypatch
):
    """SIGKILL before and after each mutating call (open for writing, fsync, rename, link,
    remove, mkdir, rmtree) of an uninterrupted run, then resume: the same store, byte for
    byte, and no temporary left. ``sample`` limits the kill points (None: all of them)."""
    # A SIGKILL loses nothing the kernel accepted, so flushing to the device (fsync) is
    # irrelevant here and only slow; the calls are still kill points.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    shards = [_documents(0), _documents(1)]
    reference = tmp_path / "reference"
    events = [0]
    with monkeypatch.context() as m:  # count the events of one uninterrupted run
        for module, name in _MUTATING:
            m.setattr(module, name, getattr(module, name))
        m.setattr(builtins, "open", builtins.open)
        _instrument(lambda: events.__setitem__(0, events[0] + 1))
        _write(reference, backend, shards)
    want = tree(reference)
    assert events[0] > 20
    chosen = list(range(1, events[0] + 1))
    if sample is not None:
        opening = chosen[:12]  # creating settings.json: the most delicate moment
        chosen = opening + sorted(random.Random(4).sample(chosen[12:], sample - len(opening)))
    for event in chosen:
        root = tmp_path / f"k{event}"
        assert _killed_at(event, root, backend, shards), f"event {event} was never reached"
        if (root / "manifest.json").exists():  # killed after the manifest landed: complete
            assert open_store(str(root)).verify() == []
        elif root.exists():
            assert_only_committed_shards(root)
        _write(root, backend, shards)
        got = tree(root)
        assert sorted(got) == sorted(want), f"killed at event {event}"
        assert got == want, f"killed at event {event}"
        assert leftovers(root) == [], f"killed at event {event}"
        shutil.rmtree(root)
