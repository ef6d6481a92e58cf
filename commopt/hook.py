"""The DDP glue: ``CompressionState`` + ``compression_hook`` (SPEC §4).

One bucket travels top to bottom through :func:`compression_hook`:

    bucket.buffer() (local gradient g_i)
      -> feedback.prepare      p = the vector to compress (e.g. e_i + g_i)
      -> compressor            (idx, vals) = C(p), fixed size k
      -> exchange              future of Σ_ranks C(p) as a dense vector
      -> feedback.update       new error / estimator state (committed only if all finite)
      -> feedback.estimate     the averaged gradient DDP hands to the optimizer

The hook owns no math. It keeps the per-bucket state, runs dense warm-up
rounds while DDP rebuilds its buckets, counts steps on ``bucket.is_last()``
and bytes on the host, and never blocks: no ``.item()``, no ``nonzero()``, no
size exchange; futures are chained with ``.then()``.

The unit of compression is a *block*: the set of parameters of one DDP bucket
after DDP's bucket rebuild, with its own k, exchange and flat state. Blocks are
recorded in checkpoints, so a resumed run compresses exactly as the
uninterrupted one even though a fresh DDP puts every parameter in one bucket in
its first iteration (that bucket is then processed block by block). The new
state of every block is committed at the end of the step, and only when every
block's average was finite on every rank.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from . import kernels
from .compressors import Compressor, make_compressor
from .consistency import bit_checksum
from .exchange import Exchange, _all_gather_single, _chained, choose_exchange, unwrapped
from .hierarchy import (LaunchChain, NodeGroups, _settled, agree_node_size, intra_node_bytes, local_world_size,
                        shard_key, shard_size)
from .feedback import Feedback, make_feedback
from .teardown import keep_until_exit, on_exit
from .round import compress, conclude, dense_start, hold_on_current_stream, unscaled, write_estimate

__all__ = ["CompressionState", "compression_hook"]

STATE_VERSION = 1

# every CompressionState alive in this process (weakly), drained at exit: see CompressionState.abandon_in_flight
_LIVE: "weakref.WeakSet[CompressionState]" = weakref.WeakSet()


# how long the exit drain lets the backend's threads return from callbacks whose futures it saw complete
_CALLBACK_GRACE_S = 0.2


def _drain_at_exit() -> None:
    """atexit: settle the exchanges an unwound backward left in flight, and the last step's chain, while the
    interpreter still runs."""
    waited = 0
    for state in list(_LIVE):
        try:
            waited += state.abandon_in_flight()
            waited += state.settle_last_step()
        except Exception:  # noqa: BLE001 - never fail at exit
            pass
    if waited:
        # A future's waiters wake as soon as it is marked complete, while the backend thread that completed it
        # is still returning through the callbacks of the chain (each release of a Python callback takes the
        # GIL). DDP keeps gloo's threads alive, so they cannot be joined: give them the GIL for a moment
        # rather than start interpreter shutdown under them (SIGABRT after a dead peer's error).
        time.sleep(_CALLBACK_GRACE_S)


_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Feedback state dtype: the gradient's, but never below float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_key(param_ids: Iterable[int]) -> int:
    """A bucket key that depends only on which parameters the bucket holds."""
    text = ",".join(str(i) for i in sorted(param_ids))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)



@dataclass
class Block:
    """One compression unit: a fixed set of parameters, its k, exchange and flat feedback state."""

    pids: tuple[int, ...]          # parameter numbers, in the block's (state) order
    numels: tuple[int, ...]
    d: int
    k: int
    exchange: str                  # "gather" | "shared" | "dense"
    key: int                       # layout-independent key (seeds RandK)
    slots: dict[str, Tensor] = field(default_factory=dict)
    unit: int = 0                  # the compressed length: d, or the shard ⌈d/L⌉ under node_size = L
    canon: Optional[tuple[Tensor, Tensor]] = None  # (canonical starts, block starts) for shared indices

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return out


def check_density_warmup(value: "tuple[float, int] | None") -> "tuple[float, int] | None":
    """Validate ``density_warmup=(start_density, steps)``; ``None`` (or 0 steps) turns it off."""
    if value is None:
        return None
    try:
        start, steps = value
    except (TypeError, ValueError):
        raise ValueError(f"density_warmup must be (start_density, steps), e.g. (0.25, 100), got {value!r}") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"density_warmup: steps must be an integer >= 0, got {steps!r}")
    start = float(start)
    if not 0.0 < start <= 1.0:
        raise ValueError(f"density_warmup: the start density must be in (0, 1], got {start!r}")
    return None if steps == 0 else (start, steps)


def warmup_density(final: float, warmup: "tuple[float, int] | None", j: int) -> float:
    """Density of compressed round j (0 = the first after the dense warm-up) under a density warm-up
    (Deep Gradient Compression, Lin et al. 2018, §3.3): geometric from ``start`` to ``final`` over
    ``steps`` rounds, r_j = final · (start/final)^(1 − j/steps), then ``final``; never below ``final``."""
    if warmup is None or j >= warmup[1] or warmup[0] <= final:
        return final
    start, steps = warmup
    return final * (start / final) ** (1.0 - max(0, j) / steps)


@dataclass
class _Plan:
    """How one DDP bucket layout maps onto blocks: (block, buffer positions or None, offset)."""

    layout: tuple[int, ...]
    d: int
    parts: list[tuple[Block, Optional[Tensor], int]]


class CompressionState:
    """State of :func:`compression_hook`: compressor, feedback rule, per-block error state, counters.

    Use it directly with ``ddp_model.register_comm_hook(state, compression_hook)``,
    or let :class:`commopt.CompressedOptimizer` do it. ``model`` (the module DDP
    wraps) numbers the parameters, so that checkpoints are independent of the bucket
    layout; without it parameters are numbered in the order the hook first meets them.

    ``grad_scaler`` (a ``torch.amp.GradScaler``): the hook divides by its current
    scale so the error state is kept in unscaled gradient units, and multiplies the
    result back. Without it the state is kept in the units of the gradient that
    arrives (then keep the loss scale constant).

    ``node_size`` (SPEC §8): ``None``/1 for the flat algorithm; L > 1 or ``"auto"`` for hierarchical
    compression, the flat algorithm among the N = n/L nodes whose gradients are the node means,
    compressed blockwise over the L shards of each bucket: a reduce-scatter inside each node (on gloo
    an all-reduce, whose Work has a future), the feedback rule on this rank's shard, the exchange among
    the N ranks of this local rank, an all-gather inside the node. With it the constructor is a
    collective (the ranks agree on L, then ``dist.new_group`` builds 2N + L groups); ``node_groups``
    passes groups already built (``commopt.hierarchy.NodeGroups.build``).
    """

    def __init__(
        self,
        compressor: "str | Compressor" = "topk:0.01",
        feedback: "str | Feedback | None" = "econtrol",
        process_group: Optional[dist.ProcessGroup] = None,
        warmup_steps: int = 2,
        model: Optional[torch.nn.Module] = None,
        grad_scaler: Any = None,
        commit: str = "step",
        track_unused: bool = False,
        density_warmup: "tuple[float, int] | None" = None,
        node_size: "int | str | None" = None,
        node_groups: Optional[NodeGroups] = None,
    ) -> None:
        self.compressor = make_compressor(compressor)
        self.density_warmup = check_density_warmup(density_warmup)
        if self.density_warmup is not None and getattr(self.compressor.wire, "chunk", None) is not None:
            raise ValueError(f"density_warmup={density_warmup!r} cannot be combined with a chunked TopK "
                             f"({self.compressor.spec()}): a chunked message keeps a fixed k per chunk; drop chunk= "
                             "during the warm-up or the density warm-up")
        self.feedback = make_feedback(feedback)
        self.feedback.check_compressor(self.compressor)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if commit not in ("step", "block"):
            raise ValueError(f"commit must be 'step' (atomic per step) or 'block' (less memory), got {commit!r}")
        if not isinstance(track_unused, bool):
            raise ValueError(f"track_unused must be True or False, got {track_unused!r}")
        if track_unused and model is None:
            raise ValueError("track_unused=True needs model= (the module DDP wraps) to watch its parameters")
        refuse_python_reducer()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call commopt.init_distributed() first")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # SPEC §8: L ranks per node; L > 1 compresses only between nodes (agreed before any group is built)
        self.node_size = node_groups.L if node_groups is not None else agree_node_size(node_size, process_group)
        if self.node_size > 1 and track_unused:
            raise ValueError(f"node_size={self.node_size} (hierarchical compression) does not support unused-parameter "
                             "tracking (DDP built with find_unused_parameters=True or static_graph=True): a node's "
                             "mean gradient mixes its ranks' use; build DDP without them or pass node_size=None")
        if node_groups is None and self.node_size > 1:
            node_groups = NodeGroups.build(self.node_size, process_group)
        self.nodes: Optional[NodeGroups] = node_groups
        self.inter_exchange = None if self.nodes is None else Exchange(
            self.nodes.inter, where=f"on rank {self.rank} of {self.world_size} (the inter-node group of local rank "
                                    f"{self.nodes.local}, {self.nodes.N} nodes)")
        self._chains = (LaunchChain(), LaunchChain())  # inter-node exchange, intra-node all-gather
        self._warned_flat = False
        self.warmup_steps = warmup_steps
        self.grad_scaler = grad_scaler
        self.exchange = Exchange(process_group)
        self.slot_names = self.feedback.local_slots + self.feedback.shared_slots
        self.step = 0
        self.dense_until = 0                       # forced dense rounds (after a state reset)
        self._param_ids: dict[int, int] = {}       # id(param) -> parameter number
        self._device = torch.device("cpu")
        if model is not None:
            for i, p in enumerate(model.parameters()):
                self._param_ids[id(p)] = i
                self._device = p.device
        # build the kernel op set of the model's device now (SPEC §10): its self-check reads results back to
        # the host once, which must not happen inside the hook
        kernels.ops(self._device)
        self._plans: dict[int, _Plan] = {}         # bucket index -> plan of its current layout
        self._block_of: dict[int, tuple[Block, int]] = {}  # parameter number -> (block, offset in block)
        self._order: dict[int, int] = {}           # id(block) -> bucket index it was made for (ordering)
        self._pending: list[tuple[Block, Tensor, dict[str, Tensor]]] = []  # filled by callbacks
        self._step_futures: list[Future] = []
        self._last_step: list[Future] = []         # the last launched step's futures, its commit last (teardown)
        self._failed_steps: set[int] = set()       # steps whose exchange failed: late rounds are dropped
        self._skipped = torch.zeros((), dtype=torch.int64)
        # the run's id, the same on every rank (CompressedOptimizer sets it from commopt.consistency.agreed_run_id;
        # a CompressionState used on its own has none): checkpoints carry it, and a load whose ranks hold files
        # of different runs is refused on every rank
        self.run_id: Optional[str] = None
        self._last_ok: Optional[Tensor] = None    # the last commit's flag, kept while it ended dense rounds
        self.stats = {"steps": 0, "bytes_sent": 0.0, "bytes_dense": 0.0, "bytes_inter_node": 0.0,
                      "bytes_intra_node": 0.0, "dense_rounds": 0,
                      "compressed_rounds": 0, "collectives": {}}
        self.commit = commit
        # parameters this rank used since the last synchronised step (None: not tracked, all count as used)
        self.track_unused = track_unused
        self._used: Optional[set[int]] = set() if track_unused else None
        self._used_handles: list = []
        if track_unused:
            for p in model.parameters():  # type: ignore[union-attr]
                if p.requires_grad:
                    self._used_handles.append(p.register_hook(self._marker(self._param_ids[id(p)])))
        _LIVE.add(self)
        on_exit(_drain_at_exit)

    def abandon_in_flight(self) -> int:
        """Wait for the buckets of an unfinished step to settle, discard them and leave the state as it
        was; returns how many there were (one warning when any).

        They exist only when backward did not reach its last bucket (an exception unwound it). Their
        callbacks are Python code run by the backend's threads: left pending at interpreter shutdown they
        abort the process (``terminate called without an active exception``), so this runs at exit. It
        blocks until each collective completes or fails (at the latest the process group's timeout)."""
        futures, self._step_futures = self._step_futures, []
        if not futures:
            return 0
        warnings.warn(
            f"commopt: rank {self.rank} discards {len(futures)} bucket exchange(s) of step {self.step} that "
            f"were still in flight (backward did not finish, e.g. an exception unwound it); the compression "
            f"state is left as it was before that step", RuntimeWarning, stacklevel=2)
        for f in futures:
            _settled(f)
        keep_until_exit(futures, list(self._pending))   # never released last by a backend thread (teardown)
        self._pending.clear()
        self._failed_steps.add(self.step)
        return len(futures)

    def settle_last_step(self) -> int:
        """Wait until the last launched step's chain has settled, success or failure, and keep its futures
        until the group is closed (:mod:`commopt.teardown`); returns how many futures were still unfinished.

        After a failed step (a dead peer) DDP raises at the first failed bucket while the later buckets'
        callbacks still run on the backend's threads; left running at interpreter shutdown they abort the
        process after the user's error has been printed."""
        futures, self._last_step = self._last_step, []
        unfinished = sum(not f.done() for f in futures)
        for f in futures:
            _settled(f)
        keep_until_exit(futures)
        return unfinished or sum(f.done() and _failed(f) for f in futures)

    def _marker(self, pid: int):
        used = self._used

        def mark(grad: Tensor) -> None:
            used.add(pid)  # type: ignore[union-attr]  # host-side bookkeeping only: no sync

        return mark

    def used_mask(self, blk: Block, device: torch.device) -> Optional[Tensor]:
        """bool [d] of the block's coordinates whose parameter this rank used since the last synchronised
        step, or None when all were (or nothing is tracked). Built on the host's knowledge: no sync."""
        if self._used is None:
            return None
        unused = [(off, n) for pid, off, n in zip(blk.pids, blk.offsets(), blk.numels) if pid not in self._used]
        if not unused:
            return None
        mask = torch.ones(blk.d, dtype=torch.bool, device=device)
        for off, n in unused:
            mask.narrow(0, off, n).fill_(False)
        return mask

    def bind_grad_scaler(self, scaler: Any) -> None:
        """Use ``scaler``'s scale from now on (see :meth:`commopt.CompressedOptimizer.step`, which binds a
        ``torch.amp.GradScaler`` that steps it). State already built under the scaler's current scale is
        converted to unscaled units, so it is not mixed with later steps' units."""
        if scaler is self.grad_scaler:
            return
        self.grad_scaler = scaler
        s = self._scale()
        if s is None:
            return
        for blk in self.blocks().values():
            for t in blk.slots.values():
                t.div_(s.to(device=t.device, dtype=t.dtype))

    # -- pickling: drop the process group (like PyTorch's PowerSGDState) ------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("process_group", "exchange", "_used_handles", "inter_exchange", "_chains",
                              "_last_step")}   # futures do not pickle; a copy has no step in flight
        state["nodes"] = None if self.nodes is None else True  # the groups themselves do not pickle
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self.exchange = Exchange(None)
        self._used_handles = []
        if self.nodes is not None or self.node_size > 1:
            # process groups do not pickle: a copy runs the flat algorithm, from fresh blocks (the shard state
            # does not fit it) with dense rounds first
            self._plans, self._block_of, self._order = {}, {}, {}
            self.dense_until = self.step + max(1, self.warmup_steps)
        self.nodes = None
        self.inter_exchange = None
        self.node_size = 1
        self._chains = (LaunchChain(), LaunchChain())
        self._last_step = []

    # -- configuration ----------------------------------------------------------------------------
    def config(self) -> dict:
        """What every rank and every checkpoint must agree on."""
        return {"compressor": self.compressor.config(), "feedback": self.feedback.config(),
                "warmup_steps": self.warmup_steps, "world_size": self.world_size, "commit": self.commit,
                "track_unused": self.track_unused,
                "density_warmup": list(self.density_warmup) if self.density_warmup else None,
                "node_size": self.node_size}

    @property
    def workers(self) -> int:
        """The workers of the feedback rule: the world size, or the N nodes under node_size = L > 1."""
        return self.nodes.N if self.nodes is not None else self.world_size

    @property
    def replica_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks whose replicated state must be bitwise identical: all, or those with this local rank."""
        return self.nodes.inter if self.nodes is not None else self.process_group

    def k_at(self, blk: Block, step: int) -> tuple[int, str]:
        """(k, exchange kind) of a block's compressed round at ``step``: the compressor's k, or during
        the density warm-up the larger k of :func:`warmup_density`. The schedule counts steps from
        ``warmup_steps`` (a step number, saved with the state): dense rounds added later (a GradScaler
        overflow at the end of the warm-up, a state reset on load) do not restart it."""
        if self.density_warmup is None:
            return blk.k, blk.exchange
        u = blk.unit or blk.d
        r = warmup_density(blk.k / u, self.density_warmup, step - self.warmup_steps)
        k = min(u, max(blk.k, int(r * u)))
        if k == blk.k:
            return blk.k, blk.exchange
        return k, choose_exchange(self.compressor.shared_indices, k, u, self.workers, self.compressor.wire)

    def in_warmup(self) -> bool:
        return self.step < max(self.warmup_steps, self.dense_until)

    def blocks(self) -> dict[int, Block]:
        """The live blocks, numbered in bucket order (for inspection and tests)."""
        live = {id(b): b for b, _ in self._block_of.values()}
        ordered = sorted(live.values(), key=lambda b: (self._order.get(id(b), 0), min(b.pids)))
        return dict(enumerate(ordered))

    # -- blocks and bucket plans -------------------------------------------------------------------
    def _param_id(self, p: Tensor) -> int:
        pid = self._param_ids.get(id(p))
        if pid is None:
            pid = self._param_ids[id(p)] = len(self._param_ids)
        return pid

    def _make_block(self, pids: tuple[int, ...], numels: tuple[int, ...], slots: dict[str, Tensor],
                    device: torch.device) -> Block:
        d = sum(numels)
        unit = d if self.nodes is None else shard_size(d, self.nodes.L)
        k = self.compressor.num_selected(unit)
        blk = Block(pids=pids, numels=numels, d=d, k=k,
                    exchange=choose_exchange(self.compressor.shared_indices, k, unit, self.workers,
                                             self.compressor.wire),
                    key=_stable_key(pids), slots=slots, unit=unit)
        if self.nodes is not None:
            blk.key = shard_key(blk.key, self.nodes.local)  # RandK's shard j: the same on the N ranks of inter(j)
        elif self.compressor.shared_indices and list(pids) != sorted(pids):
            blk.canon = self._canonical_map(pids, numels, device)
        self._warn_if_flat_gather_stops_paying(blk)
        for pid, off in zip(pids, blk.offsets()):
            self._block_of[pid] = (blk, off)
        return blk

    @staticmethod
    def _canonical_map(pids: tuple[int, ...], numels: tuple[int, ...], device: torch.device):
        """Map from coordinates in parameter order to block positions (RandK picks the former)."""
        starts, acc = {}, 0
        for pid, n in zip(pids, numels):
            starts[pid] = acc
            acc += n
        canon, blk_starts, acc = [], [], 0
        for pid, n in sorted(zip(pids, numels)):
            canon.append(acc)
            blk_starts.append(starts[pid])
            acc += n
        return (torch.tensor(canon, dtype=torch.int64, device=device),
                torch.tensor(blk_starts, dtype=torch.int64, device=device))

    def _plan_for(self, index: int, params: list[Tensor], buf: Tensor) -> _Plan:
        layout = tuple(self._param_id(p) for p in params)
        plan = self._plans.get(index)
        if plan is not None and plan.layout == layout and plan.d == buf.numel():
            return plan
        numels = tuple(p.numel() for p in params)
        if sum(numels) != buf.numel():
            raise RuntimeError(f"bucket {index}: parameters hold {sum(numels)} elements but the buffer {buf.numel()}")
        start, acc = {}, 0
        for pid, n in zip(layout, numels):
            start[pid] = acc
            acc += n
        known = [self._block_of.get(pid) for pid in layout]
        blocks: list[Block] = []
        if all(kb is not None for kb in known):
            for blk, _ in known:  # type: ignore[misc]
                if all(blk is not b for b in blocks):
                    blocks.append(blk)
        exact = bool(blocks) and sorted(pid for b in blocks for pid in b.pids) == sorted(layout)
        # a bucket holding exactly one block's parameters in another order (DDP's rebuilt buckets, or a fresh
        # DDP's first buckets after a resume): flat, a new block in buffer order (TopK does not depend on the
        # order). Under node_size the block's shards do, so the block is kept and the bucket read in its order
        # (index_select each way, every step): re-blocking at DDP's rebuild, even during the warm-up, makes
        # the block order depend on which step this process's DDP rebuilt at, and a run resumed at the last
        # warm-up step would compress other shards than the uninterrupted run (tested).
        if not exact or (len(blocks) == 1 and blocks[0].pids != layout and self.nodes is None):
            # a new block in buffer order; state is cut per parameter from the old blocks
            blocks = [self._make_block(layout, numels, self._adopt(layout, numels, buf), buf.device)]
            self._order[id(blocks[0])] = index
        parts = []
        for blk in blocks:
            blk.slots = {n: t.to(buf.device) for n, t in blk.slots.items()}
            if blk.canon is not None:
                blk.canon = (blk.canon[0].to(buf.device), blk.canon[1].to(buf.device))
            ranges = [(start[pid], n) for pid, n in zip(blk.pids, blk.numels)]
            contiguous = all(ranges[i][0] + ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
            if contiguous:
                parts.append((blk, None, ranges[0][0]))
            else:
                pos = torch.cat([torch.arange(s, s + n, device=buf.device) for s, n in ranges])
                parts.append((blk, pos, 0))
        plan = _Plan(layout=layout, d=buf.numel(), parts=parts)
        self._plans[index] = plan
        return plan

    def _warn_if_flat_gather_stops_paying(self, blk: Block) -> None:
        """One warning when the flat TopK all-gather falls back to a dense all-reduce (k/d ≥ 1/n) while the
        launcher says several ranks share a node: hierarchical compression would still compress."""
        if self._warned_flat or self.nodes is not None or blk.exchange != "dense" or blk.k >= blk.d:
            return
        L = local_world_size()
        if L is None or L < 2 or self.world_size % L:
            return
        self._warned_flat = True
        warnings.warn(
            f"commopt: {self.compressor.spec()} keeps k/d = {blk.k / blk.d:.3g} of a bucket, so the flat all-gather of "
            f"{self.world_size} messages would move more than a dense all-reduce: these "
            f"buckets are all-reduced densely (no saving). The launcher reports {L} ranks per node; node_size='auto' "
            f"compresses only between the {self.world_size // L} nodes (SPEC §8).", RuntimeWarning, stacklevel=3)

    def _adopt(self, pids: tuple[int, ...], numels: tuple[int, ...], buf: Tensor) -> dict[str, Tensor]:
        """State for a new block, cut from the per-parameter state of older blocks ({} if any is missing).
        Under node_size = L > 1 a rank holds one shard of each block: the old blocks' shards are first
        all-gathered inside the node (:meth:`_node_full_state`), then the new block's shard is cut."""
        if not self.slot_names or any(pid not in self._block_of for pid in pids):
            return {}
        full: dict[int, dict[str, Tensor]] = {}
        if self.nodes is not None:
            if self.in_warmup() or not all(self._block_of[pid][0].slots for pid in pids):
                return {}  # a dense round (re)initialises it anyway
            for pid in pids:  # in the block's parameter order: the same gathers in the same order on every rank
                blk = self._block_of[pid][0]
                if id(blk) not in full:
                    full[id(blk)] = self._node_full_state(blk)
        sdt = _state_dtype(buf.dtype)
        parts: dict[str, list[Tensor]] = {n: [] for n in self.slot_names}
        for pid, numel in zip(pids, numels):
            blk, off = self._block_of[pid]
            if not blk.slots:
                return {}
            src = full.get(id(blk), blk.slots)
            for n in self.slot_names:
                parts[n].append(src[n][off:off + numel].to(device=buf.device, dtype=sdt))
        state = {n: torch.cat(v) for n, v in parts.items()}
        if self.nodes is None:
            return state
        L, j = self.nodes.L, self.nodes.local
        sh = shard_size(sum(numels), L)
        out = {}
        for n, v in state.items():
            padded = torch.zeros(L * sh, dtype=v.dtype, device=v.device)
            padded[:v.numel()].copy_(v)
            out[n] = padded[j * sh:(j + 1) * sh].clone()
        return out

    def _node_full_state(self, blk: Block) -> dict[str, Tensor]:
        """This node's whole-block state of ``blk`` (its ranks' shards, all-gathered inside the node; the
        replicated slots are then the whole replicated state). A blocking collective of the node, run only
        when DDP's buckets stop matching the blocks after the state exists (a resume, a late rebuild), on
        the hook's thread, in bucket order."""
        H = self.nodes
        assert H is not None
        out = {}
        for n in self.slot_names:
            shard = blk.slots[n].contiguous()
            gathered = torch.empty(H.L * shard.numel(), dtype=shard.dtype, device=shard.device)
            _all_gather_single(gathered, shard, group=H.scatter)
            out[n] = gathered[:blk.d]
        return out

    # -- the two kinds of round (one block each); the math is in round.py ---------------------------
    def _scale(self) -> Optional[Tensor]:
        s = getattr(self.grad_scaler, "_scale", None) if self.grad_scaler is not None else None
        if s is None or (hasattr(self.grad_scaler, "is_enabled") and not self.grad_scaler.is_enabled()):
            return None
        return s

    def _count(self, kind: str, nbytes: float, d: int, dtype: torch.dtype) -> None:
        st = self.stats
        st["bytes_sent"] += nbytes
        st["bytes_dense"] += self.exchange.message_bytes("dense", d, d, dtype)
        st["collectives"][kind] = st["collectives"].get(kind, 0) + 1

    def dense_round(self, blk: Block, g_in: Tensor) -> Future:
        """Uncompressed all-reduce of ``g_in`` (in place); (re)initialises the block's state (SPEC §2)."""
        if self.nodes is not None:
            return self._node_round(blk, g_in, compressed=False)
        n, sdt, step = self.world_size, _state_dtype(g_in.dtype), self.step
        scale = self._scale()
        names = self.slot_names
        g = unscaled(g_in.clone() if g_in.dtype == sdt and scale is None else g_in, scale, sdt)
        if names and not blk.slots:
            blk.slots = {name: torch.zeros_like(g) for name in names}
        self._count("dense", self.exchange.message_bytes("dense", blk.d, blk.d, g_in.dtype), blk.d, g_in.dtype)
        self.stats["dense_rounds"] += 1

        @unwrapped
        def finish(fut: Future) -> Tensor:
            total = fut.value()  # re-raises a failed all-reduce
            hold_on_current_stream([g])
            new, ok, _ = dense_start(self.feedback, g, unscaled(total, scale, sdt), n)
            self._stage(blk, ok, new if names else {}, step)
            return total.div_(n)

        return self.exchange.dense(g_in).then(finish)

    def compressed_round(self, blk: Block, g_in: Tensor, used: Optional[Tensor] = None) -> Future:
        """Compress with feedback and exchange a fixed-size message (:func:`commopt.round.compress`);
        the averaged estimate goes back into ``g_in`` and the new state is staged for the commit."""
        if self.nodes is not None:
            return self._node_round(blk, g_in, compressed=True)
        n, sdt, step = self.world_size, _state_dtype(g_in.dtype), self.step
        scale = self._scale()
        fb = self.feedback
        k, kind = self.k_at(blk, step)
        out = compress(self.compressor, fb, blk.slots, unscaled(g_in, scale, sdt), k, self.step, blk.key,
                       wire_dtype=g_in.dtype, canon=blk.canon, used=used, scale=scale)
        # the feedback rules need only p and aux after this point, so the sum can go into the bucket itself
        # (when it is already in the state dtype and unscaled): one bucket-sized buffer less
        into = g_in if (scale is None and g_in.dtype == sdt and g_in.is_contiguous()) else None
        fut = self.exchange.send(kind, out.idx, out.vals, blk.d, sdt, out=into, packed=out.packed)
        self._count(kind, self.exchange.message_bytes(kind, k, blk.d, g_in.dtype, self.compressor.wire), blk.d,
                    g_in.dtype)
        self.stats["compressed_rounds"] += 1

        @unwrapped
        def finish(f: Future) -> Tensor:
            total = f.value()  # the exchange's own result tensor; re-raises a failed collective
            hold_on_current_stream(out.tensors())
            new, ok, est, mean = conclude(fb, blk.slots, out, total, n)
            self._stage(blk, ok, new, step)
            return write_estimate(est, ok, mean, scale, g_in)

        return fut.then(finish)

    def _node_round(self, blk: Block, g_in: Tensor, compressed: bool) -> Future:
        """One round under node_size = L > 1 (SPEC §8), three collectives chained without a host sync:

            s = reduce-scatter(SUM) of the padded bucket in the node (launched here, in bucket order)
            G = s / L (state units): the node's mean gradient on shard j, the worker gradient
            compressed: C(feedback input of G) exchanged across the N nodes' ranks j (dense: G all-reduced)
            estimate of shard j (state staged for the commit); all-gather in the node → ``g_in``

        The inter-node exchange and the all-gather are launched from callbacks, each phase through its
        own :class:`~commopt.hierarchy.LaunchChain` and process group, so every rank issues them in
        bucket order whatever order its collectives complete in."""
        H = self.nodes
        assert H is not None and self.inter_exchange is not None
        L, N, d, sh = H.L, H.N, blk.d, blk.unit
        sdt, step, fb, scale = _state_dtype(g_in.dtype), self.step, self.feedback, self._scale()
        compressed = compressed and N > 1  # one node: nothing crosses a slow link, the node's mean is exact
        names = self.slot_names
        if compressed:
            k, kind = self.k_at(blk, step)
        else:
            k, kind = sh, "dense"
            if names and not blk.slots:
                blk.slots = {name: torch.zeros(sh, dtype=sdt, device=g_in.device) for name in names}
        if g_in.is_contiguous() and d == L * sh:
            src = g_in
        else:
            src = torch.zeros(L * sh, dtype=g_in.dtype, device=g_in.device)
            src[:d].copy_(g_in)
        where = f"on rank {self.rank} of {self.world_size} (node {H.node} of {N}, local rank {H.local} of {L})"
        if H.scatter_has_future:
            part = torch.empty(sh, dtype=g_in.dtype, device=g_in.device)
            rs = _reduce_scatter_single(part, src, group=H.scatter, async_op=True)
            collective = "reduce_scatter_tensor"
        else:  # gloo's reduce-scatter has no future: all-reduce the node's bucket (in place, as the flat dense
            # round does: the bucket's local values are not read again) and keep shard j
            rs = dist.all_reduce(src, group=H.scatter, async_op=True)
            part = src.narrow(0, H.local * sh, sh)
            collective = "all_reduce (for a reduce-scatter)"
        scattered = _chained(rs, lambda: part, f"commopt: the intra-node {collective} of a bucket ({d} "
                                               f"values, {g_in.dtype}) failed {where}")
        inter_bytes = self.inter_exchange.message_bytes(kind, k, sh, g_in.dtype,
                                                        self.compressor.wire if compressed else None)
        intra_bytes = intra_node_bytes(d, L, g_in.dtype.itemsize, H.scatter_has_future)
        self._count(kind, inter_bytes + intra_bytes, d, g_in.dtype)
        self.stats["bytes_inter_node"] += inter_bytes
        self.stats["bytes_intra_node"] += intra_bytes
        self.stats["compressed_rounds" if compressed else "dense_rounds"] += 1
        held: dict = {}

        def launch_inter() -> Future:
            hold_on_current_stream([part, src])
            g = unscaled(part, scale, sdt) / L  # the node's mean gradient on shard j, state units (part is kept)
            held["g"] = g
            if not compressed:
                return self.inter_exchange.dense(part.clone())
            out = compress(self.compressor, fb, blk.slots, g, k, step, blk.key, wire_dtype=g_in.dtype, scale=scale)
            held["out"] = out
            return self.inter_exchange.send(kind, out.idx, out.vals, sh, sdt, packed=out.packed)

        exchanged = self._chains[0].after(scattered, launch_inter, g_in)

        def launch_gather() -> Future:
            total = exchanged.value()  # Σ over the N nodes' ranks j (compressed: of the messages)
            if compressed:
                out = held["out"]
                hold_on_current_stream(out.tensors())
                new, ok, est, mean = conclude(fb, blk.slots, out, total, N)
                shard_est = write_estimate(est, ok, mean, scale, torch.empty_like(part))
            else:
                shard_est = total / (L * N)
                hold_on_current_stream([held["g"]])
                new, ok, _ = dense_start(fb, held["g"], unscaled(total, scale, sdt) / L, N)
                new = new if names else {}
            full = torch.empty(L * sh, dtype=g_in.dtype, device=g_in.device)
            ag = _all_gather_single(full, shard_est.to(g_in.dtype), group=H.gather, async_op=True)

            def assemble() -> Tensor:
                hold_on_current_stream([full])
                # ok of the whole bucket, the same on every rank (a non-finite gradient on one rank spoils
                # only its shards' means; the all-gathered estimate carries them to every rank), so that
                # every rank keeps or skips the step's state alike, as in the flat path
                self._stage(blk, ok & torch.isfinite(full).all(), new, step)  # element-wise: an fp16 sum overflows
                return g_in.copy_(full[:d])

            return _chained(ag, assemble, f"commopt: the intra-node all_gather_into_tensor of a bucket estimate "
                                          f"({d} values, {g_in.dtype}) failed {where}")

        return self._chains[1].after(exchanged, launch_gather, g_in)

    def _stage(self, blk: Block, ok: Tensor, new: dict[str, Tensor], step: int) -> None:
        """Keep a block's new state for the step's commit (``commit="step"``), or apply it now where ``ok``
        (``commit="block"``: at most one block's old and new state coexist)."""
        if self.commit == "block" and new:
            self._apply(blk, ok, new)
            new = {}
        if step in self._failed_steps:
            return  # a round of a step that already failed (it finished late): drop it
        self._pending.append((blk, ok, new))

    @staticmethod
    def _apply(blk: Block, ok: Tensor, new: dict[str, Tensor]) -> None:
        if ok.device.type == "cpu":
            if bool(ok):  # on the CPU reading the flag costs nothing: adopt the new tensors, no copies
                blk.slots.update(new)
            return
        hold_on_current_stream(list(new.values()))
        for name, value in new.items():  # accelerators: select on the device, never synchronise
            old = blk.slots[name]
            torch.where(ok, value, old, out=old)

    def _commit(self) -> None:
        """End of step: apply the staged states only if every block's average was finite (on every rank
        alike); count the step as skipped otherwise. With ``commit="block"`` the states are already applied."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        hold_on_current_stream([item[1] for item in pending])
        ok = torch.stack([item[1] for item in pending]).all()
        if self.slot_names and (self.in_warmup() or self.step <= max(self.warmup_steps, self.dense_until)):
            self._last_ok = ok  # read once when warm-up ends (see _extend_warmup_if_it_overflowed)
        if self._skipped.device != ok.device:
            self._skipped = self._skipped.to(ok.device)
        self._skipped += ~ok
        for blk, _, new in pending:
            if new:
                self._apply(blk, ok, new)

    def _extend_warmup_if_it_overflowed(self) -> None:
        """Keep rounds dense while the last dense round was skipped (non-finite), so that the feedback
        state starts from a real uncompressed gradient (SPEC §2), not from zeros: GradScaler's first
        steps often overflow. Reads one flag once per warm-up end (a sync on CUDA, never afterwards)."""
        if self._last_ok is None or self.in_warmup():
            return
        ok, self._last_ok = self._last_ok, None
        if not bool(ok):
            self.dense_until = self.step + 1

    def skipped_rounds(self) -> int:
        """Steps whose average was non-finite somewhere (state left untouched). Synchronises: not in the hook."""
        return int(self._skipped)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state per parameter, plus the block partition (independent of the bucket layout),
        the step count and the communication counters (``stats``, ``skipped_rounds``).

        Reads the skipped-round counter (a synchronisation on accelerators): call it outside the hook."""
        params = {}
        for pid, (blk, off) in self._block_of.items():
            if blk.slots and self.nodes is None:
                numel = blk.numels[blk.pids.index(pid)]
                params[pid] = {name: blk.slots[name][off:off + numel].detach().clone() for name in self.slot_names}
        blocks = [list(b.pids) for b in self.blocks().values()]
        # node_size = L > 1: the state is this rank's shard of each block (it cannot be cut per parameter)
        shards = None if self.nodes is None else [
            {name: b.slots[name].detach().clone() for name in self.slot_names} if b.slots else None
            for b in self.blocks().values()]
        stats = {k: dict(v) if isinstance(v, dict) else v for k, v in self.stats.items()}
        return {"version": STATE_VERSION, "rank": self.rank, "run": self.run_id, "step": self.step,
                "dense_until": self.dense_until,
                **self.config(), "blocks": blocks, "params": params, "shards": shards,
                "numels": {pid: blk.numels[blk.pids.index(pid)] for pid, (blk, _) in self._block_of.items()},
                "stats": stats, "skipped_rounds": int(self._skipped),
                # whether the last dense round was finite, still to be read when warm-up ends: without it
                # a resume would compress from the state of an overflowed dense round (zeros)
                "last_dense_ok": None if self._last_ok is None else bool(self._last_ok),
                # the loss scale the state was divided by (None: no GradScaler bound): a resume whose scaler
                # is bound only at its first step again converts the state back (see _apply_load)
                "grad_scale": None if self._scale() is None else float(self._scale())}

    def load_state_dict(self, sd: Optional[dict], on_world_size_change: str = "error") -> None:
        """Restore from :meth:`state_dict`. **Every rank** of the process group must call it: one
        ``all_gather_object`` of each rank's verdict makes the same decision on every rank.

        - Each rank loads its own file (same world size): exact; the run continues bitwise as the
          uninterrupted one.
        - Every rank loads the same rank's file (a checkpoint saved on one rank only): the step count,
          block partition and counters are taken from it; the per-rank feedback state of the other
          ranks cannot be reconstructed, so on every rank the feedback state restarts with dense
          all-reduce rounds (SPEC §2 initialisation; one warning says what was reset).
        - Another world size: ``ValueError``, or with ``on_world_size_change="reset"`` a restart as above.
        - ``sd=None`` (no saved commopt state): a restart as above, at the current step.

        A checkpoint refused on any rank (another compressor or feedback rule, a malformed state, ranks
        that swapped files or saved at different steps) raises ``ValueError`` on every rank, naming the
        rank(s) and the reason, and changes nothing on any rank."""
        verdict = self._check_load(sd, on_world_size_change)
        decision = self._agree_on_load(verdict, what="CompressionState.load_state_dict")
        if decision["refused"] is not None:
            raise ValueError(decision["refused"])
        self._apply_load(sd, decision["reset"], stacklevel=2)

    def _check_load(self, sd: Optional[dict], on_world_size_change: str = "error") -> dict:
        """This rank's verdict on ``sd`` for :meth:`_agree_on_load`; changes nothing and raises nothing.

        ``{"rank", "error": why this rank refuses it or None, "saved_rank": the rank whose state it
        holds (None when that does not matter), "reset": why the feedback state must restart or None,
        "same": values that must be equal on every rank (the step the run resumes at)}``."""
        # "commopt state": ranks loading a checkpoint without commopt's part beside ranks loading one with it
        # are refused (they would restart the feedback state on some ranks only)
        verdict: dict = {"rank": self.rank, "error": None, "saved_rank": None, "reset": None,
                         "same": {"step": self.step, "commopt state": sd is not None}}
        if sd is None:
            verdict["reset"] = (
                "the checkpoint holds no commopt state (a plain optimizer's state_dict, or one that went through "
                "torch.distributed.checkpoint's get_optimizer_state_dict / set_optimizer_state_dict, which keep "
                "only 'state' and 'param_groups')")
            return verdict
        try:
            if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
                raise ValueError("not a commopt compression state (version "
                                 f"{sd.get('version') if isinstance(sd, dict) else '?'})")
            mine = self.config()
            for key in ("compressor", "feedback", "density_warmup"):  # older checkpoints lack density_warmup: None
                if sd.get(key) != mine[key]:
                    raise ValueError(f"checkpoint was made with {key} {sd.get(key)}, this run uses {mine[key]}")
            if on_world_size_change not in ("error", "reset"):
                raise ValueError(f"on_world_size_change must be 'error' or 'reset', got {on_world_size_change!r}")
            saved_L = int(sd.get("node_size", 1))  # checkpoints before SPEC §8 are flat
            if sd["world_size"] == self.world_size and saved_L != self.node_size:
                if on_world_size_change != "reset":
                    raise ValueError(
                        f"checkpoint was saved with node_size {saved_L}, this run has node_size {self.node_size}: the "
                        "error-feedback state belongs to a node's shard of each bucket and cannot be mapped; pass "
                        "the same node_size, or on_world_size_change='reset' to restart it with dense rounds")
                verdict["reset"] = (f"the checkpoint was saved with node_size {saved_L} and this run has "
                                    f"{self.node_size} (on_world_size_change='reset')")
            elif sd["world_size"] != self.world_size:
                if on_world_size_change != "reset":
                    raise ValueError(
                        f"checkpoint was saved with world size {sd['world_size']}, this run has {self.world_size}: "
                        "error-feedback state is per rank and cannot be mapped; pass on_world_size_change='reset' "
                        "to restart it with dense rounds")
                verdict["reset"] = (f"the checkpoint was saved with world size {sd['world_size']} and this run has "
                                    f"{self.world_size} (on_world_size_change='reset')")
            else:
                verdict["saved_rank"] = int(sd["rank"])
            numels = {int(pid): int(n) for pid, n in sd["numels"].items()}
            seen: set[int] = set()
            for pids in sd["blocks"]:
                for pid in map(int, pids):
                    if pid not in numels:
                        raise ValueError("checkpoint is inconsistent: a block names a parameter without a size")
                    if pid in seen:
                        raise ValueError(f"checkpoint is inconsistent: parameter {pid} is in two blocks")
                    seen.add(pid)
            for pid, slots in sd["params"].items():
                pid = int(pid)
                if pid not in numels or sorted(slots) != sorted(self.slot_names):
                    raise ValueError(f"checkpoint is inconsistent: parameter {pid}'s state has slots "
                                     f"{sorted(slots)}, expected {sorted(self.slot_names)}")
                if any(not isinstance(t, Tensor) or t.numel() != numels[pid] for t in slots.values()):
                    raise ValueError(f"checkpoint is inconsistent: parameter {pid}'s state is not "
                                     f"{numels[pid]} values per slot")
            shards = sd.get("shards")
            if shards is not None:
                if len(shards) != len(sd["blocks"]):
                    raise ValueError("checkpoint is inconsistent: it holds shard state for "
                                     f"{len(shards)} blocks and names {len(sd['blocks'])}")
                for pids, slots in zip(sd["blocks"], shards):
                    if slots is None:
                        continue
                    want = shard_size(sum(numels[int(pid)] for pid in pids), saved_L)
                    if sorted(slots) != sorted(self.slot_names) or any(
                            not isinstance(t, Tensor) or t.numel() != want for t in slots.values()):
                        raise ValueError(f"checkpoint is inconsistent: a block's shard state is not "
                                         f"{want} values in each of the slots {sorted(self.slot_names)}")
            if not isinstance(sd.get("stats", {}), dict):
                raise ValueError("checkpoint is inconsistent: 'stats' is not a dict")
            for key in ("skipped_rounds", "dense_until"):
                int(sd.get(key, 0))
            verdict["same"]["step"] = int(sd["step"])
            verdict["same"]["run"] = sd.get("run")  # older checkpoints: None
        except Exception as exc:  # noqa: BLE001 - reported to every rank by _agree_on_load
            verdict["error"] = str(exc) if isinstance(exc, ValueError) else \
                f"malformed commopt state ({type(exc).__name__}: {exc})"
        return verdict

    def _agree_on_load(self, verdict: dict, what: str) -> dict:
        """All-gather every rank's :meth:`_check_load` verdict (a collective: every rank must call it) and
        decide the same on every rank: ``{"refused": the message to raise or None, "reset": why the feedback
        state restarts with dense rounds (on every rank) or None (exact restore)}``.

        Refused when any rank refused; when the ranks hold a mix of files that is neither each rank's own
        nor one rank's on every rank; when they would resume at different points (``verdict["same"]``)."""
        from .consistency import _differences, mismatch

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, verdict, group=self.process_group)
        unchanged = "nothing was changed on any rank"
        errors: dict[str, list[int]] = {}
        for r, v in enumerate(gathered):
            if v["error"] is not None:
                errors.setdefault(v["error"], []).append(r)
        if errors:
            why = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {msg}"
                            for msg, rs in errors.items())
            return {"refused": f"{what} refused the checkpoint ({unchanged}): {why}", "reset": None}
        reset = next((v["reset"] for v in gathered if v["reset"] is not None), None)
        if reset is None:
            saved = [v["saved_rank"] for v in gathered]
            if any(s != r for r, s in enumerate(saved)) and len(set(saved)) == 1:
                reset = (f"every rank loaded rank {saved[0]}'s checkpoint (saved on one rank only), and the "
                         "other ranks' error-feedback state cannot be reconstructed from it")
            elif any(s != r for r, s in enumerate(saved)):
                pairs = ", ".join(f"rank {r} holds rank {s}'s" for r, s in enumerate(saved) if s != r)
                return {"refused": f"{what} refused the checkpoint ({unchanged}): {pairs} state; load each rank's "
                                   "own file, or one rank's file on every rank (the feedback state then restarts "
                                   "with dense rounds)", "reset": None}
        diffs = _differences([v["same"] for v in gathered])
        if diffs:
            return {"refused": f"{what} refused the checkpoint ({unchanged}): {mismatch(diffs)}", "reset": None}
        return {"refused": None, "reset": reset}

    def _apply_load(self, sd: Optional[dict], reset: Optional[str], stacklevel: int = 2) -> None:
        """Replace the state with ``sd`` (accepted by :meth:`_check_load`, so this cannot fail) as
        :meth:`_agree_on_load` decided. ``reset``: blocks without feedback state and dense rounds from the
        current step on, with one warning that says why and what was reset (``stacklevel`` as for
        ``warnings.warn``, counted from this method's caller)."""
        self._plans.clear()
        self._block_of.clear()
        self._order.clear()
        self._pending.clear()
        self._last_ok = None
        if sd is not None:
            self.step = int(sd["step"])
            if sd.get("run") is not None:  # the resumed run goes on as the saved one
                self.run_id = sd["run"]
            for k, v in sd.get("stats", {}).items():
                self.stats[k] = dict(v) if isinstance(v, dict) else v
            if "skipped_rounds" in sd:
                self._skipped = torch.full((), int(sd["skipped_rounds"]), dtype=torch.int64,
                                           device=self._skipped.device)
            numels = {int(pid): int(n) for pid, n in sd["numels"].items()}
            params = {int(pid): slots for pid, slots in sd["params"].items()}
            shards = sd.get("shards")
            device = self._device
            for i, pids in enumerate(sd["blocks"]):
                pids = tuple(int(pid) for pid in pids)
                slots: dict[str, Tensor] = {}
                if reset is None and self.slot_names and shards is not None:
                    if shards[i] is not None:
                        slots = {n: shards[i][n].reshape(-1).clone().to(device) for n in self.slot_names}
                elif reset is None and self.slot_names and all(pid in params for pid in pids):
                    slots = {n: torch.cat([params[pid][n].reshape(-1) for pid in pids]).to(device)
                             for n in self.slot_names}
                blk = self._make_block(pids, tuple(numels[pid] for pid in pids), slots, device)
                self._order[id(blk)] = i
        if reset is None:
            self.dense_until = int(sd.get("dense_until", 0)) if sd is not None else 0
            flag = sd.get("last_dense_ok") if sd is not None else None
            if flag is not None:
                self._last_ok = torch.tensor(bool(flag), device=self._skipped.device)
            saved_scale = sd.get("grad_scale") if sd is not None else None
            if saved_scale is not None and self.grad_scaler is None:
                # saved in unscaled units under a GradScaler this run has not bound yet: until it is bound
                # (at its first scaler.step, which divides by the then current scale) the hook sees scaled
                # gradients, so keep the state in the units of the saved scale meanwhile
                for blk in self.blocks().values():
                    for t in blk.slots.values():
                        t.mul_(saved_scale)
            return
        import warnings

        self.dense_until = self.step + max(1, self.warmup_steps)
        fb = self.feedback
        what = f"the error-feedback state of {type(fb).__name__} (local {', '.join(fb.local_slots)}"
        if fb.shared_slots:
            what += f"; replicated {', '.join(fb.shared_slots)}, which must stay the mean of the local state"
        what = what + ")" if self.slot_names else f"nothing ({type(fb).__name__} keeps no state)"
        warnings.warn(
            f"commopt: {reset}. Reset {what} on every rank: steps {self.step} to {self.dense_until - 1} run as dense "
            "all-reduce rounds that re-initialise it from the uncompressed gradient (SPEC §2), so the run does not "
            "continue bitwise as the saved one. To resume exactly, save opt.state_dict() (CompressedOptimizer) on "
            "every rank to its own file, e.g. torch.save(opt.state_dict(), f'opt_rank{rank}.pt'), and load each "
            "rank's own file into the same world size.", UserWarning, stacklevel=stacklevel + 1)

    # -- replicated-state check ------------------------------------------------------------------------
    def replicated_checksum(self) -> Tensor:
        """Bit-level checksum (int64) of the replicated slots of every block, for cross-rank comparison."""
        return bit_checksum([blk.slots[name] for blk in self.blocks().values()
                             for name in self.feedback.shared_slots if name in blk.slots])


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """DDP communication hook: compressed, error-corrected averaging of one gradient bucket.

    Returns a future of the averaged-gradient estimate (mean_i C(·) or the
    feedback rule's replicated estimator w/h), shaped like ``bucket.buffer()``.
    The last bucket's future completes after the step's state commit.
    """
    buf = bucket.buffer()
    if not state._step_futures:  # the first bucket of a step
        state._extend_warmup_if_it_overflowed()
        for chain in state._chains:
            chain.reset()
    plan = state._plan_for(bucket.index(), bucket.parameters(), buf)
    dense = state.in_warmup()
    futures = []
    for blk, pos, off in plan.parts:
        g = buf.narrow(0, off, blk.d) if pos is None else buf.index_select(0, pos)
        if dense or (state.slot_names and not blk.slots):
            futures.append(state.dense_round(blk, g))
        else:
            futures.append(state.compressed_round(blk, g, state.used_mask(blk, buf.device)))

    if len(plan.parts) == 1 and plan.parts[0][1] is None:
        @unwrapped
        def whole(f: Future) -> Tensor:
            f.value()  # re-raises a failed exchange
            return buf

        fut = futures[0] if buf.is_cuda else futures[0].then(whole)
    else:
        @unwrapped
        def assemble() -> Tensor:
            for (blk, pos, off), f in zip(plan.parts, futures):
                est = f.wait()  # wait(), not value(): orders this stream after the part's kernels
                if pos is not None:
                    buf.index_copy_(0, pos, est)
            return buf
        fut = _when_all(futures, assemble, buf)
    state._step_futures.append(fut)
    if bucket.is_last():
        step_futures, state._step_futures = state._step_futures, []
        this_step = state.step
        state.step += 1
        state.stats["steps"] += 1
        if state._used is not None:
            state._used.clear()  # the next synchronised step starts a new record

        @unwrapped
        def commit() -> Tensor:
            try:
                for f in step_futures:
                    f.wait()  # re-raises a failed bucket; on CUDA also orders the streams
            except Exception:
                state._pending.clear()  # a failed step leaves the state as it was
                state._failed_steps = {s for s in state._failed_steps if s >= this_step - 2} | {this_step}
                raise
            state._commit()
            return buf

        committed = _when_all(step_futures, commit, buf)
        state._last_step = [*step_futures, committed]
        return committed
    return fut


def stepping_grad_scaler(max_depth: int = 8) -> Any:
    """The ``torch.amp.GradScaler`` whose ``scaler.step(optimizer)`` is calling us, or None.

    ``GradScaler.step`` calls ``optimizer.step()`` from its own method (``_maybe_opt_step``); we look a
    few frames up for it. Host-side only, run once per optimizer step (not in the hook)."""
    try:
        from torch.amp import GradScaler
    except ImportError:  # pragma: no cover - old torch
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, GradScaler):
            return owner
        frame = frame.f_back
    return None


def refuse_python_reducer(ddp_model: Any = None) -> None:
    """Raise if compiled autograd's Python reducer (``torch._dynamo.config.optimize_ddp = "python_reducer"``)
    is on, now or when ``ddp_model`` was built: it calls communication hooks per parameter as
    ``hook(state, (grad, param))``, not with a ``GradBucket``."""
    config = sys.modules.get("torch._dynamo.config")  # imported by DDP itself; never imported here
    now = getattr(config, "optimize_ddp", None) == "python_reducer"
    if now or getattr(ddp_model, "_use_python_reducer", False):
        when = "is set" if now else "was set when this DistributedDataParallel model was built"
        raise RuntimeError(
            f"commopt does not support torch._dynamo.config.optimize_ddp = 'python_reducer' (it {when}): "
            "compiled autograd's Python reducer calls DDP communication hooks per parameter as hook(state, "
            "(grad, param)) instead of with a GradBucket, so commopt's compression_hook cannot run there. Use the "
            "default optimize_ddp ('ddp_optimizer') with torch.compile, or compile without compiled autograd.")


def _failed(f: Future) -> bool:
    """True if the completed future ``f`` holds an error."""
    try:
        f.value()
    except Exception:  # noqa: BLE001
        return True
    return False


def _when_all(futures: list[Future], fn, buf: Tensor) -> Future:
    """A future of ``fn()`` run once every future in ``futures`` is done.

    On the CPU this is ``collect_all(...).then``. On CUDA, ``collect_all`` makes a future
    without devices, whose completion would record no stream events, so the result goes
    into a ``Future(devices=[buf.device])`` that records them (DDP then waits correctly).
    """
    # collect_all completes at the first error; wait for every future to settle instead, so that fn()'s
    # wait() calls never block a callback thread on a collective still running
    gathered = torch.futures.collect_all([f.then(_settled) for f in futures])
    if not buf.is_cuda:
        return gathered.then(lambda _: fn())
    result: Future = torch.futures.Future(devices=[buf.device])

    def done(_: Future) -> None:
        try:
            result.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - handed to DDP through the future
            result.set_exception(exc)

    gathered.add_done_callback(done)
    return result


# DDP inspects the annotations; with postponed evaluation they would be strings
compression_hook.__annotations__ = {"state": CompressionState, "bucket": dist.GradBucket,
                                     "return": torch.futures.Future[torch.Tensor]}
