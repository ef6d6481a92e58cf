"""commopt.kernels, the one dispatch point (SPEC §10): COMMOPT_KERNELS, path_name, describe(), the
first-use self-check with its per-op fallback, and whole rounds (commopt.round.compress / conclude) of
every feedback rule with TopK and RandK giving bitwise the same message and state under ``opencl`` and
``torch``.

The mode, self-check and fallback tests do not need OpenCL (the kernel op set is faked where it would be
built); the round comparison skips without it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import commopt.kernels as kernels
import commopt.kernels.device as device_mod
import commopt.kernels.opencl as opencl_mod
from commopt.compressors import RandK, TopK
from commopt.exchange import ordered_sum
from commopt.feedback import EF14, EF21, EF21SGDM, EControl, NoFeedback
from commopt.kernels import OP_NAMES, TorchOps
from commopt.round import compress, conclude, dense_start, unscaled

try:
    _OCL_OK, _OCL_WHY = opencl_mod.available()
except Exception as exc:  # noqa: BLE001
    _OCL_OK, _OCL_WHY = False, f"{type(exc).__name__}: {exc}"
needs_opencl = pytest.mark.skipif(not _OCL_OK, reason=f"OpenCL is not usable here ({_OCL_WHY})")

_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        return t.to(torch.int8)
    return t.view(_INT[t.element_size()])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    bad = (bits(got) != bits(want)).nonzero().reshape(-1)
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {got.numel()} elements differ, first at {int(bad[0])}: "
                              f"{got.reshape(-1)[bad[0]].item()!r} vs {want.reshape(-1)[bad[0]].item()!r}")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    """Every test starts from COMMOPT_KERNELS unset and no built op sets, and leaves none behind."""
    monkeypatch.delenv("COMMOPT_KERNELS", raising=False)
    kernels.reset()
    yield
    kernels.reset()


CPU = torch.device("cpu")


# -- COMMOPT_KERNELS -------------------------------------------------------------------------------


def test_auto_on_cpu_is_the_reference_path():
    assert kernels.mode() == "auto"
    assert kernels.path_name("cpu") == "torch"
    assert kernels.path_name(CPU) == "torch"
    o = kernels.ops(torch.zeros(3))
    assert isinstance(o, TorchOps) and o.name == "torch"
    assert kernels.ops("cpu") is o and kernels.ops(CPU) is o


@pytest.mark.parametrize("value", ["", "  ", "auto", "AUTO", " Auto "])
def test_auto_spellings(monkeypatch, value):
    monkeypatch.setenv("COMMOPT_KERNELS", value)
    assert kernels.mode() == "auto"


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch\n"])
def test_torch_mode_everywhere(monkeypatch, value):
    monkeypatch.setenv("COMMOPT_KERNELS", value)
    assert kernels.mode() == "torch"
    assert kernels.path_name("cpu") == "torch"
    assert kernels.path_name("cuda") == "torch"      # no CUDA device needed to ask
    assert kernels.ops(torch.zeros(2)).name == "torch"


def test_auto_on_cuda_without_a_usable_cuda_path(monkeypatch):
    monkeypatch.setattr("commopt.kernels.cuda.available", lambda: (False, "no CUDA device"))
    assert kernels.path_name("cuda") == "torch"
    assert kernels._path_for(torch.device("cuda")) == ("torch", "auto: no CUDA device")


def test_auto_on_cuda_with_a_usable_cuda_path(monkeypatch):
    monkeypatch.setattr("commopt.kernels.cuda.available", lambda: (True, "CuPy 0 on a fake GPU"))
    assert kernels.path_name("cuda:0") == "cuda"
    assert kernels.path_name("cpu") == "torch"


def test_path_name_without_a_device_is_the_cpus_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.path_name() == kernels.path_name("cpu") == "torch"


@needs_opencl
@pytest.mark.parametrize("value", ["opencl", "OpenCL", " opencl "])
def test_opencl_mode(monkeypatch, value):
    monkeypatch.setenv("COMMOPT_KERNELS", value)
    assert kernels.mode() == "opencl"
    assert kernels.path_name("cpu") == "opencl"
    o = kernels.ops(torch.zeros(2))
    assert o.name == "opencl" and o.failed == {}
    assert isinstance(o.topk.__self__, device_mod.DeviceOps)
    assert kernels.ops(torch.zeros(5)) is o                      # built once per (path, device)
    # CUDA tensors under opencl: the reference ops
    path, why = kernels._path_for(torch.device("cuda"))
    assert path == "torch" and "CPU tensors only" in why
    # the mode is read at each ops() call
    monkeypatch.setenv("COMMOPT_KERNELS", "torch")
    assert kernels.ops(torch.zeros(2)).name == "torch"
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    assert kernels.ops(torch.zeros(2)) is o
    kernels.reset()
    assert kernels.ops(torch.zeros(2)) is not o


def test_opencl_mode_without_opencl_is_an_error(monkeypatch):
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    monkeypatch.setattr(opencl_mod, "available", lambda: (False, "RuntimeError: no platform"))
    msg = "COMMOPT_KERNELS=opencl but OpenCL is not usable: RuntimeError: no platform"
    with pytest.raises(RuntimeError, match=msg):
        kernels.ops(torch.zeros(1))
    assert kernels.path_name("cuda") == "torch"  # CUDA tensors never needed OpenCL


@pytest.mark.parametrize("value", ["cuda", "triton", "opencl2", "0", "torch,opencl"])
def test_invalid_mode_names_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv("COMMOPT_KERNELS", value)
    for call in (kernels.mode, lambda: kernels.path_name("cpu"), lambda: kernels.ops(torch.zeros(1))):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "COMMOPT_KERNELS" in msg and repr(value.strip().lower()) in msg
        assert "auto, torch, opencl" in msg


# -- describe() ------------------------------------------------------------------------------------


def _describe_common(lines):
    assert any(line.startswith("  opencl: available (") or line.startswith("  opencl: not available (")
               for line in lines), lines
    assert any(line.startswith("  cuda kernels: ") for line in lines), lines
    ok, why = opencl_mod.available()
    assert f"  opencl: {'available' if ok else 'not available'} ({why})" in lines


def test_describe_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = kernels.describe()
    assert lines[0] == "kernels: COMMOPT_KERNELS=auto"
    assert "  cpu tensors: torch (auto: cpu tensors use the reference ops)" in lines
    assert not any(line.startswith("  cuda tensors") for line in lines)
    assert "  cuda kernels: not available (no CUDA device)" in lines
    _describe_common(lines)


def test_describe_torch(monkeypatch):
    monkeypatch.setenv("COMMOPT_KERNELS", "torch")
    lines = kernels.describe()
    assert lines[0] == "kernels: COMMOPT_KERNELS=torch"
    assert "  cpu tensors: torch (COMMOPT_KERNELS=torch)" in lines
    _describe_common(lines)


def test_describe_opencl(monkeypatch):
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    lines = kernels.describe()
    assert lines[0] == "kernels: COMMOPT_KERNELS=opencl"
    ok, why = opencl_mod.available()
    if ok:
        assert f"  cpu tensors: opencl (COMMOPT_KERNELS=opencl ({why}))" in lines
    else:  # the error is described, not raised
        assert any(line.startswith("  cpu tensors: error (COMMOPT_KERNELS=opencl but OpenCL is not usable")
                   for line in lines), lines
    _describe_common(lines)


def test_describe_opencl_unavailable_is_described_not_raised(monkeypatch):
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    monkeypatch.setattr(opencl_mod, "available", lambda: (False, "ImportError: No module named 'pyopencl'"))
    lines = kernels.describe()
    assert ("  cpu tensors: error (COMMOPT_KERNELS=opencl but OpenCL is not usable: "
            "ImportError: No module named 'pyopencl')") in lines
    assert "  opencl: not available (ImportError: No module named 'pyopencl')" in lines


def test_describe_invalid_mode(monkeypatch):
    monkeypatch.setenv("COMMOPT_KERNELS", "bogus")
    assert kernels.describe() == ["kernels: COMMOPT_KERNELS='bogus': expected one of auto, torch, opencl"]


# -- the self-check --------------------------------------------------------------------------------


def _corrupt(out):
    """Flip the lowest bit of the first element of (the last tensor of) an op's result."""
    if isinstance(out, tuple):
        return (*out[:-1], _corrupt(out[-1]))
    t = out.clone() if out.numel() else out
    if t.numel():
        b = t.view(-1).view(_INT[t.element_size()])
        b[0] ^= 1
    return t


def broken_ops(base_cls, bad: "set[str]", raising: "set[str]" = frozenset(), name: str = "opencl"):
    """A subclass of ``base_cls`` whose ops in ``bad`` return a corrupted result, those in ``raising`` raise."""

    def wrap(op):
        real = getattr(base_cls, op)
        if op in raising:
            def f(self, *a, **kw):
                raise RuntimeError(f"{op} kernel exploded")
        else:
            def f(self, *a, **kw):
                return _corrupt(real(self, *a, **kw))
        return f

    ns = {op: wrap(op) for op in set(bad) | set(raising)}
    ns["name"] = name
    return type(f"Broken{base_cls.__name__}", (base_cls,), ns)


def test_self_check_of_the_reference_itself_is_clean():
    assert kernels.self_check(TorchOps(), CPU) == {}


@pytest.mark.parametrize("op", OP_NAMES)
def test_self_check_reports_exactly_the_broken_op(op):
    failed = kernels.self_check(broken_ops(TorchOps, {op})(), CPU)
    assert set(failed) == {op}
    assert failed[op] == "differs from the reference"


def test_self_check_reports_an_op_that_raises():
    failed = kernels.self_check(broken_ops(TorchOps, {"gather"}, raising={"randk"})(), CPU)
    assert set(failed) == {"gather", "randk"}
    assert failed["randk"] == "RuntimeError: randk kernel exploded"


@needs_opencl
@pytest.mark.parametrize("op", ["topk", "ordered_sum", "econtrol_input"])
def test_self_check_of_real_kernels_with_one_corrupted(op):
    launcher = opencl_mod.OpenCLLauncher()
    assert kernels.self_check(device_mod.DeviceOps(launcher), CPU) == {}
    assert set(kernels.self_check(broken_ops(device_mod.DeviceOps, {op})(launcher), CPU)) == {op}


class _FakeLauncher:
    name = "opencl"


def _fake_device_ops(bad, raising=frozenset()):
    """What commopt.kernels._build gets for DeviceOps: the reference ops taking a launcher, some broken."""
    cls = broken_ops(TorchOps, set(bad), set(raising))

    class Fake(cls):
        def __init__(self, launcher):
            self.launcher = launcher

    return Fake


def _build_opencl(monkeypatch, fake_cls):
    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    monkeypatch.setattr(opencl_mod, "available", lambda: (True, "fake OpenCL"))
    monkeypatch.setattr(opencl_mod, "OpenCLLauncher", _FakeLauncher)
    monkeypatch.setattr(device_mod, "DeviceOps", fake_cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = kernels.ops(torch.zeros(4))
        again = kernels.ops(torch.zeros(9))     # built once: no second self-check, no second warning
    assert again is o
    return o, [w for w in caught if "commopt" in str(w.message)]


def test_fallback_warns_once_naming_the_kernel_and_uses_the_reference_op(monkeypatch):
    o, warned = _build_opencl(monkeypatch, _fake_device_ops({"gather"}, raising={"sgdm_input"}))
    assert len(warned) == 1, [str(w.message) for w in warned]
    w = warned[0]
    assert w.category is RuntimeWarning
    msg = str(w.message)
    assert "self-check of the opencl kernels on cpu failed for" in msg
    assert "gather (differs from the reference)" in msg
    assert "sgdm_input (RuntimeError: sgdm_input kernel exploded)" in msg
    for other in set(OP_NAMES) - {"gather", "sgdm_input"}:
        assert f"{other} (" not in msg, other
    assert o.name == "opencl"
    assert set(o.failed) == {"gather", "sgdm_input"}
    assert o.gather.__self__ is kernels._REFERENCE and o.sgdm_input.__self__ is kernels._REFERENCE
    for op in set(OP_NAMES) - {"gather", "sgdm_input"}:
        assert isinstance(getattr(o, op).__self__, device_mod.DeviceOps), op
    x, idx = torch.randn(100), torch.tensor([3, 7, 50])
    assert_bitwise(o.gather(x, idx), x[idx])               # the reference op: not corrupted
    v, p = o.sgdm_input(x, x, x, 0.1)
    assert_bitwise(p, TorchOps().sgdm_input(x, x, x, 0.1)[1])
    # the next build (after reset) checks and warns again
    kernels.reset()
    with pytest.warns(RuntimeWarning, match="gather"):
        kernels.ops(torch.zeros(1))


def test_a_clean_build_does_not_warn(monkeypatch):
    o, warned = _build_opencl(monkeypatch, _fake_device_ops(set()))
    assert warned == [] and o.failed == {}
    assert all(isinstance(getattr(o, op).__self__, device_mod.DeviceOps) for op in OP_NAMES)


def test_a_path_that_cannot_load_falls_back_entirely(monkeypatch):
    class Exploding:
        def __init__(self, *a):
            raise OSError("clBuildProgram failed")

    monkeypatch.setenv("COMMOPT_KERNELS", "opencl")
    monkeypatch.setattr(opencl_mod, "available", lambda: (True, "fake OpenCL"))
    monkeypatch.setattr(opencl_mod, "OpenCLLauncher", Exploding)
    with pytest.warns(RuntimeWarning, match=r"the opencl kernels could not be loaded on cpu \(OSError: clBuildProgram"):
        o = kernels.ops(torch.zeros(1))
    assert o.name == "opencl" and set(o.failed) == set(OP_NAMES)
    x = torch.randn(1000)
    assert_bitwise(o.topk(x, 10), TorchOps().topk(x, 10))


# -- whole rounds: opencl vs torch ------------------------------------------------------------------

RULES = {
    "none": NoFeedback,
    "ef14": EF14,
    "ef21": EF21,
    "ef21sgdm": lambda: EF21SGDM(0.1),
    "econtrol": lambda: EControl(None),
    "econtrol0": lambda: EControl(0.0),
    "econtrol1": lambda: EControl(1.0),
}
COMPRESSORS = {
    "topk": lambda: TopK(ratio=0.02),
    "topk_k1": lambda: TopK(k=1),
    "topk_all": lambda: TopK(ratio=1.0),
    "randk": lambda: RandK(ratio=0.05, seed=3),
}


def _grad(r: int, t: int, d: int, dtype: torch.dtype, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * r + 104729 * t + d)
    x = torch.randn(d, generator=g) * (1 + r)
    if ties:  # rounded to a coarse grid: ties inside the top-k threshold, of both signs
        x = torch.round(x * 4) / 4
    if t == 3 and r == 1:
        x[d // 2] = float("inf")  # a non-finite gradient on one rank: the message is poisoned, nothing commits
    return x.to(dtype)


def _rounds(monkeypatch, mode: str, comp, fb, d: int, dtype: torch.dtype, n: int = 3, steps: int = 6,
            scale: "float | None" = None, ties: bool = False) -> list:
    """n ranks' rounds in one process, as commopt.simulate makes them: a dense start, then compressed
    rounds with an ordered-sum exchange; every message, intermediate and state, in order."""
    monkeypatch.setenv("COMMOPT_KERNELS", mode)
    kernels.reset()
    probe = kernels.ops(torch.zeros(1))
    assert probe.name == mode and getattr(probe, "failed", {}) == {}
    sdt = torch.float32
    s = None if scale is None else torch.tensor(scale)
    states: list[dict] = [{} for _ in range(n)]
    rec: list = []
    for t in range(steps):
        g_in = [_grad(r, t, d, dtype, ties) for r in range(n)]
        if s is not None:
            g_in = [(g.float() * s).to(dtype) for g in g_in]
        gs = [unscaled(g, s, sdt) for g in g_in]
        if t == 0:
            total = ordered_sum([(torch.arange(d), g) for g in gs], d, sdt)
            for r in range(n):
                new, ok, mean = dense_start(fb, gs[r], total.clone(), n)
                states[r] = new
                rec += [mean, ok, *[new[key] for key in sorted(new)]]
            continue
        k = comp.num_selected(d)
        outs = [compress(comp, fb, states[r], gs[r], k, t, key=4242, wire_dtype=dtype, scale=s) for r in range(n)]
        for o in outs:
            assert o.vals.dtype == dtype and o.own.dtype == sdt and o.idx.dtype == torch.int64
            rec += [o.idx, o.vals, o.own] + ([o.p] if o.p is not None else []) + [o.aux[a] for a in sorted(o.aux)]
        total = ordered_sum([(o.idx, o.vals) for o in outs], d, sdt)
        rec.append(total.clone())
        for r in range(n):
            new, ok, est, mean = conclude(fb, states[r], outs[r], total.clone(), n)
            rec += [ok, est, mean, *[new[key] for key in sorted(new)]]
            assert bool(ok) == (t != 3)
            if bool(ok):
                states[r] = {**states[r], **new}
    final = [states[r][key] for r in range(n) for key in sorted(states[r])]
    assert all(x.dtype == sdt for x in final)  # bf16 / fp16 gradients: fp32 state
    return rec + final


def _compare(a: list, b: list) -> None:
    assert len(a) == len(b)
    for j, (x, y) in enumerate(zip(a, b)):
        assert_bitwise(x, y, f"record {j}")


@needs_opencl
@pytest.mark.filterwarnings("ignore:EControl eta")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("comp", sorted(COMPRESSORS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_rounds_bitwise_same_under_opencl_and_torch(monkeypatch, rule, comp, dtype):
    d = 3001
    runs = {mode: _rounds(monkeypatch, mode, COMPRESSORS[comp](), RULES[rule](), d, dtype, ties=(comp == "topk"))
            for mode in ("opencl", "torch")}
    _compare(runs["opencl"], runs["torch"])


@needs_opencl
@pytest.mark.parametrize("rule", ["ef14", "econtrol", "ef21sgdm"])
def test_rounds_large_bucket_with_loss_scale(monkeypatch, rule):
    d = 200_003
    comp = TopK(ratio=0.01)
    a = _rounds(monkeypatch, "opencl", comp, RULES[rule](), d, torch.float16, n=2, steps=5, scale=1024.0)
    b = _rounds(monkeypatch, "torch", comp, RULES[rule](), d, torch.float16, n=2, steps=5, scale=1024.0)
    _compare(a, b)


def test_every_kernel_source_is_compiled():
    """kernel_source() concatenates device.SOURCES: every csrc/*.cu must be listed (and ships in the wheel
    as commopt/kernels/csrc through pyproject's package-data *.cu)."""
    assert set(device_mod.SOURCES) == {p.name for p in device_mod.CSRC.glob("*.cu")}
    src = device_mod.kernel_source()
    for kernel in ("topk_chunked", "quant_amax", "quant_scales", "quant_codes", "dequant_f32", "pack_int4",
                   "unpack_int4", "f32_to_bf16"):
        assert f"KERNEL void {kernel}(" in src, kernel
