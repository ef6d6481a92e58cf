"""Float64 NumPy references: the SPEC §2 feedback rules and a single-process simulation of n ranks.

Written independently of commopt's torch code (only RandK's index stream is
shared, because it is the definition of the shared seed, not the math under test).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest-magnitude entries (no ties in the test data)."""
    if k >= x.size:
        return np.ones(x.size, dtype=bool)
    idx = np.argpartition(-np.abs(x), k - 1)[:k]
    mask = np.zeros(x.size, dtype=bool)
    mask[idx] = True
    return mask


def segment_topk_mask(x: np.ndarray, segments: "list[tuple[int, int, int]]") -> np.ndarray:
    """TopK applied separately to each segment (start, length, k) of x: blockwise compression, e.g.
    the L shards of every bucket under hierarchical compression (SPEC §8)."""
    mask = np.zeros(x.size, dtype=bool)
    for start, length, k in segments:
        mask[start:start + length] = topk_mask(x[start:start + length], k)
    return mask


def compress(x: np.ndarray, mask: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.where(mask, x * scale, 0.0)


class Rule:
    """One rank's state plus the replicated state of a feedback rule (SPEC §2 table)."""

    def __init__(self, name: str, n: int, d: int, beta: float = 0.1, eta: float = 0.0):
        self.name, self.n, self.d, self.beta, self.eta = name, n, d, beta, eta
        z = lambda: np.zeros(d)  # noqa: E731
        self.e = [z() for _ in range(n)]
        self.wi = [z() for _ in range(n)]
        self.v = [z() for _ in range(n)]
        self.w = z()

    def init(self, grads: list[np.ndarray]) -> None:
        mean = sum(grads[1:], grads[0].copy()) / self.n
        for i, g in enumerate(grads):
            self.e[i] = np.zeros(self.d)
            self.wi[i] = g.copy()
            self.v[i] = g.copy()
        self.w = mean.copy()

    def step(self, grads: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        """One compressed round; returns the estimate the optimizer uses."""
        msgs = []
        for i, (g, mask) in enumerate(zip(grads, masks)):
            if self.name == "none":
                m = compress(g, mask)
            elif self.name == "ef14":
                p = self.e[i] + g
                m = compress(p, mask)
                self.e[i] = p - m
            elif self.name == "ef21":
                m = compress(g - self.wi[i], mask)
                self.wi[i] = self.wi[i] + m
            elif self.name == "ef21sgdm":
                self.v[i] = (1 - self.beta) * self.v[i] + self.beta * g
                m = compress(self.v[i] - self.wi[i], mask)
                self.wi[i] = self.wi[i] + m
            elif self.name == "econtrol":
                m = compress(self.eta * self.e[i] + g - self.wi[i], mask)
                self.e[i] = self.e[i] + g - self.wi[i] - m
                self.wi[i] = self.wi[i] + m
            else:
                raise ValueError(self.name)
            msgs.append(m)
        total = msgs[0].copy()
        for m in msgs[1:]:
            total = total + m
        mean = total / self.n
        if self.name in ("none", "ef14"):
            return mean
        self.w = self.w + mean
        return self.w.copy()


def simulate(grad_fns: list[Callable[[np.ndarray], np.ndarray]], x0: np.ndarray, lr: float, steps: int,
             rule: str, k: int, compressor: str = "topk", warmup: int = 0, beta: float = 0.1,
             eta: float = 0.0, rand_index: Optional[Callable[[int], np.ndarray]] = None,
             segments: "Optional[list[tuple[int, int, int]]]" = None) -> list[np.ndarray]:
    """Gradient descent of n workers (one per rank) through compression + feedback; returns the iterates.

    ``warmup`` dense rounds first (each re-initialises the state as the hook does);
    ``rand_index(step)`` gives RandK's shared indices; ``segments`` ((start, length, k) triples) makes
    TopK blockwise, ``k`` then unused.
    """
    n, d = len(grad_fns), x0.size
    fb = Rule(rule, n, d, beta=beta, eta=eta)
    x = x0.astype(np.float64).copy()
    out = [x.copy()]
    for t in range(steps):
        grads = [f(x) for f in grad_fns]
        if t < warmup:
            fb.init(grads)
            total = grads[0].copy()
            for g in grads[1:]:
                total = total + g
            est = total / n
        else:
            if compressor == "topk":
                inputs = _inputs(fb, grads)
                masks = [topk_mask(p, k) if segments is None else segment_topk_mask(p, segments) for p in inputs]
            else:
                mask = np.zeros(d, dtype=bool)
                mask[rand_index(t)] = True
                masks = [mask] * n
            est = fb.step(grads, masks)
        x = x - lr * est
        out.append(x.copy())
    return out


def _inputs(fb: Rule, grads: list[np.ndarray]) -> list[np.ndarray]:
    """The vectors each rank compresses (needed to pick TopK masks before the state moves)."""
    res = []
    for i, g in enumerate(grads):
        if fb.name == "none":
            res.append(g)
        elif fb.name == "ef14":
            res.append(fb.e[i] + g)
        elif fb.name == "ef21":
            res.append(g - fb.wi[i])
        elif fb.name == "ef21sgdm":
            res.append((1 - fb.beta) * fb.v[i] + fb.beta * g - fb.wi[i])
        elif fb.name == "econtrol":
            res.append(fb.eta * fb.e[i] + g - fb.wi[i])
    return res


def e2_problem(n: int = 10, d: int = 20, zeta: float = 10.0, seed: int = 0):
    """SPEC E2: f_i(x) = ½‖A_i x − b_i‖², A_i = (i/√n) I, b_i ~ N(0, ζ²/i² I). Returns (a, b, grad_fns, f, f*)."""
    rng = np.random.default_rng(seed)
    a = np.array([i / np.sqrt(n) for i in range(1, n + 1)])
    b = [rng.normal(0.0, zeta / i, size=d) for i in range(1, n + 1)]
    grad_fns = [(lambda x, ai=ai, bi=bi: ai * (ai * x - bi)) for ai, bi in zip(a, b)]

    def f(x: np.ndarray) -> float:
        return float(np.mean([0.5 * np.sum((ai * x - bi) ** 2) for ai, bi in zip(a, b)]))

    x_star = sum(ai * bi for ai, bi in zip(a, b)) / np.sum(a ** 2)
    return a, b, grad_fns, f, f(x_star)


def ef21_theory_step(a: np.ndarray, delta: float) -> float:
    """γ = 1 / (L + L̃ (1/(1 − √(1 − δ)) − 1)) for f = mean f_i with L_i = a_i² (SPEC §2)."""
    l_i = a ** 2
    big_l = float(np.mean(l_i))
    l_tilde = float(np.sqrt(np.mean(l_i ** 2)))
    return 1.0 / (big_l + l_tilde * (1.0 / (1.0 - np.sqrt(1.0 - delta)) - 1.0))
