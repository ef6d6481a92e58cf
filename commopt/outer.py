"""The outer step of local-update methods (CO2, SPEC §6): staleness penalties and the outer exchange.

Two pieces, both free of any optimizer logic:

* **Penalties** ``P_t`` scale the stale, averaged pseudo-gradient before it enters
  the outer momentum: ``g = P_t · Δ̄``. :class:`NoPenalty` (P = 1),
  :class:`ConstantPenalty` (P = 1/λ, the released CO2 code's divisor) and
  :class:`AdaptivePenalty` (a gap-aware factor, see its docstring for the exact
  formula and where it comes from). Penalties are pure functions of tensors that
  are identical on every rank, so P_t is bitwise the same everywhere.
* :class:`OuterExchange` moves one flat pseudo-gradient per round: a dense
  ``all_reduce(SUM, async_op=True)`` of a private buffer, or a compressed message
  (commopt compressors + error-feedback rules, SPEC §1-3). At most one exchange
  is in flight; :meth:`OuterExchange.wait` blocks for it and counts the seconds
  spent waiting. ``link_delay`` emulates a slow link: the result of a collective
  becomes available ``link_delay`` seconds after its launch, so a wait that comes
  ``c`` seconds after the launch costs ``max(0, link_delay − c)``. No Python
  threads are involved (the delay is slept, if at all, inside ``wait``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .compressors import Compressor, Identity, make_compressor
from .exchange import CollectiveError, Deferred, Exchange, choose_exchange, ordered_sum, ring_allreduce_bytes, root_cause
from .feedback import Feedback, make_feedback
from .round import compress, conclude, dense_start
from .teardown import keep_until_exit

__all__ = [
    "Penalty", "NoPenalty", "ConstantPenalty", "AdaptivePenalty", "make_penalty",
    "OuterExchange",
]


# ----------------------------------------------------------------------------------------------
# staleness penalties
# ----------------------------------------------------------------------------------------------

class Penalty:
    """Base class: the factor ``P`` that scales one parameter's stale averaged pseudo-gradient.

    ``factor(delta, gap)`` gets, for one parameter tensor, the averaged
    pseudo-gradient Δ̄ about to be applied (flat, state dtype) and the *staleness
    gap* ``gap = ‖θ − s̄‖`` (a 0-d tensor): the distance between the anchor θ the
    update is applied to and the mean start point s̄ = mean_i s_i of the round that
    produced Δ̄ (0 when nothing is stale). It returns a float or a 0-d tensor, must
    be a deterministic function of its inputs (they are identical on all ranks) and
    must not synchronise the device (no ``.item()``).
    """

    name = "base"

    def factor(self, delta: Tensor, gap: Tensor) -> Union[float, Tensor]:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class NoPenalty(Penalty):
    """P = 1: the stale update is applied as is."""

    name = "none"

    def factor(self, delta: Tensor, gap: Tensor) -> float:
        return 1.0


class ConstantPenalty(Penalty):
    """P = 1/λ for a constant λ > 0 (the released CO2 code's divisor; λ = 1 is no penalty)."""

    name = "constant"

    def __init__(self, lam: float = 2.0) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"ConstantPenalty: lambda must be a finite number > 0, got {lam!r}")
        self.lam = float(lam)

    def factor(self, delta: Tensor, gap: Tensor) -> float:
        return 1.0 / self.lam

    def config(self) -> dict:
        return {"name": self.name, "lam": self.lam}


class AdaptivePenalty(Penalty):
    """Gap-aware staleness penalty, per parameter tensor:  P = 1 / (1 + κ · ‖θ − s̄‖ / ‖Δ̄‖).

    **What is implemented, and why.** CO2 (Sun et al., ICLR 2024, arXiv 2401.16265,
    §3, Eq. 3) scales the one-round-stale update down by a factor computed from the
    *staleness gap*, the distance between the model the update was computed at and
    the one it is applied to. We could not retrieve the text of Eq. 3 itself (only
    the abstract and the public ICLR reviews, which say that the penalty is built
    from that gap and that Eq. 3 assumes a non-increasing inner learning rate), so
    this is **our own, documented adaptive form**, in the spirit of Gap-Aware ASGD
    (Barkai, Hakimi, Schuster, ICLR 2020), which divides a stale gradient by
    ``1 + gap / (typical step)``:

    * the gap ``‖θ − s̄‖``: Δ̄ = mean_i(s_i − x_i) was computed from the start points
      s_i of its round, and is applied to the current anchor θ. CO2 computes it
      exactly (per tensor, as a scalar, when the previous outer step is taken):
      ``"delayed"`` restarts every rank at the anchor, so the gap is the last outer
      step ‖α·u‖ (u = m, or g + β·m with Nesterov); ``"eager"`` restarts rank i at
      θ − d_i, so the gap is ‖Δ̄_prev − α·u‖, the part of the last outer step that
      the ranks had not already taken themselves (0 for β = 0, α = 1, P = 1);
      without overlap (blocking local SGD) the gap is 0 and P = 1 exactly;
    * the unit ``‖Δ̄‖``: the size of the update being applied. A gap as large as the
      update halves it.

    It needs no model-sized state and no learning rate: a decaying or cyclic inner
    schedule changes ‖Δ̄‖ and the gap alike, so the reviewers' objection to Eq. 3
    (it assumes a decaying inner rate) does not apply. Steady-state values (Δ̄ of
    constant direction, α = 1): delayed P ≈ 0.62 at β = 0 and 0.5 at β = 0.5 (the
    λ = 2 that SPEC §6 found stable); eager P ≈ 0.71 at β = 0.5 and 1 at β = 0.
    ``strength`` κ > 0 scales the gap (κ → 0 is no penalty).
    """

    name = "adaptive"

    def __init__(self, strength: float = 1.0) -> None:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or strength <= 0:
            raise ValueError(f"AdaptivePenalty: strength must be a finite number > 0, got {strength!r}")
        self.strength = float(strength)

    def factor(self, delta: Tensor, gap: Tensor) -> Tensor:
        size = torch.linalg.vector_norm(delta).clamp_min(torch.finfo(delta.dtype).tiny)
        return 1.0 / (1.0 + self.strength * gap.to(delta.dtype) / size)

    def config(self) -> dict:
        return {"name": self.name, "strength": self.strength}


def make_penalty(spec: "Penalty | float | str | None") -> Penalty:
    """A penalty from ``None`` (off), a number λ (P = 1/λ), ``"none"``, ``"constant:2"``,
    ``"adaptive"``, ``"adaptive:0.5"`` (strength κ) or a :class:`Penalty`."""
    if spec is None:
        return NoPenalty()
    if isinstance(spec, Penalty):
        return spec
    if isinstance(spec, bool):
        raise TypeError("penalty must be None, a number λ, 'adaptive', 'constant:λ' or a Penalty, got a bool")
    if isinstance(spec, (int, float)):
        return ConstantPenalty(float(spec))
    if not isinstance(spec, str):
        raise TypeError(f"penalty must be None, a number λ, 'adaptive', 'constant:λ' or a Penalty, "
                        f"got {type(spec).__name__}")
    name, _, arg = spec.strip().lower().partition(":")
    try:
        if name in ("none", "off"):
            if arg:
                raise ValueError("'none' takes no argument")
            return NoPenalty()
        if name == "constant":
            return ConstantPenalty(float(arg) if arg else 2.0)
        if name == "adaptive":
            return AdaptivePenalty(float(arg) if arg else 1.0)
    except ValueError as exc:
        raise ValueError(f"bad penalty spec {spec!r}: {exc}") from None
    raise ValueError(f"unknown penalty {spec!r}; use None, a number λ, 'constant:λ', 'adaptive' or 'adaptive:κ'")


# ----------------------------------------------------------------------------------------------
# the outer exchange
# ----------------------------------------------------------------------------------------------

class OuterExchange:
    """One flat pseudo-gradient per round, averaged over ranks in the background.

    Write this rank's pseudo-gradient d_i into :attr:`buffer` (flat), call
    :meth:`launch`, and later :meth:`wait`, which returns ``(total, divisor)`` with
    ``total / divisor`` the averaged pseudo-gradient Δ̄ (the raw sum and n for the
    dense exchange, the feedback rule's replicated estimator and 1 with
    compression). :attr:`buffer` must not be written between ``launch`` and
    ``wait``.

    * dense: ``all_reduce(buffer, SUM, async_op=True)`` in place; the buffer may be
      bf16 (``buffer_dtype``), then the backend sums in bf16.
    * compressed (``compressor`` not None/"none"): SPEC §2's rule turns d_i into the
      vector to compress, the compressor picks k of its d entries, :class:`Exchange`
      moves the fixed-size message (all-gather + ordered sum, or an all-reduce of
      RandK's shared coordinates), and the rule's state is updated when the result is
      waited for. Rules with state start from one dense round (SPEC §2 init).

    On CUDA the copy into the send buffer and the launch are issued on a side
    stream. Without ``torch.distributed`` (``group=None`` and ``use_dist=False``) the
    exchange is the identity over one rank; ``link_delay`` still applies, so the
    timing model can be tested in one process.
    """

    def __init__(
        self,
        numel: int,
        state_dtype: torch.dtype,
        device: torch.device,
        *,
        group: Optional[dist.ProcessGroup] = None,
        use_dist: bool = True,
        buffer_dtype: Optional[torch.dtype] = None,
        compressor: "str | Compressor | None" = None,
        feedback: "str | Feedback | None" = None,
        link_delay: float = 0.0,
    ) -> None:
        self.group = group
        self.use_dist = use_dist
        self.n = dist.get_world_size(group) if use_dist else 1
        self.numel = numel
        self.state_dtype = state_dtype
        self.device = device
        comp = make_compressor(compressor) if compressor is not None else None
        self.compressor: Optional[Compressor] = None if comp is None or isinstance(comp, Identity) else comp
        self.feedback: Optional[Feedback] = make_feedback(feedback) if self.compressor is not None else None
        if self.feedback is not None:
            self.feedback.check_compressor(self.compressor)
        if self.compressor is not None and buffer_dtype is not None and buffer_dtype != state_dtype \
                and buffer_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"buffer_dtype must be bf16/fp16 or the state dtype, got {buffer_dtype}")
        self.wire_dtype = buffer_dtype or state_dtype
        # dense: the private send buffer (what travels); compressed: d_i in the state dtype (the message is cut from it)
        self.buffer = torch.zeros(numel, dtype=self.wire_dtype if self.compressor is None else state_dtype,
                                  device=device)
        self.link_delay = float(link_delay)
        self.slots: dict[str, Tensor] = {}           # feedback state (this rank's + replicated)
        self._exchange = Exchange(group) if (use_dist and self.compressor is not None) else None
        self._k = self.compressor.num_selected(numel) if self.compressor is not None else numel
        self.kind = "dense" if self.compressor is None else choose_exchange(
            self.compressor.shared_indices, self._k, numel, self.n, self.compressor.wire)
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        # the one flight: handle, launch time, what finishing it needs; or its completed result
        self._work: Any = None
        self._launched_at = 0.0
        self._pending: Optional[dict] = None
        self._result: Optional[tuple[Tensor, int]] = None
        self.in_flight = 0
        self.stats: dict[str, Any] = {"launches": 0, "waits": 0, "wait_seconds": 0.0, "max_in_flight": 0,
                                      "bytes_sent": 0.0, "bytes_dense": 0.0, "dense_rounds": 0,
                                      "compressed_rounds": 0, "collectives": {}}

    # -- configuration / memory ---------------------------------------------------------------------
    def config(self) -> dict:
        return {"compressor": self.compressor.config() if self.compressor is not None else None,
                "feedback": self.feedback.config() if self.feedback is not None else None,
                "wire_dtype": str(self.wire_dtype)}

    def memory_bytes(self) -> dict:
        """Persistent bytes held here: the send buffer and the feedback slots."""
        out = {"send_buffer": self.buffer.numel() * self.buffer.element_size()}
        if self.feedback is not None:
            names = self.feedback.local_slots + self.feedback.shared_slots
            out["feedback_state"] = len(names) * self.numel * self.state_dtype.itemsize
        return out

    # -- launching ------------------------------------------------------------------------------------
    def _count(self, kind: str, nbytes: float) -> None:
        st = self.stats
        st["launches"] += 1
        st["bytes_sent"] += nbytes
        st["bytes_dense"] += ring_allreduce_bytes(self.numel, self.state_dtype.itemsize, self.n)
        st["collectives"][kind] = st["collectives"].get(kind, 0) + 1

    def launch(self, round_index: int) -> None:
        """Start averaging :attr:`buffer` over ranks. Raises if an exchange is already in flight."""
        if self.pending:
            raise RuntimeError("OuterExchange: an exchange is already in flight; wait() for it first")
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._launch(round_index)
            # the caller overwrites its source of d_i next: order that after the copy made on the side stream
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        else:
            self._launch(round_index)
        self._launched_at = time.perf_counter()
        self.in_flight = 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)

    def _launch(self, round_index: int) -> None:
        if self.compressor is None:
            self._count("dense", ring_allreduce_bytes(self.numel, self.wire_dtype.itemsize, self.n))
            self.stats["dense_rounds"] += 1
            self._pending = {"kind": "dense"}
            self._work = dist.all_reduce(self.buffer, group=self.group, async_op=True) if self.use_dist else None
            return
        fb = self.feedback
        assert fb is not None
        names = fb.local_slots + fb.shared_slots
        g = self.buffer
        if names and not self.slots:
            # SPEC §2 initialisation: one uncompressed round; the state starts from it
            send = g.to(self.wire_dtype, copy=True)
            self._count("dense", ring_allreduce_bytes(self.numel, self.wire_dtype.itemsize, self.n))
            self.stats["dense_rounds"] += 1
            self._pending = {"kind": "init", "g": g, "send": send}
            self._work = dist.all_reduce(send, group=self.group, async_op=True) if self.use_dist else None
            return
        # the same round as the DDP hook's (commopt.round): compress here, conclude in _finish
        out = compress(self.compressor, fb, self.slots, g, self._k, round_index, 0, wire_dtype=self.wire_dtype)
        self.stats["compressed_rounds"] += 1
        # one process: the sum over one rank is the message itself
        # a compact compressor (SPEC §9) sends out.packed in a gather; out.vals are its decoded values
        fut = (self._exchange.start(self.kind, out.idx, out.vals, self.numel, self.state_dtype, packed=out.packed)
               if self._exchange is not None else None)
        nbytes = (self._exchange.message_bytes(self.kind, self._k, self.numel, self.wire_dtype,
                                               wire=self.compressor.wire)
                  if self._exchange is not None else 0.0)
        self._count(self.kind, nbytes)
        self._pending = {"kind": "compressed", "out": out}
        self._work = fut

    # -- waiting --------------------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True while an exchange is in flight or its completed result has not been taken by :meth:`wait`."""
        return bool(self.in_flight) or self._result is not None

    def average_now(self) -> tuple[Tensor, int]:
        """A blocking dense all-reduce of :attr:`buffer` (nothing may be in flight); ``(total, divisor)``."""
        if self.pending:
            raise RuntimeError("OuterExchange: an exchange is still pending; wait() for it first")
        send = self.buffer
        self._count("dense", ring_allreduce_bytes(self.numel, send.dtype.itemsize, self.n))
        self.stats["dense_rounds"] += 1
        self._launched_at = time.perf_counter()
        self._pending = {"kind": "dense"}
        self._work = dist.all_reduce(send, group=self.group, async_op=True) if self.use_dist else None
        self.in_flight = 1
        return self._finish()

    def abandon(self) -> bool:
        """Wait until the exchange in flight (if any) completes or fails and drop it unapplied; True if
        there was one. For teardown: a collective left running holds Python-made tensors that the
        backend's thread would release during interpreter shutdown, which aborts the process; so its work
        and message are handed to :func:`commopt.teardown.keep_until_exit`, not dropped."""
        if not self.in_flight or self._work is None:
            return False
        work = self._work.work if isinstance(self._work, Deferred) else self._work   # the collective only
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - a failed collective is as good as finished here
            pass
        keep_until_exit(self._work, self._pending)   # released after the group is closed (commopt.teardown)
        self._work, self._pending, self.in_flight = None, None, 0
        return True

    def settle(self) -> None:
        """Wait for the exchange in flight now (if any) and keep its result for the next :meth:`wait`."""
        if self.in_flight:
            self._result = self._finish()

    def wait(self) -> tuple[Tensor, int]:
        """Block until the exchange in flight is complete; return ``(total, divisor)``, Δ̄ = total/divisor."""
        if self._result is not None:
            result, self._result = self._result, None
            return result
        if not self.in_flight:
            raise RuntimeError("OuterExchange: nothing in flight to wait for")
        return self._finish()

    def _finish(self) -> tuple[Tensor, int]:
        t0 = time.perf_counter()
        work, pending = self._work, self._pending
        assert pending is not None
        value: Optional[Tensor] = None
        if work is not None:
            if pending["kind"] == "compressed":   # an exchange.Deferred of the summed message (CollectiveError)
                value = work.wait()
            else:                                 # a c10d Work: the all-reduce is in place
                try:
                    work.wait()
                except Exception as exc:
                    rank = dist.get_rank(self.group)
                    raise CollectiveError(
                        f"commopt: the outer all_reduce ({pending['kind']} round, {self.numel} values, "
                        f"{self.buffer.dtype}) failed on rank {rank} of {self.n}: {root_cause(exc)}") from exc
        if self.link_delay > 0.0:  # the slow link: the result exists link_delay seconds after the launch
            remaining = self.link_delay - (time.perf_counter() - self._launched_at)
            if remaining > 0.0:
                time.sleep(remaining)
        self.stats["wait_seconds"] += time.perf_counter() - t0
        self.stats["waits"] += 1
        self._work, self._pending, self.in_flight = None, None, 0
        kind = pending["kind"]
        if kind == "dense":
            return self.buffer, self.n
        fb = self.feedback
        assert fb is not None
        if kind == "init":
            total = pending["send"].to(self.state_dtype)
            new, _, _ = dense_start(fb, pending["g"], total, self.n)
            self.slots = {k: v.clone() for k, v in new.items()}
            return total, self.n
        out = pending["out"]
        if value is None:
            value = ordered_sum([(out.idx, out.vals)], self.numel, self.state_dtype, out.vals.device)
        new, ok, est, mean = conclude(fb, self.slots, out, value, self.n)
        # a non-finite round (some rank's d_i was not finite) leaves the feedback state as it was
        for name, v in new.items():
            self.slots[name] = torch.where(ok, v, self.slots[name]) if name in self.slots else v
        return torch.where(ok, est, mean), 1

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's exchange state. An exchange in flight is waited for first and stored as completed."""
        self.settle()
        done = None
        if self._result is not None:
            total, div = self._result
            done = {"total": total.detach().cpu().clone(), "divisor": div}
        return {"config": self.config(), "slots": {k: v.detach().cpu().clone() for k, v in self.slots.items()},
                "completed": done}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("config") != self.config():
            raise ValueError(f"checkpoint's outer exchange is {sd.get('config')}, this run uses {self.config()}")
        self._work, self._pending, self.in_flight = None, None, 0
        self.slots = {k: v.to(device=self.device, dtype=self.state_dtype).clone() for k, v in sd["slots"].items()}
        done = sd.get("completed")
        if done is None:
            self._result = None
        elif self.compressor is None:
            # treat the saved all-reduce as completed: its sum sits in the private buffer
            self.buffer.copy_(done["total"].to(device=self.device, dtype=self.buffer.dtype))
            self._result = (self.buffer, int(done["divisor"]))
        else:
            self._result = (done["total"].to(device=self.device, dtype=self.state_dtype), int(done["divisor"]))

    def replicated_slots(self) -> list[Tensor]:
        """Feedback slots that must be bitwise identical on every rank."""
        if self.feedback is None:
            return []
        return [self.slots[name] for name in self.feedback.shared_slots if name in self.slots]


