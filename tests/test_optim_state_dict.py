"""CompressedOptimizer checkpoints in one process (gloo, world size 1): torch.optim's shape, the
state-dict hooks, the older layout, torch.distributed.checkpoint's get/set_optimizer_state_dict,
plain optimizer checkpoints, atomic refusals, comm_stats across a resume, add_param_group, and the
refusal of compiled autograd's python_reducer. The multi-rank cases are in tests/mpi/."""

from __future__ import annotations

import io
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WARMUP = 2


@pytest.fixture(scope="module", autouse=True)
def world1():
    """A 1-rank gloo process group in this process (reused if one exists)."""
    torch.set_num_threads(1)
    created = False
    if not dist.is_initialized():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timedelta(seconds=60))
        created = True
    yield
    if created:
        dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 3))


def _build(compressor="topk:0.1", feedback="econtrol", momentum=0.9, **kw):
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    opt = commopt.CompressedOptimizer(ddp, inner, compressor=compressor, feedback=feedback,
                                      warmup_steps=WARMUP, **kw)
    return model, ddp, opt


def _train(ddp, opt, start, stop):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _commopt_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("commopt:")]


def _load_recording(opt_or_fn, sd=None) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt_or_fn.load_state_dict(sd) if sd is not None else opt_or_fn()
    return _commopt_warnings(rec)


def _snapshot(opt) -> dict:
    """Everything a load may change: inner state and groups, hook state, counters."""
    st = opt.hook_state
    inner = opt.optimizer.state_dict()
    return {
        "inner_state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                        for k, s in inner["state"].items()},
        "groups": [{k: v for k, v in g.items()} for g in inner["param_groups"]],
        "step": st.step, "dense_until": st.dense_until,
        "optimizer_steps": opt.state_dict()["commopt"]["optimizer_steps"],
        "slots": {(i, n): t.clone() for i, b in st.blocks().items() for n, t in b.slots.items()},
        "blocks": [b.pids for b in st.blocks().values()],
        "stats": opt.comm_stats(),
    }


def _same(a: dict, b: dict) -> list[str]:
    bad = [k for k in ("groups", "step", "dense_until", "optimizer_steps", "blocks", "stats") if a[k] != b[k]]
    if a["inner_state"].keys() != b["inner_state"].keys() or any(
            not torch.equal(a["inner_state"][k][n], b["inner_state"][k][n])
            for k in a["inner_state"] for n in a["inner_state"][k] if torch.is_tensor(a["inner_state"][k][n])):
        bad.append("inner_state")
    if a["slots"].keys() != b["slots"].keys() or any(not torch.equal(a["slots"][k], b["slots"][k]) for k in a["slots"]):
        bad.append("slots")
    return bad


# -- 1. torch.optim's shape, hooks, older layout, counters -------------------------------------------------

def test_state_dict_has_torch_optim_shape_with_one_commopt_key():
    model, ddp, opt = _build()
    _train(ddp, opt, 0, 5)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "commopt"}
    inner = opt.optimizer.state_dict()
    assert sd["param_groups"] == inner["param_groups"]
    assert sd["state"].keys() == inner["state"].keys()
    assert all(torch.equal(sd["state"][k]["momentum_buffer"], inner["state"][k]["momentum_buffer"])
               for k in inner["state"])
    c = sd["commopt"]
    assert c["step"] == 5 and c["optimizer_steps"] == 5 and c["rank"] == 0 and c["world_size"] == 1
    assert c["stats"]["steps"] == 5 and c["stats"]["dense_rounds"] >= WARMUP and c["skipped_rounds"] == 0
    assert c["blocks"] and c["params"]


def test_state_dict_and_load_state_dict_hooks_run():
    model, ddp, opt = _build()
    _train(ddp, opt, 0, 4)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))

    def post(o, sd):
        calls.append(("post", set(sd) >= {"state", "param_groups", "commopt"}))
        return {**sd, "note": "from the post hook"}

    opt.register_state_dict_post_hook(post)
    sd = _roundtrip(opt.state_dict())
    assert sd["note"] == "from the post hook"
    assert calls == [("pre", True), ("post", True)]

    model2, ddp2, opt2 = _build()
    model2.load_state_dict(model.state_dict())

    def load_pre(o, sd):
        calls.append(("load_pre", "note" in sd))
        sd = {k: v for k, v in sd.items() if k != "note"}
        sd["param_groups"] = [{**g, "lr": 0.0125} for g in sd["param_groups"]]  # the returned dict is loaded
        return sd

    opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o.hook_state.step)))
    assert _load_recording(opt2, sd) == []  # its own file: exact, no warning
    assert calls[2:] == [("load_pre", True), ("load_post", 4)]
    assert [g["lr"] for g in opt2.param_groups] == [0.0125]


def test_resume_is_exact_and_comm_stats_survive():
    model, ddp, opt = _build()
    _train(ddp, opt, 0, 6)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    stats_at_save = opt.comm_stats()
    _train(ddp, opt, 6, 12)
    model2, ddp2, opt2 = _build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.comm_stats() == stats_at_save
    _train(ddp2, opt2, 6, 12)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt2.comm_stats() == opt.comm_stats()
    assert opt2.state_dict()["commopt"]["optimizer_steps"] == 12


def test_older_layout_is_accepted():
    model, ddp, opt = _build()
    _train(ddp, opt, 0, 6)
    new = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    own = {k: v for k, v in new["opt"]["commopt"].items() if k not in ("optimizer_steps", "stats", "skipped_rounds")}
    legacy = {"optimizer": {"state": new["opt"]["state"], "param_groups": new["opt"]["param_groups"]},
              "commopt": own, "steps": 6}
    _train(ddp, opt, 6, 10)
    model2, ddp2, opt2 = _build()
    model2.load_state_dict(new["model"])
    assert _load_recording(opt2, legacy) == []
    assert opt2.state_dict()["commopt"]["optimizer_steps"] == 6 and opt2.hook_state.step == 6
    _train(ddp2, opt2, 6, 10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


# -- 2. torch.distributed.checkpoint ------------------------------------------------------------------------

def test_distributed_checkpoint_round_trip_restarts_feedback_with_one_warning():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, ddp, opt = _build()
    _train(ddp, opt, 0, 6)
    osd = _roundtrip(get_optimizer_state_dict(ddp, opt))
    assert set(osd) == {"state", "param_groups"}  # DCP keeps only these (FQN keys)
    assert "0.weight" in osd["state"]

    model2, ddp2, opt2 = _build()
    model2.load_state_dict(model.state_dict())
    msgs = _load_recording(lambda: set_optimizer_state_dict(ddp2, opt2, osd))
    assert len(msgs) == 1, msgs
    assert "holds no commopt state" in msgs[0] and "set_optimizer_state_dict" in msgs[0]
    assert "To resume exactly, save opt.state_dict()" in msgs[0]
    # the inner optimizer is loaded; DCP's zero-gradient initialisation step was not counted
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
        assert torch.equal(p, q)
    assert opt2.state_dict()["commopt"]["optimizer_steps"] == 0
    st = opt2.hook_state
    assert st.dense_until == st.step + WARMUP
    before = opt2.comm_stats()
    _train(ddp2, opt2, 6, 6 + WARMUP)
    mid = opt2.comm_stats()
    assert mid["compressed_rounds"] == before["compressed_rounds"] and mid["dense_rounds"] > before["dense_rounds"]
    _train(ddp2, opt2, 6 + WARMUP, 10)
    assert opt2.comm_stats()["compressed_rounds"] > mid["compressed_rounds"]
    assert all(torch.isfinite(p).all() for p in model2.parameters())


def test_distributed_checkpoint_into_the_running_optimizer_restarts_at_its_step():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, ddp, opt = _build()
    _train(ddp, opt, 0, 6)
    osd = get_optimizer_state_dict(ddp, opt)
    assert len(_load_recording(lambda: set_optimizer_state_dict(ddp, opt, osd))) == 1
    st = opt.hook_state
    assert st.step == 6 and st.dense_until == 6 + WARMUP and st.blocks() == {}
    assert opt.comm_stats()["steps"] == 6  # counters stay
    _train(ddp, opt, 6, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero_gradient_step_of_distributed_checkpoint_is_not_counted():
    """Plain SGD keeps no state, so get_optimizer_state_dict steps it with zero gradients and lr 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, ddp, opt = _build(momentum=0.0, check_every=1)
    _train(ddp, opt, 0, 3)
    params = [p.detach().clone() for p in model.parameters()]
    get_optimizer_state_dict(ddp, opt)
    assert opt.state_dict()["commopt"]["optimizer_steps"] == 3
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


# -- 3. plain optimizer checkpoints ------------------------------------------------------------------------

def _plain_checkpoint():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for t in range(3):
        sgd.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(8, 12)), torch.randn(8, 3)).backward()
        sgd.step()
    return _roundtrip({"model": model.state_dict(), "opt": sgd.state_dict()})


def test_plain_checkpoint_loaded_into_the_inner_optimizer_before_wrapping():
    ck = _plain_checkpoint()
    model = _model()
    model.load_state_dict(ck["model"])
    ddp = DDP(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inner.load_state_dict(ck["opt"])
    opt = commopt.CompressedOptimizer(ddp, inner, "topk:0.1", "econtrol")
    sd = opt.state_dict()
    assert sd["state"].keys() == ck["opt"]["state"].keys()
    assert all(torch.equal(sd["state"][k]["momentum_buffer"], ck["opt"]["state"][k]["momentum_buffer"])
               for k in sd["state"])
    _train(ddp, opt, 0, 4)
    assert opt.comm_stats()["compressed_rounds"] > 0


def test_plain_checkpoint_into_compressed_optimizer_loads_inner_and_warns():
    ck = _plain_checkpoint()
    model, ddp, opt = _build()
    msgs = _load_recording(opt, ck["opt"])
    assert len(msgs) == 1 and "holds no commopt state" in msgs[0]
    assert all(torch.equal(opt.optimizer.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in ck["opt"]["state"].items())


# -- 4. atomic refusals, add_param_group --------------------------------------------------------------------

@pytest.mark.parametrize("wrong", ["inner_groups", "inner_malformed", "compressor", "slot_size", "not_a_dict"])
def test_refused_load_changes_nothing(wrong):
    model, ddp, opt = _build()
    _train(ddp, opt, 0, 4)
    sd = _roundtrip(opt.state_dict())
    _train(ddp, opt, 4, 7)  # the live state moves on from the checkpoint
    if wrong == "inner_groups":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif wrong == "inner_malformed":
        del sd["param_groups"][0]["params"]
    elif wrong == "compressor":
        sd["commopt"]["compressor"] = {**sd["commopt"]["compressor"], "ratio": 0.2}
    elif wrong == "slot_size":
        pid = next(iter(sd["commopt"]["params"]))
        sd["commopt"]["params"][pid]["e"] = sd["commopt"]["params"][pid]["e"][:-1]
    else:
        sd["commopt"] = [1, 2, 3]
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="refused the checkpoint") as info:
        opt.load_state_dict(sd)
    if wrong.startswith("inner"):
        assert "the inner SGD refused its part" in str(info.value)
    assert "nothing was changed on any rank" in str(info.value)
    assert _same(before, _snapshot(opt)) == []
    _train(ddp, opt, 7, 9)  # and it trains on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_add_param_group_for_a_parameter_of_the_ddp_model():
    model = _model()
    ddp = DDP(model)
    inner = torch.optim.SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    opt = commopt.CompressedOptimizer(ddp, inner, "topk:0.1", "econtrol")
    _train(ddp, opt, 0, 3)
    last = [p.detach().clone() for p in model[4].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(last, model[4].parameters()))  # not optimised yet
    opt.add_param_group({"params": model[4].parameters(), "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["momentum"] == 0.9  # defaults filled in by torch
    _train(ddp, opt, 3, 6)
    assert all(not torch.equal(a, b) for a, b in zip(last, model[4].parameters()))

    with pytest.raises(ValueError, match="not parameters of the DDP model"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opt.add_param_group({"params": model[0].weight})
    assert len(opt.param_groups) == 2
    # the two groups round-trip
    sd = _roundtrip(opt.state_dict())
    model2 = _model()
    ddp2 = DDP(model2)
    opt2 = commopt.CompressedOptimizer(ddp2, torch.optim.SGD(model2[0].parameters(), lr=0.05, momentum=0.9),
                                       "topk:0.1", "econtrol")
    opt2.add_param_group({"params": list(model2[4].parameters()), "lr": 0.01})
    opt2.load_state_dict(sd)
    assert [g["lr"] for g in opt2.param_groups] == [0.05, 0.01]


# -- 5. compiled autograd's python_reducer ------------------------------------------------------------------

def test_python_reducer_is_refused_at_construction(monkeypatch):
    import torch._dynamo.config as dynamo_config

    model = _model()
    ddp = DDP(model)
    with dynamo_config.patch(optimize_ddp="python_reducer"):
        with pytest.raises(RuntimeError, match="python_reducer"):
            commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(RuntimeError, match="python_reducer"):
            commopt.CompressionState("topk:0.1", "ef14", model=model)
    # a DDP model built while it was set keeps its Python reducer
    monkeypatch.setattr(ddp, "_use_python_reducer", True, raising=False)
    with pytest.raises(RuntimeError, match="python_reducer"):
        commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1))
    monkeypatch.undo()
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1))  # and works without it
    _train(ddp, opt, 0, 2)


def test_compression_state_load_for_hook_users():
    """CompressionState.load_state_dict directly (hooks registered by hand): its own state is exact,
    None restarts the feedback state with dense rounds and one warning."""
    model = _model()
    ddp = DDP(model)
    state = commopt.CompressionState("topk:0.1", "ef21", model=model, warmup_steps=WARMUP)
    ddp.register_comm_hook(state, commopt.compression_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(ddp, opt, 0, 5)
    sd = _roundtrip(state.state_dict())
    assert _load_recording(state, sd) == [] and state.step == 5 and state.dense_until == 0
    assert all(b.slots for b in state.blocks().values())
    msgs = _load_recording(lambda: state.load_state_dict(None))
    assert len(msgs) == 1 and "holds no commopt state" in msgs[0] and "local w_i; replicated w" in msgs[0]
    assert state.step == 5 and state.dense_until == 5 + WARMUP and state.blocks() == {}
    with pytest.raises(ValueError, match="refused the checkpoint"):
        state.load_state_dict({**sd, "feedback": {"name": "ef14"}})
    _train(ddp, opt, 5, 9)
    assert state.stats["compressed_rounds"] > 0


# -- review findings: resume with an auto-bound GradScaler; a failed collective on the CPU -------------------

def _scaled_run(bind: bool):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = DDP(m, bucket_cap_mb=0.001)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(m.parameters(), lr=0.05), compressor="topk:0.1",
                                      feedback="econtrol", grad_scaler=sc if bind else None)
    return m, ddp, sc, opt


def _scaled_step(t, m, ddp, sc, opt):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    opt.zero_grad()
    sc.scale(torch.nn.functional.mse_loss(ddp(x), y)).backward()
    sc.step(opt)
    sc.update()


@pytest.mark.parametrize("bind", [True, False], ids=["grad_scaler-passed", "auto-bound"])
def test_resume_with_a_gradscaler_is_bitwise(bind):
    """A per-rank resume is exact whether the scaler was passed as grad_scaler= or bound at its first
    scaler.step (the checkpoint records the scale the state was divided by)."""
    ref = _scaled_run(bind)
    for t in range(8):
        _scaled_step(t, *ref)
    a = _scaled_run(bind)
    for t in range(4):
        _scaled_step(t, *a)
    buf = io.BytesIO()
    torch.save({"m": a[0].state_dict(), "o": a[3].state_dict(), "s": a[2].state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    b = _scaled_run(bind)
    b[0].load_state_dict(ck["m"])
    b[3].load_state_dict(ck["o"])
    b[2].load_state_dict(ck["s"])
    for t in range(4, 8):
        _scaled_step(t, *b)
    assert b[3].hook_state.grad_scaler is b[2]
    assert all(torch.equal(p, q) for p, q in zip(ref[0].parameters(), b[0].parameters()))


@pytest.mark.parametrize("cap", [25.0, 0.0005], ids=["one-bucket", "several-buckets"])
def test_failed_collective_raises_in_backward_and_keeps_the_state(cap):
    """A collective that fails (here: the exchange's future carries an error) makes backward() raise;
    the feedback state is left as it was and the next step trains on."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = DDP(m, bucket_cap_mb=cap)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(m.parameters(), lr=0.05), compressor="topk:0.1",
                                      feedback="econtrol")
    st = opt.hook_state
    real = st.exchange.send

    def step(t):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()

    for t in range(4):
        step(t)
    before = {(i, n): v.clone() for i, b in st.blocks().items() for n, v in b.slots.items()}

    def failing(*args, **kwargs):
        f = torch.futures.Future()
        f.set_exception(RuntimeError("injected: Connection closed by peer"))
        return f

    st.exchange.send = failing
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        step(4)
    after = {(i, n): v for i, b in st.blocks().items() for n, v in b.slots.items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    st.exchange.send = real
    step(5)
    assert all(torch.isfinite(p).all() for p in m.parameters())
