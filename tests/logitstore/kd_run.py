"""A KDTrainer run as a user writes one, for the multi-process tests in ``test_hf.py``.

``python kd_run.py STORE STUDENT OUT MODE STEPS ACCUMULATION [--kill-at N] [--resume]
[--eval STORE]``, under
``torchrun`` or alone. MODE: ``ddp`` (data parallel under torchrun), ``zero3`` (DeepSpeed
ZeRO-3 under torchrun, every parameter partitioned), ``one`` (one process), ``interleave`` (one process reading the two streams a
2-process run reads, one micro-batch of each per step: the same tokens per step). Writes
``seen-RANK.json`` (data epoch, documents, tokens of every micro-batch), and on rank 0
``final.safetensors`` (full weights), ``logs.json`` and ``eval.json`` (``trainer.evaluate`` on
the whole store, after training).
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from logitstore import open_store
from logitstore.dataset import StoreDataset
from logitstore.hf import KDTrainer, StoreBatches

store, student, out, mode = sys.argv[1:5]
steps, accumulation = int(sys.argv[5]), int(sys.argv[6])
kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None
eval_store = sys.argv[sys.argv.index("--eval") + 1] if "--eval" in sys.argv else store
torch.set_num_threads(1)
extra = {}
if mode == "zero3":  # every parameter partitioned, none kept whole for being small
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True}  # fmt: skip
    extra = {
        "deepspeed": {
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
    }
args = TrainingArguments(
    out,
    max_steps=steps,
    learning_rate=1e-2,
    warmup_steps=0,
    logging_steps=1,
    # accelerate sees a DeepSpeed run on CPU as one process: every rank would write.
    save_strategy="no" if mode == "zero3" else "steps",
    save_steps=2,
    report_to="none",
    use_cpu=mode != "zero3",
    disable_tqdm=True,
    seed=0,
    gradient_accumulation_steps=accumulation,
    **extra,
)
seen = []


def real_rank() -> int:
    # The process group's rank: under DeepSpeed on CPU accelerate reports every rank as 0.
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class Recording(KDTrainer):
    def compute_loss(self, model, inputs, *rest, **kw):
        seen.append([int(inputs["epoch"]), list(inputs["doc_ids"]), int(inputs["num_tokens"])])
        rank = real_rank()
        Path(out, f"seen-{rank}.json").write_text(json.dumps({"batches": seen}))
        return super().compute_loss(model, inputs, *rest, **kw)


class Interleaved(StoreBatches):
    """The batches of ranks 0 and 1 of a 2-process run, alternately, in one process."""

    def __init__(self, opened):
        streams = [StoreDataset(opened, tokens_per_batch=256, rank=r, world_size=2) for r in (0, 1)]
        super().__init__(streams[0])
        self.streams = [StoreBatches(d) for d in streams]

    def __iter__(self):
        for pair in zip(*self.streams):
            yield from pair

    def state_dict(self):
        return [s.state_dict() for s in self.streams]


class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if kill_at is not None and state.global_step >= kill_at:
            os._exit(9)  # no clean-up of any kind, as with SIGKILL


data = Interleaved(open_store(store)) if mode == "interleave" else store
model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
trainer = Recording(
    model=model,
    args=args,
    train_dataset=data,
    divergence="fkl",
    tokens_per_batch=256,
    callbacks=[Kill()],
)
trainer.train(resume_from_checkpoint=True if "--resume" in sys.argv else None)
rank = real_rank()
# A held-out store (--eval, default the training store), one document a batch, each rank its
# share: shares of unequal length make one rank run on without documents under DDP.
held_out = StoreDataset(eval_store, tokens_per_batch=64, shuffle=False,
                        rank=trainer.args.process_index, world_size=trainer.args.world_size)  # fmt: skip
evaluation = trainer.evaluate(eval_dataset=held_out)
if mode == "zero3":
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)
elif trainer.accelerator.num_processes > 1:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(trainer.model, options=options)
else:
    weights = trainer.model.state_dict()
logs = [h for h in trainer.state.log_history if "teacher_kl" in h]
Path(out, f"seen-{rank}.json").write_text(json.dumps({"batches": seen}))
if rank == 0:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(out, "final.safetensors")))
    Path(out, "logs.json").write_text(json.dumps(logs))
    Path(out, "eval.json").write_text(json.dumps(evaluation))

# As a script under torchrun should end: the group destroyed, and what holds it (the trainer
# and its wrapped model) let go while the interpreter runs. gloo can abort when a group is
# freed during the interpreter's shutdown.
trainer.accelerator.end_training()
del trainer, model, weights
gc.collect()
