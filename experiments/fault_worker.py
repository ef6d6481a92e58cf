"""One rank of a 2-rank fault-injection job (gloo, CPU), run by ``experiments/fault_injection.py``.

Any launcher ``commopt.init_distributed`` knows (torchrun, RANK/WORLD_SIZE env, mpiexec).
Environment:

    OPT       compressed | co2 | mkor
              compressed: CompressedOptimizer(DDP, AdamW), TopK 5 % + EControl
              co2:        CO2(DDP, SGD), tau = TAU (default 4), overlapped outer all-reduce
              mkor:       MKOR(DDP, SGD), statistics all-reduce every 10 steps
    STEPS     steps to run (default 100000: until a fault ends the job)
    KILL_AT   rank KILL_RANK (default 1) SIGKILLs itself at this step (-1: never):
              compressed / mkor: after backward(), before opt.step() (MKOR: a statistics step);
              co2: right after the opt.step() that launched the round's outer all-reduce
              (it is in flight), at the first such step >= KILL_AT
    PG_TIMEOUT  seconds, the process group's timeout (default 20)
    BATCH     per-rank batch (default 64)

Prints ``rank R step T t=<wall>`` every 10 steps, ``KILLING rank R step T t=<wall>`` just before the
SIGKILL, ``FAULT_ERROR rank R t=<wall> <Type>: <first line>`` when an exception escapes (then
and ``FAULT_DETAIL`` with the whole message on one line; then re-raises it: exit status 1), and ``RESULT rank R steps N mean_step_ms X median_step_ms Y`` at the end of a run
that was not cut short (over the steps after the first 20).
"""
import datetime
import os
import signal
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt

torch.set_num_threads(1)
OPT = os.environ.get("OPT", "compressed")
STEPS = int(os.environ.get("STEPS", "100000"))
KILL_AT = int(os.environ.get("KILL_AT", "-1"))
KILL_RANK = int(os.environ.get("KILL_RANK", "1"))
TAU = int(os.environ.get("TAU", "4"))
BATCH = int(os.environ.get("BATCH", "64"))
timeout = datetime.timedelta(seconds=float(os.environ.get("PG_TIMEOUT", "20")))

info = commopt.init_distributed(backend="gloo", timeout=timeout)
r = info.rank
print(f"rank {r}/{info.world_size} launcher {info.launcher} kernels {commopt.kernels.path_name(info.device)} "
      f"up t={time.time():.3f}", flush=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                            torch.nn.Linear(256, 8))
ddp = DDP(model, bucket_cap_mb=0.1)
if OPT == "compressed":
    opt = commopt.CompressedOptimizer(ddp, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      compressor="topk:0.05", feedback="econtrol")
elif OPT == "co2":
    opt = commopt.CO2(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), tau=TAU)
elif OPT == "mkor":
    opt = commopt.MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05))
else:
    raise SystemExit(f"OPT must be compressed | co2 | mkor, got {OPT!r}")


def die(t: int) -> None:
    print(f"KILLING rank {r} step {t} t={time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


gen = torch.Generator().manual_seed(1 + r)
times = []
try:
    for t in range(STEPS):
        t0 = time.perf_counter()
        x = torch.randn(BATCH, 64, generator=gen)
        y = torch.randn(BATCH, 8, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        killing = KILL_AT >= 0 and r == KILL_RANK and t >= KILL_AT
        if killing and OPT == "mkor" and t % 10 == 0:
            die(t)  # MKOR's statistics all-reduce is next, inside opt.step()
        if killing and OPT == "compressed":
            die(t)
        opt.step()
        if killing and OPT == "co2" and (t + 1) % TAU == 0:
            die(t)  # this step launched the round's outer all-reduce; it is in flight now
        times.append(time.perf_counter() - t0)
        if t % 10 == 0:
            print(f"rank {r} step {t} t={time.time():.3f}", flush=True)
    if OPT == "co2":
        opt.finish()
except BaseException as e:  # noqa: BLE001 -- report, then let it end the process as it would have
    first = (str(e).strip().splitlines() or [""])[0]
    print(f"FAULT_ERROR rank {r} t={time.time():.3f} {type(e).__name__}: {first}", flush=True)
    print(f"FAULT_DETAIL rank {r} " + " | ".join(str(e).strip().splitlines())[:3000], flush=True)
    raise
tail = times[20:] or times
print(f"RESULT rank {r} steps {len(times)} mean_step_ms {1000 * sum(tail) / len(tail):.2f} "
      f"median_step_ms {1000 * sorted(tail)[len(tail) // 2]:.2f}", flush=True)
torch.distributed.destroy_process_group()
