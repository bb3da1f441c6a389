"""The fused loss in a student split by transformers' tensor parallelism, for ``test_hf.py``.

``python tp_run.py STORE STUDENT OUT STEPS`` under ``torchrun --nproc-per-node 2`` (gloo): the
student is loaded with ``tp_plan="auto"``, both ranks train on the same batches (one group), and
rank 0 writes ``losses.json``, ``final.safetensors`` (the weights gathered whole) and
``refusal.txt`` (what ``KDTrainer`` says of such a student). Alone, without ``torchrun``, it
trains the same student unsplit on the same batches: the reference.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, TrainingArguments

from logitstore.dataset import StoreDataset
from logitstore.divergences import DistillationLoss
from logitstore.errors import ConfigError
from logitstore.hf import TEACHER_FIELDS, KDTrainer, TeacherBatch, patch_for_distillation

store, student, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
split = "WORLD_SIZE" in os.environ
plan = {"tp_plan": "auto"} if split else {}
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, **plan)
rank = int(os.environ.get("RANK", "0"))
if split:
    assert isinstance(model.lm_head.weight, DTensor), type(model.lm_head.weight)
patch_for_distillation(model, DistillationLoss.create("drkl"), 384)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
batches = iter(StoreDataset(store, tokens_per_batch=256, shuffle=False, rank=0, world_size=1))
losses = []
for _ in range(steps):
    b = next(batches)
    kd = TeacherBatch(b["position_mask"], {k: b[k] for k in TEACHER_FIELDS}, False)
    loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], kd_batch=kd,
                 num_items_in_batch=float(b["num_tokens"]))["loss"]  # fmt: skip
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(float(loss))
weights = {
    k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous()
    for k, v in model.state_dict().items()
}
refusal = ""
if split:
    args = TrainingArguments(str(out / "run"), max_steps=1, report_to="none", use_cpu=True)
    try:
        KDTrainer(model=model, args=args, train_dataset=store)
    except ConfigError as exc:
        refusal = str(exc)
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(losses))
    (out / "refusal.txt").write_text(refusal)
    save_file(weights, str(out / "final.safetensors"))

# As a script under torchrun should end: what holds the group (the split model, the last
# step's graph) let go and the group destroyed while the interpreter runs. gloo can abort when
# a group is freed during the interpreter's shutdown.
del model, optimizer, loss, kd, b
gc.collect()
if split:
    torch.distributed.destroy_process_group()
