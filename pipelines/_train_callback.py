"""The training run's callback: its metrics rows, ``stop_after``, and the stop signals.

``RunCallback`` writes ``metrics.jsonl`` and ``eval.jsonl`` (rank 0), stops at ``stop_after``,
and turns SIGTERM or SIGUSR1 (``STOP_SIGNALS``) into a checkpoint of the step under way.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# Sent before a job is ended: by a scheduler's cancel or pre-emption (SLURM, Kubernetes), by
# torchrun to its workers when it is itself ended, or chosen with SLURM's --signal=USR1@SECONDS.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class RunCallback(TrainerCallback):
    """``metrics.jsonl`` and ``eval.jsonl`` rows (rank 0), ``stop_after`` (stop and
    checkpoint early), and a stop signal (SIGTERM, SIGUSR1): the step under way ends, every
    rank saves a checkpoint of it and the run returns, to be continued with ``resume``."""

    def __init__(self, out: Path, stop_after: int | None) -> None:
        self.metrics_path = out / "metrics.jsonl"
        self.eval_path = out / "eval.jsonl"
        self.stop_after = stop_after
        self.received: int | None = None  # the stop signal this process received
        self.stopped_by: str | None = None  # the signal the run stopped on, on every rank
        self._handlers: dict[int, Any] = {}

    def _receive(self, signum: int, frame: Any) -> None:
        self.received = signum

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._receive) for s in STOP_SIGNALS}

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore_signals()

    def restore_signals(self) -> None:
        """Hand the stop signals back to the handlers they had before training."""
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _signalled(self, args: Any) -> int:
        """The stop signal received by any rank (0: none). The ranks agree on it at every step,
        since they must all stop and save at the same one."""
        received = self.received or 0
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([received], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                received = int(flag.item())
        return received

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True
            control.should_save = True
        signalled = self._signalled(args)
        if signalled:
            self.stopped_by = signal.Signals(signalled).name
            control.should_training_stop = True
            control.should_save = True
        if control.should_training_stop or state.global_step >= state.max_steps:
            # The last step is logged whatever log_every is: its row is the summary's "last",
            # and the steps since the previous row would otherwise go unlogged.
            control.should_log = True

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not metrics:
            return
        row = {"step": state.global_step}
        row.update({k.removeprefix("eval_"): v for k, v in metrics.items() if k != "epoch"})
        with self.eval_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "teacher_kl" not in logs:
            return
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "teacher_kl": logs["teacher_kl"],
            "teacher_rkl": logs["teacher_rkl"],
            "top1_agreement": logs["top1_agreement"],
            "student_top1_prob": logs["student_top1_prob"],
            "student_entropy": logs["student_entropy"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": logs["tokens"],
            "tokens_per_s": logs["tokens_per_s"],
            "epoch": logs["data_epoch"],
        }
        row.update({k: v for k, v in logs.items() if k not in row and k.endswith("_t")})
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
