"""CompressedOptimizer in a training loop: LR schedulers, gradient accumulation with no_sync(),
non-finite gradients (with and without a real torch.amp.GradScaler)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import commopt
from mpi_helpers import all_ranks_true, all_slots, batch, bits, differing_params, differing_replicated, make_mlp_ddp


# -- 5. LR schedulers ----------------------------------------------------------------------------------


SCHEDULERS = {
    "steplr": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
               lambda t: 0.1 * 0.5 ** (t // 4)),
    "lambdalr": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
                 lambda t: 0.1 / (1 + t)),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
def test_lr_scheduler_drives_inner_optimizer_without_warnings(world, sched_name):
    r = world.rank
    make_sched, lr_at = SCHEDULERS[sched_name]
    model, ddp = make_mlp_ddp(sizes=(32, 16, 8), dtype=torch.float64)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = commopt.CompressedOptimizer(ddp, inner, compressor="topk:0.1", feedback="econtrol")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = make_sched(opt)
        for t in range(12):
            lr = lr_at(t)
            assert inner.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-15)
            assert opt.param_groups[0]["lr"] == inner.param_groups[0]["lr"]
            assert sched.get_last_lr()[0] == pytest.approx(lr, rel=1e-15)
            x, y = batch(r, t, n_in=32, dtype=torch.float64)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            # plain SGD: p <- p - lr * (the estimate the hook left in .grad), with the scheduled lr
            for p, p0 in zip(model.parameters(), before):
                assert torch.equal(p.detach(), p0.add(p.grad, alpha=-inner.param_groups[0]["lr"]))
            sched.step()
    relevant = [str(w.message) for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step" in
                str(w.message) or issubclass(w.category, (UserWarning, DeprecationWarning, FutureWarning))]
    assert relevant == [], relevant
    assert inner.param_groups[0]["lr"] == pytest.approx(lr_at(12), rel=1e-15)
    dist.barrier()


# -- 6. gradient accumulation with no_sync() -------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", [("topk:0.05", "econtrol"), ("randk:0.05", "ef21"), ("topk:0.05", "ef14")])
def test_no_sync_accumulation_equals_one_concatenated_batch(world, comp, rule):
    r = world.rank

    def run(accumulate: bool) -> list[list[torch.Tensor]]:
        model, ddp = make_mlp_ddp(sizes=(32, 24, 24, 8), dtype=torch.float64, bucket_cap_mb=0.002)
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.002),
                                          compressor=comp, feedback=rule)
        iterates = []
        for t in range(40):
            x1, y1 = batch(r, 2 * t, rows=6, dtype=torch.float64)
            x2, y2 = batch(r, 2 * t + 1, rows=6, dtype=torch.float64)
            opt.zero_grad()
            if accumulate:
                with ddp.no_sync():
                    torch.nn.functional.mse_loss(ddp(x1), y1, reduction="sum").backward()
                torch.nn.functional.mse_loss(ddp(x2), y2, reduction="sum").backward()
            else:
                x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
                torch.nn.functional.mse_loss(ddp(x), y, reduction="sum").backward()
            opt.step()
            iterates.append([p.detach().clone() for p in model.parameters()])
        assert opt.comm_stats()["steps"] == 40  # no_sync backward passes are not hook steps
        return iterates

    accumulated, concatenated = run(True), run(False)
    worst = max(float((a - c).abs().max()) for pa, pc in zip(accumulated, concatenated) for a, c in zip(pa, pc))
    ok = worst <= 1e-10
    assert all_ranks_true(ok), f"rank {r}: max |accumulated - concatenated| = {worst:.3e}"


# -- 7. non-finite gradients -------------------------------------------------------------------------


def _nonfinite_grads(model) -> bool:
    return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in model.parameters())


def _unchanged(before: dict, after: dict) -> list[str]:
    if before.keys() != after.keys():
        return [f"slots {sorted(before)} -> {sorted(after)}"]
    return [f"bucket {i} slot {name}" for (i, name), t in before.items()
            if not torch.equal(bits(t), bits(after[(i, name)]))]


RULES_7 = ["econtrol", "ef21", "ef14", "ef21sgdm"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("rule", RULES_7)
@pytest.mark.parametrize("where,bad", [("loss", "nan"), ("loss", "inf"), ("one_param", "nan")])
def test_nonfinite_gradient_on_one_rank_skips_everywhere_and_keeps_state(world, rule, where, bad):
    """Rank 1 gets a non-finite gradient at step T (its whole loss, or a single parameter's gradient,
    i.e. one bucket): every rank's averaged gradient is non-finite, no feedback state moves on any rank
    (all slots, all buckets: the step is skipped as a whole), and training continues finite."""
    r = world.rank
    T = 6
    model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), bucket_cap_mb=0.005)
    params = list(model.parameters())
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(params, lr=0.05), compressor="topk:0.05", feedback=rule)
    value = float(bad)
    problems = []
    for t in range(T + 20):
        x, y = batch(r, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        handle = None
        if t == T and r == 1:
            if where == "loss":
                loss = loss * value
            else:  # only the first layer's weight (one DDP bucket) turns non-finite
                handle = params[0].register_hook(lambda g: torch.full_like(g, value))
        if t == T:
            before = all_slots(opt)
            assert len({i for i, _ in before}) >= 2, "needs several buckets"
        loss.backward()
        if handle is not None:
            handle.remove()
        if t == T:
            if not _nonfinite_grads(model):
                problems.append("averaged gradient is finite")
            problems += _unchanged(before, all_slots(opt))
            opt.zero_grad()  # skip the step, as a GradScaler would
            params_at_skip = [p.detach().clone() for p in params]
            continue
        if _nonfinite_grads(model):
            problems.append(f"step {t}: non-finite gradient")
        opt.step()
    drift = differing_replicated(opt) + [f"parameter {j}" for j in differing_params(params)]
    finite = all(torch.isfinite(p).all() for p in params)
    moved = any(not torch.equal(p, q) for p, q in zip(params, params_at_skip))
    stats = opt.comm_stats()
    # exactly the one injected step was skipped, on every rank; every backward pass was a hook step
    counts = (stats["skipped_rounds"], stats["steps"])
    assert all_ranks_true(not problems and not drift and finite and moved and counts == (1, T + 20)), \
        f"rank {r}: {problems} drift={drift} finite={finite} moved={moved} (skipped, steps)={counts}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("rule,where", [("econtrol", "loss"), ("ef21sgdm", "loss"), ("econtrol", "one_param")])
def test_gradscaler_overflow_on_one_rank_is_skipped_on_all(world, rule, where):
    """A real torch.amp.GradScaler (CPU) passed as grad_scaler=: the hook keeps the state in unscaled
    units (same iterates as without scaling), and an overflow on rank 1 makes every rank skip the step
    with the feedback state untouched (all buckets) and the scale backed off."""
    r = world.rank
    T = 7

    def run(scaled: bool, inject: bool):
        model, ddp = make_mlp_ddp(sizes=(32, 48, 48, 8), bucket_cap_mb=0.005)
        params = list(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10_000) if scaled else None
        opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(params, lr=0.05), compressor="topk:0.05",
                                          feedback=rule, grad_scaler=scaler)
        problems, trace = [], []
        for t in range(T + 10):
            x, y = batch(r, t)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            handle = None
            if inject and t == T and r == 1:
                if where == "loss":
                    loss = loss * float("inf")
                else:  # overflow in one layer only (one DDP bucket), the usual AMP case
                    handle = params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
            if scaled:
                if t == T:
                    before_slots, before_params = all_slots(opt), [p.detach().clone() for p in params]
                    scale_before = scaler.get_scale()
                scaler.scale(loss).backward()
                if handle is not None:
                    handle.remove()
                if inject and t == T and not _nonfinite_grads(model):
                    problems.append("scaled averaged gradient is finite")
                scaler.step(opt)
                scaler.update()
                if inject and t == T:
                    problems += _unchanged(before_slots, all_slots(opt))
                    if any(not torch.equal(p, q) for p, q in zip(params, before_params)):
                        problems.append("parameters moved on an overflow step")
                    if scaler.get_scale() != scale_before * scaler.get_backoff_factor():
                        problems.append(f"scale {scale_before} -> {scaler.get_scale()}, not backed off once")
            else:
                loss.backward()
                opt.step()
            trace.append([p.detach().clone() for p in params])
        finite = all(torch.isfinite(p).all() for p in params)
        drift = differing_replicated(opt) + [f"parameter {j}" for j in differing_params(params)]
        skipped = opt.comm_stats()["skipped_rounds"]
        if skipped != (1 if inject else 0):
            problems.append(f"{skipped} skipped rounds")
        return trace, problems + drift + ([] if finite else ["non-finite parameters"])

    plain, p0 = run(False, False)
    scaled, p1 = run(True, False)
    worst = max(float((a - b).abs().max()) for pa, pb in zip(plain, scaled) for a, b in zip(pa, pb))
    _, p2 = run(True, True)
    problems = p0 + p1 + p2 + ([] if worst <= 1e-6 else [f"scaled vs unscaled differ by {worst:.3e}"])
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_overflowing_warmup_is_extended_until_a_dense_round_succeeds(world):
    """SPEC §2: the state starts from an uncompressed gradient. If every warm-up round overflows (GradScaler's
    first steps), the hook stays dense until one succeeds, instead of compressing from a zero state."""
    r, n = world.rank, world.size
    model, ddp = make_mlp_ddp()
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.01),
                                      compressor="topk:0.05", feedback="ef21", warmup_steps=2)
    st = opt.hook_state
    grads = None
    for t in range(5):
        x, y = batch(r, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        if t < 3 and r == n - 1:
            loss = loss * float("inf")  # steps 0, 1 (warm-up) and 2 overflow on the last rank
        loss.backward()
        if t == 3:
            grads = [p.grad.detach().clone() for p in model.parameters()]
            state_after_3 = {i: {k: v.clone() for k, v in b.slots.items()} for i, b in st.blocks().items()}
            rounds_after_3 = (st.stats["dense_rounds"], st.stats["compressed_rounds"])
        if t >= 3:
            opt.step()
    blocks = len(st.blocks())
    # steps 0-3 dense (2 warm-up + 2 extended while the dense round overflowed), step 4 compressed
    assert rounds_after_3[1] == 0, rounds_after_3
    assert st.stats["compressed_rounds"] == blocks
    assert st.skipped_rounds() == 3
    # the state after step 3 is the dense initialisation from step 3's averaged gradient: w = mean g
    flat = torch.cat([g.reshape(-1) for g in grads])
    w_total = sum(float(s["w"].abs().sum()) for s in state_after_3.values())
    assert w_total > 0 and abs(w_total - float(flat.abs().sum())) < 1e-5 * max(1.0, w_total)
    assert all_ranks_true(not differing_replicated(opt))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
def test_verify_replicated_state_catches_a_single_flipped_bit_on_one_rank(world):
    r, n = world.rank, world.size
    model, ddp = make_mlp_ddp()
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.01),
                                      compressor="topk:0.05", feedback="econtrol")
    for t in range(4):
        x, y = batch(r, t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    opt.verify_replicated_state()  # identical so far
    if r == n - 1:
        h = opt.hook_state.blocks()[0].slots["h"]
        h.view(torch.int32)[0] ^= 1  # one bit of the replicated estimator
    with pytest.raises(RuntimeError, match="differs across ranks"):
        opt.verify_replicated_state()
