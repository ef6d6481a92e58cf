"""CompressedOptimizer under DDP's other configurations, on gloo: bfloat16 / float16 models,
``gradient_as_bucket_view=True``, ``static_graph=True``, frozen parameters and ``torch.compile``.

Each configuration trains (the loss on a fixed data set falls), keeps the replicated state and the
parameters bitwise identical across ranks (``verify_replicated_state`` through ``check_every`` and the
helpers), and, where the option must not change the math, gives the same iterates as the run without
it: bitwise for ``gradient_as_bucket_view`` and frozen parameters, bitwise on 2 ranks and to rounding
on more for ``static_graph`` (it changes when DDP rebuilds its buckets), to rounding for a compiled model.
An fp16 model under a loss scale is checked against the loss-scaling identity (messages travel scaled).
(``find_unused_parameters=True`` is tested elsewhere.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commopt
from mpi_helpers import MLP, all_ranks_true, bits, differing_params, differing_replicated

SIZES = (32, 64, 64, 64, 8)
STEPS = 24
WARMUP = 2
CHECK_EVERY = 4
LR = 0.1

#: TopK at 1% and 10% with EControl / EF14, RandK with EF21
CONFIGS = [("topk:0.01", "econtrol"), ("topk:0.1", "ef14"), ("randk:0.05", "ef21")]
CONFIG_IDS = [f"{c}-{f}" for c, f in CONFIGS]


# -- a fixed, learnable per-rank data set -----------------------------------------------------------


def dataset(rank: int, dtype: torch.dtype, rows: int = 64):
    """x and a teacher's targets (the same teacher on every rank, rank-dependent inputs and offset)."""
    g = torch.Generator().manual_seed(4242)
    teacher = torch.randn(SIZES[0], SIZES[-1], generator=g, dtype=torch.float64) / SIZES[0] ** 0.5
    g.manual_seed(31 * rank + 7)
    x = torch.randn(rows, SIZES[0], generator=g, dtype=torch.float64)
    y = torch.tanh(x @ teacher) * 2 + 0.25 * rank
    return x.to(dtype), y.to(dtype)


def minibatch(data, t: int, rows: int = 16):
    x, y = data
    j = (t * rows) % x.shape[0]
    return x[j:j + rows], y[j:j + rows]


def global_loss(forward: Callable, data) -> float:
    """The mean over ranks of each rank's loss on its whole data set (the same number on every rank)."""
    with torch.no_grad():
        x, y = data
        loss = torch.nn.functional.mse_loss(forward(x).double(), y.double()).reshape(1)
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


# -- one training run ------------------------------------------------------------------------------


@dataclass
class Run:
    model: torch.nn.Module
    ddp: DDP
    opt: commopt.CompressedOptimizer
    iterates: list = field(default_factory=list)   # per step: clones of every parameter
    losses: list = field(default_factory=list)     # per step: the training minibatch loss (local)
    start: float = 0.0                             # global loss before / after training
    end: float = 0.0
    problems: list = field(default_factory=list)


def train(model: torch.nn.Module, comp: str, rule: str, rank: int, dtype=torch.float32,
          ddp_kwargs: Optional[dict] = None, wrap: Optional[Callable] = None,
          on_grads: Optional[Callable] = None, bucket_cap_mb: Optional[float] = None) -> Run:
    """STEPS SGD steps of CompressedOptimizer(DDP(model, **ddp_kwargs)); ``wrap`` turns the DDP model
    into the callable that runs the forward (torch.compile); ``on_grads(run, t)`` runs after each backward."""
    # by default about 2500 values per bucket whatever the dtype: several buckets
    cap = 0.0025 * dtype.itemsize if bucket_cap_mb is None else bucket_cap_mb
    ddp = DDP(model, bucket_cap_mb=cap, **(ddp_kwargs or {}))
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5),
                                      compressor=comp, feedback=rule, warmup_steps=WARMUP,
                                      check_every=CHECK_EVERY)
    forward = wrap(ddp) if wrap is not None else ddp
    run = Run(model, ddp, opt)
    data = dataset(rank, dtype)
    run.start = global_loss(model, data)
    for t in range(STEPS):
        x, y = minibatch(data, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(forward(x), y)
        loss.backward()
        if on_grads is not None:
            on_grads(run, t)
        opt.step()  # verify_replicated_state() every CHECK_EVERY steps: raises if w / h drifted
        run.losses.append(float(loss.detach()))
        run.iterates.append([p.detach().clone() for p in model.parameters()])
    run.end = global_loss(model, data)
    opt.verify_replicated_state()
    run.problems += differing_replicated(opt)
    run.problems += [f"parameter {j}" for j in differing_params(model.parameters())]
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        run.problems.append("non-finite parameters")
    return run


def expect_trained(run: Run, r: int, factor: float = 0.9, min_blocks: int = 3) -> None:
    """Every rank: no drift, compression ran in every block after warm-up, and the global loss fell."""
    st = run.opt.comm_stats()
    blocks = run.opt.hook_state.blocks()
    problems = list(run.problems)
    if st["steps"] != STEPS or st["skipped_rounds"] != 0:
        problems.append(f"steps {st['steps']}, skipped {st['skipped_rounds']}")
    if st["compressed_rounds"] != (STEPS - WARMUP) * len(blocks):
        problems.append(f"{st['compressed_rounds']} compressed rounds for {len(blocks)} blocks")
    if len(blocks) < min_blocks:
        problems.append(f"only {len(blocks)} blocks")
    if not run.end < factor * run.start:
        problems.append(f"global loss {run.start:.4f} -> {run.end:.4f}")
    assert all_ranks_true(not problems), f"rank {r}: {problems}"


def expected_bytes_sent(run: Run, itemsize: int) -> float:
    """SPEC §3 bytes for WARMUP dense steps, then one compressed message per block and step, with values of
    ``itemsize`` bytes (the bucket dtype) and int32 indices (int64 beside 8-byte values)."""
    n = dist.get_world_size()
    blocks = run.opt.hook_state.blocks().values()
    ring = 2 * (n - 1) / n
    dense_step = ring * itemsize * sum(b.d for b in blocks)
    per_kind = {"dense": lambda b: ring * itemsize * b.d, "shared": lambda b: ring * itemsize * b.k,
                "gather": lambda b: (n - 1) * (itemsize + (8 if itemsize == 8 else 4)) * b.k}
    return WARMUP * dense_step + (STEPS - WARMUP) * sum(per_kind[b.exchange](b) for b in blocks)


def bitwise_diffs(a: Run, b: Run) -> list[str]:
    """Steps and parameters where the two runs' iterates differ in any bit."""
    out = []
    for t, (pa, pb) in enumerate(zip(a.iterates, b.iterates)):
        for j, (x, y) in enumerate(zip(pa, pb)):
            if x.dtype != y.dtype or not torch.equal(bits(x), bits(y)):
                out.append(f"step {t} parameter {j}")
    return out[:5]


def mlp(dtype=torch.float32, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES, dtype)


# -- bfloat16 / float16 models --------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_low_precision_model_trains_with_float32_state_and_exact_estimate(world, comp, rule, dtype):
    """Parameters, gradients and DDP buckets in bf16/fp16. The feedback state is float32, the messages
    travel in the model dtype, and the gradient the optimizer gets is exactly the replicated estimator
    (h for EControl, w for EF21) rounded to the model dtype; for EF14 it is the same on every rank. The
    bytes sent are those of 2-byte values."""
    r = world.rank
    model = mlp(dtype)
    params = list(model.parameters())
    problems = []

    def check_grads(run: Run, t: int) -> None:
        if t < WARMUP:
            return
        st = run.opt.hook_state
        shared = st.feedback.shared_slots
        for blk in st.blocks().values():
            for name, slot in blk.slots.items():
                if slot.dtype != torch.float32:
                    problems.append(f"step {t}: slot {name} is {slot.dtype}")
            for pid, off, numel in zip(blk.pids, blk.offsets(), blk.numels):
                grad = params[pid].grad
                if grad is None or grad.dtype != dtype:
                    problems.append(f"step {t}: parameter {pid} grad {None if grad is None else grad.dtype}")
                    continue
                for name in shared:
                    want = blk.slots[name][off:off + numel].to(dtype)
                    if not torch.equal(bits(grad), bits(want)):
                        problems.append(f"step {t}: parameter {pid} grad != {name}.to({dtype})")
        if not shared:  # EF14: the estimate is the mean message, replicated by construction
            problems.extend(f"step {t}: grad {j} differs across ranks"
                            for j in differing_params([p.grad for p in params]))

    run = train(model, comp, rule, r, dtype=dtype, on_grads=check_grads)
    if any(p.dtype != dtype for p in params):
        problems.append("parameters changed dtype")
    sent, want = run.opt.comm_stats()["bytes_sent"], expected_bytes_sent(run, dtype.itemsize)
    if abs(sent - want) > 1:
        problems.append(f"bytes_sent {sent}, want {want:.0f} for {dtype.itemsize}-byte values")
    run.problems += problems[:5]
    expect_trained(run, r)
    dist.barrier()


def _scaled_fp16_states(comp: str, rule: str, r: int, log2_scale: int) -> tuple[list, list]:
    """fp16 model, lr = 0 (the parameters never move, so both runs see the same gradients): per step after
    each backward, the hook's state (all slots of all blocks, times 2**log2_scale) and the .grad estimates.
    ``log2_scale`` = 0: plain backward. Otherwise the loss is multiplied by 2**-log2_scale and a real
    GradScaler with scale 2**log2_scale (passed as grad_scaler=) scales it back: the backward computes
    bitwise the same fp16 buckets as the plain run, and the hook divides the scale out."""
    model = mlp(torch.float16)
    ddp = DDP(model, bucket_cap_mb=0.0025 * 2)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** log2_scale, growth_interval=1_000_000)
              if log2_scale else None)
    opt = commopt.CompressedOptimizer(ddp, torch.optim.SGD(model.parameters(), lr=0.0), compressor=comp,
                                      feedback=rule, warmup_steps=WARMUP, grad_scaler=scaler)
    data = dataset(r, torch.float16)
    states, grads = [], []
    for t in range(WARMUP + 4):
        x, y = minibatch(data, t)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss * 2.0 ** -log2_scale).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        states.append({(i, name): slot.detach().clone() * 2.0 ** log2_scale  # exact: a power of two in fp32
                       for i, b in opt.hook_state.blocks().items() for name, slot in b.slots.items()})
        opt.step()  # lr = 0; not scaler.step(opt): GradScaler refuses to unscale fp16 gradients
    assert opt.comm_stats()["skipped_rounds"] == 0
    return states, grads


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_fp16_gradscaler_messages_keep_the_precision_of_the_scaled_gradient(world, comp, rule):
    """The loss-scaling identity: loss × 2^-14 under a GradScaler of scale 2^14 computes the same fp16 buckets as
    the plain loss, so a hook that keeps its state in unscaled units must end with exactly 2^-14 times the
    plain run's state, and hand the optimizer the same scaled .grad, on every step. (Powers of two commute
    with every float32 operation of the feedback rules; only the fp16 message could break it.)"""
    r = world.rank
    plain_states, plain_grads = _scaled_fp16_states(comp, rule, r, 0)
    scaled_states, scaled_grads = _scaled_fp16_states(comp, rule, r, 14)
    problems = []
    for t, (a, b) in enumerate(zip(plain_states, scaled_states)):
        if a.keys() != b.keys():
            problems.append(f"step {t}: slots {sorted(a)} vs {sorted(b)}")
            continue
        for key in a:
            if not torch.equal(bits(a[key]), bits(b[key])):
                rel = float((a[key] - b[key]).abs().max() / a[key].abs().max().clamp_min(1e-30))
                problems.append(f"step {t} ({'warm-up' if t < WARMUP else 'compressed'}): block {key[0]} "
                                f"slot {key[1]} differs (max rel. {rel:.2e})")
        for j, (ga, gb) in enumerate(zip(plain_grads[t], scaled_grads[t])):
            if not torch.equal(bits(ga), bits(gb)):
                problems.append(f"step {t}: .grad of parameter {j} differs")
    assert all_ranks_true(not problems), f"rank {r}: {problems[:6]}"
    dist.barrier()


# -- gradient_as_bucket_view=True -----------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_gradient_as_bucket_view_gives_bitwise_the_same_iterates(world, comp, rule, dtype):
    """.grad aliases DDP's bucket (the hook writes its estimate in place): the same iterates, bit for bit,
    as with the default copy into .grad."""
    r = world.rank
    views = []

    def grads_are_bucket_views(run: Run, t: int) -> None:
        if t == STEPS - 1:  # after the rebuild: every .grad lives in a bucket buffer, not its own storage
            views.append(all(p.grad._base is not None for p in run.model.parameters()))

    viewed = train(mlp(dtype), comp, rule, r, dtype=dtype, ddp_kwargs={"gradient_as_bucket_view": True},
                   on_grads=grads_are_bucket_views)
    copied = train(mlp(dtype), comp, rule, r, dtype=dtype, ddp_kwargs={"gradient_as_bucket_view": False})
    expect_trained(viewed, r)
    expect_trained(copied, r)
    diffs = bitwise_diffs(viewed, copied)
    assert all_ranks_true(views == [True] and not diffs), f"rank {r}: bucket views {views}, differ at {diffs}"
    dist.barrier()


# -- static_graph=True -----------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_static_graph_gives_the_same_iterates(world, comp, rule):
    """static_graph=True rebuilds DDP's buckets one step later (after step 2, not step 1), so the second
    warm-up round all-reduces one bucket instead of three: on 2 ranks a sum of two values does not depend on
    how gloo chunks the buffer, and the iterates are bitwise the same; from 3 ranks on the ring adds in a
    chunk-dependent order, so they agree to rounding (float64). The blocks end up the same."""
    r, n = world.rank, world.size
    static = train(mlp(torch.float64), comp, rule, r, dtype=torch.float64, ddp_kwargs={"static_graph": True})
    dynamic = train(mlp(torch.float64), comp, rule, r, dtype=torch.float64)
    expect_trained(static, r)
    expect_trained(dynamic, r)
    layout_s = [b.pids for b in static.opt.hook_state.blocks().values()]
    layout_d = [b.pids for b in dynamic.opt.hook_state.blocks().values()]
    if n == 2:
        diffs = bitwise_diffs(static, dynamic)
    else:
        worst = max(float((a - b).abs().max()) for pa, pb in zip(static.iterates, dynamic.iterates)
                    for a, b in zip(pa, pb))
        diffs = [] if worst <= 1e-12 else [f"max |static - dynamic| = {worst:.3e}"]
    assert all_ranks_true(layout_s == layout_d and not diffs), \
        f"rank {r}: blocks {layout_s} vs {layout_d}, differ at {diffs}"
    dist.barrier()


# -- frozen parameters -------------------------------------------------------------------------------


class PartlyFrozenMLP(torch.nn.Module):
    """32 -> 64 -> [frozen 64 -> 64] -> 64 -> 8. The frozen layer runs second but is registered last, so the
    trainable parameters are numbers 0-5 whether it is a frozen module or (``as_constant``) plain tensors
    the hook never sees: the two models must train identically, bit for bit."""

    def __init__(self, as_constant: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 64), torch.nn.Linear(64, 64),
                                           torch.nn.Linear(64, 8)])
        frozen = torch.nn.Linear(64, 64)
        if as_constant:
            self.const = (frozen.weight.detach().clone(), frozen.bias.detach().clone())
            self.frozen = None
        else:
            self.frozen = frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.layers[0](x))
        if self.frozen is not None:
            x = torch.tanh(self.frozen(x))
        else:
            x = torch.tanh(torch.nn.functional.linear(x, *self.const))
        x = torch.tanh(self.layers[1](x))
        return self.layers[2](x)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_frozen_layer_is_left_out_and_training_matches_a_model_without_it(world, comp, rule):
    r = world.rank
    model = PartlyFrozenMLP()
    frozen_before = [p.detach().clone() for p in model.frozen.parameters()]
    with_frozen = train(model, comp, rule, r)
    without = train(PartlyFrozenMLP(as_constant=True), comp, rule, r)
    expect_trained(with_frozen, r, min_blocks=2)
    expect_trained(without, r, min_blocks=2)
    problems = []
    trainable = {i for i, p in enumerate(model.parameters()) if p.requires_grad}
    blocks = with_frozen.opt.hook_state.blocks().values()
    in_blocks = sorted(pid for b in blocks for pid in b.pids)
    if in_blocks != sorted(trainable):
        problems.append(f"blocks hold parameters {in_blocks}, trainable are {sorted(trainable)}")
    for p, p0 in zip(model.frozen.parameters(), frozen_before):
        if p.grad is not None or not torch.equal(bits(p), bits(p0)):
            problems.append("the frozen layer changed or got a gradient")
    # same trainable iterates, bit for bit (the frozen module's two tensors are the last two parameters)
    with_frozen.iterates = [it[:len(trainable)] for it in with_frozen.iterates]
    problems += bitwise_diffs(with_frozen, without)
    assert all_ranks_true(not problems), f"rank {r}: {problems}"
    dist.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_frozen_first_layers_numbered_first(world, comp, rule):
    """The usual fine-tuning case: the first Linear layer frozen (parameters 0 and 1 are in no bucket, and the
    hook still numbers the trainable ones 2, 3, ... as in the model)."""
    r = world.rank
    model = mlp()
    model.layers[0].requires_grad_(False)
    params = list(model.parameters())
    frozen_before = [p.detach().clone() for p in params[:2]]
    run = train(model, comp, rule, r)
    expect_trained(run, r, min_blocks=2)
    in_blocks = sorted(pid for b in run.opt.hook_state.blocks().values() for pid in b.pids)
    unchanged = all(torch.equal(bits(params[j]), bits(frozen_before[j])) and params[j].grad is None
                    for j in range(2))
    before = [p.detach() for p in mlp().parameters()]
    moved = all(not torch.equal(p, p0) for p, p0 in zip(params[2:], before[2:]))
    assert all_ranks_true(in_blocks == list(range(2, len(params))) and unchanged and moved), \
        f"rank {r}: blocks hold {in_blocks}, frozen unchanged {unchanged}, trainable moved {moved}"
    dist.barrier()


# -- torch.compile(backend="aot_eager") ------------------------------------------------------------


_COMPILE_PROBE: dict = {}


def _compile_works(r: int) -> Optional[str]:
    """None if torch.compile (aot_eager) of a DDP model with PyTorch's own all-reduce works here, else why
    not. Agreed over all ranks, so that all skip or none; commopt is not involved, so a commopt failure
    under compile is never mistaken for an environmental one."""
    if "why" not in _COMPILE_PROBE:
        why = None
        try:
            torch.manual_seed(0)
            model = MLP((8, 8, 4))
            ddp = DDP(model)
            compiled = torch.compile(ddp, backend="aot_eager")
            compiled(torch.randn(4, 8)).square().mean().backward()
            if any(p.grad is None for p in model.parameters()):
                why = "compiled DDP produced no gradients"
        except Exception as exc:  # noqa: BLE001 - environmental: reported as the skip reason
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if not all_ranks_true(why is None):
            why = why or "torch.compile failed on another rank"
        _COMPILE_PROBE["why"] = why
    return _COMPILE_PROBE["why"]


def _compile(ddp: DDP):
    return torch.compile(ddp, backend="aot_eager")


def _compiled_graphs() -> Callable[[], int]:
    """Reset dynamo (a fresh compile, no cache limit reached, so no silent fallback to eager); the returned
    function counts the forward/backward graphs AOTAutograd compiled since."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters["aot_autograd"].clear()
    return lambda: int(counters["aot_autograd"]["ok"])


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS, ids=CONFIG_IDS)
def test_torch_compile_aot_eager_matches_eager(world, comp, rule):
    """``torch.compile(DDP(model), backend="aot_eager")``: the hook runs from the compiled backward and the
    iterates match eager within rounding. One bucket (DDP's default cap): a compiled backward makes the
    gradients ready in another order, so with several buckets DDP's rebuild groups the parameters into
    other buckets (other compression blocks) than eager, and only one bucket makes the runs comparable
    (a block's compression does not depend on the order of its parameters)."""
    r = world.rank
    why = _compile_works(r)
    if why is not None:
        pytest.skip(f"torch.compile(backend='aot_eager') does not work here: {why}")
    graphs = _compiled_graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's informational warnings
        compiled = train(mlp(torch.float64), comp, rule, r, dtype=torch.float64, bucket_cap_mb=25, wrap=_compile)
    eager = train(mlp(torch.float64), comp, rule, r, dtype=torch.float64, bucket_cap_mb=25)
    expect_trained(compiled, r, min_blocks=1)
    expect_trained(eager, r, min_blocks=1)
    worst = max(float((a - b).abs().max()) for pa, pb in zip(compiled.iterates, eager.iterates)
                for a, b in zip(pa, pb))
    loss_gap = max(abs(a - b) for a, b in zip(compiled.losses, eager.losses))
    ok = worst <= 1e-10 and loss_gap <= 1e-10 and graphs() >= 1
    assert all_ranks_true(ok), (f"rank {r}: {graphs()} AOT graphs; compiled vs eager: max |Δparam| {worst:.3e}, "
                                f"max |Δloss| {loss_gap:.3e}")
    dist.barrier()


#: wide enough that each hidden layer fills a 1 MiB bucket: dynamo's DDPOptimizer refuses buckets below
#: DDP's 1 MiB first bucket
COMPILE_SIZES = (32, 384, 384, 384, 8)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("comp,rule", CONFIGS[:1], ids=CONFIG_IDS[:1])
def test_torch_compile_with_graph_split_per_bucket_trains_and_stays_replicated(world, comp, rule):
    """Several 1 MiB buckets: dynamo's DDPOptimizer splits the compiled graph at the bucket boundaries, so
    the buckets' hooks fire from separate compiled backward graphs. Every parameter is in exactly one
    block, the layout is stable (every block compressed on every step after warm-up), training works and
    nothing drifts across ranks."""
    r = world.rank
    why = _compile_works(r)
    if why is not None:
        pytest.skip(f"torch.compile(backend='aot_eager') does not work here: {why}")
    graphs = _compiled_graphs()
    torch.manual_seed(0)
    model = MLP(COMPILE_SIZES, torch.float64)
    with warnings.catch_warnings(), torch._dynamo.config.patch(optimize_ddp="ddp_optimizer"):
        warnings.simplefilter("ignore")
        run = train(model, comp, rule, r, dtype=torch.float64, bucket_cap_mb=1.0, wrap=_compile)
    expect_trained(run, r, min_blocks=3)
    pids = sorted(pid for b in run.opt.hook_state.blocks().values() for pid in b.pids)
    ok = pids == list(range(len(list(model.parameters())))) and graphs() >= 3  # one graph per bucket at least
    assert all_ranks_true(ok), f"rank {r}: blocks hold {pids}, {graphs()} AOT graphs"
    dist.barrier()
