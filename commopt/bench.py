"""``commopt bench``: measure this job's links and compressors, then predict each method's communication per step.

Launch it the way the training job will be launched (``torchrun``, ``srun``, ``mpiexec``), or give
``--ranks N`` for N local CPU processes (gloo, meeting through a file store). It

1. **measures the collectives**: ``all_reduce`` of s bytes and ``all_gather_into_tensor`` of an s-byte
   message per rank, for s from ``--min-size`` to ``--max-size`` (4 KiB .. 64 MiB, ×2 apart). Each size
   is run once to warm up, then repeated (at least 3 times, about ``--time-per-size`` seconds in all);
   every repetition starts after a small all-reduce that lines the ranks up and counts the slowest
   rank's time; the figure is the median. Then ``t = hops·α + 8·wire/B`` is fitted by least squares,
   each squared misfit divided by the measured time (as if a time's variance grew with it: the large
   sizes fix B, which the heavy exchanges' predictions rest on, and the small ones still fix α), with the
   ring formulas of :mod:`commopt.costmodel`: all-reduce wire = 2(n−1)/n·s bytes in 2(n−1) hops,
   all-gather wire = (n−1)·s in n−1 hops. α and B are the *effective* figures of this backend at this n
   (what the formulas need to reproduce the measured times), not the wire's; all-reduce and all-gather
   get one fit each (gloo's all-gather is slower per byte than its all-reduce on a shaped link).
2. **measures compression throughput** (elements/s) of TopK and RandK at ``--ratio`` with each feedback
   rule (EF14, EF21-SGDM, EControl): one round of the hook's local data path on ``--compress-numel``
   values, :func:`commopt.round.compress` → the dense sum of n messages as :mod:`commopt.exchange`
   forms it (ordered sum of the gathered messages, or the densified shared / dense message) →
   :func:`commopt.round.conclude` → :func:`commopt.round.write_estimate`, without the collective; also the
   bf16 cast of DDP's ``bf16_compress_hook``. All ranks run it at once (in training they share the
   node's cores too) and the slowest rank's median counts.
3. **predicts** for a model of P parameters (``--params 350M``, or ``--model path.py:factory``, whose DDP
   bucket layout is then taken from DDP's own assignment) with fp32 gradients. One collective per DDP
   bucket b (so one latency per bucket); a bucket's local work (compression) overlaps with the previous
   bucket's collective (:func:`commopt.costmodel.pipelined_seconds`: between the larger of the two sums
   and their total). Per step, with AR/AG the fitted all-reduce/all-gather times:

   - dense DDP fp32: AR(4·b) per bucket;  DDP bf16 all-reduce: AR(2·b), after a cast of b values;
   - TopK r + feedback: AG(8·k) with k = ⌊r·b⌋ (the dense AR(4·b) of the densified message when
     k·n ≥ b, SPEC §3), after compressing b values at the measured rate;
   - RandK r + feedback: AR(4·k) (the k shared-index values), after compressing b values;
   - local SGD τ (blocking): D/τ with D = AR(4·P), one flat all-reduce per round;
   - CO2 τ: max(0, D − τc)/τ, the round's all-reduce hidden behind the next τ steps of compute c.

   With ``--compute-ms c`` each step is c + that (SPEC §6; c + D for synchronous DDP is an upper bound,
   since DDP overlaps its buckets with backward and the truth lies between max(c, D) and c + D), and
   the recommendation is the fastest predicted step; without it, the least communication.

**Tolerance: ±25 %** of the measured communication per step for dense DDP, ±30 % for TopK.
``tests/test_bench_netem.py`` runs this bench on two emulated nodes (network namespaces, a 50 Mbit/s
``tc`` link each way, one rank each) for a 1.18 M-parameter MLP in two DDP buckets, then times real
training steps of it: plain DDP, commopt's hook with TopK 10 % + EF14 and TopK 10 % + EControl, and the
plain step under ``no_sync()`` (measured communication = step − that). On the loaded 2-core machine it
was written on (other jobs at load 4-11), seven runs gave predicted / measured 0.93-1.01 for dense DDP
and 0.94-1.22 for TopK. At that link TopK is link-bound: the check holds the link figures, the byte
counts and the choice of collective, not the compression term to better than about ±30 % (its formula
is unit-tested). RandK + EF14 at 10 % (an all-reduce of the k values, which gloo sums on the CPU) was
measured too and left out of the check: its time swung from 0.84x to 1.45x the prediction with the
other jobs' load (compression is CPU time, measured seconds to minutes apart from the run it predicts).

The model leaves out: DDP's overlap of buckets with backward (so c + comm over-predicts compute-heavy
steps), a compression overlapping a CPU-heavy collective on a CPU short of cores (the pipeline then does
not overlap: up to link + compress), load from other jobs that changes between the bench and the run,
and congestion on a shared link.
Sizes far outside the measured range are extrapolated at the fitted bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from . import costmodel as cm
from .costmodel import Link

__all__ = [
    "BenchConfig", "Measured", "Method", "DEFAULT_MIN_SIZE", "DEFAULT_MAX_SIZE", "FEEDBACKS", "COMPRESSORS",
    "parse_params", "parse_size", "count_model_params", "fit_affine", "fit_link", "default_sizes",
    "inspect_model", "predict", "recommend", "format_report", "bench_body", "run_bench", "add_arguments",
    "config_from_args",
]

DEFAULT_MIN_SIZE = 4 << 10
DEFAULT_MAX_SIZE = 64 << 20
#: the feedback rules measured, with the names the table uses
FEEDBACKS: tuple[tuple[str, str], ...] = (("ef14", "EF14"), ("ef21sgdm", "EF21-SGDM"), ("econtrol", "EControl"))
COMPRESSORS: tuple[tuple[str, str], ...] = (("topk", "TopK"), ("randk", "RandK"))
#: all-gather buffers (n messages) above this are not measured
_MAX_GATHER_BYTES = 1 << 30


# ---------------------------------------------------------------------------------------------- parsing


_PARAM_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_params(text: "str | int") -> int:
    """``"350M"`` → 350_000_000, ``"1.3B"``, ``"20000000"``, ``"125k"``, ``"7e9"`` (decimal units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text).replace("_", ""))
        if not m:
            raise ValueError(f"commopt bench: cannot read the parameter count {text!r}; write e.g. 350M, 1.3B or "
                             f"20000000")
        value = float(m.group(1)) * _PARAM_UNITS[m.group(2).lower()]
    n = int(round(value))
    if n < 1:
        raise ValueError(f"commopt bench: the parameter count must be at least 1, got {text!r}")
    return n


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: "str | int") -> int:
    """A message size in bytes: ``"4KB"``, ``"64MB"``, ``"1MiB"``, ``"4096"`` (K/M/G are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"commopt bench: cannot read the size {text!r}; write e.g. 4KB, 64MB or 4096")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    n = int(value)
    if n < 4:
        raise ValueError(f"commopt bench: a message size must be at least 4 bytes, got {text!r}")
    return n


def default_sizes(min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE) -> list[int]:
    """Sizes from ``min_size`` to ``max_size``, ×2 apart (``max_size`` always included), multiples of 4 bytes."""
    if max_size < min_size:
        raise ValueError(f"commopt bench: --max-size ({max_size}) is below --min-size ({min_size})")
    out, s = [], min_size
    while s < max_size:
        out.append(s // 4 * 4)
        s *= 2
    out.append(max_size // 4 * 4)
    return sorted(set(out))


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _load_factory(spec: str) -> Callable[[], Any]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"commopt bench: --model wants path.py:factory (or package.module:factory), got {spec!r}")
    if path.endswith(".py") or os.path.sep in path or os.path.exists(path):
        if not os.path.isfile(path):
            raise ValueError(f"commopt bench: --model {spec!r}: no file {path!r}")
        modname = "_commopt_bench_model_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        loader = importlib.util.spec_from_file_location(modname, os.path.abspath(path))
        if loader is None or loader.loader is None:
            raise ValueError(f"commopt bench: cannot import {path!r}")
        module = importlib.util.module_from_spec(loader)
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        try:
            loader.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        module = importlib.import_module(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"commopt bench: --model {spec!r}: {path} has no callable {name!r}")
    return fn


def count_model_params(spec: str) -> int:
    """Trainable parameters (those DDP exchanges) of the model ``factory()`` returns, for ``path.py:factory``."""
    return inspect_model(spec)[0]


def inspect_model(spec: str, bucket_mb: float = 25.0) -> tuple[int, list[int]]:
    """(trainable parameters, elements per DDP bucket) of the model ``factory()`` returns (``path.py:factory``).

    The factory is first called under ``torch.device("meta")`` (no memory for the weights); if that fails it
    is called normally. The buckets are DDP's own assignment after its rebuild (gradients in reverse
    parameter order; a first bucket of 1 MiB with the default ``bucket_cap_mb=25``)."""
    import torch
    import torch.distributed as dist

    fn = _load_factory(spec)
    try:
        with torch.device("meta"):
            model = fn()
    except Exception:  # noqa: BLE001 -- a factory that needs real tensors
        model = fn()
    if not hasattr(model, "parameters"):
        raise ValueError(f"commopt bench: --model {spec!r}: the factory returned {type(model).__name__}, "
                         f"not a torch.nn.Module")
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    if n < 1:
        raise ValueError(f"commopt bench: --model {spec!r} has no trainable parameters")
    cap = int(bucket_mb * (1 << 20))
    limits = [cm.DDP_FIRST_BUCKET_BYTES, cap] if bucket_mb == 25.0 else [cap]
    try:
        order = params[::-1]
        assignment, _ = dist._compute_bucket_assignment_by_size(order, limits, [False] * len(order))
        buckets = [sum(order[i].numel() for i in b) for b in assignment]
    except Exception:  # noqa: BLE001 -- a private helper: fall back to the size-only estimate
        buckets = cm.ddp_bucket_numels(n, 4, cap, limits[0])
    return int(n), buckets


# ---------------------------------------------------------------------------------------------- the fit


def fit_affine(x: "list[float]", t: "list[float]") -> tuple[float, float]:
    """(a, b), both ≥ 0, minimising Σ (a + b·x_i − t_i)² / t_i: a least-squares line whose misfits are
    weighed as if each time's variance grew with the time (so the large sizes, which the predictions of
    heavy exchanges rest on, fix b, and the small ones still fix a)."""
    import numpy as np

    xs, ts = np.asarray(x, dtype=float), np.asarray(t, dtype=float)
    if xs.shape != ts.shape or xs.size < 2 or len(set(xs.tolist())) < 2:
        raise ValueError("commopt bench: the fit needs times at two or more different sizes")
    if not np.all(ts > 0):
        raise ValueError("commopt bench: the fit needs positive times")
    w = 1.0 / np.sqrt(ts)
    (a, b), *_ = np.linalg.lstsq(np.stack([w, xs * w], axis=1), ts * w, rcond=None)
    if a < 0:  # latency below what the times resolve: a line through 0
        a, b = 0.0, float(np.sum(xs) / np.sum(xs**2 / ts))
    if b <= 0:  # no size dependence at all: latency only
        a, b = float(ts.size / np.sum(1.0 / ts)), 0.0
    return float(a), float(b)


def fit_link(wire_bytes: "list[float]", seconds: "list[float]", hops: int) -> tuple[Link, float]:
    """The :class:`Link` (α per hop, B in bit/s) whose ``hops·α + 8·wire/B`` fits the measured times, and the
    largest relative misfit over the sizes."""
    a, b = fit_affine(wire_bytes, seconds)
    link = Link(bandwidth=8.0 / b if b > 0 else math.inf, latency=a / max(1, hops))
    worst = max(abs(cm.transfer_seconds(w, link, hops) - t) / t for w, t in zip(wire_bytes, seconds))
    return link, float(worst)


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class Measured:
    """What was measured (rank 0's copy): collectives, fitted links, compression rates (elements/s)."""

    world_size: int
    backend: str
    device: str
    launcher: str
    allreduce: list[tuple[int, float]] = field(default_factory=list)   # (bytes per rank, median seconds)
    allgather: list[tuple[int, float]] = field(default_factory=list)   # (message bytes per rank, seconds)
    allreduce_link: Optional[Link] = None
    allreduce_misfit: float = 0.0
    allgather_link: Optional[Link] = None
    allgather_misfit: float = 0.0
    allreduce_curve: Optional[cm.MeasuredCurve] = None   # the medians against wire bytes (what predicts)
    allgather_curve: Optional[cm.MeasuredCurve] = None
    rates: dict[str, float] = field(default_factory=dict)   # "topk+ef14", "bf16" -> elements / s
    compress_numel: int = 0
    ratio: float = 0.01


@dataclass
class Method:
    """One row of the prediction."""

    name: str
    exchange: str
    bytes_per_step: float   # received per rank per step
    link_s: float           # communication on the link per step (CO2: the whole D / τ)
    compress_s: float       # local compression work per step
    comm_s: float           # communication time a step pays (CO2: only what the compute does not hide)
    step_s: Optional[float]
    setting: str            # how to run it
    every_step: bool        # a gradient exchange every step (False: local updates)
    note: str = ""


def _rate_key(compressor: str, feedback: str) -> str:
    return f"{compressor}+{feedback}"


def predict(params: int, n: int, allreduce_link: "Link | cm.MeasuredCurve", allgather_link: "Link | cm.MeasuredCurve",
            rates: "dict[str, float]",
            ratio: float = 0.01, tau: int = 12, compute_s: Optional[float] = None,
            bucket_bytes: float = cm.DDP_BUCKET_BYTES, buckets: "Optional[list[int]]" = None) -> list[Method]:
    """The rows of the prediction for ``params`` fp32 gradient values on ``n`` ranks (see the module doc).

    ``rates`` maps ``"topk+ef14"`` etc. and ``"bf16"`` to elements/s (a missing rate counts as free);
    ``buckets``: elements per DDP bucket (default :func:`commopt.costmodel.ddp_bucket_numels`). A bucket's
    compression overlaps with the previous bucket's collective (:func:`commopt.costmodel.pipelined_seconds`)."""
    if n < 2:
        raise ValueError("commopt bench: predictions need at least 2 ranks")
    if buckets is None:
        buckets = cm.ddp_bucket_numels(params, 4, bucket_bytes)
    elif sum(buckets) != params:
        raise ValueError(f"commopt bench: the buckets hold {sum(buckets)} values, not the {params} parameters")
    ar = allreduce_link
    c = compute_s

    def work(key: Optional[str]) -> list[float]:
        r = rates.get(key) if key else None
        return [b / r if r else 0.0 for b in buckets]

    def sync_row(name: str, exchange: str, nbytes: float, link: "list[float]", local: "list[float]", setting: str,
                 note: str = "") -> Method:
        comm = cm.pipelined_seconds(local, link)
        return Method(name, exchange, nbytes, sum(link), sum(local), comm,
                      None if c is None else cm.sync_step_seconds(c, comm), setting, True, note)

    nb = len(buckets)
    rows = [
        sync_row("dense DDP fp32", f"all-reduce x{nb}", sum(cm.ring_allreduce_bytes(b, 4, n) for b in buckets),
                 [cm.ring_allreduce_seconds(b, 4, n, ar) for b in buckets], work(None),
                 "DistributedDataParallel(model)"),
        sync_row("DDP bf16 all-reduce", f"all-reduce x{nb}", sum(cm.ring_allreduce_bytes(b, 2, n) for b in buckets),
                 [cm.ring_allreduce_seconds(b, 2, n, ar) for b in buckets], work("bf16"),
                 "ddp.register_comm_hook(None, torch.distributed.algorithms.ddp_comm_hooks.default_hooks"
                 ".bf16_compress_hook)"),
    ]
    pct = f"{100 * ratio:g}%"
    label = {"gather": "all-gather", "shared": "all-reduce (k)", "dense": "all-reduce (dense)"}
    for comp, comp_name in COMPRESSORS:
        shared = comp == "randk"
        ks = [min(b, max(1, int(math.floor(ratio * b)))) for b in buckets]
        kinds = [cm.compressed_exchange(shared, k, b, n) for k, b in zip(ks, buckets)]
        nbytes = sum(cm.exchange_bytes(kind, k, b, n) for kind, k, b in zip(kinds, ks, buckets))
        link = [cm.exchange_seconds(kind, k, b, n, ar, allgather_link) for kind, k, b in zip(kinds, ks, buckets)]
        used = sorted(set(kinds))
        exchange = "+".join(label[u] for u in used) + f" x{nb}"
        note = "dense fallback: k/d >= 1/n (SPEC §3)" if "dense" in used and not shared else ""
        for fb, fb_name in FEEDBACKS:
            rows.append(sync_row(f"{comp_name} {pct} + {fb_name}", exchange, nbytes, link, work(_rate_key(comp, fb)),
                                 f'commopt.CompressedOptimizer(ddp, opt, compressor="{comp}:{ratio:g}", '
                                 f'feedback="{fb}")', note))
    d_outer = cm.ring_allreduce_seconds(params, 4, n, ar)
    outer_bytes = cm.ring_allreduce_bytes(params, 4, n) / tau
    co2_comm = d_outer / tau if c is None else max(0.0, d_outer - tau * c) / tau
    rows.append(Method(f"CO2 tau={tau}", f"all-reduce / {tau} steps", outer_bytes, d_outer / tau, 0.0, co2_comm,
                       None if c is None else cm.co2_step_seconds(c, d_outer, tau),
                       f"commopt.CO2(model, opt, tau={tau})", False,
                       f"hidden completely when compute >= D/tau = {1e3 * d_outer / tau:.1f} ms/step"))
    rows.append(Method(f"local SGD tau={tau} (blocking)", f"all-reduce / {tau} steps", outer_bytes, d_outer / tau,
                       0.0, d_outer / tau, None if c is None else cm.local_sgd_step_seconds(c, d_outer, tau),
                       f"commopt.CO2(model, opt, tau={tau}, overlap=False)", False))
    return rows


def recommend(rows: "list[Method]", compute_s: Optional[float]) -> list[str]:
    """The recommendation lines for the prediction ``rows``."""
    dense = rows[0]
    key = (lambda r: r.step_s) if compute_s is not None else (lambda r: r.comm_s)
    best = min(rows, key=key)
    best_sync = min((r for r in rows if r.every_step), key=key)
    what = "per step" if compute_s is not None else "of communication per step"
    out = []
    if compute_s is not None and dense.step_s is not None and dense.step_s <= 1.10 * compute_s:
        out.append(f"recommendation: dense DDP (DistributedDataParallel(model)): its communication adds "
                   f"{1e3 * dense.comm_s:.1f} ms to a {1e3 * compute_s:.1f} ms step (at most "
                   f"{100 * dense.comm_s / compute_s:.0f}%), so compression or local updates would not pay")
        return out

    def ms(r: Method) -> str:
        return f"{1e3 * key(r):.1f} ms"

    def vs(r: Method) -> str:
        if key(r) <= 0:
            return "none left"
        if compute_s is not None:
            return f"{key(dense) / key(r):.1f}x faster"
        return f"{key(dense) / key(r):.1f}x less"

    out.append(f"recommendation: {best.name} -- predicted {ms(best)} {what} vs {ms(dense)} for dense "
               f"DDP ({vs(best)}); {best.setting}")
    if not best.every_step and best_sync is not best:
        out.append(f"  with a gradient exchange every step: {best_sync.name} -- {ms(best_sync)} "
                   f"({vs(best_sync)}); {best_sync.setting}")
    if compute_s is None:
        co2 = next(r for r in rows if r.name.startswith("CO2"))
        out.append(f"  (communication only: give --compute-ms for step times; CO2's exchange is {co2.note})")
    return out


def format_report(m: Measured, params: Optional[int], rows: "Optional[list[Method]]", compute_s: Optional[float],
                  tau: int, params_from: str = "", predict_from: str = "curve", buckets_note: str = "") -> str:
    """Everything rank 0 prints after measuring."""
    n = m.world_size
    lines = [""]
    if m.allreduce_link is not None:
        assert m.allgather_link is not None
        ar_hops, ag_hops = 2 * (n - 1), n - 1
        lines.append(f"measured on {n} ranks ({m.backend}, {m.device}); median of the slowest rank's times, the fit, "
                     f"and wire bytes per rank / time:")
        lines.append(f"  {'size':>9} | {'all_reduce ms':>13} | {'fit ms':>8} | {'wire Gbit/s':>11} | "
                     f"{'all_gather ms':>13} | {'fit ms':>8} | {'wire Gbit/s':>11}")
        gather = dict(m.allgather)
        for s, t in m.allreduce:
            w = cm.ring_allreduce_bytes(s // 4, 4, n)
            line = (f"  {_fmt_bytes(s):>9} | {1e3 * t:>13.3f} | "
                    f"{1e3 * cm.transfer_seconds(w, m.allreduce_link, ar_hops):>8.3f} | {8 * w / t / 1e9:>11.3f} | ")
            g = gather.get(s)
            if g:
                wg = cm.allgather_bytes(s, n)
                line += (f"{1e3 * g:>13.3f} | {1e3 * cm.transfer_seconds(wg, m.allgather_link, ag_hops):>8.3f} | "
                         f"{8 * wg / g / 1e9:>11.3f}")
            else:
                line += f"{'-':>13} | {'-':>8} | {'-':>11}"
            lines.append(line)
        for name, link, misfit, hops, wire in (
                ("all_reduce", m.allreduce_link, m.allreduce_misfit, ar_hops, f"2(n-1)/n*s = {2 * (n - 1) / n:g}*s"),
                ("all_gather", m.allgather_link, m.allgather_misfit, ag_hops, f"(n-1)*s = {n - 1}*s")):
            lines.append(f"  fit {name}: t = {hops}*alpha + 8*wire/B, wire = {wire}: alpha = {1e6 * link.latency:.1f} "
                         f"us per hop, B = {link.bandwidth / 1e9:.3f} Gbit/s (worst misfit {100 * misfit:.0f}%)")
    else:
        lines.append(f"{n} rank: no collective to measure (launch with torchrun / srun / mpiexec, or --ranks N)")
    if m.rates:
        lines.append(f"compression throughput on {m.device} ({_fmt_count(m.compress_numel)} values per round, "
                     f"slowest rank of {n}):")
        for key, rate in m.rates.items():
            label = "bf16 cast (DDP bf16_compress_hook)" if key == "bf16" else _rate_label(key, m.ratio)
            per = f"{1e3 * params / rate:9.1f} ms for P" if params else ""
            lines.append(f"  {label:<34} {rate / 1e6:9.1f} M elements/s {per}")
    if params is None or rows is None:
        lines.append("(give --params 350M or --model path.py:factory for the predicted time per step)")
        return "\n".join(lines)
    lines.append("")
    head = (f"predicted communication per step: P = {params:,} parameters ({_fmt_count(params)}{params_from}), "
            f"fp32 gradients, {n} ranks, tau = {tau}")
    head += f", compute {1e3 * compute_s:g} ms/step" if compute_s is not None else ", communication only"
    lines.append(head)
    lines.append("  each collective timed from " + (
        "the measured times (linear between the sizes above, beyond them at the fitted B)" if predict_from == "curve"
        else "the fitted alpha and B") + (f"; {buckets_note}" if buckets_note else ""))
    step_col = compute_s is not None
    header = (f"  {'method':<29} | {'exchange':<26} | {'MB/step/rank':>12} | {'link ms':>9} | {'compress ms':>11} | "
              f"{'comm ms/step':>12}" + (f" | {'step ms':>9}" if step_col else ""))
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    for r in rows:
        comm = f"{1e3 * r.comm_s:.1f}"
        if not r.every_step and r.name.startswith("CO2") and compute_s is None:
            comm = "<= " + comm
        line = (f"  {r.name:<29} | {r.exchange:<26} | {r.bytes_per_step / 1e6:>12.2f} | {1e3 * r.link_s:>9.1f} | "
                f"{1e3 * r.compress_s:>11.1f} | {comm:>12}")
        if step_col:
            line += f" | {1e3 * r.step_s:>9.1f}"
        if r.note:
            line += f"   ({r.note})"
        lines.append(line)
    lines.append("  comm ms/step: bucket by bucket, each bucket's compression overlapping the previous bucket's collective "
                 "(between max(link, compress) and link + compress), not overlapped with backward (an upper bound); "
                 "CO2 / local SGD: one flat all-reduce D every tau steps, CO2 pays max(0, D - tau*c)/tau")
    lines += recommend(rows, compute_s)
    return "\n".join(lines)


def _rate_label(key: str, ratio: float) -> str:
    comp, _, fb = key.partition("+")
    return f"{dict(COMPRESSORS)[comp]} {100 * ratio:g}% + {dict(FEEDBACKS)[fb]}"


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class BenchConfig:
    """Options of one bench run (picklable: handed to spawned ranks)."""

    params: Optional[int] = None
    params_from: str = ""
    buckets: Optional[list[int]] = None   # elements per DDP bucket (from --model); None: estimated from params
    compute_ms: Optional[float] = None
    tau: int = 12
    ratio: float = 0.01
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    time_per_size: float = 0.3
    compress_numel: int = 4_000_000
    compress_reps: int = 5
    bucket_mb: float = 25.0
    json_path: Optional[str] = None
    predict_from: str = "curve"   # "curve": the measured times (interpolated); "fit": the fitted α, B alone


class _Ranks:
    """Timing helpers over the default process group (every call is collective)."""

    def __init__(self, device: Any) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.device = device
        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self._tick = torch.zeros(1, device=device)

    def sync_device(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def line_up(self) -> None:
        """A small all-reduce: every rank leaves it at about the same time."""
        self.dist.all_reduce(self._tick)
        self.sync_device()

    def slowest(self, values: "list[float]") -> list[float]:
        """Element-wise maximum over the ranks."""
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return [float(v) for v in t.cpu().tolist()]

    def timed(self, op: Callable[[], Any]) -> float:
        self.sync_device()
        t0 = time.perf_counter()
        op()
        self.sync_device()
        return time.perf_counter() - t0

    def median_time(self, op: Callable[[], Any], target_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
        """Median over repetitions of the slowest rank's time of ``op`` (after one untimed warm-up run whose
        time sets the number of repetitions, the same on every rank)."""
        self.line_up()
        first = self.slowest([self.timed(op)])[0]
        reps = int(min(max_reps, max(min_reps, math.ceil(target_s / max(first, 1e-6)))))
        times = []
        for _ in range(reps):
            self.line_up()
            times.append(self.timed(op))
        return statistics.median(self.slowest(times))


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def measure_collectives(cfg: BenchConfig, ranks: _Ranks) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Median all-reduce and all-gather times per size (see the module doc)."""
    torch, dist = ranks.torch, ranks.dist
    from .exchange import _all_gather_single

    sizes = default_sizes(cfg.min_size, cfg.max_size)
    n = ranks.n
    gsizes = [s for s in sizes if s * n <= _MAX_GATHER_BYTES]
    total = len(sizes) + len(gsizes)
    done = 0
    ar, ag = [], []
    for s in sizes:
        done += 1
        _say(ranks.rank, f"measuring all_reduce {_fmt_bytes(s)} ({done}/{total})...")
        x = torch.ones(s // 4, dtype=torch.float32, device=ranks.device)
        ar.append((s, ranks.median_time(lambda: dist.all_reduce(x), cfg.time_per_size)))
        del x
    for s in gsizes:
        done += 1
        _say(ranks.rank, f"measuring all_gather {_fmt_bytes(s)} per rank ({done}/{total})...")
        send = torch.ones(s // 4, dtype=torch.float32, device=ranks.device)
        recv = torch.empty(n * (s // 4), dtype=torch.float32, device=ranks.device)
        ag.append((s, ranks.median_time(lambda: _all_gather_single(recv, send), cfg.time_per_size)))
        del send, recv
    return ar, ag


def _round_fn(compressor: str, feedback: str, ratio: float, grads: "list[Any]", n: int) -> Callable[[int], Any]:
    """Round ``step`` of the hook's local data path for one bucket (no collective: the sum of the n
    messages is formed as the exchange forms it, from this rank's message). The state starts from a dense
    round of ``grads[0]`` and every round commits its new state, as training does; round ``step`` compresses
    ``grads[1 + step % (len(grads) - 1)]`` (the feedback input of a rule whose state was just initialised from
    the same gradient would be all zeros, which TopK selects from unrealistically slowly)."""
    import torch

    from .compressors import make_compressor
    from .exchange import choose_exchange, index_dtype, ordered_sum
    from .feedback import make_feedback
    from .round import compress, conclude, write_estimate

    comp = make_compressor(f"{compressor}:{ratio!r}")
    fb = make_feedback(feedback)
    g = grads[0]
    d = g.numel()
    k = comp.num_selected(d)
    kind = choose_exchange(comp.shared_indices, k, d, n)
    state = [fb.init(g, g.clone())]
    out_buf = torch.empty_like(g)

    def total_of(idx: Any, vals: Any) -> Any:
        if kind == "gather":  # pack (vals, idx) as exchange._gather does, then the rank-ordered sum
            idt = index_dtype(vals.dtype)
            send = torch.cat([vals.reshape(-1), idx.to(idt).view(vals.dtype)])
            rows = torch.cat([send] * n).view(n, -1)
            msgs = [(rows[r, k:].clone().view(idt), rows[r, :k]) for r in range(n)]
            return ordered_sum(msgs, d, g.dtype, g.device)
        dense = torch.zeros(d, dtype=g.dtype, device=g.device)
        return dense.index_put_((idx,), vals.clone().to(g.dtype))

    def one(step: int) -> Any:
        g = grads[1 + step % (len(grads) - 1)]
        out = compress(comp, fb, state[0], g, k, step, 0, wire_dtype=g.dtype)
        total = total_of(out.idx, out.vals)
        new, ok, est, mean = conclude(fb, state[0], out, total, n)
        res = write_estimate(est, ok, mean, None, out_buf)
        if bool(ok):  # the hook's commit (on an accelerator it selects on the device instead)
            state[0] = new
        return res

    return one


def measure_compression(cfg: BenchConfig, ranks: _Ranks) -> dict[str, float]:
    """Elements/s of each compressor + feedback round and of the bf16 cast (slowest rank's median)."""
    torch = ranks.torch
    gen = torch.Generator().manual_seed(1234 + ranks.rank)
    grads = [torch.randn(cfg.compress_numel, generator=gen).to(ranks.device) for _ in range(3)]
    g = grads[1]
    jobs: list[tuple[str, Callable[[int], Any]]] = []
    for comp, _ in COMPRESSORS:
        for fb, _ in FEEDBACKS:
            jobs.append((_rate_key(comp, fb), _round_fn(comp, fb, cfg.ratio, grads, ranks.n)))
    n = ranks.n

    def bf16_round(step: int) -> Any:
        return g.to(torch.bfloat16).to(torch.float32).div_(n)

    jobs.append(("bf16", bf16_round))
    for i, (key, fn) in enumerate(jobs):
        label = "bf16 cast" if key == "bf16" else _rate_label(key, cfg.ratio)
        _say(ranks.rank, f"measuring compression {label} ({i + 1}/{len(jobs)})...")
        ranks.line_up()
        fn(0)  # warm-up
    # the timed rounds take turns (round r of every setting, then round r + 1), so that a burst of load
    # from elsewhere slows one round of each setting rather than every round of one
    times: dict[str, list[float]] = {key: [] for key, _ in jobs}
    for rep in range(cfg.compress_reps):
        _say(ranks.rank, f"measuring compression: timed round {rep + 1}/{cfg.compress_reps} of every setting...")
        for key, fn in jobs:
            ranks.line_up()
            times[key].append(ranks.timed(lambda fn=fn: fn(rep + 1)))
    return {key: cfg.compress_numel / statistics.median(ranks.slowest(ts)) for key, ts in times.items()}


def bench_body(cfg: BenchConfig, device: Any, launcher: str) -> int:
    """The whole bench inside an initialised default process group; rank 0 prints. Returns 0."""
    import torch.distributed as dist

    ranks = _Ranks(device)
    n = ranks.n
    what = f", P = {cfg.params:,}{cfg.params_from}" if cfg.params else ""
    _say(ranks.rank, f"commopt bench: {n} rank(s) ({dist.get_backend()}, {device}, launcher {launcher}){what}")
    t0 = time.perf_counter()
    m = Measured(world_size=n, backend=str(dist.get_backend()), device=str(device), launcher=launcher,
                 compress_numel=cfg.compress_numel, ratio=cfg.ratio)
    if n > 1:
        m.allreduce, m.allgather = measure_collectives(cfg, ranks)
        wire = [cm.ring_allreduce_bytes(s // 4, 4, n) for s, _ in m.allreduce]
        secs = [t for _, t in m.allreduce]
        m.allreduce_link, m.allreduce_misfit = fit_link(wire, secs, 2 * (n - 1))
        m.allreduce_curve = cm.MeasuredCurve(tuple(wire), tuple(secs), m.allreduce_link)
        if len(m.allgather) >= 2:
            wire = [cm.allgather_bytes(s, n) for s, _ in m.allgather]
            secs = [t for _, t in m.allgather]
            m.allgather_link, m.allgather_misfit = fit_link(wire, secs, n - 1)
            m.allgather_curve = cm.MeasuredCurve(tuple(wire), tuple(secs), m.allgather_link)
        else:  # all-gather buffers too large to measure: the all-reduce's figures
            m.allgather_link, m.allgather_curve = m.allreduce_link, m.allreduce_curve
    m.rates = measure_compression(cfg, ranks)
    if ranks.rank == 0:
        compute_s = None if cfg.compute_ms is None else cfg.compute_ms / 1e3
        rows = None
        if cfg.params and n > 1:
            if cfg.predict_from == "fit":
                ar, ag = m.allreduce_link, m.allgather_link
            else:
                ar, ag = m.allreduce_curve, m.allgather_curve
            assert ar is not None and ag is not None
            rows = predict(cfg.params, n, ar, ag, m.rates, cfg.ratio, cfg.tau, compute_s,
                           cfg.bucket_mb * (1 << 20), cfg.buckets)
        if cfg.buckets is not None:
            note = f"{len(cfg.buckets)} DDP buckets (the model's own layout)"
        elif cfg.params:
            note = (f"{len(cm.ddp_bucket_numels(cfg.params, 4, cfg.bucket_mb * (1 << 20)))} DDP buckets (estimated: "
                    f"1 MiB, then {cfg.bucket_mb:g} MiB each; --model gives the model's own)")
        else:
            note = ""
        print(format_report(m, cfg.params, rows, compute_s, cfg.tau, cfg.params_from, cfg.predict_from, note),
              flush=True)
        print(f"bench finished in {time.perf_counter() - t0:.1f} s", flush=True)
        if cfg.json_path:
            data = {"config": asdict(cfg), "measured": asdict(m), "predictions": [asdict(r) for r in rows or []]}
            with open(cfg.json_path, "w") as f:
                json.dump(data, f, indent=1)
    dist.barrier()
    return 0


def _worker(rank: int, world_size: int, cfg: BenchConfig, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "store"), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        bench_body(cfg, torch.device("cpu"), f"--ranks {world_size} (local, file store)")
    finally:
        dist.destroy_process_group()


def run_bench(cfg: BenchConfig, ranks: Optional[int] = None) -> int:
    """Run the bench: on ``ranks`` spawned local CPU processes, or else on the launcher's ranks
    (:func:`commopt.init_distributed`; a single process when there is none). Returns an exit code."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from .distributed import detect_launcher, init_distributed

    if ranks is not None:
        if ranks < 1:
            print(f"commopt bench: --ranks must be >= 1, got {ranks}", file=sys.stderr)
            return 2
        launcher = detect_launcher(os.environ)
        if launcher != "single":
            print(f"commopt bench: --ranks starts local processes, but this process was started by {launcher}; "
                  f"drop --ranks to measure the launcher's ranks", file=sys.stderr)
            return 2
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        with tempfile.TemporaryDirectory(prefix="commopt-bench-") as tmp:
            try:
                mp.start_processes(_worker, args=(ranks, cfg, tmp), nprocs=ranks, join=True, start_method="spawn")
            except mp.ProcessRaisedException as exc:
                print(f"commopt bench: rank {exc.error_index} failed:\n{exc}", file=sys.stderr, flush=True)
                return 1
            except mp.ProcessExitedException as exc:
                code = exc.exit_code
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                print(f"commopt bench: rank {exc.error_index} {how}", file=sys.stderr, flush=True)
                return 1
        return 0
    info = init_distributed(timeout=datetime.timedelta(minutes=5))
    try:
        return bench_body(cfg, info.device, info.launcher)
    finally:
        dist.destroy_process_group()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``commopt bench`` options."""
    p.add_argument("--ranks", type=int, default=None,
                   help="start N local CPU processes (gloo) instead of using the launcher's ranks")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--params", default=None, help="parameters of the model to predict for: 350M, 1.3B, 20000000")
    what.add_argument("--model", default=None, metavar="PATH.py:FACTORY",
                      help="count the trainable parameters of FACTORY() from PATH.py (called on the meta device "
                           "first) instead of --params")
    p.add_argument("--compute-ms", type=float, default=None,
                   help="compute time of one training step (forward + backward + optimizer) in ms; with it the "
                        "table shows step times and the recommendation is the fastest step (default: "
                        "communication only)")
    p.add_argument("--tau", type=int, default=12, help="local steps per round of CO2 / local SGD (default 12)")
    p.add_argument("--ratio", type=float, default=0.01, help="TopK / RandK ratio k/d (default 0.01)")
    p.add_argument("--min-size", default="4KB", help="smallest collective measured (default 4KB; K/M = 1024)")
    p.add_argument("--max-size", default="64MB", help="largest collective measured (default 64MB)")
    p.add_argument("--time-per-size", type=float, default=0.3,
                   help="seconds of repetitions per size (at least 3; default 0.3)")
    p.add_argument("--compress-numel", default="4M",
                   help="values per compression round measured (default 4M, about one 25 MB DDP bucket)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb of the run (default 25)")
    p.add_argument("--predict-from", choices=("curve", "fit"), default="curve",
                   help="time each message from the measured times, linear between the measured sizes and "
                        "beyond them at the fitted bandwidth (curve, the default), or from the fitted alpha and "
                        "B alone (fit)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures and predictions as JSON")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed ``commopt bench`` arguments (``ValueError`` with the reason)."""
    params, params_from, buckets = None, "", None
    if args.bucket_mb <= 0:
        raise ValueError(f"commopt bench: --bucket-mb must be > 0, got {args.bucket_mb}")
    if args.params is not None:
        params = parse_params(args.params)
    elif args.model is not None:
        params, buckets = inspect_model(args.model, args.bucket_mb)
        params_from = f" from {args.model}"
    if args.tau < 1:
        raise ValueError(f"commopt bench: --tau must be >= 1, got {args.tau}")
    if not 0.0 < args.ratio <= 1.0:
        raise ValueError(f"commopt bench: --ratio must be in (0, 1], got {args.ratio}")
    if args.compute_ms is not None and args.compute_ms < 0:
        raise ValueError(f"commopt bench: --compute-ms must be >= 0, got {args.compute_ms}")
    if args.time_per_size <= 0:
        raise ValueError(f"commopt bench: --time-per-size must be > 0, got {args.time_per_size}")
    numel = parse_params(args.compress_numel)
    if numel < 1024:
        raise ValueError(f"commopt bench: --compress-numel must be >= 1024, got {args.compress_numel}")
    min_size, max_size = parse_size(args.min_size), parse_size(args.max_size)
    if len(default_sizes(min_size, max_size)) < 2:
        raise ValueError(f"commopt bench: --min-size and --max-size give one size; the fit needs two or more")
    return BenchConfig(params=params, params_from=params_from, buckets=buckets, compute_ms=args.compute_ms, tau=args.tau,
                       ratio=args.ratio, min_size=min_size, max_size=max_size, time_per_size=args.time_per_size,
                       compress_numel=numel, bucket_mb=args.bucket_mb, json_path=args.json,
                       predict_from=args.predict_from)
