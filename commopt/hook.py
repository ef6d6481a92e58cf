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

State is stored per bucket (flat, in the bucket's order) and can be re-cut per
parameter, so a checkpoint does not depend on DDP's bucket layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from .compressors import Compressor, make_compressor
from .exchange import Exchange, choose_exchange
from .feedback import Feedback, make_feedback

__all__ = ["CompressionState", "compression_hook"]

STATE_VERSION = 1


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Feedback state dtype: the gradient's, but never below float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_key(param_ids: Iterable[int]) -> int:
    """A bucket key that depends only on which parameters the bucket holds."""
    text = ",".join(str(i) for i in sorted(param_ids))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)


@dataclass
class _Bucket:
    """State of one DDP bucket with a given layout."""

    layout: tuple[int, ...]        # parameter ids in buffer order
    numels: tuple[int, ...]
    d: int
    k: int
    exchange: str                  # "gather" | "shared" | "dense"
    key: int                       # layout-independent key (seeds RandK)
    slots: dict[str, Tensor] = field(default_factory=dict)
    canon: Optional[tuple[Tensor, Tensor]] = None  # (canonical starts, buffer starts) for shared indices
    skipped: Optional[Tensor] = None  # rounds whose average was non-finite (device counter, no sync)

    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return out


class CompressionState:
    """State of :func:`compression_hook`: compressor, feedback rule, per-bucket error state, counters.

    Use it directly with ``ddp_model.register_comm_hook(state, compression_hook)``,
    or let :class:`commopt.CompressedOptimizer` do it. ``model`` (the module DDP
    wraps) names the parameters, so that checkpoints are independent of the bucket
    layout; without it parameters are numbered in the order the hook first meets them.

    ``grad_scaler`` (a ``torch.amp.GradScaler``): the hook divides by its current
    scale so the error state is kept in unscaled gradient units, and multiplies the
    result back. Without it the state is kept in the units of the gradient that
    arrives (then keep the loss scale constant).
    """

    def __init__(
        self,
        compressor: "str | Compressor" = "topk:0.01",
        feedback: "str | Feedback | None" = "econtrol",
        process_group: Optional[dist.ProcessGroup] = None,
        warmup_steps: int = 2,
        model: Optional[torch.nn.Module] = None,
        grad_scaler: Any = None,
    ) -> None:
        self.compressor = make_compressor(compressor)
        self.feedback = make_feedback(feedback)
        self.feedback.check_compressor(self.compressor)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call commopt.init_distributed() first")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.warmup_steps = warmup_steps
        self.grad_scaler = grad_scaler
        self.exchange = Exchange(process_group)
        self.step = 0
        self.dense_until = 0                       # forced dense rounds (after a state reset)
        self._param_ids: dict[int, int] = {}       # id(param) -> parameter number
        if model is not None:
            for i, p in enumerate(model.parameters()):
                self._param_ids[id(p)] = i
        self._buckets: dict[int, _Bucket] = {}
        self._where: dict[int, tuple[dict[str, Tensor], int]] = {}  # param id -> (slots, offset)
        self._sizes: dict[int, int] = {}
        self.stats = {"steps": 0, "bytes_sent": 0.0, "bytes_dense": 0.0, "dense_rounds": 0,
                      "compressed_rounds": 0, "collectives": {}}

    # -- pickling: drop the process group (like PyTorch's PowerSGDState) ------------------------
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("process_group", "exchange")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self.exchange = Exchange(None)

    # -- configuration ----------------------------------------------------------------------------
    def config(self) -> dict:
        """What every rank and every checkpoint must agree on."""
        return {"compressor": self.compressor.config(), "feedback": self.feedback.config(),
                "warmup_steps": self.warmup_steps, "world_size": self.world_size}

    def in_warmup(self) -> bool:
        return self.step < max(self.warmup_steps, self.dense_until)

    # -- bucket layout ------------------------------------------------------------------------------
    def _param_id(self, p: Tensor) -> int:
        pid = self._param_ids.get(id(p))
        if pid is None:
            pid = self._param_ids[id(p)] = len(self._param_ids)
        return pid

    def _bucket_for(self, index: int, params: list[Tensor], buf: Tensor) -> _Bucket:
        layout = tuple(self._param_id(p) for p in params)
        b = self._buckets.get(index)
        if b is not None and b.layout == layout and b.d == buf.numel():
            return b
        numels = tuple(p.numel() for p in params)
        d = buf.numel()
        if sum(numels) != d:
            raise RuntimeError(f"bucket {index}: parameters hold {sum(numels)} elements but the buffer {d}")
        k = self.compressor.num_selected(d)
        b = _Bucket(layout=layout, numels=numels, d=d, k=k,
                    exchange=choose_exchange(self.compressor.shared_indices, k, d, self.world_size),
                    key=_stable_key(layout), skipped=torch.zeros((), dtype=torch.int64, device=buf.device))
        if self.compressor.shared_indices and list(layout) != sorted(layout):
            b.canon = self._canonical_map(layout, numels, buf.device)
        self._adopt(b, buf)
        self._buckets[index] = b
        return b

    @staticmethod
    def _canonical_map(layout: tuple[int, ...], numels: tuple[int, ...], device: torch.device):
        """Map from coordinates in parameter order to buffer positions (RandK picks the former)."""
        starts, acc = {}, 0
        for pid, n in zip(layout, numels):
            starts[pid] = acc
            acc += n
        canon, buf_starts, acc = [], [], 0
        for pid, n in sorted(zip(layout, numels)):
            canon.append(acc)
            buf_starts.append(starts[pid])
            acc += n
        return (torch.tensor(canon, dtype=torch.int64, device=device),
                torch.tensor(buf_starts, dtype=torch.int64, device=device))

    def _adopt(self, b: _Bucket, buf: Tensor) -> None:
        """Fill a new bucket's state from the per-parameter state of old buckets or a checkpoint."""
        names = self.feedback.local_slots + self.feedback.shared_slots
        if not names or any(pid not in self._where for pid in b.layout):
            b.slots = {}  # needs a dense round first (or the rule keeps no state)
        else:
            sdt = _state_dtype(buf.dtype)
            parts = {n: [] for n in names}
            for pid, numel in zip(b.layout, b.numels):
                slots, off = self._where[pid]
                for n in names:
                    parts[n].append(slots[n][off:off + numel].to(device=buf.device, dtype=sdt))
            b.slots = {n: torch.cat(v) for n, v in parts.items()}
        self._register(b)

    def _register(self, b: _Bucket) -> None:
        if not b.slots:
            return
        for pid, off, numel in zip(b.layout, b.offsets(), b.numels):
            self._where[pid] = (b.slots, off)
            self._sizes[pid] = numel

    # -- the two kinds of round --------------------------------------------------------------------
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

    def dense_round(self, b: _Bucket, buf: Tensor) -> Future:
        """Uncompressed all-reduce; (re)initialises the feedback state from it (SPEC §2)."""
        n, sdt = self.world_size, _state_dtype(buf.dtype)
        scale = self._scale()
        names = self.feedback.local_slots + self.feedback.shared_slots
        g = buf.to(sdt, copy=True)
        if scale is not None:
            g.div_(scale.to(sdt))
        if names and not b.slots:
            b.slots = {name: torch.zeros_like(g) for name in names}
            self._register(b)
        self._count("dense", self.exchange.message_bytes("dense", b.d, b.d, buf.dtype), b.d, buf.dtype)
        self.stats["dense_rounds"] += 1

        def finish(fut: Future) -> Tensor:
            total = fut.value()
            mean = total.to(sdt) / n
            if scale is not None:
                mean.div_(scale.to(sdt))
            ok = torch.isfinite(mean).all()
            b.skipped += ~ok
            if names:
                new = self.feedback.init(g, mean)
                for name in names:
                    b.slots[name].copy_(torch.where(ok, new[name], b.slots[name]))
            return total.div_(n)

        return self.exchange.dense(buf).then(finish)

    def compressed_round(self, b: _Bucket, buf: Tensor) -> Future:
        """Compress with feedback, exchange a fixed-size message, update the state."""
        n, sdt = self.world_size, _state_dtype(buf.dtype)
        scale = self._scale()
        g = buf.to(sdt)
        if scale is not None:
            g = g / scale.to(sdt)
        density = b.k / b.d
        p, pending = self.feedback.prepare(b.slots, g, density)
        idx = self._select(b, p)
        vals = self.compressor.values(p, idx).to(buf.dtype)
        # a non-finite local gradient poisons the message, so every rank sees it and skips
        local_ok = torch.isfinite(g).all()
        vals = torch.where(local_ok, vals, torch.full_like(vals, float("nan")))
        if b.exchange == "gather":
            fut = self.exchange.gather(idx, vals, b.d, sdt)
        elif b.exchange == "shared":
            fut = self.exchange.shared(idx, vals, b.d, sdt)
        else:
            dense = torch.zeros(b.d, dtype=buf.dtype, device=buf.device).index_put_((idx,), vals)
            fut = self.exchange.dense(dense)
        self._count(b.exchange, self.exchange.message_bytes(b.exchange, b.k, b.d, buf.dtype), b.d, buf.dtype)
        self.stats["compressed_rounds"] += 1
        fb = self.feedback

        def finish(f: Future) -> Tensor:
            mean = f.value().to(sdt) / n
            ok = torch.isfinite(mean).all()
            b.skipped += ~ok
            new = fb.update(b.slots, g, p, pending, idx, vals, mean)
            for name, value in new.items():
                b.slots[name].copy_(torch.where(ok, value, b.slots[name]))
            est = torch.where(ok, fb.estimate(b.slots, mean), mean)
            if scale is not None:
                est = est * scale.to(sdt)
            buf.copy_(est)
            return buf

        return fut.then(finish)

    def _select(self, b: _Bucket, p: Tensor) -> Tensor:
        if not self.compressor.shared_indices:
            return self.compressor.select(p, b.k, self.step, b.key)
        idx = self.compressor.select(p, b.k, self.step, b.key)  # coordinates in parameter order
        if b.canon is None:
            return idx
        canon, buf_starts = b.canon
        j = torch.searchsorted(canon, idx, right=True) - 1
        return buf_starts[j] + (idx - canon[j])

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state, per parameter (independent of the bucket layout)."""
        names = self.feedback.local_slots + self.feedback.shared_slots
        params = {}
        for pid, (slots, off) in self._where.items():
            numel = self._sizes[pid]
            params[pid] = {name: slots[name][off:off + numel].detach().clone() for name in names}
        return {"version": STATE_VERSION, "rank": self.rank, "step": self.step, "dense_until": self.dense_until,
                **self.config(), "params": params}

    def load_state_dict(self, sd: dict, on_world_size_change: str = "error") -> None:
        """Restore this rank's state; see :meth:`commopt.CompressedOptimizer.load_state_dict`."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(f"not a commopt compression state (version {sd.get('version') if isinstance(sd, dict) else '?'})")
        for key in ("compressor", "feedback"):
            if sd[key] != self.config()[key]:
                raise ValueError(f"checkpoint was made with {key} {sd[key]}, this run uses {self.config()[key]}")
        self._buckets.clear()
        self._where.clear()
        self._sizes.clear()
        self.step = int(sd["step"])
        if sd["world_size"] != self.world_size:
            if on_world_size_change != "reset":
                raise ValueError(
                    f"checkpoint was saved with world size {sd['world_size']}, this run has {self.world_size}: "
                    "error-feedback state is per rank and cannot be mapped; pass on_world_size_change='reset' "
                    "to restart it with a dense round")
            self.dense_until = self.step + max(1, self.warmup_steps)
            return
        if sd["rank"] != self.rank:
            raise ValueError(f"checkpoint holds rank {sd['rank']}'s state, this is rank {self.rank}: load each rank's own file")
        self.dense_until = int(sd.get("dense_until", 0))
        for pid, slots in sd["params"].items():
            flat = {name: t.reshape(-1) for name, t in slots.items()}
            self._where[int(pid)] = (flat, 0)
            self._sizes[int(pid)] = next(iter(flat.values())).numel() if flat else 0

    def skipped_rounds(self) -> int:
        """Most non-finite (skipped) rounds of any current bucket. Synchronises: call outside the hook."""
        counts = [int(b.skipped) for b in self._buckets.values() if b.skipped is not None]
        return max(counts, default=0)

    # -- replicated-state check ------------------------------------------------------------------------
    def replicated_checksum(self) -> Tensor:
        """Bit-level checksum (int64) of the replicated slots of every bucket, for cross-rank comparison."""
        acc = torch.zeros((), dtype=torch.int64)
        for index in sorted(self._buckets):
            b = self._buckets[index]
            for name in self.feedback.shared_slots:
                if name in b.slots:
                    t = b.slots[name].detach()
                    bits = t.view(torch.int64) if t.element_size() == 8 else t.view(torch.int32).to(torch.int64)
                    w = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
                    acc = acc + (bits * w).sum().cpu()
        return acc


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> Future:
    """DDP communication hook: compressed, error-corrected averaging of one gradient bucket.

    Returns a future of the averaged-gradient estimate (mean_i C(·) or the
    feedback rule's replicated estimator w/h), shaped like ``bucket.buffer()``.
    """
    buf = bucket.buffer()
    b = state._bucket_for(bucket.index(), bucket.parameters(), buf)
    if state.in_warmup() or (state.feedback.local_slots + state.feedback.shared_slots and not b.slots):
        fut = state.dense_round(b, buf)
    else:
        fut = state.compressed_round(b, buf)
    if bucket.is_last():
        state.step += 1
        state.stats["steps"] += 1
    return fut


# DDP inspects the annotations; with postponed evaluation they would be strings
compression_hook.__annotations__ = {"state": CompressionState, "bucket": dist.GradBucket,
                                     "return": torch.futures.Future[torch.Tensor]}
