"""A process group aborted on purpose under a running optimizer (gloo; ``mpiexec -n 2|4 ... --with-mpi``).

The last rank leaves a private group (``destroy_process_group(g)``) in the middle of training; every
other rank's next collective on that group times out (3 s). The survivors must raise an error that
names commopt's collective (not one wrapped once per future level, not silence), from ``backward()``
(CompressedOptimizer) or ``step()`` (CO2, MKOR), and keep their optimizer state as it was.

A killed peer (SIGKILL) is tried in ``experiments/soak_job.py`` and ``tests/test_teardown.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt

TIMEOUT = timedelta(seconds=3)
NAMED = r"commopt: the (all_gather_into_tensor|all_reduce|outer all_reduce) .*failed on rank \d+ of \d+: .*"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def _batch(t: int, rank: int) -> "tuple[torch.Tensor, torch.Tensor]":
    g = torch.Generator().manual_seed(100 * t + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _leave_or_fail(world, group, fail) -> None:
    """The last rank leaves ``group``; the others run ``fail()``, which must raise a named error."""
    if world.rank == world.size - 1:
        dist.destroy_process_group(group)
    else:
        with pytest.raises(RuntimeError, match=NAMED) as info:
            fail()
        msg = str(info.value)
        assert msg.count("Got the following error when running the callback") <= 1, msg
        dist.destroy_process_group(group)
    dist.barrier()  # the default group is still whole


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("compressor,feedback,cap", [("topk:0.1", "econtrol", 25.0), ("topk:0.1", "ef21", 0.001),
                                                     ("randk:0.1", "ef14", 25.0)])
def test_compressed_optimizer_raises_in_backward_and_keeps_its_state(world, compressor, feedback, cap):
    g = dist.new_group(backend="gloo", timeout=TIMEOUT)
    m = _model()
    ddp = DDP(m, process_group=g, bucket_cap_mb=cap)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(m.parameters(), lr=0.05), compressor=compressor,
                                      feedback=feedback)
    st = opt.hook_state

    def step(t):
        x, y = _batch(t, world.rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()

    for t in range(5):
        step(t)
    slots = [v for _, b in sorted(st.blocks().items()) for _, v in sorted(b.slots.items())]
    assert slots
    before, params = _snapshot(slots), _snapshot(m.parameters())
    _leave_or_fail(world, g, lambda: step(5))
    if world.rank != world.size - 1:
        after = [v for _, b in sorted(st.blocks().items()) for _, v in sorted(b.slots.items())]
        assert _same(before, after), "a failed exchange changed the feedback state"
        assert _same(params, list(m.parameters())), "a failed step changed the parameters"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("compressor", [None, "topk:0.1"], ids=["dense-outer", "compressed-outer"])
def test_co2_raises_in_step_when_its_outer_all_reduce_fails(world, compressor):
    g = dist.new_group(backend="gloo", timeout=TIMEOUT)
    m = _model()
    kw = {"compressor": compressor} if compressor else {}
    opt = commopt.CO2(m, torch.optim.SGD(m.parameters(), lr=0.05), tau=2, process_group=g, **kw)

    def step(t):
        x, y = _batch(t, world.rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()

    for t in range(5):   # rounds end after steps 1 and 3: the all-reduce of step 3 is in flight on every rank
        step(t)
    if world.rank == world.size - 1:
        dist.destroy_process_group(g)   # completes the all-reduce in flight, then leaves
    else:
        step(5)          # applies step 3's all-reduce and launches round 3's, which nobody else joins
        step(6)
        theta, m_outer = opt._theta.clone(), opt._m.clone()
        slots = _snapshot(opt.exchange.slots.values())
        with pytest.raises(RuntimeError, match=NAMED):
            step(7)      # ends round 3: waits for the all-reduce launched at step 5
        assert torch.equal(theta, opt._theta) and torch.equal(m_outer, opt._m), "a failed all-reduce changed θ, m"
        assert _same(slots, list(opt.exchange.slots.values()))
        dist.destroy_process_group(g)
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_mkor_raises_in_step_when_its_statistics_all_reduce_fails(world):
    g = dist.new_group(backend="gloo", timeout=TIMEOUT)
    m = _model()   # no DDP: MKOR's statistics all-reduce is the only collective on g
    opt = commopt.MKOR(m, torch.optim.SGD(m.parameters(), lr=0.05), update_every=1, process_group=g)

    def step(t):
        x, y = _batch(t, world.rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()

    for t in range(3):
        step(t)
    params = _snapshot(m.parameters())
    if world.rank == world.size - 1:
        dist.destroy_process_group(g)
    else:
        with pytest.raises(commopt.exchange.CollectiveError,
                           match=r"^commopt: MKOR's statistics all_reduce \(\d+ values, float32, step 3\) failed on "
                                 r"rank \d+ of \d+: \S.*") as info:
            step(3)
        assert isinstance(info.value.__cause__, RuntimeError), "not chained from the backend's error"
        assert _same(params, list(m.parameters())), "a failed MKOR step changed the parameters"
        dist.destroy_process_group(g)
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_co2_checkpoint_without_its_state_on_one_rank_only_is_refused_on_every_rank(world):
    """One rank loads a plain optimizer checkpoint (no 'commopt' entry), the others CO2's full one: the two
    load paths run different collectives, so every rank refuses with nothing changed (no hang)."""
    m = _model()
    opt = commopt.CO2(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), tau=2)
    for t in range(3):
        x, y = _batch(t, world.rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    sd = opt.state_dict()
    if world.rank == world.size - 1:
        sd = {k: v for k, v in sd.items() if k != "commopt"}
    theta, inner = opt._theta.clone(), [s["momentum_buffer"].clone() for s in opt.optimizer.state.values()]
    with pytest.raises(ValueError, match=rf"rank\(s\) \[{world.size - 1}\] loaded a checkpoint without CO2's state"):
        opt.load_state_dict(sd)
    assert torch.equal(theta, opt._theta)
    assert _same(inner, [s["momentum_buffer"] for s in opt.optimizer.state.values()])
    opt.finish()   # the ranks are still in step
