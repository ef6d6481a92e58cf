"""A local SLURM cluster of emulated nodes (see cluster.py)."""

from .cluster import SlurmCluster, SlurmUnavailable

__all__ = ["SlurmCluster", "SlurmUnavailable"]
