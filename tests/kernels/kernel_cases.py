"""What the kernel tests share: the input kinds, the k values, bitwise comparison (CPU and GPU files)."""

from __future__ import annotations

import torch

_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

KINDS = ("gauss", "heavy", "wide", "ties", "opposite", "zeros", "nan")


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(_INT[t.element_size()])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape, device and bit pattern (NaN payloads and the sign of zero included)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.device == want.device, f"{what}: device {got.device} != {want.device}"
    bad = (bits(got) != bits(want)).nonzero().reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} of {got.numel()} elements differ, first at {i}: "
                             f"{got.reshape(-1)[i].item()!r} vs {want.reshape(-1)[i].item()!r}")


def assert_increasing(idx: torch.Tensor, d: int, device: str = "cpu") -> None:
    assert idx.dtype == torch.int64 and idx.device.type == device
    if idx.numel():
        assert int(idx[0]) >= 0 and int(idx[-1]) < d
    if idx.numel() > 1:
        assert bool((idx[1:] > idx[:-1]).all()), "indices not strictly increasing"


def make(kind: str, d: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """A float32 input of one kind, generated on ``device``, cast to ``dtype`` at the end."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + d)
    kw = {"generator": g, "device": device}
    if kind == "gauss":
        x = torch.randn(d, **kw)
    elif kind == "heavy":      # Cauchy-like: randn / rand²
        x = torch.randn(d, **kw) / (torch.rand(d, **kw) ** 2 + 1e-30)
    elif kind == "wide":       # every binade from subnormals to near the top, random signs
        e = torch.randint(-149, 127, (d,), **kw)
        m = 1.0 + torch.rand(d, **kw)
        x = torch.ldexp(m, e.float()) * (torch.randint(0, 2, (d,), **kw).float() * 2 - 1)
    elif kind == "ties":       # small integers: many ties, of both signs, and zeros of both signs
        x = torch.randint(-3, 4, (d,), **kw).float()
        x[torch.rand(d, **kw) < 0.1] = -0.0
    elif kind == "opposite":   # one magnitude, random signs: the lowest indices must win
        x = torch.where(torch.rand(d, **kw) < 0.5, 1.5, -1.5)
    elif kind == "zeros":
        x = torch.zeros(d, device=device)
        x[torch.rand(d, **kw) < 0.5] = -0.0
    elif kind == "nan":        # NaN (both signs), ±inf, ties among them
        x = torch.randn(d, **kw)
        u = torch.rand(d, **kw)
        x[u < 0.02] = float("nan")
        x[(u >= 0.02) & (u < 0.03)] = -float("nan")
        x[(u >= 0.03) & (u < 0.05)] = float("inf")
        x[(u >= 0.05) & (u < 0.06)] = -float("inf")
    else:
        raise ValueError(kind)
    return x.to(dtype)


def ks_for(d: int) -> list[int]:
    ks = {1, 2, max(1, d // 1000), max(1, d // 100), max(1, d // 10), d // 2, d - 1, d}
    return sorted(k for k in ks if 1 <= k <= d)


def distinct(d: int, k: int, seed: int, sort: bool, device: str = "cpu") -> torch.Tensor:
    """k distinct indices of range(d) (a message's), sorted or not."""
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randperm(d, generator=g, device=device)[:k]
    return torch.sort(idx).values if sort else idx
