"""Density warm-up (Deep Gradient Compression's schedule) in the compressed hook, on real ranks."""

from __future__ import annotations

import math

import pytest
import torch

import commopt
from commopt.exchange import allgather_bytes, index_dtype
from commopt.hook import warmup_density
from mpi_helpers import differing_replicated, batch, make_mlp_ddp, train_step


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("rule", ["ef14", "econtrol"])
def test_density_warmup_sends_the_scheduled_k_then_the_compressors(world, rule):
    warm, start, ratio = 2, (0.3, 4), 0.02
    model, ddp = make_mlp_ddp(bucket_cap_mb=1.0)  # one bucket
    d = sum(p.numel() for p in model.parameters())
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05), compressor=f"topk:{ratio}",
                                      feedback=rule, warmup_steps=warm, density_warmup=start)
    n = world.size
    sent = []
    for t in range(warm + 7):
        before = opt.comm_stats()["bytes_sent"]
        train_step(ddp, opt, *batch(world.rank, t))
        sent.append(opt.comm_stats()["bytes_sent"] - before)
    entry = 4 + index_dtype(torch.float32).itemsize
    for j, got in enumerate(sent[warm:]):
        k_final = max(1, int(ratio * d))   # the compressor's k; the schedule decays to k_final / d
        k = max(k_final, int(warmup_density(k_final / d, start, j) * d))
        want = allgather_bytes(k, entry, n) if k * n < d else 2.0 * (n - 1) / n * 4 * d
        assert math.isclose(got, want, rel_tol=1e-9), (j, got, want)
    assert sent[warm] > sent[warm + 1] > sent[warm + 3] > sent[warm + 4] == sent[-1]
    assert differing_replicated(opt) == []


def test_warmup_density_schedule_and_validation():
    assert warmup_density(0.01, None, 0) == 0.01
    assert warmup_density(0.01, (0.25, 10), 0) == pytest.approx(0.25)
    assert warmup_density(0.01, (0.25, 10), 5) == pytest.approx(0.05)  # geometric mean of 0.25 and 0.01
    assert warmup_density(0.01, (0.25, 10), 10) == 0.01
    assert warmup_density(0.1, (0.05, 10), 0) == 0.1  # a start below the target density never lowers it
    from commopt.hook import check_density_warmup
    assert check_density_warmup((0.25, 0)) is None
    for bad in [(0.0, 5), (1.5, 5), (0.2, -1), (0.2, 2.5), 0.25, "x"]:
        with pytest.raises(ValueError):
            check_density_warmup(bad)
