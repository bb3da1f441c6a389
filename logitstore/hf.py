"""Distil inside Hugging Face ``Trainer``: :class:`KDTrainer`, its loader and the fused forward.

``KDTrainer`` is a ``transformers.Trainer`` whose training data is a logit store, so everything
a user already runs with ``Trainer`` and accelerate works unchanged: DDP, FSDP, DeepSpeed,
PEFT adapters, gradient checkpointing, bf16/fp16, ``report_to`` trackers, checkpoints and
``resume_from_checkpoint``::

    from transformers import AutoModelForCausalLM, TrainingArguments
    from logitstore.hf import KDTrainer

    student = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    args = TrainingArguments("run/", max_steps=1000, learning_rate=3e-4, bf16=True)
    KDTrainer(model=student, args=args, train_dataset="store/", divergence="drkl",
              divergence_params={"gamma": 0.5}).train()

How it fits the engine:

- **Data.** Batches are whole documents grouped by a token budget (``tokens_per_batch``), not
  ``per_device_train_batch_size`` rows. Each rank reads its own shards of the store
  (``StoreDataset``), so the loader is not handed to accelerate to be sharded again, and every
  document is trained exactly once per epoch across ranks. The loader runs epoch after epoch
  (``max_steps`` sets the run's length; a store has no cheap length in batches).
- **Normalisation.** Every per-token loss is divided by the trained tokens of the whole
  optimizer step, summed over its ``gradient_accumulation_steps`` micro-batches and over ranks,
  and multiplied by the number of processes, which DDP, FSDP and DeepSpeed divide by when they
  average gradients: the gradient equals a single-process run over the same tokens.
- **The loss runs in the model's own forward.** The causal LM's ``forward`` is replaced (as
  fused-loss libraries do) by one that runs the body, then the fused loss on the final hidden
  states and the head weight, without ``[batch, seq, vocab]`` logits. The loss runs as the
  head module's own forward, so FSDP and DeepSpeed ZeRO-3 gather a sharded head for it, and
  reduce its gradient, in their own hooks.
- **Checkpoints.** Trainer's own checkpoint, plus ``logitstore_state.json`` (every rank's
  read position, the objective's schedule, trained tokens), written last: a checkpoint
  directory without it was cut short and is never resumed from. ``save_total_limit`` counts
  complete checkpoints only. Resuming restores the read position, so the data order continues
  as if uninterrupted (``ignore_data_skip`` is set: nothing is re-read to skip it).
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from logitstore._kd_arguments import (
    check_kd_arguments,
    check_student,
    liger_kernel_config,
    refuse_loss_settings,
    refuse_unused_arguments,
    refuse_unused_settings,
)
from logitstore._kd_checkpointing import KDCheckpointing
from logitstore._kd_checkpoints import STATE_NAME, latest_checkpoint
from logitstore._kd_data import KDCollator, StoreBatches
from logitstore._kd_eval import eval_datasets, evaluate_store
from logitstore._kd_forward import (
    KDOutput,
    TeacherBatch,
    causal_lm,
    patch_for_distillation,
)
from logitstore.dataset import StoreDataset
from logitstore.divergences import DistillationLoss, MetricTotals
from logitstore.errors import ConfigError
from logitstore.format import tail_temperatures

__all__ = [
    "KDCollator",
    "KDOutput",
    "KDTrainer",
    "STATE_NAME",
    "StoreBatches",
    "TeacherBatch",
    "latest_checkpoint",
    "patch_for_distillation",
]

TEACHER_FIELDS = (
    "labels",
    "support_ids",
    "support_logprobs",
    "tail_logmass",
    "label_logprob",
    "tail_logsumexp",
    "entropy",
    "support_counts",
)


# ---- the trainer -----------------------------------------------------------------------------


class _StepEnd(TrainerCallback):
    """After each optimizer step: advance the objective's schedule (every rank), and after the
    step that ends a pass over the store on every rank, log, evaluate and save as the "epoch"
    strategies ask (Trainer's own epoch is the whole run: the loader is endless)."""

    def __init__(self, trainer: KDTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._end_step()
        # At the last step Trainer's own epoch ends and acts: acting here too did it twice.
        if self.trainer._epoch_ended and state.global_step < state.max_steps:
            control.should_log |= args.logging_strategy == "epoch"
            control.should_evaluate |= args.eval_strategy == "epoch"
            control.should_save |= args.save_strategy == "epoch"


class KDTrainer(KDCheckpointing):
    """A ``transformers.Trainer`` that distils from a logit store.

    Args:
        model: the student, a ``transformers`` causal LM (or a PEFT model of one) whose head
            has at least the store's vocabulary size (more rows: a padded embedding matrix).
        args: the user's ``TrainingArguments``; ``max_steps`` must be set (> 0).
        train_dataset: a store URL, an opened store (``logitstore.open_store``), a
            :class:`StoreDataset` (its ``rank`` and ``world_size`` must be the run's), or a
            :class:`StoreBatches` (any endless source of collated batches with the same
            interface).
        divergence: objective name (``DIVERGENCES``), or a ready :class:`DistillationLoss`.
        divergence_params: the objective's parameters (and its schedule's settings).
        temperature, approximate_tail, tau_squared, use_counts, ce_weight, chunk_size: see
            :meth:`DistillationLoss.create`.
        tokens_per_batch: padded tokens per micro-batch (whole documents).
        shuffle_window: shards whose documents are shuffled together, in an order drawn from
            ``data_seed`` of ``args`` (else its ``seed``), as Trainer draws its samplers'.
        num_workers: DataLoader worker processes decoding the store; default the
            ``dataloader_num_workers`` of ``args``.
        peft_config: a ``peft`` config; the student is wrapped with ``get_peft_model``, its
            adapters initialised from ``args.seed``.
        storage_options: fsspec options when ``train_dataset`` is a remote URL.
        run_info: JSON-able facts saved in every checkpoint's ``logitstore_state.json``.
        **kwargs: passed to ``Trainer`` (``processing_class``, ``callbacks``, ...). A tokenizer
            as ``processing_class`` must be the teacher's (the store's fingerprint of it).
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        train_dataset: Any = None,
        *,
        divergence: str | DistillationLoss = "fkl",
        divergence_params: dict[str, Any] | None = None,
        temperature: float = 1.0,
        approximate_tail: bool = False,
        tau_squared: bool = False,
        use_counts: bool = False,
        ce_weight: float = 0.0,
        chunk_size: int | None = None,
        tokens_per_batch: int = 8192,
        shuffle_window: int = 4,
        num_workers: int | None = None,
        peft_config: Any = None,
        storage_options: dict[str, Any] | None = None,
        run_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import TrainingArguments

        if not isinstance(args, TrainingArguments):
            raise ConfigError(
                f"KDTrainer needs TrainingArguments with max_steps > 0; found {type(args).__name__}"
            )
        if args.max_steps <= 0:
            raise ConfigError(
                "KDTrainer needs TrainingArguments with max_steps > 0: a store's length in "
                f"batches is not known before reading it; found max_steps={args.max_steps}"
            )
        refuse_unused_settings(args)
        refuse_unused_arguments(kwargs)
        check_kd_arguments(divergence_params, peft_config, run_info, storage_options)
        # The settings changed below are this trainer's: the caller's arguments stay as given.
        args = copy.copy(args)
        if args.use_liger_kernel:  # Liger's kernels in the body; the loss stays this trainer's
            args.liger_kernel_config = liger_kernel_config(args.liger_kernel_config)
        # Chosen here or in a ready StoreBatches; else a resume reads with the checkpoint's.
        self._workers_chosen = num_workers is not None or isinstance(train_dataset, StoreBatches)
        if num_workers is None:
            num_workers = args.dataloader_num_workers
        if isinstance(train_dataset, StoreBatches):
            batches = train_dataset
        else:
            dataset = self._dataset(
                train_dataset, args, tokens_per_batch, shuffle_window, storage_options
            )
            batches = StoreBatches(dataset, num_workers)
        dataset = batches.dataset
        manifest = dataset.store.manifest
        if isinstance(divergence, DistillationLoss):
            refuse_loss_settings(
                divergence_params=divergence_params,
                temperature=temperature,
                approximate_tail=approximate_tail,
                tau_squared=tau_squared,
                use_counts=use_counts,
                ce_weight=ce_weight,
                chunk_size=chunk_size,
            )
            loss = divergence
        else:
            loss = DistillationLoss.create(
                divergence,
                divergence_params,
                temperature=temperature,
                capture_temperatures=tail_temperatures(manifest),
                approximate_tail=approximate_tail,
                tau_squared=tau_squared,
                use_counts=use_counts,
                ce_weight=ce_weight,
                chunk_size=chunk_size,
                total_steps=args.max_steps,
            )
        if loss.use_counts and not dataset.store.codec.has_counts:
            raise ConfigError(
                "use_counts (RS-KD) needs a store of draw counts, a sampled one; this store's "
                f"codec is {dataset.store.codec.name}"
            )
        if peft_config is not None:
            from peft import get_peft_model
            from transformers import set_seed

            # The adapters are initialised at random here, before Trainer seeds itself: from
            # args.seed, so that they do not depend on what the process drew before.
            set_seed(int(args.seed))
            model = get_peft_model(model, peft_config)
        vocab = int(manifest["vocab_size"])
        check_student(causal_lm(model), manifest, kwargs.get("processing_class"))
        patch_for_distillation(model, loss, vocab)
        self._eval_settings = (tokens_per_batch, manifest, storage_options, loss.use_counts)
        if kwargs.get("eval_dataset") is not None:
            kwargs["eval_dataset"] = eval_datasets(
                kwargs["eval_dataset"], args, *self._eval_settings
            )
        # Checkpoints are rotated here, counting complete ones only (see the module docstring),
        # and the read position is restored from them rather than by re-reading batches.
        self._keep = args.save_total_limit
        self._state_saved: Path | None = None  # the checkpoint whose state file is written
        args.save_total_limit = None
        args.ignore_data_skip = True
        kwargs.setdefault("data_collator", KDCollator())
        super().__init__(model=model, args=args, train_dataset=dataset, **kwargs)
        if args.fsdp and self.accelerator.distributed_type == "MULTI_CPU":
            raise ConfigError(
                "FSDP through Trainer needs accelerators: accelerate runs CPU processes with "
                "DDP; drop --fsdp on CPU (or apply torch's fully_shard yourself)"
            )
        if self.args.n_gpu > 1:
            # One process that sees several GPUs: Trainer would wrap the student in
            # nn.DataParallel, whose replicas split the token ids but are each handed the whole
            # teacher batch. One GPU per process; torchrun gives each GPU its own (DDP).
            warnings.warn(
                f"this process sees {self.args.n_gpu} GPUs and trains on the first; launch with "
                f"torchrun --nproc-per-node {self.args.n_gpu} to train on all of them (DDP), or "
                "choose one with CUDA_VISIBLE_DEVICES",
                stacklevel=2,
            )
            self.args._n_gpu = 1
        self.loss_is_scaled_for_ga = True
        self.kd_loss = loss
        self.kd_dataset = dataset
        self.kd_batches = batches
        self.run_info = dict(run_info or {})
        self.kd_tokens = 0
        self._resume: dict[str, Any] | None = None
        self._tokens_since_log = 0.0
        self._metrics = MetricTotals(self.args.device)
        self._step_loss: Any = 0.0
        self._step_tokens = 0.0
        self._epochs_done = int(dataset.epoch)  # passes over the store every rank completed
        self._epoch_ended = False
        self._log_clock = time.perf_counter()
        self.add_callback(_StepEnd(self))

    @staticmethod
    def _dataset(
        source: Any,
        args: Any,
        tokens_per_batch: int,
        shuffle_window: int,
        storage_options: dict[str, Any] | None,
    ) -> StoreDataset:
        if source is None:
            raise ConfigError("KDTrainer needs train_dataset: a store URL or an opened store")
        return StoreDataset.for_process(
            source,
            int(args.process_index),
            int(args.world_size),
            what="train_dataset",
            storage_options=storage_options,
            tokens_per_batch=tokens_per_batch,
            # Trainer's seed of data order: data_seed, else seed.
            seed=int(args.seed if args.data_seed is None else args.data_seed),
            shuffle_window=shuffle_window,
        )

    # ---- data and the loss ---------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        if self._resume is not None:
            state, world = self._resume, int(self.args.world_size)
            if state["world_size"] != world:
                raise ConfigError(
                    f"checkpoint was written by {state['world_size']} processes; this run has "
                    f"{world}"
                )
            if not self._workers_chosen:  # read on with the workers the checkpoint was written by
                self.kd_batches.adopt_workers(
                    state["loader"][int(self.args.process_index)],
                    f"dataloader_num_workers={self.args.dataloader_num_workers}",
                )
            self.kd_batches.load_state_dict(state["loader"][int(self.args.process_index)])
            self.kd_loss.load_state_dict(state["loss_schedule"])
            self.kd_tokens = int(state["tokens"])
            epochs = [s["epoch"] for s in state["loader"] if isinstance(s, dict) and "epoch" in s]
            self._epochs_done = int(state.get("epochs_done", min(epochs, default=0)))
        return self.kd_batches

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """The trained tokens of the whole optimizer step: all micro-batches, all ranks.

        Also whether the step ends a pass over the store: the passes every rank has completed
        (its last batch's epoch, plus one if that batch ended it), least over ranks, grew.
        """
        local = float(sum(int(b["num_tokens"]) for b in batch_samples))
        last = batch_samples[-1] if batch_samples else {}
        done = int(last.get("epoch", self._epochs_done)) + int(bool(last.get("epoch_ends")))
        mine = torch.tensor([[local, done]], dtype=torch.float64, device=device)
        ranks = self.accelerator.gather(mine) if self.accelerator.num_processes > 1 else mine
        count = float(ranks[:, 0].sum())
        done = int(ranks[:, 1].min())
        self._epoch_ended = done > self._epochs_done
        self._epochs_done = max(done, self._epochs_done)
        self._step_tokens = count
        self.kd_tokens += int(count)
        self._tokens_since_log += count
        return max(count, 1.0)

    def _logs_this_step(self) -> bool:
        step = self.state.global_step + 1
        every = int(self.state.logging_steps or 0)
        if self.args.logging_strategy == "epoch":  # Trainer's own epoch ends with the run
            return self._epoch_ended or step == self.state.max_steps
        return self.args.logging_strategy == "steps" and (
            (every > 0 and step % every == 0) or (step == 1 and self.args.logging_first_step)
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        fields = {k: inputs.get(k) for k in TEACHER_FIELDS}
        training = model.training
        kd = TeacherBatch(inputs["position_mask"], fields, training and self._logs_this_step())
        if num_items_in_batch is None:
            num_items_in_batch = max(float(inputs["num_tokens"]), 1.0)
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            kd_batch=kd,
            num_items_in_batch=num_items_in_batch,
        )
        loss = outputs["loss"]
        if training:
            if self.kd_loss.schedule is not None:
                # Kept on the device: reading it here would wait for the forward before the
                # backward is queued, every micro-batch. The schedule reads it once a step.
                self._step_loss = self._step_loss + loss.detach().double()
            if outputs.get("metrics") is not None:
                self._metrics.merge(outputs["metrics"])
            # DDP, FSDP and DeepSpeed average gradients over ranks; the loss is already divided
            # by the global token count.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _end_step(self) -> None:
        """After an optimizer step: the objective's schedule sees the step's mean loss.

        A step that trained no token (every label ignored on every rank, as a window of prompt
        only can be) measured nothing: its loss of 0 would read to TAID as a perfect student.
        """
        if self.kd_loss.schedule is not None and self._step_tokens > 0:
            total = torch.as_tensor(self._step_loss, dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(total.reshape(1), reduction="sum")
            self.kd_loss.step(float(total.sum()))
        self._step_loss = 0.0
        self._step_tokens = 0.0

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return [float(v) for v in t.tolist()]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "learning_rate" in logs:  # a training step's log, on every rank
            if self.accelerator.num_processes > 1:
                self._metrics.values = self.accelerator.reduce(self._metrics.values, "sum")
            found = self._metrics.summary()
            self._metrics = MetricTotals(self.args.device)
            now = time.perf_counter()
            logs["teacher_kl"] = found["fkl"]
            for key in ("rkl", "top1_agreement", "student_top1_prob", "student_entropy"):
                logs[f"teacher_{key}" if key == "rkl" else key] = found[key]
            logs["tokens"] = self.kd_tokens
            logs["tokens_per_s"] = self._tokens_since_log / max(now - self._log_clock, 1e-9)
            logs["data_epoch"] = self.kd_dataset.epoch
            logs.update(self.kd_loss.log_values())
            self._tokens_since_log = 0.0
            self._log_clock = now
        super().log(logs, start_time)

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(  # type: ignore[override]
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """The objective and the teacher-agreement metrics on a held-out store.

        Args:
            eval_dataset: a store URL, an opened store, a ``StoreDataset(shuffle=False)`` or a
                dict of them (metrics ``eval_{name}_...``); default the ``eval_dataset`` given
                to the trainer, which ``eval_strategy`` evaluates during training. A name of
                that ``eval_dataset`` dict is its store, as in Trainer.
            ignore_keys: unused (no predictions are gathered).
            metric_key_prefix: prefix of the metric names.

        Returns:
            ``{prefix}_loss``, ``{prefix}_teacher_kl`` and the other metrics of
            ``logitstore/_kd_eval.py``, logged and handed to the callbacks as Trainer does.
        """
        source = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(self.eval_dataset, dict) and isinstance(eval_dataset, str):
            source = self.eval_dataset.get(eval_dataset, eval_dataset)
        if source is None:
            raise ConfigError(
                "KDTrainer.evaluate needs a held-out store: pass eval_dataset (a store URL, an "
                "opened store or a StoreDataset with shuffle=False)"
            )
        data = eval_datasets(source, self.args, *self._eval_settings)
        if isinstance(data, dict):
            metrics: dict[str, float] = {}
            for name, one in data.items():
                metrics.update(self.evaluate(one, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        metrics = evaluate_store(self, data, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a store holds the teacher's side only, so there are no labels or
        predictions to gather; :meth:`evaluate` measures the student on a held-out store."""
        raise ConfigError(
            "KDTrainer.predict has no predictions to gather from a logit store; use "
            "evaluate(eval_dataset=STORE) for the objective and the teacher metrics on it"
        )
