"""Short soak of every optimizer (the CI version of ``experiments/soak.py``): a tiny MLP, world size 1
(gloo, file store), a few thousand steps each in one fresh interpreter. Per optimizer: the RSS growth
after warm-up stays below a bound, and, free of allocator noise, the number of live torch tensors
(gc) does not grow and weak references to a step's model output and input are dead after the step.
MKOR's old output-gradient hook (a closure on ``output.grad_fn`` holding ``output``) fails the
tensor and weakref checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(400)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, WARMUP, RSS_BOUND_MB = 1500, 400, 8.0


def _worker(store: str, steps: int, warmup: int) -> None:
    import gc
    import weakref

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, ROOT)
    import commopt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    makers = {
        "compressed": lambda ddp, m: commopt.CompressedOptimizer(ddp, torch.optim.AdamW(m.parameters(), lr=1e-3),
                                                                 compressor="topk:0.05", feedback="econtrol"),
        "co2": lambda ddp, m: commopt.CO2(ddp, torch.optim.AdamW(m.parameters(), lr=1e-3), tau=4),
        "mkor": lambda ddp, m: commopt.MKOR(ddp, torch.optim.SGD(m.parameters(), lr=0.05), update_every=2),
    }
    for name, make in makers.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        ddp = DDP(model)
        opt = make(ddp, model)
        gen = torch.Generator().manual_seed(1)
        refs = []
        rec = {}
        for t in range(steps):
            x = torch.randn(16, 8, generator=gen)
            y = torch.randn(16, 4, generator=gen)
            opt.zero_grad()
            out = ddp(x)
            torch.nn.functional.mse_loss(out, y).backward()
            opt.step()
            if steps - 6 <= t < steps - 2:  # 4 steps (MKOR statistics steps included), 2 more after them
                refs += [weakref.ref(out), weakref.ref(x)]  # (CompressedOptimizer holds the latest step's)
            del x, y, out
            if t == warmup:
                rec.update(rss_warm=rss(), tensors_warm=tensors())
        gc.collect()
        rec.update(rss_end=rss(), tensors_end=tensors(), alive=sum(r() is not None for r in refs))
        if name == "co2":
            opt.finish()
        del opt, ddp, model
        print("SOAK " + json.dumps({"opt": name, **rec}), flush=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("soak") / "store")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), store, str(STEPS), str(WARMUP)], env=env,
                       capture_output=True, text=True, timeout=390, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return {r["opt"]: r for r in (json.loads(line[5:]) for line in p.stdout.splitlines() if line.startswith("SOAK "))}


@pytest.mark.parametrize("opt", ["compressed", "co2", "mkor"])
def test_memory_is_flat_after_warmup(soak, opt):
    r = soak[opt]
    assert r["alive"] == 0, f"{opt}: {r['alive']} outputs/inputs of the last steps are still alive"
    assert r["tensors_end"] <= r["tensors_warm"], f"{opt}: live tensors {r['tensors_warm']} -> {r['tensors_end']}"
    assert r["rss_end"] - r["rss_warm"] <= RSS_BOUND_MB, f"{opt}: RSS {r['rss_warm']:.1f} -> {r['rss_end']:.1f} MB"


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
