"""The run's metrics log across a resume.

Checkpoints themselves are Trainer's (``logitstore.hf``); the metrics log is ours: on resume
it is cut back to the checkpoint's step, so the steps redone after a crash are not logged twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from logitstore.errors import ConfigError


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a run resumes from).

    A line torn by a kill during its write is dropped too (its step is redone), and the file
    is replaced atomically, so a kill during this rewrite loses no line.

    Raises:
        ConfigError: a whole line is not a metrics row (another file of that name).
    """
    if not path.exists():
        return
    lines = []
    for number, ln in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue  # torn: always the last line, of a step past the checkpoint
        if not (isinstance(row, dict) and type(row.get("step")) is int):
            # Not a log this command wrote: some other file of that name, left as it is.
            raise ConfigError(
                f"{path} is not a training metrics log: line {number} is {ln[:80]!r}, expected "
                "a JSON object with an integer 'step'; move the file, or choose another --out"
            )
        if row["step"] <= step:
            lines.append(ln)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)
