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

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logitstore._format_json import dumps, first_difference, loads, normalize
from logitstore._format_paths import MAX_NAME_BYTES, MAX_PATH_BYTES, check_relative_path
from logitstore._format_schema import (
    _TEMPERATURES,
    LEGACY_TEMPERATURES_KEY,
    MANIFEST_FIELDS,
    MANIFEST_SCHEMA,
    MANIFEST_SCHEMA_V1,
    MAX_COUNT,
    MAX_EXPANSION,
    MAX_FILES_PER_SHARD,
    MAX_READ_EXPANSION,
    MAX_SHARDS,
    MAX_TEMPERATURES,
    MAX_VOCAB_SIZE,
    RECORD_SCHEMA,
    SHARD_FIELDS,
    SHARD_SCHEMA,
)
from logitstore.errors import ConfigError, FormatVersionError, ManifestError, shown

__all__ = [
    "CLAIMS_DIR",
    "FORMAT_VERSION",
    "LEGACY_TEMPERATURES_KEY",
    "MANIFEST_FIELDS",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMA_V1",
    "MAX_COUNT",
    "MAX_EXPANSION",
    "MAX_FILES_PER_SHARD",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_READ_EXPANSION",
    "MAX_SHARDS",
    "MAX_TEMPERATURES",
    "MAX_VOCAB_SIZE",
    "METADATA_KEYS",
    "RECORDS_DIR",
    "RECORD_SCHEMA",
    "SETTINGS_NAME",
    "SHARDS_DIR",
    "SHARD_FIELDS",
    "SHARD_SCHEMA",
    "SUPPORTED_FORMAT_VERSIONS",
    "build_manifest",
    "build_settings",
    "check_declared_sizes",
    "check_format_version",
    "check_relative_path",
    "check_temperatures",
    "claim_name",
    "dumps",
    "expansion_problem",
    "first_difference",
    "loads",
    "normalize",
    "record_index",
    "record_name",
    "shard_name",
    "stored_bytes",
    "tail_temperatures",
    "validate_manifest",
    "validate_record",
]

FORMAT_VERSION = 2
"""Version of the store layout this code writes; bumped on incompatible changes.

Version 2 made the extra capture temperatures a format field (``tail_temperatures``); version
1 kept them in the pipeline's ``capture`` section. :func:`tail_temperatures` reads both."""

SUPPORTED_FORMAT_VERSIONS = (1, 2)

MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "settings.json"
RECORDS_DIR = "records"
CLAIMS_DIR = "claims"
SHARDS_DIR = "shards"

METADATA_KEYS = ("teacher", "tokenizer", "capture", "source")
"""Sections the teacher pass supplies; copied verbatim into settings and manifest. The format
gives meaning to none of their keys."""

_SCHEMAS = {1: MANIFEST_SCHEMA_V1, FORMAT_VERSION: MANIFEST_SCHEMA}

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


def build_settings(
    *,
    codec_json: Mapping[str, Any],
    backend: str,
    vocab_size: int,
    metadata: Mapping[str, Any],
    temperatures: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The settings every shard of one store shares; written at creation, compared on resume.

    Args:
        codec_json: the codec's manifest entry.
        backend: backend name.
        vocab_size: the teacher's true vocabulary size.
        metadata: the ``teacher``, ``tokenizer``, ``capture`` and ``source`` sections.
        temperatures: the extra capture temperatures, one per ``tail_logsumexp`` column, in
            column order (temperature 1 is always captured and not listed). ``None`` takes them
            from ``metadata["capture"]["temperatures"]`` where format version 1 kept them
            (moved out of ``capture``), else none.

    Raises:
        ConfigError: a metadata section is missing or not a dict, ``vocab_size`` < 1, or bad
            temperatures (see :func:`check_temperatures`), or two different lists given.
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
    capture = dict(metadata["capture"])
    legacy = capture.pop(LEGACY_TEMPERATURES_KEY, None)
    if temperatures is None:
        temperatures = legacy if legacy is not None else []
    elif legacy is not None and normalize(legacy) != normalize(list(temperatures)):
        raise ConfigError(
            f"temperatures given twice, as {list(temperatures)} and as capture.temperatures "
            f"{legacy!r}; give them once, as temperatures"
        )
    settings = {
        "format_version": FORMAT_VERSION,
        "codec": dict(codec_json),
        "backend": backend,
        "vocab_size": int(vocab_size),
        "tail_temperatures": check_temperatures(temperatures),
        **{key: metadata[key] for key in METADATA_KEYS},
        "capture": capture,
    }
    return normalize(settings)


def check_temperatures(temperatures: Any) -> list[float]:
    """The extra capture temperatures as floats, validated as the manifest's field is.

    Raises:
        ConfigError: not a list of at most :data:`MAX_TEMPERATURES` distinct finite numbers
            > 0 (naming the bad item).
    """
    if isinstance(temperatures, tuple):
        temperatures = list(temperatures)
    try:
        _TEMPERATURES.check(temperatures, "temperatures")
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    return [float(t) for t in temperatures]


def tail_temperatures(manifest: Mapping[str, Any]) -> list[float] | None:
    """The store's extra capture temperatures: column ``j`` of ``tail_logsumexp`` is at
    temperature ``tail_temperatures(manifest)[j]``. The one accessor for every reader.

    Reads ``tail_temperatures`` (format 2) or ``capture.temperatures`` (format 1) of a
    validated manifest (or settings). Returns ``None`` for a format 1 store that stored
    columns without listing their temperatures (a caller then cannot use them by temperature).
    """
    if manifest.get("format_version") != 1:
        return [float(t) for t in manifest["tail_temperatures"]]
    listed = manifest.get("capture", {}).get(LEGACY_TEMPERATURES_KEY)
    if listed is not None:
        return [float(t) for t in listed]
    return [] if manifest.get("num_temperatures", 0) == 0 else None


def check_format_version(data: Mapping[str, Any], what: str) -> None:
    """Raise ``FormatVersionError`` unless the file's format version is one this code reads."""
    if "format_version" not in data:
        raise ManifestError(f"{what} is missing the field 'format_version'")
    version = data["format_version"]
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise FormatVersionError(
            f"{what} has format version {shown(version)}; this reader supports "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
        )


def validate_manifest(data: Mapping[str, Any]) -> None:
    """Check a parsed manifest against :data:`MANIFEST_SCHEMA`, its paths and its counts.

    The codec's configuration is checked by the codec when the reader resolves it, and the
    declared sizes against the codec's row size by :func:`check_declared_sizes`.

    Raises:
        FormatVersionError: unknown format version (checked first: a future manifest may
            legitimately lack today's fields).
        ManifestError: a field missing, of the wrong type or out of its range; the message
            names the field (``shards[3].tokens``). Counts that disagree with each other or
            with the shard's arrays are a ``CorruptShardError`` when the shard is read.
        UnsafePathError: a shard or file path that could escape the store's root.
    """
    check_format_version(data, MANIFEST_NAME)
    _SCHEMAS[data["format_version"]].check(data, MANIFEST_NAME)
    for j, shard in enumerate(data["shards"]):
        where = f"{MANIFEST_NAME} field shards[{j}]"
        check_relative_path(shard["path"], f"{where}.path")
        for i, (name, _) in enumerate(shard["files"]):
            check_relative_path(name, f"{where}.files[{i}]")
    temperatures = tail_temperatures(data)
    if temperatures is not None and len(temperatures) != data["num_temperatures"]:
        field = "tail_temperatures" if data["format_version"] != 1 else "capture.temperatures"
        raise ManifestError(
            f"{MANIFEST_NAME} field {field}: expected num_temperatures = "
            f"{data['num_temperatures']} temperatures, found {len(temperatures)}"
        )


def validate_record(data: Mapping[str, Any], what: str) -> None:
    """Check a parsed commit record against :data:`RECORD_SCHEMA` and its paths, before a
    writer assembles a manifest from it (a resumed store's records are files like any other).

    Raises:
        ManifestError: a field missing, of the wrong type or out of its range, named.
        UnsafePathError: a shard or file path that could escape the store's root.
    """
    RECORD_SCHEMA.check(data, what)
    check_relative_path(data["path"], f"{what} field path")
    for i, (name, _) in enumerate(data["files"]):
        check_relative_path(name, f"{what} field files[{i}]")


def stored_bytes(
    positions: int, tokens: int, documents: int, position_bytes: int, token_bytes: int
) -> int:
    """A shard's arrays, uncompressed: its positions, token ids and int64 document offsets."""
    return positions * position_bytes + tokens * token_bytes + 8 * (documents + 1)


def expansion_problem(
    shard: Mapping[str, Any], position_bytes: int, decoded_bytes: int, token_bytes: int
) -> str | None:
    """What is wrong with a shard's counts against its bytes on disk, or ``None``.

    Args:
        shard: a shard entry or record: ``positions``, ``tokens``, ``documents``, ``files``.
        position_bytes: stored bytes of one position (codec fields and loss mask).
        decoded_bytes: bytes of one position once decoded (``Codec.decoded_bytes``).
        token_bytes: stored bytes of one token id.
    """
    on_disk = sum(size for _, size in shard["files"])
    stored = stored_bytes(
        shard["positions"], shard["tokens"], shard["documents"], position_bytes, token_bytes
    )
    counts = (
        f"{shard['positions']} positions, {shard['tokens']} tokens and "
        f"{shard['documents']} documents"
    )
    if stored > MAX_EXPANSION * on_disk:
        return (
            f"expected at most {MAX_EXPANSION} times the shard's {on_disk} bytes on disk "
            f"uncompressed, found {counts} ({stored} bytes)"
        )
    read = stored + shard["positions"] * decoded_bytes
    if read > MAX_READ_EXPANSION * on_disk:
        return (
            f"expected at most {MAX_READ_EXPANSION} times the shard's {on_disk} bytes on disk "
            f"decoded, found {counts} ({read} bytes once decoded)"
        )
    return None


def check_declared_sizes(
    shards: Sequence[Mapping[str, Any]],
    position_bytes: int,
    token_bytes: int,
    decoded_bytes: int = 0,
) -> None:
    """Refuse shards whose declared arrays are far larger than their files.

    Readers size arrays from the manifest's counts before the chunks are decompressed, so
    the counts are bounded first: uncompressed, a shard's arrays may be at most
    :data:`MAX_EXPANSION` times its bytes on disk, and decoded at most
    :data:`MAX_READ_EXPANSION` times.

    Args:
        shards: the manifest's validated shard entries.
        position_bytes: stored bytes of one position (codec fields and loss mask).
        token_bytes: stored bytes of one token id.
        decoded_bytes: bytes of one position once decoded (``Codec.decoded_bytes``).

    Raises:
        ManifestError: naming the shard's field.
    """
    for j, shard in enumerate(shards):
        problem = expansion_problem(shard, position_bytes, decoded_bytes, token_bytes)
        if problem is not None:
            raise ManifestError(f"{MANIFEST_NAME} field shards[{j}].positions: {problem}")


def build_manifest(
    settings: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    num_temperatures: int,
    fidelity: Mapping[str, Any] | None,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest from the settings and the shard records, in shard order.

    Args:
        settings: as :func:`build_settings` returned them.
        records: one per shard ``0..N-1``, as ``StoreWriter.write_shard`` returned them.
        num_temperatures: number of extra capture temperatures (trailing size of the
            tail log-sum-exp field).
        fidelity: store-wide fidelity summary, or ``None`` when no shard measured any.
        run: how the store was written (e.g. the teacher's placement): information, never a
            setting a resume must match, and nothing a reader needs; ``None`` for none.
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
    if run:
        manifest["run"] = dict(run)
    return normalize(manifest)
