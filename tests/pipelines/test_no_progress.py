"""``--no-progress`` (``progress=False``): no library's progress bar on stderr either (teacher
pass, training, evaluation)."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from logitstore.pipelines.evaluate import evaluate
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.pipelines.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_no_progress_leaves_stderr_free_of_the_libraries_bars(
    tmp_path, tiny_store, tiny_student_dir, capfd
):
    assert hf_logging.is_progress_bar_enabled()
    store = tiny_store(tmp_path / "store", k=8, max_length=32, limit=4)  # progress=False
    train(
        TrainConfig(
            store=store,
            student=str(tiny_student_dir),
            out=str(tmp_path / "run"),
            max_steps=1,
            tokens_per_step=128,
            tokens_per_batch=128,
            warmup_steps=0,
            progress=False,
            device="cpu",
        )  # fmt: skip
    )
    evaluate(str(tmp_path / "run" / "checkpoints" / "checkpoint-1"), store, device="cpu")
    err = capfd.readouterr().err
    # tqdm draws "NN%|" and "it/s"; the run wrote weights (loading, saving) where it would show.
    assert "%|" not in err and "it/s]" not in err, err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "model.safetensors").exists()
    assert hf_logging.is_progress_bar_enabled()  # given back as it was


@pytest.mark.slow
def test_no_progress_hides_the_bar_dequantising_a_gguf_teacher(tmp_path, gguf_teacher_path, capfd):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "def f(x):\\n    return x + 1"}\n')
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(gguf_teacher_path),
            data=str(data),
            out=str(tmp_path / "s"),
            k=8,
            max_length=16,
            device="cpu",
            progress=False,
        )  # fmt: skip
    )
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s]" not in err, err[-2000:]
