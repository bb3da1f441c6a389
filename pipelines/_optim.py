"""The optimizer and what moves with its steps: the learning rate and the divergence's schedule.

AdamW with a linear warm-up and cosine decay of the learning rate, and TAID's interpolation
``t`` (the one divergence with a schedule), each built from a ``TrainConfig``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipelines.train import TrainConfig

_SCHEDULE_PARAMS = ("t_start", "t_end", "alpha", "beta")


def make_optimizer(config: TrainConfig, lm: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on vectors: norms, biases) and the ``lr_factor`` schedule."""
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
    return optimizer, scheduler


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


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
