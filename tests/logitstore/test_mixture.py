"""Mixing two teachers' stores, checked against float64 mixtures of their dense distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore import open_store
from logitstore.codecs import get_codec
from logitstore.errors import DataError, TokenizerMismatchError
from logitstore.mixture import APPROXIMATION, mix_stores
from logitstore.writer import EncodedDocument, StoreWriter

V = 40
TOKENIZER = {"vocab_sha256": "ab" * 8, "vocab_size": V}


def teacher_logprobs(seed: int, lengths: list[int]) -> list[np.ndarray]:
    """Dense float64 log-probs ``(T - 1, V)`` per document, peaked like a trained model."""
    g = np.random.default_rng(seed)
    out = []
    for t in lengths:
        z = 3.0 * g.standard_normal((t - 1, V))
        out.append(z - np.logaddexp.reduce(z, axis=1, keepdims=True))
    return out


def write_store(url, codec, tokens, logprobs, *, teacher="t", tokenizer=TOKENIZER, shards=2):
    w = StoreWriter(
        url,
        codec=codec,
        backend="parquet",
        metadata={
            "teacher": {"model": teacher},
            "tokenizer": tokenizer,
            "capture": {"temperatures": []},
            "source": {"path": "docs"},
        },
        vocab_size=V,
    )
    docs = []
    for d, (ids, lp) in enumerate(zip(tokens, logprobs, strict=True)):
        enc = codec.encode(torch.from_numpy(lp.astype(np.float32)), torch.from_numpy(ids[1:]))
        docs.append(
            EncodedDocument(
                f"row{d}/w0/{d:016x}", ids, ids[1:] % 2 == 0, {k: v.numpy() for k, v in enc.items()}
            )
        )
    per = -(-len(docs) // shards)
    for j in range(shards):
        w.write_shard(j, docs[j * per : (j + 1) * per])
    w.finalize(shards)
    return url


@pytest.fixture(scope="module")
def corpus():
    g = np.random.default_rng(7)
    lengths = [5, 9, 2, 7]
    tokens = [g.integers(0, V, size=t).astype(np.int64) for t in lengths]
    return tokens, teacher_logprobs(1, lengths), teacher_logprobs(2, lengths)


def dense_of(doc) -> np.ndarray:
    """Decoded support scattered into ``(T - 1, V)``; tokens outside it get -inf."""
    out = np.full((len(doc.label_logprob), V), -np.inf)
    rows = np.arange(out.shape[0])[:, None]
    valid = doc.support_ids >= 0
    out[np.broadcast_to(rows, valid.shape)[valid], doc.support_ids[valid]] = doc.support_logprobs[
        valid
    ]
    return out


def test_mixture_is_exact_when_supports_cover_the_vocabulary(tmp_path, corpus):
    tokens, lp_a, lp_b = corpus
    full = get_codec("topk", k=V, values="float32")
    a = write_store(str(tmp_path / "a"), full, tokens, lp_a, teacher="A")
    b = write_store(str(tmp_path / "b"), full, tokens, lp_b, teacher="B")
    w = (0.3, 0.7)
    mix_stores([a, b], str(tmp_path / "m"), weights=[3, 7])  # normalised to 0.3, 0.7
    mixed = open_store(str(tmp_path / "m"))
    assert mixed.verify() == []
    assert [d.doc_id for d in mixed] == [d.doc_id for d in open_store(a)]
    for d, doc in enumerate(mixed):
        direct = np.log(w[0] * np.exp(lp_a[d]) + w[1] * np.exp(lp_b[d]))  # float64 reference
        np.testing.assert_allclose(dense_of(doc), direct, atol=2e-6, rtol=1e-6)
        labels = tokens[d][1:]
        np.testing.assert_allclose(
            doc.label_logprob, direct[np.arange(len(labels)), labels], atol=2e-6, rtol=1e-6
        )
        assert np.all(doc.tail_logmass == -np.inf)
        np.testing.assert_array_equal(doc.input_ids, tokens[d])
        np.testing.assert_array_equal(doc.loss_mask, tokens[d][1:] % 2 == 0)


def spread_estimate(lp: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The documented estimate, written independently: top-k and label kept, rest uniform."""
    p = np.exp(lp)
    out = np.empty_like(p)
    for t in range(len(p)):
        known = set(np.argsort(-p[t], kind="stable")[:k].tolist()) | {int(labels[t])}
        rest = [i for i in range(V) if i not in known]
        known_idx = sorted(known)
        out[t, known_idx] = p[t, known_idx]
        out[t, rest] = p[t, rest].sum() / len(rest)
    return out


def test_partial_supports_follow_the_recorded_approximation(tmp_path, corpus):
    tokens, lp_a, lp_b = corpus
    k = 6
    codec = get_codec("topk", k=k, values="float32")
    a = write_store(str(tmp_path / "a"), codec, tokens, lp_a, teacher="A")
    b = write_store(str(tmp_path / "b"), codec, tokens, lp_b, teacher="B", shards=1)
    manifest = mix_stores([a, b], str(tmp_path / "m"))
    mix = manifest["teacher"]["mixture"]
    assert mix["approximation"] == APPROXIMATION and mix["weights"] == [0.5, 0.5]
    assert [s["teacher"]["model"] for s in mix["stores"]] == ["A", "B"]
    largest = max(
        len(set(np.argsort(-a_t)[:k]) | set(np.argsort(-b_t)[:k]))
        for a_doc, b_doc in zip(lp_a, lp_b, strict=True)
        for a_t, b_t in zip(a_doc, b_doc, strict=True)
    )
    assert manifest["codec"]["configuration"]["k"] == largest  # the largest union of supports
    mixed = open_store(str(tmp_path / "m"))
    for d, doc in enumerate(mixed):
        labels = tokens[d][1:]
        rows = np.arange(len(labels))
        exact = 0.5 * np.exp(lp_a[d]) + 0.5 * np.exp(lp_b[d])
        # The label is exact whatever the supports, up to the renormalisation: one constant per
        # position, within the float16 tails' rounding (2^-11 of |log r|, r about 0.01 here).
        shift = doc.label_logprob - np.log(exact[rows, labels])
        assert np.abs(shift).max() < 2.0**-11 * 10
        estimate = 0.5 * spread_estimate(lp_a[d], labels, k) + 0.5 * spread_estimate(
            lp_b[d], labels, k
        )
        got = np.exp(dense_of(doc))
        stored = doc.support_ids >= 0
        r = np.broadcast_to(rows[:, None], stored.shape)[stored]
        c = doc.support_ids[stored]
        # spread values inherit the float16 tail's relative error (2^-11 of |log r|)
        np.testing.assert_allclose(got[r, c], estimate[r, c], rtol=1e-2)
        for t in rows:
            top_a, top_b = set(np.argsort(-lp_a[d][t])[:k]), set(np.argsort(-lp_b[d][t])[:k])
            assert top_a | top_b <= set(doc.support_ids[t].tolist())  # the union is kept
            for i in top_a & top_b:  # stored by both teachers: mixed exactly (same shift)
                np.testing.assert_allclose(got[t, i], exact[t, i] * np.exp(shift[t]), rtol=1e-5)
        # support plus tail is a distribution (the tail is float16, relative 2^-11 in log)
        total = got.sum(axis=1) + np.exp(doc.tail_logmass.astype(np.float64))
        np.testing.assert_allclose(total, 1.0, atol=2e-3)


def test_refuses_different_tokenizers_and_documents(tmp_path, corpus):
    tokens, lp_a, lp_b = corpus
    codec = get_codec("topk", k=4, values="float32")
    a = write_store(str(tmp_path / "a"), codec, tokens, lp_a)
    other_tok = {**TOKENIZER, "vocab_sha256": "cd" * 8}
    b = write_store(str(tmp_path / "b"), codec, tokens, lp_b, tokenizer=other_tok)
    with pytest.raises(TokenizerMismatchError, match="ab" * 8) as err:
        mix_stores([a, b], str(tmp_path / "m"))
    assert "cd" * 8 in str(err.value) and "vocab_sha256" in str(err.value)
    c = write_store(str(tmp_path / "c"), codec, tokens[:3], lp_b[:3], shards=1)
    with pytest.raises(DataError, match="different documents"):
        mix_stores([a, c], str(tmp_path / "m2"))
    changed = [t.copy() for t in tokens]
    changed[0][0] = (changed[0][0] + 1) % V
    e = write_store(str(tmp_path / "e"), codec, changed, lp_b)
    with pytest.raises(DataError, match="different tokens"):
        mix_stores([a, e], str(tmp_path / "m3"))


def test_mix_cli(tmp_path, corpus):
    from click.testing import CliRunner

    from logitstore.cli import main

    tokens, lp_a, lp_b = corpus
    codec = get_codec("topk", k=4, values="q8")
    a = write_store(str(tmp_path / "a"), codec, tokens, lp_a, teacher="A")
    b = write_store(str(tmp_path / "b"), codec, tokens, lp_b, teacher="B")
    out = str(tmp_path / "m")
    result = CliRunner().invoke(main, ["mix", a, b, "--out", out, "--weights", "1,3", "--k", "6"])
    assert result.exit_code == 0, result.output
    manifest = open_store(out).manifest
    assert manifest["teacher"]["mixture"]["weights"] == [0.25, 0.75]
    assert manifest["codec"]["configuration"]["k"] == 6
    assert manifest["teacher"]["model"] == "A + B"


def test_documents_ordered_differently_are_read_a_shard_at_a_time(tmp_path):
    """A store holding the documents in another order (every other one in the other shard)
    is decoded a few times per shard, not once per document: one by one, a store of a few
    thousand documents took minutes to mix."""
    g = np.random.default_rng(3)
    codec = get_codec("topk", k=8)
    docs = []
    for d in range(24):
        ids = g.integers(0, V, size=4).astype(np.int64)
        lp = teacher_logprobs(d, [4])[0].astype(np.float32)
        enc = codec.encode(torch.from_numpy(lp), torch.from_numpy(ids[1:]))
        fields = {k: v.numpy() for k, v in enc.items()}
        docs.append(EncodedDocument(f"row{d}/w0/{d:016x}", ids, np.ones(3, bool), fields))
    meta = {"teacher": {"model": "t"}, "tokenizer": TOKENIZER, "capture": {}, "source": {}}
    for name, shards in [("a", [docs[:12], docs[12:]]), ("b", [docs[0::2], docs[1::2]])]:
        w = StoreWriter(
            str(tmp_path / name), codec=codec, backend="zarr", metadata=meta, vocab_size=V
        )
        for j, part in enumerate(shards):
            w.write_shard(j, part)
        w.finalize(2)
    b = open_store(str(tmp_path / "b"))
    reads = []
    read = b.read_shard_arrays

    def counted(j):
        reads.append(j)
        return read(j)

    b.read_shard_arrays = counted
    out = mix_stores([str(tmp_path / "a"), b], str(tmp_path / "mix"))
    assert out["statistics"]["documents"] == 24
    # indexing reads each shard once; then each output shard reads both of b's, once for
    # sizing k and once to mix (one by one, that was one read per document and pass: 50)
    assert len(reads) <= 2 + 2 * 2 * 2, reads


@pytest.mark.parametrize("damaged", [0, 1])
@pytest.mark.parametrize("damage", ["shard", "manifest"])
def test_an_error_in_one_of_the_stores_names_that_store(tmp_path, corpus, damaged, damage):
    """The stores of a mixture have shards and manifests of the same names: an error in one
    names its store, by the library and by the CLI, and nothing is written."""
    import json

    from click.testing import CliRunner

    from logitstore.cli import main
    from logitstore.errors import LogitstoreError

    tokens, lp_a, lp_b = corpus
    codec = get_codec("topk", k=4, values="q8")
    stores = [
        write_store(str(tmp_path / name), codec, tokens, lp, teacher=name)
        for name, lp in (("a", lp_a), ("b", lp_b))
    ]
    bad = tmp_path / ("a", "b")[damaged]
    manifest = json.loads((bad / "manifest.json").read_text())
    if damage == "shard":
        shard = bad / manifest["shards"][1]["path"]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        manifest["vocab_size"] = "40"
        (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LogitstoreError) as err:
        mix_stores(stores, str(tmp_path / "m"))
    assert str(err.value).startswith(f"store {bad}: ")
    result = CliRunner().invoke(main, ["mix", *stores, "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: store {bad}: "), result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()
