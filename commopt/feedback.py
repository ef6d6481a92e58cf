"""Error-feedback rules as pure tensor functions (SPEC §2).

Every rule works in gradient units on one flat bucket and has two phases:

1. ``prepare(state, g)`` -> (p, pending): the vector p to compress, and any
   local quantity computed on the way (EF21-SGDM's momentum v);
2. ``update(state, g, p, pending, idx, vals, mean)`` -> the new state, from the
   rank's **own** message (idx, vals) and the average of all messages ``mean``
   (it may reuse the intermediates p and pending, which are not used afterwards);
   ``estimate(new_state, mean)`` is what the optimizer then uses as the
   averaged gradient.

Rules never communicate and never modify ``state`` in place: the hook commits
the new state only when every rank's gradient was finite. Slots listed in
``local_slots`` differ per rank; ``shared_slots`` are replicated (bitwise
identical on all ranks).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from . import kernels
from .compressors import Compressor

__all__ = ["Feedback", "NoFeedback", "EF14", "EF21", "EF21SGDM", "EControl", "make_feedback"]

State = dict[str, Tensor]


def _consume_minus_message(x: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
    """x − m computed in x (for an intermediate the rule owns, never for state)."""
    return kernels.ops(x).scatter_add_(x, idx, vals, -1.0)


def _plus_message(x: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
    """x + m for a sparse message m = (idx, vals) with distinct indices (x is not modified)."""
    return kernels.ops(x).scatter_add_(x.clone(), idx, vals, 1.0)


class Feedback:
    """Base class of the error-feedback rules."""

    name: str = "base"
    local_slots: tuple[str, ...] = ()
    shared_slots: tuple[str, ...] = ()
    #: whether ``update`` reads ``p``; if not, the round drops it before the exchange (one bucket less
    #: while the message is in flight) and ``update`` gets ``p=None``
    update_reads_p: bool = False

    def check_compressor(self, compressor: Compressor) -> None:
        """Refuse compressors this rule cannot use (non-contractive ones)."""
        if self.local_slots and not compressor.contractive:
            raise ValueError(
                f"{type(compressor).__name__} is not contractive and diverges with error feedback "
                f"({type(self).__name__}); use it with feedback='none', or use RandK/TopK"
            )

    def init(self, g: Tensor, mean: Tensor) -> State:
        """State after an uncompressed round: local gradient g, its average ``mean``."""
        return {}

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        """(p, pending): the vector to compress and local results to keep if the step commits.
        ``density`` is the compressor's k/d for this bucket."""
        raise NotImplementedError

    def update(self, state: State, g: Tensor, p: Tensor, pending: State, idx: Tensor, vals: Tensor,
               mean: Tensor) -> State:
        raise NotImplementedError

    def estimate(self, new_state: State, mean: Tensor) -> Tensor:
        return mean

    def memory_copies(self) -> int:
        """Extra bucket-sized float buffers this rule keeps."""
        return len(self.local_slots) + len(self.shared_slots)

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class NoFeedback(Feedback):
    """Plain compressed SGD: send C(g_i), use mean_i C(g_i). Diverges on SPEC E1; a control."""

    name = "none"

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        return g, {}

    def update(self, state, g, p, pending, idx, vals, mean) -> State:
        return {}


class EF14(Feedback):
    """Classic error feedback (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019).

    m_i = C(e_i + g_i);  e_i ← e_i + g_i − m_i;  step with mean_i m_i.
    """

    name = "ef14"
    local_slots = ("e",)
    update_reads_p = True

    def init(self, g: Tensor, mean: Tensor) -> State:
        return {"e": g.new_zeros(g.shape)}

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        return kernels.ops(g).ef14_input(state["e"], g), {}

    def update(self, state, g, p, pending, idx, vals, mean) -> State:
        return {"e": _consume_minus_message(p, idx, vals)}


class EF21(Feedback):
    """EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021).

    m_i = C(g_i − w_i);  w_i ← w_i + m_i;  w ← w + mean_i m_i;  step with w.
    Started from the uncompressed gradient: w_i = g_i⁰, w = mean g⁰.
    """

    name = "ef21"
    local_slots = ("w_i",)
    shared_slots = ("w",)

    def init(self, g: Tensor, mean: Tensor) -> State:
        return {"w_i": g.clone(), "w": mean.clone()}

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        return kernels.ops(g).ef21_input(g, state["w_i"]), {}

    def update(self, state, g, p, pending, idx, vals, mean) -> State:
        return {"w_i": _plus_message(state["w_i"], idx, vals), "w": state["w"] + mean}

    def estimate(self, new_state: State, mean: Tensor) -> Tensor:
        return new_state["w"]


class EF21SGDM(EF21):
    """EF21 with local momentum (Fatkhullin, Tyurin, Richtárik, NeurIPS 2023).

    v_i ← (1−β)v_i + βg_i;  m_i = C(v_i − w_i);  w_i ← w_i + m_i;  w ← w + mean_i m_i.
    Does not amplify stochastic-gradient noise the way plain EF21 does.
    """

    name = "ef21sgdm"
    local_slots = ("v", "w_i")

    def __init__(self, beta: float = 0.1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"EF21SGDM: beta must be in (0, 1], got {beta!r}")
        self.beta = float(beta)

    def init(self, g: Tensor, mean: Tensor) -> State:
        return {"v": g.clone(), "w_i": g.clone(), "w": mean.clone()}

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        # v·(1−β) and g·β rounded separately, then added (the same bits on every kernel path)
        v, p = kernels.ops(g).sgdm_input(state["v"], g, state["w_i"], self.beta)
        return p, {"v": v}

    def update(self, state, g, p, pending, idx, vals, mean) -> State:
        return {"v": pending["v"], **super().update(state, g, p, pending, idx, vals, mean)}

    def config(self) -> dict:
        return {"name": self.name, "beta": self.beta}


class EControl(Feedback):
    """EControl (Gao, Islamov, Stich, ICLR 2024).

    m_i = C(η·e_i + g_i − h_i);  e_i ← e_i + g_i − h_i − m_i;  h_i ← h_i + m_i;
    h ← h + mean_i m_i;  step with h. η = None uses the compressor's density δ
    (k/d of each bucket); η ≤ 2δ converged in every known experiment.
    """

    name = "econtrol"
    local_slots = ("e", "h_i")
    shared_slots = ("h",)

    def __init__(self, eta: float | None = None) -> None:
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0):
            raise ValueError(f"EControl: eta must be in [0, 1] or None (the density), got {eta!r}")
        self.eta = None if eta is None else float(eta)
        self._warned = False

    def eta_for(self, density: float) -> float:
        """η used for a bucket whose compressor keeps a fraction ``density``."""
        if self.eta is None:
            return density
        if self.eta > 2 * density and not self._warned and density < 1.0:
            self._warned = True
            warnings.warn(
                f"EControl eta={self.eta} is above 2x the density {density:.3g}; "
                "eta <= 2*delta converged in every known experiment, 4*delta diverged", stacklevel=3)
        return self.eta

    def init(self, g: Tensor, mean: Tensor) -> State:
        return {"e": g.new_zeros(g.shape), "h_i": g.clone(), "h": mean.clone()}

    def prepare(self, state: State, g: Tensor, density: float = 1.0) -> tuple[Tensor, State]:
        eta = self.eta_for(density)
        # q = e + (g − h_i), p = η·e + (g − h_i): bitwise EF21's g − w_i at η = 0 (SPEC §2 exact check)
        q, p = kernels.ops(g).econtrol_input(g, state["h_i"], state["e"], eta)
        return p, {"q": q}

    def update(self, state, g, p, pending, idx, vals, mean) -> State:
        return {
            "e": _consume_minus_message(pending["q"], idx, vals),
            "h_i": _plus_message(state["h_i"], idx, vals),
            "h": state["h"] + mean,
        }

    def estimate(self, new_state: State, mean: Tensor) -> Tensor:
        return new_state["h"]

    def config(self) -> dict:
        return {"name": self.name, "eta": self.eta}


_REGISTRY = {
    "none": NoFeedback,
    "ef14": EF14,
    "ef": EF14,
    "ef21": EF21,
    "ef21sgdm": EF21SGDM,
    "ef21-sgdm": EF21SGDM,
    "econtrol": EControl,
}


def make_feedback(spec: "str | Feedback | None") -> Feedback:
    """A feedback rule from an instance, None (no feedback) or a name: ``"ef21"``, ``"econtrol:0.05"``,
    ``"ef21sgdm:0.1"`` (the number is EControl's η or EF21-SGDM's β)."""
    if spec is None:
        return NoFeedback()
    if isinstance(spec, Feedback):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"feedback must be a Feedback or a name like 'econtrol', got {type(spec).__name__}")
    name, _, arg = spec.strip().lower().partition(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown feedback {name!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    if not arg:
        return cls()
    if cls not in (EControl, EF21SGDM):
        raise ValueError(f"feedback {name!r} takes no argument, got {spec!r}")
    try:
        return cls(float(arg))
    except ValueError as exc:
        raise ValueError(f"bad feedback spec {spec!r}: {exc}") from None
