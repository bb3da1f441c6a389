"""KDTrainer's gradient accumulation against one big batch, computed densely.

Micro-batches of very different token counts (one document, then four): the optimizer step
must follow the mean over all the step's tokens, not the mean of the micro-batches' means (the
known gradient-accumulation bug of Hugging Face Trainer's losses).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from logitstore import open_store
from logitstore.dataset import StoreDataset, collate_documents
from logitstore.divergences import sparse_loss
from logitstore.hf import TEACHER_FIELDS, KDTrainer, StoreBatches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_store) -> str:
    return tiny_store(tmp_path_factory.mktemp("kd-accumulation") / "store", k=16,
                      values="float32", max_length=64, limit=1, docs_per_shard=4)  # fmt: skip


class Fixed(StoreBatches):
    """The given batches, in turn, for ever."""

    def __init__(self, store: str, batches: list[dict]) -> None:
        super().__init__(StoreDataset(store, rank=0, world_size=1))
        self.batches = batches

    def __iter__(self):
        while True:
            yield from ({**b, "epoch": 0, "epoch_ends": False} for b in self.batches)


def test_accumulated_micro_batches_step_as_one_batch_of_their_tokens(
    store, tiny_student_dir, tmp_path
):
    documents = list(open_store(store))
    batches = [collate_documents(documents[:1]), collate_documents(documents[1:5])]
    counts = [int(b["num_tokens"]) for b in batches]
    assert counts[1] > 2 * counts[0]  # uneven: a mean of means would weigh them alike
    lr = 0.1
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    given = TrainingArguments(str(tmp_path / "run"), max_steps=1, learning_rate=lr, optim="sgd",
                              lr_scheduler_type="constant", max_grad_norm=0, logging_steps=1,
                              gradient_accumulation_steps=2, report_to="none", use_cpu=True,
                              save_strategy="no")  # fmt: skip
    trainer = KDTrainer(model=model, args=given, train_dataset=Fixed(store, batches))
    trainer.train()
    # One dense batch of both: the student's full logits, the per-token loss summed over all
    # tokens and divided by their number.
    reference = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    total = torch.zeros(())
    for b in batches:
        logits = reference(b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits[:, :-1][b["position_mask"]]
        fields = [b[k] for k in TEACHER_FIELDS[1:5]]
        total = total + sparse_loss("fkl", logits, *fields, b["labels"]).sum()
    loss = total / sum(counts)
    loss.backward()
    logged = [r["loss"] for r in trainer.state.log_history if "teacher_kl" in r]
    assert logged == [pytest.approx(float(loss), rel=1e-5)]
    stepped = dict(model.named_parameters())
    for name, start in reference.named_parameters():
        want = start.detach() - lr * start.grad
        torch.testing.assert_close(stepped[name].detach(), want, rtol=1e-5, atol=1e-7, msg=name)
