"""What a real training script expects of CompressedOptimizer: unused parameters (find_unused_parameters),
a GradScaler that is used without being passed as grad_scaler=, and the two commit modes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import all_ranks_true, batch, differing_params, differing_replicated, make_mlp_ddp


class Branchy(torch.nn.Module):
    """An MLP whose `odd` layer is used only on odd steps (a conditional branch / an idle MoE expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 32)
        self.odd = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, use_odd: bool) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if use_odd:
            h = h + torch.tanh(self.odd(h))
        return self.out(h)


def _odd_slots(opt, model) -> dict[str, torch.Tensor]:
    """The feedback state of `odd`'s parameters, cut per parameter from their blocks."""
    st = opt.hook_state
    out = {}
    for name, p in model.odd.named_parameters():
        pid = st._param_ids[id(p)]
        blk, off = st._block_of[pid]
        n = p.numel()
        for slot, t in blk.slots.items():
            out[f"{name}.{slot}"] = t[off:off + n].clone()
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize("cap", [25.0, 0.001])
@pytest.mark.parametrize("rule,comp", [("ef14", "topk:0.2"), ("econtrol", "topk:0.2"), ("ef21sgdm", "randk:0.2")])
def test_unused_layer_keeps_its_state_and_takes_no_slots(world, rule, comp, cap):
    """A layer no rank uses in a step (find_unused_parameters=True) is not compressed as a zero gradient:
    its feedback state is bitwise what it was, and no TopK index of any rank's message falls in it."""
    r = world.rank
    torch.manual_seed(0)
    model = Branchy()
    # one bucket holds used and idle parameters alike: the idle ones must not take the used ones' slots
    # (a block made only of idle parameters still sends its fixed-size message, of zeros)
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=cap)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05), compressor=comp,
                                      feedback=rule)
    st = opt.hook_state
    assert st.track_unused
    sent = []
    real_send = st.exchange.send

    def spy(kind, idx, vals, d, out_dtype, out=None, packed=None):
        sent.append((idx.clone(), vals.clone(), d))
        return real_send(kind, idx, vals, d, out_dtype, out=out, packed=packed)

    st.exchange.send = spy
    problems = []
    for t in range(14):
        x, y = batch(r, t, n_in=16, n_out=4)
        use_odd = t % 2 == 1
        before = _odd_slots(opt, model) if t >= 4 else {}
        sent.clear()
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x, use_odd), y).backward()
        opt.step()
        if t >= 4 and not use_odd:  # compressed steps with the branch idle on every rank
            after = _odd_slots(opt, model)
            assert set(before) == set(after) and before
            problems += [f"step {t}: {k} changed" for k in before if not torch.equal(before[k], after[k])]
            ranges = []
            for p in model.odd.parameters():
                blk, off = st._block_of[st._param_ids[id(p)]]
                ranges.append((blk.d, off, off + p.numel()))
            for idx, vals, d in sent:
                for bd, lo, hi in ranges:
                    inside = (idx >= lo) & (idx < hi) if d == bd else torch.zeros_like(idx, dtype=torch.bool)
                    # slots go to idle coordinates only once the used ones are exhausted (then they carry 0)
                    idle = sum(h - l for b2, l, h in ranges if b2 == bd)
                    allowed = max(0, idx.numel() - (bd - idle))
                    if comp.startswith("topk") and int(inside.sum()) > allowed:
                        problems.append(f"step {t}: {int(inside.sum())} TopK slots in the idle layer")
                    if bool((vals[inside] != 0).any()):
                        problems.append(f"step {t}: non-zero values sent for the idle layer")
    problems += differing_replicated(opt) + [f"param {j}" for j in differing_params(list(model.parameters()))]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all_ranks_true(not problems), f"rank {r}: {problems[:6]}"
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
def test_layer_unused_on_one_rank_only_trains_and_stays_replicated(world):
    """Rank 0 uses the branch on every step, the others never: the branch still trains from rank 0's
    gradient, the other ranks' own state for it stays as it was, and the replicated state agrees."""
    r = world.rank
    torch.manual_seed(0)
    model = Branchy()
    ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.001)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05), compressor="topk:0.2",
                                      feedback="econtrol")
    w0 = model.odd.weight.detach().clone()
    for t in range(10):
        x, y = batch(r, t, n_in=16, n_out=4)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x, r == 0), y).backward()
        opt.step()
    moved = not torch.equal(model.odd.weight.detach(), w0)
    problems = differing_replicated(opt) + [f"param {j}" for j in differing_params(list(model.parameters()))]
    assert all_ranks_true(moved and not problems), f"rank {r}: moved={moved} {problems[:5]}"
    dist.barrier()


def _scaler_run(r: int, bind: str, rule: str, steps: int = 12):
    model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), bucket_cap_mb=0.005)
    params = list(model.parameters())
    # the scale doubles every 3 steps: a state kept in scaled units would mix units
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(params, lr=0.05), compressor="topk:0.05",
                                      feedback=rule, grad_scaler=scaler if bind == "explicit" else None)
    for t in range(steps):
        x, y = batch(r, t)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(ddp(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        scaler.step(opt)
        scaler.update()
    return opt, scaler, [p.detach().clone() for p in params]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize("rule", ["econtrol", "ef14"])
def test_gradscaler_not_passed_is_bound_at_its_first_step(world, rule):
    """`scaler.step(opt)` with a scaler not passed as grad_scaler=: commopt binds it, and the run is bitwise
    the run that passed it (the scale doubles every 3 steps, so units mixed in the state would show)."""
    r = world.rank
    opt_a, scaler_a, explicit = _scaler_run(r, "explicit", rule)
    opt_b, scaler_b, auto = _scaler_run(r, "auto", rule)
    assert opt_b.hook_state.grad_scaler is scaler_b
    assert scaler_b.get_scale() == scaler_a.get_scale() > 2.0 ** 10
    diff = [j for j, (a, b) in enumerate(zip(explicit, auto)) if not torch.equal(a, b)]
    assert all_ranks_true(not diff), f"rank {r}: parameters {diff} differ between explicit and auto-bound scaler"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize("rule", ["econtrol", "ef21sgdm", "ef14"])
def test_block_commit_matches_step_commit_on_finite_steps(world, rule):
    """commit="block" applies each bucket's state as soon as it is known; on finite steps the iterates and
    the state are bitwise those of the default commit="step"."""
    r = world.rank
    runs = []
    for commit in ("step", "block"):
        model, ddp = make_mlp_ddp(bucket_cap_mb=0.005)
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05),
                                          compressor="topk:0.05", feedback=rule, commit=commit)
        for t in range(8):
            x, y = batch(r, t)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        slots = {(i, n): t.clone() for i, b in opt.hook_state.blocks().items() for n, t in b.slots.items()}
        runs.append(([p.detach().clone() for p in model.parameters()], slots, opt))
    (pa, sa, _), (pb, sb, ob) = runs
    same = all(torch.equal(a, b) for a, b in zip(pa, pb)) and sa.keys() == sb.keys() and \
        all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all_ranks_true(same and not differing_replicated(ob)), f"rank {r}: block and step commits differ"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(90, method="thread")
def test_block_commit_skips_only_the_nonfinite_block(world):
    """commit="block": an overflow in one bucket on one rank leaves that block's state untouched on every
    rank; the other blocks advance (documented trade-off), the replicated state stays identical."""
    r = world.rank
    model, ddp = make_mlp_ddp(bucket_cap_mb=0.005)
    params = list(model.parameters())
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(params, lr=0.05), compressor="topk:0.05",
                                      feedback="econtrol", commit="block")
    st = opt.hook_state
    T = 6
    for t in range(T + 3):
        x, y = batch(r, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        handle = params[0].register_hook(lambda g: torch.full_like(g, float("inf"))) if (t == T and r == 1) else None
        if t == T:
            bad_blk = st._block_of[st._param_ids[id(params[0])]][0]
            before = {id(b): {n: v.clone() for n, v in b.slots.items()} for b in st.blocks().values()}
        loss.backward()
        if handle is not None:
            handle.remove()
        if t == T:
            after = {id(b): {n: v.clone() for n, v in b.slots.items()} for b in st.blocks().values()}
            untouched = {k: all(torch.equal(before[k][n], after[k][n]) for n in before[k]) for k in before}
            assert untouched[id(bad_blk)], "the non-finite block's state changed"
            assert not all(untouched.values()), "no finite block advanced"
            opt.zero_grad()  # skip the step, as GradScaler would
            continue
        opt.step()
    assert st.skipped_rounds() == 1
    assert all(torch.isfinite(p).all() for p in params)
    assert all_ranks_true(not differing_replicated(opt) and not differing_params(params))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120, method="thread")
def test_resume_while_warmup_is_extended_by_overflow_is_exact(world):
    """Every warm-up round overflows on the last rank (GradScaler's first steps); a per-rank checkpoint taken
    while the hook still has to read that the last dense round overflowed resumes bitwise: the resumed run
    also stays dense instead of compressing from the overflowed round's zero state."""
    from mpi_helpers import roundtrip
    r, n = world.rank, world.size
    T, SAVE = 9, 3

    def make():
        model, ddp = make_mlp_ddp(bucket_cap_mb=0.005)
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.05),
                                          compressor="topk:0.05", feedback="econtrol")
        return model, ddp, opt

    def step(ddp, opt, t):
        x, y = batch(r, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        if t < SAVE and r == n - 1:
            loss = loss * float("inf")
        loss.backward()
        if all(torch.isfinite(p.grad).all() for p in ddp.module.parameters()):
            opt.step()

    model, ddp, opt = make()
    ck = None
    for t in range(T):
        if t == SAVE:
            ck = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
        step(ddp, opt, t)
    full = [p.detach().clone() for p in model.parameters()]
    dense_full = opt.comm_stats()["dense_rounds"]

    model2, ddp2, opt2 = make()
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    for t in range(SAVE, T):
        step(ddp2, opt2, t)
    same = all(torch.equal(a, b.detach()) for a, b in zip(full, model2.parameters()))
    assert all_ranks_true(same), f"rank {r}: resumed run differs (dense rounds {dense_full} vs " \
                                 f"{opt2.comm_stats()['dense_rounds']})"
