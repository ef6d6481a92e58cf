"""The compact-message kernels (SPEC §9) compiled as OpenCL C (PoCL) against the reference ops, bit for bit.

* chunked TopK (csrc/topk_chunked.cu) against :meth:`TorchOps.topk_chunked` and a NumPy per-chunk lexsort:
  chunk sizes 2 to 65536, d a multiple of the chunk, not a multiple, below it; k_c = 1 … chunk and the
  last chunk's own k; gaussian, heavy-tailed, wide, tied, opposite-sign, all-zero and NaN/inf inputs;
  fp32 / bf16 / fp16 (fp64: the reference op);
* the value codecs (csrc/codecs.cu): int8/int4 absmax quantize (group sizes 1 to 65536, ties of the
  quotient on k + 0.5 exactly and within an ulp, NaN/inf poisoning, zero groups, subnormal scales),
  dequantize, int4 packing, fp32 → bf16 rounding; and whole messages through :class:`WireFormat` with
  ``COMMOPT_KERNELS=opencl`` against the reference path.

The DeviceOps here are the kernels themselves (not the self-checked set of :func:`commopt.kernels.ops`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from commopt import kernels
from commopt.codecs import WireFormat
from commopt.kernels.reference import TorchOps
from kernel_cases import (CHUNK_CASES, CODEC_KINDS, KINDS, assert_bitwise, assert_increasing, chunk_ks,
                          check_quantize, codec_input, last_ks, make, np_topk_chunked, opencl_ops, requires_opencl)

pytestmark = requires_opencl()

REF = TorchOps()


@pytest.fixture(scope="module")
def dev():
    return opencl_ops()


# -- chunked TopK ------------------------------------------------------------------------------------


def _check_chunked(dev, x, chunk, kf, kl, independent=True):
    d = x.numel()
    got = dev.topk_chunked(x, chunk, kf, kl)
    want = REF.topk_chunked(x, chunk, kf, kl)
    what = f"topk_chunked d={d} chunk={chunk} k_full={kf} k_last={kl} {x.dtype}"
    assert_bitwise(got, want, what)
    nfull, rem = divmod(d, chunk)
    assert got.numel() == nfull * min(kf, chunk) + (min(kl, rem) if rem else 0), what
    if independent:
        np.testing.assert_array_equal(got.numpy(), np_topk_chunked(x, chunk, kf, kl), err_msg=what)
    # increasing within each chunk, each index in its chunk
    start = 0
    for c in range(nfull + (1 if rem else 0)):
        n = chunk if c < nfull else rem
        k = min(kf if c < nfull else kl, n)
        part = got[start:start + k] - c * chunk
        assert_increasing(part, n)
        start += k


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,chunk", CHUNK_CASES)
def test_topk_chunked_matches_reference_and_lexsort(dev, kind, d, chunk):
    x = make(kind, d, seed=11)
    for kf in chunk_ks(chunk):
        for kl in last_ks(d, chunk, kf):
            _check_chunked(dev, x, chunk, kf, kl, independent=(chunk < 65536 or kf in (1, chunk)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["gauss", "ties", "nan"])
def test_topk_chunked_other_dtypes(dev, kind, dtype):
    """bf16/fp16 go to the kernel as fp32 (exact, same key order); fp64 to the reference op."""
    for d, chunk in ((5000, 256), (4097, 4096), (300, 2)):
        x = make(kind, d, seed=3, dtype=dtype)
        for kf in (1, max(1, chunk // 100), chunk):
            _check_chunked(dev, x, chunk, kf, max(1, kf // 2))


def test_topk_chunked_ties_go_to_the_lowest_index_of_each_chunk(dev):
    d, chunk = 10_000, 1000
    x = make("opposite", d)
    for kf in (1, 17, 999):
        want = (torch.arange(kf)[None, :] + torch.arange(0, d, chunk)[:, None]).reshape(-1)
        assert_bitwise(dev.topk_chunked(x, chunk, kf, 1), want, f"equal magnitudes k={kf}")


def test_topk_chunked_nan_above_inf_within_a_chunk(dev):
    x = torch.randn(1024)
    x[[5, 700]] = float("inf")
    x[[9, 600]] = -float("nan")
    x[[300, 1000]] = float("nan")
    got = dev.topk_chunked(x, 512, 3, 3)
    assert_bitwise(got, REF.topk_chunked(x, 512, 3, 3))
    assert set(got[:3].tolist()) == {5, 9, 300} and set(got[3:].tolist()) == {600, 700, 1000}


def test_topk_chunked_large_grid_and_2d(dev):
    # more chunks than the grid's 65536 blocks: blocks loop over chunks
    x = make("heavy", 2 * 70_000 + 1, seed=5)
    _check_chunked(dev, x, 2, 1, 1, independent=False)
    y = make("ties", 6_000, seed=6).reshape(60, 100)
    assert_bitwise(dev.topk_chunked(y, 256, 5, 2), REF.topk_chunked(y.reshape(-1), 256, 5, 2), "2-d")


def test_topk_chunked_falls_back_outside_the_kernel(dev):
    x = make("gauss", 70_000, seed=8)
    # a chunk past 16-bit indices, and a non-contiguous input: the reference op
    assert_bitwise(dev.topk_chunked(x, 69_000, 3, 1), REF.topk_chunked(x, 69_000, 3, 1))
    assert_bitwise(dev.topk_chunked(x[::2], 256, 3, 1), REF.topk_chunked(x[::2], 256, 3, 1))


def test_topk_chunked_does_not_modify_its_input(dev):
    x = make("nan", 5000, seed=9)
    before = x.clone()
    dev.topk_chunked(x, 256, 7, 3)
    assert_bitwise(x, before)


# -- integer codecs ----------------------------------------------------------------------------------

GROUPS = [1, 2, 3, 7, 16, 255, 256, 1000, 65536]
SIZES = [1, 2, 5, 16, 257, 4097, 70_001]


def _check_quantize(dev, v, bits, group, what=""):
    return check_quantize(dev, REF, v, bits, group, what)


@pytest.mark.parametrize("bits,group", [(8, 256), (4, 16), (8, 1), (4, 3), (8, 1000), (4, 65536), (8, 7)])
@pytest.mark.parametrize("kind", CODEC_KINDS)
def test_quantize_matches_reference(dev, kind, bits, group):
    q = 2 ** (bits - 1) - 1
    for k in SIZES:
        v = codec_input(kind, k, seed=1, group=group, q=q)
        _check_quantize(dev, v, bits, group, kind)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_exact_ties_round_half_to_even(dev, bits):
    """A power-of-two scale: v / s is exactly m + 0.5, which must go to the even neighbour."""
    q = 2 ** (bits - 1) - 1
    v = codec_input("half", 4096, seed=2, group=64, q=q)
    codes, scales = _check_quantize(dev, v, bits, 64)
    assert bool((scales == 0.125).all())
    m = (v / 0.125).double()
    tie = (m - m.floor()) == 0.5
    assert int(tie.sum()) > 1000
    assert bool((codes[tie].long() % 2 == 0).all())


@pytest.mark.parametrize("bits,group", [(8, 256), (4, 16), (8, 5)])
def test_quantize_near_ties(dev, bits, group):
    q = 2 ** (bits - 1) - 1
    for seed in range(4):
        _check_quantize(dev, codec_input("near_half", 50_000, seed=seed, group=group, q=q), bits, group)


@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 255, 256, 4999])
@pytest.mark.parametrize("bits,group", [(8, 256), (4, 16)])
def test_quantize_poisoning(dev, bad, where, bits, group):
    """One non-finite value anywhere: every scale NaN, every code 0, everything decodes to NaN."""
    v = make("gauss", 5000, seed=4)
    v[where] = bad
    codes, scales = _check_quantize(dev, v, bits, group)
    assert bool(scales.isnan().all()) and bool((codes == 0).all())
    assert bool(dev.dequantize(codes, scales, group, torch.float32).isnan().all())


def test_quantize_zero_and_underflowing_groups(dev):
    v = torch.zeros(1000)
    v[500:] = -0.0
    codes, scales = _check_quantize(dev, v, 8, 100)
    assert bool((scales == 0).all()) and bool((codes == 0).all())
    v = torch.full((64,), 1e-44)        # max / 127 underflows fp32: scale 0, decodes to 0
    v[32:] = 3e-43                      # a subnormal scale
    codes, scales = _check_quantize(dev, v, 8, 32)
    assert float(scales[0]) == 0.0 and float(scales[1]) > 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_quantize_other_dtypes(dev, dtype):
    """bf16/fp16 values go to the kernel as fp32 (exact); fp64 to the reference op."""
    for kind in ("gauss", "heavy", "ties", "nan"):
        _check_quantize(dev, make(kind, 3000, seed=5, dtype=dtype), 8, 256, kind)
        _check_quantize(dev, make(kind, 3001, seed=5, dtype=dtype), 4, 16, kind)


def test_quantize_codes_against_an_independent_rule(dev):
    """NumPy float64: s = fp32(max|v|/q), code = rint(v/s) clipped (np.rint rounds half to even)."""
    v = codec_input("near_half", 10_000, seed=7, group=256)
    codes, scales = dev.quantize(v, 8, 256)
    a = v.numpy().astype(np.float64)
    for g in range(0, a.size, 256):
        seg = a[g:g + 256]
        s = np.float32(np.abs(seg).max() / 127)
        assert scales[g // 256].item() == s
        np.testing.assert_array_equal(codes[g:g + 256].numpy(), np.clip(np.rint(seg / np.float64(s)), -127, 127))


@pytest.mark.parametrize("k", [1, 2, 3, 255, 256, 4097])
def test_int4_pack_unpack(dev, k):
    g = torch.Generator().manual_seed(k)
    c = torch.randint(-8, 8, (k,), generator=g).to(torch.int8)
    p = dev.pack_int4(c)
    assert_bitwise(p, REF.pack_int4(c), f"pack k={k}")
    assert p.numel() == (k + 1) // 2
    assert_bitwise(dev.unpack_int4(p, k), c, f"unpack k={k}")
    # every byte value decodes as the reference
    allb = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert_bitwise(dev.unpack_int4(allb, 512), REF.unpack_int4(allb, 512))
    assert_bitwise(dev.unpack_int4(allb, 511), REF.unpack_int4(allb, 511))


def test_dequantize_other_dtypes(dev):
    c, s = REF.quantize(make("heavy", 3000, seed=6), 8, 64)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert_bitwise(dev.dequantize(c, s, 64, dt), REF.dequantize(c, s, 64, dt), f"{dt}")


# -- bf16 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 7, 4097, 100_003])
def test_bf16_matches_reference(dev, kind, d):
    x = make(kind, d, seed=8)
    assert_bitwise(dev.to_bf16(x), REF.to_bf16(x), f"bf16 {kind} d={d}")


def test_bf16_rounding_edges(dev):
    """Exact ties of the 16 dropped bits (to even), just above/below, the largest finite (to inf),
    subnormals, NaN payloads of both signs (PyTorch's NaN on this device), ±inf, ±0."""
    hi = torch.randint(0, 1 << 16, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    lows = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0001], dtype=torch.int64)
    b = ((hi[:, None] << 16) | lows[None, :]).reshape(-1)
    b = torch.cat([b, torch.tensor([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00001,
                                    0x7FFFFFFF, 0x00000001, 0x80008000, 0, 0x80000000, 0x7F7F8000])])
    x = torch.where(b >= (1 << 31), b - (1 << 32), b).to(torch.int32).view(torch.float32)
    assert_bitwise(dev.to_bf16(x), REF.to_bf16(x), "bf16 edges")
    xb = x.to(torch.bfloat16)   # already bf16: unchanged; fp16: the reference op
    assert_bitwise(dev.to_bf16(xb), xb)
    xh = make("wide", 1000).to(torch.float16)
    assert_bitwise(dev.to_bf16(xh), REF.to_bf16(xh))


# -- whole messages through the dispatch ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", [WireFormat(chunk=256, values="int8"), WireFormat(chunk=4096, values="int4"),
                                 WireFormat(values="int4", group=7), WireFormat(chunk=2, values="bf16"),
                                 WireFormat(values="int8", group=65536)])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "nan", "zeros"])
def test_wire_format_with_the_opencl_kernels_matches_the_reference(monkeypatch, fmt, kind):
    from commopt.compressors import TopK

    d = 20_001
    x = make(kind, d, seed=12)
    comp = TopK(ratio=0.01, chunk=fmt.chunk) if fmt.chunk else TopK(ratio=0.01)
    k = comp.num_selected(d)

    def run():
        idx = comp.select(x, k, 0, 0)
        vals = x.index_select(0, idx)
        p = fmt.pack(idx, vals, d, comp.chunk_k(d, k) if fmt.chunk else None)
        return idx, p.data, *p.decode(), fmt.roundtrip_values(vals)

    monkeypatch.setenv("COMMOPT_KERNELS", "torch")
    kernels.reset()
    want = run()
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    kernels.reset()
    try:
        o = kernels.ops(x)
        assert o.name == "opencl" and not o.failed
        got = run()
    finally:
        kernels.reset()
    for g, w, what in zip(got, want, ("idx", "bytes", "decoded idx", "decoded vals", "roundtrip")):
        assert_bitwise(g, w, f"{fmt} {kind} {what}")
