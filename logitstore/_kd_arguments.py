"""``KDTrainer``'s arguments checked: settings that would do nothing, and the student.

Settings that would do nothing are refused in one line each; the student must be one the store
can train (its head, its tokenizer, no tensor parallelism).

KDTrainer replaces Trainer's label loss and its loader, and binds its loss settings into a
``DistillationLoss``: a setting of the replaced parts, or a loss setting given beside a ready
loss, would be dropped without a word.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from logitstore._tokenizer import check_tokenizer
from logitstore.errors import ConfigError, TokenizerMismatchError

# Settings of Trainer's own loss and loader, which KDTrainer replaces: set, they would do nothing.
_UNUSED = {
    "label_smoothing_factor": (0, "smooths Trainer's label cross-entropy, which KDTrainer does not "
    "compute (its loss is the objective; ce_weight adds the labels' cross-entropy)"),
    "auto_find_batch_size": (False, "halves per_device_train_batch_size after an out-of-memory "
    "error; KDTrainer's micro-batches are tokens_per_batch padded tokens (lower that instead)"),
    "per_device_train_batch_size": (8, "is rows per micro-batch of Trainer's loader; KDTrainer's "
    "micro-batches are tokens_per_batch padded tokens of whole documents (set that instead, and "
    "a DeepSpeed config's train_micro_batch_size_per_gpu as \"auto\")"),
    "per_device_eval_batch_size": (8, "is rows per batch of Trainer's evaluation loader; "
    "KDTrainer's evaluation reads tokens_per_batch padded tokens a batch, as training does"),
    "train_sampling_strategy": ("random", "picks Trainer's sampler of a map-style dataset; a store "
    "is read as whole documents in shuffled windows of shards (shuffle_window; a StoreDataset "
    "with shuffle=False reads in store order)"),
}  # fmt: skip


# Trainer's arguments for its own loss, predictions and models, which KDTrainer does not call.
_UNUSED_ARGUMENTS = {
    "compute_loss_func": "replaces Trainer's label loss; KDTrainer's loss is its divergence "
    "(pass divergence=, or a ready DistillationLoss)",
    "compute_metrics": "is called on gathered predictions and labels; KDTrainer.evaluate gathers "
    "none (a store holds the teacher's side) and reports the objective and the teacher metrics",
    "preprocess_logits_for_metrics": "prepares gathered logits for compute_metrics; "
    "KDTrainer.evaluate gathers none (it never makes [batch, seq, vocab] logits)",
    "model_init": "makes a fresh student at train(), which KDTrainer has not checked or given "
    "its distillation forward; pass the student as model",
}


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
    """Refuse a TrainingArguments setting of Trainer's own loss or loader (``_UNUSED``), and a
    ``parallelism_config`` that splits each batch over ranks."""
    for name, (default, why) in _UNUSED.items():
        value = getattr(args, name, default)
        if value != default:
            raise ConfigError(f"{name} {why}; expected {default}, found {value}")
    plan = getattr(args, "parallelism_config", None)
    split = {k: int(getattr(plan, f"{k}_size", 1) or 1) for k in ("tp", "cp", "sp")}
    if any(size > 1 for size in split.values()):
        # The ranks of such a group must read one batch and split its sequences or weights;
        # KDTrainer's loader gives every process its own documents, and the fused loss takes
        # a rank's whole sequences with the teacher's side of all their positions.
        raise ConfigError(
            "parallelism_config splits each batch over ranks (tensor, context or sequence "
            "parallelism), which KDTrainer does not train: its loader gives every process its "
            "own documents; expected tp_size, cp_size and sp_size 1, found "
            f"{', '.join(f'{k}_size={v}' for k, v in split.items())} (shard the student with "
            "dp_shard_size, FSDP, or DeepSpeed ZeRO-3)"
        )


def refuse_unused_arguments(given: Mapping[str, Any]) -> None:
    """Refuse a ``Trainer`` argument in ``given`` that KDTrainer never calls
    (``_UNUSED_ARGUMENTS``): given, it would be dropped without a word."""
    for name, why in _UNUSED_ARGUMENTS.items():
        if given.get(name) is not None:
            raise ConfigError(f"{name} {why}; expected None, found {given[name]!r}")


def check_kd_arguments(
    divergence_params: Any, peft_config: Any, run_info: Any, storage_options: Any
) -> None:
    """Refuse KDTrainer's own arguments of the wrong kind in one line each (each was a
    traceback from deep inside: ``dict("gamma=0.5")``, peft's ``str.base_model_name_or_path``)."""
    for name, value in (("divergence_params", divergence_params), ("run_info", run_info),
                        ("storage_options", storage_options)):  # fmt: skip
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(
                f"{name} must be a dict (name -> value); found {type(value).__name__} {value!r}"
            )
    if peft_config is not None and not hasattr(peft_config, "peft_type"):
        raise ConfigError(
            "peft_config must be a peft config such as peft.LoraConfig(...); found "
            f"{type(peft_config).__name__} {peft_config!r}"
        )


def liger_kernel_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``liger_kernel_config`` with Liger's fused cross-entropy forward off, for
    ``use_liger_kernel``: Liger replaces the causal LM's forward with one of the labels'
    cross-entropy, on by default, which would drop the distillation forward (Trainer then found
    no loss: KeyError 'loss'). Its other kernels (RMSNorm, RoPE, SwiGLU) run in the body.

    Raises:
        ConfigError: ``fused_linear_cross_entropy`` asked for.
    """
    config = dict(config or {})
    if config.get("fused_linear_cross_entropy", False):
        raise ConfigError(
            "liger_kernel_config's fused_linear_cross_entropy replaces the student's forward "
            "with Liger's label cross-entropy, dropping the distillation loss (already fused: "
            "no [batch, seq, vocab] logits); expected it unset or False, found "
            f"{config['fused_linear_cross_entropy']!r} (Liger's other kernels still apply)"
        )
    config["fused_linear_cross_entropy"] = False
    return config


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


def check_student(lm: Any, manifest: Mapping[str, Any], tokenizer: Any = None) -> None:
    """Refuse a student the store cannot train; warn of what differs but trains.

    Args:
        lm: the student's causal LM (the base of a PEFT model).
        manifest: the store's manifest (``vocab_size`` and the teacher's ``tokenizer``).
        tokenizer: the ``processing_class`` given to the trainer, if any.

    Raises:
        ConfigError: a student split by tensor parallelism.
        TokenizerMismatchError: a head with fewer rows than the teacher's vocabulary, or a
            tokenizer whose ids mean other text than the teacher's.
    """
    if int(getattr(lm, "_tp_size", None) or 1) > 1:
        # Ranks of a tensor-parallel group must read the same batches and count their tokens
        # once; KDTrainer's loader gives every rank its own share. The fused forward does take
        # a tensor-parallel head, for loops of one's own (see patch_for_distillation).
        raise ConfigError(
            "KDTrainer does not train a student loaded with tensor parallelism (tp_plan): "
            "its loader gives every process its own documents; shard the student with FSDP "
            "(fsdp in TrainingArguments) or DeepSpeed ZeRO-3 instead"
        )
    vocab = int(manifest["vocab_size"])
    head = lm.get_output_embeddings().weight
    rows = int(getattr(head, "ds_shape", head.shape)[0])  # ZeRO-3 partitions at load
    if rows < vocab:  # a head padded past the vocabulary trains on its first rows
        raise TokenizerMismatchError(
            f"the store's teacher has vocabulary size {vocab}; the student's head has "
            f"{rows} rows: expected at least {vocab}"
        )
    if hasattr(tokenizer, "get_added_vocab") and manifest.get("tokenizer"):
        # The teacher pass fingerprinted its tokenizer in the manifest: two vocabularies of
        # one size are not one tokenizer.
        for note in check_tokenizer(manifest, tokenizer):
            warnings.warn(note, stacklevel=3)
