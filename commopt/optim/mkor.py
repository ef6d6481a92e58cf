"""``MKOR`` and MKOR-H: Kronecker-factored preconditioning with rank-1 Sherman–Morrison updates of the
inverse factors and linear communication, as a drop-in ``torch.optim.Optimizer`` (SPEC §7).

Mozaffari, Li, Zhang, Dehnavi, "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer Using
Rank-1 Updates", NeurIPS 2023, arXiv 2306.01685. Per layer and update (Algorithm 1):

    ā = mean_rows a,  ḡ = Σ_rows δ                 lines 2–3  (commopt.precond.layers)
    all-reduce-average [ā, ḡ] of every layer      line 4     (one bucketed collective, here)
    stabilise, then SM-update L⁻¹ (ḡ), R⁻¹ (ā)     lines 5–8  (commopt.precond.rank1)
    P = L⁻¹GR⁻¹, P ← P·‖G‖/‖P‖                      lines 9–10 (every step)
    base optimizer steps with P                   line 14

Data path with communication-efficient DDP::

    forward:  MKOR's forward hooks wrap each layer's output in an identity whose backward hands
              Σ a, rows, Σ δ to probe leaves as gradients (only in the iteration before an update
              step; traceable, so torch.compile keeps one graph)
    backward: DDP (or CompressedOptimizer's hook) averages G into .grad; autograd accumulates the
              probes' gradients locally
    MKOR.step: one all-reduce of Σ(d_in + d_out) values -> factor updates -> .grad ← P
               -> base_optimizer.step()   (e.g. CompressedOptimizer(ddp, SGD).step())
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..consistency import _differences, agreed_run_id, build_consistently, mismatch
from ..exchange import CollectiveError, root_cause
from ..precond import layers as L
from ..precond.rank1 import RULES, compute_dtype, precondition, update_factor
from .wrapper import WrappedOptimizer

__all__ = ["MKOR", "KneeSwitch"]

_log = logging.getLogger("commopt.mkor")

SkipSpec = Union[str, nn.Module, type]

# torch.compiler.is_compiling (torch >= 2.3); dynamo folds it to True while tracing
_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


class KneeSwitch:
    """MKOR-H's switch to the first-order optimizer (paper §3.2 "Hybrid MKOR"; SPEC §7).

    The paper switches "based on the loss decrease rate" without a formula; SPEC §7 prescribes the
    same authors' knee-point rule, implemented here on window-mean losses ℓ_k observed at times t_k
    (the mean step index of window k):

        r_k = (ℓ_{k−1} − ℓ_k)/(t_k − t_{k−1})          per-step improvement of the last window
        m_k = s·m_{k−1} + (1 − s)·r_k                   its moving average (m_1 = r_1)
        switch when k ≥ min_updates and m_k < β·(ℓ_0 − ℓ_k)/(t_k − t_0)

    i.e. once the recent improvement rate falls below β times the *average per-step* improvement
    since training began (for ℓ = ℓ_∞ + A·e^(−t/τ) and β = 0.1 this is at t ≈ 3.6τ). A
    non-finite window loss is ignored. Pure Python floats: the caller feeds identical values on
    every rank (the all-reduced loss), so every rank decides identically.
    """

    def __init__(self, beta: float = 0.1, smoothing: float = 0.5, min_updates: int = 4) -> None:
        self.beta, self.smoothing, self.min_updates = float(beta), float(smoothing), int(min_updates)
        self.count = 0
        self.t0 = self.l0 = self.t_prev = self.l_prev = 0.0
        self.rate: Optional[float] = None

    def observe(self, t: float, loss: float) -> bool:
        """Feed the next window's mean loss at time ``t``; True when the knee has been passed."""
        if not math.isfinite(loss):
            return False
        if self.count == 0:
            self.t0 = self.t_prev = float(t)
            self.l0 = self.l_prev = float(loss)
            self.count = 1
            return False
        dt = float(t) - self.t_prev
        if dt <= 0:
            return False
        r = (self.l_prev - loss) / dt
        self.rate = r if self.rate is None else self.smoothing * self.rate + (1.0 - self.smoothing) * r
        self.t_prev, self.l_prev = float(t), float(loss)
        self.count += 1
        overall = (self.l0 - loss) / (float(t) - self.t0)
        return self.count >= self.min_updates and overall > 0 and self.rate < self.beta * overall

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("count", "t0", "l0", "t_prev", "l_prev", "rate")}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("count", "t0", "l0", "t_prev", "l_prev", "rate"):
            setattr(self, k, sd[k])


@dataclass(eq=False)
class _Layer:
    """One preconditioned layer: its factors and the statistics summed since the last update."""

    name: str
    module: nn.Module
    d_in: int   # without the bias column
    d_out: int
    bias: bool  # bias folded in as an extra input column of ones
    left: Tensor   # L⁻¹ ("ema") or F ("shrink"), d_out × d_out
    right: Tensor  # R⁻¹ or F, (d_in + bias) × (d_in + bias)
    probes: L.Probes = field(init=False)  # statistics since the last clear, as the probes' gradients
    handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.probes = L.Probes(self.module)

    def clear(self) -> None:
        self.probes.clear()

    def params(self) -> list[Tensor]:
        return [self.module.weight] + ([self.module.bias] if self.bias else [])


def _slot_counts(module: nn.Module) -> dict[int, int]:
    """{id(parameter): how many parameter slots of ``module``'s (distinct) submodules hold it}.

    A weight tied between two modules (GPT's ``lm_head.weight = wte.weight``) or registered twice
    counts 2; a module registered under two names counts once (its calls all go through its hooks)."""
    counts: dict[int, int] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _unwrap(model: nn.Module) -> tuple[nn.Module, Optional[DistributedDataParallel]]:
    """(the plain model, the DDP wrapper if any) under ``DistributedDataParallel`` and ``torch.compile``'s
    ``OptimizedModule`` in any order, so that layer names (and checkpoints) do not depend on either."""
    ddp = None
    while True:
        if isinstance(model, DistributedDataParallel):
            ddp, model = model, model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model, ddp


def _skipped(name: str, module: nn.Module, owners: list[nn.Module], skip: tuple) -> bool:
    for s in skip:
        if isinstance(s, str):
            if name == s or name.startswith(s + ".") or fnmatch.fnmatchcase(name, s):
                return True
        elif isinstance(s, type):
            if isinstance(module, s):
                return True
        elif isinstance(s, nn.Module):
            if any(o is s for o in owners):
                return True
        else:
            raise TypeError(f"skip entries must be module names, modules or module classes, got {s!r}")
    return False


class MKOR(WrappedOptimizer):
    """Preconditions the gradients of every ``nn.Linear`` / ``nn.Conv2d`` layer of ``model`` with
    rank-1-updated inverse Kronecker factors, then steps ``base_optimizer`` (SPEC §7, paper Algorithm 1).

    ``P = L⁻¹·G·R⁻¹`` rescaled to ``‖P‖ = ‖G‖`` replaces each layer's gradient G (bias folded in as
    an input column of ones) from the very first step; every other parameter passes through to the
    base optimizer unchanged. Every ``update_every`` steps the layers' rank-1 statistics
    ā = mean_rows a and ḡ = Σ_rows δ (``commopt.precond.layers``) are averaged across ranks in
    **one** all-reduce of Σ(d_in + d_out) values (d_in without the bias column, whose statistic is
    the constant 1 and is appended locally) and fold into the factors
    (``commopt.precond.rank1``). With ``hybrid=True`` (MKOR-H) the optimizer hands over to the
    base optimizer for good once the loss curve passes its knee (:class:`KneeSwitch`).

    Composition: the gradient exchange belongs to DDP or to :class:`CompressedOptimizer`; MKOR
    preconditions the averaged gradient they leave in ``.grad``. Recommended nesting::

        opt = MKOR(ddp, CompressedOptimizer(ddp, SGD(model.parameters(), ...)))

    ``CompressedOptimizer(ddp, MKOR(ddp, SGD(...)))`` computes exactly the same iterates.

    A layer whose weight (or bias) is also registered in another module, e.g. a GPT's ``lm_head``
    tied to the token embedding, is left to the base optimizer: its gradient sums contributions
    that its own statistics do not describe (``tied_layers`` lists them). ``torch.compile`` of the
    model works without graph breaks from MKOR (the README's MKOR section has the figures).

    Checkpoints: :meth:`state_dict` is the base optimizer's (``state``, ``param_groups``, plus
    whatever keys a commopt base adds) with MKOR's factors, counters and MKOR-H switch under
    ``"mkor"``; see :meth:`load_state_dict` for checkpoints without it (e.g. from
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``).

    Args:
        model: the model (``DistributedDataParallel`` and ``torch.compile`` wrappers are unwrapped);
            hooks go on its layers.
        base_optimizer: any ``torch.optim.Optimizer`` (SGD, AdamW, a LAMB, ``CompressedOptimizer``)
            owning every parameter of the preconditioned layers, and only parameters of ``model``.
        rule: ``"shrink"`` (default; F = (M⁻¹ + vvᵀ)⁻¹, M = γF + (1−γ)I, eigenvalues in (0, 1]) or
            ``"ema"`` (exact inverse of L = γL + (1−γ)vvᵀ); see :mod:`commopt.precond.rank1`.
        factor_momentum: γ in (0, 1).
        update_every: f ≥ 1: statistics and factor updates every f steps (steps 0, f, 2f, ...).
        skip: layers left to the base optimizer: qualified names (``fnmatch`` patterns; a name
            also skips everything below it), module instances, or module classes.
        hybrid: MKOR-H; then pass the loss each step: ``opt.step(loss=loss)`` (or a closure).
        stabilizer_threshold: ε of the norm-based stabiliser (max |factor| > ε triggers the blend).
        stabilizer_blend: ζ in [0, 1): the blend F ← ζF + (1−ζ)I.
        factor_dtype: storage dtype of the factors (default float32, float64 for float64
            layers); arithmetic always runs in at least float32.
        grad_scaler: a ``torch.amp.GradScaler``: ḡ is divided by its scale at backward time, so
            the statistics are in unscaled units.
        process_group: the group to average statistics over (default: the DDP model's, else
            ``CompressedOptimizer``'s, else the default group when one is initialised).
        knee_beta, knee_smoothing, knee_min_updates: the MKOR-H rule (:class:`KneeSwitch`).
    """

    #: MKOR's key beside ``state`` and ``param_groups`` (distinct from CompressedOptimizer's
    #: ``"commopt"``, so MKOR over a CompressedOptimizer keeps both)
    state_key = "mkor"

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Optimizer,
        rule: str = "shrink",
        factor_momentum: float = 0.95,
        update_every: int = 10,
        skip: Iterable[SkipSpec] = (),
        hybrid: bool = False,
        *,
        stabilizer_threshold: float = 100.0,
        stabilizer_blend: float = 0.9,
        factor_dtype: Optional[torch.dtype] = None,
        grad_scaler: Any = None,
        process_group: Optional[dist.ProcessGroup] = None,
        knee_beta: float = 0.1,
        knee_smoothing: float = 0.5,
        knee_min_updates: int = 4,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MKOR needs the model (an nn.Module) to hook its layers, got {type(model).__name__}")
        super().__init__(base_optimizer)
        inner = base_optimizer
        while isinstance(inner, WrappedOptimizer):  # each wrapper's own state needs its own key
            if inner.state_key == self.state_key:
                raise TypeError(f"MKOR cannot wrap {type(inner).__name__}: both keep their checkpoint state under "
                                f"{self.state_key!r} (and MKOR over MKOR would precondition twice)")
            inner = inner.optimizer
        module, ddp = _unwrap(model)
        if process_group is None:
            if ddp is not None:
                process_group = ddp.process_group
            elif getattr(base_optimizer, "process_group", None) is not None:
                process_group = base_optimizer.process_group
        self.process_group = process_group
        self.world_size = (dist.get_world_size(process_group)
                           if dist.is_available() and dist.is_initialized() else 1)
        self.rank = dist.get_rank(process_group) if self.world_size > 1 else 0
        self._module = module
        skip = tuple(skip) if not isinstance(skip, (str, nn.Module, type)) else (skip,)

        def build() -> tuple[tuple[list[_Layer], list[str]], dict]:
            layers = self._build(module, base_optimizer, rule, factor_momentum, update_every, skip, hybrid,
                                 stabilizer_threshold, stabilizer_blend, factor_dtype,
                                 knee_beta, knee_smoothing, knee_min_updates)
            config = {**self._config(), "base": type(base_optimizer).__name__,
                      "layers": [(ly.name, ly.d_in, ly.d_out, ly.bias) for ly in layers[0]], "tied": layers[1]}
            return layers, config

        if self.world_size > 1:
            # a bad setting on one rank raises on every rank (nobody is left waiting in the all-reduce)
            self._layers, self.tied_layers = build_consistently(build, process_group, what="MKOR")
        else:
            self._layers, self.tied_layers = build()[0]
        # one id for this run on every rank: its checkpoints carry it, and a load mixing runs is refused
        self._run_id: str = agreed_run_id(process_group)
        if self.tied_layers and self.rank == 0:
            _log.info("MKOR: layer(s) %s share their weight with another module (tied); left to %s unpreconditioned",
                      self.tied_layers, type(base_optimizer).__name__)
        self.grad_scaler = grad_scaler
        self.knee = KneeSwitch(knee_beta, knee_smoothing, knee_min_updates)
        self._steps = 0
        self._updates = 0
        self.switched = False
        self.switch_step: Optional[int] = None
        self._loss_sum: Optional[Tensor] = None
        self._loss_count = 0
        self._loss_t = 0.0
        dev = self._layers[0].module.weight.device
        self._events = {k: torch.zeros((), dtype=torch.int64, device=dev) for k in ("blended", "reset", "skipped")}
        self._comm = {"updates": 0, "allreduce_calls": 0, "values": 0}
        self._collecting = True  # statistics are gathered in the iteration before every update step
        for ly in self._layers:
            ly.handles.append(ly.module.register_forward_hook(self._make_forward_hook(ly)))

    # -- construction ----------------------------------------------------------------------------

    def _build(self, module, base, rule, gamma, every, skip, hybrid, threshold, blend, factor_dtype,
               knee_beta, knee_smoothing, knee_min_updates) -> tuple[list[_Layer], list[str]]:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) < 1.0:
            raise ValueError(f"factor_momentum (γ) must lie in the open interval (0, 1), got {gamma!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {every!r}")
        if not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"stabilizer_threshold (ε) must be > 0, got {threshold!r}")
        if not (isinstance(blend, (int, float)) and 0.0 <= blend < 1.0):
            raise ValueError(f"stabilizer_blend (ζ) must lie in [0, 1), got {blend!r}")
        if factor_dtype is not None and (not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point):
            raise ValueError(f"factor_dtype must be a floating-point torch.dtype, got {factor_dtype!r}")
        if not 0.0 <= knee_smoothing < 1.0 or knee_beta <= 0 or int(knee_min_updates) < 2:
            raise ValueError("MKOR-H needs knee_beta > 0, knee_smoothing in [0, 1) and knee_min_updates >= 2")
        self.rule, self.gamma, self.update_every = rule, float(gamma), every
        self.hybrid = bool(hybrid)
        self.stabilizer_threshold, self.stabilizer_blend = float(threshold), float(blend)
        self.factor_dtype = factor_dtype
        self._knee_cfg = (float(knee_beta), float(knee_smoothing), int(knee_min_updates))

        owned = {id(p) for g in base.param_groups for p in g["params"]}
        model_params = {id(p) for p in module.parameters()}
        foreign = [p for g in base.param_groups for p in g["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(f"the base optimizer holds {len(foreign)} tensor(s) that are not parameters of the "
                             f"model: build it over this model's parameters")
        if not owned & model_params:
            raise ValueError("the base optimizer owns none of the model's parameters")
        chain: dict[str, list[nn.Module]] = {}
        slots = _slot_counts(module)
        layers, not_owned, tied = [], [], []
        for name, m in module.named_modules():
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            chain[name] = chain.get(parent, []) + [m] if name else [m]
            if not L.is_supported(m) or not m.weight.requires_grad:
                continue
            if _skipped(name, m, chain[name], skip):
                continue
            bias = m.bias is not None and m.bias.requires_grad
            ps = [m.weight] + ([m.bias] if bias else [])
            if any(slots.get(id(p), 0) > 1 for p in [m.weight] + ([m.bias] if m.bias is not None else [])):
                tied.append(name or type(m).__name__)  # shared with another module: left to the base optimizer
                continue
            if any(id(p) not in owned for p in ps):
                not_owned.append(name or type(m).__name__)
                continue
            d_in, d_out = L.input_dim(m), L.output_dim(m)
            dt = factor_dtype or compute_dtype(m.weight.dtype)
            dev = m.weight.device
            layers.append(_Layer(name, m, d_in, d_out, bias,
                                 torch.eye(d_out, dtype=dt, device=dev),
                                 torch.eye(d_in + int(bias), dtype=dt, device=dev)))
        if not_owned:
            raise ValueError(f"the base optimizer does not own the parameters of layer(s) {not_owned}: MKOR "
                             f"writes their preconditioned gradients for the base optimizer to apply")
        if not layers:
            raise ValueError(f"MKOR found no nn.Linear or nn.Conv2d layer (groups=1, trainable weight, not tied "
                             f"to another module) to precondition in {type(module).__name__} "
                             f"(skip={list(map(repr, skip))}, tied={tied})")
        return layers, tied

    def _config(self) -> dict:
        return {"rule": self.rule, "factor_momentum": self.gamma, "update_every": self.update_every,
                "hybrid": self.hybrid, "stabilizer_threshold": self.stabilizer_threshold,
                "stabilizer_blend": self.stabilizer_blend, "factor_dtype": str(self.factor_dtype),
                "knee": list(self._knee_cfg)}

    # -- statistics (Algorithm 1 lines 2–3) -----------------------------------------------------

    def _scale(self) -> Optional[Tensor]:
        s = self.grad_scaler
        if s is None or (hasattr(s, "is_enabled") and not s.is_enabled()):
            return None
        return getattr(s, "_scale", None)

    def _make_forward_hook(self, ly: _Layer) -> Callable:
        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not self._collecting or not torch.is_grad_enabled():
                return None
            if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
                return None
            # zero_grad(set_to_none=True) on the model since the last statistics: drop them. Eager
            # only: under torch.compile this would guard (and recompile) on the gradient's None-ness;
            # there statistics live from MKOR.step() / MKOR.zero_grad() to the next.
            if not _is_compiling() and module.weight.grad is None:
                ly.clear()
            return L.tap(module, inputs[0], output, ly.probes)

        return forward_hook

    def _layer_statistics(self, ly: _Layer) -> tuple[Tensor, Tensor]:
        """(ā, ḡ) of a layer whose probes are ready; ḡ in unscaled units under a GradScaler (its scale
        is the one the backward ran with: ``GradScaler.update`` comes after the step)."""
        pr = ly.probes
        a = pr.a.grad / pr.n.grad.to(pr.a.dtype)
        g = pr.g.grad
        scale = self._scale()
        if scale is not None:  # the loss was multiplied by it
            g = g / scale.to(device=g.device, dtype=g.dtype)
        return a, g

    def _clear_statistics(self) -> None:
        for ly in self._layers:
            ly.clear()

    def _local_statistics(self) -> Tensor:
        """[ā₁, ḡ₁, ā₂, ḡ₂, …] (and the window's mean loss under MKOR-H): this rank's share of the collective.

        A layer that saw no backward since the last update contributes zeros."""
        dtype = torch.float64 if any(ly.left.dtype == torch.float64 for ly in self._layers) else torch.float32
        dev = self._layers[0].module.weight.device
        parts = []
        for ly in self._layers:
            if ly.probes.ready():
                a, g = self._layer_statistics(ly)
                parts += [a.to(dtype), g.to(dtype)]
            else:
                parts.append(torch.zeros(ly.d_in + ly.d_out, dtype=dtype, device=dev))
        if self.hybrid:
            loss = self._loss_sum / self._loss_count if self._loss_count else torch.tensor(float("nan"))
            parts.append(loss.to(dtype=dtype, device=dev).reshape(1))
        return torch.cat(parts)

    def _average(self, buf: Tensor) -> Tensor:
        """Algorithm 1 line 4: one all-reduce for all layers, averaged exactly once. A failed all-reduce
        raises :class:`commopt.exchange.CollectiveError` naming it, this rank and the backend's error."""
        if self.world_size > 1:
            try:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
            except Exception as exc:  # a dead or unreachable peer, a timeout, an aborted group
                raise CollectiveError(
                    f"commopt: MKOR's statistics all_reduce ({buf.numel()} values, "
                    f"{str(buf.dtype).replace('torch.', '')}, step {self._steps}) failed on rank {self.rank} of "
                    f"{self.world_size}: {root_cause(exc)}") from exc
            buf.div_(self.world_size)
            self._comm["allreduce_calls"] += 1
            self._comm["values"] += buf.numel()
        return buf

    # -- factor updates (lines 5–8) and preconditioning (lines 9–10) ---------------------------

    def _update_factors(self) -> None:
        """Algorithm 1 lines 4–8 for every layer: average [ā, ḡ] (one collective), then stabilise and
        SM-update L⁻¹ from ḡ and R⁻¹ from [ā, 1]; under MKOR-H also feed the knee rule (§3.2)."""
        buf = self._average(self._local_statistics())
        self._comm["updates"] += 1
        off = 0
        for ly in self._layers:
            a = buf[off:off + ly.d_in]
            g = buf[off + ly.d_in:off + ly.d_in + ly.d_out]
            off += ly.d_in + ly.d_out
            if ly.bias:
                a = torch.cat([a, a.new_ones(1)])
            args = (self.rule, self.gamma, self.stabilizer_threshold, self.stabilizer_blend)
            ly.left, ev_l = update_factor(ly.left, g, *args)
            ly.right, ev_r = update_factor(ly.right, a, *args)
            for k in self._events:
                self._events[k] += ev_l[k].to(torch.int64) + ev_r[k].to(torch.int64)
        self._updates += 1
        if self.hybrid:
            t = self._loss_t / self._loss_count if self._loss_count else float(self._steps)
            if self.knee.observe(t, float(buf[-1])):
                self.switched = True
                self.switch_step = self._steps
                if self.rank == 0:
                    _log.info("MKOR-H: loss decrease rate fell below %.3g x its average since the start at step "
                              "%d (window loss %.6g); continuing with %s alone, its state kept",
                              self.knee.beta, self._steps, float(buf[-1]), type(self.optimizer).__name__)
        self._loss_sum, self._loss_count, self._loss_t = None, 0, 0.0

    def _precondition(self) -> None:
        """Algorithm 1 lines 9–10 for every layer with a gradient: .grad ← L⁻¹GR⁻¹·‖G‖/‖L⁻¹GR⁻¹‖."""
        for ly in self._layers:
            if ly.module.weight.grad is None:
                continue
            g = L.grad_matrix(ly.module, ly.bias)
            p = precondition(ly.left, g, ly.right)
            L.write_grad(ly.module, p.to(g.dtype), ly.bias)

    # -- optimizer API ---------------------------------------------------------------------------

    def _observe_loss(self, loss: Any) -> None:
        if loss is None:
            raise ValueError("MKOR-H (hybrid=True) needs the loss of every step: opt.step(loss=loss), "
                             "scaler.step(opt, loss=loss), or a closure that returns it")
        if isinstance(loss, Tensor):
            t = loss.detach().reshape(()).to(torch.float64)
        else:
            t = torch.tensor(float(loss), dtype=torch.float64)
        self._loss_sum = t if self._loss_sum is None else self._loss_sum + t.to(self._loss_sum.device)
        self._loss_count += 1
        self._loss_t += float(self._steps)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, loss: Any = None):  # type: ignore[override]
        """Update the factors (every ``update_every`` steps), precondition ``.grad``, step the base optimizer.

        ``loss`` (a tensor or float) feeds MKOR-H's switch; a closure's return value does too.

        The state-initialising step of ``torch.distributed.checkpoint.state_dict`` (its
        ``_init_optim_state`` steps an optimizer whose state is empty with zero gradients and
        every learning rate set to 0) only steps the base optimizer: MKOR's factors, step count,
        update schedule and MKOR-H window stay as they were (see :meth:`_is_state_init_step`).
        """
        ret = None
        if closure is not None:
            with torch.enable_grad():
                ret = closure()
            if loss is None:
                loss = ret
        elif self._is_state_init_step():
            self.optimizer.step()
            return None
        window = (self._loss_sum, self._loss_count, self._loss_t)
        if self.hybrid and not self.switched:
            self._observe_loss(loss)
        if not self.switched:
            if self._steps % self.update_every == 0:
                try:
                    self._update_factors()  # its first act is the statistics all-reduce
                except BaseException:
                    # e.g. the all-reduce failed: nothing is applied, the step can be repeated
                    self._loss_sum, self._loss_count, self._loss_t = window
                    raise
            if not self.switched:
                self._precondition()
        self.optimizer.step()
        self._steps += 1
        self._clear_statistics()
        self._collecting = not self.switched and self._steps % self.update_every == 0
        return ret

    def _is_state_init_step(self) -> bool:
        """True for a step that cannot be training: the base optimizer's state is empty, every group's
        learning rate is 0, no backward reached a preconditioned layer since the last step, and
        every gradient is absent or zero (what ``_init_optim_state`` of
        ``torch.distributed.checkpoint.state_dict`` sets up). Cheap unless the learning rates are all
        0; the decision is the same on every rank (DDP's gradients and the learning rates are)."""
        if self.optimizer.state:
            return False
        for group in self.param_groups:
            lr = group.get("lr")
            if lr is None or (float(lr) if isinstance(lr, Tensor) else lr) != 0:
                return False
        if any(ly.probes.ready() for ly in self._layers):
            return False
        for p in self.params():
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    g = g.coalesce()._values()
                if bool(g.ne(0).any()):
                    return False
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clear_statistics()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of model parameters to the base optimizer (``base.add_param_group``).

        The new parameters pass through unpreconditioned: every layer MKOR preconditions had its
        parameters in the base optimizer at construction, so a new one belongs to another kind of
        module or to a layer that was frozen, skipped or tied then. Tensors that are not parameters
        of the model are refused (as at construction); the base optimizer refuses duplicates. Call
        it identically on every rank."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        params = [params] if isinstance(params, Tensor) else params
        if isinstance(params, set) or params is None:
            raise TypeError("param_group['params'] must be a tensor or an ordered iterable of tensors")
        params = list(params)
        model_params = {id(p) for p in self._module.parameters()}
        foreign = [p for p in params if not isinstance(p, Tensor) or id(p) not in model_params]
        if foreign:
            raise ValueError(f"MKOR.add_param_group: {len(foreign)} tensor(s) are not parameters of the model")
        self.optimizer.add_param_group({**param_group, "params": params})

    def remove_hooks(self) -> None:
        """Detach MKOR from the model's layers (the optimizer then only passes gradients through)."""
        for ly in self._layers:
            for h in ly.handles:
                h.remove()
            ly.handles.clear()

    # -- introspection ---------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        return [ly.name for ly in self._layers]

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer name: (left, right)}: L⁻¹, R⁻¹ under ``"ema"``, the shrink factors F under ``"shrink"``."""
        return {ly.name: (ly.left, ly.right) for ly in self._layers}

    def local_statistics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer name: (ā, ḡ)} gathered on this rank since the last update (before averaging; ā
        without the bias's constant 1). Empty for a layer that saw no backward."""
        return {ly.name: self._layer_statistics(ly) for ly in self._layers if ly.probes.ready()}

    def statistics_size(self) -> int:
        """Values each rank contributes to the per-update all-reduce: Σ(d_in + d_out) (+1 loss under MKOR-H)."""
        return sum(ly.d_in + ly.d_out for ly in self._layers) + int(self.hybrid)

    def comm_stats(self) -> dict:
        """``updates``, ``allreduce_calls``, ``values`` (all-reduced by this rank), ``values_per_update``,
        and the stabiliser's ``blended`` / ``reset`` / ``skipped`` factor-update counts."""
        out = dict(self._comm)
        out["values_per_update"] = self.statistics_size()
        out.update({k: int(v) for k, v in self._events.items()})
        return out

    # -- checkpoints -----------------------------------------------------------------------------
    #
    # state_dict() = the base optimizer's state_dict() (torch.optim's "state" and "param_groups", and
    # a commopt base's own key, e.g. CompressedOptimizer's "commopt") + {"mkor": MKOR's part}. Older
    # checkpoints {"optimizer": base, "mkor": part} still load (_split_legacy).

    def _own_state_dict(self) -> dict:
        return {
            "version": 1, "config": self._config(), "run": self._run_id, "steps": self._steps,
            "updates": self._updates,
            "factors": {ly.name: {"left": ly.left.detach().clone(), "right": ly.right.detach().clone()}
                        for ly in self._layers},
            "events": {k: v.detach().clone() for k, v in self._events.items()},
            "comm": dict(self._comm),
            "hybrid": {"switched": self.switched, "switch_step": self.switch_step, "knee": self.knee.state_dict(),
                       "loss_sum": None if self._loss_sum is None else self._loss_sum.detach().clone(),
                       "loss_count": self._loss_count, "loss_t": self._loss_t},
        }

    def state_dict(self) -> dict:  # type: ignore[override]
        """The base optimizer's state dict (torch.optim's ``state`` and ``param_groups``) with MKOR's
        factors, counters and MKOR-H switch under ``"mkor"`` (save per rank when the base optimizer's
        state is per rank, e.g. ``CompressedOptimizer``)."""
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` (or the older ``{"optimizer", "mkor"}`` layout); the layers and
        the rule must match (other settings may change). Atomic: MKOR's part is checked first and
        the base optimizer keeps its old state if its own load fails.

        At world size > 1 it is a collective (**call it on every rank**): the ranks agree in one
        ``all_gather_object`` on MKOR's part, on the base optimizer's load (a plain base is loaded,
        and put back if any rank refuses; a commopt base such as ``CompressedOptimizer`` loads
        collectively after the agreement) and on the MKOR step each rank resumes at. A refusal on any
        rank (a damaged or missing entry, a wrong shape, a base optimizer refusing its part, ranks at
        different MKOR steps) raises the same ``ValueError`` on every rank, naming the rank(s), with
        nothing changed on any rank. Inside an outer commopt optimizer's load
        (``CompressedOptimizer(ddp, MKOR(...))``), which agrees across ranks itself, it runs no
        collective of its own.

        A checkpoint without ``"mkor"`` (a plain optimizer's, or one that went through
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which keeps only
        ``state`` and ``param_groups``) loads the base optimizer and warns: MKOR's state then
        restarts as freshly built (identity factors, step 0, MKOR-H not switched). To carry MKOR's
        part through such a checkpoint, save :meth:`preconditioner_state_dict` beside it and
        restore it with :meth:`load_preconditioner_state_dict` after loading the optimizer."""
        super().load_state_dict(state_dict)

    def _split_legacy(self, sd: dict) -> Optional[tuple[dict, Optional[dict]]]:
        if self.state_key not in sd or ("state" in sd and "param_groups" in sd):
            return None
        if set(sd) == {"optimizer", self.state_key}:  # the layout before torch.optim-shaped checkpoints
            return sd["optimizer"], sd[self.state_key]
        # a base optimizer whose own state_dict is not torch.optim-shaped: everything but MKOR's key is its
        return {k: v for k, v in sd.items() if k != self.state_key}, sd[self.state_key]

    def _load_state_dicts(self, inner: dict, own: Optional[dict]) -> None:
        if self.world_size > 1 and not self._loaded_by_outer():
            self._load_agreed(inner, own)
            return
        # one rank, or inside an outer commopt optimizer's load (CompressedOptimizer(ddp, MKOR(...))), which
        # agrees across ranks itself and calls this one only on the ranks that accepted their own part
        apply = None if own is None else self._prepare_own(own)
        self._load_inner_atomically(inner)
        self._apply_own(apply, stacklevel=5)

    def _apply_own(self, apply: Optional[Callable[[], None]], stacklevel: int) -> None:
        """Apply a checked MKOR part, or (None: the checkpoint had none) restart MKOR's state and warn."""
        if apply is not None:
            apply()
            return
        self._reset_preconditioner()
        warnings.warn(
            "MKOR.load_state_dict: the checkpoint has no 'mkor' entry (a plain optimizer's state_dict, or one "
            "from torch.distributed.checkpoint's get_optimizer_state_dict, which keeps only 'state' and "
            "'param_groups'): loaded the base optimizer; MKOR's factors restart from identity, its step count "
            "from 0 and MKOR-H is not switched. Save opt.preconditioner_state_dict() beside such a checkpoint "
            "and restore it with opt.load_preconditioner_state_dict() to keep them.", stacklevel=stacklevel)

    def _load_agreed(self, inner: dict, own: Optional[dict]) -> None:
        """MKOR outermost at world size > 1: every rank loads, or every rank raises the same ``ValueError``
        naming the refusing rank(s) with nothing changed on any rank.

        Each rank checks MKOR's part and (over a plain base optimizer) loads the base atomically; one
        ``all_gather_object`` of the verdicts and of the schedule each rank would resume at (MKOR step,
        MKOR-H switched: what decides when a rank joins the statistics all-reduce) then decides for all.
        A refusal anywhere puts every rank's base optimizer back. A commopt base (CompressedOptimizer)
        loads collectively and atomically on every rank itself, so it is loaded after the agreement."""
        err: Optional[str] = None
        cause: Optional[BaseException] = None
        apply: Optional[Callable[[], None]] = None
        schedule: tuple = (0, False)  # no 'mkor' entry: MKOR restarts at step 0
        try:
            if own is not None:
                apply, schedule = self._check_own(own)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            err, cause = f"MKOR's part: {type(exc).__name__}: {exc}", exc
        base = self.optimizer
        collective_base = isinstance(base, WrappedOptimizer)
        restore: Optional[Callable[[], None]] = None
        if err is None and not collective_base:
            old_state, old_groups = base.state, base.param_groups  # a load replaces these, never mutates them
            old_items = [dict(g) for g in old_groups]
            try:
                self._load_inner_atomically(inner)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                err, cause = f"the base {type(base).__name__} refused its part ({type(exc).__name__}: {exc})", exc
            else:
                def restore() -> None:
                    base.__setstate__({"state": old_state, "param_groups": old_groups})
                    for g, items in zip(old_groups, old_items):
                        g.clear()
                        g.update(items)
        run = own.get("run") if isinstance(own, dict) else None
        try:
            self._agree_on_load(err, schedule, cause, run)
        except BaseException:
            if restore is not None:
                restore()
            raise
        # -- every rank accepted --
        if collective_base:
            self._load_inner_atomically(inner)  # raises on every rank, each as it was, if any rank refuses
        self._apply_own(apply, stacklevel=6)

    def _agree_on_load(self, err: Optional[str], schedule: tuple, cause: Optional[BaseException],
                       run: Optional[str] = None) -> None:
        what = "MKOR.load_state_dict"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {"error": err, "schedule": tuple(schedule), "run": run},
                               group=self.process_group)
        bad = [(r, p["error"]) for r, p in enumerate(gathered) if p["error"] is not None]
        if bad:
            raise ValueError(f"{what} refused on rank(s) {[r for r, _ in bad]}; nothing was changed on any rank:\n  "
                             + "\n  ".join(f"rank {r}: {e}" for r, e in bad)) from cause
        schedules = [p["schedule"] for p in gathered]
        if any(sc != schedules[0] for sc in schedules[1:]):
            raise ValueError(
                f"{what} refused: the ranks' checkpoints put MKOR at different points of its schedule (their "
                f"statistics all-reduces would no longer line up); nothing was changed on any rank:\n  "
                + "\n  ".join(f"rank {r}: MKOR step {st}, MKOR-H switched {sw}" for r, (st, sw) in enumerate(schedules)))
        diffs = _differences([{"run": p["run"]} for p in gathered])
        if diffs:  # their factors would differ
            raise ValueError(f"{what} refused; nothing was changed on any rank: {mismatch(diffs)}")

    def preconditioner_state_dict(self) -> dict:
        """MKOR's own part of :meth:`state_dict` (factors, counters, MKOR-H switch) alone: what a
        checkpoint made by ``torch.distributed.checkpoint`` does not carry."""
        return self._own_state_dict()

    def load_preconditioner_state_dict(self, state: dict) -> None:
        """Restore :meth:`preconditioner_state_dict` (checked completely before anything changes);
        the base optimizer is not touched."""
        self._prepare_own(state)()

    def _prepare_own(self, mk: Any) -> Callable[[], None]:
        """Check MKOR's part of a checkpoint completely and return the function that applies it
        (which cannot fail any more)."""
        return self._check_own(mk)[0]

    def _check_own(self, mk: Any) -> tuple[Callable[[], None], tuple[int, bool]]:
        """:meth:`_prepare_own`'s function, and the (MKOR step, MKOR-H switched) the checkpoint resumes at."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"not a valid MKOR checkpoint: {msg}")

        if not isinstance(mk, dict):
            raise bad(f"expected a dict under {self.state_key!r}, got {type(mk).__name__}")
        missing = {"version", "config", "steps", "updates", "factors", "events", "comm", "hybrid"} - set(mk)
        if missing:
            raise bad(f"missing {sorted(missing)}")
        if mk["version"] != 1:
            raise bad(f"unknown version {mk['version']!r}")
        rule = mk["config"].get("rule") if isinstance(mk["config"], dict) else None
        if rule != self.rule:
            raise ValueError(f"checkpoint was written with rule={rule!r}, this MKOR uses rule={self.rule!r}: "
                             f"the factors mean different things")
        facs = mk["factors"]
        if not isinstance(facs, dict) or sorted(facs) != sorted(self.layer_names):
            raise ValueError(f"checkpoint layers {sorted(facs) if isinstance(facs, dict) else facs!r} differ from "
                             f"this model's {sorted(self.layer_names)}")
        new_factors = []
        for ly in self._layers:
            f = facs[ly.name]
            if not (isinstance(f, dict) and isinstance(f.get("left"), Tensor) and isinstance(f.get("right"), Tensor)):
                raise bad(f"layer {ly.name!r}: expected tensors 'left' and 'right'")
            if tuple(f["left"].shape) != tuple(ly.left.shape) or tuple(f["right"].shape) != tuple(ly.right.shape):
                raise ValueError(f"layer {ly.name!r}: factor shapes in the checkpoint differ from the model's")
            new_factors.append((f["left"].to(dtype=ly.left.dtype, device=ly.left.device).clone(),
                                f["right"].to(dtype=ly.right.dtype, device=ly.right.device).clone()))
        if not isinstance(mk["events"], dict) or set(mk["events"]) != set(self._events):
            raise bad(f"events {mk['events']!r}")
        events = {k: torch.as_tensor(v).to(dtype=torch.int64, device=self._events[k].device).clone()
                  for k, v in mk["events"].items()}
        hy = mk["hybrid"]
        if not isinstance(hy, dict) or not {"switched", "switch_step", "knee", "loss_sum", "loss_count",
                                            "loss_t"} <= set(hy):
            raise bad("incomplete 'hybrid' entry")
        knee = KneeSwitch(*self._knee_cfg)
        try:
            knee.load_state_dict(hy["knee"])
            steps, updates = int(mk["steps"]), int(mk["updates"])
            loss_count, loss_t = int(hy["loss_count"]), float(hy["loss_t"])
            comm = {k: int(mk["comm"][k]) for k in self._comm}
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"{type(exc).__name__}: {exc}") from None
        loss_sum = None if hy["loss_sum"] is None else torch.as_tensor(hy["loss_sum"]).clone()
        switched, switch_step = bool(hy["switched"]), hy["switch_step"]
        run = mk.get("run")  # older checkpoints: None (this run keeps its id)

        def apply() -> None:
            if run is not None:  # the resumed run goes on as the saved one
                self._run_id = run
            for ly, (left, right) in zip(self._layers, new_factors):
                ly.left, ly.right = left, right
            self._events = events
            self._comm = comm
            self._steps, self._updates = steps, updates
            self.switched, self.switch_step = switched, switch_step
            self.knee = knee
            self._loss_sum, self._loss_count, self._loss_t = loss_sum, loss_count, loss_t
            self._clear_statistics()
            self._collecting = not self.switched and self._steps % self.update_every == 0

        return apply, (steps, switched)

    def _reset_preconditioner(self) -> None:
        """MKOR's state as freshly built: identity factors, step 0, MKOR-H not switched (the
        communication counters keep counting)."""
        for ly in self._layers:
            ly.left = torch.eye(ly.left.shape[0], dtype=ly.left.dtype, device=ly.left.device)
            ly.right = torch.eye(ly.right.shape[0], dtype=ly.right.dtype, device=ly.right.device)
        for k in self._events:
            self._events[k] = torch.zeros_like(self._events[k])
        self._steps = self._updates = 0
        self.switched, self.switch_step = False, None
        self.knee = KneeSwitch(*self._knee_cfg)
        self._loss_sum, self._loss_count, self._loss_t = None, 0, 0.0
        self._clear_statistics()
        self._collecting = True

    def __repr__(self) -> str:
        return (f"MKOR(rule={self.rule!r}, factor_momentum={self.gamma}, update_every={self.update_every}, "
                f"hybrid={self.hybrid}, layers={len(self._layers)}, base={self.optimizer!r})")
