"""CO2 (SPEC §6) in one process, plus a checkpoint test that resumes in fresh spawned processes.

Without ``torch.distributed`` CO2 runs over one rank (the outer exchange is the
identity), which is enough for construction errors, penalties, clipping, the
link-delay model and the wait counter, memory accounting and checkpoints. The
multi-rank exact checks live in tests/mpi/test_co2_mpi.py; the fresh-process
resumption runs 2 gloo ranks spawned with ``torch.multiprocessing``.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from commopt.optim.co2 import CO2, local_gradients_hook
from commopt.outer import AdaptivePenalty, ConstantPenalty, NoPenalty, OuterExchange, make_penalty


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net(seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def batch(rank: int, step: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 5, generator=g, dtype=dtype)
    return x, x.sum(dim=1, keepdim=True).sin() * (1 + rank)


def run(model, opt, steps: int, rank: int = 0, start: int = 0, each=None, dtype=torch.float64):
    for step in range(start, start + steps):
        x, y = batch(rank, step, dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if each is not None:
            each(opt)
    return [p.detach().clone() for p in model.parameters()]


def eval_loss(model) -> float:
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in map(lambda s: batch(0, s),
                                                                                       range(500, 510))) / 10


def sgd(model, lr=0.05, momentum=0.0):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


# -- construction --------------------------------------------------------------------------------------
BAD = [
    (dict(tau=0), "tau"), (dict(tau=-1), "tau"), (dict(tau=1.5), "tau"), (dict(tau=True), "tau"),
    (dict(outer_momentum=-0.1), "outer_momentum"), (dict(outer_momentum=1.0), "outer_momentum"),
    (dict(outer_momentum=float("nan")), "outer_momentum"),
    (dict(outer_lr=0.0), "outer_lr"), (dict(outer_lr=-1.0), "outer_lr"), (dict(outer_lr=float("inf")), "outer_lr"),
    (dict(clip=0.0), "clip"), (dict(clip=-1.0), "clip"), (dict(clip="big"), "clip"),
    (dict(variant="lazy"), "variant"), (dict(overlap=1), "overlap"),
    (dict(penalty=0.0), "lambda"), (dict(penalty=-2.0), "lambda"), (dict(penalty="bogus"), "unknown penalty"),
    (dict(penalty="adaptive:-1"), "strength"), (dict(link_delay=-0.5), "link_delay"),
    (dict(check_every=-1), "check_every"), (dict(buffer_dtype=torch.int32), "buffer_dtype"),
    (dict(compressor="scaled_randk:0.1", feedback="ef21"), "not contractive"),
    (dict(compressor="topk:2.0"), "ratio"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs,match", BAD,
                         ids=[f"{k}={v!r}" for (d, _) in BAD for k, v in d.items() if k != "feedback"])
def test_construction_rejects_bad_settings(kwargs, match):
    model = net()
    with pytest.raises(ValueError, match=match):
        CO2(model, sgd(model), **kwargs)


@pytest.mark.timeout(30)
def test_construction_rejects_an_inner_optimizer_that_does_not_own_the_model():
    model, other = net(), net(1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        CO2(model, sgd(other))
    with pytest.raises(ValueError, match="does not own the model's trainable parameter"):
        CO2(model, torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CO2(model, object())
    with pytest.raises(TypeError, match="nn.Module"):
        CO2([p for p in model.parameters()], sgd(model))
    # frozen parameters may stay outside the inner optimizer
    model[0].weight.requires_grad_(False)
    CO2(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))


@pytest.mark.timeout(30)
def test_defaults():
    model = net()
    opt = CO2(model, sgd(model))
    assert (opt.tau, opt.outer_lr, opt.outer_momentum, opt.clip, opt.variant, opt.overlap, opt.nesterov) == \
        (12, 1.0, 0.5, 1.0, "eager", True, False)
    assert isinstance(opt.penalty, AdaptivePenalty)
    assert CO2(model, sgd(model), variant="delayed").outer_momentum == 0.0
    assert CO2(model, sgd(model), variant="delayed", outer_momentum=0.3).outer_momentum == 0.3


# -- penalties ------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_penalty_factors():
    delta = torch.tensor([3.0, 4.0], dtype=torch.float64)      # ‖Δ̄‖ = 5
    zero = torch.zeros((), dtype=torch.float64)
    assert NoPenalty().factor(delta, zero) == 1.0
    assert ConstantPenalty(4.0).factor(delta, zero) == 0.25
    assert float(AdaptivePenalty().factor(delta, zero)) == 1.0   # nothing stale: exactly no penalty
    assert float(AdaptivePenalty().factor(delta, torch.tensor(5.0, dtype=torch.float64))) == 0.5
    assert float(AdaptivePenalty(2.0).factor(delta, torch.tensor(2.5, dtype=torch.float64))) == 0.5
    assert float(AdaptivePenalty().factor(torch.zeros(2), torch.tensor(1.0))) == pytest.approx(0.0, abs=1e-30)
    assert isinstance(make_penalty(None), NoPenalty) and isinstance(make_penalty("none"), NoPenalty)
    assert make_penalty(2).lam == 2.0 and make_penalty("constant:3").lam == 3.0
    assert make_penalty("adaptive").strength == 1.0 and make_penalty("adaptive:0.5").strength == 0.5
    for bad in ("adaptive:x", "constant:0", "none:1"):
        with pytest.raises(ValueError):
            make_penalty(bad)
    for bad in (True, [2.0]):
        with pytest.raises(TypeError):
            make_penalty(bad)


# -- the update rule -------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_blocking_tau1_is_sgd_and_blocking_rounds_apply_the_mean_progress():
    a, b = net(), net()
    got = run(a, CO2(a, sgd(a, 0.1), tau=1, outer_momentum=0.0, clip=None, overlap=False), 6)
    ref = run(b, sgd(b, 0.1), 6)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.timeout(30)
def test_outer_momentum_is_clipped_elementwise():
    model, phi = net(), 0.01
    opt = CO2(model, sgd(model, 0.2), tau=2, outer_momentum=0.9, clip=phi, penalty=None)
    peaks = []
    run(model, opt, 30, each=lambda o: peaks.append(max(float(m.abs().max()) for m in o.momentum())))
    assert max(peaks) <= phi and max(peaks) == pytest.approx(phi)
    free = net()
    opt = CO2(free, sgd(free, 0.2), tau=2, outer_momentum=0.9, clip=None, penalty=None)
    run(free, opt, 30)
    assert max(float(m.abs().max()) for m in opt.momentum()) > phi   # so the clamp above was doing work


@pytest.mark.timeout(30)
@pytest.mark.parametrize("variant", ["eager", "delayed"])
def test_iterates_do_not_depend_on_the_link_delay(variant):
    runs = []
    for delay in (0.0, 0.02):
        model = net()
        runs.append(run(model, CO2(model, sgd(model), tau=2, variant=variant, link_delay=delay), 9))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.timeout(30)
def test_one_exchange_in_flight_at_most():
    model = net()
    opt = CO2(model, sgd(model), tau=2)
    seen = []
    run(model, opt, 11, each=lambda o: seen.append(o.exchange.in_flight))
    assert max(seen) == 1 and opt.comm_stats()["max_in_flight"] == 1
    assert opt.comm_stats()["launches"] == 5 and opt.comm_stats()["waits"] == 4
    ex = OuterExchange(4, torch.float32, torch.device("cpu"), use_dist=False)
    ex.launch(0)
    with pytest.raises(RuntimeError, match="already in flight"):
        ex.launch(1)
    ex.wait()
    with pytest.raises(RuntimeError, match="nothing in flight"):
        ex.wait()


# -- overlap: the wait counter -------------------------------------------------------------------------------
def waited(compute: float, steps: int, **kw) -> float:
    model = net()
    opt = CO2(model, sgd(model), **kw)
    run(model, opt, steps, each=lambda o: time.sleep(compute))   # emulated compute c per step
    return opt.wait_seconds


@pytest.mark.timeout(60)
def test_overlap_hides_the_link_delay_while_tau_c_covers_it():
    """D = 40 ms, c = 12 ms: CO2 with τ = 4 (τc ≥ D) waits ~nothing; blocking local SGD pays D per round,
    τ = 1 blocking (= DDP + SGD) pays D per step; with τ = 2 (τc < D) CO2 pays max(0, D − τc) per round."""
    delay, c, steps = 0.04, 0.012, 12
    co2 = waited(c, steps, tau=4, link_delay=delay)
    assert co2 <= 0.1 * steps * c                               # time per step within 1.1x of the no-delay one
    blocking = waited(c, steps, tau=4, overlap=False, link_delay=delay)
    assert blocking >= 0.9 * (steps // 4) * delay
    ddp_like = waited(c, steps, tau=1, overlap=False, outer_momentum=0.0, link_delay=delay)
    assert ddp_like >= 0.9 * steps * delay
    short = waited(c, steps, tau=2, link_delay=delay)           # 5 waits of at most D − 2c = 16 ms each
    assert 0.25 * 5 * (delay - 2 * c) <= short <= 5 * (delay - 2 * c) + 0.02


# -- memory ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_memory_copies():
    model = net(dtype=torch.float32)
    size = sum(p.numel() for p in model.parameters()) * 4
    eager = CO2(model, sgd(model)).memory_bytes()
    assert eager["total"] == 4 * size and eager["start"] == size
    assert CO2(model, sgd(model), variant="delayed").memory_bytes()["total"] == 3 * size
    assert CO2(model, sgd(model), overlap=False).memory_bytes()["total"] == 3 * size
    half = CO2(model, sgd(model), buffer_dtype=torch.bfloat16)
    assert half.memory_bytes()["send_buffer"] == size // 2 and half.exchange.buffer.dtype == torch.bfloat16
    cpu = CO2(model, sgd(model), state_device="cpu")
    assert all(t.device.type == "cpu" for t in cpu.anchor() + cpu.momentum())
    comp = CO2(model, sgd(model), compressor="topk:0.1", feedback="econtrol").memory_bytes()
    assert comp["feedback_state"] == 3 * size
    assert CO2(model, sgd(model), compressor="topk:0.1").memory_bytes()["feedback_state"] == size   # EF14: e_i


@pytest.mark.timeout(30)
def test_bf16_send_buffer_and_compression_still_train():
    for kw in (dict(buffer_dtype=torch.bfloat16), dict(compressor="topk:0.2"),
               dict(compressor="topk:0.2", feedback="econtrol"),
               dict(compressor="topk:0.3", buffer_dtype=torch.bfloat16), dict(compressor="randk:0.5", feedback=None)):
        model = net()
        before = eval_loss(model)
        opt = CO2(model, sgd(model, 0.1), tau=3, **kw)
        run(model, opt, 90)
        opt.finish()
        assert eval_loss(model) < 0.7 * before, kw


# -- drop-in behaviour --------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_lr_scheduler_acts_on_the_inner_optimizer():
    model = net()
    inner = sgd(model, 0.1)
    opt = CO2(model, inner, tau=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(model, opt, 1)
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.timeout(30)
def test_finish_brings_the_model_to_the_anchor_and_training_continues():
    model = net()
    opt = CO2(model, sgd(model), tau=3)
    run(model, opt, 7)
    assert opt.exchange.pending and opt.position == 1
    opt.finish()
    assert not opt.exchange.pending and opt.position == 0
    assert all(torch.equal(p.detach(), a) for p, a in zip(model.parameters(), opt.anchor()))
    run(model, opt, 7, start=7)
    assert opt.comm_stats()["max_in_flight"] == 1


@pytest.mark.timeout(30)
def test_local_gradients_hook_returns_the_local_bucket_unchanged():
    class Bucket:
        def __init__(self, t):
            self.t = t

        def buffer(self):
            return self.t

    t = torch.arange(4.0)
    fut = local_gradients_hook(None, Bucket(t))
    assert fut.wait() is t and torch.equal(t, torch.arange(4.0))


# -- checkpoints ---------------------------------------------------------------------------------------------------
CKPT_CASES = {
    "eager-dense": dict(tau=3),
    "delayed-topk-econtrol-nesterov": dict(tau=3, variant="delayed", nesterov=True, outer_momentum=0.3,
                                           compressor="topk:0.3", feedback="econtrol", penalty=2.0),
    "eager-bf16-buffer": dict(tau=3, buffer_dtype=torch.bfloat16, outer_momentum=0.7),
}
SAVE_AT = (2, 4, 6)    # mid-round 0 (nothing in flight), mid-round 1 (in flight), at a round end (in flight)
TOTAL = 11


def build(kw: dict, seed: int = 0):
    model = net(seed, torch.float32)
    return model, CO2(model, sgd(model, 0.05, 0.9), **kw)


@pytest.mark.timeout(30)
def test_checkpoint_mid_round_and_mid_flight_single_process(tmp_path):
    for name, kw in CKPT_CASES.items():
        model, opt = build(kw)
        ref = run(model, opt, TOTAL, dtype=torch.float32)
        for k in SAVE_AT:
            model, opt = build(kw)
            run(model, opt, k, dtype=torch.float32)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
            fresh, fresh_opt = build(kw, seed=5)
            ck = torch.load(tmp_path / "ck.pt")
            fresh.load_state_dict(ck["model"])
            fresh_opt.load_state_dict(ck["opt"])
            got = run(fresh, fresh_opt, TOTAL - k, start=k, dtype=torch.float32)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (name, k)


@pytest.mark.timeout(30)
def test_load_state_dict_refuses_mismatches():
    model, opt = build(dict(tau=3))
    run(model, opt, 4, dtype=torch.float32)
    sd = opt.state_dict()
    _, other = build(dict(tau=4))
    with pytest.raises(ValueError, match="tau"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        other.load_state_dict({"co2": sd["commopt"]})
    _, comp = build(dict(tau=3, compressor="topk:0.5"))
    with pytest.raises(ValueError, match="exchange"):
        comp.load_state_dict(sd)


def _ckpt_worker(rank: int, world: int, store: str, out: str, phase: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    opened = []  # every optimizer made here: their in-flight all-reduces are drained before the group goes

    def make(kw, **more):  # build() that records what it builds
        model, opt = build(kw, **more)
        opened.append(opt)
        return model, opt

    try:
        for name, kw in CKPT_CASES.items():
            if phase == "save":
                model, opt = build(kw)
                ref = run(model, opt, TOTAL, rank=rank, dtype=torch.float32)
                torch.save(ref, os.path.join(out, f"{name}-ref-{rank}.pt"))
                model, opt = build(kw)
                for step in range(max(SAVE_AT)):
                    run(model, opt, 1, rank=rank, start=step, dtype=torch.float32)
                    if step + 1 in SAVE_AT:
                        meta = (opt.round, opt.position, opt.exchange.in_flight)
                        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "meta": meta},
                                   os.path.join(out, f"{name}-{step + 1}-{rank}.pt"))
            else:
                ref = torch.load(os.path.join(out, f"{name}-ref-{rank}.pt"))
                for k in SAVE_AT:
                    ck = torch.load(os.path.join(out, f"{name}-{k}-{rank}.pt"))
                    model, opt = build(kw, seed=7)             # a different start: everything must come from the files
                    model.load_state_dict(ck["model"])
                    opt.load_state_dict(ck["opt"])
                    got = run(model, opt, TOTAL - k, rank=rank, start=k, dtype=torch.float32)
                    same = all(torch.equal(a, b) for a, b in zip(got, ref))
                    torch.save({"same": same, "meta": ck["meta"]}, os.path.join(out, f"{name}-{k}-{rank}.result"))
    finally:
        for opt in opened:  # destroying a gloo group with work in flight aborts the process
            if opt.exchange.pending:
                opt.exchange.wait()
        opened.clear()
        gc.collect()    # no optimizer (or work handle) outlives the group it refers to
        dist.barrier()  # no rank tears down its end of the connections while a peer still uses them
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_checkpoint_mid_round_and_mid_flight_resumes_in_fresh_processes(tmp_path):
    """2 gloo ranks train and save per-rank checkpoints; two *new* processes load them and continue:
    the iterates equal an uninterrupted run's, bitwise."""
    world = 2
    for phase in ("save", "resume"):
        store = tmp_path / f"store-{phase}"
        mp.start_processes(_ckpt_worker, args=(world, str(store), str(tmp_path), phase), nprocs=world,
                           start_method="spawn")
    for name in CKPT_CASES:
        for k in SAVE_AT:
            for rank in range(world):
                res = torch.load(tmp_path / f"{name}-{k}-{rank}.result")
                rounds, position, in_flight = res["meta"]
                assert (position, in_flight) == {2: (2, 0), 4: (1, 1), 6: (0, 1)}[k], (name, k)
                assert res["same"], (name, k, rank)


@pytest.mark.timeout(30)
def test_non_finite_inputs_are_rejected_early():
    model = net()
    with pytest.raises(ValueError, match="finite"):
        CO2(model, sgd(model), outer_lr=math.nan)


# -- checkpoints in torch.optim's shape, atomic loads -----------------------------------------------------------
def snapshot(model, opt) -> dict:
    """Everything a load could change, cloned (without calling state_dict(), which settles the exchange)."""
    ex = opt.exchange
    return {"theta": opt._theta.clone(), "m": opt._m.clone(), "s": None if opt._s is None else opt._s.clone(),
            "gap": opt._gap.clone(), "counters": (opt._round, opt._pos, opt._steps),
            "slots": {k: v.clone() for k, v in ex.slots.items()}, "pending": ex.pending,
            "result": None if ex._result is None else ex._result[0].clone(), "buffer": ex.buffer.clone(),
            "inner": copy.deepcopy(opt.optimizer.state_dict()),
            "params": [p.detach().clone() for p in model.parameters()]}


def same_snapshot(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return eq(a, b)


@pytest.mark.timeout(30)
def test_state_dict_has_torch_optims_shape_and_the_legacy_layout_still_loads():
    kw = dict(tau=3, compressor="topk:0.3")
    model, opt = build(kw)
    ref = run(model, opt, TOTAL, dtype=torch.float32)
    model, opt = build(kw)
    run(model, opt, 4, dtype=torch.float32)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "commopt"} and CO2.state_key == "commopt"
    assert sd["commopt"]["position"] == 1 and sd["commopt"]["exchange"]["completed"] is not None
    plain = sgd(net(0, torch.float32), 0.05, 0.9)       # the top level is a plain torch.optim state_dict
    plain.load_state_dict({k: sd[k] for k in ("state", "param_groups")})
    legacy = {"optimizer": {k: sd[k] for k in ("state", "param_groups")}, "co2": sd["commopt"]}
    for ck in (sd, legacy):
        fresh, fresh_opt = build(kw, seed=5)
        fresh.load_state_dict(model.state_dict())
        fresh_opt.load_state_dict(copy.deepcopy(ck))
        got = run(fresh, fresh_opt, TOTAL - 4, start=4, dtype=torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # the optimizer state-dict hooks run around it, as in torch
    seen = []
    opt.register_state_dict_post_hook(lambda o, d: seen.append(sorted(d)))
    opt.register_load_state_dict_pre_hook(lambda o, d: seen.append("pre-load"))
    opt.load_state_dict(opt.state_dict())
    assert seen == [["commopt", "param_groups", "state"], "pre-load"]


def _corrupt(sd: dict, how: str) -> dict:
    sd = copy.deepcopy(sd)
    own = sd["commopt"]
    if how == "momentum size":
        own["momentum"] = own["momentum"][:-1]
    elif how == "gap size":
        own["gap"] = torch.zeros(1)
    elif how == "start missing":
        own["start"] = None
    elif how == "feedback slot size":
        own["exchange"]["slots"] = {k: v[:3] for k, v in own["exchange"]["slots"].items()}
    elif how == "completed size":
        own["exchange"]["completed"]["total"] = own["exchange"]["completed"]["total"][:2]
    elif how == "position":
        own["position"] = 3
    elif how == "version":
        own["version"] = 99
    elif how == "inner groups":
        sd["param_groups"] = sd["param_groups"] + sd["param_groups"]
    return sd


CORRUPT = ["momentum size", "gap size", "start missing", "feedback slot size", "completed size", "position",
           "version", "inner groups"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", CORRUPT)
def test_a_refused_checkpoint_leaves_everything_as_it_was(how):
    kw = dict(tau=3, compressor="topk:0.3")
    src_model, src = build(kw)
    run(src_model, src, 7, dtype=torch.float32)                  # mid-round, a result in flight, EF14 state
    bad = _corrupt(src.state_dict(), how)
    model, opt = build(kw, seed=3)
    run(model, opt, 5, dtype=torch.float32)                      # a live optimizer with its own state
    before = snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert same_snapshot(before, snapshot(model, opt)), how
    # and it trains on exactly like an untouched twin
    twin_model, twin = build(kw, seed=3)
    run(twin_model, twin, 5, dtype=torch.float32)
    a = run(model, opt, 4, start=5, dtype=torch.float32)
    b = run(twin_model, twin, 4, start=5, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.timeout(60)
def test_an_inner_optimizer_that_refuses_its_state_is_restored():
    kw = dict(tau=3)
    src_model, src = build(kw)
    run(src_model, src, 4, dtype=torch.float32)
    model, opt = build(kw, seed=3)
    run(model, opt, 2, dtype=torch.float32)
    before = snapshot(model, opt)
    bad = _corrupt(src.state_dict(), "inner groups")             # CO2's part is fine, torch refuses its part
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(bad)
    assert same_snapshot(before, snapshot(model, opt))


# -- torch.distributed.checkpoint's optimizer state dict ---------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd-stateless", "sgd-momentum"])
def test_dcp_get_and_set_optimizer_state_dict_do_not_step_co2(momentum):
    """get/set_optimizer_state_dict keep only state/param_groups and, when the inner state is empty, call
    optim.step() with zero grads and lr=0: that must neither advance CO2's position nor launch anything."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make():
        model = net(0, torch.float32)
        return model, CO2(model, sgd(model, 0.05, momentum), tau=3)

    ref_model, ref_opt = make()
    ref = run(ref_model, ref_opt, 9, dtype=torch.float32)
    model, opt = make()
    run(model, opt, 5, dtype=torch.float32)                       # position 2: one more step would end the round
    opt.zero_grad(set_to_none=True)
    before = (opt.position, opt.round, opt.comm_stats()["launches"], [p.detach().clone() for p in model.parameters()])
    sd = get_optimizer_state_dict(model, opt)
    assert set(sd) == {"state", "param_groups"}
    with pytest.warns(RuntimeWarning, match="holds no CO2 state"):
        set_optimizer_state_dict(model, opt, sd)
    after = (opt.position, opt.round, opt.comm_stats()["launches"], [p.detach().clone() for p in model.parameters()])
    assert before[:3] == after[:3] and all(torch.equal(a, b) for a, b in zip(before[3], after[3]))
    assert all(p.grad is None for p in model.parameters())
    got = run(model, opt, 4, start=5, dtype=torch.float32)       # CO2's state was kept: the run is unchanged
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.timeout(30)
def test_load_without_co2_state_loads_the_inner_optimizer_and_keeps_co2_state():
    model, opt = build(dict(tau=3))
    run(model, opt, 4, dtype=torch.float32)
    other_model, other = build(dict(tau=3), seed=2)
    run(other_model, other, 2, dtype=torch.float32)
    theta, pos = [t.clone() for t in opt.anchor()], opt.position
    with pytest.warns(RuntimeWarning, match="CO2's anchor θ, outer momentum, round position and outer exchange "
                                            "are kept as they are"):
        opt.load_state_dict(other.optimizer.state_dict())
    assert opt.position == pos and all(torch.equal(a, b) for a, b in zip(opt.anchor(), theta))
    for a, b in zip(opt.optimizer.state.values(), other.optimizer.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# -- another world size, another rank ---------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_other_world_size_is_refused_or_reset():
    kw = dict(tau=3, compressor="topk:0.3")
    model, opt = build(kw)
    run(model, opt, 7, dtype=torch.float32)         # round 2, position 1, a result in flight, EF14 state
    sd = opt.state_dict()
    sd["commopt"]["world_size"] = 2                 # as if saved on 2 ranks (the per-rank parts are this rank's)
    theta, mom = sd["commopt"]["anchor"].clone(), sd["commopt"]["momentum"].clone()
    with pytest.raises(ValueError, match="on_world_size_change='reset'"):
        build(kw, seed=4)[1].load_state_dict(sd)
    with pytest.raises(ValueError, match="on_world_size_change"):
        build(dict(kw, on_world_size_change="keep"))
    fresh, fopt = build(dict(kw, on_world_size_change="reset"), seed=4)
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning) as rec:
        fopt.load_state_dict(sd)
    msgs = [str(w.message) for w in rec if "world size 2" in str(w.message)]
    assert len(msgs) == 1
    for name in ("round starts s_i", "completed outer all-reduce", "error-feedback state", "local step"):
        assert name in msgs[0], (name, msgs[0])
    assert torch.equal(fopt._theta, theta) and torch.equal(fopt._m, mom) and torch.equal(fopt._s, fopt._theta)
    assert (fopt.position, fopt.round) == (0, 2) and not fopt.exchange.pending and not fopt.exchange.slots
    assert float(fopt._gap.abs().sum()) == 0.0
    assert all(torch.equal(p.detach(), a) for p, a in zip(fresh.parameters(), fopt.anchor()))
    dense, compressed = fopt.exchange.stats["dense_rounds"], fopt.exchange.stats["compressed_rounds"]
    run(fresh, fopt, 6, start=7, dtype=torch.float32)         # two round ends: a dense init round, then compressed
    assert fopt.exchange.stats["dense_rounds"] == dense + 1 and fopt.exchange.slots
    assert fopt.exchange.stats["compressed_rounds"] == compressed + 1
    fopt.finish()
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.timeout(60)
def test_another_ranks_checkpoint_is_accepted_as_a_replica_of_that_rank():
    kw = dict(tau=3)
    model, opt = build(kw)
    ref = run(model, opt, TOTAL, dtype=torch.float32)
    model, opt = build(kw)
    run(model, opt, 4, dtype=torch.float32)
    sd = opt.state_dict()
    sd["commopt"]["rank"] = 1                        # rank 1's file loaded on rank 0 (with rank 1's model)
    fresh, fopt = build(kw, seed=4)
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning, match="continues as a replica of rank 1"):
        fopt.load_state_dict(sd)
    got = run(fresh, fopt, TOTAL - 4, start=4, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # taken at a consensus point (after finish()): the inner optimizer's state (SGD's momentum) is still per rank
    opt.finish()
    sd = opt.state_dict()
    sd["commopt"]["rank"] = 1
    with pytest.warns(RuntimeWarning, match="continues as a replica of rank 1, taking its inner optimizer's state"):
        build(kw, seed=4)[1].load_state_dict(sd)


def _other_ranks_file_after_finish(inner):
    """A CO2 trained 4 steps (tau=3), finished, saved, its file marked as rank 1's; loaded into a fresh CO2."""
    model = net(0, torch.float32)
    opt = CO2(model, inner(model), tau=3)
    run(model, opt, 4, dtype=torch.float32)
    opt.finish()
    sd = opt.state_dict()
    sd["commopt"]["rank"] = 1
    fresh = net(4, torch.float32)
    fopt = CO2(fresh, inner(fresh), tau=3)
    fresh.load_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fopt.load_state_dict(sd)
    return [str(w.message) for w in rec]


@pytest.mark.timeout(30)
def test_another_ranks_checkpoint_after_finish_warns_for_its_inner_optimizers_state():
    """After finish() θ, m and the model agree on every rank, but AdamW's moments are the saving rank's."""
    msgs = _other_ranks_file_after_finish(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))
    assert len(msgs) == 1 and "continues as a replica of rank 1" in msgs[0], msgs
    assert "its inner optimizer's state" in msgs[0] and "local progress" not in msgs[0], msgs
    # a stateless inner optimizer (plain SGD) after finish(): nothing is per rank, no warning
    assert _other_ranks_file_after_finish(lambda m: sgd(m, 0.05)) == []


# -- the communication counters continue after a resume ----------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kw", [dict(tau=3, link_delay=0.002), dict(tau=2, compressor="topk:0.3")],
                         ids=["dense-delay", "topk"])
def test_comm_stats_survive_a_checkpoint(kw):
    model, opt = build(kw)
    run(model, opt, 7, dtype=torch.float32)             # mid-round, an all-reduce in flight (waited for at save)
    sd = opt.state_dict()
    before = opt.comm_stats()
    assert before["launches"] > 0 and before["waits"] > 0   # (one rank: nothing is sent, 0 bytes)
    fresh, fopt = build(kw, seed=3)
    fresh.load_state_dict(model.state_dict())
    fopt.load_state_dict(copy.deepcopy(sd))
    assert fopt.comm_stats() == before
    assert fopt.exchange.stats == opt.exchange.stats
    # training on counts on from there, exactly as the original does
    run(model, opt, 3, start=7, dtype=torch.float32)
    run(fresh, fopt, 3, start=7, dtype=torch.float32)
    got, want = fopt.comm_stats(), opt.comm_stats()
    got.pop("wait_seconds"), want.pop("wait_seconds")
    assert got == want
    # an older checkpoint without the counters: the loading optimizer keeps its own
    old = copy.deepcopy(sd)
    del old["commopt"]["stats"]
    other_model, other = build(kw, seed=3)
    run(other_model, other, 2, dtype=torch.float32)
    other.exchange.settle()                             # (a load waits for its own all-reduce in flight, counted)
    mine = copy.deepcopy(other.exchange.stats)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(old)
    assert other.exchange.stats == mine


# -- mixed precision: GradScaler ---------------------------------------------------------------------------------
def _scaled_run(model, opt, steps: int, scaler, overflow=(), unscale=False):
    """``steps`` steps through ``scaler``; the steps in ``overflow`` get an infinite loss (inf/NaN gradients)."""
    for step in range(steps):
        x, y = batch(0, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in overflow:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(opt)                         # e.g. to clip gradients: then step() gets grad_scale None
        scaler.step(opt)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("unscale", [False, True], ids=["scaler-step", "unscale-then-step"])
def test_grad_scaler_without_overflow_equals_an_unscaled_run(unscale):
    assert CO2._step_supports_amp_scaling
    model = net()
    opt = CO2(model, sgd(model, 0.05, 0.9), tau=3)
    ref = run(model, opt, 8)
    model = net()
    opt = CO2(model, sgd(model, 0.05, 0.9), tau=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got = _scaled_run(model, opt, 8, scaler, unscale=unscale)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(got, ref))
    assert opt.comm_stats()["steps"] == 8 and opt.round == 2 and opt.position == 2
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")   # GradScaler removed them again
    assert scaler.get_scale() == 2.0 ** 10


@pytest.mark.timeout(30)
def test_grad_scaler_overflow_skips_the_local_step_but_advances_the_round():
    """An overflow step is still a step of the round (the ranks' positions must stay aligned); only the inner
    optimizer's update is skipped."""
    model = net()
    opt = CO2(model, sgd(model, 0.05, 0.9), tau=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _scaled_run(model, opt, 1, scaler)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    x, y = batch(0, 1)
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.position == 2 and opt.round == 0 and opt.comm_stats()["steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))          # the local step was skipped
    assert all(torch.equal(a, opt.optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 9                                               # the scaler backed off
    # an overflow on the round's last step still ends the round (and launches its all-reduce)
    model = net()
    opt = CO2(model, sgd(model, 0.05, 0.9), tau=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got = _scaled_run(model, opt, 6, scaler, overflow=(2, 4))
    assert opt.round == 2 and opt.position == 0 and opt.comm_stats()["launches"] == 2
    assert all(torch.isfinite(p).all() for p in got)
    assert scaler.get_scale() == 2.0 ** 8


# -- runs that end without finish() ----------------------------------------------------------------------------
_EXIT_SCRIPT = r"""
import gc, sys, warnings, weakref
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from commopt.optim.co2 import CO2
rank, store, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)

def make(variant="eager"):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, CO2(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=3, variant=variant)

def train(model, opt, steps):
    for s in range(steps):
        g = torch.Generator().manual_seed(10 * rank + s)
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()

keep = []
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    if case == "mid-round":            # two unfinished optimizers, saved twice each: 2 save warnings, 1 at exit
        for _ in range(2):
            model, opt = make(); train(model, opt, 2); opt.state_dict(); opt.state_dict(); keep.append(opt)
    elif case == "unapplied":          # delayed, at a round end: the models agree, an all-reduce is not applied
        model, opt = make("delayed"); train(model, opt, 3); opt.exchange.settle(); opt.state_dict(); keep.append(opt)
    elif case == "finished-or-dropped":
        model, opt = make(); train(model, opt, 4); opt.finish(); opt.state_dict(); keep.append(opt)
        model, opt = make(); train(model, opt, 2)     # mid-round, but dropped: the exit check holds no reference
        ref = weakref.ref(opt); del opt; gc.collect()
        print("ALIVE" if ref() is not None else "GONE", flush=True)
print("SAVE-WARNINGS", sum("save model.state_dict() on every rank" in str(w.message) for w in rec), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def _run_two_ranks(tmp_path, case: str) -> list[tuple[int, str, str]]:
    import subprocess
    import sys

    script = tmp_path / "exit_check.py"
    script.write_text(_EXIT_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = tmp_path / f"store-{case}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store), case, root], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=150)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.timeout(400)
def test_unfinished_run_warns_at_state_dict_and_at_exit(tmp_path):
    """Two gloo ranks in fresh interpreters: state_dict() warns (once per optimizer) while the models differ;
    the exit check warns once per process while any live CO2 is unfinished, and keeps none alive."""
    expect = {  # case: (warnings at state_dict() per rank, warnings at exit per rank)
        "mid-round": (2, 1), "unapplied": (0, 1), "finished-or-dropped": (0, 0)}
    for case, (saves, exits) in expect.items():
        for rc, stdout, stderr in _run_two_ranks(tmp_path, case):
            assert rc == 0, (case, stderr[-3000:])
            assert f"SAVE-WARNINGS {saves}" in stdout, (case, stdout)
            assert stderr.count("exits without opt.finish()") == exits, (case, stderr[-3000:])
            if case == "finished-or-dropped":
                assert "GONE" in stdout
            if exits:
                assert "RuntimeWarning" in stderr and "call opt.finish() on every rank" in stderr


# -- the README's convergence sentence is what the committed sweep shows ------------------------------------------
@pytest.mark.timeout(30)
def test_readme_states_the_committed_sweep():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "experiments", "results", "co2_sweep.md")) as f:
        rows = [line.strip().strip("|").split("|") for line in f if line.count("|") == 9]
    rows = [cells for cells in rows if cells[0].strip().isdigit()]   # the per-run table, not its header
    ratios: dict[int, list[float]] = {}
    for cells in rows:
        ranks, ddp, co2 = int(cells[0]), float(cells[3]), float(cells[4])
        ratios.setdefault(ranks, []).append(co2 / ddp)
    assert sorted(ratios) == [2, 4, 8] and all(len(v) == 3 for v in ratios.values())
    span = {n: f"{min(v):.2f}–{max(v):.2f}×" for n, v in ratios.items()}
    with open(os.path.join(root, "README.md")) as f:
        readme = " ".join(f.read().split())
    claim = f"{span[2]} DDP's final loss on 2 ranks, {span[4]} on 4 and {span[8]} on 8"
    assert claim in readme, claim
