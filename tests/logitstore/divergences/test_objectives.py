"""Dense objectives against direct float64 formulas written independently in numpy.

Spec/divergences.md section 3, items 1-3: values and gradients for random and peaked logits,
finite differences, zero at ``q = p``, and DRKL's zero target-logit gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitstore.divergences import DIVERGENCES, dense_loss

# --- independent reference: one token at a time, plain numpy probabilities ----------------


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * (np.log(a) - np.log(b))))


def ab_div(a: np.ndarray, b: np.ndarray, al: float, be: float) -> float:
    """Cichocki-Amari alpha-beta divergence D_AB(a || b) and its limit cases."""
    if al != 0 and be != 0 and al + be != 0:
        s = al + be
        return float(-np.sum(a**al * b**be - al / s * a**s - be / s * b**s) / (al * be))
    if al != 0 and be == 0:
        return float(np.sum(a**al * np.log(a**al / b**al) - a**al + b**al) / al**2)
    if al == 0 and be != 0:
        return float(np.sum(b**be * np.log(b**be / a**be) - b**be + a**be) / be**2)
    if al != 0:
        return float(np.sum(np.log(b**al / a**al) + (b**al / a**al) ** -1 - 1) / al**2)
    return float(0.5 * np.sum((np.log(a) - np.log(b)) ** 2))


def bin_kl(a: float, b: float) -> float:
    return a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))


def non_target(x: np.ndarray, y: int) -> np.ndarray:
    return np.delete(x, y) / (1 - x[y])


def ref_value(name: str, q: np.ndarray, p: np.ndarray, y: int, prm: dict, q0=None) -> float:
    """Value at student ``q``; ``q0`` is the point where detached parts are frozen."""
    q0 = q if q0 is None else q0
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        b = prm.get("beta", 0.5)
        if b == 0:
            return kl(p, q)
        if b == 1:
            return kl(q, p)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "tvd":
        return float(0.5 * np.abs(p - q).sum())
    if name == "skl":
        a = prm.get("alpha", 0.1)
        return kl(p, a * p + (1 - a) * q)
    if name == "srkl":
        a = prm.get("alpha", 0.1)
        return kl(q, (1 - a) * p + a * q)
    if name == "akl":
        mu = prm.get("mu", 0.5)
        head, cum = [], 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            if cum >= mu:
                break
            head.append(i)
            cum += p[i]
        gap = np.abs(p - q0)
        gh = gap[head].sum()
        gt = gap.sum() - gh
        w = gh / (gh + gt) if gh + gt > 0 else 0.5
        return w * kl(p, q) + (1 - w) * kl(q, p)
    if name == "abkd":
        return ab_div(p, q, prm.get("alpha", 0.2), prm.get("beta", 0.7))
    if name == "taid":
        t = prm.get("t", 0.4)
        pt = p**t * q0 ** (1 - t)
        return kl(pt / pt.sum(), q)
    if name == "amid":
        a, lam = prm.get("alpha", 0.5), prm.get("lam", 0.5)
        if a == 1:
            r = p**lam * q ** (1 - lam)
        else:
            c = (1 - a) / 2
            r = (lam * p**c + (1 - lam) * q**c) ** (1 / c)
        r = r / r.sum()
        first, second = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[
            prm.get("order", "pr")
        ]
        if prm.get("divergence", "kl") == "kl":
            return kl(first, second)
        return ab_div(first, second, prm.get("ab_alpha", 0.2), prm.get("ab_beta", 0.7))
    if name == "dkd":
        al, be = prm.get("alpha", 1.0), prm.get("beta", 0.5)
        return al * bin_kl(p[y], q[y]) + be * kl(non_target(p, y), non_target(q, y))
    if name == "drkl":
        t = int(np.argmax(p)) if prm.get("target") == "teacher_argmax" else y
        g = prm.get("gamma", 0.5)
        return bin_kl(q[t], p[t]) + g * kl(non_target(q, t), non_target(p, t))
    raise AssertionError(name)


CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skl", {}),
    ("srkl", {"alpha": 0.3}),
    ("akl", {}),
    ("akl", {"mu": 0.9}),
    ("abkd", {}),
    ("abkd", {"alpha": 1.0, "beta": 0.0}),
    ("abkd", {"alpha": 0.0, "beta": 1.0}),
    ("abkd", {"alpha": 0.6, "beta": 0.0}),
    ("abkd", {"alpha": 0.0, "beta": 0.4}),
    ("abkd", {"alpha": 0.5, "beta": -0.5}),
    ("abkd", {"alpha": 0.0, "beta": 0.0}),
    ("abkd", {"alpha": -0.3, "beta": 0.8}),
    ("taid", {}),
    ("taid", {"t": 0.9}),
    ("amid", {}),
    ("amid", {"alpha": 1.0}),
    ("amid", {"alpha": -1.0, "order": "qr"}),
    ("amid", {"alpha": 3.0, "lam": 0.3, "order": "rp"}),
    ("amid", {"order": "rq", "divergence": "ab"}),
    ("dkd", {}),
    ("dkd", {"alpha": 0.3, "beta": 2.0}),
    ("drkl", {}),
    ("drkl", {"target": "teacher_argmax", "gamma": 2.0}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in CASES]
N, V = 3, 7


def make_logits(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    u = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    if kind == "peaked":
        u[torch.arange(N), torch.randint(0, V, (N,), generator=g)] += 14.0
        z[torch.arange(N), torch.randint(0, V, (N,), generator=g)] += 4.0
        assert (torch.softmax(u, -1).amax(-1) > 0.99).all()
    labels = torch.randint(0, V, (N,), generator=g)
    return z, u, labels


def ref_total(name, prm, z: np.ndarray, u: np.ndarray, labels, tau: float, z0=None) -> float:
    z0 = z if z0 is None else z0
    return sum(
        ref_value(
            name, softmax(z[i] / tau), softmax(u[i] / tau), int(labels[i]), prm,
            q0=softmax(z0[i] / tau),
        )
        for i in range(N)
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize(("name", "prm"), CASES, ids=IDS)
def test_dense_matches_direct_formula_values_and_gradients(name, prm, kind):
    tau = 1.0 if kind == "peaked" else 1.7
    z, u, labels = make_logits(kind, seed=len(name) + len(prm))
    teacher_lp = torch.log_softmax(u, -1)
    zz = z.clone().requires_grad_(True)
    got = dense_loss(name, zz, teacher_lp, labels, temperature=tau, **prm)
    zn, un = z.numpy(), u.numpy()
    want = [
        ref_value(name, softmax(zn[i] / tau), softmax(un[i] / tau), int(labels[i]), prm)
        for i in range(N)
    ]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-12)

    # Gradient against central differences of the reference (detached parts frozen at z).
    got.sum().backward()
    h = 1e-6
    fd = np.zeros_like(zn)
    for i in range(N):
        for j in range(V):
            zp, zm = zn.copy(), zn.copy()
            zp[i, j] += h
            zm[i, j] -= h
            fp = ref_total(name, prm, zp, un, labels, tau, z0=zn)
            fm = ref_total(name, prm, zm, un, labels, tau, z0=zn)
            fd[i, j] = (fp - fm) / (2 * h)
    np.testing.assert_allclose(zz.grad.numpy(), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("name", "prm"), CASES, ids=IDS)
def test_zero_loss_and_gradient_when_student_equals_teacher(name, prm):
    _, u, labels = make_logits("random", seed=3)
    lp = torch.log_softmax(u, -1)
    z = lp.clone().requires_grad_(True)
    loss = dense_loss(name, z, lp, labels, **prm)
    loss.sum().backward()
    assert loss.abs().max() < 1e-12
    assert z.grad.abs().max() < 1e-10


def test_autograd_gradcheck_every_default_objective():
    z, u, labels = make_logits("random", seed=11)
    lp = torch.log_softmax(u, -1)
    for name in DIVERGENCES:
        if name in ("akl", "taid"):  # detached parts: checked against frozen FD above
            continue
        z0 = z.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, n=name: dense_loss(n, x, lp, labels), (z0,))


def _drkl_scene():
    """A teacher and a student with q_y = p_y exactly but a permuted non-target part."""
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(1, 6, generator=g, dtype=torch.float64) * 2, -1)
    y = 2
    q = p.clone()
    others = [0, 1, 3, 4, 5]
    q[0, others] = p[0, others[::-1]]
    assert torch.isclose(q[0, y], p[0, y]) and not torch.allclose(q, p)
    return p, q, torch.tensor([y])


def test_drkl_target_gradient_is_zero_where_rkl_pushes_the_target_up():
    p, q, labels = _drkl_scene()
    y = int(labels[0])
    grads = {}
    for name in ("rkl", "drkl"):
        z = q.log().clone().requires_grad_(True)
        dense_loss(name, z, p.log(), labels).sum().backward()
        grads[name] = z.grad[0, y].item()
    q_hat = np.delete(q[0].numpy(), y) / (1 - q[0, y].item())
    p_hat = np.delete(p[0].numpy(), y) / (1 - p[0, y].item())
    qy = q[0, y].item()
    # Spec 2.9: RKL's extra target-logit term is -q_y (1 - q_y) KL(q̂ || p̂) < 0.
    assert grads["rkl"] < -1e-3
    assert grads["rkl"] == pytest.approx(-qy * (1 - qy) * kl(q_hat, p_hat), rel=1e-9)
    assert abs(grads["drkl"]) < 1e-12


def test_rkl_decomposes_into_binary_and_weighted_non_target_terms():
    z, u, labels = make_logits("random", seed=8)
    lp = torch.log_softmax(u, -1)
    rkl = dense_loss("rkl", z, lp, labels)
    qy = torch.softmax(z, -1)[torch.arange(N), labels]
    for i in range(N):  # DRKL with gamma = 1 - q_y recovers RKL (the exact identity)
        one = dense_loss(
            "drkl", z[i : i + 1], lp[i : i + 1], labels[i : i + 1], gamma=float(1 - qy[i])
        )
        assert one.item() == pytest.approx(rkl[i].item(), rel=1e-10)


def test_ab_limits_are_continuous_and_match_kl():
    z, u, labels = make_logits("random", seed=9)
    lp = torch.log_softmax(u, -1)
    fkl = dense_loss("fkl", z, lp, labels)
    rkl = dense_loss("rkl", z, lp, labels)
    torch.testing.assert_close(dense_loss("abkd", z, lp, labels, alpha=1.0, beta=0.0), fkl)
    torch.testing.assert_close(dense_loss("abkd", z, lp, labels, alpha=0.0, beta=1.0), rkl)
    for al, be in [(0.6, 0.0), (0.0, 0.4), (0.5, -0.5), (0.0, 0.0)]:
        exact = dense_loss("abkd", z, lp, labels, alpha=al, beta=be)
        near = dense_loss("abkd", z, lp, labels, alpha=al + 1e-7, beta=be + 2e-7)
        torch.testing.assert_close(near, exact, rtol=1e-5, atol=1e-8)


def test_tau_squared_scales_and_float32_output_for_low_precision_inputs():
    z, u, labels = make_logits("random", seed=2)
    lp = torch.log_softmax(u, -1)
    plain = dense_loss("fkl", z, lp, labels, temperature=2.0)
    scaled = dense_loss("fkl", z, lp, labels, temperature=2.0, tau_squared=True)
    torch.testing.assert_close(scaled, 4.0 * plain)
    low = dense_loss("rkl", z.bfloat16(), lp.bfloat16(), labels)
    assert low.dtype == torch.float32
    ref = dense_loss("rkl", z.bfloat16().double(), lp.bfloat16().double(), labels)
    torch.testing.assert_close(low.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["drkl", "dkd"])
def test_decoupled_objectives_of_a_teacher_whose_target_rounds_to_one(name):
    """float32 log-softmax gives log p_y = 0 exactly when the rest of the mass is 5e-12, yet
    keeps the other tokens' log-probs: the non-target part comes from those, as in float64."""
    u = np.array([-26.1, 0.0, -30.0])
    p64 = softmax(u)  # 1 - p_y = 5.5e-12, exactly representable as the others' sum
    lp32 = torch.log_softmax(torch.tensor(u, dtype=torch.float32)[None], -1)
    assert lp32[0, 1] == 0.0  # p_y rounded to 1
    z = np.array([-0.57, 4.42, 1.3])
    q = softmax(z)
    y = 1
    if name == "drkl":
        want = bin_kl(q[y], p64[y]) + 0.5 * kl(non_target(q, y), non_target(p64, y))
    else:
        want = bin_kl(p64[y], q[y]) + 0.5 * kl(non_target(p64, y), non_target(q, y))
    got = dense_loss(name, torch.tensor(z, dtype=torch.float32)[None], lp32, torch.tensor([y]))
    assert float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("params", ["gamma=0.5", [("gamma", 0.5)], 5])
def test_create_refuses_params_that_are_no_mapping_in_one_line(params):
    # A string of KEY=VALUE (as the command line takes it) raised ValueError from dict().
    from logitstore.divergences import DistillationLoss
    from logitstore.errors import ConfigError

    with pytest.raises(ConfigError, match="params must be a mapping"):
        DistillationLoss.create("drkl", params)
    assert DistillationLoss.create("drkl", {"gamma": 0.5}).params["gamma"] == 0.5
