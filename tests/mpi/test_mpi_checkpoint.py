"""Checkpoints at n ranks inside one process per rank, each rank loading its own file (the
fresh-process round trip is tests/test_checkpoint.py; one file on every rank and
torch.distributed.checkpoint are in test_mpi_master_checkpoint.py): resume equals continuing,
counters survive, and a refused load changes nothing on any rank."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import MLP, all_ranks_true, all_slots, batch, bits, roundtrip, train_step


def _build(comp: str, rule: str):
    torch.manual_seed(0)
    model = MLP(sizes=(32, 32, 32, 8))
    ddp = DDP(model)   # default buckets: this model is one bucket before and after DDP's rebuild
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      compressor=comp, feedback=rule)
    return model, ddp, opt


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", [("topk:0.05", "econtrol"), ("randk:0.05", "ef21sgdm"), ("topk:0.05", "ef14")])
def test_resume_equals_continuing(world, comp, rule):
    r = world.rank
    model, ddp, opt = _build(comp, rule)
    for t in range(10):
        train_step(ddp, opt, *batch(r, t))
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    stats_at_save = opt.comm_stats()
    assert set(ckpt["opt"]) == {"state", "param_groups", "commopt"}  # torch.optim's shape + one key
    for t in range(10, 20):
        train_step(ddp, opt, *batch(r, t))
    model2, ddp2, opt2 = _build(comp, rule)
    model2.load_state_dict(ckpt["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each rank's own file: exact, no reset warning
        opt2.load_state_dict(ckpt["opt"])
    counters_restored = opt2.comm_stats() == stats_at_save
    for t in range(10, 20):
        train_step(ddp2, opt2, *batch(r, t))
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all_ranks_true(same), f"rank {r}: resumed parameters differ"
    s1, s2 = all_slots(opt), all_slots(opt2)
    assert s1.keys() == s2.keys() and all(torch.equal(bits(s1[k]), bits(s2[k])) for k in s1)
    assert counters_restored and opt2.comm_stats() == opt.comm_stats(), "comm_stats() did not survive the resume"


def _snapshot(opt) -> dict:
    st = opt.hook_state
    return {"step": st.step, "dense_until": st.dense_until, "slots": all_slots(opt),
            "commopt": {k: v for k, v in st.state_dict().items() if k != "params"},
            "params": {pid: {n: t.clone() for n, t in s.items()} for pid, s in st.state_dict()["params"].items()}}


def _same_snapshot(a: dict, b: dict) -> list[str]:
    bad = [k for k in ("step", "dense_until", "commopt") if a[k] != b[k]]
    if a["slots"].keys() != b["slots"].keys() or any(
            not torch.equal(bits(a["slots"][k]), bits(b["slots"][k])) for k in a["slots"]):
        bad.append("bucket slots")
    if a["params"].keys() != b["params"].keys() or any(
            not torch.equal(bits(a["params"][p][n]), bits(b["params"][p][n]))
            for p in a["params"] for n in a["params"][p]):
        bad.append("per-parameter state")
    return bad


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("wrong", ["rank", "world_size", "compressor"])
def test_refused_load_leaves_the_optimizer_unchanged(world, wrong):
    """A load_state_dict that raises must not have wiped or half-replaced the running state."""
    r, n = world.rank, world.size
    model, ddp, opt = _build("topk:0.05", "econtrol")
    for t in range(6):
        train_step(ddp, opt, *batch(r, t))
    sd = roundtrip(opt.state_dict())
    for t in range(6, 9):  # the live state moves on from the checkpoint
        train_step(ddp, opt, *batch(r, t))
    if wrong == "rank":
        sd["commopt"]["rank"] = (r + 1) % n
    elif wrong == "world_size":
        sd["commopt"]["world_size"] = n + 1
    else:
        sd["commopt"]["compressor"] = {**sd["commopt"]["compressor"], "ratio": 0.1}
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="nothing was changed on any rank"):
        opt.load_state_dict(sd)
    problems = _same_snapshot(before, _snapshot(opt))
    # and training goes on in step on every rank
    for t in range(9, 12):
        train_step(ddp, opt, *batch(r, t))
    opt.verify_replicated_state()
    assert all_ranks_true(not problems), f"rank {r}: a refused load changed {problems}"
    dist.barrier()
