"""The training run's settings checked before anything loads, and a checkpoint's settings
checked before it is resumed.

torch, Trainer and PEFT refuse most bad values only once the student is loaded, with a
traceback; here each is named in one line. A resumed run must keep the settings that define the
objective and the data order, whose state (the loss schedule, the read positions) its checkpoint
holds.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitstore.errors import ConfigError
from logitstore.pipelines._distributed import parse_device

if TYPE_CHECKING:
    from logitstore.pipelines.train import TrainConfig

PRECISIONS = ("fp32", "bf16", "fp16")
FLAGS = ("approximate_tail", "use_counts", "resume", "fsdp", "gradient_checkpointing", "progress")


# Settings a resumed run must share with its checkpoint: they define the objective and the order
# of the data, whose state (the loss schedule, the read positions) the checkpoint holds.
RESUME_SETTINGS = ("divergence", "params", "temperature", "approximate_tail", "use_counts",
                   "ce_weight", "tokens_per_step", "tokens_per_batch", "seed", "shuffle_window",
                   "lora_r", "lora_alpha", "lora_targets")  # fmt: skip


def saved_state(checkpoint: Path) -> dict[str, Any]:
    from logitstore.hf import STATE_NAME

    try:
        state = json.loads((checkpoint / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def check_resumable(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` with other objective or data-order settings.

    Raises:
        ConfigError: naming the first setting that differs, its value in the checkpoint and in
            this run.
    """
    run = saved_state(checkpoint).get("run")
    saved = run.get("config") if isinstance(run, dict) else None
    if not isinstance(saved, dict):
        return  # a checkpoint written before the settings were saved in it
    for name in RESUME_SETTINGS:
        if name not in saved:
            continue
        ours = json.loads(json.dumps(getattr(config, name), default=str))
        if saved[name] != ours:
            raise ConfigError(
                f"cannot resume {checkpoint} with different settings: {name} is "
                f"{saved[name]!r} in the checkpoint but {ours!r} in this run; use the run's "
                "settings, or start a new run with another --out"
            )


def check_same_student(lm: Any, checkpoint: Path, student: str) -> None:
    """Refuse to resume ``checkpoint`` with a student whose weights have other names or shapes
    (Trainer's load would fail after loading, with a traceback of every mismatch).

    Only a checkpoint of whole weights (``model*.safetensors``) is compared; LoRA adapters and
    sharded optimiser states are left to Trainer.

    Raises:
        ConfigError: naming the first weight that differs, in the checkpoint and in ``student``.
    """
    from safetensors import safe_open

    saved: dict[str, tuple[int, ...] | None] = {}
    for path in sorted(checkpoint.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            saved.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    if not saved:
        return
    state = lm.state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items()}
    # A weight tied to a saved one (the head to the embeddings) is not saved itself.
    tied = {state[k].data_ptr() for k in saved if k in state}
    extra = {k: None for k, v in state.items() if k not in saved and v.data_ptr() not in tied}
    for name, shape in [*saved.items(), *extra.items()]:
        if ours.get(name) != shape:
            there = "absent" if shape is None else str(shape)
            here = "absent" if name not in ours else str(ours[name])
            raise ConfigError(
                f"cannot resume {checkpoint} with another student: weight {name} is {there} in "
                f"the checkpoint but {here} in {student}; resume with the run's student, or "
                "start a new run with another --out"
            )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_optimizer(config: TrainConfig) -> None:
    """The optimizer's and the schedule's settings, before anything loads (torch and Trainer
    would refuse them only after the student is loaded, with a traceback)."""
    if not (_number(config.lr) and config.lr > 0):
        raise ConfigError(f"lr must be a positive finite number; found {config.lr!r}")
    for name, low, high in (("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, math.inf),
                            ("grad_clip", 0.0, math.inf), ("lora_dropout", 0.0, 1.0)):  # fmt: skip
        value = getattr(config, name)
        if not (_number(value) and low <= value <= high):
            bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ConfigError(f"{name} must be a number {bounds}; found {value!r}")
    betas = config.betas
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"betas must be two numbers in [0, 1), e.g. 0.9,0.95; found {betas!r}")
    for name, low in (("warmup_steps", 0), ("save_every", 0), ("keep_checkpoints", 0),
                      ("log_every", 1), ("num_workers", 0), ("lora_alpha", 1),
                      ("eval_every", 0)):  # fmt: skip
        value = getattr(config, name)
        if not (_integer(value) and value >= low):
            raise ConfigError(f"{name} must be an integer >= {low}; found {value!r}")
    if config.stop_after is not None and not (
        _integer(config.stop_after) and config.stop_after >= 1
    ):
        raise ConfigError(f"stop_after must be an integer >= 1; found {config.stop_after!r}")


def _check_environment(config: TrainConfig) -> None:
    """The device, the student's dtype and the trackers name things that exist."""
    import torch

    if config.device is not None:
        device = parse_device(config.device)
        if device.type == "cuda" and device.index:
            # Trainer places a process on the first GPU it sees (under torchrun, its local
            # rank's): an index here would be ignored, not obeyed.
            raise ConfigError(
                f"device {config.device}: training runs on the first visible GPU; choose it "
                f"with CUDA_VISIBLE_DEVICES={device.index} and --device cuda (or launch "
                "torchrun for several)"
            )
    dtype = getattr(torch, str(config.student_dtype), None)
    if config.student_dtype != "auto" and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        raise ConfigError(
            "student_dtype must be 'auto' or a floating-point torch dtype such as float32 or "
            f"bfloat16; found {config.student_dtype!r}"
        )
    try:  # the trackers this transformers knows (a private table: where it moved, Trainer checks)
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )
    except ImportError:
        return
    names = [n.strip() for n in str(config.report_to).split(",") if n.strip()]
    unknown = [n for n in names if n not in {"none", "all", *INTEGRATION_TO_CALLBACK}]
    if unknown:
        raise ConfigError(
            f"report_to names unknown trackers {unknown}; known: none, all, "
            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
        )
    # A known tracker whose package is not installed: Trainer raises only once it is built.
    available = set(get_available_reporting_integrations())
    absent = [n for n in names if n not in {"none", "all", *available}]
    if absent:
        raise ConfigError(
            f"report_to {absent[0]} needs its package, which is not installed (pip install "
            f"{absent[0]}); trackers installed here: {', '.join(sorted(available)) or 'none'}"
        )


def check_config(config: TrainConfig) -> None:
    """Every setting of ``config`` that can be checked without loading anything.

    Raises:
        ConfigError: naming the first bad setting, its value and what it may be.
    """
    _check_optimizer(config)
    _check_environment(config)
    for name in FLAGS:
        # YAML reads a quoted "false" as a string, which Python takes as true.
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false; found {getattr(config, name)!r}")
    if config.precision not in PRECISIONS:
        raise ConfigError(
            f"precision must be one of {', '.join(PRECISIONS)}; found {config.precision!r}"
        )
    if not isinstance(config.params, dict):
        raise ConfigError(
            f"params must be a mapping of the objective's parameters; found {config.params!r}"
        )
    for name in ("temperature", "ce_weight"):
        if not _number(getattr(config, name)):
            raise ConfigError(f"{name} must be a number; found {getattr(config, name)!r}")
    counts = (config.max_steps, config.tokens_per_step, config.tokens_per_batch)
    if not all(_integer(n) for n in counts) or min(counts) < 1:
        raise ConfigError(
            "max_steps, tokens_per_step and tokens_per_batch must be positive integers; found "
            f"{config.max_steps}, {config.tokens_per_step}, {config.tokens_per_batch}"
        )
    if config.fsdp and config.deepspeed:
        raise ConfigError("choose one of fsdp and deepspeed, not both")
    if config.fsdp and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            "fsdp shards the student over the processes of a distributed run; launch with "
            "torchrun --nproc-per-node N $(which logitstore) train ..."
        )
    if isinstance(config.deepspeed, str) and config.deepspeed:
        try:
            ds = json.loads(Path(config.deepspeed).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"deepspeed config {config.deepspeed} is not a readable JSON file: {exc}"
            ) from None
        if not isinstance(ds, dict):
            raise ConfigError(
                f"deepspeed config {config.deepspeed} must be a JSON object, found "
                f"{type(ds).__name__}"
            )
    elif config.deepspeed is not None and not isinstance(config.deepspeed, dict):
        raise ConfigError(
            "deepspeed must be the path of a DeepSpeed JSON config or a mapping of its settings; "
            f"found {config.deepspeed!r}"
        )
    if not (_integer(config.lora_r) and config.lora_r >= 0):
        raise ConfigError(f"lora_r must be an integer >= 0; found {config.lora_r!r}")
    _check_lists(config)
    if config.eval_every and not config.eval_store:
        raise ConfigError("eval_every sets how often the eval_store is read; give eval_store too")
    if config.eval_store is not None and not (
        isinstance(config.eval_store, str) and config.eval_store
    ):
        raise ConfigError(f"eval_store must be a store URL; found {config.eval_store!r}")


def _check_lists(config: TrainConfig) -> None:
    """``keep_layers`` and ``lora_targets`` are lists (a YAML string would be read character
    by character), and ``keep_layers`` comes with the teacher it picks layers of."""
    layers, targets = config.keep_layers, config.lora_targets
    if layers is not None and not (
        isinstance(layers, (list, tuple)) and all(_integer(j) for j in layers)
    ):
        raise ConfigError(f"keep_layers must be a list of teacher layer indices, e.g. [0, 2, 4]; "
                          f"found {layers!r}")  # fmt: skip
    if layers and not config.init_from:
        raise ConfigError(
            f"keep_layers {list(layers)} picks the layers init_from copies, but no init_from "
            "(the teacher) is given: give --init-from too, or drop --keep-layers"
        )
    if targets is not None and not (
        isinstance(targets, (list, tuple)) and all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(
            f"lora_targets must be a list of module names, e.g. [q_proj, v_proj]; found {targets!r}"
        )


def check_lora_targets(lm: Any, targets: list[str]) -> None:
    """Refuse LoRA target names that match no module of the student (PEFT's check comes only
    once Trainer is built, as a traceback)."""
    import torch

    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in lm.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    full = [name for name, _ in lm.named_modules()]
    # PEFT matches a listed name against a module's full name or its dotted suffix.
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in full)]
    if missing:
        raise ConfigError(
            f"lora_targets {missing} name no module of the student; its linear layers are "
            f"{', '.join(linear)}"
        )
