"""Stage two: train a student from a logit store, on Hugging Face ``Trainer``.

``train(config)`` turns a :class:`TrainConfig` into ``TrainingArguments`` and a
:class:`logitstore.hf.KDTrainer`, so the CLI's runs and a user's own ``Trainer`` scripts share
one training loop: accelerate's DDP, FSDP (``fsdp``), DeepSpeed (``deepspeed``), PEFT LoRA
adapters (``lora_r``), gradient checkpointing, bf16/fp16 and ``report_to`` trackers. The loss
never materialises ``[batch, seq, vocab]`` logits (the fused loss runs in the student's
forward), and every per-token loss is divided by the trained tokens of the whole optimizer
step across micro-batches and ranks.

A run directory ``out/`` holds ``metrics.jsonl`` (one JSON row per logged step) and
``checkpoints/checkpoint-N``: Trainer's checkpoint (safetensors weights that
``from_pretrained`` loads, tokenizer, optimizer, scheduler and RNG states, ``trainer_state.json``)
plus ``logitstore_state.json`` (read positions, the objective's schedule), written last, so a
checkpoint cut short by a crash is never resumed from. A run directory holding a complete
checkpoint is continued only with ``resume``, and only with the settings that fix the objective
and the data order (``_train_checks.RESUME_SETTINGS``); a run already at ``max_steps`` trains no
further.

Run on several processes with ``torchrun --nproc-per-node N -m logitstore.pipelines.train CONFIG.yaml``
or ``torchrun ... $(which logitstore) train ...``; gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitstore._kd_eval import check_held_out
from logitstore.errors import ConfigError, OutputNotWritableError
from logitstore.format import tail_temperatures
from logitstore.pipelines._checkpoint import truncate_metrics
from logitstore.pipelines._distributed import end_processes
from logitstore.pipelines._progress import library_bars
from logitstore.pipelines._student import (
    check_vocabulary,
    init_from_teacher,
    is_config_file,
    load_student,
    load_tokenizer,
)
from logitstore.pipelines._train_callback import STOP_SIGNALS as STOP_SIGNALS
from logitstore.pipelines._train_callback import RunCallback
from logitstore.pipelines._train_checks import (
    check_config,
    check_lora_targets,
    check_resumable,
    check_same_student,
    saved_state,
)
from logitstore.pipelines._yaml import read_settings

# Settings that name a local file or directory (or a URL, which never starts with ``~``).
_PATHS = ("store", "student", "out", "tokenizer", "init_from", "deepspeed", "eval_store",
          "cache_dir")  # fmt: skip


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
    student_dtype: str = "auto"  # the student's own dtype; float32 for a config file
    max_steps: int = 100
    stop_after: int | None = None  # stop early (e.g. a time slot); the schedule keeps max_steps
    tokens_per_step: int = 16384  # padded; micro-batches per step: ceil(this / (ranks * batch))
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
    eval_store: str | None = None  # held-out store: objective and teacher metrics on it
    eval_every: int = 0  # evaluate every N steps; 0: at the end only
    keep_checkpoints: int = 2
    log_every: int = 1
    chunk_size: int | None = None
    resume: bool = False
    device: str | None = None
    precision: str = "fp32"  # fp32, bf16 or fp16 mixed precision
    fsdp: bool = False  # FSDP2 full shard of the student (under torchrun)
    deepspeed: str | dict[str, Any] | None = None  # DeepSpeed config (ZeRO-3): JSON file or dict
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (PEFT) instead of all weights
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # default: every linear layer but the head
    gradient_checkpointing: bool = False
    report_to: str = "none"  # a tracker Trainer knows (tensorboard, wandb, ...), or none
    storage_options: dict[str, Any] | None = None  # fsspec options of a remote store
    cache_dir: str | None = None  # keep verified shards of a remote store here (epochs, reruns)
    readahead: int = 2  # shards fetched in the background while training
    progress: bool = True

    def __post_init__(self) -> None:
        # The shell expands ``~`` on a command line, but not in a YAML file or a Python call;
        # left as it is, Trainer would expand ``out`` for the checkpoints while the metrics
        # went to a directory named ``~`` under the working directory.
        for name in _PATHS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML mapping of field names; ``overrides`` that are not None win."""
        data = read_settings(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown training settings {sorted(unknown)}; known: {sorted(known)}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(data.get("params"), dict) and isinstance(given.get("params"), dict):
            # --param gamma=0.3 changes one parameter of the file's objective, not all of them.
            given["params"] = {**data["params"], **given["params"]}
        data.update(given)
        for f in dataclasses.fields(cls):
            # YAML 1.1 reads 3e-4 (no dot) as a string: take it as the number it spells.
            if f.type == "float" and isinstance(data.get(f.name), str):
                with contextlib.suppress(ValueError):
                    data[f.name] = float(data[f.name])
        if isinstance(data.get("betas"), list):
            data["betas"] = tuple(data["betas"])
        return cls(**data)


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


def train(config: TrainConfig) -> dict[str, Any]:
    """Train ``config.student`` on ``config.store``; return a summary of the run."""
    with library_bars(config.progress):  # loading and saving weights: no bars either
        return _train(config)


def _train(config: TrainConfig) -> dict[str, Any]:
    """:func:`train`'s work."""
    from logitstore import open_store
    from logitstore.hf import latest_checkpoint as newest

    out = Path(config.out)
    check_writable(out)  # before any loading
    checkpoints = out / "checkpoints"  # Trainer's output_dir, made when it starts
    existed = checkpoints.exists()
    check_config(config)
    previous = newest(checkpoints)
    if previous is not None and not config.resume:
        raise ConfigError(
            f"the run directory {out} already holds a run ({previous.name}); pass --resume to "
            "continue it, or choose another --out"
        )
    args = training_arguments(config)
    _loss(config, None)  # unknown names and bad values fail before any loading
    store = open_store(
        config.store,
        storage_options=config.storage_options,
        readahead=config.readahead,
        cache_dir=config.cache_dir,
    )
    loss = _loss(config, tail_temperatures(store.manifest))
    held_out = None
    if config.eval_store:
        held_out = open_store(
            config.eval_store,
            storage_options=config.storage_options,
            readahead=config.readahead,
            cache_dir=config.cache_dir,
        )
        check_held_out(store.manifest, held_out.manifest, config.eval_store)
    same = held_out is not None and held_out.manifest == store.manifest
    if previous is not None:
        check_resumable(config, previous)
    notes = list(loss.notes)
    if same:
        notes.append(
            f"the evaluation store {config.eval_store} is the training store {config.store}: "
            "its metrics are of documents the student trains on, not held-out ones"
        )
    if config.resume and previous is None:  # a mistyped --out would start over without a word
        notes.append(f"resume: {checkpoints} holds no complete checkpoint; starting at step 0")
    lm, tokenizer = _load_student(config)
    notes += check_vocabulary(store.manifest, lm, tokenizer)
    if config.lora_r and config.lora_targets:
        check_lora_targets(lm, config.lora_targets)
    resume_from = newest(args.output_dir) if config.resume else None
    if resume_from is not None:
        check_same_student(lm, resume_from, config.student)
    rank0 = args.process_index == 0
    metrics_path = out / "metrics.jsonl"
    eval_path = out / "eval.jsonl"
    # Trainer would take one more step past the end (of the schedule, or of stop_after) on
    # every resume.
    end, setting = min(
        (config.max_steps, "max_steps"), (config.stop_after or math.inf, "stop_after")
    )
    if resume_from is not None and _step_of(resume_from) >= end:
        notes.append(
            f"the run already reached step {_step_of(resume_from)} of {setting} {end}: nothing "
            f"to train (raise --{setting.replace('_', '-')} to train further)"
        )
        if rank0:
            for note in notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
        return {
            "step": _step_of(resume_from),
            "tokens": saved_state(resume_from).get("tokens"),
            "checkpoint": str(resume_from),
            "last": _last_row(metrics_path) if rank0 else {},
            **({"eval": _last_row(eval_path)} if rank0 and held_out is not None else {}),
            "notes": notes,
        }
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, _step_of(resume_from))
        truncate_metrics(eval_path, _step_of(resume_from))
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    run = RunCallback(out, config.stop_after)
    try:
        trainer = _run(config, args, lm, tokenizer, (store, held_out), loss, run, resume_from)
    except BaseException:
        run.restore_signals()  # Trainer ends no training that raised
        # A run refused before its first step (a damaged store) leaves no empty run folder.
        if not existed and checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
        raise
    step = trainer.state.global_step
    if run.stopped_by:  # the job is ending: no evaluation, the checkpoint is what counts
        notes.append(
            f"stopped by {run.stopped_by} at step {step} of {config.max_steps}, with a "
            "checkpoint: run the same command with --resume to continue"
        )
        if rank0:
            print(f"note: {notes[-1]}", file=sys.stderr, flush=True)
    elif held_out is not None and not _evaluated_at(trainer.state, step):
        trainer.evaluate()  # the end of every run is evaluated (every rank takes part)
    trainer.accelerator.wait_for_everyone()
    if trainer.kd_tokens == 0:
        notes.append(
            "no trained token was read: every loss mask in the documents read is empty (chat "
            "data without assistant turns?), so the student learned nothing"
        )
        if rank0:
            print(f"note: {notes[-1]}", file=sys.stderr, flush=True)
    path = newest(args.output_dir)
    last = _last_row(metrics_path) if rank0 else {}
    return {
        "step": step,
        "tokens": trainer.kd_tokens,
        "checkpoint": str(path),
        "last": last,
        **({"eval": _last_row(eval_path)} if rank0 and held_out is not None else {}),
        "notes": notes,
    }


def _run(
    config: TrainConfig,
    args: Any,
    lm: Any,
    tokenizer: Any,
    stores: tuple[Any, Any],
    loss: Any,
    run: RunCallback,
    resume_from: Path | None,
) -> Any:
    """Build the ``KDTrainer`` of the run and train; the trainer when done."""
    from logitstore.hf import KDTrainer

    store, held_out = stores
    trainer = KDTrainer(
        model=lm,
        args=args,
        train_dataset=store,
        eval_dataset=held_out,
        divergence=loss,
        tokens_per_batch=config.tokens_per_batch,
        shuffle_window=config.shuffle_window,
        num_workers=config.num_workers,
        peft_config=_lora(config),
        processing_class=tokenizer,
        callbacks=[run],
        run_info={"config": dataclasses.asdict(config)},
    )
    if not config.progress:  # metrics go to metrics.jsonl; stdout keeps the summary alone
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of the run directory ``out``, or None."""
    from logitstore.hf import latest_checkpoint as newest

    return newest(Path(out) / "checkpoints")


# ---- the steps of train(), in the order it takes them ---------------------------------------


def _loss(config: TrainConfig, capture_temperatures: list[float] | None) -> Any:
    """The run's objective, bound once; without the store's capture temperatures (``None``)
    only names and values are checked."""
    from logitstore.divergences import DistillationLoss

    return DistillationLoss.create(
        config.divergence,
        config.params,
        temperature=config.temperature,
        capture_temperatures=capture_temperatures,
        approximate_tail=config.approximate_tail or capture_temperatures is None,
        use_counts=config.use_counts,
        ce_weight=config.ce_weight,
        chunk_size=config.chunk_size,
        total_steps=config.max_steps,
    )


def training_arguments(config: TrainConfig) -> Any:
    """The ``TrainingArguments`` of a run: every setting of ``config`` that Trainer owns."""
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = max(1, math.ceil(config.tokens_per_step / (world * config.tokens_per_batch)))
    device = (config.device or "").split(":")[0]
    extra: dict[str, Any] = {}
    if config.fsdp:
        extra["fsdp"] = "full_shard"
        extra["fsdp_config"] = {"version": 2}
    if config.deepspeed:
        extra["deepspeed"] = config.deepspeed
    if config.eval_store:
        extra["eval_strategy"] = "steps"
        extra["eval_steps"] = config.eval_every or config.max_steps
    return TrainingArguments(
        output_dir=str(Path(config.out) / "checkpoints"),
        max_steps=config.max_steps,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio},
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.betas[0],
        adam_beta2=config.betas[1],
        max_grad_norm=config.grad_clip,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.log_every,
        save_strategy="steps",
        save_steps=config.save_every or config.max_steps,
        save_total_limit=config.keep_checkpoints or None,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing,
        report_to=config.report_to,
        disable_tqdm=not config.progress,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        **extra,
    )


def _load_student(config: TrainConfig) -> tuple[Any, Any]:
    """The student, seeded (built and possibly initialised from the teacher), and its
    tokenizer (None when there is none to load)."""
    import torch

    torch.manual_seed(config.seed)
    lm = load_student(config.student, seed=config.seed, dtype=config.student_dtype)
    if config.init_from:
        init_from_teacher(lm, config.init_from, config.keep_layers or [])
    # A config-file student has no tokenizer; one initialised from a teacher shares its own.
    from_teacher = config.init_from if is_config_file(config.student) else None
    return lm, load_tokenizer(config.tokenizer or from_teacher or config.student)


def _lora(config: TrainConfig) -> Any:
    if not config.lora_r:
        return None
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ConfigError("LoRA needs the peft package: pip install 'logitstore[peft]'") from exc
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets or "all-linear",
        task_type="CAUSAL_LM",
    )


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0


def _evaluated_at(state: Any, step: int) -> bool:
    return any(h.get("step") == step and "eval_loss" in h for h in state.log_history)


def _last_row(path: Path) -> dict[str, Any]:
    rows = path.read_text().splitlines() if path.exists() else []
    return json.loads(rows[-1]) if rows else {}


def train_and_print(config: TrainConfig) -> None:
    """Train, then print the run's JSON summary on stdout, alone and once (rank 0 of a
    ``torchrun`` group), so that ``> summary.json`` is JSON: what libraries print while
    training (DeepSpeed's accelerator notice, Trainer's log lines) goes to stderr."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = train(config)
    finally:
        end_processes()  # the group Trainer set up under torchrun, as Trainer.end() does
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":  # torchrun --nproc-per-node N -m logitstore.pipelines.train CONFIG.yaml
    train_and_print(TrainConfig.from_yaml(sys.argv[1]))
