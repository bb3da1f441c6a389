"""Untrusted stores, manifest and settings fields: each refused cleanly, quoted cut short.

Long manifest values, keys given twice, JSON that parses to far more than its bytes, document
counts a reader would size its tables from, lone surrogates, keys the format does not define,
and a resumed store's settings and records. The hostile stores are consistent (an attacker
writes the manifest too), so a refusal can only come from the safety checks. The store builder
is in ``../_hostile.py``, ``kit`` in ``../conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from logitstore import StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.dataset import StoreDataset
from logitstore.errors import CorruptShardError, LogitstoreError, ManifestError, UnsafePathError
from tests.hardening._hostile import META, VOCAB, manifest, rewrite

# -- manifest values quoted cut short, keys given twice ------------------------------------


LONG = "x" * 100_000
LONG_EDITS = {
    "codec-name": lambda m: m["codec"].update(name=LONG),
    "codec-version": lambda m: m["codec"].update(version=LONG),
    "backend": lambda m: m.update(backend=LONG),
    "format-version": lambda m: m.update(format_version=LONG),
    "parameters": lambda m: m["codec"]["configuration"].update(dict.fromkeys(
        (f"p{i}" * 20 for i in range(2_000)), 1)),
    "values": lambda m: m["codec"]["configuration"].update(values=LONG),
    "k": lambda m: m["codec"]["configuration"].update(k=list(range(20_000))),
}  # fmt: skip


@pytest.mark.parametrize("edit", sorted(LONG_EDITS))
def test_long_manifest_values_are_quoted_cut_short(store, edit, kit):
    """A refusal quotes the manifest's value cut short: a codec name, backend, version or
    parameter of 100,000 characters was quoted whole, in a line as long."""
    data = manifest(store)
    LONG_EDITS[edit](data)
    rewrite(store, data)
    with pytest.raises(LogitstoreError) as info:
        open_store(str(store))
    assert len(str(info.value)) < 300, str(info.value)[:300]
    result = kit.invoke("inspect", store)
    assert result.exit_code == 2 and len(result.output) < 300, result.output[:300]


@pytest.mark.parametrize(
    ("owner", "key", "first"),
    [("", "shards", []), ("codec", "name", "dense"), ("shards[0]", "sha256", "0" * 64)],
)
def test_a_key_given_twice_in_the_manifest_is_refused(store, owner, key, first, kit):
    """JSON leaves a repeated key's meaning open: Python takes the last value, another checker
    may take the first (a store one tool verifies and another reads otherwise). A manifest
    that repeats a key is refused, naming the key."""
    data = manifest(store)
    obj = data if not owner else data["codec"] if owner == "codec" else data["shards"][0]
    twice = "{" + f"{json.dumps(key)}: {json.dumps(first)}, " + json.dumps(obj)[1:]
    if not owner:
        raw = twice
    else:
        if owner == "codec":
            data["codec"] = "@@"
        else:
            data["shards"][0] = "@@"
        raw = json.dumps(data).replace('"@@"', twice)
    (store / "manifest.json").write_text(raw)
    with pytest.raises(ManifestError, match=f"key '{key}' appears twice"):
        open_store(str(store))
    result = kit.invoke("inspect", store)
    assert result.exit_code == 2 and "appears twice" in result.output, result.output


# -- JSON that parses to far more than its bytes ---------------------------------------------


@pytest.mark.parametrize("unit", ["{},", "[],", '"ab",', "0.5,"])
def test_json_of_many_tiny_values_is_refused_before_parsing(store, unit, kit):
    # 2 MB of "{}," parse to 48 MB of dicts; the 64 MiB a JSON file may hold, to 1.5 GiB.
    # Refused from a count on the bytes: what a file parses to stays within a small multiple.
    text = json.dumps(manifest(store))
    extra = "[" + unit * (2 * 2**20 // len(unit)) + "0]"
    (store / "manifest.json").write_text(text[:-1] + f', "extra": {extra}}}')
    with pytest.raises(ManifestError, match="objects and lists .* parsed"):
        open_store(str(store))

    if (store / "shards" / "000000.zarr").exists():  # a shard's zarr.json alike
        rewrite(store, json.loads(text))
        group = store / "shards" / "000000.zarr" / "zarr.json"
        group.write_text(group.read_text().rstrip()[:-1] + f', "extra": {extra}}}')
        kit.reseal(store, 0)
        opened = open_store(str(store))
        with pytest.raises(CorruptShardError, match="zarr.json holds .* parsed"):
            opened.read_shard(0)


def test_json_as_the_format_writes_it_is_read_at_any_size(store):
    # A large manifest of the kind a store has (many [name, size] pairs, long id lists),
    # compact or indented, stays within the bound.
    data = manifest(store)
    data["extra"] = {
        "files": [[f"shards/{i:06d}.zarr/values/c/0/0", 123456] for i in range(40_000)],
        "ids": list(range(100_000, 300_000)),
    }
    for indent in (None, 2):
        (store / "manifest.json").write_text(json.dumps(data, indent=indent))
        assert (store / "manifest.json").stat().st_size > 2**21
        assert len(open_store(str(store))) == 4


# -- counts a reader sizes tables from -------------------------------------------------------


@pytest.mark.parametrize("documents", [20_000_000, 2**39])
def test_document_counts_beyond_the_shards_bytes_are_refused_at_opening(store, documents):
    # StoreDataset plans an epoch from the manifest's document counts before any shard is
    # read: 2e8 documents declared for a shard of 21 tokens took 3 GB, then a MemoryError
    # (the size bound counted positions and tokens, not documents).
    data = manifest(store)
    data["shards"][0]["documents"] = documents
    data["statistics"]["documents"] = sum(s["documents"] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[0\].positions: .* documents \("):
        open_store(str(store))
    with pytest.raises(ManifestError, match="times the shard's"):
        next(iter(StoreDataset(str(store), tokens_per_batch=64)))

    data["shards"][0]["documents"] = 3  # (a count off by one is the shard's to refuse)
    data["statistics"]["documents"] = sum(s["documents"] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(CorruptShardError, match="documents, tokens, positions"):
        next(iter(StoreDataset(str(store), tokens_per_batch=64, shuffle=False)))


@pytest.mark.parametrize("shuffle", [True, False])
def test_document_counts_of_declared_file_sizes_are_read_before_a_loader_plans_them(store, shuffle):
    """A manifest may declare a file of 512 GiB for a shard of a few KB, and 2^34 documents in
    it, within the bound of 256 times the declared bytes. The loader sized its plan of the epoch
    from those counts before reading a shard: 128 GiB of document indices. Now a window's
    counts beyond a million are read from its shards first, which refuse them."""
    data = manifest(store)
    entry = data["shards"][0]
    entry["documents"], entry["tokens"] = 2**34, 2**34 + entry["positions"]
    entry["files"][0][1] = 2**39
    entry["bytes"] = sum(size for _, size in entry["files"])
    for key in ("documents", "tokens", "bytes"):
        data["statistics"][key] = sum(s[key] for s in data["shards"])
    rewrite(store, data)
    assert len(open_store(str(store))) > 2**34  # opens: the bound holds for what is declared
    dataset = StoreDataset(str(store), tokens_per_batch=64, shuffle=shuffle, shuffle_window=2)
    with pytest.raises(CorruptShardError, match=entry["path"]):
        next(iter(dataset))


def test_document_offsets_count_toward_a_shards_declared_size(store):
    # Consistent counts, with as many one-token documents as the shard's bytes allow tokens:
    # each needs an 8-byte offset too.
    data = manifest(store)
    entry = data["shards"][0]
    on_disk = sum(size for _, size in entry["files"])
    entry["documents"] = 256 * on_disk // 2
    entry["tokens"] = entry["documents"] + entry["positions"]
    for key in ("documents", "tokens"):
        data["statistics"][key] = sum(s[key] for s in data["shards"])
    rewrite(store, data)
    with pytest.raises(ManifestError, match=r"shards\[0\].positions: .* documents \("):
        open_store(str(store))


# -- strings that are not Unicode ----------------------------------------------------------


@pytest.mark.parametrize("where", ["teacher.model", "source.key"])
def test_a_lone_surrogate_in_the_manifest_is_refused(store, tmp_path, where):
    # inspect printed it (UnicodeEncodeError on the terminal) and export wrote it into the
    # dataset card (UnicodeEncodeError); refused when the manifest is parsed instead.
    from logitstore.hub import export_store

    data = manifest(store)
    section, name = where.split(".")
    if name == "key":
        data[section]["\udc00"] = 1
    else:
        data[section][name] = "\ud800teacher"
    rewrite(store, data)
    text = (store / "manifest.json").read_text()
    assert "\\ud800" in text or "\\udc00" in text
    with pytest.raises(ManifestError, match=rf"field {section}\..* lone surrogate"):
        open_store(str(store))
    with pytest.raises(ManifestError, match="lone surrogate"):
        export_store(str(store), str(tmp_path / "export"))


# -- keys the format does not define ---------------------------------------------------------


def test_unknown_fidelity_keys_are_carried_past_by_convert(store, tmp_path):
    # A shard's fidelity is an object of finite numbers, any keys (a newer writer may add
    # some); summing them for the converted store's statistics raised a KeyError.
    from logitstore.storage.convert import convert_store

    data = manifest(store)
    data["shards"][0]["fidelity"] = {"count": 4.0, "mass_captured_sum": 2.0, "newer_sum": 1.0}
    data["shards"][1]["fidelity"] = {"count": 4.0, "mass_captured_sum": 4.0, "x_max": 9.0}
    rewrite(store, data)
    other = "parquet" if (store / "shards" / "000000.zarr").exists() else "zarr"
    out = convert_store(str(store), str(tmp_path / "out"), backend=other)
    assert out["statistics"]["fidelity"]["positions"] == 8.0
    assert out["statistics"]["fidelity"]["mass_captured"] == 0.75
    assert out["shards"][0]["fidelity"] == data["shards"][0]["fidelity"]  # copied as found


# -- a resumed store's settings and records --------------------------------------------------


def _resume(root: Path, backend: str) -> StoreWriter:
    return StoreWriter(str(root), codec=get_codec("topk", k=8), backend=backend, metadata=META,
                       vocab_size=VOCAB, mode="resume")  # fmt: skip


@pytest.mark.parametrize(
    ("form", "error", "words"),
    [
        ("deep-settings", ManifestError, "settings.json nests"),
        ("settings-linked-out", UnsafePathError, "outside the store's root"),
        ("deep-record", ManifestError, "records/000000.json nests"),
        ("record-without-a-field", ManifestError, "records/000000.json is missing the field"),
        ("record-of-the-wrong-type", ManifestError, "records/000001.json field files"),
        ("record-path-out", UnsafePathError, "records/000000.json field files[0]"),
    ],
)
def test_malformed_settings_and_records_refuse_a_resume_cleanly(
    store, tmp_path, form, error, words
):
    # A store's settings.json and records/ are read back when a writer resumes it (or
    # finalizes it): they were parsed unbounded, so a deep file raised RecursionError and a
    # record missing a field a KeyError or TypeError.
    backend = "zarr" if (store / "shards" / "000000.zarr").exists() else "parquet"
    records = store / "records"
    deep = "[" * 100_000 + "]" * 100_000
    if form == "deep-settings":
        (store / "settings.json").write_text('{"format_version": 2, "x": ' + deep + "}")
    elif form == "settings-linked-out":
        outside = tmp_path / "elsewhere.json"
        shutil.move(store / "settings.json", outside)
        (store / "settings.json").symlink_to(outside)
    elif form == "deep-record":
        (records / "000000.json").write_text(deep)
    else:
        name = "000001.json" if form == "record-of-the-wrong-type" else "000000.json"
        record = json.loads((records / name).read_text())
        if form == "record-without-a-field":
            del record["num_temperatures"]
        elif form == "record-of-the-wrong-type":
            record["files"] = 5
        else:
            record["files"][0][0] = "../../outside"
        (records / name).write_text(json.dumps(record))
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        _resume(store, backend).finalize(2)
