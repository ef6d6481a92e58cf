"""SPEC §2 error-feedback rules: commopt.simulate against the NumPy reference, and the exact checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from reference import simulate as ref_simulate
from reference import topk_mask

from commopt.compressors import RandK, ScaledRandK, TopK
from commopt.feedback import EF14, EF21, EF21SGDM, EControl, Feedback, NoFeedback, make_feedback
from commopt.simulate import simulate

pytestmark = pytest.mark.timeout(120)

F64 = torch.float64


class Quadratics:
    """Heterogeneous quadratics f_i(x) = ½ xᵀA_i x − b_iᵀx, A_i SPD with different scales (L_i = λmax(A_i))."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.A, self.b = [], []
        for i in range(n):
            m = rng.standard_normal((d, d))
            scale = 0.3 + 1.7 * (i + 1) / n
            self.A.append(scale * (m @ m.T / d + 0.1 * np.eye(d)))
            self.b.append(rng.standard_normal(d) * (1 + i))
        self.L = np.array([np.linalg.eigvalsh(a).max() for a in self.A])
        self.x0 = rng.standard_normal(d)

    def np_grads(self):
        return [(lambda x, a=a, b=b: a @ x - b) for a, b in zip(self.A, self.b)]

    def torch_grads(self):
        return [(lambda x, a=torch.from_numpy(a), b=torch.from_numpy(b): a @ x - b) for a, b in zip(self.A, self.b)]

    def lr(self) -> float:
        return 0.2 / float(self.L.max())


def _rule(name: str, density: float) -> tuple[Feedback, dict]:
    """commopt rule and the reference's keyword arguments."""
    if name == "none":
        return NoFeedback(), {}
    if name == "ef14":
        return EF14(), {}
    if name == "ef21":
        return EF21(), {}
    if name == "ef21sgdm":
        return EF21SGDM(beta=0.3), {"beta": 0.3}
    if name == "econtrol":
        return EControl(eta=density), {"eta": density}
    raise ValueError(name)


def _max_rel(a: list[torch.Tensor], b: list[np.ndarray]) -> float:
    assert len(a) == len(b)
    scale = max(1.0, max(float(np.abs(y).max()) for y in b))
    return max(float(np.abs(x.numpy() - y).max()) for x, y in zip(a, b)) / scale


RULES = ["none", "ef14", "ef21", "ef21sgdm", "econtrol"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("comp_name", ["topk", "randk"])
@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_simulate_matches_reference(rule, comp_name, n, warmup):
    d, k, steps, key = 20, 4, 50, 3
    q = Quadratics(n, d, seed=10 * n + warmup)
    fb, kw = _rule(rule, k / d)
    comp = TopK(k=k) if comp_name == "topk" else RandK(k=k, seed=17)
    ours = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), steps, comp, fb, warmup=warmup, key=key)

    def rand_index(step: int) -> np.ndarray:
        return comp.select(torch.zeros(d, dtype=F64), k, step, key).numpy()

    ref = ref_simulate(q.np_grads(), q.x0, q.lr(), steps, rule, k, compressor=comp_name, warmup=warmup,
                       rand_index=rand_index if comp_name == "randk" else None, **kw)
    assert len(ours) == steps + 1
    assert all(x.dtype == F64 for x in ours)
    assert _max_rel(ours, ref) <= 1e-12
    # the run did something: compression moved the iterate away from x0
    assert float((ours[-1] - ours[0]).abs().max()) > 1e-3


def test_simulate_accepts_strings_and_checks_args():
    q = Quadratics(3, 10)
    a = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 20, "topk:0.2", "econtrol:0.2", warmup=1)
    b = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 20, TopK(ratio=0.2), EControl(0.2), warmup=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 20, "topk:0.2", None)
    d = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 20, "topk:0.2", "none")
    assert all(torch.equal(x, y) for x, y in zip(c, d))
    with pytest.raises(ValueError):
        simulate([], torch.zeros(3, dtype=F64), 0.1, 5, "topk:0.5", "ef21")
    with pytest.raises(ValueError):
        simulate(q.torch_grads(), torch.from_numpy(q.x0), 0.1, -1, "topk:0.5", "ef21")


def test_simulate_dense_compressor_is_gradient_descent():
    """Identity compressor: every rule reduces to plain GD on the mean (EF21/EControl after a dense start)."""
    q = Quadratics(3, 8, seed=1)
    gd = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 30, "none", "none")
    for fb in ("ef14", "ef21", "econtrol", "ef21sgdm:1.0"):
        xs = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 30, "none", fb, warmup=1)
        assert max(float((x - y).abs().max()) for x, y in zip(xs, gd)) <= 1e-12


def test_simulate_randk_key_matters():
    q = Quadratics(2, 30, seed=2)
    a = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 10, RandK(k=3), "ef21", warmup=1, key=0)
    b = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 10, RandK(k=3), "ef21", warmup=1, key=1)
    assert not torch.equal(a[-1], b[-1])


# --- exact checks of SPEC §2 ------------------------------------------------------------------------

@pytest.mark.parametrize("comp", [TopK(ratio=0.1), RandK(ratio=0.1, seed=3)])
@pytest.mark.parametrize("n", [1, 4])
def test_econtrol_eta0_is_ef21(comp, n):
    """EControl with η = 0 and the uncompressed start is EF21, iterate for iterate (bitwise)."""
    q = Quadratics(n, 30, seed=5)
    ef21 = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 200, comp, EF21(), warmup=1)
    ec = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 200, comp, EControl(eta=0.0), warmup=1)
    assert all(torch.equal(x, y) for x, y in zip(ef21, ec))


@pytest.mark.parametrize("comp", [TopK(ratio=0.15), RandK(ratio=0.15, seed=8)])
@pytest.mark.parametrize("n", [1, 3])
def test_econtrol_frozen_h_eta1_is_ef14(comp, n):
    """With h_i and h held at 0 and η = 1, EControl's direction h_old + mean m = mean C(e_i + g_i) with
    e_i ← e_i + g_i − m_i: EF14. Driven through the pure rule functions by hand."""
    q = Quadratics(n, 20, seed=6)
    grads = q.torch_grads()
    fb = EControl(eta=1.0)
    d = 20
    k = comp.num_selected(d)
    x = torch.from_numpy(q.x0).clone()
    e = [torch.zeros(d, dtype=F64) for _ in range(n)]
    xs = [x.clone()]
    for t in range(60):
        states = [{"e": e[i], "h_i": torch.zeros(d, dtype=F64), "h": torch.zeros(d, dtype=F64)} for i in range(n)]
        gs = [f(x) for f in grads]
        prep, msgs = [], []
        for i in range(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # η = 1 > 2·density: the warning is expected here
                p, pending = fb.prepare(states[i], gs[i], k / d)
            idx = comp.select(p, k, t, 0)
            vals = comp.values(p, idx)
            prep.append((p, pending, idx, vals))
            msgs.append(torch.zeros(d, dtype=F64).index_put_((idx,), vals))
        mean = msgs[0].clone()
        for m in msgs[1:]:
            mean = mean + m
        mean = mean / n
        direction = None
        for i in range(n):
            p, pending, idx, vals = prep[i]
            new = fb.update(states[i], gs[i], p, pending, idx, vals, mean)
            e[i] = new["e"]
            direction = fb.estimate(new, mean)
        x = x - q.lr() * direction
        xs.append(x.clone())
    ef14 = simulate(grads, torch.from_numpy(q.x0), q.lr(), 60, comp, EF14(), warmup=0)
    assert all(torch.equal(a, b) for a, b in zip(xs, ef14))


@pytest.mark.parametrize("comp", [TopK(ratio=0.1), RandK(ratio=0.1, seed=9)])
@pytest.mark.parametrize("lr_scale", [1.0, 0.37])
def test_ef14_gradient_units_equal_parameter_units(comp, lr_scale):
    """Classic parameter-unit EF14: p_i = e_i + γg_i, Δ_i = C(p_i), e_i ← p_i − Δ_i, x ← x − mean Δ_i.
    At constant γ its e is γ times ours, and the iterates agree (up to rounding: 1e-12 relative)."""
    n, d, steps = 3, 30, 100
    q = Quadratics(n, d, seed=7)
    lr = q.lr() * lr_scale
    k = comp.num_selected(d)
    x = torch.from_numpy(q.x0).clone()
    e = [torch.zeros(d, dtype=F64) for _ in range(n)]
    xs = [x.clone()]
    for t in range(steps):
        deltas = []
        for i, f in enumerate(q.torch_grads()):
            p = e[i] + lr * f(x)
            idx = comp.select(p, k, t, 0)
            delta = torch.zeros(d, dtype=F64).index_put_((idx,), comp.values(p, idx))
            e[i] = p - delta
            deltas.append(delta)
        x = x - sum(deltas[1:], deltas[0].clone()) / n
        xs.append(x.clone())
    ours = simulate(q.torch_grads(), torch.from_numpy(q.x0), lr, steps, comp, EF14())
    scale = max(float(v.abs().max()) for v in xs)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, xs)) <= 1e-12 * scale


@pytest.mark.parametrize("comp_name", ["topk", "randk"])
def test_ef21w_equals_ef21(comp_name):
    """EF21-W (Richtárik et al. 2024, weights w_i = L_i/ΣL_j): client state G_i, message
    c_i = C(∇f_i(x)/(n w_i) − G_i), G_i ← G_i + c_i, server G = Σ_i w_i G_i, x ← x − γG, started from
    G_i = ∇f_i(x⁰)/(n w_i). C is positively homogeneous for TopK and unscaled RandK, so
    G_i = (EF21's w_i)/(n w_i) and G = mean w_i = EF21's w: the same iterates (weights only license a
    larger γ). Written in NumPy, independently of commopt."""
    n, d, steps = 4, 25, 150
    q = Quadratics(n, d, seed=8)
    assert q.L.max() / q.L.min() > 2  # genuinely different weights
    wts = q.L / q.L.sum()
    k, lr, key = 3, q.lr(), 0
    comp = TopK(k=k) if comp_name == "topk" else RandK(k=k, seed=4)

    def mask_for(v: np.ndarray, t: int) -> np.ndarray:
        if comp_name == "topk":
            return topk_mask(v, k)
        m = np.zeros(d, dtype=bool)
        m[comp.select(torch.zeros(d, dtype=F64), k, t, key).numpy()] = True
        return m

    grads = q.np_grads()
    x = q.x0.copy()
    xs = [x.copy()]
    G_i = [g(x) / (n * w) for g, w in zip(grads, wts)]  # uncompressed start (the dense round)
    G = sum(w * gi for w, gi in zip(wts, G_i))
    x = x - lr * G
    xs.append(x.copy())
    for t in range(1, steps):
        for i, (g, w) in enumerate(zip(grads, wts)):
            v = g(x) / (n * w) - G_i[i]
            G_i[i] = G_i[i] + np.where(mask_for(v, t), v, 0.0)
        G = sum(w * gi for w, gi in zip(wts, G_i))
        x = x - lr * G
        xs.append(x.copy())
    ours = simulate(q.torch_grads(), torch.from_numpy(q.x0), lr, steps, comp, EF21(), warmup=1, key=key)
    assert _max_rel(ours, xs) <= 1e-11
    assert float(np.abs(xs[-1] - xs[0]).max()) > 1e-2


# --- refusing non-contractive compressors ---------------------------------------------------------------

@pytest.mark.parametrize("fb", [EF14(), EF21(), EF21SGDM(), EControl(), EControl(0.1)])
def test_scaled_randk_refused_by_error_feedback(fb):
    with pytest.raises(ValueError, match="not contractive"):
        fb.check_compressor(ScaledRandK(ratio=0.1))
    with pytest.raises(ValueError):
        simulate([lambda x: x], torch.ones(10, dtype=F64), 0.1, 3, ScaledRandK(ratio=0.1), fb, warmup=1)
    fb.check_compressor(RandK(ratio=0.1))
    fb.check_compressor(TopK(ratio=0.1))


def test_scaled_randk_accepted_without_feedback():
    NoFeedback().check_compressor(ScaledRandK(ratio=0.1))
    q = Quadratics(2, 10, seed=3)
    xs = simulate(q.torch_grads(), torch.from_numpy(q.x0), 0.01, 20, ScaledRandK(k=5, seed=1), "none")
    assert all(bool(torch.isfinite(x).all()) for x in xs)


def test_ef21_with_scaled_randk_would_diverge():
    """Why it is refused (SPEC §1): EF21's tracking error u = g − w_i evolves as u ← u − C(u); with
    ScaledRandK the chosen coordinates get the gain 1 − d/k, so for a fixed gradient u blows up."""
    d, k = 10, 1
    g = torch.ones(d, dtype=F64)
    comp = ScaledRandK(k=k, seed=0)
    state = {"w_i": torch.zeros(d, dtype=F64), "w": torch.zeros(d, dtype=F64)}
    fb = EF21()
    for t in range(200):
        p, pending = fb.prepare(state, g)
        idx = comp.select(p, k, t, 0)
        vals = comp.values(p, idx)
        assert float(vals[0]) == pytest.approx((d / k) * float(p[idx[0]]))
        state = fb.update(state, g, p, pending, idx, vals, torch.zeros(d, dtype=F64))
    assert float((g - state["w_i"]).abs().max()) > 1e6  # |1 − d/k| = 9 per hit


# --- constructors and the registry -------------------------------------------------------------------------

@pytest.mark.parametrize("spec,cls,attrs", [
    ("none", NoFeedback, {}),
    ("ef14", EF14, {}),
    ("ef", EF14, {}),
    ("EF21", EF21, {}),
    ("ef21sgdm", EF21SGDM, {"beta": 0.1}),
    ("ef21-sgdm:0.25", EF21SGDM, {"beta": 0.25}),
    ("ef21sgdm:1", EF21SGDM, {"beta": 1.0}),
    ("econtrol", EControl, {"eta": None}),
    ("econtrol:0.05", EControl, {"eta": 0.05}),
    ("econtrol:0", EControl, {"eta": 0.0}),
    ("econtrol:1", EControl, {"eta": 1.0}),
])
def test_make_feedback(spec, cls, attrs):
    fb = make_feedback(spec)
    assert type(fb) is cls
    for k, v in attrs.items():
        assert getattr(fb, k) == v


def test_make_feedback_none_and_instance():
    assert type(make_feedback(None)) is NoFeedback
    fb = EControl(0.3)
    assert make_feedback(fb) is fb


@pytest.mark.parametrize("spec", ["foo", "ef22", "ef21:0.1", "ef14:1", "none:0", "econtrol:abc", "econtrol:2",
                                  "econtrol:-0.1", "econtrol:nan", "ef21sgdm:0", "ef21sgdm:1.5", "ef21sgdm:-1"])
def test_make_feedback_errors(spec):
    with pytest.raises(ValueError):
        make_feedback(spec)


@pytest.mark.parametrize("bad", [3, 0.1, ["ef21"]])
def test_make_feedback_type_error(bad):
    with pytest.raises(TypeError):
        make_feedback(bad)


@pytest.mark.parametrize("beta", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.1", None])
def test_ef21sgdm_beta_range(beta):
    with pytest.raises(ValueError):
        EF21SGDM(beta)


@pytest.mark.parametrize("beta", [1e-6, 0.1, 1, 1.0])
def test_ef21sgdm_beta_ok(beta):
    assert EF21SGDM(beta).beta == float(beta)


@pytest.mark.parametrize("eta", [-1e-9, -1, 1.0001, 2, float("nan"), float("inf"), True, "0.5"])
def test_econtrol_eta_range(eta):
    with pytest.raises(ValueError):
        EControl(eta)


@pytest.mark.parametrize("eta", [0, 0.0, 0.5, 1, 1.0, None])
def test_econtrol_eta_ok(eta):
    assert EControl(eta).eta == (None if eta is None else float(eta))


def _state(fb: Feedback, d: int = 12, seed: int = 0) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(d, generator=gen, dtype=F64)
    st = fb.init(g0, g0 * 0.5)
    st = {k: v + torch.randn(d, generator=gen, dtype=F64) for k, v in st.items()}  # a non-trivial state
    return st, torch.randn(d, generator=gen, dtype=F64)


def test_econtrol_warns_above_twice_density():
    st, g = _state(EControl(0.5))
    with pytest.warns(UserWarning, match="2x the density"):
        EControl(0.5).prepare(st, g, density=0.1)
    with pytest.warns(UserWarning):
        simulate([lambda x: x], torch.ones(20, dtype=F64), 0.1, 3, "topk:k=1", EControl(0.2), warmup=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EControl(0.2).prepare(st, g, density=0.1)    # η = 2δ: fine
        EControl(None).prepare(st, g, density=0.01)  # η = δ by default
        EControl(0.5).prepare(st, g, density=1.0)    # no compression


def test_econtrol_default_eta_is_density():
    """η = None uses δ = k/d: the same iterates as an explicit η = k/d."""
    q = Quadratics(3, 20, seed=4)
    a = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 40, TopK(k=2), EControl(None), warmup=1)
    b = simulate(q.torch_grads(), torch.from_numpy(q.x0), q.lr(), 40, TopK(k=2), EControl(0.1), warmup=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- purity: rules never modify their state, the gradient or the average (p and pending are theirs to reuse) --------------------------------------------------------------

@pytest.mark.parametrize("fb", [NoFeedback(), EF14(), EF21(), EF21SGDM(0.2), EControl(0.1), EControl(1.0), EControl(0.0)])
@pytest.mark.parametrize("comp", [TopK(k=3), RandK(k=3, seed=1)])
def test_rules_are_pure(fb, comp):
    st, g = _state(fb)
    assert set(st) == set(fb.local_slots) | set(fb.shared_slots)
    before = {k: v.clone() for k, v in st.items()}
    g_before = g.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, pending = fb.prepare(st, g, 3 / 12)
    idx = comp.select(p, 3, 0, 0)
    vals = comp.values(p, idx)
    mean = torch.randn(12, dtype=F64)
    mean_before = mean.clone()
    new = fb.update(st, g, p, pending, idx, vals, mean)
    est = fb.estimate(new, mean)
    for k in st:
        assert torch.equal(st[k], before[k]), f"{fb!r} modified state[{k!r}] in place"
    assert torch.equal(g, g_before) and torch.equal(mean, mean_before)
    # p and pending are the rule's own intermediates: update() may reuse their storage (EF14 and
    # EControl form e_i - m_i in place, saving a bucket-sized copy); nothing else may alias them
    for name, value in new.items():
        assert all(value is not x for x in (g, mean, *st.values())), f"{fb!r}: new {name!r} aliases an input"
    assert set(new) == set(fb.local_slots) | set(fb.shared_slots)
    assert est.shape == g.shape and est.dtype == F64
    # init is pure too
    g0, m0 = g.clone(), mean.clone()
    fb.init(g, mean)
    assert torch.equal(g, g0) and torch.equal(mean, m0)


def test_memory_copies():
    assert [fb.memory_copies() for fb in (NoFeedback(), EF14(), EF21(), EF21SGDM(), EControl())] == [0, 1, 2, 3, 3]
