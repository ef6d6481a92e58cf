#!/usr/bin/env python
"""Minimal compressed-DDP training run; works under torchrun, srun and mpiexec.

Examples::

    torchrun --nproc_per_node 2 experiments/train_ddp.py --compressor topk:0.01 --feedback econtrol
    mpiexec -n 2 python experiments/train_ddp.py --compressor none
    srun python experiments/train_ddp.py --steps 2000          # see slurm/train.sbatch

The model and data are those of ``commopt demo`` (an MLP on a synthetic
teacher-labelled task, a separate shard per rank).  ``--compressor none``
trains plain dense DDP.  Rank 0 prints the loss and, for compressed runs,
``comm_stats()``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from commopt.demo import BATCH_SIZE, SyntheticTask, accuracy, make_mlp
from commopt.distributed import init_distributed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compressor", default="topk:0.01", help="e.g. topk:0.01, randk:0.01, or 'none' for dense DDP")
    p.add_argument("--feedback", default="econtrol", help="none | ef14 | ef21 | ef21-sgdm | econtrol")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="per rank")
    p.add_argument("--warmup-steps", type=int, default=2, help="dense steps before compression starts")
    p.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Train and report from rank 0."""
    args = parse_args(argv)
    info = init_distributed(backend=args.backend)
    if info.device.type == "cpu":
        torch.set_num_threads(1)
    say = print if info.rank == 0 else (lambda *a, **k: None)
    say(f"{info.launcher}: world size {info.world_size}, backend {dist.get_backend()}, device {info.device}", flush=True)

    task = SyntheticTask(device=info.device)
    x, y = task.train_shard(info.rank)
    batches = task.batches(info.rank, args.steps, args.batch_size)

    torch.manual_seed(0)
    model = make_mlp().to(info.device)
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    base = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)
    dense = args.compressor.strip().lower() in ("none", "dense")
    opt = (
        base
        if dense
        else commopt.CompressedOptimizer(
            ddp, base, compressor=args.compressor, feedback=args.feedback, warmup_steps=args.warmup_steps
        )
    )

    t0 = time.perf_counter()
    for step in range(args.steps):
        b = batches[step]
        loss = F.cross_entropy(ddp(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            say(f"step {step + 1:>6}  loss {avg.item() / info.world_size:.4f}", flush=True)
    elapsed = time.perf_counter() - t0

    acc = accuracy(model, *task.test)
    say(f"test accuracy {100 * acc:.2f}%  ({1000 * elapsed / args.steps:.2f} ms/step)")
    if not dense:
        say(f"comm_stats (rank 0): {opt.comm_stats()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
