"""What the kernel tests share: the input kinds, the k values, bitwise comparison (CPU and GPU files)."""

from __future__ import annotations

import pytest
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


# -- compact messages (SPEC §9): chunked TopK and the value codecs ----------------------------------------

#: (d, chunk): d a multiple of the chunk, not a multiple, below the chunk; chunk sizes 2 to 65536
CHUNK_CASES = [(1000, 2), (1001, 2), (3, 2), (1, 2), (256 * 5, 256), (256 * 5 + 77, 256), (100, 256),
               (4096 * 3, 4096), (4096 * 3 + 1, 4096), (4000, 4096), (65536 * 2, 65536), (65536 + 4099, 65536),
               (70_000, 65536), (30_000, 65536)]


def chunk_ks(chunk: int) -> "list[int]":
    """k_c values per full chunk: 1, a few, 1%, half, chunk − 1, chunk."""
    return sorted({k for k in (1, 2, max(1, chunk // 100), chunk // 2, chunk - 1, chunk) if 1 <= k <= chunk})


def last_ks(d: int, chunk: int, k_full: int) -> "list[int]":
    """k_last values for the shorter last chunk (1, max(1, k_full·rem/chunk), rem), or [1] without one."""
    rem = d % chunk
    if not rem:
        return [1]
    return sorted({1, max(1, (k_full * rem) // chunk), rem})


def np_topk_chunked(x: torch.Tensor, chunk: int, k_full: int, k_last: int):
    """Independent reference: per chunk, NaN first, then |x| descending, then the lowest index (lexsort)."""
    import numpy as np

    a = np.abs(x.detach().reshape(-1).to(torch.float32).cpu().numpy().astype(np.float64))
    out = []
    for s in range(0, a.size, chunk):
        seg = a[s:s + chunk]
        k = min(k_full if seg.size == chunk else k_last, seg.size)
        nan = np.isnan(seg)
        order = np.lexsort((np.arange(seg.size), -np.where(nan, 0.0, seg), -nan.astype(np.int8)))
        out.append(np.sort(order[:k]) + s)
    return np.concatenate(out).astype(np.int64)


#: value kinds for the codecs beyond KINDS: values whose quotient by the scale is exactly or nearly k + 0.5
CODEC_KINDS = KINDS + ("half", "near_half", "tiny", "zero_groups")


def codec_input(kind: str, k: int, seed: int = 0, group: int = 16, q: int = 127, device: str = "cpu"
                ) -> torch.Tensor:
    """float32 values for the codecs (q: the codec's 2^(b−1) − 1). ``half``: max|v| = q·2^−3 in every group,
    so the scale is 2^−3 and v / s is exactly m + 0.5; ``near_half``: a random scale s per group, v =
    fp32((m + 0.5)·s) or a float neighbour, quotients within an ulp or two of a tie; ``tiny``: values near
    1e−42 (subnormal scales; those that underflow decode to 0); ``zero_groups``: every other group all zero
    (of both signs)."""
    g = torch.Generator(device=device).manual_seed(seed * 7919 + k)
    kw = {"generator": g, "device": device}
    if kind in KINDS:
        return make(kind, k, seed=seed, device=device)
    ng = -(-k // group)
    first = torch.arange(k, device=device) % group == 0
    sign = torch.where(torch.rand(k, **kw) < 0.5, 1.0, -1.0)
    if kind == "half":
        m = torch.randint(-q, q, (k,), **kw).float()
        return torch.where(first, q * 0.125 * sign, (m + 0.5) * 0.125)
    if kind == "near_half":
        s = ((torch.rand(ng, **kw) + 0.5).to(torch.float64) / q).to(torch.float32).to(torch.float64)
        s = s.repeat_interleave(group)[:k]
        m = torch.randint(-q, q, (k,), **kw).to(torch.float64)
        x = ((m + 0.5) * s).to(torch.float32)
        step = torch.randint(-1, 2, (k,), **kw)
        x = torch.where(step > 0, torch.nextafter(x, torch.full_like(x, float("inf"))),
                        torch.where(step < 0, torch.nextafter(x, torch.full_like(x, -float("inf"))), x))
        return torch.where(first, (q * s).to(torch.float32) * sign, x)
    if kind == "tiny":
        return torch.randn(k, **kw) * 1e-42
    if kind == "zero_groups":
        x = torch.randn(k, **kw)
        grp = torch.arange(k, device=device) // group
        x[grp % 2 == 1] = 0.0
        x[(grp % 4 == 1) & (torch.rand(k, **kw) < 0.5)] = -0.0
        return x
    raise ValueError(kind)


def requires_opencl():
    """A skip mark for modules that run the kernels on PoCL: it names why OpenCL is not usable here."""
    try:
        from commopt.kernels.opencl import available
        ok, why = available()
    except Exception as exc:  # noqa: BLE001 -- the import itself must not fail the collection
        ok, why = False, f"{type(exc).__name__}: {exc}"
    return pytest.mark.skipif(not ok, reason=f"OpenCL is not usable here ({why}); "
                              "install pyopencl and an ICD such as Debian's pocl-opencl-icd")


def opencl_ops():
    """The OpenCL kernels themselves (not the self-checked op set of commopt.kernels.ops)."""
    from commopt.kernels.device import DeviceOps
    from commopt.kernels.opencl import OpenCLLauncher

    return DeviceOps(OpenCLLauncher())


def check_quantize(dev, ref, v: torch.Tensor, bits: int, group: int, what: str = "", extra=None):
    """dev's quantize / dequantize / int4 packing of v against ref's, bit for bit; ``extra(codes, scales,
    what)`` adds comparisons (e.g. against the CPU). Returns dev's (codes, scales)."""
    gc, gs = dev.quantize(v, bits, group)
    rc, rs = ref.quantize(v, bits, group)
    what = f"quantize bits={bits} G={group} k={v.numel()} {v.dtype} {what}"
    assert_bitwise(gc, rc, what + " codes")
    assert_bitwise(gs, rs, what + " scales")
    if extra is not None:
        extra(gc, gs, what)
    for dt in (torch.float32, torch.bfloat16):
        assert_bitwise(dev.dequantize(gc, gs, group, dt), ref.dequantize(rc, rs, group, dt), what + f" decoded {dt}")
    if bits == 4:
        p = dev.pack_int4(gc)
        assert_bitwise(p, ref.pack_int4(rc), what + " packed")
        assert_bitwise(dev.unpack_int4(p, v.numel()), rc, what + " unpacked")
    return gc, gs
