"""``logitstore train`` and ``logitstore eval`` end to end, and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from logitstore import open_store
from logitstore.cli import main
from logitstore.cli.train import parse_params
from logitstore.dataset import StoreDataset
from logitstore.divergences import DistillationLoss
from logitstore.errors import ConfigError
from logitstore.hf import STATE_NAME
from logitstore.pipelines._student import final_hidden, load_student
from logitstore.pipelines.evaluate import evaluate
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    out = tmp_path_factory.mktemp("cli-store") / "s"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            k=8,
            values="q8",
            max_length=48,
            limit=6,
            docs_per_shard=3,
            progress=False,
        )
    )
    return str(out)


def test_help_shows_examples():
    for name in ("train", "eval"):
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output


def test_help_has_an_example_for_every_group_of_options():
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    examples = help_text[help_text.index("Examples:") : help_text.index("Options:")]
    options = {o for o in help_text[help_text.index("Options:") :].split() if o.startswith("--")}
    groups = [  # one option of each group must be shown in use
        ["--store", "--student", "--out"], ["--divergence", "--param"],
        ["--init-from", "--keep-layers"], ["--temperature", "--ce-weight"],
        ["--max-steps", "--stop-after", "--resume"], ["--tokens-per-step", "--save-every"],
        ["--eval-store", "--eval-every"], ["--fsdp", "--deepspeed", "--precision"],
        ["--lora-r", "--lora-targets", "--gradient-checkpointing", "--report-to"],
        ["--cache-dir", "--storage-options"], ["--config"],
    ]  # fmt: skip
    for group in groups:
        assert set(group) <= options, group  # the group names real options
        missing = [o for o in group if f"{o} " not in examples and f"{o}\n" not in examples]
        assert not missing, (missing, examples)


def test_command_line_params_override_a_config_files_params_one_by_one(tmp_path):
    # --param target=... replaced the file's whole params mapping: its gamma was dropped.
    from logitstore.pipelines.train import TrainConfig

    path = tmp_path / "run.yaml"
    in_file = {"gamma": 0.3, "target": "teacher"}
    path.write_text(json.dumps({"store": "s", "student": "m", "out": "o", "params": in_file}))
    given = parse_params(("target=student", "extra=1"))
    config = TrainConfig.from_yaml(path, params=given)
    assert config.params == {k: given.get(k, in_file.get(k)) for k in {*in_file, *given}}


SWITCHES = ["resume", "approximate_tail", "use_counts", "fsdp", "gradient_checkpointing"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_a_config_files_switch_can_be_turned_off_and_on_from_the_command_line(
    switch, tmp_path, monkeypatch
):
    # `resume: true` in a config file could not be switched off: the flags had no --no- form.
    import logitstore.pipelines.train as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "train", lambda config: seen.append(config) or {})
    flag = "--" + switch.replace("_", "-")
    for in_file in (True, False):
        path = tmp_path / "run.yaml"
        path.write_text(json.dumps({"store": "s", "student": "m", "out": "o", switch: in_file}))
        for given, expected in ((flag, True), (flag.replace("--", "--no-", 1), False)):
            result = CliRunner().invoke(main, ["train", "--config", str(path), given])
            assert result.exit_code == 0, result.output
            assert getattr(seen.pop(), switch) is expected, (in_file, given)
        assert CliRunner().invoke(main, ["train", "--config", str(path)]).exit_code == 0
        assert getattr(seen.pop(), switch) is in_file


def test_param_parsing():
    assert parse_params(("gamma=0.5", "target=label", "n=3")) == {
        "gamma": 0.5,
        "target": "label",
        "n": 3,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_params(("gamma",))


@pytest.mark.parametrize("number", ["5e-1", "1E-4", "-2e3", "1.5e-2", "3"])
def test_numbers_with_an_exponent_are_numbers_in_params_and_config_files(number, tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-1 as a string, so --param gamma=5e-1 was refused and a config
    # file's params: {gamma: 5e-1} too; JSON reads it as the number it spells.
    from logitstore.pipelines.train import TrainConfig

    expected = json.loads(number)
    got = parse_params((f"gamma={number}",))["gamma"]
    assert got == expected and type(got) is type(expected)
    path = tmp_path / "run.yaml"
    path.write_text(f"store: s\nstudent: m\nout: o\nparams: {{gamma: {number}}}\n")
    got = TrainConfig.from_yaml(path).params["gamma"]
    assert got == expected and type(got) is type(expected)
    assert parse_params(("target=e5", "name=v1e3")) == {"target": "e5", "name": "v1e3"}


def test_train_then_eval(store, tiny_student_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--store",
        store,
        "--student",
        str(tiny_student_dir),
        "--divergence",
        "drkl",
        "--param",
        "gamma=0.3",
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--tokens-per-step",
        "200",
        "--lr",
        "1e-2",
        "--seed",
        "1",
        "--ce-weight",
        "0.1",
        "--eval-store",
        store,
        "--no-progress",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["step"] == 3
    state = json.loads((Path(summary["checkpoint"]) / STATE_NAME).read_text())
    config = state["run"]["config"]
    assert config["params"] == {"gamma": 0.3} and config["ce_weight"] == 0.1

    result = CliRunner().invoke(
        main,
        ["eval", "--student", summary["checkpoint"], "--store", store, "--json", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    direct = evaluate(summary["checkpoint"], store, device="cpu")
    assert metrics == pytest.approx(direct)
    # The run's own evaluation of its last step (OUT/eval.jsonl) says the same.
    assert summary["eval"]["step"] == 3
    assert summary["eval"]["teacher_kl"] == pytest.approx(metrics["fkl"], rel=1e-4)
    assert summary["eval"]["tokens"] == metrics["tokens"]


def test_lora_bf16_checkpointing_and_a_tracker_from_the_command_line(
    store, tiny_student_dir, tmp_path
):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    args = ["train", "--store", store, "--student", str(tiny_student_dir), "--out", str(out),
            "--max-steps", "2", "--tokens-per-step", "200", "--lr", "5e-2", "--device", "cpu",
            "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--precision", "bf16",
            "--gradient-checkpointing", "--report-to", "tensorboard", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    checkpoint = Path(summary["checkpoint"])
    # A LoRA run saves its adapter (PEFT's files), not the whole student.
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    config = json.loads((checkpoint / STATE_NAME).read_text())["run"]["config"]
    assert config["precision"] == "bf16" and config["gradient_checkpointing"] is True
    # The tracker got the distillation metrics, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/teacher_kl")) == 2


def test_a_config_files_home_paths_hold_the_whole_run(
    store, tiny_student_dir, tmp_path, monkeypatch
):
    # The shell expands ~ on a command line, never in a YAML file: there, Trainer expanded it
    # for the checkpoints while metrics.jsonl went to a folder named ~ in the working directory.
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = tmp_path / "run.yaml"
    config.write_text(f"store: {store}\nstudent: {tiny_student_dir}\nout: ~/runs/a\n")
    args = ["--max-steps", "2", "--tokens-per-step", "48", "--tokens-per-batch", "48"]
    result = CliRunner().invoke(main, ["train", "--config", str(config), *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = home / "runs" / "a"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert list(cwd.iterdir()) == []  # no folder named ~
    # stdout is the summary alone (progress went to stderr): it parses as JSON as it is.
    summary = json.loads(result.stdout)
    assert Path(summary["checkpoint"]) == run / "checkpoints" / "checkpoint-2"
    # The run is found again by the same file: a second start is refused, --resume accepted.
    again = CliRunner().invoke(main, ["train", "--config", str(config), *args, "--device", "cpu"])
    assert again.exit_code == 2 and "already holds a run" in again.output


@pytest.mark.parametrize(("max_steps", "stop_after"), [(5, None), (8, 4)])
def test_the_last_step_is_logged_whatever_log_every(
    max_steps, stop_after, store, tiny_student_dir, tmp_path
):
    # With --log-every 3 the run's last step (5, or 4 where --stop-after stops it) went
    # unlogged, and the summary's "last" row was of an earlier step than the summary's.
    log_every, end = 3, stop_after or max_steps
    args = ["train", "--store", store, "--student", str(tiny_student_dir), "--out",
            str(tmp_path / "run"), "--max-steps", str(max_steps), "--log-every", str(log_every),
            "--tokens-per-step", "48", "--tokens-per-batch", "48", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    if stop_after:
        args += ["--stop-after", str(stop_after)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = sorted({s for s in range(1, end + 1) if s % log_every == 0} | {end})
    assert [r["step"] for r in rows] == expected
    assert summary["step"] == summary["last"]["step"] == end
    assert summary["tokens"] == rows[-1]["tokens"]


def test_a_run_resumed_at_its_stop_after_trains_nothing(store, tiny_student_dir, tmp_path):
    # The same command run again with --resume trained one step past --stop-after each time.
    run = tmp_path / "run"
    args = ["train", "--store", store, "--student", str(tiny_student_dir), "--out", str(run),
            "--max-steps", "8", "--tokens-per-step", "48", "--tokens-per-batch", "48",
            "--device", "cpu", "--no-progress"]  # fmt: skip

    def steps() -> list[int]:
        return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    first = CliRunner().invoke(main, [*args, "--stop-after", "2", "--resume"])
    assert first.exit_code == 0, first.output
    # --resume with nothing to resume starts over, and says so (a mistyped --out would not).
    assert "holds no complete checkpoint; starting at step 0" in first.stderr
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = CliRunner().invoke(main, [*args, "--stop-after", "2", "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["step"] == 2 and "stop_after 2" in again.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert steps() == [1, 2]
    further = CliRunner().invoke(main, [*args, "--stop-after", "3", "--resume"])
    assert further.exit_code == 0, further.output
    assert json.loads(further.stdout)["step"] == 3 and steps() == [1, 2, 3]


def test_errors_become_messages(store, tiny_student_dir, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--store",
            store,
            "--student",
            str(tiny_student_dir),
            "--divergence",
            "nope",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2
    assert "unknown divergence 'nope'" in result.output and "drkl" in result.output
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--store",
            store,
            "--student",
            str(tiny_student_dir),
            "--out",
            str(tmp_path),
            "--temperature",
            "3",
        ],
    )
    assert result.exit_code == 2 and "not captured" in result.output


def _torchrun_train(config: Path, settings: dict) -> tuple[list[str], dict]:
    """Write ``settings`` to ``config``; the command that trains it on two CPU processes of
    ``torchrun`` (``python -m logitstore.pipelines.train``), and its environment."""
    config.write_text(json.dumps({"progress": False, "device": "cpu", **settings}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "logitstore.pipelines.train", str(config)]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.integration
def test_two_process_torchrun(store, tiny_student_dir, tmp_path):
    out = tmp_path / "run"
    cmd, env = _torchrun_train(
        tmp_path / "run.yaml",
        {"store": store, "student": str(tiny_student_dir), "out": str(out),
         "divergence": "fkl", "max_steps": 3, "tokens_per_step": 300, "tokens_per_batch": 256,
         "lr": 1e-2, "warmup_steps": 1, "save_every": 2, "eval_store": store, "eval_every": 2},
    )  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "checkpoint-3" / STATE_NAME).read_text())
    assert state["world_size"] == 2 and len(state["loader"]) == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # rank 0 writes, once per step
    # Step 1's loss is the loss of both ranks' micro-batches (one each: ceil(300 / (2 * 256)))
    # over their global token count, recomputed in one process.
    opened = open_store(store)
    lm = load_student(str(tiny_student_dir))
    loss = DistillationLoss.create("fkl")
    micro = [
        next(iter(StoreDataset(opened, tokens_per_batch=256, rank=rank, world_size=2)))
        for rank in (0, 1)
    ]
    total = sum(b["num_tokens"] for b in micro)
    weight = lm.get_output_embeddings().weight
    with torch.no_grad():
        expected = sum(float(loss(final_hidden(lm, b), weight, b, float(total))) for b in micro)
    assert lines[0]["tokens"] == total
    assert lines[0]["loss"] == pytest.approx(expected, rel=1e-5)
    # Evaluated at step 2 and at the last step, both ranks reading, rank 0 writing: the
    # one-process evaluation of the final student.
    rows = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    direct = evaluate(str(out / "checkpoints" / "checkpoint-3"), store, device="cpu")
    assert rows[-1]["documents"] == direct["documents"] == len(opened)
    assert rows[-1]["teacher_kl"] == pytest.approx(direct["fkl"], rel=1e-4)


def test_remote_store_through_the_cli_with_cache(
    tiny_teacher_dir, tiny_student_dir, text_jsonl, tmp_path
):
    """teacher-pass --out and train --store take an fsspec URL with --storage-options; the
    train run's --cache-dir ends up holding every shard under its manifest checksum."""
    import fsspec

    url = "memory://cli-remote/store"
    memory = fsspec.filesystem("memory")
    if memory.exists("/cli-remote"):
        memory.rm("/cli-remote", recursive=True)
    common = ["--storage-options", "{}"]
    result = CliRunner().invoke(
        main,
        ["teacher-pass", "--teacher", str(tiny_teacher_dir), "--data", str(text_jsonl)]
        + ["--out", url, "--k", "8", "--max-length", "48", "--limit", "4"]
        + ["--docs-per-shard", "2", "--no-progress"]
        + common,
    )
    assert result.exit_code == 0, result.output
    shards = open_store(url).manifest["shards"]
    assert len(shards) >= 2 and not (tmp_path / "cache").exists()

    cache = tmp_path / "cache"
    result = CliRunner().invoke(
        main,
        ["train", "--store", url, "--student", str(tiny_student_dir), "--out", str(tmp_path / "r")]
        + ["--max-steps", "2", "--tokens-per-step", "100", "--no-progress"]
        + ["--cache-dir", str(cache), "--readahead", "1"]
        + common,
    )
    assert result.exit_code == 0, result.output
    cached = {p.name for p in cache.glob("*/*") if p.is_dir()}
    assert cached <= {s["sha256"] for s in shards} and cached

    result = CliRunner().invoke(
        main,
        ["train", "--store", url, "--student", str(tiny_student_dir), "--out", str(tmp_path / "x")]
        + ["--storage-options", "[1, 2]"],
    )
    assert result.exit_code == 2 and "--storage-options must be a JSON object" in result.output


def _when_step_logged(out: Path, step: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action()`` on a thread once ``out/metrics.jsonl`` has a row of ``step``."""

    def wait() -> None:
        end = time.monotonic() + timeout
        path = out / "metrics.jsonl"
        while time.monotonic() < end:
            rows = path.read_text().splitlines() if path.exists() else []
            if len(rows) >= step:
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_a_stop_signal_saves_the_step_under_way_and_the_run_resumes_from_it(
    store, tiny_student_dir, tmp_path
):
    # A scheduler's SIGTERM (pre-emption, scancel) killed the run: every step since the last
    # checkpoint was lost.
    out = tmp_path / "run"
    common = ["train", "--store", store, "--student", str(tiny_student_dir), "--out", str(out)]
    common += ["--tokens-per-step", "100", "--tokens-per-batch", "100", "--no-progress"]
    before = signal.getsignal(signal.SIGTERM)
    watcher = _when_step_logged(out, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = CliRunner().invoke(main, [*common, "--max-steps", "100000"])
    watcher.join()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    step = summary["step"]
    assert 2 <= step < 100000 and summary["checkpoint"].endswith(f"checkpoint-{step}")
    assert (out / "checkpoints" / f"checkpoint-{step}" / STATE_NAME).exists()
    assert any("stopped by SIGTERM" in n and "--resume" in n for n in summary["notes"])
    assert signal.getsignal(signal.SIGTERM) is before  # handed back after the run
    result = CliRunner().invoke(
        main, [*common, "--max-steps", "100000", "--stop-after", str(step + 2), "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == step + 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 3))


@pytest.mark.integration
def test_a_stop_signal_to_one_torchrun_rank_stops_every_rank_at_one_step(
    store, tiny_student_dir, tmp_path
):
    out = tmp_path / "run"
    cmd, env = _torchrun_train(
        tmp_path / "run.yaml",
        {"store": store, "student": str(tiny_student_dir), "out": str(out),
         "max_steps": 100000, "tokens_per_step": 200, "tokens_per_batch": 100},
    )  # fmt: skip
    agent = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def signal_the_last_worker() -> None:  # one rank only: the other must stop with it
        workers = [
            p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == agent.pid
        ]
        os.kill(max(int(p.name) for p in workers), signal.SIGUSR1)

    watcher = _when_step_logged(out, 2, signal_the_last_worker)
    try:
        stdout, stderr = agent.communicate(timeout=240)
    finally:
        agent.kill()
    watcher.join()
    assert agent.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    step = summary["step"]
    assert 2 <= step < 100000 and "stopped by SIGUSR1" in " ".join(summary["notes"])
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / STATE_NAME).read_text())
    assert state["world_size"] == 2 and len(state["loader"]) == 2


def _parent(proc: Path) -> int:
    try:  # the field after the parenthesised command name, state, then the parent's pid
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
