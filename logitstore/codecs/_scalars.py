"""Per-position numbers every codec stores besides its support: tail, label, temperatures, entropy.

Fields (all with leading dimension ``P``):

Codecs accept logits or log-probs; every row is normalised here (``logp = (z - max) - log s``,
the float32 log-softmax), so log-probs pass through up to float32 rounding.

* ``label_logprob`` float32 ``()``: teacher log-prob of the label, exact (float32 log-softmax).
* ``tail_logmass`` float16 ``()``: ``log(1 - sum_{i in S} p_i)``, computed from the probabilities
  outside ``S`` themselves (no cancellation; ``-inf`` when ``S`` holds everything). Float16
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

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

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


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, temperatures: Sequence[float]) -> None:
    """Refuse shapes, labels, values and temperatures the codecs cannot encode."""
    if logits.ndim != 2:
        raise DataError(f"expected logits of shape (P, V), found {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise DataError(
            f"expected labels of shape ({logits.shape[0]},), found {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise DataError(
            f"labels must lie in [0, {logits.shape[1]}), found "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    for tau in temperatures:
        if not tau > 0:
            raise ConfigError(f"temperatures must be positive, found {tau!r}")
    # -inf (a token masked out of the vocabulary) is valid; NaN and +inf are not. One read:
    # both survive a row sum (+inf + -inf is NaN); a flagged row is confirmed entry by entry,
    # since a sum of huge finite logits could overflow on its own.
    sums = logits.sum(dim=1, dtype=torch.float32)
    flagged = sums.isnan() | (sums == torch.inf)
    if bool(flagged.any()) and not bool((logits[flagged] < torch.inf).all()):
        raise NonFiniteTeacherError("expected finite teacher logits (or -inf), found NaN or +inf")
    if bool((sums == -torch.inf).any()) and not bool((logits.amax(dim=1) > -torch.inf).all()):
        raise NonFiniteTeacherError(
            "expected a finite teacher logit at every position, found all -inf"
        )


# Elements per block of rows that a codec reads the vocabulary in. On a CPU, a block's float32
# temporaries (2 MiB each) stay in cache and are reused by the allocator; whole (P, V)
# temporaries (50 MB for 255 positions of a 49k vocabulary) are fresh pages every time, and
# faulting them in cost more than the arithmetic (measured: 390 vs 150 us per position for
# the scalars). On a GPU, larger blocks only bound memory.
CPU_BLOCK_ELEMENTS = 2**19
DEVICE_BLOCK_ELEMENTS = 2**28


def by_rows(
    fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    logits: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``fn(float32 logits block, labels block)`` over blocks of rows, outputs concatenated.

    ``fn`` must treat rows independently (and draw from a generator in row order), so the result
    does not depend on the block size.
    """
    num, vocab_size = logits.shape
    budget = CPU_BLOCK_ELEMENTS if logits.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    step = max(1, budget // max(vocab_size, 1))
    if num <= step:
        return fn(logits.float(), labels)
    parts = [fn(logits[a : a + step].float(), labels[a : a + step]) for a in range(0, num, step)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


class Normaliser(NamedTuple):
    """Per-row log-softmax constants: ``logp = (z - row_max) - log_sum``, float32 ``(P,)``."""

    row_max: torch.Tensor
    log_sum: torch.Tensor


def encode_scalars(
    logits: torch.Tensor,
    labels: torch.Tensor,
    support_ids: torch.Tensor | None,
    temperatures: Sequence[float],
    valid: torch.Tensor | None = None,
    row_max: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], Normaliser]:
    """Scalar fields on ``logits.device``, and the rows' log-softmax constants.

    This runs once per stored position next to the teacher's forward, so it reads the
    vocabulary as few times as it can: one ``exp`` of ``zc = z - max`` gives the normaliser
    ``s = sum(e)``, the entropy ``H = log s - (e . zc) / s`` (a sum of non-negative terms)
    and, after zeroing the support's entries of ``e``, the tail
    mass as a sum of its own terms (no ``1 - sum`` cancellation). Rows where that is not exact
    enough (a ``-inf`` logit makes the dot product NaN; a tail so small its terms underflow
    float32) are recomputed the long way.

    Args:
        logits: float ``(P, V)`` teacher logits (or log-probs) at temperature 1.
        labels: int64 ``(P,)``.
        support_ids: int64 ``(P, K)`` ids of ``S`` (entries where ``valid`` is False ignored),
            or ``None``: ``S`` is the whole vocabulary (every tail is empty, ``-inf``).
        temperatures: extra temperatures for ``tail_logsumexp``.
        valid: bool ``(P, K)`` or ``None`` (every entry valid).
        row_max: float32 ``(P,)`` or ``(P, 1)`` row maxima, if the caller has them (top-k).
            Every row needs a finite maximum (``check_inputs`` refuses the others).
    """
    z = logits.float()
    num, vocab_size = z.shape
    m = (z.amax(dim=1) if row_max is None else row_max).reshape(num, 1)
    zc, e = _workspace(num, vocab_size, z.device)
    torch.sub(z, m, out=zc)  # <= 0
    label = zc.gather(1, labels.long()[:, None])[:, 0]
    torch.exp(zc, out=e)
    total = e.sum(dim=1)
    log_sum = total.log()
    norm = Normaliser(m[:, 0], log_sum)
    entropy = log_sum - zc.mul_(e).sum(dim=1) / total  # zc is spent here
    out = {"label_logprob": label - log_sum}

    def logprobs(rows: torch.Tensor | slice) -> torch.Tensor:
        return (z[rows] - m[rows]) - log_sum[rows, None]

    if support_ids is None:
        out["entropy"] = _exact_entropy(logprobs, entropy).to(torch.float16)
        out["tail_logmass"] = torch.full_like(entropy, -torch.inf).to(torch.float16)
        if temperatures:
            out["tail_logsumexp"] = torch.full(
                (num, len(temperatures)), -torch.inf, dtype=torch.float16, device=z.device
            )
        return out, norm
    # Invalid entries point at the row's first id instead, which is in S anyway.
    safe_ids = support_ids if valid is None else torch.where(valid, support_ids, support_ids[:, :1])
    tail_sum = e.scatter_(1, safe_ids, 0.0).sum(dim=1)
    tail_logmass = tail_sum.log() - log_sum
    # float32 tail terms underflow below exp(-103) of the top-1; such a tail (or one with
    # p_i = 0 exactly) is recomputed as a log-sum-exp, which gives -inf when S holds everything.
    entropy = _exact_entropy(logprobs, entropy)
    small = tail_sum < 1e-30
    if bool(small.any()):
        rows = small.nonzero()[:, 0]
        in_s = support_mask(safe_ids[rows], None, vocab_size)
        tail_logmass[rows] = torch.logsumexp(logprobs(rows).masked_fill(in_s, -torch.inf), dim=1)
    out["entropy"] = entropy.to(torch.float16)
    out["tail_logmass"] = tail_logmass.to(torch.float16)
    if temperatures:
        tail = logprobs(slice(None)).masked_fill_(
            support_mask(safe_ids, None, vocab_size), -torch.inf
        )
        lse = [torch.logsumexp(tail / float(tau), dim=1) for tau in temperatures]
        out["tail_logsumexp"] = torch.stack(lse, dim=1).to(torch.float16)
    return out, norm


_local = threading.local()


def _workspace(num: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two float32 ``(num, V)`` scratch tensors; on a CPU, block-sized ones are kept per thread."""
    if device.type != "cpu" or num * vocab_size > CPU_BLOCK_ELEMENTS:
        return tuple(torch.empty(num, vocab_size, device=device) for _ in range(2))
    have = getattr(_local, "buffers", None)
    if have is None or have[0].shape[1] != vocab_size or have[0].shape[0] < num:
        have = _local.buffers = tuple(torch.empty(num, vocab_size) for _ in range(2))
    return tuple(b[:num] for b in have)


def _exact_entropy(
    logprobs: Callable[[torch.Tensor], torch.Tensor], fast: torch.Tensor
) -> torch.Tensor:
    """``fast``, with NaN rows (``0 * -inf``) recomputed with ``0 log 0 = 0``.

    ``logprobs(rows)`` gives the log-probs of the given rows.
    """
    bad = fast.isnan()
    if not bool(bad.any()):
        return fast
    rows = bad.nonzero()[:, 0]
    sub = logprobs(rows)
    plogp = torch.where(sub > -torch.inf, sub.exp() * sub, torch.zeros_like(sub))
    return fast.index_put((rows,), -plogp.sum(dim=1))


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
