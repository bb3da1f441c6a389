"""The processes of a training run: the process group, this rank's device, two collectives.

``torchrun`` describes the group in the environment (``WORLD_SIZE``, ``LOCAL_RANK``); without
it, or with one process, no group is created and the collectives return their input, so a
single-process run needs no ``torchrun``. The group uses gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_processes() -> tuple[bool, int, int]:
    """Join the process group ``torchrun`` set up, if there is more than one process.

    Returns:
        whether the run is distributed, this process's rank, and the number of processes.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    return distributed, rank, world


def pick_device(name: str | None) -> torch.device:
    """``name`` if given, else this rank's GPU (``LOCAL_RANK``, made current), else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_sum(value: float, device: torch.device) -> float:
    """``value`` summed over every rank (float64, on ``device``: NCCL reduces GPU tensors)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
