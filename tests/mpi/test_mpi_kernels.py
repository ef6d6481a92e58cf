"""The OpenCL kernel path (COMMOPT_KERNELS=opencl, PoCL on the CPU) in multi-rank training (SPEC §10).

* after compressed steps under ``opencl`` the replicated state (EF21's w, EControl's h) and the
  parameters are bitwise identical on every rank;
* a full compressed training of a small model (CompressedOptimizer over gloo) gives bitwise the same
  parameters, feedback state and estimates under ``opencl`` and ``torch``, run in the same process, each
  with its own fresh DDP model and optimizer.

Run with ``mpiexec -n 2`` and ``-n 4`` (``--with-mpi``); skips where OpenCL is not usable.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commopt
import commopt.kernels as kernels
from commopt.consistency import assert_bitwise_same, bit_checksum
from mpi_helpers import (MLP, all_ranks_true, all_slots, batch, bits, differing_params, differing_replicated,
                         make_mlp_ddp)

try:
    from commopt.kernels.opencl import OpenCLLauncher, available
    _OK, _WHY = available()
except Exception as exc:  # noqa: BLE001
    _OK, _WHY = False, f"{type(exc).__name__}: {exc}"

pytestmark = pytest.mark.skipif(not _OK, reason=f"OpenCL is not usable here ({_WHY})")

STEPS = 24
SIZES = (32, 48, 48, 8)   # 4.3k parameters in several buckets of bucket_cap_mb=0.004 (1000 fp32)


@pytest.fixture
def launches(monkeypatch):
    """Counts OpenCL kernel launches (proof that the opencl run really ran the kernels)."""
    count = {"n": 0}
    real = OpenCLLauncher.launch

    def counted(self, *a, **kw):
        count["n"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(OpenCLLauncher, "launch", counted)
    return count


def _train(monkeypatch, mode: str, rank: int, comp: str, rule: str, steps: int = STEPS):
    monkeypatch.setenv("COMMOPT_KERNELS", mode)
    kernels.reset()
    model, ddp = make_mlp_ddp(sizes=SIZES, dtype=torch.float32, bucket_cap_mb=0.004, seed=3)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = commopt.CompressedOptimizer(ddp, inner, compressor=comp, feedback=rule, warmup_steps=2)
    o = kernels.ops(next(model.parameters()))
    assert o.name == mode and getattr(o, "failed", {}) == {}, getattr(o, "failed", None)
    grads = []
    for t in range(steps):
        x, y = batch(rank, t, n_in=SIZES[0], n_out=SIZES[-1], rows=8)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())  # the estimates
    assert opt.hook_state.stats["compressed_rounds"] > 0
    params = [p.detach().clone() for p in model.parameters()]
    return opt, params, all_slots(opt), grads


CASES = [("topk:0.05", "ef14"), ("randk:0.05", "econtrol"), ("topk:0.02", "ef21")]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("comp,rule", CASES)
def test_opencl_replicated_state_bitwise_identical_across_ranks(world, monkeypatch, launches, comp, rule):
    opt, params, slots, _ = _train(monkeypatch, "opencl", world.rank, comp, rule, steps=12)
    assert launches["n"] > 0
    bad = differing_replicated(opt)
    assert bad == [], f"rank {world.rank}: {bad}"
    assert differing_params(params) == []
    if opt.hook_state.feedback.shared_slots:
        assert len([key for key in slots if key[1] in opt.hook_state.feedback.shared_slots]) > 0
    # the consistency helpers agree (they raise on every rank if a checksum differs)
    shared = [t for (i, name), t in sorted(slots.items()) if name in opt.hook_state.feedback.shared_slots]
    assert_bitwise_same(bit_checksum(shared + params), what="replicated state and parameters")
    kernels.reset()
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("comp,rule", CASES[:2])
def test_training_bitwise_same_under_opencl_and_torch(world, monkeypatch, launches, comp, rule):
    r = world.rank
    _, p_ocl, s_ocl, g_ocl = _train(monkeypatch, "opencl", r, comp, rule)
    n_launched = launches["n"]
    _, p_ref, s_ref, g_ref = _train(monkeypatch, "torch", r, comp, rule)
    assert n_launched > 0 and launches["n"] == n_launched  # the torch run launched no kernel
    problems = []
    for j, (a, b) in enumerate(zip(p_ocl, p_ref)):
        if not torch.equal(bits(a), bits(b)):
            problems.append(f"parameter {j}: max |diff| {float((a - b).abs().max()):.3e}")
    if s_ocl.keys() != s_ref.keys():
        problems.append(f"slots {sorted(s_ocl)} vs {sorted(s_ref)}")
    else:
        problems += [f"slot {key}" for key in s_ocl if not torch.equal(bits(s_ocl[key]), bits(s_ref[key]))]
    problems += [f"estimate at step {t}" for t, (a, b) in enumerate(zip(g_ocl, g_ref))
                 if not torch.equal(bits(a), bits(b))]
    assert all_ranks_true(not problems), f"rank {r}: {problems[:5]}"
    assert all(bool(torch.isfinite(p).all()) for p in p_ocl)
    # and the two runs differ from the start (the training moved)
    torch.manual_seed(3)
    model0 = MLP(SIZES, torch.float32)  # make_mlp_ddp's initial model, without DDP
    assert any(not torch.equal(a, b.detach()) for a, b in zip(p_ocl, model0.parameters()))
    kernels.reset()
    dist.barrier()
