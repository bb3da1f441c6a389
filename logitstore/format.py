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
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logitstore._schema import Int, List, Nullable, Num, Obj, Pair, Str
from logitstore.errors import (
    ConfigError,
    FormatVersionError,
    ManifestError,
    UnsafePathError,
    shown,
)

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

LEGACY_TEMPERATURES_KEY = "temperatures"
"""Where format version 1 kept the tail temperatures: ``capture.temperatures``."""

# -- the manifest's schema -----------------------------------------------------------------
# Every field a reader uses, with its type and range, checked once when a store is opened, so
# a malformed manifest (a stranger's bytes) is refused with a ManifestError naming the field,
# never an OverflowError or TypeError later. Keys not listed are allowed (optional keys are a
# compatible change) but carry no meaning.

MAX_COUNT = 2**40
"""Largest count or byte size a shard may declare (documents, tokens, positions, bytes)."""

MAX_VOCAB_SIZE = 2**24
"""Largest vocabulary a store may declare (three id planes; real vocabularies are < 2^19)."""

MAX_TEMPERATURES = 64
MAX_SHARDS = 2**20
MAX_FILES_PER_SHARD = 4096

MAX_EXPANSION = 256
"""A shard's arrays, uncompressed, may be at most this many times its bytes on disk: what the
manifest declares and what the backends decode alike.

Real shards compress 2-4x; the bound keeps a small hostile shard (millions of declared
positions, chunks left out as all fill value, a zstd bomb) from making a reader allocate
gigabytes before finding it empty or broken."""

MAX_READ_EXPANSION = 4 * MAX_EXPANSION
"""A shard's arrays with its positions as a reader decodes them (``Codec.decoded_bytes``) may
be at most this many times its bytes on disk.

Decoding expands: the dense codec's one-byte codes become an int64 id and a float32 log-prob
each, so a real dense store reads to 30 (8 bits) or 240 (4 bits) times its bytes on disk and a
top-k store to about 10. A writer stores a shard whose data compresses so well that it would
exceed either bound (long repeats of one text) without compression, so every store it writes
can be read."""


_COUNT = Int(0, MAX_COUNT)
_SOME = Int(1, MAX_COUNT)  # a shard holds at least one document, of at least one token
_FIDELITY = Nullable(Obj(values=Num()))
_TEMPERATURES = List(
    Num(positive=True),
    MAX_TEMPERATURES,
    f"a list of at most {MAX_TEMPERATURES} distinct finite numbers > 0",
    unique=True,
)

SHARD_SCHEMA = Obj(
    required={
        "path": Str(),
        "documents": _SOME,
        "tokens": _SOME,
        "positions": _COUNT,
        "bytes": _COUNT,
        "sha256": Str(r"[0-9a-f]{64}", "a SHA-256 hex digest"),
        "files": List(Pair(Str(), _COUNT), MAX_FILES_PER_SHARD, "a list of [name, size] pairs"),
    },
    optional={"index": Int(0, MAX_SHARDS), "fidelity": _FIDELITY},
)

RECORD_SCHEMA = Obj(
    required={**SHARD_SCHEMA.required, "num_temperatures": Int(0, MAX_TEMPERATURES)},
    optional=SHARD_SCHEMA.optional,
)
"""A shard's commit record (``records/<i>.json``): its manifest entry plus ``num_temperatures``."""

MANIFEST_SCHEMA = Obj(
    required={
        "format_version": Int(0, 2**31),
        "codec": Obj(
            required={"name": Str(), "version": Int(0, 2**31)},
            optional={"configuration": Obj()},
        ),
        "backend": Str(),
        "vocab_size": Int(1, MAX_VOCAB_SIZE),
        "num_temperatures": Int(0, MAX_TEMPERATURES),
        "tail_temperatures": _TEMPERATURES,
        "teacher": Obj(),
        "tokenizer": Obj(),
        "capture": Obj(),
        "source": Obj(),
        "shards": List(SHARD_SCHEMA, MAX_SHARDS, f"a list of at most {MAX_SHARDS} shards"),
        "statistics": Obj(
            required={
                "documents": _COUNT,
                "tokens": _COUNT,
                "positions": _COUNT,
                "bytes": _COUNT,
                "bytes_per_token": Num(),
                "bytes_per_position": Num(),
            },
            optional={"fidelity": _FIDELITY},
        ),
    },
    optional={"compression_level": Int(-7, 22), "run": Obj()},
)
"""The manifest of the current format version."""

MANIFEST_SCHEMA_V1 = Obj(
    required={
        **{k: v for k, v in MANIFEST_SCHEMA.required.items() if k != "tail_temperatures"},
        "capture": Obj(optional={LEGACY_TEMPERATURES_KEY: _TEMPERATURES}),
    },
    optional=MANIFEST_SCHEMA.optional,
)
"""Format version 1: no ``tail_temperatures``; ``capture.temperatures`` optional."""

_SCHEMAS = {1: MANIFEST_SCHEMA_V1, FORMAT_VERSION: MANIFEST_SCHEMA}


MANIFEST_FIELDS = tuple(MANIFEST_SCHEMA.required)
"""Top-level fields every manifest has."""

SHARD_FIELDS = tuple(SHARD_SCHEMA.required)
"""Fields every shard entry (and record) has."""

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


_GLOB = "*?[]"
"""Characters fsspec reads as a glob pattern in a path (``glob.has_magic``, and ``]``)."""
_GLOB_CHARS = re.compile(r"[*?\[\]]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


MAX_NAME_BYTES = 255
"""Longest component of a manifest path, in UTF-8 bytes (``NAME_MAX`` of common filesystems)."""

MAX_PATH_BYTES = 1024
"""Longest manifest path, in UTF-8 bytes (an S3 key's limit; ours are under 40)."""


def _shown(path: str) -> str:
    """``repr(path)``, cut to 80 characters for a message."""
    text = repr(path)
    return text if len(text) <= 80 else f"{text[:77]}... ({len(path)} characters)"


def check_relative_path(path: Any, what: str = "path") -> str:
    """Refuse a manifest path that could leave the store's root.

    Only plain relative POSIX paths of ordinary names are accepted: no absolute paths, no
    ``..`` or ``.`` components, no URLs or drive letters, no backslashes, no empty components,
    no glob or control characters, no component longer than :data:`MAX_NAME_BYTES` and no
    path longer than :data:`MAX_PATH_BYTES` (no filesystem or bucket holds such a name: each
    message naming it would be that long).

    Raises:
        UnsafePathError: with the offending path (cut to 80 characters).
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} must be a non-empty relative path, found {path!r}")
    size = len(path.encode("utf-8", "surrogatepass"))
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in path.split("/"))
    if size > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise UnsafePathError(
            f"{what} {_shown(path)} is {size} bytes long, with a name of {longest} bytes; "
            f"expected paths of at most {MAX_PATH_BYTES} bytes and names of at most "
            f"{MAX_NAME_BYTES}"
        )
    bad = (
        path.startswith("/")
        or "\\" in path
        or ":" in path  # URLs (s3://), drive letters (C:)
        or "\x00" in path
        or "~" in path.split("/")[0]
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise UnsafePathError(
            f"{what} {_shown(path)} escapes the store root; expected a relative path"
        )
    if _CONTROL.search(path):
        # a newline or an escape sequence would reach the terminal in every message naming it
        raise UnsafePathError(
            f"{what} {_shown(path)} holds a control character; expected plain file names"
        )
    if _GLOB_CHARS.search(path):
        # fsspec's cat expands these as a pattern: one file entry of "shards/**" would fetch
        # every file of a remote store, on every read of the shard
        raise UnsafePathError(
            f"{what} {_shown(path)} holds a glob character ({_GLOB}); expected plain file names"
        )
    device = next((p for p in path.split("/") if _DEVICE.fullmatch(p.split(".")[0])), None)
    if device is not None:
        # on Windows, "shards/CON.parquet" opens the console (a read that waits for typing),
        # "NUL" the null device, "COM1" a serial port: whatever folder they are in
        raise UnsafePathError(
            f"{what} {_shown(path)} names the Windows device {device!r}; expected plain file names"
        )
    return path


_DEVICE = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$) *")
"""A name Windows reads as a device, with any extension (``NUL.txt`` is ``NUL`` too)."""


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
