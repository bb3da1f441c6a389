"""The divergence registry: each objective with its parameters, defaults and value checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from logitstore.divergences import _objectives as obj
from logitstore.divergences._buckets import Buckets
from logitstore.errors import ConfigError, UnknownNameError
from logitstore.registry import Registry


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; found {value!r}")
    return float(value)


def _between(name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=False):
    v = _real(name, value)
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in {left}{lo}, {hi}{right}; found {value!r}")
    return v


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; found {value!r}")
    return str(value)


def _check_jsd(p: dict) -> dict:
    return {"beta": _between("jsd beta", p["beta"], 0.0, 1.0)}


def _check_skew(p: dict) -> dict:
    # alpha = 1 makes the mixture equal to its first argument: the loss would be identically 0.
    return {"alpha": _between("alpha", p["alpha"], 0.0, 1.0, hi_open=True)}


def _check_akl(p: dict) -> dict:
    return {"mu": _between("akl mu", p["mu"], 0.0, 1.0, lo_open=True)}


def _check_abkd(p: dict) -> dict:
    return {"alpha": _real("abkd alpha", p["alpha"]), "beta": _real("abkd beta", p["beta"])}


def _check_taid(p: dict) -> dict:
    return {"t": _between("taid t", p["t"], 0.0, 1.0)}


def _check_amid(p: dict) -> dict:
    out = {
        "alpha": _real("amid alpha", p["alpha"]),
        "lam": _between("amid lam", p["lam"], 0.0, 1.0),
        "divergence": _choice("amid divergence", p["divergence"], ("kl", "ab")),
        "order": _choice("amid order", p["order"], ("pr", "qr", "rp", "rq")),
        "ab_alpha": _real("amid ab_alpha", p["ab_alpha"]),
        "ab_beta": _real("amid ab_beta", p["ab_beta"]),
    }
    # lam = 1 makes r = p and lam = 0 makes r = q: against that same model the loss would be
    # identically 0 (as skew alpha = 1).
    same = {1.0: ("pr", "rp"), 0.0: ("qr", "rq")}.get(out["lam"], ())
    if out["order"] in same:
        raise ConfigError(
            f"amid lam = {out['lam']:g} makes the assistant r the other side of order "
            f"{out['order']!r}: the loss would be identically 0"
        )
    return out


def _check_dkd(p: dict) -> dict:
    alpha, beta = _real("dkd alpha", p["alpha"]), _real("dkd beta", p["beta"])
    if alpha < 0 or beta < 0:
        raise ConfigError(f"dkd alpha and beta must be >= 0; found {alpha}, {beta}")
    return {"alpha": alpha, "beta": beta}


def _check_drkl(p: dict) -> dict:
    gamma = _real("drkl gamma", p["gamma"])
    if gamma <= 0:
        raise ConfigError(f"drkl gamma must be > 0; found {gamma}")
    return {
        "gamma": gamma,
        "target": _choice("drkl target", p["target"], ("label", "teacher_argmax")),
    }


def _no_params(p: dict) -> dict:
    return dict(p)


def _taid_schedule(settings: dict, total_steps: int) -> Any:
    from logitstore.divergences.taid import TAIDSchedule

    return TAIDSchedule(total_steps, **settings)


@dataclass(frozen=True)
class Objective:
    """One registered objective.

    Attributes:
        name: the registry name.
        fn: ``fn(buckets, **params) -> (N,)`` per-token values.
        defaults: every parameter with its default (docs/divergences.md, section 2).
        check: validates and normalises a full parameter dict; raises ``ConfigError``.
        summary: one line for listings.
        schedule: ``schedule(settings, total_steps)`` builds the object that drives a parameter
            over training (TAID's ``t``), used when that parameter is not fixed by the user.
        schedule_params: the names of ``settings`` (accepted besides ``defaults``), and
            ``scheduled``: the parameter the schedule drives.
        counts: has the RS-KD count estimator (a sampled store's draw counts as the teacher).
    """

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict], dict] = _no_params
    summary: str = ""
    schedule: Callable[[dict, int], Any] | None = None
    schedule_params: tuple[str, ...] = ()
    scheduled: str | None = None
    counts: bool = False

    def split(self, params: Mapping[str, Any], total_steps: int | None) -> tuple[Any, dict]:
        """The schedule (or None) and the remaining objective parameters.

        A scheduled objective gets its schedule when the scheduled parameter is not given and
        the run's length is known (``total_steps``); schedule settings without a schedule are
        refused.
        """
        settings = {k: params[k] for k in self.schedule_params if k in params}
        rest = {k: v for k, v in params.items() if k not in settings}
        adaptive = self.schedule is not None and self.scheduled not in rest
        if settings and not adaptive:
            raise ConfigError(
                f"{', '.join(sorted(settings))} set {self.name}'s schedule, which is off when "
                f"{self.scheduled} is fixed"
            )
        if not adaptive or total_steps is None:
            return None, rest
        assert self.schedule is not None
        return self.schedule(settings, int(total_steps)), rest

    def resolve(self, params: Mapping[str, Any]) -> dict:
        """Defaults overridden by ``params``; unknown names and bad values raise."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise UnknownNameError(
                f"unknown parameter(s) {', '.join(unknown)} for divergence {self.name!r}; "
                f"known: {known}"
            )
        return self.check({**self.defaults, **params})

    def __call__(self, buckets: Buckets, params: Mapping[str, Any]) -> Tensor:
        """Per-token values ``(N,)`` with already resolved ``params``."""
        return self.fn(buckets, **params)


DIVERGENCES: Registry[Objective] = Registry(
    "divergence",
    {
        "fkl": Objective("fkl", obj.fkl, summary="forward KL(p || q)", counts=True),
        "rkl": Objective("rkl", obj.rkl, summary="reverse KL(q || p)"),
        "jsd": Objective("jsd", obj.jsd, {"beta": 0.5}, _check_jsd, "generalised JSD(beta)"),
        "tvd": Objective("tvd", obj.tvd, summary="total variation distance"),
        "skl": Objective("skl", obj.skl, {"alpha": 0.1}, _check_skew, "skew KL (DistiLLM)"),
        "srkl": Objective("srkl", obj.srkl, {"alpha": 0.1}, _check_skew, "skew reverse KL"),
        "akl": Objective("akl", obj.akl, {"mu": 0.5}, _check_akl, "adaptive KL"),
        "abkd": Objective(
            "abkd", obj.abkd, {"alpha": 0.2, "beta": 0.7}, _check_abkd, "alpha-beta divergence"
        ),
        "taid": Objective(
            "taid",
            obj.taid,
            {"t": 0.4},
            _check_taid,
            "TAID interpolated KL",
            schedule=_taid_schedule,
            schedule_params=("t_start", "t_end", "alpha", "beta"),
            scheduled="t",
        ),
        "amid": Objective(
            "amid",
            obj.amid,
            {
                "alpha": 0.5,
                "lam": 0.5,
                "divergence": "kl",
                "order": "pr",
                "ab_alpha": 0.2,
                "ab_beta": 0.7,
            },
            _check_amid,
            "alpha-mixture assistant distillation",
        ),
        "dkd": Objective("dkd", obj.dkd, {"alpha": 1.0, "beta": 0.5}, _check_dkd, "decoupled KD"),
        "drkl": Objective(
            "drkl",
            obj.drkl,
            {"gamma": 0.5, "target": "label"},
            _check_drkl,
            "diversity-aware reverse KL",
        ),
    },
)


def resolve(name: str, params: Mapping[str, Any]) -> tuple[Objective, dict]:
    """Look up ``name`` and validate ``params`` against it."""
    objective = DIVERGENCES[name]
    return objective, objective.resolve(params)
