"""Reading budget: what a store's bytes may make a reader allocate, checked before allocating.

A store from the Hub or a bucket is a stranger's bytes. Every size a reader allocates from is
first bounded by bytes actually present: JSON files by a size and a nesting depth, a shard's
arrays by a multiple of its bytes on disk (``format.MAX_EXPANSION``), and every compressed
frame by the size of the chunk it must decode to. The checks are per file or per frame, never per value, so reading stays as
fast as it was.
"""

from __future__ import annotations

import re

import numpy as np

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (the manifest: about 1 KB per shard, plus a codec's id list)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and lists in any JSON file (real files nest fewer than 8)."""

MAX_JSON_EXPANSION = 12
"""Parsed, a JSON file may take about this many times its bytes (plus a MiB): Python's objects
for ``{}`` take 24 times the three bytes that spell one, so a file within the size limit
could otherwise parse to gigabytes. Ours take 2-5 times their bytes."""

_CONTAINER_COST = 160
"""Bytes one parsed object or list may take (a dict of one key: 184, a list: 56 and up)."""

_ITEM_COST = 64
"""Bytes one item or key may take, counted per ``,`` and ``:`` (a two-letter str: 51 bytes,
a float 24, each with its 8-byte slot, and a dict entry per key)."""


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_SEPARATOR = np.zeros(256, dtype=bool)
_SEPARATOR[list(b",:")] = True
_BLOCK = 1 << 20


def _parsed_cost(containers: int, items: int) -> int:
    return _CONTAINER_COST * containers + _ITEM_COST * items


def json_problem(raw: bytes, max_bytes: int = MAX_JSON_BYTES) -> str | None:
    """Why ``raw`` is refused before parsing (too large, too deeply nested, or of so many
    small values that parsing it would take more than :data:`MAX_JSON_EXPANSION` times its
    bytes), or ``None``.

    Python's parser recurses once per level (``RecursionError`` at about a thousand), so
    depth is measured first, on the bytes: brackets inside strings do not count, nor do
    commas and colons for the parsed size. A few vectorised passes, milliseconds for a
    large manifest.
    """
    if len(raw) > max_bytes:
        return f"holds {len(raw)} bytes, more than the {max_bytes} a reader accepts"
    budget = MAX_JSON_EXPANSION * len(raw) + 2**20
    brackets = raw.count(b"[") + raw.count(b"{")
    if (
        brackets <= MAX_JSON_DEPTH
        and _parsed_cost(brackets, raw.count(b",") + raw.count(b":")) <= budget
    ):
        return None  # cannot nest deeper nor hold more than it has brackets and separators
    size = len(raw)
    if b"\\" in raw:  # escaped quotes or backslashes: blank the strings out exactly
        raw = _STRING.sub(b'""', raw)
    # Block by block, carrying whether a string is open and the depth: the passes' arrays
    # stay a few MiB whatever the file's size.
    quotes = depth = deepest = containers = items = 0
    for start in range(0, len(raw), _BLOCK):
        data = np.frombuffer(raw, dtype=np.uint8, count=min(_BLOCK, len(raw) - start), offset=start)
        count = np.cumsum(data == ord('"'), dtype=np.int32)
        inside = ((count + quotes) & 1).astype(bool)
        quotes += int(count[-1])
        step = _STEP[data]
        step[inside] = 0
        levels = np.cumsum(step, dtype=np.int32)
        deepest = max(deepest, depth + int(levels.max()))
        depth += int(levels[-1])
        containers += int(np.count_nonzero(step == 1))
        items += int(np.count_nonzero(_SEPARATOR[data] & ~inside))
    if deepest > MAX_JSON_DEPTH:
        return f"nests {deepest} levels deep, more than the {MAX_JSON_DEPTH} a reader accepts"
    cost = _parsed_cost(containers, items)
    if cost > budget:
        return (
            f"holds {containers} objects and lists and {items} items in {size} bytes, "
            f"about {cost} bytes parsed, more than {MAX_JSON_EXPANSION} times its size "
            "(plus a MiB) that a reader accepts"
        )
    return None


def zstd_content_size(frame: memoryview | bytes) -> int | None:
    """The decompressed size a zstd frame declares in its header, or ``None`` if it declares none.

    Frame header (RFC 8878, 3.1.1): magic ``28 B5 2F FD``, a descriptor byte (bits 7-6: size
    of the content-size field, bit 5: single segment, bits 1-0: size of the dictionary id), an
    optional window byte, the dictionary id, then the content size (little endian; a 2-byte
    field stores ``size - 256``).
    """
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    single = (descriptor >> 5) & 1
    width = (single, 2, 4, 8)[descriptor >> 6]
    at = 5 + (1 - single) + (0, 1, 2, 4)[descriptor & 3]
    if width == 0 or len(frame) < at + width:
        return None
    size = int.from_bytes(bytes(frame[at : at + width]), "little")
    return size + 256 if width == 2 else size


def zstd_decode_exact(decoder: object, frame: memoryview | bytes, out: np.ndarray) -> str | None:
    """Decompress ``frame`` into ``out`` (a contiguous uint8 buffer) when it fills it exactly.

    The first frame must declare exactly ``out.nbytes``; numcodecs then refuses input whose
    frames add up to more than ``out`` (a trailing frame), and zstd itself refuses a frame
    whose content differs from its declared size. Nothing larger than ``out`` is allocated,
    whatever the frame claims.

    Returns:
        ``None`` on success, else why the frame was refused.
    """
    declared = zstd_content_size(frame)
    if declared is None:
        return "a zstd frame declares no content size"
    if declared != out.nbytes:
        return f"a zstd frame declares {declared} bytes where the chunk holds {out.nbytes}"
    try:
        decoder.decode(frame, out=out)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError) as exc:
        return f"a zstd frame does not decode ({exc})"
    return None
