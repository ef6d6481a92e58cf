"""OpenCL launcher: the csrc/ kernels compiled as OpenCL C and run on CPU tensors (PoCL in the tests).

Slow by design (every op copies its buffers in and the written ones back, and waits for the queue);
it exists so that every kernel executes in every CI run on a machine without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from torch import Tensor

from .device import BLOCK, Launcher, kernel_source

__all__ = ["OpenCLLauncher", "available"]


@functools.lru_cache(maxsize=1)
def _context() -> "tuple[Any, Any, Any, Any, str]":
    import pyopencl as cl  # the opencl path's only dependency

    devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    if not devices:
        raise RuntimeError("pyopencl found no OpenCL device (install an ICD, e.g. Debian's pocl-opencl-icd)")
    cpu = [d for d in devices if d.type & cl.device_type.CPU] or devices
    dev = cpu[0]
    ctx = cl.Context([dev])
    queue = cl.CommandQueue(ctx)
    prg = cl.Program(ctx, kernel_source()).build()
    return cl, ctx, queue, prg, f"{dev.platform.name.strip()} / {dev.name.strip()}"


def available() -> "tuple[bool, str]":
    """(usable, why): pyopencl imports, a device exists and csrc/ compiles as OpenCL C."""
    try:
        *_, what = _context()
    except Exception as exc:  # noqa: BLE001 -- reported by commopt info and the dispatcher
        return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return True, what


class OpenCLLauncher(Launcher):
    name = "opencl"

    def __init__(self) -> None:
        self.cl, self.ctx, self.queue, self.prg, self.device_name = _context()
        self._kernels: dict[str, Any] = {}
        self._written: list[tuple[Any, Tensor]] = []

    def handles(self, x: Tensor) -> bool:
        return x.device.type == "cpu"

    def buf(self, t: Tensor, out: bool = False) -> Any:
        cl = self.cl
        host = t.detach().contiguous().numpy()
        b = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=host)
        if out:
            self._written.append((b, t))
        return b

    def launch(self, kernel: str, blocks: int, args: Sequence[Any]) -> None:
        k = self._kernels.get(kernel)
        if k is None:
            k = self._kernels[kernel] = self.cl.Kernel(self.prg, kernel)
        k(self.queue, (blocks * BLOCK,), (BLOCK,), *args)

    def done(self) -> None:
        for b, t in self._written:
            host = t.detach().numpy()
            self.cl.enqueue_copy(self.queue, host, b)
        self.queue.finish()
        self._written.clear()

