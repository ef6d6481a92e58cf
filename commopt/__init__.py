"""commopt: data-parallel PyTorch training that communicates less and waits less.

The data path of compressed DDP training, top to bottom:
:mod:`commopt.hook` (DDP bucket) -> :mod:`commopt.feedback` (what to send) ->
:mod:`commopt.compressors` (which k entries) -> :mod:`commopt.exchange`
(fixed-size collective) -> :mod:`commopt.feedback` (state update) ->
:class:`CompressedOptimizer` (the wrapped optimizer steps).

:class:`CompressedUpdates` compresses the inner optimizer's step instead of the gradient
(the placement that works under Adam). :class:`CO2` trains τ local steps per round and overlaps the outer all-reduce
with the next round. :class:`MKOR` preconditions Linear/Conv2d gradients with
Kronecker factors kept current by rank-1 Sherman–Morrison updates.
"""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .compressors import Compressor, RandK, ScaledRandK, TopK, make_compressor
from .distributed import DistInfo, init_distributed
from .feedback import EF14, EF21, EF21SGDM, EControl, Feedback, NoFeedback, make_feedback
from .hook import CompressionState, compression_hook
from .optim import CO2, MKOR, CompressedOptimizer, CompressedUpdates
from .outer import AdaptivePenalty, ConstantPenalty, NoPenalty, Penalty

try:
    from importlib.metadata import version as _version

    __version__ = _version("commopt")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0.1.0"

__all__ = [
    "Compressor", "TopK", "RandK", "ScaledRandK", "make_compressor",
    "Feedback", "NoFeedback", "EF14", "EF21", "EF21SGDM", "EControl", "make_feedback",
    "CompressionState", "compression_hook",
    "CompressedOptimizer", "CompressedUpdates",
    "CO2", "Penalty", "NoPenalty", "ConstantPenalty", "AdaptivePenalty",
    "MKOR",
    "init_distributed", "DistInfo",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointError",
]
