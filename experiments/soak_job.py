"""2-rank CompressedOptimizer job (TopK 5% + EControl, AdamW; gloo, torchrun or RANK/WORLD_SIZE env): prints RSS every
500 steps (memory must stay flat); KILL_AT=N kills rank 1 with SIGKILL at step N (every survivor must raise).

    STEPS=6000 torchrun --nproc_per_node 2 experiments/soak_job.py
    KILL_AT=200 STEPS=20000 RANK=0|1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29733 python experiments/soak_job.py
"""
import os, signal, sys, time, resource, torch, torch.distributed as dist
from datetime import timedelta
import commopt
from torch.nn.parallel import DistributedDataParallel as DDP
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("PG_TIMEOUT", "30"))))
r = dist.get_rank()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))
ddp = DDP(m, bucket_cap_mb=0.1)
opt = commopt.CompressedOptimizer(ddp, torch.optim.AdamW(m.parameters(), lr=1e-3), compressor="topk:0.05", feedback="econtrol")
steps, kill_at = int(os.environ.get("STEPS", "4000")), int(os.environ.get("KILL_AT", "-1"))
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
t0 = time.time()
for t in range(steps):
    if t == kill_at and r == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    x = torch.randn(32, 64); y = torch.randn(32, 8)
    opt.zero_grad()
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    opt.step()
    if t % 500 == 0 or t == steps - 1:
        print(f"rank {r} step {t} rss {rss():.1f} MB t {time.time()-t0:.1f}s", flush=True)
print(f"rank {r} done {opt.comm_stats()['compressed_rounds']} compressed rounds", flush=True)
dist.destroy_process_group()
