"""The windows of a :class:`~logitstore.dataset.StoreDataset` stream's plan: a few shards each,
whose order and document indices are built when the stream reaches them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class _Window:
    """Shards to decode and the global indices of the documents to emit, in order.

    An epoch's plan holds each window's count only: its shards' order and its indices are built
    when the stream reaches it (or fetches ahead into it) and released once it is read, so a
    loader holds a window or two of indices, never an epoch's.

    Attributes:
        count: the documents this stream emits from the window.
    """

    def __init__(self, count: int, build: Callable[[], tuple[list[int], np.ndarray]]) -> None:
        self.count = count
        self._build = build
        self._built: tuple[list[int], np.ndarray] | None = None

    def _get(self) -> tuple[list[int], np.ndarray]:
        if self._built is None:
            self._built = self._build()
        return self._built

    @property
    def shards(self) -> list[int]:
        """The shards in the order their documents first come (read and fetched in it)."""
        return self._get()[0]

    @property
    def docs(self) -> np.ndarray:
        """Global indices of the documents to emit, in order."""
        return self._get()[1]

    def release(self) -> None:
        self._built = None
