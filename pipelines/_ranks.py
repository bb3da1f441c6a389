"""The teacher pass under ``torchrun``: each rank's device, the process group, agreeing on errors.

Training keeps its own collective helpers: the stages prefer a little duplication to a shared
base.
"""

from __future__ import annotations

import os

import torch

from logitstore.errors import LogitstoreError
from pipelines._teacher import resolve_device


def rank_device(device: str | None) -> torch.device:
    """The device of this process: under torchrun, CUDA device ``LOCAL_RANK`` unless given."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def agree(error: BaseException | None, world: int, what: str) -> None:
    """Collective: raise on every rank when any rank failed (so none waits at a barrier)."""
    if world > 1:
        import torch.distributed as dist

        on = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else None
        )
        flag = torch.tensor(
            [0 if error is None else 1], device=on
        )  # NCCL reduces CUDA tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and int(flag.item()):
            raise LogitstoreError(f"another rank failed during {what}; see its error")
    if error is not None:
        raise error
