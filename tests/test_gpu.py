"""GPU checks of the compression hook (they skip without CUDA; run them whenever a GPU is available).

* stream lifetime: NCCL with world size 1 (it still takes the gather path) with ``torch.cuda._sleep``
  injected before every state update, so a tensor freed too early would be overwritten by the next
  bucket's kernels; compared with a CPU (gloo) run of the same steps;
* no host sync: a compressed step under ``torch.cuda.set_sync_debug_mode("error")`` after warm-up.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
import commopt.round as round_mod

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: GPU stream-safety and sync checks need one")

RULES = ["econtrol", "ef14", "ef21sgdm"]


def _group(backend: str):
    store = dist.FileStore(tempfile.mktemp(prefix="commopt-gpu-"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 8)).to(device=device, dtype=torch.float64)


def _run(device: str, backend: str, rule: str, steps: int = 8, sleep: bool = False, comp: str = "topk:0.05"):
    _group(backend)
    try:
        model = _model(device)
        ddp = DDP(model, bucket_cap_mb=0.05, device_ids=[0] if device == "cuda" else None)
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05), compressor=comp,
                                          feedback=rule)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(32, 64, generator=g, dtype=torch.float64).to(device)
            y = torch.randn(32, 8, generator=g, dtype=torch.float64).to(device)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return [p.detach().cpu().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("comp", ["topk:0.05", "randk:0.05"])
@pytest.mark.parametrize("rule", RULES)
def test_cuda_callbacks_keep_their_tensors_alive(monkeypatch, rule, comp):
    cpu = _run("cpu", "gloo", rule, comp=comp)
    real = round_mod.conclude

    def slow_conclude(*args, **kwargs):
        torch.cuda._sleep(20_000_000)  # ~10 ms on the callback's stream, before the state update reads
        return real(*args, **kwargs)

    monkeypatch.setattr(round_mod, "conclude", slow_conclude)
    import commopt.hook as hook_mod
    monkeypatch.setattr(hook_mod, "conclude", slow_conclude)
    gpu = _run("cuda", "nccl", rule, sleep=True, comp=comp)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), float((a - b).abs().max())


@pytest.mark.parametrize("rule", RULES)
def test_compressed_step_never_syncs_after_warmup(rule):
    _group("nccl")
    try:
        model = _model("cuda")
        ddp = DDP(model, bucket_cap_mb=0.05, device_ids=[0])
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05),
                                          compressor="topk:0.05", feedback=rule)
        x = torch.randn(32, 64, dtype=torch.float64, device="cuda")
        y = torch.randn(32, 8, dtype=torch.float64, device="cuda")

        def step():
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()

        for _ in range(opt.hook_state.warmup_steps + 1):  # warm-up, then the one sync where it ends
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert opt.hook_state.stats["compressed_rounds"] > 0
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()
