"""How faithful decoded positions are to the dense teacher; recorded in the manifest at capture.

Per position, with ``S`` the decoded support (padding ids ``-1`` excluded), ``y`` the label and
``p`` the true teacher distribution (all in float64):

* ``mass_captured``: ``sum_{i in S} p_i``.
* ``bucket_kl``: ``KL(p_bar || q_bar)`` over the buckets ``S' = S ∪ {y}`` plus one tail bucket.
  ``p_bar`` is the true distribution; ``q_bar`` is what a trainer rebuilds from the store:
  decoded support log-probs, ``label_logprob`` for ``y`` outside ``S``, tail
  ``exp(tail_logmass) - p_y`` (``y`` outside ``S``), then normalised to sum 1 (quantized values
  need not sum exactly with the exact tail). Both tails are floored at ``1e-12`` as the trainer
  does.
* ``support_kl``: KL over ``S`` of the true vs the decoded distribution, each renormalised on ``S``.
* ``max_logprob_error``: ``max_{i in S} |decoded logp_i - true logp_i|``.
* ``top1_agreement``: 1 where the decoded most probable id is the true argmax.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from logitstore.codecs.base import Positions

TAIL_FLOOR = 1e-12
KEYS = ("mass_captured", "bucket_kl", "support_kl", "max_logprob_error", "top1_agreement")
MAX_KEYS = ("bucket_kl", "max_logprob_error")


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise ``sum p log(p / q)`` with ``0 log 0 = 0`` (float64)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=1)


def position_fidelity(
    dense_logprobs: torch.Tensor, decoded: Positions, labels: torch.Tensor
) -> dict[str, np.ndarray]:
    """Per-position fidelity of ``decoded`` against the true teacher.

    Args:
        dense_logprobs: float ``(P, V)`` true teacher log-softmax at temperature 1.
        decoded: the decoded ``P`` positions (support ``(P, K)``).
        labels: int ``(P,)`` next-token ids.

    Returns:
        float64 ``(P,)`` arrays keyed by ``KEYS`` (``top1_agreement`` is 0.0 or 1.0).
    """
    # Only the support, the label and the argmax of each dense row are needed: gather them on
    # the tensor's device and dtype, rather than copying all (P, V) to float64 (which cost
    # about 330 us per position of a 49k vocabulary, more than encoding it).
    dense = dense_logprobs.detach()
    y_t = labels.detach().to(dense.device, torch.int64)
    ids = decoded.support_ids
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    gathered = dense.gather(1, torch.from_numpy(safe).to(dense.device))
    true_at_s = gathered.to("cpu", torch.float64).numpy()
    true_at_y = dense.gather(1, y_t[:, None])[:, 0].to("cpu", torch.float64).numpy()
    true_argmax = dense.argmax(dim=1).cpu().numpy()
    y = y_t.cpu().numpy()
    true_s = np.where(valid, np.exp(true_at_s), 0.0)
    dec_lp = decoded.support_logprobs.astype(np.float64)
    dec_s = np.where(valid, np.exp(dec_lp), 0.0)
    in_s = (valid & (ids == y[:, None])).any(axis=1)

    true_y = np.where(in_s, 0.0, np.exp(true_at_y))
    dec_y = np.where(in_s, 0.0, np.exp(decoded.label_logprob.astype(np.float64)))
    true_tail = np.maximum(1.0 - true_s.sum(axis=1) - true_y, TAIL_FLOOR)
    dec_tail = np.maximum(np.exp(decoded.tail_logmass.astype(np.float64)) - dec_y, TAIL_FLOOR)
    p_bar = np.concatenate([true_s, true_y[:, None], true_tail[:, None]], axis=1)
    q_bar = np.concatenate([dec_s, dec_y[:, None], dec_tail[:, None]], axis=1)
    q_bar /= q_bar.sum(axis=1, keepdims=True)

    with np.errstate(invalid="ignore", divide="ignore"):
        p_s = true_s / true_s.sum(axis=1, keepdims=True)
        q_s = dec_s / dec_s.sum(axis=1, keepdims=True)
    err = np.where(valid, np.abs(dec_lp - np.where(valid, true_at_s, 0.0)), 0.0)
    first = np.argmax(np.where(valid, dec_lp, -np.inf), axis=1)
    return {
        "mass_captured": true_s.sum(axis=1),
        "bucket_kl": _kl(p_bar, q_bar),
        "support_kl": _kl(p_s, q_s),
        "max_logprob_error": err.max(axis=1, initial=0.0),
        "top1_agreement": (ids[np.arange(ids.shape[0]), first] == true_argmax).astype(np.float64),
    }


def fidelity_sums(
    dense_logprobs: torch.Tensor, decoded: Positions, labels: torch.Tensor
) -> dict[str, float]:
    """Mergeable totals of :func:`position_fidelity`: ``count``, ``<key>_sum``, ``<key>_max``."""
    per = position_fidelity(dense_logprobs, decoded, labels)
    out = {"count": float(len(decoded))}
    for key in KEYS:
        out[f"{key}_sum"] = float(per[key].sum())
    for key in MAX_KEYS:
        out[f"{key}_max"] = float(per[key].max(initial=0.0))
    return out


def merge_fidelity(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Combine totals from several shards (sums add, maxima take the max).

    Keys other than ``count`` and the ``KEYS`` sums and ``MAX_KEYS`` maxima are left out: a
    store's shard entries (a manifest or records being converted or resumed) may carry keys of
    another version, or a stranger's, which mean nothing here.
    """
    out = {"count": 0.0, **{f"{k}_sum": 0.0 for k in KEYS}, **{f"{k}_max": 0.0 for k in MAX_KEYS}}
    for part in parts:
        for key, value in part.items():
            if key in out:
                out[key] = max(out[key], value) if key.endswith("_max") else out[key] + value
    return out


def summarize_fidelity(sums: dict[str, float]) -> dict[str, float]:
    """Means per position of every key, the maxima, and ``positions`` (the count)."""
    count = sums.get("count", 0.0)
    out = {"positions": count}
    if count > 0:
        out.update({key: sums[f"{key}_sum"] / count for key in KEYS})
        out.update({f"{key}_max": sums[f"{key}_max"] for key in MAX_KEYS})
    return out
