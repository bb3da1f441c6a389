"""KDTrainer: distillation inside Hugging Face Trainer, on one process and under torchrun.

The multi-process runs use ``torchrun`` with gloo on CPU; the reference for DDP and FSDP is a
one-process run that reads the same two streams (each rank's micro-batches of an optimizer
step, alternately), so every step sees the same tokens and the gradients must match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from logitstore import open_store
from logitstore.dataset import collate_documents
from logitstore.divergences import DistillationLoss, fused_sparse_loss
from logitstore.errors import ConfigError, TokenizerMismatchError
from logitstore.hf import STATE_NAME, KDTrainer, latest_checkpoint, patch_for_distillation
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("kd_run.py")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    """2 texts cut into about 25 windows (documents), 4 to a shard: an odd number of shards,
    more than the 2 ranks."""
    out = tmp_path_factory.mktemp("kd") / "store"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            k=16,
            values="float32",
            max_length=64,
            limit=2,
            docs_per_shard=4,
            progress=False,
        )
    )
    return str(out)


def args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(str(out), **base)


def run(store, student, out: Path, mode: str, steps: int, accumulation: int, *extra, procs=1):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    head = [sys.executable]
    if procs > 1:
        head += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    cmd = [*head, str(SCRIPT), store, str(student), str(out), mode, str(steps), str(accumulation)]
    done = subprocess.run(
        [*cmd, *map(str, extra)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return done


def results(out: Path) -> tuple[list[dict], dict[str, torch.Tensor], list[dict]]:
    seen = [json.loads(p.read_text()) for p in sorted(out.glob("seen-*.json"))]
    logs = json.loads((out / "logs.json").read_text())
    return logs, load_file(out / "final.safetensors"), seen


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_store) -> str:
    """The same documents in 5 shards (5, 5, 5, 5, 4): 2 ranks read 14 and 10 of them."""
    return tiny_store(tmp_path_factory.mktemp("kd") / "held-out", k=16, values="float32",
                      max_length=64, limit=2, docs_per_shard=5)  # fmt: skip


@pytest.fixture(scope="module")
def reference(store, held_out, tiny_student_dir, tmp_path_factory):
    """One process reading both ranks' streams, two micro-batches of each per step."""
    out = tmp_path_factory.mktemp("reference") / "one"
    done = run(store, tiny_student_dir, out, "interleave", 4, 4, "--eval", held_out)
    assert done.returncode == 0, done.stderr[-3000:]
    return (*results(out), str(out))


@pytest.mark.integration
def test_ddp_matches_one_process_on_the_same_tokens(
    reference, store, held_out, tiny_student_dir, tmp_path
):
    ref_logs, ref_weights, _, _ = reference
    documents = {d.doc_id for d in open_store(store)}
    # Two micro-batches a step on each rank, of uneven tokens: the step's loss is over the
    # tokens of all four.
    done = run(store, tiny_student_dir, tmp_path / "ddp", "ddp", 4, 2, "--eval", held_out, procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    logs, weights, seen = results(tmp_path / "ddp")
    # The loss curve: every step's loss is over the same tokens, normalised the same way.
    assert [r["tokens"] for r in logs] == [r["tokens"] for r in ref_logs]
    for a, b in zip(logs, ref_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)
    # Every document of epoch 0 is trained exactly once across the ranks (both ranks got
    # into epoch 1, so epoch 0 is complete).
    assert all(rank["batches"][-1][0] >= 1 for rank in seen)
    first = [d for rank in seen for e, docs, _ in rank["batches"] if e == 0 for d in docs]
    assert sorted(first) == sorted(documents)
    assert ref_logs[-1]["teacher_kl"] < ref_logs[0]["teacher_kl"]
    # Evaluated after training, each rank its share of a held-out store (14 and 10 documents,
    # one a batch: one rank runs on without any): the one-process evaluation of the weights.
    got = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    want = json.loads((Path(reference[3]) / "eval.json").read_text())
    assert got["eval_documents"] == want["eval_documents"] == len(documents)
    assert got["eval_tokens"] == want["eval_tokens"]
    for key in ("eval_loss", "eval_teacher_kl", "eval_top1_agreement", "eval_student_ece"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


@pytest.mark.integration
def test_zero3_partitioned_student_matches_one_process(store, tiny_student_dir, tmp_path):
    # DeepSpeed runs on this CPU (its CPU accelerator, gloo), but accelerate then sees one
    # process per rank, so both ranks read the same batches: ZeRO-3 partitions every parameter
    # (the head too) across the two, gathers the head for the loss in its module hooks and
    # averages two equal gradients. The result must be the one-process run on those batches.
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:
        pytest.skip(f"deepspeed does not import here, ZeRO-3 not tested: {exc!r}")
    done = run(store, tiny_student_dir, tmp_path / "one", "one", 4, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_logs, ref_weights, _ = results(tmp_path / "one")
    done = run(store, tiny_student_dir, tmp_path / "zero3", "zero3", 4, 1, procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    logs, weights, _ = results(tmp_path / "zero3")
    assert [r["tokens"] for r in logs] == [r["tokens"] for r in ref_logs]
    for a, b in zip(logs, ref_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # DeepSpeed steps its own flattened fp32 partitions: Adam may move a weight whose
    # gradient is ~0 by a few 1e-7 more or less than torch's AdamW.
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5)
    # Evaluated with the partitioned student (its head gathered in the forward's hooks).
    got = json.loads((tmp_path / "zero3" / "eval.json").read_text())
    want = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert got["eval_tokens"] == want["eval_tokens"]
    assert got["eval_teacher_kl"] == pytest.approx(want["eval_teacher_kl"], rel=1e-3)


def one_process_and_two_ranks(script: str, args: list[str], steps: int, out: Path) -> tuple:
    """Run ``script`` alone (the reference) and under a two-rank ``torchrun`` (gloo); return
    each run's losses and final weights (``out/one`` and ``out/two``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    path = str(Path(__file__).with_name(script))
    launch = {
        "one": [sys.executable, path],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", path],
    }  # fmt: skip
    found = []
    for name, command in launch.items():
        done = subprocess.run([*command, *args, str(out / name), str(steps)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        losses = json.loads((out / name / "losses.json").read_text())
        found.append((losses, load_file(out / name / "final.safetensors")))
    return found[0], found[1]


@pytest.mark.integration
def test_fused_forward_under_fsdp2_matches_one_process(store, tiny_student_dir, tmp_path):
    # accelerate applies FSDP on accelerators only (CPU processes get DDP), so on this CPU the
    # patched forward is run under torch's own fully_shard: the head is a sharded DTensor
    # outside the forward and is gathered by FSDP for it, and the gradients, reduced by FSDP,
    # must equal one process's over the same tokens.
    (a, wa), (b, wb) = one_process_and_two_ranks(
        "fsdp_run.py", [store, str(tiny_student_dir)], 4, tmp_path
    )
    assert b == pytest.approx(a, rel=1e-5) and a[-1] < a[0]
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6)
    heads = {
        h for r in (0, 1) for h in json.loads((tmp_path / "two" / f"head-{r}.json").read_text())
    }
    assert heads == {"DTensor"}


@pytest.mark.integration
def test_fused_forward_with_a_tensor_parallel_head_matches_one_process(
    store, tiny_student_dir, tmp_path
):
    # transformers' tensor parallelism (tp_plan="auto", two ranks over gloo) splits the head's
    # rows over the ranks as a DTensor: the fused loss gathers it, and the losses and weights
    # after 3 steps equal the unsplit student's on the same batches. KDTrainer refuses such a
    # student, since its loader would give the group's two ranks different documents.
    (a, wa), (b, wb) = one_process_and_two_ranks(
        "tp_run.py", [store, str(tiny_student_dir)], 3, tmp_path
    )
    assert b == pytest.approx(a, rel=1e-5) and a[-1] < a[0]
    assert wa.keys() == wb.keys()
    for name in wa:  # Adam's steps are lr-sized (1e-2): float rounding in its normaliser aside
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert "tensor parallelism" in (tmp_path / "two" / "refusal.txt").read_text()


@pytest.mark.integration
def test_killed_and_resumed_run_continues_the_same_data_order(store, tiny_student_dir, tmp_path):
    done = run(store, tiny_student_dir, tmp_path / "whole", "one", 6, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "cut"
    killed = run(store, tiny_student_dir, out, "one", 6, 2, "--kill-at", 4)
    assert killed.returncode == 9, killed.stderr[-3000:]  # died right after checkpoint-4
    first = json.loads((out / "seen-0.json").read_text())["batches"]
    assert latest_checkpoint(out).name == "checkpoint-4"
    done = run(store, tiny_student_dir, out, "one", 6, 2, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    rest = json.loads((out / "seen-0.json").read_text())["batches"]
    whole = json.loads((tmp_path / "whole" / "seen-0.json").read_text())["batches"]
    assert first + rest == whole  # the same micro-batches, in the same order, none twice
    a, b = load_file(tmp_path / "whole" / "final.safetensors"), load_file(out / "final.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_loss_runs_in_the_forward_and_equals_the_functional_loss(store, tiny_student_dir):
    # The patched forward is the model's own: whatever wraps the model (DDP, FSDP, PEFT) calls
    # it, and it must give the fused loss of the hidden states and the head.
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    loss = DistillationLoss.create("drkl", {"gamma": 0.3})
    patch_for_distillation(model, loss)
    batch = collate_documents(open_store(store).read_shard(0))
    from logitstore.hf import TEACHER_FIELDS, TeacherBatch

    kd = TeacherBatch(batch["position_mask"], {k: batch[k] for k in TEACHER_FIELDS}, True)
    out = model(batch["input_ids"], batch["attention_mask"], kd_batch=kd, num_items_in_batch=7.0)
    hidden = model.model(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    hidden = hidden[:, :-1][batch["position_mask"]]
    fields = [batch[k] for k in TEACHER_FIELDS[1:5]]
    expected = fused_sparse_loss(
        "drkl", hidden, model.lm_head.weight, *fields, batch["labels"], num_items=7.0, gamma=0.3
    )
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    fkl = fused_sparse_loss("fkl", hidden, model.lm_head.weight, *fields, batch["labels"])
    found = out.metrics.summary()  # the metrics evaluation uses, on the same batch
    assert found["tokens"] == batch["num_tokens"]
    assert found["fkl"] == pytest.approx(float(fkl), rel=1e-5)
    # Without a teacher batch the forward is the original one (generation, evaluation).
    plain = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert plain.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def test_gradient_checkpointing_gives_the_same_gradients(store, tiny_student_dir):
    batch = collate_documents(open_store(store).read_shard(1))
    from logitstore.hf import TEACHER_FIELDS, TeacherBatch

    def grads(checkpointing: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
        patch_for_distillation(model, DistillationLoss.create("rkl"))
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        kd = TeacherBatch(batch["position_mask"], {k: batch[k] for k in TEACHER_FIELDS}, False)
        model(batch["input_ids"], batch["attention_mask"], kd_batch=kd).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    plain, checkpointed = grads(False), grads(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_lora_student_trains_saves_its_adapter_and_loads_again(store, tiny_student_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from logitstore.hf import TEACHER_FIELDS, TeacherBatch

    batch = collate_documents(open_store(store).read_shard(0))
    kd = TeacherBatch(batch["position_mask"], {k: batch[k] for k in TEACHER_FIELDS}, True)

    def teacher_kl(model) -> float:
        with torch.no_grad():
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"], kd_batch=kd)
        return out.metrics.summary()["fkl"]

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = KDTrainer(
        model=model,
        args=args(tmp_path / "run", max_steps=6, learning_rate=5e-2),
        train_dataset=store,
        divergence="fkl",
        peft_config=config,
        tokens_per_batch=256,
    )
    before = teacher_kl(trainer.model)  # LoRA starts as the identity: the base student's
    trainer.train()
    trainer.model.eval()
    assert teacher_kl(trainer.model) < before
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    # The base weights did not move; the adapter did, and loads back onto a fresh base.
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    trained = trainer.model.get_base_model()
    assert torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    )
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits)
        assert not torch.allclose(
            loaded(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_student_dir)(ids).logits
        )


def test_checkpoints_hold_the_read_position_and_bf16_runs(store, tiny_student_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    trainer = KDTrainer(
        model=model,
        args=args(tmp_path / "run", save_strategy="steps", save_steps=2, bf16=True, max_steps=4),
        train_dataset=open_store(store),
        divergence="taid",
        tokens_per_batch=256,
    )
    trainer.train()
    state = json.loads((tmp_path / "run" / "checkpoint-4" / STATE_NAME).read_text())
    assert state["step"] == 4 and state["loss_schedule"]["step"] == 4
    assert state["loader"][0]["samples_consumed"][0] > 0
    assert (tmp_path / "run" / "checkpoint-2" / STATE_NAME).exists()
    logs = [r for r in trainer.state.log_history if "teacher_kl" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert logs[-1]["taid_t"] > logs[0]["taid_t"]


def test_a_checkpoint_pushed_to_the_hub_holds_its_state_file(
    store, tiny_student_dir, tmp_path, monkeypatch
):
    # Trainer pushes a checkpoint (hub_strategy="checkpoint") inside _save_checkpoint, before
    # KDTrainer wrote logitstore_state.json: the Hub's copy was a checkpoint no resume takes.
    from transformers import Trainer

    pushed: list[set[str]] = []
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(Trainer, "_finish_current_push", lambda self: None)
    monkeypatch.setattr(
        Trainer,
        "_push_from_checkpoint",
        lambda self, folder: pushed.append({p.name for p in Path(folder).iterdir()}),
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    given = args(tmp_path / "run", save_strategy="steps", save_steps=1, max_steps=2,
                 push_to_hub=True, hub_strategy="checkpoint")  # fmt: skip
    KDTrainer(model=model, args=given, train_dataset=store, tokens_per_batch=256).train()
    assert len(pushed) == 2 and all(STATE_NAME in names for names in pushed)
    assert all("model.safetensors" in names for names in pushed)
    state = json.loads((tmp_path / "run" / "checkpoint-2" / STATE_NAME).read_text())
    assert state["step"] == 2  # written once, for the push, with the step's position


def test_refusals(store, tiny_student_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.raises(ConfigError, match="max_steps"):
        KDTrainer(model=model, args=args(tmp_path, max_steps=-1), train_dataset=store)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        KDTrainer(model=model, args=args(tmp_path), train_dataset=store).train(True)
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(TokenizerMismatchError, match="100 rows"):
        KDTrainer(model=small, args=args(tmp_path), train_dataset=store)


def test_a_tied_student_resumes_with_its_head_tied_and_no_missing_key_warning(
    store, tiny_tokenizer, tmp_path, monkeypatch
):
    # A tied head is saved once (as the embeddings): transformers 5's Trainer recognises that
    # only through ``_keys_to_ignore_on_save``, which its models leave empty, and warned.
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.trainer import logger

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path / "run"
    trainer = KDTrainer(LlamaForCausalLM(config), args(out, max_steps=2, save_steps=2,
                        save_strategy="steps"), store)  # fmt: skip
    trainer.train()
    saved = load_file(out / "checkpoint-2" / "model.safetensors")
    assert "lm_head.weight" not in saved  # the head is saved as the embeddings only
    said: list[str] = []
    monkeypatch.setattr(logger, "warning", lambda message, *a, **k: said.append(str(message)))
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    trainer = KDTrainer(model, args(out, max_steps=2), store)
    trainer._load_from_checkpoint(str(out / "checkpoint-2"))
    assert not [m for m in said if "missing keys" in m], said
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, saved["model.embed_tokens.weight"])
    # A key that is not tied is still named.
    trainer._issue_warnings_after_load(
        torch.nn.modules.module._IncompatibleKeys(["lm_head.weight", "model.norm.weight"], [])
    )
    assert said and "model.norm.weight" in said[-1] and "lm_head" not in said[-1], said


def test_one_process_that_sees_several_gpus_trains_on_one_not_with_data_parallel(
    store, tiny_student_dir, tmp_path
):
    # Trainer wraps the student in nn.DataParallel when one process sees several GPUs: its
    # replicas would split the token ids, each with the whole teacher batch.
    training_args = args(tmp_path / "run")
    _ = training_args.device  # devices set up, as on a machine with 4 GPUs:
    training_args._n_gpu = 4
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    with pytest.warns(UserWarning, match="sees 4 GPUs.*torchrun --nproc-per-node 4"):
        trainer = KDTrainer(model, training_args, store)
    assert trainer.args.n_gpu == 1
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)


def test_evaluation_during_training_reads_the_held_out_store_as_logitstore_eval_does(
    store, tiny_student_dir, tiny_tokenizer, tmp_path
):
    from logitstore.pipelines.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    training = args(tmp_path / "run", max_steps=4, eval_strategy="steps", eval_steps=2,
                    save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                    metric_for_best_model="held_teacher_kl", greater_is_better=False)  # fmt: skip
    trainer = KDTrainer(
        model=model,
        args=training,
        train_dataset=store,
        eval_dataset={"held": store},
        divergence="fkl",
        tokens_per_batch=256,
    )
    trainer.train()
    during = [h for h in trainer.state.log_history if "eval_held_teacher_kl" in h]
    assert [h["step"] for h in during] == [2, 4]
    assert during[1]["eval_held_teacher_kl"] < during[0]["eval_held_teacher_kl"]
    # Trainer picks the best checkpoint by the metric, as with any dataset.
    assert trainer.state.best_metric == during[1]["eval_held_teacher_kl"]
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    found = trainer.evaluate(eval_dataset=store)
    # A name of the eval_dataset dict is its store, as in Trainer (it was read as a store URL).
    assert trainer.evaluate("held")["eval_teacher_kl"] == found["eval_teacher_kl"]
    assert found["eval_teacher_kl"] == pytest.approx(during[1]["eval_held_teacher_kl"], rel=1e-6)
    # The same student read by the evaluation command: its own loop, the plain forward.
    trainer.save_model(str(tmp_path / "student"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "student"))
    want = evaluate(str(tmp_path / "student"), store, tokens_per_batch=256, device="cpu")
    assert found["eval_documents"] == want["documents"] == len(open_store(store))
    assert found["eval_tokens"] == want["tokens"]
    for key in ("teacher_ece", "student_ece", "top1_agreement", "student_entropy"):
        assert found[f"eval_{key}"] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert found["eval_teacher_kl"] == pytest.approx(want["fkl"], rel=1e-4)
    assert found["eval_teacher_rkl"] == pytest.approx(want["rkl"], rel=1e-4)
    # The objective here is the forward KL: the loss is the metric, computed by the loss.
    assert found["eval_loss"] == pytest.approx(found["eval_teacher_kl"], rel=1e-4)
    with pytest.raises(ConfigError, match="needs a held-out store"):
        KDTrainer(model=model, args=args(tmp_path / "b"), train_dataset=store).evaluate()
    with pytest.raises(ConfigError, match="shuffle=False"):
        from logitstore.dataset import StoreDataset

        trainer.evaluate(eval_dataset=StoreDataset(store, rank=0, world_size=1))
    with pytest.raises(ConfigError, match="eval_dataset reads as rank 1 of 2; this process is"):
        trainer.evaluate(eval_dataset=StoreDataset(store, shuffle=False, rank=1, world_size=2))
    with pytest.raises(ConfigError, match="eval_dataset must be a store URL.*found int"):
        trainer.evaluate(eval_dataset=42)
    with pytest.raises(ConfigError, match="no predictions to gather"):
        trainer.predict(store)
    with pytest.raises(TokenizerMismatchError, match="has vocabulary size 300; the training"):
        trainer.evaluate(eval_dataset=_other_vocabulary_store(tmp_path / "other"))


def _other_vocabulary_store(root: Path) -> str:
    import numpy as np

    from logitstore import EncodedDocument, StoreWriter
    from logitstore.codecs import get_codec

    codec, vocab = get_codec("topk", k=4), 300
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": []}, "source": {}}
    w = StoreWriter(str(root), codec=codec, backend="zarr", metadata=meta, vocab_size=vocab)
    ids = torch.arange(6)
    fields = codec.encode(torch.log_softmax(torch.randn(5, vocab), -1), ids[1:])
    w.write_shard(0, [EncodedDocument("a", ids.numpy(), np.ones(5, bool), {
        k: v.numpy() for k, v in fields.items()})])  # fmt: skip
    w.finalize(1)
    return str(root)
