"""Random damage, resealed: a store whose files an attacker changed at random and whose sizes
and checksums were then recomputed (as one who writes both would), read by every reader path.

Each case copies a clean store, damages one file (a JSON edit of ``manifest.json`` or an
array's ``zarr.json``: a key dropped or given a value of another type or range; or the bytes of
a chunk or Parquet file: flipped, cut, spliced or replaced), reseals the manifest, then opens
the store, decodes every shard, verifies it and runs one ``StoreDataset`` epoch. Each must
either succeed or raise one of our errors, and numpy must not warn on the way: a reader that
checks its values names the bad one instead. The cases are drawn from fixed seeds, so a failure
reproduces; the top-k, sampled and dense codecs, Zarr and Parquet.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreDataset, StoreWriter, open_store
from logitstore.codecs import Dense, Sampled, TopK
from logitstore.errors import LogitstoreError

VOCAB = 64
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": [2.0]}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
CODECS = {
    "topk-q8": TopK(k=8, values="q8"), "topk-float16": TopK(k=8, values="float16"),
    "sampled": Sampled(n=8), "dense": Dense(bits=8),
}  # fmt: skip
ODD = [0, -1, 1, 7, 2**31, 2**63, 2**64, -(2**63), 1e308, 0.5, float("nan"), "", "x", "int64",
       "float16", None, True, [], [0], [2**40], {}, {"name": "zstd"}, "../x", "/"]  # fmt: skip


def build(root: Path, codec, backend: str) -> Path:
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=VOCAB)
    for j in range(2):
        docs = []
        for d in range(2 + j):
            ids = torch.randint(0, VOCAB, (9 + 3 * d,), generator=g)
            lp = torch.log_softmax(3 * torch.randn(len(ids) - 1, VOCAB, generator=g), -1)
            enc = codec.encode(lp, ids[1:], temperatures=(2.0,), generator=g)
            fields = {k: v.numpy().copy() for k, v in enc.items()}
            mask = np.ones(len(ids) - 1, bool)
            docs.append(EncodedDocument(f"{j}-{d}", ids.numpy(), mask, fields))
        w.write_shard(j, docs)
    w.finalize(2)
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("clean")
    return {
        f"{name}-{backend}": build(base / f"{name}-{backend}", codec, backend)
        for name, codec in CODECS.items()
        for backend in ("zarr", "parquet")
    }


def edit_json(obj: Any, rng: random.Random) -> None:
    """One key of ``obj`` (at any depth) dropped or given an odd value."""
    while True:
        keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
        if not keys:
            return
        key = rng.choice(keys)
        if isinstance(obj[key], (dict, list)) and obj[key] and rng.random() < 0.6:
            obj = obj[key]
            continue
        if isinstance(obj, dict) and rng.random() < 0.15:
            del obj[key]
        else:
            obj[key] = rng.choice(ODD)
        return


def damage_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and out:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        del out[rng.randrange(len(out) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(out) + 1)
        out[at:at] = rng.randbytes(rng.randint(1, 64))
    else:
        out = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(out)


def read_everything(root: Path) -> None:
    store = open_store(str(root))
    for j in range(store.num_shards):
        store.read_shard(j)
    store.verify()
    for _ in StoreDataset(str(root), tokens_per_batch=32, shuffle=False):
        pass


@pytest.mark.parametrize("seed", range(8))
def test_randomly_damaged_resealed_stores_get_our_errors_and_no_numpy_warning(
    clean, tmp_path, seed, kit
):
    rng = random.Random(seed)
    outcomes = []
    for case in range(50):
        name = rng.choice(sorted(clean))
        root = tmp_path / f"case{case}"
        shutil.copytree(clean[name], root)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "records")
        target = rng.choice([p for p in files if p.name != "settings.json"])
        if target.suffix == ".json" and rng.random() < 0.8:
            data = json.loads(target.read_text())
            edit_json(data, rng)
            target.write_text(json.dumps(data))
        else:
            target.write_bytes(damage_bytes(target.read_bytes(), rng))
        if target.name != "manifest.json":
            kit.reseal(root)
        what = f"{name}: {target.relative_to(root)}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                read_everything(root)
                outcomes.append("read")
            except LogitstoreError:
                outcomes.append("refused")
            except Exception as exc:  # not one of ours
                raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
        numeric = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert not numeric, (what, [str(w.message) for w in numeric])
        shutil.rmtree(root)
    assert "refused" in outcomes, outcomes  # the damage reached the readers
