"""The reference ops: PyTorch, on any device and dtype (SPEC §10).

Every kernel in ``csrc/`` has its op here, and both give the same result for the same input: the
same TopK tie rule (lowest index wins, NaN above inf, indices in increasing order), the same RandK
rule (stratified, counter-based hash), the same float operations in the same order. The kernel
paths are therefore a speed choice, never a different algorithm; the tests and the first-use
self-check compare the two.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TorchOps", "mag_keys", "randk_strata", "MIX_C1", "MIX_C2"]

#: the two multipliers of the RandK hash (both below 2^31: products of a 32-bit value stay below 2^63)
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x5BD1E995
_M32 = 0xFFFFFFFF

#: below this size a full ``torch.topk`` over the keys is as fast as the sampled pre-selection (CPU)
_PRESELECT_MIN = 1 << 16


def mag_keys(x: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """int64 keys that order like |x| with ties to the lowest index: (bits of |x|) << 32 | (2^32 − 1 − j).

    For non-negative floats the bit pattern orders like the value; NaN sorts above inf (SPEC §10). The
    bits are those of x in float32 (exact for fp16/bf16/fp32 inputs). ``index``: the positions j of the
    entries of x (default 0, 1, ...)."""
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    j = torch.arange(x.numel(), device=x.device, dtype=torch.int64) if index is None else index
    return (bits << 32) | (_M32 - j)


def _topk_exact(x: Tensor, k: int) -> Tensor:
    """Indices (any order) of the k largest keys of x, exact. On the CPU, where ``torch.topk`` with a
    large k is slow and int64 passes over the whole vector cost, a threshold t on |x| from a fixed
    strided sample keeps about 2k candidates (|x| ≥ t, or NaN) first; every entry left out is below the
    k-th largest, so the keys of the candidates alone give the same result."""
    d = x.numel()
    if x.device.type != "cpu" or d < _PRESELECT_MIN or 4 * k > d:
        return torch.topk(mag_keys(x), k, sorted=False).indices
    mag = x.abs()
    m = min(d, max(4096, 64 * int(math.ceil(d / k))), 1 << 16)
    stride = d // m
    sample = mag[: stride * m: stride].to(torch.float32)
    q = max(1, int(sample.numel() * 2 * k / d))  # the sample quantile that about 2k of d entries reach
    t = torch.topk(sample, q, sorted=False).values.min()
    cand = torch.nonzero(mag.lt(t).logical_not_()).reshape(-1)  # |x| ≥ t, or NaN
    if cand.numel() < k or bool(torch.isnan(t)):
        return torch.topk(mag_keys(x), k, sorted=False).indices
    return cand.index_select(0, torch.topk(mag_keys(x.index_select(0, cand), cand), k, sorted=False).indices)


def _topk(x: Tensor, k: int) -> Tensor:
    """:meth:`TorchOps.topk` (also the last chunk of :meth:`TorchOps.topk_chunked`)."""
    d = x.numel()
    if k >= d:
        return torch.arange(d, device=x.device)
    if x.dtype == torch.float64:
        # 64-bit floats do not fit beside an index in one key: a stable descending sort keeps the
        # lowest index first among equal magnitudes (NaN sorts as the largest)
        order = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
        return torch.sort(order).values
    return torch.sort(_topk_exact(x, k)).values


def _mix32(x: Tensor) -> Tensor:
    """csrc/randk.cu's mix32 on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * MIX_C1) & _M32
    x = x ^ (x >> 15)
    x = (x * MIX_C2) & _M32
    return x ^ (x >> 16)


def randk_strata(d: int, k: int, seed: int, device: "torch.device | str" = "cpu") -> Tensor:
    """RandK's k indices of range(d), sorted: one per stratum [⌊s·d/k⌋, ⌊(s+1)·d/k⌋) at
    start + mix(mix(s ^ seed_lo) ^ seed_hi) mod size (SPEC §10). ``seed``: a 63-bit integer."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    s = torch.arange(k, device=device, dtype=torch.int64)
    start = (s * d) // k
    size = ((s + 1) * d) // k - start
    h = _mix32(_mix32(s ^ lo) ^ hi)
    return start + h % size


class TorchOps:
    """The reference path (also the fallback for any dtype or device a kernel does not take)."""

    name = "torch"

    def topk(self, x: Tensor, k: int) -> Tensor:
        """Indices (int64, increasing) of the k largest |x|; ties to the lowest index, NaN above inf."""
        return _topk(x, k)

    def topk_chunked(self, x: Tensor, chunk: int, k_full: int, k_last: int) -> Tensor:
        """Chunked TopK (SPEC §9): indices (int64, increasing) of the ``k_full`` largest |x| of every full
        chunk of ``chunk`` entries and the ``k_last`` largest of the shorter last chunk (if d % chunk),
        each chunk by :meth:`topk`'s rule (ties to the lowest index, NaN above inf). The full chunks are
        one batched selection over the rows of a [d // chunk, chunk] view; the last chunk, which could be
        a padded row that never wins, is selected on its own instead (the same result)."""
        d = x.numel()
        x = x.reshape(-1)
        nfull, rem = divmod(d, chunk)
        parts = []
        if nfull:
            if k_full >= chunk:
                parts.append(torch.arange(nfull * chunk, device=x.device))
            else:
                body = x[: nfull * chunk]
                if x.dtype == torch.float64:
                    # as topk: a stable descending sort keeps the lowest index first among equal magnitudes
                    order = torch.sort(body.abs().view(nfull, chunk), dim=1, descending=True,
                                       stable=True).indices[:, :k_full]
                else:
                    # mag_keys with the chunk-local index (the same order within a row), built in place
                    xf = body if body.dtype == torch.float32 else body.to(torch.float32)
                    keys = xf.contiguous().view(torch.int32).to(torch.int64).bitwise_and_(0x7FFFFFFF)
                    rev = _M32 - torch.arange(chunk, device=x.device, dtype=torch.int64)
                    keys = keys.view(nfull, chunk).bitwise_left_shift_(32).bitwise_or_(rev)
                    order = torch.topk(keys, k_full, dim=1, sorted=False).indices
                starts = torch.arange(0, nfull * chunk, chunk, device=x.device, dtype=torch.int64)
                parts.append((torch.sort(order, dim=1).values + starts[:, None]).reshape(-1))
        if rem:
            parts.append(_topk(x[nfull * chunk:], k_last) + nfull * chunk)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def randk(self, d: int, k: int, seed: int, device: "torch.device | str") -> Tensor:
        """RandK's indices (int64, increasing) from the counter-based stratified rule."""
        if k >= d:
            return torch.arange(d, device=device)
        return randk_strata(d, k, seed, device)

    def gather(self, x: Tensor, idx: Tensor) -> Tensor:
        """x[idx]."""
        return x.index_select(0, idx)

    def scatter_add_(self, x: Tensor, idx: Tensor, vals: Tensor, sign: float = 1.0) -> Tensor:
        """x[idx] += sign·vals in place (sign ±1, distinct indices); returns x."""
        return x.index_add_(0, idx, vals.to(x.dtype), alpha=sign)

    def ordered_sum(self, messages: "list[tuple[Tensor, Tensor]]", out: Tensor) -> Tensor:
        """out ← Σ_r (idx_r, vals_r) densified, added in rank order (bitwise the same on every rank)."""
        out.zero_()
        for idx, vals in messages:
            out.index_add_(0, idx, vals.to(out.dtype))
        return out

    # -- the feedback inputs of SPEC §2, operation for operation as csrc/feedback.cu ------------------
    def ef14_input(self, e: Tensor, g: Tensor) -> Tensor:
        """p = e + g."""
        return e + g

    def ef21_input(self, g: Tensor, w: Tensor) -> Tensor:
        """p = g − w_i."""
        return g - w

    def sgdm_input(self, v: Tensor, g: Tensor, w: Tensor, beta: float) -> "tuple[Tensor, Tensor]":
        """(v', p): v' = v·(1−β) + g·β (two roundings), p = v' − w_i."""
        vn = v.mul(1.0 - beta).add_(g.mul(beta))
        return vn, vn - w

    def econtrol_input(self, g: Tensor, h: Tensor, e: Tensor, eta: float) -> "tuple[Tensor, Tensor]":
        """(q, p): r = g − h_i, q = e + r, p = e·η + r (p is q when η = 1)."""
        r = g - h
        q = e + r
        if eta == 1.0:
            return q, q
        return q, e.mul(eta).add_(r)

    # -- the value codecs of SPEC §9, as csrc/codecs.cu (commopt.codecs calls these) -----------------------
    def quantize(self, v: Tensor, bits: int, group: int) -> "tuple[Tensor, Tensor]":
        """(codes int8 [k], scales fp32 [⌈k/G⌉]): symmetric absmax rounding per group of G. s = fp32(max|v_g| / q)
        and code = round_half_even(v / s) clamped to [−q, q] (q = 2^(bits−1) − 1), both quotients in float64;
        code 0 where s is 0; one non-finite value anywhere makes every scale NaN (and every code 0)."""
        q = 2 ** (bits - 1) - 1
        k = v.numel()
        ng = -(-k // group)
        v64 = torch.nn.functional.pad(v.reshape(-1).to(torch.float64), (0, ng * group - k)).view(ng, group)
        amax = v64.abs().amax(dim=1)                       # NaN propagates; empty padding is 0
        s = (amax / q).to(torch.float32)
        # one non-finite value anywhere: the whole message decodes to NaN (the poisoned-message rule)
        s = torch.where(torch.isfinite(s).all(), s, torch.full_like(s, float("nan")))
        s64 = s.to(torch.float64)
        safe = torch.where(s64 > 0, s64, torch.ones_like(s64))[:, None]
        codes = torch.round(v64 / safe).clamp_(-q, q)
        codes = torch.where(torch.isfinite(codes) & (s64 > 0)[:, None], codes, torch.zeros_like(codes))
        return codes.reshape(-1)[:k].to(torch.int8), s

    def dequantize(self, codes: Tensor, scales: Tensor, group: int, dtype: torch.dtype) -> Tensor:
        """fp32(code) · s of each value's group (one fp32 multiply), in ``dtype``."""
        k = codes.numel()
        per = scales.repeat_interleave(group)[:k]
        return (codes.to(torch.float32) * per).to(dtype)

    def pack_int4(self, codes: Tensor) -> Tensor:
        """uint8 [⌈k/2⌉]: codes in [−8, 7] as 4-bit two's complement, entry 2i in the low nibble of byte i."""
        c = codes.to(torch.int16) & 0xF
        if c.numel() % 2:
            c = torch.nn.functional.pad(c, (0, 1))
        return (c[0::2] | (c[1::2] << 4)).to(torch.uint8)

    def unpack_int4(self, packed: Tensor, k: int) -> Tensor:
        """The k int8 codes of :meth:`pack_int4`'s bytes."""
        b = packed.to(torch.int16)
        lo, hi = b & 0xF, (b >> 4) & 0xF
        both = torch.stack([lo, hi], dim=1).reshape(-1)[:k]
        return ((both ^ 8) - 8).to(torch.int8)

    def to_bf16(self, v: Tensor) -> Tensor:
        """v rounded to bfloat16 (round to nearest even; NaN stays NaN, as PyTorch's conversion on v's device)."""
        return v.to(torch.bfloat16)

