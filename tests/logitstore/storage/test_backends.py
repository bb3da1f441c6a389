"""Each backend's files read back by other code than ours: zarr.open_array, pyarrow, datasets."""

from __future__ import annotations

import numpy as np
import pytest

from logitstore import open_store
from logitstore.errors import ConfigError, CorruptShardError
from logitstore.storage import BACKENDS, ShardArrays, token_dtype


@pytest.fixture(scope="module")
def stores(tmp_path_factory, kit):
    """One small store per backend, same topk documents, plus the documents."""
    codec = kit.make_codec("topk")
    shards = [kit.make_documents(codec, n, seed) for seed, n in enumerate((3, 2))]
    roots = {}
    for backend in BACKENDS:
        roots[backend] = tmp_path_factory.mktemp(backend) / "store"
        kit.write_store(str(roots[backend]), codec, backend, shards)
    return roots, codec, shards


def test_zarr_arrays_open_directly(stores):
    import zarr

    roots, codec, shards = stores
    for j, docs in enumerate(shards):
        base = roots["zarr"] / "shards" / f"{j:06d}.zarr"
        ids = zarr.open_array(str(base / "input_ids"), mode="r")
        assert ids.dtype == token_dtype(300)
        np.testing.assert_array_equal(ids[:], np.concatenate([d.input_ids for d in docs]))
        offsets = zarr.open_array(str(base / "offsets"), mode="r")[:]
        np.testing.assert_array_equal(np.diff(offsets), [len(d.input_ids) for d in docs])
        for name in docs[0].fields:
            arr = zarr.open_array(str(base / name), mode="r")
            np.testing.assert_array_equal(arr[:], np.concatenate([d.fields[name] for d in docs]))
        group = zarr.open_group(str(base), mode="r")
        assert group.attrs["doc_ids"] == [d.doc_id for d in docs]
        # Standard codecs only, 4096-row inner chunks, no filters.
        meta = arr.metadata.to_dict()
        (sharding,) = meta["codecs"]
        assert sharding["name"] == "sharding_indexed"
        inner = sharding["configuration"]
        assert inner["chunk_shape"][0] == 4096
        assert [c["name"] for c in inner["codecs"]] == ["bytes", "zstd"]
        assert [c["name"] for c in inner["index_codecs"]] == ["bytes", "crc32c"]


def test_parquet_reads_with_pyarrow(stores):
    import pyarrow.parquet as pq

    roots, codec, shards = stores
    for j, docs in enumerate(shards):
        table = pq.read_table(roots["parquet"] / "shards" / f"{j:06d}.parquet")
        assert table.num_rows == len(docs)
        rows = table.to_pylist()
        for row, doc in zip(rows, docs):
            assert row["doc_id"] == doc.doc_id
            assert row["input_ids"] == doc.input_ids.tolist()
            assert row["loss_mask"] == doc.loss_mask.tolist()
            for name, values in doc.fields.items():
                got = np.array(row[name], dtype=values.dtype).reshape(values.shape)
                np.testing.assert_array_equal(got, values)
        meta = pq.ParquetFile(roots["parquet"] / "shards" / f"{j:06d}.parquet").metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"


def test_parquet_reads_with_datasets(stores):
    import datasets

    roots, codec, shards = stores
    files = sorted(str(p) for p in (roots["parquet"] / "shards").glob("*.parquet"))
    cache = str(roots["parquet"].parent / "datasets-cache")  # never rows of an earlier run
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    docs = [d for shard in shards for d in shard]
    assert ds.num_rows == len(docs)
    for row, doc in zip(ds, docs):
        assert row["doc_id"] == doc.doc_id
        assert row["input_ids"] == doc.input_ids.tolist()
        values = doc.fields["values"]
        got = np.array(row["values"], dtype=np.uint8).reshape(values.shape)
        np.testing.assert_array_equal(got, values)


def test_both_backends_decode_identically(stores):
    roots, _, _ = stores
    a, b = (list(open_store(str(roots[k])).iter_documents()) for k in ("zarr", "parquet"))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.doc_id == y.doc_id
        assert x.input_ids.tobytes() == y.input_ids.tobytes()
        assert x.support_logprobs.tobytes() == y.support_logprobs.tobytes()
        assert x.support_ids.tobytes() == y.support_ids.tobytes()


def shard_arrays(docs, specs, doc_ids=None) -> ShardArrays:
    """One shard's arrays of ``docs``, as a writer hands them to a backend."""
    return ShardArrays(
        doc_ids=doc_ids or [d.doc_id for d in docs],
        offsets=np.concatenate([[0], np.cumsum([len(d.input_ids) for d in docs])]),
        input_ids=np.concatenate([d.input_ids for d in docs]).astype(np.int64),
        loss_mask=np.concatenate([d.loss_mask for d in docs]),
        fields={k: np.concatenate([d.fields[k] for d in docs]) for k in specs},
    )


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_encode_is_deterministic_and_round_trips(backend, kit):
    codec = kit.make_codec("sampled")
    docs = kit.make_documents(codec, 4, 7)
    specs = codec.fields(300, 1)
    arrays = shard_arrays(docs, specs)
    impl = BACKENDS[backend]
    path = f"shards/000003{impl.suffix}"
    one = impl.encode(path, arrays, specs, vocab_size=300, compression_level=5)
    two = impl.encode(path, arrays, specs, vocab_size=300, compression_level=5)
    assert one == two
    back = impl.decode(path, one, specs, expected_positions=arrays.num_positions)
    assert back.doc_ids == arrays.doc_ids
    np.testing.assert_array_equal(back.offsets, arrays.offsets)
    np.testing.assert_array_equal(back.input_ids, arrays.input_ids)
    for k in specs:
        assert back.fields[k].tobytes() == arrays.fields[k].tobytes()
    with pytest.raises(CorruptShardError, match="000003"):
        impl.decode(path, one, specs, expected_positions=arrays.num_positions + 1)


def test_a_parquet_shard_of_many_files_is_refused_in_a_short_line(kit):
    """On an object store a key may lie below a shard file's own key: a parquet shard listed
    with 4,000 such files is refused naming how many, its names cut short (they were all
    quoted: a line of 900,000 characters)."""
    codec = kit.make_codec("sampled")
    docs = kit.make_documents(codec, 2, 7)
    specs = codec.fields(300, 1)
    arrays = shard_arrays(docs, specs)
    impl = BACKENDS["parquet"]
    path = "shards/000000.parquet"
    files = impl.encode(path, arrays, specs, vocab_size=300, compression_level=5)
    files.update({f"{path}/{'f' * 200}{i}": b"x" for i in range(4000)})
    with pytest.raises(CorruptShardError, match="4001 files") as info:
        impl.decode(path, files, specs, expected_positions=arrays.num_positions)
    assert len(str(info.value)) < 300, str(info.value)[:300]


def test_a_zarr_shard_whose_document_ids_a_reader_would_refuse_is_not_written(kit):
    # The document ids are the shard group's zarr.json attributes: ids of 66 MiB in all made a
    # zarr.json over the 64 MiB a reader accepts, written (convert, a teacher pass) and then
    # refused on every read.
    codec = kit.make_codec("sampled")
    docs = kit.make_documents(codec, 2, 7)
    specs = codec.fields(300, 1)
    ids = [np.random.default_rng(i).bytes(17 * 2**20).hex() for i in range(len(docs))]
    arrays = shard_arrays(docs, specs, doc_ids=ids)
    with pytest.raises(ConfigError, match="fewer documents per shard") as info:
        BACKENDS["zarr"].encode("shards/000000.zarr", arrays, specs, vocab_size=300,
                                compression_level=1)  # fmt: skip
    assert len(str(info.value)) < 300
    files = BACKENDS["parquet"].encode("shards/000000.parquet", arrays, specs, vocab_size=300,
                                       compression_level=1)  # fmt: skip
    back = BACKENDS["parquet"].decode("shards/000000.parquet", files, specs,
                                      expected_positions=arrays.num_positions)  # fmt: skip
    assert back.doc_ids == arrays.doc_ids


def test_token_dtype_scales_with_the_vocabulary():
    assert token_dtype(256) == np.uint8
    assert token_dtype(49152) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(262145) == np.uint32


def _large_shard(rows_per_doc=(4000, 5000, 300)):
    """Arrays over 9300 positions (three zarr chunks, the last partial), one all-zero field."""
    from logitstore.codecs.base import FieldSpec

    rng = np.random.default_rng(3)
    specs = {
        "a": FieldSpec("uint8", (5,)),
        "b": FieldSpec("float32", ()),
        "c": FieldSpec("uint16", (2, 3)),
        "zero": FieldSpec("int32", ()),
    }
    tokens = np.array(rows_per_doc) + 1
    offsets = np.concatenate([[0], np.cumsum(tokens)])
    p = int(tokens.sum()) - len(tokens)
    arrays = ShardArrays(
        doc_ids=[f"d{i}" for i in range(len(tokens))],
        offsets=offsets,
        input_ids=rng.integers(0, 70000, int(tokens.sum())),
        loss_mask=rng.random(p) < 0.5,
        fields={
            "a": rng.integers(0, 255, (p, 5), dtype=np.uint8),
            "b": rng.standard_normal(p).astype(np.float32),
            "c": rng.integers(0, 60000, (p, 2, 3), dtype=np.uint16),
            "zero": np.zeros(p, np.int32),
        },
    )
    return arrays, specs


def test_fast_zarr_reader_matches_zarr_python():
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    from logitstore.storage._zarr import _read_canonical

    arrays, specs = _large_shard()
    impl = BACKENDS["zarr"]
    files = impl.encode("s.zarr", arrays, specs, vocab_size=70000, compression_level=3)
    local = {k[len("s.zarr/") :]: v for k, v in files.items()}
    proto = default_buffer_prototype()
    group = zarr.open_group(
        MemoryStore({k: proto.buffer.from_bytes(v) for k, v in local.items()}), mode="r"
    )
    assert "zero/c/0" not in local  # zarr skips chunks equal to the fill value
    for name in ["offsets", "input_ids", "loss_mask", *specs]:
        ref = group[name][...]
        fast = _read_canonical(local, name, str(ref.dtype), ref.shape)
        assert fast is not None, name
        assert fast.dtype == ref.dtype and fast.tobytes() == ref.tobytes(), name
    back = impl.decode("s.zarr", files, specs, expected_positions=arrays.num_positions)
    np.testing.assert_array_equal(back.input_ids, arrays.input_ids)
    for name in specs:
        assert back.fields[name].tobytes() == arrays.fields[name].tobytes(), name


def test_other_zarr_layouts_go_through_zarr_python():
    import zarr
    from zarr.storage import MemoryStore

    from logitstore.storage._zarr import _read_canonical

    arrays, specs = _large_shard()
    impl = BACKENDS["zarr"]
    files = impl.encode("s.zarr", arrays, specs, vocab_size=70000, compression_level=3)
    # Another writer stores field "a" unsharded in 1000-row chunks with another compressor.
    other: dict = {}
    zarr.create_array(MemoryStore(other), data=arrays.fields["a"], chunks=(1000, 5))
    files = {k: v for k, v in files.items() if not k.startswith("s.zarr/a/")}
    files.update({f"s.zarr/a/{k}": v.to_bytes() for k, v in other.items()})
    local = {k[len("s.zarr/") :]: v for k, v in files.items()}
    assert _read_canonical(local, "a", "uint8", arrays.fields["a"].shape) is None
    back = impl.decode("s.zarr", files, specs, expected_positions=arrays.num_positions)
    np.testing.assert_array_equal(back.fields["a"], arrays.fields["a"])


def test_frame_content_size_reads_every_header_width():
    from numcodecs import Zstd

    from logitstore.storage._limits import zstd_content_size as frame_content_size

    rng = np.random.default_rng(0)
    # 1-, 2-, 4- and 8-byte size fields (zstd picks the width from the size).
    for n in (0, 1, 255, 256, 300, 65535, 65536 + 300, 262144, 5_000_000):
        frame = Zstd(level=3).encode(rng.integers(0, 4, n, dtype=np.uint8).tobytes())
        assert frame_content_size(frame) == n
    assert frame_content_size(b"not a zstd frame") is None


def test_a_frame_shorter_than_its_chunk_is_not_read_into_place():
    # The fast reader decompresses full chunks straight into an uninitialised array; a frame
    # that declares fewer bytes than a chunk (a store written by something else, or forged
    # with a matching checksum) must not leave memory unwritten: it falls back to zarr-python.
    from numcodecs import Zstd

    from logitstore.storage._zarr import CHUNK_ROWS, _read_canonical

    arrays, specs = _large_shard()
    files = BACKENDS["zarr"].encode("s.zarr", arrays, specs, vocab_size=70000, compression_level=3)
    local = {k[len("s.zarr/") :]: v for k, v in files.items()}
    blob = local["a/c/0/0"]
    n_chunks = -(-arrays.num_positions // CHUNK_ROWS)
    index = np.frombuffer(blob, "<u8", 2 * n_chunks, len(blob) - 16 * n_chunks - 4).copy()
    frames = [blob[int(o) : int(o + n)] for o, n in index.reshape(-1, 2)]
    frames[0] = Zstd(level=3).encode(bytes(CHUNK_ROWS * 5 - 7))  # 7 bytes short
    offsets = np.cumsum([0] + [len(f) for f in frames[:-1]])
    index = np.stack([offsets, [len(f) for f in frames]], axis=1).astype("<u8")
    local["a/c/0/0"] = b"".join(frames) + index.tobytes() + bytes(4)
    assert _read_canonical(local, "a", "uint8", arrays.fields["a"].shape) is None
    assert _read_canonical(files_of(files), "a", "uint8", arrays.fields["a"].shape) is not None


def files_of(files):
    return {k[len("s.zarr/") :]: v for k, v in files.items()}
