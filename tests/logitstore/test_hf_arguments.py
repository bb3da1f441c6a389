"""KDTrainer set up as users set it up: the TrainingArguments it honours, refuses or leaves
alone, and students whose head is padded past the teacher's vocabulary.

One process, a tiny student and a store of about 25 documents; each run is a few steps.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from logitstore import open_store
from logitstore.dataset import IGNORE_INDEX, StoreDataset
from logitstore.errors import ConfigError, TokenizerMismatchError
from logitstore.hf import KDTrainer, StoreBatches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_store) -> str:
    return tiny_store(tmp_path_factory.mktemp("kd-args") / "store", k=16, values="float32",
                      max_length=64, limit=2, docs_per_shard=4)  # fmt: skip


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(max_steps=3, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return TrainingArguments(str(out), **base)


@pytest.mark.parametrize(
    ("setting", "found"),
    [({"label_smoothing_factor": 0.1}, "expected 0, found 0.1"),
     ({"auto_find_batch_size": True}, "expected False, found True"),
     ({"train_sampling_strategy": "sequential"}, "expected random, found sequential"),
     ({"per_device_train_batch_size": 2}, "expected 8, found 2"),
     ({"per_device_eval_batch_size": 32}, "expected 8, found 32")],
)  # fmt: skip
def test_settings_of_trainers_own_loss_and_loader_are_refused_not_ignored(
    store, tiny_student_dir, tmp_path, setting, found
):
    # KDTrainer replaces Trainer's label loss and its loader, so these would change nothing:
    # with label_smoothing_factor=0.1 the losses were those without it, and with
    # per_device_train_batch_size=2 the micro-batches those of tokens_per_batch.
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    given = args(tmp_path, **setting)
    with pytest.raises(ConfigError, match=f"{next(iter(setting))} .*; {found}"):
        KDTrainer(model=model, args=given, train_dataset=store, ce_weight=1.0)


@pytest.mark.parametrize(
    "name", ["compute_loss_func", "compute_metrics", "preprocess_logits_for_metrics", "model_init"]
)
def test_trainer_arguments_kdtrainer_never_calls_are_refused_not_ignored(
    store, tiny_student_dir, tmp_path, name
):
    # compute_metrics and its preprocessing were never called (evaluate gathers no predictions),
    # compute_loss_func never replaced the divergence, and model_init's student (model=None)
    # was refused as "NoneType is not a causal LM".
    called: list[str] = []

    def given(*a, **k):
        called.append(name)
        return AutoModelForCausalLM.from_pretrained(tiny_student_dir)

    model = None if name == "model_init" else AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.raises(ConfigError, match=f"^{name} .*; expected None, found <function"):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store, eval_dataset=store,
                  **{name: given})  # fmt: skip
    assert not called


@pytest.mark.parametrize("size", ["cp_size", "tp_size"])
def test_a_parallelism_config_that_splits_batches_over_ranks_is_refused(
    store, tiny_student_dir, tmp_path, size
):
    # Context parallelism shards each batch's sequences over a group of ranks, which must all
    # read that batch: KDTrainer's loader gives each rank its own documents, and the teacher's
    # side of a batch is not split with the sequences.
    from accelerate.parallelism_config import ParallelismConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    given = args(tmp_path, parallelism_config=ParallelismConfig(**{size: 2}))
    with pytest.raises(ConfigError, match=f"^parallelism_config splits .*{size}=2"):
        KDTrainer(model=model, args=given, train_dataset=store)


def test_the_callers_arguments_are_left_as_given_and_reused(store, tiny_student_dir, tmp_path):
    given = args(tmp_path / "run", save_strategy="steps", save_steps=1, save_total_limit=1,
                 dataloader_num_workers=1)  # fmt: skip
    before = given.to_dict()
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    first = KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128)
    assert given.to_dict() == before
    assert first.kd_batches.num_workers == 1  # dataloader_num_workers is the default
    # The same arguments a second time (a notebook's second run): still one checkpoint kept.
    second = KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128,
                       num_workers=0)  # fmt: skip
    second.train()
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert kept == ["checkpoint-3"]


def test_liger_kernels_run_in_the_body_and_the_loss_stays_the_distillation_loss(
    store, tiny_student_dir, tmp_path
):
    # use_liger_kernel's fused cross-entropy, on by default, replaced the student's forward with
    # one of the labels' cross-entropy: Trainer then found no loss (KeyError 'loss').
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    asked = args(tmp_path / "asked", use_liger_kernel=True,
                 liger_kernel_config={"fused_linear_cross_entropy": True})  # fmt: skip
    with pytest.raises(ConfigError, match="fused_linear_cross_entropy replaces.*found True"):
        KDTrainer(model=model, args=asked, train_dataset=store)
    pytest.importorskip("liger_kernel")

    def losses(**settings) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(tmp_path / "run", max_steps=2, **settings)
        trainer = KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128)
        trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "teacher_kl" in r]

    # Liger's Triton kernels need a GPU: here Liger replaces the forward alone, as it would.
    body = {"rms_norm": False, "swiglu": False, "rope": False}
    with_liger = losses(use_liger_kernel=True, liger_kernel_config=body)
    assert with_liger == pytest.approx(losses(), rel=1e-6)


def test_a_full_half_precision_evaluation_outside_training_casts_the_student(
    store, tiny_student_dir, tmp_path
):
    # With bf16_full_eval Trainer leaves the student where it was loaded, for its evaluation
    # loop to cast and place it; KDTrainer's evaluation took it as it was: in float32 here, and
    # on the CPU beside inputs on the GPU there (evaluate() before train() failed).
    def evaluation(cast: bool, **settings) -> float:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
        model = model.to(torch.bfloat16) if cast else model
        trainer = KDTrainer(model, args(tmp_path, **settings), store, tokens_per_batch=128)
        found = trainer.evaluate(eval_dataset=store)["eval_loss"]
        assert next(trainer.model.parameters()).dtype == torch.bfloat16
        return found

    cast = evaluation(True)  # the student cast to bfloat16 by hand, evaluated as it is
    assert evaluation(False, bf16_full_eval=True) == pytest.approx(cast, rel=1e-6)


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


class EveryOtherBatchWithoutLabels(StoreBatches):
    """Every other batch has all labels ignored: a window of prompt only, for instance."""

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i % 2 == 0:
                batch = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
                batch["num_tokens"] = 0
            yield batch


def test_a_step_without_trained_tokens_leaves_taid_schedule_alone(
    store, tiny_student_dir, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    data = EveryOtherBatchWithoutLabels(StoreDataset(store, tokens_per_batch=128))
    trainer = KDTrainer(model=model, args=args(tmp_path, max_steps=5), train_dataset=data,
                        divergence="taid")  # fmt: skip
    trainer.train()
    steps = [r for r in trainer.state.log_history if "taid_t" in r]
    seen = [0] + [r["tokens"] for r in steps]  # tokens trained so far, after each step
    trained = [r for r, a, b in zip(steps, seen, seen[1:]) if b > a]
    assert len(steps) == 5 and [r["step"] for r in trained] == [2, 4]
    state = trainer.kd_loss.state_dict()
    assert state["step"] == 2 and state["prev_loss"] == pytest.approx(trained[-1]["loss"])
    assert all(torch.isfinite(torch.tensor(r["taid_t"])) for r in steps)


def _resized(student_dir: Path, rows: int, out: Path) -> Path:
    """The student with its embeddings and head cut or padded to ``rows`` (new rows random)."""
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    torch.manual_seed(0)
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(out)
    return out


def test_a_head_padded_past_the_vocabulary_trains_as_the_head_cut_there(
    store, tiny_student_dir, tmp_path
):
    # As a student with its embeddings padded to a multiple of 64: 384 + 64 rows, which are no
    # token. It trains as the same student with exactly the teacher's 384 rows.
    padded = _resized(tiny_student_dir, 448, tmp_path / "padded")

    def train(student: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(student)
        given = args(tmp_path / student.name, optim="sgd", learning_rate=1.0)
        trainer = KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128)
        trainer.train()
        logs = [r["loss"] for r in trainer.state.log_history if "teacher_kl" in r]
        return logs, {k: v.detach().clone() for k, v in model.state_dict().items()}

    (cut_loss, cut), (padded_loss, grown) = train(Path(tiny_student_dir)), train(padded)
    assert padded_loss == pytest.approx(cut_loss, rel=1e-6, abs=1e-7)
    start = load_file(padded / "model.safetensors")
    for name, value in grown.items():
        if value.shape[0] == 448:  # the head and the embeddings: padding rows untouched
            assert torch.equal(value[384:], start[name][384:]), name
            value = value[:384]
        torch.testing.assert_close(value, cut[name], rtol=1e-5, atol=1e-6, msg=name)
    fewer = AutoModelForCausalLM.from_pretrained(_resized(tiny_student_dir, 320, tmp_path / "cut"))
    with pytest.raises(TokenizerMismatchError, match="size 384.*320 rows: expected at least 384"):
        KDTrainer(model=fewer, args=args(tmp_path / "no"), train_dataset=store)


def test_resuming_with_other_dataloader_workers_is_refused_in_one_line(
    store, tiny_student_dir, tmp_path
):
    def trainer(workers: int, steps: int) -> KDTrainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=2)
        return KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128,
                         num_workers=workers)  # fmt: skip

    trainer(0, 2).train()
    with pytest.raises(ConfigError, match=r"written by 1 reader.*this run has 2 \(num_workers=2\)"):
        trainer(2, 4).train(resume_from_checkpoint=True)


def test_a_checkpoint_resumes_with_its_own_workers_unless_told_otherwise(
    store, tiny_student_dir, tmp_path
):
    # dataloader_num_workers sets the loader's workers, but a checkpoint's read position is one
    # count per worker: without num_workers of the caller's, a resume reads on with the
    # checkpoint's (as checkpoints of versions that ignored the setting need).
    def trainer(out: Path, steps: int, workers: int) -> KDTrainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(out, max_steps=steps, save_strategy="steps", save_steps=2,
                     dataloader_num_workers=workers, lr_scheduler_type="constant")  # fmt: skip
        return KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128)

    whole = trainer(tmp_path / "whole", 4, 0)
    whole.train()
    trainer(tmp_path / "cut", 2, 0).train()
    resumed = trainer(tmp_path / "cut", 4, 2)
    with pytest.warns(UserWarning, match="resuming with 0 DataLoader workers"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.kd_batches.num_workers == 0 and resumed.state.global_step == 4
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, msg=name)  # the same batches in the same order


def test_lora_adapters_start_from_the_runs_seed(store, tiny_student_dir, tmp_path):
    # Two runs of one seed in one process (a notebook, a sweep) start from the same adapters,
    # whatever the process drew before; another seed starts elsewhere.
    import peft

    def adapters(seed: int, drawn_before: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(drawn_before)
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = KDTrainer(model=model, args=args(tmp_path, seed=seed), train_dataset=store,
                            peft_config=lora)  # fmt: skip
        return {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_A" in k}

    first, again, other = adapters(7, 1), adapters(7, 2), adapters(8, 1)
    assert first.keys() == again.keys() == other.keys() and len(first) == 4
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


class Recording(KDTrainer):
    def compute_loss(self, model, inputs, *rest, **kw):
        self.seen = [*getattr(self, "seen", []), inputs]
        return super().compute_loss(model, inputs, *rest, **kw)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        control.should_training_stop |= state.global_step == self.step


def test_epoch_strategies_act_at_the_end_of_each_pass_over_the_store(
    store, tiny_student_dir, tmp_path
):
    # Trainer's own epoch is the whole run here (the loader is endless): without KDTrainer's
    # help a run with save_strategy="epoch" saved once, at its last step.
    out, documents = tmp_path / "run", open_store(store).num_documents
    every = dict(save_strategy="epoch", eval_strategy="epoch", logging_strategy="epoch")

    def trainer(steps: int, *callbacks) -> Recording:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(out, max_steps=steps, **every)
        return Recording(model=model, args=given, train_dataset=store, eval_dataset=store,
                         tokens_per_batch=128, callbacks=list(callbacks))  # fmt: skip

    whole = trainer(30)
    whole.train()
    trained = list(itertools.accumulate(len(b["doc_ids"]) for b in whole.seen))
    ends = [next(i + 1 for i, n in enumerate(trained) if n >= k * documents) for k in (1, 2)]
    assert ends[1] < 30  # two passes end inside the run, the run ends in a third
    logged = [r["step"] for r in whole.state.log_history if "teacher_kl" in r]
    evaluated = [r["step"] for r in whole.state.log_history if "eval_loss" in r]
    assert logged == evaluated == [*ends, 30]
    # Each logged step measured the teacher metrics on its own batches, the last one too.
    kls = [r["teacher_kl"] for r in whole.state.log_history if "teacher_kl" in r]
    assert all(math.isfinite(v) and v > 0 for v in kls)
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [*ends, 30]
    # Resumed after the first pass: the next save is at the end of the second, not at once.
    shutil.rmtree(out)
    trainer(30, StopAt(ends[0])).train()
    resumed = trainer(30)
    resumed.train(resume_from_checkpoint=True)
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [*ends, 30]
    # A run whose last step ends a pass acts there once (Trainer's own epoch ends there too).
    shutil.rmtree(out)
    last = trainer(ends[1])
    last.train()
    assert [r["step"] for r in last.state.log_history if "eval_loss" in r] == ends


def test_a_tokenizer_other_than_the_teachers_is_refused(store, tiny_student_dir, tmp_path):
    # Same size, two ids swapped: the head fits, the tokens do not mean the teacher's.
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    AutoTokenizer.from_pretrained(tiny_student_dir).save_pretrained(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    ours, theirs = (AutoTokenizer.from_pretrained(p) for p in (tiny_student_dir, other))
    with pytest.raises(TokenizerMismatchError, match="vocab_sha256 differs: teacher"):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store, processing_class=theirs)
    KDTrainer(model=model, args=args(tmp_path), train_dataset=store, processing_class=ours)


def test_resuming_in_another_document_order_is_refused(
    store, tiny_store, tiny_student_dir, tmp_path
):
    # The read position is a count of documents in the order of the run that wrote it; with
    # another shuffle_window (or another store) the same count skipped other documents: 3 of
    # the first epoch's 24 were trained twice and 3 never.
    def trainer(data: str, window: int) -> KDTrainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
        return KDTrainer(model=model, args=given, train_dataset=data, tokens_per_batch=128,
                         shuffle_window=window)  # fmt: skip

    trainer(store, 4).train()
    with pytest.raises(ConfigError, match="shuffle_window 4, this loader has 1"):
        trainer(store, 1).train(resume_from_checkpoint=True)
    other = tiny_store(
        tmp_path / "other", k=16, values="float32", max_length=64, limit=2, docs_per_shard=5
    )  # the same documents, 5 to a shard
    with pytest.raises(ConfigError, match="shard layout"):
        trainer(other, 4).train(resume_from_checkpoint=True)
    trainer(store, 4).train(resume_from_checkpoint=True)  # the same order resumes


def test_data_seed_orders_the_documents_apart_from_the_seed(store, tiny_student_dir, tmp_path):
    # Trainer draws its samplers from data_seed (else seed), "independent of the model seed";
    # KDTrainer shuffled the store by seed alone, so data_seed changed nothing.
    def order(**seeds) -> list[str]:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(tmp_path / "run", **seeds)
        loader = KDTrainer(model, given, store, tokens_per_batch=128).get_train_dataloader()
        return [d for batch in itertools.islice(iter(loader), 6) for d in batch["doc_ids"]]

    def shuffled(seed: int) -> list[str]:  # the store's own reader, seeded alone
        data = StoreDataset(store, tokens_per_batch=128, seed=seed, rank=0, world_size=1)
        return [d for batch in itertools.islice(iter(data), 6) for d in batch["doc_ids"]]

    assert shuffled(5) != shuffled(0)
    assert order(seed=0, data_seed=5) == shuffled(5)
    assert order(seed=0) == shuffled(0)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tokens_per_batch": "4096"}, r"positive integers; found '4096'"),
        ({"tokens_per_batch": 0}, r"positive integers; found 0"),
        ({"shuffle_window": 2.5}, r"positive integers; found 8192, 2.5"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0.*found -1"),
        ({"divergence_params": "gamma=0.5"}, r"^divergence_params must be a dict.*found str"),
        ({"run_info": ["a", "b"]}, r"^run_info must be a dict.*found list"),
        ({"storage_options": "anon"}, r"^storage_options must be a dict.*found str"),
        ({"peft_config": "lora"}, r"^peft_config must be a peft config.*found str 'lora'"),
    ],
)
def test_bad_loader_and_argument_kinds_are_refused_in_one_line(
    store, tiny_student_dir, tmp_path, given, message
):
    # They failed inside torch or numpy (a TypeError, or a ValueError once training started),
    # and the arguments of the wrong kind inside dict() or peft (an AttributeError of str).
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.raises(ConfigError, match=message):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store, **given)


def test_loss_settings_beside_a_ready_loss_are_refused(store, tiny_student_dir, tmp_path):
    # A bound DistillationLoss holds its temperature and parameters; given again beside it they
    # were dropped without a word.
    from logitstore.divergences import DistillationLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    ready = DistillationLoss.create("jsd", {"beta": 0.3})
    with pytest.raises(ConfigError, match=r"none of divergence_params, ce_weight.*found .*0\.9"):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store, divergence=ready,
                  divergence_params={"beta": 0.9}, ce_weight=0.5)  # fmt: skip
    trainer = KDTrainer(model=model, args=args(tmp_path), train_dataset=store, divergence=ready)
    assert trainer.kd_loss is ready


def test_resuming_under_another_objective_is_refused(store, tiny_student_dir, tmp_path):
    # The optimizer state, the schedule and the logged curve belong to the objective a
    # checkpoint was trained with; the command line compared it, KDTrainer went on silently.
    def trainer(steps: int, **loss) -> KDTrainer:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        given = args(tmp_path / "run", max_steps=steps, save_strategy="steps", save_steps=2)
        return KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128,
                         **loss)  # fmt: skip

    trainer(2, divergence="jsd", divergence_params={"beta": 0.3}).train()
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "logitstore_state.json").read_text())
    assert saved["objective"]["params"] == {"beta": 0.3}
    assert saved["objective"]["ce_weight"] == 0.0
    for loss, named in [
        ({"divergence": "rkl"}, "name 'jsd' there, 'rkl' here"),
        ({"divergence": "jsd", "divergence_params": {"beta": 0.7}}, "params {'beta': 0.3} there"),
        ({"divergence": "jsd", "divergence_params": {"beta": 0.3}, "ce_weight": 0.5},
         "ce_weight 0.0 there, 0.5 here"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(named)):
            trainer(4, **loss).train(resume_from_checkpoint=True)
    resumed = trainer(4, divergence="jsd", divergence_params={"beta": 0.3})
    resumed.train(resume_from_checkpoint=True)  # the same objective goes on
    assert resumed.state.global_step == 4


def test_counts_on_a_store_without_them_are_refused_when_built(store, tiny_student_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.raises(ConfigError, match="needs a store of draw counts.*codec is topk"):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store, use_counts=True)


def test_an_evaluation_store_without_counts_for_an_objective_of_counts_is_refused_when_built(
    store, tiny_store, tiny_student_dir, tmp_path
):
    # Such a store failed at the first evaluation, after eval_steps of training, inside the loss.
    sampled = tiny_store(tmp_path / "sampled", codec="sampled", draws=20, max_length=64, limit=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    given = args(tmp_path / "run", eval_strategy="steps", eval_steps=2)
    with pytest.raises(ConfigError, match=f"store {store} has no draw counts \\(codec topk\\)"):
        KDTrainer(model, given, sampled, use_counts=True, eval_dataset={"a": sampled, "b": store})
    trainer = KDTrainer(model, given, sampled, use_counts=True, eval_dataset=sampled)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_an_evaluation_store_of_another_vocabulary_of_one_size_is_refused(
    store, tiny_teacher_dir, tiny_student_dir, tiny_tokenizer, text_jsonl, tmp_path
):
    # Llama 2's and Mistral's vocabularies both have 32000 ids: an evaluation store of the
    # other was measured as if its ids were the training store's, without a word.
    from transformers import AutoTokenizer

    from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

    teacher = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "teacher"))
    spec = json.loads((teacher / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = (t for t, i in vocab.items() if i in (200, 201))
    vocab[first], vocab[second] = vocab[second], vocab[first]  # one size, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    assert AutoTokenizer.from_pretrained(teacher).decode([200]) != tiny_tokenizer.decode([200])
    other = tmp_path / "other"
    run_teacher_pass(TeacherPassConfig(teacher=str(teacher), data=str(text_jsonl), out=str(other),
                                       k=16, max_length=64, limit=1, progress=False))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.raises(TokenizerMismatchError, match="written with another vocabulary"):
        KDTrainer(model, args(tmp_path / "run"), store, eval_dataset=str(other))


def test_taid_schedule_sees_each_steps_loss_over_its_micro_batches(
    store, tiny_student_dir, tmp_path
):
    # The step's loss is summed on the device over gradient accumulation's micro-batches and
    # read once a step: the schedule gets what Trainer logs as the step's loss.
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    given = args(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    trainer = KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=128,
                        divergence="taid")  # fmt: skip
    seen: list[float] = []
    step = trainer.kd_loss.step
    trainer.kd_loss.step = lambda loss: (seen.append(loss), step(loss))[1]  # type: ignore[method-assign]
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "taid_t" in r]
    assert len(seen) == 3 and all(isinstance(v, float) for v in seen)
    assert seen == pytest.approx(logged, abs=1e-4)
