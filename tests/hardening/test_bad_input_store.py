"""Store input that cannot be trusted: invalid, incomplete or escaping manifests and settings
from the future (each refused through the ``logitstore`` CLI with a message naming the problem,
a non-zero exit and no traceback, and nothing written or changed), a rival writer's claim on a
shard, and documents whose fields the capture does not declare (refused by the writer, writing
nothing of the shard).

The helpers (``kit``) and the store are in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, _owners
from logitstore.codecs import get_codec
from logitstore.errors import DataError
from logitstore.storage import _fs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- manifests that cannot be trusted ------------------------------------------------------------


def _edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(manifest: Path) -> None:
        data = json.loads(manifest.read_text())
        change(data)
        manifest.write_text(json.dumps(data))

    return apply


def _text(text: str) -> Callable[[Path], None]:
    return lambda manifest: manifest.write_text(text)


def _shard_path(path: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        old = m["shards"][0]["path"]
        m["shards"][0]["path"] = path
        m["shards"][0]["files"] = [[path + n[len(old) :], s] for n, s in m["shards"][0]["files"]]

    return change


MANIFESTS = {
    "truncated": (_text('{"format_version": 1, "backend"'), ["not valid JSON"]),
    "not an object": (_text("[1, 2, 3]"), ["JSON object", "list"]),
    "NaN": (lambda p: p.write_text(p.read_text().replace('"vocab_size": 384', '"vocab_size": NaN')),
            ["not valid JSON", "NaN"]),
    "no codec": (_edit(lambda m: m.pop("codec")), ["missing the field 'codec'"]),
    "no checksum": (_edit(lambda m: m["shards"][0].pop("sha256")), ["shards[0]", "'sha256'"]),
    "mistyped": (_edit(lambda m: m.update(vocab_size="384")), ["vocab_size"]),
    "future format": (_edit(lambda m: m.update(format_version=3)),
                      ["format version 3", "supports 1, 2"]),
    "future codec": (_edit(lambda m: m["codec"].update(version=9)),
                     ["version 9", "knows version 1"]),
    "unknown codec": (_edit(lambda m: m["codec"].update(name="zip")),
                      ["unknown codec 'zip'", "topk"]),
    "unknown backend": (_edit(lambda m: m.update(backend="hdf5")),
                        ["unknown backend 'hdf5'", "zarr"]),
    "parent": (_edit(_shard_path("../outside.zarr")), ["'../outside.zarr'", "escapes"]),
    "absolute": (_edit(_shard_path("/tmp/outside.zarr")), ["'/tmp/outside.zarr'", "escapes"]),
    "inner parent": (_edit(_shard_path("shards/../../x.zarr")), ["escapes"]),
    "url": (_edit(_shard_path("file:///etc")), ["escapes"]),
    "drive": (_edit(_shard_path("C:/x.zarr")), ["escapes"]),
    "home": (_edit(_shard_path("~/x.zarr")), ["escapes"]),
    "backslash": (_edit(_shard_path("shards\\..\\..\\x.zarr")), ["escapes"]),
    "file escapes": (
        _edit(lambda m: m["shards"][0]["files"][0].__setitem__(
            0, m["shards"][0]["path"] + "/../../../outside")),
        ["escapes"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_untrustworthy_manifests_are_refused_by_every_reader(case, store_copy, tmp_path, kit):
    break_it, words = MANIFESTS[case]
    break_it(store_copy / "manifest.json")
    outside = tmp_path / "outside.zarr"  # what an escaping path would point at, if followed
    outside.mkdir()
    before = kit.snapshot(tmp_path)
    commands = {
        "verify": ["verify", store_copy],
        "inspect": ["inspect", store_copy],
        "train": ["train", "--store", store_copy, "--student", "unused", "--out", tmp_path / "r"],
        "convert": ["convert", store_copy, "--backend", "parquet", tmp_path / "converted"],
        "export": ["export", store_copy, tmp_path / "exported"],
    }
    for name, args in commands.items():
        result = kit.invoke(*args)
        kit.refused(result, "error:", *words)
        assert kit.snapshot(tmp_path) == before, name  # nothing written, nothing changed


def test_settings_from_the_future_or_unreadable_refuse_a_resume(
    store_copy, tiny_teacher_dir, text_jsonl, kit
):
    settings = store_copy / "settings.json"
    data = json.loads(settings.read_text())
    for text, words in (
        (json.dumps({**data, "format_version": 3}), ["settings.json", "format version 3"]),
        ('{"format_version": 1', ["settings.json is not valid JSON"]),
    ):
        settings.write_text(text)
        before = kit.snapshot(store_copy)
        kit.refused(kit.teacher_pass(tiny_teacher_dir, text_jsonl, store_copy, "--resume"), *words)
        assert kit.snapshot(store_copy) == before


# ---- two writers, one shard ----------------------------------------------------------------------


def test_two_writers_claiming_the_same_shard(
    tiny_teacher_dir, text_jsonl, tmp_path, monkeypatch, kit
):
    """A rival writer (another process of the same store) claims shard 1 just before this run
    commits it: this run stops with a clear error, leaves the rival's claim and its own shard 0
    alone, and a later ``--resume`` (once the rival is gone) finishes a store that verifies."""
    from logitstore import format as fmt

    out = tmp_path / "store"
    real = StoreWriter.write_shard
    rival_claim = out / "claims" / "000001.claim"

    def contested(self, index, documents, fidelity=None):
        if index == 1 and not rival_claim.exists():
            rival = StoreWriter(str(out), mode="join", codec=self.codec, backend="zarr",
                                metadata={k: self.settings[k] for k in fmt.METADATA_KEYS},
                                vocab_size=self.vocab_size)  # fmt: skip
            rival._claim(1, rival._path(fmt.record_name(1)))  # held, as by a live writer
        return real(self, index, documents, fidelity)

    monkeypatch.setattr(StoreWriter, "write_shard", contested)
    args = ["--teacher", tiny_teacher_dir, "--data", text_jsonl, "--out", out, "--k", "8",
            "--max-length", "32", "--limit", "2", "--docs-per-shard", "3", "--no-progress"]  # fmt: skip
    result = kit.invoke("teacher-pass", *args)
    kit.refused(result, "shard 1 is claimed by another writer", f"pid {os.getpid()}")
    monkeypatch.undo()
    assert rival_claim.read_text() == _owners.owner()  # the rival's, intact
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json"]
    record = json.loads((out / "records" / "000000.json").read_text())
    assert kit.tree_checksum(out, record["files"]) == record["sha256"]
    assert not any(p.name.startswith(_fs.TMP_PREFIX) for p in out.rglob("*"))

    rival_claim.unlink()  # the rival is gone
    resumed = kit.invoke("teacher-pass", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    checked = kit.invoke("verify", out)
    assert checked.exit_code == 0 and "ok:" in checked.output, checked.output


# ---- the writer's field check (documents vs the capture's temperatures) --------------------------


def test_writer_requires_the_exact_fields_the_capture_declares(tmp_path):
    """The store's ``temperatures`` name the ``tail_logsumexp`` columns, so a document with another
    number of columns, or with a field the codec does not produce, is refused and nothing of the
    shard is written."""
    vocab, codec = 50, get_codec("topk", k=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (9,), generator=g)
    lp = torch.log_softmax(torch.randn(8, vocab, generator=g), -1)

    def doc(temps: tuple[float, ...], **extra: np.ndarray) -> EncodedDocument:
        fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:], temperatures=temps).items()}
        return EncodedDocument("d", ids.numpy(), np.ones(8, bool), {**fields, **extra})

    cases = [
        ([2.0], doc(()), ["[2.0] are 1 extra temperature", "no tail_logsumexp"]),
        ([], doc((2.0,)), ["[] are 0 extra temperature", "(8, 1)"]),
        ([2.0, 4.0], doc((2.0,)), ["are 2 extra temperature", "(8, 1)"]),
        ([2.0], doc((2.0,), bogus=np.zeros(8, np.float32)), ["unexpected ['bogus']"]),
    ]
    for j, (temps, document, words) in enumerate(cases):
        root = tmp_path / f"s{j}"
        meta = {"teacher": {}, "tokenizer": {}, "capture": {}, "source": {}}
        writer = StoreWriter(
            str(root), codec=codec, metadata=meta, vocab_size=vocab, temperatures=temps
        )
        with pytest.raises(DataError) as info:
            writer.write_shard(0, [document])
        for word in words:
            assert word in str(info.value), (word, str(info.value))
        writer.close()  # the writer's own file goes with it
        assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["settings.json"]
    # The matching layout is accepted and recorded with its number of columns.
    meta = {"teacher": {}, "tokenizer": {}, "capture": {"temperatures": [2.0]}, "source": {}}
    writer = StoreWriter(str(tmp_path / "ok"), codec=codec, metadata=meta, vocab_size=vocab)
    writer.write_shard(0, [doc((2.0,))])
    assert writer.finalize(1)["num_temperatures"] == 1
