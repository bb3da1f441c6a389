"""Stage two: train a student from a logit store. Reads top to bottom: setup, loop, save.

The loss never materialises ``[batch, seq, vocab]`` logits: the student's final hidden states
at the real positions and its LM head weight go to ``fused_sparse_loss``, which chunks the head.
Every optimizer step accumulates micro-batches up to ``tokens_per_step`` trained tokens (across
all ranks) and divides every per-token loss by that global count, so gradient accumulation and
data parallelism give the gradient of one large batch.

All resume state lives in one dict (``state``): step, trained tokens, the loader state of
every rank and the divergence's schedule state. A checkpoint is that dict (JSON), the model
(``save_pretrained``: safetensors, loadable with ``from_pretrained``), and the optimizer,
scheduler and RNG states (``torch.save`` of our own tensors, read back with
``weights_only=True``), written to a temporary directory and renamed into place
(``pipelines/_checkpoint.py``).

Run on several processes with ``torchrun --nproc-per-node N -m pipelines.train CONFIG.yaml``
or ``torchrun ... $(which logitstore) train ...``; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from logitstore.dataset import StoreDataset
from logitstore.errors import (
    ConfigError,
    DataError,
    OutputNotWritableError,
    TemperatureNotCapturedError,
)
from pipelines._checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    truncate_metrics,
    write_checkpoint,
)
from pipelines._distributed import all_sum, gather, init_processes, pick_device
from pipelines._optim import make_optimizer, make_schedule
from pipelines._student import (
    Distiller,
    check_vocabulary,
    init_from_teacher,
    is_config_file,
    load_student,
    load_tokenizer,
    teacher_kl,
)


@dataclass
class TrainConfig:
    """Everything a training run depends on; loadable from YAML, copied into checkpoints."""

    store: str
    student: str
    out: str
    divergence: str = "fkl"
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    approximate_tail: bool = False  # uncaptured temperature: spread the tail uniformly
    ce_weight: float = 0.0
    use_counts: bool = False  # RS-KD: fkl against draw counts (sampled stores)
    tokenizer: str | None = None  # default: the student's own (none for a config file)
    init_from: str | None = None  # teacher to copy weights from, with keep_layers
    keep_layers: list[int] | None = None
    max_steps: int = 100
    stop_after: int | None = None  # stop early (e.g. a time slot); the schedule keeps max_steps
    tokens_per_step: int = 16384
    tokens_per_batch: int = 8192
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    shuffle_window: int = 4
    num_workers: int = 0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    chunk_size: int | None = None
    resume: bool = False
    device: str | None = None
    storage_options: dict[str, Any] | None = None  # fsspec options of a remote store
    cache_dir: str | None = None  # keep verified shards of a remote store here (epochs, reruns)
    readahead: int = 2  # shards fetched in the background while training
    progress: bool = True

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML mapping of field names; ``overrides`` that are not None win."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown training settings {sorted(unknown)}; known: {sorted(known)}"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def temperature_index(manifest: dict[str, Any], temperature: float) -> int | None:
    """Column of ``tail_logsumexp`` for ``temperature``; None at 1 (the stored log-probs).

    The columns are the capture's extra temperatures, ``capture.temperatures``, in order
    (FORMAT.md).
    """
    if temperature == 1.0:
        return None
    extra = [float(t) for t in manifest.get("capture", {}).get("temperatures", [])]
    if temperature not in extra:
        raise TemperatureNotCapturedError(
            f"temperature {temperature} was not captured; the store has tail sums for "
            f"{extra or 'no temperature'} besides 1.0"
        )
    return extra.index(temperature)


def check_writable(out: Path) -> None:
    """Refuse a run directory that cannot be created (a file in the way, no permission) at
    once, rather than after loading and training."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = "is a file" if not probe.is_dir() else "is not writable"
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"cannot write the run directory {out}: {probe} {problem}, expected a directory"
        )


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.student`` on ``config.store``; return a summary of the run."""
    # ---- setup -------------------------------------------------------------------------------
    from logitstore.divergences import DIVERGENCES

    device = pick_device(config.device)
    rank, world = init_processes(device)
    distributed = world > 1
    out = Path(config.out)
    check_writable(out)  # before any loading
    DIVERGENCES[config.divergence]  # unknown names fail before any loading

    store, t_index, notes = _open_store(config)
    resume_from = latest_checkpoint(out) if config.resume else None
    lm, tokenizer = _load_student(config, resume_from)
    notes += check_vocabulary(store.manifest, lm, tokenizer)
    lm.to(device)
    model, schedule, loss_params = _distiller(config, lm, t_index)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer, scheduler = make_optimizer(config, lm)
    dataset = StoreDataset(
        store,
        tokens_per_batch=config.tokens_per_batch,
        seed=config.seed,
        shuffle_window=config.shuffle_window,
        rank=rank,
        world_size=world,
    )

    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "world_size": world,
        "loader": None,
        "schedule": None,
        "config": dataclasses.asdict(config),
    }
    if resume_from is not None:
        state = load_checkpoint(
            resume_from,
            dataclasses.asdict(config),
            rank=rank,
            world=world,
            optimizer=optimizer,
            scheduler=scheduler,
            dataset=dataset,
            schedule=schedule,
        )
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, state["step"])
        for note in notes:
            print(f"note: {note}", file=sys.stderr)

    # ---- loop --------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    batches = _batches(dataset, config.num_workers)
    local_budget = math.ceil(config.tokens_per_step / world)
    stop = min(config.max_steps, config.stop_after or config.max_steps)
    bar = tqdm(
        total=config.max_steps,
        initial=state["step"],
        disable=rank != 0 or not config.progress,
        desc="train",
        dynamic_ncols=True,
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    model.train()
    plain_fkl = config.divergence == "fkl" and not (
        config.ce_weight or t_index is not None or loss_params or config.use_counts
    )
    last: dict[str, Any] = {}
    while state["step"] < stop:
        started = time.perf_counter()
        micro, local_tokens = _micro_batches(batches, local_budget, device)
        global_tokens = all_sum(float(local_tokens), device)
        num_items = max(global_tokens, 1.0)
        # DDP averages gradients over ranks; the loss is already divided by the global count.
        scale = float(world)
        extra = {"t": schedule.t} if schedule is not None else {}
        loss_sum, kl_sum = 0.0, 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1 or not distributed
            ctx = contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]
            with ctx, autocast:
                loss, hidden = model(batch, num_items, extra)
            (loss * scale if distributed else loss).backward()
            loss_sum += float(loss.detach())
            if state["step"] % config.log_every == 0:
                # With plain FKL the loss is the teacher KL: skip the second head pass.
                kl_sum += (
                    float(loss.detach())
                    if plain_fkl
                    else teacher_kl(lm, hidden, batch, num_items, config.chunk_size)
                )
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = all_sum(loss_sum, device)
        if schedule is not None:
            schedule.update(loss_value)
        state["step"] += 1
        state["tokens"] += int(global_tokens)
        state["loader"] = gather(dataset.state_dict())
        state["schedule"] = schedule.state_dict() if schedule is not None else None

        elapsed = time.perf_counter() - started
        if (state["step"] - 1) % config.log_every == 0:
            last = {
                "step": state["step"],
                "loss": loss_value,
                "teacher_kl": all_sum(kl_sum, device),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": state["tokens"],
                "tokens_per_s": global_tokens / elapsed,
                "epoch": dataset.epoch,
            }
            if schedule is not None:
                last["taid_t"] = float(schedule.t)
            if rank == 0:
                _log(metrics_path, last, bar)
        bar.update(1)
        if config.save_every and state["step"] % config.save_every == 0 and state["step"] < stop:
            write_checkpoint(
                out, lm, tokenizer, state, optimizer, scheduler, config.keep_checkpoints, rank
            )

    # ---- save --------------------------------------------------------------------------------
    bar.close()
    path = write_checkpoint(
        out, lm, tokenizer, state, optimizer, scheduler, config.keep_checkpoints, rank
    )
    if distributed:
        dist.barrier()
    return {
        "step": state["step"],
        "tokens": state["tokens"],
        "checkpoint": str(path),
        "last": last,
        "notes": notes,
    }


# ---- the steps of train(), in the order it takes them ---------------------------------------

# Options of the fused loss itself, accepted among --param besides the objective's own.
_LOSS_OPTIONS = ("tau_squared", "approximate_tail")


def _open_store(config: TrainConfig) -> tuple[Any, int | None, list[str]]:
    """The store, the ``tail_logsumexp`` column of the training temperature (None at 1 or
    when approximated), and notes for the user."""
    from logitstore import open_store

    store = open_store(
        config.store,
        storage_options=config.storage_options,
        readahead=config.readahead,
        cache_dir=config.cache_dir,
    )
    try:
        return store, temperature_index(store.manifest, config.temperature), []
    except TemperatureNotCapturedError:
        if not config.approximate_tail:
            raise
        note = (
            f"temperature {config.temperature} not captured: the teacher's tail is "
            "spread uniformly, so the tempered teacher is approximate"
        )
        return store, None, [note]


def _load_student(config: TrainConfig, resume_from: Path | None) -> tuple[Any, Any]:
    """The student, seeded (from the checkpoint a run resumes from, else built and possibly
    initialised from the teacher), and its tokenizer (None when there is none to load)."""
    torch.manual_seed(config.seed)
    if resume_from is not None:
        lm = load_student(str(resume_from))
    else:
        lm = load_student(config.student, seed=config.seed)
        if config.init_from:
            init_from_teacher(lm, config.init_from, config.keep_layers or [])
    # A config-file student has no tokenizer; one initialised from a teacher shares its own.
    from_teacher = config.init_from if is_config_file(config.student) else None
    return lm, load_tokenizer(config.tokenizer or from_teacher or config.student)


def _distiller(
    config: TrainConfig, lm: Any, t_index: int | None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The student with its loss, the divergence's schedule (or None) and the loss parameters.

    The objective's parameters are validated here, not at the first step.
    """
    from logitstore.divergences import DIVERGENCES

    schedule, loss_params = make_schedule(config)
    DIVERGENCES[config.divergence].resolve(
        {k: v for k, v in loss_params.items() if k not in _LOSS_OPTIONS}
    )
    if t_index is None and config.temperature != 1.0:
        loss_params["approximate_tail"] = True
    model = Distiller(
        lm,
        divergence=config.divergence,
        params=loss_params,
        temperature=config.temperature,
        temperature_index=t_index,
        ce_weight=config.ce_weight,
        chunk_size=config.chunk_size,
        use_counts=config.use_counts,
    )
    return model, schedule, loss_params


def _batches(dataset: StoreDataset, num_workers: int) -> Iterator[dict[str, Any]]:
    """Endless batches, epoch after epoch, each recorded as consumed when handed out."""
    from torch.utils.data import DataLoader

    while True:
        empty = True
        source = (
            DataLoader(dataset, batch_size=None, num_workers=num_workers)
            if num_workers
            else dataset
        )
        for batch in source:
            empty = False
            dataset.record(batch)
            yield batch
        if empty and dataset.state_dict()["samples_consumed"] == [0] * max(1, num_workers):
            raise DataError(f"rank {dataset.rank} has no documents in epoch {dataset.epoch}")
        dataset.set_epoch(dataset.epoch + 1)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _micro_batches(
    batches: Iterator[dict[str, Any]], budget: int, device: torch.device
) -> tuple[list[dict[str, Any]], int]:
    """Batches on ``device`` until they hold ``budget`` trained tokens; they and their count."""
    micro, tokens = [], 0
    while tokens < budget:
        micro.append(_to(next(batches), device))
        tokens += micro[-1]["num_tokens"]
    return micro, tokens


def _log(path: Path, row: dict[str, Any], bar: Any) -> None:
    """Append ``row`` to the metrics log and show it on the progress bar (rank 0)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix(
        loss=f"{row['loss']:.4f}",
        kl=f"{row['teacher_kl']:.4f}",
        tok_s=f"{row['tokens_per_s']:.0f}",
        lr=f"{row['lr']:.2e}",
    )


if __name__ == "__main__":  # torchrun --nproc-per-node N -m pipelines.train CONFIG.yaml
    print(json.dumps(train(TrainConfig.from_yaml(sys.argv[1])), indent=1, default=str))
