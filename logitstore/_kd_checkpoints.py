"""Checkpoints of ``logitstore.hf``: the completion file, finding the newest, rotation.

A checkpoint is ``Trainer``'s ``checkpoint-N`` folder plus ``logitstore_state.json``, written
last and atomically: a folder without it was cut short by a crash and is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from logitstore.errors import ConfigError

STATE_NAME = "logitstore_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one holding ``logitstore_state.json``), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return max(done)[1] if done else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rotate(root: Path, keep: int | None, best: str | Path | None = None) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop torn ones older than the newest.

    As ``Trainer`` does, the ``best`` checkpoint (``load_best_model_at_end``) is kept besides
    the newest even when it is older than the ``keep`` newest: it takes the place of the
    oldest of them, or adds one to a ``keep`` of 1.
    """
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)))
    complete = [p for _, p in found if (p / STATE_NAME).is_file()]
    if not complete:
        return
    newest = next(step for step, p in found if p == complete[-1])
    kept = set(complete)
    if keep:
        best_name = Path(best).name if best is not None else None
        protected = {p for p in complete if p == complete[-1] or p.name == best_name}
        others = [p for p in complete if p not in protected]
        room = max(keep - len(protected), 0)
        kept = protected | set(others[max(len(others) - room, 0) :])
    for step, path in found:
        torn = not (path / STATE_NAME).is_file()
        if (torn and step < newest) or (not torn and path not in kept):
            shutil.rmtree(path, ignore_errors=True)


def objective_record(loss: Any) -> dict[str, Any]:
    """What a bound ``DistillationLoss`` is, as a checkpoint records it (JSON types)."""
    return json.loads(json.dumps({
        "name": loss.name, "params": loss.params, "temperature": loss.temperature,
        "approximate_tail": loss.approximate_tail, "tau_squared": loss.tau_squared,
        "use_counts": loss.use_counts, "ce_weight": loss.ce_weight,
    }, default=str))  # fmt: skip


def check_objective(path: Path, saved: Any, mine: dict[str, Any]) -> None:
    """Refuse to continue checkpoint ``path`` under another objective: its schedule, optimizer
    state and curve belong to the one it was trained with. A checkpoint of an older version
    records the name and parameters only: those are compared.

    Raises:
        ConfigError: naming each field that differs, with both values.
    """
    if not isinstance(saved, dict):
        return
    differ = sorted(k for k in saved if k in mine and saved[k] != mine[k])
    if differ:
        found = ", ".join(f"{k} {saved[k]!r} there, {mine[k]!r} here" for k in differ)
        raise ConfigError(
            f"checkpoint {path.name} was trained with another objective: {found}; resume "
            "with the objective it was started with, or train into a new output_dir"
        )
