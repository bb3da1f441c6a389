"""KDTrainer and the TrainingArguments users set: what it honours, refuses or leaves alone.

One process, a tiny student and a store of about 25 documents; each run is a few steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from logitstore.hf import KDTrainer
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    out = tmp_path_factory.mktemp("kd-args") / "store"
    config = dict(k=16, values="float32", max_length=64, limit=2, docs_per_shard=4)
    run_teacher_pass(TeacherPassConfig(teacher=str(tiny_teacher_dir), data=str(text_jsonl),
                                       out=str(out), progress=False, **config))  # fmt: skip
    return str(out)


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(max_steps=3, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return TrainingArguments(str(out), **base)


def test_load_best_model_at_end_keeps_and_loads_the_best_checkpoint(
    store, tiny_student_dir, tmp_path
):
    # The largest eval loss is "best" here, so that the best checkpoint is an early one while
    # save_total_limit=1 rotates the others away.
    out = tmp_path / "run"
    given = args(out, max_steps=4, save_strategy="steps", save_steps=1, eval_strategy="steps",
                 eval_steps=1, save_total_limit=1, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    trainer = KDTrainer(model=model, args=given, train_dataset=store, eval_dataset=store,
                        tokens_per_batch=128)  # fmt: skip
    trainer.train()
    evals = [(r["eval_loss"], r["step"]) for r in trainer.state.log_history if "eval_loss" in r]
    best = max(evals)[1]
    assert best != 4  # otherwise the rotation is not put to the test
    assert trainer.state.best_model_checkpoint == str(out / f"checkpoint-{best}")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        f"checkpoint-{best}",
        "checkpoint-4",
    ]
    saved = load_file(out / f"checkpoint-{best}" / "model.safetensors")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
