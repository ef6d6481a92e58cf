"""CO2 on real ranks (gloo; ``mpiexec -n 2|4 python -m pytest --with-mpi tests/mpi``): SPEC §6 exact checks.

* θ and m bitwise identical on all ranks; a float64 NumPy simulation of SPEC §6's
  pseudo-code for n workers matches every iterate;
* τ = 1, β = 0, α = 1, synchronous wait equals DDP + SGD; synchronous wait,
  β = 0, α = 1 equals PyTorch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``;
* the same iterates with and without an injected link delay; never more than one
  all-reduce in flight; |m| ≤ φ; a DDP model gives the same iterates as the plain
  module (no gradient all-reduce during local steps);
* overlap, asserted on the wait counter; 4-rank convergence within 1.3× of DDP;
  a bad setting on one rank raises on every rank; an in-process checkpoint taken
  mid-flight resumes identically (fresh-process resumption: tests/test_co2.py);
* checkpoint edge cases: rank 0's file loaded on every rank (master-only), a
  resume on half the ranks with ``on_world_size_change="reset"``, and
  ``torch.distributed.checkpoint``'s optimizer state dict on a DDP model; rank 0's
  file saved after ``finish()`` warns for a per-rank inner state (AdamW);
* ``torch.amp.GradScaler`` with an overflow on one rank only: the rounds stay aligned.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from commopt.optim.co2 import CO2

D_IN = 5


@pytest.fixture(scope="module", autouse=True)
def gloo(request):
    """The suite's session process group (tests/mpi/conftest.py's ``world``); without that conftest,
    initialise gloo here from mpi4py (rank 0 picks a free port and broadcasts it)."""
    torch.set_num_threads(1)
    try:
        request.getfixturevalue("world")
    except pytest.FixtureLookupError:
        if not dist.is_initialized():
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            port = None
            if comm.rank == 0:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
            port = comm.bcast(port, root=0)
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    yield


# -- a heterogeneous least-squares problem, float64 -------------------------------------------------
def rank_data(rank: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(rows, D_IN, generator=g, dtype=torch.float64)
    w = torch.randn(D_IN, 1, generator=g, dtype=torch.float64) * (1 + rank)   # a different optimum per rank
    return x, x @ w + 0.1 * torch.randn(rows, 1, generator=g, dtype=torch.float64)


def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, 1).double()


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x) - y) ** 2).mean()


def global_loss(model: torch.nn.Module) -> float:
    """The objective: the mean over ranks of the rank losses (computed locally, no communication)."""
    with torch.no_grad():
        return sum(float(loss_of(model, *rank_data(r))) for r in range(dist.get_world_size())) / dist.get_world_size()


def optimal_loss() -> float:
    """min of :func:`global_loss` (least squares over all ranks' rows: every rank holds the same number)."""
    xs, ys = zip(*(rank_data(r) for r in range(dist.get_world_size())))
    x, y = torch.cat(xs), torch.cat(ys)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    sol = torch.linalg.lstsq(a, y).solution
    best = torch.nn.Linear(D_IN, 1).double()
    with torch.no_grad():
        best.weight.copy_(sol[:D_IN].T)
        best.bias.copy_(sol[D_IN])
    return global_loss(best)


def train(model, opt, steps: int, rank: int, each=None) -> list[list[torch.Tensor]]:
    """Full-batch steps on this rank's data; returns the parameters after every step."""
    x, y = rank_data(rank)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        if each is not None:
            each(opt)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def gather(obj):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def bits(tensors) -> bytes:
    return b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors)


# -- SPEC §6 in NumPy, n workers -----------------------------------------------------------------------
def reference(n: int, steps: int, tau: int, lr: float, alpha: float, beta: float, nesterov: bool, clip,
              penalty, variant: str, overlap: bool):
    """Float64 NumPy simulation of SPEC §6 (inner optimizer: plain SGD). Returns per-round (θ, m, x_rank)."""
    torch_model = linear()
    theta = [p.detach().numpy().copy() for p in torch_model.parameters()]          # W [1, d], b [1]
    data = [tuple(t.numpy() for t in rank_data(r)) for r in range(n)]
    m = [np.zeros_like(t) for t in theta]
    xs = [[t.copy() for t in theta] for _ in range(n)]
    starts = [[t.copy() for t in theta] for _ in range(n)]
    gap = [0.0 for _ in theta]
    inflight = None
    history = []

    def grads(params, x, y):
        w, b = params
        r = x @ w.T + b - y                       # [rows, 1]
        return [(r.T @ x) / len(x), r.mean(axis=0)]

    def factor(delta, j):
        if penalty is None:
            return 1.0
        if penalty == "adaptive":
            size = max(np.linalg.norm(delta), np.finfo(np.float64).tiny)
            return 1.0 / (1.0 + gap[j] / size)
        return 1.0 / penalty

    def outer(mean_d):
        for j in range(len(theta)):
            g = factor(mean_d[j], j) * mean_d[j]
            m[j] = beta * m[j] + g
            if clip is not None:
                m[j] = np.clip(m[j], -clip, clip)
            u = g + beta * m[j] if nesterov else m[j]
            theta[j] = theta[j] - alpha * u
            if overlap:
                gap[j] = np.linalg.norm(mean_d[j] - alpha * u) if variant == "eager" else alpha * np.linalg.norm(u)

    for step in range(1, steps + 1):
        for i in range(n):
            gs = grads(xs[i], *data[i])
            xs[i] = [p - lr * g for p, g in zip(xs[i], gs)]
        if step % tau:
            continue
        if not overlap:
            d = [[t - x for t, x in zip(theta, xs[i])] for i in range(n)]
            outer([sum(d[i][j] for i in range(n)) / n for j in range(len(theta))])
            xs = [[t.copy() for t in theta] for _ in range(n)]
        else:
            d = [[s - x for s, x in zip(starts[i], xs[i])] for i in range(n)]
            if inflight is not None:
                outer([sum(inflight[i][j] for i in range(n)) / n for j in range(len(theta))])
            else:
                gap = [0.0 for _ in theta]
            inflight = d
            for i in range(n):
                starts[i] = [t - dd for t, dd in zip(theta, d[i])] if variant == "eager" else [t.copy() for t in theta]
                xs[i] = [s.copy() for s in starts[i]]
        history.append(([t.copy() for t in theta], [mm.copy() for mm in m], [[t.copy() for t in x] for x in xs]))
    return history


REF_CASES = {
    "eager-adaptive": dict(alpha=1.0, beta=0.5, nesterov=False, clip=1.0, penalty="adaptive", variant="eager",
                           overlap=True),
    "delayed-const-nesterov": dict(alpha=0.8, beta=0.3, nesterov=True, clip=None, penalty=2.0,
                                   variant="delayed", overlap=True),
    "delayed-adaptive-clipped": dict(alpha=1.0, beta=0.6, nesterov=False, clip=0.05, penalty="adaptive",
                                     variant="delayed", overlap=True),
    "blocking": dict(alpha=0.7, beta=0.5, nesterov=True, clip=1.0, penalty="adaptive", variant="eager",
                     overlap=False),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(REF_CASES))
def test_matches_spec_reference_and_state_is_replicated(case):
    cfg = REF_CASES[case]
    rank, n = dist.get_rank(), dist.get_world_size()
    tau, steps, lr = 3, 15, 0.05
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=lr), tau=tau, outer_lr=cfg["alpha"],
              outer_momentum=cfg["beta"], nesterov=cfg["nesterov"], clip=cfg["clip"], penalty=cfg["penalty"],
              variant=cfg["variant"], overlap=cfg["overlap"])
    rounds = []
    train(model, opt, steps, rank, each=lambda o: rounds.append(
        ([t.clone() for t in o.anchor()], [t.clone() for t in o.momentum()],
         [p.detach().clone() for p in model.parameters()])) if o.position == 0 else None)
    ref = reference(n, steps, tau, lr, **cfg)
    assert len(rounds) == len(ref) == steps // tau
    for (theta, m, x), (rtheta, rm, rxs) in zip(rounds, ref):
        for a, b in zip(theta, rtheta):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-11)
        for a, b in zip(m, rm):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-11)
        for a, b in zip(x, rxs[rank]):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-11)
    # θ and m bitwise identical on every rank, after every round
    sums = gather([bits(t) + bits(m) for t, m, _ in rounds])
    assert all(s == sums[0] for s in sums)
    opt.verify_replicated_state()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["topk:0.3/ef14", "randk:0.4/ef21/bf16", "topk:0.5/econtrol"])
def test_compressed_outer_exchange_keeps_replicas_identical(spec):
    comp, fb, *rest = spec.split("/")
    rank = dist.get_rank()
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05), tau=2, compressor=comp, feedback=fb,
              buffer_dtype=torch.bfloat16 if rest else None, check_every=1)   # check_every verifies each round
    first, best = global_loss(model), optimal_loss()
    train(model, opt, 80, rank)
    opt.finish()
    sums = gather(bits(opt.anchor()) + bits(opt.momentum()) + bits(opt.exchange.replicated_slots())
                  + bits(model.parameters()))
    assert all(s == sums[0] for s in sums)
    stats = opt.comm_stats()
    assert stats["max_in_flight"] == 1 and stats["collectives"]["dense"] >= 1
    assert global_loss(model) - best < 0.1 * (first - best)      # converges with the compressed outer step


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("wrap", [False, True], ids=["module", "ddp"])
def test_tau1_synchronous_equals_ddp_sgd(wrap):
    rank = dist.get_rank()
    ref_model = DDP(linear())
    ref = train(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), 8, rank)
    model = linear()
    net = DDP(model) if wrap else model
    opt = CO2(net, torch.optim.SGD(model.parameters(), lr=0.1), tau=1, outer_lr=1.0, outer_momentum=0.0,
              clip=None, penalty="adaptive", overlap=False)
    got = train(net, opt, 8, rank)
    for a_step, b_step in zip(got, ref):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_synchronous_equals_post_local_sgd():
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    rank, tau = dist.get_rank(), 3
    ref_model = linear()
    # warmup_steps = τ − 1: the averager then averages after steps τ, 2τ, ... (its step counter starts at 0)
    ref_opt = PostLocalSGDOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9),
                                    PeriodicModelAverager(period=tau, warmup_steps=tau - 1))
    ref = train(ref_model, ref_opt, 14, rank)
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), tau=tau, outer_lr=1.0,
              outer_momentum=0.0, clip=None, penalty="adaptive", overlap=False)
    got = train(model, opt, 14, rank)
    for a_step, b_step in zip(got, ref):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", ["eager", "delayed"])
def test_iterates_do_not_depend_on_link_speed(variant):
    rank = dist.get_rank()
    runs = []
    for delay in (0.0, 0.03):
        model = linear()
        opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05), tau=2, variant=variant, link_delay=delay)
        runs.append(train(model, opt, 9, rank))
    for a_step, b_step in zip(*runs):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_never_more_than_one_allreduce_in_flight(monkeypatch):
    outstanding, peak, launches = [0], [0], [0]
    real = dist.all_reduce

    class Tracked:
        def __init__(self, work):
            self.work = work

        def wait(self, *args):
            outstanding[0] -= 1
            return self.work.wait(*args)

    def counting_all_reduce(tensor, *args, async_op=False, **kwargs):
        work = real(tensor, *args, async_op=async_op, **kwargs)
        if not async_op:
            return work
        launches[0] += 1
        outstanding[0] += 1
        peak[0] = max(peak[0], outstanding[0])
        return Tracked(work)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    rank = dist.get_rank()
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05), tau=2)
    in_flight = []
    train(model, opt, 13, rank, each=lambda o: in_flight.append(o.exchange.in_flight))
    assert peak[0] == 1 and max(in_flight) == 1
    assert launches[0] == 6 == opt.comm_stats()["launches"]       # one per round end
    assert opt.comm_stats()["max_in_flight"] == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_momentum_is_clipped():
    rank, phi = dist.get_rank(), 0.02
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=2, outer_momentum=0.9, clip=phi,
              penalty=None)
    peaks = []
    train(model, opt, 20, rank, each=lambda o: peaks.append(max(float(t.abs().max()) for t in o.momentum())))
    assert max(peaks) <= phi
    assert max(peaks) == pytest.approx(phi)   # the clamp was active


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ddp_model_trains_locally_like_the_plain_module():
    rank = dist.get_rank()
    plain = linear()
    a = train(plain, CO2(plain, torch.optim.SGD(plain.parameters(), lr=0.05), tau=3), 10, rank)
    inner = linear()
    net = DDP(inner)
    b = train(net, CO2(net, torch.optim.SGD(net.parameters(), lr=0.05), tau=3), 10, rank)
    for a_step, b_step in zip(a, b):
        for x, y in zip(a_step, b_step):
            assert torch.equal(x, y)
    # the ranks' models really differ mid-round: no gradient was all-reduced
    mid = gather(bits(b[1]))
    assert len(set(mid)) == dist.get_world_size()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_bad_setting_on_one_rank_raises_on_every_rank():
    rank = dist.get_rank()
    model = linear()
    with pytest.raises(ValueError, match="tau" if rank == 1 else "construction failed on rank 1"):
        CO2(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=0 if rank == 1 else 4)
    with pytest.raises(ValueError, match="configured differently"):
        CO2(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=2 + rank)
    net = DDP(linear())
    net.register_comm_hook(None, allreduce_hook)
    with pytest.raises(ValueError, match="already has a communication hook"):
        CO2(net, torch.optim.SGD(net.parameters(), lr=0.1))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_overlap_hides_the_link_delay_on_the_wait_counter():
    """D = 50 ms, c = 50 ms of emulated compute per step, τ = 3 (τ·c ≥ D): CO2 waits (almost) nothing;
    blocking local SGD and the DDP-equivalent (τ = 1, blocking) pay D per round / per step."""
    rank, delay, compute, steps = dist.get_rank(), 0.05, 0.05, 9

    def waited_all(**kw) -> float:
        model = linear()
        opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05), link_delay=delay, **kw)
        train(model, opt, steps, rank, each=lambda o: time.sleep(compute))   # emulated compute per step
        return opt.wait_seconds

    co2 = waited_all(tau=3)
    blocking = waited_all(tau=3, overlap=False, outer_momentum=0.0, penalty=None)
    ddp_like = waited_all(tau=1, overlap=False, outer_momentum=0.0, penalty=None)
    assert co2 <= 0.1 * steps * compute                 # time per step within 1.1x of the compute time
    assert blocking >= 0.9 * (steps // 3) * delay       # pays D per round
    assert ddp_like >= 0.9 * steps * delay              # pays D per step


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_checkpoint_mid_flight_resumes_identically_in_process():
    rank = dist.get_rank()
    kw = dict(tau=3, variant="delayed", nesterov=True, penalty="adaptive")
    model = linear()
    ref = train(model, CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kw), 14, rank)
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kw)
    train(model, opt, 7, rank)                            # round 2, one step in, an all-reduce in flight
    assert opt.exchange.in_flight == 1 and opt.position == 1
    with pytest.warns(RuntimeWarning, match=r"save model.state_dict\(\) on every rank"):   # the models differ
        saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    fresh = torch.nn.Linear(D_IN, 1).double()
    fresh_opt = CO2(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9), **kw)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    rest = train(fresh, fresh_opt, 7, rank)
    for a, b in zip(rest[-1], ref[-1]):
        assert torch.equal(a, b)


# -- convergence, 4 ranks ------------------------------------------------------------------------------
def teacher_task(rank: int, world: int):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world * 512, 16, generator=g)
    w1, w2 = torch.randn(16, 64, generator=g) / 4.0, torch.randn(64, 4, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x, y, x[rank * 512:(rank + 1) * 512], y[rank * 512:(rank + 1) * 512]


def mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def classify(net, opt, xs, ys, steps: int, rank: int) -> None:
    g = torch.Generator().manual_seed(3 + rank)
    for _ in range(steps):
        idx = torch.randint(0, xs.shape[0], (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
        opt.step()


@pytest.mark.mpi(min_size=4)
@pytest.mark.timeout(120)
def test_four_rank_convergence_within_1_3x_of_ddp():
    rank, world, steps = dist.get_rank(), dist.get_world_size(), 360
    x, y, xs, ys = teacher_task(rank, world)
    ddp_model = mlp()
    net = DDP(ddp_model)
    classify(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), xs, ys, steps, rank)
    model = mlp()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))   # the defaults
    classify(model, opt, xs, ys, steps, rank)
    opt.finish()
    with torch.no_grad():
        ddp_loss = float(torch.nn.functional.cross_entropy(ddp_model(x), y))
        co2_loss = float(torch.nn.functional.cross_entropy(model(x), y))
        start = float(torch.nn.functional.cross_entropy(mlp()(x), y))
    assert co2_loss < 0.5 * start
    assert co2_loss <= 1.3 * ddp_loss, (co2_loss, ddp_loss)


# -- checkpoint edge cases on real ranks -----------------------------------------------------------------
def _replicated_bits(opt) -> bytes:
    return bits(opt.anchor()) + bits(opt.momentum()) + bits(opt.exchange.replicated_slots())


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("comp", [None, "topk:0.3"], ids=["dense", "topk-ef14"])
def test_rank0s_checkpoint_on_every_rank_continues_as_replicas_of_rank0(comp):
    """nanoGPT's master-only pattern: rank 0's model and optimizer state loaded everywhere, taken mid-round with
    an all-reduce in flight. Every rank becomes a replica of rank 0 and training stays consistent."""
    from mpi_helpers import all_ranks_true, roundtrip

    rank = dist.get_rank()
    kw = dict(tau=3, compressor=comp)
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kw)
    train(model, opt, 7, rank)                            # round 2, one step in, an all-reduce in flight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # "save per rank": this test saves rank 0's only
        ck = [roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})]
    dist.broadcast_object_list(ck, src=0)
    fresh = torch.nn.Linear(D_IN, 1).double()
    fopt = CO2(fresh, torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9), check_every=1, **kw)
    fresh.load_state_dict(ck[0]["model"])
    error = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            fopt.load_state_dict(ck[0]["opt"])
        except Exception as exc:   # agreed on below, so that no rank is left alone in a collective
            error = exc
    replica = [w for w in rec if f"rank {rank} continues as a replica of rank 0" in str(w.message)]
    ok = error is None and len(replica) == (0 if rank == 0 else 1) and len(rec) == len(replica)
    assert all_ranks_true(ok), (error, [str(w.message) for w in rec])
    assert len(set(gather(bits(fresh.parameters())))) == 1
    assert len(set(gather(_replicated_bits(fopt)))) == 1
    train(fresh, fopt, 8, rank)                           # check_every=1 verifies θ, m (and w/h) every round
    fopt.finish()
    assert len(set(gather(bits(fresh.parameters()) + _replicated_bits(fopt)))) == 1
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_resume_on_half_the_ranks_resets_to_the_anchor():
    """Save on n ranks mid-flight (compressed, EF14), resume on two groups of n/2 ranks: "error" refuses,
    "reset" keeps θ and m, restarts every rank at θ and re-initialises the feedback with a dense round."""
    from mpi_helpers import roundtrip

    rank, n = dist.get_rank(), dist.get_world_size()
    if n % 2:
        pytest.skip("needs an even number of ranks")
    half = n // 2
    groups = [dist.new_group(list(range(i, i + half))) for i in (0, half)]
    mine = groups[rank // half]
    kw = dict(tau=3, compressor="topk:0.3")
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kw)
    train(model, opt, 7, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    theta, mom = ck["opt"]["commopt"]["anchor"], ck["opt"]["commopt"]["momentum"]

    def fresh_pair(**more):
        m = torch.nn.Linear(D_IN, 1).double()
        return m, CO2(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), process_group=mine, **kw, **more)

    m1, o1 = fresh_pair()
    m1.load_state_dict(ck["model"])
    with pytest.raises(ValueError, match=f"world size {n}, this run has {half}"):
        o1.load_state_dict(ck["opt"])
    m2, o2 = fresh_pair(on_world_size_change="reset", check_every=1)
    m2.load_state_dict(ck["model"])
    with pytest.warns(RuntimeWarning, match="dropped the per-rank round starts s_i; the completed outer all-reduce"):
        o2.load_state_dict(ck["opt"])
    assert torch.equal(o2._theta, theta) and torch.equal(o2._m, mom) and o2.position == 0
    assert all(torch.equal(p.detach(), a) for p, a in zip(m2.parameters(), o2.anchor()))
    assert len(set(gather(bits(m2.parameters())))) == 1   # every rank of both groups restarts at the same θ
    dense = o2.exchange.stats["dense_rounds"]
    train(m2, o2, 9, rank)                                 # 3 rounds on the new group, verified every round
    o2.finish()
    assert o2.exchange.stats["dense_rounds"] == dense + 2  # the re-initialising round + finish()'s average
    params = gather(bits(m2.parameters()))                 # each group ends with one model
    first = (rank // half) * half
    assert all(p == params[first] for p in params[first:first + half])


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_dcp_optimizer_state_dict_on_a_ddp_model_does_not_step_co2():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    rank = dist.get_rank()

    def make():
        net = DDP(linear())
        return net, CO2(net, torch.optim.SGD(net.parameters(), lr=0.05), tau=3)

    ref_net, ref_opt = make()
    ref = train(ref_net, ref_opt, 9, rank)
    net, opt = make()
    train(net, opt, 5, rank)                               # position 2: a full step would end the round
    opt.zero_grad(set_to_none=True)
    launches = opt.comm_stats()["launches"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = get_optimizer_state_dict(net, opt)
    with pytest.warns(RuntimeWarning, match="holds no CO2 state"):
        set_optimizer_state_dict(net, opt, sd)
    assert (opt.position, opt.round, opt.comm_stats()["launches"]) == (2, 1, launches)
    rest = train(net, opt, 4, rank)
    for a, b in zip(rest[-1], ref[-1]):
        assert torch.equal(a, b)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["co2", "inner"])
def test_checkpoint_refused_on_one_rank_is_refused_on_every_rank(where):
    """A checkpoint that only the last rank refuses (its CO2 part, or its inner optimizer's part) raises on
    every rank, naming that rank, and leaves every rank's optimizer exactly as it was."""
    from mpi_helpers import all_ranks_true, roundtrip

    rank, n = dist.get_rank(), dist.get_world_size()
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), tau=3)
    train(model, opt, 7, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck = roundtrip(opt.state_dict())
        before = roundtrip(opt.state_dict())
    if rank == n - 1:
        if where == "co2":
            ck["commopt"]["version"] = 99
        else:
            ck["param_groups"] = ck["param_groups"] + ck["param_groups"]  # a group the optimizer lacks
    # one real change elsewhere, so that a partial load would show
    ck["state"] = {k: {**v, "momentum_buffer": v["momentum_buffer"] + 1.0} for k, v in ck["state"].items()}
    error = None
    try:
        opt.load_state_dict(ck)
    except ValueError as exc:
        error = str(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = opt.state_dict()
    same = all(torch.equal(after["state"][k]["momentum_buffer"], before["state"][k]["momentum_buffer"])
               for k in before["state"]) and after["commopt"]["round"] == before["commopt"]["round"] \
        and torch.equal(after["commopt"]["anchor"], before["commopt"]["anchor"])
    ok = error is not None and f"rank(s) [{n - 1}]" in error and same
    assert all_ranks_true(ok), (error, same)
    train(model, opt, 3, rank)   # still usable, still in step with the other ranks
    opt.finish()
    assert len(set(gather(bits(model.parameters())))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_rank0s_checkpoint_saved_after_finish_warns_for_a_per_rank_inner_state(inner):
    """After finish() the model, θ and m agree on every rank, but the inner optimizer's state (AdamW's moments)
    was never averaged: loading rank 0's file elsewhere warns that the rank continues as a replica of rank 0.
    A stateless inner optimizer (plain SGD) leaves nothing per rank: no warning."""
    from mpi_helpers import all_ranks_true, roundtrip

    rank = dist.get_rank()

    def make(model):
        if inner == "adamw":
            return CO2(model, torch.optim.AdamW(model.parameters(), lr=1e-2), tau=3)
        return CO2(model, torch.optim.SGD(model.parameters(), lr=0.05), tau=3)

    model = linear()
    opt = make(model)
    train(model, opt, 7, rank)
    opt.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # consensus point: no "save per rank" warning
        ck = [roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})]
    dist.broadcast_object_list(ck, src=0)
    fresh = torch.nn.Linear(D_IN, 1).double()
    fopt = make(fresh)
    fresh.load_state_dict(ck[0]["model"])
    error = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            fopt.load_state_dict(ck[0]["opt"])
        except Exception as exc:
            error = exc
    msgs = [str(w.message) for w in rec]
    want = 1 if (inner == "adamw" and rank != 0) else 0
    ok = error is None and len(msgs) == want and all(
        f"rank {rank} continues as a replica of rank 0, taking its inner optimizer's state" in m for m in msgs)
    assert all_ranks_true(ok), (error, msgs)
    train(fresh, fopt, 5, rank)
    fopt.finish()
    assert len(set(gather(bits(fresh.parameters())))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("unscale", [False, True], ids=["scaler-step", "unscale-then-step"])
def test_grad_scaler_overflow_on_one_rank_keeps_the_rounds_aligned(unscale):
    """GradScaler skips ``step()`` of an optimizer whose gradients overflowed; CO2 never averages gradients, so
    one rank can overflow alone. CO2 takes the call anyway (only the inner step is skipped): every rank ends its
    rounds at the same step, the outer all-reduces match, and finish() leaves identical parameters."""
    from mpi_helpers import all_ranks_true

    rank, world = dist.get_rank(), dist.get_world_size()
    tau, steps, bad = 3, 11, 4                            # the last rank overflows on step 4 only (mid-round 1)
    model = linear()
    opt = CO2(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), tau=tau, check_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = rank_data(rank)
    trace = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        if step == bad and rank == world - 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        trace.append((opt.round, opt.position, opt.comm_stats()["launches"]))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all_ranks_true(finite)
    assert len(set(map(tuple, gather(trace)))) == 1, "the ranks' rounds drifted apart"
    assert trace[-1] == (steps // tau, steps % tau, steps // tau)
    scales = gather(scaler.get_scale())
    assert scales[-1] == 2.0 ** 9 and all(s == 2.0 ** 10 for s in scales[:-1])   # only the last rank backed off
    opt.finish()
    assert len(set(gather(bits(model.parameters()) + _replicated_bits(opt)))) == 1
    assert all_ranks_true(all(bool(torch.isfinite(p).all()) for p in model.parameters()))
