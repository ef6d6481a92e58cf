"""MKOR on n ranks (gloo; run at 2 and 4): replicated factors, one all-reduce of Σ(d_in + d_out)
values per update averaged exactly once, composition with CompressedOptimizer, checkpoints, and
configuration errors raised on every rank (SPEC §7)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from commopt.optim.mkor import MKOR
from mpi_helpers import MLP, all_ranks_true, batch, load_outcome, make_mlp_ddp, roundtrip, same_on_all_ranks

F64 = torch.float64
SIZES = (32, 16, 16, 8)


def _factors_identical(opt) -> list[str]:
    bad = []
    for name, (left, right) in opt.factors().items():  # same layer order on every rank
        if not same_on_all_ranks(left) or not same_on_all_ranks(right):
            bad.append(name)
    return bad


def _step(ddp, opt, x, y, **kw):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step(**kw)
    return loss.detach()


@pytest.mark.parametrize("rule", ["shrink", "ema"])
@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_factors_bitwise_identical_and_statistics_are_the_true_mean(world, rule):
    r, n = world.rank, world.size
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
    opt = MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), rule=rule, update_every=2)
    seen = []
    average = opt._average

    def spy(buf):
        local = buf.clone()
        out = average(buf)
        seen.append((local, out.clone()))
        return out

    opt._average = spy
    problems = []
    for t in range(6):
        _step(ddp, opt, *batch(r, t, dtype=F64))
        problems += [f"step {t}: factors of {b}" for b in _factors_identical(opt)]
    assert len(seen) == 3
    for local, avg in seen:
        gathered = [torch.empty_like(local) for _ in range(n)]
        dist.all_gather(gathered, local)
        mean = torch.stack(gathered).sum(0) / n
        if not torch.allclose(avg, mean, rtol=1e-13, atol=1e-15):
            problems.append(f"all-reduced statistics differ from the mean by {float((avg - mean).abs().max()):.2e}")
        if not same_on_all_ranks(avg):
            problems.append("all-reduced statistics differ across ranks")
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_one_allreduce_of_sum_din_plus_dout_values_per_update(world, monkeypatch):
    """DDP's own all-reduce runs in C++; every Python-level all_reduce here is MKOR's."""
    r = world.rank
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
    opt = MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05), update_every=3)
    expected = sum(a + b for a, b in zip(SIZES[:-1], SIZES[1:]))  # (32+16) + (16+16) + (16+8) = 104
    assert opt.statistics_size() == expected == 104
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    for t in range(10):
        _step(ddp, opt, *batch(r, t, dtype=F64))
    monkeypatch.undo()
    assert calls == [expected] * 4  # steps 0, 3, 6, 9
    st = opt.comm_stats()
    assert (st["updates"], st["allreduce_calls"], st["values"], st["values_per_update"]) == (4, 4, 4 * expected, expected)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_ddp_on_n_ranks_equals_one_process_on_the_concatenated_batch(world):
    """Statistics averaged exactly once: ā and ḡ of the rank means equal the big batch's (the
    released code's double averaging would shrink ḡ by 1/n and break this)."""
    r, n = world.rank, world.size
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
    opt = MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=2)
    torch.manual_seed(0)
    ref = MLP(SIZES, F64)  # every rank runs the same single-process reference on all ranks' data
    ref_opt = MKOR(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), update_every=2)
    for t in range(8):
        _step(ddp, opt, *batch(r, t, dtype=F64))
        xs, ys = zip(*(batch(q, t, dtype=F64) for q in range(n)))
        _step(ref, ref_opt, torch.cat(xs), torch.cat(ys))
    with torch.no_grad():
        worst = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
    worst_f = max(float((a - b).abs().max()) for k in opt.factors()
                  for a, b in zip(opt.factors()[k], ref_opt.factors()[k]))
    assert all_ranks_true(worst < 1e-10 and worst_f < 1e-10), f"rank {r}: params {worst:.2e}, factors {worst_f:.2e}"


def _compressed(nesting: str):
    """(model, ddp, the optimizer the loop steps, the MKOR, the CompressedOptimizer)."""
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64, bucket_cap_mb=0.005)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if nesting == "mkor_outside":
        comp = commopt.CompressedOptimizer(ddp, sgd, compressor="topk:0.1", feedback="econtrol")
        mk = MKOR(ddp, comp, update_every=2)
        return model, ddp, mk, mk, comp
    mk = MKOR(ddp, sgd, update_every=2)
    comp = commopt.CompressedOptimizer(ddp, mk, compressor="topk:0.1", feedback="econtrol")
    return model, ddp, comp, mk, comp


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_composes_with_compressed_optimizer_in_either_nesting(world):
    """Compressed exchange + MKOR preconditioning in one loop: both nestings give the same iterates
    bitwise; factors and parameters stay bitwise identical across ranks; the loss goes down."""
    r = world.rank
    runs = {}
    for nesting in ("mkor_outside", "mkor_inside"):
        model, ddp, opt, mk, comp = _compressed(nesting)
        losses = []
        for t in range(16):
            loss = _step(ddp, opt, *batch(r, t % 4, dtype=F64))
            dist.all_reduce(loss)  # the ranks' targets differ: follow the global loss
            losses.append(float(loss) / world.size)
        problems = _factors_identical(mk) + [f"param {j}" for j, p in enumerate(model.parameters())
                                             if not same_on_all_ranks(p)]
        if comp.comm_stats()["compressed_rounds"] == 0 or mk.comm_stats()["allreduce_calls"] != 8:
            problems.append(f"collectives: {comp.comm_stats()}, {mk.comm_stats()}")
        if not sum(losses[-4:]) < 0.9 * sum(losses[:4]):  # the same 4 batches, cycled
            problems.append(f"losses {losses}")
        assert all_ranks_true(not problems), f"rank {r} ({nesting}): {problems}"
        runs[nesting] = [p.detach().clone() for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(runs["mkor_outside"], runs["mkor_inside"]))
    assert all_ranks_true(same), f"rank {r}: the two nestings differ"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("hybrid,nesting", [(False, "mkor_outside"), (True, "mkor_outside"), (False, "mkor_inside")])
def test_checkpoint_resume_is_identical(world, hybrid, nesting):
    """MKOR(ddp, CompressedOptimizer(ddp, SGD)) (and the other nesting) saved per rank mid-run (between
    updates), loaded into fresh objects: the continued run equals the uninterrupted one bitwise
    (params and factors). The checkpoint keeps both wrappers' own state, each under its own key."""
    r = world.rank

    def build():
        torch.manual_seed(0)
        model = MLP(sizes=SIZES, dtype=F64)
        ddp = DDP(model)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if nesting == "mkor_outside":
            mk = opt = MKOR(ddp, commopt.CompressedOptimizer(ddp, sgd, compressor="topk:0.1", feedback="econtrol"),
                            update_every=3, hybrid=hybrid, knee_min_updates=2)
        else:
            mk = MKOR(ddp, sgd, update_every=3, hybrid=hybrid, knee_min_updates=2)
            opt = commopt.CompressedOptimizer(ddp, mk, compressor="topk:0.1", feedback="econtrol")
        return model, ddp, opt, mk

    kw = lambda loss: {"loss": loss} if hybrid else {}  # noqa: E731

    def run(model, ddp, opt, steps):
        for t in steps:
            x, y = batch(r, t, dtype=F64)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step(**kw(loss))

    model, ddp, opt, mk = build()
    run(model, ddp, opt, range(7))
    sd = opt.state_dict()
    # torch.optim's shape, with MKOR's part and the CompressedOptimizer's side by side under their own keys
    assert {"state", "param_groups", "mkor", "commopt"} <= set(sd) and sd["mkor"]["steps"] == 7, sorted(sd)
    ckpt = roundtrip({"model": model.state_dict(), "opt": sd})
    run(model, ddp, opt, range(7, 14))
    model2, ddp2, opt2, mk2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert mk2.state_dict()["mkor"]["steps"] == 7
    run(model2, ddp2, opt2, range(7, 14))
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    same_f = all(torch.equal(a, b) for k in mk.factors() for a, b in zip(mk.factors()[k], mk2.factors()[k]))
    comp, comp2 = (opt, opt2) if nesting == "mkor_inside" else (opt.optimizer, opt2.optimizer)
    same_c = comp.comm_stats()["steps"] == comp2.comm_stats()["steps"]
    assert all_ranks_true(same and same_f and same_c), \
        f"rank {r}: resumed params equal {same}, factors equal {same_f}, compressed steps equal {same_c}"
    assert mk2.state_dict()["mkor"]["steps"] == 14


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_mkor_part_refused_on_one_rank_raises_on_every_rank_and_changes_nothing(world):
    """Over a CompressedOptimizer (a collective load) a bad MKOR part on one rank must not leave the
    other ranks waiting: every rank raises, and no rank's state changes."""
    r = world.rank
    model, ddp, opt, mk, comp = _compressed("mkor_outside")
    for t in range(3):
        _step(ddp, opt, *batch(r, t, dtype=F64))
    good = roundtrip(opt.state_dict())
    for t in range(3, 5):
        _step(ddp, opt, *batch(r, t, dtype=F64))
    before = roundtrip(opt.state_dict())
    bad = roundtrip(good)
    if r == 1:
        bad["mkor"]["factors"]["layers.0"]["left"] = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="factor shapes" if r == 1 else r"refused on rank\(s\) \[1\]"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    unchanged = (after["mkor"]["steps"] == before["mkor"]["steps"] == 5
                 and all(torch.equal(after["state"][k]["momentum_buffer"], before["state"][k]["momentum_buffer"])
                         for k in before["state"]))
    assert all_ranks_true(unchanged), f"rank {r}: state changed by a refused load"
    opt.load_state_dict(good)  # and a good checkpoint loads afterwards
    assert opt.state_dict()["mkor"]["steps"] == 3


def _same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_tree, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("nesting,damage", [
    ("plain", "bad_factor"), ("plain", "no_mkor_entry"), ("plain", "other_step"),
    ("mkor_outside", "no_mkor_entry"), ("mkor_outside", "other_step"),
    ("mkor_inside", "bad_factor"), ("mkor_inside", "other_step")])
def test_damaged_mkor_dict_on_the_last_rank_is_refused_on_every_rank(world, nesting, damage):
    """MKOR(ddp, AdamW), MKOR(ddp, CompressedOptimizer(...)) and CompressedOptimizer(ddp, MKOR(...)) (whose
    agreement MKOR must not duplicate: no collective of its own inside it) with the last rank's dict
    damaged (a factor of the wrong shape, no 'mkor' entry, the whole dict from another step): every rank
    raises, the damaged rank is named, nothing changes, training goes on in step, a good dict loads."""
    r, last = world.rank, world.size - 1
    if nesting == "plain":
        model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
        opt = mk = MKOR(ddp, torch.optim.AdamW(model.parameters(), lr=1e-3), update_every=2)
    else:
        model, ddp, opt, mk, _ = _compressed(nesting)
    for t in range(3):
        _step(ddp, opt, *batch(r, t, dtype=F64))
    early = roundtrip(opt.state_dict())
    for t in range(3, 5):
        _step(ddp, opt, *batch(r, t, dtype=F64))
    good = roundtrip(opt.state_dict())
    bad = roundtrip(good)
    if r == last:
        if damage == "bad_factor":
            bad["mkor"]["factors"][mk.layer_names[0]]["left"] = torch.eye(3, dtype=F64)
        elif damage == "no_mkor_entry":
            del bad["mkor"]
        else:
            bad = early
    before = roundtrip(opt.state_dict())
    outcome = load_outcome(opt, bad, catch=ValueError)
    outcomes = [None] * world.size
    dist.all_gather_object(outcomes, outcome)
    problems = []
    if "accepted" in outcomes:
        problems.append(f"accepted on some rank(s): {outcomes}")
    elif r != last and f"rank {last}" not in outcome:
        problems.append(f"the damaged rank is not named: {outcome}")
    if not _same_tree(before, roundtrip(opt.state_dict())):
        problems.append("a refused load changed the optimizer's state")
    for t in range(5, 8):   # the ranks' collectives still line up
        _step(ddp, opt, *batch(r, t, dtype=F64))
    problems += [f"param {j} differs across ranks" for j, p in enumerate(model.parameters())
                 if not same_on_all_ranks(p)] + _factors_identical(mk)
    opt.load_state_dict(good)
    if mk.state_dict()["mkor"]["steps"] != 5:
        problems.append(f"the good dict resumed at MKOR step {mk.state_dict()['mkor']['steps']}")
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_dcp_state_dict_on_every_rank_leaves_mkor_and_the_run_unchanged(world):
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict on every rank of a DDP run
    (stateless SGD, no gradients, at a step where MKOR would update: its _init_optim_state steps
    the optimizer with zero gradients and lr 0): MKOR's factors and counters stay as they were, no
    collective is started, and the run continues bitwise as without the call. A checkpoint through
    get/set_optimizer_state_dict plus preconditioner_state_dict() resumes the run (to 1e-12: a fresh
    DDP's buckets sum in another order than the rebuilt ones of the uninterrupted run on > 2 ranks,
    as for plain SGD)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    r = world.rank

    def build():
        torch.manual_seed(0)
        model = MLP(sizes=SIZES, dtype=F64)
        ddp = DDP(model)
        return model, ddp, MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05), rule="ema", update_every=2,
                                hybrid=True, knee_min_updates=2)

    def run(model, ddp, opt, steps):
        for t in steps:
            x, y = batch(r, t, dtype=F64)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step(loss=loss)
        opt.zero_grad()

    ref_model, ref_ddp, ref_opt = build()
    run(ref_model, ref_ddp, ref_opt, range(8))
    model, ddp, opt = build()
    run(model, ddp, opt, range(4))
    comm = opt.comm_stats()
    osd = dcp.get_optimizer_state_dict(ddp, opt)
    mk = roundtrip(opt.preconditioner_state_dict())
    problems = []
    if opt.comm_stats() != comm or mk["steps"] != 4:
        problems.append(f"MKOR's counters moved: {comm} -> {opt.comm_stats()}, steps {mk['steps']}")
    ck = roundtrip({"model": model.state_dict(), "optim": osd, "mkor": mk})
    run(model, ddp, opt, range(4, 8))
    if not all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters())):
        problems.append("the run after get_optimizer_state_dict differs")
    model2, ddp2, opt2 = build()
    model2.load_state_dict(ck["model"])
    with pytest.warns(UserWarning, match="no 'mkor' entry"):
        dcp.set_optimizer_state_dict(ddp2, opt2, ck["optim"])
    opt2.load_preconditioner_state_dict(ck["mkor"])
    run(model2, ddp2, opt2, range(4, 8))
    with torch.no_grad():
        worst = max(float((a - b).abs().max()) for a, b in zip(model2.parameters(), ref_model.parameters()))
    if worst > 1e-12 or opt2.comm_stats() != ref_opt.comm_stats():
        problems.append(f"the resumed run differs: params by {worst:.2e}, "
                        f"{opt2.comm_stats()} vs {ref_opt.comm_stats()}")
    problems += [f"factors of {b}" for b in _factors_identical(opt2)]
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_mkor_h_switches_at_the_same_step_on_every_rank(world):
    """Ranks see different losses; the switch uses the all-reduced window loss (one extra value in
    the same collective), so every rank switches at the same step."""
    r = world.rank
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
    opt = MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), update_every=2, hybrid=True,
               knee_min_updates=2, knee_beta=0.3)
    assert opt.statistics_size() == 105
    for t in range(60):
        x, y = batch(0, t % 4, dtype=F64)
        _step(ddp, opt, x, y + 0.1 * r, loss=None if opt.switched else torch.nn.functional.mse_loss(ddp(x), y))
    step = torch.tensor([opt.switch_step if opt.switched else -1], dtype=torch.int64)
    assert opt.switched and same_on_all_ranks(step), f"rank {r}: switch step {opt.switch_step}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_bad_setting_on_one_rank_raises_on_every_rank(world):
    r = world.rank
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=F64)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"factor_momentum|rank 1"):
        MKOR(ddp, sgd, factor_momentum=1.5 if r == 1 else 0.95)
    with pytest.raises(ValueError, match="configured differently"):
        MKOR(ddp, sgd, update_every=5 if r == 0 else 10)
    with pytest.raises(ValueError, match="configured differently"):
        MKOR(ddp, sgd, skip=["layers.2"] if r == 0 else ())
    opt = MKOR(ddp, sgd)  # and a correct construction still works afterwards
    _step(ddp, opt, *batch(r, 0, dtype=F64))
    assert _factors_identical(opt) == []
