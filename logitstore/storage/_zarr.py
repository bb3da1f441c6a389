"""Zarr v3 backend: one zarr group per shard, one array per field, standard codecs only.

Layout of ``shards/000017.zarr/``::

    zarr.json            group; attributes {"doc_ids": [...], "logitstore_shard": 1}
    offsets/             int64 (D + 1,)   token offset of each document, 0 first, N last
    input_ids/           uint8/16/32 (N,) narrowest unsigned type for the vocabulary
    loss_mask/           bool (N - D,)
    <field>/             one per codec field, (N - D, *shape), dtype as the codec declares

Each array is one zarr shard (``sharding_indexed``) of inner chunks of 4096 rows along axis 0,
each chunk ``bytes`` (little endian) then ``zstd`` at the store's level, index protected by
``crc32c``; no shuffle or other filter, because codecs lay bytes out for compression already.
Any Zarr v3 implementation can open the arrays. The shard is built in a ``MemoryStore`` and
returned as bytes so the writer controls where and how atomically it lands.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from logitstore.codecs.base import FieldSpec
from logitstore.errors import CorruptShardError
from logitstore.storage.base import Backend, ShardArrays, token_dtype

CHUNK_ROWS = 4096
SHARD_FORMAT = 1
_EMPTY = np.uint64(2**64 - 1)  # sharding index marker of a chunk equal to the fill value


def _create(group: Any, name: str, data: np.ndarray, level: int) -> None:
    rows = data.shape[0]
    # The zarr shard must be a whole number of inner chunks; one zarr shard holds the array.
    shard_rows = max(CHUNK_ROWS, -(-rows // CHUNK_ROWS) * CHUNK_ROWS)
    # Zarr chunk sizes must be >= 1 even along an empty axis (no extra temperatures).
    inner = tuple(max(1, s) for s in data.shape[1:])
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(CHUNK_ROWS, *inner),
        shards=(shard_rows, *inner),
        compressors=ZstdCodec(level=level, checksum=False),
        filters=None,
        fill_value=0,
    )
    if data.size:
        arr[...] = data


class ZarrBackend(Backend):
    """Zarr v3 sharded arrays (see module docstring for the layout)."""

    name: ClassVar[str] = "zarr"
    suffix: ClassVar[str] = ".zarr"

    def encode(
        self,
        shard_path: str,
        arrays: ShardArrays,
        specs: Mapping[str, FieldSpec],
        *,
        vocab_size: int,
        compression_level: int,
    ) -> dict[str, bytes]:
        store_dict: dict[str, Any] = {}
        group = zarr.create_group(
            MemoryStore(store_dict),
            attributes={"doc_ids": list(arrays.doc_ids), "logitstore_shard": SHARD_FORMAT},
        )
        _create(group, "offsets", arrays.offsets.astype(np.int64), compression_level)
        _create(
            group, "input_ids", arrays.input_ids.astype(token_dtype(vocab_size)), compression_level
        )
        _create(group, "loss_mask", arrays.loss_mask.astype(np.bool_), compression_level)
        for name in sorted(specs):
            _create(group, name, np.ascontiguousarray(arrays.fields[name]), compression_level)
        return {f"{shard_path}/{key}": buf.to_bytes() for key, buf in sorted(store_dict.items())}

    def decode(
        self,
        shard_path: str,
        files: Mapping[str, bytes],
        specs: Mapping[str, FieldSpec],
        *,
        expected_positions: int,
    ) -> ShardArrays:
        prefix = shard_path + "/"
        local: dict[str, bytes] = {}
        for name, data in files.items():
            if not name.startswith(prefix):
                raise CorruptShardError(f"shard {shard_path}: file {name!r} lies outside it")
            local[name[len(prefix) :]] = data
        proto = default_buffer_prototype()
        store_dict = {k: proto.buffer.from_bytes(v) for k, v in local.items()}
        try:
            group = zarr.open_group(MemoryStore(store_dict, read_only=True), mode="r")
            doc_ids = group.attrs.get("doc_ids")
            if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
                raise CorruptShardError(f"shard {shard_path}: attribute doc_ids is not a str list")
            n_docs = len(doc_ids)
            expected: dict[str, tuple[str | None, tuple[int, ...]]] = {
                "offsets": ("int64", (n_docs + 1,)),
                "input_ids": (None, (expected_positions + n_docs,)),
                "loss_mask": ("bool", (expected_positions,)),
            }
            for name, spec in specs.items():
                expected[name] = (spec.dtype, (expected_positions, *spec.shape))
            out: dict[str, np.ndarray] = {}
            for name, (dtype, shape) in expected.items():
                fast = _read_canonical(local, name, dtype, shape)
                out[name] = (
                    fast if fast is not None else self._read(group, name, dtype, shape, shard_path)
                )
        except CorruptShardError:
            raise
        except Exception as exc:  # any parse or decompression failure is a corrupt shard
            raise CorruptShardError(
                f"shard {shard_path}: cannot be read as zarr ({type(exc).__name__}: {exc})"
            ) from None
        return ShardArrays(
            doc_ids=list(doc_ids),
            offsets=out.pop("offsets"),
            input_ids=out.pop("input_ids").astype(np.int64),
            loss_mask=out.pop("loss_mask"),
            fields=out,
        )

    @staticmethod
    def _read(
        group: Any, name: str, dtype: str | None, shape: tuple[int, ...], where: str
    ) -> np.ndarray:
        if name not in group:
            raise CorruptShardError(f"shard {where}: array {name!r} is missing")
        arr = group[name]
        # Check the declared metadata before reading, so nothing unexpected gets allocated.
        found = np.dtype(str(arr.dtype))
        ok_dtype = found.kind == "u" if dtype is None else found == np.dtype(dtype)
        if tuple(arr.shape) != shape or not ok_dtype:
            raise CorruptShardError(
                f"shard {where}: array {name!r} is {found} {tuple(arr.shape)}, "
                f"expected {dtype or 'unsigned int'} {shape}"
            )
        return np.asarray(arr[...])


def _is_canonical(codecs: Any, inner: list[int], itemsize: int) -> bool:
    """Whether ``codecs`` is what ``_create`` writes (the layout the fast reader understands)."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    # zarr omits the endianness of one-byte types.
    serializers = [little, {"name": "bytes"}] if itemsize == 1 else [little]
    try:
        (sharding,) = codecs
        conf = sharding["configuration"]
        serializer, zstd = conf["codecs"]
        return bool(
            sharding["name"] == "sharding_indexed"
            and set(conf) == {"chunk_shape", "codecs", "index_codecs", "index_location"}
            and conf["chunk_shape"] == [CHUNK_ROWS, *inner]
            and serializer in serializers
            and zstd["name"] == "zstd"
            and zstd["configuration"].get("checksum") is False
            and conf["index_codecs"] == [little, {"name": "crc32c"}]
            and conf["index_location"] == "end"
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _read_canonical(
    files: Mapping[str, bytes], name: str, dtype: str | None, shape: tuple[int, ...]
) -> np.ndarray | None:
    """Read an array laid out exactly as ``_create`` writes it, without zarr's async machinery.

    zarr-python spends most of a shard read in its event loop and thread pool; for our own
    canonical layout (one zarr shard, 4096-row zstd chunks, index at the end) reading the
    shard index and decompressing each chunk straight into the output is several times
    faster. Anything else (another writer's layout, unexpected metadata) returns ``None``
    and goes through zarr-python. The caller has verified the files' checksum already.
    """
    import json

    try:
        meta = json.loads(files[f"{name}/zarr.json"])
        found = np.dtype(meta["data_type"])
        inner = [max(1, s) for s in shape[1:]]
        rows = shape[0]
        shard_rows = max(CHUNK_ROWS, -(-rows // CHUNK_ROWS) * CHUNK_ROWS)
        canonical = (
            meta.get("node_type") == "array"
            and meta.get("zarr_format") == 3
            and list(meta["shape"]) == list(shape)
            and (found.kind == "u" if dtype is None else found == np.dtype(dtype))
            and meta["chunk_grid"]
            == {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *inner]}}
            and meta["chunk_key_encoding"]
            == {"name": "default", "configuration": {"separator": "/"}}
            and meta["fill_value"] in (0, False)
            and not meta.get("storage_transformers")
            and _is_canonical(meta["codecs"], inner, found.itemsize)
        )
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not canonical:
        return None
    key = f"{name}/c/" + "/".join("0" * len(shape))
    blob = files.get(key)
    if blob is None or 0 in shape:
        return np.zeros(shape, dtype=found)  # every chunk is the fill value (nothing written)
    # Not zeroed first (a pass over memory): every row is written below, or None is returned.
    out = np.empty(shape, dtype=found)
    n_chunks = shard_rows // CHUNK_ROWS
    index_bytes = 16 * n_chunks
    if len(blob) < index_bytes + 4:
        return None
    index = np.frombuffer(blob, dtype="<u8", count=2 * n_chunks, offset=len(blob) - index_bytes - 4)
    row_bytes = int(np.prod(inner)) * found.itemsize
    flat = out.reshape(rows, -1).view(np.uint8).reshape(rows, row_bytes) if rows else None
    zstd = Zstd()
    for c in range(n_chunks):
        offset, nbytes = index[2 * c], index[2 * c + 1]
        start = c * CHUNK_ROWS
        stop = min(rows, start + CHUNK_ROWS)
        if offset == _EMPTY and nbytes == _EMPTY:
            if flat is not None:
                flat[start:stop] = 0  # a chunk of fill values is not stored
            continue
        if start >= rows or flat is None or offset + nbytes > len(blob) - index_bytes - 4:
            return None
        frame = memoryview(blob)[int(offset) : int(offset + nbytes)]
        try:
            if stop - start == CHUNK_ROWS:  # a full chunk decompresses straight into place
                # ... when its frame says it holds exactly the chunk (decoding into a larger
                # buffer would leave the rest unwritten)
                if frame_content_size(frame) != CHUNK_ROWS * row_bytes:
                    return None
                zstd.decode(frame, out=flat[start:stop])
                continue
            chunk = np.frombuffer(zstd.decode(frame), dtype=np.uint8)
        except (RuntimeError, ValueError):
            return None  # size or frame mismatch: let zarr-python report it
        if chunk.size != CHUNK_ROWS * row_bytes:
            return None
        flat[start:stop] = chunk.reshape(CHUNK_ROWS, row_bytes)[: stop - start]
    return out


def frame_content_size(frame: memoryview | bytes) -> int | None:
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
