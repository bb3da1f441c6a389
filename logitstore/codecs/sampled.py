"""The ``sampled`` codec: Random-Sampling KD (Anshumann et al., ACL 2025).

Per position, ``n`` ids are drawn with replacement from the teacher distribution ``p`` (with the
caller's ``torch.Generator``, so a seeded run is reproducible); the unique ids are kept with their
draw counts and their exact teacher log-probs. ``c_i / n`` is an unbiased estimate of ``p_i``;
the exact log-probs let the same ids serve as a random support for the bucket model.

Layout (per position, version 1), fixed width ``n`` with ``u <= n`` used entries first:

* ``ids0``, ``ids1``, ... uint8 ``(n,)``: the unique ids ascending, delta-coded into byte planes
  (see ``_ids.py``); padding entries store gap 0.
* ``counts`` uint8 ``(n,)`` (uint16 when ``n > 255``): draw counts, summing to ``n``; 0 marks
  padding.
* ``logprobs`` float32 ``(n,)``: exact teacher log-probs; padding stores 0.
* ``label_logprob``, ``tail_logmass``, ``tail_logsumexp``, ``entropy``: see ``_scalars.py``,
  with ``S`` the unique sampled ids.

Decode sorts by log-prob, most probable first; padding decodes to id -1, log-prob ``-inf`` and
count 0, after every used entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from logitstore.codecs import _checks, _ids, _scalars
from logitstore.codecs.base import Codec, FieldSpec, Positions
from logitstore.codecs.topk import check_size, sort_by_probability
from logitstore.errors import ConfigError

MAX_DRAWS = 2**16 - 1


@dataclass(frozen=True)
class Sampled(Codec):
    """``n`` draws with replacement from the teacher: unique ids, counts and exact log-probs.

    Args:
        n: number of draws per position.
    """

    name: ClassVar[str] = "sampled"
    version: ClassVar[int] = 1

    n: int = 50

    def __post_init__(self) -> None:
        check_size("n", self.n)
        if self.n > MAX_DRAWS:
            raise ConfigError(f"n must be at most {MAX_DRAWS} (uint16 counts), found {self.n}")

    @property
    def _count_dtype(self) -> str:
        return "uint8" if self.n <= 255 else "uint16"

    def support_size(self, vocab_size: int) -> int:
        return self.n

    @property
    def has_counts(self) -> bool:
        return True

    def fields(self, vocab_size: int, num_temperatures: int) -> dict[str, FieldSpec]:
        out = {name: FieldSpec("uint8", (self.n,)) for name in _ids.plane_names("ids", vocab_size)}
        out["counts"] = FieldSpec(self._count_dtype, (self.n,))
        out["logprobs"] = FieldSpec("float32", (self.n,))
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
        return _scalars.by_rows(
            lambda z, y: self._encode_rows(z, y, temperatures, generator), logits, labels
        )

    def _encode_rows(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperatures: Sequence[float],
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        lp = logits.log_softmax(dim=1)
        num, vocab_size = lp.shape
        if num == 0:
            draws = torch.zeros(0, self.n, dtype=torch.int64, device=lp.device)
        else:
            draws = torch.multinomial(lp.exp(), self.n, replacement=True, generator=generator)
        draws = draws.sort(dim=1).values
        is_new = torch.ones_like(draws, dtype=torch.bool)
        is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = is_new.long().cumsum(dim=1) - 1  # where each draw's unique id goes
        valid = torch.arange(self.n, device=lp.device)[None, :] < is_new.sum(dim=1, keepdim=True)
        ids = torch.zeros_like(draws).scatter_(1, slot, draws)
        ids = torch.where(valid, ids, ids[:, :1].expand_as(ids))  # padding repeats a real id
        counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
        out = _ids.encode_sorted_ids(ids, valid, "ids", vocab_size)
        out["counts"] = counts.to(torch.uint8 if self.n <= 255 else torch.uint16)
        out["logprobs"] = torch.where(
            valid, lp.gather(1, ids), torch.zeros_like(ids, dtype=lp.dtype)
        )
        out.update(_scalars.encode_scalars(lp, labels, ids, temperatures, valid)[0])
        return out

    def decode(self, fields: Mapping[str, np.ndarray], vocab_size: int | None = None) -> Positions:
        counts = np.asarray(fields["counts"]).astype(np.int32)
        valid = counts > 0
        ids = np.where(valid, _ids.decode_sorted_ids(fields, "ids"), -1)
        logprobs = np.where(valid, np.asarray(fields["logprobs"], dtype=np.float32), -np.inf)
        _, ids, logprobs, counts = sort_by_probability(-logprobs, ids, logprobs, counts)
        pos = Positions(
            support_ids=ids,
            support_logprobs=logprobs.astype(np.float32),
            support_counts=counts,
            **_scalars.decode_scalars(fields, ids.shape[0]),
        )
        if vocab_size is not None:
            _checks.check_positions(self, pos, vocab_size)
        return pos
