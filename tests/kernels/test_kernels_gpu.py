"""The csrc/ kernels on CUDA (CuPy/NVRTC) against the reference ops, bit for bit (SPEC §10), and a
compressed DDP step with the CUDA kernel path active under ``torch.cuda.set_sync_debug_mode("error")``.

Skips without a CUDA device or without CuPy (``pip install 'commopt[cuda]'``). Run it whenever a GPU is
available: sizes 1 to 100M, fp32 / bf16 / fp16 inputs to TopK (and to chunked TopK and the value codecs of
SPEC §9, with the cases of tests/kernels/test_kernels_compact.py), every op of
:class:`commopt.kernels.device.DeviceOps` over a :class:`CudaLauncher` (the kernels themselves, not the
self-checked set) compared with :class:`commopt.kernels.reference.TorchOps` on the same CUDA tensors,
and the index outputs also with the reference ops on the CPU.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

from commopt.kernels.reference import TorchOps, randk_strata

import kernel_cases
from kernel_cases import KINDS, assert_bitwise, ks_for

# the shared input kinds, generated on the GPU
make = functools.partial(kernel_cases.make, device="cuda")
assert_increasing = functools.partial(kernel_cases.assert_increasing, device="cuda")
_distinct = functools.partial(kernel_cases.distinct, device="cuda")


def _why_not() -> "str | None":
    if not torch.cuda.is_available():
        return "no CUDA device here: the CUDA kernel tests need one"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); pip install 'commopt[cuda]'"
    return None


_WHY = _why_not()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

REF = TorchOps()
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def dev():
    from commopt.kernels.cuda import CudaLauncher
    from commopt.kernels.device import DeviceOps

    return DeviceOps(CudaLauncher(torch.device("cuda", torch.cuda.current_device())))


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def assert_bitwise_or_both_nan(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """GPU vs CPU results: bitwise except NaN payloads (the GPU returns its canonical NaN)."""
    got, want = got.cpu(), want.cpu()
    both = got.isnan() & want.isnan()
    assert_bitwise(torch.where(both, torch.zeros_like(got), got), torch.where(both, torch.zeros_like(want), want),
                   what)


def _check_topk(dev, x: torch.Tensor, k: int, on_cpu: bool = True) -> None:
    d = x.numel()
    got = dev.topk(x, k)
    assert got.shape == (k,)
    assert_increasing(got, d)
    want = REF.topk(x, k)
    assert_bitwise(got, want, f"topk d={d} k={k} {x.dtype}")
    assert_bitwise(dev.gather(x, got), REF.gather(x, want), f"topk values d={d} k={k}")
    if on_cpu:  # the reference on the CPU (its sampled pre-selection included)
        assert_bitwise(got.cpu(), REF.topk(x.cpu(), k), f"topk vs CPU d={d} k={k}")


SMALL = [1, 2, 3, 7, 255, 256, 257, 2047, 2048, 2049, 4097, 65_537, 1_048_577]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", SMALL)
def test_topk(dev, kind, d):
    x = make(kind, d)
    for k in ks_for(d):
        _check_topk(dev, x, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gauss", "ties", "nan"])
@pytest.mark.parametrize("d", [25_000_000, 100_000_000])
def test_topk_large(dev, kind, dtype, d):
    x = make(kind, d, seed=1, dtype=dtype)
    for k in (1, d // 1000, d // 100, d // 10):
        _check_topk(dev, x, k, on_cpu=(d <= 25_000_000 and k <= d // 100 and dtype == torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 5, 2049, 70_001, 3_000_000])
def test_topk_half_precision(dev, kind, dtype, d):
    x = make(kind, d, seed=2, dtype=dtype)
    for k in ks_for(d):
        _check_topk(dev, x, k, on_cpu=d <= 100_000)


def test_topk_ties_go_to_the_lowest_index(dev):
    d = 5_000_000
    x = make("opposite", d)
    for k in (1, 17, 2048, 2049, d // 3, d - 1):
        assert_bitwise(dev.topk(x, k), torch.arange(k, device="cuda"), f"equal magnitudes k={k}")


def test_topk_nan_payloads(dev):
    x = torch.randn(300, device="cuda")
    x[[5, 50, 150]] = float("inf")
    vals = torch.tensor([0x7FC00001, 0x7FFFFFFF, -4194304, 0x7F800001, 0x7FC00000], dtype=torch.int32, device="cuda")
    x.view(torch.int32)[torch.tensor([3, 10, 20, 30, 40], device="cuda")] = vals
    for k in range(1, 10):
        _check_topk(dev, x, k)


def test_topk_on_a_side_stream(dev):
    """Kernels run on the current stream: ordered with the torch work around them, no synchronisation."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = make("heavy", 10_000_000, seed=5)
        got = dev.topk(x * 2, 100_000)
        vals = dev.gather(x, got)
    s.synchronize()
    want = REF.topk(x, 100_000)
    assert_bitwise(got, want)
    assert_bitwise(vals, x[want])


# -- RandK -----------------------------------------------------------------------------------------

SEEDS = [0, 7, 0xFFFFFFFF, 1 << 32, (1 << 62) + 5, (1 << 63) - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("d,k", [(2, 1), (10, 3), (1000, 999), (4097, 100), (1 << 20, 1 << 10),
                                 (25_000_000, 250_000), (100_000_000, 1_000_000), (100_000_000, 99_999_999),
                                 ((1 << 31) - 1, 100_000)])
def test_randk(dev, d, k, seed):
    got = dev.randk(d, k, seed, CUDA)
    assert_increasing(got, d)
    assert_bitwise(got, randk_strata(d, k, seed, CUDA), f"randk d={d} k={k}")
    if k <= 1_000_000:
        assert_bitwise(got.cpu(), randk_strata(d, k, seed, "cpu"), "randk vs CPU")


def test_randk_all(dev):
    for d in (1, 5, 1000):
        assert_bitwise(dev.randk(d, d, 3, CUDA), torch.arange(d, device="cuda"))


# -- gather / scatter / ordered sum ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gauss", "wide", "nan"])
@pytest.mark.parametrize("d", [1, 257, 65_537, 25_000_000, 100_000_000])
def test_gather_and_scatter(dev, kind, d):
    x = make(kind, d, seed=6)
    for k, sort in ((1, True), (max(1, d // 100), False), (max(1, d // 7), True)):
        idx = _distinct(d, k, d + k, sort)
        got = dev.gather(x, idx)
        assert_bitwise(got, REF.gather(x, idx), f"gather d={d} k={k}")
        vals = make("heavy", k, seed=8)
        for sign in (1.0, -1.0):
            got = dev.scatter_add_(x.clone(), idx, vals, sign)
            assert_bitwise(got, REF.scatter_add_(x.clone(), idx, vals, sign), f"scatter d={d} k={k} sign={sign}")
            if d <= 65_537:
                assert_bitwise_or_both_nan(got, REF.scatter_add_(x.cpu(), idx.cpu(), vals.cpu(), sign), "vs CPU")


@pytest.mark.parametrize("val_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,n,k", [(1, 4, 1), (2049, 7, 300), (100_003, 4, 30_001), (25_000_000, 8, 250_000),
                                   (100_000_000, 4, 1_000_000)])
def test_ordered_sum(dev, d, n, k, val_dtype):
    msgs = [(_distinct(d, k, d + r, sort=(r % 2 == 0)).to(torch.int32 if r % 3 == 1 else torch.int64),
             make("heavy", k, seed=100 + r, dtype=val_dtype)) for r in range(n)]
    got = dev.ordered_sum(msgs, torch.full((d,), 7.0, device="cuda"))
    assert_bitwise(got, REF.ordered_sum(msgs, torch.empty(d, device="cuda")), f"ordered_sum d={d} n={n}")
    if d <= 100_003:
        cpu = [(i.cpu(), v.cpu()) for i, v in msgs]
        assert_bitwise_or_both_nan(got, REF.ordered_sum(cpu, torch.empty(d)), "vs CPU")


# -- feedback inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [("gauss", "gauss", "gauss"), ("heavy", "wide", "ties"), ("nan", "gauss", "wide")])
@pytest.mark.parametrize("d", [1, 257, 4097, 25_000_000, 100_000_000])
def test_feedback_inputs(dev, d, kinds):
    a, b, c = (make(kind, d, seed=d + j) for j, kind in enumerate(kinds))
    small = d <= 4097

    def check(got, want, what):
        assert_bitwise(got, want, what)
        if small:  # fp32 add/sub/mul without contraction round as on the CPU
            assert_bitwise_or_both_nan(got, want.cpu(), what + " vs CPU")

    check(dev.ef14_input(a, b), REF.ef14_input(a, b), "ef14")
    check(dev.ef21_input(a, b), REF.ef21_input(a, b), "ef21")
    for beta in (0.1, 1 / 3):
        for u, w, name in zip(dev.sgdm_input(a, b, c, beta), REF.sgdm_input(a, b, c, beta), ("v", "p")):
            check(u, w, f"sgdm {name} beta={beta}")
    for eta in (0.0, 0.01, 0.5, 1.0):
        gq, gp = dev.econtrol_input(a, b, c, eta)
        rq, rp = REF.econtrol_input(a, b, c, eta)
        check(gq, rq, f"econtrol q eta={eta}")
        check(gp, rp, f"econtrol p eta={eta}")
    if small:  # and the CPU reference on the CPU copies
        A, B = a.cpu(), b.cpu()
        assert_bitwise_or_both_nan(dev.ef14_input(a, b), REF.ef14_input(A, B), "ef14 vs CPU inputs")


def test_self_check_passes(dev):
    from commopt import kernels

    assert kernels.self_check(dev, CUDA) == {}


# -- compact messages (SPEC §9): chunked TopK and the value codecs -----------------------------------------

_codec_input = functools.partial(kernel_cases.codec_input, device="cuda")


def _check_chunked(dev, x, chunk, kf, kl, on_cpu=True):
    got = dev.topk_chunked(x, chunk, kf, kl)
    what = f"topk_chunked d={x.numel()} chunk={chunk} k_full={kf} k_last={kl} {x.dtype}"
    assert got.device.type == "cuda"
    assert_bitwise(got, REF.topk_chunked(x, chunk, kf, kl), what)
    if on_cpu:
        assert_bitwise(got.cpu(), REF.topk_chunked(x.cpu(), chunk, kf, kl), what + " vs CPU")
        if x.numel() <= 300_000:
            import numpy as np
            np.testing.assert_array_equal(got.cpu().numpy(), kernel_cases.np_topk_chunked(x, chunk, kf, kl),
                                          err_msg=what)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d,chunk", kernel_cases.CHUNK_CASES)
def test_topk_chunked(dev, kind, d, chunk):
    x = make(kind, d, seed=11)
    for kf in kernel_cases.chunk_ks(chunk):
        for kl in kernel_cases.last_ks(d, chunk, kf):
            _check_chunked(dev, x, chunk, kf, kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gauss", "ties", "nan"])
@pytest.mark.parametrize("chunk", [2, 256, 4096, 65536])
def test_topk_chunked_large(dev, kind, dtype, chunk):
    d = 25_000_000 + 12_345
    x = make(kind, d, seed=3, dtype=dtype)
    for kf in (1, max(1, chunk // 100), chunk // 2):
        _check_chunked(dev, x, chunk, kf, max(1, kf * (d % chunk) // chunk), on_cpu=(dtype == torch.float32))


def test_topk_chunked_ties_go_to_the_lowest_index(dev):
    d, chunk = 1_000_000, 1000
    x = make("opposite", d)
    for kf in (1, 17, 999):
        want = (torch.arange(kf, device="cuda")[None, :] + torch.arange(0, d, chunk, device="cuda")[:, None])
        assert_bitwise(dev.topk_chunked(x, chunk, kf, 1), want.reshape(-1), f"equal magnitudes k={kf}")


def _check_quantize(dev, v, bits, group, what=""):
    def vs_cpu(gc, gs, what):
        cc, cs = REF.quantize(v.cpu(), bits, group)   # the float64 reference on the CPU: the same codes
        assert_bitwise(gc.cpu(), cc, what + " codes vs CPU")
        assert_bitwise_or_both_nan(gs, cs, what + " scales vs CPU")

    return kernel_cases.check_quantize(dev, REF, v, bits, group, what, extra=vs_cpu)


@pytest.mark.parametrize("bits,group", [(8, 256), (4, 16), (8, 1), (4, 3), (8, 1000), (4, 65536), (8, 7)])
@pytest.mark.parametrize("kind", kernel_cases.CODEC_KINDS)
def test_quantize(dev, kind, bits, group):
    q = 2 ** (bits - 1) - 1
    for k in (1, 2, 5, 16, 257, 4097, 70_001, 3_000_001):
        _check_quantize(dev, _codec_input(kind, k, seed=1, group=group, q=q), bits, group, kind)


@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 255, 256, 4999])
@pytest.mark.parametrize("bits,group", [(8, 256), (4, 16)])
def test_quantize_poisoning(dev, bad, where, bits, group):
    v = make("gauss", 5000, seed=4)
    v[where] = bad
    codes, scales = _check_quantize(dev, v, bits, group)
    assert bool(scales.isnan().all()) and bool((codes == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_half_precision(dev, dtype):
    for kind in ("gauss", "heavy", "ties", "nan"):
        _check_quantize(dev, make(kind, 300_001, seed=5, dtype=dtype), 8, 256, kind)
        _check_quantize(dev, make(kind, 300_001, seed=5, dtype=dtype), 4, 16, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 7, 4097, 3_000_001])
def test_bf16(dev, kind, d):
    x = make(kind, d, seed=8)
    assert_bitwise(dev.to_bf16(x), REF.to_bf16(x), f"bf16 {kind} d={d}")


def test_bf16_rounding_edges(dev):
    hi = torch.randint(0, 1 << 16, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    lows = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0001], dtype=torch.int64)
    b = ((hi[:, None] << 16) | lows[None, :]).reshape(-1)
    b = torch.cat([b, torch.tensor([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00001,
                                    0x7FFFFFFF, 0x00000001, 0x80008000, 0, 0x80000000, 0x7F7F8000])])
    x = torch.where(b >= (1 << 31), b - (1 << 32), b).to(torch.int32).view(torch.float32).cuda()
    assert_bitwise(dev.to_bf16(x), REF.to_bf16(x), "bf16 edges")


@pytest.mark.parametrize("k", [1, 2, 3, 4097, 3_000_001])
def test_int4_pack_unpack(dev, k):
    c = torch.randint(-8, 8, (k,), device="cuda").to(torch.int8)
    p = dev.pack_int4(c)
    assert_bitwise(p, REF.pack_int4(c), f"pack k={k}")
    assert_bitwise(dev.unpack_int4(p, k), c, f"unpack k={k}")


# -- the hook with the CUDA kernel path ------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 8)).to(device="cuda", dtype=torch.float32)


def _hook_run(monkeypatch, mode: str, comp: str, rule: str, sync_check: bool, steps: int = 8):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commopt
    from commopt import kernels
    from commopt.kernels.cuda import CudaLauncher

    monkeypatch.setenv("COMMOPT_KERNELS", mode)
    kernels.reset()
    launches = {"n": 0}
    real = CudaLauncher.launch

    def counted(self, *a, **kw):
        launches["n"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(CudaLauncher, "launch", counted)
    store = dist.FileStore(tempfile.mktemp(prefix="commopt-kernels-gpu-"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        model = _model()
        ddp = DDP(model, bucket_cap_mb=0.05, device_ids=[torch.cuda.current_device()])
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05), compressor=comp,
                                          feedback=rule)
        o = kernels.ops(next(model.parameters()))  # built (and self-checked, which syncs) before the check
        assert o.name == ("cuda" if mode == "auto" else "torch")
        assert getattr(o, "failed", {}) == {}, o.failed
        g = torch.Generator(device="cuda").manual_seed(1)
        xs = [torch.randn(32, 64, generator=g, device="cuda") for _ in range(steps)]
        ys = [torch.randn(32, 8, generator=g, device="cuda") for _ in range(steps)]

        def step(t):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(xs[t]), ys[t]).backward()
            opt.step()

        warm = opt.hook_state.warmup_steps + 1  # warm-up, then the one sync where it ends
        for t in range(warm):
            step(t)
        torch.cuda.synchronize()
        if sync_check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(warm, steps):
                step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert opt.hook_state.stats["compressed_rounds"] > 0
        return [p.detach().clone() for p in model.parameters()], launches["n"]
    finally:
        dist.destroy_process_group()
        kernels.reset()


@pytest.mark.parametrize("comp,rule", [("topk:0.05", "ef14"), ("randk:0.05", "econtrol"), ("topk:0.01", "ef21sgdm")])
def test_hook_step_with_cuda_kernels_never_syncs_and_matches_the_reference(monkeypatch, comp, rule):
    params, n = _hook_run(monkeypatch, "auto", comp, rule, sync_check=True)
    assert n > 0, "the CUDA kernels were not used"
    assert all(bool(torch.isfinite(p).all()) for p in params)
    ref, n_ref = _hook_run(monkeypatch, "torch", comp, rule, sync_check=False)
    assert n_ref == 0
    for a, b in zip(params, ref):
        assert_bitwise(a, b, "parameters: cuda kernels vs torch reference")

