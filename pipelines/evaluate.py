"""Evaluate a student against the teacher recorded in a (held-out) logit store.

Per trained token, averaged over the store: teacher forward and reverse KL on the bucket model
(docs/divergences.md, section 5: exact for a full-vocabulary support, a lower bound
otherwise), top-1 agreement with the teacher, the student's and the teacher's mean top-1
probability (over-confidence shows as a student value above the teacher's), expected
calibration error against the labels (15 equal-width confidence bins) for both, accuracy
against the labels, student and teacher entropy. Optionally, generation diversity from
prompts: distinct-2 and self-BLEU.

Every per-token metric is ``logitstore.divergences.batch_metrics``, summed over batches by
``MetricTotals``, the same code training logs with; its module docstring defines the teacher's
top-1 (the best of the support and the label) and how the student's logits are chunked.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from logitstore._kd_forward import logit_operands, logits_after_head
from logitstore.dataset import StoreDataset
from logitstore.divergences import MetricTotals, batch_metrics
from logitstore.pipelines._distributed import parse_device
from logitstore.pipelines._progress import library_bars, progress_bar
from logitstore.pipelines._student import (
    check_vocabulary,
    final_hidden,
    load_student,
    load_tokenizer,
)


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
    progress: bool = False,
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
        device: torch device (default: CUDA if available).
        storage_options: fsspec options for a remote store.
        progress: show progress over the store's documents on stderr.

    Returns:
        ``tokens``, ``documents``, ``fkl``, ``rkl``, ``top1_agreement``,
        ``student_top1_prob``, ``teacher_top1_prob``, ``student_ece``, ``teacher_ece``,
        ``student_accuracy``, ``teacher_accuracy``, ``student_entropy``, ``teacher_entropy``
        (means are NaN when the store has no trained token), and with prompts ``distinct_2``
        and ``self_bleu``.
    """
    from logitstore import open_store
    from logitstore.errors import ConfigError

    for name, value in (("tokens_per_batch", tokens_per_batch), ("chunk_size", chunk_size),
                        ("num_samples", num_samples), ("max_new_tokens", max_new_tokens)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1; found {value!r}")
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise ConfigError(f"max_documents must be an integer >= 1; found {max_documents!r}")
    dev = parse_device(device)
    prompt_texts = read_prompts(prompts) if prompts is not None else None
    opened = open_store(store, storage_options=storage_options)
    with library_bars(progress):
        lm = load_student(student)
    tokenizer = load_tokenizer(student)
    check_vocabulary(opened.manifest, lm, tokenizer)
    lm.to(dev).eval()
    # A head padded past the teacher's vocabulary is measured on the teacher's ids, as trained.
    vocab = int(opened.manifest["vocab_size"])
    head = lm.get_output_embeddings()
    weight = head.weight.float()[:vocab]
    bias = head.bias.float()[:vocab] if getattr(head, "bias", None) is not None else None
    # The student's own logits, as trained: its head's bias, its forward's scale and cap.
    scale, softcap = logits_after_head(lm)

    totals = MetricTotals(device=dev)
    documents = 0
    dataset = StoreDataset(
        opened, tokens_per_batch=tokens_per_batch, shuffle=False, rank=0, world_size=1
    )
    total = min(opened.num_documents, max_documents or opened.num_documents)
    with progress_bar(total, show=progress, desc="eval") as bar:
        for batch in dataset:
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
            hidden, w = logit_operands(final_hidden(lm, batch).float(), weight, bias, scale)
            totals.add(batch_metrics(hidden, w, batch, chunk_size=chunk_size, softcap=softcap))
            documents += len(batch["doc_ids"])
            bar.update(len(batch["doc_ids"]))
            if max_documents is not None and documents >= max_documents:
                break

    summary = totals.summary()
    result: dict[str, Any] = {"tokens": summary.pop("tokens"), "documents": documents, **summary}
    if prompt_texts is not None:
        result.update(
            diversity(
                lm,
                tokenizer,
                prompt_texts,
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                seed=seed,
                vocab_size=int(opened.manifest["vocab_size"]),
            )
        )
    return result


# ---- generation diversity ---------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``prompt`` or ``text`` field).

    Raises:
        DataError: a JSON line that does not parse or holds neither field, or no prompt at all.
    """
    from logitstore.errors import DataError

    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: prompts must be UTF-8 text ({exc})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not valid JSON: {exc}") from None
            prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                raise DataError(f"{path}:{n}: expected a string 'prompt' or 'text' field")
            out.append(prompt)
        else:
            out.append(line)
    if not out:
        raise DataError(f"{path}: no prompts (expected one per line, or JSON lines)")
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
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Sample ``num_samples`` continuations per prompt; distinct-2 and self-BLEU on token ids.

    With ``vocab_size`` (the teacher's), rows of the head past it (a head padded to a multiple
    of 64) are never sampled: the student is measured on the teacher's ids, as it was trained.
    """
    if tokenizer is None:
        from logitstore.errors import ConfigError

        raise ConfigError("generation diversity needs the student's tokenizer")
    device = next(lm.parameters()).device
    torch.manual_seed(seed)
    rows = int(lm.get_output_embeddings().weight.shape[0])
    padded = list(range(vocab_size, rows)) if vocab_size is not None else []
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
            **({"suppress_tokens": padded} if padded else {}),
        )
        groups.append(
            [_until_eos(row[enc["input_ids"].shape[1] :].tolist(), tokenizer) for row in out]
        )
    return {
        "distinct_2": distinct_n([s for g in groups for s in g], 2),
        "self_bleu": self_bleu(groups),
    }
