"""Checks that every rank was configured the same way (one small collective at start-up).

Construction goes through :func:`build_consistently`, so a configuration error
on one rank raises on every rank instead of leaving the others waiting in a
collective.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

__all__ = ["assert_same_across_ranks", "build_consistently"]

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
