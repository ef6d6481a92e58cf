"""Several DDP buckets: replicated state and parameters stay bitwise identical across ranks, the
exchange is chosen by the k/d < 1/n rule, and bytes_sent follows the SPEC §3 formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import commopt
from mpi_helpers import batch, differing_params, differing_replicated, make_mlp_ddp, replicated_slots, train_step


def expected_exchange(comp: str, k: int, d: int, n: int) -> str:
    """SPEC §3: shared indices -> all-reduce of k values; TopK -> all-gather while k/d < 1/n, else dense."""
    if k >= d:
        return "dense"
    if comp == "randk":
        return "shared"
    return "gather" if k * n < d else "dense"


def bucket_bytes(kind: str, k: int, d: int, n: int) -> float:
    """Bytes each rank receives for one bucket (float32 values, int32 indices), SPEC §3."""
    if kind == "dense":
        return 2 * (n - 1) / n * 4 * d
    if kind == "gather":
        return (n - 1) * 8 * k
    if kind == "shared":
        return 2 * (n - 1) / n * 4 * k
    raise AssertionError(kind)


CONFIGS = [("topk", 0.01, "econtrol"), ("topk", 0.3, "ef21"), ("randk", 0.05, "ef21sgdm")]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(150, method="thread")
@pytest.mark.parametrize("comp,ratio,rule", CONFIGS, ids=[f"{c}{r}-{f}" for c, r, f in CONFIGS])
def test_multi_bucket_state_and_params_stay_bitwise_identical(world, comp, ratio, rule):
    n, r = world.size, world.rank
    model, ddp = make_mlp_ddp()
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                      compressor=f"{comp}:{ratio}", feedback=rule)
    drift = []
    for t in range(300):
        x, y = batch(r, t)
        loss = train_step(ddp, opt, x, y)
        if t % 100 == 99:
            drift += [f"step {t}: {name}" for name in differing_replicated(opt)]
            opt.verify_replicated_state()
    drift += [f"parameter {j}" for j in differing_params(model.parameters())]
    buckets = opt.hook_state.blocks()
    kinds = {expected_exchange(comp, b.k, b.d, n) for b in buckets.values()}
    got_kinds = {b.exchange for b in buckets.values()}
    assert drift == [], f"rank {r}: {drift}"
    assert len(buckets) >= 3, f"expected several DDP buckets, got {len(buckets)}"
    assert sum(b.d for b in buckets.values()) == sum(p.numel() for p in model.parameters())
    assert len(replicated_slots(opt)) == len(buckets)
    assert got_kinds == kinds, (got_kinds, kinds)
    if comp == "topk" and ratio == 0.3:
        assert kinds == ({"dense"} if n >= 4 else {"gather"})  # k/d = 0.3 >= 1/n from n = 4 on
    assert opt.comm_stats()["collective"] == ("+".join(sorted(kinds - {"dense"})) or "dense")
    assert math.isfinite(float(loss))
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,ratio", [("topk", 0.01), ("topk", 0.3), ("randk", 0.05)])
def test_bytes_sent_follows_spec_formulas(world, comp, ratio):
    n, r = world.size, world.rank
    warmup, steps = 2, 7
    model, ddp = make_mlp_ddp()
    total_d = sum(p.numel() for p in model.parameters())
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.01),
                                      compressor=f"{comp}:{ratio}", feedback="econtrol", warmup_steps=warmup)
    for t in range(steps):
        train_step(ddp, opt, *batch(r, t))
    stats = opt.comm_stats()
    buckets = list(opt.hook_state.blocks().values())
    assert len(buckets) >= 3 and sum(b.d for b in buckets) == total_d
    dense_step = 2 * (n - 1) / n * 4 * total_d   # any bucket layout: the buckets cover every parameter once
    compressed_step = 0.0
    kinds = set()
    for b in buckets:
        k = max(1, math.floor(ratio * b.d))     # SPEC §1, computed here independently
        assert b.k == k
        kind = expected_exchange(comp, k, b.d, n)
        kinds.add(kind)
        compressed_step += bucket_bytes(kind, k, b.d, n)
    want_sent = warmup * dense_step + (steps - warmup) * compressed_step
    want_dense = steps * dense_step
    assert stats["steps"] == steps
    assert abs(stats["bytes_sent"] - want_sent) <= 1, (stats["bytes_sent"], want_sent)
    assert abs(stats["bytes_dense"] - want_dense) <= 1, (stats["bytes_dense"], want_dense)
    compressed_kinds = kinds - {"dense"}
    assert stats["collective"] == ("+".join(sorted(compressed_kinds)) if compressed_kinds else "dense")
    if comp == "randk":
        assert stats["collective"] == "shared"
    elif ratio == 0.01:
        assert stats["collective"] == "gather"
    else:
        assert stats["collective"] == ("dense" if n >= 4 else "gather")
    for kind in compressed_kinds:
        assert stats["collectives"][kind] == (steps - warmup) * sum(
            1 for b in buckets if expected_exchange(comp, b.k, b.d, n) == kind)
    assert stats["compressed_rounds"] == (steps - warmup) * len(buckets)
    if comp == "topk" and ratio == 0.01:
        assert compressed_step < 0.05 * dense_step  # the point of it all
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(150, method="thread")
@pytest.mark.parametrize("rule", ["econtrol", "ef21sgdm"])
def test_replicated_state_deterministic_over_500_stochastic_steps(world, rule):
    n, r = world.size, world.rank
    model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), bucket_cap_mb=0.005)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05),
                                      compressor="topk:0.01", feedback=rule, check_every=100)
    drift = []
    for t in range(500):
        x, y = batch(r, t, rows=8, seed=5)   # a fresh random minibatch per rank and step
        train_step(ddp, opt, x, y)
        if t % 125 == 124:
            drift += [f"step {t}: {name}" for name in differing_replicated(opt)]
            drift += [f"step {t}: parameter {j}" for j in differing_params(model.parameters())]
    assert drift == [], f"rank {r}: {drift}"
    assert len(opt.hook_state.blocks()) >= 2
    assert len(replicated_slots(opt)) == len(opt.hook_state.blocks())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    dist.barrier()
