"""Compact messages (SPEC §9): value codecs and the packed wire format of a sparse message.

A value codec Q maps the k values of a message to bytes and back, identically on every rank:

* ``float``: the values in the gradient's (wire) dtype, unchanged (today's messages);
* ``bf16``: rounded to bfloat16 (round to nearest even);
* ``int8`` / ``int4``: symmetric absmax scaling per group of G values (G = 256 / 16 by default), one fp32
  scale per group: s = fp32(max|v_g| / q), code = round_half_even(v / s) ∈ [−q, q] with q = 2^(b−1) − 1,
  decoded as fp32(code) · s. Per group ‖Q(v) − v‖² ≤ G·(s/2)² ≤ G/(4q²)·‖v‖², so ε² ≤ G/(4q²) (SPEC §9).

The division v / s is done in float64 on fp32 scales (exact round-half-to-even of the true quotient);
int4 codes go two to a byte (low nibble first). A non-finite value anywhere in a message (commopt poisons
a message with NaN when a rank's gradient is not finite) makes **every** scale NaN, so the whole message
decodes to NaN on every rank: nothing non-finite becomes finite. A group whose scale underflows fp32
(max|v| below about 1e−43) decodes to zeros.

:class:`WireFormat` is what a compressor sends: chunk-local 16-bit indices (chunked TopK) or 32-bit
indices, then the codec's bytes. A message is one uint8 buffer [indices | codes | scales] of a size fixed
by (k, d, dtype) (:meth:`WireFormat.nbytes`), so it can be all-gathered without a size exchange; with
``chunk=c`` the chunk of entry j is known from its position (k_c per chunk is fixed), and an index is
stored as its offset in the chunk (uint16 bits in an int16). Nothing here reads a device value on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import kernels

__all__ = ["VALUE_CODECS", "DEFAULT_GROUP", "MAX_CHUNK", "WireFormat", "Packed", "quantize", "dequantize",
           "pack_int4", "unpack_int4", "to_bf16", "check_values", "check_chunk", "check_group", "epsilon_sq_bound"]

#: the value codecs, in order of bytes per value
VALUE_CODECS = ("float", "bf16", "int8", "int4")
#: the default group size G of the integer codecs (SPEC §9: ε² ≤ 0.004 for int8, 0.082 for int4)
DEFAULT_GROUP = {"int8": 256, "int4": 16}
_BITS = {"int8": 8, "int4": 4}
#: the longest chunk whose local indices fit in 16 bits
MAX_CHUNK = 1 << 16


def check_values(values: object, allowed: "tuple[str, ...]", who: str) -> str:
    """The codec name, or a ValueError naming the allowed ones."""
    if not isinstance(values, str) or values.strip().lower() not in allowed:
        raise ValueError(f"{who}: values must be one of {', '.join(repr(a) for a in allowed)}, got {values!r}")
    return values.strip().lower()


def check_chunk(chunk: object, who: str) -> Optional[int]:
    """None or an integer chunk length in [2, 65536] (chunk-local indices fit in 16 bits)."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 2 <= chunk <= MAX_CHUNK:
        raise ValueError(f"{who}: chunk must be an integer in [2, {MAX_CHUNK}] (16-bit chunk-local indices), "
                         f"got {chunk!r}")
    return chunk


def check_group(group: object, values: str, who: str) -> Optional[int]:
    """The group size G for an integer codec (None: the default), refused for the others."""
    if group is None:
        return None
    if values not in _BITS:
        raise ValueError(f"{who}: group= is the scale group of values='int8'/'int4', not of values={values!r}")
    if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= MAX_CHUNK:
        raise ValueError(f"{who}: group must be an integer in [1, {MAX_CHUNK}], got {group!r}")
    return group


def epsilon_sq_bound(values: str, group: Optional[int] = None) -> float:
    """SPEC §9's bound on ‖Q(v) − v‖² / ‖v‖²: G / (4·(2^(b−1) − 1)²) for the integer codecs, and the
    relative rounding error of bf16 (2^−16) for bf16; 0 for float."""
    if values == "float":
        return 0.0
    if values == "bf16":
        return 2.0 ** -16
    q = 2 ** (_BITS[values] - 1) - 1
    g = group or DEFAULT_GROUP[values]
    return g / (4.0 * q * q)


# -- the integer codecs ------------------------------------------------------------------------------------

def quantize(v: Tensor, bits: int, group: int) -> "tuple[Tensor, Tensor]":
    """(codes int8 [k], scales fp32 [⌈k/G⌉]) of v by symmetric absmax rounding per group of G (module doc);
    :meth:`commopt.kernels.TorchOps.quantize` or its kernel (csrc/codecs.cu), bit for bit the same."""
    return kernels.ops(v).quantize(v, bits, group)


def dequantize(codes: Tensor, scales: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """fp32(code) · s of each value's group, in ``dtype``."""
    return kernels.ops(codes).dequantize(codes, scales, group, dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """uint8 [⌈k/2⌉]: codes in [−8, 7] as 4-bit two's complement, entry 2i in the low nibble of byte i."""
    return kernels.ops(codes).pack_int4(codes)


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """The k int8 codes of :func:`pack_int4`'s bytes."""
    return kernels.ops(packed).unpack_int4(packed, k)


def to_bf16(v: Tensor) -> Tensor:
    """v rounded to bfloat16 (round to nearest even)."""
    return kernels.ops(v).to_bf16(v)


def _bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _view(buf: Tensor, dtype: torch.dtype) -> Tensor:
    """A uint8 slice as ``dtype`` (a fresh storage: the slice's offset need not be aligned)."""
    return buf.clone().view(dtype)


# -- the wire format ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WireFormat:
    """How a compressor's message travels (SPEC §9): ``chunk`` (None: global indices), the value codec
    ``values`` and its group size ``group`` (None: :data:`DEFAULT_GROUP`). The default (no chunk, float
    values) is today's format, packed by :mod:`commopt.exchange` itself."""

    chunk: Optional[int] = None
    values: str = "float"
    group: Optional[int] = None

    @property
    def default(self) -> bool:
        """True for today's messages (values in the wire dtype beside int32/int64 indices)."""
        return self.chunk is None and self.values == "float"

    @property
    def G(self) -> Optional[int]:
        """The scale group size of an integer codec, None otherwise."""
        if self.values not in _BITS:
            return None
        return self.group or DEFAULT_GROUP[self.values]

    def index_dtype(self, d: int, value_dtype: torch.dtype) -> torch.dtype:
        """int16 (chunk-local, chunked), else int32, or int64 beside 8-byte values / d ≥ 2^31."""
        if self.chunk is not None:
            return torch.int16
        if (self.values == "float" and value_dtype.itemsize == 8) or d >= (1 << 31):
            return torch.int64
        return torch.int32

    def value_bytes(self, k: int, value_dtype: torch.dtype) -> int:
        """Bytes of the k values and their scales."""
        if self.values == "float":
            return k * value_dtype.itemsize
        if self.values == "bf16":
            return 2 * k
        G = self.G
        assert G is not None
        codes = k if self.values == "int8" else (k + 1) // 2
        return codes + 4 * (-(-k // G))

    def nbytes(self, k: int, d: int, value_dtype: torch.dtype) -> int:
        """Bytes of one message of k of d values: indices, codes, scales (SPEC §9)."""
        return k * self.index_dtype(d, value_dtype).itemsize + self.value_bytes(k, value_dtype)

    # -- values only ---------------------------------------------------------------------------------------
    def encode_values(self, v: Tensor) -> Tensor:
        """uint8 bytes of the values (codes, then scales)."""
        if self.values == "float":
            return _bytes(v)
        if self.values == "bf16":
            return _bytes(to_bf16(v))
        G = self.G
        assert G is not None
        codes, scales = quantize(v, _BITS[self.values], G)
        body = _bytes(codes) if self.values == "int8" else pack_int4(codes)
        return torch.cat([body, _bytes(scales)])

    def decode_values(self, buf: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        """The k values of :meth:`encode_values`'s bytes, in ``dtype``."""
        if self.values == "float":
            return _view(buf, dtype)
        if self.values == "bf16":
            return _view(buf, torch.bfloat16).to(dtype)
        G = self.G
        assert G is not None
        n_codes = k if self.values == "int8" else (k + 1) // 2
        body, scales = buf[:n_codes], _view(buf[n_codes:], torch.float32)
        codes = body.view(torch.int8) if self.values == "int8" else unpack_int4(body, k)
        return dequantize(codes, scales, G, dtype)

    def roundtrip_values(self, v: Tensor) -> Tensor:
        """Q(v): the values as every rank decodes them, in v's dtype."""
        if self.values == "float":
            return v
        return self.decode_values(self.encode_values(v), v.numel(), v.dtype)

    # -- whole messages --------------------------------------------------------------------------------
    def pack(self, idx: Tensor, vals: Tensor, d: int, k_full: Optional[int] = None) -> "Packed":
        """The message (idx int64 [k] increasing within each chunk, vals [k] in the wire dtype) as one
        uint8 buffer. ``k_full``: entries per full chunk (chunked only; :meth:`TopK.chunk_k`)."""
        k = vals.numel()
        idt = self.index_dtype(d, vals.dtype)
        if self.chunk is not None:
            if k_full is None:
                raise ValueError("a chunked message needs k_full (entries per full chunk)")
            local = idx.remainder(self.chunk)
            local = torch.where(local >= (1 << 15), local - (1 << 16), local)  # uint16 bits in an int16
            ib = _bytes(local.to(torch.int16))
        else:
            ib = _bytes(idx.to(idt))
        data = torch.cat([ib, self.encode_values(vals)])
        return Packed(data=data, fmt=self, k=k, d=d, dtype=vals.dtype, k_full=k_full)

    def unpack(self, data: Tensor, k: int, d: int, dtype: torch.dtype, k_full: Optional[int] = None
               ) -> "tuple[Tensor, Tensor]":
        """(idx int64 [k], vals [k] of ``dtype``) of one packed message (a uint8 row of the gather)."""
        idt = self.index_dtype(d, dtype)
        nb = k * idt.itemsize
        raw = _view(data[:nb], idt)
        if self.chunk is not None:
            assert k_full is not None
            c = self.chunk
            pos = torch.arange(k, device=data.device, dtype=torch.int64)
            chunk_of = torch.clamp(pos // k_full, max=d // c)
            idx = (raw.to(torch.int64) & 0xFFFF) + chunk_of * c
        else:
            idx = raw.to(torch.int64)
        return idx, self.decode_values(data[nb:], k, dtype)

    def spec_suffix(self) -> str:
        """``,chunk=c,values=v,group=G`` for the non-default parts (for ``Compressor.spec``)."""
        out = ""
        if self.chunk is not None:
            out += f",chunk={self.chunk}"
        if self.values != "float":
            out += f",values={self.values}"
        if self.group is not None:
            out += f",group={self.group}"
        return out

    def config(self) -> dict:
        """The non-default parts (absent keys: today's format, so old configs compare equal)."""
        out: dict = {}
        if self.chunk is not None:
            out["chunk"] = self.chunk
        if self.values != "float":
            out["values"] = self.values
        if self.group is not None:
            out["group"] = self.group
        return out


@dataclass
class Packed:
    """One rank's packed message: ``data`` (uint8, :meth:`WireFormat.nbytes` long) and what decoding
    needs, the same on every rank (k, d, the wire dtype of the values, entries per full chunk)."""

    data: Tensor
    fmt: WireFormat
    k: int
    d: int
    dtype: torch.dtype
    k_full: Optional[int] = None

    def decode(self, data: Optional[Tensor] = None) -> "tuple[Tensor, Tensor]":
        """(idx, vals) of this message, or of another rank's row ``data`` of the same format."""
        return self.fmt.unpack(self.data if data is None else data, self.k, self.d, self.dtype, self.k_full)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

