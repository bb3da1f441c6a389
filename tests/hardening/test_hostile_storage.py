"""Hostile stores at the storage layer: each read by the CLI in a child process whose address
space may grow by at most 1.5 GiB (``run_limited``), and each refused cleanly.

The stores are consistent, as an attacker writes them: every crafted file is resealed into
the manifest (sizes, SHA-256), so a refusal can only come from the storage checks. One class
per kind of attack; each builds several variants of it, on both backends where it applies.
A clean refusal is exit 2 with a one-line error (a store that cannot be opened) or exit 1
with one ``problem:`` line per bad shard (``verify``); never a traceback or a MemoryError.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec

pytestmark = pytest.mark.integration

VOCAB = 256
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": []}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
GIB = 2**30


def build(root: Path, backend: str, shards: int = 2) -> Path:
    codec = get_codec("topk", k=8)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=VOCAB)
    for j in range(shards):
        docs = []
        for d in range(2):
            ids = torch.randint(0, VOCAB, (10 + d,), generator=g)
            lp = torch.log_softmax(3 * torch.randn(len(ids) - 1, VOCAB, generator=g), -1)
            fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:]).items()}
            docs.append(
                EncodedDocument(f"{j}/{d}", ids.numpy(), np.ones(len(ids) - 1, bool), fields)
            )
        w.write_shard(j, docs)
    w.finalize(shards)
    return root


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def refused(report: dict, *words: str) -> str:
    """A clean refusal by ``verify`` or at opening: exit 1 (problems listed) or 2 (error)."""
    assert report["exception"] is None, report["traceback"][-3000:]
    assert report["exit_code"] in (1, 2), report
    out = report["output"]
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert "RuntimeWarning" not in out, out  # no numpy warning on the way either
    for word in words:
        assert word in out, (word, out)
    return out


@pytest.fixture(params=["zarr", "parquet"])
def store(request, tmp_path) -> Path:
    return build(tmp_path / "store", request.param)


@pytest.fixture
def zarr_store(tmp_path) -> Path:
    return build(tmp_path / "store", "zarr")


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


# -- array metadata that declares more than is stored ----------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2**31, 8]}},
         "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}]},
        {"shape": [2**40, 8]},
        {"data_type": "string"},
        {"codecs": [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}}]},
        {"codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, 1], "codecs": [{"name": "bytes"}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_location": "end"}}]},
        {"zarr_format": 2},
    ],
    ids=["2^31-chunk", "huge-shape", "string-dtype", "gzip", "tiny-inner-chunks", "format-2"],
)  # fmt: skip
def test_absurd_array_metadata_is_refused_before_allocation(zarr_store, edit, kit):
    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    meta = json.loads((shard / "values" / "zarr.json").read_text())
    meta.update(edit)
    (shard / "values" / "zarr.json").write_text(json.dumps(meta))
    kit.reseal(zarr_store)
    out = refused(run_verify(zarr_store), "shards/000000.zarr")
    assert "values" in out


HUGE = list(range(200_000))  # a million and a half characters of JSON


@pytest.mark.parametrize(
    ("array", "edit"),
    [
        ("values", {"data_type": "x" * 1_000_000}),
        ("values", {"shape": HUGE}),
        ("values", {"zarr_format": HUGE}),
        ("values", {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": HUGE}}}),
        ("values", {"codecs": [{"name": "z" * 1_000_000}]}),
        ("", {"zarr_format": HUGE}),
    ],
    ids=["data-type", "shape", "format", "chunk-shape", "codec", "group-format"],
)
def test_metadata_values_are_quoted_cut_short(zarr_store, array, edit, kit):
    """A problem quotes a zarr.json value cut to 60 characters: a shape of 200,000 numbers
    made a problem line of a million and a half characters."""
    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    path = shard / array / "zarr.json"
    meta = json.loads(path.read_text())
    meta.update(edit)
    path.write_text(json.dumps(meta))
    kit.reseal(zarr_store)
    problems = open_store(str(zarr_store)).verify()
    assert len(problems) == 1 and "shards/000000.zarr" in problems[0], problems
    assert len(problems[0]) < 300, problems[0][:300]


@pytest.mark.parametrize(
    ("array", "fill", "refused_fill"),
    [
        ("top1", 1e308, True),  # zarr-python would cast it to inf with a warning
        ("values", 256, True),
        ("values", -1, True),
        ("values", 0.5, True),
        ("loss_mask", "x", True),
        ("top1", "0x7fc0", True),  # two bytes of hex for a four-byte type
        ("top1", "NaN", False),
        ("top1", "0x7fc00000", False),
        ("values", 255, False),
    ],
)
def test_a_fill_value_its_data_type_cannot_hold_is_refused(
    zarr_store, array, fill, refused_fill, kit
):
    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    meta = json.loads((shard / array / "zarr.json").read_text())
    meta["fill_value"] = fill
    (shard / array / "zarr.json").write_text(json.dumps(meta))
    kit.reseal(zarr_store)
    report = run_verify(zarr_store)
    if refused_fill:
        refused(report, "shards/000000.zarr", repr(array), "fill value")
    else:  # the fill values Zarr v3 allows are read as before
        assert report["exit_code"] == 0, report


@pytest.mark.parametrize("positions", [3_000_000, 40_000_000])
def test_millions_of_positions_with_no_chunks_are_refused(zarr_store, positions, kit):
    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    docs = 2
    for meta_path in shard.glob("*/zarr.json"):
        meta = json.loads(meta_path.read_text())
        rows = {"offsets": docs + 1, "input_ids": positions + docs}.get(
            meta_path.parent.name, positions
        )
        shard_rows = -(-rows // 4096) * 4096
        meta["shape"][0] = rows
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = shard_rows
        meta_path.write_text(json.dumps(meta))
        shutil.rmtree(meta_path.parent / "c", ignore_errors=True)  # every chunk: fill value
    kit.reseal(zarr_store, 0, documents=docs, tokens=positions + docs, positions=positions)
    # Refused from the manifest's counts at opening, or by the backend before it allocates.
    refused(run_verify(zarr_store), "positions", "256 times")


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


# -- JSON: size and depth ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["deep-list", "deep-object", "huge"])
def test_a_manifest_too_deep_or_too_large_is_refused_before_parsing(store, form):
    data = manifest(store)
    text = json.dumps(data)
    if form == "huge":
        text = text + " " * (65 * 2**20)  # valid JSON, 65 MiB
    else:
        nest = ("[" * 100_000 + "]" * 100_000) if form == "deep-list" else (
            '{"a":' * 100_000 + "1" + "}" * 100_000)  # fmt: skip
        text = text[:-1] + f', "extra": {nest}}}'
    (store / "manifest.json").write_text(text)
    out = refused(run_limited_cli("inspect", store), "manifest.json")
    assert ("nests" if form != "huge" else "bytes") in out


def test_a_deep_zarr_json_is_refused_and_brackets_in_strings_are_not_depth(zarr_store, kit):
    group = zarr_store / manifest(zarr_store)["shards"][0]["path"] / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["doc_ids"] = ["[[[[{{{{" * 50, "]]]]"]  # brackets inside strings: fine
    group.write_text(json.dumps(meta))
    kit.reseal(zarr_store)
    report = run_verify(zarr_store)
    assert report["exit_code"] == 0 or "nests" not in report["output"], report["output"]
    deep = "[" * 5000 + "]" * 5000  # Python's own parser gives up at about 1000
    group.write_text(json.dumps(meta)[:-1] + f', "deep": {deep}}}')
    kit.reseal(zarr_store)
    refused(run_verify(zarr_store), "shards/000000.zarr", "nests")


def test_repeated_document_ids_are_named_by_verify_and_read_as_stored(store, kit):
    """Ids repeated within a shard (the writer refuses them) and across shards (writers of
    different shards cannot see each other's): ``verify`` names both, readers read as stored."""
    for j, ids in ((0, ["same", "same"]), (1, ["1/0", "same"])):
        path = store / manifest(store)["shards"][j]["path"]
        if path.is_file():
            table = pq.read_table(path)
            column = pa.array(ids, table.schema.field("doc_id").type)
            pq.write_table(table.set_column(0, table.schema.field("doc_id"), column), path,
                           compression="zstd")  # fmt: skip
        else:
            meta = json.loads((path / "zarr.json").read_text())
            meta["attributes"]["doc_ids"] = ids
            (path / "zarr.json").write_text(json.dumps(meta))
        kit.reseal(store, j)
    suffix = "zarr" if (store / "shards" / "000000.zarr").exists() else "parquet"
    out = refused(run_verify(store))
    assert f"shards/000000.{suffix}: document id 'same' appears 2 times in it" in out, out
    assert f"shards/000001.{suffix}: document id 'same' is held by shard shards/000000." in out
    assert out.count("problem:") == 2, out
    ids = [d.doc_id for d in open_store(str(store)).iter_documents()]
    assert ids == ["same", "same", "1/0", "same"]


# -- Zarr v2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["group", "array"])
def test_zarr_v2_is_refused(zarr_store, what, kit):
    import zarr

    shard = zarr_store / manifest(zarr_store)["shards"][0]["path"]
    if what == "group":
        shutil.rmtree(shard)
        g = zarr.open_group(str(shard), mode="w", zarr_format=2)
        g.attrs["doc_ids"] = ["0/0", "0/1"]
        g.create_array("offsets", data=np.array([0, 10, 21]))
    else:
        shutil.rmtree(shard / "loss_mask")
        zarr.create_array(str(shard / "loss_mask"), data=np.ones(19, bool), zarr_format=2)
    kit.reseal(zarr_store)
    refused(run_verify(zarr_store), "shards/000000.zarr", "Zarr v2", "only Zarr v3")


def _hardening_conftest():
    """The hardening conftest as pytest loaded it (test modules cannot import a conftest)."""
    for module in list(sys.modules.values()):
        if (getattr(module, "__file__", None) or "").endswith(
            os.path.join("hardening", "conftest.py")
        ):
            return module
    raise AssertionError("tests/hardening/conftest.py is not loaded")


def run_limited_cli(*args, **kwargs) -> dict:
    """``logitstore ARGS`` in a child under the 1.5 GiB limit (the conftest's run_limited)."""
    return _hardening_conftest().run_limited(*args, **kwargs)


def run_verify(root: Path | str) -> dict:
    return run_limited_cli("verify", root)


# -- links and paths, on every URL form -------------------------------------------------------

FORMS = ["{}", "simplecache::{}", "filecache::{}", "file://{}"]
SECRET = b"SECRET-OUTSIDE-THE-STORE-" * 40


def outside_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder beside the store holding a secret; its listing and hashes, to compare."""
    folder = tmp_path / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "secret.bin").write_bytes(SECRET)
    return folder, hashes(folder)


def hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("form", FORMS)
def test_a_shard_file_linked_out_is_refused_on_every_url_form(store, tmp_path, form, kit):
    folder, before = outside_files(tmp_path)
    entry = manifest(store)["shards"][0]
    target = store / (
        entry["path"] if entry["path"].endswith(".parquet") else entry["files"][-1][0]
    )
    target.unlink()
    target.symlink_to(folder / "secret.bin")
    kit.reseal(store)  # the manifest matches the secret's bytes: only the link check can refuse
    out = refused(run_verify(form.format(store)), "outside the store's root", entry["path"])
    assert "SECRET" not in out
    assert hashes(folder) == before


@pytest.mark.parametrize("form", FORMS)
def test_a_manifest_linked_out_is_refused_on_every_url_form(store, tmp_path, form):
    folder, _ = outside_files(tmp_path)
    shutil.move(store / "manifest.json", folder / "manifest.json")
    (store / "manifest.json").symlink_to(folder / "manifest.json")
    before = hashes(folder)
    for command in ("inspect", "verify"):
        report = run_limited_cli(command, form.format(store))
        assert report["exit_code"] == 2, report
        refused(report, "manifest.json", "outside the store's root")
    assert hashes(folder) == before


def test_a_fifo_in_the_store_is_refused_without_being_opened(store):
    entry = manifest(store)["shards"][0]
    target = store / (
        entry["path"] if entry["path"].endswith(".parquet") else entry["files"][-1][0]
    )
    target.unlink()
    os.mkfifo(target)  # opening it would block the reader forever
    refused(run_limited_cli("verify", store, timeout=90), "not a regular file")


@pytest.mark.parametrize("form", ["nope::{}", "{}/manifest.json", "{}/manifest.json/x", "dir"])
def test_malformed_paths_get_our_errors(store, form):
    if form == "dir":
        (store / "manifest.json").unlink()
        (store / "manifest.json").mkdir()
        url = str(store)
    else:
        url = form.format(store)
    report = run_limited_cli("inspect", url)
    assert report["exit_code"] == 2, report
    out = refused(report)
    assert out.startswith("error: ") and out.count("\n") == 1, out


# -- Parquet stores exit cleanly ------------------------------------------------------------

_READ_ALL = """
import sys
from logitstore import open_store
store = open_store(sys.argv[1], readahead=2)
for j in range(store.num_shards):
    store.read_shard(j)
assert sum(1 for _ in store.iter_documents()) == len(store)
"""


@pytest.mark.slow  # 30 processes, about 45 s on two cores: make test-all
def test_parquet_reading_processes_all_exit_cleanly(tmp_path):
    # pq.read_table's thread pool used to release a reader (and the bytes it wraps) at
    # interpreter exit, after the GIL was gone: about one run in ten aborted with
    # "terminate called without an active exception" (exit 134).
    root = build(tmp_path / "store", "parquet", shards=4)
    codes: list[tuple[int, str]] = []
    running: list[subprocess.Popen] = []
    for _ in range(30):
        running.append(subprocess.Popen(
            [sys.executable, "-c", _READ_ALL, str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        if len(running) == 2:  # two at a time: short processes, many exits
            proc = running.pop(0)
            codes.append((proc.wait(timeout=300), proc.stderr.read()))  # type: ignore[union-attr]
    for proc in running:
        codes.append((proc.wait(timeout=300), proc.stderr.read()))  # type: ignore[union-attr]
    assert len(codes) == 30
    assert [code for code, _ in codes] == [0] * 30, [err[-500:] for code, err in codes if code]


# -- a store served over HTTP by a server that sends more than it is asked for ---------------


def gzip_of_zeros(gib: int) -> bytes:
    """A gzip stream of ``gib`` GiB of zero bytes in about a MiB per GiB: one fully flushed
    deflate block of a MiB, repeated (its trailer's checksum is wrong, found only at the end)."""
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = z.compress(bytes(2**20)) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(bytes(2**20)) + z.flush(zlib.Z_FULL_FLUSH)
    return first + block * (gib * 1024 - 1) + z.flush()


def serve(root: Path, hostile: str, form: str) -> tuple[str, Any, dict[str, int]]:
    """``root`` over HTTP as a simple server serves it (no ``Range``: every file whole), but the
    file ``hostile`` comes with 2 GiB more after its bytes (``padded``) or as a gzip body of
    2 GiB (``gzip``). Returns the URL, the server and the bytes it managed to send of it."""
    import http.server
    import threading

    sent = {"bytes": 0}
    bomb = gzip_of_zeros(2) if form == "gzip" else b""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.reply(body=False)

        def do_GET(self) -> None:
            self.reply(body=True)

        def reply(self, body: bool) -> None:
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.end_headers()
                return
            data = path.read_bytes()
            special = body and self.path.lstrip("/") == hostile
            self.send_response(200)
            if special and form == "gzip":
                self.send_header("Content-Encoding", "gzip")
                data = bomb
            length = len(data) + (2 * GIB if special and form == "padded" else 0)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not body:
                return
            try:
                self.wfile.write(data)
                if special:
                    sent["bytes"] += len(data)
                for _ in range(2048 if special and form == "padded" else 0):
                    self.wfile.write(bytes(2**20))
                    sent["bytes"] += 2**20
            except OSError:
                pass  # the reader stopped reading: what it did not take was never sent

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, sent


@pytest.mark.parametrize("form", ["padded", "gzip"])
def test_a_server_sending_more_than_a_file_holds_is_read_no_further(store, form):
    """A reader asks for a file's declared size and one byte more; a server may ignore the
    range and send 2 GiB, or send a 2 MiB gzip body of 2 GiB (decoded on the way). Either way
    the reader takes what it asked for and refuses the file as longer than declared."""
    pytest.importorskip("aiohttp")
    entry = manifest(store)["shards"][0]
    name = entry["files"][-1][0]
    url, server, sent = serve(store, name, form)
    try:
        out = refused(run_verify(url), name, "has more than")
    finally:
        server.shutdown()
        server.server_close()
    assert "MemoryError" not in out and "Payload" not in out, out
    if form == "padded":
        assert sent["bytes"] < 256 * 2**20, sent  # the rest was never read
