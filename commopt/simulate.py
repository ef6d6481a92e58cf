"""Single-process simulation of n ranks running one bucket through compression + error feedback.

Every rank's round is the one the DDP hook runs (:func:`commopt.round.compress`
before the exchange, :func:`commopt.round.conclude` after it, :func:`commopt.round.dense_start`
for dense rounds), and the collective is the hook's own ordered sum
(:func:`commopt.exchange.ordered_sum`, rank 0 first), so tests of the simulation
test the hook's math. No ``torch.distributed`` is involved; everything is float64.

Per step t, with n ranks, local gradients g_i = ∇f_i(xᵗ), d = numel, k = C.num_selected(d):

* **dense (warm-up) round** (t < ``warmup``)::

      mean   = (g_0 + g_1 + … + g_{n−1}) / n
      state_i ← feedback.init(g_i, mean)       # per-rank slots from rank i, shared slots from the mean
      x      ← x − γ · mean

* **compressed round**::

      p_i, pending_i = feedback.prepare(state_i, g_i, density=k/d)
      S_i  = C.select(p_i, k, t, key)          # t counts every round, warm-up included, like the hook
      v_i  = C.values(p_i, S_i)                # m_i = dense vector with v_i at S_i, 0 elsewhere
      mean = (m_0 + m_1 + … + m_{n−1}) / n
      state_i ← feedback.update(state_i, g_i, p_i, pending_i, S_i, v_i, mean)
      x    ← x − γ · feedback.estimate(state_new, mean)

  e.g. EF21: p_i = g_i − w_i, w_i ← w_i + m_i, w ← w + mean, x ← x − γ·w.

Shared (replicated) slots (``feedback.shared_slots``, e.g. EF21's w, EControl's h)
are held once; every rank's update must produce them bitwise identically, and
the simulation checks that it does. As in the hook, a non-finite local gradient
poisons its message with NaN, and a non-finite average leaves the state
untouched and is handed through as the estimate.

One difference from the hook: with ``warmup=0`` a rule with state starts from
all-zero state (e.g. EF21 from w_i = w = 0) and compresses from the first step,
whereas the hook always runs a dense round first when a bucket has no state.
SPEC §2's uncompressed start is ``warmup=1``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .compressors import Compressor, make_compressor
from .exchange import ordered_sum
from .feedback import Feedback, make_feedback
from .round import compress, conclude, dense_start

__all__ = ["simulate"]

GradFn = Callable[[Tensor], Tensor]


def simulate(
    grad_fns: Sequence[GradFn],
    x0: Tensor,
    lr: float,
    steps: int,
    compressor: "str | Compressor",
    feedback: "str | Feedback | None",
    warmup: int = 0,
    key: int = 0,
) -> list[Tensor]:
    """Gradient descent of n ranks (one worker each) through compression and error feedback.

    Args:
        grad_fns: one callable per rank, x (float64 tensor, shape of ``x0``) -> local gradient ∇f_i(x).
        x0: the starting point (flattened to one bucket of d = ``x0.numel()`` elements).
        lr: the step size γ.
        steps: number of rounds (warm-up rounds included).
        compressor: a :class:`Compressor` or a spec such as ``"topk:0.05"`` / ``"randk:k=1"``.
        feedback: a :class:`Feedback`, a name such as ``"ef21"`` / ``"econtrol:0.05"``, or None.
        warmup: number of dense rounds first; each (re)initialises the state with ``feedback.init``.
            ``warmup=0`` starts the state at zero (see the module docstring).
        key: the bucket key handed to ``compressor.select`` (seeds RandK with the step).

    Returns:
        The iterates [x⁰, x¹, …, x^steps] (``steps + 1`` float64 tensors shaped like ``x0``).

    Raises:
        ValueError: a non-contractive compressor with an error-feedback rule, or bad arguments.
    """
    comp = make_compressor(compressor)
    fb = make_feedback(feedback)
    fb.check_compressor(comp)
    n = len(grad_fns)
    if n < 1:
        raise ValueError("simulate needs at least one gradient function (one per rank)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")

    x_in = torch.as_tensor(x0, dtype=torch.float64)
    shape = x_in.shape
    x = x_in.detach().reshape(-1).clone()
    d = x.numel()
    k = comp.num_selected(d)
    density = k / d

    everything = torch.arange(d)

    def grads_at(x_flat: Tensor) -> list[Tensor]:
        xs = x_flat.reshape(shape)
        return [torch.as_tensor(f(xs.clone()), dtype=torch.float64).reshape(-1) for f in grad_fns]

    local_names = fb.local_slots
    shared_names = fb.shared_slots
    # the hook allocates zero slots and overwrites them in its first dense round
    local: list[dict[str, Tensor]] = [{s: torch.zeros(d, dtype=torch.float64) for s in local_names} for _ in range(n)]
    shared: dict[str, Tensor] = {s: torch.zeros(d, dtype=torch.float64) for s in shared_names}

    out = [x.reshape(shape).clone()]
    for t in range(steps):
        grads = grads_at(x)
        if t < warmup:
            # the dense round: every rank all-reduces its gradient (ordered sum), SPEC §2 init
            total = ordered_sum([(everything, g) for g in grads], d, torch.float64)
            for i, g in enumerate(grads):
                new, ok, mean = dense_start(fb, g, total, n)
                if bool(ok) and (local_names or shared_names):
                    local[i] = {s: new[s] for s in local_names}
                    if i == 0:
                        shared = {s: new[s] for s in shared_names}
            est = mean
        else:
            # the compressed round, one call of commopt.round per rank, as the hook makes it
            states = [{**local[i], **shared} for i in range(n)]
            sent = [compress(comp, fb, states[i], g, k, t, key) for i, g in enumerate(grads)]
            total = ordered_sum([(o.idx, o.vals) for o in sent], d, torch.float64)
            results = [conclude(fb, states[i], o, total.clone(), n) for i, o in enumerate(sent)]
            ok = results[0][1]
            if bool(ok):
                new_shared: dict[str, Tensor] | None = None
                new_local = []
                for new, _, _, _ in results:
                    new_local.append({s: new[s] for s in local_names})
                    sh = {s: new[s] for s in shared_names}
                    if new_shared is None:
                        new_shared = sh
                    elif any(not torch.equal(sh[s], new_shared[s]) for s in shared_names):
                        raise RuntimeError(f"{fb!r}: replicated slots differ between ranks")
                local = new_local
                shared = new_shared if new_shared is not None else {}
                est = results[0][2]
            else:
                est = results[0][3]
        x = x - lr * est
        out.append(x.reshape(shape).clone())
    return out
