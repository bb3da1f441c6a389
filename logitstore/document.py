"""One stored document, as the reader returns it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitstore.codecs.base import Positions


def shown_id(doc_id: str) -> str:
    """A document id as a message quotes it: ``repr``, cut to 60 characters (an id is the
    store's string, of any length: a message must stay one line a person reads)."""
    text = repr(doc_id)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Document:
    """A tokenized document and the teacher's distribution at each of its ``T - 1`` positions.

    Position ``t`` predicts ``input_ids[t + 1]``.

    Attributes:
        doc_id: content key: source row id, window index and a hash of the token ids.
        input_ids: int64 ``(T,)``.
        loss_mask: bool ``(T - 1,)``, which positions are trained on.
        positions: the decoded teacher arrays, each with leading dimension ``T - 1``.
    """

    doc_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    positions: Positions

    @property
    def support_ids(self) -> np.ndarray:
        return self.positions.support_ids

    @property
    def support_logprobs(self) -> np.ndarray:
        return self.positions.support_logprobs

    @property
    def tail_logmass(self) -> np.ndarray:
        return self.positions.tail_logmass

    @property
    def label_logprob(self) -> np.ndarray:
        return self.positions.label_logprob

    @property
    def tail_logsumexp(self) -> np.ndarray:
        return self.positions.tail_logsumexp

    @property
    def entropy(self) -> np.ndarray:
        return self.positions.entropy

    @property
    def support_counts(self) -> np.ndarray | None:
        return self.positions.support_counts

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
