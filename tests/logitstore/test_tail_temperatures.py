"""The extra capture temperatures as a format field (``tail_temperatures``, format 2): checked
on the way in (writer) and on the way out (manifest), read through one accessor, and format 1
stores (temperatures in ``capture.temperatures``) still read and train at the right column."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, convert_store, open_store
from logitstore import format as fmt
from logitstore.codecs import get_codec
from logitstore.errors import ConfigError, ManifestError
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.pipelines.train import TrainConfig, train

SECTIONS = {"teacher": {}, "tokenizer": {}, "capture": {"seed": 0}, "source": {}}
VOCAB = 40


def _writer(root: Path, **kw) -> StoreWriter:
    return StoreWriter(
        str(root), codec=get_codec("topk", k=4), vocab_size=VOCAB, **{"metadata": SECTIONS, **kw}
    )


def _document(temps: tuple[float, ...]) -> EncodedDocument:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (7,), generator=g)
    lp = torch.log_softmax(torch.randn(6, VOCAB, generator=g), -1)
    fields = get_codec("topk", k=4).encode(lp, ids[1:], temperatures=temps)
    return EncodedDocument(
        "d", ids.numpy(), np.ones(6, bool), {k: v.numpy() for k, v in fields.items()}
    )


BAD = [  # (temperatures, words the ConfigError must hold)
    ([math.nan], "temperatures[0]"),
    ([math.inf], "temperatures[0]"),
    ([0.0], "temperatures[0]"),
    ([-2.0], "temperatures[0]"),
    ([2.0, 3.0, 2.0], "temperatures[2]"),
    (["2"], "temperatures[0]"),
    ([True], "temperatures[0]"),
    ([None], "temperatures[0]"),
    (2.0, "temperatures: expected a list"),
    ([2.0 + i for i in range(fmt.MAX_TEMPERATURES + 1)], "65 items"),
]


@pytest.mark.parametrize(("temps", "words"), BAD, ids=[repr(t)[:30] for t, _ in BAD])
def test_the_writer_refuses_bad_temperatures_naming_the_field(tmp_path, temps, words):
    with pytest.raises(ConfigError, match="temperatures") as info:
        _writer(tmp_path / "s", temperatures=temps)
    assert words in str(info.value)
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_the_writer_records_the_temperatures_as_a_format_field(tmp_path):
    writer = _writer(tmp_path / "s", temperatures=(2.0, 0.5))
    writer.write_shard(0, [_document((2.0, 0.5))])
    manifest = writer.finalize(1)
    assert manifest["format_version"] == fmt.FORMAT_VERSION == 2
    assert manifest["tail_temperatures"] == [2.0, 0.5] and manifest["num_temperatures"] == 2
    assert manifest["capture"] == {"seed": 0}  # the pipeline's section, untouched
    assert fmt.tail_temperatures(open_store(str(tmp_path / "s")).manifest) == [2.0, 0.5]


def test_format_1_callers_giving_capture_temperatures_still_write(tmp_path):
    legacy = {**SECTIONS, "capture": {"seed": 0, "temperatures": [2.0]}}
    writer = _writer(tmp_path / "a", metadata=legacy)  # format 1's place: moved to the field
    writer.write_shard(0, [_document((2.0,))])
    manifest = writer.finalize(1)
    assert manifest["tail_temperatures"] == [2.0] and manifest["capture"] == {"seed": 0}
    _writer(tmp_path / "b", metadata=legacy, temperatures=[2.0])  # the same list twice: fine
    with pytest.raises(ConfigError, match="given twice"):
        _writer(tmp_path / "c", metadata=legacy, temperatures=[3.0])


def _as_format_1(manifest: dict) -> dict:
    """``manifest`` as format 1 wrote it: the temperatures in the pipeline's capture section."""
    old = {k: v for k, v in manifest.items() if k != "tail_temperatures"}
    old["capture"] = {**manifest["capture"], "temperatures": manifest["tail_temperatures"]}
    return {**old, "format_version": 1}


def _manifest(temps: list[float]) -> dict:
    settings = fmt.build_settings(
        codec_json=get_codec("topk", k=4).to_json(),
        backend="zarr",
        vocab_size=VOCAB,
        metadata=SECTIONS,
        temperatures=temps,
    )
    record = {
        "index": 0, "path": "shards/000000.zarr", "documents": 1, "tokens": 7, "positions": 6,
        "bytes": 100, "sha256": "0" * 64, "files": [["shards/000000.zarr/zarr.json", 100]],
    }  # fmt: skip
    return fmt.build_manifest(settings, [record], len(temps), None)


def test_format_1_manifests_validate_and_read_through_the_accessor():
    v1 = _as_format_1(_manifest([2.0, 4.0]))
    fmt.validate_manifest(v1)
    assert fmt.tail_temperatures(v1) == [2.0, 4.0]
    unlisted = _as_format_1(_manifest([]))
    del unlisted["capture"]["temperatures"]  # format 1 allowed leaving them out
    fmt.validate_manifest(unlisted)
    assert fmt.tail_temperatures(unlisted) == []
    fmt.validate_manifest({**unlisted, "num_temperatures": 1})
    assert fmt.tail_temperatures({**unlisted, "num_temperatures": 1}) is None  # columns unnamed
    bad = _as_format_1(_manifest([2.0, 4.0]))
    bad["capture"]["temperatures"] = [2.0, 2.0]
    with pytest.raises(ManifestError, match=r"field capture.temperatures\[1\]"):
        fmt.validate_manifest(bad)


@pytest.mark.parametrize(
    ("value", "where"),
    [([2.0, 2.0], "tail_temperatures[1]"), ([0.5] + [1.5] * 64, "tail_temperatures"),
     ([-1.0, 2.0], "tail_temperatures[0]"), ({"t": 2.0}, "tail_temperatures")],
)  # fmt: skip
def test_format_2_manifests_refuse_bad_temperatures_naming_the_field(value, where):
    manifest = _manifest([2.0, 4.0])
    manifest["tail_temperatures"] = value
    with pytest.raises(ManifestError) as info:
        fmt.validate_manifest(json.loads(json.dumps(manifest)))
    assert f"manifest.json field {where}" in str(info.value)
    v2 = _manifest([2.0])
    del v2["tail_temperatures"]
    with pytest.raises(ManifestError, match="missing the field 'tail_temperatures'"):
        fmt.validate_manifest(v2)


# ---- a format 1 store, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> dict[str, str]:
    """A store captured at 3 and 2 besides 1, and the same store as format 1 wrote it."""
    root = tmp_path_factory.mktemp("temps")
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(root / "v2"),
            k=16,
            values="float32",
            max_length=48,
            limit=4,
            temperatures=(1.0, 3.0, 2.0),
            progress=False,
        )
    )
    out = {"v2": str(root / "v2")}
    for name, order in (("v1", None), ("v1_swapped", [2.0, 3.0])):
        shutil.copytree(root / "v2", root / name)
        for file in ("manifest.json", "settings.json"):
            data = json.loads((root / name / file).read_text())
            data = _as_format_1(data)
            if order is not None:
                data["capture"]["temperatures"] = order
            (root / name / file).write_bytes(fmt.dumps(data))
        out[name] = str(root / name)
    return out


def _losses(store: str, student: Path, out: Path) -> list[float]:
    torch.set_num_threads(1)
    train(
        TrainConfig(
            store=store,
            student=str(student),
            out=str(out),
            temperature=2.0,
            max_steps=2,
            tokens_per_step=256,
            tokens_per_batch=256,
            warmup_steps=1,
            progress=False,
            shuffle_window=1,
            device="cpu",
        )
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_a_format_1_store_reads_and_trains_at_the_right_temperature(
    stores, tiny_student_dir, tmp_path
):
    v1, v2 = open_store(stores["v1"]), open_store(stores["v2"])
    assert v1.manifest["format_version"] == 1 and v2.manifest["format_version"] == 2
    assert fmt.tail_temperatures(v1.manifest) == fmt.tail_temperatures(v2.manifest) == [3.0, 2.0]
    for a, b in zip(v1.read_shard(0), v2.read_shard(0)):
        np.testing.assert_array_equal(a.tail_logsumexp, b.tail_logsumexp)
    new = _losses(stores["v2"], tiny_student_dir, tmp_path / "v2")
    assert new and _losses(stores["v1"], tiny_student_dir, tmp_path / "v1") == new
    # The column is chosen by the listed temperature: naming them the other way round changes
    # the loss, so the equality above is not one that holds whatever the list says.
    assert _losses(stores["v1_swapped"], tiny_student_dir, tmp_path / "swapped") != new


def test_converting_a_format_1_store_writes_format_2(stores, tmp_path):
    manifest = convert_store(stores["v1"], str(tmp_path / "p"), backend="parquet")
    assert manifest["format_version"] == 2 and manifest["tail_temperatures"] == [3.0, 2.0]
    assert "temperatures" not in manifest["capture"]


def test_resuming_a_store_an_older_format_writer_started_is_refused_plainly(tmp_path):
    from logitstore.errors import SettingsMismatchError

    root = tmp_path / "s"
    writer = _writer(root, temperatures=[2.0])
    writer.write_shard(0, [_document((2.0,))])
    settings = json.loads((root / fmt.SETTINGS_NAME).read_text())
    # As a format 1 writer left it: the temperatures in the capture section.
    settings["format_version"] = 1
    settings["capture"]["temperatures"] = settings.pop("tail_temperatures")
    (root / fmt.SETTINGS_NAME).write_text(json.dumps(settings))
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(SettingsMismatchError) as info:
        _writer(root, temperatures=[2.0], mode="resume")
    message = str(info.value)
    assert "format 1" in message and f"format {fmt.FORMAT_VERSION}" in message
    assert "cannot continue" in message
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing touched
