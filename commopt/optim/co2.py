"""``CO2``: local updates with the outer all-reduce fully overlapped with computation (SPEC §6).

CO2 (Sun, Qin, Sun, Li, Li, Shen, Qiao, Zhong, ICLR 2024, arXiv 2401.16265) lets
every rank take τ steps of its own inner optimizer, then averages the
*pseudo-gradient* d_i = s_i − x_i (how far the rank moved this round) with an
all-reduce that runs in the background during the next τ steps and is applied
one round late, through a penalised, clipped outer momentum. Communication is
hidden while τ × (compute per step) ≥ the all-reduce time. Implemented from
SPEC §6, not from the released code.
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import warnings
import weakref
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..compressors import Compressor
from .. import kernels
from ..consistency import agreed_run_id, assert_bitwise_same, bit_checksum, build_consistently, bytes_digest
from ..feedback import Feedback
from ..outer import OuterExchange, Penalty, make_penalty
from ..teardown import on_exit
from .wrapper import WrappedOptimizer

__all__ = ["CO2", "local_gradients_hook"]

STATE_VERSION = 1
_VARIANTS = ("eager", "delayed")
_WORLD_SIZE_CHANGE = ("error", "reset")


def _in_dcp_init_step() -> bool:
    """True when ``step()`` was called by ``torch.distributed.checkpoint.state_dict._init_optim_state``.

    ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` call ``optim.step()`` with zero
    gradients and lr = 0 whenever the inner state is empty (e.g. plain SGD) to materialise it. That
    is not a training step: CO2 only forwards it to the inner optimizer. The caller is found on the
    stack (CO2.step <- torch's step wrapper (hooks) <- _init_optim_state), a few frames up at most.
    """
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and \
                str(frame.f_globals.get("__name__", "")).startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


# every CO2 alive in this process (weak: registering does not keep an optimizer alive), checked at exit
_LIVE: "weakref.WeakSet[CO2]" = weakref.WeakSet()
_WARNED: list[bool] = []   # the unfinished-run warning was given (once per process)


def _warn_unfinished(candidates: "list[CO2]") -> None:
    """One warning per process if any of ``candidates`` ends (at exit, or garbage-collected) with the ranks'
    models differing: the work of its last round is discarded."""
    if _WARNED:
        return
    try:
        unfinished = [o for o in candidates if o._unfinished()]
        if not unfinished:
            return
        what = "; ".join(f"rank {o.rank}: {o._unfinished_reason()}" for o in unfinished[:3]) + \
            (" ..." if len(unfinished) > 3 else "")
    except Exception:   # never fail at exit (e.g. a half-torn-down optimizer)
        return
    _WARNED.append(True)
    warnings.warn(
        f"commopt.CO2: training exits without opt.finish() (the process ends, or the optimizer was dropped) "
        f"while the ranks' models differ ({what}). "
        f"The model this rank holds is its own local replica, not the consensus, and the last round's "
        f"progress was never applied: call opt.finish() on every rank at the end of training (before "
        f"saving the final model and before destroy_process_group()).", RuntimeWarning, stacklevel=1)


def _warn_unfinished_at_exit() -> None:
    """atexit: one warning if any live CO2 ends the process with the ranks' models differing; then let
    every outer exchange still in flight finish while the interpreter runs (``OuterExchange.abandon``)."""
    live = list(_LIVE)
    _warn_unfinished(live)
    for o in live:
        try:
            o.exchange.abandon()
        except Exception:  # noqa: BLE001 - never fail at exit
            pass


def _register_for_exit_check(opt: "CO2") -> None:
    _LIVE.add(opt)
    on_exit(_warn_unfinished_at_exit)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_of(sd: dict, key: str, numel: int) -> Tensor:
    t = sd.get(key)
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() != numel:
        got = f"a {tuple(t.shape)} {t.dtype} tensor" if isinstance(t, Tensor) else repr(type(t).__name__)
        raise ValueError(f"CO2 checkpoint is inconsistent: {key!r} must be a floating-point tensor of "
                         f"{numel} elements, got {got} (a checkpoint of another model?)")
    return t


def local_gradients_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP communication hook that communicates nothing: each rank keeps its own gradient.

    DDP hands a hook the bucket's *local* gradient (the built-in all-reduce hook
    divides by n itself), so returning the buffer untouched makes ``backward()`` on
    the DDP model produce exactly the gradient a plain module would. CO2 registers
    it on a DDP model, so the training script's ``loss.backward()`` needs no
    ``no_sync()`` context: local steps never all-reduce gradients.
    """
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP inspects the annotations; with postponed evaluation they would be strings
local_gradients_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                        "return": torch.futures.Future[torch.Tensor]}


def _signature(params: list[Tensor]) -> str:
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"CO2: {name} must be a finite number, got {value!r}")
    return float(value)


class CO2(WrappedOptimizer):
    """Local steps with a fully overlapped, one-round-stale outer step (Sun et al., ICLR 2024; SPEC §6).

    At the end of round t, with x_i this rank's parameters and s_i the round's start::

        d_i = s_i − x_i                                # this round's pseudo-gradient
        Δ̄   = mean_i d_i of round t−1                  # all-reduce launched a round ago, waited for now
        g   = P_t · Δ̄;   m = clamp(β·m + g, −φ, φ)     # staleness penalty, clipped outer momentum
        θ   = θ − α·m                                  # (Nesterov: θ − α·(g + β·m))
        launch all-reduce(d_i) into a private buffer;  s_i = θ − d_i ("eager") or θ ("delayed");  x_i ← s_i

    θ (the anchor) and m are bitwise identical on all ranks. With ``overlap=False``
    the all-reduce of d_i is waited for at once and applied in the same round
    (blocking local SGD / DiLoCo); then both variants restart from x_i ← θ.

    Args:
        model: the module being trained, or a ``DistributedDataParallel`` wrapping it.
            For DDP, :func:`local_gradients_hook` is registered so that ``backward()``
            never all-reduces gradients (no ``no_sync()`` needed in the training loop). DDP
            still broadcasts module *buffers* from rank 0 at every forward (a blocking
            collective) when the model has any: pass ``broadcast_buffers=False`` to DDP to
            keep, e.g., BatchNorm statistics local and the step free of communication.
        optimizer: the inner optimizer (any ``torch.optim`` optimizer), built over all
            trainable parameters of ``model``. Its state stays local (not averaged).
        tau: local steps per round, ≥ 1.
        outer_lr: α > 0.
        outer_momentum: β in [0, 1). Default (``None``): 0.5, or 0 with ``variant="delayed"``
            (which oscillates or diverges with β ≥ 0.2 and the adaptive penalty; see below).
        nesterov: Nesterov form of the outer momentum.
        clip: φ > 0, element-wise clamp of m to [−φ, φ]; ``None`` = no clipping.
        penalty: staleness penalty P_t: ``None`` (off), a number λ (P = 1/λ),
            ``"adaptive"`` / ``"adaptive:κ"`` (:class:`commopt.outer.AdaptivePenalty`),
            or a :class:`commopt.outer.Penalty`.
        variant: ``"eager"`` (keep own progress that is still in flight) or ``"delayed"``
            (restart each round from the anchor: pure one-round staleness).
        overlap: ``False`` waits for each all-reduce at once (blocking local SGD).
        compressor: compress the outer exchange: a :class:`commopt.Compressor`,
            ``"topk:0.01"``, ``"randk:0.05"``; ``None`` = dense all-reduce.
        feedback: error feedback for the compressed exchange, applied to the pseudo-gradient
            (SPEC §2 rules). Default ``"ef14"`` (error accumulation): every bit of a rank's
            displacement is applied exactly once, later if not sent now. The estimator
            rules (``"ef21"``, ``"econtrol"``) re-apply their stale estimate of d_i every
            round, which double-counts displacements (like ``"delayed"``): on 4 ranks with
            TopK 1% they ended 3.4-3.6x above DDP where EF14 gave 1.27x (TopK 10%: EF14
            1.01x, EControl 1.15x); RandK 10% + EF21/EControl diverged (EF14 1.7x, no
            feedback 1.4x). Prefer TopK with EF14.
        state_device: where θ and m live (e.g. ``"cpu"`` to save accelerator memory);
            default: the parameters' device.
        buffer_dtype: dtype of the send buffer (e.g. ``torch.bfloat16``: half the bytes;
            the sum is then carried out in bf16); default: the state dtype.
        link_delay: seconds after its launch at which a collective's result becomes
            available: emulates a slow link for tests and benchmarks (0 = off).
        process_group: defaults to the DDP model's, else the default group.
        check_every: every N rounds verify that θ and m are bitwise identical on all
            ranks (one small blocking all-gather; 0 = never).
        on_world_size_change: what :meth:`load_state_dict` does with a checkpoint saved with
            another world size: ``"error"`` (default) refuses it; ``"reset"`` keeps the
            replicated θ and m, drops the per-rank state (s_i, the completed in-flight
            all-reduce, the outer exchange's feedback state, which restarts with a dense
            round) and restarts every rank from θ at position 0 of a round (one warning).

    Defaults (τ = 12, α = 1, β = 0.5, φ = 1, adaptive penalty, ``"eager"``) were picked
    from runs of ``experiments/co2_slow_link.py``'s task (teacher-MLP
    classification, inner SGD lr 0.05 momentum 0.9, batch 32 per rank, 480 steps):
    final loss relative to DDP at equal samples 0.86 / 0.95 / 0.97 on 2 / 4 / 8 ranks
    (means over 3 seeds, every run between 0.83 and 0.98: ``experiments/co2_sweep.py``,
    ``experiments/results/co2_sweep.md``). The alternatives were single-seed
    development runs: no penalty 0.67 / 0.87 / 0.91, λ = 2 0.99 / 1.05 / 1.03. ``"delayed"``
    double-counts a round's progress (each round restarts from an anchor that lacks
    the previous round), so it needs damping: without a penalty it oscillated
    (2.8-5.1x DDP), with β = 0.2 + adaptive 1.7-1.9x, with β = 0.5 it diverged;
    β = 0 + adaptive gave 1.22 / 1.14 / 1.11, hence its default β = 0. With an
    aggressive inner rate (lr 0.2) every overlapped variant ended 1.3-1.9x above
    DDP (blocking local SGD 1.1-1.25x): lower the inner rate or use ``overlap=False``
    if the link is fast enough. The released code's β scaling with the GPU count
    (0.2 up to 32) was not needed on 2-8 ranks here.

    State dtype: float64 if any parameter is float64, else float32. Extra memory
    (model-sized copies): θ, m, s, b for ``"eager"`` (4), θ, m, b for ``"delayed"``
    (3), θ, m, b with ``overlap=False``; b may be bf16, θ and m may live on the CPU;
    compression keeps b in the state dtype (the message is cut from it) and adds
    the feedback rule's slots (EF14: 1, EF21: 2, EControl: 3). :meth:`memory_bytes`
    reports them.

    Checkpoints have torch.optim's shape: :meth:`state_dict` is the inner
    optimizer's ``{"state", "param_groups"}`` with CO2's own state (θ, m, s_i, the
    round position, the outer exchange) nested under ``"commopt"``
    (:attr:`state_key`, the same key as every commopt optimizer); the older layout
    ``{"optimizer": ..., "co2": ...}`` still loads. They are per rank: save
    ``model.state_dict()`` (the local parameters differ across ranks mid-round) and
    :meth:`state_dict` on every rank, or call :meth:`finish` first, after which
    every rank holds the same model. An all-reduce in flight is waited for at save
    time and stored as completed. See :meth:`load_state_dict` for what a load
    accepts (another world size, another rank's file, a checkpoint without CO2's
    state, e.g. from ``torch.distributed.checkpoint``). The communication counters of
    :meth:`comm_stats` are saved too and continue after a resume.

    Mixed precision: CO2 sets ``_step_supports_amp_scaling``, so
    ``torch.amp.GradScaler.step(opt)`` always calls :meth:`step`, handing it
    ``opt.grad_scale`` and ``opt.found_inf`` (this rank's inf/NaN check). CO2 never
    averages gradients, so a rank can overflow while the others do not; a skipped
    ``step()`` on that rank alone would put its round position behind the others' and
    mismatch the outer all-reduces. Instead every call counts on every rank: with
    ``found_inf`` nonzero only the inner optimizer's step is skipped (this rank loses
    one local step, its round still advances), otherwise the gradients are unscaled
    (divided by ``grad_scale`` unless ``scaler.unscale_(opt)`` already did) and the
    inner optimizer steps. Each rank's scaler keeps its own scale (nothing needs it
    to agree). Calls not made through a GradScaler are unchanged.
    """

    #: CO2's own state sits under this key beside ``state`` and ``param_groups`` (as for every commopt optimizer)
    state_key = "commopt"

    #: ``torch.amp.GradScaler.step`` always calls :meth:`step` (with ``grad_scale`` / ``found_inf`` set on
    #: the optimizer) instead of skipping it on an overflow: the round position must stay aligned across ranks
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Optimizer,
        tau: int = 12,
        outer_lr: float = 1.0,
        outer_momentum: Optional[float] = None,
        nesterov: bool = False,
        clip: Optional[float] = 1.0,
        penalty: "Penalty | float | str | None" = "adaptive",
        variant: str = "eager",
        overlap: bool = True,
        *,
        compressor: "str | Compressor | None" = None,
        feedback: "str | Feedback | None" = "ef14",
        state_device: "str | torch.device | None" = None,
        buffer_dtype: Optional[torch.dtype] = None,
        link_delay: float = 0.0,
        process_group: Optional[dist.ProcessGroup] = None,
        check_every: int = 0,
        on_world_size_change: str = "error",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"CO2: model must be a torch.nn.Module or DistributedDataParallel, "
                            f"got {type(model).__name__}")
        super().__init__(optimizer)
        is_ddp = isinstance(model, DistributedDataParallel)
        module = model.module if is_ddp else model
        use_dist = dist.is_available() and dist.is_initialized()
        group = process_group if process_group is not None else (model.process_group if is_ddp else None)
        self.process_group = group
        self.use_dist = use_dist

        def build() -> tuple[dict, dict]:
            if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
                raise ValueError(f"CO2: tau (local steps per round) must be an integer >= 1, got {tau!r}")
            alpha = _number("outer_lr", outer_lr)
            if alpha <= 0:
                raise ValueError(f"CO2: outer_lr must be > 0, got {outer_lr!r}")
            beta = (0.0 if variant == "delayed" else 0.5) if outer_momentum is None else \
                _number("outer_momentum", outer_momentum)
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"CO2: outer_momentum must be in [0, 1), got {outer_momentum!r}")
            phi = None if clip is None else _number("clip", clip)
            if phi is not None and phi <= 0:
                raise ValueError(f"CO2: clip (the momentum clipping threshold) must be > 0 or None, got {clip!r}")
            if variant not in _VARIANTS:
                raise ValueError(f"CO2: variant must be one of {_VARIANTS}, got {variant!r}")
            for name, flag in (("nesterov", nesterov), ("overlap", overlap)):
                if not isinstance(flag, bool):
                    raise ValueError(f"CO2: {name} must be True or False, got {flag!r}")
            delay = _number("link_delay", link_delay)
            if delay < 0:
                raise ValueError(f"CO2: link_delay must be >= 0 seconds, got {link_delay!r}")
            if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
                raise ValueError(f"CO2: check_every must be an integer >= 0, got {check_every!r}")
            if on_world_size_change not in _WORLD_SIZE_CHANGE:
                raise ValueError(f"CO2: on_world_size_change must be one of {_WORLD_SIZE_CHANGE}, "
                                 f"got {on_world_size_change!r}")
            if buffer_dtype is not None and buffer_dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                                 torch.float16):
                raise ValueError(f"CO2: buffer_dtype must be a float dtype or None, got {buffer_dtype!r}")
            if is_ddp and getattr(model, "_comm_hooks", None):
                raise ValueError("CO2: the DDP model already has a communication hook; CO2 registers its own "
                                 "(local_gradients_hook) to keep local steps local. Pass a DDP model without a hook")
            pen = make_penalty(penalty)
            params = self.params()
            if not params:
                raise ValueError("CO2: the inner optimizer holds no parameters")
            owned = {id(p) for p in module.parameters()}
            foreign = [p for p in params if id(p) not in owned]
            if foreign:
                raise ValueError(f"CO2: the inner optimizer holds {len(foreign)} tensor(s) that are not parameters "
                                 f"of the model; build it over model.parameters()")
            mine = {id(p) for p in params}
            missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in mine]
            if missing:
                raise ValueError(f"CO2: the inner optimizer does not own the model's trainable parameter(s) "
                                 f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; CO2 averages only what the "
                                 f"inner optimizer steps, so build it over all of model.parameters()")
            if len({id(p) for p in params}) != len(params):
                raise ValueError("CO2: a parameter appears twice in the inner optimizer")
            devices = {p.device for p in params}
            if len(devices) != 1:
                raise ValueError(f"CO2: all parameters must be on one device, got {sorted(map(str, devices))}")
            if any(not p.is_floating_point() for p in params):
                raise ValueError("CO2: all parameters must be floating point")
            device = next(iter(devices))
            sdt = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
            sdev = torch.device(state_device) if state_device is not None else device
            numel = sum(p.numel() for p in params)
            exchange = OuterExchange(numel, sdt, device, group=group, use_dist=use_dist, buffer_dtype=buffer_dtype,
                                     compressor=compressor, feedback=feedback, link_delay=delay)
            built = {"alpha": alpha, "beta": beta, "phi": phi, "penalty": pen, "device": device, "sdt": sdt,
                     "sdev": sdev, "exchange": exchange, "params": params}
            config = {"tau": tau, "outer_lr": alpha, "outer_momentum": beta, "nesterov": nesterov, "clip": phi,
                      "penalty": pen.config(), "variant": variant, "overlap": overlap,
                      "exchange": exchange.config(), "kernels": kernels.path_name(device),
                      "model": _signature(params),
                      "optimizer": type(optimizer).__name__, "check_every": check_every,
                      "on_world_size_change": on_world_size_change,
                      "world_size": dist.get_world_size(group) if use_dist else 1}
            return built, config

        # every rank learns of a bad setting on any rank (nobody is left waiting in a collective)
        if use_dist:
            built = build_consistently(build, group, what="CO2")
        else:
            if is_ddp:
                raise RuntimeError("CO2: a DDP model needs torch.distributed to be initialised")
            built, _ = build()
        # one id for this run on every rank: its checkpoints carry it, and a load mixing runs is refused
        self._run_id: str = agreed_run_id(group)
        self.tau: int = tau
        self.outer_lr: float = built["alpha"]
        self.outer_momentum: float = built["beta"]
        self.nesterov: bool = nesterov
        self.clip: Optional[float] = built["phi"]
        self.penalty: Penalty = built["penalty"]
        self.variant: str = variant
        self.overlap: bool = overlap
        self.check_every: int = check_every
        self.on_world_size_change: str = on_world_size_change
        self.exchange: OuterExchange = built["exchange"]
        self.world_size: int = self.exchange.n
        self.rank: int = dist.get_rank(group) if use_dist else 0
        self._params: list[Tensor] = built["params"]
        self._device: torch.device = built["device"]
        self._sdt: torch.dtype = built["sdt"]
        self._sdev: torch.device = built["sdev"]
        self._config = {"tau": tau, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                        "nesterov": nesterov, "clip": self.clip, "penalty": self.penalty.config(),
                        "variant": variant, "overlap": overlap, "exchange": self.exchange.config()}
        self._slices: list[tuple[int, int]] = []
        off = 0
        for p in self._params:
            self._slices.append((off, p.numel()))
            off += p.numel()

        # θ: the model on rank 0 of the group becomes everyone's start point
        with torch.no_grad():
            theta = torch.cat([p.detach().reshape(-1).to(self._sdt) for p in self._params])
            if use_dist and self.world_size > 1:
                src = dist.get_global_rank(group, 0) if group is not None else 0
                dist.broadcast(theta, src=src, group=group)
            self._theta: Tensor = theta.to(self._sdev)
            self._m: Tensor = torch.zeros_like(self._theta)
            # s: the round's start point, kept only where it differs from θ (eager with overlap)
            self._s: Optional[Tensor] = theta.clone() if (overlap and variant == "eager") else None
            # per tensor: the staleness gap ‖θ − s̄‖ the next outer update will see (0-d values, no model copy)
            self._gap: Tensor = torch.zeros(len(self._params), dtype=self._sdt, device=self._sdev)
            for p, (o, k) in zip(self._params, self._slices):
                p.copy_(theta[o:o + k].view_as(p))
        self._round = 0       # completed rounds
        self._pos = 0         # local steps taken in the current round
        self._steps = 0
        self._last_penalty: list[Union[float, Tensor]] = []
        self._warned_save = False

        if is_ddp:
            model.register_comm_hook(None, local_gradients_hook)
        _register_for_exit_check(self)

    # -- the training step ------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """One inner step; every τ-th step also ends the round (see the class docstring).

        The step that ``torch.distributed.checkpoint.state_dict`` takes to materialise an empty
        optimizer state (zero gradients, lr = 0, from ``_init_optim_state``) only reaches the inner
        optimizer: it neither advances the round position nor launches anything."""
        if _in_dcp_init_step():
            return self.optimizer.step(closure)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:                          # not called through a GradScaler
            loss = self.optimizer.step(closure)
        elif float(found_inf) != 0.0:                  # this rank's scaled gradients overflowed
            loss = None                                # skip the local step only: the round still advances
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
        else:
            self._unscale_grads(getattr(self, "grad_scale", None))
            loss = self.optimizer.step(closure)
        self._steps += 1
        self._pos += 1
        if self._pos == self.tau:
            self._end_round()
        return loss

    @torch.no_grad()
    def _unscale_grads(self, grad_scale: Optional[Tensor]) -> None:
        """GradScaler's contract: divide every gradient by ``grad_scale`` (``None``: already unscaled)."""
        if grad_scale is None:
            return
        scales: dict[torch.device, Tensor] = {}
        for p in self._params:
            if p.grad is None:
                continue
            inv = scales.get(p.grad.device)
            if inv is None:
                inv = scales[p.grad.device] = grad_scale.to(device=p.grad.device, dtype=torch.float64)
            if p.grad.is_sparse:
                p.grad = p.grad / inv.to(p.grad.dtype)
            else:
                p.grad.div_(inv)

    @torch.no_grad()
    def _apply(self, i: int, theta: Tensor, m: Tensor, delta: Tensor) -> Union[float, Tensor]:
        """The outer update of parameter ``i`` from its averaged pseudo-gradient Δ̄ (``delta``).

        Also records the staleness gap the *next* update of this tensor will see
        (‖θ − s̄‖ with s̄ the mean start point of the round now beginning, see
        :class:`commopt.outer.AdaptivePenalty`).
        """
        factor = self.penalty.factor(delta, self._gap[i])
        g = delta if isinstance(factor, float) and factor == 1.0 else delta * factor
        beta = self.outer_momentum
        if beta == 0.0:
            m.copy_(g)
        else:
            m.mul_(beta).add_(g)
        if self.clip is not None:
            m.clamp_(-self.clip, self.clip)
        u = g.add(m, alpha=beta) if self.nesterov else m
        theta.sub_(u, alpha=self.outer_lr)
        if self.overlap:
            # the next update applies the Δ̄ now in flight, computed from this round's start points
            if self._s is not None:   # eager: their mean is θ_old − Δ̄ (Δ̄: the one just applied) -> ‖Δ̄ − α·u‖
                self._gap[i] = torch.linalg.vector_norm(delta - self.outer_lr * u)
            else:                     # delayed: they were θ_old -> the outer step ‖α·u‖
                self._gap[i] = torch.linalg.vector_norm(u) * self.outer_lr
        return factor

    def _delta(self, total: Tensor, divisor: int, o: int, k: int) -> Tensor:
        return total[o:o + k].to(device=self._sdev, dtype=self._sdt) / divisor

    @torch.no_grad()
    def _end_round(self) -> None:
        ex = self.exchange
        buf = ex.buffer
        factors: list[Union[float, Tensor]] = []
        if not self.overlap:
            # blocking local SGD: d_i = θ − x_i, averaged at once, applied in the same round
            for p, (o, k) in zip(self._params, self._slices):
                buf[o:o + k].copy_(self._theta[o:o + k].to(self._device) - p.detach().reshape(-1))
            ex.launch(self._round)
            total, div = ex.wait()
            for i, (p, (o, k)) in enumerate(zip(self._params, self._slices)):
                th = self._theta[o:o + k]
                factors.append(self._apply(i, th, self._m[o:o + k], self._delta(total, div, o, k)))
                p.copy_(th.view_as(p))
        else:
            have_update = ex.pending
            if have_update:
                total, div = ex.wait()   # the all-reduce launched one round ago
            else:
                self._gap.zero_()        # nothing stale yet: every rank starts this round at θ (mean)
            for i, (p, (o, k)) in enumerate(zip(self._params, self._slices)):
                x = p.detach().reshape(-1)
                th = self._theta[o:o + k]
                if self._s is not None:          # eager: d_i = s_i − x_i, formed in s_i
                    d = self._s[o:o + k]
                    d.sub_(x)
                else:                            # delayed: s_i = θ (before this round's update)
                    d = th.to(self._device) - x
                if have_update:
                    factors.append(self._apply(i, th, self._m[o:o + k], self._delta(total, div, o, k)))
                buf[o:o + k].copy_(d)            # after Δ̄ of this slice was read out of the buffer
                if self._s is not None:          # s_i = θ − d_i; x_i ← s_i
                    d.neg_().add_(th.to(self._device))
                    p.copy_(d.view_as(p))
                else:                            # s_i = θ; x_i ← θ
                    p.copy_(th.view_as(p))
            ex.launch(self._round)
        if factors:
            self._last_penalty = factors
        self._round += 1
        self._pos = 0
        if self.check_every and self._round % self.check_every == 0:
            self.verify_replicated_state()

    @torch.no_grad()
    def finish(self) -> None:
        """Bring every rank to the same model: apply the all-reduce in flight, then average this round's
        local progress synchronously (θ ← θ − mean_i(s_i − x_i), no momentum) and set x_i ← θ.

        Call it on every rank, e.g. before evaluation or at the end of training;
        training may continue afterwards (the next round starts with nothing in flight).
        """
        ex = self.exchange
        buf = ex.buffer
        pending = ex.pending
        if pending:
            total, div = ex.wait()
        for i, (p, (o, k)) in enumerate(zip(self._params, self._slices)):
            x = p.detach().reshape(-1)
            th = self._theta[o:o + k]
            d = (self._s[o:o + k] if self._s is not None else th.to(self._device)) - x
            if pending:
                self._apply(i, th, self._m[o:o + k], self._delta(total, div, o, k))
            buf[o:o + k].copy_(d)
        total, div = ex.average_now()
        for p, (o, k) in zip(self._params, self._slices):
            th = self._theta[o:o + k]
            th.sub_(self._delta(total, div, o, k))
            p.copy_(th.view_as(p))
            if self._s is not None:
                self._s[o:o + k].copy_(th)
        self._gap.zero_()
        self._pos = 0

    # -- introspection ------------------------------------------------------------------------------------
    @property
    def wait_seconds(self) -> float:
        """Seconds this rank's host spent blocked waiting for the outer all-reduce (injected link delay included).

        On gloo/CPU that is the communication wait. With NCCL, ``wait()`` only makes the
        compute stream depend on the collective, so GPU-side stalls are not counted here.
        """
        return float(self.exchange.stats["wait_seconds"])

    @property
    def round(self) -> int:
        """Rounds ended since the start."""
        return self._round

    @property
    def position(self) -> int:
        """Local steps taken in the current round (0 ≤ position < τ)."""
        return self._pos

    def anchor(self) -> list[Tensor]:
        """θ, shaped like the parameters (views into the flat state)."""
        return [self._theta[o:o + k].view_as(p) for p, (o, k) in zip(self._params, self._slices)]

    def momentum(self) -> list[Tensor]:
        """The outer momentum m, shaped like the parameters (views)."""
        return [self._m[o:o + k].view_as(p) for p, (o, k) in zip(self._params, self._slices)]

    def last_penalty(self) -> list[float]:
        """P_t of the last outer update, per parameter (synchronises the device)."""
        return [float(f) for f in self._last_penalty]

    def memory_bytes(self) -> dict:
        """Extra persistent bytes CO2 holds on this rank, by buffer."""
        isz = self._sdt.itemsize
        out = {"anchor": self._theta.numel() * isz, "momentum": self._m.numel() * isz,
               "start": self._s.numel() * isz if self._s is not None else 0, **self.exchange.memory_bytes()}
        out["total"] = sum(out.values())
        return out

    def comm_stats(self) -> dict:
        """Counters: ``rounds``, ``steps``, ``launches``, ``waits``, ``wait_seconds``, ``max_in_flight`` (never
        above 1), ``in_flight``, ``bytes_sent``/``bytes_dense`` (SPEC §3 formulas), ``collectives``."""
        st = self.exchange.stats
        return {"steps": self._steps, "rounds": self._round, "position": self._pos,
                "launches": st["launches"], "waits": st["waits"], "wait_seconds": st["wait_seconds"],
                "in_flight": self.exchange.in_flight, "max_in_flight": st["max_in_flight"],
                "bytes_sent": int(round(st["bytes_sent"])), "bytes_dense": int(round(st["bytes_dense"])),
                "collectives": dict(st["collectives"]), "world_size": self.world_size}

    def verify_replicated_state(self) -> None:
        """Raise ``RuntimeError`` unless θ, m (and replicated feedback state) are bitwise identical on all ranks."""
        local = bit_checksum([self._theta, self._m, *self.exchange.replicated_slots()])
        if not self.use_dist or self.world_size == 1:
            return
        assert_bitwise_same(local, self.process_group, what="CO2: anchor/momentum")

    # -- do the ranks' models differ? ---------------------------------------------------------------------
    def _models_differ(self) -> bool:
        """True while the ranks' parameters (may) differ: mid-round, or eager with a round's progress in flight."""
        if self.world_size <= 1:
            return False
        return self._pos != 0 or (self._s is not None and self.exchange.pending)

    def __del__(self) -> None:
        # an optimizer dropped before exit (a main() that returned without finish()) warns here, once
        try:
            _warn_unfinished([self])
            self.exchange.abandon()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def _unfinished(self) -> bool:
        """True while the run is not at a consensus point: mid-round, or an all-reduce not yet applied."""
        if self.world_size <= 1:
            return False
        return self._pos != 0 or self.exchange.pending

    def _unfinished_reason(self) -> str:
        parts = []
        if self._pos != 0:
            parts.append(f"{self._pos} of tau={self.tau} local steps into round {self._round}")
        if self.exchange.pending:
            parts.append(f"the outer all-reduce of round {self._round - 1} not applied")
        return ", ".join(parts)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _own_state_dict(self) -> dict:
        """**This rank's** CO2 state, nested under ``"commopt"`` by :meth:`state_dict` (save one file per rank).

        Holds θ, m, s_i, the round position and the outer exchange; an all-reduce in
        flight is waited for now (the wait counts in :attr:`wait_seconds`) and its
        result stored, so the checkpoint resumes identically. Warns (once) if the ranks'
        models differ now: then ``model.state_dict()`` must be saved on every rank too
        (or call :meth:`finish` before saving).
        """
        if self._models_differ() and not self._warned_save:
            self._warned_save = True
            warnings.warn(
                f"CO2.state_dict() on rank {self.rank} while the ranks' models differ "
                f"({self._unfinished_reason()}): save model.state_dict() on every rank, "
                f"one file per rank, together with this rank's optimizer state, or call opt.finish() on every "
                f"rank before saving (then every rank holds the same model and a single file is enough).",
                RuntimeWarning, stacklevel=3)
        return {"version": STATE_VERSION, "config": self._config, "world_size": self.world_size,
                "rank": self.rank, "run": self._run_id, "round": self._round, "position": self._pos,
                "steps": self._steps,
                "anchor": self._theta.detach().cpu().clone(), "momentum": self._m.detach().cpu().clone(),
                "start": self._s.detach().cpu().clone() if self._s is not None else None,
                "gap": self._gap.detach().cpu().clone(),
                "exchange": self.exchange.state_dict(),
                # after exchange.state_dict(): the wait for an all-reduce in flight is counted in them
                "stats": copy.deepcopy(self.exchange.stats)}

    def _split_legacy(self, sd: dict) -> Optional[tuple[dict, Optional[dict]]]:
        """The layout before torch.optim-shaped checkpoints: ``{"optimizer": inner, "co2": own}``."""
        if "state" not in sd and "optimizer" in sd and "co2" in sd:
            return sd["optimizer"], sd["co2"]
        return None

    def _check_exchange_state(self, sd: Any, keep: bool) -> None:
        """Validate the outer exchange's part (raises ``ValueError``; changes nothing)."""
        ex = self.exchange
        if not isinstance(sd, dict):
            raise ValueError("CO2 checkpoint is inconsistent: no outer exchange state")
        if sd.get("config") != ex.config():
            raise ValueError(f"CO2 checkpoint's outer exchange is {sd.get('config')}, this run uses {ex.config()}")
        if not keep:
            return
        slots = sd.get("slots")
        names = set(ex.feedback.local_slots + ex.feedback.shared_slots) if ex.feedback is not None else set()
        if not isinstance(slots, dict) or (slots and set(slots) != names):
            raise ValueError(f"CO2 checkpoint's outer exchange holds feedback state {sorted(slots or {})}, "
                             f"this run's rule keeps {sorted(names)}")
        for name in slots:
            _tensor_of(slots, name, ex.numel)
        done = sd.get("completed")
        if done is not None:
            if not isinstance(done, dict) or not _is_int(done.get("divisor")) or done["divisor"] < 1:
                raise ValueError("CO2 checkpoint is inconsistent: bad completed outer all-reduce")
            _tensor_of(done, "total", ex.numel)

    def _check_own(self, sd: Any) -> str:
        """Validate CO2's part of a checkpoint without changing anything; returns how to load it:
        ``"same"`` (this rank's own state), ``"other-rank"`` (another rank's file, same world size)
        or ``"reset"`` (another world size, ``on_world_size_change="reset"``)."""
        if not isinstance(sd, dict):
            raise ValueError(f"CO2 checkpoint is inconsistent: its {self.state_key!r} entry is a "
                             f"{type(sd).__name__}, not a dict")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported CO2 checkpoint version {sd.get('version')!r}")
        if not isinstance(sd.get("config"), dict):
            raise ValueError("CO2 checkpoint is inconsistent: no configuration")
        if sd["config"] != self._config:
            keys = set(sd["config"]) | set(self._config)
            diff = sorted(k for k in keys if sd["config"].get(k) != self._config.get(k))
            raise ValueError(f"CO2 checkpoint was made with another configuration (differs in {diff})")
        for key in ("world_size", "rank", "round", "position", "steps"):
            if not _is_int(sd.get(key)) or sd[key] < 0:
                raise ValueError(f"CO2 checkpoint is inconsistent: {key!r} = {sd.get(key)!r}")
        if sd["position"] >= self.tau:
            raise ValueError(f"CO2 checkpoint is inconsistent: position {sd['position']} >= tau = {self.tau}")
        if sd["world_size"] != self.world_size:
            if self.on_world_size_change != "reset":
                raise ValueError(
                    f"CO2 checkpoint was saved with world size {sd['world_size']}, this run has {self.world_size}: "
                    f"the per-rank state (round start s_i, the completed in-flight all-reduce, the outer "
                    f"exchange's feedback state) cannot be mapped; pass on_world_size_change='reset' to keep "
                    f"θ and m and restart every rank from θ")
            mode = "reset"
        else:
            mode = "same" if sd["rank"] == self.rank else "other-rank"
        n = self._theta.numel()
        _tensor_of(sd, "anchor", n)
        _tensor_of(sd, "momentum", n)
        if mode != "reset" and self._s is not None:
            _tensor_of(sd, "start", n)
        _tensor_of(sd, "gap", len(self._params))
        self._check_exchange_state(sd.get("exchange"), keep=mode != "reset")
        stats = sd.get("stats")   # absent in older checkpoints: the current counters are kept
        if stats is not None:
            if not isinstance(stats, dict) or not isinstance(stats.get("collectives", {}), dict) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float))
                    for k, v in stats.items() if k != "collectives"):
                raise ValueError("CO2 checkpoint is inconsistent: bad communication counters ('stats')")
        return mode

    @staticmethod
    def _must_agree(sd: dict) -> dict:
        """What of a (validated) checkpoint must be the same on every rank: where the rounds resume (ranks
        at different rounds would pair different outer all-reduces) and the run, by its id and by the bits
        of the replicated θ and m (a mix of two runs' files saved at the same round differs there, older
        checkpoints without an id too)."""
        return {"round": int(sd["round"]), "position": int(sd["position"]), "steps": int(sd["steps"]),
                "run": {"id": sd.get("run"), "anchor and momentum bits": bytes_digest([sd["anchor"], sd["momentum"]])}}

    def _per_rank_parts(self, sd: dict, inner: Optional[dict] = None) -> list[str]:
        """What in a (validated) checkpoint is specific to the rank that saved it (``inner``: the inner
        optimizer's part; its state, e.g. AdamW's moments, is never averaged, so it is per rank too)."""
        parts = []
        if isinstance(inner, dict) and inner.get("state"):
            parts.append("its inner optimizer's state")
        if sd["position"] != 0:
            parts.append(f"its local progress ({sd['position']} of tau={self.tau} steps into the round)")
        if self._s is not None and not torch.equal(sd["start"], sd["anchor"].to(sd["start"].dtype)):
            parts.append("its round start s_i")
        fb = self.exchange.feedback
        if fb is not None and fb.local_slots and sd["exchange"].get("slots"):
            parts.append(f"its error-feedback state {list(fb.local_slots)}")
        return parts

    def _load_state_dicts(self, inner: dict, own: Optional[dict]) -> None:
        if self.use_dist and self.world_size > 1:
            # the two branches below run different collectives: every rank must take the same one
            has_own: list[Any] = [None] * self.world_size
            dist.all_gather_object(has_own, own is not None, group=self.process_group)
            if len(set(has_own)) > 1:
                missing = [r for r, h in enumerate(has_own) if not h]
                raise ValueError(
                    f"CO2.load_state_dict refused on every rank; nothing was changed: rank(s) {missing} loaded a "
                    f"checkpoint without CO2's state (no 'commopt' entry) while the other ranks' have it; load the "
                    f"same kind of checkpoint on every rank")
        if own is None:
            self._load_inner_atomically(inner)
            warnings.warn(
                "CO2.load_state_dict: the checkpoint holds no CO2 state (no 'commopt' entry: a plain optimizer's "
                "checkpoint, or one that went through torch.distributed.checkpoint's get_optimizer_state_dict, "
                "which keeps only 'state' and 'param_groups'). The inner optimizer was loaded; CO2's anchor θ, "
                "outer momentum, round position and outer exchange are kept as they are. If the model's "
                "parameters were restored too, they no longer match θ: call opt.finish() on every rank before "
                "training on (for a CO2 built fresh, that sets θ to the mean of the ranks' restored models). "
                "To resume exactly, save and load opt.state_dict() itself.",
                RuntimeWarning, stacklevel=4)
            return
        mode, error, same = "same", None, None
        try:
            mode = self._check_own(own)
            same = self._must_agree(own)
        except Exception as exc:  # noqa: BLE001 - refused on every rank below, never on this one alone
            error = str(exc) if isinstance(exc, ValueError) else \
                f"malformed CO2 checkpoint ({type(exc).__name__}: {exc})"
        # every rank accepts, or every rank raises with nothing changed (one collective)
        self._load_inner_agreed(inner, error, self.process_group if self.use_dist else None,
                                "CO2.load_state_dict", same=same)
        # -- accepted: nothing below raises --
        self.exchange.settle()   # a live all-reduce must not write into the buffer while it is restored
        if own.get("run") is not None:  # the resumed run goes on as the saved one
            self._run_id = own["run"]
        with torch.no_grad():
            self._theta.copy_(own["anchor"])
            self._m.copy_(own["momentum"])
            self._round = int(own["round"])
            self._steps = int(own["steps"])
            if mode == "reset":
                dropped = self._reset_to_anchor(own)
            else:
                if self._s is not None:
                    self._s.copy_(own["start"])
                self._gap.copy_(own["gap"])
                self._pos = int(own["position"])
                self.exchange.load_state_dict(own["exchange"])
            if own.get("stats") is not None:   # the counters continue (an older checkpoint: kept as they are)
                stats = copy.deepcopy(own["stats"])
                self.exchange.stats = {**self.exchange.stats, **stats,
                                       "collectives": dict(stats.get("collectives", {}))}
        if mode == "reset":
            warnings.warn(
                f"CO2.load_state_dict: the checkpoint was saved with world size {own['world_size']}, this run has "
                f"{self.world_size} (on_world_size_change='reset'): kept the replicated anchor θ and outer "
                f"momentum m (round {self._round}); dropped " + "; ".join(dropped) + ". Every rank restarts from "
                f"θ at position 0 (its parameters were set to θ: load the model's state before the optimizer's).",
                RuntimeWarning, stacklevel=4)
        elif mode == "other-rank":
            parts = self._per_rank_parts(own, inner)
            if parts:
                warnings.warn(
                    f"CO2.load_state_dict: this checkpoint holds rank {own['rank']}'s state and this is rank "
                    f"{self.rank} (same world size {self.world_size}): rank {self.rank} continues as a replica of "
                    f"rank {own['rank']}, taking " + ", ".join(parts) + f". That is consistent only if the model "
                    f"state loaded on this rank is rank {own['rank']}'s too (a master-only checkpoint); to resume "
                    f"exactly, load each rank's own file, or call opt.finish() before saving.",
                    RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def _reset_to_anchor(self, own: dict) -> list[str]:
        """``on_world_size_change="reset"``: restart from θ; returns what was dropped (for the warning)."""
        dropped = []
        if self._s is not None:
            dropped.append("the per-rank round starts s_i")
            self._s.copy_(self._theta)
        ex_sd = own["exchange"]
        if ex_sd.get("completed") is not None:
            dropped.append(f"the completed outer all-reduce of round {self._round - 1} (not applied)")
        if ex_sd.get("slots"):
            dropped.append(f"the outer exchange's error-feedback state {sorted(ex_sd['slots'])} "
                           f"(it re-initialises with a dense round)")
        if own["position"]:
            dropped.append(f"{own['position']} local step(s) of progress into the round")
        if not dropped:
            dropped.append("nothing per rank (the checkpoint was taken at a consensus point)")
        # no feedback state, nothing completed: stateful rules start again from one dense round
        self.exchange.load_state_dict({"config": self.exchange.config(), "slots": {}, "completed": None})
        self._gap.zero_()
        self._pos = 0
        for p, (o, k) in zip(self._params, self._slices):
            p.copy_(self._theta[o:o + k].view_as(p))
        return dropped

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore from :meth:`state_dict`; atomic: a refused checkpoint leaves everything as it was.

        Load the model's own (per-rank) ``state_dict`` first. CO2's part is validated
        before anything changes, then the inner optimizer is loaded (restored if it
        refuses), then CO2's state is applied. A saved in-flight all-reduce is treated
        as completed: the next round end applies it without communicating.

        * **this rank's file**: resumes exactly.
        * **another world size**: refused unless ``on_world_size_change="reset"`` (see
          the constructor; one warning names what was dropped).
        * **another rank's file, same world size** (e.g. rank 0's file loaded on every
          rank, nanoGPT's master-only checkpoint): accepted; this rank continues as a
          replica of the saving rank (its s_i, position, error-feedback residual; θ, m
          and the completed all-reduce are replicated anyway). That is consistent only if
          the model state loaded here is that rank's too. It warns unless nothing in it is
          per rank: taken at a consensus point (after :meth:`finish`) with an inner optimizer
          that holds no state (e.g. plain SGD; AdamW's moments or SGD's momentum are per rank).
        * **no CO2 state** (a plain optimizer checkpoint, or one that went through
          ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which keeps
          only ``state`` and ``param_groups``): the inner optimizer is loaded and CO2's
          state is kept as is, with a warning; call :meth:`finish` on every rank after
          restoring the model (for a freshly built CO2, whose s_i = θ and nothing is in
          flight, that sets θ to the mean of the ranks' restored models).
        * the older layout ``{"optimizer": ..., "co2": ...}``: loaded as above.
        """
        super().load_state_dict(state_dict)
