"""Which checkpoint a (requeued) training job resumes from, at n ranks: experiments/train_nanogpt.py's
``choose_checkpoint``. A job that died while saving (a node failure under SLURM) can leave the newest
per-rank files of some ranks only; every rank must then resume from the newest iteration that every
rank has, never from different iterations, and agree when there is nothing to resume from."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
import torch.distributed as dist

from mpi_helpers import all_ranks_true

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import train_nanogpt  # noqa: E402


@pytest.fixture
def shared_dir(world):
    obj = [tempfile.mkdtemp(prefix="commopt-resume-") if world.rank == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    yield obj[0]
    dist.barrier()
    if world.rank == 0:
        shutil.rmtree(obj[0], ignore_errors=True)


def _touch(d: str, name: str) -> None:
    open(os.path.join(d, name), "wb").close()


def _args(d: str, *extra: str):
    return train_nanogpt.parse_args(["--out-dir", d, *extra])


@pytest.mark.mpi(min_size=2)
def test_per_rank_resume_takes_the_newest_iteration_every_rank_has(world, shared_dir):
    if world.rank == 0:
        for it in (25, 50, 75):  # rank 0 also saved iteration 75 before the job died
            _touch(shared_dir, f"ckpt_{it:06d}.rank0.pt")
        for r in range(1, world.size):
            for it in (25, 50):
                _touch(shared_dir, f"ckpt_{it:06d}.rank{r}.pt")
    dist.barrier()
    for extra in (("--resume",), ("--resume-if-present",)):
        got = train_nanogpt.choose_checkpoint(_args(shared_dir, "--ckpt-mode", "per-rank", *extra), world.rank,
                                              world.size)
        assert all_ranks_true(got == os.path.join(shared_dir, f"ckpt_000050.rank{world.rank}.pt")), got


@pytest.mark.mpi(min_size=2)
def test_nothing_in_common_refuses_on_every_rank_or_starts_fresh_if_present(world, shared_dir):
    if world.rank == 0:
        _touch(shared_dir, "ckpt_000025.rank0.pt")  # the other ranks have nothing
    dist.barrier()
    with pytest.raises(FileNotFoundError, match="no iteration has a checkpoint of every rank"):
        train_nanogpt.choose_checkpoint(_args(shared_dir, "--ckpt-mode", "per-rank", "--resume"), world.rank,
                                        world.size)
    got = train_nanogpt.choose_checkpoint(_args(shared_dir, "--ckpt-mode", "per-rank", "--resume-if-present"),
                                          world.rank, world.size)
    assert all_ranks_true(got is None)


@pytest.mark.mpi(min_size=2)
def test_master_mode_reads_ckpt_pt_and_starts_fresh_only_when_no_rank_sees_it(world, shared_dir):
    got = train_nanogpt.choose_checkpoint(_args(shared_dir, "--resume-if-present"), world.rank, world.size)
    assert all_ranks_true(got is None)
    with pytest.raises(FileNotFoundError, match="nothing to resume from"):
        train_nanogpt.choose_checkpoint(_args(shared_dir, "--resume"), world.rank, world.size)
    if world.rank == 0:
        _touch(shared_dir, "ckpt.pt")
    dist.barrier()
    got = train_nanogpt.choose_checkpoint(_args(shared_dir, "--resume"), world.rank, world.size)
    assert all_ranks_true(got == os.path.join(shared_dir, "ckpt.pt"))
    assert train_nanogpt.choose_checkpoint(_args(shared_dir), world.rank, world.size) is None  # no --resume
