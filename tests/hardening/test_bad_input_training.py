"""Bad input to training, through the ``logitstore`` CLI: a student whose vocabulary or
tokenizer differs from the teacher's, unknown divergences, parameters or settings, and a
temperature the store did not capture. Each is refused with a message naming the problem, a
non-zero exit and no traceback, and the store and an existing run directory are byte-for-byte
unchanged.

Students are the tiny real models of ``tests/conftest.py``; a "different" student is one of them
edited. The helpers (``kit``) and the store are in ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(store, tiny_student_dir, tmp_path_factory, kit) -> Path:
    """A finished one-step training run: what a bad ``--resume`` must leave alone."""
    out = tmp_path_factory.mktemp("bad-input-run") / "run"
    result = kit.invoke(
        "train", "--store", store, "--student", tiny_student_dir, "--out", out, *kit.TRAIN
    )
    assert result.exit_code == 0, result.output
    return out


# ---- the student does not fit the teacher ------------------------------------------------------


def test_student_vocabulary_differs_from_the_teachers(store, tiny_teacher_dir, tmp_path, kit):
    student = tmp_path / "student.json"
    student.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 400, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    }))  # fmt: skip
    before = kit.snapshot(store)
    result = kit.invoke("train", "--store", store, "--student", student, "--out", tmp_path / "run",
                        *kit.TRAIN)  # fmt: skip
    kit.refused(result, "vocabulary size", str(kit.teacher_vocab(tiny_teacher_dir)), "400")
    assert kit.snapshot(store) == before and not (tmp_path / "run").exists()


def test_student_tokenizer_differs_from_the_teachers(store, tiny_student_dir, tmp_path, kit):
    from transformers import AutoTokenizer

    student = tmp_path / "student"
    shutil.copytree(tiny_student_dir, student)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # same size, two ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    theirs, ours = (AutoTokenizer.from_pretrained(p) for p in (tiny_student_dir, student))
    assert len(theirs) == len(ours)
    assert theirs.convert_tokens_to_ids(a) == ours.convert_tokens_to_ids(b)
    before = kit.snapshot(store)
    result = kit.invoke("train", "--store", store, "--student", student, "--out", tmp_path / "run",
                        *kit.TRAIN)  # fmt: skip
    kit.refused(result, "vocab_sha256", "teacher", "student")
    assert kit.snapshot(store) == before and not (tmp_path / "run").exists()


# ---- unknown names -------------------------------------------------------------------------------

TRAIN_UNKNOWN = [
    (["--divergence", "nope"], {}, ["unknown divergence 'nope'", "drkl", "fkl"]),
    (["--divergence", "drkl", "--param", "gama=0.3"], {}, ["gama", "known: gamma, target"]),
    (["--divergence", "fkl", "--param", "beta=0.5"], {}, ["beta", "'fkl'", "known: none"]),
    (["--divergence", "jsd", "--param", "beta=2"], {}, ["jsd beta", "2"]),
    ([], {"learning_rate": 0.1}, ["unknown training settings", "learning_rate"]),
]


@pytest.mark.parametrize(("args", "config", "words"), TRAIN_UNKNOWN)
def test_train_refuses_unknown_names(
    args, config, words, store, run_dir, tiny_student_dir, tmp_path, kit
):
    before = kit.snapshot(store), kit.snapshot(run_dir)
    common = ["--store", store, "--student", tiny_student_dir, "--out", run_dir, "--resume",
              *kit.TRAIN]  # fmt: skip
    if config:
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(config))
        result = kit.invoke("train", "--config", path, *common, *args)
    else:
        result = kit.invoke("train", *common, *args)
    kit.refused(result, *words)
    assert (kit.snapshot(store), kit.snapshot(run_dir)) == before


# ---- training against a store it does not fit ---------------------------------------------------


def test_training_temperature_the_cache_did_not_capture(
    store, run_dir, tiny_student_dir, tmp_path, kit
):
    captured = json.loads((store / "manifest.json").read_text())["tail_temperatures"]
    assert captured == [2.0]
    before = kit.snapshot(store), kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run_dir,
                        "--resume", "--temperature", "3", *kit.TRAIN)  # fmt: skip
    kit.refused(result, "temperature 3.0 was not captured", "[2.0]")
    assert (kit.snapshot(store), kit.snapshot(run_dir)) == before
    # The captured one is accepted: the refusal is about 3.0, not about temperatures.
    ok = kit.invoke("train", "--store", store, "--student", tiny_student_dir,
                    "--out", tmp_path / "t2", "--temperature", "2.0", *kit.TRAIN)  # fmt: skip
    assert ok.exit_code == 0, ok.output
