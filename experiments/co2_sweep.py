"""CO2 with its defaults vs DDP on 2, 4 and 8 ranks: final loss at equal samples (the README's claim).

The task is ``experiments/co2_slow_link.py``'s (imported from there, not copied):
a small MLP classifier on a random teacher network's labels, a different shard of
1024 samples per rank, the same batches for both methods. DDP is plain SGD with a
gradient all-reduce per step; CO2 is ``commopt.CO2(model, SGD(...))`` with every
CO2 argument at its default (τ = 12, α = 1, β = 0.5, φ = 1, adaptive penalty,
``"eager"``). Both use the inner SGD of that script (lr 0.05, momentum 0.9, batch
32 per rank) for ``--steps`` steps; CO2's model is the consensus after
``finish()``. No link delay: the iterates do not depend on it (SPEC §6), only the
wall clock does, which this sweep does not measure.

Each world size is one set of gloo CPU processes (spawned here, one thread each),
running every seed in turn; a seed changes the teacher, the initial model and the
batch order. The table (per run and per world size) is printed and written to
``--out``::

    OMP_NUM_THREADS=1 python experiments/co2_sweep.py                 # 2, 4, 8 ranks, 3 seeds, 480 steps
    python experiments/co2_sweep.py --ranks 2 4 --seeds 0 --steps 240 --out /tmp/sweep.md
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from co2_slow_link import batches, full_loss, inner_optimizer, make_model, make_task  # noqa: E402

from commopt.optim.co2 import CO2  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "co2_sweep.md")


def train(method: str, rank: int, world: int, seed: int, args: argparse.Namespace,
          data: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """One run; returns the consensus model's full-data loss and the seconds it took."""
    x, y = data
    model = make_model(seed=100 + seed)
    start = full_loss(model, x, y)
    if method == "ddp":
        net = DDP(model)
        opt: torch.optim.Optimizer = inner_optimizer(net.parameters(), args.lr)
    else:
        net = model
        opt = CO2(model, inner_optimizer(model.parameters(), args.lr))   # every CO2 setting at its default
    dist.barrier()
    t0 = time.perf_counter()
    for xb, yb in batches(rank, world, args.steps, args.batch, x, y, seed=200 + seed):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    if isinstance(opt, CO2):
        opt.finish()   # applies the all-reduce in flight and averages the last round: one model everywhere
    return {"start": start, "loss": full_loss(model, x, y), "seconds": time.perf_counter() - t0}


def worker(rank: int, world: int, store: str, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    rows = []
    for seed in args.seeds:
        data = make_task(world, seed=seed)
        ddp = train("ddp", rank, world, seed, args, data)
        co2 = train("co2", rank, world, seed, args, data)
        rows.append({"ranks": world, "seed": seed, "start": ddp["start"], "ddp": ddp["loss"], "co2": co2["loss"],
                     "ddp_s": ddp["seconds"], "co2_s": co2["seconds"]})
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def table(rows: list[dict], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# CO2 defaults vs DDP: final loss at equal samples",
        "",
        f"`python experiments/co2_sweep.py --ranks {' '.join(map(str, args.ranks))} --seeds "
        f"{' '.join(map(str, args.seeds))} --steps {args.steps}` (torch {torch.__version__}, gloo, "
        f"{os.cpu_count()} CPU cores shared by all ranks, {platform.python_implementation()} "
        f"{platform.python_version()}; {elapsed / 60:.1f} min in all).",
        "",
        f"Task of `experiments/co2_slow_link.py`: teacher-MLP classification, 1024 samples per rank, inner SGD "
        f"lr {args.lr} momentum 0.9, batch {args.batch} per rank, {args.steps} steps (both methods see the same "
        f"samples). CO2: every argument at its default (tau=12, outer_lr=1, outer_momentum=0.5, clip=1, "
        f"penalty='adaptive', variant='eager'); its loss is the consensus model's after `finish()`. Loss: "
        f"cross-entropy over all ranks' data (initial loss in the `start` column). Ratio: CO2 / DDP (< 1: CO2 "
        f"lower). `DDP s` / `CO2 s`: wall-clock seconds of the training loop on the shared cores, without any "
        f"link delay (not a speed benchmark: see `experiments/co2_slow_link.py`).",
        "",
        "| ranks | seed | start | DDP loss | CO2 loss | CO2 / DDP | DDP s | CO2 s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['seed']} | {r['start']:.4f} | {r['ddp']:.4f} | {r['co2']:.4f} | "
                     f"{r['co2'] / r['ddp']:.3f} | {r['ddp_s']:.1f} | {r['co2_s']:.1f} |")
    lines += ["", "Per world size (over seeds):", "",
              "| ranks | runs | CO2 / DDP min | mean | max |", "|---:|---:|---:|---:|---:|"]
    for world in args.ranks:
        ratios = [r["co2"] / r["ddp"] for r in rows if r["ranks"] == world]
        lines.append(f"| {world} | {len(ratios)} | {min(ratios):.3f} | {sum(ratios) / len(ratios):.3f} | "
                     f"{max(ratios):.3f} |")
    every = [r["co2"] / r["ddp"] for r in rows]
    lines += ["", f"All {len(every)} runs: CO2 / DDP between {min(every):.3f} and {max(every):.3f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default=DEFAULT_OUT, help="where to write the markdown table ('-': nowhere)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[dict] = []
    ctx = mp.get_context("spawn")
    for world in args.ranks:
        queue = ctx.SimpleQueue()
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(world, os.path.join(tmp, "store"), args, queue), nprocs=world,
                               start_method="spawn")
            got = queue.get()
        rows += got
        print(f"{world} ranks: " + ", ".join(f"seed {r['seed']}: CO2/DDP {r['co2'] / r['ddp']:.3f}" for r in got)
              + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    text = table(rows, args, time.perf_counter() - t0)
    print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
