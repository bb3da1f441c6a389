"""The codec interface: how one position's teacher distribution becomes stored arrays.

A codec is a small frozen dataclass with validated parameters and a
``{"name", "version", "configuration"}`` JSON round trip; its parameters live in the manifest,
so a reader never needs anything else to decode.

Contract every codec meets (the conformance tests check it):

* ``encode`` runs on whatever device ``logits`` lives (the teacher pass encodes on the GPU)
  and returns a dict of tensors, every one with leading dimension ``P`` (positions) and the
  trailing shape and dtype that ``fields`` declares. Only these travel to the host.
* ``decode`` takes the same dict as numpy arrays, possibly the concatenation of many
  documents' encodings along axis 0, and returns :class:`Positions`; decoding a concatenation
  equals concatenating the decodings.
* The tail is relative to the stored support ``S`` (not ``S ∪ {y}``):
  ``tail_logmass = log(1 - sum_{i in S} p_i)`` and, for each extra temperature ``tau``,
  ``tail_logsumexp[:, j] = logsumexp_{i not in S}(logp_i / tau)``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from logitstore.errors import ConfigError, FormatVersionError, shown


@dataclass(frozen=True)
class FieldSpec:
    """One stored array: numpy dtype name and the trailing shape of each position's row."""

    dtype: str
    shape: tuple[int, ...] = ()


@dataclass
class Positions:
    """Decoded teacher information for ``P`` next-token positions (numpy, host memory).

    Attributes:
        support_ids: int64 ``(P, K)``, sorted by teacher probability, most probable first.
            Padding entries (sampled codecs, fewer unique ids than ``K``) have id ``-1`` and
            log-prob ``-inf``.
        support_logprobs: float32 ``(P, K)``, full-vocabulary log-softmax at temperature 1.
        tail_logmass: float32 ``(P,)``, ``log(1 - sum_S p)``; ``-inf`` when nothing is left.
        label_logprob: float32 ``(P,)``, teacher log-prob of the next token, always present.
        tail_logsumexp: float32 ``(P, n_temps)``, tail log-sum-exp at each extra temperature.
        entropy: float32 ``(P,)``, teacher entropy in nats.
        support_counts: int32 ``(P, K)`` draw counts for sampled codecs, else ``None``.
    """

    support_ids: np.ndarray
    support_logprobs: np.ndarray
    tail_logmass: np.ndarray
    label_logprob: np.ndarray
    tail_logsumexp: np.ndarray
    entropy: np.ndarray
    support_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.support_ids.shape[0])

    def slice(self, start: int, stop: int) -> Positions:
        """Rows ``start:stop`` of every array."""
        rows: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rows[f.name] = None if value is None else value[start:stop]
        return Positions(**rows)


@dataclass(frozen=True)
class Codec(ABC):
    """Base class of every codec. Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    version: ClassVar[int]

    @abstractmethod
    def fields(self, vocab_size: int, num_temperatures: int) -> dict[str, FieldSpec]:
        """The arrays ``encode`` returns, with dtype and per-position trailing shape."""

    @abstractmethod
    def encode(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperatures: Sequence[float] = (),
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode positions on ``logits.device``.

        Args:
            logits: float ``(P, V)`` full-vocabulary teacher logits at temperature 1, or their
                log-softmax: each row is normalised here (``_scalars.py``), so log-probs pass
                through unchanged up to float32 rounding.
            labels: int64 ``(P,)`` next-token ids.
            temperatures: extra temperatures whose tail log-sum-exp is stored.
            generator: randomness for sampled codecs (seeded by the caller for determinism).
        """

    @abstractmethod
    def decode(self, fields: Mapping[str, np.ndarray], vocab_size: int | None = None) -> Positions:
        """Decode arrays shaped as ``fields`` declares (concatenations allowed).

        Args:
            fields: the stored arrays.
            vocab_size: if given (a reader does), every decoded value is checked against the
                format's rules (``codecs/_checks.py``), partly while decoding, in cache.

        Raises:
            BadValueError: only with ``vocab_size``: the first bad position and field.
        """

    @abstractmethod
    def support_size(self, vocab_size: int) -> int:
        """``K``, the width of the decoded support (:class:`Positions`) for this vocabulary."""

    def decoded_bytes(self, vocab_size: int, num_temperatures: int) -> int:
        """Bytes of one decoded position: what a reader allocates for it, beyond the stored
        arrays (int64 ids, float32 log-probs, int32 counts where drawn, float32 scalars)."""
        per_entry = 8 + 4 + (4 if self.has_counts else 0)
        return self.support_size(vocab_size) * per_entry + 4 * (3 + num_temperatures)

    @property
    def has_counts(self) -> bool:
        """Whether decoded positions carry draw counts (``Positions.support_counts``)."""
        return False

    @property
    def first_is_max(self) -> bool:
        """Whether each position's first decoded log-prob is its largest by construction, and
        NaN wherever another one is (values decoded below an exact top-1 from a finite grid):
        then the value checks read that column alone for the sign and NaN of the support."""
        return False

    def least_probs(self, logprobs: np.ndarray, first: np.ndarray) -> np.ndarray:
        """The least true probability each decoded log-prob can stand for (float32).

        A store's mass check (``_checks.py``) counts every decoded value at this, so that
        rounding by quantization never makes a store written by ``encode`` look wrong.

        Args:
            logprobs: float32 ``(P, m)``, some columns of the decoded support log-probs, or
                one column ``(P,)``.
            first: float32, each position's first (most probable) decoded log-prob, shaped
                to broadcast against ``logprobs``: ``(P, 1)``, or ``(P,)`` for one column.

        Returns:
            float32, ``logprobs``' shape; ``exp(logprobs)`` for codecs whose values are exact.
            It depends on ``logprobs - first`` alone, times ``exp(first)``.
        """
        return np.exp(logprobs)

    def fit(self, logits: torch.Tensor, size: int = 4096) -> Codec:
        """A codec tuned on sample positions (``(P, V)`` logits or log-probs), e.g. a first batch.

        Call it before the store is created, since its parameters go into the manifest. The
        default returns ``self``; ``topk`` learns a storage order for its ids.
        """
        return self

    def unfit(self) -> Codec:
        """This codec without what :meth:`fit` learned: the settings a user asked for."""
        return self

    def to_json(self) -> dict[str, Any]:
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": self.name, "version": self.version, "configuration": config}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Codec:
        if data.get("name") != cls.name:
            raise ConfigError(f"expected codec {cls.name!r}, found {shown(data.get('name'))}")
        if data.get("version") != cls.version:
            raise FormatVersionError(
                f"codec {cls.name!r} version {shown(data.get('version'))} is not supported; "
                f"this reader knows version {cls.version}"
            )
        config = dict(data.get("configuration", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ConfigError(
                f"codec {cls.name!r} has no parameters {shown(sorted(unknown), 120)}; known: "
                f"{sorted(known)}"
            )
        return cls(**config)
