"""Hostile stores, metadata: Zarr array metadata and JSON documents that declare more than is
stored, each read by the CLI in a child process whose address space may grow by at most
1.5 GiB and refused.

Absurd shapes, chunk grids, data types, codecs and fill values; metadata values long enough to
stretch a message; millions of positions with no chunks; manifests and ``zarr.json`` files too
deep or too large to parse; repeated document ids; Zarr v2.

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

from logitstore import open_store
from tests.hardening._hostile import manifest, refused, run_limited_cli, run_verify

pytestmark = pytest.mark.integration


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
