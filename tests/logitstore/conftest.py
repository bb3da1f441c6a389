"""Shared by the hub tests (``test_hub*.py``): small stores of random peaked documents."""

from __future__ import annotations

import types

import pytest
import torch

from logitstore.codecs import fidelity_sums, get_codec, merge_fidelity
from logitstore.writer import EncodedDocument, StoreWriter

V = 300
TEMPS = (2.0,)
METADATA = {
    "teacher": {"model": "tiny/Teacher-1M", "dtype": "float32"},
    "tokenizer": {"vocab_sha256": "ef" * 8, "vocab_size": V},
    "capture": {"temperatures": list(TEMPS), "max_length": 64},
    "source": {"name": "org/corpus", "kind": "hub", "split": "train"},
}


def make_store(
    url: str, codec_name: str, params: dict, storage_options=None, backend="zarr", shards=3
):
    """``shards`` shards of random peaked documents; ``doc_id`` in the teacher pass's form."""
    codec = get_codec(codec_name, **params)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(
        url,
        codec=codec,
        backend=backend,
        metadata=METADATA,
        vocab_size=V,
        storage_options=storage_options,
    )
    for j in range(shards):
        docs, sums = [], []
        for d in range(3):
            t = int(torch.randint(2, 30, (1,), generator=g))
            ids = torch.randint(0, V, (t,), generator=g)
            lp = torch.log_softmax(3.0 * torch.randn(t - 1, V, generator=g), dim=-1)
            enc = codec.encode(lp, ids[1:], temperatures=TEMPS, generator=g)
            decoded = codec.decode({k: v.numpy() for k, v in enc.items()})
            sums.append(fidelity_sums(lp, decoded, ids[1:]))
            docs.append(
                EncodedDocument(
                    f"docs.jsonl:{3 * j + d}/w0/{j:08x}{d:08x}",
                    ids.numpy(),
                    (ids[1:] % 3 != 0).numpy(),
                    {k: v.numpy() for k, v in enc.items()},
                )
            )
        w.write_shard(j, docs, fidelity=merge_fidelity(sums))
    w.finalize(shards)
    return url


@pytest.fixture(name="make_store", scope="session")
def make_store_fixture():
    """``make_store`` above (test modules cannot import a conftest)."""
    return make_store


@pytest.fixture(scope="session")
def store_spec():
    """What ``make_store`` writes with: the vocabulary size, temperatures and metadata."""
    return types.SimpleNamespace(V=V, TEMPS=TEMPS, METADATA=METADATA)
