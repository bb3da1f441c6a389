"""Bad input to training (and evaluation), through the ``logitstore`` CLI: a student whose
vocabulary or tokenizer differs from the teacher's, or that is not a model at all, unknown
divergences, parameters or settings, values out of range, a temperature the store did not
capture, and a run directory that holds another run. Each is refused with a message naming the
problem, a non-zero exit and no traceback, and the store and an existing run directory are
byte-for-byte unchanged.

Students are the tiny real models of ``tests/conftest.py``; a "different" student is one of them
edited. The helpers (``kit``) and the store are in ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from logitstore.errors import ConfigError

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
        "model_type": "llama", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    }))  # fmt: skip
    before = kit.snapshot(store)
    result = kit.invoke("train", "--store", store, "--student", student, "--out", tmp_path / "run",
                        *kit.TRAIN)  # fmt: skip
    kit.refused(result, "vocabulary size", str(kit.teacher_vocab(tiny_teacher_dir)), "300")
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


# ---- values out of range, or not values at all ---------------------------------------------------

OUT_OF_RANGE = [
    (["--lr", "-1"], ["lr must be a positive finite number", "-1"]),
    (["--lr", "nan"], ["lr must be a positive finite number", "nan"]),
    (["--betas", "0.9"], ["betas must be two numbers in [0, 1)", "0.9"]),
    (["--betas", "1.5,0.9"], ["betas must be two numbers in [0, 1)", "1.5"]),
    (["--betas", "a,b"], ["--betas expects comma-separated floats", "'a,b'"]),
    (["--keep-layers", "0,x"], ["--keep-layers expects comma-separated ints", "'0,x'"]),
    (["--param", "gamma=[0.5"], ["--param gamma", "'[0.5'"]),
    (["--warmup-steps", "-1"], ["warmup_steps must be an integer >= 0", "-1"]),
    (["--log-every", "0"], ["log_every must be an integer >= 1", "0"]),
    (["--save-every", "-2"], ["save_every must be an integer >= 0", "-2"]),
    (["--keep-checkpoints", "-1"], ["keep_checkpoints must be an integer >= 0", "-1"]),
    (["--stop-after", "0"], ["stop_after must be an integer >= 1", "0"]),
    (["--num-workers", "-1"], ["num_workers must be an integer >= 0", "-1"]),
    (["--min-lr-ratio", "2"], ["min_lr_ratio must be a number in [0.0, 1.0]", "2.0"]),
    (["--weight-decay", "-0.1"], ["weight_decay must be a number >= 0.0", "-0.1"]),
    (["--grad-clip", "-1"], ["grad_clip must be a number >= 0.0", "-1.0"]),
    (["--lora-r", "2", "--lora-dropout", "1.5"], ["lora_dropout must be a number in [0.0, 1.0]"]),
    (["--student-dtype", "int8"], ["student_dtype must be 'auto' or a floating-point", "int8"]),
    (["--report-to", "nonsense"], ["report_to names unknown trackers", "nonsense", "tensorboard"]),
    (["--device", "tpu9"], ["device must be a torch device", "'tpu9'"]),
    (["--fsdp"], ["fsdp shards the student over the processes", "torchrun"]),
    # Without a teacher to copy from, the layers would be ignored: a random student trained.
    (["--keep-layers", "0,1"], ["keep_layers [0, 1]", "no init_from", "--init-from"]),
]


@pytest.mark.parametrize(("args", "words"), OUT_OF_RANGE)
def test_train_refuses_values_out_of_range(args, words, store, run_dir, tiny_student_dir, kit):
    before = kit.snapshot(store), kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out",
                        run_dir, "--resume", *kit.TRAIN, *args)  # fmt: skip
    kit.refused(result, *words)
    assert (kit.snapshot(store), kit.snapshot(run_dir)) == before


def test_train_config_file_that_is_not_yaml(store, tiny_student_dir, tmp_path, kit):
    path = tmp_path / "train.yaml"
    path.write_text(f"store: {store}\nlr: [0.1\n")
    result = kit.invoke("train", "--config", path, "--student", tiny_student_dir,
                        "--out", tmp_path / "run", *kit.TRAIN)  # fmt: skip
    kit.refused(result, "train.yaml is not valid YAML")
    assert not (tmp_path / "run").exists()


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    from logitstore.pipelines.train import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("store: s\nstudent: m\nout: o\nlr: 3e-4\nmin_lr_ratio: 1e-1\n")
    config = TrainConfig.from_yaml(path)  # YAML 1.1 reads 3e-4 as a string
    assert (config.lr, config.min_lr_ratio) == (3e-4, 0.1)


# ---- a student that is not there, or not a model ------------------------------------------------


def _student_cases(tmp_path: Path) -> dict[str, tuple[list, list[str]]]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("{}\n")
    return {
        "missing": (["--student", tmp_path / "nope"], ["the student", "does not exist"]),
        "a data file": (["--student", data / "a.jsonl"], ["is a file, not a model"]),
        "a folder of data": (["--student", data], ["is a folder without config.json"]),
        "missing tokenizer": (
            ["--tokenizer", tmp_path / "tok"],
            ["the tokenizer", "does not exist"],
        ),
        "tokenizer folder of data": (["--tokenizer", data], ["without tokenizer files"]),
    }


@pytest.mark.parametrize(
    "case", ["missing", "a data file", "a folder of data", "missing tokenizer",
             "tokenizer folder of data"],
)  # fmt: skip
def test_student_that_is_missing_or_not_a_model(case, store, tiny_student_dir, tmp_path, kit):
    args, words = _student_cases(tmp_path)[case]
    if args[0] == "--tokenizer":
        args = ["--student", tiny_student_dir, *args]
    before = kit.snapshot(store)
    result = kit.invoke("train", "--store", store, *args, "--out", tmp_path / "run", *kit.TRAIN)
    kit.refused(result, *words)
    assert kit.snapshot(store) == before and not (tmp_path / "run").exists()


# ---- a run directory that holds a run ------------------------------------------------------------


def test_out_holding_a_run_is_not_overwritten_without_resume(store, run_dir, tiny_student_dir, kit):
    before = kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run_dir,
                        *kit.TRAIN)  # fmt: skip
    kit.refused(result, "already holds a run", "checkpoint-1", "--resume")
    assert kit.snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--divergence", "rkl"], ["divergence is 'fkl' in the checkpoint but 'rkl'"]),
        (["--seed", "7"], ["seed is 0 in the checkpoint but 7"]),
        (["--tokens-per-batch", "128"], ["tokens_per_batch is 64 in the checkpoint but 128"]),
    ],
)
def test_resume_with_other_objective_or_data_order(
    args, words, store, run_dir, tiny_student_dir, kit
):
    before = kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run_dir,
                        "--resume", *kit.TRAIN, *args)  # fmt: skip
    kit.refused(result, "cannot resume", *words)
    assert kit.snapshot(run_dir) == before


@pytest.mark.parametrize("change", [{"hidden_size": 48}, {"num_hidden_layers": 3}])
def test_resume_with_another_student(change, store, run_dir, tiny_student_dir, tmp_path, kit):
    # Trainer's load failed only after loading, with a traceback of every size mismatch (or,
    # for a deeper student, of the optimizer's parameter groups).
    spec = json.loads((tiny_student_dir / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")  # fmt: skip
    student = tmp_path / "other.json"
    student.write_text(json.dumps({**{k: spec[k] for k in keys if k in spec}, **change}))
    before = kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", student, "--out", run_dir,
                        "--resume", *kit.TRAIN, "--max-steps", "2")  # fmt: skip
    if "hidden_size" in change:  # every weight's shape differs: the first named is a matrix
        v, h = spec["vocab_size"], spec["hidden_size"]
        words = [f"is ({v}, {h}) in the checkpoint", f"but ({v}, {change['hidden_size']}) in"]
    else:  # one layer more: weights the run never had
        words = [f"model.layers.{spec['num_hidden_layers']}.", "is absent in the checkpoint"]
    kit.refused(result, "cannot resume", "with another student", "other.json", *words)
    assert kit.snapshot(run_dir) == before


def test_resume_with_other_lora_adapters(store, tiny_student_dir, tmp_path, kit):
    # Other targets resumed without a word: the trained q_proj adapters were dropped and fresh
    # v_proj ones trained on; another alpha rescaled the trained adapters.
    pytest.importorskip("peft")
    run = tmp_path / "run"
    lora = ["--lora-r", "2", "--max-steps", "2", "--stop-after", "1", "--save-every", "1"]
    first = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run,
                       *kit.TRAIN, *lora, "--lora-targets", "q_proj")  # fmt: skip
    assert first.exit_code == 0, first.output
    before = kit.snapshot(run)
    for args, words in [
        (["--lora-targets", "v_proj"], "lora_targets is ['q_proj'] in the checkpoint but ['v_proj']"),
        (["--lora-targets", "q_proj", "--lora-alpha", "4"], "lora_alpha is 16 in the checkpoint but 4"),
    ]:  # fmt: skip
        result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out",
                            run, "--resume", *kit.TRAIN, *lora, *args)  # fmt: skip
        kit.refused(result, "cannot resume", words)
        assert kit.snapshot(run) == before


def test_an_evaluation_store_that_is_the_training_store(store, tiny_student_dir, tmp_path, kit):
    # Its "held-out" metrics were of the documents trained on, without a word. (A note, not a
    # refusal: a smoke test may evaluate on its training store on purpose.)
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    for i, held_out in enumerate((store, copy)):
        result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out",
                            tmp_path / f"run{i}", *kit.TRAIN, "--eval-store", held_out)  # fmt: skip
        assert result.exit_code == 0, result.output
        notes = json.loads(result.stdout)["notes"]
        assert [n for n in notes if f"evaluation store {held_out} is the training store" in n]


@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.jsonl"])
def test_an_out_holding_another_file_of_a_logs_name(name, store, tiny_student_dir, tmp_path, kit):
    # Rewriting it to cut it back to the resumed step raised KeyError: 'step' (a traceback).
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text('{"accuracy": 0.5}\n')
    (out / "notes.txt").write_text("mine\n")
    before = kit.snapshot(out)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", out,
                        *kit.TRAIN)  # fmt: skip
    kit.refused(result, f"{out / name} is not a training metrics log", "accuracy", "integer 'step'")
    assert kit.snapshot(out) == before


def test_a_tracker_that_is_not_installed(store, tiny_student_dir, tmp_path, kit):
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    absent = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))
    if not absent:
        pytest.skip("every tracker transformers knows is installed")
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out",
                        tmp_path / "run", *kit.TRAIN, "--report-to", absent[0])  # fmt: skip
    kit.refused(result, f"report_to {absent[0]} needs its package", "not installed")
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_trains_no_step_past_max_steps(
    store, run_dir, tiny_student_dir, kit
):
    before = kit.snapshot(run_dir)
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir, "--out", run_dir,
                        "--resume", *kit.TRAIN)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "already reached step 1 of max_steps 1" in result.output
    assert kit.snapshot(run_dir) == before  # no checkpoint-2, no metrics row for step 2


# ---- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prompts", "words"),
    [
        (["--device", "tpu9"], None, ["device must be a torch device", "'tpu9'"]),
        (["--max-documents", "0"], None, ["max_documents must be an integer >= 1"]),
        (["--num-samples", "0"], "a prompt\n", ["num_samples must be an integer >= 1"]),
        ([], '{"prompt": "unclosed"\n', ["prompts.txt:1 is not valid JSON"]),
        ([], '{"question": "no prompt field"}\n', ["prompts.txt:1", "'prompt' or 'text'"]),
        ([], "\n\n", ["prompts.txt: no prompts"]),
    ],
)
def test_eval_refuses_bad_settings_and_prompts(
    args, prompts, words, store, tiny_student_dir, tmp_path, kit
):
    if prompts is not None:
        (tmp_path / "prompts.txt").write_text(prompts)
        args = [*args, "--prompts", tmp_path / "prompts.txt"]
    result = kit.invoke("eval", "--student", tiny_student_dir, "--store", store, *args)
    kit.refused(result, *words)


def test_eval_of_a_student_that_is_not_there(store, tmp_path, kit):
    result = kit.invoke("eval", "--student", tmp_path / "nope", "--store", store)
    kit.refused(result, "the student", "does not exist")


def test_deepspeed_config_that_is_not_a_json_object(store, tiny_student_dir, tmp_path, kit):
    for text, words in (("{zero: 3", ["is not a readable JSON file"]), ("[3]", ["JSON object"])):
        path = tmp_path / "ds.json"
        path.write_text(text)
        result = kit.invoke("train", "--store", store, "--student", tiny_student_dir,
                            "--out", tmp_path / "run", *kit.TRAIN, "--deepspeed", path)  # fmt: skip
        kit.refused(result, "deepspeed config", *words)
        assert not (tmp_path / "run").exists()


def test_lora_targets_that_name_no_module(store, tiny_student_dir, tmp_path, kit):
    result = kit.invoke("train", "--store", store, "--student", tiny_student_dir,
                        "--out", tmp_path / "run", *kit.TRAIN, "--lora-r", "2",
                        "--lora-targets", "q_proj,qkv_proj")  # fmt: skip
    kit.refused(result, "lora_targets ['qkv_proj'] name no module", "q_proj", "v_proj")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"lora_r": 2, "lora_targets": "q_proj"}, ["lora_targets must be a list", "'q_proj'"]),
        ({"lora_r": 2, "lora_targets": ["q_proj", 3]}, ["lora_targets must be a list", "3"]),
        ({"keep_layers": "0,1"}, ["keep_layers must be a list", "'0,1'"]),
        # Python takes the string "false" as true: the uncaptured temperature was approximated.
        (
            {"approximate_tail": "false", "temperature": 3},
            ["approximate_tail must be true or false", "'false'"],
        ),
        ({"resume": "no"}, ["resume must be true or false", "'no'"]),
    ],
)
def test_yaml_settings_of_the_wrong_type(setting, words, store, tiny_student_dir, tmp_path, kit):
    # A string where a list belongs was read character by character: lora_targets 'q_proj'
    # became the modules q, _, p, r, o and j.
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(setting))
    result = kit.invoke("train", "--config", path, "--store", store, "--student",
                        tiny_student_dir, "--out", tmp_path / "run", *kit.TRAIN)  # fmt: skip
    kit.refused(result, *words)
    assert not (tmp_path / "run").exists()


def test_deepspeed_settings_are_a_json_file_or_a_mapping(tmp_path):
    from logitstore.pipelines._train_checks import check_config
    from logitstore.pipelines.train import TrainConfig

    base = {"store": "s", "student": "m", "out": str(tmp_path / "o")}
    check_config(TrainConfig(**base, deepspeed={"zero_optimization": {"stage": 3}}))  # YAML inline
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    check_config(TrainConfig(**base, deepspeed=str(tmp_path / "ds.json")))
    with pytest.raises(ConfigError, match="path of a DeepSpeed JSON config or a mapping"):
        check_config(TrainConfig(**base, deepspeed=3))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lora_r must be an integer >= 0; found '8'"):
        check_config(TrainConfig(**base, lora_r="8"))  # type: ignore[arg-type]


def test_a_gpu_index_for_training_is_refused_with_the_way_to_choose_one(tmp_path, monkeypatch):
    import torch

    from logitstore.pipelines._train_checks import check_config
    from logitstore.pipelines.train import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    base = {"store": "s", "student": "m", "out": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=2 and --device cuda"):
        check_config(TrainConfig(**base, device="cuda:2"))
    check_config(TrainConfig(**base, device="cuda"))
    check_config(TrainConfig(**base, device="cuda:0"))
    with pytest.raises(ConfigError, match="there are 4 CUDA devices"):
        check_config(TrainConfig(**base, device="cuda:7"))
