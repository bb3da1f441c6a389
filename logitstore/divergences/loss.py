"""A divergence bound once to everything it needs: the loss a trainer calls on every batch.

:class:`DistillationLoss` resolves a divergence name, its parameters, the temperature and the
tail options one time, at the edge (the CLI, ``KDTrainer``, a user's script), into one object.
Below that nothing passes the name along or compares it: the object computes the fused loss
from hidden states, the head weight and a collated batch (``logitstore.dataset``), owns the
objective's schedule (TAID's adaptive ``t``), and saves and restores that schedule's state.

The maths of each objective, and what is exact or a lower bound on a sparse store, is in
``docs/divergences.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from logitstore.divergences._fused import DEFAULT_CHUNK_SIZE, fused_bucket_loss
from logitstore.divergences._losses import check_temperature
from logitstore.divergences._registry import DIVERGENCES, Objective
from logitstore.errors import ConfigError, TemperatureNotCapturedError

# Options of the fused loss itself, accepted among a divergence's parameters for convenience.
LOSS_OPTIONS = ("tau_squared", "approximate_tail")


@dataclass
class DistillationLoss:
    """One objective with resolved parameters, temperature and tail options.

    Build it with :meth:`create`. Call it on ``(hidden, weight, batch, num_items)``; after each
    optimizer step call :meth:`step` with the step's mean loss (it advances the schedule, if
    the objective has one).

    Attributes:
        objective: the registered objective.
        params: its validated parameters (a scheduled one is overridden by the schedule).
        temperature: distillation temperature ``tau``.
        temperature_index: the ``tail_logsumexp`` column of ``tau`` (None at 1 or approximate).
        approximate_tail: spread the tail uniformly at an uncaptured ``tau`` (approximate).
        tau_squared: multiply the loss by ``tau^2``.
        use_counts: RS-KD count estimator (``fkl`` on a sampled store).
        ce_weight: weight of cross-entropy with the labels added to the loss.
        chunk_size: tokens whose logits are formed at once.
        schedule: drives a parameter over training (TAID), or None.
        notes: what the user should know about the binding (e.g. an approximate tail).
    """

    objective: Objective
    params: dict[str, Any]
    temperature: float = 1.0
    temperature_index: int | None = None
    approximate_tail: bool = False
    tau_squared: bool = False
    use_counts: bool = False
    ce_weight: float = 0.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    schedule: Any = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        divergence: str = "fkl",
        params: Mapping[str, Any] | None = None,
        *,
        temperature: float = 1.0,
        capture_temperatures: Sequence[float] | None = None,
        approximate_tail: bool = False,
        tau_squared: bool = False,
        use_counts: bool = False,
        ce_weight: float = 0.0,
        chunk_size: int | None = None,
        total_steps: int | None = None,
    ) -> DistillationLoss:
        """Resolve ``divergence`` and ``params`` against the registry and the store.

        Args:
            divergence: a name in ``DIVERGENCES``.
            params: the objective's parameters, its schedule's settings (TAID: ``t_start``,
                ``t_end``, ``alpha``, ``beta``), and the loss options ``tau_squared`` and
                ``approximate_tail``.
            temperature: ``tau``; at ``tau != 1`` the store must have captured it (its
                ``tail_temperatures``) unless ``approximate_tail``.
            capture_temperatures: the store's extra captured temperatures, in column order:
                ``logitstore.format.tail_temperatures(store.manifest)``.
            use_counts: RS-KD count estimator (needs ``fkl`` and a sampled store).
            ce_weight: weight of cross-entropy with the labels (>= 0).
            chunk_size: tokens per chunk of the fused loss.
            total_steps: optimizer steps of the run; a scheduled objective without a fixed
                parameter needs it.

        Raises:
            UnknownNameError: unknown divergence or parameter.
            ConfigError: a bad value or combination.
            TemperatureNotCapturedError: ``tau`` not captured and not ``approximate_tail``.
        """
        objective = DIVERGENCES[divergence]
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(
                f"params must be a mapping of parameter names to values, e.g. {{'gamma': 0.5}}; "
                f"found {type(params).__name__} {str(params)[:60]!r}"
            )
        given = dict(params or {})
        options = {k: given.pop(k) for k in LOSS_OPTIONS if k in given}
        tau_squared = bool(options.get("tau_squared", tau_squared))
        approximate_tail = bool(options.get("approximate_tail", approximate_tail))
        schedule, rest = objective.split(given, total_steps)
        if schedule is None and objective.schedule is not None and objective.scheduled not in rest:
            raise ConfigError(
                f"{divergence} needs the run's total_steps for its schedule, or a fixed "
                f"{objective.scheduled}"
            )
        resolved = objective.resolve(rest)
        tau = check_temperature(temperature)
        if use_counts and not objective.counts:
            raise ConfigError(f"use_counts (RS-KD) is defined for fkl only; found {divergence!r}")
        ce = float(ce_weight)
        if not (math.isfinite(ce) and ce >= 0):
            raise ConfigError(f"ce_weight must be a finite number >= 0; found {ce_weight!r}")
        chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
        if chunk < 1:
            raise ConfigError(f"chunk_size must be a positive integer; found {chunk_size!r}")
        index, notes = None, []
        if tau != 1.0:
            extra = [float(t) for t in capture_temperatures or ()]
            if tau in extra:
                index = extra.index(tau)
            elif approximate_tail:
                notes.append(
                    f"temperature {tau} not captured: the teacher's tail is spread uniformly, "
                    "so the tempered teacher is approximate"
                )
            else:
                raise TemperatureNotCapturedError(
                    f"temperature {tau} was not captured; the store has tail sums for "
                    f"{extra or 'no temperature'} besides 1.0"
                )
        return cls(
            objective,
            resolved,
            temperature=tau,
            temperature_index=index,
            approximate_tail=index is None and tau != 1.0,
            tau_squared=tau_squared,
            use_counts=use_counts,
            ce_weight=ce,
            chunk_size=chunk,
            schedule=schedule,
            notes=notes,
        )

    @property
    def name(self) -> str:
        return self.objective.name

    def current_params(self) -> dict[str, Any]:
        """The parameters in force now (the scheduled one from the schedule)."""
        if self.schedule is None:
            return dict(self.params)
        return {**self.params, str(self.objective.scheduled): float(self.schedule.t)}

    def __call__(
        self,
        hidden: Tensor,
        weight: Tensor,
        batch: Mapping[str, Any],
        num_items: float | Tensor | None = None,
        softcap: float | None = None,
    ) -> Tensor:
        """Summed per-token loss over the batch's trained tokens, divided by ``num_items``.

        Args:
            hidden: ``(N, H)`` final hidden states at the batch's real positions.
            weight: ``(V, H)`` the LM head (the full weight, gathered if it is sharded).
            batch: a collated batch (``labels``, ``support_ids``, ``support_logprobs``,
                ``tail_logmass``, ``label_logprob``, ``tail_logsumexp``, ``support_counts``).
            num_items: the divisor, the trained tokens of the whole optimizer step (all
                micro-batches and ranks); default: this batch's.
            softcap: the student's logits are ``softcap * tanh(hidden @ weight.T /
                softcap)`` (Gemma 2's ``final_logit_softcapping``); None: the product itself.
        """
        counts = batch.get("support_counts") if self.use_counts else None
        if self.use_counts and counts is None:
            raise ConfigError("use_counts needs a sampled store (draw counts); this one has none")
        tail_lse = None
        if self.temperature_index is not None:
            tail_lse = batch["tail_logsumexp"][:, self.temperature_index]
        loss = fused_bucket_loss(
            self.objective,
            self.objective.resolve(self.current_params()) if self.schedule else self.params,
            hidden,
            weight,
            batch["support_ids"],
            batch["support_logprobs"],
            batch["tail_logmass"],
            batch["label_logprob"],
            batch["labels"],
            num_items=num_items,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            tail_logsumexp=tail_lse,
            approximate_tail=self.approximate_tail,
            support_counts=counts,
            tau_squared=self.tau_squared,
            softcap=softcap,
        )
        if self.ce_weight:
            loss = loss + self.ce_weight * cross_entropy(
                hidden,
                weight,
                batch["labels"],
                num_items=num_items,
                chunk_size=self.chunk_size,
                softcap=softcap,
            )
        return loss

    # ---- the schedule --------------------------------------------------------------------------

    def step(self, loss: float) -> None:
        """After an optimizer step: advance the schedule with the step's mean loss."""
        if self.schedule is not None:
            self.schedule.update(float(loss))

    def state_dict(self) -> dict[str, Any] | None:
        """The schedule's state (None without one): what a checkpoint must keep."""
        return None if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.schedule is not None and state is not None:
            self.schedule.load_state_dict(state)

    def log_values(self) -> dict[str, float]:
        """What to log about the objective each step (the scheduled parameter)."""
        if self.schedule is None:
            return {}
        return {f"{self.name}_{self.objective.scheduled}": float(self.schedule.t)}


def cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    num_items: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: float | None = None,
) -> Tensor:
    """Cross-entropy with the labels without full logits: FKL against a one-hot teacher.

    With the label as the whole support (log-prob 0, no tail), the bucket FKL is exactly
    ``-log q_y``, and the fused loss computes it chunk by chunk like any divergence.
    """
    ids = labels.clamp(min=0)[:, None]
    zeros = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    fkl = DIVERGENCES["fkl"]
    return fused_bucket_loss(
        fkl,
        fkl.resolve({}),
        hidden,
        weight,
        ids,
        zeros,
        torch.full_like(zeros[:, 0], -math.inf),
        zeros[:, 0],
        labels,
        num_items=num_items,
        chunk_size=chunk_size,
        softcap=softcap,
    )
