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
``weights_only=True``), written to a temporary directory and renamed into place.

Run on several processes with ``torchrun --nproc-per-node N -m pipelines.train CONFIG.yaml``
or ``torchrun ... $(which logitstore) train ...``; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
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


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


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


def _all_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints``, or None."""
    root = Path(out) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def save_checkpoint(
    out: Path,
    step: int,
    lm: Any,
    tokenizer: Any,
    state: dict[str, Any],
    tensors: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``out/checkpoints/step-NNNNNNNN`` atomically (temporary directory, then rename)."""
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(tensors, tmp / "trainer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(root.glob("step-*"))[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return final


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.student`` on ``config.store``; return a summary of the run."""
    # ---- setup -------------------------------------------------------------------------------
    from logitstore import open_store
    from logitstore.divergences import DIVERGENCES

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    out = Path(config.out)
    check_writable(out)  # before any loading
    DIVERGENCES[config.divergence]  # unknown names fail before any loading

    store = open_store(
        config.store,
        storage_options=config.storage_options,
        readahead=config.readahead,
        cache_dir=config.cache_dir,
    )
    manifest = store.manifest
    notes: list[str] = []
    try:
        t_index = temperature_index(manifest, config.temperature)
    except TemperatureNotCapturedError:
        if not config.approximate_tail:
            raise
        t_index = None
        notes.append(
            f"temperature {config.temperature} not captured: the teacher's tail is "
            "spread uniformly, so the tempered teacher is approximate"
        )
    resume_from = latest_checkpoint(out) if config.resume else None
    torch.manual_seed(config.seed)
    if resume_from is not None:
        lm = load_student(str(resume_from))
    else:
        lm = load_student(config.student, seed=config.seed)
        if config.init_from:
            init_from_teacher(lm, config.init_from, config.keep_layers or [])
    # A config-file student has no tokenizer; one initialised from a teacher shares its own.
    from_teacher = config.init_from if is_config_file(config.student) else None
    tokenizer = load_tokenizer(config.tokenizer or from_teacher or config.student)
    notes += check_vocabulary(manifest, lm, tokenizer)
    lm.to(device)

    schedule, loss_params = make_schedule(config)
    # Validate the objective's parameters now, not at the first step.
    DIVERGENCES[config.divergence].resolve(
        {k: v for k, v in loss_params.items() if k not in _LOSS_OPTIONS}
    )
    if t_index is None and config.temperature != 1.0:
        loss_params["approximate_tail"] = True
    model: nn.Module = Distiller(
        lm,
        divergence=config.divergence,
        params=loss_params,
        temperature=config.temperature,
        temperature_index=t_index,
        ce_weight=config.ce_weight,
        chunk_size=config.chunk_size,
        use_counts=config.use_counts,
    )
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    decay = [p for p in lm.parameters() if p.ndim >= 2]
    no_decay = [p for p in lm.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
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
        state = json.loads((resume_from / "trainer_state.json").read_text())
        state["config"] = dataclasses.asdict(config)
        if state["world_size"] != world:
            raise ConfigError(
                f"checkpoint was written by {state['world_size']} processes; this run has {world}"
            )
        tensors = torch.load(resume_from / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["rng"][rank]["cpu"])
        if "cuda" in tensors["rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng"][rank]["cuda"])
        dataset.load_state_dict(state["loader"][rank])
        if schedule is not None and state["schedule"] is not None:
            schedule.load_state_dict(state["schedule"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state["step"])
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
        micro, local_tokens = [], 0
        while local_tokens < local_budget:
            micro.append(_to(next(batches), device))
            local_tokens += micro[-1]["num_tokens"]
        global_tokens = _all_sum(float(local_tokens), device)
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
        loss_value = _all_sum(loss_sum, device)
        if schedule is not None:
            schedule.update(loss_value)
        state["step"] += 1
        state["tokens"] += int(global_tokens)
        state["loader"] = _gather(dataset.state_dict())
        state["schedule"] = schedule.state_dict() if schedule is not None else None

        elapsed = time.perf_counter() - started
        if (state["step"] - 1) % config.log_every == 0:
            last = {
                "step": state["step"],
                "loss": loss_value,
                "teacher_kl": _all_sum(kl_sum, device),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens": state["tokens"],
                "tokens_per_s": global_tokens / elapsed,
                "epoch": dataset.epoch,
            }
            if schedule is not None:
                last["taid_t"] = float(schedule.t)
            if rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    kl=f"{last['teacher_kl']:.4f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                    lr=f"{last['lr']:.2e}",
                )
        bar.update(1)
        if config.save_every and state["step"] % config.save_every == 0 and state["step"] < stop:
            _checkpoint(out, lm, tokenizer, state, optimizer, scheduler, config, rank)

    # ---- save --------------------------------------------------------------------------------
    bar.close()
    path = _checkpoint(out, lm, tokenizer, state, optimizer, scheduler, config, rank)
    if distributed:
        dist.barrier()
    return {
        "step": state["step"],
        "tokens": state["tokens"],
        "checkpoint": str(path),
        "last": last,
        "notes": notes,
    }


def _checkpoint(
    out: Path,
    lm: Any,
    tokenizer: Any,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    rank: int,
) -> Path:
    rng = _gather(_rng_state())
    tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    path = out / "checkpoints" / f"step-{state['step']:08d}"
    if rank == 0:
        path = save_checkpoint(
            out, state["step"], lm, tokenizer, state, tensors, config.keep_checkpoints
        )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from).

    A line torn by a kill during its write is dropped too (its step is redone), and the file
    is replaced atomically, so a kill during this rewrite loses no line.
    """
    if not path.exists():
        return
    lines = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue  # torn: always the last line, of a step past the checkpoint
        if row["step"] <= step:
            lines.append(ln)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


_SCHEDULE_PARAMS = ("t_start", "t_end", "alpha", "beta")
# Options of the fused loss itself, accepted among --param besides the objective's own.
_LOSS_OPTIONS = ("tau_squared", "approximate_tail")


def make_schedule(config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The divergence's schedule (TAID without a fixed ``t``) or None, and the loss parameters.

    TAID's schedule settings (``t_start``, ``t_end``, ``alpha``, ``beta``) go to the schedule,
    which then drives the objective's ``t`` once per optimizer step.
    """
    params = dict(config.params)
    if config.divergence != "taid" or "t" in params:
        return None, params
    from logitstore.divergences import TAIDSchedule

    settings = {k: params.pop(k) for k in _SCHEDULE_PARAMS if k in params}
    return TAIDSchedule(total_steps=config.max_steps, **settings), params


if __name__ == "__main__":  # torchrun --nproc-per-node N -m pipelines.train CONFIG.yaml
    print(json.dumps(train(TrainConfig.from_yaml(sys.argv[1])), indent=1, default=str))
