"""A ``torch.optim.Optimizer`` that wraps another one and shares its parameter groups.

LR schedulers, ``zero_grad`` and the optimizer hooks act on the wrapper and
reach the inner optimizer, because ``param_groups`` and ``state`` *are* the
inner optimizer's (not copies). Subclasses add what happens around the inner
``step`` and extend ``state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(Optimizer):
    """Base class of commopt's optimizers: a drop-in ``Optimizer`` around ``optimizer``."""

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

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
