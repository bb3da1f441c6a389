"""Hub export: the exported folder, its dataset card and ``logitstore export``.

The stores are written by ``make_store`` of ``conftest.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

import logitstore.hub as hub
from logitstore import open_store
from logitstore._hub_card import base_models, size_category, source_datasets
from logitstore.cli import main
from logitstore.codecs import get_codec
from logitstore.writer import EncodedDocument, StoreWriter


@pytest.fixture(scope="module", params=[("sampled", {"n": 12}), ("topk", {"k": 16})])
def exported(request, tmp_path_factory, make_store):
    root = tmp_path_factory.mktemp("export")
    src = make_store(str(root / "src"), *request.param)
    out = root / "out"
    hub.export_store(src, str(out), repo_id="org/name")
    return src, out


def test_export_loads_with_datasets_and_equals_the_store(exported):
    import datasets

    src, out = exported
    # A cache of its own: datasets keys its cache by folder name and settings, so a shared
    # one can hand back rows of an earlier export with other values.
    rows = datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "cache"))
    docs = list(open_store(src))
    assert rows.num_rows == len(docs)
    for row, doc in zip(rows, docs, strict=True):
        assert row["doc_id"] == doc.doc_id
        assert row["source_row"] == doc.doc_id.split("/")[0] and row["window"] == 0
        np.testing.assert_array_equal(row["input_ids"], doc.input_ids)
        np.testing.assert_array_equal(row["loss_mask"], doc.loss_mask)
        np.testing.assert_array_equal(row["support_ids"], doc.support_ids)
        np.testing.assert_array_equal(row["support_logprobs"], doc.support_logprobs)
        for key in ("tail_logmass", "label_logprob", "entropy", "tail_logsumexp"):
            np.testing.assert_array_equal(np.asarray(row[key], np.float32), getattr(doc, key))
        if doc.support_counts is not None:
            np.testing.assert_array_equal(row["support_counts"], doc.support_counts)


def test_export_is_a_store_with_a_card(exported, store_spec):
    src, out = exported
    again = open_store(str(out))
    assert again.manifest["backend"] == "parquet" and again.verify() == []
    for a, b in zip(open_store(src), again, strict=True):
        np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)
        np.testing.assert_array_equal(a.tail_logmass, b.tail_logmass)
    assert not (out / "records").exists() and not (out / "settings.json").exists()
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    paths = {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]}
    assert paths == {"default": "data/*.parquet", "encoded": "shards/*.parquet"}
    view = pq.read_schema(out / "data" / "000000.parquet")
    assert [f["name"] for f in meta["dataset_info"]["features"]] == view.names
    assert meta["dataset_info"]["splits"][0]["num_examples"] == again.num_documents
    stats = again.manifest["statistics"]
    for needle in (
        "tiny/Teacher-1M",
        "ef" * 8,
        again.manifest["codec"]["name"],
        f"| documents | {stats['documents']} |",
        f"| tokens | {stats['tokens']} |",
        f"{stats['bytes_per_token']:.2f}",
        "logitstore train --store hf://datasets/org/name",
        "| capture temperatures | "
        + ", ".join(str(float(t)) for t in (1.0, *store_spec.TEMPS))
        + " |",
    ):
        assert needle in body


def test_view_truncation_moves_mass_into_the_tail(tmp_path, monkeypatch, make_store, store_spec):
    src = make_store(str(tmp_path / "src"), "topk", {"k": 16, "values": "float32"})
    monkeypatch.setattr(hub, "VIEW_ROW_GROUP_BYTES", 300)  # forces several row groups
    hub.export_store(src, str(tmp_path / "out"), max_support=5)
    view = pq.ParquetFile(tmp_path / "out" / "data" / "000000.parquet")
    assert view.metadata.num_row_groups > 1
    rows = view.read().to_pylist()
    for row, doc in zip(rows, list(open_store(src))[:3], strict=True):
        lp = doc.support_logprobs.astype(np.float64)
        tail = np.log(np.exp(doc.tail_logmass.astype(np.float64)) + np.exp(lp[:, 5:]).sum(1))
        np.testing.assert_allclose(row["tail_logmass"], tail, rtol=1e-6)
        np.testing.assert_array_equal(row["support_ids"], doc.support_ids[:, :5])
        tls = np.logaddexp(
            doc.tail_logsumexp[:, 0].astype(np.float64),
            np.log(np.exp(lp[:, 5:] / store_spec.TEMPS[0]).sum(1)),
        )
        np.testing.assert_allclose(np.asarray(row["tail_logsumexp"])[:, 0], tls, rtol=1e-6)


def test_card_metadata_through_huggingface_hub(tmp_path, make_store, store_spec):
    from huggingface_hub import DatasetCard

    hot = tuple(range(store_spec.V - 1, -1, -1))  # a fitted id table: V numbers in the manifest
    src = make_store(str(tmp_path / "src"), "topk", {"k": 16, "values": "q6", "hot_ids": hot})
    hub.export_store(src, str(tmp_path / "out"), repo_id="org/name", license="apache-2.0")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0"
    assert meta["pretty_name"] == "Teacher-1M teacher logits on corpus"
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]  # 9 documents
    assert meta["source_datasets"] == ["org/corpus"]
    assert meta["base_model"] == ["tiny/Teacher-1M"]
    assert meta["configs"][0]["config_name"] == "default"
    manifest = open_store(str(tmp_path / "out")).manifest
    assert manifest["codec"]["configuration"]["hot_ids"] == list(hot)  # the table is kept ...
    text = (tmp_path / "out" / "README.md").read_text()
    assert not re.search(r"\d+(\s*,\s*\d+){15}", text)  # ... but never printed in the card
    assert f"{store_spec.V:,} entries" in card.text and "6-bit codes" in card.text
    assert "`k=16`" in card.text and "`values=q6`" in card.text
    stats = manifest["statistics"]
    assert f"| bytes/token | {stats['bytes_per_token']:.2f} |" in card.text
    assert re.search(r"\| fidelity: mass_captured \| [0-9.e-]+ \|", card.text)


def test_card_names_only_hub_repositories():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10**4, 10**12 - 1, 10**12)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "1K<n<10K",
        "10K<n<100K",
        "100B<n<1T",
        "n>1T",
    ]
    local = {"id": "my-teacher", "weights": {"kind": "full", "sha256": "ab" * 32}}
    hub_teacher = {"id": "HuggingFaceTB/SmolLM2-135M", "revision": "c0ffee", "weights": None}
    assert base_models(local) == [] and base_models(hub_teacher) == [hub_teacher["id"]]
    mixture = {"mixture": {"stores": [{"teacher": hub_teacher}, {"teacher": local}]}}
    assert base_models(mixture) == [hub_teacher["id"]]
    assert source_datasets({"name": "HuggingFaceTB/smoltalk", "kind": "hub"}) == [
        "HuggingFaceTB/smoltalk"
    ]
    assert source_datasets({"name": "docs.jsonl", "kind": "files"}) == []


def test_export_cli(tmp_path, make_store):
    src = make_store(str(tmp_path / "src"), "dense", {"bits": 8})
    out = str(tmp_path / "out")
    result = CliRunner().invoke(
        main, ["export", src, out, "--max-support", "4", "--license", "mit"]
    )
    assert result.exit_code == 0, result.output
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(tmp_path / "out" / "README.md").data.license == "mit"
    view = pq.read_table(tmp_path / "out" / "data" / "000001.parquet")
    assert view.schema.field("support_ids").type.value_type.list_size == 4
    assert open_store(str(tmp_path / "out")).num_documents == 9


def test_card_of_a_mixture_counts_its_teachers_tables(tmp_path, make_store, store_spec):
    from huggingface_hub import DatasetCard

    from logitstore.mixture import mix_stores

    hot = tuple(range(store_spec.V - 1, -1, -1))
    a = make_store(str(tmp_path / "a"), "topk", {"k": 16, "hot_ids": hot})
    b = make_store(str(tmp_path / "b"), "topk", {"k": 8})
    mix_stores([a, b], str(tmp_path / "mix"), weights=[0.5, 0.5])
    hub.export_store(str(tmp_path / "mix"), str(tmp_path / "out"), license="other")
    text = (tmp_path / "out" / "README.md").read_text()
    assert not re.search(r"\d+(\s*,\s*\d+){15}", text)  # no store's hot_ids printed
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["tiny/Teacher-1M"]  # both teachers, named once
    assert card.data.pretty_name == "Mixed logits of 2 teachers on corpus"
    assert "## Mixture of teachers" in card.text


@pytest.mark.parametrize(
    "mixture",
    [
        {"stores": 5},
        {"stores": "ab"},
        {"stores": {"a": {"teacher": {"id": "org/x"}}}},
        {"stores": [1, None, "x", [], {"teacher": 5}, {"teacher": [1]}, {}]},
        {"stores": [{"teacher": {"mixture": {"stores": 7}}}], "weights": {"a": [1]}},
    ],
)
def test_a_malformed_mixture_section_still_makes_a_card(tmp_path, mixture, make_store):
    """``teacher`` is the store's own JSON, checked by no schema: a ``mixture`` of any shape
    gives a card (its teachers unnamed), never a TypeError or AttributeError."""
    import json

    from huggingface_hub import DatasetCard

    src = make_store(str(tmp_path / "src"), "topk", {"k": 8}, backend="parquet", shards=1)
    path = tmp_path / "src" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["teacher"] = {"model": "org/teacher", "mixture": mixture}
    path.write_text(json.dumps(manifest))
    hub.export_store(src, str(tmp_path / "out"), license="mit")
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert "base_model" not in card.data.to_dict()  # no teacher named by a Hub id
    assert card.data.pretty_name.startswith("Mixed logits of ")
    assert "## Mixture of teachers" in card.text


def test_document_ids_of_any_form_give_a_view(tmp_path, store_spec):
    """A store's document ids are its own strings: a window part of Unicode digits or beyond
    int32 is no window (the id is kept whole as ``source_row``), never a ValueError."""
    codec = get_codec("topk", k=8)
    w = StoreWriter(
        str(tmp_path / "src"),
        codec=codec,
        backend="parquet",
        metadata=store_spec.METADATA,
        vocab_size=store_spec.V,
    )
    ids = [
        "r/w\u00b2/h",
        "r/w\u0663/h",
        "r/w99999999999/h",
        "r/w" + "9" * 5000 + "/h",
        "r/w012/h",
        "r/w12/h",
    ]
    g = torch.Generator().manual_seed(0)
    docs = []
    for doc_id in ids:
        tokens = torch.randint(0, store_spec.V, (4,), generator=g)
        lp = torch.log_softmax(torch.randn(3, store_spec.V, generator=g), dim=-1)
        enc = codec.encode(lp, tokens[1:], temperatures=store_spec.TEMPS)
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(doc_id, tokens.numpy(), np.ones(3, bool), fields))
    w.write_shard(0, docs)
    w.finalize(1)
    hub.export_store(str(tmp_path / "src"), str(tmp_path / "out"))
    view = pq.read_table(tmp_path / "out" / "data" / "000000.parquet")
    assert view["source_row"].to_pylist() == [*ids[:4], "r", "r"]
    assert view["window"].to_pylist() == [0, 0, 0, 0, 12, 12]
