"""commopt's optimizers: each a ``torch.optim.Optimizer`` wrapping a first-order optimizer."""

from .co2 import CO2, local_gradients_hook
from .compressed import CompressedOptimizer
from .mkor import MKOR, KneeSwitch
from .updates import CompressedUpdates
from .wrapper import WrappedOptimizer

__all__ = ["CO2", "CompressedOptimizer", "CompressedUpdates", "KneeSwitch", "MKOR", "WrappedOptimizer", "local_gradients_hook"]
