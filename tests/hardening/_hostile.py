"""Helpers shared by the hostile-store tests (``test_untrusted_*.py``, ``test_hostile_*.py``):
a small store written by ``StoreWriter``, its manifest read and rewritten, and the CLI run in
a child process under the conftest's memory limit.

The stores are consistent, as an attacker writes them: every crafted file is resealed into
the manifest (sizes, SHA-256), so a refusal can only come from the storage checks. Each
test builds several variants of its attack, on both backends where it applies. A clean
refusal is exit 2 with a one-line error (a store that cannot be opened) or exit 1 with one
``problem:`` line per bad shard (``verify``); never a traceback or a MemoryError.

Imported as ``tests.hardening._hostile``: pytest's importlib mode (``pyproject.toml``) names
the modules under ``tests/`` from the rootdir, so this works without an ``__init__.py`` and
without the repository on ``sys.path``. Fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from logitstore import EncodedDocument, StoreWriter
from logitstore.codecs import get_codec

VOCAB = 256
META = {
    "teacher": {"model": "tiny"}, "tokenizer": {"vocab_size": VOCAB},
    "capture": {"temperatures": []}, "source": {"path": "docs.jsonl"},
}  # fmt: skip
BACKENDS = ["zarr", "parquet"]
GIB = 2**30


def build(root: Path, backend: str, shards: int = 2) -> Path:
    codec = get_codec("topk", k=8)
    g = torch.Generator().manual_seed(0)
    w = StoreWriter(str(root), codec=codec, backend=backend, metadata=META, vocab_size=VOCAB)
    for j in range(shards):
        docs = []
        for d in range(2):
            ids = torch.randint(0, VOCAB, (10 + d,), generator=g)
            lp = torch.log_softmax(3 * torch.randn(len(ids) - 1, VOCAB, generator=g), -1)
            fields = {k: v.numpy() for k, v in codec.encode(lp, ids[1:]).items()}
            docs.append(
                EncodedDocument(f"{j}/{d}", ids.numpy(), np.ones(len(ids) - 1, bool), fields)
            )
        w.write_shard(j, docs)
    w.finalize(shards)
    return root


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def rewrite(root: Path, data: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def refused(report: dict, *words: str) -> str:
    """A clean refusal by ``verify`` or at opening: exit 1 (problems listed) or 2 (error)."""
    assert report["exception"] is None, report["traceback"][-3000:]
    assert report["exit_code"] in (1, 2), report
    out = report["output"]
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert "RuntimeWarning" not in out, out  # no numpy warning on the way either
    for word in words:
        assert word in out, (word, out)
    return out


def _hardening_conftest():
    """The hardening conftest as pytest loaded it (test modules cannot import a conftest)."""
    for module in list(sys.modules.values()):
        if (getattr(module, "__file__", None) or "").endswith(
            os.path.join("hardening", "conftest.py")
        ):
            return module
    raise AssertionError("tests/hardening/conftest.py is not loaded")


def run_limited_cli(*args, **kwargs) -> dict:
    """``logitstore ARGS`` in a child under the 1.5 GiB limit (the conftest's run_limited)."""
    return _hardening_conftest().run_limited(*args, **kwargs)


def run_verify(root: Path | str) -> dict:
    return run_limited_cli("verify", root)
