"""Sparsifying compressors: TopK, RandK, ScaledRandK, and the name registry.

A compressor turns a flat vector ``p`` (one DDP bucket) into a fixed-size
message ``(indices[k], values[k])``. Compressors never communicate and hold no
state: the same call on the same input gives the same message on every rank.

A compressor is *contractive* with parameter δ when E‖C(x) − x‖² ≤ (1 − δ)‖x‖²
(SPEC §1). TopK and the unscaled RandK have δ = k/d; ScaledRandK is unbiased but
not contractive, so it is refused by every error-feedback rule.

Compact messages (SPEC §9): ``TopK(ratio, chunk=c)`` keeps max(1, ⌊ratio·c⌋) entries of every chunk of
c (chunk-local 16-bit indices on the wire), and ``values="bf16"/"int8"/"int4"`` quantizes the sent values
(:mod:`commopt.codecs`); :meth:`Compressor.encode` gives the message as every rank decodes it, which is
what the feedback rules use as the rank's own message m_i.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import kernels
from .codecs import VALUE_CODECS, Packed, WireFormat, check_chunk, check_group, check_values

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

    #: the wire format (SPEC §9); today's (global indices, values in the wire dtype) unless set
    wire: WireFormat = WireFormat()

    @property
    def chunk(self) -> Optional[int]:
        return self.wire.chunk

    @property
    def values_codec(self) -> str:
        return self.wire.values

    def chunk_k(self, d: int, k: int) -> Optional[int]:
        """Entries per full chunk of a chunked message of k of d values (None: not chunked)."""
        return None

    def encode(self, idx: Tensor, vals: Tensor, d: int) -> "tuple[Optional[Packed], Tensor]":
        """(packed message or None, the values as every rank decodes them) of a message (idx, vals) whose
        values are already in the wire dtype. None for today's format (the exchange packs it itself) and
        for shared-index compressors (the all-reduce carries float values: SPEC §9)."""
        fmt = self.wire
        if fmt.default:
            return None, vals
        if self.shared_indices:
            return None, fmt.roundtrip_values(vals)
        packed = fmt.pack(idx, vals, d, self.chunk_k(d, vals.numel()))
        # decode our own bytes: bitwise what every other rank decodes from them
        return packed, packed.decode()[1]

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
        """(indices, values) of C(x) for a flat vector x; with a value codec the values are Q(C(x))'s,
        decoded (SPEC §9), in x's dtype."""
        d = x.numel()
        k = self.num_selected(d)
        idx = self.select(x, k, step, key)
        return idx, self.encode(idx, self.values(x, idx), d)[1]

    def dense(self, x: Tensor, step: int = 0, key: int = 0) -> Tensor:
        """C(x) (Q(C(x)) with a value codec) as a dense vector (for tests and references)."""
        idx, val = self.compress(x, step, key)
        return torch.zeros_like(x).index_put_((idx,), val)

    def config(self) -> dict:
        """What must agree across ranks and checkpoints (the wire keys only when not today's format, so
        configs and checkpoints made before SPEC §9 compare equal)."""
        return {"name": self.name, "ratio": self.ratio, "k": self.k, **self.wire.config()}

    def spec(self) -> str:
        return f"{self.name}:{self.ratio if self.ratio is not None else f'k={self.k}'}{self.wire.spec_suffix()}"

    def _wire_repr(self) -> str:
        w = self.wire
        return "".join([f", chunk={w.chunk}" if w.chunk is not None else "",
                        f", values={w.values!r}" if w.values != "float" else "",
                        f", group={w.group}" if w.group is not None else ""])

    def __repr__(self) -> str:
        arg = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return f"{type(self).__name__}({arg}{self._wire_repr()})"


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

    ``chunk=c`` (SPEC §9, needs ``ratio``): the same rule within each chunk of c entries (the last may be
    shorter), keeping k_c = max(1, ⌊ratio·c⌋) of every full chunk and max(1, ⌊ratio·c_last⌋) of the last;
    contractive with δ = min over chunks k_c / c; indices travel chunk-local in 16 bits.
    ``values``: the value codec ("float", "bf16", "int8", "int4"; :mod:`commopt.codecs`), ``group`` the
    scale group of the integer codecs (default 256 / 16). Q∘C is contractive with δ' = (1 − ε²)·δ.
    """

    name = "topk"

    def __init__(self, ratio: float | None = None, k: int | None = None, chunk: int | None = None,
                 values: str = "float", group: int | None = None) -> None:
        super().__init__(ratio=ratio, k=k)
        who = type(self).__name__
        chunk = check_chunk(chunk, who)
        if chunk is not None and self.ratio is None:
            raise ValueError(f"{who}: chunk= needs ratio= (each chunk keeps max(1, floor(ratio*chunk)) entries), "
                             f"got k={self.k}")
        values = check_values(values, VALUE_CODECS, who)
        self.wire = WireFormat(chunk=chunk, values=values, group=check_group(group, values, who))

    def _chunk_counts(self, d: int) -> "tuple[int, int, int, int]":
        """(entries per full chunk, full chunks, entries of the last chunk, its length) for d values."""
        c = self.wire.chunk
        assert c is not None and self.ratio is not None
        nfull, rem = divmod(d, c)
        k_full = min(c, max(1, int(math.floor(self.ratio * c))))
        k_last = min(rem, max(1, int(math.floor(self.ratio * rem)))) if rem else 0
        return k_full, nfull, k_last, rem

    def num_selected(self, d: int) -> int:
        """max(1, ⌊ratio·d⌋) or min(k, d); chunked: Σ over chunks of max(1, ⌊ratio·c_chunk⌋)."""
        if self.wire.chunk is None:
            return super().num_selected(d)
        if d < 1:
            raise ValueError(f"cannot compress an empty vector (d={d})")
        k_full, nfull, k_last, _ = self._chunk_counts(d)
        return nfull * k_full + k_last

    def chunk_k(self, d: int, k: int) -> Optional[int]:
        if self.wire.chunk is None:
            return None
        if k >= d:
            return self.wire.chunk  # everything: every chunk keeps all of its entries
        k_full, _, _, _ = self._chunk_counts(d)
        if k != self.num_selected(d):
            raise ValueError(f"{self!r}: a chunked TopK keeps {self.num_selected(d)} of {d} values "
                             f"(max(1, floor(ratio*chunk)) per chunk), not k={k} (a density warm-up or another "
                             "k per bucket is not supported with chunk=)")
        return k_full

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        c = self.wire.chunk
        if c is None:
            return kernels.ops(x).topk(x, k)
        d = x.numel()
        if k >= d:
            return torch.arange(d, device=x.device)
        k_full = self.chunk_k(d, k)
        _, _, k_last, _ = self._chunk_counts(d)
        return kernels.ops(x).topk_chunked(x, c, k_full, k_last)


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

    #: the value codecs a shared all-reduce can sum (SPEC §9: sums of low-bit codes overflow)
    VALUES = ("float", "bf16")

    def __init__(self, ratio: float | None = None, k: int | None = None, seed: int = 0,
                 values: str = "float") -> None:
        super().__init__(ratio=ratio, k=k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{type(self).__name__}: seed must be an integer, got {seed!r}")
        self.seed = seed
        # values="bf16": the sent values are rounded to bf16 (and fed back as such); the all-reduce still
        # carries them in the gradient's dtype, so the sum is the float sum of the decoded messages
        who = type(self).__name__
        if isinstance(values, str) and values.strip().lower() in VALUE_CODECS and values.strip().lower() not in self.VALUES:
            raise ValueError(f"{who}: values must be one of {', '.join(repr(a) for a in self.VALUES)}, got "
                             f"{values!r} (its indices are shared, so the values are all-reduced: sums of "
                             "low-bit codes overflow)")
        self.wire = WireFormat(values=check_values(values, self.VALUES, who))

    def select(self, x: Tensor, k: int, step: int, key: int) -> Tensor:
        return kernels.ops(x).randk(x.numel(), k, _seed(self.seed, step, key), x.device)

    def config(self) -> dict:
        return {**super().config(), "seed": self.seed}

    def __repr__(self) -> str:
        arg = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return f"{type(self).__name__}({arg}, seed={self.seed}{self._wire_repr()})"

    def spec(self) -> str:
        return super().spec() + (f",seed={self.seed}" if self.seed else "")


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


#: the options a spec string may give after the ratio or k, per compressor
_OPTIONS: dict[type, tuple[str, ...]] = {TopK: ("chunk", "values", "group"), RandK: ("values", "seed"),
                                         ScaledRandK: ("values", "seed")}


def _int_option(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def make_compressor(spec: "str | Compressor") -> Compressor:
    """A compressor from an instance or a string ``"topk:0.01"``, ``"randk:0.05"``, ``"topk:k=100"``,
    with options after the ratio or k: ``"topk:0.01,chunk=4096,values=int8"`` (TopK: chunk, values,
    group; RandK: values, seed; SPEC §9).

    A number below or equal to 1 with a dot is a ratio; ``k=N`` or an integer
    above 1 is a fixed k. ``"none"`` gives the identity.
    """
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a Compressor or a string like 'topk:0.01', got {type(spec).__name__}")
    name, _, arg = spec.strip().lower().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; known: {sorted(set(_REGISTRY))}")
    cls = _REGISTRY[name]
    if cls is Identity:
        if arg:
            raise ValueError(f"compressor 'none' takes no argument, got {spec!r}")
        return Identity()
    if not arg:
        raise ValueError(f"compressor {name!r} needs a ratio or k, e.g. '{name}:0.01' or '{name}:k=100'")
    first, *rest = [part.strip() for part in arg.split(",")]
    try:
        if first.startswith("k="):
            size: dict = {"k": int(first[2:])}
        elif "=" in first or not first:
            raise ValueError(f"the ratio or k comes first, e.g. '{name}:0.01,{first}'")
        elif "." in first or "e" in first:
            size = {"ratio": float(first)}
        else:
            value = int(first)
            size = {"ratio": 1.0} if value == 1 else {"k": value}
        known = _OPTIONS[cls]
        opts: dict = {}
        for part in rest:
            key, eq, text = part.partition("=")
            key, text = key.strip(), text.strip()
            if not eq or not key or not text:
                raise ValueError(f"options are key=value ({', '.join(known)}), got {part!r}")
            if key not in known:
                raise ValueError(f"unknown option {key!r} for {name}; known: {', '.join(known)}")
            if key in opts:
                raise ValueError(f"option {key!r} given twice")
            opts[key] = text if key == "values" else _int_option(key, text)
        return cls(**size, **opts)
    except ValueError as exc:
        raise ValueError(f"bad compressor spec {spec!r}: {exc}") from None
