"""MKOR / MKOR-H in one process (SPEC §7): the exact checks, statistics, stabiliser, errors,
checkpoints, and the convergence experiments with known outcomes.

Convergence instances (float64, full batch unless said) are fixed below; the numbers they give
are in the docstrings. ``experiments/mkor_convergence.py`` sweeps seeds and reports wall time.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from commopt.optim.mkor import MKOR, KneeSwitch
from commopt.precond import layers as L
from commopt.precond.rank1 import ema_update, precondition, shrink_update, stabilise, update_factor

F64 = torch.float64
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


class Net(nn.Module):
    """Conv2d -> ReLU -> Linear on 3-D tokens -> ReLU(inplace) -> Linear: every statistics path."""

    def __init__(self, dtype=F64, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias, dtype=dtype)
        self.fc1 = nn.Linear(3, 5, bias=bias, dtype=dtype)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(5, 2, bias=False, dtype=dtype)

    def forward(self, x):
        h = torch.relu(self.conv(x))                 # (N, 3, 4, 4)
        h = h.flatten(2).transpose(1, 2)             # (N, 16 tokens, 3)
        return self.fc2(self.act(self.fc1(h))).mean(1)


def _batch(seed: int, n: int = 4, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype)


def _step(model, opt, x, y, **kw):
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step(**kw)
    return loss.detach()


# -- exact checks of the factor rules (SPEC §7) ------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.95, 0.99])
def test_ema_update_is_the_exact_inverse_of_the_moving_average(gamma):
    d = 7
    lmat = _spd(d, 0)
    inv = torch.linalg.inv(lmat)
    inv = (inv + inv.T) / 2  # exactly symmetric: the update keeps it so
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        v = torch.randn(d, generator=g, dtype=F64) * (0.1 + k)
        inv = ema_update(inv, v, gamma)
        lmat = gamma * lmat + (1 - gamma) * torch.outer(v, v)
        ref = torch.linalg.inv(lmat)
        assert torch.allclose(inv, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
        assert torch.equal(inv, inv.T)


@pytest.mark.parametrize("gamma", [0.5, 0.95])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_shrink_update_formula_symmetry_and_eigenvalues_in_0_1(gamma, scale):
    d = 6
    f = torch.eye(d, dtype=F64)
    g = torch.Generator().manual_seed(2)
    for _ in range(25):
        v = torch.randn(d, generator=g, dtype=F64) * scale + 0.5 * scale
        new = shrink_update(f, v, gamma)
        m = gamma * f + (1 - gamma) * torch.eye(d, dtype=F64)
        ref = torch.linalg.inv(torch.linalg.inv(m) + torch.outer(v, v))
        assert torch.allclose(new, ref, rtol=0, atol=1e-10)
        assert torch.equal(new, new.T)
        ev = torch.linalg.eigvalsh(new)
        assert float(ev.min()) > 0 and float(ev.max()) <= 1 + 1e-12
        f = new


def test_stabiliser_blends_with_zeta_and_resets_non_finite():
    f = torch.eye(3, dtype=F64) * 50
    out, blended, reset = stabilise(f, threshold=10.0, blend=0.8)
    assert torch.equal(out, 0.8 * f + 0.2 * torch.eye(3, dtype=F64)) and bool(blended) and not bool(reset)
    out, blended, reset = stabilise(f, threshold=100.0, blend=0.8)
    assert torch.equal(out, f) and not bool(blended)
    for bad in (float("nan"), float("inf")):
        g = f.clone()
        g[0, 1] = bad
        out, blended, reset = stabilise(g, threshold=10.0, blend=0.8)
        assert torch.equal(out, torch.eye(3, dtype=F64)) and bool(reset) and not bool(blended)


def test_non_finite_statistic_is_never_folded_in():
    f = _spd(4, 3)
    for rule in ("ema", "shrink"):
        v = torch.tensor([1.0, float("nan"), 0.0, 2.0], dtype=F64)
        out, ev = update_factor(f, v, rule, 0.95, 1e9, 0.9)
        assert torch.equal(out, f) and bool(ev["skipped"])
        out, ev = update_factor(f, v.nan_to_num(), rule, 0.95, 1e9, 0.9)
        assert not torch.equal(out, f) and not bool(ev["skipped"])


def test_half_precision_factors_stay_finite():
    """"ema" with zero statistics multiplies L⁻¹ by 1/γ per update: fp16 would overflow after ~200
    updates. The stabiliser keeps it bounded; without it (ε = ∞) the overflowing update is refused."""
    for threshold in (100.0, math.inf):
        f = torch.eye(5, dtype=torch.float16)
        skipped = 0
        for _ in range(400):
            f, ev = update_factor(f, torch.zeros(5), "ema", 0.95, threshold, 0.9)
            skipped += int(ev["skipped"])
            assert bool(torch.isfinite(f).all())
        if threshold == math.inf:
            assert skipped > 100 and float(f.abs().max()) > 1e4
        else:
            assert skipped == 0 and float(f.abs().max()) <= 100.0 / 0.95 + 1


def test_precondition_is_dense_product_rescaled():
    g = torch.randn(4, 6, dtype=F64)
    left, right = _spd(4, 4), _spd(6, 5)
    p = precondition(left, g, right)
    dense = left @ g @ right
    assert torch.allclose(p, dense * g.norm() / dense.norm(), rtol=1e-13, atol=0)
    assert float(p.norm()) == pytest.approx(float(g.norm()), rel=1e-13)
    assert torch.equal(precondition(left, torch.zeros(4, 6, dtype=F64), right), torch.zeros(4, 6, dtype=F64))


# -- statistics of Linear and Conv2d ----------------------------------------------------------------

def _reference_stats(model: Net, x, y):
    """ā, ḡ of every layer from an explicit forward with retained output gradients and F.unfold."""
    acts = {}
    conv_in = x
    h0 = model.conv(x)
    h0.retain_grad()
    h = torch.relu(h0).flatten(2).transpose(1, 2)
    acts["fc1"] = h.detach()
    h1 = model.fc1(h)
    h1.retain_grad()
    a2 = torch.relu(h1)
    acts["fc2"] = a2.detach()
    h2 = model.fc2(a2)
    h2.retain_grad()
    F.mse_loss(h2.mean(1), y).backward()
    cols = F.unfold(conv_in, 3, padding=1, stride=2)  # (N, C·9, positions)
    ref = {"conv": (cols.mean((0, 2)), h0.grad.sum((0, 2, 3)))}
    for name, out in (("fc1", h1), ("fc2", h2)):
        a = acts[name].reshape(-1, acts[name].shape[-1])
        ref[name] = (a.mean(0), out.grad.reshape(-1, out.shape[-1]).sum(0))
    return ref


def test_statistics_match_unfolded_and_token_references():
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch(0)
    ref = _reference_stats(model, x, y)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    got = opt.local_statistics()
    assert sorted(got) == ["conv", "fc1", "fc2"]
    for name, (a, g) in ref.items():
        assert torch.allclose(got[name][0], a, rtol=0, atol=1e-13), name
        assert torch.allclose(got[name][1], g, rtol=0, atol=1e-13), name


@pytest.mark.parametrize("kw", [dict(stride=1, padding=0), dict(stride=2, padding=2, dilation=2),
                                dict(stride=(2, 1), padding=1, padding_mode="reflect"),
                                dict(stride=1, padding=1, padding_mode="circular", bias=False),
                                dict(stride=1, padding="same")])
def test_conv2d_statistics_vs_unfolded_reference(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, dtype=F64, **kw)
    opt = MKOR(conv, torch.optim.SGD(conv.parameters(), lr=0.1))
    x = torch.randn(5, 3, 9, 7, dtype=F64)
    out = conv(x)
    out.retain_grad()
    (out.sin()).sum().backward()
    a, g = opt.local_statistics()[""]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, 3, dilation=conv.dilation, stride=conv.stride)
    assert torch.allclose(a, cols.mean((0, 2)), rtol=0, atol=1e-13)
    assert torch.allclose(g, out.grad.sum((0, 2, 3)), rtol=0, atol=1e-13)


def test_statistics_do_not_depend_on_the_loss_scale():
    """A real torch.amp.GradScaler: ḡ is divided by the scale the backward ran with (powers of two: exact)."""
    results = []
    for init_scale in (1.0, 2.0 ** 10, 2.0 ** 20):
        torch.manual_seed(0)
        model = Net(dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=2,
                   grad_scaler=scaler)
        stats = []
        for t in range(5):
            x, y = _batch(t, dtype=torch.float32)
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            stats.append({k: (a.clone(), g.clone()) for k, (a, g) in opt.local_statistics().items()})
            scaler.step(opt)
            scaler.update()
        results.append((stats, [p.detach().clone() for p in model.parameters()],
                        {k: (lf.clone(), rf.clone()) for k, (lf, rf) in opt.factors().items()}))
    for stats, params, facs in results[1:]:
        for s0, s1 in zip(results[0][0], stats):
            assert s0.keys() == s1.keys()
            for k in s0:
                assert torch.equal(s0[k][0], s1[k][0]) and torch.equal(s0[k][1], s1[k][1])
        assert all(torch.equal(p, q) for p, q in zip(results[0][1], params))
        assert all(torch.equal(results[0][2][k][i], facs[k][i]) for k in facs for i in (0, 1))


def test_gradient_accumulation_gives_the_statistics_of_one_big_batch():
    x, y = _batch(3, n=8)
    runs = []
    for micro in (1, 4):
        torch.manual_seed(0)
        model = Net()
        opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (F.mse_loss(model(xs), ys) / micro).backward()
        stats = {k: (a.clone(), g.clone()) for k, (a, g) in opt.local_statistics().items()}
        opt.step()
        runs.append((stats, opt.factors(), [p.detach().clone() for p in model.parameters()]))
    (s1, f1, p1), (s4, f4, p4) = runs
    for k in s1:
        assert torch.allclose(s1[k][0], s4[k][0], rtol=0, atol=1e-13)
        assert torch.allclose(s1[k][1], s4[k][1], rtol=0, atol=1e-13)
        assert torch.allclose(f1[k][0], f4[k][0], rtol=0, atol=1e-12)
        assert torch.allclose(f1[k][1], f4[k][1], rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(p1, p4))


def test_low_precision_activations_accumulate_in_fp32():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, dtype=torch.bfloat16)
    opt = MKOR(lin, torch.optim.SGD(lin.parameters(), lr=0.1))
    assert opt.factors()[""][0].dtype == torch.float32
    x = (torch.rand(4096, 16) * 8).to(torch.bfloat16)  # a bf16 running sum would lose most terms
    out = lin(x)
    out.retain_grad()
    out.float().square().mean().backward()
    a, g = opt.local_statistics()[""]
    assert a.dtype == g.dtype == torch.float32
    assert torch.allclose(a, x.float().mean(0), rtol=1e-6)
    assert torch.allclose(g, out.grad.float().sum(0), rtol=1e-5)
    opt.step()
    assert all(bool(torch.isfinite(f).all()) for f in opt.factors()[""])
    assert lin.weight.grad.dtype == torch.bfloat16 and bool(torch.isfinite(lin.weight.grad).all())


def test_autocast_bf16_and_half_precision_factor_storage():
    """bf16 autocast activations, factors stored in bf16/fp16: statistics fp32, multiplication fp32, all finite."""
    for fdt in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = Net(dtype=torch.float32)
        opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rule="ema", update_every=1,
                   factor_dtype=fdt)
        losses = []
        for t in range(30):
            x, y = _batch(t % 3, dtype=torch.float32)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = F.mse_loss(out.float(), y)
            loss.backward()
            if t == 0:
                assert all(a.dtype == g.dtype == torch.float32 for a, g in opt.local_statistics().values())
            opt.step()
            losses.append(float(loss.detach()))
        for left, right in opt.factors().values():
            assert left.dtype == right.dtype == fdt
            assert bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        assert sum(losses[-3:]) < sum(losses[:3])


def test_non_finite_statistic_of_one_layer_is_skipped_in_the_optimizer(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05), update_every=1)
    real = MKOR._local_statistics

    def poisoned(self):
        buf = real(self)
        buf[0] = float("inf")  # the first layer's (conv's) ā
        return buf

    monkeypatch.setattr(MKOR, "_local_statistics", poisoned)
    before = {k: (a.clone(), b.clone()) for k, (a, b) in opt.factors().items()}
    _step(model, opt, *_batch(0))
    after = opt.factors()
    assert torch.equal(after["conv"][1], before["conv"][1])       # R of conv: skipped
    assert not torch.equal(after["conv"][0], before["conv"][0])   # L of conv: its ḡ was finite
    assert not torch.equal(after["fc1"][1], before["fc1"][1])
    assert opt.comm_stats()["skipped"] == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- the optimizer step ------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["shrink", "ema"])
def test_step_preconditions_from_step_0_with_dense_product_and_norm(rule):
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rule=rule, update_every=3)
    mods = {"conv": model.conv, "fc1": model.fc1, "fc2": model.fc2}
    for t in range(7):
        x, y = _batch(t)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        raw = {k: L.grad_matrix(m, m.bias is not None).clone() for k, m in mods.items()}
        before = {k: (lft.clone(), rgt.clone()) for k, (lft, rgt) in opt.factors().items()}
        opt.step()
        for k, m in mods.items():
            lft, rgt = opt.factors()[k]
            if t % 3:  # factors change only on update steps
                assert torch.equal(lft, before[k][0]) and torch.equal(rgt, before[k][1])
            else:
                assert not torch.equal(rgt, before[k][1])
            dense = lft @ raw[k] @ rgt
            p = L.grad_matrix(m, m.bias is not None)
            assert torch.allclose(p, dense * raw[k].norm() / dense.norm(), rtol=1e-12, atol=1e-15)
            assert float(p.norm()) == pytest.approx(float(raw[k].norm()), rel=1e-12)
            if t == 0:  # step 0 is preconditioned (the released code's first update was a reset)
                assert not torch.allclose(p, raw[k], rtol=1e-6)


@pytest.mark.parametrize("rule", ["shrink", "ema"])
def test_zero_statistics_reduce_to_the_base_optimizer(rule, monkeypatch):
    """ā = ḡ = 0: "shrink" keeps F = I (bitwise the base optimizer), "ema" gives L⁻¹ = c·I (rescaled away).

    Layers without bias: a bias column always has the statistic 1, never 0."""
    monkeypatch.setattr(MKOR, "_local_statistics", lambda self: torch.zeros(self.statistics_size(), dtype=F64))
    runs = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = Net(bias=False)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt = MKOR(model, base, rule=rule, update_every=2) if wrap else base
        for t in range(6):
            _step(model, opt, *_batch(t))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        if rule == "shrink":
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_only_supported_layers_are_preconditioned_skip_list_and_subclasses():
    class MyLinear(nn.Linear):
        pass

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MyLinear(4, 4, dtype=F64)
            self.norm = nn.LayerNorm(4, dtype=F64)
            self.dw = nn.Conv1d(1, 1, 1, dtype=F64)
            self.b = nn.Sequential(nn.Linear(4, 4, dtype=F64), nn.Linear(4, 2, dtype=F64))
            self.c = nn.Linear(2, 2, dtype=F64)

        def forward(self, x):
            return self.c(self.b(self.norm(self.a(x))))

    m = Model()
    assert MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1)).layer_names == ["a", "b.0", "b.1", "c"]
    assert MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1), skip=["b"]).layer_names == ["a", "c"]
    assert MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1), skip=[m.b[1], "c"]).layer_names == ["a", "b.0"]
    assert MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1), skip=[MyLinear, "b.*"]).layer_names == ["c"]
    opt = MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1), skip=["a", "b"])
    x = torch.randn(8, 4, dtype=F64)
    opt.zero_grad()
    m(x).square().mean().backward()
    raw = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    opt.step()
    for n, p in m.named_parameters():
        if p.grad is None:
            continue
        if n.startswith("c."):
            assert not torch.equal(p.grad, raw[n])
        else:
            assert torch.equal(p.grad, raw[n]), n  # passed through unchanged


def test_statistics_only_in_update_iterations_and_cleared_after_step():
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05), update_every=4)
    for t in range(9):
        x, y = _batch(t)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        assert bool(opt.local_statistics()) == (t % 4 == 0)
        opt.step()
        assert opt.local_statistics() == {}
    with torch.no_grad():  # an evaluation forward does not count
        model(x)
    assert opt.local_statistics() == {}
    assert opt.comm_stats()["updates"] == 3 and opt.comm_stats()["allreduce_calls"] == 0


def test_lr_scheduler_and_param_groups_are_shared():
    torch.manual_seed(0)
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MKOR(model, base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(3):
        _step(model, opt, *_batch(t))
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.0125) and opt.param_groups is base.param_groups


# -- errors ------------------------------------------------------------------------------------------

def test_clear_errors():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    sgd = lambda ps=None: torch.optim.SGD(m.parameters() if ps is None else ps, lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        n = nn.Sequential(nn.LayerNorm(3))
        MKOR(n, torch.optim.SGD(n.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        MKOR(m, sgd(), skip=[nn.Linear])
    for gamma in (0.0, 1.0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
            MKOR(m, sgd(), factor_momentum=gamma)
    for every in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="update_every"):
            MKOR(m, sgd(), update_every=every)
    with pytest.raises(ValueError, match="rule"):
        MKOR(m, sgd(), rule="kfac")
    with pytest.raises(ValueError, match="stabilizer_blend"):
        MKOR(m, sgd(), stabilizer_blend=1.0)
    other = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="not parameters of the model"):
        MKOR(m, sgd(other.parameters()))
    with pytest.raises(ValueError, match=r"does not own the parameters of layer\(s\) \['2'\]"):
        MKOR(m, sgd(m[0].parameters()))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MKOR(m, "sgd")
    with pytest.raises(TypeError, match="nn.Module"):
        MKOR(list(m.parameters()), sgd())
    opt = MKOR(m, sgd(), hybrid=True)
    m(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


def test_frozen_layers_and_frozen_bias():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[0].weight.requires_grad_(False)
    m[1].bias.requires_grad_(False)
    opt = MKOR(m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1))
    assert opt.layer_names == ["1"] and opt.factors()["1"][1].shape == (4, 4)  # no bias column
    m(torch.randn(5, 3)).sum().backward()
    opt.step()


# -- checkpoints -------------------------------------------------------------------------------------

def _train(model, opt, steps, start=0, hybrid=False):
    for t in range(start, start + steps):
        x, y = _batch(t)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss) if hybrid else opt.step()


@pytest.mark.parametrize("rule,hybrid,base", [("shrink", False, "sgd"), ("ema", True, "adamw")])
def test_state_dict_resumes_identically(rule, hybrid, base):
    def make():
        torch.manual_seed(0)
        model = Net()
        b = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if base == "sgd"
             else torch.optim.AdamW(model.parameters(), lr=1e-2))
        return model, MKOR(model, b, rule=rule, update_every=3, hybrid=hybrid, knee_min_updates=2)

    model, opt = make()
    _train(model, opt, 17, hybrid=hybrid)
    ref = [p.detach().clone() for p in model.parameters()]
    ref_f = {k: (a.clone(), b.clone()) for k, (a, b) in opt.factors().items()}

    model, opt = make()
    _train(model, opt, 8, hybrid=hybrid)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2, opt2 = make()
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.state_dict()["mkor"]["steps"] == 8
    _train(model2, opt2, 9, start=8, hybrid=hybrid)
    assert all(torch.equal(p, q) for p, q in zip(ref, model2.parameters()))
    for k, (a, b) in opt2.factors().items():
        assert torch.equal(a, ref_f[k][0]) and torch.equal(b, ref_f[k][1])


def test_load_state_dict_errors():
    torch.manual_seed(0)
    model = Net()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="rule"):
        MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1), rule="ema").load_state_dict(sd)
    with pytest.raises(ValueError, match="layers"):
        MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1), skip=["fc2"]).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a valid MKOR checkpoint"):
        opt.load_state_dict({**sd, "mkor": {"version": 1}})
    with pytest.raises(ValueError, match="expected keys 'state' and 'param_groups'"):
        opt.load_state_dict({"optimizer": sd})


# -- MKOR-H ------------------------------------------------------------------------------------------

def test_knee_switch_rule_on_synthetic_curves():
    """ℓ(t) = 0.1 + e^(−t/50): the recent rate falls below β = 0.1 × the average since t=0 at
    t ≈ 3.6τ = 180; a straight line (no knee) never switches."""
    k = KneeSwitch(beta=0.1, smoothing=0.0, min_updates=3)
    hits = [t for t in range(0, 400, 10) if k.observe(t, 0.1 + math.exp(-t / 50))]
    assert 170 <= hits[0] <= 200
    k = KneeSwitch(beta=0.1, smoothing=0.5, min_updates=3)
    assert not any(k.observe(t, 10 - 0.01 * t) for t in range(0, 800, 10))
    k2 = KneeSwitch()
    k2.load_state_dict(k.state_dict())
    assert k2.state_dict() == k.state_dict()
    assert not KneeSwitch().observe(0, float("nan"))


def test_mkor_h_switches_at_the_knee_logs_once_and_keeps_the_base_state(caplog):
    x, y = _regression(offset=4.0, seed=0)
    m = nn.Linear(32, 1, bias=False, dtype=F64)
    nn.init.zeros_(m.weight)
    base = torch.optim.SGD(m.parameters(), lr=REG_LR, momentum=0.9)
    opt = MKOR(m, base, hybrid=True)
    losses = []
    with caplog.at_level(logging.INFO, logger="commopt.mkor"):
        for _ in range(400):
            opt.zero_grad()
            loss = F.mse_loss(m(x), y)
            loss.backward()
            losses.append(float(loss.detach()))
            if opt.switched:  # from the switch on: exactly the base optimizer, its momentum kept
                p0 = m.weight.detach().clone()
                buf = base.state[m.weight]["momentum_buffer"].clone()
                opt.step(loss=loss)
                buf = buf.mul(0.9).add(m.weight.grad)
                assert torch.equal(m.weight.detach(), p0.add(buf, alpha=-REG_LR))
            else:
                opt.step(loss=loss)
    assert opt.switched and 30 <= opt.switch_step <= 200, opt.switch_step
    msgs = [r.getMessage() for r in caplog.records if "MKOR-H" in r.getMessage()]
    assert len(msgs) == 1 and f"step {opt.switch_step}" in msgs[0]
    assert losses[opt.switch_step] < 0.05 * losses[0]        # past the knee
    assert min(losses[-20:]) < 0.1 * losses[opt.switch_step]  # and still converging afterwards
    sd = opt.state_dict()["mkor"]["hybrid"]
    assert sd["switched"] is True and sd["switch_step"] == opt.switch_step
    assert opt.local_statistics() == {}  # no statistics are gathered after the switch


# -- convergence experiments (SPEC §7) -------------------------------------------------------------

REG_LR = 1.35e-3  # SGD(momentum 0.9) needs 281 steps on the offset instance below


def _regression(offset: float, seed: int = 0, d: int = 32, n: int = 256):
    """x = offset + N(0, diag(s²)), s log-spaced from 1 to 0.5 (anisotropic); y = x·w*, w* ~ N(0, I/d)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, math.log10(0.5), d, dtype=F64)
    x = offset + torch.randn(n, d, generator=g, dtype=F64) * scales
    w = torch.randn(d, 1, generator=g, dtype=F64) / math.sqrt(d)
    return x, x @ w


def _steps_to(x, y, lr, mkor=None, target=1e-3, max_steps=2000):
    m = nn.Linear(x.shape[1], 1, bias=False, dtype=F64)
    nn.init.zeros_(m.weight)
    base = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    opt = MKOR(m, base, **mkor) if mkor is not None else base
    for t in range(max_steps):
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        if float(loss.detach()) < target:
            return t
        loss.backward()
        opt.step()
    return max_steps


@pytest.mark.parametrize("rule", ["shrink", "ema"])
def test_offset_linear_regression_mkor_needs_at_most_0_6x_the_steps_of_sgd(rule):
    """Offset 4, d = 32: SGD 281 steps to loss < 1e−3; MKOR over the same SGD: shrink 130, ema 55.

    "shrink" depends on the instance: experiments/mkor_convergence.py sweeps seeds (see its table)."""
    x, y = _regression(offset=4.0)
    sgd = _steps_to(x, y, REG_LR)
    mk = _steps_to(x, y, REG_LR, dict(rule=rule))
    assert 250 <= sgd <= 320, sgd
    assert mk <= 0.6 * sgd, (mk, sgd)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
def test_offset_linear_regression_ema_wins_on_every_seed(seed):
    """The exact moving-average inverse ("ema") keeps the SPEC §7 outcome on every data seed (0.16-0.21x
    SGD's steps); "shrink" does on seed 0 (above) but not on every seed (experiments/mkor_convergence.py)."""
    x, y = _regression(offset=4.0, seed=seed)
    sgd = _steps_to(x, y, REG_LR)
    mk = _steps_to(x, y, REG_LR, dict(rule="ema"))
    assert mk <= 0.6 * sgd, (seed, mk, sgd)


@pytest.mark.parametrize("rule", ["shrink", "ema"])
def test_zero_mean_control_is_parity(rule):
    """The same inputs without the offset: ā ≈ 0, so MKOR ≈ SGD (SGD 281, shrink 276, ema 281 steps):
    no win from the rescaling alone."""
    x, y = _regression(offset=0.0)
    sgd = _steps_to(x, y, REG_LR)
    mk = _steps_to(x, y, REG_LR, dict(rule=rule))
    assert abs(mk - sgd) <= 0.05 * sgd, (mk, sgd)


def _mlp_task(seed: int = 0, n: int = 512, d: int = 16):
    """Inputs uniform in [0, 1]^16 (non-negative, like post-ReLU features); targets from a random tanh teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=F64)
    w1, b1 = torch.randn(d, 32, generator=g, dtype=F64), torch.randn(32, generator=g, dtype=F64)
    w2 = torch.randn(32, 1, generator=g, dtype=F64)
    y = torch.tanh(x @ w1 + b1) @ w2
    return x, (y - y.mean()) / y.std()


def _mlp_curve(x, y, make_base, steps, mkor=None):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(F64)
    base = make_base(m.parameters())
    opt = MKOR(m, base, **mkor) if mkor is not None else base
    g = torch.Generator().manual_seed(5)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.mse_loss(m(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            curve.append(float(F.mse_loss(m(x), y)))
    return curve


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_mlp_on_non_negative_inputs_reaches_the_base_optimizers_best_loss_sooner(base):
    """Minibatch 64, 300 steps: SGD(0.05, momentum 0.9) reaches a best full-batch loss of 0.047, MKOR
    over it reaches that at step 68; AdamW(3e-3): best 0.036, MKOR at step 118."""
    make = ((lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)) if base == "sgd"
            else (lambda ps: torch.optim.AdamW(ps, lr=3e-3)))
    x, y = _mlp_task()
    steps = 300
    best = min(_mlp_curve(x, y, make, steps))
    mk = _mlp_curve(x, y, make, steps, dict())
    hit = next(i for i, v in enumerate(mk) if v <= best)
    assert hit <= 0.6 * steps, (hit, best)


# -- torch.optim-shaped checkpoints, torch.distributed.checkpoint -----------------------------------

def _make_net(rule="shrink", hybrid=False, momentum=0.9, update_every=3):
    torch.manual_seed(0)
    model = Net()
    return model, MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum), rule=rule,
                       update_every=update_every, hybrid=hybrid, knee_min_updates=2)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: (a.clone(), b.clone()) for k, (a, b) in opt.factors().items()})


def _same(s1, s2) -> bool:
    (p1, f1), (p2, f2) = s1, s2
    return (all(torch.equal(a, b) for a, b in zip(p1, p2))
            and all(torch.equal(f1[k][i], f2[k][i]) for k in f1 for i in (0, 1)))


def test_state_dict_has_torch_optim_shape_and_the_old_layout_still_loads():
    model, opt = _make_net()
    _train(model, opt, 5)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "mkor"}
    base = opt.optimizer.state_dict()
    assert sd["param_groups"] == base["param_groups"] and sd["state"].keys() == base["state"].keys()
    assert sd["mkor"]["steps"] == 5 and sorted(sd["mkor"]["factors"]) == ["conv", "fc1", "fc2"]
    _train(model, opt, 4, start=5)
    ref = _snapshot(model, opt)
    for layout in ("new", "old"):
        model2, opt2 = _make_net()
        _train(model2, opt2, 5)  # the same state again, then a checkpoint in each layout
        ck = opt2.state_dict()
        if layout == "old":  # {"optimizer": base state_dict, "mkor": MKOR's part}
            ck = {"optimizer": {"state": ck["state"], "param_groups": ck["param_groups"]}, "mkor": ck["mkor"]}
        buf = io.BytesIO()
        torch.save({"model": model2.state_dict(), "opt": ck}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=False)
        model3, opt3 = _make_net()
        model3.load_state_dict(ck["model"])
        opt3.load_state_dict(ck["opt"])
        _train(model3, opt3, 4, start=5)
        assert _same(ref, _snapshot(model3, opt3)), layout


def test_load_is_atomic():
    """A bad MKOR part changes nothing (checked before the base optimizer loads); a base optimizer
    load that fails leaves both the base optimizer and MKOR as they were."""
    model, opt = _make_net()
    _train(model, opt, 4)
    good = opt.state_dict()
    model2, opt2 = _make_net()
    _train(model2, opt2, 2)
    before = (opt2.state_dict(), _snapshot(model2, opt2))

    def unchanged() -> bool:
        sd = opt2.state_dict()
        return (sd["mkor"]["steps"] == before[0]["mkor"]["steps"] == 2 and _same(before[1], _snapshot(model2, opt2))
                and all(torch.equal(sd["state"][k]["momentum_buffer"], before[0]["state"][k]["momentum_buffer"])
                        for k in sd["state"]))

    bad_shape = {**good, "mkor": {**good["mkor"], "factors": {**good["mkor"]["factors"],
                                                             "fc2": {"left": torch.eye(3), "right": torch.eye(5)}}}}
    with pytest.raises(ValueError, match="factor shapes"):
        opt2.load_state_dict(bad_shape)
    assert unchanged()
    bad_groups = {**good, "param_groups": good["param_groups"] + good["param_groups"]}
    with pytest.raises(ValueError):
        opt2.load_state_dict(bad_groups)
    assert unchanged()
    bad_events = {**good, "mkor": {**good["mkor"], "events": {"blended": 0}}}
    with pytest.raises(ValueError, match="not a valid MKOR checkpoint"):
        opt2.load_state_dict(bad_events)
    assert unchanged()
    opt2.load_state_dict(good)
    assert opt2.state_dict()["mkor"]["steps"] == 4


def test_load_without_mkor_part_warns_loads_the_base_and_restarts_the_factors():
    model, opt = _make_net(hybrid=True)
    _train(model, opt, 7, hybrid=True)
    opt.switched = True  # pretend MKOR-H had switched: the plain checkpoint cannot say so
    base_sd = opt.optimizer.state_dict()
    model2, opt2 = _make_net(hybrid=True)
    _train(model2, opt2, 4, hybrid=True)
    with pytest.warns(UserWarning, match="no 'mkor' entry.*restart from identity"):
        opt2.load_state_dict(base_sd)
    assert all(torch.equal(opt2.state[p]["momentum_buffer"], base_sd["state"][j]["momentum_buffer"])
               for j, p in enumerate(opt2.params()))
    mk = opt2.state_dict()["mkor"]
    assert mk["steps"] == 0 and mk["updates"] == 0 and not mk["hybrid"]["switched"]
    assert all(torch.equal(f, torch.eye(f.shape[0], dtype=f.dtype)) for lr in opt2.factors().values() for f in lr)
    _train(model2, opt2, 2, hybrid=True)  # and it trains on
    assert opt2.state_dict()["mkor"]["steps"] == 2


def test_load_without_mkor_part_warns_at_the_callers_line():
    model, opt = _make_net()
    _train(model, opt, 2)
    with pytest.warns(UserWarning, match="no 'mkor' entry") as rec:
        opt.load_state_dict(opt.optimizer.state_dict())
    assert [w.filename for w in rec] == [__file__]


def test_failed_statistics_all_reduce_names_itself_and_changes_nothing(monkeypatch):
    """A failed statistics all-reduce (here a gloo timeout, faked at world size 2) raises
    CollectiveError naming MKOR's collective, its size, the step and this rank, chained from the
    backend's error; parameters, factors, counters and the MKOR-H loss window are as before, so the
    step can be repeated and then gives what a step that never failed gives."""
    from commopt.exchange import CollectiveError

    def run(fail: bool):
        model, opt = _make_net(hybrid=True, update_every=1)
        _train(model, opt, 3, hybrid=True)
        x, y = _batch(3)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if fail:
            before = (_snapshot(model, opt), opt.state_dict()["mkor"])
            with monkeypatch.context() as mp:
                mp.setattr(opt, "world_size", 2)
                backend = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 20000ms for recv"

                def dead(*args, **kwargs):
                    raise RuntimeError(backend)

                mp.setattr(torch.distributed, "all_reduce", dead)
                with pytest.raises(CollectiveError) as info:
                    opt.step(loss=loss)
            msg = str(info.value)
            assert msg == (f"commopt: MKOR's statistics all_reduce ({opt.statistics_size()} values, float64, step 3) "
                           f"failed on rank 0 of 2: {backend}"), msg
            assert isinstance(info.value.__cause__, RuntimeError)
            after = (_snapshot(model, opt), opt.state_dict()["mkor"])
            assert _same(before[0], after[0])
            assert before[1]["steps"] == after[1]["steps"] == 3 and before[1]["comm"] == after[1]["comm"]
            assert before[1]["hybrid"]["loss_sum"] is None and before[1]["hybrid"] == after[1]["hybrid"]  # window
        opt.step(loss=loss)   # (again)
        return _snapshot(model, opt), opt.state_dict()["mkor"]

    (ref, ref_mk), (got, got_mk) = run(False), run(True)
    assert _same(ref, got) and ref_mk["steps"] == got_mk["steps"] == 4
    assert ref_mk["hybrid"]["knee"] == got_mk["hybrid"]["knee"]


def _dcp():
    return pytest.importorskip("torch.distributed.checkpoint.state_dict")


@pytest.mark.parametrize("hybrid", [False, True])
def test_dcp_get_optimizer_state_dict_does_not_disturb_mkor(hybrid):
    """get_optimizer_state_dict steps an optimizer with empty state (here SGD without momentum)
    with zero gradients and lr 0 (``_init_optim_state``); at a step where MKOR would update its
    factors. Only the base optimizer may see that step: MKOR's factors, counters and update schedule
    are untouched and the run continues exactly as without the call (MKOR-H does not ask for a loss)."""
    dcp = _dcp()
    model, opt = _make_net(rule="ema", hybrid=hybrid, momentum=0.0, update_every=2)
    _train(model, opt, 4, hybrid=hybrid)
    opt.zero_grad()  # no gradients and an empty state (stateless SGD): _init_optim_state will step
    assert not opt.state
    mk_before = opt.state_dict()["mkor"]
    osd = dcp.get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"} and "fc1.weight" in osd["param_groups"][0]["params"]
    mk_after = opt.state_dict()["mkor"]
    assert (mk_after["steps"], mk_after["updates"], mk_after["comm"]) == \
        (mk_before["steps"], mk_before["updates"], mk_before["comm"]) == (4, 2, mk_before["comm"])
    assert all(torch.equal(mk_after["factors"][k][s], mk_before["factors"][k][s])
               for k in mk_before["factors"] for s in ("left", "right"))
    assert all(p.grad is None for p in model.parameters())
    _train(model, opt, 4, start=4, hybrid=hybrid)
    ref_model, ref_opt = _make_net(rule="ema", hybrid=hybrid, momentum=0.0, update_every=2)
    _train(ref_model, ref_opt, 8, hybrid=hybrid)
    assert _same(_snapshot(model, opt), _snapshot(ref_model, ref_opt))


def test_dcp_set_optimizer_state_dict_and_the_preconditioner_part_beside_it():
    """A checkpoint through torch.distributed.checkpoint.state_dict (state/param_groups by FQN) plus
    preconditioner_state_dict() saved beside it resumes exactly; without the latter the base
    optimizer loads with a warning (fresh factors)."""
    dcp = _dcp()
    model, opt = _make_net(rule="ema", update_every=2)
    _train(model, opt, 5)
    ck = {"model": {k: v.clone() for k, v in model.state_dict().items()},
          "optim": dcp.get_optimizer_state_dict(model, opt), "mkor": opt.preconditioner_state_dict()}
    ck = torch.load(io.BytesIO(_saved(ck)), weights_only=False)
    _train(model, opt, 4, start=5)
    model2, opt2 = _make_net(rule="ema", update_every=2)
    model2.load_state_dict(ck["model"])
    with pytest.warns(UserWarning, match="no 'mkor' entry"):
        dcp.set_optimizer_state_dict(model2, opt2, ck["optim"])
    opt2.load_preconditioner_state_dict(ck["mkor"])
    assert opt2.state_dict()["mkor"]["steps"] == 5
    _train(model2, opt2, 4, start=5)
    assert _same(_snapshot(model, opt), _snapshot(model2, opt2))
    with pytest.raises(ValueError, match="rule"):
        MKOR(model2, torch.optim.SGD(model2.parameters(), lr=0.1)).load_preconditioner_state_dict(ck["mkor"])


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_mkor_over_mkor_is_refused():
    model = Net()
    inner = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="'mkor'"):
        MKOR(model, inner)


# -- tied weights ------------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """Token embedding tied to the output projection (GPT's lm_head.weight = wte.weight)."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d, dtype=F64)
        self.mid = nn.Linear(d, d, dtype=F64)
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=F64)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.mid(self.wte(idx))))


def test_a_weight_tied_to_another_module_gets_exactly_one_plain_update():
    torch.manual_seed(0)
    model = TiedLM()
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=1)
    assert opt.layer_names == ["mid"] and opt.tied_layers == ["lm_head"]
    shared = model.wte.weight
    assert sum(p is shared for p in opt.params()) == 1
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        idx = torch.randint(0, 11, (4, 7), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(idx).reshape(-1, 11), idx.roll(1, 1).reshape(-1)).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        after = dict(model.named_parameters())
        # the tied weight (embedding + lm_head gradient, summed by autograd) moves by exactly -lr * raw grad
        assert torch.allclose(after["wte.weight"], before["wte.weight"] - 0.1 * raw["wte.weight"], rtol=0, atol=1e-15)
        assert not torch.allclose(after["mid.weight"], before["mid.weight"] - 0.1 * raw["mid.weight"],
                                  rtol=0, atol=1e-6)  # preconditioned
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert "lm_head" not in opt.factors()


def test_two_linears_sharing_one_weight_are_both_left_alone():
    lin = nn.Linear(4, 4, dtype=F64)
    m = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 4, dtype=F64))
    m[4].weight = lin.weight
    opt = MKOR(m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert opt.layer_names == ["0"] and opt.tied_layers == ["2", "4"]
    m(torch.randn(5, 3, dtype=F64)).sum().backward()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


# -- add_param_group ---------------------------------------------------------------------------------

def test_add_param_group_delegates_to_the_base_optimizer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.Tanh(), nn.Linear(4, 2, dtype=F64))
    m[2].weight.requires_grad_(False)
    base = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    opt = MKOR(m, base)
    assert opt.layer_names == ["0"]
    m[2].weight.requires_grad_(True)  # unfrozen later: added with its own learning rate
    opt.add_param_group({"params": m[2].weight, "lr": 0.01})
    assert len(base.param_groups) == 2 and base.param_groups[1]["params"] == [m[2].weight]
    assert opt.param_groups is base.param_groups and base.param_groups[1]["momentum"] == 0
    opt.zero_grad()
    m(torch.randn(6, 3, dtype=F64)).square().mean().backward()
    g, w = m[2].weight.grad.clone(), m[2].weight.detach().clone()
    opt.step()
    assert torch.equal(m[2].weight, w - 0.01 * g)  # passes through, unpreconditioned
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [m[0].weight]})
    assert len(base.param_groups) == 2


# -- torch.compile -----------------------------------------------------------------------------------

class TinyGPT(nn.Module):
    """One pre-LN transformer block on tokens and a tied lm_head: Linear layers on 3-D inputs."""

    def __init__(self, vocab: int = 32, d: int = 16, heads: int = 2, block: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(y)
        x = x + self.out(self.act(self.fc(self.ln2(x))))
        logits = self.lm_head(self.lnf(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _compile_or_skip():
    try:
        import torch._dynamo  # noqa: F401
        f = torch.compile(lambda x: x * 2, backend="aot_eager")
        f(torch.ones(2))
    except Exception as exc:  # no dynamo on this Python / build
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    import torch._dynamo
    return torch._dynamo


@pytest.mark.timeout(300)
def test_compiled_model_matches_eager_without_graph_breaks():
    """MKOR's statistics are captured by traceable code: a torch.compile'd model (aot_eager) gives the
    eager run's parameters, factors and statistics, in one graph per collecting state (2 graphs, 1
    recompile when the collecting flag flips; no graph break), also with gradient accumulation. MKOR
    built over the compiled module names its layers as over the plain one."""
    dynamo = _compile_or_skip()
    from torch._dynamo.utils import counters

    def data(t):
        g = torch.Generator().manual_seed(t)
        return torch.randint(0, 32, (3, 8), generator=g), torch.randint(0, 32, (3, 8), generator=g)

    def run(compiled):
        torch.manual_seed(0)
        model = TinyGPT()
        f = torch.compile(model, backend="aot_eager") if compiled else model
        opt = MKOR(f, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), update_every=2)  # unwraps f
        stats = []
        for t in range(6):
            opt.zero_grad()
            for micro in range(1 + t % 2):  # gradient accumulation on odd steps
                f(*data(10 * t + micro)).backward()
            stats.append({k: (a.clone(), g.clone()) for k, (a, g) in opt.local_statistics().items()})
            opt.step()
        return model, opt, stats

    m1, o1, s1 = run(False)
    dynamo.reset()
    counters.clear()
    m2, o2, s2 = run(True)
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    assert breaks == 0, dict(counters["graph_break"])
    assert graphs == 2, graphs
    assert o1.tied_layers == ["lm_head"] and o1.layer_names == o2.layer_names == ["qkv", "proj", "fc", "out"]
    assert [sorted(s) for s in s1] == [sorted(s) for s in s2] and any(s1)
    for a, b in zip(s1, s2):
        assert all(torch.allclose(a[k][i], b[k][i], rtol=1e-5, atol=1e-6) for k in a for i in (0, 1))
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(m1.parameters(), m2.parameters()))
    for k, (left, right) in o1.factors().items():
        assert torch.allclose(left, o2.factors()[k][0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(right, o2.factors()[k][1], rtol=1e-5, atol=1e-6)
    dynamo.reset()


# -- memory: nothing of an iteration outlives it (soak regression) ----------------------------------

def _live_tensors() -> int:
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_outputs_and_graph_are_freed_after_each_step(bias):
    """A statistics-collecting forward must not keep its layer outputs (and with them the autograd
    graph and its saved activations) alive: an output-gradient hook on ``output.grad_fn`` whose
    closure holds ``output`` is a cycle through autograd's C++ nodes that gc cannot collect, and
    leaked a whole iteration every update step (RSS +290 MB over 20,000 steps). After step + del,
    weak references to every layer output and to the input activations are dead, and the number
    of live tensors does not grow over many steps."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 8, bias=bias), nn.ReLU(inplace=True),
                          nn.Linear(8, 3, bias=bias))
    opt = MKOR(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=1)
    outs = []  # weak references to what every layer returned (after MKOR's hook) in the watched step
    watch = [False]

    def keep(module, inputs, output):
        if watch[0]:
            outs.append(weakref.ref(output))
            outs.append(weakref.ref(inputs[0]))

    for m in model:
        m.register_forward_hook(keep)  # after MKOR's: sees the output MKOR hands on
    g = torch.Generator().manual_seed(1)

    def step(t):
        x = torch.randn(16, 6, generator=g, requires_grad=(t % 2 == 0))
        y = torch.randn(16, 3, generator=g)
        opt.zero_grad()
        out = model(x)
        F.mse_loss(out, y).backward()
        opt.step()

    for t in range(5):
        step(t)
    before = _live_tensors()
    watch[0] = True
    step(6)
    watch[0] = False
    gc.collect()
    assert len(outs) == 10 and all(r() is None for r in outs), [type(r()) for r in outs]
    for t in range(40):
        step(t)
    assert _live_tensors() <= before
    assert opt.comm_stats()["updates"] == 46
