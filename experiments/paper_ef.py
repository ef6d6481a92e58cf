"""Error feedback: SPEC §5 E1/E2, EControl's η sweep, and EF21's step-size tolerance on a nonconvex
logistic regression, reproduced in float64 through :func:`commopt.simulate.simulate`.

Parts (every run: full local gradients, n simulated ranks with one worker each, TopK, the SPEC §2
uncompressed start ``warmup=1``: the first round is dense and sets w_i / h_i to the local gradients):

1. **E1** (Beznosikov et al. 2020): n = d = 3, f_i(x) = ⟨a_i, x⟩² + ¼‖x‖², Top-1, x⁰ = (1, 1, 1), γ = 0.01,
   2000 steps. Without feedback every compressed step multiplies x by 1 + 11γ/6 (f by its square);
   EF14, EF21 and EControl (η = 0.1) reach f < 1e−15.
2. **E2**: n = 10, d = 20, f_i(x) = ½‖A_i x − b_i‖², A_i = (i/√n)·I, b_i ~ N(0, ζ²/i²·I) (ζ = 10, seed 0),
   Top-1 (δ = 0.05), x⁰ = 0, γ = the EF21 theory step, 1500 steps: EF21 and EControl (η = δ) below
   f − f* = 1e−8, EF14 stuck above 1e−3, no feedback above 0.1.
3. **EControl η sweep** on E2: η ∈ {δ/4, δ/2, δ, 2δ, 4δ}: converges for the first four, diverges at 4δ.
4. **Nonconvex logistic regression** (the experiment of the EF21 paper, Richtárik et al. 2021, on
   synthetic data): f_i(x) = (1/m_i) Σ_j log(1 + exp(−y_ij⟨a_ij, x⟩)) + λ Σ_l x_l²/(1 + x_l²), λ = 0.1,
   n = 10 workers of 100 samples each, split after sorting by label (heterogeneous), d = 40, Top-1.
   γ = multiple × γ_theory for multiples 1, 2, 4, …, 512; final ‖∇f‖² after a fixed number of steps
   for EF21, EF14, EControl (η = δ) and uncompressed GD (reference), and the largest multiple that
   converges.

Writes ``experiments/results/paper_ef.md`` and ``paper_ef_{e1,e2,eta,logreg}.png``.

    python experiments/paper_ef.py            # everything (about 2 min of CPU; longer on busy shared cores)
    python experiments/paper_ef.py --quick    # fewer steps, η values and multiples (about 35 s of CPU;
                                              # the configuration tests/test_paper_ef.py runs)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from commopt.compressors import Identity, TopK  # noqa: E402
from commopt.feedback import EF14, EF21, EControl, Feedback, NoFeedback  # noqa: E402
from commopt.simulate import simulate  # noqa: E402

F64 = torch.float64
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# thresholds of the known outcomes (SPEC §5)
E1_TARGET = 1e-15
E2_BELOW, E2_EF14_ABOVE, E2_NONE_ABOVE = 1e-8, 1e-3, 0.1
ETA_CONVERGED, ETA_DIVERGED = 1e-8, 1e6  # below 1e−8, or above 1e6 × the start (or non-finite)
# logistic regression: "converged" = ‖∇f(x_T)‖² at most this fraction of ‖∇f(x⁰)‖²
LOGREG_CONVERGED = 1e-6


def ef21_theory_step(big_l: float, l_i: Sequence[float], delta: float) -> float:
    """SPEC §2: γ = 1 / (L + L̃·(1/(1 − √(1 − δ)) − 1)), L̃ the quadratic mean of the L_i."""
    l_tilde = float(np.sqrt(np.mean(np.asarray(l_i, dtype=np.float64) ** 2)))
    return 1.0 / (big_l + l_tilde * (1.0 / (1.0 - math.sqrt(1.0 - delta)) - 1.0))


def run(grads: Sequence[Callable], x0: torch.Tensor, lr: float, steps: int, compressor,
        feedback: Optional[Feedback]) -> list[torch.Tensor]:
    """commopt.simulate with the SPEC §2 uncompressed start (one dense round); EControl's η warning off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EControl η = 4δ warns by design
        return simulate(grads, x0, lr, steps, compressor, feedback, warmup=1)


def finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


# -- 1. E1 ------------------------------------------------------------------------------------------------

E1_A = torch.tensor([[-3.0, 2.0, 2.0], [2.0, -3.0, 2.0], [2.0, 2.0, -3.0]], dtype=F64)


def e1_grads() -> list[Callable]:
    """∇f_i(x) = 2⟨a_i, x⟩·a_i + ½x."""
    return [(lambda x, a=a: 2.0 * (a @ x) * a + 0.5 * x) for a in E1_A]


def e1_f(x: torch.Tensor) -> float:
    """f = mean_i f_i (f* = 0 at x* = 0, so this is f − f* exactly)."""
    return float(((E1_A @ x) ** 2).mean() + 0.25 * (x @ x))


def run_e1(steps: int = 2000, lr: float = 0.01, growth_lrs: Sequence[float] = (0.01, 0.1, 1.0),
           growth_steps: int = 40) -> dict:
    """f(xᵗ) per method at γ = lr, and the measured per-step growth of no feedback at several γ.

    The growth factor is measured on the compressed rounds (t ≥ 1; round 0 is the dense start, which
    multiplies x by 1 − 7γ/6): per-step ratios ‖x^{t+1}‖/‖x^t‖ and f(x^{t+1})/f(x^t)."""
    x0 = torch.ones(3, dtype=F64)
    methods = {"none": NoFeedback(), "EF14": EF14(), "EF21": EF21(), "EControl η=0.1": EControl(eta=0.1)}
    curves, rows = {}, []
    for name, fb in methods.items():
        fs = [finite_or_inf(e1_f(x)) for x in run(e1_grads(), x0, lr, steps, TopK(k=1), fb)]
        curves[name] = fs
        first = next((t for t, v in enumerate(fs) if v < E1_TARGET), None)
        if name == "none":
            ok = fs[-1] > fs[0]
            known = "diverges"
        else:
            ok = first is not None and fs[-1] < E1_TARGET
            known = f"f < {E1_TARGET:g} within {steps} steps"
        rows.append({"method": name, "final": fs[-1], "first_below": first, "known": known, "holds": ok})

    growth = []
    for g in growth_lrs:
        q = 1.0 + 11.0 * g / 6.0
        xs = run(e1_grads(), x0, g, growth_steps + 1, TopK(k=1), NoFeedback())
        xr = np.array([float(xs[t + 1].norm() / xs[t].norm()) for t in range(1, growth_steps + 1)])
        fr = np.array([e1_f(xs[t + 1]) / e1_f(xs[t]) for t in range(1, growth_steps + 1)])
        growth.append({
            "lr": g, "q": q, "x_ratio_min": float(xr.min()), "x_ratio_max": float(xr.max()),
            "x_rel_dev": float(np.abs(xr / q - 1).max()), "f_rel_dev": float(np.abs(fr / q ** 2 - 1).max()),
            "dense_first": float(xs[1][0] / xs[0][0]), "dense_expected": 1.0 - 7.0 * g / 6.0,
        })
    return {"steps": steps, "lr": lr, "curves": curves, "rows": rows, "growth": growth}


# -- 2. E2 ------------------------------------------------------------------------------------------------

def e2_problem(n: int = 10, d: int = 20, zeta: float = 10.0, seed: int = 0) -> dict:
    """SPEC E2. f − f* in closed form, ½·mean(a_i²)·‖x − x*‖² (exact for this f; f(x) − f(x*) would lose
    everything below ~1e−14 to cancellation)."""
    rng = np.random.default_rng(seed)
    a = np.array([i / math.sqrt(n) for i in range(1, n + 1)])
    b = [rng.normal(0.0, zeta / i, size=d) for i in range(1, n + 1)]
    grads = [(lambda x, ai=float(ai), bi=torch.from_numpy(bi): ai * (ai * x - bi)) for ai, bi in zip(a, b)]
    l_i = a ** 2  # f_i is L_i-smooth with L_i = a_i²
    big_l = float(np.mean(l_i))
    x_star = torch.from_numpy(sum(ai * bi for ai, bi in zip(a, b)) / np.sum(a ** 2))
    delta = 1 / d  # Top-1
    gamma = ef21_theory_step(big_l, l_i, delta)

    def gap(x: torch.Tensor) -> float:
        return finite_or_inf(0.5 * big_l * float(((x - x_star) ** 2).sum()))

    return {"n": n, "d": d, "grads": grads, "gap": gap, "delta": delta, "gamma": gamma,
            "x0": torch.zeros(d, dtype=F64)}


def e2_curve(prob: dict, fb: Feedback, steps: int) -> list[float]:
    return [prob["gap"](x) for x in run(prob["grads"], prob["x0"], prob["gamma"], steps, TopK(k=1), fb)]


def run_e2(steps: int = 1500, prob: Optional[dict] = None) -> dict:
    """f − f* per method; the known outcome of each, and whether EF14 / no feedback are stuck
    (final > ½ × the value two thirds in: little progress over the last third)."""
    prob = prob or e2_problem()
    delta = prob["delta"]
    spec = {  # method -> (rule, side, threshold)
        "EF21": (EF21(), "below", E2_BELOW),
        "EControl η=δ": (EControl(eta=delta), "below", E2_BELOW),
        "EF14": (EF14(), "above", E2_EF14_ABOVE),
        "none": (NoFeedback(), "above", E2_NONE_ABOVE),
    }
    curves, rows = {}, []
    for name, (fb, side, thr) in spec.items():
        c = e2_curve(prob, fb, steps)
        curves[name] = c
        two_thirds = c[(2 * steps) // 3]
        stuck = c[-1] > 0.5 * two_thirds
        holds = c[-1] < thr if side == "below" else (c[-1] > thr and stuck)
        rows.append({"method": name, "start": c[0], "at_2/3": two_thirds, "final": c[-1],
                     "known": f"{side} {thr:g}" + (" (stuck)" if side == "above" else ""), "holds": holds})
    return {"steps": steps, "gamma": prob["gamma"], "delta": delta, "curves": curves, "rows": rows}


def run_eta_sweep(steps: int = 1500, mults: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                  prob: Optional[dict] = None, known: Optional[dict] = None) -> dict:
    """EControl on E2 with η = mult·δ: converged (final < 1e−8), diverged (non-finite or > 1e6 × start).
    ``known`` maps a multiple to a curve already computed with these settings (E2's η = δ run)."""
    prob = prob or e2_problem()
    delta = prob["delta"]
    curves, rows = {}, []
    for m in mults:
        c = (known or {}).get(m) or e2_curve(prob, EControl(eta=m * delta), steps)
        curves[m] = c
        converged = c[-1] < ETA_CONVERGED
        diverged = (not math.isfinite(c[-1])) or c[-1] > ETA_DIVERGED * c[0]
        expected = "diverges" if m > 2.0 else "converges"
        holds = diverged if expected == "diverges" else converged
        rows.append({"mult": m, "eta": m * delta, "final": c[-1], "converged": converged, "diverged": diverged,
                     "known": expected, "holds": holds})
    return {"steps": steps, "delta": delta, "curves": curves, "rows": rows}


# -- 4. nonconvex logistic regression -------------------------------------------------------------------

class _BatchedGrads:
    """All workers' logistic-regression gradients in one batched product, cached by x: simulate asks
    every rank for its gradient at the same x in turn, and n small products cost n times the dispatch.
    Worker i gets row i, −(1/m_i)(y·A_i)ᵀσ(−(y·A_i)x) + ∇(regulariser)(x), as computed alone."""

    def __init__(self, ya: Sequence[torch.Tensor], reg_grad: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.ya = torch.stack(list(ya))  # (n, m_i, d), rows y_ij·a_ij
        self.reg_grad = reg_grad
        self.x: Optional[torch.Tensor] = None
        self.g = torch.empty(0)

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.x is None or not torch.equal(self.x, x):
            s = torch.sigmoid(-(self.ya @ x))  # (n, m_i)
            self.g = -torch.einsum("nmd,nm->nd", self.ya, s) / self.ya.shape[1] + self.reg_grad(x)
            self.x = x.clone()
        return self.g[i].clone()


def logreg_problem(n: int = 10, m_i: int = 100, d: int = 40, lam: float = 0.1, k: int = 1, seed: int = 0) -> dict:
    """Synthetic binary classification, split heterogeneously: labels from a noisy logistic teacher
    (P(y = 1 | a) = σ(2⟨a, w⟩/√d), a, w ~ N(0, I)), rows sorted by label and cut into n contiguous
    shards, so most workers see one class only.

    f_i(x) = (1/m_i) Σ_j log(1 + exp(−y_ij⟨a_ij, x⟩)) + λ Σ_l x_l²/(1 + x_l²).
    Smoothness: the logistic part's Hessian is ≤ ‖A_i‖²/(4 m_i), the regulariser's (2λ(1 − 3x²)/(1 + x²)³)
    ≤ 2λ, so L_i = ‖A_i‖₂²/(4 m_i) + 2λ; L (for f = mean f_i) = ‖A‖₂²/(4m) + 2λ from all rows."""
    rng = np.random.default_rng(seed)
    m = n * m_i
    a = rng.normal(size=(m, d))
    w = rng.normal(size=d)
    prob_pos = 1.0 / (1.0 + np.exp(-2.0 * (a @ w) / math.sqrt(d)))
    y = np.where(rng.random(m) < prob_pos, 1.0, -1.0)
    order = np.argsort(y, kind="stable")
    a, y = a[order], y[order]
    shards = [slice(i * m_i, (i + 1) * m_i) for i in range(n)]
    ya = [torch.from_numpy(y[s, None] * a[s]) for s in shards]  # rows y_ij·a_ij
    ya_all = torch.from_numpy(y[:, None] * a)

    def reg_grad(x: torch.Tensor) -> torch.Tensor:
        return (2.0 * lam) * x / (1.0 + x * x) ** 2

    def logistic_grad(yam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # ∇ (1/m) Σ log(1 + exp(−z_j)), z = (y·A)x:  −(1/m) (y·A)ᵀ σ(−z)
        return -(yam.T @ torch.sigmoid(-(yam @ x))) / yam.shape[0]

    batched = _BatchedGrads(ya, reg_grad)
    grads = [(lambda x, i=i: batched(i, x)) for i in range(n)]

    def full_grad(x: torch.Tensor) -> torch.Tensor:  # equal shards: ∇f = mean_i ∇f_i = gradient on all rows
        return logistic_grad(ya_all, x) + reg_grad(x)

    l_i = [float(np.linalg.norm(a[s], 2) ** 2 / (4 * m_i) + 2 * lam) for s in shards]
    big_l = float(np.linalg.norm(a, 2) ** 2 / (4 * m) + 2 * lam)
    delta = k / d
    pos = [float((y[s] > 0).mean()) for s in shards]
    return {"n": n, "m_i": m_i, "d": d, "lam": lam, "k": k, "delta": delta, "grads": grads, "full_grad": full_grad,
            "L": big_l, "L_i": l_i, "gamma_theory": ef21_theory_step(big_l, l_i, delta), "pos_fraction": pos,
            "x0": torch.zeros(d, dtype=F64)}


def run_logreg(multiples: Sequence[float] = tuple(2.0 ** e for e in range(10)), steps: int = 1000,
               prob: Optional[dict] = None) -> dict:
    """‖∇f(xᵗ)‖² for EF21, EF14, EControl (η = δ) and uncompressed GD at γ = multiple × γ_theory."""
    prob = prob or logreg_problem()
    delta, gth, x0 = prob["delta"], prob["gamma_theory"], prob["x0"]

    def sqnorm(x: torch.Tensor) -> float:
        return finite_or_inf(float(prob["full_grad"](x).square().sum()))

    methods = {  # name -> (gradient functions, compressor, rule)
        "EF21": (prob["grads"], TopK(k=prob["k"]), EF21()),
        "EF14": (prob["grads"], TopK(k=prob["k"]), EF14()),
        "EControl η=δ": (prob["grads"], TopK(k=prob["k"]), EControl(eta=delta)),
        # the reference: dense GD on f (one rank holding ∇f is the same iterates as n ranks averaging)
        "GD (dense)": ([prob["full_grad"]], Identity(), NoFeedback()),
    }
    curves: dict[str, dict[float, list[float]]] = {}
    final: dict[str, dict[float, float]] = {}
    summary = []
    g0 = sqnorm(x0)
    for name, (grads, comp, fb) in methods.items():
        curves[name], final[name] = {}, {}
        for mult in multiples:
            c = [sqnorm(x) for x in run(grads, x0, mult * gth, steps, comp, fb)]
            curves[name][mult] = c
            final[name][mult] = c[-1]
        conv = [m for m in multiples if final[name][m] <= LOGREG_CONVERGED * g0]
        best = min(multiples, key=lambda m: final[name][m])
        largest = max(conv) if conv else None
        summary.append({"method": name, "largest": largest, "gamma": None if largest is None else largest * gth,
                        "gammaL": None if largest is None else largest * gth * prob["L"],
                        "best": best, "best_final": final[name][best]})
    return {"steps": steps, "multiples": list(multiples), "g0": g0, "curves": curves, "final": final,
            "summary": summary, "prob": {k: v for k, v in prob.items() if not callable(v) and k != "grads"}}


# -- plots ------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _floor(c: Sequence[float], lo: float = 1e-35) -> np.ndarray:
    v = np.array(c, dtype=np.float64)
    return np.where(np.isfinite(v), np.maximum(v, lo), np.nan)


def _semilogy(curves: dict, label, hlines: Sequence[float], title: str, path: str, extra=None) -> None:
    """One log-scale panel of f(xᵗ) − f* per curve, dashed reference levels, saved to ``path``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in curves.items():
        ax.semilogy(_floor(c), label=label(name))
    if extra is not None:
        extra(ax)
    for thr in hlines:
        ax.axhline(thr, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="step t", ylabel="f(xᵗ) − f*", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_e1(res: dict, path: str) -> None:
    g = res["lr"]
    q = 1 + 11 * g / 6
    t = np.arange(1, len(res["curves"]["none"]))

    def growth(ax) -> None:
        ax.semilogy(t, res["curves"]["none"][1] * q ** (2 * (t - 1)), "k:", lw=1, label="f(x¹)·q²⁽ᵗ⁻¹⁾, q = 1 + 11γ/6")

    _semilogy(res["curves"], str, (E1_TARGET,), f"E1: n = d = 3, Top-1, γ = {g:g}", path, extra=growth)


def plot_e2(res: dict, path: str) -> None:
    _semilogy(res["curves"], str, (E2_BELOW, E2_EF14_ABOVE, E2_NONE_ABOVE),
              f"E2: n = 10, d = 20, Top-1 (δ = {res['delta']:g}), γ = {res['gamma']:.3g}", path)


def plot_eta(res: dict, path: str) -> None:
    _semilogy(res["curves"], lambda m: f"η = {m:g}δ", (ETA_CONVERGED,),
              f"EControl on E2: η sweep (δ = {res['delta']:g})", path)


def plot_logreg(res: dict, path: str) -> None:
    plt = _plt()
    names = list(res["curves"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 3.8), sharey=True)
    mults = res["multiples"]
    colors = plt.cm.viridis(np.linspace(0, 0.95, len(mults)))
    for ax, name in zip(axes, names):
        for col, m in zip(colors, mults):
            ax.semilogy(_floor(res["curves"][name][m]), color=col, lw=1, label=f"{m:g}×")
        ax.set(title=name, xlabel="step t")
    axes[0].set_ylabel("‖∇f(xᵗ)‖²")
    axes[-1].legend(fontsize=7, title="γ / γ_theory", title_fontsize=7, loc="upper right")
    fig.suptitle("Nonconvex logistic regression, n = 10 heterogeneous workers, Top-1", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- markdown -----------------------------------------------------------------------------------------------

def _e(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v):
        return "inf/nan"
    return f"{v:.2e}"


def _yes(b: bool) -> str:
    return "yes" if b else "**no**"


def markdown(e1: dict, e2: dict, eta: dict, lr: dict, command: str, seconds: tuple[float, float]) -> str:
    p = lr["prob"]
    out = [
        "# Error feedback: SPEC §5 E1/E2, EControl's η, EF21's step-size tolerance",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}; torch {torch.__version__}, CPython "
        f"{platform.python_version()}, float64; {seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU on 2 shared cores). All runs go through "
        "`commopt.simulate.simulate` with full local gradients and the SPEC §2 uncompressed start (`warmup=1`: "
        "round 0 is dense and sets w_i / h_i to the local gradients, e_i to 0). Plots: `paper_ef_e1.png`, "
        "`paper_ef_e2.png`, `paper_ef_eta.png`, `paper_ef_logreg.png`.",
        "",
        "## 1. E1: compression without feedback diverges",
        "",
        f"n = d = 3, f_i(x) = ⟨a_i, x⟩² + ¼‖x‖², Top-1, x⁰ = (1, 1, 1), γ = {e1['lr']:g}, {e1['steps']} steps.",
        "",
        "| method | final f − f* | first step below 1e−15 | known outcome | holds |",
        "|---|---:|---:|---|---|",
    ]
    for r in e1["rows"]:
        out.append(f"| {r['method']} | {_e(r['final'])} | {r['first_below'] if r['first_below'] is not None else '–'} "
                   f"| {r['known']} | {_yes(r['holds'])} |")
    out += [
        "",
        "Growth of no feedback on the compressed rounds (t ≥ 1), per-step ratios against q = 1 + 11γ/6; "
        "round 0 (dense) should scale x by 1 − 7γ/6:",
        "",
        "| γ | q = 1 + 11γ/6 | ‖xᵗ⁺¹‖/‖xᵗ‖ min | max | max rel. dev. from q | f ratio: max rel. dev. from q² "
        "| x¹₀/x⁰₀ (dense round 0) | 1 − 7γ/6 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in e1["growth"]:
        out.append(f"| {g['lr']:g} | {g['q']:.10f} | {g['x_ratio_min']:.10f} | {g['x_ratio_max']:.10f} "
                   f"| {g['x_rel_dev']:.1e} | {g['f_rel_dev']:.1e} | {g['dense_first']:.10f} "
                   f"| {g['dense_expected']:.10f} |")
    ok1 = all(r["holds"] for r in e1["rows"]) and all(g["x_rel_dev"] < 1e-12 for g in e1["growth"])
    out += [
        "",
        "Reading: " + ("no feedback grows by exactly 1 + 11γ/6 per step (to rounding) and all three feedback rules "
                       "reach f < 1e−15 within the budget, as SPEC E1 says." if ok1 else
                       "**SPEC E1 does not hold in full here: see the rows marked no.**"),
        "",
        "## 2. E2: heterogeneous quadratic",
        "",
        f"n = 10, d = 20, A_i = (i/√n)·I, b_i ~ N(0, ζ²/i²·I), ζ = 10, seed 0, Top-1 (δ = {e2['delta']:g}), x⁰ = 0, "
        f"γ = EF21 theory step = {e2['gamma']:.4e}, {e2['steps']} steps. f − f* = ½·mean(a_i²)·‖x − x*‖² "
        "(closed form). \"Stuck\": final > ½ × the value at 2/3 of the run.",
        "",
        "| method | start | at step 2T/3 | final f − f* | known outcome | holds |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in e2["rows"]:
        out.append(f"| {r['method']} | {_e(r['start'])} | {_e(r['at_2/3'])} | {_e(r['final'])} | {r['known']} "
                   f"| {_yes(r['holds'])} |")
    ok2 = all(r["holds"] for r in e2["rows"])
    out += [
        "",
        "Reading: " + ("EF21 and EControl converge linearly to machine-level accuracy while EF14 plateaus and "
                       "compressed GD without feedback barely moves, the SPEC's ordering." if ok2 else
                       "**SPEC E2 does not hold in full here: see the rows marked no.**"),
        "",
        "## 3. EControl η sweep on E2",
        "",
        f"Same problem and γ, {eta['steps']} steps. Converged: final < {ETA_CONVERGED:g}; diverged: non-finite or "
        f"> {ETA_DIVERGED:g} × the start.",
        "",
        "| η / δ | η | final f − f* | converged | diverged | known outcome | holds |",
        "|---:|---:|---:|---|---|---|---|",
    ]
    for r in eta["rows"]:
        out.append(f"| {r['mult']:g} | {r['eta']:.4g} | {_e(r['final'])} | {r['converged']} | {r['diverged']} "
                   f"| {r['known']} | {_yes(r['holds'])} |")
    ok3 = all(r["holds"] for r in eta["rows"])
    out += [
        "",
        "Reading: " + ("EControl converges for η ≤ 2δ and diverges at 4δ, as the SPEC says (hence its warning "
                       "above 2δ)." if ok3 else "**the SPEC's η range does not hold in full here: see the rows "
                       "marked no.**"),
        "",
        "## 4. EF21's step-size tolerance: nonconvex logistic regression",
        "",
        f"f_i(x) = (1/m_i) Σ_j log(1 + exp(−y_ij⟨a_ij, x⟩)) + λ Σ_l x_l²/(1 + x_l²), λ = {p['lam']:g}; synthetic data "
        f"(a ~ N(0, I_{p['d']}), labels from a noisy logistic teacher), {p['n']} workers × {p['m_i']} samples split "
        "after sorting by label: fraction of +1 labels per worker "
        + ", ".join(f"{v:.2f}" for v in p["pos_fraction"])
        + f". Top-{p['k']} (δ = {p['delta']:g}), x⁰ = 0. L_i = ‖A_i‖₂²/(4m_i) + 2λ ∈ [{min(p['L_i']):.4f}, "
        f"{max(p['L_i']):.4f}], L = ‖A‖₂²/(4m) + 2λ = {p['L']:.4f}, L̃ = quadratic mean of L_i; "
        f"γ_theory = 1/(L + L̃(1/(1 − √(1 − δ)) − 1)) = {p['gamma_theory']:.4e} (= {p['gamma_theory'] * p['L']:.4f}/L, "
        f"so 1/L is {1 / (p['gamma_theory'] * p['L']):.0f}× γ_theory). {lr['steps']} steps; ‖∇f(x⁰)‖² = "
        f"{lr['g0']:.3e}. EControl with η = δ; GD (dense) is the uncompressed reference.",
        "",
        "Final ‖∇f(x_T)‖² per multiple of γ_theory:",
        "",
        "| method | " + " | ".join(f"{m:g}×" for m in lr["multiples"]) + " |",
        "|---|" + "---:|" * len(lr["multiples"]),
    ]
    for name, row in lr["final"].items():
        out.append(f"| {name} | " + " | ".join(_e(row[m]) for m in lr["multiples"]) + " |")
    out += [
        "",
        f"Converged: ‖∇f(x_T)‖² ≤ {LOGREG_CONVERGED:g} × ‖∇f(x⁰)‖².",
        "",
        "| method | largest multiple that converged | its γ | its γ·L | multiple with the smallest final "
        "| that final |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in lr["summary"]:
        largest = "none" if s["largest"] is None else f"{s['largest']:g}×"
        gamma_l = "–" if s["gammaL"] is None else f"{s['gammaL']:.2f}"
        out.append(f"| {s['method']} | {largest} | {_e(s['gamma'])} | {gamma_l} | {s['best']:g}× "
                   f"| {_e(s['best_final'])} |")
    out += ["", "Reading: " + logreg_reading(lr), ""]
    out += [
        "## Where the SPEC and the papers differ, and other notes",
        "",
        "- **EF21 theory step**: the SPEC's 1/(L + L̃(1/(1 − √(1 − δ)) − 1)) equals the EF21 paper's "
        "1/(L + L̃·√(β/θ)) with θ = 1 − √(1 − δ), β = (1 − δ)/(1 − √(1 − δ)): both are "
        "1/(L + L̃·√(1 − δ)/(1 − √(1 − δ))). No disagreement.",
        "- **E1 growth**: the SPEC's \"grows by exactly 1 + 11γ/6 per step\" is the factor of x (each coordinate "
        "and ‖x‖); f grows by its square. With the SPEC §2 dense start (what the hook does) round 0 is "
        "uncompressed and shrinks x by 1 − 7γ/6; the growth starts at round 1 (Beznosikov et al. compress from "
        "round 0). Both are measured above.",
        "- **E1 with feedback**: EF14 here also gets the dense round 0 (e_i = 0 afterwards), so it is the classic "
        "EF14 started one step later.",
        "- **EControl's η**: the SPEC's \"η ≤ 2δ converges, 4δ diverges\" is an empirical statement about this "
        "problem (SPEC: \"in every experiment we know of\"); this run checks it on E2 only, not in general.",
        "- **Logistic regression vs the EF21 paper**: the paper uses real LibSVM data sets; here the "
        "data are synthetic (nothing is downloaded) with n = 10 and a label-sorted split, as asked. L is the "
        "data bound for f (from all rows), which is at most the mean of the L_i; the paper's exact choice of L "
        "may differ slightly, which moves γ_theory (and the multiples) by a constant factor only.",
        "- **EF14 plateaus**: with full gradients on heterogeneous workers EF14 with a constant step stalls at a "
        "level that grows with γ (E2, and the logistic regression table: roughly ×2.5–6 per doubling of γ) instead "
        "of converging; EF21 and EControl do not. This fits the EF21 paper's motivation (EF14's analyses need "
        "bounded gradients or bounded dissimilarity, EF21's does not); smaller steps than 1× would lower EF14's "
        "plateau, at a slower rate.",
        "- **Logistic regression, GD at 256×**: dense GD still converges at γ·L = 2.08 because L = ‖A‖²/(4m) + 2λ "
        "is an upper bound (the true curvature of f is smaller); the multiples are relative to a conservative "
        "γ_theory for every method alike.",
        "- **\"Converged\" depends on the budget**: a run counts as converged when it is six orders below its start "
        "after T steps; with fewer steps the slowest converging runs (EControl at its largest multiple, "
        "every method at 1×) would not count. The curves in `paper_ef_logreg.png` show the rates.",
        "",
    ]
    return "\n".join(out)


def logreg_reading(lr: dict) -> str:
    s = {r["method"]: r for r in lr["summary"]}
    ef21, gd = s["EF21"]["largest"], s["GD (dense)"]["largest"]
    ec, ef14 = s["EControl η=δ"]["largest"], s["EF14"]["largest"]
    if ef21 is None:
        return "**EF21 did not converge at any multiple of γ_theory here: the EF21 paper's claim does not reproduce.**"
    parts = [f"EF21 converged up to {ef21:g}× the theory step (γ·L = {s['EF21']['gammaL']:.2f})"]
    if gd is not None:
        rel = "the same as" if gd == ef21 else ("above" if ef21 > gd else "below")
        parts.append(f"{rel} dense GD's largest converging multiple ({gd:g}×)")
    parts.append("EControl (η = δ) up to " + (f"{ec:g}×" if ec is not None else "no multiple"))
    parts.append("EF14 " + (f"up to {ef14:g}×" if ef14 is not None else
                            "at no multiple (it plateaus, higher for larger γ)"))
    tail = (" — so EF21 tolerates steps far above its theory, as the EF21 paper reports" if ef21 >= 8 else
            " — EF21's tolerance of large steps is much smaller here than the EF21 paper reports")
    return "; ".join(parts) + tail + "."


# -- main ---------------------------------------------------------------------------------------------------

# full: the SPEC's budgets; quick: what tests/test_paper_ef.py runs (E1 unchanged: it is cheap)
CONFIGS = {
    "full": {"e2_steps": 1500, "etas": (0.25, 0.5, 1.0, 2.0, 4.0), "multiples": tuple(2.0 ** e for e in range(10)),
             "logreg_steps": 1000},
    "quick": {"e2_steps": 1000, "etas": (0.25, 1.0, 4.0), "multiples": (1.0, 16.0, 512.0), "logreg_steps": 300},
}


def run_all(cfg: dict) -> dict:
    """Every experiment with one configuration of CONFIGS."""
    e1 = run_e1()
    prob = e2_problem()
    e2 = run_e2(cfg["e2_steps"], prob)
    eta = run_eta_sweep(cfg["e2_steps"], cfg["etas"], prob, known={1.0: e2["curves"]["EControl η=δ"]})
    lr = run_logreg(cfg["multiples"], cfg["logreg_steps"])
    return {"e1": e1, "e2": e2, "eta": eta, "logreg": lr}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, η values and multiples")
    ap.add_argument("--out", default=RESULTS, help="folder for paper_ef.md and the PNGs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on shared cores
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_all(CONFIGS["quick" if args.quick else "full"])
    e1, e2, eta, lr = res["e1"], res["e2"], res["eta"], res["logreg"]
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    os.makedirs(args.out, exist_ok=True)
    plot_e1(e1, os.path.join(args.out, "paper_ef_e1.png"))
    plot_e2(e2, os.path.join(args.out, "paper_ef_e2.png"))
    plot_eta(eta, os.path.join(args.out, "paper_ef_eta.png"))
    plot_logreg(lr, os.path.join(args.out, "paper_ef_logreg.png"))
    command = "python experiments/paper_ef.py" + (" --quick" if args.quick else "")
    text = markdown(e1, e2, eta, lr, command, seconds)
    with open(os.path.join(args.out, "paper_ef.md"), "w") as fh:
        fh.write(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
