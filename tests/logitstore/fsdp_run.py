"""The fused loss in a student sharded by torch's FSDP2 (``fully_shard``), for ``test_hf.py``.

``python fsdp_run.py STORE STUDENT OUT STEPS`` under ``torchrun --nproc-per-node 2`` (gloo), or
alone as the reference: one process reading both ranks' streams, one micro-batch of each per
step. Writes ``losses.json``, ``head.json`` (the head's type outside the forward) and
``final.safetensors`` (full weights) from rank 0.
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from logitstore.dataset import StoreDataset
from logitstore.divergences import DistillationLoss
from logitstore.hf import TEACHER_FIELDS, StoreBatches, TeacherBatch, patch_for_distillation

store, student, out, steps = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
sharded = "WORLD_SIZE" in __import__("os").environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
streams = [
    iter(StoreBatches(StoreDataset(store, tokens_per_batch=256, rank=r, world_size=2)))
    for r in ((rank,) if sharded else (0, 1))
]
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
patch_for_distillation(model, DistillationLoss.create("rkl"))
if sharded:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
losses, heads = [], []
for _ in range(steps):
    batches = [next(s) for s in streams]
    total = torch.tensor(float(sum(b["num_tokens"] for b in batches)))
    if sharded:
        dist.all_reduce(total)
    step_loss = torch.zeros(())
    for b in batches:
        heads.append(type(model.lm_head.weight).__name__)
        kd = TeacherBatch(b["position_mask"], {k: b[k] for k in TEACHER_FIELDS}, False)
        loss = model(
            b["input_ids"], b["attention_mask"], kd_batch=kd, num_items_in_batch=total
        ).loss
        (loss * world).backward()  # FSDP averages gradients over ranks
        step_loss += loss.detach()
    optimizer.step()
    optimizer.zero_grad()
    if sharded:
        dist.all_reduce(step_loss)
    losses.append(float(step_loss))
if sharded:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
else:
    weights = model.state_dict()
out.mkdir(parents=True, exist_ok=True)
(out / f"head-{rank}.json").write_text(json.dumps(heads))
if rank == 0:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "final.safetensors"))
    (out / "losses.json").write_text(json.dumps(losses))

# As a script under torchrun should end: what holds the group (the sharded model, the last
# step's graph) let go and the group destroyed while the interpreter runs. gloo can abort when
# a group is freed during the interpreter's shutdown.
del model, optimizer, loss, kd, b, batches
gc.collect()
if sharded:
    dist.destroy_process_group()
