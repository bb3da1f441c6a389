"""Evaluate a student against the teacher recorded in a (held-out) logit store.

Per trained token, averaged over the store: teacher forward and reverse KL on the bucket model
(spec/divergences.md, section 1: exact for a full-vocabulary support, a lower bound
otherwise), top-1 agreement with the teacher, the student's and the teacher's mean top-1
probability (over-confidence shows as a student value above the teacher's), expected
calibration error against the labels (15 equal-width confidence bins) for both, student and
teacher entropy. Optionally, generation diversity from prompts: distinct-2 and self-BLEU.

The student's logits are formed for ``chunk_size`` positions at a time, never for a whole
batch. The teacher's top-1 is the first support entry (supports are sorted by probability);
for sampled stores that is the most probable *sampled* id.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from logitstore.dataset import IGNORE_INDEX, StoreDataset
from pipelines._student import (
    check_vocabulary,
    final_hidden,
    load_student,
    load_tokenizer,
    sparse_loss,
)

ECE_BINS = 15
_PER_POSITION = (
    "labels",
    "support_ids",
    "support_logprobs",
    "tail_logmass",
    "label_logprob",
    "tail_logsumexp",
    "entropy",
    "support_counts",
)

_SUMS = (
    "fkl",
    "rkl",
    "agree",
    "student_top1",
    "teacher_top1",
    "student_entropy",
    "teacher_entropy",
    "student_correct",
    "teacher_correct",
)


def ece_from_bins(count: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor) -> float:
    """Expected calibration error from per-bin token counts and sums of confidence and hits."""
    total = float(count.sum())
    if total == 0:
        return float("nan")
    return float((conf - correct).abs().sum() / total)


def _bin(confidence: torch.Tensor) -> torch.Tensor:
    return (confidence * ECE_BINS).long().clamp(0, ECE_BINS - 1)


@torch.no_grad()
def evaluate(
    student: str,
    store: str,
    *,
    tokens_per_batch: int = 8192,
    chunk_size: int = 1024,
    max_documents: int | None = None,
    prompts: str | None = None,
    num_samples: int = 4,
    max_new_tokens: int = 32,
    seed: int = 0,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of ``student`` against ``store``'s teacher; see the module docstring.

    Args:
        student: model directory or Hub id (e.g. a training checkpoint).
        store: store URL.
        tokens_per_batch: padded tokens per forward pass.
        chunk_size: positions whose full-vocabulary logits are formed at once.
        max_documents: stop once this many documents are done (whole batches, store order).
        prompts: a text file, one prompt per line (or JSONL with ``prompt`` or ``text``),
            for generation diversity; None skips it.
        num_samples, max_new_tokens, seed: sampling settings for diversity.

    Returns:
        ``tokens``, ``documents``, ``fkl``, ``rkl``, ``top1_agreement``,
        ``student_top1_prob``, ``teacher_top1_prob``, ``student_ece``, ``teacher_ece``,
        ``student_accuracy``, ``teacher_accuracy``, ``student_entropy``, ``teacher_entropy``,
        and with prompts ``distinct_2`` and ``self_bleu``.
    """
    from logitstore import open_store

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opened = open_store(store, storage_options=storage_options)
    lm = load_student(student)
    tokenizer = load_tokenizer(student)
    check_vocabulary(opened.manifest, lm, tokenizer)
    lm.to(dev).eval()
    weight = lm.get_output_embeddings().weight.float()

    sums = dict.fromkeys(_SUMS, 0.0)
    bins = {who: torch.zeros(3, ECE_BINS, dtype=torch.float64) for who in ("student", "teacher")}
    tokens = documents = 0
    dataset = StoreDataset(
        opened, tokens_per_batch=tokens_per_batch, shuffle=False, rank=0, world_size=1
    )
    for batch in dataset:
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        hidden = final_hidden(lm, batch).float()
        trained = batch["labels"] != IGNORE_INDEX
        sub = {k: None if batch[k] is None else batch[k][trained] for k in _PER_POSITION}
        h = hidden[trained]
        tokens += int(trained.sum())
        documents += len(batch["doc_ids"])
        if h.shape[0]:
            sums["fkl"] += float(sparse_loss("fkl", h, weight, sub, num_items=1.0))
            sums["rkl"] += float(sparse_loss("rkl", h, weight, sub, num_items=1.0))
            for start in range(0, h.shape[0], chunk_size):
                _accumulate(h[start : start + chunk_size], weight, sub, start, sums, bins)
        if max_documents is not None and documents >= max_documents:
            break

    n = max(tokens, 1)
    result: dict[str, Any] = {
        "tokens": tokens,
        "documents": documents,
        "fkl": sums["fkl"] / n,
        "rkl": sums["rkl"] / n,
        "top1_agreement": sums["agree"] / n,
        "student_top1_prob": sums["student_top1"] / n,
        "teacher_top1_prob": sums["teacher_top1"] / n,
        "student_ece": ece_from_bins(*bins["student"]),
        "teacher_ece": ece_from_bins(*bins["teacher"]),
        "student_accuracy": sums["student_correct"] / n,
        "teacher_accuracy": sums["teacher_correct"] / n,
        "student_entropy": sums["student_entropy"] / n,
        "teacher_entropy": sums["teacher_entropy"] / n,
    }
    if prompts is not None:
        result.update(
            diversity(
                lm,
                tokenizer,
                read_prompts(prompts),
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                seed=seed,
            )
        )
    return result


def _accumulate(
    h: torch.Tensor,
    weight: torch.Tensor,
    batch: dict[str, Any],
    start: int,
    sums: dict[str, float],
    bins: dict[str, torch.Tensor],
) -> None:
    """Add one chunk of positions (full logits for ``h.shape[0]`` positions only)."""
    rows = slice(start, start + h.shape[0])
    logq = torch.log_softmax(h @ weight.T, dim=-1)
    q_top, q_arg = logq.max(dim=-1)
    q_top = q_top.exp()
    labels = batch["labels"][rows]
    t_arg = batch["support_ids"][rows, 0]
    t_top = batch["support_logprobs"][rows, 0].float().exp()
    sums["agree"] += float((q_arg == t_arg).sum())
    sums["student_top1"] += float(q_top.sum())
    sums["teacher_top1"] += float(t_top.sum())
    sums["student_entropy"] += float(-(logq.exp() * logq).sum())
    sums["teacher_entropy"] += float(batch["entropy"][rows].sum())
    for who, conf, arg in (("student", q_top, q_arg), ("teacher", t_top, t_arg)):
        hit = (arg == labels).double()
        sums[f"{who}_correct"] += float(hit.sum())
        index = _bin(conf).cpu()
        bins[who][0].index_add_(0, index, torch.ones_like(hit).cpu())
        bins[who][1].index_add_(0, index, conf.double().cpu())
        bins[who][2].index_add_(0, index, hit.cpu())


# ---- generation diversity ---------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``prompt`` or ``text`` field)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            out.append(str(row.get("prompt", row.get("text", ""))))
        else:
            out.append(line)
    return out


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Unique n-grams over all n-grams, pooled over ``sequences``."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def bleu(hypothesis: Sequence[int], references: Sequence[Sequence[int]], max_n: int = 4) -> float:
    """Sentence BLEU with clipped counts, brevity penalty and epsilon smoothing (0.1).

    Smoothing (Chen and Cherry's method 1) keeps a zero higher-order match from zeroing the
    score, as usual for short generations.
    """
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(tuple(hypothesis[i : i + n]) for i in range(len(hypothesis) - n + 1))
        total = sum(hyp.values())
        if total == 0:
            return 0.0
        best: Counter = Counter()
        for ref in references:
            best |= Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matched = sum(min(c, best[g]) for g, c in hyp.items())
        log_precision += math.log((matched or 0.1) / total) / max_n
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    penalty = min(0.0, 1.0 - closest / len(hypothesis))
    return math.exp(log_precision + penalty)


def self_bleu(groups: Sequence[Sequence[Sequence[int]]]) -> float:
    """Mean BLEU of each sample against the other samples of its group (same prompt)."""
    scores = [
        bleu(s, [r for j, r in enumerate(group) if j != i])
        for group in groups
        if len(group) > 1
        for i, s in enumerate(group)
    ]
    return sum(scores) / len(scores) if scores else float("nan")


def _until_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def diversity(
    lm: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, float]:
    """Sample ``num_samples`` continuations per prompt; distinct-2 and self-BLEU on token ids."""
    if tokenizer is None:
        from logitstore.errors import ConfigError

        raise ConfigError("generation diversity needs the student's tokenizer")
    device = next(lm.parameters()).device
    torch.manual_seed(seed)
    groups = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        out = lm.generate(
            **enc,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        groups.append(
            [_until_eos(row[enc["input_ids"].shape[1] :].tolist(), tokenizer) for row in out]
        )
    return {
        "distinct_2": distinct_n([s for g in groups for s in g], 2),
        "self_bleu": self_bleu(groups),
    }
