"""commopt's optimizers: each a ``torch.optim.Optimizer`` wrapping a first-order optimizer."""

from .compressed import CompressedOptimizer
from .wrapper import WrappedOptimizer

__all__ = ["CompressedOptimizer", "WrappedOptimizer"]
