"""DDP vs local SGD vs DiLoCo-style blocking vs CO2 over a slow link (injected per-collective delay).

Spawns ``--ranks`` CPU processes (gloo). Every method trains the same small MLP
classifier on the same synthetic data (a teacher network's labels, a different
shard per rank, the same batches for every method) for ``--steps`` steps, so all
methods see the same number of samples. The slow link is emulated: the result of
every collective becomes available ``--delay`` seconds after its launch (DDP: a
communication hook delays each bucket's all-reduce; the local-update methods:
``CO2(link_delay=...)``). ``--compute`` adds that many seconds of emulated
compute per step (a sleep), so that τ·c vs D is meaningful for a model this
small. Printed: the final full-data loss of the consensus model, wall-clock time
per step without and with the delay, and the seconds per step spent waiting on
communication.

    python experiments/co2_slow_link.py                      # 4 ranks, D = 60 ms, c = 10 ms, τ = 12
    python experiments/co2_slow_link.py --ranks 2 --delay 0.1 --steps 360

Cost model (SPEC §6): DDP pays c + D per step, blocking local SGD c + D/τ, CO2
c + max(0, D − τc)/τ.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from commopt.optim.co2 import CO2  # noqa: E402

IN, HIDDEN, CLASSES = 16, 32, 4


# -- task ------------------------------------------------------------------------------------------
def make_task(world: int, samples_per_rank: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ~ N(0, I) and the labels of a random teacher MLP: (X, y) of world × samples_per_rank rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * samples_per_rank, IN, generator=g)
    w1 = torch.randn(IN, 64, generator=g) / IN ** 0.5
    w2 = torch.randn(64, CLASSES, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x, y


def make_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES))


def batches(rank: int, world: int, steps: int, batch: int, x: torch.Tensor, y: torch.Tensor, seed: int = 2):
    """This rank's shard, reshuffled each epoch with a fixed seed: the same stream for every method."""
    n = x.shape[0] // world
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    g = torch.Generator().manual_seed(seed + rank)
    perm, at = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if at + batch > n:
            perm, at = torch.randperm(n, generator=g), 0
        idx = perm[at:at + batch]
        at += batch
        yield xs[idx], ys[idx]


def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


# -- DDP with a slow link ----------------------------------------------------------------------------
def delayed_allreduce_hook(delay: float) -> Callable:
    """DDP hook: mean all-reduce whose result becomes available ``delay`` s after the launch."""

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future:
        buf = bucket.buffer().div_(dist.get_world_size())
        launched = time.perf_counter()
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def arrive(f: torch.futures.Future) -> torch.Tensor:
            remaining = delay - (time.perf_counter() - launched)
            if remaining > 0:
                time.sleep(remaining)
            return f.value()[0]

        return fut.then(arrive)

    hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    return hook


# -- one training run ---------------------------------------------------------------------------------
def inner_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def run(method: str, opts: dict, rank: int, world: int, delay: float, args: argparse.Namespace,
        data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train with one method; returns final loss, seconds per step and waiting seconds per step."""
    x, y = data
    torch.manual_seed(0)
    model = make_model()
    if method == "ddp":
        net = DDP(model)
        net.register_comm_hook(None, delayed_allreduce_hook(delay))
        opt = inner_optimizer(net.parameters(), args.lr)
    else:
        net = model
        opt = CO2(model, inner_optimizer(model.parameters(), args.lr), tau=args.tau, link_delay=delay, **opts)
    dist.barrier()
    t0 = time.perf_counter()
    for xb, yb in batches(rank, world, args.steps, args.batch, x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        if args.compute > 0:
            time.sleep(args.compute)
        opt.step()
    wall = time.perf_counter() - t0
    waited = float("nan")   # DDP's waiting happens inside backward(); not separated here
    if isinstance(opt, CO2):
        waited = opt.wait_seconds
        opt.finish()   # the consensus model (applies the in-flight update, averages the last progress)
    return {"loss": full_loss(model, x, y), "step_s": wall / args.steps, "wait_s": waited / args.steps}


METHODS: dict[str, tuple[str, dict]] = {
    # name: (kind, CO2 options)
    "DDP (SGD, all-reduce per step)": ("ddp", {}),
    "local SGD (blocking, β=0)": ("co2", dict(outer_lr=1.0, outer_momentum=0.0, clip=None, penalty=None,
                                              overlap=False)),
    "DiLoCo-style (blocking, Nesterov β=0.9, α=0.7)": ("co2", dict(outer_lr=0.7, outer_momentum=0.9,
                                                                     nesterov=True, clip=None, penalty=None,
                                                                     overlap=False)),
    "CO2 (defaults, overlapped)": ("co2", {}),
}


def worker(rank: int, world: int, store_path: str, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    data = make_task(world)
    rows = []
    for name, (kind, opts) in METHODS.items():
        fast = run(kind, opts, rank, world, 0.0, args, data)
        slow = run(kind, opts, rank, world, args.delay, args, data)
        rows.append((name, slow["loss"], fast["step_s"], slow["step_s"], slow["wait_s"]))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--tau", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--delay", type=float, default=0.06, help="seconds until a collective's result arrives")
    ap.add_argument("--compute", type=float, default=0.01, help="emulated compute seconds per step")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.ranks, os.path.join(tmp, "store"), args, queue),
                           nprocs=args.ranks, start_method="spawn")
        rows = queue.get()
    print(f"{args.ranks} ranks, {args.steps} steps x batch {args.batch} per rank, tau={args.tau}, "
          f"link delay D={args.delay * 1e3:.0f} ms, emulated compute c={args.compute * 1e3:.0f} ms/step "
          f"(tau*c = {args.tau * args.compute * 1e3:.0f} ms)")
    head = f"{'method':<48} {'final loss':>10} {'s/step D=0':>11} {'s/step slow':>12} {'wait s/step':>12}"
    print(head)
    print("-" * len(head))
    for name, loss, fast, slow, wait in rows:
        waited = "-" if wait != wait else f"{wait:.4f}"
        print(f"{name:<48} {loss:>10.4f} {fast:>11.4f} {slow:>12.4f} {waited:>12}")


if __name__ == "__main__":
    main()
