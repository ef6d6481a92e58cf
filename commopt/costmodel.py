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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Link", "parse_rate", "ring_allreduce_bytes", "allgather_bytes", "transfer_seconds",
    "ring_allreduce_seconds", "allgather_seconds", "sync_step_seconds", "local_sgd_step_seconds",
    "co2_step_seconds",
]

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


def ring_allreduce_bytes(d: int, itemsize: int, n: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of d values: 2(n−1)/n · s·d."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * itemsize * d


def allgather_bytes(message_bytes: float, n: int) -> float:
    """Bytes each rank receives in an all-gather of one ``message_bytes`` message per rank: (n−1)·m."""
    return 0.0 if n <= 1 else (n - 1) * float(message_bytes)


def transfer_seconds(nbytes: float, link: Link, hops: int = 1) -> float:
    """``hops·α + 8·nbytes / B``."""
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
