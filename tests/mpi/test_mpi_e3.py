"""SPEC §5 E3: the E2 quadratic, one worker per rank, through real DDP + CompressedOptimizer on gloo,
matches the float64 NumPy simulation of the same n workers (tests/reference.py) to 1e-10, and the
replicated state (w / h) is bitwise identical on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import differing_params, differing_replicated, replicated_slots
from reference import e2_problem, simulate

D = 20
STEPS = 300
LR = 0.005      # about the EF21 theory step of E2 (SPEC §5)
WARMUP = 2
RANDK_K = 3
RULES = ["none", "ef14", "ef21", "ef21sgdm", "econtrol"]


class Quadratic(torch.nn.Module):
    """f_i(x) = ½‖a_i x − b_i‖² with the rank's (a_i, b_i); x starts at 0 (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))

    def forward(self, a: float, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((a * self.x - b) ** 2).sum()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("comp", ["topk", "randk"])
def test_e3_matches_reference_and_replicated_state_is_bitwise_identical(world, comp, rule):
    n, r = world.size, world.rank
    a, b, grad_fns, f, f_star = e2_problem(n=n, d=D)
    k = 1 if comp == "topk" else RANDK_K
    compressor = commopt.TopK(k=k) if comp == "topk" else commopt.RandK(k=k, seed=17)

    model = Quadratic()
    ddp = DDP(model)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=LR),
                                      compressor=compressor, feedback=rule, warmup_steps=WARMUP)
    ai, bi = float(a[r]), torch.tensor(b[r], dtype=torch.float64)
    iterates = [model.x.detach().clone()]
    drift = []
    for t in range(STEPS):
        opt.zero_grad()
        ddp(ai, bi).backward()
        opt.step()
        iterates.append(model.x.detach().clone())
        if t % 100 == 99:  # every rank at the same steps
            drift += [f"step {t}: {name}" for name in differing_replicated(opt)]
    drift += [f"parameter {j}" for j in differing_params(model.parameters())]
    opt.verify_replicated_state()  # commopt's own checksum agrees

    st = opt.hook_state
    assert len(st.blocks()) == 1 and st.blocks()[0].d == D and st.blocks()[0].k == k
    if rule in ("ef21", "ef21sgdm", "econtrol"):
        assert replicated_slots(opt), "the rule keeps a replicated estimator"
    key = st.blocks()[0].key
    rand_index = (lambda t: compressor.select(torch.zeros(D, dtype=torch.float64), k, t, key).numpy())
    ref = simulate(grad_fns, np.zeros(D), LR, STEPS, rule, k, compressor=comp, warmup=WARMUP,
                   eta=(k / D if rule == "econtrol" else 0.0),  # eta=None means the density k/d
                   rand_index=rand_index if comp == "randk" else None)
    got = np.stack([x.numpy() for x in iterates])
    want = np.stack(ref)
    err = np.abs(got - want).max(axis=1)
    assert drift == [], f"rank {r}: not bitwise identical across ranks: {drift}"
    assert err.max() <= 1e-10, \
        f"rank {r}: max |x - x_ref| = {err.max():.3e}, first above 1e-10 at step {int(np.argmax(err > 1e-10))}"
    assert np.isfinite(got).all()
    assert opt.comm_stats()["collective"] == ("gather" if comp == "topk" else "shared")
    dist.barrier()
