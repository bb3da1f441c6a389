"""Per-position numbers every codec stores besides its support: tail, label, temperatures, entropy.

Fields (all with leading dimension ``P``):

* ``label_logprob`` float32 ``()``: teacher log-prob of the label, exact.
* ``tail_logmass`` float16 ``()``: ``log(1 - sum_{i in S} p_i)``, computed as the log-sum-exp of
  the log-probs outside ``S`` (no cancellation, ``-inf`` when ``S`` holds everything). Float16
  keeps ``log r`` to a relative ``2^-11``, i.e. the tail mass ``r`` to a relative
  ``2^-11 |log r|`` (0.3 % at ``r = 0.001``), far below what moves a bucket loss (its error
  enters as ``r * err^2``), for half the bytes of float32.
* ``tail_logsumexp`` float16 ``(n_temps,)``: ``logsumexp_{i not in S}(logp_i / tau)`` per extra
  temperature ``tau`` (only present when ``n_temps > 0``), same precision argument.
* ``entropy`` float16 ``()``: teacher entropy in nats, a diagnostic (relative error <= 2^-11).

``label_logprob`` (and each codec's top-1 log-prob) stay float32: the label's is promised exact,
and the top-1 anchors every decoded value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from logitstore.codecs.base import FieldSpec
from logitstore.errors import ConfigError, DataError, NonFiniteTeacherError


def scalar_fields(num_temperatures: int) -> dict[str, FieldSpec]:
    fields = {
        "label_logprob": FieldSpec("float32"),
        "entropy": FieldSpec("float16"),
        "tail_logmass": FieldSpec("float16"),
    }
    if num_temperatures:
        fields["tail_logsumexp"] = FieldSpec("float16", (num_temperatures,))
    return fields


def check_inputs(
    logprobs: torch.Tensor, labels: torch.Tensor, temperatures: Sequence[float]
) -> None:
    """Refuse shapes, labels and temperatures the codecs cannot encode."""
    if logprobs.ndim != 2:
        raise DataError(f"expected logprobs of shape (P, V), found {tuple(logprobs.shape)}")
    if labels.shape != logprobs.shape[:1]:
        raise DataError(
            f"expected labels of shape ({logprobs.shape[0]},), found {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logprobs.shape[1]):
        raise DataError(
            f"labels must lie in [0, {logprobs.shape[1]}), found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    # NaN and +inf fail this; -inf (a token masked out of the vocabulary) is a valid log-prob.
    if not bool((logprobs < torch.inf).all()):
        raise NonFiniteTeacherError(
            "expected finite teacher log-probs (or -inf), found NaN or +inf"
        )
    for tau in temperatures:
        if not tau > 0:
            raise ConfigError(f"temperatures must be positive, found {tau!r}")


def encode_scalars(
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    in_support: torch.Tensor,
    temperatures: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Scalar fields on ``logprobs.device``.

    Args:
        logprobs: float32 ``(P, V)`` teacher log-softmax at temperature 1.
        labels: int64 ``(P,)``.
        in_support: bool ``(P, V)`` membership of ``S``.
        temperatures: extra temperatures for ``tail_logsumexp``.
    """
    lp = logprobs.float()
    # 0 * log 0 = 0 for tokens of probability exactly zero.
    plogp = torch.where(lp > -torch.inf, lp.exp() * lp, torch.zeros_like(lp))
    out = {
        "label_logprob": lp.gather(1, labels.long()[:, None])[:, 0].contiguous(),
        "entropy": (-plogp.sum(dim=1)).to(torch.float16),
    }
    tail = lp.masked_fill(in_support, -torch.inf)
    out["tail_logmass"] = torch.logsumexp(tail, dim=1).to(torch.float16)
    if temperatures:
        lse = [torch.logsumexp(tail / float(tau), dim=1) for tau in temperatures]
        out["tail_logsumexp"] = torch.stack(lse, dim=1).to(torch.float16)
    return out


def support_mask(ids: torch.Tensor, valid: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Bool ``(P, V)`` membership of the ids ``(P, K)`` (invalid entries ignored)."""
    if valid is not None:  # invalid entries land in an extra column that is dropped
        ids = torch.where(valid, ids, torch.full_like(ids, vocab_size))
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]


def decode_scalars(fields: Mapping[str, np.ndarray], num_positions: int) -> dict[str, np.ndarray]:
    """Decoded scalar arrays (float32) for :class:`~logitstore.codecs.base.Positions`."""
    label = np.asarray(fields["label_logprob"], dtype=np.float32)
    tail = np.asarray(fields["tail_logmass"]).astype(np.float32)
    if "tail_logsumexp" in fields:
        tail_lse = np.asarray(fields["tail_logsumexp"]).astype(np.float32)
    else:
        tail_lse = np.zeros((num_positions, 0), dtype=np.float32)
    return {
        "label_logprob": label,
        "tail_logmass": tail,
        "tail_logsumexp": tail_lse,
        "entropy": np.asarray(fields["entropy"]).astype(np.float32),
    }
