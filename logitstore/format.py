"""The store's self-describing metadata: settings, per-shard records and the manifest.

A store is a directory (or fsspec URL) laid out as::

    settings.json            written once at creation: what every shard must agree on
    records/000017.json      one per committed shard; its existence is the commit point
    shards/000017.zarr/      (or shards/000017.parquet) the shard's arrays
    manifest.json            assembled last from the records by ``StoreWriter.finalize``

Every JSON file is written canonically (sorted keys, fixed indentation, no timestamps), so two
runs with the same inputs produce byte-identical stores. ``FORMAT.md`` documents the layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logitstore.errors import (
    ConfigError,
    FormatVersionError,
    ManifestError,
    UnsafePathError,
)

FORMAT_VERSION = 1
"""Version of the store layout this code writes and reads; bumped on incompatible changes."""

SUPPORTED_FORMAT_VERSIONS = (1,)

MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "settings.json"
RECORDS_DIR = "records"
CLAIMS_DIR = "claims"
SHARDS_DIR = "shards"

METADATA_KEYS = ("teacher", "tokenizer", "capture", "source")
"""Sections the teacher pass supplies; copied verbatim into settings and manifest."""

MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "codec": dict,
    "backend": str,
    "vocab_size": int,
    "num_temperatures": int,
    "teacher": dict,
    "tokenizer": dict,
    "capture": dict,
    "source": dict,
    "shards": list,
    "statistics": dict,
}

SHARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "path": str,
    "documents": int,
    "tokens": int,
    "positions": int,
    "bytes": int,
    "sha256": str,
    "files": list,
}

_SHARD_NAME = re.compile(r"^(\d{6,})\.json$")


def shard_name(index: int, suffix: str) -> str:
    """Store-relative path of shard ``index``, e.g. ``shards/000017.zarr``."""
    return f"{SHARDS_DIR}/{index:06d}{suffix}"


def record_name(index: int) -> str:
    """Store-relative path of shard ``index``'s commit record."""
    return f"{RECORDS_DIR}/{index:06d}.json"


def claim_name(index: int) -> str:
    """Store-relative path of the lock file a writer creates exclusively to own a shard."""
    return f"{CLAIMS_DIR}/{index:06d}.claim"


def record_index(filename: str) -> int | None:
    """The shard index a record file name encodes, or ``None`` for any other file."""
    m = _SHARD_NAME.match(filename)
    return int(m.group(1)) if m else None


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
        ManifestError: not UTF-8 JSON, or not an object. ``NaN``/``Infinity`` are refused too.
    """

    def _no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{what} must hold a JSON object, found {type(data).__name__}")
    return data


def check_relative_path(path: Any, what: str = "path") -> str:
    """Refuse a manifest path that could leave the store's root.

    Only plain relative POSIX paths of ordinary names are accepted: no absolute paths, no
    ``..`` or ``.`` components, no URLs or drive letters, no backslashes, no empty components.

    Raises:
        UnsafePathError: with the offending path.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} must be a non-empty relative path, found {path!r}")
    bad = (
        path.startswith("/")
        or "\\" in path
        or ":" in path  # URLs (s3://), drive letters (C:)
        or "\x00" in path
        or "~" in path.split("/")[0]
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise UnsafePathError(f"{what} {path!r} escapes the store root; expected a relative path")
    return path


def build_settings(
    *,
    codec_json: Mapping[str, Any],
    backend: str,
    vocab_size: int,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    """The settings every shard of one store shares; written at creation, compared on resume.

    Raises:
        ConfigError: a metadata section is missing or not a dict, or ``vocab_size`` < 1.
    """
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise ConfigError(f"vocab_size must be an int, found {vocab_size!r}")
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be positive, found {vocab_size}")
    for key in METADATA_KEYS:
        if not isinstance(metadata.get(key), Mapping):
            raise ConfigError(
                f"metadata[{key!r}] must be a dict; expected sections {list(METADATA_KEYS)}, "
                f"found {sorted(metadata)}"
            )
    settings = {
        "format_version": FORMAT_VERSION,
        "codec": dict(codec_json),
        "backend": backend,
        "vocab_size": int(vocab_size),
        **{key: metadata[key] for key in METADATA_KEYS},
    }
    return normalize(settings)


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


def _check_fields(data: Mapping[str, Any], fields: Mapping[str, Any], where: str) -> None:
    for key, kind in fields.items():
        if key not in data:
            raise ManifestError(f"{where} is missing the field {key!r}")
        value = data[key]
        # bool is an int in Python; a count or version of True is still malformed.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ManifestError(
                f"{where} field {key!r} must be {names}, found {type(value).__name__}"
            )


def check_format_version(data: Mapping[str, Any], what: str) -> None:
    """Raise ``FormatVersionError`` unless the file's format version is one this code reads."""
    if "format_version" not in data:
        raise ManifestError(f"{what} is missing the field 'format_version'")
    version = data["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise FormatVersionError(
            f"{what} has format version {version!r}; this reader supports "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
        )


def validate_manifest(data: Mapping[str, Any]) -> None:
    """Check a parsed manifest's structure and paths (the codec is resolved by the reader).

    Raises:
        FormatVersionError: unknown format version (checked first: a future manifest may
            legitimately lack today's fields).
        ManifestError: a required field is missing or has the wrong type, or counts are negative.
        UnsafePathError: a shard or file path that could escape the store's root.
    """
    check_format_version(data, MANIFEST_NAME)
    _check_fields(data, MANIFEST_FIELDS, MANIFEST_NAME)
    for key in ("name", "version"):
        if key not in data["codec"]:
            raise ManifestError(f"{MANIFEST_NAME} field 'codec' is missing {key!r}")
    if data["vocab_size"] < 1 or data["num_temperatures"] < 0:
        raise ManifestError(
            f"{MANIFEST_NAME}: vocab_size must be >= 1 and num_temperatures >= 0, found "
            f"{data['vocab_size']} and {data['num_temperatures']}"
        )
    for j, shard in enumerate(data["shards"]):
        where = f"{MANIFEST_NAME} shards[{j}]"
        if not isinstance(shard, dict):
            raise ManifestError(f"{where} must be an object, found {type(shard).__name__}")
        _check_fields(shard, SHARD_FIELDS, where)
        check_relative_path(shard["path"], f"{where} path")
        for item in shard["files"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)):
                raise ManifestError(f"{where} files must be [name, size] pairs, found {item!r}")
            check_relative_path(item[0], f"{where} file")
        for key in ("documents", "tokens", "positions", "bytes"):
            if shard[key] < 0:
                raise ManifestError(f"{where} {key} must be >= 0, found {shard[key]}")


def build_manifest(
    settings: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    num_temperatures: int,
    fidelity: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Assemble the manifest from the settings and the shard records, in shard order.

    Args:
        settings: as :func:`build_settings` returned them.
        records: one per shard ``0..N-1``, as ``StoreWriter.write_shard`` returned them.
        num_temperatures: number of extra capture temperatures (trailing size of the
            tail log-sum-exp field).
        fidelity: store-wide fidelity summary, or ``None`` when no shard measured any.
    """
    shards = [
        {key: rec[key] for key in (*SHARD_FIELDS, "index", "fidelity") if key in rec}
        for rec in records
    ]
    documents = sum(int(r["documents"]) for r in records)
    tokens = sum(int(r["tokens"]) for r in records)
    positions = sum(int(r["positions"]) for r in records)
    nbytes = sum(int(r["bytes"]) for r in records)
    statistics: dict[str, Any] = {
        "documents": documents,
        "tokens": tokens,
        "positions": positions,
        "bytes": nbytes,
        "bytes_per_token": (nbytes / tokens) if tokens else 0.0,
        "bytes_per_position": (nbytes / positions) if positions else 0.0,
    }
    if fidelity is not None:
        statistics["fidelity"] = dict(fidelity)
    manifest = dict(settings)
    manifest.update(
        format_version=FORMAT_VERSION,
        num_temperatures=int(num_temperatures),
        shards=shards,
        statistics=statistics,
    )
    return normalize(manifest)
