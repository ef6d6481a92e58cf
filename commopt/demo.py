"""``commopt demo``: dense DDP, compressed DDP and CO2, side by side, on local CPU ranks.

Spawns ``N`` ranks (``torch.multiprocessing``, start method ``spawn``) that
form a gloo process group on localhost and train the same small MLP on the
same synthetic task once per setting (:data:`SETTINGS`):

* dense DDP (SGD, momentum 0.9, no comm hook),
* TopK 1% without error feedback, TopK 1% + EF14, TopK 1% + EControl,
  RandK 1% + EF14 -- all through :class:`commopt.CompressedOptimizer`,
* CO2 (:class:`commopt.CO2`, τ local steps per round, the all-reduce of the
  round overlapped with the next round).

The data are **heterogeneous**: rank r draws most of its training samples
(:data:`SKEW`) from its own subset of the classes (``c % N == r``); the test set
is class-balanced and shared. Compression without feedback drops most of each
rank's gradient for good; error feedback keeps what was not sent and sends it
later; CO2 exchanges the whole model, but only once per round.

For each setting rank 0 reports the test accuracy, the bytes each rank received
per step (commopt's ``comm_stats()``; for dense DDP the SPEC §3 ring formula),
the measured time per step on this machine (loopback, so the network costs
almost nothing), the compute time per step without any network (a twin of the
setting on a one-rank process group per rank, timed in blocks interleaved with
the real run), and from those two measurements the time per step that
:mod:`commopt.costmodel` *predicts* on a 1 Gbit/s and a 100 Mbit/s link. The
closing lines are computed from the measured numbers (:func:`summary_lines`).
The model/data helpers are reused by ``experiments/train_ddp.py`` (with the
default, iid :class:`SyntheticTask`).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = [
    "DEFAULT_STEPS",
    "QUICK_STEPS",
    "SETTINGS",
    "Setting",
    "SyntheticTask",
    "accuracy",
    "make_mlp",
    "run_demo",
    "summary_lines",
]

#: Steps per setting for the default run (6 settings, 2 ranks, about a minute on 2 CPU cores).
DEFAULT_STEPS = 800
#: Steps per setting with ``--quick``.
QUICK_STEPS = 120
#: The no-network timing (see ``_Twin``): blocks of ``TIMING_BLOCK`` steps (CO2: one round each), interleaved.
TIMING_BLOCKS = 8
TIMING_BLOCK = 8
#: Steps at the start of a run not counted in its measured time per step (warm-up, state creation).
TIMING_SKIP = 16

IN_FEATURES = 64
NUM_CLASSES = 10
BATCH_SIZE = 64  # per rank
#: Picked so that dense DDP is close to its plateau (~85% test accuracy) after DEFAULT_STEPS. The gap without
#: feedback depends on it: at lr 0.01 (seed 1234) no feedback ended 4.4 points below dense DDP, EF14 closed 96%
#: of that and EControl 4%; at 0.005 (seeds 1234, 1, 2) the gap was 19-24 points and both closed 95-101% of it.
LR = 0.005
MOMENTUM = 0.9
WARMUP_STEPS = 2
SEED = 1234
#: Fraction of a rank's training samples drawn from its own classes (the rest: all classes, uniformly).
SKEW = 0.9
#: CO2's local steps per round.
CO2_TAU = 8
#: The links the cost model predicts for (bandwidth only: no per-message latency).
LINKS = (("1 Gbit/s", "1gbit"), ("100 Mbit/s", "100mbit"))


@dataclass(frozen=True)
class Setting:
    """One row of the demo: ``compressor=None`` and ``tau=0`` mean plain dense DDP; ``tau > 0`` means CO2."""

    name: str
    compressor: str | None
    feedback: str | None
    tau: int = 0

    @property
    def kind(self) -> str:
        return "co2" if self.tau else ("dense" if self.compressor is None else "compressed")


#: What the demo runs, in order.  Every setting uses the same base optimizer
#: (SGD, lr ``LR``, momentum ``MOMENTUM``); for CO2 it is the inner optimizer of
#: the local steps (CO2's defaults otherwise: outer lr 1, outer momentum 0.5,
#: clipping 1, adaptive staleness penalty, "eager").
SETTINGS: tuple[Setting, ...] = (
    Setting("dense DDP", None, None),
    Setting("TopK 1%, no feedback", "topk:0.01", "none"),
    Setting("TopK 1% + EF14", "topk:0.01", "ef14"),
    Setting("TopK 1% + EControl", "topk:0.01", "econtrol"),
    Setting("RandK 1% + EF14", "randk:0.01", "ef14"),
    Setting(f"CO2, tau {CO2_TAU}", None, None, tau=CO2_TAU),
)
NAME_WIDTH = max(len(s.name) for s in SETTINGS)


def make_mlp(
    in_features: int = IN_FEATURES, hidden: tuple[int, ...] = (512, 256), num_classes: int = NUM_CLASSES
) -> nn.Sequential:
    """The demo model: an MLP ``in -> 512 -> 256 -> classes`` with ReLU (~167k parameters)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SyntheticTask:
    """Deterministic classification data: Gaussian inputs, labels from a fixed random teacher.

    The teacher's logits are ``x @ L + tanh(x @ W1) @ W2`` (a linear part plus a
    small tanh network), so the task is learnable in a few hundred SGD steps
    but not linear.

    ``train_shard(rank)`` is that rank's own training data (seeded by rank),
    ``test`` the shared held-out set.  Everything lives on ``device``.

    With ``skew > 0`` the shards are heterogeneous: a fraction ``skew`` of rank
    r's samples has a label in its own classes ``{c : c % world_size == r}``, the
    rest is spread evenly over all classes (inputs are drawn until every class
    has enough samples, so each class keeps the teacher's input distribution),
    and ``test`` has the same number of samples of every class. ``skew=0`` (the
    default) gives independent, identically distributed shards and an iid test set.
    """

    def __init__(
        self,
        seed: int = SEED,
        in_features: int = IN_FEATURES,
        num_classes: int = NUM_CLASSES,
        train_per_rank: int = 16384,
        test_size: int = 4096,
        device: torch.device | str = "cpu",
        world_size: int = 1,
        skew: float = 0.0,
    ) -> None:
        if not 0.0 <= skew <= 1.0:
            raise ValueError(f"SyntheticTask: skew must be in [0, 1], got {skew!r}")
        if skew > 0 and world_size > num_classes:
            raise ValueError(f"SyntheticTask: skew > 0 needs world_size <= num_classes ({num_classes}), "
                             f"got {world_size}")
        self.seed, self.in_features, self.train_per_rank = seed, in_features, train_per_rank
        self.num_classes, self.world_size, self.skew = num_classes, world_size, skew
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self._lin = torch.randn(in_features, num_classes, generator=g) / math.sqrt(in_features)
        self._w1 = torch.randn(in_features, 64, generator=g) / math.sqrt(in_features)
        self._w2 = torch.randn(64, num_classes, generator=g) / math.sqrt(64)
        if skew > 0:
            per_class = [test_size // num_classes] * num_classes
            self.test = self._sample_by_class(per_class, seed + 999_983)
        else:
            self.test = self._sample(test_size, seed + 999_983)

    @torch.no_grad()
    def label(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher labels for inputs ``x`` (CPU)."""
        return (x @ self._lin + torch.tanh(x @ self._w1) @ self._w2).argmax(dim=1)

    def _sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.in_features, generator=g)
        return x.to(self.device), self.label(x).to(self.device)

    def _sample_by_class(self, counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``counts[c]`` samples of each class c (teacher-labelled draws, kept in draw order), shuffled."""
        g = torch.Generator().manual_seed(seed)
        need = torch.tensor(counts)
        kept: list[list[torch.Tensor]] = [[] for _ in counts]
        have = torch.zeros_like(need)
        while bool((have < need).any()):
            x = torch.randn(8192, self.in_features, generator=g)
            y = self.label(x)
            for c in range(len(counts)):
                take = int(need[c] - have[c])
                if take > 0:
                    xc = x[y == c][:take]
                    kept[c].append(xc)
                    have[c] += xc.shape[0]
        xs = torch.cat([t for parts in kept for t in parts])
        ys = torch.cat([torch.full((int(n),), c, dtype=torch.long) for c, n in enumerate(counts)])
        perm = torch.randperm(xs.shape[0], generator=g)
        return xs[perm].to(self.device), ys[perm].to(self.device)

    def own_classes(self, rank: int) -> list[int]:
        """The classes that dominate ``rank``'s shard when ``skew > 0``."""
        return [c for c in range(self.num_classes) if c % self.world_size == rank % self.world_size]

    def class_counts(self, rank: int) -> list[int]:
        """How many samples of each class ``rank``'s shard has (``skew > 0``)."""
        own = self.own_classes(rank)
        p = [self.skew * (c in own) / len(own) + (1 - self.skew) / self.num_classes for c in range(self.num_classes)]
        exact = [self.train_per_rank * q for q in p]
        counts = [math.floor(e + 1e-9) for e in exact]
        by_remainder = sorted(range(self.num_classes), key=lambda c: (-(exact[c] - counts[c]), c))
        for c in by_remainder[: self.train_per_rank - sum(counts)]:
            counts[c] += 1  # largest remainders first
        return counts

    def train_shard(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and labels of ``rank`` (a different draw per rank; its own label mix if ``skew > 0``)."""
        if self.skew > 0:
            return self._sample_by_class(self.class_counts(rank), self.seed + 7919 * (rank + 1))
        return self._sample(self.train_per_rank, self.seed + 7919 * (rank + 1))

    def batches(self, rank: int, steps: int, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """``(steps, batch_size)`` sample indices into the shard; identical for every setting."""
        g = torch.Generator().manual_seed(self.seed + 104_729 * (rank + 1))
        return torch.randint(self.train_per_rank, (steps, batch_size), generator=g).to(self.device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


@dataclass(frozen=True)
class _Config:
    """What every rank needs to know about the run (handed to the spawned workers)."""

    steps: int
    seed: int = SEED
    lr: float = LR
    skew: float = SKEW
    settings: tuple[Setting, ...] = field(default=SETTINGS)
    timing_blocks: int = TIMING_BLOCKS


def _reduce(value: float, op: str = "mean") -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() if op == "max" else t.item() / dist.get_world_size()


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _build(setting: Setting, cfg: _Config, group: Any = None) -> tuple[nn.Module, nn.Module, Any]:
    """(module, the model to call, optimizer) of ``setting``, from the same initialisation every time."""
    import commopt

    torch.manual_seed(cfg.seed)  # same init everywhere (DDP and CO2 also broadcast rank 0's)
    module = make_mlp()
    if setting.kind == "co2":
        base = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=MOMENTUM)
        return module, module, commopt.CO2(module, base, tau=setting.tau, process_group=group)
    model = DDP(module, process_group=group)
    base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=MOMENTUM)
    if setting.kind == "dense":
        return module, model, base
    opt = commopt.CompressedOptimizer(model, base, compressor=setting.compressor, feedback=setting.feedback,
                                      warmup_steps=WARMUP_STEPS)
    return module, model, opt


def _typical_step(times: list[float], block: int = 1) -> float:
    """Seconds per step: the median over blocks of ``block`` consecutive steps (CO2: whole rounds) of their
    mean, so that a step slowed down by another process on a busy machine does not count."""
    blocks = sorted(sum(times[i:i + block]) / block for i in range(0, len(times) - block + 1, block)) or [0.0]
    mid = len(blocks) // 2
    return blocks[mid] if len(blocks) % 2 else (blocks[mid - 1] + blocks[mid]) / 2


class _Twin:
    """The same setting on a process group of this rank alone: its steps time the compute without a network.

    It trains its own copy on this rank's batches, a block of steps at a time, interleaved with the real
    run (so both see the same load on a busy machine, and all ranks run their blocks at the same time, as
    in the real run). A block is :data:`TIMING_BLOCK` steps (CO2: one round of τ steps, so that the
    round's outer step counts); the first block (warm-up, state creation) is not timed."""

    def __init__(self, setting: Setting, cfg: _Config, own_group: Any, x: torch.Tensor, y: torch.Tensor,
                 idx: torch.Tensor) -> None:
        self.setting, self.x, self.y, self.idx = setting, x, y, idx
        _, self.model, self.opt = _build(setting, cfg, group=own_group)
        self.block = setting.tau or TIMING_BLOCK
        self.done = 0
        self.times: list[float] = []

    def run_block(self) -> float:
        """One block of steps; returns its wall time."""
        start = time.perf_counter()
        timed = self.done >= self.block
        for _ in range(self.block):
            t = time.perf_counter()
            b = self.idx[self.done % self.idx.shape[0]]
            loss = F.cross_entropy(self.model(self.x[b]), self.y[b])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            loss.item()  # as in the real run
            if timed:
                self.times.append(time.perf_counter() - t)
            self.done += 1
        return time.perf_counter() - start

    def seconds_per_step(self) -> float:
        if self.setting.kind == "co2":
            self.opt.finish()
        return _typical_step(self.times, self.setting.tau or 1)


def _run_setting(setting: Setting, task: SyntheticTask, cfg: _Config, rank: int, own_group: Any) -> dict[str, Any]:
    """Train one setting from the same initialisation; returns rank-averaged results."""
    import commopt.costmodel as cm

    steps = cfg.steps
    module, model, opt = _build(setting, cfg)
    x, y = task.train_shard(rank)
    idx = task.batches(rank, steps)
    twin = _Twin(setting, cfg, own_group, x, y, idx)
    # after which steps the twin runs a block: evenly spread, the first (untimed) one early
    every = max(1, steps // (cfg.timing_blocks + 1))
    twin_after = {min(steps, every * i) for i in range(1, cfg.timing_blocks + 2)}
    losses: list[float] = []
    marks = {max(1, round(steps * q / 4)) for q in range(1, 5)}
    after_warmup: dict[str, Any] = {}

    times: list[float] = []
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        t = time.perf_counter()
        b = idx[step]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
        if setting.kind == "compressed" and step + 1 == WARMUP_STEPS:
            after_warmup = opt.comm_stats()
        if step + 1 in marks:
            recent = sum(losses[-10:]) / len(losses[-10:])
            ms = 1000 * (time.perf_counter() - t0) / (step + 1)
            if rank == 0:  # rank 0's model (CO2: its local model, mid-round); not counted in the step times
                t_eval = time.perf_counter()
                acc = accuracy(module, *task.test)
                print(f"  [{setting.name}] step {step + 1:>4}/{steps}  train loss {recent:.4f}  "
                      f"test acc {100 * acc:5.1f}%  {ms:6.2f} ms/step", flush=True)
                t0 += time.perf_counter() - t_eval
        if step + 1 in twin_after:
            t0 += twin.run_block()
    stats = opt.comm_stats() if setting.kind != "dense" else {}
    if setting.kind == "co2":
        opt.finish()  # apply the round in flight and average the last round: every rank holds the same model
    dist.barrier()
    compute = _reduce(twin.seconds_per_step(), "max")
    skip = min(TIMING_SKIP, steps // 2)
    if setting.kind == "co2":  # whole rounds
        skip = setting.tau * max(1, round(skip / setting.tau))

    n = dist.get_world_size()
    d = sum(p.numel() for p in module.parameters())
    hops_ring, hops_gather = 2 * (n - 1), n - 1
    if setting.kind == "dense":
        per_step = cm.ring_allreduce_bytes(d, 4, n)  # DDP's fp32 ring all-reduce (SPEC §3)
        per_exchange, hops, collective = per_step, hops_ring, "allreduce (DDP)"
    elif setting.kind == "compressed":
        per_step = (stats["bytes_sent"] - after_warmup.get("bytes_sent", 0)) / max(1, steps - WARMUP_STEPS)
        collective = str(stats.get("collective", "?"))
        per_exchange, hops = per_step, (hops_gather if "gather" in collective else hops_ring)
    else:
        per_step = stats["bytes_sent"] / steps
        per_exchange = stats["bytes_sent"] / max(1, stats["launches"])
        hops, collective = hops_ring, f"allreduce every {setting.tau} steps, overlapped"
    predicted = {}
    for label, rate in LINKS:
        comm = cm.transfer_seconds(per_exchange, cm.Link.parse(rate), hops=hops) if n > 1 else 0.0
        if setting.kind == "co2":
            predicted[label] = cm.co2_step_seconds(compute, comm, setting.tau)
        else:
            predicted[label] = cm.sync_step_seconds(compute, comm)
    return {
        "name": setting.name,
        "kind": setting.kind,
        "loss": _reduce(sum(losses[-10:]) / len(losses[-10:])),
        "acc": _reduce(accuracy(module, *task.test)),
        "ms": 1000 * _reduce(_typical_step(times[skip:], setting.tau or 1), "max"),
        "bytes_step": _reduce(float(per_step)),
        "compute_ms": 1000 * compute,
        "predicted_ms": {k: 1000 * v for k, v in predicted.items()},
        "collective": collective,
        "params": d,
    }


#: Rows whose accuracy is within this many points of dense DDP's count as "as accurate" in the closing lines.
CLOSE_POINTS = 1.0


def _points(x: float) -> str:
    """A signed difference in accuracy points, one decimal, never "-0.0"."""
    r = round(x, 1)
    return f"{r + 0.0:+.1f}" if r != 0 else "+0.0"


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The closing lines, computed from the rows (``kind``, ``name``, ``acc`` in [0, 1], ``bytes_step``,
    ``predicted_ms``). Every comparison word ("below", "above", "fastest", ...) follows the numbers."""
    out: list[str] = []
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    if dense is None:
        return out
    acc_d = 100 * dense["acc"]
    plain = next((r for r in rows if r["kind"] == "compressed" and r["name"].endswith("no feedback")), None)
    fb = [r for r in rows if r["kind"] == "compressed" and r is not plain
          and plain is not None and r["name"].split(" +")[0] == plain["name"].split(",")[0]]
    if plain is not None:
        gap = acc_d - 100 * plain["acc"]
        where = "below" if gap > 0 else ("above" if gap < 0 else "level with")
        out.append(f"- without feedback, {plain['name'].split(',')[0]} ends {abs(gap):.1f} points {where} dense DDP "
                   f"({100 * plain['acc']:.1f}% vs {acc_d:.1f}%).")
        if fb and gap >= CLOSE_POINTS:
            parts = [f"{r['name'].split('+', 1)[1].strip()} {100 * (100 * r['acc'] - 100 * plain['acc']) / gap:.0f}%"
                     for r in fb]
            out.append(f"- error feedback closes this share of that gap: {', '.join(parts)} "
                       f"(100% = dense DDP's accuracy, 0% = no better than without feedback).")
        elif fb:
            out.append(f"- no gap of {CLOSE_POINTS:.0f} point or more for error feedback to close in this run.")
    for r in rows:
        if r["kind"] == "compressed" and r is not plain and r not in fb:
            out.append(f"- {r['name']}: {100 * r['acc']:.1f}% ({_points(100 * r['acc'] - acc_d)} points vs dense "
                       f"DDP) at {_fmt_bytes(r['bytes_step'])} per step.")
        elif r["kind"] == "co2":
            fewer = (f"{dense['bytes_step'] / r['bytes_step']:.1f}x fewer bytes per step" if r["bytes_step"] > 0
                     else "no bytes sent")
            out.append(f"- {r['name']}: {100 * r['acc']:.1f}% ({_points(100 * r['acc'] - acc_d)} points vs dense "
                       f"DDP) with {fewer}.")
    if fb:
        top = max(fb, key=lambda r: r["acc"])
        parts = []
        for label, _ in LINKS:
            t_d, t_r = dense["predicted_ms"][label], top["predicted_ms"][label]
            rel = f"{t_d / t_r:.1f}x faster" if t_r < t_d else f"{t_r / t_d:.1f}x slower"
            parts.append(f"{t_r:.1f} ms/step at {label} ({rel} than dense DDP)")
        out.append(f"- predicted for {top['name']} (the most accurate with feedback): {', '.join(parts)}.")
    close = [r for r in rows if r is not dense and 100 * r["acc"] >= acc_d - CLOSE_POINTS]
    for label, _ in LINKS:
        t_d = dense["predicted_ms"][label]
        if not close:
            out.append(f"- predicted at {label}: dense DDP {t_d:.1f} ms/step; every other setting is more than "
                       f"{CLOSE_POINTS:.0f} point less accurate.")
            continue
        best = min(close, key=lambda r: r["predicted_ms"][label])
        t_b = best["predicted_ms"][label]
        rel = f"{t_d / t_b:.1f}x faster" if t_b < t_d else f"{t_b / t_d:.1f}x slower"
        out.append(f"- predicted at {label}: dense DDP {t_d:.1f} ms/step; the fastest setting at most "
                   f"{CLOSE_POINTS:.0f} point less accurate: {best['name']}, {t_b:.1f} ms/step ({rel}).")
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e3:.1f} kB" if b < 1e6 else f"{b / 1e6:.2f} MB"


def _print_table(rows: list[dict[str, Any]], cfg: _Config, world_size: int) -> None:
    """The final comparison (rank 0)."""
    w = max(NAME_WIDTH, max(len(r["name"]) for r in rows))
    (l1, _), (l2, _) = LINKS
    header = (f"{'setting':<{w}} | {'test acc':>8} | {'bytes/step':>10} | {'measured':>8} | {'compute':>7} | "
              f"{'predicted*':>10} | {'predicted*':>10}")
    units = (f"{'':<{w}} | {'':>8} | {'per rank':>10} | {'ms/step':>8} | {'ms/step':>7} | "
             f"{'@ ' + l1:>10} | {'@ ' + l2:>10}")
    print("\n" + header)
    print(units)
    print("-" * len(header))
    for r in rows:
        p1, p2 = r["predicted_ms"][l1], r["predicted_ms"][l2]
        print(f"{r['name']:<{w}} | {100 * r['acc']:>7.2f}% | {_fmt_bytes(r['bytes_step']):>10} | {r['ms']:>8.2f} | "
              f"{r['compute_ms']:>7.2f} | {p1:>10.2f} | {p2:>10.2f}")
    print(
        f"\ntest acc: class-balanced test set ({NUM_CLASSES} classes); each rank trained on its own label mix "
        f"({100 * cfg.skew:.0f}% of its samples from its own classes c % {world_size} == rank).\n"
        f"bytes/step: received per rank per step (commopt's comm_stats() after the {WARMUP_STEPS} dense warm-up "
        f"steps; dense DDP: the ring all-reduce formula 2(n-1)/n * 4 * params; CO2: its all-reduces averaged "
        f"over the steps).\n"
        f"measured: this machine, ranks on loopback (the network costs almost nothing here); compute: the same "
        f"setting with no network (a one-rank process group per rank, {cfg.timing_blocks} blocks of "
        f"{TIMING_BLOCK} steps, CO2: rounds, interleaved with the run).\n"
        f"Both are medians per step (CO2: per round / tau), the slowest rank's; noisy if other work shares the CPU.\n"
        f"* predicted, not measured: commopt.costmodel's step time from the measured compute and bytes, bandwidth "
        f"only (no latency): compute + transfer time of the bytes (no overlap with backward: an upper bound);\n"
        f"  CO2: compute + max(0, D - tau * compute) / tau, D the transfer time of one round's all-reduce.",
        flush=True,
    )
    lines = summary_lines(rows)
    if lines:
        print("\nwhat this run measured:\n" + "\n".join(lines), flush=True)


def _worker(rank: int, world_size: int, cfg: _Config, progress_dir: str) -> None:
    """Body of one spawned rank. The ranks meet through a file store in ``progress_dir`` (no port to pick,
    so none another process can take first), and each records there the setting it is in (read by the
    parent if this rank dies without a Python exception, e.g. killed by a signal)."""
    torch.set_num_threads(1)
    where = os.path.join(progress_dir, f"rank{rank}")

    def at(what: str) -> None:
        with open(where, "w") as f:
            f.write(what)

    at("initialising the process group")
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(progress_dir, "store"),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # one single-rank group per rank, for the no-network timing runs (new_group is collective: all ranks, in order)
        own_group = [dist.new_group([r]) for r in range(world_size)][rank]
        task = SyntheticTask(seed=cfg.seed, world_size=world_size, skew=cfg.skew)
        n_params = sum(p.numel() for p in make_mlp().parameters())
        _say(
            rank,
            f"commopt demo: {world_size} ranks (gloo, CPU), MLP {IN_FEATURES}-512-256-{NUM_CLASSES} "
            f"({n_params:,} params), batch {BATCH_SIZE}/rank, {cfg.steps} steps per setting, lr {cfg.lr}, "
            f"seed {cfg.seed}\n"
            f"data: each rank mostly sees its own classes ({100 * cfg.skew:.0f}% from c % {world_size} == rank); "
            f"the test set is class-balanced",
        )
        rows = []
        for setting in cfg.settings:
            _say(rank, f"- {setting.name}")
            at(f"setting {setting.name!r}")
            try:
                rows.append(_run_setting(setting, task, cfg, rank, own_group))
            except Exception as exc:
                raise RuntimeError(f"setting {setting.name!r} failed on rank {rank}: {type(exc).__name__}: "
                                   f"{exc}") from exc
            _say(rank, f"  collective: {rows[-1]['collective']}")
        at("printing the table")
        if rank == 0:
            _print_table(rows, cfg, world_size)
        dist.barrier()
        at("tearing down the process group")
    finally:
        dist.destroy_process_group()
    at("done")


def run_demo(ranks: int = 2, steps: int | None = None, quick: bool = False, seed: int = SEED,
             settings: tuple[Setting, ...] = SETTINGS) -> int:
    """Run the demo; returns a process exit code (0 on success, 1 if a rank failed, 2 for bad arguments)."""
    if ranks < 1:
        print(f"demo: --ranks must be >= 1, got {ranks}", file=sys.stderr)
        return 2
    if ranks > NUM_CLASSES:
        print(f"demo: --ranks must be <= {NUM_CLASSES} (each rank gets its own classes), got {ranks}", file=sys.stderr)
        return 2
    if steps is None:
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if steps < 10:
        print(f"demo: --steps must be >= 10, got {steps}", file=sys.stderr)
        return 2
    try:
        import commopt

        commopt.CompressedOptimizer  # noqa: B018 -- fail early, before spawning
        commopt.CO2  # noqa: B018
    except (ImportError, AttributeError) as exc:
        print(f"demo: commopt is not importable ({exc})", file=sys.stderr)
        return 1
    cfg = _Config(steps=steps, seed=seed, settings=tuple(settings),
                  timing_blocks=min(TIMING_BLOCKS, max(2, steps // 100)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="commopt-demo-") as progress_dir:
        def last_setting(rank: int) -> str:
            try:
                with open(os.path.join(progress_dir, f"rank{rank}")) as f:
                    return f.read()
            except OSError:
                return "starting"

        try:
            mp.start_processes(_worker, args=(ranks, cfg, progress_dir), nprocs=ranks, join=True,
                               start_method="spawn")
        except mp.ProcessRaisedException as exc:
            print(f"demo: rank {exc.error_index} failed ({last_setting(exc.error_index)}):\n{exc}", file=sys.stderr,
                  flush=True)
            return 1
        except mp.ProcessExitedException as exc:
            code = exc.exit_code
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            print(f"demo: rank {exc.error_index} {how} ({last_setting(exc.error_index)}); the other ranks were "
                  f"stopped", file=sys.stderr, flush=True)
            return 1
    print(f"demo finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
