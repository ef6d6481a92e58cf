"""SPEC §9 compact messages through real DDP on gloo: a model of several buckets trained with
``CompressedOptimizer(compressor="topk:0.05,chunk=256,values=int8")`` matches :func:`commopt.simulate` of
the same ranks bucket by bucket (float64, 1e-10), the replicated state is bitwise identical on every rank,
and ``comm_stats()`` counts the compact message sizes; the packed all-gather itself (uint8 rows, decoded
and summed in rank order) gives every rank bitwise the ordered sum of the decoded messages.

Run: ``mpiexec -n 2 .venv/bin/python -m pytest --with-mpi tests/mpi/test_mpi_compact.py`` (also -n 4).

The loss is separable over parameters (f_r = Σ_j ½‖a_r x_j − b_rj‖²), so each bucket's gradient depends on
that bucket's parameters only and one single-bucket simulation per bucket reproduces the whole run.

The hook sends ``out.packed`` (``exchange.send(..., packed=out.packed)``) and counts
``exchange.message_bytes(..., wire=compressor.wire)``; a spy on :meth:`Exchange.send` checks that every
compressed round's gather moved the packed message.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from commopt.compressors import make_compressor
from commopt.exchange import Exchange, ordered_sum, ring_allreduce_bytes
from commopt.feedback import make_feedback
from commopt.round import compress
from commopt.simulate import simulate
from mpi_helpers import differing_params, differing_replicated, replicated_slots, same_on_all_ranks

F64 = torch.float64
SIZES = (700, 300, 1000, 513, 256, 900)
STEPS = 40
WARMUP = 2
LR = 0.01
SPEC = "topk:0.05,chunk=256,values=int8"
RULES = ["none", "ef14", "ef21", "ef21sgdm", "econtrol"]


class Separable(torch.nn.Module):
    """f_r(x) = Σ_j ½‖a_r x_j − b_rj‖² over several parameter tensors x_j (float64)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(99)
        self.xs = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in SIZES)

    def forward(self, a: float, bs: "list[torch.Tensor]") -> torch.Tensor:
        return sum(0.5 * ((a * x - b) ** 2).sum() for x, b in zip(self.xs, bs))


def _problem(n: int) -> "tuple[list[float], list[list[torch.Tensor]]]":
    """a_r = (r + 1)/√n and targets b_rj, the same on every rank."""
    a = [(r + 1) / math.sqrt(n) for r in range(n)]
    b = [[torch.randn(s, generator=torch.Generator().manual_seed(1000 * r + j), dtype=F64) * (1 + j)
          for j, s in enumerate(SIZES)] for r in range(n)]
    return a, b


def _spy_on_gathers(monkeypatch) -> dict:
    """Count the gathers :meth:`Exchange.send` is asked for, and those given a packed message."""
    real_send = Exchange.send
    seen = {"gathers": 0, "packed": 0}

    def send(self, kind, idx, vals, d, out_dtype, out=None, packed=None):
        seen["gathers"] += int(kind == "gather")
        seen["packed"] += int(kind == "gather" and packed is not None)
        return real_send(self, kind, idx, vals, d, out_dtype, out=out, packed=packed)

    monkeypatch.setattr(Exchange, "send", send)
    return seen


def _train(world, spec: str, rule: str):
    n, r = world.size, world.rank
    a, b = _problem(n)
    model = Separable()
    x0 = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model, bucket_cap_mb=0.01)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=LR), compressor=spec,
                                      feedback=rule, warmup_steps=WARMUP)
    iterates = []
    for _ in range(STEPS):
        opt.zero_grad()
        ddp(a[r], b[r]).backward()
        opt.step()
        iterates.append([p.detach().clone() for p in model.parameters()])
    return opt, model, x0, iterates, a, b


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("rule", RULES)
def test_compact_ddp_matches_simulate_bucket_by_bucket(world, monkeypatch, rule):
    n, r = world.size, world.rank
    comp = make_compressor(SPEC)
    seen = _spy_on_gathers(monkeypatch)
    opt, model, x0, iterates, a, b = _train(world, SPEC, rule)
    drift = differing_replicated(opt) + [f"parameter {j}" for j in differing_params(model.parameters())]
    opt.verify_replicated_state()
    st = opt.hook_state
    blocks = st.blocks()
    assert len(blocks) >= 2, "the model must span several buckets"
    if rule in ("ef21", "ef21sgdm", "econtrol"):
        assert replicated_slots(opt)

    worst, compact = 0.0, 0.0
    for blk in blocks.values():
        assert blk.k == comp.num_selected(blk.d) and blk.exchange == "gather"
        parts = list(zip(blk.pids, blk.offsets(), blk.numels))

        def flat(params, parts=parts):
            return torch.cat([params[pid].reshape(-1) for pid, _, _ in parts])

        def grad_fn(v, rr, parts=parts):
            out = torch.empty_like(v)
            for pid, off, num in parts:
                out[off:off + num] = a[rr] * (a[rr] * v[off:off + num] - b[rr][pid])
            return out

        fns = [(lambda v, rr=rr: grad_fn(v, rr)) for rr in range(n)]
        want = simulate(fns, flat(x0), LR, STEPS, comp, make_feedback(rule), warmup=WARMUP, key=blk.key)
        for t in range(STEPS):
            worst = max(worst, float((flat(iterates[t]) - want[t + 1]).abs().max()))
        if blk is blocks[0]:  # the int8 values really are quantized: the float run differs
            plain = simulate(fns, flat(x0), LR, WARMUP + 1, make_compressor("topk:0.05,chunk=256"),
                             make_feedback(rule), warmup=WARMUP, key=blk.key)
            assert float((plain[-1] - want[WARMUP + 1]).abs().max()) > 1e-8
        dense = WARMUP * ring_allreduce_bytes(blk.d, 8, n)
        compact += dense + (STEPS - WARMUP) * (n - 1) * comp.wire.nbytes(blk.k, blk.d, F64)

    assert drift == [], f"rank {r}: not bitwise identical across ranks: {drift}"
    assert worst <= 1e-10, f"rank {r}: max |x - x_sim| = {worst:.3e}"
    got = opt.comm_stats()["bytes_sent"]
    assert opt.comm_stats()["collective"] == "gather"
    assert got == int(round(compact)), f"rank {r}: comm_stats bytes {got}, the compact formula {compact:.0f}"
    assert seen["gathers"] == seen["packed"] == (STEPS - WARMUP) * len(blocks)
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("rule", ["ef21", "econtrol"])
def test_randk_bf16_values_match_simulate(world, rule):
    """RandK with values='bf16': the rounded values are fed back and all-reduced as floats (shared)."""
    n, r = world.size, world.rank
    spec = "randk:0.05,values=bf16,seed=5"
    comp = make_compressor(spec)
    opt, model, x0, iterates, a, b = _train(world, spec, rule)
    drift = differing_replicated(opt) + [f"parameter {j}" for j in differing_params(model.parameters())]
    worst = 0.0
    for blk in opt.hook_state.blocks().values():
        assert blk.exchange == "shared"
        # RandK picks its coordinates in parameter order (the hook maps them to the bucket's order): the
        # rules are elementwise, so simulating the block in parameter order gives the same iterates
        parts, off = [], 0
        for pid, num in sorted(zip(blk.pids, blk.numels)):
            parts.append((pid, off, num))
            off += num

        def grad_fn(v, rr, parts=parts):
            out = torch.empty_like(v)
            for pid, off, num in parts:
                out[off:off + num] = a[rr] * (a[rr] * v[off:off + num] - b[rr][pid])
            return out

        flat = (lambda params, parts=parts: torch.cat([params[pid].reshape(-1) for pid, _, _ in parts]))
        want = simulate([(lambda v, rr=rr: grad_fn(v, rr)) for rr in range(n)], flat(x0), LR, STEPS, comp,
                        make_feedback(rule), warmup=WARMUP, key=blk.key)
        worst = max(worst, max(float((flat(iterates[t]) - want[t + 1]).abs().max()) for t in range(STEPS)))
    assert drift == [], f"rank {r}: {drift}"
    assert worst <= 1e-10, f"rank {r}: max |x - x_sim| = {worst:.3e}"
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("spec", ["topk:0.01,chunk=4096,values=int8", "topk:0.02,chunk=512,values=int4",
                                  "topk:0.02,values=int8", "topk:0.02,chunk=1000", "topk:0.02,values=bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_all_gather_is_the_ordered_sum_of_decoded_messages(world, spec, dtype):
    """Exchange.send(kind='gather', packed=...) over gloo (uint8 rows): every rank gets bitwise the rank-ordered
    sum of every rank's decoded message, and receives (n−1)·nbytes."""
    n, r = world.size, world.rank
    comp, fb = make_compressor(spec), make_feedback("ef14")
    d = 20_000 + 37
    k = comp.num_selected(d)

    def message(rank: int):
        g = torch.randn(d, generator=torch.Generator().manual_seed(rank), dtype=torch.float32).to(dtype)
        g[rank::97] *= 50.0
        sdt = torch.float32
        return compress(comp, fb, {"e": torch.zeros(d, dtype=sdt)}, g.to(sdt), k, 3, 11, wire_dtype=dtype)

    mine = message(r)
    assert mine.packed is not None and mine.packed.data.dtype == torch.uint8
    ex = Exchange(None)
    total = ex.send("gather", mine.idx, mine.vals, d, torch.float32, packed=mine.packed).wait()
    want = ordered_sum([(o.idx, o.vals) for o in (message(q) for q in range(n))], d, torch.float32)
    assert torch.equal(total, want), f"rank {r}"
    assert same_on_all_ranks(total)
    assert ex.message_bytes("gather", k, d, dtype, wire=comp.wire) == (n - 1) * mine.packed.nbytes
    dist.barrier()
