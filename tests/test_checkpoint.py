"""Checkpoint round trip of CompressedOptimizer in FRESH processes (torch.multiprocessing, "spawn", gloo).

Phases, each in newly spawned processes:
  (a) 2 ranks train 30 steps uninterrupted and save the final parameters;
  (b) 2 ranks train 15 steps, then each rank saves its own opt.state_dict() + model + LR scheduler;
  (c) 2 new ranks build a fresh model/DDP/optimizer/scheduler, load their own file, train 15 more steps:
      the final parameters equal (a)'s exactly (torch.equal);
  (d) a 1-rank world loads rank 0's file: ValueError by default, works with on_world_size_change="reset".
Phase (c) also checks that loading another rank's file (files swapped between the ranks), or loading
into a run with another compressor, raises; and that rank 0's file loaded on both ranks (a checkpoint
saved on rank 0 only, nanoGPT-style) is accepted with one warning on every rank, restarts the feedback
state with dense rounds, and the replicas stay identical.
"""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

STEPS, SPLIT = 30, 15
# (name, compressor, feedback): SGD with momentum and StepLR in every case
CONFIGS = [
    ("topk_econtrol", "topk:0.05", "econtrol"),
    ("randk_ef21", "randk:0.05", "ef21"),
    ("topk_ef14", "topk:0.05", "ef14"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(compressor: str, feedback: str, bucket_cap_mb=None, **kwargs):
    """Model (3 Linear layers: DDP's bucket rebuild reorders its parameters), DDP, optimizer, scheduler."""
    import commopt
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 3))
    ddp = DDP(model) if bucket_cap_mb is None else DDP(model, bucket_cap_mb=bucket_cap_mb)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = commopt.CompressedOptimizer(ddp, inner, compressor=compressor, feedback=feedback, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return model, ddp, opt, sched


def _train(model, ddp, opt, sched, rank: int, start: int, stop: int) -> None:
    for t in range(start, stop):
        g = torch.Generator().manual_seed(1000 * rank + t)   # the data depends on (rank, step) only
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        sched.step()


def _raises(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the parent
        return type(exc).__name__
    return "no error"


def _worker(rank: int, world: int, port: int, phase: str, tmp: str, names: list, cap, negatives: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    tmp_path = Path(tmp)
    results = {}
    try:
        for name, comp, fb in CONFIGS:
            if name not in names:
                continue
            folder = tmp_path / name
            build = lambda *args, **kw: _build(*args, bucket_cap_mb=cap, **kw)  # noqa: E731
            if phase == "full":
                model, ddp, opt, sched = build(comp, fb)
                _train(model, ddp, opt, sched, rank, 0, STEPS)
                torch.save([p.detach().clone() for p in model.parameters()], folder / f"full_rank{rank}.pt")
            elif phase == "save":
                model, ddp, opt, sched = build(comp, fb)
                _train(model, ddp, opt, sched, rank, 0, SPLIT)
                torch.save({"opt": opt.state_dict(), "model": model.state_dict(), "sched": sched.state_dict()},
                           folder / f"rank{rank}.pt")
            elif phase == "resume":
                ckpt = torch.load(folder / f"rank{rank}.pt", weights_only=False)
                model, ddp, opt, sched = build(comp, fb)
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["opt"])
                sched.load_state_dict(ckpt["sched"])
                _train(model, ddp, opt, sched, rank, SPLIT, STEPS)
                torch.save([p.detach().clone() for p in model.parameters()], folder / f"resumed_rank{rank}.pt")
                if not negatives:
                    continue
                # another rank's file (rank 0 loads rank 1's and vice versa)
                other = torch.load(folder / f"rank{1 - rank}.pt", weights_only=False)
                _, _, opt2, _ = build(comp, fb)
                results[f"{name}/other_rank"] = _raises(lambda: opt2.load_state_dict(other["opt"]))
                # a run with another compressor
                _, _, opt3, _ = build("topk:0.1" if comp.startswith("randk") else "randk:0.05", fb)
                results[f"{name}/other_compressor"] = _raises(lambda: opt3.load_state_dict(ckpt["opt"]))
                # rank 0's file on both ranks (saved on rank 0 only): accepted, the feedback state restarts
                master = torch.load(folder / "rank0.pt", weights_only=False)
                model4, ddp4, opt4, sched4 = build(comp, fb)
                model4.load_state_dict(master["model"])
                with warnings.catch_warnings(record=True) as rec:
                    warnings.simplefilter("always")
                    opt4.load_state_dict(master["opt"])
                sched4.load_state_dict(master["sched"])
                results[f"{name}/master_warnings"] = sum(
                    "rank 0's checkpoint" in str(w.message) for w in rec if str(w.message).startswith("commopt:"))
                dense0, comp0 = opt4.comm_stats()["dense_rounds"], opt4.comm_stats()["compressed_rounds"]
                _train(model4, ddp4, opt4, sched4, rank, SPLIT, SPLIT + 2)
                results[f"{name}/master_dense_first"] = (opt4.comm_stats()["compressed_rounds"] == comp0
                                                         and opt4.comm_stats()["dense_rounds"] > dense0)
                _train(model4, ddp4, opt4, sched4, rank, SPLIT + 2, SPLIT + 6)
                results[f"{name}/master_compressed_after"] = opt4.comm_stats()["compressed_rounds"] > comp0
                torch.save([p.detach().clone() for p in model4.parameters()], folder / f"master_rank{rank}.pt")
            elif phase == "world1":
                ckpt = torch.load(folder / "rank0.pt", weights_only=False)
                _, _, opt, _ = build(comp, fb)
                results[f"{name}/world1_default"] = _raises(lambda: opt.load_state_dict(ckpt["opt"]))
                model, ddp, opt, sched = build(comp, fb, on_world_size_change="reset")
                model.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["opt"])
                sched.load_state_dict(ckpt["sched"])
                dense_before = opt.comm_stats()["dense_rounds"]
                _train(model, ddp, opt, sched, rank, SPLIT, SPLIT + 5)
                stats = opt.comm_stats()
                results[f"{name}/world1_reset_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
                results[f"{name}/world1_reset_dense_rounds"] = stats["dense_rounds"] - dense_before
                results[f"{name}/world1_reset_compressed_rounds"] = stats["compressed_rounds"]
            else:
                raise ValueError(phase)
        torch.save(results, tmp_path / f"results_{phase}_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(phase: str, world: int, tmp_path: Path, names: list, cap=None, negatives: bool = True) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(world, _free_port(), phase, str(tmp_path), names, cap, negatives),
                       nprocs=world, join=True, start_method="spawn")


def _compare_full_and_resumed(tmp_path: Path, names: list) -> None:
    for name in names:
        for rank in range(2):
            full = torch.load(tmp_path / name / f"full_rank{rank}.pt")
            resumed = torch.load(tmp_path / name / f"resumed_rank{rank}.pt")
            assert len(full) == len(resumed)
            diff = [j for j, (a, b) in enumerate(zip(full, resumed)) if not torch.equal(a, b)]
            worst = max((float((a - b).abs().max()) for a, b in zip(full, resumed)), default=0.0)
            assert diff == [], f"{name} rank {rank}: parameters {diff} differ after resume (max {worst:.3e})"
            assert all(torch.isfinite(p).all() for p in full)
        # the uninterrupted run moved away from the checkpoint (the resumed steps did something)
        saved = torch.load(tmp_path / name / "rank0.pt", weights_only=False)["model"]
        full_rank0 = torch.load(tmp_path / name / "full_rank0.pt")
        assert any(not torch.equal(a, b) for a, b in zip(saved.values(), full_rank0))
        # DDP keeps the replicas identical
        assert all(torch.equal(a, b) for a, b in zip(full_rank0, torch.load(tmp_path / name / "full_rank1.pt")))


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_checkpoint_round_trip_in_fresh_processes(tmp_path):
    """Default DDP buckets (this small model is one bucket before and after DDP's rebuild, which
    reorders its parameters): the resumed run equals the uninterrupted one exactly."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = [name for name, _, _ in CONFIGS]
    for name in names:
        (tmp_path / name).mkdir()
    _spawn("full", 2, tmp_path, names)
    _spawn("save", 2, tmp_path, names)
    _spawn("resume", 2, tmp_path, names)
    _spawn("world1", 1, tmp_path, names)
    _compare_full_and_resumed(tmp_path, names)

    resume = [torch.load(tmp_path / f"results_resume_rank{r}.pt") for r in range(2)]
    world1 = torch.load(tmp_path / "results_world1_rank0.pt")
    for name in names:
        for r in range(2):
            assert resume[r][f"{name}/other_rank"] == "ValueError", (name, r, resume[r])
            assert resume[r][f"{name}/other_compressor"] == "ValueError", (name, r, resume[r])
            assert resume[r][f"{name}/master_warnings"] == 1, (name, r, resume[r])
            assert resume[r][f"{name}/master_dense_first"] is True, (name, r, resume[r])
            assert resume[r][f"{name}/master_compressed_after"] is True, (name, r, resume[r])
        m0, m1 = (torch.load(tmp_path / name / f"master_rank{r}.pt") for r in range(2))
        assert all(torch.equal(a, b) and torch.isfinite(a).all() for a, b in zip(m0, m1)), name
        assert world1[f"{name}/world1_default"] == "ValueError", (name, world1)
        assert world1[f"{name}/world1_reset_finite"] is True
        assert world1[f"{name}/world1_reset_dense_rounds"] >= 1, world1  # the state restarts with a dense round


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_checkpoint_round_trip_with_several_buckets(tmp_path):
    """Several DDP buckets (tiny bucket_cap_mb). A fresh DDP runs its first iteration with its initial
    bucket assignment (in torch 2.x: every parameter in one bucket) and rebuilds afterwards, so the
    first resumed step meets a different bucket layout than the uninterrupted run did at that step;
    the resumed run must still equal the uninterrupted one exactly."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = ["topk_econtrol", "randk_ef21"]
    for name in names:
        (tmp_path / name).mkdir()
    for phase in ("full", "save", "resume"):
        _spawn(phase, 2, tmp_path, names, cap=0.001, negatives=False)
    _compare_full_and_resumed(tmp_path, names)
