"""``KDTrainer``'s checkpoint methods: resuming from a complete checkpoint, and saving one.

:class:`KDCheckpointing` is the ``Trainer`` that :class:`logitstore.hf.KDTrainer` builds on: it
takes only complete checkpoints to resume from, and writes ``logitstore_state.json`` into each
checkpoint last (``logitstore/_kd_checkpoints.py`` holds the file-level helpers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Trainer

from logitstore._kd_checkpoints import (
    STATE_NAME,
    check_objective,
    latest_checkpoint,
    objective_record,
    rotate,
    write_json_atomic,
)
from logitstore._kd_data import StoreBatches
from logitstore._kd_forward import causal_lm
from logitstore.divergences import DistillationLoss
from logitstore.errors import ConfigError


class KDCheckpointing(Trainer):
    """The checkpoint side of :class:`logitstore.hf.KDTrainer`, which sets the attributes
    declared here."""

    kd_loss: DistillationLoss
    kd_batches: StoreBatches
    kd_tokens: int
    run_info: dict[str, Any]
    _resume: dict[str, Any] | None
    _keep: int | None
    _state_saved: Path | None
    _epochs_done: int

    # ---- checkpoints -----------------------------------------------------------------------

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Trainer's warning of missing keys at resume, less the tied ones.

        A tied head is saved once, as the embeddings. transformers 5's Trainer recognises that
        through ``_keys_to_ignore_on_save`` only, which its models leave empty, and so warned of
        a missing ``lm_head.weight`` on every tied student's resume. Here the keys the model
        lists as tied are not named (its weights are tied again, as Trainer does for keys it
        recognises); any other missing key still is.
        """
        lm = causal_lm(self.model)
        tied = tuple(getattr(lm, "all_tied_weights_keys", None) or ())
        missing = [
            key
            for key in load_result.missing_keys
            if not any(key == t or key.endswith("." + t) for t in tied)
        ]
        if len(missing) < len(load_result.missing_keys):
            lm.tie_weights()
            load_result = load_result._replace(missing_keys=missing)
        super()._issue_warnings_after_load(load_result)

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest *complete*
        checkpoint of ``output_dir``, and a path must be a complete checkpoint."""
        path: Path | None = None
        if resume_from_checkpoint is True:
            path = latest_checkpoint(str(self.args.output_dir))
            if path is None:
                raise ConfigError(f"no complete checkpoint in {self.args.output_dir} to resume")
        elif resume_from_checkpoint:
            path = Path(str(resume_from_checkpoint))
            if not (path / STATE_NAME).is_file():
                raise ConfigError(
                    f"{path} is not a complete logitstore checkpoint (no {STATE_NAME})"
                )
        self._resume = json.loads((path / STATE_NAME).read_text()) if path else None
        if path is not None and self._resume is not None:
            check_objective(path, self._resume.get("objective"), objective_record(self.kd_loss))
        return super().train(resume_from_checkpoint=str(path) if path else None, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self._state_saved != folder:  # not yet written for a push (below)
            self._save_kd_state(folder)
        self._state_saved = None
        if self.args.should_save:
            rotate(run_dir, self._keep, best=self.state.best_model_checkpoint)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes a checkpoint (hub_strategy "checkpoint", "all_checkpoints") before
        # _save_checkpoint returns: the state file goes in first, or the Hub's copy would be an
        # incomplete checkpoint that no resume takes. Every rank comes here (rank 0 pushes).
        self._save_kd_state(Path(checkpoint_folder))
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_kd_state(self, folder: Path) -> None:
        """Write ``logitstore_state.json`` into the checkpoint ``folder``, last: every rank's
        read position (a collective: every rank calls it), the objective and its schedule."""
        loader = self._gather(self.kd_batches.state_dict())
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every rank's files are written
        self._state_saved = folder
        if not self.args.should_save:
            return
        state = {
            "step": self.state.global_step,
            "tokens": self.kd_tokens,
            "epochs_done": self._epochs_done,
            "world_size": int(self.args.world_size),
            "loader": loader,
            "loss_schedule": self.kd_loss.state_dict(),
            "objective": objective_record(self.kd_loss),
            "run": self.run_info,
        }
        write_json_atomic(folder / STATE_NAME, state)

    def _gather(self, obj: Any) -> list[Any]:
        if self.accelerator.num_processes <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
