"""Building blocks of Kronecker-factored preconditioners (MKOR, SPEC §7): pure tensor rules, no communication.

:mod:`.rank1` holds the Sherman–Morrison factor updates, the norm-based stabiliser and the
rescaled preconditioning; :mod:`.layers` the rank-1 statistics of ``nn.Linear`` / ``nn.Conv2d``.
"""

from . import layers, rank1
from .rank1 import RULES, ema_update, precondition, shrink_update, stabilise, update_factor

__all__ = ["layers", "rank1", "RULES", "ema_update", "shrink_update", "stabilise", "update_factor", "precondition"]
