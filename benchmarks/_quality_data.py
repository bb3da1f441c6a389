"""The quality experiment's data: the corpus, its train / held-out split, and the stores.

The held-out documents are split off the corpus before any teacher pass, and
``check_disjoint`` refuses a training store that holds one of the held-out store's windows, so
no arm sees held-out text in training. All training stores hold the same windows in the same
shards (so one seed reads the same order from each); the teacher runs once per window for all
of them (``MemoForward``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# ---- the corpus: held-out documents are split off first and never trained on ----------------


def corpus_texts(max_chars: int) -> list[str]:
    """Python's documentation topics, one document each, truncated, duplicates dropped."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    texts = []
    for key in sorted(topics):
        text = topics[key][:max_chars]
        if len(topics[key]) > 400 and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def split_documents(
    texts: Sequence[str], train_docs: int, heldout_docs: int
) -> tuple[list[str], list[str]]:
    """Every other document is held out until the held-out set is full (both splits span the
    topics); the training documents are the first ``train_docs`` of the rest. Disjoint by
    position, and by text when ``texts`` holds no duplicates."""
    if train_docs < 1 or heldout_docs < 1 or len(texts) < train_docs + heldout_docs:
        raise SystemExit(
            f"need {train_docs} + {heldout_docs} documents, at least one each; "
            f"{len(texts)} available"
        )
    held = set(range(1, 2 * heldout_docs, 2))
    heldout = [texts[i] for i in sorted(held)]
    train = [t for i, t in enumerate(texts) if i not in held][:train_docs]
    return train, heldout


def window_digests(store: Any) -> set[str]:
    """One digest per stored document window (its token ids)."""
    return {
        hashlib.sha1(doc.input_ids.astype("int64").tobytes()).hexdigest()
        for doc in store.iter_documents()
    }


def check_disjoint(train_store: str, heldout_store: str) -> int:
    """Refuse a training store that holds a window of the held-out store; returns the number
    of held-out windows checked."""
    from logitstore import open_store

    held = window_digests(open_store(heldout_store))
    shared = held & window_digests(open_store(train_store))
    if shared:
        raise SystemExit(
            f"{len(shared)} held-out windows are also in the training store {train_store}"
        )
    return len(held)


# ---- the stores ------------------------------------------------------------------------------


class MemoForward:
    """The teacher's forward, remembered by its input: the train stores hold the same windows,
    so their passes (with ``batch_size=1``, hence identical batches whatever the shard policy)
    run the teacher once per window instead of once per store.

    Holds every window's logits (``T x V`` float32 each) until dropped: keep the corpus small.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: dict[bytes, Any] = {}

    def __call__(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **options: Any
    ) -> Any:
        key = repr((tuple(input_ids.shape), sorted(options.items()))).encode()
        key += input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.model(
                input_ids=input_ids, attention_mask=attention_mask, **options
            )
        return self.cache[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def drop_tail_store(source: str, out: str) -> dict[str, Any]:
    """Write a copy of a top-k store whose teacher has no tail: what "renormalised top-k" is.

    Each position's support log-probs become ``logp_i - logsumexp_S(logp)`` (the support holds
    all the mass), ``tail_logmass = -inf``, and the label's log-prob is its renormalised value
    when the label is in the support, else ``-inf``. Under the bucket model this teacher puts
    mass 0 (the floor) on the tail bucket, so the unchanged divergences train exactly the
    truncated, renormalised objective. The positions are re-encoded with the source store's
    own codec (the values move by one constant per position, which a codec relative to the
    top-1 represents exactly).

    Args:
        source: URL of a finalized top-k store.
        out: where to write the derived store (must be empty or absent).

    Returns:
        The derived store's manifest.
    """
    from logitstore import EncodedDocument, StoreWriter, open_store
    from logitstore.errors import ConfigError
    from logitstore.format import METADATA_KEYS

    src = open_store(source)
    meta = {key: copy.deepcopy(src.manifest[key]) for key in METADATA_KEYS}
    meta["capture"]["derived"] = "support renormalised, tail dropped (benchmarks/quality.py)"
    # The extra capture temperatures, whose tail sums the codec stores (FORMAT.md): a format
    # field, or (format 1) a list in the capture section, where the writer reads it from.
    listed = src.manifest.get("tail_temperatures", meta["capture"].get("temperatures", []))
    temps = [float(t) for t in listed]
    if temps:
        meta["capture"]["temperatures"] = temps
    if len(temps) != src.manifest["num_temperatures"]:
        raise ConfigError(
            f"expected {src.manifest['num_temperatures']} capture temperatures in the "
            f"manifest, found {temps}"
        )
    vocab = src.vocab_size
    writer = StoreWriter(
        out,
        codec=src.codec,
        backend=src.manifest["backend"],
        metadata=meta,
        vocab_size=vocab,
        mode="create",
    )
    for j in range(src.num_shards):
        encoded = []
        for doc in src.read_shard(j):
            ids = torch.from_numpy(doc.support_ids.astype("int64"))
            sup = torch.from_numpy(doc.support_logprobs.astype("float32"))
            present = ids >= 0
            sup = torch.where(present, sup, torch.full_like(sup, -math.inf))
            renorm = sup - torch.logsumexp(sup, dim=1, keepdim=True)
            logprobs = torch.full((ids.shape[0], vocab), -math.inf)
            rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
            logprobs[rows[present], ids[present]] = renorm[present]
            labels = torch.from_numpy(doc.input_ids[1:].astype("int64"))
            fields = src.codec.encode(logprobs, labels, temperatures=temps)
            arrays = {name: t.numpy() for name, t in fields.items()}
            encoded.append(EncodedDocument(doc.doc_id, doc.input_ids, doc.loss_mask, arrays))
        writer.write_shard(j, encoded)
    return writer.finalize(src.num_shards)


def train_codecs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The teacher pass's codec setting of each training store (the tail-dropped store is
    derived from the top-k one)."""
    return {
        "topk": {"codec": "topk", "k": args.k, "values": args.values},
        "dense": {"codec": "dense", "bits": args.dense_bits},
        "sampled": {"codec": "sampled", "draws": args.draws},
    }


#: How each codec setting reads in a store's name ('' puts the value alone: ``q6``).
_LABEL_PREFIXES = {"k": "k", "values": "", "bits": "bits", "draws": "draws"}


def captured_store(kind: str) -> str:
    """The teacher pass's store a training store comes from: itself, or the top-k store for
    the tail-dropped store derived from it."""
    return "topk" if kind == "droptail" else kind


def store_label(kind: str, args: argparse.Namespace) -> str:
    """A training store's name: its kind and the codec settings that make it, e.g.
    ``topk-k128-q6``, ``dense-bits8``, ``sampled-draws50``, ``droptail-k128-q6`` (derived from
    that top-k store). Stores of different settings, and the students trained on them, live
    side by side in one work folder, so a sweep over ``--k`` reuses the dense store and its
    students."""
    codec = train_codecs(args)[captured_store(kind)]
    parts = [f"{_LABEL_PREFIXES[key]}{value}" for key, value in codec.items() if key != "codec"]
    return "-".join([kind, *parts])


def build_stores(args: argparse.Namespace, train_stores: set[str], out: Path) -> dict[str, str]:
    """Split the corpus, run the teacher over each split (once per training window), derive
    the tail-dropped store, save the teacher as plain weights.

    Args:
        args: the experiment's settings (corpus, codecs, device).
        train_stores: the training stores the arms need (dense, topk, sampled, droptail).
        out: the work folder; stores already complete there are kept.

    Returns:
        ``{name: url}``: ``heldout``, one per training store (by kind: ``topk`` ...; the
        folder is ``store_train_`` and its :func:`store_label`), ``teacher_dir`` and
        ``prompts``.
    """
    from logitstore.pipelines._teacher import load_teacher
    from logitstore.pipelines.demo import find_gguf_teacher, save_plain_copy
    from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

    train, heldout = split_documents(
        corpus_texts(args.max_chars), args.train_docs, args.heldout_docs
    )
    data = {}
    for split, docs in (("train", train), ("heldout", heldout)):
        data[split] = out / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    needed = {captured_store(kind) for kind in train_stores}
    codecs = train_codecs(args)
    passes = [("train", name, codecs[name]) for name in codecs if name in needed]
    passes.append(("heldout", "topk", {"codec": "topk", "k": args.eval_k}))
    urls = {"teacher_dir": str(out / "teacher_hf")}
    gguf = find_gguf_teacher()
    teacher = memo = None
    for split, name, codec in passes:
        label = store_label(name, args)
        url = out / (f"store_{split}_{label}" if split == "train" else "store_heldout")
        urls[name if split == "train" else "heldout"] = str(url)
        if (url / "manifest.json").exists():
            continue
        if teacher is None:
            teacher = load_teacher(str(gguf.parent), gguf_file=gguf.name, device=args.device)
            memo = dataclasses.replace(teacher, model=MemoForward(teacher.model))
        # Every training store has the same shards (dense positions are large: 2 documents a
        # shard), so one seed reads the same documents in the same order from each.
        cfg = TeacherPassConfig(
            teacher=str(gguf.parent), gguf_file=gguf.name, data=str(data[split]), out=str(url),
            max_length=args.max_length, batch_size=1, docs_per_shard=2, resume=True,
            device=args.device, seed=0, progress=False, **codec,
        )  # fmt: skip
        run_teacher_pass(cfg, teacher=memo if split == "train" else teacher)
    del memo  # frees the remembered logits
    if "droptail" in train_stores:
        target = out / f"store_train_{store_label('droptail', args)}"
        if not (target / "manifest.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            drop_tail_store(urls["topk"], str(target))
        urls["droptail"] = str(target)
    teacher_dir = Path(urls["teacher_dir"])
    if not (teacher_dir / "config.json").exists():
        if teacher is None:
            teacher = load_teacher(str(gguf.parent), gguf_file=gguf.name, device="cpu")
        save_plain_copy(teacher.model, teacher.tokenizer, teacher_dir)
    prompts = out / "prompts.txt"  # the opening words of each held-out document
    prompts.write_text("".join(" ".join(t.split()[:8]) + "\n" for t in heldout))
    urls["prompts"] = str(prompts)
    return urls
