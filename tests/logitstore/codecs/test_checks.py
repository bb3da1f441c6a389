"""Value checks on decoded positions (``codecs/_checks.py``): every store our encoders write
passes, whatever its distributions; each forbidden value is refused at its row and field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitstore.codecs import Dense, Sampled, TopK, _ids
from logitstore.codecs._checks import check_positions, mass_columns, support_mass
from logitstore.errors import BadValueError, CorruptShardError

V = 300
CODECS = [
    TopK(k=16, values="q8"),
    TopK(k=40, values="q6"),
    TopK(k=64, values="q4"),
    TopK(k=16, values="q4", hot_ids=(299, 5, 100, *range(250, 200, -7))),
    TopK(k=32, values="float32"),
    TopK(k=32, values="float16"),
    TopK(k=64, values="bfloat16"),
    Sampled(n=50),
    Dense(bits=8),
    Dense(bits=4),
]


def distributions() -> torch.Tensor:
    """Rows chosen to push decoded mass towards 1: flat, nearly flat, peaked, masked, steps
    just below quantization midpoints, and tails too small for float32."""
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.zeros(4, V),  # flat: every entry rounds at the same level
        0.05 * torch.randn(8, V, generator=g),
        3.0 * torch.randn(8, V, generator=g),
        torch.linspace(0, -30, V).expand(2, V),
        -torch.arange(V, dtype=torch.float32).expand(2, V) * 0.137,  # steps across levels
    ]
    masked = torch.randn(4, V, generator=g)
    masked[:, 10:] = -math.inf  # fewer finite tokens than k
    rows.append(masked)
    tiny = torch.full((2, V), -120.0)
    tiny[:, :3] = torch.tensor([0.0, -0.5, -1.0])
    rows.append(tiny)
    return torch.log_softmax(torch.cat(rows).double(), dim=1).float()


@pytest.fixture(scope="module")
def lp():
    return distributions()


def decode(codec, lp, temps=(2.0,)):
    y = torch.arange(lp.shape[0]) % V
    gen = torch.Generator().manual_seed(3)
    fields = {
        k: v.numpy() for k, v in codec.encode(lp, y, temperatures=temps, generator=gen).items()
    }
    return codec.decode(fields)


@pytest.mark.parametrize("codec", CODECS, ids=repr)
@pytest.mark.parametrize("exhaustive", [False, True])
def test_what_the_encoders_write_passes(codec, lp, exhaustive):
    pos = decode(codec, lp)
    check_positions(codec, pos, V, exhaustive=exhaustive)
    y = torch.arange(lp.shape[0]) % V
    gen = torch.Generator().manual_seed(3)
    fields = codec.encode(lp, y, temperatures=(2.0,), generator=gen)
    codec.decode({k: v.numpy() for k, v in fields.items()}, vocab_size=V)  # checks as it decodes
    # The least mass is a lower bound of the true mass (float64 over the decoded support).
    true = torch.log_softmax(lp.double(), 1).exp().numpy()
    rows = np.arange(len(pos))[:, None]
    ids = pos.support_ids
    stored = np.where(ids >= 0, true[rows, np.maximum(ids, 0)], 0).sum(axis=1)
    assert (support_mass(codec, pos, exhaustive=True) <= stored * (1 + 1e-5) + 1e-6).all()


def test_the_cheap_mass_bound_is_below_the_exact_one():
    cols, weights = mass_columns(64, exhaustive=False)
    assert cols.tolist() == [0, 3, 15, 63] and weights.tolist() == [1, 3, 12, 48]
    assert mass_columns(5, False)[0].tolist() == [0, 3, 4]
    assert mass_columns(5, False)[1].tolist() == [1, 3, 1]
    lp = np.sort(np.log(np.random.default_rng(0).dirichlet(np.ones(64), 50)), axis=1)[:, ::-1]
    from logitstore.codecs.base import Positions

    zeros = np.zeros(50, np.float32)
    pos = Positions(np.zeros((50, 64), np.int64), lp.astype(np.float32), zeros - np.inf, zeros,
                    np.zeros((50, 0), np.float32), zeros)  # fmt: skip
    codec = TopK(k=64, values="float32")
    cheap, exact = support_mass(codec, pos), support_mass(codec, pos, exhaustive=True)
    assert (cheap <= exact + 1e-6).all() and (exact - 1 < 1e-5).all()
    # Each segment's mass is at most its length times its first entry, which is at most the
    # last entry of the segment before: the bound loses at most a factor 4 beyond the first.
    first = np.exp(lp[:, 0])
    assert (cheap - first >= (exact - first) / 4 - first - 1e-6).all()


def _spoil(pos, field, row, value, col=0):
    arr = getattr(pos, field)
    if arr.ndim == 1:
        arr[row] = value
    else:
        arr[row, col] = value


SPOILED = [
    ("support_ids", V, "support_ids"),
    ("support_ids", 10**9, "support_ids"),
    ("support_logprobs", math.nan, "support_logprobs"),
    ("support_logprobs", 0.5, "support_logprobs"),
    ("support_logprobs", math.inf, "support_logprobs"),
    ("label_logprob", math.nan, "label_logprob"),
    ("label_logprob", 0.01, "label_logprob"),
    ("tail_logmass", math.nan, "tail_logmass"),
    ("tail_logmass", 0.2, "tail_logmass"),
    ("tail_logsumexp", math.nan, "tail_logsumexp"),
    ("tail_logsumexp", math.inf, "tail_logsumexp"),
    ("entropy", math.nan, "entropy"),
    ("entropy", -1.0, "entropy"),
]


@pytest.mark.parametrize("codec", [CODECS[0], CODECS[4], CODECS[7]], ids=repr)
@pytest.mark.parametrize(("field", "value", "named"), SPOILED)
def test_each_forbidden_value_is_refused_at_its_row(codec, lp, field, value, named):
    pos = decode(codec, lp)
    _spoil(pos, field, 17, value)
    _spoil(pos, field, 25, value)  # only the first bad row is reported
    with pytest.raises(BadValueError) as info:
        check_positions(codec, pos, V)
    assert isinstance(info.value, CorruptShardError)
    assert (info.value.row, info.value.field) == (17, named)
    assert str(info.value).startswith(f"{named}: expected")


@pytest.mark.parametrize("codec", CODECS, ids=repr)
def test_support_mass_above_one_is_refused(codec, lp):
    pos = decode(codec, lp)
    # A tail that claims all the mass besides a support that holds some.
    pos.tail_logmass[5] = 0.0
    with pytest.raises(BadValueError, match="support and tail mass: expected a total of at most 1"):
        check_positions(codec, pos, V)
    pos = decode(codec, lp)
    # Every support entry as probable as the top-1: mass k times the top-1's.
    pos.support_logprobs[9, : min(16, pos.support_logprobs.shape[1])] = math.log(0.3)
    pos.tail_logmass[9] = -math.inf
    with pytest.raises(BadValueError) as info:
        check_positions(codec, pos, V)
    assert (info.value.row, info.value.field) == (9, "support and tail mass")


@pytest.mark.parametrize("codec", [CODECS[0], CODECS[4], CODECS[7]], ids=repr)
def test_a_token_id_repeated_in_a_support_is_refused_by_verify(codec, lp):
    # Two buckets of one token count its mass twice; verify's checks passed such a store, and
    # training refused it only at the batch that held it.
    pos = decode(codec, lp)
    check_positions(codec, pos, V, exhaustive=True)
    row = pos.support_ids[20]
    row[2] = row[0]
    pos.support_ids[25, 3] = pos.support_ids[25, 1]
    with pytest.raises(BadValueError) as info:
        check_positions(codec, pos, V, exhaustive=True)
    assert (info.value.row, info.value.field) == (20, "support_ids")
    expected = f"distinct token ids in a position's support, found id {row[0]} 2 times"
    assert str(info.value).endswith(expected)


def test_sampled_counts_must_add_up_to_the_draws(lp):
    codec = Sampled(n=50)
    pos = decode(codec, lp)
    pos.support_counts[3, 0] += 1
    with pytest.raises(BadValueError, match="draw counts summing to 50, found a sum of 51"):
        check_positions(codec, pos, V)


def test_hot_inverse_never_builds_a_table_from_stored_ids():
    hot = (7, 2, 9)
    stored = np.array([[0, 1, 2, 3, 4, 5, 6, 10, 2**40, -1]])
    expect = [7, 2, 9, 0, 1, 3, 4, 10, 2**40, -1]  # above every hot id: stored as itself
    assert _ids.hot_inverse(hot, stored).tolist() == [expect]
    sparse = (2**23, 5, 3)  # a list far sparser than its largest id: no table at all
    stored = np.array([0, 1, 2, 3, 4, 5, 6, 2**23 - 1, 2**23, 2**23 + 1, -1])
    fwd = _ids.hot_forward(sparse, 2**23 + 2, torch.device("cpu")).numpy()
    inv = np.empty_like(fwd)
    inv[fwd] = np.arange(len(fwd))  # the forward map inverted by brute force
    assert _ids.hot_inverse(sparse, stored[:-1]).tolist() == inv[stored[:-1]].tolist()
    assert _ids.hot_inverse(sparse, stored)[-1] == -1


@pytest.mark.parametrize("values", ["q8", "float16"])
def test_topk_refuses_ids_beyond_the_vocabulary_while_decoding(lp, values):
    codec = TopK(k=8, values=values, hot_ids=(3, 1))
    y = torch.zeros(lp.shape[0], dtype=torch.int64)
    fields = {k: v.numpy() for k, v in codec.encode(lp, y).items()}
    codec.decode(fields, vocab_size=V)  # what the encoder wrote passes
    fields["ids1"] = np.zeros((lp.shape[0], 8), np.uint8)  # V = 300 has two planes
    fields["ids1"][11, 5] = 1  # one gap grows by 256
    ids = codec.decode(fields).support_ids
    assert ids[11].max() >= V and (ids[:11] < V).all()
    with pytest.raises(
        BadValueError, match=r"support_ids: expected token ids in \[0, 300\)"
    ) as info:
        codec.decode(fields, vocab_size=V)
    assert (info.value.row, info.value.field) == (11, "support_ids")
