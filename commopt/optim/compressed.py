"""``CompressedOptimizer``: compressed DDP gradient exchange with error feedback, as a drop-in optimizer."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..compressors import Compressor
from ..consistency import assert_bitwise_same, build_consistently
from ..feedback import Feedback
from ..hook import CompressionState, compression_hook
from .wrapper import WrappedOptimizer

__all__ = ["CompressedOptimizer"]


def _model_signature(module: torch.nn.Module) -> str:
    text = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for name, p in module.named_parameters())
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


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

        def build() -> tuple[CompressionState, dict]:
            if on_world_size_change not in ("error", "reset"):
                raise ValueError(f"on_world_size_change must be 'error' or 'reset', got {on_world_size_change!r}")
            if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
                raise ValueError(f"check_every must be an integer >= 0, got {check_every!r}")
            model_params = {id(p) for p in ddp_model.module.parameters()}
            foreign = [p for p in self.params() if id(p) not in model_params]
            if foreign:
                raise ValueError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the DDP model")
            state = CompressionState(compressor, feedback, group, warmup_steps,
                                     model=ddp_model.module, grad_scaler=grad_scaler)
            config = {**state.config(), "model": _model_signature(ddp_model.module),
                      "optimizer": type(optimizer).__name__, "check_every": check_every,
                      "on_world_size_change": on_world_size_change}
            return state, config

        # every rank learns of a bad setting on any rank (no rank is left waiting in a collective)
        self.hook_state = build_consistently(build, group, what="CompressedOptimizer")
        self.check_every = check_every
        self.on_world_size_change = on_world_size_change
        ddp_model.register_comm_hook(self.hook_state, compression_hook)
        self._steps = 0

    @property
    def compressor(self) -> Compressor:
        return self.hook_state.compressor

    @property
    def feedback(self) -> Feedback:
        return self.hook_state.feedback

    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """Inner optimizer step with the averaged estimate the hook left in ``.grad``."""
        loss = self.optimizer.step(closure)
        self._steps += 1
        if self.check_every and self._steps % self.check_every == 0:
            self.verify_replicated_state()
        return loss

    def comm_stats(self) -> dict:
        """Communication counters of this rank.

        ``steps``: hook steps; ``bytes_sent``: bytes this rank sent (= received) by the
        SPEC §3 ring formulas; ``bytes_dense``: what dense all-reduce would have moved;
        ``collective``: the exchange(s) that ran (``gather``, ``shared``, ``dense``);
        ``collectives``: calls per exchange; ``dense_rounds``/``compressed_rounds``: bucket rounds; ``skipped_rounds``: rounds
        whose average was non-finite (state left untouched).
        """
        st = self.hook_state.stats
        names = sorted(st["collectives"], key=lambda c: (c == "dense", c))
        compressed = [c for c in names if c != "dense"] or names
        return {
            "steps": st["steps"],
            "bytes_sent": int(round(st["bytes_sent"])),
            "bytes_dense": int(round(st["bytes_dense"])),
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
        assert_bitwise_same(self.hook_state.replicated_checksum(), self.process_group,
                            what="replicated error-feedback state")

    def state_dict(self) -> dict:  # type: ignore[override]
        """The inner optimizer's state plus **this rank's** feedback state and step count: save one file per rank."""
        return {"optimizer": self.optimizer.state_dict(), "commopt": self.hook_state.state_dict(),
                "steps": self._steps}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore from :meth:`state_dict` of the same rank and world size (see ``on_world_size_change``)."""
        if not isinstance(state_dict, dict) or "commopt" not in state_dict or "optimizer" not in state_dict:
            raise ValueError("not a CompressedOptimizer state_dict (expected keys 'optimizer' and 'commopt'); "
                             "to load a plain optimizer checkpoint use opt.optimizer.load_state_dict()")
        self.hook_state.load_state_dict(state_dict["commopt"], self.on_world_size_change)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._steps = int(state_dict.get("steps", 0))
