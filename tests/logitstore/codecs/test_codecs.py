"""Conformance suite run for every codec and value option, against float64 computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from logitstore.codecs import CODECS, Dense, Sampled, TopK, _scalars, codec_from_json, get_codec
from logitstore.errors import (
    ConfigError,
    DataError,
    FormatVersionError,
    NonFiniteTeacherError,
    UnknownNameError,
)

TEMPS = (0.5, 2.0)

# (codec, largest |decoded logp - true logp| as a function of the distance d below the top-1).
# Quantized grids: d_j = -a ln(1 - j / (L - 1/2)); within range the error is at most half the
# spacing of the two levels around d, bounded here by half the spacing at d's upper level.


def _grid_bound(levels: int, a: float):
    def bound(d: np.ndarray) -> np.ndarray:
        u = 1 - np.exp(-np.minimum(d, 50) / a)  # position in the companded domain
        j = np.minimum(np.ceil(u * (levels - 0.5)) + 1, levels - 1)
        level = lambda i: -a * np.log1p(-i / (levels - 0.5))  # noqa: E731
        # Code 0 is the top-1's alone: a near-tie below level 1 is pushed up to level 1.
        return np.where(d < level(1), level(1), 0.5 * (level(j) - level(j - 1))) + 1e-5

    return bound, a * math.log(2 * levels - 1)


# Codecs normalise their input rows in float32 (a log-softmax), so even exact values may differ
# from the float64 log-softmax by this much (rows of log-probs summing to 1 within ~1e-7).
FLOAT32_NORMALISE = 2e-6


def exact(lp: torch.Tensor) -> torch.Tensor:
    """The float64 log-softmax of the codec's input: what every decoded value approximates."""
    return torch.log_softmax(lp.double(), dim=1)


# A storage order that moves some high and some low ids to the front.
HOT = (998, 3, 500, *range(990, 900, -3), 0, 1)
Q8 = _grid_bound(256, 4.0)
Q4 = _grid_bound(16, 4.0)
Q6 = _grid_bound(64, 3.0)
CASES = [
    (TopK(k=16, values="q8"), Q8),
    (TopK(k=15, values="q4"), Q4),
    (TopK(k=16, values="q4"), Q4),
    (TopK(k=16, values="q6"), Q6),
    (TopK(k=16, values="q6", hot_ids=HOT), Q6),
    (TopK(k=16, values="float16", hot_ids=HOT), ((lambda d: 7e-5 + 2.0**-11 * d), math.inf)),
    (TopK(k=16, values="float32"), ((lambda d: 1e-5 + 1e-6 * d), math.inf)),
    (TopK(k=16, values="float16"), ((lambda d: 7e-5 + 2.0**-11 * d), math.inf)),
    (TopK(k=16, values="bfloat16"), ((lambda d: 1e-6 + 2.0**-8 * d), math.inf)),
    (Sampled(n=50), ((lambda d: FLOAT32_NORMALISE + 0 * d), math.inf)),
    (Dense(bits=8), Q8),
    (Dense(bits=4), Q4),
]
IDS = [repr(c) + ("+hot" if getattr(c, "hot_ids", ()) else "") for c, _ in CASES]


def teacher(num: int, vocab: int, seed: int = 0, peak: float = 3.0) -> torch.Tensor:
    """Float32 log-probs ``(num, vocab)``: Zipf-like, peaked like a trained LM's."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -1.1 * torch.log(ranks) + peak * torch.randn(num, vocab, generator=g)
    return torch.log_softmax(logits, dim=1)


def labels_for(lp: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(lp.exp(), 1, generator=g)[:, 0]


def assert_float16_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal infinities, or finite values within float16's relative rounding of ``want``."""
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    err = np.abs(got[~inf] - want[~inf])
    assert (err <= 2.0**-11 * np.abs(want[~inf]) + 1e-6).all(), err.max(initial=0)


def encode_np(codec, lp, labels, temps=TEMPS, seed=0):
    gen = torch.Generator(device=lp.device).manual_seed(seed)
    enc = codec.encode(lp, labels, temperatures=temps, generator=gen)
    return {k: v.cpu().numpy() for k, v in enc.items()}


@pytest.fixture(scope="module", params=["logprobs", "logits"])
def data(request):
    """Log-probs, or logits: the same rows shifted by a per-row constant (codecs normalise)."""
    lp = teacher(40, 1000)
    if request.param == "logits":
        lp = lp + 20 * torch.randn(40, 1, generator=torch.Generator().manual_seed(7))
    return lp, labels_for(lp)


@pytest.mark.parametrize(("codec", "precision"), CASES, ids=IDS)
class TestCodecConformance:
    def test_fields_declared(self, codec, precision, data):
        lp, y = data
        enc = encode_np(codec, lp, y)
        spec = codec.fields(lp.shape[1], len(TEMPS))
        assert set(enc) == set(spec)
        for name, arr in enc.items():
            assert arr.dtype == np.dtype(spec[name].dtype), name
            assert arr.shape == (lp.shape[0], *spec[name].shape), name

    def test_round_trip(self, codec, precision, data):
        lp, y = data
        dec = codec.decode(encode_np(codec, lp, y))
        true = exact(lp).numpy()
        ids, vals = dec.support_ids, dec.support_logprobs
        valid = ids >= 0
        assert vals.dtype == np.float32 and ids.dtype == np.int64
        assert ((ids < lp.shape[1]) & (valid | (ids == -1))).all()
        assert np.isneginf(vals[~valid]).all()
        for row in range(len(ids)):  # unique ids per row
            assert len(set(ids[row][valid[row]])) == valid[row].sum()
        if isinstance(codec, TopK):
            expect = np.sort(np.argsort(-true, axis=1)[:, : codec.k], axis=1)
            np.testing.assert_array_equal(np.sort(ids, axis=1), expect)
        if isinstance(codec, Dense):
            np.testing.assert_array_equal(
                np.sort(ids, axis=1), np.tile(np.arange(lp.shape[1]), (len(ids), 1))
            )
        rows = np.arange(len(ids))[:, None]
        true_s = true[rows, np.where(valid, ids, 0)]
        d = true.max(axis=1, keepdims=True) - true_s
        bound, d_max = precision
        err = np.abs(vals.astype(np.float64) - true_s)
        inside = valid & (d <= d_max)
        assert (err[inside] <= bound(d)[inside]).all(), err[inside].max()
        # Beyond the grid the value is clamped to its last level.
        clamped = valid & (d > d_max + 1e-4)
        top1 = true.max(axis=1, keepdims=True)
        np.testing.assert_allclose(
            (top1 - vals)[clamped], d_max * np.ones(clamped.sum()), rtol=1e-5
        )

    def test_sorted_by_probability_top1_exact(self, codec, precision, data):
        lp, y = data
        dec = codec.decode(encode_np(codec, lp, y))
        vals = dec.support_logprobs
        finite = np.isfinite(vals[:, 1:])
        assert (vals[:, 1:][finite] <= vals[:, :-1][finite]).all()
        assert np.isneginf(vals[:, 1:][~finite]).all() and np.isfinite(vals[:, 0]).all()
        if not isinstance(codec, Sampled):  # a sample may miss the argmax
            np.testing.assert_array_equal(dec.support_ids[:, 0], lp.argmax(dim=1).numpy())
            np.testing.assert_allclose(
                vals[:, 0], exact(lp).max(dim=1).values.numpy(), rtol=0, atol=FLOAT32_NORMALISE
            )

    def test_scalars(self, codec, precision, data):
        lp, y = data
        dec = codec.decode(encode_np(codec, lp, y))
        true = exact(lp)
        np.testing.assert_allclose(
            dec.label_logprob,
            true.gather(1, y[:, None])[:, 0].numpy(),
            rtol=0,
            atol=FLOAT32_NORMALISE,
        )
        in_s = torch.zeros_like(lp, dtype=torch.bool)
        for row, ids in enumerate(dec.support_ids):
            in_s[row, torch.from_numpy(ids[ids >= 0])] = True
        # Tail mass against the float64 mass outside S: float16 log r, relative error 2^-11.
        tail_mass = (true.exp() * ~in_s).sum(dim=1)
        log_tail = torch.log(tail_mass).numpy()
        assert_float16_close(dec.tail_logmass, log_tail)
        # The same against 1 - sum_S p (float32 inputs are normalised to about 1e-7 only).
        np.testing.assert_allclose(
            np.exp(dec.tail_logmass.astype(np.float64)),
            1 - (true.exp() * in_s).sum(dim=1).numpy(),
            rtol=2.0**-11 * np.abs(log_tail[np.isfinite(log_tail)]).max(initial=0),
            atol=2e-6,
        )
        assert dec.tail_logsumexp.shape == (len(y), len(TEMPS))
        for j, tau in enumerate(TEMPS):
            expect = torch.logsumexp((true / tau).masked_fill(in_s, -math.inf), dim=1).numpy()
            assert_float16_close(dec.tail_logsumexp[:, j], expect)
        entropy = -(true.exp() * true).sum(dim=1).numpy()
        np.testing.assert_allclose(dec.entropy, entropy, rtol=2e-3, atol=1e-4)

    def test_concatenation(self, codec, precision, data):
        lp, y = data
        parts = [encode_np(codec, lp[a:b], y[a:b], seed=a) for a, b in ((0, 7), (7, 8), (8, 40))]
        whole = codec.decode({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        pieces = [codec.decode(p) for p in parts]
        for name in (
            "support_ids",
            "support_logprobs",
            "tail_logmass",
            "label_logprob",
            "tail_logsumexp",
            "entropy",
        ):
            np.testing.assert_array_equal(
                getattr(whole, name), np.concatenate([getattr(p, name) for p in pieces])
            )

    def test_blocks_of_rows_change_nothing(self, codec, precision, data, monkeypatch):
        # Codecs read the vocabulary a block of rows at a time; the bytes must not depend on it.
        lp, y = data
        whole = encode_np(codec, lp, y)
        monkeypatch.setattr(_scalars, "CPU_BLOCK_ELEMENTS", 7 * lp.shape[1])  # 7 rows a block
        blocks = encode_np(codec, lp, y)
        assert set(blocks) == set(whole)
        for name in whole:
            np.testing.assert_array_equal(blocks[name], whole[name], err_msg=name)

    def test_json_round_trip(self, codec, precision):
        data = json.loads(json.dumps(codec.to_json()))
        assert codec_from_json(data) == codec
        assert get_codec(data["name"], **data["configuration"]) == codec
        with pytest.raises(FormatVersionError):
            codec_from_json({**data, "version": codec.version + 1})
        with pytest.raises(ConfigError):
            codec_from_json({**data, "configuration": {**data["configuration"], "bogus": 1}})

    def test_large_vocabulary(self, codec, precision):
        # Ids above 65535 must survive: no 16-bit id width anywhere.
        vocab = 70000
        lp = teacher(3, vocab, seed=5, peak=1.0)
        lp[:, vocab - 1] = 12.0  # the two most probable ids, both above 65535
        lp[:, 66000] = 11.5
        lp = torch.log_softmax(lp, dim=1)
        y = torch.tensor([vocab - 1, 66000, 3])
        dec = codec.decode(encode_np(codec, lp, y, temps=()))
        assert (dec.support_ids[:, 0] == vocab - 1).all()
        assert (dec.support_ids == 66000).any(axis=1).all()
        np.testing.assert_allclose(
            dec.label_logprob,
            exact(lp).gather(1, y[:, None])[:, 0].numpy(),
            rtol=0,
            atol=FLOAT32_NORMALISE,
        )

    def test_refuses_bad_inputs(self, codec, precision, data):
        lp, y = data
        with pytest.raises(DataError):
            codec.encode(lp, y + lp.shape[1])
        with pytest.raises(ConfigError):
            codec.encode(lp, y, temperatures=(0.0,))
        for bad in (math.nan, math.inf):
            broken = lp.clone()
            broken[3, 5] = bad
            with pytest.raises(NonFiniteTeacherError):
                codec.encode(broken, y)

    def test_masked_vocabulary_entries(self, codec, precision, data):
        # A token masked to -inf (padding rows of an lm_head) is valid: it is never chosen.
        lp, y = data
        lp = lp.clone()
        lp[:, -3:] = -math.inf
        dec = codec.decode(encode_np(codec, lp, y))
        assert np.isfinite(dec.entropy).all() and np.isfinite(dec.label_logprob).all()
        true = exact(lp)
        plogp = torch.where(true > -math.inf, true.exp() * true, torch.zeros_like(true))
        np.testing.assert_allclose(dec.entropy, -plogp.sum(dim=1).numpy(), rtol=2e-3, atol=1e-4)
        if not isinstance(codec, Dense):
            assert not np.isin(
                dec.support_ids, [lp.shape[1] - 3, lp.shape[1] - 2, lp.shape[1] - 1]
            ).any()

    def test_tail_below_float32_range(self, codec, precision, data):
        # Outside a few ids every log-prob is about -120: each tail term underflows float32
        # (exp(-120) < 1e-45) but the tail's log-mass is still finite and must be stored.
        lp, y = data
        vocab = lp.shape[1]
        logits = torch.full((4, vocab), -120.0)
        logits[:, :2] = torch.tensor([0.0, -1.0])
        logits[1, 500:] = -math.inf  # and one row where part of that tail is exactly zero
        lp = torch.log_softmax(logits.double(), dim=1).float()
        dec = codec.decode(encode_np(codec, lp, y[:4], temps=()))
        in_s = torch.zeros_like(lp, dtype=torch.bool)
        for row, ids in enumerate(dec.support_ids):
            in_s[row, torch.from_numpy(ids[ids >= 0])] = True
        expect = torch.logsumexp(lp.double().masked_fill(in_s, -math.inf), dim=1).numpy()
        if isinstance(codec, Dense):
            assert np.isneginf(dec.tail_logmass).all()
        else:
            assert np.isfinite(dec.tail_logmass).all()
            assert_float16_close(dec.tail_logmass, expect)

    @pytest.mark.gpu
    def test_encodes_on_device(self, codec, precision, data):
        lp, y = data
        enc = codec.encode(
            lp.cuda(),
            y.cuda(),
            temperatures=TEMPS,
            generator=torch.Generator("cuda").manual_seed(0),
        )
        assert all(v.is_cuda for v in enc.values())
        dec_gpu = codec.decode({k: v.cpu().numpy() for k, v in enc.items()})
        if not isinstance(codec, Sampled):  # the same draws need the same generator device
            dec_cpu = codec.decode(encode_np(codec, lp, y))
            np.testing.assert_array_equal(dec_gpu.support_ids, dec_cpu.support_ids)
            np.testing.assert_allclose(
                dec_gpu.support_logprobs, dec_cpu.support_logprobs, atol=1e-5
            )


def test_registry_and_params():
    assert set(CODECS) == {"topk", "sampled", "dense"}
    with pytest.raises(UnknownNameError, match="known: dense, sampled, topk"):
        get_codec("zstd-magic")
    with pytest.raises(UnknownNameError):
        codec_from_json({"name": "nope", "version": 1, "configuration": {}})
    with pytest.raises(ConfigError):
        get_codec("topk", kk=3)
    for bad in ({"k": 0}, {"k": 2.5}, {"values": "q3"}):
        with pytest.raises(ConfigError):
            get_codec("topk", **bad)
    with pytest.raises(ConfigError):
        get_codec("dense", bits=16)
    with pytest.raises(ConfigError):
        get_codec("sampled", n=-1)


def test_hot_ids_fit_and_validation():
    lp = teacher(200, 3000, seed=7, peak=1.0)
    lp[:, 2900:2940] += 6.0  # high ids the teacher ranks high everywhere
    lp = torch.log_softmax(lp, dim=1)
    y = labels_for(lp)
    plain = TopK(k=64, values="q6")
    fitted = plain.fit(lp[:50], size=256)
    # The fitted list starts with the ids most often in the top-k, counted directly.
    counts = np.bincount(lp[:50].topk(64, dim=1).indices.ravel().numpy(), minlength=3000)
    assert counts[fitted.hot_ids[0]] == counts.max()
    assert list(counts[list(fitted.hot_ids)]) == sorted(counts[list(fitted.hot_ids)], reverse=True)
    assert set(range(2900, 2940)) <= set(fitted.hot_ids)
    # Same decoded positions, smaller stored gaps.
    a, b = encode_np(plain, lp, y), encode_np(fitted, lp, y)
    np.testing.assert_array_equal(
        plain.decode(a).support_logprobs, fitted.decode(b).support_logprobs
    )
    assert (
        np.sort(plain.decode(a).support_ids, 1) == np.sort(fitted.decode(b).support_ids, 1)
    ).all()
    gap = lambda f: (f["ids0"].astype(np.int64) + 256 * f["ids1"].astype(np.int64)).sum()  # noqa: E731
    assert gap(b) < 0.8 * gap(a)
    data = json.loads(json.dumps(fitted.to_json()))
    assert codec_from_json(data) == fitted and "hot_ids" not in plain.to_json()["configuration"]
    for bad in ((1, 1), (-1,), ("3",), 5):
        with pytest.raises(ConfigError):
            TopK(hot_ids=bad)
    with pytest.raises(ConfigError):
        TopK(k=4, hot_ids=(3000,)).encode(lp, y)
    assert Sampled(n=5).fit(lp) == Sampled(n=5) and Dense(bits=4).fit(lp) == Dense(bits=4)


def test_k_larger_than_vocabulary():
    lp = teacher(2, 10)
    with pytest.raises(ConfigError, match="exceeds the vocabulary"):
        TopK(k=11).encode(lp, torch.tensor([0, 1]))
    with pytest.raises(ConfigError):
        TopK(k=11).fields(10, 0)


def test_sampled_counts_and_determinism():
    lp = teacher(300, 200, seed=3, peak=1.0)
    y = labels_for(lp)
    codec = Sampled(n=50)
    a = codec.decode(encode_np(codec, lp, y, seed=11))
    b = codec.decode(encode_np(codec, lp, y, seed=11))
    c = codec.decode(encode_np(codec, lp, y, seed=12))
    np.testing.assert_array_equal(a.support_ids, b.support_ids)
    np.testing.assert_array_equal(a.support_counts, b.support_counts)
    assert not np.array_equal(a.support_counts, c.support_counts)
    assert (a.support_counts.sum(axis=1) == 50).all()
    assert ((a.support_counts > 0) == (a.support_ids >= 0)).all()
    # Unbiased: the mean of c_i / n over positions estimates the mean of p_i (id 0 is Zipf-likely).
    p = lp.double().exp().numpy()
    est = np.zeros_like(p)
    rows = np.repeat(np.arange(len(p)), a.support_ids.shape[1])
    keep = a.support_ids.ravel() >= 0
    np.add.at(est, (rows[keep], a.support_ids.ravel()[keep]), a.support_counts.ravel()[keep] / 50)
    stderr = np.sqrt((p * (1 - p)).sum(axis=0) / 50) / len(p)
    assert (np.abs(est.mean(axis=0) - p.mean(axis=0)) <= 5 * stderr + 1e-9).all()


def test_empty_positions():
    lp = teacher(0, 50)
    for codec in (TopK(k=4), Sampled(n=5), Dense(bits=4)):
        dec = codec.decode(encode_np(codec, lp, torch.zeros(0, dtype=torch.int64)))
        assert dec.support_ids.shape[0] == 0 and dec.tail_logsumexp.shape == (0, 2)


@pytest.mark.parametrize("values", ["q8", "q6", "q4"])
def test_every_byte_dequantizes_to_its_level_or_the_last(values):
    """Codes past the grid (a damaged row's) decode at the last level, as the formula says."""
    from logitstore.codecs import _quant

    levels, a = _quant.GRIDS[values]
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    j = np.minimum(codes.astype(np.float64), levels - 1)
    want = -a * np.log1p(-j / (levels - 0.5))  # the grid's levels, written out again
    got = _quant.dequantize(codes, values)
    assert got.dtype == np.float32 and got.shape == codes.shape
    np.testing.assert_allclose(got, want, rtol=1e-6)
