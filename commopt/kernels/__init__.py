"""The one dispatch point between the PyTorch reference ops and the csrc/ kernels (SPEC §10).

``COMMOPT_KERNELS`` selects the path:

* ``auto`` (default): CUDA tensors run the CUDA kernels when CuPy imports, everything else the
  reference ops;
* ``torch``: the reference ops everywhere;
* ``opencl``: CPU tensors run the same kernels compiled as OpenCL C (PoCL; for tests and debugging,
  slow); CUDA tensors the reference ops.

:func:`ops` returns the op set for a tensor's device; it is built once per (path, device). The first
use of a kernel path on a device runs :func:`self_check`: every kernel against its reference op on
small inputs, bit for bit; a kernel that disagrees (or fails to compile) is replaced by its reference
op, with one warning naming it. Both paths give the same messages, so the path is a speed choice; it
is still part of the configuration ranks agree on (:func:`path_name`).
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .reference import TorchOps

__all__ = ["ops", "mode", "path_name", "describe", "self_check", "OP_NAMES", "TorchOps", "reset"]

MODES = ("auto", "torch", "opencl")
#: the ops of a kernel path, each checked on first use
OP_NAMES = ("topk", "topk_chunked", "randk", "gather", "scatter_add_", "ordered_sum", "ef14_input", "ef21_input",
            "sgdm_input", "econtrol_input", "quantize", "dequantize", "pack_int4", "unpack_int4", "to_bf16")

_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

_REFERENCE = TorchOps()
_cache: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def mode() -> str:
    """The value of ``COMMOPT_KERNELS`` (auto, torch or opencl); anything else is an error."""
    m = os.environ.get("COMMOPT_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"COMMOPT_KERNELS={m!r}: expected one of {', '.join(MODES)}")
    return m


def _path_for(dev: torch.device) -> "tuple[str, str]":
    """(path, why) for tensors on ``dev`` under the current mode."""
    m = mode()
    if m == "torch":
        return "torch", "COMMOPT_KERNELS=torch"
    if m == "opencl":
        if dev.type != "cpu":
            return "torch", f"COMMOPT_KERNELS=opencl runs OpenCL on CPU tensors only; {dev.type} tensors use the reference ops"
        from .opencl import available
        ok, why = available()
        if not ok:
            raise RuntimeError(f"COMMOPT_KERNELS=opencl but OpenCL is not usable: {why}")
        return "opencl", f"COMMOPT_KERNELS=opencl ({why})"
    if dev.type == "cuda":
        from .cuda import available
        ok, why = available()
        return ("cuda", why) if ok else ("torch", f"auto: {why}")
    return "torch", f"auto: {dev.type} tensors use the reference ops"


def path_name(device: "Optional[torch.device | str]" = None) -> str:
    """The path tensors on ``device`` run (``cuda``, ``opencl`` or ``torch``); for the agreed configuration.
    Without a device: CUDA's when torch sees a CUDA device, else the CPU's."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return _path_for(torch.device(device))[0]


class _Checked:
    """A kernel op set with the ops that failed the self-check replaced by the reference ops."""

    def __init__(self, device_ops: Any, failed: "dict[str, str]", name: Optional[str] = None) -> None:
        self.name = name or device_ops.name
        self.failed = dict(failed)
        for op in OP_NAMES:
            setattr(self, op, getattr(_REFERENCE if op in failed else device_ops, op))


def ops(x: "Tensor | torch.device | str") -> Any:
    """The op set for tensors on x's device (the one dispatch point)."""
    dev = x.device if isinstance(x, Tensor) else torch.device(x)
    path, _ = _path_for(dev)
    if path == "torch":
        return _REFERENCE
    key = (path, str(dev))
    got = _cache.get(key)
    if got is not None:
        return got
    with _lock:
        got = _cache.get(key)
        if got is None:
            got = _cache[key] = _build(path, dev)
    return got


def _build(path: str, dev: torch.device) -> Any:
    from .device import DeviceOps

    try:
        if path == "cuda":
            from .cuda import CudaLauncher
            device_ops = DeviceOps(CudaLauncher(dev))
        else:
            from .opencl import OpenCLLauncher
            device_ops = DeviceOps(OpenCLLauncher())
    except Exception as exc:  # noqa: BLE001 -- a kernel path that cannot start falls back, loudly
        warnings.warn(f"commopt: the {path} kernels could not be loaded on {dev} ({type(exc).__name__}: {exc}); "
                      "every op uses the PyTorch reference path", RuntimeWarning, stacklevel=3)
        return _Checked(_REFERENCE, {op: "not loaded" for op in OP_NAMES}, name=path)
    failed = self_check(device_ops, dev)
    if failed:
        warnings.warn("commopt: the self-check of the " + path + " kernels on " + str(dev) + " failed for "
                      + ", ".join(f"{op} ({why})" for op, why in failed.items())
                      + "; those ops use the PyTorch reference path", RuntimeWarning, stacklevel=3)
    return _Checked(device_ops, failed)


def _check_inputs(dev: torch.device) -> "dict[str, Tensor]":
    gen = torch.Generator().manual_seed(1234)
    n = 5000
    x = torch.randn(n, generator=gen)
    x[::7] = x[3]            # ties
    x[::11] = -x[3]          # ties of opposite sign
    x[100:300] = 0.0
    y = torch.randn(n, generator=gen)
    z = torch.randn(n, generator=gen)
    return {k: v.to(dev) for k, v in {"x": x, "y": y, "z": z}.items()}


def self_check(device_ops: Any, dev: torch.device) -> "dict[str, str]":
    """Run every kernel op against its reference op on small inputs; {op: why} for those that differ."""
    ref = _REFERENCE
    t = _check_inputs(dev)
    x, y, z = t["x"], t["y"], t["z"]
    failed: dict[str, str] = {}

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, tuple):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
        if a.is_floating_point():  # bit for bit: NaN payloads (a poisoned message's scales) and -0 included
            a, b = a.view(_INT_OF_SIZE[a.element_size()]), b.view(_INT_OF_SIZE[b.element_size()])
        return torch.equal(a, b)

    idx = ref.topk(x, 50)
    bad = x.clone()
    bad[4321] = float("nan")               # a poisoned message: every scale NaN
    tiny = y * 1e-42                       # scales and products in the subnormal range
    # quotients within an ulp of k + 0.5 (a float32 division would round some onto or off the tie)
    gen = torch.Generator().manual_seed(99)
    sg = ((torch.rand(20, generator=gen) + 0.5).double() / 127).float().double().repeat_interleave(256)
    near = ((torch.randint(-127, 127, (5120,), generator=gen).double() + 0.5) * sg).float()
    near = torch.where(torch.arange(5120) % 3 == 0, torch.nextafter(near, torch.tensor(float("inf"))), near)
    near[::256] = (127 * sg[::256]).float()
    near = near.to(dev)
    qin = [(x, 8, 256), (x, 4, 16), (y[:4999], 8, 7), (bad, 8, 256), (tiny, 4, 16), (near, 8, 256),
           (torch.zeros_like(z), 8, 64), (z[:3], 4, 16)]
    coded = [ref.quantize(v, b, g) + (g,) for v, b, g in qin]
    c4 = ref.quantize(x, 4, 16)[0]
    nonfin = torch.cat([x, tiny, torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan")],
                                               device=dev)])
    cases = {
        "topk": lambda o: tuple(o.topk(x, k) for k in (1, 50, 601, 4999)),
        "topk_chunked": lambda o: tuple(o.topk_chunked(x, c, kf, kl) for c, kf, kl in
                                        ((256, 3, 1), (1000, 10, 1), (4096, 41, 9), (8192, 50, 50))),
        "randk": lambda o: tuple(o.randk(n, k, seed, dev) for n, k, seed in
                                 ((5000, 50, 7), (5000, 1, (1 << 62) + 5), (4999, 1700, 3))),
        "gather": lambda o: o.gather(x, idx),
        "scatter_add_": lambda o: (o.scatter_add_(y.clone(), idx, z[:50], -1.0),
                                   o.scatter_add_(y.clone(), idx, z[:50], 1.0)),
        "ordered_sum": lambda o: o.ordered_sum([(idx, z[:50]), (torch.sort(ref.topk(y, 50)).values, x[:50])],
                                               torch.empty_like(x)),
        "ef14_input": lambda o: o.ef14_input(x, y),
        "ef21_input": lambda o: o.ef21_input(x, y),
        "sgdm_input": lambda o: o.sgdm_input(x, y, z, 0.1),
        "econtrol_input": lambda o: (o.econtrol_input(x, y, z, 0.01), o.econtrol_input(x, y, z, 1.0)),
        "quantize": lambda o: tuple(o.quantize(v, b, g) for v, b, g in qin),
        "dequantize": lambda o: tuple(o.dequantize(c, s, g, dt) for c, s, g in coded
                                      for dt in (torch.float32, torch.bfloat16)),
        "pack_int4": lambda o: (o.pack_int4(c4), o.pack_int4(c4[:4999])),
        "unpack_int4": lambda o: tuple(o.unpack_int4(ref.pack_int4(c4[:n]), n) for n in (5000, 4999)),
        "to_bf16": lambda o: (o.to_bf16(nonfin), o.to_bf16(y)),
    }
    for op, run in cases.items():
        try:
            if not same(run(device_ops), run(ref)):
                failed[op] = "differs from the reference"
        except Exception as exc:  # noqa: BLE001
            failed[op] = f"{type(exc).__name__}: {exc}"
    return failed


def describe() -> "list[str]":
    """Lines for ``commopt info``: the mode, and which path CPU and CUDA tensors run and why."""
    try:
        m = mode()
    except ValueError as exc:
        return [f"kernels: {exc}"]
    lines = [f"kernels: COMMOPT_KERNELS={m}"]
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devs:
        try:
            path, why = _path_for(dev)
        except Exception as exc:  # noqa: BLE001
            path, why = "error", str(exc)
        lines.append(f"  {dev.type} tensors: {path} ({why})")
    from .opencl import available as ocl
    from .cuda import available as cu
    ok, why = ocl()
    lines.append(f"  opencl: {'available' if ok else 'not available'} ({why})")
    ok, why = cu()
    lines.append(f"  cuda kernels: {'available' if ok else 'not available'} ({why})")
    for (path, dev), built in sorted(_cache.items()):
        failed = getattr(built, "failed", {})
        state = ("self-check passed" if not failed else
                 "on the reference path after the self-check: " + ", ".join(f"{op} ({why})" for op, why in failed.items()))
        lines.append(f"  {path} kernels on {dev}: {state}")
    return lines


def reset() -> None:
    """Forget the built op sets (tests change ``COMMOPT_KERNELS``; the next :func:`ops` builds afresh)."""
    with _lock:
        _cache.clear()
