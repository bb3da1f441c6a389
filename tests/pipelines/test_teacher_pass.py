"""The teacher pass end to end with a tiny teacher saved with ``save_pretrained``.

Stored values are checked against a direct float64 computation with the same model on the
same window, run here without padding or batching.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, AutoTokenizer

import logitstore
from logitstore.codecs._quant import grid, grid_max
from logitstore.errors import (
    ConfigError,
    DataError,
    LogitstoreError,
    NonFiniteTeacherError,
    SettingsMismatchError,
)
from logitstore.pipelines._data import load_rows, tokenize_chat, tokenize_text
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

TAIL_RTOL = 2.0**-11  # tails are stored as float16 (the codec's stated precision)


def run(teacher, data, out, **kw):
    cfg = TeacherPassConfig(
        teacher=str(teacher), data=str(data), out=str(out), progress=False, **kw
    )
    return run_teacher_pass(cfg)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def direct_logprobs(model, input_ids: np.ndarray) -> np.ndarray:
    """Float64 ``(T - 1, V)`` log-softmax of one window, run alone (no padding, no batch)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids)[None]).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


@pytest.fixture(scope="module")
def model(tiny_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def float_store(tmp_path_factory, tiny_teacher_dir, text_jsonl):
    out = tmp_path_factory.mktemp("float") / "store"
    summary = run(
        tiny_teacher_dir, text_jsonl, out, k=16, values="float32", max_length=96,
        docs_per_shard=7, batch_size=4, limit=4, temperatures=(1.0, 2.0),
    )  # fmt: skip
    return out, summary


def test_stored_values_equal_a_direct_computation(float_store, model):
    out, summary = float_store
    store = logitstore.open_store(str(out))
    assert store.num_documents == summary["documents"] > summary["shards"] > 1
    for doc in store.iter_documents():
        lp = direct_logprobs(model, doc.input_ids)
        rows = np.arange(lp.shape[0])[:, None]
        top = np.argsort(-lp, axis=1)[:, :16]
        np.testing.assert_array_equal(np.sort(doc.support_ids, 1), np.sort(top, 1))
        assert (np.diff(doc.support_logprobs, axis=1) <= 0).all()  # most probable first
        np.testing.assert_allclose(doc.support_logprobs, lp[rows, doc.support_ids], atol=2e-5)
        outside = lp.copy()
        outside[rows, doc.support_ids] = -np.inf
        tail = np.logaddexp.reduce(outside, axis=1)
        np.testing.assert_allclose(doc.tail_logmass, tail, rtol=TAIL_RTOL, atol=2e-5)
        labels = doc.input_ids[1:]
        np.testing.assert_allclose(doc.label_logprob, lp[np.arange(len(labels)), labels], atol=2e-5)
        np.testing.assert_allclose(
            doc.tail_logsumexp[:, 0], np.logaddexp.reduce(outside / 2, 1), rtol=TAIL_RTOL, atol=2e-5
        )
        entropy = -(np.exp(lp) * lp).sum(1)
        np.testing.assert_allclose(doc.entropy, entropy, rtol=2e-3, atol=1e-3)
        assert doc.loss_mask.all()


def test_windows_reassemble_the_documents(float_store, text_jsonl, tiny_tokenizer):
    out, _ = float_store
    store = logitstore.open_store(str(out))
    rows = load_rows(str(text_jsonl), limit=4).rows
    by_row: dict[str, list] = {}
    for doc in store.iter_documents():
        row, window, _ = doc.doc_id.split("/")
        by_row.setdefault(row, []).append((int(window[1:]), doc.input_ids))
    assert list(by_row) == [row_id for row_id, _ in rows]  # source order, nothing lost
    for row_id, record in rows:
        parts = [ids for _, ids in sorted(by_row[row_id])]
        assert all(len(p) <= 96 for p in parts) and len(parts) > 1
        # Consecutive windows share one token (stride max_length - 1).
        joined = np.concatenate([parts[0], *[p[1:] for p in parts[1:]]])
        np.testing.assert_array_equal(joined, tokenize_text(tiny_tokenizer, record["text"])[0])


def test_manifest_metadata(float_store, tiny_teacher_dir):
    out, _ = float_store
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 384 and manifest["num_temperatures"] == 1
    assert manifest["tail_temperatures"] == [2.0]  # the tail_logsumexp columns
    assert "temperatures" not in manifest["capture"]  # a format field, not pipeline metadata
    assert manifest["capture"]["max_length"] == 96
    assert manifest["teacher"]["weights"]["kind"] == "full"
    assert manifest["tokenizer"]["chat_template_sha256"] is not None
    assert manifest["source"]["split"] is None and manifest["source"]["text_field"] == "text"
    fid = manifest["statistics"]["fidelity"]
    assert fid["positions"] > 0 and fid["top1_agreement"] == 1.0
    # Nothing machine-specific: no absolute path from this run appears anywhere.
    text = (out / "manifest.json").read_text() + (out / "settings.json").read_text()
    assert str(tiny_teacher_dir.parent) not in text


def test_q8_values_within_the_grid_precision(tmp_path, tiny_teacher_dir, text_jsonl, model):
    out = tmp_path / "store"
    run(
        tiny_teacher_dir,
        text_jsonl,
        out,
        k=32,
        values="q8",
        max_length=64,
        limit=2,
        docs_per_shard=3,
    )
    g = grid("q8")
    for doc in logitstore.open_store(str(out)).iter_documents():
        lp = direct_logprobs(model, doc.input_ids)
        true = lp[np.arange(lp.shape[0])[:, None], doc.support_ids]
        d_true = true[:, :1] - true
        d_dec = doc.support_logprobs[:, :1] - doc.support_logprobs
        np.testing.assert_allclose(doc.support_logprobs[:, 0], true[:, 0], atol=2e-5)  # exact top-1
        idx = np.clip(np.searchsorted(g, d_true), 2, len(g) - 1)
        bound = np.maximum((g[idx] - g[idx - 1]) / 2, g[1]) + 1e-4
        inside = (d_true < grid_max("q8"))[:, 1:]
        err = np.abs(d_dec - d_true)[:, 1:]
        assert (err[inside] <= bound[:, 1:][inside]).all()


def test_sampled_draws_do_not_depend_on_batching(tmp_path, tiny_teacher_dir, text_jsonl, model):
    stores = []
    for batch in (1, 5):
        out = tmp_path / f"b{batch}"
        run(tiny_teacher_dir, text_jsonl, out, codec="sampled", draws=20, max_length=48,
            limit=2, docs_per_shard=6, batch_size=batch)  # fmt: skip
        stores.append(list(logitstore.open_store(str(out)).iter_documents()))
    assert len(stores[0]) > 5  # several batches at batch size 5, one window each at 1
    for a, b in zip(*stores):
        np.testing.assert_array_equal(a.support_ids, b.support_ids)
        np.testing.assert_array_equal(a.support_counts, b.support_counts)
        assert (a.support_counts.sum(1) == 20).all()
        lp = direct_logprobs(model, a.input_ids)
        valid = a.support_ids >= 0
        rows = np.nonzero(valid)[0]
        np.testing.assert_allclose(
            a.support_logprobs[valid], lp[rows, a.support_ids[valid]], atol=2e-5
        )


def test_chat_data_parquet_backend(tmp_path, tiny_teacher_dir, tiny_tokenizer):
    chats = [
        [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
        for i in range(3)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    out = tmp_path / "store"
    run(
        tiny_teacher_dir,
        data,
        out,
        messages_field="messages",
        backend="parquet",
        k=8,
        docs_per_shard=2,
    )
    import pyarrow.parquet as pq

    assert pq.read_table(out / "shards" / "000000.parquet").num_rows == 2  # read by another library
    docs = list(logitstore.open_store(str(out)).iter_documents())
    assert len(docs) == 3
    for doc, chat in zip(docs, chats):
        ids, trained = tokenize_chat(tiny_tokenizer, chat)
        np.testing.assert_array_equal(doc.input_ids, ids)
        np.testing.assert_array_equal(doc.loss_mask, trained[1:])
        assert tiny_tokenizer.decode(doc.input_ids[1:][doc.loss_mask]).startswith(
            chat[1]["content"]
        )


def test_resume_refuses_different_settings(tmp_path, tiny_teacher_dir, text_jsonl):
    out = tmp_path / "store"
    settings = {"k": 8, "max_length": 32, "limit": 1, "docs_per_shard": 4}
    run(tiny_teacher_dir, text_jsonl, out, **settings)
    for match, change in (
        ("codec.configuration.k", {"k": 9}),
        ("capture.max_length", {"max_length": 33}),
        ("compression_level", {"compression_level": 19}),
    ):
        with pytest.raises(SettingsMismatchError, match=match):
            run(tiny_teacher_dir, text_jsonl, out, **{**settings, **change}, resume=True)
    # Same settings: everything is committed, so resuming writes nothing and re-finalizes.
    summary = run(tiny_teacher_dir, text_jsonl, out, **settings, resume=True)
    assert summary["shards_written"] == [] and summary["manifest"]["statistics"]["documents"] > 0


def test_k_larger_than_vocabulary_fails_before_anything_runs(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    with pytest.raises(ConfigError, match="exceeds the vocabulary size 384"):
        run(tiny_teacher_dir, text_jsonl, tmp_path / "store", k=385)
    assert not (tmp_path / "store").exists()


def test_empty_dataset_is_refused(tmp_path, tiny_teacher_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(DataError, match="empty"):
        run(tiny_teacher_dir, data, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_nan_teacher_names_the_document_and_keeps_committed_shards(
    tmp_path, tiny_teacher_dir, text_jsonl
):
    # A teacher whose embedding of <|im_end|> is NaN: only documents containing it break.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[2] = float("nan")
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(poisoned)
    lines = text_jsonl.read_text().splitlines()[:3] + [
        json.dumps({"text": "Fine until <|im_end|> here."})
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    kw = {"k": 8, "max_length": 64, "docs_per_shard": 5, "batch_size": 3}
    with pytest.raises(NonFiniteTeacherError, match=r"'data.jsonl:4/w0/[0-9a-f]{16}'"):
        run(poisoned, data, tmp_path / "bad", **kw)
    clean = tmp_path / "good"
    summary = run(tiny_teacher_dir, data, clean, **kw)
    last = summary["shards"] - 1
    bad, good = tree(tmp_path / "bad"), tree(clean)
    assert not any(
        name.startswith((f"records/{last:06d}", f"shards/{last:06d}", "manifest")) for name in bad
    )
    assert "settings.json" in bad
    committed = {n: b for n, b in bad.items() if n.startswith(("records/", "shards/"))}
    assert {f"records/{i:06d}.json" for i in range(last)} <= set(committed)
    for name, data_bytes in committed.items():  # byte-identical to the clean run's shards
        assert good[name] == data_bytes, name


def test_teacher_loading_options_and_fingerprints(tiny_teacher_dir, tiny_tokenizer):
    import hashlib

    from logitstore.pipelines._teacher import load_teacher, tokenizer_fingerprint

    teacher = load_teacher(str(tiny_teacher_dir), dtype="bfloat16", device="cpu")
    assert next(teacher.model.parameters()).dtype == torch.bfloat16 and not teacher.model.training
    assert (
        teacher.metadata["dtype"] == "bfloat16" and teacher.metadata["trust_remote_code"] is False
    )
    assert teacher.vocab_size == teacher.model.lm_head.weight.shape[0] == 384
    with pytest.raises(ConfigError, match="float64"):
        load_teacher(str(tiny_teacher_dir), dtype="float64")
    base = tokenizer_fingerprint(tiny_tokenizer, 384)
    assert (
        base["chat_template_sha256"]
        == hashlib.sha256(tiny_tokenizer.chat_template.encode()).hexdigest()
    )
    assert base["special_tokens"]["eos_token"] == ["<|endoftext|>", 0]
    same = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert tokenizer_fingerprint(same, 384) == base  # survives a save and load
    same.add_tokens(["<extra_token>"])
    assert tokenizer_fingerprint(same, 384)["vocab_sha256"] != base["vocab_sha256"]
    assert tokenizer_fingerprint(tiny_tokenizer, 400)["vocab_size"] == 400


def test_fsspec_output_url(tiny_teacher_dir, text_jsonl):
    url = "memory://teacher-pass-test/store"
    summary = run(tiny_teacher_dir, text_jsonl, url, k=8, max_length=32, limit=1, docs_per_shard=5)
    store = logitstore.open_store(url)
    assert store.num_documents == summary["documents"] and store.num_shards == summary["shards"]
    doc = store[0]
    assert doc.input_ids.shape[0] <= 32 and doc.support_ids.shape == (doc.input_ids.shape[0] - 1, 8)


def test_hub_commit_is_read_from_the_local_cache(tmp_path):
    from logitstore.pipelines._teacher import hub_commit

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    assert hub_commit("org/tiny", "config.json", cache_dir=tmp_path) == sha
    assert hub_commit("org/tiny", "config.json", revision=sha, cache_dir=tmp_path) == sha
    assert hub_commit("org/other", "config.json", cache_dir=tmp_path) is None


def test_codec_is_fitted_on_the_first_batch_and_reused_on_resume(
    tmp_path, tiny_teacher_dir, text_jsonl, model, monkeypatch
):
    from logitstore.codecs.topk import TopK, fit_hot_ids

    out = tmp_path / "store"
    kw = dict(k=8, max_length=64, docs_per_shard=3, batch_size=2, limit=4)
    run(tiny_teacher_dir, text_jsonl, out, **kw)
    hot = tuple(logitstore.open_store(out).manifest["codec"]["configuration"]["hot_ids"])

    # Independently: the first batch of shard 0 is its two longest windows, run alone.
    store = logitstore.open_store(out)
    first_shard = store.read_shard(0)
    longest = sorted(first_shard, key=lambda d: (-d.num_tokens, first_shard.index(d)))[:2]
    sample = np.concatenate([direct_logprobs(model, d.input_ids) for d in longest])
    assert hot == fit_hot_ids(torch.from_numpy(sample), 8)
    assert len(hot) > 8

    # A resume must reuse the stored order even if refitting would give another one.
    monkeypatch.setattr(TopK, "fit", lambda self, lp, size=4096: TopK(self.k, self.values, (1, 2)))
    shutil.rmtree(out / "records")
    for path in (out / "shards").iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(tiny_teacher_dir, text_jsonl, out, resume=True, **kw)
    assert tuple(logitstore.open_store(out).manifest["codec"]["configuration"]["hot_ids"]) == hot

    with pytest.raises(
        SettingsMismatchError, match="codec configuration.k is 8 in the store but 9"
    ):
        run(tiny_teacher_dir, text_jsonl, out, resume=True, **{**kw, "k": 9})


class Allocations(TorchDispatchMode):
    """Bytes of every new storage an operator returns (a view or an in-place op adds none)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in leaves}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_fitting_the_codec_copies_the_first_batch_once_in_the_model_dtype(
    tiny_teacher_dir, text_jsonl, monkeypatch
):
    """Fitting happens before the loop, beside the first batch's logits: its copy of them must
    not outweigh them (it made a float32 copy of each window, then one of them all: four times
    a bf16 batch's logits, where the loop holds one float32 window)."""
    import logitstore.pipelines._teacher as teacher_module
    from logitstore.codecs import get_codec
    from logitstore.pipelines._data import build_windows

    teacher = teacher_module.load_teacher(str(tiny_teacher_dir), dtype="bfloat16", device="cpu")
    windows = build_windows(load_rows(str(text_jsonl), limit=4), teacher.tokenizer, max_length=64)
    with torch.inference_mode():
        forwarded = teacher_module.forward_batch(teacher.model, windows, teacher.device)
    monkeypatch.setattr(teacher_module, "forward_batch", lambda *args: forwarded)
    with Allocations() as allocated:
        codec, reused = teacher_module.fit_codec(get_codec("topk", k=8), teacher, windows)
    assert reused is forwarded and len(codec.hot_ids) > 8
    logits = forwarded[0]
    assert logits.dtype == torch.bfloat16 and len(windows) > 2
    assert allocated.bytes < 1.5 * logits.nbytes, (allocated.bytes, logits.nbytes)


def test_compression_level_changes_bytes_not_values(tmp_path, tiny_teacher_dir, text_jsonl):
    from logitstore import open_store

    stores = {}
    for level in (1, 19):
        out = tmp_path / f"level{level}"
        manifest = run(
            tiny_teacher_dir, text_jsonl, out, k=16, max_length=64, compression_level=level
        )["manifest"]
        assert manifest["compression_level"] == level
        stores[level] = (manifest["statistics"]["bytes_per_token"], open_store(str(out)))
    assert stores[19][0] < stores[1][0]
    for a, b in zip(stores[1][1], stores[19][1], strict=True):
        np.testing.assert_array_equal(a.support_ids, b.support_ids)
        np.testing.assert_array_equal(a.support_logprobs, b.support_logprobs)


def test_progress_reaches_a_log_file_as_lines(
    tmp_path, tiny_teacher_dir, text_jsonl, monkeypatch, capsys
):
    """Where stderr is not a terminal (nohup, a job's log), progress comes as whole lines."""
    from logitstore.pipelines import _progress

    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)  # a line a batch
    out = tmp_path / "store"
    cfg = TeacherPassConfig(teacher=str(tiny_teacher_dir), data=str(text_jsonl), out=str(out),
                            k=8, max_length=64, limit=6, batch_size=4, docs_per_shard=8)  # fmt: skip
    run_teacher_pass(cfg)
    lines = capsys.readouterr().err.split("\n")  # only newlines: a bar's \r stays in its line
    total = logitstore.open_store(str(out)).num_documents  # read back from the store
    counts = [line for line in lines if "doc" in line and "tok/s" in line]
    assert len(counts) >= 2, lines
    assert all("\r" not in line for line in counts)
    assert f"{total}/{total}" in counts[-1]


def test_the_teacher_is_loaded_onto_its_device_not_moved_there(tiny_teacher_dir, monkeypatch):
    """``from_pretrained`` places every weight on the device itself: no whole-model copy in host
    memory moved afterwards (each rank would hold the full teacher in RAM while loading)."""
    from transformers import PreTrainedModel

    from logitstore.pipelines._teacher import load_teacher

    moved: list[tuple] = []
    real = PreTrainedModel.to

    def spy(self, *args, **kwargs):
        moved.append(args or tuple(kwargs.values()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "to", spy)
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    assert moved == []
    assert {p.device for p in teacher.model.parameters()} == {torch.device("cpu")}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"data": "missing/docs.jsonl"}, "missing/docs.jsonl"),
        ({"split": "test"}, "one split, 'train'"),
        ({"text_field": "body"}, "no field 'body'; found ['text']"),
        ({"limit": -1}, "limit must be >= 0"),
        ({"messages_field": "text"}, "'text' must be a list of messages"),  # found tokenizing
    ],
)
def test_bad_data_settings_fail_before_the_teacher_loads(
    change, words, tmp_path, tiny_teacher_dir, text_jsonl, monkeypatch
):
    """A wrong path, split or field, or rows that do not tokenize, are found before the teacher's
    weights load (minutes for a 70B teacher); tokenizing needs its tokenizer alone."""
    import logitstore.pipelines.teacher_pass as teacher_pass

    loaded: list[str] = []
    real = teacher_pass.load_teacher
    monkeypatch.setattr(
        teacher_pass, "load_teacher", lambda *a, **k: loaded.append(a[0]) or real(*a, **k)
    )
    settings = {
        "teacher": str(tiny_teacher_dir),
        "data": str(text_jsonl),
        "out": str(tmp_path / "s"),
    }
    with pytest.raises(LogitstoreError) as info:
        run_teacher_pass(TeacherPassConfig(**{**settings, **change}, progress=False))
    assert words in str(info.value)
    assert loaded == []
    assert not (tmp_path / "s").exists()
