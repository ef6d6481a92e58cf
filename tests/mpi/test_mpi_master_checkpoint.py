"""Checkpoints that are not one file per rank, at n ranks: a checkpoint saved on rank 0 only and
loaded on every rank (nanoGPT), torch.distributed.checkpoint's get/set_optimizer_state_dict, and
loads refused on one rank only (every rank refuses and stays as it was). Per-rank files are in
test_mpi_checkpoint.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import commopt
from mpi_helpers import (all_ranks_true, all_slots, batch, bits, differing_params, differing_replicated,
                         make_mlp_ddp, roundtrip, train_step)

WARMUP = 2


def _build(comp="topk:0.05", rule="econtrol"):
    model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), bucket_cap_mb=0.005)  # several buckets / blocks
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      compressor=comp, feedback=rule, warmup_steps=WARMUP)
    return model, ddp, opt


def _commopt_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in rec if str(w.message).startswith("commopt:")]


def _rounds(opt) -> tuple[int, int]:
    s = opt.comm_stats()
    return s["dense_rounds"], s["compressed_rounds"]


def _check_restart(r, ddp, opt, model, start: int) -> list[str]:
    """The next WARMUP steps are dense on every rank, then compressed; the replicas and the replicated
    state stay bitwise identical across ranks. Returns this rank's problems (every rank must call it)."""
    problems = []
    d0, c0 = _rounds(opt)
    for t in range(start, start + WARMUP):
        train_step(ddp, opt, *batch(r, t))
    d1, c1 = _rounds(opt)
    if c1 != c0 or d1 == d0:
        problems.append(f"restart rounds not dense: dense {d0}->{d1}, compressed {c0}->{c1}")
    for t in range(start + WARMUP, start + WARMUP + 4):
        train_step(ddp, opt, *batch(r, t))
    if _rounds(opt)[1] == c1:
        problems.append("no compressed rounds after the restart")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        problems.append("non-finite parameters")
    bad = differing_replicated(opt)
    if bad:
        problems.append(f"replicated state differs: {bad}")
    params = differing_params(model.parameters())
    if params:
        problems.append(f"parameters differ across ranks: {params}")
    return problems


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize("comp,rule", [("topk:0.05", "econtrol"), ("randk:0.05", "ef21sgdm")])
def test_checkpoint_saved_on_rank0_only_loads_on_every_rank(world, comp, rule):
    r = world.rank
    model, ddp, opt = _build(comp, rule)
    for t in range(8):
        train_step(ddp, opt, *batch(r, t))
    sd = opt.state_dict()  # on every rank (as nanoGPT does); only rank 0's is kept
    box = [roundtrip({"model": model.state_dict(), "opt": sd}) if r == 0 else None]
    dist.broadcast_object_list(box, src=0)
    ckpt = box[0]
    saved = ckpt["opt"]["commopt"]

    model2, ddp2, opt2 = _build(comp, rule)
    model2.load_state_dict(ckpt["model"])
    msgs = _commopt_warnings(lambda: opt2.load_state_dict(ckpt["opt"]))
    problems = []
    if len(msgs) != 1 or "every rank loaded rank 0's checkpoint" not in msgs[0] or "Reset" not in msgs[0]:
        problems.append(f"warnings: {msgs}")
    st = opt2.hook_state
    # the replicated parts are taken: step count, blocks, counters, the inner optimizer's state
    if st.step != 8 or st.dense_until != 8 + WARMUP:
        problems.append(f"step {st.step}, dense_until {st.dense_until}")
    if [list(b.pids) for b in st.blocks().values()] != saved["blocks"]:
        problems.append("block partition")
    if any(b.slots for b in st.blocks().values()):
        problems.append("feedback state was kept")
    stats = opt2.comm_stats()
    if any(stats[k] != saved["stats"][k] for k in ("steps", "dense_rounds", "compressed_rounds", "collectives")):
        problems.append(f"counters {stats} vs {saved['stats']}")
    for p, q in zip(model.parameters(), model2.parameters()):  # rank 0's inner state = every rank's (replicated)
        if not torch.equal(bits(opt.state[p]["momentum_buffer"]), bits(opt2.state[q]["momentum_buffer"])):
            problems.append("inner momentum")
            break
    problems += _check_restart(r, ddp2, opt2, model2, 8)
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
def test_distributed_checkpoint_round_trip(world):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    r = world.rank
    model, ddp, opt = _build()
    for t in range(6):
        train_step(ddp, opt, *batch(r, t))
    osd = roundtrip(get_optimizer_state_dict(ddp, opt))
    model_sd = roundtrip(model.state_dict())
    problems = []
    if set(osd) != {"state", "param_groups"}:
        problems.append(f"keys {sorted(osd)}")
    model2, ddp2, opt2 = _build()
    model2.load_state_dict(model_sd)
    msgs = _commopt_warnings(lambda: set_optimizer_state_dict(ddp2, opt2, osd))
    if len(msgs) != 1 or "holds no commopt state" not in msgs[0] or "save opt.state_dict()" not in msgs[0]:
        problems.append(f"warnings: {msgs}")
    for p, q in zip(model.parameters(), model2.parameters()):
        if not torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"]):
            problems.append("inner momentum")
            break
    if opt2.hook_state.dense_until != opt2.hook_state.step + WARMUP:
        problems.append("no dense restart")
    problems += _check_restart(r, ddp2, opt2, model2, 6)
    # and into the running optimizer: restarts at its own step
    osd = get_optimizer_state_dict(ddp, opt)
    if len(_commopt_warnings(lambda: set_optimizer_state_dict(ddp, opt, osd))) != 1:
        problems.append("running optimizer: warnings")
    if opt.hook_state.step != 6 or opt.hook_state.dense_until != 6 + WARMUP:
        problems.append("running optimizer: restart step")
    problems += _check_restart(r, ddp, opt, model, 6)
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


def _snapshot(opt, base=None) -> dict:
    """``base``: the torch optimizer whose state to record (default: the inner optimizer)."""
    st = opt.hook_state
    inner = (opt.optimizer if base is None else base).state_dict()
    return {"step": st.step, "dense_until": st.dense_until, "slots": all_slots(opt),
            "blocks": [b.pids for b in st.blocks().values()], "stats": opt.comm_stats(),
            "optimizer_steps": opt.state_dict()["commopt"]["optimizer_steps"],
            "groups": inner["param_groups"],
            "inner": {k: v["momentum_buffer"].clone() for k, v in inner["state"].items()}}


def _differences(a: dict, b: dict) -> list[str]:
    bad = [k for k in ("step", "dense_until", "blocks", "stats", "optimizer_steps", "groups") if a[k] != b[k]]
    for k in ("slots", "inner"):
        if a[k].keys() != b[k].keys() or any(not torch.equal(bits(a[k][i]), bits(b[k][i])) for i in a[k]):
            bad.append(k)
    return bad


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize("wrong", ["inner", "compressor", "step", "mixed_files"])
def test_load_refused_on_one_rank_is_refused_on_every_rank(world, wrong):
    """Only the last rank's checkpoint is bad; every rank raises and every rank, including those whose
    own part was fine (and whose inner optimizer had already loaded it), stays as it was."""
    r, n = world.rank, world.size
    last = n - 1
    model, ddp, opt = _build()
    for t in range(5):
        train_step(ddp, opt, *batch(r, t))
    sd = roundtrip(opt.state_dict())
    for t in range(5, 8):  # the live state moves on from the checkpoint
        train_step(ddp, opt, *batch(r, t))
    if r == last:
        if wrong == "inner":
            sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
        elif wrong == "compressor":
            sd["commopt"]["compressor"] = {**sd["commopt"]["compressor"], "ratio": 0.1}
        elif wrong == "step":  # its own file, but saved at another step
            sd = roundtrip(opt.state_dict())
        else:  # the last rank holds rank 0's file, the others their own
            box = [None]
            dist.broadcast_object_list(box, src=0)
            sd = box[0]
    elif wrong == "mixed_files" and r == 0:
        dist.broadcast_object_list([sd], src=0)
    elif wrong == "mixed_files":
        dist.broadcast_object_list([None], src=0)
    before = _snapshot(opt)
    message = "accepted"

    def load():
        nonlocal message
        try:
            opt.load_state_dict(sd)
        except ValueError as exc:
            message = str(exc)

    msgs = _commopt_warnings(load)
    expected = {"inner": f"rank {last}: the inner SGD refused its part", "compressor": f"rank {last}: checkpoint was "
                "made with compressor", "step": "different points", "mixed_files": f"rank {last} holds rank 0's"}[wrong]
    problems = [] if expected in message and "nothing was changed on any rank" in message else [message]
    if wrong == "mixed_files" and n == 2:  # with 2 ranks both hold rank 0's file: the master-only case
        problems = [] if message == "accepted" and len(msgs) == 1 else [message, msgs]
    else:
        problems += _differences(before, _snapshot(opt))
        for t in range(8, 11):  # training goes on in step on every rank
            train_step(ddp, opt, *batch(r, t))
        opt.verify_replicated_state()
    assert all_ranks_true(not problems), f"rank {r}: {problems}"
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
def test_refusal_elsewhere_restores_a_wrapped_inner_optimizer(world):
    """CompressedOptimizer(ddp, MKOR(ddp, SGD)): the ranks whose MKOR had loaded the checkpoint put it
    back (factors, step count, base state) when the last rank refuses commopt's part."""
    r, last = world.rank, world.size - 1
    f64 = torch.float64
    model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), dtype=f64, bucket_cap_mb=0.005)
    mk = commopt.MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=2)
    opt = commopt.CompressedOptimizer(ddp, mk, compressor="topk:0.1", feedback="econtrol")
    for t in range(5):
        train_step(ddp, opt, *batch(r, t, dtype=f64))
    sd = roundtrip(opt.state_dict())
    for t in range(5, 9):  # MKOR updates its factors at steps 6 and 8
        train_step(ddp, opt, *batch(r, t, dtype=f64))
    if r == last:
        sd["commopt"]["compressor"] = {**sd["commopt"]["compressor"], "ratio": 0.2}

    def state():
        return {"factors": {k: (a.clone(), b.clone()) for k, (a, b) in mk.factors().items()},
                "mkor_steps": mk.state_dict()["mkor"]["steps"],
                "snapshot": _snapshot(opt, base=mk.optimizer)}

    before = state()
    problems = []
    try:
        opt.load_state_dict(sd)
        problems.append("accepted")
    except ValueError as exc:
        if f"rank {last}: checkpoint was made with compressor" not in str(exc):
            problems.append(str(exc))
    after = state()
    if after["mkor_steps"] != before["mkor_steps"]:
        problems.append("MKOR step count")
    if any(not (torch.equal(a, c) and torch.equal(b, d))
           for k, (a, b) in before["factors"].items() for c, d in [after["factors"][k]]):
        problems.append("MKOR factors")
    problems += _differences(before["snapshot"], after["snapshot"])
    assert all_ranks_true(not problems), f"rank {r}: {problems}"
