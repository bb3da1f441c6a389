"""Value checks on decoded positions: what a store's numbers must satisfy to be used at all.

A store read from the Hub or a bucket is a stranger's bytes; a checksum only says they are the
bytes the manifest names. Before decoded positions reach a loss they are checked against the
format's rules, for every position:

* support ids lie in ``[0, V)`` (``-1`` marks padding of sampled codecs);
* no NaN anywhere; support, label and tail log-probs are ``<= 0`` (up to
  :data:`LOGPROB_TOLERANCE`), ``+inf`` nowhere; entropy ``>= 0``;
* draw counts of sampled codecs add up to the number of draws;
* support mass plus tail mass is at most ``1 + MASS_TOLERANCE``, where each decoded value
  counts as the least probability it can stand for (``Codec.least_probs``: a quantized value
  stands for a range of true values), so a store written by our encoders always passes.

The checks are a few vectorised reductions over arrays already in memory. To stay cheap, the
mass while reading is a lower bound from ``log4(K) + 1`` columns (the support is sorted most
probable first, so entries ``a .. b - 1`` hold at least ``b - a`` times the mass of entry
``b - 1``); it misses mass above 1 only where the support falls steeply within the segments
``[1, 4), [4, 16), ...``. ``verify`` sums every column.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from logitstore.codecs.base import Codec, Positions
from logitstore.errors import BadValueError

LOGPROB_TOLERANCE = 1e-3
"""Nats a stored log-prob may lie above 0 (float rounding of a probability of about 1)."""

MASS_TOLERANCE = 1e-3
"""How far support plus tail mass may exceed 1 (float32 sums, float16 tails: < 2e-4)."""


def mass_columns(width: int, exhaustive: bool) -> tuple[np.ndarray, np.ndarray]:
    """Columns whose least probabilities, times the weights, bound a sorted row's mass below.

    Exhaustive: every column, weight 1 (the mass itself). Otherwise the last column of each
    segment ``[0, 1), [1, 4), [4, 16), [16, 64), ...``, weighted by the segment's length: each
    entry of a segment holds at least the segment's last entry's probability.
    """
    if exhaustive:
        return np.arange(width), np.ones(width, dtype=np.float32)
    ends = [1]
    while ends[-1] < width:
        ends.append(min(4 * ends[-1], width))
    return np.asarray(ends) - 1, np.diff([0, *ends]).astype(np.float32)


def support_mass(codec: Codec, pos: Positions, exhaustive: bool = False) -> np.ndarray:
    """Float32 ``(P,)`` lower bound on each position's support mass (exact when exhaustive)."""
    lp = pos.support_logprobs
    if lp.shape[1] == 0:
        return np.zeros(lp.shape[0], dtype=np.float32)
    cols, weights = mass_columns(lp.shape[1], exhaustive)
    first = lp[:, 0]
    if exhaustive:
        return codec.least_probs(lp, first[:, None]) @ weights
    # Column by column: (P,) vectors that stay in cache, and no (P, columns) copy. The first
    # column is the first entry itself: its least probability is a fixed share of exp(first).
    zero = np.zeros(1, dtype=np.float32)
    total = np.exp(first)
    total *= codec.least_probs(zero, zero)[0]
    for col, weight in zip(cols[1:], weights[1:]):
        least = codec.least_probs(lp[:, col], first)
        least *= weight
        total += least
    return total


def _ok(
    pos: Positions,
    codec: Codec,
    vocab_size: int,
    exhaustive: bool,
    ids_checked: bool,
    support: np.ndarray | None,
) -> bool:
    """Whether every position passes, in a few whole-array reductions (no per-row work)."""
    if len(pos) == 0:
        return True
    tol, lp = LOGPROB_TOLERANCE, pos.support_logprobs
    # A NaN makes max() NaN, and every comparison with NaN is False. The log-probs (decoded
    # last, so still in cache) are read before the ids.
    ok = lp.size == 0 or (lp[:, 0] if codec.first_is_max else lp).max() <= tol
    ok = ok and pos.label_logprob.max() <= tol and pos.tail_logmass.max() <= tol
    ok = ok and (pos.tail_logsumexp.size == 0 or pos.tail_logsumexp.max() < np.inf)
    ok = ok and pos.entropy.min() >= -tol and pos.entropy.max() < np.inf
    if ok:
        if support is None or exhaustive:
            support = support_mass(codec, pos, exhaustive)
        mass = support + np.exp(pos.tail_logmass)
        ok = mass.max() <= 1 + MASS_TOLERANCE
    if ok and pos.support_counts is not None:
        ok = bool((pos.support_counts.sum(axis=1) == pos.support_counts.shape[1]).all())
    # Decoders never give ids below -1 (gaps are non-negative): only the largest is compared.
    ids = pos.support_ids
    ok = ok and (ids_checked or ids.size == 0 or ids.max() < vocab_size)
    # A sort of every row: verify's alone (training refuses a repeated id in its batch).
    ok = ok and not (exhaustive and repeated_ids(ids).any())
    return bool(ok)


def repeated_ids(ids: np.ndarray) -> np.ndarray:
    """Bool ``(P,)``: rows of ``ids`` that hold a token id twice (padding ``-1`` aside). A
    repeated id would be two buckets of one token, its mass counted twice."""
    if ids.ndim != 2 or ids.shape[1] < 2:
        return np.zeros(len(ids), dtype=bool)
    ordered = np.sort(ids, axis=1)
    return ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)


def _problems(
    pos: Positions, codec: Codec, vocab: int, exhaustive: bool
) -> Iterator[tuple[str, Any, str]]:
    """``(field, bad rows, what is expected)`` for each rule, in the order they are reported."""
    tol = LOGPROB_TOLERANCE
    ids, lp = pos.support_ids, pos.support_logprobs
    padding = (ids == -1) & (lp == -np.inf)
    bad_ids = ((ids < 0) & ~padding) | (ids >= vocab)
    yield "support_ids", bad_ids.any(axis=1), f"token ids in [0, {vocab})"
    if exhaustive:
        yield "support_ids", repeated_ids(ids), "distinct token ids in a position's support"
    yield "support_logprobs", ~(lp <= tol).all(axis=1), "log-probabilities <= 0, not NaN"
    yield "label_logprob", ~(pos.label_logprob <= tol), "a log-probability <= 0, not NaN"
    yield "tail_logmass", ~(pos.tail_logmass <= tol), "a log-probability <= 0, not NaN"
    yield "tail_logsumexp", ~(pos.tail_logsumexp < np.inf).all(axis=1), "finite or -inf"
    yield "entropy", ~((pos.entropy >= -tol) & (pos.entropy < np.inf)), "a finite entropy >= 0"
    if pos.support_counts is not None:
        n = pos.support_counts.shape[1]
        yield "support_counts", pos.support_counts.sum(axis=1) != n, f"draw counts summing to {n}"
    with np.errstate(invalid="ignore", over="ignore"):
        mass = support_mass(codec, pos, exhaustive=True) + np.exp(pos.tail_logmass)
    yield "support and tail mass", ~(mass <= 1 + MASS_TOLERANCE), "a total of at most 1"


def _found(pos: Positions, codec: Codec, field: str, row: int, expected: str) -> str:
    if field == "support and tail mass":
        one = pos.slice(row, row + 1)
        return f"{float(support_mass(codec, one, True)[0] + np.exp(one.tail_logmass[0])):.6g}"
    arr: Any = pos.support_counts if field == "support_counts" else getattr(pos, field)
    value = arr[row]
    if value.ndim == 0:
        return f"{float(value):.6g}"
    if field == "support_ids" and expected.startswith("distinct"):
        ids, counts = np.unique(value[value >= 0], return_counts=True)
        return f"id {int(ids[counts > 1][0])} {int(counts.max())} times"
    if field == "support_ids":
        return f"{value.min()} .. {value.max()}"
    if field == "support_counts":
        return f"a sum of {int(value.sum())}"
    finite = np.isnan(value) | (value > LOGPROB_TOLERANCE)
    return f"{value[finite][0] if finite.any() else value.max():.6g}"


def check_positions(
    codec: Codec,
    pos: Positions,
    vocab_size: int,
    *,
    exhaustive: bool = False,
    ids_checked: bool = False,
    support_mass: np.ndarray | None = None,
) -> None:
    """Raise :class:`BadValueError` for the first position whose values the format forbids.

    Args:
        codec: the codec that decoded ``pos`` (it says how exact its values are).
        pos: positions as ``codec.decode`` returned them (the checks rely on how decoders
            lay them out: sorted most probable first, ids never below -1).
        vocab_size: the store's vocabulary size ``V``.
        exhaustive: sum every support column for the mass check (``verify``); otherwise a
            lower bound from a few columns (reading, training).
        ids_checked: the decoder has compared every id with ``vocab_size`` already.
        support_mass: float32 ``(P,)``, a lower bound of each position's support mass the
            decoder computed (from its codes, in cache), used instead of :func:`support_mass`.

    Raises:
        BadValueError: with ``row`` (position index in ``pos``) and ``field``; the message
            says what was expected and what was found.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        if _ok(pos, codec, vocab_size, exhaustive, ids_checked, support_mass):
            return
        first: tuple[int, str, str] | None = None
        for field, bad, expected in _problems(pos, codec, vocab_size, exhaustive):
            rows = np.flatnonzero(bad)
            if rows.size and (first is None or rows[0] < first[0]):
                first = (int(rows[0]), field, expected)
    if first is None:  # only the cheap bound failed; the exact sums pass
        return
    row, field, expected = first
    raise BadValueError(
        f"{field}: expected {expected}, found {_found(pos, codec, field, row, expected)}",
        row,
        field,
    )
