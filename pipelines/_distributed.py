"""The processes of a run: this rank's device, the process group, and a few collectives.

``torchrun`` describes the group in the environment (``WORLD_SIZE``, ``LOCAL_RANK``); without
it, or with one process, no group is created and the collectives return their input, so a
single-process run needs no ``torchrun``. The group uses NCCL when this rank's device is a GPU
and gloo otherwise. Both stages, the teacher pass and training, use these.

Waits: where ranks wait for one another (rank 0 preparing the data or the store, ranks with fewer
shards waiting for the others at the end, rank 0 writing the manifest), they meet in a group of
their own over every rank, of the default group's backend, with :data:`WAIT_TIMEOUT`. In the
default group such a wait is one collective, and its timeout (ten minutes under NCCL, thirty
under gloo) would end the run when the wait is longer (tokenizing a large dataset; an hour's
shard one rank has more than the others). A rank that dies does not keep the others waiting:
torchrun stops the others.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from logitstore.errors import ConfigError, LogitstoreError

WAIT_TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others in :func:`agree` and :func:`barrier`."""

_waits: Any = None  # the group of the waits, made by init_processes


def parse_device(name: str | None) -> torch.device:
    """The device ``name`` names, or CUDA when available (else the CPU) when it is empty.

    Raises:
        ConfigError: a name torch does not know, CUDA asked for where there is none, or a GPU
            index past the last GPU.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device must be a torch device such as cpu or cuda; found {name!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA devices"
        )
    return device


def pick_device(name: str | None) -> torch.device:
    """This rank's device: ``name``, or CUDA when available, else the CPU (:func:`parse_device`).

    A CUDA device without an index (``"cuda"`` or the default) is GPU ``LOCAL_RANK`` (0 when not
    under torchrun), made the current device, so every rank of a node uses its own GPU. A GPU
    index is refused where a node runs several processes: they would all share that GPU.
    """
    device = parse_device(name)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is not None and local > 1:
        raise ConfigError(
            f"device {name}: with {local} processes on this node every rank would use GPU "
            f"{device.index}; give --device cuda and each rank takes its own (GPU LOCAL_RANK)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_processes(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun set up, if there is more than one process.

    Collective: every rank also makes the group its waits meet in (see the module's docstring).

    Returns:
        this process's rank and the number of processes.
    """
    global _waits
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _waits = dist.new_group(timeout=WAIT_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def end_processes(*, default_group: bool = True) -> None:
    """Destroy every process group (with ``default_group=False``, only the waits' group: the
    default one is the caller's), once nothing more needs the other ranks, and free what
    still refers to them (the waits' group, a run's model in reference cycles) while the
    interpreter runs. A gloo group alive at exit, or freed while the interpreter shuts down,
    can abort the process (torch 2.13 on CPU: ``terminate called without an active
    exception``), and torchrun then reports a finished run as failed."""
    global _waits
    if is_distributed():
        if default_group:
            dist.destroy_process_group()
        elif _waits is not None:
            dist.destroy_process_group(_waits)
        gc.collect()
    _waits = None


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


def agree(error: BaseException | None, world: int, what: str) -> None:
    """Collective: raise on every rank when any rank failed (so none waits at a barrier).

    Ranks may reach it hours apart: it waits up to :data:`WAIT_TIMEOUT`, not the default
    group's timeout.
    """
    if world > 1:
        on = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(_waits) == "nccl"
            else None
        )  # NCCL reduces CUDA tensors only
        flag = torch.tensor([0 if error is None else 1], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_waits)
        if error is None and int(flag.item()):
            raise LogitstoreError(f"another rank failed during {what}; see its error")
    if error is not None:
        raise error


def barrier() -> None:
    """Collective: wait, up to :data:`WAIT_TIMEOUT`, until every rank is here."""
    if is_distributed():
        dist.barrier(group=_waits)


def tensor_parallel_groups(rank: int, world: int, size: int) -> tuple[int, int, int]:
    """This rank's tensor-parallel group, the number of groups, and its rank inside the group.

    A group is ``size`` consecutive ranks (with torchrun's numbering, GPUs of one node); the
    ranks of a group hold one copy of the model between them.

    Raises:
        ConfigError: ``size`` < 1 or ``world`` not a multiple of ``size``.
    """
    if size < 1 or world % size:
        raise ConfigError(
            f"tensor parallelism over {size} ranks needs torchrun with a multiple of {size} "
            f"processes, found {world}"
        )
    return rank // size, world // size, rank % size


def tensor_parallel_group(size: int) -> Any:
    """This rank's group of ``size`` consecutive ranks, as a process group (``None`` if 1).

    Collective: every rank creates every group, in the same order.
    """
    if size <= 1 or not is_distributed():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


def any_failed(failed: bool, group: Any, device: torch.device) -> bool:
    """Collective over ``group``: whether any of its ranks failed (NCCL reduces GPU tensors)."""
    on = device if dist.get_backend(group) == "nccl" else None
    flag = torch.tensor([int(failed)], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
