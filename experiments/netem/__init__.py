"""Emulated multi-node cluster on one machine (network namespaces + bridge + tc netem); see :mod:`.cluster`.

CLI: ``python -m experiments.netem --nodes 2 --ranks-per-node 1 --rate 1gbit -- python train.py``.
"""

from .cluster import Cluster, NetemError, NetemUnavailable, RankProc, check_support, cleanup_stale, list_objects

__all__ = ["Cluster", "NetemError", "NetemUnavailable", "RankProc", "check_support", "cleanup_stale", "list_objects"]
