"""Untrusted stores, shard contents: values, schemas, strings and file sizes a stranger wrote.

Token ids and offsets that wrap around when widened or subtracted, Parquet schemas that do not
match, escape sequences and lone surrogates in what a shard holds, document ids long enough to
stretch a message, sparse files larger than what they store, and a damaged shard read in a
DataLoader worker. The hostile stores are consistent (every crafted file resealed into the
manifest), so a refusal can only come from the safety checks, not from a checksum. The store
builder is in ``../_hostile.py``, ``kit`` in ``../conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logitstore import open_store
from logitstore.dataset import StoreDataset
from logitstore.errors import CorruptShardError, LogitstoreError
from tests.hardening._hostile import BACKENDS, VOCAB, build, manifest, rewrite


def test_an_error_in_a_dataloader_worker_keeps_its_one_line_message(store):
    """A damaged shard read in a DataLoader worker process: PyTorch rebuilds the error in the
    main process from its whole traceback ("Caught CorruptShardError in DataLoader worker
    process 0. Original Traceback ..."), which the CLI printed as one line of traceback. It
    is the error's own message again, with where it was raised."""
    from torch.utils.data import DataLoader

    entry = manifest(store)["shards"][0]
    path = store / max(entry["files"], key=lambda f: f[1])[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dataset = StoreDataset(str(store), tokens_per_batch=64, shuffle=False)
    with pytest.raises(CorruptShardError) as info:
        list(DataLoader(dataset, batch_size=None, num_workers=1))
    message = str(info.value)
    assert message.startswith(f"shard {entry['path']}: checksum mismatch"), message
    assert message.endswith("(in DataLoader worker process 0)"), message
    assert "Traceback" not in message and "\n" not in message, message


# -- values that wrap around when widened or subtracted --------------------------------------


def _replace_input_ids(root: Path, ids: np.ndarray) -> None:
    """Shard 0's ``input_ids`` replaced by ``ids`` (any unsigned dtype)."""
    import pyarrow as pa
    import zarr

    path = root / manifest(root)["shards"][0]["path"]
    if path.is_file():
        table = pq.read_table(path)
        old = table["input_ids"].combine_chunks()
        item = pa.field("item", pa.from_numpy_dtype(ids.dtype), nullable=False)
        column = pa.ListArray.from_arrays(old.offsets, pa.array(ids), type=pa.list_(item))
        index = table.schema.get_field_index("input_ids")
        field = pa.field("input_ids", column.type, nullable=False)
        pq.write_table(table.set_column(index, field, column), path, compression="zstd")
    else:
        shutil.rmtree(path / "input_ids")
        arr = zarr.create_array(str(path / "input_ids"), shape=ids.shape, dtype=ids.dtype,
                                chunks=ids.shape, fill_value=0)  # fmt: skip
        arr[...] = ids


def test_uint64_token_ids_that_wrap_negative_are_refused(store, kit):
    # Any unsigned id type reads; a uint64 id of 2^64 - 1 became -1 as int64, below the
    # vocabulary check, and reached training (an embedding lookup of -1).
    ids = open_store(str(store)).read_shard_arrays(0).input_ids.astype(np.uint64)
    ids[3] = 2**64 - 1
    _replace_input_ids(store, ids)
    kit.reseal(store, 0)
    opened = open_store(str(store))
    with pytest.raises(CorruptShardError, match="token ids reach beyond the vocabulary"):
        opened.read_shard(0)
    assert len(opened.verify()) == 1 and "shards/000000" in opened.verify()[0]
    with pytest.raises(CorruptShardError, match="token ids"):
        list(StoreDataset(str(store), tokens_per_batch=64, shuffle=False))


def test_offsets_whose_differences_wrap_around_are_refused(tmp_path, kit):
    from logitstore.storage import BACKENDS
    from logitstore.storage.base import ShardArrays

    root = build(tmp_path / "store", "zarr")
    opened = open_store(str(root))
    arrays = opened.read_shard_arrays(0)
    n, docs = arrays.num_tokens, 4
    # every int64 difference is >= 1 (2^62 each, wrapped), yet the offsets are not increasing
    offsets = np.array([0, 2**62, -(2**63), -(2**62), n], dtype=np.int64)
    assert np.all(np.diff(offsets) >= 1)
    hostile = ShardArrays(
        doc_ids=["a", "b", "c", "d"], offsets=offsets, input_ids=arrays.input_ids,
        loss_mask=arrays.loss_mask[: n - docs],
        fields={k: v[: n - docs] for k, v in arrays.fields.items()},
    )  # fmt: skip
    path = manifest(root)["shards"][0]["path"]
    files = BACKENDS["zarr"].encode(path, hostile, opened.specs, vocab_size=VOCAB,
                                    compression_level=3)  # fmt: skip
    shutil.rmtree(root / path)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    kit.reseal(root, 0, documents=docs, tokens=n, positions=n - docs)
    with pytest.raises(CorruptShardError, match="offsets must be increasing"):
        open_store(str(root)).read_shard(0)
    assert any("offsets must be increasing" in p for p in open_store(str(root)).verify())
    # (documents of 2^62 tokens and of none, whose positions did not match their tokens)
    with pytest.raises(CorruptShardError, match="offsets"):
        list(StoreDataset(str(root), tokens_per_batch=64, shuffle=False))


# -- messages a stranger's file cannot stretch -----------------------------------------------


@pytest.mark.parametrize("form", ["many-columns", "wrong-type"])
def test_a_parquet_schema_mismatch_is_told_in_one_short_line(tmp_path, form, kit):
    import pyarrow as pa

    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    if form == "many-columns":  # the whole schema was printed: thousands of lines
        for i in range(2000):
            table = table.append_column(f"extra{i}", pa.array([0] * table.num_rows, pa.int8()))
    else:
        index = table.schema.get_field_index("input_ids")
        column = table["input_ids"].cast(pa.large_list(pa.field("item", pa.uint8(), False)))
        table = table.set_column(index, pa.field("input_ids", column.type, False), column)
    pq.write_table(table, path, compression="zstd")
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError) as info:
        open_store(str(root)).read_shard(0)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message[:2000]
    assert "shards/000000.parquet: schema" in message
    assert ("2009 columns, expected 9" if form == "many-columns" else "'input_ids'") in message


@pytest.mark.parametrize("column", ["input_ids", "doc_id", "values"])
def test_a_parquet_column_named_twice_is_refused(tmp_path, column, kit):
    # pyarrow's lookup by name raises a KeyError when a file names a column twice
    root = build(tmp_path / "store", "parquet")
    path = root / manifest(root)["shards"][0]["path"]
    table = pq.read_table(path)
    table = table.append_column(table.schema.field(column), table[column])
    pq.write_table(table, path, compression="zstd")
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="shards/000000.parquet: schema"):
        open_store(str(root)).read_shard(0)


ESCAPE = "\x1b[2J\x1b[31m"  # clear the screen, then red


@pytest.mark.parametrize("form", ["zarr-error", "manifest-key", "link-target", "parquet-type"])
def test_a_stores_escape_sequences_never_reach_a_message(tmp_path, form, kit):
    # Messages quote what a library said about a file, a JSON key or a link's target: each
    # of those is the store's text, now shown escaped.
    import pyarrow as pa

    backend = "parquet" if form == "parquet-type" else "zarr"
    root = build(tmp_path / "store", backend)
    shard = root / manifest(root)["shards"][0]["path"]
    if form == "zarr-error":  # zarr-python's message quotes the separator it refuses
        meta = json.loads((shard / "values" / "zarr.json").read_text())
        meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": ESCAPE}}
        (shard / "values" / "zarr.json").write_text(json.dumps(meta))
        kit.reseal(root, 0)
    elif form == "manifest-key":
        text = (root / "manifest.json").read_text()
        key = json.dumps(ESCAPE)[1:-1]  # (a JSON string holds it escaped, parsed it is raw)
        (root / "manifest.json").write_text(text[:-2] + f', "{key}": NaN}}')
    elif form == "link-target":
        outside = tmp_path / f"out{ESCAPE}"
        outside.mkdir()
        shutil.move(shard, outside / shard.name)
        shard.symlink_to(outside / shard.name, target_is_directory=True)
    else:  # a struct type's field names are printed with the type
        table = pq.read_table(shard)
        index = table.schema.get_field_index("top1")
        column = pa.array([{ESCAPE: 1}] * table.num_rows)
        pq.write_table(table.set_column(index, "top1", column), shard)
        kit.reseal(root, 0)
    with pytest.raises(LogitstoreError) as info:
        open_store(str(root)).read_shard(0)
    message = str(info.value)
    assert "\x1b" not in message and ("\\x1b" in message or "\\u001b" in message), message


# -- strings that are not Unicode ------------------------------------------------------------


def test_a_lone_surrogate_in_a_document_id_is_refused(tmp_path, kit):
    # JSON's "\ud800" parses to a str no UTF-8 writer takes: the store read and verified,
    # then convert and export failed with a UnicodeEncodeError writing the id to Parquet.
    from logitstore.storage.convert import convert_store

    root = build(tmp_path / "store", "zarr")
    group = root / "shards" / "000000.zarr" / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["doc_ids"] = ["\ud800", "0/1"]
    group.write_text(json.dumps(meta))  # (written escaped, as any JSON writer would)
    kit.reseal(root, 0)
    with pytest.raises(CorruptShardError, match="doc_ids is not valid Unicode"):
        open_store(str(root)).read_shard(0)
    with pytest.raises(CorruptShardError, match="doc_ids is not valid Unicode"):
        convert_store(str(root), str(tmp_path / "out"), backend="parquet")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_document_ids_are_quoted_cut_short(tmp_path, backend, kit):
    """A document id is the store's string, of any length: verify's repeated-id problems and
    mix's refusals quote it cut to 60 characters (they carried it whole: a line per id of
    100,000 characters)."""
    long = "r" * 100_000
    root = build(tmp_path / "store", backend)
    for j in range(2):  # both shards hold the long id (as their first document)
        group = root / "shards" / f"00000{j}.zarr" / "zarr.json"
        if backend == "zarr":
            meta = json.loads(group.read_text())
            meta["attributes"]["doc_ids"][0] = long
            group.write_text(json.dumps(meta))
        else:
            path = root / "shards" / f"00000{j}.parquet"
            table = pq.read_table(path)
            ids = table.column("doc_id").to_pylist()
            table = table.set_column(0, table.schema.field(0), [[long, *ids[1:]]])
            pq.write_table(table, path, compression="zstd")
    kit.reseal(root)
    problems = open_store(str(root)).verify()
    assert len(problems) == 1 and "is held by shard" in problems[0], problems
    assert len(problems[0]) < 400, len(problems[0])
    other = build(tmp_path / "other", backend)
    result = kit.invoke("mix", root, other, "--out", tmp_path / "mixed", "--no-progress")
    assert result.exit_code == 2, result.output[:500]
    assert "appears twice" in result.output and len(result.output) < 400, result.output[:500]


# -- files larger than what they store -------------------------------------------------------


def test_a_sparse_shard_file_is_refused_before_it_is_read(store):
    # A file made by truncate (or a tar's sparse member) takes a few KB on disk whatever size
    # it declares: with the manifest agreeing, a reader read all of it (2^33 bytes: a
    # MemoryError, or gigabytes of zeros). Its size is no measure of the store's bytes.
    data = manifest(store)
    entry = data["shards"][0]
    name = entry["files"][-1][0]
    size = 2**28
    with open(store / name, "r+b") as f:
        f.truncate(size)
    if (store / name).stat().st_blocks * 512 * 16 >= size:
        pytest.skip("this filesystem stores no holes")
    entry["files"][-1][1] = size
    entry["bytes"] = sum(s for _, s in entry["files"])
    data["statistics"]["bytes"] = sum(s["bytes"] for s in data["shards"])
    rewrite(store, data)
    opened = open_store(str(store))
    with pytest.raises(CorruptShardError, match=f"file {name} is a sparse file of {size} bytes"):
        opened.read_shard(0)
    assert len(opened.read_shard(1)) == 2  # the rest of the store still reads


def test_the_hole_check_leaves_the_file_read_from_its_start(tmp_path):
    # The check seeks to the first hole; a file found not sparse (a compressing filesystem's
    # few blocks, no hole) must still be read from byte 0, whole.
    from logitstore.storage._fs import _sparse

    path = tmp_path / "blob"
    path.write_bytes(b"head" + bytes(4096))
    with open(path, "r+b") as f:
        f.truncate(2**26)
        st = os.fstat(f.fileno())
        if st.st_blocks * 512 * 16 >= st.st_size:
            pytest.skip("this filesystem stores no holes")
        assert _sparse(f.fileno(), st)
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == 0
        assert f.read(4) == b"head"
