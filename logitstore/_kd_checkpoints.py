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


def rotate(root: Path, keep: int | None) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop torn ones older than the newest."""
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)))
    complete = [(s, p) for s, p in found if (p / STATE_NAME).is_file()]
    if not complete:
        return
    newest = complete[-1][0]
    kept = {p for _, p in complete[-keep:]} if keep else {p for _, p in complete}
    for step, path in found:
        torn = not (path / STATE_NAME).is_file()
        if (torn and step < newest) or (not torn and path not in kept):
            shutil.rmtree(path, ignore_errors=True)
