"""The reading budget's pieces, each against inputs built independently of it."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from numcodecs import Zstd

from logitstore.errors import ConfigError, CorruptShardError
from logitstore.storage import BACKENDS, _fs, _remote
from logitstore.storage._limits import MAX_JSON_DEPTH, json_problem, zstd_decode_exact
from logitstore.storage._parquet_pages import PageError, walk
from logitstore.storage._zarr_checks import MAX_CHUNKS, array_problem


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), True),
        ('{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1), True),
        ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, False),
        (json.dumps({"s": "[" * 500, "t": '\\"[[[' * 100, "u": [[1]] * 200}), False),
        (json.dumps({"s": '\\"'}) [:-1] + ', "d": ' + "[" * 99 + "]" * 99 + "}", True),
    ],
    ids=["deep-list", "deep-object", "at-the-limit", "brackets-in-strings", "after-escapes"],
)  # fmt: skip
def test_json_depth_is_measured_outside_strings(text, refused):
    depth = _depth(json.loads(text)) if not refused else None
    assert (json_problem(text.encode()) is not None) == refused, depth


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_json_size_is_limited():
    assert json_problem(b"[1]", max_bytes=3) is None
    assert "4 bytes" in str(json_problem(b"[1] ", max_bytes=3))


def test_zstd_frames_decode_only_into_exactly_their_size():
    data = np.arange(1000, dtype=np.uint32).view(np.uint8)
    frame = bytes(Zstd(level=3).encode(data))
    out = np.empty(data.size, np.uint8)
    assert zstd_decode_exact(Zstd(), frame, out) is None
    np.testing.assert_array_equal(out, data)
    assert "declares 4000" in str(zstd_decode_exact(Zstd(), frame, np.empty(3999, np.uint8)))
    assert "declares 4000" in str(zstd_decode_exact(Zstd(), frame, np.empty(4001, np.uint8)))
    assert zstd_decode_exact(Zstd(), frame + frame, out) is not None  # a trailing frame
    undeclared = b"\x28\xb5\x2f\xfd\x00\x38" + frame[10:]  # header without a content size
    assert "no content size" in str(zstd_decode_exact(Zstd(), undeclared, out))


def _shard(backend: str, kit):
    codec = kit.make_codec("topk")
    docs = kit.make_documents(codec, 3, 0)
    specs = codec.fields(kit.VOCAB, 1)
    from logitstore.storage.base import ShardArrays

    offsets = np.cumsum([0] + [len(d.input_ids) for d in docs])
    arrays = ShardArrays(
        doc_ids=[d.doc_id for d in docs],
        offsets=offsets,
        input_ids=np.concatenate([d.input_ids for d in docs]),
        loss_mask=np.concatenate([d.loss_mask for d in docs]),
        fields={k: np.concatenate([d.fields[k] for d in docs]) for k in specs},
    )
    impl = BACKENDS[backend]
    path = "shards/000000" + impl.suffix
    files = impl.encode(path, arrays, specs, vocab_size=kit.VOCAB, compression_level=3)
    return impl, path, files, specs, arrays.num_positions


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_backend_refuses_counts_its_bytes_cannot_hold(kit, backend):
    impl, path, files, specs, positions = _shard(backend, kit)
    assert impl.decode(path, files, specs, expected_positions=positions).num_positions == positions
    with pytest.raises(CorruptShardError, match="256 times"):
        impl.decode(path, files, specs, expected_positions=5_000_000)


def test_parquet_page_headers_add_up_to_the_footer(kit):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, path, files, _, _ = _shard("parquet", kit)
    blob = files[path]
    meta = pq.ParquetFile(pa.BufferReader(blob)).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            start = min(col.data_page_offset, col.dictionary_page_offset or col.data_page_offset)
            pages = walk(blob, start, col.total_compressed_size)
            assert pages.values == col.num_values, col.path_in_schema
            assert 0 < pages.uncompressed <= col.total_uncompressed_size
            with pytest.raises(PageError):
                walk(blob, start, col.total_compressed_size - 1)  # a page past the chunk's end
    with pytest.raises(PageError):
        walk(b"\x15" * 64, 0, 64)


def _meta(**edit) -> dict:
    meta = {
        "zarr_format": 3, "node_type": "array", "shape": [100, 8], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [50, 8]}},
        "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
        "fill_value": 0,
    }  # fmt: skip
    meta.update(edit)
    return meta


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({}, None),
        ({"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2**31, 8]}}},
         "holds more than"),
        ({"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, 1]}}},
         None),  # 800 chunks: small, allowed
        ({"shape": [10**6, 8], "chunk_grid": {"name": "regular",
          "configuration": {"chunk_shape": [1, 8]}}}, f"at most {MAX_CHUNKS}"),
        ({"data_type": "string"}, "numeric"),
        ({"codecs": [{"name": "bytes"}, {"name": "blosc"}]}, "blosc"),
        ({"codecs": [{"name": "numcodecs.pickle"}]}, "pickle"),
        ({"zarr_format": 2}, "only Zarr v3"),
        ({"storage_transformers": [{"name": "x"}]}, "transformers"),
        ({"fill_value": 256}, "fill value 256"),
        ({"fill_value": None}, "fill value None"),
        ({"data_type": "float32", "fill_value": 1e308}, "fill value 1e+308"),
        ({"data_type": "float32", "fill_value": 2**2000}, "81984..., which its float32"),
        ({"data_type": "float32", "fill_value": 3e38}, None),
        ({"data_type": "float16", "fill_value": "Infinity"}, None),
    ],
)  # fmt: skip
def test_array_metadata_checks(edit, words):
    meta = _meta(**edit)
    problem = array_problem(meta, tuple(meta["shape"]) if "shape" in edit else (100, 8))
    assert (problem is None) == (words is None), problem
    assert words is None or words in problem


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (OSError(errno.EIO, "x"), False),
        (PermissionError("Access Denied"), False),
        (FileNotFoundError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_transient_errors_are_told_apart(exc, transient):
    assert _remote.is_transient(exc) == transient


def test_a_server_error_wrapped_by_the_client_is_transient():
    class ClientError(Exception):
        response = {"ResponseMetadata": {"HTTPStatusCode": 503}}

    wrapped = OSError(errno.EIO, "internal")
    wrapped.__cause__ = ClientError()
    assert _remote.is_transient(wrapped)
    ClientError.response = {"ResponseMetadata": {"HTTPStatusCode": 404}}
    assert not _remote.is_transient(wrapped)


def test_unknown_protocols_are_config_errors():
    with pytest.raises(ConfigError, match="nope"):
        _fs.url_to_fs("nope::/tmp/x")


@pytest.mark.parametrize("form", ["{}", "file://{}", "simplecache::{}", "filecache::{}"])
def test_the_local_file_behind_every_url_form(tmp_path, form):
    fs, root = _fs.url_to_fs(form.format(tmp_path))
    assert _fs.local_target(fs, _fs.join(root, "a/b")) == f"{tmp_path}/a/b"
    assert _fs.local_target(_fs.url_to_fs("memory://x")[0], "/x/a") is None


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_mutated_shard_files_fail_only_with_our_errors(kit, backend):
    # Checksums bypassed: the backend itself sees flipped, deleted and inserted bytes.
    import contextlib
    import random

    from logitstore.errors import LogitstoreError

    impl, path, files, specs, positions = _shard(backend, kit)
    rng = random.Random(0)
    names = sorted(files)
    for _ in range(300):
        name = rng.choice(names)
        b = bytearray(files[name])
        i = rng.randrange(len(b))
        op = rng.random()
        if op < 0.6:
            b[i] = rng.randrange(256)
        elif op < 0.8:
            del b[i : i + rng.randint(1, 16)]
        else:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        with contextlib.suppress(LogitstoreError):  # anything else fails the test
            impl.decode(path, {**files, name: bytes(b)}, specs, expected_positions=positions)
