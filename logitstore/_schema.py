"""Checking parsed JSON against a small declarative schema, with errors that name the field.

A schema is a tree of :class:`Spec` nodes (``Obj``, ``List``, ``Int``, ...). ``check(value,
where)`` raises :class:`~logitstore.errors.ManifestError` for the first value that does not
fit, naming its path: ``manifest.json field shards[3].tokens: expected a non-negative integer
(at most ...), found "x"``. ``logitstore.format`` holds the manifest's schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from logitstore.errors import ManifestError


class Spec:
    """One node of the schema: ``check(value, where)`` raises ``ManifestError`` naming ``where``."""

    what = "a value"

    def check(self, value: Any, where: str) -> None:
        raise NotImplementedError

    def refuse(self, value: Any, where: str) -> NoReturn:
        raise ManifestError(f"{where}: expected {self.what}, found {_show(value)}")


class _Items(int):
    """A list's length, shown as such in a message instead of the list."""


def _show(value: Any) -> str:
    if isinstance(value, _Items):
        return f"{int(value)} items"
    if isinstance(value, (list, dict)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):  # (too deep a value: named by its type)
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Int(Spec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.what = "a non-negative integer" if lo == 0 else f"an integer >= {lo}"
        self.what += f" (at most {hi})"

    def check(self, value: Any, where: str) -> None:
        if not _is_int(value) or not self.lo <= value <= self.hi:
            self.refuse(value, where)


class Num(Spec):
    def __init__(self, positive: bool = False) -> None:
        self.positive = positive
        self.what = "a finite number" + (" > 0" if positive else "")

    def check(self, value: Any, where: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not _finite(value) or (self.positive and value <= 0):
            self.refuse(value, where)


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite float, or an int a float can hold (JSON's ``1`` followed by
    400 zeros parses to an int beyond every float, which ``math.isfinite`` cannot take)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class Str(Spec):
    def __init__(self, pattern: str | None = None, what: str = "a string") -> None:
        self.pattern = None if pattern is None else re.compile(pattern)
        self.what = what

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str) or (self.pattern and not self.pattern.fullmatch(value)):
            self.refuse(value, where)


class Nullable(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner
        self.what = f"null or {inner.what}"

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)


class List(Spec):
    """A JSON list of at most ``max_len`` items; with ``unique``, of distinct (hashable) items."""

    def __init__(self, item: Spec, max_len: int, what: str, unique: bool = False) -> None:
        self.item, self.max_len, self.what, self.unique = item, max_len, what, unique

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) > self.max_len:
            self.refuse(value if not isinstance(value, list) else _Items(len(value)), where)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")
        if self.unique:
            for i, item in enumerate(value):
                if item in value[:i]:
                    raise ManifestError(
                        f"{where}[{i}]: expected {self.what}, found {_show(item)} a second time"
                    )


class Pair(Spec):
    what = "a [name, size] pair"

    def __init__(self, first: Spec, second: Spec) -> None:
        self.items = (first, second)

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) != 2:
            self.refuse(value, where)
        for i, (spec, item) in enumerate(zip(self.items, value)):
            spec.check(item, f"{where}[{i}]")


class Obj(Spec):
    """A JSON object with ``required`` and ``optional`` keys; others pass unchecked, unless
    ``values`` is given, which every value must meet."""

    what = "an object"

    def __init__(
        self,
        required: Mapping[str, Spec] | None = None,
        optional: Mapping[str, Spec] | None = None,
        values: Spec | None = None,
    ) -> None:
        self.required, self.optional = dict(required or {}), dict(optional or {})
        self.values = values
        if values is not None:
            self.what = f"an object of {values.what.removeprefix('a ')}s"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.refuse(value, where)
        prefix = f"{where}." if " field " in where else f"{where} field "
        for key, needed in self.required.items():
            if key not in value:
                raise ManifestError(f"{where} is missing the field {key!r}; expected {needed.what}")
        for key, item in value.items():
            spec = self.required.get(key) or self.optional.get(key) or self.values
            if spec is not None:
                spec.check(item, prefix + (key if key.isidentifier() else _show(key)))
