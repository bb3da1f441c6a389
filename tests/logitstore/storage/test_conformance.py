"""Store conformance: written once, run for every registered codec x backend.

A new codec or backend is covered by registering it; nothing here names one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest

from logitstore import open_store
from logitstore.codecs import CODECS
from logitstore.codecs.base import Codec
from logitstore.errors import (
    CorruptShardError,
    FormatVersionError,
    ManifestError,
    UnknownNameError,
    UnsafePathError,
)
from logitstore.storage import BACKENDS
from logitstore.storage.convert import convert_store
from logitstore.writer import EncodedDocument

COMBOS = [(c, b) for c in sorted(CODECS) for b in sorted(BACKENDS)]


@dataclass
class Built:
    codec: Codec
    backend: str
    root: Path
    shards: list[list[EncodedDocument]]

    @property
    def documents(self) -> list[EncodedDocument]:
        return [d for shard in self.shards for d in shard]


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{c}-{b}" for c, b in COMBOS])
def built(request, tmp_path_factory, kit) -> Built:
    codec_name, backend = request.param
    codec = kit.make_codec(codec_name)
    shards = [kit.make_documents(codec, n, seed) for seed, n in enumerate((3, 1, 4))]
    root = tmp_path_factory.mktemp(f"{codec_name}-{backend}") / "store"
    kit.write_store(str(root), codec, backend, shards)
    return Built(codec, backend, root, shards)


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A private copy of the built store that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(built.root, dst)
    return dst


def assert_document_equal(doc, enc: EncodedDocument, codec: Codec) -> None:
    """The stored document equals ``codec.decode`` of the same encoding, bit for bit."""
    assert doc.doc_id == enc.doc_id
    assert doc.input_ids.dtype == np.int64
    np.testing.assert_array_equal(doc.input_ids, enc.input_ids)
    assert doc.loss_mask.dtype == np.bool_
    np.testing.assert_array_equal(doc.loss_mask, enc.loss_mask)
    ref = codec.decode(enc.fields)
    for f in fields(ref):
        got, want = getattr(doc.positions, f.name), getattr(ref, f.name)
        if want is None:
            assert got is None, f.name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, f.name
        # Compare the bits: NaN/-inf padding must survive too.
        assert got.tobytes() == want.tobytes(), f.name


def test_round_trip(built):
    store = open_store(str(built.root))
    docs = list(store.iter_documents())
    assert len(docs) == len(built.documents) == store.num_documents == len(store)
    for doc, enc in zip(docs, built.documents):
        assert_document_equal(doc, enc, built.codec)
    assert store.num_tokens == sum(len(e.input_ids) for e in built.documents)
    assert store.num_shards == len(built.shards)
    assert store.codec == built.codec
    assert store.manifest["backend"] == built.backend
    stats = store.manifest["statistics"]
    on_disk = sum(p.stat().st_size for p in (built.root / "shards").rglob("*") if p.is_file())
    assert stats["bytes"] == on_disk
    assert stats["bytes_per_token"] == pytest.approx(on_disk / store.num_tokens)
    assert store.verify() == []


def test_random_access_equals_iteration(built):
    store = open_store(str(built.root))
    in_order = list(store.iter_documents())
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(in_order)):
        assert_document_equal(store[int(i)], built.documents[i], built.codec)
    assert store[-1].doc_id == in_order[-1].doc_id
    with pytest.raises(IndexError):
        store[len(in_order)]
    with pytest.raises(IndexError):
        store[-len(in_order) - 1]
    for j in range(store.num_shards):
        start, stop = store.shard_document_range(j)
        assert [d.doc_id for d in store.read_shard(j)] == [d.doc_id for d in in_order[start:stop]]


def _largest_file(root: Path, shard: int) -> Path:
    shard_path = next((root / "shards").glob(f"{shard:06d}.*"))
    files = (
        [shard_path] if shard_path.is_file() else [p for p in shard_path.rglob("*") if p.is_file()]
    )
    return max(files, key=lambda p: p.stat().st_size)


def _assert_refused(root: Path, shard: int) -> None:
    name = f"shards/{shard:06d}"
    store = open_store(str(root))
    problems = store.verify()
    assert len(problems) == 1 and name in problems[0], problems
    with pytest.raises(CorruptShardError, match=name):
        store.read_shard(shard)
    start, _ = store.shard_document_range(shard)
    with pytest.raises(CorruptShardError, match=name):
        store[start]
    with pytest.raises(CorruptShardError, match=name):
        list(store.iter_documents())
    # Other shards still read.
    assert store.read_shard((shard + 1) % store.num_shards)
    # The command line names it too and exits non-zero.
    from click.testing import CliRunner

    from logitstore.cli import main

    result = CliRunner().invoke(main, ["verify", str(root)])
    assert result.exit_code == 1 and name in result.output


def test_flipped_byte_is_refused(copy):
    target = _largest_file(copy, 2)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x40
    target.write_bytes(bytes(data))
    _assert_refused(copy, 2)


def test_truncated_file_is_refused(copy):
    target = _largest_file(copy, 0)
    target.write_bytes(target.read_bytes()[:-7])
    _assert_refused(copy, 0)


def test_deleted_shard_is_refused(copy):
    shard = next((copy / "shards").glob("000001.*"))
    shutil.rmtree(shard) if shard.is_dir() else shard.unlink()
    _assert_refused(copy, 1)


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_unknown_codec_is_refused(copy):
    _edit_manifest(copy, lambda m: m["codec"].update(name="zipf-magic"))
    with pytest.raises(UnknownNameError, match="zipf-magic"):
        open_store(str(copy))


def test_future_format_version_is_refused(copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(FormatVersionError, match=r"99.*supports 1"):
        open_store(str(copy))


def test_future_codec_version_is_refused(copy):
    _edit_manifest(copy, lambda m: m["codec"].update(version=99))
    with pytest.raises(FormatVersionError, match="99"):
        open_store(str(copy))


@pytest.mark.parametrize(
    "bad", ["../outside", "/etc/passwd", "s3://bucket/key", "shards\\000000", "shards/../../x"]
)
def test_escaping_shard_path_is_refused(copy, bad):
    _edit_manifest(copy, lambda m: m["shards"][0].update(path=bad))
    with pytest.raises(UnsafePathError, match="escapes"):
        open_store(str(copy))


def test_escaping_file_path_is_refused(copy):
    _edit_manifest(copy, lambda m: m["shards"][0]["files"][0].__setitem__(0, "../../etc/passwd"))
    with pytest.raises(UnsafePathError):
        open_store(str(copy))


def test_invalid_json_manifest_is_refused(copy):
    (copy / "manifest.json").write_bytes(b'{"format_version": 1, "codec": ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        open_store(str(copy))


@pytest.mark.parametrize("field", ["codec", "shards", "vocab_size", "teacher", "statistics"])
def test_missing_manifest_field_is_refused(copy, field):
    _edit_manifest(copy, lambda m: m.pop(field))
    with pytest.raises(ManifestError, match=repr(field)):
        open_store(str(copy))


def test_identical_runs_give_identical_bytes(built, tmp_path, kit):
    # A fresh run over the same inputs (resumed runs: see test_writer.py).
    kit.write_store(str(tmp_path / "again"), built.codec, built.backend, built.shards)
    assert kit.tree_bytes(tmp_path / "again") == kit.tree_bytes(built.root)


def test_memory_filesystem(built, kit):
    import fsspec

    url = f"memory://conformance/{built.codec.name}-{built.backend}"
    fsspec.filesystem("memory").rm(url, recursive=True) if fsspec.filesystem("memory").exists(
        url
    ) else None
    kit.write_store(url, built.codec, built.backend, built.shards)
    store = open_store(url)
    for doc, enc in zip(store.iter_documents(), built.documents):
        assert_document_equal(doc, enc, built.codec)
    assert store.verify() == []
    assert store.manifest == open_store(str(built.root)).manifest
    fs = fsspec.filesystem("memory")
    fs.rm(f"{url}/shards/000001{BACKENDS[built.backend].suffix}", recursive=True)
    problems = open_store(url).verify()
    assert len(problems) == 1 and "shards/000001" in problems[0]


def test_convert_round_trip(built, tmp_path, kit):
    other = "parquet" if built.backend == "zarr" else "zarr"
    mid, back = tmp_path / "mid", tmp_path / "back"
    convert_store(str(built.root), str(mid), backend=other)
    convert_store(str(mid), str(back), backend=built.backend)
    converted = open_store(str(mid))
    assert converted.manifest["backend"] == other
    for doc, enc in zip(converted.iter_documents(), built.documents, strict=True):
        assert_document_equal(doc, enc, built.codec)
    # Lossless both ways: the round trip reproduces the original store byte for byte.
    assert kit.tree_bytes(back) == kit.tree_bytes(built.root)
