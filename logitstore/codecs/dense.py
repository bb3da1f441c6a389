"""The ``dense`` codec: the whole vocabulary, quantized; for small vocabularies and as a reference.

Layout (per position, version 1):

* ``values`` uint8 ``(V,)``: the code of every token's distance ``d = top1 - logp`` in id order,
  on the ``q8`` grid (``bits=8``) or the ``q4`` grid (``bits=4``, one code per byte: the store's
  zstd entropy-codes the 16 symbols, and the row width stays ``V``); see ``_quant.py``.
  Code 0 marks the top-1 (exactly one per position).
* ``top1`` float32 ``()``: the top-1 log-prob, exact.
* ``label_logprob``, ``tail_logmass`` (always ``-inf``: the support is everything),
  ``tail_logsumexp`` (``-inf``), ``entropy``: see ``_scalars.py``.

Decode returns all ``V`` ids sorted by decoded log-prob, most probable first (ties by id).
Tokens further than the grid's range below the top-1 decode at the grid's last level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from logitstore.codecs import _checks, _quant, _scalars
from logitstore.codecs.base import Codec, FieldSpec, Positions
from logitstore.errors import ConfigError, shown


@dataclass(frozen=True)
class Dense(Codec):
    """Every token's log-prob, quantized to 8 or 4 bits relative to the top-1.

    Args:
        bits: 8 or 4.
    """

    name: ClassVar[str] = "dense"
    version: ClassVar[int] = 1

    bits: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (8, 4):
            raise ConfigError(f"bits must be 8 or 4, found {shown(self.bits)}")

    @property
    def _values(self) -> str:
        return f"q{self.bits}"

    def support_size(self, vocab_size: int) -> int:
        return vocab_size

    def fields(self, vocab_size: int, num_temperatures: int) -> dict[str, FieldSpec]:
        out = {"values": FieldSpec("uint8", (vocab_size,)), "top1": FieldSpec("float32")}
        out.update(_scalars.scalar_fields(num_temperatures))
        return out

    def encode(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperatures: Sequence[float] = (),
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        _scalars.check_inputs(logits, labels, temperatures)

        def scan(z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            top, arg = z.max(dim=1)
            is_top1 = torch.arange(z.shape[1], device=z.device)[None, :] == arg[:, None]
            out, norm = _scalars.encode_scalars(z, y, None, temperatures, row_max=top)
            out["values"] = _quant.quantize(top[:, None] - z, is_top1, self._values)
            out["top1"] = -norm.log_sum
            return out

        return _scalars.by_rows(scan, logits, labels)

    @property
    def first_is_max(self) -> bool:
        return True  # logp = top1 - grid[code], grid finite and >= 0, sorted

    def least_probs(self, logprobs: np.ndarray, first: np.ndarray) -> np.ndarray:
        return _quant.least_probs(logprobs, first, self._values)

    def decode(self, fields: Mapping[str, np.ndarray], vocab_size: int | None = None) -> Positions:
        codes = np.asarray(fields["values"], dtype=np.uint8)
        top1 = np.asarray(fields["top1"], dtype=np.float32)
        # Most probable first: the stable order of the codes (a radix sort of uint8) is itself
        # the ids, since column i holds token i.
        ids = np.argsort(codes, axis=1, kind="stable").astype(np.int64, copy=False)
        codes = np.sort(codes, axis=1, kind="stable")  # the codes in that order (a radix sort)
        logprobs = _quant.dequantize(codes, self._values)  # float32 distances, then in place:
        np.subtract(top1[:, None], logprobs, out=logprobs)  # (V floats a row: no second copy)
        pos = Positions(
            support_ids=ids,
            support_logprobs=logprobs,
            **_scalars.decode_scalars(fields, codes.shape[0]),
        )
        if vocab_size is not None:
            _checks.check_positions(self, pos, vocab_size)
        return pos
