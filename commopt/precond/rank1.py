"""Rank-1 Sherman–Morrison updates of inverse Kronecker factors, the norm-based stabiliser and the
rescaled preconditioning of MKOR (Mozaffari, Li, Zhang, Dehnavi, NeurIPS 2023, arXiv 2306.01685; SPEC §7).

Every function is a pure tensor rule: no communication, no host synchronisation (decisions such
as "is this factor finite?" are taken with ``torch.where``), inputs never modified. Factors may be
stored in half precision; the arithmetic runs in ``compute_dtype(...)`` (at least float32).

Paper references use the arXiv/NeurIPS numbering: Algorithm 1 (MKOR for one layer), Eq. (5)/(6)
(SM-based inversion of the left/right factor), Eq. (7)/(8) (norm-based stabiliser), line 10 of
Algorithm 1 (gradient rescaling).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RULES", "compute_dtype", "ema_update", "shrink_update", "stabilise", "update_factor",
           "precondition"]

RULES = ("shrink", "ema")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the factor arithmetic runs in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rank1_subtract(m: Tensor, w: Tensor, c: Tensor) -> Tensor:
    """m ← m − c·wwᵀ in place (c ≥ 0), as m − ssᵀ with s = √c·w: one BLAS ger pass, exactly symmetric."""
    s = w * torch.sqrt(c)
    return m.addr_(s, s, alpha=-1)


def ema_update(inv: Tensor, v: Tensor, gamma: float) -> Tensor:
    """Exact inverse of the moving average L' = γL + (1−γ)vvᵀ, given inv = L⁻¹ (symmetric positive definite).

    Sherman–Morrison with u = L⁻¹v:  L'⁻¹ = L⁻¹/γ − c·uuᵀ,  c = (1−γ) / (γ²·(1 + ((1−γ)/γ)·vᵀu)).
    This is the inverse that the paper derives (§3.1 "SM-Based Inverter", Eq. (5)/(6)); the printed
    Eq. (5)/(6) and Algorithm 1 lines 7–8 read γL⁻¹ + c'·uuᵀ with c' = (1−γ)/(γ²(1 + γ(1−γ)vᵀu)),
    a positive-definite variant that is *not* the inverse of the moving average. commopt
    implements the exact inverse (SPEC §7, ``rule="ema"``). A symmetric ``inv`` stays exactly symmetric.
    """
    u = inv @ v
    c = (1.0 - gamma) / (gamma * gamma * (1.0 + ((1.0 - gamma) / gamma) * torch.dot(v, u)))
    return _rank1_subtract(inv / gamma, u, c)


def shrink_update(f: Tensor, v: Tensor, gamma: float) -> Tensor:
    """The released code's rule (SPEC §7, ``rule="shrink"``): M = γF + (1−γ)I, F' = M − (Mv)(Mv)ᵀ/(1 + vᵀMv).

    By Sherman–Morrison F' = (M⁻¹ + vvᵀ)⁻¹. Starting from F = I every eigenvalue of F stays in
    (0, 1]: M's eigenvalues γλ + 1 − γ lie in (1 − γ, 1], and adding vvᵀ to M⁻¹ only shrinks
    them. The identity acts as a damping of 1 in the units of v.
    """
    m = gamma * f
    m.diagonal().add_(1.0 - gamma)
    w = m @ v
    return _rank1_subtract(m, w, 1.0 / (1.0 + torch.dot(v, w)))


def _max_abs(f: Tensor) -> Tensor:
    """max |F| in one pass (``aminmax``), NaN and ±inf propagating."""
    lo, hi = torch.aminmax(f)
    return torch.maximum(lo.abs(), hi.abs())


def _stabiliser(f: Tensor, threshold: float, blend: float) -> tuple[Tensor, Tensor, Tensor]:
    """(finite, big, a): the stabilised factor is a·F + (1−a)·I when ``finite``, I otherwise (one pass over F)."""
    mx = _max_abs(f)
    finite = torch.isfinite(mx)
    big = finite & (mx > threshold)
    a = 1.0 - big.to(f.dtype) * (1.0 - blend)
    return finite, big, a


def _scaled_plus_identity(f: Tensor, finite: Tensor, scale: Tensor, diag: Tensor) -> Tensor:
    """scale·F + diag·I, or diag_reset·I where F is not finite (``diag`` already chosen for that case)."""
    out = f * scale
    out.masked_fill_(~finite, 0.0)
    out.diagonal().add_(diag)
    return out


def stabilise(f: Tensor, threshold: float, blend: float) -> tuple[Tensor, Tensor, Tensor]:
    """Norm-based stabiliser (paper §3.1 "Norm-Based Stabilizer" and §3.3, Eq. (7)/(8); Algorithm 1 lines 5–6).

    If max|F| > ε (``threshold``): F ← ζF + (1−ζ)I (ζ = ``blend``). A non-finite F (which the
    blend cannot repair) is reset to I. The paper states the trigger as "the infinity norm of the
    factors"; commopt uses the element-wise max-norm of SPEC §7 (the matrix ∞-norm, the largest
    absolute row sum, would trigger earlier by up to a factor d). Eq. (7)/(8) write the blend on
    the factors, Algorithm 1 on their inverses; like SPEC §7 commopt blends the stored inverse.
    Returns (F', blended?, reset?) with the flags as 0-dim bool tensors (no host synchronisation).
    """
    finite, big, a = _stabiliser(f, threshold, blend)
    return _scaled_plus_identity(f, finite, a, torch.where(finite, 1.0 - a, 1.0)), big, ~finite


def update_factor(stored: Tensor, v: Tensor, rule: str, gamma: float, threshold: float,
                  blend: float) -> tuple[Tensor, dict[str, Tensor]]:
    """One factor update of Algorithm 1: stabilise (lines 5–6), then the SM update (lines 7–8).

    ``stored``: the factor (L⁻¹ under ``"ema"``, F under ``"shrink"``) in its storage dtype;
    ``v``: the all-reduced rank-1 statistic. Equals ``ema_update``/``shrink_update`` of
    ``stabilise(stored)``, fused into a few passes over the d×d factor (this runs for every layer
    on every update step). Arithmetic in :func:`compute_dtype`. A non-finite statistic leaves the
    factor untouched (it is never folded in); so does an update whose result is non-finite in the
    storage dtype (e.g. an fp16 overflow). Returns (new factor, event flags ``blended``,
    ``reset``, ``skipped`` as 0-dim bool tensors).
    """
    cdt = compute_dtype(stored.dtype)
    f = stored.to(cdt)
    v = v.to(cdt)
    finite, big, a = _stabiliser(f, threshold, blend)
    if rule == "shrink":  # M = γ·F' + (1−γ)I with F' = a·F + (1−a)·I, in one pass
        m = _scaled_plus_identity(f, finite, gamma * a, torch.where(finite, gamma * (1.0 - a), 1.0) + (1.0 - gamma))
        w = m @ v
        new = _rank1_subtract(m, w, 1.0 / (1.0 + torch.dot(v, w)))
    elif rule == "ema":  # F'/γ, then − c·uuᵀ with u = F'v
        m = _scaled_plus_identity(f, finite, a / gamma, torch.where(finite, 1.0 - a, 1.0) / gamma)
        u = (m @ v) * gamma
        c = (1.0 - gamma) / (gamma * gamma * (1.0 + ((1.0 - gamma) / gamma) * torch.dot(v, u)))
        new = _rank1_subtract(m, u, c)
    else:  # pragma: no cover - validated by the caller
        raise ValueError(f"unknown rule {rule!r}")
    new = new.to(stored.dtype)
    ok = torch.isfinite(_max_abs(new)) & torch.isfinite(v).all()  # a non-finite v makes ``new`` non-finite too
    out = torch.where(ok, new, stored)
    return out, {"blended": big & ok, "reset": ~finite & ok, "skipped": ~ok}


def precondition(left: Tensor, g: Tensor, right: Tensor) -> Tensor:
    """P = L⁻¹·G·R⁻¹, then P ← P·‖G‖/‖P‖ (Algorithm 1 lines 9–10; Frobenius norms, bias column included).

    ``g`` is the layer's weight gradient with the bias folded in as an extra input column
    (d_out × d_in'); the factors may be stored in lower precision and are multiplied in
    ``compute_dtype(g.dtype)``. Returns P in that dtype. A zero gradient gives P = 0.
    """
    cdt = compute_dtype(g.dtype)
    g = g.to(cdt)
    p = left.to(cdt) @ g @ right.to(cdt)
    gn = torch.linalg.vector_norm(g)
    pn = torch.linalg.vector_norm(p)
    scale = gn / pn.clamp_min(torch.finfo(cdt).tiny)
    return p * scale
