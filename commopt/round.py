"""One compression round of one bucket on one rank (SPEC §2–3), written once.

The DDP hook (:mod:`commopt.hook`), CO2's outer exchange (:mod:`commopt.outer`)
and the single-process simulation (:mod:`commopt.simulate`) all run a round as::

    g        = bucket / s                              unscale (GradScaler's s; state is in gradient units)
    p, aux   = feedback.prepare(state, g, k/d)         the vector to compress (e.g. η·e + g − h_i)
    p        = p · used                                parameters this rank did not use this step send nothing
    idx      = compressor.select(p, k, step, key)      fixed size k (shared indices: mapped to bucket order)
    vals     = compressor.values(p, idx) · s           NaN everywhere if g is not finite, so every rank skips
    packed, vals = compressor.encode(idx, vals, d)     SPEC §9 compact message: vals become Q(vals), decoded
    ---------  total = Σ_ranks message                 (exchange.py: all-gather + ordered sum, or all-reduce)
    mean     = total / n / s
    new      = feedback.update(state, g, p, aux, idx, vals / s, mean)   the rank's own message as sent
    new_loc  = where(used, new_loc, old_loc)           an unused parameter's own state stays as it was
    ok       = mean is finite                          the state is committed only if ok (by the caller)
    est      = feedback.estimate(new, mean) if ok else mean;   bucket ← est · s

:func:`compress` is everything before the exchange, :func:`conclude` everything
after it; :func:`dense_start` is the uncompressed round that (re)initialises the
state (SPEC §2). None of these communicate or synchronise the device: the flags
are 0-d tensors, never read on the host here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .codecs import Packed
from .compressors import Compressor
from .feedback import Feedback

__all__ = ["Outgoing", "compress", "conclude", "dense_start", "finite", "unscaled", "write_estimate",
           "hold_on_current_stream"]

State = dict[str, Tensor]


def finite(x: Tensor) -> Tensor:
    """0-d bool: x holds no inf/NaN (one cheap reduction, no sync; a sum that overflows counts as non-finite)."""
    return torch.isfinite(x.sum())


def unscaled(g_in: Tensor, scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """The bucket in the state dtype, divided by the loss scale (a fresh tensor unless no work is needed)."""
    g = g_in.to(dtype)
    if scale is not None:
        g = g / scale.to(dtype)
    return g


def write_estimate(est: Tensor, ok: Tensor, mean: Tensor, scale: Optional[Tensor], out: Tensor) -> Tensor:
    """out ← (est if ok else mean) · scale, in out's dtype; returns out."""
    if scale is None and out.dtype == est.dtype:
        return torch.where(ok, est, mean, out=out)
    res = torch.where(ok, est, mean)
    if scale is not None:
        res = res * scale.to(res.dtype)
    out.copy_(res)
    return out


def hold_on_current_stream(tensors: "list[Tensor]") -> None:
    """CUDA: mark tensors made on another stream as in use on the current one, so the caching allocator
    does not hand their memory to the next bucket before this stream's kernels have read them."""
    stream = None
    for t in tensors:
        if isinstance(t, Tensor) and t.is_cuda:
            if stream is None:
                stream = torch.cuda.current_stream(t.device)
            t.record_stream(stream)


@dataclass
class Outgoing:
    """A rank's half-finished round: the message (idx, vals) and what :func:`conclude` needs.

    With a compact wire format (SPEC §9) ``packed`` holds the bytes that travel (the exchange all-gathers
    them) and ``vals`` the values every rank decodes from them; the sum of the messages (idx, vals) is
    therefore what the exchange forms, and :mod:`commopt.simulate` needs no knowledge of the format."""

    g: Tensor                      # the (unscaled) local gradient, state dtype
    p: Optional[Tensor]            # the compressed vector (masked where unused); None if update does not read it
    aux: State                     # the rule's intermediates (e.g. EF21-SGDM's v, EControl's q)
    idx: Tensor                    # int64 [k], positions in the bucket
    vals: Tensor                   # [k], as every rank receives them (decoded): the wire dtype, times the loss scale
    own: Tensor                    # [k], this rank's message as the others receive it, in state units
    used: Optional[Tensor] = None  # bool [d] or None (every parameter used)
    scale: Optional[Tensor] = None  # the loss scale the wire values carry (None: unscaled)
    packed: Optional[Packed] = None  # the compact message that travels in a gather (None: today's format)

    def tensors(self) -> list[Tensor]:
        """Every tensor the round reads after the exchange (for :func:`hold_on_current_stream`)."""
        out = [self.g, self.idx, self.vals, self.own, *self.aux.values()]
        if self.packed is not None:
            out.append(self.packed.data)
        if self.p is not None:
            out.append(self.p)
        if self.scale is not None:
            out.append(self.scale)
        if self.used is not None:
            out.append(self.used)
        return out


def _bucket_order(idx: Tensor, canon: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    """Shared (data-independent) indices are drawn in parameter order; map them to bucket positions."""
    if canon is None:
        return idx
    starts, blk_starts = canon
    j = torch.searchsorted(starts, idx, right=True) - 1
    return blk_starts[j] + (idx - starts[j])


def compress(compressor: Compressor, feedback: Feedback, state: State, g: Tensor, k: int, step: int, key: int,
             *, wire_dtype: Optional[torch.dtype] = None, canon: Optional[tuple[Tensor, Tensor]] = None,
             used: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Outgoing:
    """Everything before the exchange: feedback input, selection, values, NaN poisoning (see the module doc).

    ``g`` is in state units (already divided by ``scale``). With a loss scale the values travel multiplied
    by it, as DDP's own all-reduce carries them, so that small gradients of an fp16 model stay normal
    numbers on the wire; :func:`conclude` divides the sum by it again."""
    d = g.numel()
    p, aux = feedback.prepare(state, g, k / d)
    if used is not None:
        p = p.masked_fill(~used, 0)
    idx = compressor.select(p, k, step, key)
    if compressor.shared_indices:
        idx = _bucket_order(idx, canon)
    vals = compressor.values(p, idx)
    if scale is not None:
        vals = vals * scale.to(vals.dtype)
    if wire_dtype is not None:
        vals = vals.to(wire_dtype)
    # a non-finite local gradient poisons the message, so every rank sees it and skips the step
    vals = torch.where(finite(g), vals, torch.full_like(vals, float("nan")))
    # SPEC §9: the compact message and its decoded values (which stay non-finite when poisoned); the
    # feedback rules then see the dequantized message as m_i, so the quantization error is fed back
    packed, vals = compressor.encode(idx, vals, d)
    own = vals.to(p.dtype)
    if scale is not None:
        own = own / scale.to(p.dtype)
    return Outgoing(g=g, p=p if feedback.update_reads_p else None, aux=aux, idx=idx, vals=vals, own=own,
                    used=used, scale=scale, packed=packed)


def conclude(feedback: Feedback, state: State, out: Outgoing, total: Tensor, n: int
             ) -> tuple[State, Tensor, Tensor, Tensor]:
    """Everything after the exchange: (new state, ok, estimate, mean). ``total`` is Σ_ranks of the messages
    (dense, any float dtype); the new state is to be committed only where ``ok``."""
    mean = total.to(out.g.dtype).div_(n)  # total is the exchange's own result: consumed
    if out.scale is not None:
        mean.div_(out.scale.to(mean.dtype))
    ok = finite(mean)
    new = feedback.update(state, out.g, out.p, out.aux, out.idx, out.own, mean)
    if out.used is not None:
        for name in feedback.local_slots:
            if name in new and name in state:
                new[name] = torch.where(out.used, new[name], state[name])
    return new, ok, feedback.estimate(new, mean), mean


def dense_start(feedback: Feedback, g: Tensor, total: Tensor, n: int) -> tuple[State, Tensor, Tensor]:
    """The uncompressed round (SPEC §2 init): (state from ``feedback.init(g, mean)``, ok, mean)."""
    mean = total.to(g.dtype) / n
    return feedback.init(g, mean), finite(mean), mean
