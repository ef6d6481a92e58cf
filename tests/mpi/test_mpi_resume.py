"""Unreadable or damaged checkpoints at n ranks (``mpiexec -n 2|4 ... --with-mpi``): every rank raises the
same clear error, none waits in a collective, nothing changes, and training goes on.

* :func:`commopt.load_checkpoint`: one rank's (or two ranks') file truncated, emptied, corrupted or
  missing; every rank raises the same :class:`commopt.CheckpointError` naming the failing rank(s) and
  path(s); afterwards every rank trains on in step and a good file still loads and resumes.
* ``opt.load_state_dict`` with one rank's dict structurally damaged (missing keys, wrong shapes), for
  CompressedOptimizer, CO2 and MKOR: raises on every rank, the optimizer and model are unchanged.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import all_ranks_true, batch, load_outcome, roundtrip, same_on_all_ranks, train_step

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(90, method="thread")]


def _build(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
    ddp = DDP(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if kind == "compressed":
        opt = commopt.CompressedOptimizer(ddp, adamw, compressor="topk:0.05", feedback="econtrol")
    elif kind == "co2":
        opt = commopt.CO2(ddp, adamw, tau=4)
    else:
        opt = commopt.MKOR(ddp, adamw, update_every=2)
    return model, ddp, opt


def _opt_sd(opt) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # CO2 mid-round: per-rank files, as here
        return roundtrip(opt.state_dict())


def _snapshot(model, opt) -> dict:
    return {"model": copy.deepcopy(model.state_dict()), "opt": _opt_sd(opt)}


def _diff(a, b, where="") -> list[str]:
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [where or "keys"]
        return [d for k in a for d in _diff(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            a.nan_to_num(), b.nan_to_num())
        return [] if ok else [where]
    return [] if a == b else [where]


def _shared_dir() -> Path:
    box = [tempfile.mkdtemp(prefix="commopt_resume_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _gathered(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "bitflip":
        b = bytearray(data)
        b[b.find(b"data/0") + 300] ^= 0x08
        path.write_bytes(bytes(b))


CAUSE = {"truncated": "truncated", "empty": "empty", "missing": "no such file", "bitflip": "CRC-32 mismatch"}


@pytest.mark.parametrize("kind", ["compressed", "co2", "mkor"])
@pytest.mark.parametrize("how", ["truncated", "empty", "missing", "bitflip"])
def test_unreadable_file_on_one_rank_raises_on_every_rank(world, kind, how):
    r, n = world.rank, world.size
    bad_ranks = [n - 1] if how != "truncated" or n < 4 else [1, n - 1]   # at 4 ranks: two truncated files
    folder = _shared_dir()
    model, ddp, opt = _build(kind)
    for t in range(6):
        train_step(ddp, opt, *batch(r, t))
    path = folder / f"ckpt_rank{r}.pt"
    commopt.save_checkpoint({"model": model.state_dict(), "opt": _opt_sd(opt), "step": 6}, path)
    for t in range(6, 9):   # the live run moves on from the checkpoint
        train_step(ddp, opt, *batch(r, t))
    if r in bad_ranks:
        _damage_file(path, how)
    dist.barrier()
    before = _snapshot(model, opt)
    problems, message = [], "accepted"
    try:
        ck = commopt.load_checkpoint(path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        problems.append("accepted")
    except commopt.CheckpointError as exc:
        message = str(exc)
    messages = _gathered(message)
    if any(m != messages[0] for m in messages):
        problems.append(f"the ranks raised different errors: {messages}")
    for b in bad_ranks:
        if f"rank {b}: could not read {folder / f'ckpt_rank{b}.pt'}: " not in message or CAUSE[how] not in message:
            problems.append(f"rank {b}'s path or the cause is not named: {message}")
    if f"refused on rank(s) {bad_ranks}" not in message:
        problems.append(f"the failing ranks are not listed: {message}")
    problems += _diff(before, _snapshot(model, opt))
    for t in range(9, 12):   # training goes on, in step on every rank
        train_step(ddp, opt, *batch(r, t))
    if kind != "co2":
        problems += [f"param {j} differs across ranks" for j, p in enumerate(model.parameters())
                     if not same_on_all_ranks(p)]
    # a good file still loads everywhere: the run resumes from it
    commopt.save_checkpoint({"model": model.state_dict(), "opt": _opt_sd(opt), "step": 12}, path)
    ck = commopt.load_checkpoint(path)
    model.load_state_dict(ck["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # each rank's own file: exact, no warning
        opt.load_state_dict(ck["opt"])
    train_step(ddp, opt, *batch(r, 12))
    if hasattr(opt, "finish"):
        opt.finish()
    assert all_ranks_true(not problems), f"rank {r}: {problems}"
    dist.barrier()
    if r == 0:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def _damaged(kind: str, sd: dict, damage: str) -> dict:
    """``sd`` with one structural defect: a missing key or a tensor of the wrong shape."""
    sd = copy.deepcopy(sd)
    own = sd.get("commopt") if kind in ("compressed", "co2") else sd.get("mkor")
    if damage == "missing_state":
        del sd["state"]
    elif damage == "missing_group_key":
        del sd["param_groups"][0]["lr"]
    elif damage == "inner_shape":
        k = next(iter(sd["state"]))
        sd["state"][k]["exp_avg"] = sd["state"][k]["exp_avg"].flatten()[:3]
    elif damage == "own_missing":
        key = {"compressed": "params", "co2": "anchor", "mkor": "factors"}[kind]
        del own[key]
    elif damage == "own_shape":
        if kind == "compressed":
            pid = next(iter(own["params"]))
            slot = next(iter(own["params"][pid]))
            own["params"][pid][slot] = own["params"][pid][slot][:-1]
        elif kind == "co2":
            own["momentum"] = own["momentum"][:-1]
        else:
            name = next(iter(own["factors"]))
            own["factors"][name]["right"] = own["factors"][name]["right"][:-1, :-1]
    return sd


DAMAGES = ["missing_state", "missing_group_key", "inner_shape", "own_missing", "own_shape"]


@pytest.mark.parametrize("kind", ["compressed", "co2", "mkor"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_state_dict_on_one_rank_is_refused_on_every_rank(world, kind, damage):
    r, last = world.rank, world.size - 1
    model, ddp, opt = _build(kind)
    for t in range(6):
        train_step(ddp, opt, *batch(r, t))
    sd = _opt_sd(opt)
    for t in range(6, 9):
        train_step(ddp, opt, *batch(r, t))
    if r == last:
        sd = _damaged(kind, sd, damage)
    before = _snapshot(model, opt)
    outcome = load_outcome(opt, sd)
    outcomes = _gathered(outcome)
    raised = [i for i, o in enumerate(outcomes) if o != "accepted"]
    problems = []
    if raised != list(range(world.size)):
        problems.append(f"raised on rank(s) {raised} only: {outcomes}")
    elif r != last and f"rank {last}" not in outcome:
        problems.append(f"the damaged rank is not named: {outcome}")
    problems += _diff(before, _snapshot(model, opt))
    for t in range(9, 12):
        train_step(ddp, opt, *batch(r, t))
    if kind != "co2":
        problems += [f"param {j} differs across ranks" for j, p in enumerate(model.parameters())
                     if not same_on_all_ranks(p)]
    if hasattr(opt, "finish"):
        opt.finish()
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


def _own(kind: str, sd: dict) -> dict:
    return sd["mkor"] if kind == "mkor" else sd["commopt"]


@pytest.mark.parametrize("kind", ["compressed", "co2", "mkor"])
@pytest.mark.parametrize("mix", ["two runs at one step", "one run at two steps"])
def test_ranks_holding_files_of_two_runs_or_two_steps_are_refused_on_every_rank(world, kind, mix):
    """The last rank loads a file of another run saved at the same step (stale files left in the folder),
    or of this run at a later step: every rank raises, saying which, and nothing changes anywhere. CO2
    accepted both before checkpoints named their run and it compared the ranks' rounds."""
    r, last = world.rank, world.size - 1
    model, ddp, opt = _build(kind)
    for t in range(6):
        train_step(ddp, opt, *batch(r, t))
    sd = _opt_sd(opt)
    if mix == "two runs at one step":
        _, ddp2, opt2 = _build(kind)   # another run: the same model and settings, other data
        for t in range(6):
            train_step(ddp2, opt2, *batch(r, t, seed=1))
        other = _opt_sd(opt2)
        if hasattr(opt2, "finish"):
            opt2.finish()
        want = "different runs"
    else:
        for t in range(6, 8):
            train_step(ddp, opt, *batch(r, t))
        other = _opt_sd(opt)
        want = "different points"
    problems = []
    if _own(kind, sd).get("run") is None:
        problems.append("the checkpoint names no run")
    if r == last:
        sd = other
    before = _snapshot(model, opt)
    outcome = load_outcome(opt, sd, catch=ValueError)
    outcomes = _gathered(outcome)
    if any(o == "accepted" for o in outcomes):
        problems.append(f"accepted on some rank: {outcomes}")
    elif want not in outcome:
        problems.append(f"the message does not say {want!r}: {outcome}")
    problems += _diff(before, _snapshot(model, opt))
    for t in range(8, 11):   # training goes on, in step on every rank
        train_step(ddp, opt, *batch(r, t))
    if hasattr(opt, "finish"):
        opt.finish()
    problems += [f"param {j} differs across ranks" for j, p in enumerate(model.parameters())
                 if not same_on_all_ranks(p)]
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.parametrize("kind", ["compressed", "co2", "mkor"])
def test_a_resumed_run_goes_on_under_the_saved_run_id(world, kind):
    """The run ids are the same on every rank and differ between runs; a run resumed from its files takes
    their id, so its later files pair with the earlier ones (and with a third run's they do not)."""
    r = world.rank
    _, ddp, opt = _build(kind)
    for t in range(4):
        train_step(ddp, opt, *batch(r, t))
    sd = _opt_sd(opt)
    _, ddp2, opt2 = _build(kind)
    fresh = _own(kind, _opt_sd(opt2))["run"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2.load_state_dict(sd)
    resumed = _own(kind, _opt_sd(opt2))["run"]
    for o in (opt, opt2):
        if hasattr(o, "finish"):
            o.finish()
    runs = _gathered((_own(kind, sd)["run"], fresh, resumed))
    problems = []
    if any(x != runs[0] for x in runs):
        problems.append(f"the run ids differ between ranks: {runs}")
    saved, fresh, resumed = runs[0]
    if not (isinstance(saved, str) and saved != fresh and resumed == saved):
        problems.append(f"saved {saved}, a new run's {fresh}, after the resume {resumed}")
    assert all_ranks_true(not problems), f"rank {r}: {problems}"
