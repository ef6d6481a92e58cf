"""The kernel path: csrc/ kernels driven through a :class:`Launcher` (CUDA through CuPy, or OpenCL).

The launch sequence of every op is written once here; a launcher only knows how to compile the
sources, view a torch tensor as a device buffer and launch a kernel on a 1-d grid. Ops take fp32
tensors; anything else (float64 state, other dtypes) goes to the reference op, which gives the same
result (SPEC §10). Nothing here reads a device value on the host: the radix select keeps its
threshold and counts in device buffers between launches.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .reference import TorchOps

__all__ = ["Launcher", "DeviceOps", "kernel_source", "CSRC", "BLOCK"]

#: the kernel sources; each .cu file includes portable.h
CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
if not CSRC.is_dir():  # an installed (non-editable) package carries them inside
    CSRC = Path(__file__).resolve().parent / "csrc"

#: threads per block (COMMOPT_BLOCK in portable.h)
BLOCK = 256
#: csrc/topk_select.cu: elements per tile of the compaction kernels, histogram bins
_TILE = BLOCK * 8
_BINS = 2048
#: the radix digits: (shift, width) of bits 30..20, 19..9, 8..0 of the magnitude key
_DIGITS = ((20, 11), (9, 11), (0, 9))
#: most blocks of a grid-stride kernel
_MAX_BLOCKS = 4096

SOURCES = ("topk_select.cu", "topk_chunked.cu", "sparse.cu", "randk.cu", "feedback.cu", "codecs.cu")
#: csrc/topk_chunked.cu: the longest chunk (16-bit chunk-local indices) and most blocks of its grid
_MAX_CHUNK = 1 << 16
_MAX_CHUNK_BLOCKS = 1 << 16


def kernel_source() -> str:
    """All of csrc/ as one translation unit, with portable.h inlined (for NVRTC and the OpenCL compiler)."""
    header = (CSRC / "portable.h").read_text()
    parts = [header]
    for name in SOURCES:
        parts.append(f"/* ---- {name} ---- */\n" + (CSRC / name).read_text().replace('#include "portable.h"', ""))
    return "\n".join(parts)


class Launcher:
    """What a kernel path must provide. ``buf(t)`` gives a device view of a torch tensor (read, and
    written back by :meth:`done` if ``out``); ``launch`` runs a kernel on ``blocks`` × BLOCK threads."""

    name = "base"

    def buf(self, t: Tensor, out: bool = False) -> Any:
        raise NotImplementedError

    def launch(self, kernel: str, blocks: int, args: Sequence[Any]) -> None:
        raise NotImplementedError

    def done(self) -> None:
        """After a group of launches: make written buffers visible in their tensors (OpenCL: copy back)."""

    def handles(self, x: Tensor) -> bool:
        """Whether this launcher runs on x's device."""
        raise NotImplementedError


def _u32(v: int) -> np.uint32:
    return np.uint32(v)


def _f32(v: float) -> np.float32:
    return np.float32(v)


def _grid(n: int) -> int:
    return max(1, min(_MAX_BLOCKS, (n + BLOCK - 1) // BLOCK))


def _one_at_a_time(fn: Any) -> Any:
    """The hook calls ops from the main thread and from the backend's callback threads at once, and a
    launcher keeps per-op state (OpenCL: the buffers to copy back): one op of an op set runs at a time."""

    @functools.wraps(fn)
    def call(self: "DeviceOps", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return call


class DeviceOps:
    """The ops of :class:`~commopt.kernels.reference.TorchOps`, run by csrc/ kernels where the dtype allows."""

    def __init__(self, launcher: Launcher) -> None:
        self._lock = threading.RLock()
        self.L = launcher
        self.name = launcher.name
        self.ref = TorchOps()
        self._nan_bits: "dict[str, int]" = {}

    def _ok(self, *ts: Tensor) -> bool:
        return all(t.dtype == torch.float32 and t.is_contiguous() and self.L.handles(t) for t in ts) \
            and ts[0].numel() < (1 << 31)

    # -- TopK --------------------------------------------------------------------------------------
    @_one_at_a_time
    def topk(self, x: Tensor, k: int) -> Tensor:
        d = x.numel()
        if k >= d or k < 1:
            return torch.arange(min(max(k, 0), d), device=x.device)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact, and the same key order
        if not self._ok(x):
            return self.ref.topk(x, k)
        x = x.reshape(-1)
        L = self.L
        dev = x.device
        state = torch.empty(4, dtype=torch.int32, device=dev)
        hist = torch.empty(3 * _BINS, dtype=torch.int32, device=dev)
        ntiles = (d + _TILE - 1) // _TILE
        cgt = torch.empty(ntiles, dtype=torch.int32, device=dev)
        ceq = torch.empty(ntiles, dtype=torch.int32, device=dev)
        idx = torch.empty(k, dtype=torch.int64, device=dev)
        vals = torch.empty(k, dtype=torch.float32, device=dev)
        bx, bs, bh, bg, be = L.buf(x), L.buf(state), L.buf(hist), L.buf(cgt), L.buf(ceq)
        bi, bv = L.buf(idx, out=True), L.buf(vals, out=True)
        L.launch("topk_init", 1, (bs, bh, _u32(k)))
        for p, (shift, width) in enumerate(_DIGITS):
            L.launch("topk_hist", _grid(d), (bx, _u32(d), bs, bh, _u32(p), _u32(shift), _u32(width)))
            L.launch("topk_pick", 1, (bs, bh, _u32(p), _u32(shift), _u32(width)))
        L.launch("topk_count", ntiles, (bx, _u32(d), bs, bg, be))
        L.launch("topk_scan", 1, (bg, be, _u32(ntiles)))
        L.launch("topk_write", ntiles, (bx, _u32(d), bs, bg, be, bi, bv))
        L.done()
        return idx

    @_one_at_a_time
    def topk_chunked(self, x: Tensor, chunk: int, k_full: int, k_last: int) -> Tensor:
        """Chunked TopK (SPEC §9): csrc/topk_chunked.cu, one block per chunk (exact radix select in
        shared memory, then an in-order compaction); fp16/bf16 widened to fp32 as :meth:`topk` does."""
        d = x.numel()
        nfull, rem = divmod(d, chunk) if chunk >= 1 else (0, 0)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # exact, and the same key order
        if (not self._ok(x) or d < 1 or not 1 <= chunk <= _MAX_CHUNK or k_full < 1
                or (rem and k_last < 1)):
            return self.ref.topk_chunked(x, chunk, k_full, k_last)
        x = x.reshape(-1)
        kf = min(k_full, chunk)
        n_out = nfull * kf + (min(k_last, rem) if rem else 0)
        nchunks = nfull + (1 if rem else 0)
        out = torch.empty(n_out, dtype=torch.int64, device=x.device)
        L = self.L
        L.launch("topk_chunked", min(nchunks, _MAX_CHUNK_BLOCKS),
                 (L.buf(x), _u32(d), _u32(chunk), _u32(nchunks), _u32(k_full), _u32(max(k_last, 1)),
                  L.buf(out, out=True)))
        L.done()
        return out

    # -- RandK -------------------------------------------------------------------------------------
    @_one_at_a_time
    def randk(self, d: int, k: int, seed: int, device: "torch.device | str") -> Tensor:
        device = torch.device(device)
        if k >= d or k < 1:
            return torch.arange(min(max(k, 0), d), device=device)
        probe = torch.empty(0, device=device)
        if not self.L.handles(probe) or d >= (1 << 31):
            return self.ref.randk(d, k, seed, device)
        out = torch.empty(k, dtype=torch.int64, device=device)
        self.L.launch("randk_indices", _grid(k), (_u32(d), _u32(k), _u32(seed & 0xFFFFFFFF),
                                                  _u32((seed >> 32) & 0xFFFFFFFF), self.L.buf(out, out=True)))
        self.L.done()
        return out

    # -- messages ----------------------------------------------------------------------------------
    @_one_at_a_time
    def gather(self, x: Tensor, idx: Tensor) -> Tensor:
        if not self._ok(x) or idx.dtype != torch.int64:
            return self.ref.gather(x, idx)
        k = idx.numel()
        out = torch.empty(k, dtype=x.dtype, device=x.device)
        if k:
            self.L.launch("gather_f32", _grid(k), (self.L.buf(x), self.L.buf(idx.contiguous()), _u32(k),
                                                   self.L.buf(out, out=True)))
            self.L.done()
        return out

    @_one_at_a_time
    def scatter_add_(self, x: Tensor, idx: Tensor, vals: Tensor, sign: float = 1.0) -> Tensor:
        vals = vals.to(x.dtype)
        if not self._ok(x, vals.contiguous()) or idx.dtype != torch.int64 or sign not in (1.0, -1.0):
            return self.ref.scatter_add_(x, idx, vals, sign)
        k = idx.numel()
        if k:
            self.L.launch("scatter_add_f32", _grid(k), (self.L.buf(x, out=True), self.L.buf(idx.contiguous()),
                                                        self.L.buf(vals.contiguous()), _u32(0), _u32(k),
                                                        _f32(sign)))
            self.L.done()
        return x

    @_one_at_a_time
    def ordered_sum(self, messages: "list[tuple[Tensor, Tensor]]", out: Tensor) -> Tensor:
        if not self._ok(out):
            return self.ref.ordered_sum(messages, out)
        L = self.L
        d = out.numel()
        bo = L.buf(out, out=True)
        L.launch("zero_f32", _grid(d), (bo, _u32(d)))
        for idx, vals in messages:  # one launch per rank, in rank order: no atomics, the same sum everywhere
            k = idx.numel()
            if k:
                v = vals.to(torch.float32).contiguous()
                kern = "scatter_add_f32_i32" if idx.dtype == torch.int32 else "scatter_add_f32"
                i = idx.contiguous() if idx.dtype == torch.int32 else idx.to(torch.int64).contiguous()
                L.launch(kern, _grid(k), (bo, L.buf(i), L.buf(v), _u32(0), _u32(k), _f32(1.0)))
        L.done()
        return out

    # -- value codecs (SPEC §9) --------------------------------------------------------------------
    def _dev_ok(self, *ts: Tensor) -> bool:
        return all(t.is_contiguous() and self.L.handles(t) for t in ts) and 0 < ts[0].numel() < (1 << 31)

    @_one_at_a_time
    def quantize(self, v: Tensor, bits: int, group: int) -> "tuple[Tensor, Tensor]":
        """csrc/codecs.cu: quant_amax (a block per group), quant_scales, quant_codes; fp16/bf16 widened."""
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()  # exact: the reference's float64 of v is that of the float32
        if not self._ok(v) or v.numel() < 1 or not 2 <= bits <= 8 or not 1 <= group <= (1 << 16):
            return self.ref.quantize(v, bits, group)
        v = v.reshape(-1)
        k = v.numel()
        q = 2 ** (bits - 1) - 1
        ng = -(-k // group)
        dev = v.device
        amax = torch.empty(ng, dtype=torch.int32, device=dev)
        scales = torch.empty(ng, dtype=torch.float32, device=dev)
        codes = torch.empty(k, dtype=torch.int8, device=dev)
        L = self.L
        bv, ba, bs, bc = L.buf(v), L.buf(amax), L.buf(scales, out=True), L.buf(codes, out=True)
        L.launch("quant_amax", min(ng, _MAX_CHUNK_BLOCKS), (bv, _u32(k), _u32(group), _u32(ng), ba))
        L.launch("quant_scales", 1, (ba, _u32(ng), _u32(q), bs))
        L.launch("quant_codes", _grid(k), (bv, _u32(k), _u32(group), bs, _u32(q), bc))
        L.done()
        return codes, scales

    @_one_at_a_time
    def dequantize(self, codes: Tensor, scales: Tensor, group: int, dtype: torch.dtype) -> Tensor:
        k = codes.numel()
        if (codes.dtype != torch.int8 or scales.dtype != torch.float32 or not self._dev_ok(codes, scales)
                or scales.numel() < -(-k // max(group, 1)) or group < 1):
            return self.ref.dequantize(codes, scales, group, dtype)
        out = torch.empty(k, dtype=torch.float32, device=codes.device)
        L = self.L
        L.launch("dequant_f32", _grid(k), (L.buf(codes.reshape(-1)), _u32(k), _u32(group), L.buf(scales.reshape(-1)),
                                            L.buf(out, out=True)))
        L.done()
        return out if dtype == torch.float32 else out.to(dtype)

    @_one_at_a_time
    def pack_int4(self, codes: Tensor) -> Tensor:
        if codes.dtype != torch.int8 or not self._dev_ok(codes):
            return self.ref.pack_int4(codes)
        k = codes.numel()
        out = torch.empty((k + 1) // 2, dtype=torch.uint8, device=codes.device)
        self.L.launch("pack_int4", _grid((k + 1) // 2), (self.L.buf(codes.reshape(-1)), _u32(k),
                                                          self.L.buf(out, out=True)))
        self.L.done()
        return out

    @_one_at_a_time
    def unpack_int4(self, packed: Tensor, k: int) -> Tensor:
        if packed.dtype != torch.uint8 or not self._dev_ok(packed) or not 0 < k <= 2 * packed.numel():
            return self.ref.unpack_int4(packed, k)
        out = torch.empty(k, dtype=torch.int8, device=packed.device)
        self.L.launch("unpack_int4", _grid(k), (self.L.buf(packed.reshape(-1)), _u32(k), self.L.buf(out, out=True)))
        self.L.done()
        return out

    def _bf16_nan(self, dev: torch.device) -> int:
        """The bits of the NaN that PyTorch's fp32 -> bf16 conversion gives on ``dev`` (asked once per device)."""
        key = str(dev)
        got = self._nan_bits.get(key)
        if got is None:
            probe = torch.full((1,), float("nan"), device=dev).to(torch.bfloat16).view(torch.int16)
            got = self._nan_bits[key] = int(probe.cpu()[0]) & 0xFFFF
        return got

    @_one_at_a_time
    def to_bf16(self, v: Tensor) -> Tensor:
        if v.dtype == torch.bfloat16:
            return self.ref.to_bf16(v)
        if not self._ok(v) or v.numel() < 1:
            return self.ref.to_bf16(v)
        nan = self._bf16_nan(v.device)
        out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
        n = v.numel()
        self.L.launch("f32_to_bf16", _grid(n), (self.L.buf(v.reshape(-1)), _u32(n), _u32(nan),
                                                 self.L.buf(out.view(torch.int16).reshape(-1), out=True)))
        self.L.done()
        return out

    # -- feedback inputs ---------------------------------------------------------------------------
    def _elementwise(self, kernel: str, inputs: "tuple[Tensor, ...]", scalars: tuple, n_out: int
                     ) -> "tuple[Tensor, ...]":
        n = inputs[0].numel()
        outs = tuple(torch.empty_like(inputs[0]) for _ in range(n_out))
        L = self.L
        L.launch(kernel, _grid(n), (*[L.buf(t) for t in inputs], _u32(n), *scalars,
                                    *[L.buf(o, out=True) for o in outs]))
        L.done()
        return outs

    @_one_at_a_time
    def ef14_input(self, e: Tensor, g: Tensor) -> Tensor:
        if not self._ok(e, g):
            return self.ref.ef14_input(e, g)
        return self._elementwise("ef14_input", (e, g), (), 1)[0]

    @_one_at_a_time
    def ef21_input(self, g: Tensor, w: Tensor) -> Tensor:
        if not self._ok(g, w):
            return self.ref.ef21_input(g, w)
        return self._elementwise("ef21_input", (g, w), (), 1)[0]

    @_one_at_a_time
    def sgdm_input(self, v: Tensor, g: Tensor, w: Tensor, beta: float) -> "tuple[Tensor, Tensor]":
        if not self._ok(v, g, w):
            return self.ref.sgdm_input(v, g, w, beta)
        vn, p = self._elementwise("sgdm_input", (v, g, w), (_f32(1.0 - beta), _f32(beta)), 2)
        return vn, p

    @_one_at_a_time
    def econtrol_input(self, g: Tensor, h: Tensor, e: Tensor, eta: float) -> "tuple[Tensor, Tensor]":
        if not self._ok(g, h, e):
            return self.ref.econtrol_input(g, h, e, eta)
        if eta != 1.0:
            return self._elementwise("econtrol_input", (g, h, e), (_f32(eta), _u32(0)), 2)
        q = torch.empty_like(g)  # eta = 1: p = q, so the kernel writes q into both (no second buffer)
        L = self.L
        bq = L.buf(q, out=True)
        L.launch("econtrol_input", _grid(q.numel()), (L.buf(g), L.buf(h), L.buf(e), _u32(q.numel()),
                                                       _f32(1.0), _u32(1), bq, bq))
        L.done()
        return q, q
