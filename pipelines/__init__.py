"""The two stages: the teacher pass (stage one) and student training (stage two).

The public names are imported on first use, so ``python -m logitstore.pipelines.teacher_pass`` (the
``torchrun`` entry point) does not import its own module twice. The functions named like their
module, ``train`` and ``evaluate``, are imported from the module itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "TeacherPassConfig": "logitstore.pipelines.teacher_pass",
    "run_teacher_pass": "logitstore.pipelines.teacher_pass",
    "TrainConfig": "logitstore.pipelines.train",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
