"""The README's promises: its first lines are the two set-up commands CI and users run, and its
Python example runs as written against a real store and a real (tiny) student."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_two_setup_commands_and_ci_runs_the_test_one():
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None and README.index(block.group(0)) < README.index("\n\n", 20)
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_python_example_runs(tmp_path, tiny_teacher_dir, tiny_student_dir, text_jsonl, monkeypatch):
    section = README[README.index("## Python API") : README.index("## The divergences")]
    trainer_code, loop_code = re.findall(r"```python\n(.*?)```", section, re.S)
    store = tmp_path / "store"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(store),
            k=8,
            max_length=48,
            limit=4,
            progress=False,
        )
    )
    (tmp_path / "student").symlink_to(tiny_student_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(trainer_code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    logs = [r for r in trainer.state.log_history if "teacher_kl" in r]
    assert len(logs) == 2 and all(r["teacher_kl"] > 0 for r in logs)
    assert (tmp_path / "run" / "checkpoint-2" / "logitstore_state.json").exists()
    namespace = {}
    exec(compile(loop_code, "README.md", "exec"), namespace)
    loss, student = namespace["loss"], namespace["student"]
    assert torch.isfinite(loss) and loss.item() > 0
    # one optimizer step moved the head: the loss reached it through the fused path
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    assert not torch.equal(fresh.lm_head.weight, student.lm_head.weight.detach())
