"""Cost model of one training step: compute plus the communication it cannot hide (SPEC §3, §6).

A link is a bandwidth B (bits/s, each way) and a per-message latency α. A collective that
moves ``nbytes`` through a rank's link in ``hops`` sequential messages takes
``hops·α + 8·nbytes / B`` seconds. The byte counts are the SPEC §3 formulas that
``comm_stats()`` reports (bytes each rank receives, equal to what it sends for rings):

- ring all-reduce of d values of s bytes over n ranks: 2(n−1)/n · s·d bytes, 2(n−1) hops;
- all-gather of an m-byte message: (n−1)·m bytes, n−1 hops.

Step times (c = compute per step, D = communication time of one exchange):

- synchronous exchange every step, not overlapped with backward: c + D (an upper bound;
  DDP overlaps part of D with backward, so the truth lies between max(c, D) and c + D);
- blocking local SGD, an all-reduce every τ steps: c + D/τ;
- CO2, the all-reduce overlapped with the next τ steps: c + max(0, D − τ·c)/τ.

DDP cuts the gradient into buckets (:func:`ddp_bucket_numels`: a first bucket of 1 MiB, then
``bucket_cap_mb``, 25 MiB by default) and runs one collective per bucket, so a step pays the
latency once per bucket: :func:`bucketed_allreduce_seconds`. commopt's hook compresses each
bucket on its own (k = ⌊r·d⌋ per bucket) and picks its collective by the SPEC §3 rule
(:func:`compressed_exchange`, the same rule as :func:`commopt.exchange.choose_exchange`).
Compressing bucket j+1 overlaps with bucket j's collective: :func:`pipelined_seconds`.

Where a collective's time is not affine in its bytes (TCP windows against a shaper's queue, protocol
switches), a :class:`MeasuredCurve` of measured times can stand in for a :class:`Link` in every function
here: the time of a message is then read off the curve (``hops`` is part of what was measured).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .exchange import choose_exchange, ring_allreduce_bytes  # 2(n−1)/n · s·d, the formula comm_stats() counts with

__all__ = [
    "Link", "parse_rate", "ring_allreduce_bytes", "allgather_bytes", "transfer_seconds",
    "ring_allreduce_seconds", "allgather_seconds", "sync_step_seconds", "local_sgd_step_seconds",
    "co2_step_seconds", "ddp_bucket_numels", "bucketed_allreduce_seconds", "compressed_exchange",
    "exchange_bytes", "exchange_seconds", "pipelined_seconds", "MeasuredCurve", "DDP_FIRST_BUCKET_BYTES", "DDP_BUCKET_BYTES",
]

#: DDP's defaults: the first bucket holds about 1 MiB (``dist._DEFAULT_FIRST_BUCKET_BYTES``), the others
#: ``bucket_cap_mb=25`` MiB.
DDP_FIRST_BUCKET_BYTES = 1 << 20
DDP_BUCKET_BYTES = 25 << 20

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float:
    """``"1gbit"``, ``"100mbit"``, ``"25Gbit"``, ``"10e6"`` → bits per second."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kmgtKMGT]?)(bit|bps|b/s)?\s*", str(text))
    if not m:
        raise ValueError(f"commopt: cannot read the link rate {text!r}; write e.g. '1gbit' or '100mbit'")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"commopt: a link rate must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class Link:
    """A network link: ``bandwidth`` in bits/s each way, ``latency`` in seconds per message."""

    bandwidth: float
    latency: float = 0.0

    @classmethod
    def parse(cls, rate: str, latency: float = 0.0) -> "Link":
        return cls(parse_rate(rate), float(latency))


@dataclass(frozen=True)
class MeasuredCurve:
    """Measured time of one collective against the bytes each rank moves (``wire``, increasing), usable
    wherever a :class:`Link` is: linear between the measured points, the smallest point's time below
    them, and beyond the largest its time plus the rest at ``link.bandwidth`` (``link``: the affine fit of
    the same times). Made non-decreasing on construction (a time above a larger message's time is noise:
    lowered to it)."""

    wire: tuple[float, ...]
    seconds: tuple[float, ...]
    link: Link

    def __post_init__(self) -> None:
        if len(self.wire) != len(self.seconds) or not self.wire:
            raise ValueError("MeasuredCurve: give one time per size, at least one")
        if any(b <= a for a, b in zip(self.wire, self.wire[1:])):
            raise ValueError("MeasuredCurve: the sizes must increase")
        mono, low = [], float("inf")
        for t in reversed(self.seconds):
            low = min(low, float(t))
            mono.append(low)
        object.__setattr__(self, "seconds", tuple(reversed(mono)))
        object.__setattr__(self, "wire", tuple(float(w) for w in self.wire))

    def time(self, nbytes: float) -> float:
        """Seconds of one collective moving ``nbytes`` per rank."""
        w, t = self.wire, self.seconds
        if nbytes <= w[0]:
            return t[0]
        if nbytes >= w[-1]:
            return t[-1] + 8.0 * (nbytes - w[-1]) / self.link.bandwidth
        hi = next(i for i in range(1, len(w)) if w[i] >= nbytes)
        f = (nbytes - w[hi - 1]) / (w[hi] - w[hi - 1])
        return t[hi - 1] + f * (t[hi] - t[hi - 1])




def allgather_bytes(message_bytes: float, n: int) -> float:
    """Bytes each rank receives in an all-gather of one ``message_bytes`` message per rank: (n−1)·m."""
    return 0.0 if n <= 1 else (n - 1) * float(message_bytes)


def transfer_seconds(nbytes: float, link: Link, hops: int = 1) -> float:
    """``hops·α + 8·nbytes / B`` (for a :class:`MeasuredCurve`: its measured time of ``nbytes``)."""
    if isinstance(link, MeasuredCurve):
        return link.time(nbytes)
    return hops * link.latency + 8.0 * float(nbytes) / link.bandwidth


def ring_allreduce_seconds(d: int, itemsize: int, n: int, link: Link) -> float:
    """Time of a ring all-reduce of d values over n ranks on ``link``."""
    if n <= 1:
        return 0.0
    return transfer_seconds(ring_allreduce_bytes(d, itemsize, n), link, hops=2 * (n - 1))


def allgather_seconds(message_bytes: float, n: int, link: Link) -> float:
    """Time of a ring all-gather of one ``message_bytes`` message per rank."""
    if n <= 1:
        return 0.0
    return transfer_seconds(allgather_bytes(message_bytes, n), link, hops=n - 1)


def sync_step_seconds(compute: float, comm: float) -> float:
    """A step whose exchange is not hidden: c + D."""
    return compute + comm


def local_sgd_step_seconds(compute: float, comm: float, tau: int) -> float:
    """Blocking local SGD, one exchange every τ steps: c + D/τ (SPEC §6)."""
    return compute + comm / tau


def co2_step_seconds(compute: float, comm: float, tau: int) -> float:
    """CO2, the exchange overlapped with the next τ local steps: c + max(0, D − τc)/τ (SPEC §6)."""
    return compute + max(0.0, comm - tau * compute) / tau


def ddp_bucket_numels(d: int, itemsize: int = 4, bucket_bytes: float = DDP_BUCKET_BYTES,
                      first_bucket_bytes: float = DDP_FIRST_BUCKET_BYTES) -> list[int]:
    """Elements per DDP bucket for d gradient values when only d is known (parameters are taken as
    divisible): a first bucket of ``first_bucket_bytes``, then buckets of ``bucket_bytes``."""
    if d <= 0:
        return []
    out: list[int] = []
    first = max(1, int(first_bucket_bytes // itemsize))
    cap = max(1, int(bucket_bytes // itemsize))
    left = int(d)
    take = min(left, first)
    out.append(take)
    left -= take
    while left > 0:
        take = min(left, cap)
        out.append(take)
        left -= take
    return out


def bucketed_allreduce_seconds(d: int, itemsize: int, n: int, link: Link,
                               bucket_bytes: float = DDP_BUCKET_BYTES,
                               first_bucket_bytes: float = DDP_FIRST_BUCKET_BYTES) -> float:
    """One ring all-reduce per DDP bucket (:func:`ddp_bucket_numels`), run one after the other."""
    return sum(ring_allreduce_seconds(b, itemsize, n, link)
               for b in ddp_bucket_numels(d, itemsize, bucket_bytes, first_bucket_bytes))


def compressed_exchange(shared_indices: bool, k: int, d: int, n: int) -> str:
    """SPEC §3: ``"shared"`` (all-reduce of k values) for data-independent indices (RandK), ``"gather"``
    (all-gather of k values and k indices) while k/d < 1/n, else ``"dense"`` (all-reduce of the
    densified message): :func:`commopt.exchange.choose_exchange` for today's 8-byte messages."""
    return choose_exchange(shared_indices, k, d, n)


def exchange_bytes(kind: str, k: int, d: int, n: int, itemsize: int = 4, index_size: int = 4) -> float:
    """Bytes each rank receives for one bucket's exchange of the given kind (SPEC §3 table)."""
    if kind == "dense":
        return ring_allreduce_bytes(d, itemsize, n)
    if kind == "shared":
        return ring_allreduce_bytes(k, itemsize, n)
    if kind == "gather":
        return allgather_bytes(k * (itemsize + index_size), n)
    raise ValueError(f"unknown exchange {kind!r}; one of 'dense', 'shared', 'gather'")


def exchange_seconds(kind: str, k: int, d: int, n: int, allreduce_link: Link, allgather_link: Link | None = None,
                     itemsize: int = 4, index_size: int = 4) -> float:
    """Time of one bucket's exchange: all-gather on ``allgather_link`` (default: ``allreduce_link``)
    for ``"gather"``, ring all-reduce on ``allreduce_link`` otherwise."""
    if kind == "gather":
        return allgather_seconds(k * (itemsize + index_size), n, allgather_link or allreduce_link)
    if kind == "dense":
        return ring_allreduce_seconds(d, itemsize, n, allreduce_link)
    if kind == "shared":
        return ring_allreduce_seconds(k, itemsize, n, allreduce_link)
    raise ValueError(f"unknown exchange {kind!r}; one of 'dense', 'shared', 'gather'")


def pipelined_seconds(work: "list[float]", transfer: "list[float]") -> float:
    """Two-stage pipeline over buckets: bucket j's local work (compression) runs after bucket j−1's, its
    transfer after its own work and after bucket j−1's transfer (one link, collectives in order). The time
    until the last transfer ends: ≤ Σwork + Σtransfer, ≥ max(Σwork, Σtransfer); one bucket: work + transfer."""
    if len(work) != len(transfer):
        raise ValueError(f"pipelined_seconds: {len(work)} work times but {len(transfer)} transfer times")
    done_work = done_link = 0.0
    for w, t in zip(work, transfer):
        done_work += w
        done_link = max(done_link, done_work) + t
    return done_link
