"""``commopt demo``: dense DDP vs compressed DDP, side by side, on local CPU ranks.

Spawns ``N`` ranks (``torch.multiprocessing``, start method ``spawn``) that
form a gloo process group on localhost and train the same small MLP on the
same synthetic task once per setting:

* dense DDP (SGD, momentum 0.9, no comm hook),
* TopK 1% + EControl, TopK 1% + EF21-SGDM, RandK 1% + EF14, TopK 1% without
  error feedback -- all through :class:`commopt.CompressedOptimizer`.

Rank 0 prints progress and a final comparison table.  The task: Gaussian
inputs labelled by a fixed random "teacher" network; every rank draws its own
training shard, the held-out test set is shared.  The model/data helpers are
reused by ``experiments/train_ddp.py``.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
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
    "make_mlp",
    "run_demo",
]

#: Steps per setting for the default run (6 settings, 2 ranks, ~50-70 s on 2 CPU cores, measured).
DEFAULT_STEPS = 1000
#: Steps per setting with ``--quick``.
QUICK_STEPS = 150

IN_FEATURES = 64
NUM_CLASSES = 10
BATCH_SIZE = 64  # per rank
LR = 0.01
MOMENTUM = 0.9
WARMUP_STEPS = 2
SEED = 1234


@dataclass(frozen=True)
class Setting:
    """One row of the demo: ``compressor=None`` means plain dense DDP."""

    name: str
    compressor: str | None
    feedback: str | None


#: What the demo runs, in order.  Every setting uses the same base optimizer
#: (SGD, lr ``LR``, momentum ``MOMENTUM``); EF21-SGDM additionally keeps its
#: own local momentum inside the feedback rule.
SETTINGS: tuple[Setting, ...] = (
    Setting("dense DDP", None, None),
    Setting("TopK 10% + EControl", "topk:0.1", "econtrol"),
    Setting("TopK 1% + EControl", "topk:0.01", "econtrol"),
    Setting("TopK 1% + EF21-SGDM", "topk:0.01", "ef21-sgdm"),
    Setting("RandK 1% + EF14", "randk:0.01", "ef14"),
    Setting("TopK 1% (no feedback)", "topk:0.01", "none"),
)


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
    """

    def __init__(
        self,
        seed: int = SEED,
        in_features: int = IN_FEATURES,
        num_classes: int = NUM_CLASSES,
        train_per_rank: int = 16384,
        test_size: int = 4096,
        device: torch.device | str = "cpu",
    ) -> None:
        self.seed, self.in_features, self.train_per_rank = seed, in_features, train_per_rank
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self._lin = torch.randn(in_features, num_classes, generator=g) / math.sqrt(in_features)
        self._w1 = torch.randn(in_features, 64, generator=g) / math.sqrt(in_features)
        self._w2 = torch.randn(64, num_classes, generator=g) / math.sqrt(64)
        self.test = self._sample(test_size, seed + 999_983)

    @torch.no_grad()
    def label(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher labels for inputs ``x`` (CPU)."""
        return (x @ self._lin + torch.tanh(x @ self._w1) @ self._w2).argmax(dim=1)

    def _sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.in_features, generator=g)
        return x.to(self.device), self.label(x).to(self.device)

    def train_shard(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and labels of ``rank`` (a different draw per rank)."""
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


def _mean_over_ranks(value: float, op: str = "mean") -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() if op == "max" else t.item() / dist.get_world_size()


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _run_setting(setting: Setting, task: SyntheticTask, steps: int, rank: int) -> dict[str, Any]:
    """Train one setting from the same initialisation; returns rank-averaged results."""
    import commopt

    torch.manual_seed(SEED)  # same init everywhere (DDP also broadcasts rank 0's)
    model = DDP(make_mlp())
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if setting.compressor is None:
        opt: Any = base
    else:
        opt = commopt.CompressedOptimizer(
            model, base, compressor=setting.compressor, feedback=setting.feedback, warmup_steps=WARMUP_STEPS
        )
    x, y = task.train_shard(rank)
    idx = task.batches(rank, steps)
    losses: list[float] = []
    marks = {max(1, round(steps * q / 4)) for q in range(1, 5)}

    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        b = idx[step]
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step + 1 in marks:
            recent = sum(losses[-10:]) / len(losses[-10:])
            ms = 1000 * (time.perf_counter() - t0) / (step + 1)
            _say(rank, f"  [{setting.name}] step {step + 1:>4}/{steps}  loss {recent:.4f}  {ms:6.2f} ms/step")
    dist.barrier()
    elapsed = time.perf_counter() - t0

    stats = opt.comm_stats() if setting.compressor is not None else {}
    return {
        "name": setting.name,
        "loss": _mean_over_ranks(sum(losses[-10:]) / len(losses[-10:])),
        "acc": _mean_over_ranks(accuracy(model.module, *task.test)),
        "ms": 1000 * _mean_over_ranks(elapsed, "max") / steps,
        "bytes": _mean_over_ranks(float(stats.get("bytes_sent", 0.0))) if stats else None,
        "bytes_dense": _mean_over_ranks(float(stats.get("bytes_dense", 0.0))) if stats else None,
        "collective": str(stats.get("collective", "allreduce (DDP)")) if stats else "allreduce (DDP)",
        "params": sum(p.numel() for p in model.parameters()),
    }


def _print_table(rows: list[dict[str, Any]], steps: int, world_size: int) -> None:
    """The final comparison (rank 0)."""
    dense_ref = [r["bytes_dense"] for r in rows if r["bytes_dense"]]
    if dense_ref:
        dense_bytes = dense_ref[0]
    else:  # no compressed run to ask: ring all-reduce receives 2 (N-1)/N of the fp32 gradient per step
        dense_bytes = 2 * (world_size - 1) / world_size * rows[0]["params"] * 4 * steps
    header = f"{'setting':<24} | {'final loss':>10} | {'test acc':>8} | {'MB recv/rank':>12} | {'vs dense':>8} | {'ms/step':>7}"
    print("\n" + header)
    print("-" * len(header))
    for r in rows:
        got = dense_bytes if r["bytes"] is None else r["bytes"]
        ratio = f"{dense_bytes / got:.1f}x" if got > 0 else ("-" if dense_bytes == 0 else "inf")
        print(
            f"{r['name']:<24} | {r['loss']:>10.4f} | {100 * r['acc']:>7.2f}% | {got / 1e6:>12.3f} | {ratio:>8} | {r['ms']:>7.2f}"
        )
    print(
        f"\nfinal loss: mean of the last 10 steps over {world_size} ranks; MB = 1e6 bytes received per rank over "
        f"{steps} steps (incl. {WARMUP_STEPS} dense warm-up steps for compressed rows); "
        "dense MB as counted by commopt for a plain all-reduce.",
        flush=True,
    )


def _worker(rank: int, world_size: int, steps: int, progress_dir: str) -> None:
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
        task = SyntheticTask()
        n_params = sum(p.numel() for p in make_mlp().parameters())
        _say(
            rank,
            f"commopt demo: {world_size} ranks (gloo, CPU), MLP {IN_FEATURES}-512-256-{NUM_CLASSES} "
            f"({n_params:,} params), batch {BATCH_SIZE}/rank, {steps} steps per setting, lr {LR}",
        )
        rows = []
        for setting in SETTINGS:
            _say(rank, f"- {setting.name}")
            at(f"setting {setting.name!r}")
            try:
                rows.append(_run_setting(setting, task, steps, rank))
            except Exception as exc:
                raise RuntimeError(f"setting {setting.name!r} failed on rank {rank}: {type(exc).__name__}: "
                                   f"{exc}") from exc
            _say(rank, f"  collective: {rows[-1]['collective']}")
        at("printing the table")
        if rank == 0:
            _print_table(rows, steps, world_size)
        dist.barrier()
        at("tearing down the process group")
    finally:
        dist.destroy_process_group()
    at("done")


def run_demo(ranks: int = 2, steps: int | None = None, quick: bool = False) -> int:
    """Run the demo; returns a process exit code (0 on success, 1 if a rank failed)."""
    if ranks < 1:
        print(f"demo: --ranks must be >= 1, got {ranks}", file=sys.stderr)
        return 2
    if steps is None:
        steps = QUICK_STEPS if quick else DEFAULT_STEPS
    if steps < 10:
        print(f"demo: --steps must be >= 10, got {steps}", file=sys.stderr)
        return 2
    try:
        import commopt

        commopt.CompressedOptimizer  # noqa: B018 -- fail early, before spawning
    except (ImportError, AttributeError) as exc:
        print(f"demo: commopt.CompressedOptimizer is not importable ({exc})", file=sys.stderr)
        return 1
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
            mp.start_processes(_worker, args=(ranks, steps, progress_dir), nprocs=ranks, join=True,
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
