"""Evaluation metrics against a dense float64 computation from the two models themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from logitstore import open_store
from logitstore.pipelines.evaluate import bleu, distinct_n, evaluate, self_bleu
from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    """Support = the whole vocabulary (k = V, float32): the bucket model is then exact."""
    out = tmp_path_factory.mktemp("full") / "s"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            k=384,
            values="float32",
            max_length=48,
            limit=4,
            docs_per_shard=4,
            progress=False,
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, tiny_teacher_dir, text_jsonl) -> str:
    """Top-8 support: the bucket KLs are lower bounds, the teacher's top-1 is still exact."""
    out = tmp_path_factory.mktemp("topk") / "s"
    run_teacher_pass(
        TeacherPassConfig(
            teacher=str(tiny_teacher_dir),
            data=str(text_jsonl),
            out=str(out),
            k=8,
            values="float32",
            max_length=48,
            limit=4,
            docs_per_shard=4,
            progress=False,
        )
    )
    return str(out)


KEYS = {
    "tokens",
    "documents",
    "fkl",
    "rkl",
    "top1_agreement",
    "student_top1_prob",
    "teacher_top1_prob",
    "student_ece",
    "teacher_ece",
    "student_accuracy",
    "teacher_accuracy",
    "student_entropy",
    "teacher_entropy",
}


def dense_reference(student_dir, teacher_dir, store) -> dict[str, float]:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64).eval()
    rows = []
    with torch.no_grad():
        for doc in open_store(store):
            ids = torch.from_numpy(doc.input_ids)[None]
            mask = torch.from_numpy(doc.loss_mask)
            logp = torch.log_softmax(teacher(ids).logits[0, :-1], -1)[mask]
            logq = torch.log_softmax(student(ids).logits[0, :-1], -1)[mask]
            rows.append((logp, logq, ids[0, 1:][mask]))
    logp = torch.cat([r[0] for r in rows]).numpy()
    logq = torch.cat([r[1] for r in rows]).numpy()
    labels = torch.cat([r[2] for r in rows]).numpy()
    p, q = np.exp(logp), np.exp(logq)

    def ece(probs):
        conf, hit = probs.max(1), probs.argmax(1) == labels
        total = 0.0
        for b in range(15):
            lo, hi = b / 15, (b + 1) / 15
            inside = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
            if inside.any():
                total += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
        return total

    return {
        "documents": len(rows),
        "tokens": len(labels),
        "fkl": float((p * (logp - logq)).sum(1).mean()),
        "rkl": float((q * (logq - logp)).sum(1).mean()),
        "top1_agreement": float((p.argmax(1) == q.argmax(1)).mean()),
        "student_top1_prob": float(q.max(1).mean()),
        "teacher_top1_prob": float(p.max(1).mean()),
        "student_entropy": float(-(q * logq).sum(1).mean()),
        "teacher_entropy": float(-(p * logp).sum(1).mean()),
        "student_accuracy": float((q.argmax(1) == labels).mean()),
        "teacher_accuracy": float((p.argmax(1) == labels).mean()),
        "student_ece": ece(q),
        "teacher_ece": ece(p),
    }


def test_metrics_match_a_dense_float64_computation(full_store, tiny_student_dir, tiny_teacher_dir):
    got = evaluate(
        str(tiny_student_dir), full_store, tokens_per_batch=100, chunk_size=37, device="cpu"
    )
    want = dense_reference(tiny_student_dir, tiny_teacher_dir, full_store)
    assert set(got) == KEYS
    assert got["tokens"] == want["tokens"] > 50
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-4, abs=2e-5), key


def test_a_top_k_store_bounds_the_kls_and_keeps_the_teachers_top1(
    topk_store, tiny_student_dir, tiny_teacher_dir
):
    got = evaluate(
        str(tiny_student_dir), topk_store, tokens_per_batch=100, chunk_size=16, device="cpu"
    )
    want = dense_reference(tiny_student_dir, tiny_teacher_dir, topk_store)
    # Eight buckets plus the label and a tail lose information: the KLs can only shrink.
    assert 0 < got["fkl"] < want["fkl"] and 0 < got["rkl"] < want["rkl"]
    # The top-8 hold the teacher's argmax, so every top-1 metric is the dense one.
    for key in sorted(set(want) - {"fkl", "rkl"}):
        assert got[key] == pytest.approx(want[key], rel=2e-4, abs=2e-5), key


def test_a_student_equal_to_its_teacher_has_zero_kl_and_full_agreement(
    full_store, tiny_teacher_dir
):
    got = evaluate(str(tiny_teacher_dir), full_store, device="cpu", max_documents=2)
    assert abs(got["fkl"]) < 1e-4 and abs(got["rkl"]) < 1e-4
    assert got["top1_agreement"] == 1.0
    assert got["student_ece"] == pytest.approx(got["teacher_ece"], abs=1e-5)


def test_progress_counts_the_documents_read(full_store, tiny_teacher_dir, monkeypatch, capsys):
    from logitstore import open_store
    from logitstore.pipelines import _progress

    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)  # stderr is no terminal here: lines
    got = evaluate(str(tiny_teacher_dir), full_store, device="cpu", progress=True,
                   tokens_per_batch=64)  # fmt: skip
    lines = [line for line in capsys.readouterr().err.split("\n") if line.startswith("eval")]
    total = open_store(full_store).num_documents
    assert got["documents"] == total and f"{total}/{total}" in lines[-1], lines
    assert len(lines) >= 2  # several batches, several lines


def test_distinct_n_counts_unique_ngrams():
    seqs = [[1, 2, 3, 1, 2], [3, 1, 2], [7]]
    grams = {f"{a},{b}" for s in seqs for a, b in zip(s, s[1:])}
    total = sum(max(len(s) - 1, 0) for s in seqs)
    assert distinct_n(seqs, 2) == len(grams) / total


def test_bleu_properties():
    hyp = [5, 6, 7, 8, 9, 10]
    assert bleu(hyp, [hyp]) == pytest.approx(1.0)
    partial = bleu(hyp, [[5, 6, 7, 1, 2, 3]])
    assert 0 < partial < bleu(hyp, [[5, 6, 7, 8, 2, 3]]) < 1
    # Clipping: repeating a matched token does not raise precision.
    assert bleu([5, 5, 5, 5], [[5, 1, 2, 3]]) < bleu([5, 1, 2, 3], [[5, 1, 2, 3]])
    assert self_bleu([[hyp, hyp, hyp]]) == pytest.approx(1.0)
    disjoint = self_bleu([[[1, 2, 3, 4], [5, 6, 7, 8]]])
    assert disjoint < self_bleu([[[1, 2, 3, 4], [1, 2, 3, 8]]]) < 1


def test_generation_diversity_runs_from_prompts(full_store, tiny_teacher_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The function\nA class\n")
    got = evaluate(
        str(tiny_teacher_dir),
        full_store,
        device="cpu",
        max_documents=1,
        prompts=str(prompts),
        num_samples=3,
        max_new_tokens=8,
    )
    assert 0 < got["distinct_2"] <= 1 and 0 <= got["self_bleu"] <= 1


def test_a_head_padded_past_the_vocabulary_is_measured_on_the_teachers_ids(
    topk_store, tiny_student_dir, tmp_path
):
    # Embeddings padded to a multiple of 64 (384 + 64 rows that are no token): the numbers of
    # the same student with exactly the teacher's rows.
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    model.resize_token_embeddings(448, mean_resizing=False)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_student_dir).save_pretrained(tmp_path)
    got = evaluate(str(tmp_path), topk_store, tokens_per_batch=100, device="cpu")
    want = evaluate(str(tiny_student_dir), topk_store, tokens_per_batch=100, device="cpu")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_diversity_never_samples_the_rows_of_a_padded_head(tiny_student_dir, tiny_tokenizer):
    from logitstore.pipelines.evaluate import diversity

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    model.resize_token_embeddings(448)  # new rows at the mean of the others: often sampled
    sampled: list[torch.Tensor] = []
    generate = model.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        sampled.append(out)
        return out

    model.generate = recording
    prompts = ["The list type", "A function definition"]
    settings = dict(num_samples=8, max_new_tokens=16, seed=0)
    diversity(model, tiny_tokenizer, prompts, **settings)
    assert any(int(o.max()) >= 384 for o in sampled)  # the padding rows are sampled without
    sampled.clear()
    diversity(model, tiny_tokenizer, prompts, **settings, vocab_size=384)
    assert len(sampled) == 2 and all(int(o.max()) < 384 for o in sampled)


@pytest.mark.parametrize(
    ("family", "setting"),
    [("gemma2", {"final_logit_softcapping": 3.0, "initializer_range": 0.3}),
     ("granite", {"logits_scaling": 8.0, "initializer_range": 1.0}),
     ("phi", {"initializer_range": 1.0})],
)  # fmt: skip
def test_a_student_whose_forward_caps_scales_or_biases_its_logits_is_measured_on_them(
    full_store, tiny_teacher_dir, tiny_tokenizer, tmp_path, family, setting
):
    # Gemma 2 caps its logits after the head, Granite divides them, Phi-2's head has a bias:
    # eval measured the bare product of the hidden states and the head, logits the student
    # never gives (training takes its own logits).
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, vocab_size=384, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, **setting)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if family == "phi":
        torch.nn.init.normal_(model.lm_head.bias)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    got = evaluate(str(tmp_path), full_store, tokens_per_batch=100, chunk_size=37, device="cpu")
    want = dense_reference(tmp_path, tiny_teacher_dir, full_store)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-4, abs=2e-5), key
