"""CUDA launcher: the csrc/ kernels compiled by NVRTC through CuPy, run on PyTorch CUDA tensors.

Tensors are viewed in place (CuPy arrays over the tensor's memory, no copy and no stream
synchronisation) and every kernel is launched on ``torch.cuda.current_stream()``, so kernels are
ordered with the surrounding PyTorch work exactly as PyTorch ops would be. Compiled once per process
and device (and cached on disk by CuPy).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import Tensor

from .device import BLOCK, Launcher, kernel_source

__all__ = ["CudaLauncher", "available"]

#: --fmad=false: no contraction of a*b+c, so the kernels round as the reference ops do (portable.h)
NVRTC_OPTIONS = ("--fmad=false", "-std=c++14")

_CUPY_DTYPES = {torch.float32: "float32", torch.int32: "int32", torch.int64: "int64", torch.int16: "int16",
                torch.int8: "int8", torch.uint8: "uint8"}


@functools.lru_cache(maxsize=None)
def _module(device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS)


@functools.lru_cache(maxsize=1)
def available() -> "tuple[bool, str]":
    """(usable, why): a CUDA device for torch and an importable CuPy (asked once per process)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc}); pip install 'commopt[cuda]'"
    return True, f"CuPy {cupy.__version__} on {torch.cuda.get_device_name()}"


class CudaLauncher(Launcher):
    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        import cupy

        self.cupy = cupy
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.module = _module(self.index)
        self._kernels: dict[str, Any] = {}

    def handles(self, x: Tensor) -> bool:
        return x.is_cuda and x.device.index == self.index

    def buf(self, t: Tensor, out: bool = False) -> Any:
        cp = self.cupy
        nbytes = t.numel() * t.element_size()
        mem = cp.cuda.UnownedMemory(t.data_ptr(), nbytes, t, self.index)
        return cp.ndarray((t.numel(),), dtype=_CUPY_DTYPES[t.dtype], memptr=cp.cuda.MemoryPointer(mem, 0))

    def launch(self, kernel: str, blocks: int, args: Sequence[Any]) -> None:
        k = self._kernels.get(kernel)
        if k is None:
            k = self._kernels[kernel] = self.module.get_function(kernel)
        stream = self.cupy.cuda.ExternalStream(torch.cuda.current_stream(self.index).cuda_stream, self.index)
        with self.cupy.cuda.Device(self.index), stream:
            k((blocks,), (BLOCK,), tuple(args))
