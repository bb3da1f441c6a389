"""Property-based tests: every codec on any vocabulary, any ``k`` and extreme distributions, and
every divergence on extreme inputs (finite, non-negative, zero at ``q = p``, sparse bounds).

Each decoded value is checked against an independent numpy computation from the full float32
log-probs (in float64): the top-k set, the quantisation grid written down from FORMAT.md, the
tail as a log-sum-exp over the tokens outside the decoded support, the label and entropy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitstore.codecs import get_codec
from logitstore.divergences import DIVERGENCES, dense_loss, sparse_loss

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# FORMAT.md, "Values relative to the top-1": (levels L, scale a) per quantized option.
GRIDS = {"q8": (256, 4.0), "q6": (64, 3.0), "q4": (16, 4.0)}
F16_MAX = 65504.0


def normalise_tol(vocab: int) -> float:
    """How far a float32 log-softmax (what codecs compute) may be from the float64 one.

    Its log-sum-exp adds ``V`` float32 terms: rounding grows like ``sqrt(V)`` (measured up to
    1.2e-5 at V = 65536 for flat rows; torch's own float32 log_softmax does the same).
    """
    return 2e-6 + 2e-7 * math.sqrt(vocab)


F16_TINY = 2.0**-14  # smallest normal float16
BF16_TINY = 2.0**-126

KINDS = ("normal", "onehot", "near_onehot", "uniform", "ties", "tiny_gaps", "f16_limit")


def grid(values: str) -> np.ndarray:
    """Levels ``d_j = -a ln(1 - j / (L - 1/2))``, ``j = 0 .. L-1``, as FORMAT.md defines them."""
    levels, a = GRIDS[values]
    return np.array([-a * math.log(1 - j / (levels - 0.5)) for j in range(levels)])


def logits_of(kind: str, rows: int, vocab: int, seed: int) -> np.ndarray:
    """Teacher logits (float64) of one family of (possibly extreme) distributions."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=(rows, vocab)) * rng.choice([0.1, 1.0, 4.0, 30.0])
    hot = rng.integers(0, vocab, size=rows)
    if kind in ("onehot", "near_onehot"):
        floor = -np.inf if kind == "onehot" else -float(rng.choice([50.0, 1e4, 7e4]))
        out = np.full((rows, vocab), floor)
        out[np.arange(rows), hot] = 0.0
        return out
    if kind == "uniform":
        return np.zeros((rows, vocab))
    if kind == "ties":
        return rng.integers(0, 3, size=(rows, vocab)).astype(np.float64)
    if kind == "tiny_gaps":  # differences near the float16 and float32 resolution
        return rng.normal(size=(rows, vocab)) * 1e-6
    return rng.uniform(-1.0, 0.0, size=(rows, vocab)) * rng.choice([6e4, 6.6e4, 1e5])


@st.composite
def teacher(draw, max_vocab: int = 600, large: bool = True):
    """``(logprobs float32 (P, V), labels (P,), vocab, kind)``; ``large`` adds vocabularies
    around the one-, two- and three-byte id boundaries."""
    sizes = st.integers(1, max_vocab)
    if large:
        sizes = st.one_of(sizes, st.sampled_from([255, 256, 257, 65536, 65537, 70000]))
    vocab = draw(sizes)
    rows = draw(st.integers(1, 4 if vocab <= 4096 else 2))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    lp = torch.log_softmax(torch.from_numpy(logits_of(kind, rows, vocab, seed)).float(), dim=-1)
    labels = torch.from_numpy(np.random.default_rng(seed + 1).integers(0, vocab, size=rows))
    return lp, labels, vocab, kind


def ref_logsumexp(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of float64 ``x`` over ``keep`` (``-inf`` for none)."""
    x = np.where(keep, x, -np.inf)
    top = np.max(x, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(x - safe), axis=1)) + safe[:, 0]).astype(np.float64)


def assert_float16_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    """``got`` is ``ref`` rounded to float16 (relative 2^-11), after a float32 capture.

    Beyond the float16 range a value may only become ``-inf`` (a mass below ``exp(-65504)``,
    zero in any float format).
    """
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    assert not np.isnan(got).any(), what
    neg_inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(got) & ~(ref < -F16_MAX), neg_inf & ~(ref < -F16_MAX)), what
    finite = np.isfinite(ref) & (ref >= -F16_MAX)
    # 2^-11 is float16's rounding; 1e-5 covers the float32 log-sum-exp at capture.
    bound = 2.0**-11 * np.abs(ref[finite]) + 1e-5
    assert (np.abs(got[finite] - ref[finite]) <= bound).all(), (what, got, ref)
    overflow = np.isfinite(ref) & (ref < -F16_MAX)
    assert (got[overflow] <= -F16_MAX).all(), what


def check_common(decoded, lp: torch.Tensor, labels: torch.Tensor, temps) -> np.ndarray:
    """Checks every codec shares; returns the float64 reference log-probs."""
    # Codecs normalise their input rows in float32: the truth is the float64 log-softmax.
    ref = torch.log_softmax(lp.double(), dim=1).numpy()
    rows, vocab = ref.shape
    ids = decoded.support_ids
    valid = ids >= 0
    member = np.zeros((rows, vocab + 1), dtype=bool)
    member[np.arange(rows)[:, None], np.where(valid, ids, vocab)] = True
    member = member[:, :vocab]
    # Ids are distinct, inside the vocabulary, most probable first.
    assert (ids[valid] < vocab).all()
    assert (member.sum(axis=1) == valid.sum(axis=1)).all(), "repeated ids in a support"
    slp = decoded.support_logprobs
    assert not np.isnan(slp).any()
    ordered = np.where(valid, slp, -np.inf)
    assert (ordered[:, :-1] >= ordered[:, 1:]).all(), "not most probable first"
    # Label log-prob is exact: the float32 log-softmax, a few ulps of the float64 one.
    exact = ref[np.arange(rows), labels.numpy()]
    assert np.allclose(decoded.label_logprob, exact, rtol=2.0**-21, atol=normalise_tol(vocab))
    # Tail: log-sum-exp of the true log-probs outside the decoded support, i.e. 1 - support mass.
    assert_float16_close(decoded.tail_logmass, ref_logsumexp(ref, ~member), "tail_logmass")
    mass = np.exp(ref_logsumexp(ref, member))
    tail = np.exp(decoded.tail_logmass.astype(np.float64))
    assert np.allclose(tail, np.clip(1.0 - mass, 0.0, None), rtol=2e-3, atol=2e-5)
    for j, tau in enumerate(temps):
        assert_float16_close(
            decoded.tail_logsumexp[:, j], ref_logsumexp(ref / tau, ~member), f"tail at {tau}"
        )
    assert decoded.tail_logsumexp.shape == (rows, len(temps))
    # Entropy from the full distribution.
    p = np.exp(ref)
    entropy = -np.sum(p * np.where(p > 0, ref, 0.0), axis=1)
    assert np.allclose(decoded.entropy, entropy, rtol=2.0**-10, atol=1e-4)
    return ref


def check_values_against_truth(slp, ids, ref, values: str) -> None:
    """Decoded log-probs against the truth, with the documented error of ``values``.

    Values are distances below the top-1, which is stored on its own: distances are compared
    with the true ones, and the decoded top-1 is the reference point of the decoded ones.
    """
    true = ref[np.arange(ref.shape[0])[:, None], ids]
    top1 = slp[:, 0].astype(np.float64)
    d_true = ref.max(axis=1)[:, None] - true  # >= 0, inf for tokens of probability 0
    d_got = top1[:, None] - slp.astype(np.float64)
    tol = normalise_tol(ref.shape[1])
    assert np.allclose(top1, ref.max(axis=1), rtol=2.0**-21, atol=tol), "top-1 log-prob"
    rest_true, rest_got = d_true[:, 1:], d_got[:, 1:]
    # Decoding subtracts in float32: a few float32 ulps of the top-1 and of the value.
    ulps = 4 * 2.0**-24 * (np.abs(top1)[:, None] + np.abs(rest_got))
    if values in GRIDS:
        levels = grid(values)[1:]  # code 0 is the top-1's only
        off_grid = np.min(np.abs(rest_got[..., None] - levels), axis=-1)
        assert (off_grid <= ulps).all(), "a decoded value off the grid"
        finite = np.isfinite(rest_true)
        nearest = np.min(np.abs(rest_true[finite][:, None] - levels[None, :]), axis=1)
        err = np.abs(rest_got[finite] - rest_true[finite])
        assert (err <= nearest + 1e-5 * (1 + rest_true[finite]) + ulps[finite]).all(), "not nearest"
        assert np.allclose(rest_got[~finite], levels[-1], rtol=1e-6), "-inf at the last level"
        return
    rel, tiny = {"float32": (2.0**-23, 2.0**-126), "float16": (2.0**-11, F16_TINY),
                 "bfloat16": (2.0**-8, BF16_TINY)}[values]  # fmt: skip
    finite = np.isfinite(rest_got)
    # Float16 overflows to -inf only where the truth is beyond its range.
    assert (rest_true[~finite] > F16_MAX).all()
    bound = rel * rest_true[finite] + tiny + 1e-6 * (1 + rest_true[finite]) + ulps[finite]
    assert (np.abs(rest_got[finite] - rest_true[finite]) <= bound).all()


def encode_decode(codec, lp, labels, temps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    enc = codec.encode(lp, labels, temperatures=temps, generator=gen)
    specs = codec.fields(lp.shape[1], len(temps))
    fields = {k: v.numpy() for k, v in enc.items()}
    assert set(fields) == set(specs)
    for name, spec in specs.items():
        assert fields[name].dtype == np.dtype(spec.dtype), name
        assert fields[name].shape == (lp.shape[0], *spec.shape), name
    return fields, codec.decode(fields)


TEMPS = st.sampled_from([(), (2.0,), (0.5, 3.0)])


@SETTINGS
@given(
    data=teacher(),
    values=st.sampled_from(["q8", "q6", "q4", "float32", "float16", "bfloat16"]),
    fit=st.booleans(),
    temps=TEMPS,
    k_frac=st.floats(0.0, 1.0),
)
def test_topk_decodes_the_top_k_within_the_documented_error(data, values, fit, temps, k_frac):
    lp, labels, vocab, _ = data
    k = max(1, min(vocab, round(k_frac * min(vocab, 300))))
    codec = get_codec("topk", k=k, values=values)
    if fit:
        codec = codec.fit(lp)
    fields, decoded = encode_decode(codec, lp, labels, temps)
    planes = [name for name in fields if name.startswith("ids")]
    assert len(planes) == max(1, math.ceil((vocab - 1).bit_length() / 8))  # V = 1: one plane
    ref = check_common(decoded, lp, labels, temps)
    ids = decoded.support_ids
    assert ids.shape == (lp.shape[0], k) and (ids >= 0).all()
    rows = np.arange(ref.shape[0])[:, None]
    # The support is a top-k set of the truth (any tie-break): nothing outside beats it.
    outside = np.ones_like(ref, dtype=bool)
    outside[rows, ids] = False
    inside_min = ref[rows, ids].min(axis=1)
    outside_max = np.where(outside, ref, -np.inf).max(axis=1)
    assert (inside_min >= outside_max).all()
    assert (ref[rows[:, 0], ids[:, 0]] == ref.max(axis=1)).all(), "decoded argmax is an argmax"
    check_values_against_truth(decoded.support_logprobs, ids, ref, values)
    if values in GRIDS:
        return
    # Stored floats, read as FORMAT.md describes them: -d, the top-1 the only zero.
    stored = fields["values"]
    if values == "bfloat16":
        stored = (stored.astype(np.uint32) << 16).view(np.float32)
    stored = stored.astype(np.float64)
    assert ((stored == 0).sum(axis=1) == 1).all() and (stored <= 0).all()


@SETTINGS
@given(data=teacher(), draws=st.integers(1, 300), temps=TEMPS, seed=st.integers(0, 2**31))
def test_sampled_keeps_unique_draws_with_exact_logprobs(data, draws, temps, seed):
    lp, labels, vocab, _ = data
    fields, decoded = encode_decode(get_codec("sampled", n=draws), lp, labels, temps, seed)
    ref = check_common(decoded, lp, labels, temps)
    ids, counts = decoded.support_ids, decoded.support_counts
    valid = ids >= 0
    assert counts is not None and ids.shape == (lp.shape[0], draws)
    assert (counts.sum(axis=1) == draws).all() and ((counts > 0) == valid).all()
    rows = np.broadcast_to(np.arange(ref.shape[0])[:, None], ids.shape)
    truth = ref[rows[valid], ids[valid]]
    got = decoded.support_logprobs[valid]
    tol = normalise_tol(vocab)
    assert np.allclose(got, truth, rtol=2.0**-21, atol=tol), "log-probs are exact"
    assert np.isfinite(truth).all(), "a token of probability 0 was drawn"
    assert np.isneginf(decoded.support_logprobs[~valid]).all()


@SETTINGS
@given(data=teacher(max_vocab=400, large=False), bits=st.sampled_from([8, 4]), temps=TEMPS)
def test_dense_keeps_every_token_on_its_grid(data, bits, temps):
    lp, labels, vocab, _ = data
    _, decoded = encode_decode(get_codec("dense", bits=bits), lp, labels, temps)
    ref = check_common(decoded, lp, labels, temps)
    assert (np.sort(decoded.support_ids, axis=1) == np.arange(vocab)).all()
    assert np.isneginf(decoded.tail_logmass).all()
    values = "q8" if bits == 8 else "q4"
    check_values_against_truth(decoded.support_logprobs, decoded.support_ids, ref, values)


@settings(max_examples=25, deadline=None)
@given(
    a=teacher(max_vocab=300, large=False),
    split=st.integers(0, 4),
    name=st.sampled_from(["topk", "sampled", "dense"]),
)
def test_decoding_a_concatenation_is_concatenating_decodings(a, split, name):
    lp, labels, vocab, _ = a
    codec = {"topk": get_codec("topk", k=min(vocab, 7), values="q6"),
             "sampled": get_codec("sampled", n=9), "dense": get_codec("dense", bits=4)}[name]  # fmt: skip
    split = min(split, lp.shape[0])
    parts = [(lp[:split], labels[:split]), (lp[split:], labels[split:])]
    encoded = [
        {k: v.numpy() for k, v in codec.encode(x, y, generator=torch.Generator()).items()}
        for x, y in parts
    ]
    whole = codec.decode({k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]})
    pieces = [codec.decode(e) for e in encoded]
    for field in ("support_ids", "support_logprobs", "tail_logmass", "label_logprob", "entropy"):
        joined = np.concatenate([getattr(p, field) for p in pieces])
        assert np.array_equal(getattr(whole, field), joined, equal_nan=True), field


# ---- divergences ------------------------------------------------------------------------------

# Every registered objective is a divergence (or a non-negative combination of divergences):
# FKL, RKL, JSD, TVD, skew KLs, AKL, the alpha-beta divergence, TAID's KL, AMiD, DKD and DRKL.
NON_NEGATIVE = tuple(DIVERGENCES)
# ABKD with a negative exponent is left out: its value grows like (p/q)^|alpha| without bound
# (a student log-prob 180 nats below the teacher's overflows float32), so no float is promised.
# f-divergences: merging the tail into one bucket can only lower them (spec section 1).
F_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
PARAMS = st.sampled_from(
    [
        ("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.0}),
        ("jsd", {"beta": 1.0}), ("tvd", {}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.9}),
        ("akl", {"mu": 0.5}), ("akl", {"mu": 1.0}), ("abkd", {"alpha": 0.2, "beta": 0.7}),
        ("abkd", {"alpha": 1.0, "beta": 0.0}), ("abkd", {"alpha": 0.0, "beta": 1.0}),
        ("abkd", {"alpha": 0.0, "beta": 0.0}), ("abkd", {"alpha": 1.5, "beta": 0.3}),
        ("taid", {"t": 0.4}), ("taid", {"t": 1.0}), ("amid", {}),
        ("amid", {"alpha": 1.0, "order": "rq"}), ("amid", {"alpha": -1.0, "divergence": "ab"}),
        ("dkd", {}), ("drkl", {"gamma": 0.5}), ("drkl", {"target": "teacher_argmax"}),
    ]
)  # fmt: skip


@st.composite
def pair(draw):
    """Student logits and teacher log-probs ``(N, V)`` of any family, float32 or float64."""
    vocab = draw(st.integers(2, 64))
    rows = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    t_kind, s_kind = draw(st.sampled_from(KINDS)), draw(st.sampled_from(KINDS))
    u = logits_of(t_kind, rows, vocab, seed)
    z = logits_of(s_kind, rows, vocab, seed + 7)
    z = np.where(np.isfinite(z), z, -1e4)  # a student's logits are finite
    labels = np.random.default_rng(seed + 3).integers(0, vocab, size=rows)
    teacher_lp = torch.log_softmax(torch.from_numpy(u).to(dtype), -1)
    return torch.from_numpy(z).to(dtype), teacher_lp, torch.from_numpy(labels)


@settings(max_examples=60, deadline=None)
@given(inputs=pair(), objective=PARAMS)
def test_dense_divergences_are_finite_non_negative_and_zero_at_equality(inputs, objective):
    name, params = objective
    z, teacher_lp, labels = inputs
    z = z.clone().requires_grad_(True)
    values = dense_loss(name, z, teacher_lp, labels, **params)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(z.grad).all(), (name, values)
    tol = 1e-4 if z.dtype == torch.float32 else 1e-9
    if name in NON_NEGATIVE:
        assert (values >= -tol * (1 + values.abs())).all(), (name, values)
    # A student equal to the teacher: value zero (an absent token gets NEG, like the teacher).
    same = teacher_lp.clamp(min=-1e4).clone().requires_grad_(True)
    at_equality = dense_loss(name, same, teacher_lp, labels, **params)
    assert (at_equality.abs() <= 1e3 * tol).all(), (name, at_equality)


def top_k_cache(teacher_lp: torch.Tensor, labels: torch.Tensor, k: int):
    """What a store returns for a dense teacher: top-k, tail (float64, independent), label."""
    lp = teacher_lp.double()
    vals, ids = lp.topk(k, dim=-1)
    outside = torch.ones_like(lp, dtype=torch.bool).scatter(1, ids, False)
    tail = torch.where(outside, lp, -math.inf).logsumexp(-1)
    return ids, vals, tail, lp.gather(1, labels[:, None])[:, 0]


@settings(max_examples=60, deadline=None)
@given(inputs=pair(), objective=PARAMS, k_frac=st.floats(0.0, 1.0))
def test_sparse_divergences_are_finite_and_bounded(inputs, objective, k_frac):
    name, params = objective
    z, teacher_lp, labels = inputs
    z, teacher_lp = z.double(), teacher_lp.double()
    vocab = z.shape[1]
    k = max(1, round(k_frac * vocab))
    ids, vals, tail, label_lp = top_k_cache(teacher_lp, labels, k)
    z = z.clone().requires_grad_(True)
    sparse = sparse_loss(name, z, ids, vals, tail, label_lp, labels, **params)
    sparse.sum().backward()
    assert torch.isfinite(sparse).all() and torch.isfinite(z.grad).all(), (name, sparse)
    defined = torch.ones_like(sparse, dtype=torch.bool)
    if name in ("dkd", "drkl"):  # decoupled around y: 0/0 when p_y or q_y is 1 (in float64)
        lq = torch.log_softmax(z.detach(), -1)
        for y in (labels, teacher_lp.argmax(-1)):
            picked = torch.stack(
                [teacher_lp.gather(1, y[:, None])[:, 0], lq.gather(1, y[:, None])[:, 0]]
            )
            defined &= (picked < 0).all(0)
    assert (sparse.detach()[defined] >= -1e-9).all(), (name, sparse)
    dense = dense_loss(name, z.detach(), teacher_lp, labels, **params)
    if k == vocab:  # the whole vocabulary as support is dense mode
        assert torch.allclose(sparse.detach(), dense, rtol=1e-6, atol=1e-9), (name, sparse, dense)
    if name in F_DIVERGENCES:  # a lower bound (up to the 1e-12 tail floor)
        assert (sparse.detach() <= dense + 1e-9).all(), (name, sparse, dense)


@settings(max_examples=30, deadline=None)
@given(data=teacher(max_vocab=200, large=False), objective=PARAMS, seed=st.integers(0, 2**31))
def test_losses_on_decoded_store_values_are_finite(data, objective, seed):
    """What training really sees: a q4 top-k cache of an extreme teacher, float32 student."""
    lp, labels, vocab, _ = data
    if vocab < 2:
        return
    name, params = objective
    codec = get_codec("topk", k=min(vocab, 5), values="q4")
    _, decoded = encode_decode(codec, lp, labels, (2.0,))
    z = (torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed)) * 3).requires_grad_()
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (
        decoded.support_ids, decoded.support_logprobs, decoded.tail_logmass,
        decoded.label_logprob)]  # fmt: skip
    for tau, lse in ((1.0, None), (2.0, torch.from_numpy(decoded.tail_logsumexp[:, 0]))):
        values = sparse_loss(name, z, *tensors, labels, temperature=tau, tail_logsumexp=lse,
                             **params)  # fmt: skip
        (grad,) = torch.autograd.grad(values.sum(), z)
        assert torch.isfinite(values).all() and torch.isfinite(grad).all(), (name, tau, values)
        assert (values >= -1e-4 * (1 + values.abs())).all(), (name, tau, values)
