"""Training checkpoints: written atomically, the newest complete one found, read back to resume.

A checkpoint ``out/checkpoints/step-NNNNNNNN`` is the run's resume state (``trainer_state.json``,
JSON), the model (``save_pretrained``: safetensors, loadable with ``from_pretrained``) and its
tokenizer, and the optimizer, scheduler and per-rank RNG states (``trainer.pt``: ``torch.save``
of our own tensors, read back with ``weights_only=True``). It is written to a temporary
directory and renamed into place, so a ``step-*`` directory holding ``trainer_state.json`` is
complete. On resume the metrics log is cut back to the checkpoint's step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from logitstore.dataset import StoreDataset
from logitstore.errors import ConfigError
from pipelines._distributed import gather, is_distributed


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


def write_checkpoint(
    out: Path,
    lm: Any,
    tokenizer: Any,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    rank: int,
) -> Path:
    """Called on every rank: gather the RNG states, let rank 0 save, wait for it; the path."""
    rng = gather(_rng_state())
    tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    path = out / "checkpoints" / f"step-{state['step']:08d}"
    if rank == 0:
        path = save_checkpoint(out, state["step"], lm, tokenizer, state, tensors, keep)
    if is_distributed():
        dist.barrier()
    return path


def load_checkpoint(
    path: Path,
    config: dict[str, Any],
    *,
    rank: int,
    world: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    dataset: StoreDataset,
    schedule: Any,
) -> dict[str, Any]:
    """Restore the optimizer, scheduler, this rank's RNG and loader, and the divergence's
    ``schedule`` (or None) from the checkpoint at ``path``.

    Returns:
        the checkpoint's resume state, with ``config`` (this run's) in place of its own.

    Raises:
        ConfigError: the checkpoint was written by another number of processes than ``world``.
    """
    state = json.loads((path / "trainer_state.json").read_text())
    state["config"] = config
    if state["world_size"] != world:
        raise ConfigError(
            f"checkpoint was written by {state['world_size']} processes; this run has {world}"
        )
    tensors = torch.load(path / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["rng"][rank]["cpu"])
    if "cuda" in tensors["rng"][rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng"][rank]["cuda"])
    dataset.load_state_dict(state["loader"][rank])
    if schedule is not None and state["schedule"] is not None:
        schedule.load_state_dict(state["schedule"])
    return state


def truncate_metrics(path: Path, step: int) -> None:
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


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state
