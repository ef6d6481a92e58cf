"""Checks that every rank was configured the same way (one small collective at start-up).

Construction goes through :func:`build_consistently`, so a configuration error
on one rank raises on every rank instead of leaving the others waiting in a
collective.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["assert_same_across_ranks", "build_consistently", "bit_checksum", "assert_bitwise_same",
           "bytes_digest", "agreed_run_id", "refuse_together"]

T = TypeVar("T")


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): cfg}


def _differences(configs: list[Any]) -> list[str]:
    flat = [_flatten(c) for c in configs]
    diffs = []
    for key in sorted(set().union(*flat)):
        values = [f.get(key, "<missing>") for f in flat]
        if any(v != values[0] for v in values[1:]):
            diffs.append(f"{key}: " + ", ".join(f"rank {r} = {v!r}" for r, v in enumerate(values)))
    return diffs


def assert_same_across_ranks(config: dict, group: Optional[dist.ProcessGroup] = None, what: str = "commopt") -> None:
    """All-gather ``config`` (a picklable dict) and raise ``ValueError`` on every rank if any rank differs.

    The message names each differing key with every rank's value, e.g.
    ``compressor.ratio: rank 0 = 0.01, rank 1 = 0.02``.
    """
    configs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    diffs = _differences(configs)
    if diffs:
        raise ValueError(f"{what}: ranks are configured differently:\n  " + "\n  ".join(diffs))


def build_consistently(build: Callable[[], tuple[T, dict]], group: Optional[dist.ProcessGroup] = None,
                       what: str = "commopt") -> T:
    """Run ``build() -> (result, config)`` on every rank, then agree: raise on every rank if any rank
    failed (its own exception locally, a ``ValueError`` naming the failed rank elsewhere) or if the
    configs differ; otherwise return the result."""
    local_exc: Optional[BaseException] = None
    result: Any = None
    try:
        result, config = build()
        payload: dict = {"config": config}
    except Exception as exc:  # reported to every rank below
        local_exc = exc
        payload = {"error": f"{type(exc).__name__}: {exc}"}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, payload, group=group)
    failed = [(r, p["error"]) for r, p in enumerate(gathered) if "error" in p]
    if local_exc is not None:
        raise local_exc
    if failed:
        raise ValueError(f"{what}: construction failed on " +
                         "; ".join(f"rank {r} ({msg})" for r, msg in failed))
    diffs = _differences([p["config"] for p in gathered])
    if diffs:
        raise ValueError(f"{what}: ranks are configured differently:\n  " + "\n  ".join(diffs))
    return result


def bit_checksum(tensors: "list[Tensor]") -> Tensor:
    """A position-weighted checksum (int64, on the CPU) of the bit patterns of float tensors.

    Equal on two ranks when the tensors are bitwise equal; any single differing bit changes it."""
    acc = torch.zeros((), dtype=torch.int64)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    for t in tensors:
        t = t.detach().reshape(-1).cpu()
        bits = t.view(ints[t.element_size()]).to(torch.int64)
        w = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
        acc = acc * 1000003 + (bits * w).sum()
    return acc


def assert_bitwise_same(local: Tensor, group: Optional[dist.ProcessGroup] = None, what: str = "state",
                        period: int = 1) -> None:
    """All-gather a :func:`bit_checksum` and raise ``RuntimeError`` on every rank if any rank's differs
    (on NCCL the gather runs on the current CUDA device). ``period`` = L compares only ranks r ≡ r' mod L
    (under node_size = L the replicas of shard j are the ranks of local rank j), still on every rank."""
    n = dist.get_world_size(group)
    sums = [torch.zeros_like(local) for _ in range(n)]
    if dist.get_backend(group) == "nccl":  # NCCL gathers CUDA tensors only
        dev = torch.device("cuda", torch.cuda.current_device())
        dev_sums = [x.to(dev) for x in sums]
        dist.all_gather(dev_sums, local.to(dev), group=group)
        sums = [x.cpu() for x in dev_sums]
    else:
        dist.all_gather(sums, local, group=group)
    values = [int(x) for x in sums]
    if any(v != values[r % period] for r, v in enumerate(values)):
        which = "ranks" if period == 1 else f"ranks of one local rank (node_size {period})"
        raise RuntimeError(f"{what} differs across {which} (checksums {values})")


def refuse_together(error: Optional[str], group: Optional[dist.ProcessGroup] = None, what: str = "load",
                    same: Optional[dict] = None) -> None:
    """A collective: every rank passes its own refusal (a message) or None; if any rank refused, raise
    ``ValueError`` on every rank naming each refusing rank and its reason. ``same``: values that must be
    equal on every rank (where a checkpoint resumes, the run it comes from); ranks whose values differ
    are refused alike, each value named. Without an initialised process group (or with one rank) it
    raises the local refusal only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if error is not None:
            raise ValueError(f"{what}: {error}")
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (error, same), group=group)
    bad = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if bad:
        raise ValueError(f"{what} refused on rank(s) {[r for r, _ in bad]}; nothing was changed on any rank:\n  "
                         + "\n  ".join(f"rank {r}: {e}" for r, e in bad))
    diffs = _differences([s or {} for _, s in gathered])
    if diffs:
        raise ValueError(f"{what} refused on every rank; nothing was changed on any rank: {mismatch(diffs)}")


def mismatch(diffs: "list[str]") -> str:
    """Why checkpoints whose must-be-equal values (:func:`_differences` lines) differ between ranks are refused."""
    if all(d.startswith("run") for d in diffs):  # "run", or "run.<what identifies it>": the same step, two runs
        why = ("the ranks' checkpoints come from different runs (files of an earlier run left beside this "
               "run's?); load files saved by one run")
    else:
        why = "the ranks' checkpoints would resume at different points; load checkpoints saved at the same step"
    return why + ":\n  " + "\n  ".join(diffs)


def bytes_digest(tensors: "list[Tensor]") -> str:
    """A digest of the tensors' bytes (shapes and dtypes included), streamed without a copy of a CPU tensor:
    equal on two ranks when the tensors are bitwise equal. For a one-time comparison, e.g. at load."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def agreed_run_id(group: Optional[dist.ProcessGroup] = None) -> str:
    """A random id drawn on the group's first rank and broadcast (a collective), so the same on every
    rank and new in every run: checkpoints carry it, and ranks holding files of different runs are
    refused together at load (a mix of two runs at the same step would otherwise load silently)."""
    token = [secrets.token_hex(8)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(token, src=src, group=group)
    return str(token[0])
