"""Sparsifying compressors: TopK, RandK, ScaledRandK, and the name registry.

A compressor turns a flat vector ``p`` (one DDP bucket) into a fixed-size
message ``(indices[k], values[k])``. Compressors never communicate and hold no
state: the same call on the same input gives the same message on every rank.

A compressor is *contractive* with parameter δ when E‖C(x) − x‖² ≤ (1 − δ)‖x‖²
(SPEC §1). TopK and the unscaled RandK have δ = k/d; ScaledRandK is unbiased but
not contractive, so it is refused by every error-feedback rule.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Compressor", "TopK", "RandK", "ScaledRandK", "Identity", "make_compressor", "topk_indices",
           "random_subset"]


class Compressor:
    """Base class: picks ``k`` of ``d`` coordinates of a flat vector.

    Give either ``ratio`` in (0, 1] (k = max(1, ⌊ratio·d⌋) per bucket) or a
    fixed ``k`` ≥ 1 (capped at d).
    """

    #: short name used by the registry and in checkpoints
    name: str = "base"
    #: True when the indices do not depend on the data (all ranks pick the same
    #: coordinates, so the selected values can be all-reduced)
    shared_indices: bool = False
    #: False for compressors that error feedback must refuse
    contractive: bool = True

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        if (ratio is None) == (k is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of ratio= or k= (got ratio={ratio!r}, k={k!r})")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
                raise ValueError(f"{type(self).__name__}: ratio must be a number in (0, 1], got {ratio!r}")
            if not 0.0 < float(ratio) <= 1.0:
                raise ValueError(f"{type(self).__name__}: ratio must be in (0, 1], got {ratio}")
            ratio = float(ratio)
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"{type(self).__name__}: k must be an integer >= 1, got {k!r}")
            if k < 1:
                raise ValueError(f"{type(self).__name__}: k must be >= 1, got {k}")
        self.ratio = ratio
        self.k = k

    def num_selected(self, d: int) -> int:
        """k for a bucket of d elements: max(1, ⌊ratio·d⌋), or min(k, d)."""
        if d < 1:
            raise ValueError(f"cannot compress an empty vector (d={d})")
        if self.ratio is not None:
            return min(d, max(1, int(math.floor(self.ratio * d))))
        assert self.k is not None
        return min(self.k, d)

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        """Indices (int64, shape [k]) of the coordinates to send."""
        raise NotImplementedError

    def values(self, x: Tensor, idx: Tensor) -> Tensor:
        """The values sent for the chosen indices (shape [k])."""
        return x.index_select(0, idx)

    def compress(self, x: Tensor, step: int = 0, key: int = 0) -> tuple[Tensor, Tensor]:
        """(indices, values) of C(x) for a flat vector x."""
        k = self.num_selected(x.numel())
        idx = self.select(x, k, step, key)
        return idx, self.values(x, idx)

    def dense(self, x: Tensor, step: int = 0, key: int = 0) -> Tensor:
        """C(x) as a dense vector (for tests and references)."""
        idx, val = self.compress(x, step, key)
        return torch.zeros_like(x).index_put_((idx,), val)

    def config(self) -> dict:
        """What must agree across ranks and checkpoints."""
        return {"name": self.name, "ratio": self.ratio, "k": self.k}

    def spec(self) -> str:
        return f"{self.name}:{self.ratio if self.ratio is not None else self.k}"

    def __repr__(self) -> str:
        arg = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return f"{type(self).__name__}({arg})"


class Identity(Compressor):
    """No compression (k = d): used for dense rounds and as a control."""

    name = "none"
    shared_indices = True

    def __init__(self) -> None:
        super().__init__(ratio=1.0)

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        return torch.arange(x.numel(), device=x.device)

    def spec(self) -> str:
        return "none"


class TopK(Compressor):
    """Keep the k entries of largest magnitude: C(x)_j = x_j if |x_j| is among the k largest, else 0.

    Deterministic and contractive with δ = k/d (Alistarh et al., NeurIPS 2018;
    Stich et al., NeurIPS 2018). Ties are broken by ``torch.topk``'s fixed rule.
    """

    name = "topk"

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        if k >= x.numel():
            return torch.arange(x.numel(), device=x.device)
        return topk_indices(x.abs(), k)


def _seed(seed: int, step: int, key: int) -> int:
    """A 63-bit seed from (user seed, step, bucket key), stable across processes and platforms."""
    h = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class RandK(Compressor):
    """k coordinates drawn uniformly without replacement, **unscaled**: C(x) = x ⊙ 1_S, |S| = k.

    Contractive in expectation with δ = k/d, so it composes with error feedback
    (Stich et al., NeurIPS 2018). The indices come from a private generator
    seeded by (seed, step, bucket key), never the global RNG, so every rank picks
    the same coordinates and the values can be all-reduced.
    """

    name = "randk"
    shared_indices = True

    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0) -> None:
        super().__init__(ratio=ratio, k=k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{type(self).__name__}: seed must be an integer, got {seed!r}")
        self.seed = seed

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        d = x.numel()
        if k >= d:
            return torch.arange(d, device=x.device)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_seed(self.seed, step, key))
        # drawn on the CPU so the choice is identical on every device type
        idx = random_subset(d, k, gen)
        if x.is_cuda:  # pinned + non_blocking: no stream synchronisation in the hook
            return idx.pin_memory().to(x.device, non_blocking=True)
        return idx

    def config(self) -> dict:
        return {**super().config(), "seed": self.seed}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", seed={self.seed})"


class ScaledRandK(RandK):
    """Unbiased RandK: C(x) = (d/k)·x ⊙ 1_S, so E C(x) = x.

    Not contractive for k ≤ d/2 (SPEC §1); use it only without error feedback
    (EF21 with it diverges: the gain on the chosen coordinates is 1 − d/k).
    """

    name = "scaled_randk"
    contractive = False

    def values(self, x: Tensor, idx: Tensor) -> Tensor:
        d, k = x.numel(), idx.numel()
        return x.index_select(0, idx) * (d / k)


#: below this size a full ``torch.topk`` is as fast as the sampled pre-selection
_PRESELECT_MIN = 1 << 16


def topk_indices(mag: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of ``mag`` (non-negative magnitudes), exact.

    On CUDA this is ``torch.topk`` (a radix select). On the CPU, where ``torch.topk``
    with a large k is slow, a threshold t is estimated from a fixed strided sample so
    that about 2k entries reach it; if at least k do, the k largest of those
    candidates are exactly the k largest overall (the k-th largest value is then
    >= t), else it falls back to ``torch.topk`` on the whole vector. The same set of
    indices either way (up to the order of ties).
    """
    d = mag.numel()
    if mag.device.type != "cpu" or d < _PRESELECT_MIN or 4 * k > d:
        return torch.topk(mag, k, sorted=False).indices
    m = min(d, max(4096, 64 * int(math.ceil(d / k))), 1 << 16)
    stride = d // m
    sample = mag[: stride * m : stride]
    q = max(1, int(sample.numel() * 2 * k / d))  # the sample quantile that about 2k of d entries reach
    t = torch.topk(sample, q, sorted=False).values.min()
    cand = torch.nonzero(mag >= t).reshape(-1)
    if cand.numel() < k:
        return torch.topk(mag, k, sorted=False).indices
    return cand.index_select(0, torch.topk(mag.index_select(0, cand), k, sorted=False).indices)


def random_subset(d: int, k: int, gen: torch.Generator) -> Tensor:
    """k distinct indices of range(d), uniform over k-subsets, from ``gen`` (CPU, int64).

    For k << d: the distinct values of about 1.25k uniform draws form a uniform
    random subset given its size, and a uniform k-subset of it is a uniform
    k-subset of range(d). Falls back to a permutation when too few distinct values
    came up (the same decision on every rank: it depends only on the generator).
    """
    if 4 * k > d:
        return torch.randperm(d, generator=gen)[:k]
    draws = torch.randint(0, d, (k + k // 4 + 16,), generator=gen)
    distinct = torch.unique(draws)
    if distinct.numel() < k:
        return torch.randperm(d, generator=gen)[:k]
    return distinct.index_select(0, torch.randperm(distinct.numel(), generator=gen)[:k])


_REGISTRY: dict[str, Callable[..., Compressor]] = {
    "topk": TopK,
    "randk": RandK,
    "scaled_randk": ScaledRandK,
    "scaledrandk": ScaledRandK,
    "none": Identity,
    "identity": Identity,
    "dense": Identity,
}


def make_compressor(spec: "str | Compressor") -> Compressor:
    """A compressor from an instance or a string ``"topk:0.01"``, ``"randk:0.05"``, ``"topk:k=100"``.

    A number below or equal to 1 with a dot is a ratio; ``k=N`` or an integer
    above 1 is a fixed k. ``"none"`` gives the identity.
    """
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a Compressor or a string like 'topk:0.01', got {type(spec).__name__}")
    name, _, arg = spec.strip().lower().partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(set(_REGISTRY))}")
    cls = _REGISTRY[name]
    if cls is Identity:
        if arg:
            raise ValueError(f"compressor 'none' takes no argument, got {spec!r}")
        return Identity()
    if not arg:
        raise ValueError(f"compressor {name!r} needs a ratio or k, e.g. '{name}:0.01' or '{name}:k=100'")
    try:
        if arg.startswith("k="):
            return cls(k=int(arg[2:]))
        if "." in arg or "e" in arg:
            return cls(ratio=float(arg))
        value = int(arg)
        return cls(ratio=1.0) if value == 1 else cls(k=value)
    except ValueError as exc:
        raise ValueError(f"bad compressor spec {spec!r}: {exc}") from None
