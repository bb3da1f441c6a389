"""Corruption: a flipped byte, a truncated file and a deleted shard, in every backend.

A damaged store is built from a real teacher pass by damaging shard 1 of 3 (the byte and the
file are drawn from a seeded RNG). Then every way of reading it must refuse it with one error
class, ``CorruptShardError``, and one message naming the shard's path: ``logitstore verify``
(non-zero exit), ``LogitStore.read_shard`` and ``iter_documents``, ``StoreDataset`` and
training. Undamaged shards still read, and equal the undamaged store's documents.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from logitstore import open_store
from logitstore.cli import main
from logitstore.dataset import StoreDataset
from logitstore.errors import CorruptShardError
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass
from logitstore.pipelines.train import TrainConfig, train

BACKENDS = ["zarr", "parquet"]
DAMAGES = ["flip", "truncate", "delete"]
DAMAGED = 1

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/hardening/conftest.py


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corruption")
    out = {}
    for backend in BACKENDS:
        out[backend] = root / backend
        run_teacher_pass(
            TeacherPassConfig(
                teacher=str(tiny_teacher_dir), data=str(text_jsonl), out=str(out[backend]),
                k=8, max_length=64, limit=3, docs_per_shard=6, backend=backend, progress=False,
            )
        )  # fmt: skip
        assert open_store(str(out[backend])).num_shards >= 3
    return out


def damage(store: Path, how: str, seed: int) -> str:
    """Damage shard ``DAMAGED`` of ``store`` in place; returns the shard's manifest path."""
    entry = open_store(str(store)).manifest["shards"][DAMAGED]
    rng = random.Random(seed)
    name, size = rng.choice([f for f in entry["files"] if f[1] > 0])
    path = store / name
    if how == "flip":
        data = bytearray(path.read_bytes())
        at = rng.randrange(size)
        data[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif how == "truncate":
        with path.open("r+b") as f:
            f.truncate(rng.randrange(size))
    else:
        target = store / entry["path"]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return entry["path"]


@pytest.fixture(params=[(b, d) for b in BACKENDS for d in DAMAGES], ids=lambda p: "-".join(p))
def damaged(request, stores, tmp_path) -> tuple[Path, Path, str]:
    """(damaged copy, the intact original, the damaged shard's path)."""
    backend, how = request.param
    copy = tmp_path / "store"
    shutil.copytree(stores[backend], copy)
    shard = damage(copy, how, seed=BACKENDS.index(backend) * 10 + DAMAGES.index(how))
    return copy, stores[backend], shard


def refusal(fn) -> str:
    with pytest.raises(CorruptShardError) as info:
        fn()
    return str(info.value)


def test_every_reader_refuses_the_damaged_shard_with_one_message(
    damaged, tiny_student_dir, tmp_path
):
    store, intact, shard = damaged
    message = refusal(lambda: open_store(str(store)).read_shard(DAMAGED))
    assert shard in message

    # The same error from every path that reads the shard; none returns numbers.
    assert refusal(lambda: list(open_store(str(store)).iter_documents())) == message
    assert refusal(lambda: list(open_store(str(store), readahead=0).iter_documents())) == message
    first, stop = open_store(str(store)).shard_document_range(DAMAGED)
    assert refusal(lambda: open_store(str(store))[first]) == message
    dataset = StoreDataset(str(store), tokens_per_batch=4096, shuffle=False)
    assert refusal(lambda: list(dataset)) == message
    config = TrainConfig(
        store=str(store), student=str(tiny_student_dir), out=str(tmp_path / "run"),
        max_steps=50, tokens_per_step=512, tokens_per_batch=512, progress=False,
    )  # fmt: skip
    assert refusal(lambda: train(config)) == message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained on it is saved

    # verify names the shard with the same message, and exits non-zero.
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code != 0
    assert f"problem: {message}" in result.output
    assert open_store(str(store)).verify() == [message]

    # The undamaged shards still read, and hold exactly the intact store's documents.
    damaged_store, original = open_store(str(store)), open_store(str(intact))
    for j in range(original.num_shards):
        if j == DAMAGED:
            continue
        for a, b in zip(damaged_store.read_shard(j), original.read_shard(j), strict=True):
            assert a.doc_id == b.doc_id
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.support_ids, b.support_ids)
            np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)
            np.testing.assert_array_equal(a.label_logprob, b.label_logprob)
    assert stop > first


@pytest.mark.integration
def test_verify_command_exits_non_zero_and_names_the_shard(stores, tmp_path):
    # The installed entry point, in its own process, for one damage per backend.
    for backend in BACKENDS:
        copy = tmp_path / backend
        shutil.copytree(stores[backend], copy)
        if backend == "zarr":  # the same command accepts the intact store
            ok = subprocess.run(_verify(copy), capture_output=True, text=True, timeout=120)
            assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
        shard = damage(copy, "flip", seed=7)
        bad = subprocess.run(_verify(copy), capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0
        assert shard in bad.stderr and "1 problem(s)" in bad.stderr


def _verify(store: Path) -> list[str]:
    script = Path(sys.executable).with_name("logitstore")
    head = (
        [str(script)] if script.exists() else [sys.executable, "-c", "from cli import main; main()"]
    )
    return [*head, "verify", str(store)]


def test_damage_the_checksum_misses_is_still_refused(stores, tmp_path):
    # A shard rewritten with a consistent checksum (a buggy writer, not bit rot) but the wrong
    # document count: the reader checks shapes and counts against the manifest too.
    import json

    from logitstore.storage._fs import tree_checksum

    copy = tmp_path / "store"
    shutil.copytree(stores["parquet"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["shards"][DAMAGED]
    entry["documents"] += 1
    manifest["statistics"]["documents"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    files = [(n, (copy / n).read_bytes()) for n, _ in entry["files"]]
    assert tree_checksum(files) == entry["sha256"]  # the checksum still matches
    message = refusal(lambda: open_store(str(copy)).read_shard(DAMAGED))
    assert entry["path"] in message and "documents" in message
