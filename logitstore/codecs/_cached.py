"""Codec set-up once per manifest codec entry, not once per open of a store.

A fitted id order is thousands of ids for the codec class to validate; codecs are frozen, so
every store written with one codec entry (and vocabulary and temperature count) shares one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from logitstore.codecs import codec_from_json
from logitstore.codecs.base import Codec, FieldSpec


def codec_and_specs(
    entry: Mapping[str, Any], vocab_size: int, num_temperatures: int
) -> tuple[Codec, dict[str, FieldSpec]]:
    """The codec of a manifest's codec entry and its field specs (built once per entry)."""
    return _built(_Entry(entry), vocab_size, num_temperatures)


class _Entry:
    """A manifest's codec entry as a cache key: equal to another exactly when the two are the
    same JSON value (key order aside; ``1``, ``1.0`` and ``true`` differ), hashed without
    writing the entry out as text (a fitted id order is thousands of numbers)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = _frozen(value)
        self.hash = hash(self.key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Entry) and self.key == other.key


def _frozen(value: Any) -> Any:
    """A hashable, type-exact form of a parsed JSON value."""
    if isinstance(value, dict):
        return (dict, tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, list):
        items = tuple(value)
        types = tuple(map(type, items))
        if set(types) <= {int, float, str, bool, type(None)}:
            return (list, items, types)  # a flat list (an id order): no call per item
        return (list, tuple(_frozen(v) for v in value))
    return (type(value), value)


@functools.lru_cache(maxsize=16)
def _built(
    entry: _Entry, vocab_size: int, num_temperatures: int
) -> tuple[Codec, dict[str, FieldSpec]]:
    """The codec of a manifest's codec entry and its field specs.

    Built once per entry and shape, not per open: a fitted id order is thousands of ids to
    validate, and codecs are frozen, so stores written with one codec share it.
    """
    codec = codec_from_json(entry.value)
    return codec, codec.fields(vocab_size, num_temperatures)
