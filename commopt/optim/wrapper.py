"""A ``torch.optim.Optimizer`` that wraps another one and shares its parameter groups.

LR schedulers, ``zero_grad`` and the optimizer hooks act on the wrapper and
reach the inner optimizer, because ``param_groups`` and ``state`` *are* the
inner optimizer's (not copies). Subclasses add what happens around the inner
``step`` and their own checkpoint state.

Checkpoints have torch.optim's shape: ``state_dict()`` is the inner optimizer's
``{"state": ..., "param_groups": ...}`` with the wrapper's own state nested under
one extra key (:attr:`WrappedOptimizer.state_key`, e.g. ``"commopt"``), and the
optimizer state-dict hooks (``register_state_dict_pre_hook`` and friends) run
around it as in torch. Loading is atomic: the subclass validates its own part
first, the inner optimizer is restored to its old state if its load fails, and
only then is the wrapper's part applied.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]

#: ``depth``: how many commopt ``load_state_dict`` calls this thread is inside (see :meth:`WrappedOptimizer._loaded_by_outer`)
_LOADING = threading.local()


#: per-parameter state of torch.optim's built-in optimizers that has the parameter's shape
_PARAM_SHAPED = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg",
                           "grad_avg", "sum", "acc_delta", "ax", "prev", "step_size"})


def _check_param_shaped_state(optimizer: Optimizer, sd: Any) -> None:
    """Raise ``ValueError`` if ``sd`` gives a built-in ``torch.optim`` optimizer a state tensor of another
    shape than its parameter (e.g. AdamW's ``exp_avg``): torch's ``load_state_dict`` accepts it and the
    next ``step`` fails, on this rank only (the others would then wait in the next collective)."""
    if not type(optimizer).__module__.startswith("torch.optim") or not isinstance(sd, dict):
        return
    groups, state = sd.get("param_groups"), sd.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        return  # torch's own load raises
    try:
        saved_ids = [i for g in groups for i in g["params"]]
    except (TypeError, KeyError):
        return
    live = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved_ids) != len(live):
        return  # torch's own load raises
    param_of = dict(zip(saved_ids, live))
    for pid, entry in state.items():
        p = param_of.get(pid)
        if p is None or not isinstance(entry, dict):
            continue
        for key, value in entry.items():
            if key in _PARAM_SHAPED and isinstance(value, torch.Tensor) and value.shape != p.shape:
                raise ValueError(f"the state of parameter {pid} has {key!r} of shape {tuple(value.shape)}, "
                                 f"its parameter has shape {tuple(p.shape)}")


class WrappedOptimizer(Optimizer):
    """Base class of commopt's optimizers: a drop-in ``Optimizer`` around ``optimizer``."""

    #: the key under which the wrapper's own state sits beside ``state`` and ``param_groups``
    state_key: str = "commopt"

    def __init__(self, optimizer: Optimizer) -> None:  # noqa: D107 - Optimizer.__init__ would copy the groups
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer to wrap, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def params(self) -> list[torch.Tensor]:
        """Every parameter the inner optimizer owns, in group order."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support adding parameter groups after construction")

    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        return self.optimizer.step(closure)

    # -- checkpoints in torch.optim's shape ---------------------------------------------------------
    def _own_state_dict(self) -> dict:
        """The wrapper's own state (nested under :attr:`state_key`). Subclasses override."""
        return {}

    def _load_state_dicts(self, inner: dict, own: Optional[dict]) -> None:
        """Load ``inner`` (torch.optim's part) and ``own`` (None when the checkpoint has none).

        Subclasses override; they validate ``own`` first, then call
        :meth:`_load_inner_atomically`, then apply ``own`` (which must not fail any more)."""
        self._load_inner_atomically(inner)

    def _split_legacy(self, sd: dict) -> Optional[tuple[dict, Optional[dict]]]:
        """Translate an older checkpoint layout to (inner, own), or None if ``sd`` is not one. Subclasses override."""
        return None

    def _load_inner_atomically(self, inner: dict) -> None:
        """``self.optimizer.load_state_dict(inner)``; if it raises, the inner optimizer keeps its old state.

        An inner commopt wrapper's own load is atomic (on every rank), so it is called as is."""
        if isinstance(self.optimizer, WrappedOptimizer):
            self.optimizer.load_state_dict(inner)
            return
        if type(self.optimizer).load_state_dict is Optimizer.load_state_dict and (
                not isinstance(inner, dict) or "state" not in inner or "param_groups" not in inner):
            got = sorted(map(str, inner)) if isinstance(inner, dict) else type(inner).__name__
            raise ValueError(f"not an optimizer state_dict: expected keys 'state' and 'param_groups' "
                             f"(and {self.state_key!r}), got {got}")
        _check_param_shaped_state(self.optimizer, inner)
        old_state, old_groups = self.optimizer.state, self.optimizer.param_groups
        old_group_items = [dict(g) for g in old_groups]
        try:
            self.optimizer.load_state_dict(inner)
            # a saved group without a hyperparameter (e.g. 'lr') loads in torch and fails at the next step;
            # keys added in newer torch versions are filled in by the optimizer's __setstate__ above
            for i, g in enumerate(self.optimizer.param_groups):
                missing = sorted(set(self.optimizer.defaults) - set(g))
                if missing:
                    raise ValueError(f"param group {i} of the checkpoint lacks {missing}")
        except BaseException:
            self.optimizer.__setstate__({"state": old_state, "param_groups": old_groups})
            for g, items in zip(old_groups, old_group_items):
                g.clear()
                g.update(items)
            raise

    def _load_inner_agreed(self, inner: dict, error: Optional[str], group: Any, what: str,
                           same: Optional[dict] = None) -> None:
        """Load the inner optimizer only if every rank accepts its checkpoint: ``error`` is this rank's
        refusal of its own part (or None); the inner load's own refusal joins it; ``same``: values that must
        be equal on every rank (where the checkpoint resumes, its run); one collective
        (:func:`commopt.consistency.refuse_together`) then raises on every rank, with every rank's inner
        optimizer as it was, or returns with all of them loaded."""
        from ..consistency import refuse_together
        old = None if isinstance(self.optimizer, WrappedOptimizer) else \
            (self.optimizer.state, self.optimizer.param_groups)
        loaded = False
        if error is None:
            try:
                self._load_inner_atomically(inner)
                loaded = True
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                error = f"the inner optimizer refused it ({type(exc).__name__}: {exc})"
        try:
            refuse_together(error, group, what, same=same)
        except ValueError:
            if loaded and old is not None:
                self.optimizer.__setstate__({"state": old[0], "param_groups": old[1]})
            raise

    @staticmethod
    def _loaded_by_outer() -> bool:
        """True in :meth:`_load_state_dicts` when another commopt optimizer's ``load_state_dict`` called this
        one's (e.g. ``CompressedOptimizer(ddp, MKOR(...))``): the outer one agrees across ranks and may call
        this load on some ranks only, so this one must not run a collective of its own."""
        return getattr(_LOADING, "depth", 0) > 1

    def state_dict(self) -> dict:  # type: ignore[override]
        """torch.optim's ``{"state", "param_groups"}`` of the inner optimizer plus the wrapper's own state
        under :attr:`state_key`; the optimizer state-dict pre/post hooks run as in torch."""
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        sd = dict(self.optimizer.state_dict())
        sd[self.state_key] = self._own_state_dict()
        for post in self._optimizer_state_dict_post_hooks.values():
            out = post(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Restore from :meth:`state_dict` (the optimizer load-state-dict pre/post hooks run as in torch).

        A dict without :attr:`state_key` (a plain optimizer's checkpoint, or one that went through
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which keeps only
        ``state`` and ``param_groups``) loads the inner optimizer; what the subclass then does with
        its own state is documented there."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"{type(self).__name__}.load_state_dict expects a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre(self, sd)
            if out is not None:
                sd = out
        legacy = self._split_legacy(sd)
        if legacy is not None:
            inner, own = legacy
        else:
            # a dict without 'state' / 'param_groups' is refused by the inner load (_load_inner_atomically),
            # which subclasses run inside their agreement: raising here, on one rank only, would leave the
            # other ranks waiting in that collective
            own = sd.pop(self.state_key, None)
            inner = sd
        depth = getattr(_LOADING, "depth", 0)
        _LOADING.depth = depth + 1
        try:
            self._load_state_dicts(inner, own)
        finally:
            _LOADING.depth = depth
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
