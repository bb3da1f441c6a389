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

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import zarr
from numcodecs import Zstd
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from logitstore.codecs.base import FieldSpec
from logitstore.errors import ConfigError, CorruptShardError
from logitstore.storage import _zarr_checks as checks
from logitstore.storage._limits import json_problem, zstd_decode_exact
from logitstore.storage._remote import describe
from logitstore.storage.base import Backend, ShardArrays, check_expansion, token_dtype

CHUNK_ROWS = checks.CHUNK_ROWS
SHARD_FORMAT = 1
_EMPTY = 2**64 - 1  # sharding index marker of a chunk equal to the fill value


def _create(group: Any, name: str, data: np.ndarray, level: int | None) -> None:
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
        compressors=None if level is None else ZstdCodec(level=level, checksum=False),
        filters=None,
        fill_value=0,
        # Uncompressed means every byte on disk: chunks of zeros are written too.
        config={"write_empty_chunks": level is None},
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
        compression_level: int | None,
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
        files = {f"{shard_path}/{key}": buf.to_bytes() for key, buf in sorted(store_dict.items())}
        # The document ids are the group's attributes: a zarr.json a reader refuses (over its
        # JSON bound) must not be written, or the store would not read back.
        problem = json_problem(files[f"{shard_path}/zarr.json"])
        if problem is not None:
            raise ConfigError(
                f"shard {shard_path}: its {len(arrays.doc_ids)} document ids make a zarr.json "
                f"that {problem}: write fewer documents per shard (--docs-per-shard) or use "
                "the parquet backend"
            )
        return files

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
        doc_ids = _doc_ids(local, shard_path)
        check_expansion(shard_path, files, specs, expected_positions, len(doc_ids), 1)
        n_docs = len(doc_ids)
        expected: dict[str, tuple[str | None, tuple[int, ...]]] = {
            "offsets": ("int64", (n_docs + 1,)),
            "input_ids": (None, (expected_positions + n_docs,)),
            "loss_mask": ("bool", (expected_positions,)),
        }
        for name, spec in specs.items():
            expected[name] = (spec.dtype, (expected_positions, *spec.shape))
        out: dict[str, np.ndarray] = {}
        group = None
        try:
            for name, (dtype, shape) in expected.items():
                fast = _read_canonical(local, name, dtype, shape)
                if fast is None and group is None:
                    group = _open_group(local)
                out[name] = (
                    fast
                    if fast is not None
                    else self._read(group, local, name, dtype, shape, shard_path)
                )
        except CorruptShardError:
            raise
        except Exception as exc:  # any parse or decompression failure is a corrupt shard
            raise CorruptShardError(
                f"shard {shard_path}: cannot be read as zarr ({describe(exc)})"
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
        group: Any,
        local: Mapping[str, bytes],
        name: str,
        dtype: str | None,
        shape: tuple[int, ...],
        where: str,
    ) -> np.ndarray:
        """One array through zarr-python, once its metadata has passed the checks."""
        if f"{name}/zarr.json" not in local:
            raise CorruptShardError(f"shard {where}: array {name!r} is missing")
        # Before zarr-python parses it: what it would allocate is bounded by what is stored.
        problem = checks.array_problem(_load(local, f"{name}/zarr.json", where), shape)
        if problem is not None:
            raise CorruptShardError(f"shard {where}: array {name!r} {problem}")
        try:
            with checks.bounded_zstd():
                arr = group[name]
                found = np.dtype(str(arr.dtype))
                ok_dtype = found.kind == "u" if dtype is None else found == np.dtype(dtype)
                if tuple(arr.shape) == shape and ok_dtype:
                    return np.asarray(arr[...])
        except Exception as exc:  # a chunk that does not parse or decompress
            raise CorruptShardError(
                f"shard {where}: array {name!r} cannot be read ({describe(exc)})"
            ) from None
        raise CorruptShardError(
            f"shard {where}: array {name!r} is {found} {tuple(arr.shape)}, "
            f"expected {dtype or 'unsigned int'} {shape}"
        )


def _doc_ids(local: Mapping[str, bytes], where: str) -> list[str]:
    """The group's document ids, once every metadata file has passed the checks: Zarr v3
    only, each ``zarr.json`` within the size and depth limits."""
    v2 = checks.v2_metadata(local)
    if v2 is not None:
        raise CorruptShardError(f"shard {where}: {v2} is Zarr v2 metadata; only Zarr v3 is read")
    for name, raw in local.items():
        if name == "zarr.json" or name.endswith("/zarr.json"):
            problem = json_problem(raw)
            if problem is not None:
                raise CorruptShardError(f"shard {where}: {name} {problem}")
    meta = _load(local, "zarr.json", where)
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        raise CorruptShardError(f"shard {where}: zarr.json is not a zarr group")
    if meta.get("zarr_format") != 3:
        raise CorruptShardError(
            f"shard {where}: zarr.json is Zarr format {checks.shown(meta.get('zarr_format'))}; "
            "only Zarr v3 is read"
        )
    attrs = meta.get("attributes")
    doc_ids = attrs.get("doc_ids") if isinstance(attrs, dict) else None
    if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
        raise CorruptShardError(f"shard {where}: attribute doc_ids is not a str list")
    try:  # JSON's "\ud800" parses to a lone surrogate, which no UTF-8 writer takes
        "".join(doc_ids).encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptShardError(f"shard {where}: attribute doc_ids is not valid Unicode") from None
    return doc_ids


def _load(local: Mapping[str, bytes], key: str, where: str) -> Any:
    """A metadata file of the shard, parsed (its size and depth were checked already)."""
    raw = local.get(key)
    if raw is None:
        raise CorruptShardError(f"shard {where}: {key} is missing")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise CorruptShardError(f"shard {where}: {key} is not valid JSON") from None


def _open_group(local: Mapping[str, bytes]) -> Any:
    """The shard as a read-only zarr group (the fallback for layouts other than ours)."""
    proto = default_buffer_prototype()
    store = MemoryStore({k: proto.buffer.from_bytes(v) for k, v in local.items()}, read_only=True)
    return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)


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
    end = len(blob) - index_bytes - 4
    index = np.frombuffer(blob, dtype="<u8", count=2 * n_chunks, offset=end).tolist()
    row_bytes = int(np.prod(inner)) * found.itemsize
    chunk_bytes = CHUNK_ROWS * row_bytes
    flat = out.reshape(rows, -1).view(np.uint8).reshape(rows, row_bytes) if rows else None
    zstd = Zstd()
    scratch: np.ndarray | None = None
    for c in range(n_chunks):
        offset, nbytes = index[2 * c], index[2 * c + 1]
        start = c * CHUNK_ROWS
        stop = min(rows, start + CHUNK_ROWS)
        if offset == _EMPTY and nbytes == _EMPTY:
            if flat is not None:
                flat[start:stop] = 0  # a chunk of fill values is not stored
            continue
        if start >= rows or flat is None or offset > end or nbytes > end - offset:
            return None
        frame = memoryview(blob)[offset : offset + nbytes]
        # Every frame must declare exactly one chunk (zarr pads the last) and is decoded into
        # a buffer of that size, in place when the chunk is whole: nothing larger is ever
        # allocated, whatever a frame claims, and no row is left unwritten.
        if stop - start == CHUNK_ROWS:
            if zstd_decode_exact(zstd, frame, flat[start:stop]) is not None:
                return None  # let zarr-python (bounded the same way) report it
            continue
        if scratch is None:
            scratch = np.empty(chunk_bytes, dtype=np.uint8)
        if zstd_decode_exact(zstd, frame, scratch) is not None:
            return None
        flat[start:stop] = scratch.reshape(CHUNK_ROWS, row_bytes)[: stop - start]
    return out
