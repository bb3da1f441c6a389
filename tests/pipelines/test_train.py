"""The trainer: every divergence lowers the true teacher KL, exact resume, refusals, accumulation."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from logitstore import open_store
from logitstore.dataset import StoreDataset, collate_documents
from logitstore.divergences import DIVERGENCES, DistillationLoss
from logitstore.errors import (
    ConfigError,
    TemperatureNotCapturedError,
    TokenizerMismatchError,
    UnknownNameError,
)
from logitstore.format import tail_temperatures
from logitstore.hf import STATE_NAME
from logitstore.pipelines._student import final_hidden, init_from_teacher, load_student
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.pipelines.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    out = tmp_path_factory.mktemp("store") / "s"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            k=16,
            values="float32",
            max_length=64,
            limit=8,
            docs_per_shard=8,
            temperatures=(1.0, 2.0),
            progress=False,
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def teacher_logprobs(
    store, tiny_teacher_dir
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per document: input ids, trained-position mask, full teacher log-probs (float64)."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for doc in open_store(store):
            ids = torch.from_numpy(doc.input_ids)[None]
            logp = torch.log_softmax(teacher(ids).logits[0, :-1], -1)
            out.append((ids, torch.from_numpy(doc.loss_mask), logp))
    return out


def true_teacher_kl(student: torch.nn.Module, teacher_logprobs) -> float:
    """Mean full-vocabulary KL(teacher || student) over the trained positions, float64."""
    student = student.to(torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, logp in teacher_logprobs:
            logq = torch.log_softmax(student(ids).logits[0, :-1], -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            total += float(kl[mask].sum())
            count += int(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def initial_kl(tiny_student_dir, teacher_logprobs) -> float:
    return true_teacher_kl(load_student(str(tiny_student_dir)), teacher_logprobs)


def config(store, student, out, **kw) -> TrainConfig:
    base = dict(
        store=store,
        student=str(student),
        out=str(out),
        max_steps=6,
        tokens_per_step=384,
        tokens_per_batch=512,
        lr=2e-2,
        warmup_steps=1,
        progress=False,
        shuffle_window=2,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_divergence_lowers_the_teacher_kl(
    name, store, tiny_student_dir, teacher_logprobs, initial_kl, tmp_path
):
    summary = train(config(store, tiny_student_dir, tmp_path, divergence=name))
    # The checkpoint is a plain model directory: from_pretrained loads it.
    trained = AutoModelForCausalLM.from_pretrained(summary["checkpoint"])
    after = true_teacher_kl(trained, teacher_logprobs)
    assert after < 0.9 * initial_kl, (name, initial_kl, after)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(m["teacher_kl"] >= 0 and m["tokens_per_s"] > 0 for m in lines)


def _losses(path: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["teacher_kl"], m["lr"], m.get("taid_t")) for m in rows]


def test_resume_equals_uninterrupted(store, tiny_student_dir, tmp_path):
    # TAID (schedule state) with a cross-entropy term and several micro-batches per step.
    kw = dict(
        divergence="taid",
        params={"t_start": 0.3, "alpha": 0.05},
        ce_weight=0.5,
        max_steps=6,
        tokens_per_step=700,
        tokens_per_batch=256,
        save_every=2,
    )
    train(config(store, tiny_student_dir, tmp_path / "a", **kw))
    train(config(store, tiny_student_dir, tmp_path / "b", stop_after=3, **kw))
    assert len(_losses(tmp_path / "b")) == 3
    # A crash after a checkpoint leaves metrics past it: resume drops them and redoes the step.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-3")
    # A checkpoint torn by a crash (no logitstore_state.json, written last) is never resumed.
    torn = tmp_path / "b" / "checkpoints" / "checkpoint-5"
    shutil.copytree(tmp_path / "b" / "checkpoints" / "checkpoint-2", torn)
    (torn / STATE_NAME).unlink()
    train(config(store, tiny_student_dir, tmp_path / "b", resume=True, **kw))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 6 and a == b
    assert a[-1][4] > a[1][4]  # TAID's t moved, so its state really was restored
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoints" / "checkpoint-6")
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoints" / "checkpoint-6")
    for (name, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.equal(x, y), name
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-6" / STATE_NAME).read_text())
    assert state["step"] == 6 and state["loss_schedule"]["step"] == 6
    assert set(state["loader"][0]) == {"seed", "epoch", "samples_consumed", "next_worker",
                                       "shuffle", "shuffle_window", "layout"}  # fmt: skip
    assert not torn.exists()  # rotation removed the torn checkpoint
    # Trainer's own state file keeps its own layout.
    hf_state = json.loads(
        (tmp_path / "b" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text()
    )
    assert hf_state["global_step"] == 6


def test_another_chat_template_is_a_note_and_other_ids_are_refused(
    store, tiny_student_dir, tmp_path
):
    # A base student distilled from an instruct teacher: same ids, another (or no) chat
    # template. The stored ids train as they are; the run says so. Other ids are refused.
    student = tmp_path / "student"
    shutil.copytree(tiny_student_dir, student)
    cfg_path = student / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ messages }}"
    cfg_path.write_text(json.dumps(cfg))
    (student / "chat_template.jinja").unlink(missing_ok=True)
    summary = train(config(store, student, tmp_path / "run", max_steps=1))
    assert [n for n in summary["notes"] if "chat_template_sha256 differs" in n]
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # same size, two ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerMismatchError, match="vocab_sha256") as err:
        train(config(store, student, tmp_path / "other"))
    assert "teacher" in str(err.value) and "student" in str(err.value)
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_vocabulary_size_mismatch_is_refused(store, tmp_path):
    path = tmp_path / "student.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 300,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            }
        )
    )
    with pytest.raises(TokenizerMismatchError, match="384.*300 rows: expected at least 384"):
        train(config(store, path, tmp_path / "run"))


def test_uncaptured_temperature_and_unknown_divergence_are_refused(
    store, tiny_student_dir, tmp_path
):
    with pytest.raises(TemperatureNotCapturedError, match="3.0"):
        train(config(store, tiny_student_dir, tmp_path, temperature=3.0))
    approx = train(
        config(
            store,
            tiny_student_dir,
            tmp_path / "approx",
            temperature=3.0,
            approximate_tail=True,
            max_steps=1,
        )
    )
    assert any("approximate" in note for note in approx["notes"])
    with pytest.raises(UnknownNameError, match="gamma"):
        train(config(store, tiny_student_dir, tmp_path / "bad", params={"gamma": 0.5}))
    with pytest.raises(UnknownNameError, match="fkl"):
        train(config(store, tiny_student_dir, tmp_path, divergence="nope"))


def tempered_bucket_fkl(logits, batch, tau) -> float:
    """Mean bucket FKL at temperature ``tau``, float64, straight from spec section 1."""
    total = 0.0
    trained = (batch["labels"] != -100).nonzero()[:, 0]
    for row in trained.tolist():
        ids = batch["support_ids"][row].tolist()
        y = int(batch["labels"][row])
        lp = batch["support_logprobs"][row].double() / tau
        tail = batch["tail_logsumexp"][row, 0].double()  # over V \ S, at tau
        if y not in ids:  # the label leaves the tail and becomes its own bucket
            ly = batch["label_logprob"][row].double() / tau
            lp = torch.cat([lp, ly[None]])
            tail = tail + torch.log1p(-torch.exp(ly - tail))
            ids = ids + [y]
        teacher = torch.cat([lp, tail[None]])
        teacher = teacher - torch.logsumexp(teacher, 0)
        logq = torch.log_softmax(logits[row] / tau, 0)
        head = logq[ids]
        student = torch.cat([head, torch.log1p(-torch.exp(torch.logsumexp(head, 0)))[None]])
        total += float((teacher.exp() * (teacher - student)).sum())
    return total / len(trained)


def test_training_at_a_captured_temperature_uses_its_tail_column(store, tiny_student_dir, tmp_path):
    def column(t):
        return DistillationLoss.create(temperature=t, capture_temperatures=[2.0, 4.0])

    assert [column(t).temperature_index for t in (1.0, 2.0, 4.0)] == [None, 0, 1]
    opened = open_store(store)
    loss = DistillationLoss.create(
        temperature=2.0, capture_temperatures=tail_temperatures(opened.manifest)
    )
    assert loss.temperature_index == 0
    lm = load_student(str(tiny_student_dir))
    batch = collate_documents(opened.read_shard(0)[:3])
    with torch.no_grad():
        weight = lm.get_output_embeddings().weight
        value = float(loss(final_hidden(lm, batch), weight, batch, float(batch["num_tokens"])))
        hidden = lm.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = (hidden[:, :-1][batch["position_mask"]] @ lm.lm_head.weight.T).double()
    assert value == pytest.approx(tempered_bucket_fkl(logits, batch, 2.0), rel=1e-4)
    summary = train(config(store, tiny_student_dir, tmp_path, temperature=2.0, max_steps=1))
    assert summary["step"] == 1


def test_sampled_store_trains_with_exact_log_probs_or_with_counts(
    store, tiny_teacher_dir, text_jsonl, tiny_student_dir, tmp_path
):
    out = tmp_path / "sampled"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            codec="sampled",
            draws=20,
            max_length=32,
            limit=3,
            progress=False,
        )
    )
    rkl = train(config(str(out), tiny_student_dir, tmp_path / "rkl", divergence="rkl", max_steps=2))
    counts = train(
        config(str(out), tiny_student_dir, tmp_path / "rs", use_counts=True, max_steps=2)
    )
    plain = train(config(str(out), tiny_student_dir, tmp_path / "fkl", max_steps=2))
    assert rkl["step"] == counts["step"] == plain["step"] == 2
    # The count estimator is a different loss from the bucket FKL on the same batches.
    assert counts["last"]["loss"] != pytest.approx(plain["last"]["loss"], rel=1e-3)
    with pytest.raises(ConfigError, match="sampled"):
        train(config(store, tiny_student_dir, tmp_path / "x", use_counts=True))


def test_config_file_student_initialised_from_teacher_layers(tiny_teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    cfg = teacher.config.to_dict()
    cfg["num_hidden_layers"] = 1
    path = tmp_path / "student.yaml"
    path.write_text(json.dumps(cfg))  # JSON is valid YAML
    student = load_student(str(path))
    init_from_teacher(student, str(tiny_teacher_dir), [1])
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["model.layers.0.mlp.up_proj.weight"], t["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    with pytest.raises(ConfigError, match="keep_layers"):
        init_from_teacher(student, str(tiny_teacher_dir), [0, 1])


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(store, tiny_student_dir):
    docs = open_store(store).read_shard(0)[:6]
    lm = load_student(str(tiny_student_dir))
    loss = DistillationLoss.create("jsd", ce_weight=0.3, chunk_size=64)
    weight = lm.get_output_embeddings().weight

    def grads(groups):
        lm.zero_grad()
        batches = [collate_documents(g) for g in groups]
        total = sum(b["num_tokens"] for b in batches)
        for b in batches:
            loss(final_hidden(lm, b), weight, b, float(total)).backward()
        return torch.cat([p.grad.flatten() for p in lm.parameters()])

    whole = grads([docs])
    split = grads([docs[:2], docs[2:5], docs[5:]])
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)


def test_yaml_config_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("store: s\nstudent: m\nout: o\ndivergence: drkl\nparams: {gamma: 0.3}\n")
    cfg = TrainConfig.from_yaml(path, max_steps=7, lr=None)
    assert (cfg.divergence, cfg.params, cfg.max_steps, cfg.lr) == ("drkl", {"gamma": 0.3}, 7, 3e-4)
    path.write_text("store: s\nstudent: m\nout: o\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_yaml(path)


def test_loader_feeds_the_trainer_whole_documents(store):
    # Every trained position of every document reaches the loss once per epoch.
    opened = open_store(store)
    seen = sum(
        b["num_tokens"] for b in StoreDataset(opened, tokens_per_batch=300, rank=0, world_size=1)
    )
    assert seen == sum(int(d.loss_mask.sum()) for d in opened)


def test_checkpoints_keep_the_students_own_dtype(store, tiny_student_dir, tmp_path):
    from safetensors import safe_open

    student = tmp_path / "bf16-student"
    AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.bfloat16).save_pretrained(
        student
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_student_dir / name).exists():
            shutil.copy(tiny_student_dir / name, student / name)

    def dtypes(summary) -> set:
        with safe_open(Path(summary["checkpoint"]) / "model.safetensors", "pt") as f:
            return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118

    own = train(config(store, student, tmp_path / "own", max_steps=1))
    assert dtypes(own) == {torch.bfloat16}
    wide = train(config(store, student, tmp_path / "wide", max_steps=1, student_dtype="float32"))
    assert dtypes(wide) == {torch.float32}
    with pytest.raises(ConfigError, match="dtype"):
        train(config(store, student, tmp_path / "bad", student_dtype="float33"))


def test_a_store_without_trained_positions_says_nothing_was_learned(
    tiny_store, tiny_student_dir, tmp_path, monkeypatch
):
    # A store whose every loss mask is empty (e.g. chat data without assistant turns, which the
    # teacher pass now refuses, but an older store may hold it): training must say so.
    import logitstore.pipelines.teacher_pass as pass_module

    windows = pass_module.build_windows

    def untrained(*args, **kwargs):
        found = windows(*args, **kwargs)
        for w in found:
            w.loss_mask[:] = False
        return found

    monkeypatch.setattr(pass_module, "build_windows", untrained)
    out = tiny_store(tmp_path / "untrained", k=8, max_length=32, limit=1)
    assert not any(doc.loss_mask.any() for doc in open_store(out))
    summary = train(config(out, tiny_student_dir, tmp_path / "run", max_steps=1))
    assert summary["tokens"] == 0
    assert any("no trained token was read" in note for note in summary["notes"])


def test_a_held_out_store_is_read_during_training_and_at_its_end(
    store, tiny_student_dir, tiny_store, tmp_path
):
    from logitstore.pipelines.evaluate import evaluate

    summary = train(config(store, tiny_student_dir, tmp_path / "run", max_steps=5,
                           eval_store=store, eval_every=2))  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2 steps, and the last one
    assert rows[-1]["teacher_kl"] < rows[0]["teacher_kl"]
    assert summary["eval"] == rows[-1]
    # The final student read by the evaluation command: the same numbers.
    want = evaluate(summary["checkpoint"], store, tokens_per_batch=512, device="cpu")
    assert rows[-1]["documents"] == want["documents"] == len(open_store(store))
    assert rows[-1]["tokens"] == want["tokens"]
    for key in ("teacher_kl", "top1_agreement", "student_ece"):
        assert rows[-1][key] == pytest.approx(want["fkl" if key == "teacher_kl" else key], rel=1e-4)
    with pytest.raises(ConfigError, match="give eval_store too"):
        train(config(store, tiny_student_dir, tmp_path / "b", eval_every=2))
    other = tiny_store(tmp_path / "one-temperature", k=16, max_length=64, limit=1)
    with pytest.raises(ConfigError, match=r"captured the temperatures \[1.0\], the training"):
        train(config(store, tiny_student_dir, tmp_path / "c", eval_store=other))
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_a_run_that_fails_hands_the_stop_signals_back(
    store, tiny_student_dir, tmp_path, monkeypatch
):
    # Training takes SIGTERM and SIGUSR1 to stop at a step's end; a run that raised kept them,
    # so the process ignored a later SIGTERM.
    import signal

    from logitstore.hf import KDTrainer

    def fail(*args, **kwargs):
        raise RuntimeError("failed in a step")

    monkeypatch.setattr(KDTrainer, "training_step", fail)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(RuntimeError, match="failed in a step"):
        train(config(store, tiny_student_dir, tmp_path / "run"))
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("fails", [False, True])
def test_the_entry_point_ends_the_process_group_it_trained_in(
    monkeypatch, tmp_path, one_process_group, fails
):
    """``logitstore train`` and ``python -m logitstore.pipelines.train`` destroy the group that
    Trainer ran in, whether the run returns or raises: a gloo process that exits with its
    group alive can abort at exit, failing a finished torchrun job."""
    import torch.distributed as dist

    import logitstore.pipelines.train as pipeline

    def run(config):
        assert dist.is_initialized()
        if fails:
            raise ConfigError("no")
        return {"step": 0}

    monkeypatch.setattr(pipeline, "train", run)
    with pytest.raises(ConfigError) if fails else contextlib.nullcontext():
        pipeline.train_and_print(TrainConfig(store="s", student="m", out=str(tmp_path)))
    assert not dist.is_initialized()
