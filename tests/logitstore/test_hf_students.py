"""KDTrainer with students of other families than Llama: what their forward does past the head.

Gemma 2 caps its logits after the head, Granite and Cohere scale them, Phi-2 adds a bias: the
fused loss must train the logits the student's own forward gives, not the bare product of the
hidden states and the head. Tiny models built from ``transformers`` configs, saved with
``save_pretrained`` and loaded back; the reference is the dense loss of the student's logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from logitstore import open_store
from logitstore.dataset import collate_documents
from logitstore.divergences import sparse_loss
from logitstore.errors import ConfigError
from logitstore.hf import TEACHER_FIELDS, KDTrainer, TeacherBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_store) -> str:
    return tiny_store(tmp_path_factory.mktemp("kd-students") / "store", k=16, values="float32",
                      max_length=64, limit=1, docs_per_shard=4)  # fmt: skip


def _student(family: str, setting: dict, out: Path):
    # initializer_range=1: logits of a few units, where a cap or a scale changes them clearly.
    config = AutoConfig.for_model(family, vocab_size=384, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, initializer_range=1.0,
                                  **setting)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def _gradients(model, store: str, tmp_path: Path, fused: bool) -> tuple[float, dict]:
    """The loss of one shard and its gradients: through KDTrainer's fused forward, or of the
    student's own logits, dense."""
    batch = collate_documents(open_store(store).read_shard(0))
    ids, mask, rows = batch["input_ids"], batch["attention_mask"], batch["position_mask"]
    if fused:
        given = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to="none",
                                  use_cpu=True)  # fmt: skip
        KDTrainer(model=model, args=given, train_dataset=store)
        fields = {k: batch[k] for k in TEACHER_FIELDS}
        loss = model(ids, mask, kd_batch=TeacherBatch(rows, fields, False)).loss
    else:
        logits = model(ids, attention_mask=mask).logits[:, :-1][rows]
        loss = sparse_loss("fkl", logits, *[batch[k] for k in TEACHER_FIELDS[1:5]],
                           batch["labels"]).sum() / batch["num_tokens"]  # fmt: skip
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("family", "setting"),
    [("gemma2", {"final_logit_softcapping": 2.0}), ("granite", {"logits_scaling": 8.0}),
     ("cohere", {"logit_scale": 0.0625})],
)  # fmt: skip
def test_a_student_whose_forward_caps_or_scales_the_head_trains_on_its_own_logits(
    store, tmp_path, family, setting
):
    # Gemma 2 caps its logits after the head, Granite divides them, Cohere multiplies them: the
    # fused loss took the bare product, logits the student never gives.
    model = _student(family, setting, tmp_path / family)
    batch = collate_documents(open_store(store).read_shard(0))
    ids, mask, rows = batch["input_ids"], batch["attention_mask"], batch["position_mask"]
    with torch.no_grad():
        own = model(ids, attention_mask=mask).logits[:, :-1][rows]
        hidden = model.get_decoder()(ids, attention_mask=mask).last_hidden_state[:, :-1][rows]
    assert (own - hidden @ model.get_output_embeddings().weight.T).abs().max() > 1.0
    load = AutoModelForCausalLM.from_pretrained
    loss, grads = _gradients(load(tmp_path / family), store, tmp_path, fused=True)
    want, dense = _gradients(load(tmp_path / family), store, tmp_path, fused=False)
    assert loss == pytest.approx(want, rel=1e-5)
    assert grads.keys() == dense.keys()
    for name, grad in dense.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_scale_of_the_logits_in_a_family_not_known_to_use_it_is_refused(store, tmp_path):
    # Whether logits_scaling multiplies or divides depends on the family (HyperCLOVA X
    # multiplies, Granite divides): another family's is not guessed.
    model = _student("llama", {"logits_scaling": 8.0}, tmp_path / "llama")
    given = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="logits_scaling=8.0, .*granite.*this one is llama"):
        KDTrainer(model=model, args=given, train_dataset=store)


def test_a_mixture_of_experts_whose_forward_adds_its_balancing_loss_is_refused(store, tmp_path):
    # With output_router_logits the student's own loss is the labels' plus the router's
    # load-balancing loss; the fused forward trained the distillation loss alone.
    config = AutoConfig.for_model("qwen3_moe", vocab_size=384, hidden_size=32,
                                  intermediate_size=64, moe_intermediate_size=16,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_experts=4,
                                  num_experts_per_tok=2, output_router_logits=True)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    ids = collate_documents(open_store(store).read_shard(0))["input_ids"]
    with torch.no_grad():
        assert float(model(ids, labels=ids).aux_loss) > 0  # what the fused forward dropped
    given = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="load-balancing loss.*expected output_router_logits"):
        KDTrainer(model=model, args=given, train_dataset=store)
    quiet = AutoModelForCausalLM.from_pretrained(
        tmp_path / "moe", dtype=torch.float32, output_router_logits=False
    )
    KDTrainer(model=quiet, args=given, train_dataset=store)


def test_peft_adapters_on_the_output_head_are_refused(store, tiny_student_dir, tmp_path):
    peft = pytest.importorskip("peft")
    # LoRA with lm_head among its targets: the fused loss read the head's base weight, so the
    # head's adapters got no gradient and the loss was not that of the student's own logits.
    batch = collate_documents(open_store(store).read_shard(0))
    ids, mask, rows = batch["input_ids"], batch["attention_mask"], batch["position_mask"]
    fields = {k: batch[k] for k in TEACHER_FIELDS}

    def dense(model) -> float:  # the loss of the student's own logits
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[:, :-1][rows]
        found = sparse_loss("fkl", logits, *[batch[k] for k in TEACHER_FIELDS[1:5]],
                            batch["labels"]).sum() / batch["num_tokens"]  # fmt: skip
        return float(found)

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                           init_lora_weights=False)  # fmt: skip
    adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_student_dir), lora)
    head = adapted.get_base_model().lm_head
    with torch.no_grad():
        hidden = adapted.get_base_model().model(ids, attention_mask=mask).last_hidden_state
        assert not torch.allclose(head(hidden), hidden @ head.weight.T)  # the update left out
    given = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="output head carries PEFT adapters.*modules_to_save"):
        KDTrainer(model=adapted, args=given, train_dataset=store)
    # The head trained whole beside the adapters is the student's own.
    whole = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                            modules_to_save=["lm_head"], init_lora_weights=False)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    trainer = KDTrainer(model=model, args=given, train_dataset=store, peft_config=whole)
    with torch.no_grad():
        fused = trainer.model(ids, mask, kd_batch=TeacherBatch(rows, fields, False)).loss
    assert float(fused) == pytest.approx(dense(trainer.model), rel=1e-5)


def test_a_head_with_a_bias_trains_its_logits_and_its_bias(store, tmp_path):
    # Phi-2, GPT-J and CodeGen add a bias to their logits: the fused loss dropped it, training
    # logits the student never gives and leaving the bias untrained.
    config = AutoConfig.for_model("phi", vocab_size=384, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, initializer_range=0.5)  # fmt: skip
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(config)
    torch.nn.init.normal_(saved.lm_head.bias)
    saved.save_pretrained(tmp_path / "phi")
    load = AutoModelForCausalLM.from_pretrained
    loss, grads = _gradients(load(tmp_path / "phi"), store, tmp_path, fused=True)
    want, dense = _gradients(load(tmp_path / "phi"), store, tmp_path, fused=False)
    assert loss == pytest.approx(want, rel=1e-5)
    assert dense["lm_head.bias"].abs().sum() > 0
    for name, grad in dense.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
