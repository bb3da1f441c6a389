"""Canonical JSON of the store's files: written byte for byte the same, parsed strictly, compared
field by field. ``logitstore.format`` re-exports every public name."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from logitstore.errors import ConfigError, ManifestError, shown


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays arrive from statistics and fidelity sums.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, two-space indent, trailing newline, strict floats.

    Raises:
        ConfigError: ``obj`` holds something JSON cannot represent (objects, NaN, Inf).
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"metadata must be plain JSON (dicts, lists, str, finite numbers): {exc}"
        ) from None
    return (text + "\n").encode()


def normalize(obj: Any) -> Any:
    """``obj`` as it reads back from canonical JSON (tuples become lists, numpy becomes Python)."""
    return json.loads(dumps(obj))


def loads(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, refusing anything else.

    Args:
        raw: the file's bytes.
        what: file name for the error message.

    Raises:
        ManifestError: not UTF-8 JSON, or not an object. ``NaN``, ``Infinity`` and numbers
            too large for a float (``1e999``) are refused too.
    """

    non_finite: list[str] = []  # parsed (so the field can be named), then refused

    def _constant(name: str) -> float:
        non_finite.append(name)
        return math.nan

    def _float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999 parses to inf
            non_finite.append(text[:20])
        return value

    repeated: list[str] = []  # keys given twice in one object: parsed, then refused

    def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs) and not repeated:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                    break
                seen.add(key)
        return out

    try:
        data = json.loads(
            raw.decode("utf-8"),
            parse_constant=_constant,
            parse_float=_float,
            object_pairs_hook=_object,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    if repeated:
        # JSON leaves a repeated key's meaning open: another reader (a checker, the Hub's
        # viewer) may take the first value where Python takes the last
        raise ManifestError(
            f"{what} is not valid JSON: the key {shown(repeated[0])} appears twice in one object; "
            "the format writes each key once"
        )
    if non_finite:
        raise ManifestError(
            f"{what} is not valid JSON: field {_first_non_finite(data)} holds {non_finite[0]}; "
            "the format allows finite numbers only"
        )
    if _SURROGATE_ESCAPE.search(raw):  # (rare: then every string is checked)
        bad = _first(data, _not_unicode)
        if bad is not None:
            raise ManifestError(
                f"{what} is not valid JSON: field {bad} holds a lone surrogate (\\ud800 to "
                "\\udfff not in a pair), which is not Unicode text"
            )
    if not isinstance(data, dict):
        raise ManifestError(f"{what} must hold a JSON object, found {type(data).__name__}")
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: valid in a pair (one character), alone it parses to a
string no UTF-8 writer takes (printing it, writing a dataset card or a Parquet column fails)."""


def _not_unicode(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first_non_finite(data: Any) -> str:
    """Path (``a.b[2]``) of the first non-finite float in parsed JSON, walked without recursion."""
    found = _first(data, lambda v: isinstance(v, float) and not math.isfinite(v))
    return "<unknown>" if found is None else found


def _first(data: Any, bad: Any) -> str | None:
    """Path (``a.b[2]``) of the first value (or key) for which ``bad`` holds, walked without
    recursion."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if bad(value):
            return path or "<root>"
        if isinstance(value, dict):
            for key in value:
                if bad(key):
                    return (f"{path}." if path else "") + json.dumps(key)
            # (a key as the schema's messages name it: quoted unless a plain name)
            keys = [k if k.isidentifier() else json.dumps(k) for k in value]
            items = [(f"{path}.{k}" if path else k, v) for k, v in zip(keys, value.values())]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def first_difference(expected: Any, found: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path (in sorted order) where two JSON values differ, with both values.

    Returns:
        ``(path, expected_value, found_value)``, or ``None`` when equal. A key present on one
        side only reports ``"<missing>"`` for the other.
    """
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in expected:
                return sub, "<missing>", found[key]
            if key not in found:
                return sub, expected[key], "<missing>"
            diff = first_difference(expected[key], found[key], sub)
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(found, list):
        for i, (a, b) in enumerate(zip(expected, found)):
            diff = first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        if len(expected) != len(found):
            return f"{path}.length", len(expected), len(found)
        return None
    if expected != found or type(expected) is not type(found):
        return path or "<root>", expected, found
    return None
