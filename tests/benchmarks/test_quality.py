"""The tail-dropped store the quality experiment derives from a top-k store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from logitstore import EncodedDocument, StoreWriter, open_store
from logitstore.benchmarks.quality import drop_tail_store
from logitstore.codecs import get_codec

V = 300
META = {
    "teacher": {"model": "tiny"},
    "tokenizer": {"vocab_hash": "abc"},
    "capture": {"temperatures": [2.0]},
    "source": {"path": "x.jsonl"},
}


def write_topk_store(url: Path, values: str) -> None:
    """Two shards of random documents; labels sometimes outside the top-k on purpose."""
    codec = get_codec("topk", k=8, values=values)
    writer = StoreWriter(str(url), codec=codec, metadata=META, vocab_size=V)
    g = torch.Generator().manual_seed(5)
    for shard in range(2):
        docs = []
        for d in range(3):
            t = int(torch.randint(3, 40, (1,), generator=g))
            ids = torch.randint(0, V, (t,), generator=g)
            lp = torch.log_softmax(3.0 * torch.randn(t - 1, V, generator=g), dim=-1)
            ids[1::3] = lp[::3].argmax(dim=1)  # every third label is the teacher's top-1
            fields = codec.encode(lp, ids[1:], temperatures=(2.0,))
            mask = np.arange(t - 1) % 4 != 0
            docs.append(
                EncodedDocument(
                    f"s{shard}d{d}", ids.numpy(), mask, {k: v.numpy() for k, v in fields.items()}
                )
            )
        writer.write_shard(shard, docs)
    writer.finalize(2)


@pytest.mark.parametrize("values", ["q8", "float32"])
def test_drop_tail_store_renormalises_the_support_and_empties_the_tail(tmp_path, values):
    write_topk_store(tmp_path / "src", values)
    manifest = drop_tail_store(str(tmp_path / "src"), str(tmp_path / "dst"))
    src, dst = open_store(tmp_path / "src"), open_store(tmp_path / "dst")
    assert dst.codec == src.codec and "derived" in manifest["capture"]
    assert dst.num_documents == src.num_documents == 6
    labels_outside = 0
    for a, b in zip(src.iter_documents(), dst.iter_documents()):
        assert a.doc_id == b.doc_id
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        # Independent float64 renormalisation of the source's decoded support.
        sa = a.support_logprobs.astype(np.float64)
        expected = sa - np.log(np.exp(sa).sum(axis=1, keepdims=True))
        order_a, order_b = np.argsort(a.support_ids, 1), np.argsort(b.support_ids, 1)
        np.testing.assert_array_equal(
            np.take_along_axis(a.support_ids, order_a, 1),
            np.take_along_axis(b.support_ids, order_b, 1),
        )
        np.testing.assert_allclose(
            np.take_along_axis(b.support_logprobs, order_b, 1),
            np.take_along_axis(expected, order_a, 1),
            atol=2e-5,
        )
        np.testing.assert_allclose(
            np.exp(b.support_logprobs.astype(np.float64)).sum(1), 1, atol=1e-4
        )
        assert np.all(np.isneginf(b.tail_logmass))
        assert np.all(np.isneginf(b.tail_logsumexp))  # the tail at tau = 2 is empty too
        labels = a.input_ids[1:]
        inside = (a.support_ids == labels[:, None]).any(axis=1)
        labels_outside += int((~inside).sum())
        assert np.all(np.isneginf(b.label_logprob[~inside]))
        at_label = np.where(a.support_ids == labels[:, None], expected, -np.inf).max(axis=1)
        np.testing.assert_allclose(b.label_logprob[inside], at_label[inside], atol=2e-5)
    assert labels_outside > 0  # the -inf label case was exercised
