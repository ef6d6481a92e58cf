"""Checks that every rank was configured the same way (one small collective at start-up)."""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

__all__ = ["assert_same_across_ranks"]


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): cfg}


def assert_same_across_ranks(config: dict, group: Optional[dist.ProcessGroup] = None, what: str = "commopt") -> None:
    """All-gather ``config`` (a picklable dict) and raise ``ValueError`` on every rank if any rank differs.

    The message names each differing key with every rank's value, e.g.
    ``compressor.ratio: rank 0 = 0.01, rank 1 = 0.02``.
    """
    n = dist.get_world_size(group)
    configs: list[Any] = [None] * n
    dist.all_gather_object(configs, config, group=group)
    flat = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flat))
    diffs = []
    for key in keys:
        values = [f.get(key, "<missing>") for f in flat]
        if any(v != values[0] for v in values[1:]):
            diffs.append(f"{key}: " + ", ".join(f"rank {r} = {v!r}" for r, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{what}: ranks are configured differently:\n  " + "\n  ".join(diffs))
