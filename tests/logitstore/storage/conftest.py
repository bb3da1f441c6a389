"""Shared by the store tests: synthetic documents encoded by a real codec, and stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitstore.codecs import CODECS, get_codec
from logitstore.codecs.base import Codec
from logitstore.writer import EncodedDocument, StoreWriter

VOCAB = 300
TEMPERATURES = (2.0,)
# Small parameters keep the suite fast; defaults for anything not listed.
CODEC_PARAMS: dict[str, dict] = {"topk": {"k": 16}, "sampled": {"n": 20}, "dense": {}}
METADATA = {
    "teacher": {"model": "tiny-teacher", "revision": "abc", "dtype": "float32"},
    "tokenizer": {"vocab_hash": "0" * 16, "vocab_size": VOCAB},
    "capture": {"temperatures": list(TEMPERATURES), "max_length": 64},
    "source": {"path": "docs.jsonl", "split": "train"},
}


def make_codec(name: str) -> Codec:
    return get_codec(name, **CODEC_PARAMS.get(name, {}))


def make_documents(codec: Codec, n: int, seed: int, vocab: int = VOCAB) -> list[EncodedDocument]:
    """``n`` documents of random length (1 to 40 tokens) from random peaked log-probs."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n):
        t = int(torch.randint(1, 41, (1,), generator=g))
        ids = torch.randint(0, vocab, (t,), generator=g)
        logprobs = torch.log_softmax(3.0 * torch.randn(t - 1, vocab, generator=g), dim=-1)
        enc = codec.encode(logprobs, ids[1:], temperatures=TEMPERATURES, generator=g)
        docs.append(
            EncodedDocument(
                doc_id=f"row{seed}-{d}-{int(ids.sum())}",
                input_ids=ids.numpy(),
                loss_mask=(ids[1:] % 3 != 0).numpy(),
                fields={k: v.cpu().numpy() for k, v in enc.items()},
            )
        )
    return docs


def write_store(
    url: str,
    codec: Codec,
    backend: str,
    shards: list[list[EncodedDocument]],
    **kwargs,
) -> dict:
    """Write and finalize a store with one ``write_shard`` per list; returns the manifest."""
    w = StoreWriter(
        url, codec=codec, backend=backend, metadata=METADATA, vocab_size=VOCAB, **kwargs
    )
    for j, docs in enumerate(shards):
        w.write_shard(j, docs)
    return w.finalize(len(shards))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path to bytes)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(params=sorted(CODECS))
def codec_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def kit():
    """The functions above as one object (test modules cannot import a conftest)."""
    import types

    return types.SimpleNamespace(
        VOCAB=VOCAB,
        METADATA=METADATA,
        make_codec=make_codec,
        make_documents=make_documents,
        write_store=write_store,
        tree_bytes=tree_bytes,
    )
