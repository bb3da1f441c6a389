"""Hostile stores, sizes: declared sizes and compressed data that claim gigabytes, each read
by the CLI in a child process whose address space may grow by at most 1.5 GiB and refused.

File sizes declared far beyond the file, zstd frames that decompress to gigabytes (in our
layout and in another writer's), shard index entries beyond any file, a shard of no documents
or one that would decode to gigabytes, and Parquet footers that declare huge columns.

How the stores are built (consistent, as an attacker writes them) and what a clean refusal
is: ``../_hostile.py``. ``zarr_store``, ``kit`` and the limited child processes are in
``../conftest.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from tests.hardening._hostile import GIB, META, VOCAB, build, manifest, refused, run_verify

pytestmark = pytest.mark.integration


def test_a_file_size_declared_far_beyond_the_file_is_not_allocated(store):
    data = manifest(store)
    entry = data["shards"][0]
    entry["files"][0][1] = 2**39  # 512 GiB: within what the manifest's schema allows
    entry["bytes"] = sum(size for _, size in entry["files"])
    data["statistics"]["bytes"] = sum(s["bytes"] for s in data["shards"])
    (store / "manifest.json").write_text(json.dumps(data))
    refused(run_verify(store), entry["files"][0][0], str(2**39))


# -- zstd frames that claim gigabytes --------------------------------------------------------


def rle_frame(content: int, declare: bool = True) -> bytes:
    """A zstd frame of ``content`` zero bytes in RLE blocks: 4 bytes per 128 KiB, so a
    4 GiB frame takes 128 KiB. Without ``declare`` its header states no content size."""
    head = b"\x28\xb5\x2f\xfd"
    head += bytes([0xE0]) + content.to_bytes(8, "little") if declare else bytes([0x00, 7 << 3])
    blocks, left = [], content
    while left > 0:
        n = min(128 * 1024, left)
        left -= n
        blocks.append(((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"\x00")
    return head + b"".join(blocks)


def replace_frames(blob: bytes, n_chunks: int, frames: dict[int, bytes]) -> bytes:
    """A zarr shard blob (frames, then the index and its crc32c) with some frames replaced."""
    from numcodecs import CRC32C

    end = len(blob) - 16 * n_chunks - 4
    index = np.frombuffer(blob, "<u8", 2 * n_chunks, end).reshape(-1, 2)
    parts = [frames.get(c, blob[int(o) : int(o + n)]) for c, (o, n) in enumerate(index)]
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    new = np.stack([offsets, [len(p) for p in parts]], axis=1).astype("<u8").tobytes()
    return b"".join(parts) + bytes(CRC32C().encode(new))


@pytest.mark.parametrize("form", ["4gib", "undeclared", "trailing", "short-declared"])
def test_a_zstd_bomb_in_our_layout_is_never_decompressed(zarr_store, form, kit):
    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    chunk = 4096 * 8  # one 4096-row chunk of the (P, 8) values array
    frame = {
        "4gib": rle_frame(4 * GIB),
        "undeclared": rle_frame(4 * GIB, declare=False),
        "trailing": rle_frame(chunk) + rle_frame(4 * GIB),  # right size first, bomb after
        "short-declared": rle_frame(4 * GIB)[:5] + chunk.to_bytes(8, "little")
        + rle_frame(4 * GIB)[13:],  # header says one chunk, blocks hold 4 GiB
    }[form]  # fmt: skip
    blob = shard / "values" / "c" / "0" / "0"
    blob.write_bytes(replace_frames(blob.read_bytes(), 1, {0: frame}))
    kit.reseal(zarr_store)
    refused(run_verify(zarr_store), "shards/000000.zarr", "problem:")


@pytest.mark.parametrize("form", ["4gib", "undeclared"])
def test_a_zstd_bomb_in_another_layout_is_bounded_in_zarr_python(zarr_store, form, kit):
    import zarr
    from zarr.codecs import ZstdCodec

    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    values = zarr.open_array(str(shard / "values"))[...]
    shutil.rmtree(shard / "values")
    # Another writer's layout (no sharding, one chunk): read by zarr-python, not ours.
    arr = zarr.create_array(
        str(shard / "values"), shape=values.shape, dtype=values.dtype, chunks=values.shape,
        compressors=ZstdCodec(level=3), fill_value=0,
    )  # fmt: skip
    arr[...] = values
    (shard / "values" / "c" / "0" / "0").write_bytes(rle_frame(4 * GIB, declare=form == "4gib"))
    kit.reseal(zarr_store)
    refused(run_verify(zarr_store), "shards/000000.zarr", "zstd frame")


@pytest.mark.parametrize(
    "entry", [(2**64 - 1, 40), (40, 2**64 - 1), (2**63, 40), (0, 2**64 - 2)]
)  # fmt: skip
def test_a_shard_index_entry_beyond_any_file_is_refused_without_a_warning(zarr_store, entry, kit):
    # zarr-python added a (crc-valid) entry's offset and length as uint64 scalars: a numpy
    # overflow warning came before the refusal
    import warnings

    from numcodecs import CRC32C

    from logitstore.errors import CorruptShardError

    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    blob = shard / "values" / "c" / "0" / "0"
    index = np.array(entry, "<u8").tobytes()
    blob.write_bytes(blob.read_bytes()[:-20] + bytes(CRC32C().encode(index)))
    kit.reseal(zarr_store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CorruptShardError, match="array 'values' cannot be read"):
            open_store(str(zarr_store)).read_shard(0)
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# -- shards whose stored or decoded arrays exceed their bytes ------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_shard_of_no_documents_is_refused(tmp_path, backend, kit):
    """Files of a shard with zero documents (a writer never commits one), declared so."""
    from logitstore.storage import get_backend
    from logitstore.storage.base import ShardArrays

    root = build(tmp_path / "store", backend)
    entry = manifest(root)["shards"][0]
    codec = get_codec("topk", k=8)
    empty = ShardArrays(
        doc_ids=[],
        offsets=np.zeros(1, np.int64),
        input_ids=np.zeros(0, np.int64),
        loss_mask=np.zeros(0, bool),
        fields={
            name: np.zeros((0, *spec.shape), spec.dtype)
            for name, spec in codec.fields(VOCAB, 0).items()
        },
    )
    files = get_backend(backend).encode(
        entry["path"], empty, codec.fields(VOCAB, 0), vocab_size=VOCAB, compression_level=3
    )
    shutil.rmtree(root / entry["path"], ignore_errors=True)
    (root / entry["path"]).unlink(missing_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    kit.reseal(root, 0, documents=0, tokens=0, positions=0)
    refused(run_verify(root), "shards[0].documents", "integer >= 1")


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_shard_that_would_decode_to_gigabytes_is_refused_before_it_is_read(
    tmp_path, backend, kit
):
    """A dense shard of one valid position repeated 40,000 times, zstd-compressed, padded
    with random bytes to pass the bound on its stored arrays (each one-byte code of which
    decodes to a 12-byte id and log-prob): about 2 GB once decoded, against 0.7 MB on disk."""
    from logitstore.storage import get_backend
    from logitstore.storage.base import ShardArrays

    vocab, positions = 4096, 40_000
    root = tmp_path / "store"
    codec = get_codec("dense")
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(1, vocab, generator=g), -1)
    row = {k: v.numpy() for k, v in codec.encode(lp, torch.zeros(1, dtype=torch.long)).items()}
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=vocab)
    w.write_shard(0, [EncodedDocument("0", np.zeros(2, np.int64), np.ones(1, bool), row)])
    w.finalize(1)
    entry = manifest(root)["shards"][0]
    arrays = ShardArrays(
        doc_ids=["0"],
        offsets=np.array([0, positions + 1]),
        input_ids=np.zeros(positions + 1, np.int64),
        loss_mask=np.ones(positions, bool),
        fields={k: np.repeat(v, positions, axis=0) for k, v in row.items()},
    )
    files = get_backend(backend).encode(
        entry["path"], arrays, codec.fields(vocab, 0), vocab_size=vocab, compression_level=3
    )
    stored = sum(v.nbytes for v in arrays.fields.values()) + 2 * positions  # mask, ids
    pad = stored // 250 - sum(len(b) for b in files.values())
    if backend == "zarr":  # a file of the shard the reader has no use for
        files[entry["path"] + "/pad"] = np.random.default_rng(0).bytes(pad)
    else:  # the footer's key-value metadata
        table = pq.read_table(pa.BufferReader(files[entry["path"]]))
        table = table.replace_schema_metadata({"pad": np.random.default_rng(0).bytes(pad)})
        sink = pa.BufferOutputStream()  # (the arrow schema in the footer holds it twice)
        pq.write_table(table, sink, compression="zstd", compression_level=3)
        files = {entry["path"]: sink.getvalue().to_pybytes()}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    on_disk = sum(len(b) for b in files.values())
    assert stored <= 256 * on_disk  # within the bound on stored arrays,
    assert 12 * vocab * positions > 1024 * on_disk  # far beyond it decoded
    kit.reseal(root, 0, tokens=positions + 1, positions=positions)
    refused(run_verify(root), "shards[0].positions", "1024 times", "decoded")


# -- parquet files whose footer or pages declare huge columns --------------------------------


def huge_first_row(column: pa.ChunkedArray, items: int) -> pa.Array:
    """``column`` with its first row replaced by ``items`` zeros (a few KB compressed)."""
    arr = column.combine_chunks()
    inner = arr.type.value_type
    width = inner.list_size if pa.types.is_fixed_size_list(inner) else 1
    flat = pa.array(np.zeros(items * width, np.uint8)).cast(
        inner.value_type if width > 1 else inner
    )
    child = pa.FixedSizeListArray.from_arrays(flat, width) if width > 1 else flat
    huge = pa.ListArray.from_arrays(pa.array([0, items], pa.int32()), child).cast(arr.type)
    return pa.concat_arrays([huge, arr.slice(1)])


@pytest.mark.parametrize("form", ["input_ids", "values", "consistent-counts"])
def test_a_small_parquet_file_of_huge_columns_is_refused_from_its_footer(tmp_path, form, kit):
    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    name = "values" if form == "values" else "input_ids"
    index = table.schema.get_field_index(name)
    items = 5_000_000 if name == "values" else 20_000_000
    table = table.set_column(index, table.schema.field(index), huge_first_row(table[name], items))
    pq.write_table(table, path, compression="zstd")
    assert path.stat().st_size < 2**20  # millions of values in under a megabyte
    counts = {}
    if form == "consistent-counts":  # the manifest agrees with input_ids: 20M positions
        tokens = items + 11
        counts = {"tokens": tokens, "positions": tokens - 2}
    kit.reseal(root, 0, **counts)
    out = refused(run_verify(root))
    assert "shards/000000.parquet" in out or "shards[0]" in out, out
