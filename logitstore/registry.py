"""One explicit name-to-object registry per family (codecs, backends, divergences)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from logitstore.errors import UnknownNameError, shown

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping whose lookups fail with the list of known names.

    Args:
        family: what the entries are ("codec", "backend", ...), used in error messages.
        entries: name to object, filled in one readable block by the family's package.
    """

    def __init__(self, family: str, entries: Mapping[str, T]) -> None:
        self.family = family
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"unknown {self.family} {shown(name)}; known: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
