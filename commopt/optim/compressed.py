"""``CompressedOptimizer``: compressed DDP gradient exchange with error feedback, as a drop-in optimizer."""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..compressors import Compressor
from .. import kernels
from ..consistency import agreed_run_id, assert_bitwise_same, build_consistently
from ..feedback import Feedback
from ..hierarchy import NodeGroups, agree_node_size
from ..hook import CompressionState, compression_hook, refuse_python_reducer, stepping_grad_scaler
from .wrapper import WrappedOptimizer

__all__ = ["CompressedOptimizer"]


def _model_signature(module: torch.nn.Module) -> str:
    text = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for name, p in module.named_parameters())
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _warn_mkor_over_sparse_estimates(optimizer: Optimizer, feedback: Feedback) -> None:
    """MKOR preconditioning a sparse averaged message (EF14 or no feedback) diverged on the benchmark GPT."""
    from ..feedback import EF14, NoFeedback
    from .mkor import MKOR

    inner: Any = optimizer
    while isinstance(inner, WrappedOptimizer) and not isinstance(inner, MKOR):
        inner = inner.optimizer
    if isinstance(inner, MKOR) and isinstance(feedback, (EF14, NoFeedback)):
        import warnings

        warnings.warn(
            f"commopt: MKOR over a compressed exchange with feedback {feedback.name!r} "
            f"preconditions a sparse message (k entries per bucket); on the benchmark GPT it diverged (validation "
            f"loss 5.59 against 2.71 with 'econtrol', experiments/results/time_to_loss.md). Use feedback='econtrol' "
            f"or 'ef21sgdm', whose estimate is dense", RuntimeWarning, stacklevel=3)


class CompressedOptimizer(WrappedOptimizer):
    """Wraps ``optimizer`` over a ``DistributedDataParallel`` model and compresses its gradient exchange.

    Registers :func:`commopt.compression_hook` on the DDP buckets, so compression
    overlaps with backward. Each rank sends m_i = C(feedback input) and the inner
    optimizer steps with the feedback rule's averaged estimate, e.g. for EControl
    h ← h + mean_i C(η e_i + g_i − h_i) (Gao, Islamov, Stich 2024); see
    :mod:`commopt.feedback` for every rule.

    Args:
        ddp_model: the ``DistributedDataParallel`` model (no hook registered yet).
        optimizer: an already-built ``torch.optim`` optimizer over the model's parameters.
        compressor: a :class:`Compressor` or ``"topk:0.01"``, ``"randk:0.05"``, ``"none"``.
        feedback: a :class:`Feedback`, ``None`` or ``"none" | "ef14" | "ef21" | "ef21sgdm" | "econtrol"``.
        warmup_steps: dense all-reduce steps first (DDP rebuilds buckets after step 1;
            the feedback state starts from the last dense round's uncompressed gradient).
        process_group: defaults to the DDP model's.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale the hook divides out, so the
            error state is in unscaled gradient units.
        check_every: every N steps, verify that the replicated state is bitwise identical
            on all ranks (one tiny all-gather; 0 = never).
        on_world_size_change: ``"error"`` (default) or ``"reset"``: what ``load_state_dict``
            does with a checkpoint from another world size (reset = restart the feedback
            state with dense rounds).
        commit: ``"step"`` (default): a step's new feedback state is applied at the end of
            backward, only if every bucket's average was finite (atomic; the new state of
            every bucket lives until then). ``"block"``: each bucket's state is applied as
            soon as its average is known, where finite (peak extra memory: one bucket's).
        density_warmup: ``(start_density, steps)``: the first ``steps`` compressed rounds keep a
            density decaying geometrically from ``start_density`` to the compressor's
            (Deep Gradient Compression's warm-up, Lin et al. 2018), e.g. ``(0.25, 100)``;
            ``None``: the compressor's density from the first compressed round.
        node_size: ranks per node, consecutive ranks forming a node (SPEC §8). ``None`` or 1: the
            flat algorithm. An integer L > 1, or ``"auto"`` (the launcher's ``LOCAL_WORLD_SIZE``,
            ``SLURM_NTASKS_PER_NODE`` or MPI local size): hierarchical compression: a dense
            reduce-scatter inside the node, the feedback rule and compression of the node's shard
            with the N = n/L nodes as workers, the exchange across nodes among the ranks of the same
            local rank, a dense all-gather inside the node. Feedback memory per rank is 1/L of the
            bucket and inter-node bytes L× fewer than flat. The world size must be a multiple of L.

    Checkpoints (:meth:`state_dict` / :meth:`load_state_dict`) have torch.optim's shape, with
    commopt's state under the extra key ``"commopt"``; ``load_state_dict`` is a collective that
    every rank must call. Not supported: ``torch._dynamo.config.optimize_ddp = "python_reducer"``
    (compiled autograd's reducer calls hooks with another signature): ``RuntimeError`` at construction.
    """

    def __init__(
        self,
        ddp_model: DistributedDataParallel,
        optimizer: Optimizer,
        compressor: "str | Compressor" = "topk:0.01",
        feedback: "str | Feedback | None" = "econtrol",
        warmup_steps: int = 2,
        process_group: Optional[dist.ProcessGroup] = None,
        grad_scaler: Any = None,
        check_every: int = 0,
        on_world_size_change: str = "error",
        commit: str = "step",
        density_warmup: "tuple[float, int] | None" = None,
        node_size: "int | str | None" = None,
    ) -> None:
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                f"CompressedOptimizer needs a torch.nn.parallel.DistributedDataParallel model, got "
                f"{type(ddp_model).__name__}; wrap it first: DistributedDataParallel(model)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call commopt.init_distributed() first")
        super().__init__(optimizer)
        group = process_group if process_group is not None else ddp_model.process_group
        self.process_group = group
        # SPEC §8: agreed on every rank and its process groups built (collectives) before anything can fail
        # on one rank only
        L = agree_node_size(node_size, group)
        nodes = NodeGroups.build(L, group) if L > 1 else None

        def build() -> tuple[CompressionState, dict]:
            refuse_python_reducer(ddp_model)
            if on_world_size_change not in ("error", "reset"):
                raise ValueError(f"on_world_size_change must be 'error' or 'reset', got {on_world_size_change!r}")
            if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
                raise ValueError(f"check_every must be an integer >= 0, got {check_every!r}")
            model_params = {id(p) for p in ddp_model.module.parameters()}
            foreign = [p for p in self.params() if id(p) not in model_params]
            if foreign:
                raise ValueError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the DDP model")
            # find_unused_parameters / static_graph: DDP hands a zero gradient for a parameter this rank did
            # not use; track use so that such a parameter's state stays as it was and it takes no slots
            track = bool(getattr(ddp_model, "find_unused_parameters", False) or getattr(ddp_model, "static_graph", False))
            state = CompressionState(compressor, feedback, group, warmup_steps, model=ddp_model.module,
                                     grad_scaler=grad_scaler, commit=commit, track_unused=track,
                                     density_warmup=density_warmup, node_size=L, node_groups=nodes)
            device = next(iter(ddp_model.module.parameters())).device
            # the kernel path (SPEC §10): the same messages either way, but ranks still agree on it
            config = {**state.config(), "kernels": kernels.path_name(device),
                      "model": _model_signature(ddp_model.module),
                      "optimizer": type(optimizer).__name__, "check_every": check_every,
                      "on_world_size_change": on_world_size_change}
            return state, config

        # every rank learns of a bad setting on any rank (no rank is left waiting in a collective)
        self.hook_state = build_consistently(build, group, what="CompressedOptimizer")
        # one id for this run on every rank: its checkpoints carry it, and a load mixing runs is refused
        self.hook_state.run_id = agreed_run_id(group)
        _warn_mkor_over_sparse_estimates(optimizer, self.hook_state.feedback)
        self.check_every = check_every
        self.on_world_size_change = on_world_size_change
        ddp_model.register_comm_hook(self.hook_state, compression_hook)
        self.module = ddp_model.module
        self._steps = 0
        self._hook_step_seen = self.hook_state.step  # the hook's step count at the last counted step

    @property
    def compressor(self) -> Compressor:
        return self.hook_state.compressor

    @property
    def feedback(self) -> Feedback:
        return self.hook_state.feedback

    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """Inner optimizer step with the averaged estimate the hook left in ``.grad``.

        Called through ``scaler.step(opt)`` of a ``torch.amp.GradScaler`` that was not passed as
        ``grad_scaler=``, the scaler is bound here, at its first step, and the feedback state built so far
        is converted to unscaled units (the next backward then runs in unscaled units).

        Counted (for ``check_every`` and checkpoints) only when a backward pass exchanged gradients
        through the hook since the last step: a step without one, such as the zero-gradient step that
        ``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict`` take to initialise an empty
        optimizer state, goes to the inner optimizer but is not counted and runs no collective."""
        if self.hook_state.grad_scaler is None:
            scaler = stepping_grad_scaler()
            if scaler is not None:
                self.hook_state.bind_grad_scaler(scaler)
        loss = self.optimizer.step(closure)
        if self.hook_state.step != self._hook_step_seen:  # a backward exchanged gradients since the last step
            self._hook_step_seen = self.hook_state.step
            self._steps += 1
            if self.check_every and self._steps % self.check_every == 0:
                self.verify_replicated_state()
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` on the inner optimizer, for parameters of the DDP
        model that it does not hold yet (their gradients already go through the hook). A tensor that is
        not a parameter of the DDP model raises ``ValueError`` (its gradient would not be averaged)."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError("param_group must be a dict with a 'params' entry")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set: the inner optimizer raises torch's TypeError
            params = list(params)
        model_ids = {id(p) for p in self.module.parameters()}
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        foreign = [i for i, p in enumerate(tensors) if id(p) not in model_ids]
        if foreign:
            raise ValueError(
                f"add_param_group: entries {foreign} of 'params' are not parameters of the DDP model; "
                "CompressedOptimizer can only optimise the model whose gradients its hook averages")
        param_group["params"] = params
        self.optimizer.add_param_group(param_group)

    def comm_stats(self) -> dict:
        """Communication counters of this rank.

        ``steps``: hook steps; ``bytes_sent``: bytes this rank sent (= received) by the
        SPEC §3 ring formulas; ``bytes_dense``: what dense all-reduce would have moved;
        ``collective``: the exchange(s) that ran (``gather``, ``shared``, ``dense``);
        ``collectives``: calls per exchange; ``dense_rounds``/``compressed_rounds``: bucket rounds; ``skipped_rounds``: rounds
        whose average was non-finite (state left untouched). ``bytes_inter_node`` / ``bytes_intra_node``: of
        ``bytes_sent``, what crossed between nodes and what stayed inside one (SPEC §8 formulas) under
        ``node_size`` = L > 1; the flat algorithm does not know the placement and counts every byte as
        inter-node. ``node_size``: L (1: flat).
        """
        st = self.hook_state.stats
        flat = self.hook_state.nodes is None
        names = sorted(st["collectives"], key=lambda c: (c == "dense", c))
        compressed = [c for c in names if c != "dense"] or names
        return {
            "steps": st["steps"],
            "bytes_sent": int(round(st["bytes_sent"])),
            "bytes_dense": int(round(st["bytes_dense"])),
            "bytes_inter_node": int(round(st["bytes_sent"] if flat else st.get("bytes_inter_node", 0.0))),
            "bytes_intra_node": 0 if flat else int(round(st.get("bytes_intra_node", 0.0))),
            "node_size": self.hook_state.node_size,
            "collective": "+".join(compressed) if compressed else "none",
            "collectives": dict(st["collectives"]),
            "dense_rounds": st["dense_rounds"],
            "compressed_rounds": st["compressed_rounds"],
            "skipped_rounds": self.hook_state.skipped_rounds(),
            "compression": repr(self.compressor),
            "feedback": repr(self.feedback),
            "world_size": self.hook_state.world_size,
        }

    def verify_replicated_state(self) -> None:
        """Raise ``RuntimeError`` unless the replicated state (w, h) is bitwise identical on all ranks."""
        # over all ranks, so that every rank raises alike; under node_size = L the replicas are r ≡ r' mod L
        assert_bitwise_same(self.hook_state.replicated_checksum(), self.process_group,
                            what="replicated error-feedback state", period=self.hook_state.node_size)

    # -- checkpoints in torch.optim's shape (see WrappedOptimizer) -------------------------------------
    def _own_state_dict(self) -> dict:
        """Under ``"commopt"``: :meth:`CompressionState.state_dict` (this rank's feedback state, blocks,
        step count, communication counters) plus ``optimizer_steps`` (the steps :meth:`step` counted)."""
        return {**self.hook_state.state_dict(), "optimizer_steps": self._steps}

    def _split_legacy(self, sd: dict) -> Optional[tuple[dict, Optional[dict]]]:
        """The layout before torch.optim's shape: ``{"optimizer": ..., "commopt": ..., "steps": ...}``."""
        if "state" in sd or "param_groups" in sd or not isinstance(sd.get("optimizer"), dict) or "commopt" not in sd:
            return None
        own = sd["commopt"]
        if isinstance(own, dict) and "optimizer_steps" not in own:
            own = {**own, "optimizer_steps": sd.get("steps", 0)}
        return sd["optimizer"], own

    def _load_state_dicts(self, inner: dict, own: Optional[dict]) -> None:
        """Load the inner optimizer's part and commopt's part on every rank together, or on none.

        A collective: each rank validates commopt's part and loads the inner optimizer (restored if it
        refuses); one ``all_gather_object`` of the verdicts then decides the same on every rank
        (:meth:`CompressionState._agree_on_load`). Refused on any rank: every rank puts its inner
        optimizer back and raises ``ValueError`` naming the rank(s) and the reason. Otherwise: exact
        restore from each rank's own file, or a restart of the feedback state with dense rounds on
        every rank (one warning) when every rank loaded one rank's file, when the world size changed
        (``on_world_size_change="reset"``) or when ``own`` is None (no ``"commopt"`` key)."""
        st = self.hook_state
        verdict = st._check_load(own, self.on_world_size_change)
        steps = self._steps
        if own is not None and verdict["error"] is None:
            try:
                steps = int(own.get("optimizer_steps", 0))
            except (TypeError, ValueError) as exc:
                verdict["error"] = f"malformed commopt state (optimizer_steps: {exc})"
        verdict["same"]["optimizer_steps"] = steps
        opt = self.optimizer
        restore: Optional[Callable[[], None]] = None
        inner_exc = None
        if verdict["error"] is None:
            undo = self._inner_restorer()
            try:
                self._load_inner_atomically(inner)
                restore = undo
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                inner_exc = exc
                verdict["error"] = f"the inner {type(opt).__name__} refused its part ({type(exc).__name__}: {exc})"
        refused: Optional[str] = "the agreement between the ranks failed"
        try:
            decision = st._agree_on_load(verdict, what="CompressedOptimizer.load_state_dict")
            refused = decision["refused"]
        finally:
            if restore is not None and refused is not None:  # refused elsewhere: put the inner optimizer back
                restore()
        if refused is not None:
            raise ValueError(refused) from inner_exc
        st._apply_load(own, decision["reset"], stacklevel=4)  # the caller of load_state_dict
        self._steps = steps
        self._hook_step_seen = st.step

    def _inner_restorer(self) -> Callable[[], None]:
        """A function that puts the inner optimizer back to its present state after a successful load."""
        opt = self.optimizer
        if isinstance(opt, WrappedOptimizer):  # e.g. MKOR: its state is more than state / param_groups
            saved = opt.state_dict()
            return lambda: opt.load_state_dict(saved)
        old_state, old_groups = opt.state, opt.param_groups  # a load replaces these objects, never mutates them
        old_items = [dict(g) for g in old_groups]

        def restore() -> None:
            opt.__setstate__({"state": old_state, "param_groups": old_groups})
            for g, items in zip(old_groups, old_items):
                g.clear()
                g.update(items)

        return restore

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore from :meth:`state_dict`. **Every rank must call it** (one small collective decides
        for all ranks), with

        - its own file (same world size): exact, the run continues bitwise as the saved one;
        - one rank's file on every rank (a checkpoint saved on rank 0 only, nanoGPT-style): the inner
          optimizer's state, step count, blocks and counters are taken from it; the feedback state
          restarts with dense rounds on every rank (one warning);
        - a checkpoint from another world size: ``ValueError``, or a restart as above with
          ``on_world_size_change="reset"``;
        - a dict without ``"commopt"`` (a plain optimizer's state_dict, or what
          ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` passes on): the inner
          optimizer is loaded and the feedback state restarts as above (one warning).

        The older layout ``{"optimizer", "commopt", "steps"}`` is accepted too. A refusal on any
        rank (another compressor or feedback rule, files swapped between ranks, checkpoints of
        different steps or of different runs, an inner optimizer that refuses its part) raises ``ValueError`` on every
        rank and leaves every rank as it was. The load-state-dict pre/post hooks run as in torch."""
        super().load_state_dict(state_dict)
