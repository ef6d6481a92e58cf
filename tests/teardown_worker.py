"""One rank of a teardown / dead-peer scenario (run by tests/test_teardown.py with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set). ``python tests/teardown_worker.py OPTIMIZER SCENARIO``.

OPTIMIZER: ``compressed`` (DDP + TopK 5% + EControl), ``co2`` (dense outer all-reduce), ``co2-topk``
(compressed outer exchange), ``mkor`` (statistics all-reduce every step), ``ddp`` (plain DDP + SGD).
SCENARIO:
* ``destroy``    -- train, then ``destroy_process_group()`` with no ``finish()``: exit 0;
* ``destroy-global`` -- as ``destroy``, but the model and optimizer stay alive until interpreter shutdown,
  as in a module-level script (nanoGPT's style): exit 0;
* ``exit``       -- train, then leave without ``finish()`` nor ``destroy_process_group()``: exit 0;
* ``raise``      -- an exception unwinds ``backward()`` at step 6 on rank 0 only: exit 1 with that error;
* ``kill``       -- the last rank SIGKILLs itself at step 6: the others raise a named error (CO2: in a step
  or in ``finish()``), exit 1.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import atexit

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def _report_group_at_exit() -> None:
    # registered before commopt is imported, so it runs after commopt's own exit handler
    if os.environ.get("RANK") is not None:
        print(f"rank {os.environ['RANK']}: group open after commopt's exit handler: {dist.is_initialized()}",
              flush=True)


atexit.register(_report_group_at_exit)

import commopt  # noqa: E402 - after the atexit registration above, on purpose


_ALIVE: list = []   # what a module-level script keeps alive until shutdown (scenario destroy-global)


def main() -> None:
    which, scenario = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    commopt.init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("PG_TIMEOUT", "20"))))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                            torch.nn.Linear(256, 8))
    model: torch.nn.Module = m
    base = torch.optim.SGD(m.parameters(), lr=0.01)
    if which == "compressed":
        model = DDP(m, bucket_cap_mb=0.1)
        opt = commopt.CompressedOptimizer(model, base, compressor="topk:0.05", feedback="econtrol")
    elif which in ("co2", "co2-topk"):
        opt = commopt.CO2(m, base, tau=2, **({"compressor": "topk:0.05"} if which == "co2-topk" else {}))
    elif which == "ddp":      # plain DDP, no commopt: the reference for what torch itself does
        model = DDP(m, bucket_cap_mb=0.1)
        opt = base
        if os.environ.get("PYHOOK"):   # a minimal Python hook: all_gather + .then(), no commopt
            def hook(_state, bucket):
                buf = bucket.buffer()
                recv = torch.empty(world * buf.numel())
                work = dist.all_gather_into_tensor(recv, buf, async_op=True)
                return work.get_future().then(lambda f: (f.value(), recv.view(world, -1).mean(0))[1])
            model.register_comm_hook(None, hook)
    elif which == "mkor":
        opt = commopt.MKOR(m, base, update_every=1)
    else:
        raise SystemExit(f"unknown optimizer {which!r}")
    steps = 9   # CO2: rounds end at steps 1, 3, 5, 7 -> round 7's outer all-reduce is in flight at the end
    for t in range(steps):
        if scenario == "kill" and t == 6 and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(100 * t + rank)
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scenario == "raise" and t == 6 and rank == 0:
            def fail(_grad):
                raise RuntimeError("user hook failed on purpose")
            m[0].weight.register_hook(fail)
        t0 = time.perf_counter()
        try:
            loss.backward()
            opt.step()
        except Exception:
            print(f"rank {rank}: step {t} raised after {time.perf_counter() - t0:.1f} s", flush=True)
            raise
    if scenario not in ("destroy", "destroy-global", "exit") and hasattr(opt, "finish"):
        opt.finish()   # CO2 as a user ends it: a peer that died after the last wait is noticed here
    print(f"rank {rank}: trained {steps} steps", flush=True)
    if scenario in ("destroy", "destroy-global"):
        dist.destroy_process_group()
    if scenario == "destroy-global":
        _ALIVE.extend([model, opt, m, base])   # freed only when the interpreter shuts down
    print(f"rank {rank}: exits", flush=True)


if __name__ == "__main__":
    main()
