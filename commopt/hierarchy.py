"""Hierarchical compression (SPEC §8): the node layout, its process groups, the shard geometry, the
launch chains that keep collectives in bucket order, and the byte formulas.

n = N·L ranks, N nodes of L consecutive ranks (rank r = node·L + local, the placement of torchrun and
srun). Per bucket of d values, cut into L shards of ⌈d/L⌉ (zero-padded), rank (m, j):

    s = reduce-scatter(SUM) in intra(m) → shard j summed over node m;  G = s / L (the node's mean)
    feedback rule and compression of G with the N nodes as workers;  exchange across inter(j)
    estimate of shard j;  all-gather in intra(m) → the whole bucket's estimate on every rank

It is the flat algorithm with N workers whose gradients are the node means, compressed blockwise
over the L shards. The math of a round stays in :mod:`commopt.round`; this module only knows where
the bytes go.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

__all__ = ["NodeGroups", "LaunchChain", "agree_node_size", "resolve_node_size", "local_world_size", "shard_size", "shard_key",
           "intra_node_bytes"]


def _positive_int(value: str) -> Optional[int]:
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def _slurm_tasks_per_node(value: str) -> Optional[int]:
    """``SLURM_NTASKS_PER_NODE`` (``"4"``, ``"4(x2)"``, ``"4(x2),4"``): the count when every node has the
    same one, else None (an uneven layout has no single node size)."""
    counts = set()
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(\(x\d+\))?\s*", part)
        if m is None:
            return None
        counts.add(int(m.group(1)))
    return counts.pop() if len(counts) == 1 else None


def local_world_size(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """Ranks on this node according to the launcher: torchrun's ``LOCAL_WORLD_SIZE``, srun's
    ``SLURM_NTASKS_PER_NODE`` (or ``SLURM_TASKS_PER_NODE``), OpenMPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``,
    MPICH/Hydra's ``MPI_LOCALNRANKS``; None when none is set."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if name in env:
            got = _positive_int(env[name])
            if got is not None:
                return got
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            got = _slurm_tasks_per_node(env[name])
            if got is not None:
                return got
    return None


def resolve_node_size(node_size: "int | str | None", world_size: int,
                      env: Mapping[str, str] = os.environ) -> int:
    """L, the ranks per node: 1 (the flat algorithm) for ``None`` or 1, an integer L > 1, or ``"auto"``
    (:func:`local_world_size`, 1 when the launcher says nothing). Raises ``ValueError`` when L does not
    divide the world size."""
    if node_size is None:
        return 1
    if isinstance(node_size, str):
        if node_size.strip().lower() != "auto":
            raise ValueError(f"node_size must be None, an integer >= 1 or 'auto', got {node_size!r}")
        found = local_world_size(env)
        L = 1 if found is None else found
        source = f"'auto' found {L} ranks per node" if found is not None else "'auto' found no launcher layout"
    elif isinstance(node_size, bool) or not isinstance(node_size, int) or node_size < 1:
        raise ValueError(f"node_size must be None, an integer >= 1 or 'auto', got {node_size!r}")
    else:
        L, source = node_size, f"node_size={node_size}"
    if world_size % L:
        raise ValueError(f"{source}, which does not divide the world size {world_size}: hierarchical compression "
                         "needs every node to hold the same number of consecutive ranks (pass node_size=None for "
                         "the flat algorithm)")
    return L


def agree_node_size(node_size: "int | str | None", group: Optional[dist.ProcessGroup] = None) -> int:
    """:func:`resolve_node_size` on every rank, then agreed: every rank raises the same ``ValueError``
    when any rank could not resolve it, the ranks found different sizes, or two ranks placed in one node
    run on different hosts (before any process group is built, so that no rank is left in
    ``dist.new_group``). A collective unless ``node_size`` is None or 1; warns when L is the world size
    (one node: every round is the node's dense mean, nothing is compressed)."""
    n = dist.get_world_size(group)
    if node_size is None or (node_size == 1 and not isinstance(node_size, bool)):
        return resolve_node_size(node_size, n)
    try:
        mine: "int | str" = resolve_node_size(node_size, n)
    except ValueError as exc:
        mine = str(exc)
    seen: list = [None] * n
    dist.all_gather_object(seen, (mine, socket.gethostname()), group=group)
    sizes = [v for v, _ in seen]
    errors = [(r, v) for r, v in enumerate(sizes) if isinstance(v, str)]
    if errors:
        raise ValueError(f"node_size: rank {errors[0][0]}: {errors[0][1]}")
    if len(set(sizes)) > 1:
        raise ValueError("node_size: the ranks found different node sizes (" +
                         ", ".join(f"rank {r}: {v}" for r, v in enumerate(sizes)) +
                         "); set node_size to the same integer on every rank")
    L = int(sizes[0])
    hosts = [h for _, h in seen]
    for m in range(n // L):
        node = hosts[m * L:(m + 1) * L]
        if len(set(node)) > 1:
            raise ValueError(f"node_size={L} puts ranks {m * L}..{(m + 1) * L - 1} in node {m}, but they run on hosts "
                             f"{', '.join(sorted(set(node)))}: hierarchical compression needs consecutive ranks per "
                             "node (torchrun's and srun's block placement); fix the placement or the node size")
    if L == n and n > 1:
        import warnings

        warnings.warn(f"commopt: node_size={L} is the whole world: one node, so every round is the node's dense mean "
                      "(nothing is compressed; nothing crosses a slow link)", RuntimeWarning, stacklevel=3)
    return L


def shard_size(d: int, L: int) -> int:
    """Length of each of the L shards of a d-element bucket: ⌈d/L⌉ (the bucket is zero-padded to L·⌈d/L⌉)."""
    return -(-d // L)


def shard_key(key: int, j: int) -> int:
    """The bucket key of shard j (seeds RandK), the same on the N ranks that exchange shard j."""
    h = hashlib.blake2b(f"{key}:shard:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def intra_node_bytes(d: int, L: int, itemsize: int, reduce_scatter: bool = True) -> float:
    """Bytes each rank receives inside its node per bucket: reduce-scatter + all-gather of the padded
    bucket, 2·(L−1)·⌈d/L⌉·s (SPEC §8: 2·(L−1)/L·d·s). ``reduce_scatter=False`` (gloo, whose
    reduce-scatter returns no future): a ring all-reduce in its place, 3·(L−1)·⌈d/L⌉·s."""
    return (2.0 if reduce_scatter else 3.0) * (L - 1) * shard_size(d, L) * itemsize


@dataclass
class NodeGroups:
    """The process groups of one N × L layout, built once on every rank (``dist.new_group`` is itself a
    collective: every rank creates every group, in the same order).

    ``scatter`` and ``gather`` are two groups over the same L ranks of this node: the reduce-scatter is
    launched by the hook (in bucket order) and the all-gather from callbacks, so each phase has its own
    group and keeps its launches in bucket order (SPEC §8, launch order). ``inter`` joins the N ranks
    with this local rank."""

    L: int
    N: int
    node: int
    local: int
    scatter: Optional[dist.ProcessGroup]
    gather: Optional[dist.ProcessGroup]
    inter: Optional[dist.ProcessGroup]
    scatter_has_future: bool = True  # False on gloo: its reduce-scatter Work has no get_future()

    @classmethod
    def build(cls, L: int, group: Optional[dist.ProcessGroup] = None) -> "NodeGroups":
        """Every rank of the default group must call it (``dist.new_group`` is collective over the world);
        one NodeGroups serves one CompressionState (its launch chains keep the groups' order)."""
        ranks: Sequence[int] = (dist.get_process_group_ranks(group) if group is not None
                                else list(range(dist.get_world_size())))
        if len(ranks) != dist.get_world_size():
            raise ValueError(f"node_size={L} needs the process group of all {dist.get_world_size()} ranks (got one of "
                             f"{len(ranks)}): its node groups are built with dist.new_group over the world")
        n = len(ranks)
        me = dist.get_rank(group)
        N = n // L
        node, local = divmod(me, L)
        mine: dict[str, Optional[dist.ProcessGroup]] = {}
        for phase in ("scatter", "gather"):
            for m in range(N):
                g = dist.new_group([ranks[m * L + j] for j in range(L)])
                if m == node:
                    mine[phase] = g
        for j in range(L):
            g = dist.new_group([ranks[m * L + j] for m in range(N)])
            if j == local:
                mine["inter"] = g
        return cls(L=L, N=N, node=node, local=local, scatter=mine["scatter"], gather=mine["gather"],
                   inter=mine["inter"], scatter_has_future=dist.get_backend(mine["scatter"]) != "gloo")


def _future_like(t: Tensor) -> Future:
    return Future(devices=[t.device]) if t.is_cuda else Future()


def _settled(f: Future) -> None:
    """Done once ``f`` is done, whatever its outcome (the outcome is read from ``f`` itself); as a ``.then``
    callback, a future that completes successfully once ``f`` has (also used by the hook's ``_when_all``)."""
    try:
        f.wait()
    except Exception:  # noqa: BLE001 - re-raised by whoever reads f
        pass


def _transfer(src: Future, dst: Future) -> None:
    try:
        dst.set_result(src.wait())
    except Exception as exc:  # noqa: BLE001 - handed on to whoever waits on dst
        dst.set_exception(exc)


class LaunchChain:
    """Launches of one phase, in the order :meth:`after` is called (bucket order), whatever order the
    rounds become ready in on this rank: round i's collective is launched only once round i − 1's was.

    Callbacks fire in completion order, which differs between ranks (gloo runs collectives on a thread
    pool); launching from them directly can swap two collectives of one group on one rank only, and
    gloo then fails ("Received data size doesn't match") or NCCL deadlocks (SPEC §8). A failed launch
    fails every later one of the chain too: none is launched out of order."""

    def __init__(self) -> None:
        self._last: Optional[Future] = None

    def reset(self) -> None:
        """Start a new sequence (a new step); the previous one's launches have all happened."""
        self._last = None

    def after(self, ready: Future, launch: Callable[[], Future], like: Tensor) -> Future:
        """A future of ``launch()``'s future's value, with ``launch()`` called once ``ready`` has completed
        and the previous round of the chain has launched. ``like``: a tensor on the result's device."""
        result = _future_like(like)
        prev = self._last
        # wait for both to settle (collect_all alone completes at the first error, and go() would then block a
        # backend thread in prev.wait() until prev is done)
        both = ready if prev is None else torch.futures.collect_all([ready.then(_settled), prev.then(_settled)])

        def go(_: Future) -> None:
            try:
                if prev is not None:
                    prev.wait()  # an earlier launch failed: do not launch this one out of order
                ready.wait()  # re-raises; on CUDA orders this stream after the ready round's kernels
                launched = launch()
            except Exception as exc:
                result.set_exception(exc)
                raise
            launched.add_done_callback(lambda f: _transfer(f, result))

        self._last = both.then(go)
        return result
