"""StoreWriter: modes, atomic commits, shard claims, resume, finalize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.codecs import get_codec
from logitstore.codecs.fidelity import position_fidelity
from logitstore.errors import (
    ConfigError,
    CorruptShardError,
    DataError,
    SettingsMismatchError,
    ShardClaimError,
    StoreExistsError,
    StoreNotFoundError,
)
from logitstore.storage import _fs, get_backend
from logitstore.storage.base import ShardArrays

V = 300
META = {
    "teacher": {"model": "tiny", "revision": "r1"},
    "tokenizer": {"vocab_hash": "abc"},
    "capture": {"temperatures": [2.0]},
    "source": {"path": "x.jsonl"},
}


def codec():
    return get_codec("topk", k=8)


def encode(c, n: int, seed: int, with_dense: bool = False):
    """``n`` random documents; with ``with_dense`` also their dense log-probs and labels."""
    g = torch.Generator().manual_seed(seed)
    docs, dense = [], []
    for d in range(n):
        t = int(torch.randint(2, 30, (1,), generator=g))
        ids = torch.randint(0, V, (t,), generator=g)
        lp = torch.log_softmax(2.5 * torch.randn(t - 1, V, generator=g), dim=-1)
        enc = c.encode(lp, ids[1:], temperatures=(2.0,), generator=g)
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(f"d{seed}-{d}", ids.numpy(), np.ones(t - 1, bool), fields))
        dense.append((lp, ids[1:]))
    return (docs, dense) if with_dense else docs


def writer(url, mode="create", **kw) -> StoreWriter:
    args = {"codec": codec(), "backend": "zarr", "metadata": META, "vocab_size": V}
    args.update(kw)
    return StoreWriter(str(url), mode=mode, **args)


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_create_refuses_a_non_empty_location(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(StoreExistsError, match="notes.txt"):
        writer(tmp_path)


def test_create_refuses_an_existing_store(tmp_path):
    writer(tmp_path / "s")
    with pytest.raises(StoreExistsError, match="settings.json"):
        writer(tmp_path / "s")


def test_metadata_sections_are_required(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        writer(tmp_path / "s", metadata={k: v for k, v in META.items() if k != "tokenizer"})


def test_resume_mismatch_names_the_key(tmp_path):
    writer(tmp_path / "s")
    meta = json.loads(json.dumps(META))
    meta["teacher"]["revision"] = "r2"
    with pytest.raises(SettingsMismatchError, match=r"teacher\.revision is 'r1'.*'r2'"):
        writer(tmp_path / "s", mode="resume", metadata=meta)
    with pytest.raises(SettingsMismatchError, match=r"codec\.configuration\.k is 8.*16"):
        writer(tmp_path / "s", mode="join", codec=get_codec("topk", k=16))
    with pytest.raises(SettingsMismatchError, match="backend"):
        writer(tmp_path / "s", mode="resume", backend="parquet")


def test_join_needs_an_existing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store to join"):
        writer(tmp_path / "s", mode="join")


def test_resume_of_an_empty_location_creates(tmp_path):
    w = writer(tmp_path / "s", mode="resume")
    assert w.committed_shards() == set()
    assert (tmp_path / "s" / "settings.json").exists()


def test_exception_mid_write_leaves_nothing_committed(tmp_path, monkeypatch):
    w = writer(tmp_path / "s")
    docs = encode(w.codec, 3, 0)
    real = _fs.write_bytes_atomic

    def fail_on_record(fs, path, data):
        if "/records/" in path:
            raise OSError("disk full (simulated)")
        real(fs, path, data)

    monkeypatch.setattr(_fs, "write_bytes_atomic", fail_on_record)
    with pytest.raises(OSError, match="disk full"):
        w.write_shard(0, docs)
    monkeypatch.undo()
    assert w.committed_shards() == set()
    # No shard, claim, temporary or manifest: only the settings, and the open writer's own file.
    own = w._owner_file.rpartition("/s/")[2]
    assert files_under(tmp_path / "s") == sorted([own, "settings.json"])
    with pytest.raises(CorruptShardError, match=r"missing: 0"):
        w.finalize(1)
    assert not (tmp_path / "s" / "manifest.json").exists()
    # The failed attempt released its claim: a retry commits.
    w.write_shard(0, docs)
    w.finalize(1)
    assert [d.doc_id for d in open_store(str(tmp_path / "s")).iter_documents()] == [
        d.doc_id for d in docs
    ]


def test_exception_while_writing_files_on_an_object_store(monkeypatch):
    import fsspec

    url = "memory://writer-tests/partial"
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    w = writer(url)
    real = fs.pipe

    def pipe_half(mapping, *a, **k):
        items = sorted(mapping.items())
        real(dict(items[: len(items) // 2]))
        raise OSError("connection reset (simulated)")

    monkeypatch.setattr(w.fs, "pipe", pipe_half)
    with pytest.raises(OSError, match="connection reset"):
        w.write_shard(0, encode(w.codec, 2, 0))
    monkeypatch.undo()
    assert w.committed_shards() == set()
    own = w._owner_file.rpartition("/")[2]
    assert sorted(p.rpartition("/")[2] for p in fs.find(url)) == sorted([own, "settings.json"])


def test_two_writers_cannot_claim_one_shard(tmp_path, monkeypatch):
    a = writer(tmp_path / "s")
    b = writer(tmp_path / "s", mode="join")
    docs = encode(a.codec, 2, 0)
    seen = []
    encode_shard = a.backend.encode

    def encode_while_b_tries(*args, **kw):
        if seen:  # ``b``'s own encode (backends are shared instances)
            return encode_shard(*args, **kw)
        seen.append("a is encoding")
        # Writer ``a`` holds the claim now; ``b`` must be refused, not interleave.
        with pytest.raises(ShardClaimError, match="claimed by another writer") as info:
            b.write_shard(0, docs)
        seen.append(str(info.value))
        return encode_shard(*args, **kw)

    monkeypatch.setattr(a.backend, "encode", encode_while_b_tries)
    a.write_shard(0, docs)
    monkeypatch.undo()
    assert len(seen) == 2 and "pid" in seen[1]
    with pytest.raises(ShardClaimError, match="already committed"):
        b.write_shard(0, docs)
    b.write_shard(1, encode(b.codec, 1, 1))  # disjoint shards are fine
    assert a.committed_shards() == {0, 1}


def test_resume_clears_stale_claims_and_temporaries(tmp_path):
    w = writer(tmp_path / "s")
    w.write_shard(0, encode(w.codec, 2, 0))
    # A crashed run: a claim and a half-written temporary shard, no record.
    (tmp_path / "s" / "claims").mkdir(exist_ok=True)
    (tmp_path / "s" / "claims" / "000001.claim").write_text("pid 1")
    (tmp_path / "s" / "shards" / ".tmp-dead-000001.zarr").mkdir()
    with pytest.raises(ShardClaimError):
        writer(tmp_path / "s", mode="join").write_shard(1, encode(w.codec, 1, 1))
    r = writer(tmp_path / "s", mode="resume")
    assert r.committed_shards() == {0}
    r.write_shard(1, encode(w.codec, 1, 1))
    r.finalize(2)
    assert not any(".tmp-" in f or "claims" in f for f in files_under(tmp_path / "s"))


def test_resumed_run_is_byte_identical(tmp_path):
    c = codec()
    shards = [encode(c, n, seed) for seed, n in enumerate((2, 3, 1))]
    full = writer(tmp_path / "full")
    for j, docs in enumerate(shards):
        full.write_shard(j, docs)
    full.finalize(3)
    part = writer(tmp_path / "part")
    part.write_shard(0, shards[0])
    part.write_shard(2, shards[2])  # crash before shard 1 and before finalize
    resumed = writer(tmp_path / "part", mode="resume")
    for j in sorted(set(range(3)) - resumed.committed_shards()):
        resumed.write_shard(j, shards[j])
    resumed.finalize(3)
    a, b = tmp_path / "full", tmp_path / "part"
    assert files_under(a) == files_under(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_under(a))


def test_finalize_refuses_bad_shard_sets(tmp_path):
    w = writer(tmp_path / "s")
    with pytest.raises(DataError, match="at least one shard"):
        w.finalize(0)
    w.write_shard(1, encode(w.codec, 1, 1))
    with pytest.raises(CorruptShardError, match="missing: 0"):
        w.finalize(2)
    w.write_shard(0, encode(w.codec, 1, 0))
    with pytest.raises(DataError, match=r"\[1\].*beyond"):
        w.finalize(1)
    (tmp_path / "s" / "shards" / "000001.zarr" / "zarr.json").unlink()
    with pytest.raises(CorruptShardError, match="000001.zarr/zarr.json"):
        w.finalize(2)
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: setattr(d, "input_ids", d.input_ids + V), "token ids must lie in"),
        (lambda d: setattr(d, "loss_mask", d.loss_mask[:-1]), "loss_mask must be bool"),
        (lambda d: d.fields.update(values=d.fields["values"].astype(np.int16)), "field 'values'"),
        (lambda d: d.fields.pop("top1"), "fields"),
        (lambda d: setattr(d, "doc_id", "d0-0"), "document id 'd0-0' appears twice"),
    ],
)
def test_documents_that_do_not_fit_are_refused(tmp_path, damage, message):
    w = writer(tmp_path / "s")
    docs = encode(w.codec, 2, 0)
    damage(docs[1])
    with pytest.raises(DataError, match=message):
        w.write_shard(0, docs)
    with pytest.raises(DataError, match="at least one document"):
        w.write_shard(0, [])
    assert w.committed_shards() == set()


def test_manifest_fidelity_is_the_mean_over_all_sampled_positions(tmp_path):
    from logitstore.codecs.fidelity import fidelity_sums

    w = writer(tmp_path / "s")
    per_position = []
    for j in range(2):
        docs, dense = encode(w.codec, 2, j, with_dense=True)
        lp = torch.cat([x for x, _ in dense])
        labels = torch.cat([y for _, y in dense])
        decoded = w.codec.decode(
            {k: np.concatenate([d.fields[k] for d in docs]) for k in docs[0].fields}
        )
        w.write_shard(j, docs, fidelity=fidelity_sums(lp, decoded, labels))
        per_position.append(position_fidelity(lp, decoded, labels))
    got = w.finalize(2)["statistics"]["fidelity"]
    for key in per_position[0]:
        values = np.concatenate([p[key] for p in per_position]).astype(np.float64)
        assert got[key] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12), key
    assert got["positions"] == sum(len(p["top1_agreement"]) for p in per_position)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_shard_too_repetitive_for_readers_is_stored_uncompressed(tmp_path, backend):
    """One position repeated 20,000 times: zstd would shrink it beyond the multiple of its
    bytes on disk a reader accepts once decoded, so the writer stores it uncompressed and
    it reads back; shards of ordinary data stay compressed."""
    import warnings

    import pyarrow.parquet as pq
    import zarr

    c = get_codec("dense", bits=4)
    t = 20_001
    lp = torch.log_softmax(torch.linspace(0.0, -30.0, V), -1).expand(t - 1, V)
    labels = torch.zeros(t - 1, dtype=torch.long)
    fields = {k: v.numpy() for k, v in c.encode(lp, labels, temperatures=(2.0,)).items()}
    doc = EncodedDocument("repeated", np.zeros(t, np.int64), np.ones(t - 1, bool), fields)
    w = writer(tmp_path / "s", codec=c, backend=backend, vocab_size=V)
    with pytest.warns(UserWarning, match="stored uncompressed"):
        record = w.write_shard(0, [doc])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.write_shard(1, encode(c, 3, 0))  # random data: compressed as usual, no warning
    w.finalize(2)
    # Compressed, the shard would have been far smaller than a reader's bound allows: the
    # decoded ids and log-probs alone (12 bytes a vocabulary entry) over 1024 times the bytes.
    arrays = ShardArrays(["repeated"], np.array([0, t]), doc.input_ids, doc.loss_mask, fields)
    files = get_backend(backend).encode(
        "x", arrays, c.fields(V, 1), vocab_size=V, compression_level=3
    )
    assert 12 * V * (t - 1) > 1024 * sum(len(b) for b in files.values())
    assert record["bytes"] > (t - 1) * V  # every code stored as it is
    # Read with the storage libraries: no compression on the repeated shard, zstd on the other.
    if backend == "zarr":
        for j, expected in ((0, []), (1, ["zstd"])):
            arr = zarr.open_array(str(tmp_path / "s" / f"shards/00000{j}.zarr/values"), mode="r")
            assert [type(x).__name__.removesuffix("Codec").lower() for x in arr.compressors] == (
                expected
            )
    else:
        for j, expected in ((0, "UNCOMPRESSED"), (1, "ZSTD")):
            meta = pq.ParquetFile(tmp_path / "s" / f"shards/00000{j}.parquet").metadata
            found = {meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
            assert found == {expected}
    store = open_store(str(tmp_path / "s"))
    assert store.verify() == []
    got = store[0]
    want = c.decode(fields)
    np.testing.assert_array_equal(got.positions.support_ids, want.support_ids)
    np.testing.assert_array_equal(got.positions.support_logprobs, want.support_logprobs)


def _race(url: str, shards, queue) -> None:
    w = writer(url, mode="join")
    won = []
    for i, docs in enumerate(shards):
        try:
            w.write_shard(i, docs)
            won.append(i)
        except ShardClaimError:
            pass
    queue.put(won)


@pytest.mark.integration
def test_racing_processes_commit_each_shard_exactly_once(tmp_path):
    import multiprocessing as mp

    url = str(tmp_path / "s")
    w = writer(url)
    shards = [encode(w.codec, 2, i) for i in range(8)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, shards, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    won = sorted(i for r in results for i in r)
    assert won == list(range(8))  # every shard committed by exactly one process
    w.finalize(8)
    assert open_store(url).verify() == []


def test_resume_refuses_while_another_process_of_this_host_writes(tmp_path):
    # Resuming removes the claims and temporaries of the run it continues: under a live run it
    # would pull them from under that run's feet. A killed run's files are stale and go.
    import signal
    import subprocess
    import sys

    url = tmp_path / "s"
    writer(url).write_shard(0, encode(codec(), 2, 0))
    script = (
        "import sys, time\n"
        "from logitstore import StoreWriter\n"
        "from logitstore.codecs import get_codec\n"
        f"StoreWriter(sys.argv[1], mode='join', codec=get_codec('topk', k=8), metadata={META!r},"
        f" vocab_size={V})\n"
        "print('open', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(url)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "open\n"
        with pytest.raises(ShardClaimError, match=rf"written by pid {child.pid} on this host"):
            writer(url, mode="resume")
        assert writer(url, mode="join").committed_shards() == {0}  # joining is what ranks do
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    resumed = writer(url, mode="resume")  # the killed writer's file is stale now
    resumed.write_shard(1, encode(codec(), 1, 1))
    resumed.close()
    resumed.finalize(2)
    assert not any("claims" in f for f in files_under(url))


def test_a_closed_writer_leaves_no_trace_of_itself(tmp_path):
    w = writer(tmp_path / "s")
    assert [p.name.startswith("writer-") for p in (tmp_path / "s" / "claims").iterdir()] == [True]
    w.close()
    assert list((tmp_path / "s" / "claims").iterdir()) == []
    writer(tmp_path / "s", mode="resume").close()  # this process's own file never blocks it


def test_a_claim_whose_pid_now_names_another_process_is_stale(tmp_path):
    # A container restarted in place numbers its processes from 1 again: a crashed writer's
    # pid can belong to an unrelated process, which the recorded start time tells apart.
    import socket
    import subprocess

    from logitstore import _owners

    url = tmp_path / "s"
    writer(url).write_shard(0, encode(codec(), 2, 0))
    other = subprocess.Popen(["sleep", "60"])
    try:
        start = _owners._start_time(other.pid)
        claim = url / "claims" / "000001.claim"
        if start is None:
            pytest.skip("no /proc start times here: a live pid counts as the writer")
        claim.write_text(f"pid {other.pid} start {start} on {socket.gethostname()}\n")
        with pytest.raises(ShardClaimError, match=f"pid {other.pid} on this host"):
            writer(url, mode="resume")
        claim.write_text(f"pid {other.pid} start {start + 1} on {socket.gethostname()}\n")
        writer(url, mode="resume").close()  # same pid, started at another time: stale
        assert not claim.exists()
    finally:
        other.kill()
        other.wait(timeout=60)
