"""What a zarr shard must pass before zarr-python is given it: Zarr v3 only, metadata whose
chunks are bounded by the array they belong to, standard codecs only, and zstd frames that
cannot decompress beyond their chunk.

zarr-python sizes a chunk's buffer from the metadata and numcodecs sizes a zstd frame's output
from the frame's header, so a 100 KB shard could otherwise make it allocate gigabytes (a
``2^31`` chunk shape, a frame that declares a few GB). The fast reader in ``_zarr.py`` never
allocates beyond the expected arrays; these checks hold zarr-python to the same.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ShardingCodec, ZstdCodec
from zarr.registry import fully_qualified_name, register_codec

from logitstore.storage._limits import zstd_content_size, zstd_decode_exact
from logitstore.storage._remote import printable

CHUNK_ROWS = 4096
MAX_CHUNKS = 1 << 14
"""Most chunks one array may have (ours: one per 4096 rows, 2442 for 10M positions); zarr
holds a task per chunk while it reads."""

ZARR_V2_NAMES = frozenset({".zgroup", ".zarray", ".zattrs", ".zmetadata"})
DATA_TYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})  # fmt: skip
CODECS = frozenset({"bytes", "zstd", "crc32c", "transpose", "sharding_indexed"})
"""Codecs a reader decodes: the standard ones whose output size the chunk fixes (no blosc or
gzip, whose output only their own header or stream bounds)."""


def shown(value: Any) -> str:
    """A metadata value as a message quotes it: ``repr``, control characters escaped, cut to
    60 characters (a ``zarr.json`` may hold a list of a million items where a shape goes)."""
    text = printable(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def v2_metadata(names: Iterable[str]) -> str | None:
    """The first Zarr v2 metadata file among ``names`` (shard-relative), if any."""
    for name in names:
        if name.rpartition("/")[2] in ZARR_V2_NAMES:
            return name
    return None


def _ints(value: Any) -> list[int] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return None
    return list(value)


def _chunk_problem(chunk: Any, shape: tuple[int, ...]) -> str | None:
    """Why a chunk shape is refused for an array of ``shape`` (``None`` if accepted).

    A chunk may hold at most twice the larger of the array and one 4096-row block (zarr pads
    edge chunks, and our writer rounds a shard up to whole blocks); the array may have at
    most :data:`MAX_CHUNKS` of them.
    """
    sizes = _ints(chunk)
    if sizes is None or len(sizes) != len(shape):
        return f"chunk shape {shown(chunk)} is not {len(shape)} positive integers"
    extent = [max(1, s) for s in shape]
    bound = 2 * max(math.prod(extent), CHUNK_ROWS * math.prod(extent[1:]))
    if math.prod(sizes) > bound:
        return f"chunk shape {sizes} holds more than {bound} items, for an array of shape {shape}"
    count = math.prod(-(-e // c) for e, c in zip(extent, sizes, strict=True))
    if count > MAX_CHUNKS:
        return f"chunk shape {sizes} cuts shape {shape} into {count} chunks (at most {MAX_CHUNKS})"
    return None


def _codecs_problem(codecs: Any, chunk: list[int], depth: int = 0) -> str | None:
    if not isinstance(codecs, list) or depth > 1:
        return "codecs are not a list (or sharding is nested)"
    for codec in codecs:
        name = codec.get("name") if isinstance(codec, dict) else codec
        if name not in CODECS:
            return f"uses codec {shown(name)}; a reader decodes only {sorted(CODECS)}"
        if name != "sharding_indexed":
            continue
        conf = codec.get("configuration")
        inner = _ints(conf.get("chunk_shape")) if isinstance(conf, dict) else None
        if inner is None or len(inner) != len(chunk):
            return "sharding has no valid inner chunk shape"
        if any(c % i for c, i in zip(chunk, inner, strict=True)):
            return f"inner chunk shape {inner} does not divide the shard shape {chunk}"
        if math.prod(c // i for c, i in zip(chunk, inner, strict=True)) > MAX_CHUNKS:
            return f"inner chunk shape {inner} cuts a shard into more than {MAX_CHUNKS} chunks"
        for key in ("codecs", "index_codecs"):
            problem = _codecs_problem(conf.get(key), inner, depth + 1)
            if problem is not None:
                return problem
    return None


def _fill_fits(fill: Any, data_type: str) -> bool:
    """Whether ``fill`` is a fill value of ``data_type`` as Zarr v3 writes one (for a float type
    also ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` or its bytes in hex): zarr-python would cast
    any other with a warning, or fail."""
    if data_type == "bool":
        return isinstance(fill, bool)
    number = isinstance(fill, (int, float)) and not isinstance(fill, bool)
    if data_type.startswith(("int", "uint")):
        info = np.iinfo(data_type)
        return number and isinstance(fill, int) and info.min <= fill <= info.max
    if isinstance(fill, str):
        digits = 2 * np.dtype(data_type).itemsize
        hexed = fill[:2] == "0x" and len(fill) == 2 + digits
        return fill in ("NaN", "Infinity", "-Infinity") or (
            hexed and all(c in "0123456789abcdefABCDEF" for c in fill[2:])
        )
    if not number:
        return False
    # (a float NaN is its own fill; a huge int is compared exactly, never made a float)
    limit = float(np.finfo(data_type).max)
    return (isinstance(fill, float) and math.isnan(fill)) or abs(fill) <= limit


def array_problem(meta: Any, shape: tuple[int, ...]) -> str | None:
    """Why an array's parsed ``zarr.json`` is refused before zarr-python opens it.

    Args:
        meta: the parsed metadata.
        shape: the shape the manifest and codec expect.
    """
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return "is not an array"
    if meta.get("zarr_format") != 3:
        return f"is Zarr format {shown(meta.get('zarr_format'))}; only Zarr v3 is read"
    if not isinstance(meta.get("shape"), list) or tuple(meta["shape"]) != shape:
        return f"has shape {shown(meta.get('shape'))}, expected {list(shape)}"
    if meta.get("data_type") not in DATA_TYPES:
        return f"has data type {shown(meta.get('data_type'))}, expected a plain numeric type"
    if not _fill_fits(meta.get("fill_value"), meta["data_type"]):
        fill = repr(meta.get("fill_value"))
        fill = fill if len(fill) <= 40 else fill[:37] + "..."
        return f"has fill value {fill}, which its {meta['data_type']} cannot hold"
    if meta.get("storage_transformers"):
        return "uses storage transformers"
    grid = meta.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    if not isinstance(grid, dict) or not isinstance(conf, dict) or grid.get("name") != "regular":
        return "has no regular chunk grid"
    problem = _chunk_problem(conf.get("chunk_shape"), shape)
    if problem is None:
        problem = _codecs_problem(meta.get("codecs"), list(conf["chunk_shape"]))
    return problem


class BoundedZstdCodec(ZstdCodec):
    """zarr's zstd codec, refusing frames that would decompress beyond their chunk.

    The output buffer is the chunk's size (plus room for a checksum codec's four bytes), and
    a frame must declare its content size in its header and fit it: what a 100 KB frame
    claims can no longer decide what is allocated.
    """

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        frame = chunk_bytes.as_numpy_array().view(np.uint8)
        itemsize = np.dtype(chunk_spec.dtype.to_native_dtype()).itemsize
        cap = math.prod(chunk_spec.shape) * itemsize + 64
        declared = zstd_content_size(frame)
        if declared is None or declared > cap:
            raise ValueError(
                f"a zstd frame declares {declared} bytes, expected at most {cap} (its chunk)"
            )
        out = np.empty(declared, dtype=np.uint8)
        problem = zstd_decode_exact(self._zstd_codec, frame, out)
        if problem is not None:
            raise ValueError(problem)
        return chunk_spec.prototype.buffer.from_array_like(out)


_EMPTY = 2**64 - 1
_MAX_OFFSET = 2**62
"""Largest offset or length a shard index entry may hold (any real shard is far smaller)."""


class BoundedShardingCodec(ShardingCodec):
    """zarr's sharding codec, refusing an index entry beyond any file before it is used.

    zarr-python adds an entry's offset and length as ``uint64`` scalars, so an entry near
    ``2^64`` (other than the all-ones pair that marks an empty chunk) overflowed with a numpy
    warning before the read failed.
    """

    async def _decode_shard_index(self, index_bytes: Any, chunks_per_shard: Any) -> Any:
        index = await super()._decode_shard_index(index_bytes, chunks_per_shard)
        pairs = index.offsets_and_lengths.reshape(-1, 2)
        empty = (pairs == _EMPTY).all(axis=1)
        bad = ~empty & (pairs > _MAX_OFFSET).any(axis=1)
        if bad.any():
            offset, length = (int(v) for v in pairs[np.argmax(bad)])
            raise ValueError(
                f"a shard index entry declares offset {offset} and length {length}; expected "
                f"both below 2^62, or both 2^64 - 1 (an empty chunk)"
            )
        return index


register_codec("zstd", BoundedZstdCodec)
register_codec("sharding_indexed", BoundedShardingCodec)
_BOUNDED = {
    "codecs.zstd": fully_qualified_name(BoundedZstdCodec),
    "codecs.sharding_indexed": fully_qualified_name(BoundedShardingCodec),
}


@contextlib.contextmanager
def bounded_zstd() -> Iterator[None]:
    """zarr-python decodes zstd with :class:`BoundedZstdCodec` and shard indexes with
    :class:`BoundedShardingCodec` inside this block.

    zarr picks a codec's implementation from its configuration when it parses metadata;
    the setting is restored on exit (other zarr users in the process keep the stock codec).
    """
    with zarr.config.set(_BOUNDED):
        yield
