"""TAID's adaptive interpolation schedule (Shing et al., ICLR 2025; docs/divergences.md, 6).

The trainer calls :meth:`TAIDSchedule.update` once per optimizer step with the detached loss and
passes :attr:`TAIDSchedule.t` to the ``taid`` objective (``t=``). The state belongs in the
training checkpoint (:meth:`state_dict` / :meth:`load_state_dict`).
"""

from __future__ import annotations

import math
from typing import Any

from logitstore.errors import ConfigError


class TAIDSchedule:
    """Adaptive ``t`` for TAID: momentum on the relative loss improvement, bounded below.

    Per update with loss ``J_n``: ``d = (J_prev - J_n) / (J_prev + 1e-15)``;
    ``m = beta m + (1 - beta) d``; ``t <- t + alpha * sigmoid(m) * (1 - t)``, then raised to at
    least the linear schedule from ``t_start`` to ``t_end`` over ``total_steps``, capped at
    ``t_end``, and never lowered. The first update only stores ``J``.

    Args:
        total_steps: optimizer steps of the run (the linear lower bound reaches ``t_end`` there).
        t_start: initial ``t``.
        t_end: final and maximal ``t``.
        alpha: step size of the adaptive increase.
        beta: momentum coefficient.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
    ) -> None:
        if int(total_steps) < 1:
            raise ConfigError(f"total_steps must be >= 1; found {total_steps!r}")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ConfigError(f"need 0 <= t_start <= t_end <= 1; found {t_start}, {t_end}")
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta < 1.0:
            raise ConfigError(f"need 0 <= alpha <= 1 and 0 <= beta < 1; found {alpha}, {beta}")
        self.total_steps = int(total_steps)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.t = self.t_start
        self.step = 0
        self.prev_loss: float | None = None
        self.momentum = 0.0

    def lower_bound(self, step: int) -> float:
        """The linear schedule's ``t`` after ``step`` optimizer steps."""
        frac = min(step / self.total_steps, 1.0)
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, loss: float) -> float:
        """Advance one optimizer step with the detached loss ``J_n``; returns the new ``t``."""
        j = float(loss)
        if not math.isfinite(j):
            raise ConfigError(f"TAID schedule needs a finite loss; found {loss!r}")
        self.step += 1
        if self.prev_loss is None:
            self.prev_loss = j
            return self.t
        rel = (self.prev_loss - j) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        # sigmoid(m), written so that neither branch overflows: after a step of loss near 0 the
        # relative change, and so m, can be of any size.
        m = self.momentum
        sig = 1.0 / (1.0 + math.exp(-m)) if m >= 0 else math.exp(m) / (1.0 + math.exp(m))
        proposed = self.t + self.alpha * sig * (1.0 - self.t)
        self.t = min(self.t_end, max(self.t, proposed, self.lower_bound(self.step)))
        self.prev_loss = j
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain Python numbers."""
        return {
            "t": self.t,
            "step": self.step,
            "prev_loss": self.prev_loss,
            "momentum": self.momentum,
            "total_steps": self.total_steps,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "alpha": self.alpha,
            "beta": self.beta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; missing keys raise ``ConfigError``."""
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ConfigError(f"TAID state lacks {', '.join(missing)}")
        self.total_steps = int(state["total_steps"])
        self.t_start, self.t_end = float(state["t_start"]), float(state["t_end"])
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.t, self.step = float(state["t"]), int(state["step"])
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)
        self.momentum = float(state["momentum"])
