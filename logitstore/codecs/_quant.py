"""Value coding shared by the codecs: log-probs relative to the top-1, on fixed grids.

A value is stored as its distance below the position's top-1 log-prob, ``d = top1 - logp >= 0``.

Quantized options (``q8``, ``q6``, ``q4``: 256, 64 or 16 levels) map ``d`` to the nearest level
of a fixed, non-uniform grid:
code ``0`` is reserved for the top-1 itself (``d = 0`` exactly, so the decoded argmax is always the
true argmax), codes ``1 .. L-1`` sit at ``d_j = -a * ln(1 - j / (L - 1/2))``. The levels are
uniform in ``1 - exp(-d / a)``: spacing grows like ``exp(d / a)``. For a squared log-error
weighted by ``p_i = p_1 exp(-d_i)`` (KL error ``~ p_i * err^2``) and evenly spread values, the
optimal fixed-rate point density gives spacing ``~ exp(d / 3)``; the scales below were chosen
on measured KL and bytes (see ``benchmarks/bench_codecs.py``).
Values beyond the last level are clamped to it. The scale ``a`` is 4 for ``q8`` and ``q4`` and 3
for ``q6``, so the last level is ``a ln(2L - 1)``: 24.9, 14.5 and 13.7 nats below the top-1.

Float options store ``d`` itself, negated (``logp - top1 <= 0``), as float32, float16 or bfloat16
(bfloat16 travels as its raw ``uint16`` bits because numpy has no bfloat16). Every non-top-1
entry is forced strictly below zero, so the top-1 stays the unique maximum after rounding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from logitstore.errors import ConfigError, shown

# (levels, compander scale a) per quantized option; part of the codec version.
GRIDS: dict[str, tuple[int, float]] = {"q8": (256, 4.0), "q6": (64, 3.0), "q4": (16, 4.0)}
FLOAT_VALUES = ("float32", "float16", "bfloat16")
VALUE_OPTIONS = (*GRIDS, *FLOAT_VALUES)


def check_values(values: str) -> None:
    if values not in VALUE_OPTIONS:
        raise ConfigError(f"values must be one of {list(VALUE_OPTIONS)}, found {shown(values)}")


def grid(values: str) -> np.ndarray:
    """Level distances ``d_j`` (float64 ``(L,)``, ``d_0 = 0``) of a quantized option."""
    levels, a = GRIDS[values]
    j = np.arange(levels, dtype=np.float64)
    return -a * np.log1p(-j / (levels - 0.5))


def grid_max(values: str) -> float:
    """The largest representable distance below the top-1 for a quantized option."""
    levels, a = GRIDS[values]
    return a * math.log(2 * levels - 1)


def quantize(d: torch.Tensor, is_top1: torch.Tensor, values: str) -> torch.Tensor:
    """Codes (uint8, same shape as ``d``) of distances ``d >= 0`` below the top-1.

    Args:
        d: float32 ``(...)`` distances ``top1 - logp``.
        is_top1: bool ``(...)``, the one entry per row that gets code 0.
        values: ``"q8"``, ``"q6"`` or ``"q4"``.
    """
    g = torch.as_tensor(grid(values), dtype=torch.float32, device=d.device)
    mids = (g[1:-1] + g[2:]) / 2  # boundaries between levels 1..L-1
    codes = torch.bucketize(d.contiguous(), mids) + 1
    codes = torch.where(is_top1, torch.zeros_like(codes), codes)
    return codes.to(torch.uint8)


def dequantize(codes: np.ndarray, values: str) -> np.ndarray:
    """Distances (float32) of uint8 codes produced by :func:`quantize` (a code beyond the grid,
    which only a damaged row has, decodes at the last level)."""
    return _byte_table(values)[np.asarray(codes, dtype=np.uint8)]


@functools.cache
def _byte_table(values: str) -> np.ndarray:
    """The float32 distance of every byte, the grid's last level past its end: indexing it
    with the codes allocates the output alone (``np.take`` makes an int64 copy of them)."""
    g = grid(values).astype(np.float32)
    table = np.full(256, g[-1], dtype=np.float32)
    table[: len(g)] = g
    table.flags.writeable = False
    return table


_FLOAT_ROUNDING = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
"""Relative rounding of a stored float distance, with a factor 2 to spare."""


def least_probs(logprobs: np.ndarray, first: np.ndarray, values: str) -> np.ndarray:
    """The least true probability each decoded log-prob can stand for (float32).

    Args:
        logprobs: float32 decoded log-probs ``top1 - d``, ``(P, m)`` or one column ``(P,)``.
        first: float32 each row's top-1 log-prob (its first decoded entry), broadcastable
            against ``logprobs``: ``(P, 1)``, or ``(P,)`` for one column.
        values: the value option that decoded them.

    A quantized level ``d_j`` stands for every distance up to the midpoint
    ``u_j = (d_j + d_{j+1}) / 2`` (beyond the last level: probability 0). On the grid,
    ``exp(-d_j / a) = 1 - j / (L - 1/2)``, so ``exp(top1 - u_j) = (s (s - c))^(a / 2)`` with
    ``s = exp(logp / a)`` and ``c = exp(top1 / a) / (L - 1/2)``: one ``exp`` per value and no
    table (the top-1's own level gets slightly less than its probability: a lower bound
    still). A float value was rounded to nearest, so ``d_true <= d (1 + rounding)``.
    """
    f = first
    if values not in GRIDS:
        eps = _FLOAT_ROUNDING[values]
        x = np.multiply(logprobs, 1 + eps, dtype=np.float32)
        x -= eps * f
        return np.exp(x, out=x)
    levels, a = GRIDS[values]
    s = np.multiply(logprobs, 1 / a, dtype=np.float32)
    np.exp(s, out=s)
    x = s - np.exp(f / a) / (levels - 0.5)
    np.maximum(x, 0.0, out=x)
    x *= s
    if a == 4.0:
        return np.square(x, out=x)
    return np.power(x, a / 2, out=x)


def least_table(values: str) -> np.ndarray:
    """Float32 ``(L,)``: the least ``exp(-d_true)`` each code of a grid stands for: 1 for the
    top-1's code 0, ``exp(-(d_j + d_{j+1}) / 2)`` for a level ``j``, 0 for the last level."""
    g = grid(values)
    edges = np.exp(-(g[1:-1] + g[2:]) / 2)
    return np.concatenate([[1.0], edges, [0.0]]).astype(np.float32)


def float_store_dtype(values: str) -> str:
    return {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[values]


def encode_float(d: torch.Tensor, is_top1: torch.Tensor, values: str) -> torch.Tensor:
    """Store ``-d`` in a float format; non-top-1 entries stay strictly negative."""
    rel = -d.to(torch.float32)
    if values == "float32":
        tiny = torch.finfo(torch.float32).tiny
        return torch.where(is_top1, torch.zeros_like(rel), rel.clamp(max=-tiny))
    dtype = torch.float16 if values == "float16" else torch.bfloat16
    # A normal number just below zero (subnormals may be flushed to zero on some devices).
    below_zero = -torch.finfo(dtype).smallest_normal
    out = torch.where(is_top1, torch.zeros_like(rel), rel.clamp(max=below_zero)).to(dtype)
    return out.view(torch.uint16) if values == "bfloat16" else out


def decode_float(stored: np.ndarray, values: str) -> np.ndarray:
    """Distances (float32, ``>= 0``) from :func:`encode_float` output."""
    if values == "bfloat16":
        bits = stored.astype(np.uint32) << 16
        return -bits.view(np.float32)
    return -stored.astype(np.float32)
