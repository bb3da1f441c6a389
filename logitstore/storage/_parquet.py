"""Arrow/Parquet backend: one file per shard, one row per document.

Schema of ``shards/000017.parquet`` (``F`` is a codec field of per-position shape ``s``)::

    doc_id      string
    input_ids   list<uint8/16/32>          T tokens (narrowest unsigned type for the vocabulary)
    loss_mask   list<bool>                 T - 1 positions
    F           list<t>                    T - 1 positions, when s == ()
    F           list<fixed_size_list<t, k>>           when s == (k,)  (nested again per axis)

Columns are zstd-compressed at the store's level; row groups close after
``ROW_GROUP_POSITIONS`` positions so the Hub's dataset viewer and ``datasets`` stream them
in small pieces. Plain ``pyarrow.parquet`` and ``datasets.load_dataset("parquet", ...)`` read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore.codecs.base import FieldSpec
from logitstore.errors import CorruptShardError, shown
from logitstore.format import MAX_EXPANSION
from logitstore.storage._parquet_pages import PageError, walk
from logitstore.storage._remote import describe, printable
from logitstore.storage.base import Backend, ShardArrays, check_expansion, token_dtype

ROW_GROUP_POSITIONS = 16384
MAX_ROW_GROUPS = 1 << 16
_DOC_IDS = pa.dictionary(pa.int32(), pa.string())
_FOOTER_LIMITS = {
    # The footer is parsed before anything is checked; thrift allocates a list's declared
    # length up front, so lists and strings are bounded far below pyarrow's defaults
    # (1M items, 100 MB). Our footers hold a few dozen items per row group.
    "thrift_container_size_limit": 1 << 16,
    "thrift_string_size_limit": 16 << 20,
    "schema_depth_limit": 16,
}


def _nested_type(dtype: str, shape: tuple[int, ...]) -> pa.DataType:
    # Non-nullable items: Parquet then stores no definition levels for them, which makes
    # reading the wide fixed-size-list columns about a quarter faster.
    typ = pa.from_numpy_dtype(np.dtype(dtype))
    for size in reversed(shape):
        typ = pa.list_(pa.field("item", typ, nullable=False), size)
    return pa.list_(pa.field("item", typ, nullable=False))


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """``values (P, *s)`` split into rows at ``offsets (D + 1,)``, as list<fixed_size_list>."""
    shape = values.shape[1:]
    child: pa.Array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for i in reversed(range(len(shape))):
        child = pa.FixedSizeListArray.from_arrays(
            child, type=_nested_type(values.dtype.name, shape[i:]).value_type
        )
    typ = _nested_type(values.dtype.name, shape)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), child, type=typ)


def _flatten(table: pa.Table, name: str, shape: tuple[int, ...], where: str) -> tuple[Any, Any]:
    """Concatenated values ``(P, *shape)`` and per-row lengths ``(D,)`` of a list column."""
    arr = table.column(name).combine_chunks()
    if arr.null_count:
        raise CorruptShardError(f"shard {where}: column {name!r} has nulls")
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten()
    for _ in shape:
        if values.null_count:
            raise CorruptShardError(f"shard {where}: column {name!r} has nested nulls")
        values = values.flatten()
    if values.null_count:
        raise CorruptShardError(f"shard {where}: column {name!r} has nested nulls")
    flat = values.to_numpy(zero_copy_only=False)
    return flat.reshape(-1, *shape), lengths


class ParquetBackend(Backend):
    """Parquet, one row per document (see module docstring for the schema)."""

    name: ClassVar[str] = "parquet"
    suffix: ClassVar[str] = ".parquet"

    @staticmethod
    def schema(specs: Mapping[str, FieldSpec], token_type: np.dtype) -> pa.Schema:
        cols = [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("input_ids", _nested_type(token_type.name, ()), nullable=False),
            pa.field("loss_mask", _nested_type("bool", ()), nullable=False),
        ]
        cols += [
            pa.field(n, _nested_type(specs[n].dtype, specs[n].shape), nullable=False)
            for n in sorted(specs)
        ]
        return pa.schema(cols)

    def encode(
        self,
        shard_path: str,
        arrays: ShardArrays,
        specs: Mapping[str, FieldSpec],
        *,
        vocab_size: int,
        compression_level: int | None,
    ) -> dict[str, bytes]:
        tok = token_dtype(vocab_size)
        pos_off = arrays.position_offsets()
        columns = [
            pa.array(arrays.doc_ids, pa.string()),
            _list_array(arrays.input_ids.astype(tok), arrays.offsets),
            _list_array(arrays.loss_mask.astype(np.bool_), pos_off),
        ]
        columns += [_list_array(arrays.fields[n], pos_off) for n in sorted(specs)]
        table = pa.Table.from_arrays(columns, schema=self.schema(specs, tok))
        sink = pa.BufferOutputStream()
        # Uncompressed means plain pages too: a dictionary would compress repeats as well.
        plain = compression_level is None
        with pq.ParquetWriter(
            sink,
            table.schema,
            compression="none" if plain else "zstd",
            compression_level=compression_level,
            use_dictionary=not plain,
        ) as writer:
            for start, stop in self._row_groups(pos_off):
                writer.write_table(table.slice(start, stop - start))
        return {shard_path: sink.getvalue().to_pybytes()}

    @staticmethod
    def _row_groups(pos_off: np.ndarray) -> list[tuple[int, int]]:
        """Consecutive document ranges of about ``ROW_GROUP_POSITIONS`` positions each."""
        groups, start = [], 0
        n_docs = len(pos_off) - 1
        for d in range(1, n_docs + 1):
            if pos_off[d] - pos_off[start] >= ROW_GROUP_POSITIONS or d == n_docs:
                groups.append((start, d))
                start = d
        return groups or [(0, 0)]

    def decode(
        self,
        shard_path: str,
        files: Mapping[str, bytes],
        specs: Mapping[str, FieldSpec],
        *,
        expected_positions: int,
    ) -> ShardArrays:
        if set(files) != {shard_path}:
            raise CorruptShardError(
                f"shard {shard_path}: expected the single file {shard_path!r}, "
                f"found {len(files)} files: {shown(sorted(files), 120)}"
            )
        pf = _open(files[shard_path], shard_path)
        names = pf.schema_arrow.names
        # (by position: a file may name a column twice, and a lookup by name then raises)
        tok_type = (
            pf.schema_arrow.field(names.index("input_ids")).type if "input_ids" in names else None
        )
        tok = _value_dtype(tok_type)
        if tok is None or tok.kind != "u":
            raise CorruptShardError(f"shard {shard_path}: input_ids must be list<unsigned int>")
        expected = self.schema(specs, tok)
        # doc_id is read as a dictionary: rows that repeat a long id share one string
        expected = expected.set(0, pa.field("doc_id", _DOC_IDS, nullable=False))
        found = pf.schema_arrow.remove_metadata()
        if not found.equals(expected):
            raise CorruptShardError(f"shard {shard_path}: {_schema_difference(found, expected)}")
        _check_footer(pf, files, specs, expected_positions, tok.itemsize, shard_path)
        try:
            # One thread: loaders read shards in parallel workers, one core each.
            table = pf.read(use_threads=False)
        except Exception as exc:  # any parse or decompression failure is a corrupt shard
            raise CorruptShardError(
                f"shard {shard_path}: cannot be read as parquet ({describe(exc)})"
            ) from None
        input_ids, tok_len = _flatten(table, "input_ids", (), shard_path)
        doc_ids = _doc_ids(table.column("doc_id"), shard_path)
        offsets = np.zeros(len(tok_len) + 1, dtype=np.int64)
        np.cumsum(tok_len, out=offsets[1:])
        pos_len = np.maximum(tok_len - 1, 0)
        if int(pos_len.sum()) != expected_positions:
            raise CorruptShardError(
                f"shard {shard_path}: {int(pos_len.sum())} positions, "
                f"manifest says {expected_positions}"
            )
        loss_mask, mask_len = _flatten(table, "loss_mask", (), shard_path)
        fields: dict[str, np.ndarray] = {}
        lengths = {"loss_mask": mask_len}
        for name, spec in specs.items():
            fields[name], lengths[name] = _flatten(table, name, spec.shape, shard_path)
        for name, got in lengths.items():
            if not np.array_equal(got, pos_len):
                raise CorruptShardError(
                    f"shard {shard_path}: column {name!r} row lengths differ from input_ids - 1"
                )
        return ShardArrays(
            doc_ids=doc_ids,
            offsets=offsets,
            input_ids=input_ids.astype(np.int64),
            loss_mask=loss_mask.astype(np.bool_),
            fields=fields,
        )


def _schema_difference(found: pa.Schema, expected: pa.Schema) -> str:
    """The first column that differs, on one line (a schema's text spans many, and a file
    may declare thousands of columns)."""

    def show(field: pa.Field) -> str:
        text = f"{field.name!r} {printable(str(field.type))}{'' if field.nullable else ' not null'}"
        return text if len(text) <= 200 else text[:197] + "..."

    for i, want in enumerate(expected):
        if i >= len(found):
            return f"schema has {len(found)} columns, expected {len(expected)} (no {want.name!r})"
        if not found.field(i).equals(want):
            return f"schema column {i} is {show(found.field(i))}, expected {show(want)}"
    return f"schema has {len(found)} columns, expected {len(expected)}"


def _open(blob: bytes, where: str) -> pq.ParquetFile:
    """The file's footer parsed (nothing else is read yet), within bounded thrift limits.

    ``pre_buffer=False``: the bytes are in memory already, and pre-buffering would start
    pyarrow's I/O thread pool for nothing.
    """
    try:
        pf = pq.ParquetFile(
            pa.BufferReader(blob), pre_buffer=False, arrow_extensions_enabled=False,
            read_dictionary=["doc_id"], **_FOOTER_LIMITS,
        )  # fmt: skip
        pf.schema_arrow  # noqa: B018  (converted from the footer here, where errors are caught)
        return pf
    except Exception as exc:  # not parquet, or a footer beyond the limits
        raise CorruptShardError(
            f"shard {where}: cannot be read as parquet ({describe(exc)})"
        ) from None


def _value_dtype(typ: pa.DataType | None) -> np.dtype | None:
    try:
        return np.dtype(typ.value_type.to_pandas_dtype())  # type: ignore[union-attr]
    except (AttributeError, TypeError, NotImplementedError, pa.ArrowException):
        return None


def _check_footer(
    pf: pq.ParquetFile,
    files: Mapping[str, bytes],
    specs: Mapping[str, FieldSpec],
    positions: int,
    token_bytes: int,
    where: str,
) -> None:
    """Refuse, before any column is read, a file whose columns would decode to more than the
    manifest's counts allow: too many rows or row groups, a column whose footer or page
    headers declare more values than its rows can hold, or pages declaring more bytes
    uncompressed than :data:`MAX_EXPANSION` times the file. What the footer and the page
    headers declare is what pyarrow allocates from."""
    meta = pf.metadata
    rows, groups = meta.num_rows, meta.num_row_groups
    check_expansion(where, files, specs, positions, rows, token_bytes)
    if groups > min(MAX_ROW_GROUPS, rows + 1):
        raise CorruptShardError(f"shard {where}: {groups} row groups for {rows} rows")
    # Leaf values a column may hold: one per item, and one level entry per empty list.
    items = {"doc_id": 0, "input_ids": positions + rows, "loss_mask": positions}
    items.update({n: positions * int(np.prod(s.shape)) for n, s in specs.items()})
    limit = {n: count + rows for n, count in items.items()}
    try:
        declared, uncompressed = _declared(meta, files[where], dict.fromkeys(limit, 0))
    except PageError as exc:
        raise CorruptShardError(f"shard {where}: {exc}") from None
    except (UnicodeDecodeError, ValueError, pa.ArrowException) as exc:
        raise CorruptShardError(f"shard {where}: unreadable footer ({describe(exc)})") from None
    for name, count in declared.items():
        if count > limit.get(name, 0):
            raise CorruptShardError(
                f"shard {where}: column {name!r} declares {count} values, expected at most "
                f"{limit.get(name, 0)} for {positions} positions in {rows} rows"
            )
    stored = len(files[where])
    if uncompressed > MAX_EXPANSION * stored:
        raise CorruptShardError(
            f"shard {where}: pages declare {uncompressed} bytes uncompressed, expected at "
            f"most {MAX_EXPANSION} times the file's {stored} bytes"
        )


def _declared(meta: Any, blob: bytes, declared: dict[str, int]) -> tuple[dict[str, int], int]:
    """Values per top-level column and uncompressed bytes in all, as the larger of what the
    footer and the page headers declare."""
    uncompressed = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            name = column.path_in_schema.split(".")[0]
            start = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset is not None:
                start = min(start, column.dictionary_page_offset)
            try:
                pages = walk(blob, start, column.total_compressed_size)
            except PageError as exc:
                raise PageError(f"column {name!r}: {exc}") from None
            declared[name] = declared.get(name, 0) + max(pages.values, column.num_values)
            uncompressed += max(pages.uncompressed, column.total_uncompressed_size)
    return declared, uncompressed


def _doc_ids(column: pa.ChunkedArray, where: str) -> list[str]:
    """Document ids from the dictionary-encoded column: each distinct id is one string."""
    out: list[str] = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise CorruptShardError(f"shard {where}: doc_id has nulls")
        try:  # pyarrow does not validate UTF-8 when it reads a page
            values = chunk.dictionary.to_pylist()
        except UnicodeDecodeError:
            raise CorruptShardError(f"shard {where}: doc_id is not valid UTF-8") from None
        out += [values[i] for i in chunk.indices.to_numpy(zero_copy_only=False).tolist()]
    return out
