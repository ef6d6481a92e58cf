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

from . import kernels

__all__ = ["Compressor", "TopK", "RandK", "ScaledRandK", "Identity", "make_compressor"]


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
        return kernels.ops(x).gather(x, idx)

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
    Stich et al., NeurIPS 2018). Exact; among equal magnitudes the lowest index wins, NaN ranks above
    inf, and the indices come in increasing order (SPEC §10), on every kernel path.
    """

    name = "topk"

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        return kernels.ops(x).topk(x, k)


def _seed(seed: int, step: int, key: int) -> int:
    """A 63-bit seed from (user seed, step, bucket key), stable across processes and platforms."""
    h = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class RandK(Compressor):
    """k coordinates, one from each of k strata of [0, d), **unscaled**: C(x) = x ⊙ 1_S, |S| = k.

    The strata are [⌊s·d/k⌋, ⌊(s+1)·d/k⌋); the index in stratum s comes from a counter-based hash of
    (seed, step, bucket key, s) (SPEC §10), the same on every rank, on every kernel path and never
    from the global RNG, so the values can be all-reduced. Coordinate j is chosen with probability
    1/|stratum(j)| ≈ k/d, so E‖C(x) − x‖² = (1 − k/d)‖x‖² when k divides d, and δ ≥ 1/⌈d/k⌉
    otherwise: contractive in expectation, so it composes with error feedback (Stich et al.,
    NeurIPS 2018).
    """

    name = "randk"
    shared_indices = True

    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0) -> None:
        super().__init__(ratio=ratio, k=k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{type(self).__name__}: seed must be an integer, got {seed!r}")
        self.seed = seed

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        return kernels.ops(x).randk(x.numel(), k, _seed(self.seed, step, key), x.device)

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
        return kernels.ops(x).gather(x, idx) * (d / k)


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
