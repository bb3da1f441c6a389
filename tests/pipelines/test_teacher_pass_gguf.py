"""The teacher pass with the real SmolLM2-135M-Instruct GGUF teacher over real text (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import logitstore
from logitstore.codecs._quant import grid, grid_max
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass


@pytest.mark.slow
def test_real_gguf_teacher_values_equal_a_direct_computation(tmp_path, gguf_teacher_path):
    from pydoc_data.topics import topics

    texts = [topics[key][:600] for key in sorted(topics)[40:43]]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "store"
    cfg = TeacherPassConfig(
        teacher=str(gguf_teacher_path.parent), gguf_file=gguf_teacher_path.name, data=str(data),
        out=str(out), k=128, values="q8", max_length=96, batch_size=3, docs_per_shard=4,
        device="cpu", progress=False,
    )  # fmt: skip
    summary = run_teacher_pass(cfg)
    manifest = summary["manifest"]
    assert (
        manifest["vocab_size"] == 49152
        and manifest["teacher"]["gguf_file"] == gguf_teacher_path.name
    )
    assert manifest["statistics"]["fidelity"]["top1_agreement"] > 0.99

    model = AutoModelForCausalLM.from_pretrained(
        gguf_teacher_path.parent, gguf_file=gguf_teacher_path.name, dtype=torch.float32
    ).eval()
    g = grid("q8")
    store = logitstore.open_store(str(out))
    assert store.num_documents > 3  # the documents were windowed
    for doc in store.iter_documents():
        with torch.no_grad():
            logits = model(torch.from_numpy(doc.input_ids)[None]).logits[0, :-1]
        lp = torch.log_softmax(logits.double(), -1).numpy()
        rows = np.arange(lp.shape[0])
        true = lp[rows[:, None], doc.support_ids]
        # The support is the top 128: nothing outside is more probable than its least member.
        kth = -np.sort(-lp, axis=1)[:, 127]
        assert (true.min(axis=1) >= kth - 1e-4).all()
        np.testing.assert_allclose(doc.support_logprobs[:, 0], true[:, 0], atol=1e-4)
        d_true, d_dec = true[:, :1] - true, doc.support_logprobs[:, :1] - doc.support_logprobs
        idx = np.clip(np.searchsorted(g, d_true), 2, len(g) - 1)
        bound = np.maximum((g[idx] - g[idx - 1]) / 2, g[1]) + 1e-4
        inside = d_true < grid_max("q8")
        assert (np.abs(d_dec - d_true)[inside] <= bound[inside]).all()
        outside = lp.copy()
        outside[rows[:, None], doc.support_ids] = -np.inf
        np.testing.assert_allclose(
            doc.tail_logmass, np.logaddexp.reduce(outside, 1), rtol=2.0**-11, atol=1e-4
        )  # float16 tails
        np.testing.assert_allclose(doc.label_logprob, lp[rows, doc.input_ids[1:]], atol=1e-4)
