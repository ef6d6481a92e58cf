"""Ranks configured differently: CompressedOptimizer raises on EVERY rank (none is left waiting in a
collective), naming what differs. Construction errors: non-DDP model, foreign tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import all_ranks_true, batch, make_mlp_ddp, train_step


def _build_error(make) -> "Exception | None":
    try:
        make()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def _check_raises_everywhere(exc, r: int, must_name: str) -> None:
    ok = isinstance(exc, ValueError) and must_name in str(exc)
    # every rank reached this point (no rank hangs) and every rank raised
    assert all_ranks_true(ok), f"rank {r}: expected ValueError naming {must_name!r}, got {exc!r}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("what,rank0,others,must_name", [
    ("compressor", "topk:0.01", "topk:0.02", "compressor.ratio"),
    ("compressor", "topk:0.01", "randk:0.01", "compressor.name"),
    ("feedback", "econtrol", "ef21", "feedback.name"),
    ("feedback", "ef21sgdm:0.1", "ef21sgdm:0.2", "feedback.beta"),
])
def test_mismatched_configuration_raises_on_every_rank(world, what, rank0, others, must_name):
    r = world.rank
    model, ddp = make_mlp_ddp(sizes=(32, 16, 8))
    kwargs = {"compressor": "topk:0.01", "feedback": "econtrol", what: rank0 if r == 0 else others}
    exc = _build_error(lambda: commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs))
    _check_raises_everywhere(exc, r, must_name)
    # the process group is still usable: a consistent optimizer trains afterwards
    model, ddp = make_mlp_ddp(sizes=(32, 16, 8))
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1), compressor="topk:0.1")
    for t in range(3):
        train_step(ddp, opt, *batch(r, t))
    dist.barrier()


class _Net(torch.nn.Module):
    """The same trainable layer on every rank; a frozen parameter whose shape depends on the rank."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 8)
        self.extra = torch.nn.Parameter(torch.zeros(extra), requires_grad=False)

    def forward(self, x):
        return self.lin(x) + self.extra.sum()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_mismatched_model_shapes_raise_on_every_rank(world):
    """DDP itself only compares the parameters it reduces (and raises on one rank only when their shapes
    differ, leaving the others in a collective); here the differing parameter is one DDP ignores, so the
    model signature in CompressedOptimizer's consistency check is what catches it."""
    r = world.rank
    torch.manual_seed(0)
    model = _Net(extra=2 if r == 0 else 3)
    DDP._set_params_and_buffers_to_ignore_for_model(model, ["extra"])
    ddp = DDP(model)
    exc = _build_error(lambda: commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.lin.parameters(), lr=0.1)))
    _check_raises_everywhere(exc, r, "model")
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_mismatched_parameter_names_raise_on_every_rank(world):
    """Same shapes (DDP is satisfied), different module structure: the signature names the parameters."""
    r = world.rank
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8)) if r == 0 else torch.nn.Sequential(
        torch.nn.Identity(), torch.nn.Linear(32, 8))
    ddp = DDP(model)
    exc = _build_error(lambda: commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1)))
    _check_raises_everywhere(exc, r, "model")
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_construction_errors(world):
    r = world.rank
    model, ddp = make_mlp_ddp(sizes=(32, 16, 8))
    # a module that is not DistributedDataParallel
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        commopt.CompressedOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    # an optimizer that holds a tensor the DDP model does not own
    foreign = torch.nn.Parameter(torch.zeros(3))
    exc = _build_error(lambda: commopt.CompressedOptimizer(
        ddp, torch.optim.SGD(list(model.parameters()) + [foreign], lr=0.1)))
    _check_raises_everywhere(exc, r, "not parameters of the DDP model")
    # only one rank with a foreign tensor: still an error on every rank
    params = list(model.parameters()) + ([foreign] if r == 1 else [])
    exc = _build_error(lambda: commopt.CompressedOptimizer(ddp, torch.optim.SGD(params, lr=0.1)))
    ok = isinstance(exc, ValueError)
    assert all_ranks_true(ok), f"rank {r}: {exc!r}"
    # a consistent construction on the same DDP model still works afterwards (no hook was registered)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.1), compressor="topk:0.1")
    for t in range(3):
        train_step(ddp, opt, *batch(r, t))
    dist.barrier()
