"""Moving compressed messages between ranks (SPEC §3).

Each function launches one fixed-size asynchronous collective and returns a
``torch.futures.Future`` whose value is the **sum over ranks** of the messages
as a dense vector. Nothing here blocks, calls ``.item()`` or knows which
feedback rule is running.

| exchange | collective | bytes each rank receives |
|---|---|---|
| ``dense``  | all-reduce of d values            | 2(n−1)/n · d · s |
| ``gather`` | all-gather of (values, indices)   | (n−1) · k · (s + s_idx) |
| ``shared`` | all-reduce of the k values (RandK) | 2(n−1)/n · k · s |

(s = bytes per value, s_idx = 4, or 8 for float64 values.) Sums of gathered
messages are taken in rank order, so every rank gets bitwise the same result.

Compact messages (SPEC §9): a ``gather`` given a :class:`~commopt.codecs.Packed` message all-gathers its
bytes (one uint8 buffer per rank: chunk-local int16 or int32 indices, value codes, fp32 scales), decodes
every row and sums the decoded rows in rank order; it then receives (n−1)·``WireFormat.nbytes(k, d, s)``.
``dense`` and ``shared`` exchanges carry the decoded values as floats in the wire dtype (sums of low-bit
codes overflow), so their bytes do not change.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from . import kernels
from .codecs import Packed, WireFormat
from .round import hold_on_current_stream

__all__ = ["CollectiveError", "Deferred", "Exchange", "unwrapped", "choose_exchange", "ordered_sum", "ring_allreduce_bytes", "allgather_bytes"]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_CALLBACK_PREFIX = "Got the following error when running the callback: "
_EXC_NAME = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")
_F = TypeVar("_F", bound=Callable[..., Any])


class CollectiveError(RuntimeError):
    """A collective of commopt's exchange failed (a dead or unreachable peer, a timeout, an aborted
    group). The message names the collective and this rank, then gives the backend's own error."""


def root_cause(exc: BaseException) -> str:
    """The message of ``exc`` without the prefixes torch adds at every ``.then()`` level it crossed
    (``Got the following error when running the callback: RuntimeError: ...``) nor their ``At:`` trailers."""
    msg = str(exc).strip()
    while msg.startswith(_CALLBACK_PREFIX):
        msg = _EXC_NAME.sub("", msg[len(_CALLBACK_PREFIX):], count=1).strip()
    return msg.split("\n\nAt:\n")[0].strip()


def unwrapped(fn: _F) -> _F:
    """Decorate a future callback so that an error it re-raises from an earlier future reaches the next
    level as one :class:`CollectiveError` with the original message, not wrapped once more per level."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CollectiveError:
            raise
        except Exception as exc:
            if _CALLBACK_PREFIX in str(exc):
                raise CollectiveError(root_cause(exc)) from None
            raise

    return call  # type: ignore[return-value]


def ring_allreduce_bytes(numel: int, itemsize: int, n: int) -> float:
    """Bytes each rank receives in a ring all-reduce of ``numel`` elements."""
    return 2.0 * (n - 1) / n * numel * itemsize


def allgather_bytes(numel: int, itemsize: int, n: int) -> float:
    """Bytes each rank receives in an all-gather of ``numel`` elements per rank."""
    return float((n - 1) * numel * itemsize)


def index_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Integer type for indices packed beside values: int32, or int64 beside 8-byte values."""
    return torch.int64 if value_dtype.itemsize == 8 else torch.int32


def choose_exchange(shared_indices: bool, k: int, d: int, n: int, wire: Optional[WireFormat] = None) -> str:
    """``shared`` for data-independent indices, ``gather`` while it moves fewer bytes than a dense ring
    all-reduce, else ``dense`` (SPEC §3). Both are counted in the 4-byte format of SPEC §3's table:
    n·m < 2·4·d, with m the bytes of one message (``wire.nbytes(k, d, float32)``; today's is 8k, so the
    rule is k/d < 1/n). A compact message (SPEC §9, e.g. 3.02 B per entry) stays gathered up to
    k/d < 8/(3.02·n). The rule does not depend on the bucket dtype, so every rank and a resumed run
    choose alike."""
    if k >= d:
        return "dense"
    if shared_indices:
        return "shared"
    m = 8 * k if wire is None or wire.default else wire.nbytes(k, d, torch.float32)
    return "gather" if n * m < 8 * d else "dense"


def ordered_sum(messages: "list[tuple[Tensor, Tensor]]", d: int, out_dtype: torch.dtype,
                device: Optional[torch.device] = None, out: Optional[Tensor] = None) -> Tensor:
    """Σ_r of the sparse messages (idx_r, vals_r) as a dense vector, added in rank order (bitwise the same
    result wherever it is computed: the all-gather's callback on every rank, and the simulation).
    ``out``: a [d] tensor of ``out_dtype`` to write the sum into (overwritten) instead of a new one."""
    dev = device if device is not None else messages[0][1].device
    if out is None:
        out = torch.empty(d, dtype=out_dtype, device=dev)
    return kernels.ops(out).ordered_sum(messages, out)


class Exchange:
    """The three collectives over one process group. Every callback takes its collective's result from
    the future (``value()``), so a failed collective raises in the future DDP and the caller wait on."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, where: Optional[str] = None) -> None:
        self.group = group
        self.n = dist.get_world_size(group)
        self.where = where  # how a failure names this rank (default: its rank in ``group``)

    def send(self, kind: str, idx: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype,
             out: Optional[Tensor] = None, packed: Optional[Packed] = None) -> Future:
        """Move one fixed-size message by the exchange ``kind``; a future of Σ_ranks as a dense vector.

        ``out`` (optional, [d] of ``out_dtype``): where the dense sum is written, e.g. the DDP bucket
        itself, once the caller no longer needs its contents; it saves one bucket-sized buffer.
        ``packed`` (optional, :attr:`commopt.round.Outgoing.packed`): the compact message a ``gather``
        moves instead of (vals, idx); the sum is the same (the decoded values are ``vals``)."""
        return _chained(*self._launch(kind, idx, vals, d, out_dtype, out, packed), self._what(kind, vals, d))

    def dense(self, x: Tensor) -> Future:
        """All-reduce (sum) of x in place; the future holds x."""
        return _chained(*self._dense(x), self._what("dense", x, x.numel()))

    def _what(self, kind: str, vals: Tensor, d: int) -> str:
        """How a failure of this exchange is described: the collective, the message, this rank."""
        collective = "all_gather_into_tensor" if kind == "gather" else "all_reduce"
        where = self.where or f"on rank {dist.get_rank(self.group)} of {self.n}"
        return (f"commopt: the {collective} of a {kind} exchange ({vals.numel()} of {d} values, "
                f"{vals.dtype}) failed {where}")

    def start(self, kind: str, idx: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype,
              out: Optional[Tensor] = None, packed: Optional[Packed] = None) -> "Deferred":
        """:meth:`send` whose sum is formed by the thread that waits for it (``Deferred.wait``), not by a
        callback on the backend's thread. For exchanges waited on outside DDP (CO2's outer round): one
        still in flight when the process group is destroyed or the process exits is simply abandoned,
        whereas a pending ``.then()`` callback would run on a gloo thread during interpreter shutdown and
        abort the process (``terminate called without an active exception``)."""
        work, finish = self._launch(kind, idx, vals, d, out_dtype, out, packed)
        return Deferred(work, finish, self._what(kind, vals, d))

    def _launch(self, kind: str, idx: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype,
                out: Optional[Tensor], packed: Optional[Packed] = None
                ) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """Launch the collective of ``kind``; returns its work and the function that, once the work has
        completed, forms the dense sum."""
        if out is not None and (out.dtype != out_dtype or out.numel() != d):
            out = None
        if kind == "gather":
            if packed is not None:
                return self._gather_packed(packed, d, out_dtype, out)
            return self._gather(idx, vals, d, out_dtype, out)
        if kind == "shared":
            return self._shared(idx, vals, d, out_dtype, out)
        if kind == "dense":
            if out is not None and out.dtype == vals.dtype:
                return self._dense(out.zero_().index_put_((idx,), vals))
            return self._dense(torch.zeros(d, dtype=vals.dtype, device=vals.device).index_put_((idx,), vals))
        raise ValueError(f"unknown exchange {kind!r}")

    def _dense(self, x: Tensor) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """All-reduce (sum) of x in place; the result is x."""
        work = dist.all_reduce(x, group=self.group, async_op=True)
        return work, lambda: x

    def _shared(self, idx: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype,
                out: Optional[Tensor] = None) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """All-reduce of values at indices that are the same on every rank; dense sum."""
        buf = vals.contiguous().clone()
        work = dist.all_reduce(buf, group=self.group, async_op=True)

        def densify() -> Tensor:
            hold_on_current_stream([idx, buf])
            dense = torch.zeros(d, dtype=out_dtype, device=buf.device) if out is None else out.zero_()
            return dense.index_put_((idx,), buf.to(out_dtype))

        return work, densify

    def _gather(self, idx: Tensor, vals: Tensor, d: int, out_dtype: torch.dtype,
                out: Optional[Tensor] = None) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """All-gather of fixed-size (values, indices) in one buffer; ordered sum over ranks."""
        k = vals.numel()
        idt = index_dtype(vals.dtype)
        send = torch.cat([vals.reshape(-1), idx.to(idt).view(vals.dtype)])
        # clone: a fresh storage offset for the index view
        return self._gather_rows(send, lambda row: (row[k:].clone().view(idt), row[:k]), d, out_dtype, out)

    def _gather_packed(self, packed: Packed, d: int, out_dtype: torch.dtype, out: Optional[Tensor] = None
                       ) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """All-gather of one compact message (uint8) per rank; every row decoded, ordered sum (SPEC §9)."""
        return self._gather_rows(packed.data, packed.decode, d, out_dtype, out)

    def _gather_rows(self, send: Tensor, decode: "Callable[[Tensor], tuple[Tensor, Tensor]]", d: int,
                     out_dtype: torch.dtype, out: Optional[Tensor]) -> "tuple[dist.Work, Callable[[], Tensor]]":
        """All-gather of one fixed-size row per rank; ``decode(row)`` gives each rank's (indices, values),
        summed in rank order."""
        width = send.numel()
        recv = torch.empty(self.n * width, dtype=send.dtype, device=send.device)
        work = _all_gather_single(recv, send, group=self.group, async_op=True)

        def summed() -> Tensor:
            hold_on_current_stream([recv, send])
            rows = recv.view(self.n, width)
            return ordered_sum([decode(rows[r]) for r in range(self.n)], d, out_dtype, recv.device, out)

        return work, summed

    def message_bytes(self, kind: str, k: int, d: int, value_dtype: torch.dtype,
                      wire: Optional[WireFormat] = None) -> float:
        """Bytes this rank receives for one message of the given kind (SPEC §3 formulas). ``wire``: the
        compressor's wire format (``compressor.wire``; None: today's), which changes a ``gather``'s message
        to (n−1)·``wire.nbytes(k, d, value_dtype)`` (SPEC §9); ``dense``/``shared`` carry floats either way."""
        s = value_dtype.itemsize
        if kind == "dense":
            return ring_allreduce_bytes(d, s, self.n)
        if kind == "shared":
            return ring_allreduce_bytes(k, s, self.n)
        if kind == "gather":
            if wire is not None and not wire.default:
                return allgather_bytes(1, wire.nbytes(k, d, value_dtype), self.n)
            s_idx = index_dtype(value_dtype).itemsize
            return allgather_bytes(k, s + s_idx, self.n)
        raise ValueError(f"unknown exchange {kind!r}")


def _chained(work: "dist.Work", finish: "Callable[[], Tensor]", what: str) -> Future:
    """A future of ``finish()`` run once ``work`` completes; a failed collective raises a
    :class:`CollectiveError` (``what``: the backend's error) in it."""

    def result(f: Future) -> Tensor:
        try:
            f.value()
        except Exception as exc:
            raise CollectiveError(f"{what}: {root_cause(exc)}") from None
        return finish()

    return work.get_future().then(result)


class Deferred:
    """A launched exchange whose dense sum is formed in the thread that calls :meth:`wait`
    (see :meth:`Exchange.start`)."""

    def __init__(self, work: "dist.Work", finish: "Callable[[], Tensor]", what: str) -> None:
        self._work, self._finish, self._what = work, finish, what

    @property
    def work(self) -> "dist.Work":
        """The launched collective itself (to wait for it without forming the sum, e.g. at teardown)."""
        return self._work

    def wait(self) -> Tensor:
        """Block until the collective completes, then return Σ_ranks, dense; a failed collective raises
        :class:`CollectiveError`."""
        try:
            self._work.wait()
        except Exception as exc:
            raise CollectiveError(f"{self._what}: {root_cause(exc)}") from exc
        return self._finish()
