"""``KDTrainer``'s arguments that would do nothing, refused in one line each.

KDTrainer replaces Trainer's label loss and its loader, and binds its loss settings into a
``DistillationLoss``: a setting of the replaced parts, or a loss setting given beside a ready
loss, would be dropped without a word.
"""

from __future__ import annotations

from typing import Any

from logitstore.errors import ConfigError

# Settings of Trainer's own loss and loader, which KDTrainer replaces: set, they would do nothing.
_UNUSED = {
    "label_smoothing_factor": (0, "smooths Trainer's label cross-entropy, which KDTrainer does not "
    "compute (its loss is the objective; ce_weight adds the labels' cross-entropy)"),
    "auto_find_batch_size": (False, "halves per_device_train_batch_size after an out-of-memory "
    "error; KDTrainer's micro-batches are tokens_per_batch padded tokens (lower that instead)"),
    "train_sampling_strategy": ("random", "picks Trainer's sampler of a map-style dataset; a store "
    "is read as whole documents in shuffled windows of shards (shuffle_window; a StoreDataset "
    "with shuffle=False reads in store order)"),
}  # fmt: skip


# KDTrainer's defaults of the settings it binds into a DistillationLoss.
_LOSS_DEFAULTS = {
    "divergence_params": None,
    "temperature": 1.0,
    "approximate_tail": False,
    "tau_squared": False,
    "use_counts": False,
    "ce_weight": 0.0,
    "chunk_size": None,
}


def refuse_unused_settings(args: Any) -> None:
    """Refuse a TrainingArguments setting of Trainer's own loss or loader (``_UNUSED``)."""
    for name, (default, why) in _UNUSED.items():
        value = getattr(args, name, default)
        if value != default:
            raise ConfigError(f"{name} {why}; expected {default}, found {value}")


def refuse_loss_settings(**given: Any) -> None:
    """Refuse loss settings (``_LOSS_DEFAULTS``' names) that differ from KDTrainer's defaults,
    given beside a ready ``DistillationLoss``, which holds its own."""
    unused = [k for k, v in given.items() if v != _LOSS_DEFAULTS[k]]
    if unused:
        raise ConfigError(
            "divergence is a ready DistillationLoss, which holds its own settings; expected "
            f"none of {', '.join(unused)} besides it, found "
            f"{', '.join(f'{k}={given[k]!r}' for k in unused)} (give them to "
            "DistillationLoss.create)"
        )
