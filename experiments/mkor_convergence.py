"""MKOR / MKOR-H vs their first-order base optimizers: steps and wall time to a target loss, and
MKOR's per-step overhead (SPEC §7).

Parts (all CPU, float64 for the convergence runs, float32 for the timing):

1. SPEC §7's offset linear regression (x = 4 + N(0, diag(s²)), s log-spaced 1 → 0.5, d = 32,
   y = x·w*, a bias-free Linear, full batch, SGD momentum 0.9 at lr 1.35e-3) over seeds 0–5,
   and its zero-mean control: steps to loss < 1e−3 for SGD, MKOR ("shrink" and "ema") and MKOR-H.
2. A small nonlinear task: an MLP (16-64-64-1, ReLU) on non-negative inputs (uniform [0, 1]^16,
   targets of a random tanh teacher), minibatch 64: SGD, AdamW, MKOR and MKOR-H over each:
   steps and wall time to a full-data loss of 0.05.
3. The same task on 2 ranks (gloo, one shard per rank, minibatch 32 per rank) with the gradient
   exchange underneath: DDP, CompressedOptimizer (TopK 10 % + EControl), and MKOR over each.
4. Overhead: a 4.2 M-parameter token MLP (512-2048-512-2048-512, GELU) at 2048 and 8192 rows
   (tokens) per step, base AdamW and SGD, MKOR at update_every=10 (and 1): per-step time, base and
   MKOR steps interleaved in one process; the amortised ratio is the mean over 30 steps (three
   factor updates).

Writes ``experiments/results/mkor_convergence.png`` (loss curves and overhead) and
``experiments/results/mkor_convergence.md`` (the tables printed here).

    python experiments/mkor_convergence.py            # everything (3–7 min on 2 shared cores)
    python experiments/mkor_convergence.py --quick    # fewer seeds, smaller overhead model
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from commopt.optim.compressed import CompressedOptimizer  # noqa: E402
from commopt.optim.mkor import MKOR  # noqa: E402

F64 = torch.float64
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REG_LR, REG_TARGET, REG_MAX = 1.35e-3, 1e-3, 2000
MLP_TARGET, MLP_MAX = 0.05, 600

BASES: dict[str, Callable] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=3e-3),
}


# -- 1. offset linear regression ---------------------------------------------------------------------

def regression(offset: float, seed: int, d: int = 32, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, math.log10(0.5), d, dtype=F64)
    x = offset + torch.randn(n, d, generator=g, dtype=F64) * scales
    w = torch.randn(d, 1, generator=g, dtype=F64) / math.sqrt(d)
    return x, x @ w


def run_regression(x, y, mkor: Optional[dict]) -> tuple[list[float], Optional[int], float]:
    m = nn.Linear(x.shape[1], 1, bias=False, dtype=F64)
    nn.init.zeros_(m.weight)
    base = torch.optim.SGD(m.parameters(), lr=REG_LR, momentum=0.9)
    opt = MKOR(m, base, **mkor) if mkor is not None else base
    hybrid = bool(mkor and mkor.get("hybrid"))
    curve, hit, t0 = [], None, time.perf_counter()
    elapsed = 0.0
    for t in range(REG_MAX):
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        lv = float(loss.detach())
        curve.append(lv)
        if not math.isfinite(lv) or lv > 1e8:
            break
        if lv < REG_TARGET:
            hit = t
            elapsed = time.perf_counter() - t0
            break
        loss.backward()
        opt.step(loss=loss) if hybrid else opt.step()
    return curve, hit, elapsed


# -- 2. MLP on non-negative inputs ---------------------------------------------------------------------

def mlp_task(seed: int = 0, n: int = 512, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=F64)
    w1, b1 = torch.randn(d, 32, generator=g, dtype=F64), torch.randn(32, generator=g, dtype=F64)
    w2 = torch.randn(32, 1, generator=g, dtype=F64)
    y = torch.tanh(x @ w1 + b1) @ w2
    return x, (y - y.mean()) / y.std()


def mlp_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(F64)


def run_mlp(x, y, base_name: str, mkor: Optional[dict], steps: int = MLP_MAX):
    m = mlp_model()
    base = BASES[base_name](m.parameters())
    opt = MKOR(m, base, **mkor) if mkor is not None else base
    hybrid = bool(mkor and mkor.get("hybrid"))
    g = torch.Generator().manual_seed(5)
    curve, times, busy = [], [], 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.mse_loss(m(x[idx]), y[idx])
        loss.backward()
        opt.step(loss=loss) if hybrid else opt.step()
        busy += time.perf_counter() - t0
        with torch.no_grad():
            curve.append(float(F.mse_loss(m(x), y)))
        times.append(busy)
    hit = next((i for i, v in enumerate(curve) if v <= MLP_TARGET), None)
    switch = opt.switch_step if isinstance(opt, MKOR) and opt.switched else None
    return curve, times, hit, switch


# -- 3. two ranks with the gradient exchange underneath ---------------------------------------------------

def _dist_worker(rank: int, world: int, store: str, methods: list[str], steps: int, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, y = mlp_task()
    xs, ys = x[rank::world], y[rank::world]
    for method in methods:
        m = mlp_model()
        ddp = DDP(m)
        base = BASES["SGD"](m.parameters())
        if "compressed" in method:
            base = CompressedOptimizer(ddp, base, compressor="topk:0.1", feedback="econtrol")
        opt = MKOR(ddp, base) if method.startswith("MKOR") else base
        g = torch.Generator().manual_seed(5 + rank)
        curve, times, busy = [], [], 0.0
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (32,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad()
            F.mse_loss(ddp(xs[idx]), ys[idx]).backward()
            opt.step()
            busy += time.perf_counter() - t0
            if rank == 0:
                with torch.no_grad():
                    curve.append(float(F.mse_loss(m(x), y)))
                times.append(busy)
        if rank == 0:
            queue.put((method, curve, times))
        dist.barrier()
    dist.destroy_process_group()


def run_distributed(steps: int) -> dict:
    methods = ["DDP + SGD", "compressed + SGD", "MKOR(DDP + SGD)", "MKOR(compressed + SGD)"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_dist_worker, args=(r, 2, store, methods, steps, queue)) for r in range(2)]
        for p in procs:
            p.start()
        out = {}
        for _ in methods:
            method, curve, times = queue.get(timeout=900)
            out[method] = (curve, times)
        for p in procs:
            p.join()
    return out


# -- 4. overhead ---------------------------------------------------------------------------------------

def overhead(rows: int, base_name: str, every: int, steps: int, width: tuple[int, int] = (512, 2048)) -> dict:
    d, h = width

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d), nn.GELU(), nn.Linear(d, h), nn.GELU(),
                             nn.Linear(h, d))

    make = {"AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4), "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    mb, mm = model(), model()
    base = make[base_name](mb.parameters())
    mk = MKOR(mm, make[base_name](mm.parameters()), update_every=every)
    nparams = sum(p.numel() for p in mb.parameters())

    def one(mod, opt):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.mse_loss(mod(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (allocations, first factor update)
        one(mb, base), one(mm, mk)
    tb, tm = [], []
    for _ in range(steps):  # interleaved, so background load hits both alike
        tb.append(one(mb, base))
        tm.append(one(mm, mk))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"rows": rows, "base": base_name, "every": every, "params": nparams,
            "base_ms": 1e3 * sum(tb) / len(tb), "mkor_ms": 1e3 * sum(tm) / len(tm),
            "ratio_mean": sum(tm) / sum(tb), "ratio_median": med(tm) / med(tb)}


# -- main ----------------------------------------------------------------------------------------------

def fmt(v: Optional[float], unit: str = "") -> str:
    return "—" if v is None else (f"{v}{unit}" if isinstance(v, int) else f"{v:.2f}{unit}")


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 300 rows in the overhead runs, fewer steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the overhead part uses 2)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    # 1
    seeds = [0, 1] if args.quick else list(range(6))
    variants = {"SGD": None, "MKOR shrink": {}, "MKOR ema": {"rule": "ema"}, "MKOR-H shrink": {"hybrid": True}}
    out(f"## 1. Offset linear regression (SPEC §7): steps to loss < {REG_TARGET:g}, SGD momentum 0.9, lr {REG_LR:g}")
    out()
    out("| inputs | seed | " + " | ".join(variants) + " | shrink/SGD | ema/SGD |")
    out("|---|---|" + "---|" * (len(variants) + 2))
    reg_curves = {}
    for offset in (4.0, 0.0):
        for seed in seeds:
            x, y = regression(offset, seed)
            res = {k: run_regression(x, y, v) for k, v in variants.items()}
            if seed == 0:
                reg_curves[offset] = {k: r[0] for k, r in res.items()}
            hits = {k: r[1] for k, r in res.items()}
            ratios = [f"{hits[k] / hits['SGD']:.2f}" if hits[k] is not None and hits["SGD"] else "—"
                      for k in ("MKOR shrink", "MKOR ema")]
            out(f"| {'4 + noise' if offset else 'zero-mean'} | {seed} | " +
                " | ".join(fmt(hits[k]) for k in variants) + f" | {ratios[0]} | {ratios[1]} |")
    out()
    out("(— : not below the target within 2000 steps, or diverged)")

    # 2
    out()
    out(f"## 2. MLP on non-negative inputs, minibatch 64: steps / wall time to full-data loss ≤ {MLP_TARGET}")
    out()
    out("| optimizer | steps | wall time (s) | best loss in 600 steps | MKOR-H switch step |")
    out("|---|---|---|---|---|")
    x, y = mlp_task()
    mlp_curves = {}
    for base_name in BASES:
        for label, mk in ((base_name, None), (f"MKOR({base_name})", {}), (f"MKOR-H({base_name})", {"hybrid": True})):
            curve, times, hit, switch = run_mlp(x, y, base_name, mk)
            mlp_curves[label] = (curve, times)
            out(f"| {label} | {fmt(hit)} | {fmt(None if hit is None else times[hit])} | {min(curve):.4f} | {fmt(switch)} |")

    # 3
    out()
    out(f"## 3. Same task on 2 ranks (gloo), minibatch 32 per rank: steps / wall time to loss ≤ {MLP_TARGET}")
    out()
    out("| exchange + optimizer | steps | wall time (s) | best loss |")
    out("|---|---|---|---|")
    dist_res = run_distributed(300 if args.quick else 400)
    for method, (curve, times) in dist_res.items():
        hit = next((i for i, v in enumerate(curve) if v <= MLP_TARGET), None)
        out(f"| {method} | {fmt(hit)} | {fmt(None if hit is None else times[hit])} | {min(curve):.4f} |")

    # 4
    torch.set_num_threads(2)
    out()
    width = (256, 1024) if args.quick else (512, 2048)
    out(f"## 4. Per-step overhead of MKOR over its base optimizer (token MLP {'-'.join(map(str, width * 2))}-{width[0]}, "
        f"GELU; 2 threads; base and MKOR steps interleaved)")
    out()
    out("| rows/step | base | update_every | params | base ms/step | MKOR ms/step | ratio (mean, amortised) | ratio (median) |")
    out("|---|---|---|---|---|---|---|---|")
    configs = ([(1024, "AdamW", 10), (4096, "AdamW", 10)] if args.quick else
               [(2048, "AdamW", 10), (8192, "AdamW", 10), (8192, "SGD", 10), (8192, "AdamW", 1)])
    ovh = []
    for rows, base_name, every in configs:
        r = overhead(rows, base_name, every, 10 if args.quick else 30, width)
        ovh.append(r)
        out(f"| {rows} | {base_name} | {every} | {r['params'] / 1e6:.2f} M | {r['base_ms']:.0f} | {r['mkor_ms']:.0f} | "
            f"{r['ratio_mean']:.2f}× | {r['ratio_median']:.2f}× |")
    out()
    out("Preconditioning costs 2·d_out·d_in·(d_out + d_in) flops per layer and step against "
        "6·d_out·d_in·rows for forward + backward: a ratio of (d_in + d_out)/(3·rows) per layer.")

    with open(os.path.join(RESULTS, "mkor_convergence.md"), "w") as fh:
        fh.write("# MKOR convergence and overhead (experiments/mkor_convergence.py)\n\n" + "\n".join(lines) + "\n")

    if args.no_plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    for k, c in reg_curves[4.0].items():
        ax[0, 0].semilogy(c, label=f"{k} (offset 4)")
    for k, c in reg_curves[0.0].items():
        if k in ("SGD", "MKOR shrink"):
            ax[0, 0].semilogy(c, "--", label=f"{k} (zero-mean)")
    ax[0, 0].axhline(REG_TARGET, color="k", lw=0.5)
    ax[0, 0].set(title="offset linear regression (seed 0)", xlabel="step", ylabel="loss", xlim=(0, 600))
    ax[0, 0].legend(fontsize=7)
    for k, (c, _) in mlp_curves.items():
        ax[0, 1].semilogy(c, label=k)
    ax[0, 1].axhline(MLP_TARGET, color="k", lw=0.5)
    ax[0, 1].set(title="MLP, non-negative inputs", xlabel="step", ylabel="full-data loss")
    ax[0, 1].legend(fontsize=7)
    for k, (c, tt) in dist_res.items():
        ax[1, 0].semilogy(tt, c, label=k)
    ax[1, 0].axhline(MLP_TARGET, color="k", lw=0.5)
    ax[1, 0].set(title="2 ranks: DDP / compressed exchange, with and without MKOR", xlabel="wall time (s)",
                 ylabel="full-data loss")
    ax[1, 0].legend(fontsize=7)
    labels = [f"{r['rows']} rows\n{r['base']} f={r['every']}" for r in ovh]
    ax[1, 1].bar(range(len(ovh)), [r["ratio_mean"] for r in ovh], color="tab:orange")
    ax[1, 1].axhline(1.2, color="k", ls="--", lw=0.8, label="target 1.2×")
    ax[1, 1].set_xticks(range(len(ovh)), labels, fontsize=7)
    ax[1, 1].set(title=f"MKOR step time / base step time ({ovh[0]['params'] / 1e6:.1f} M params)", ylabel="ratio")
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(RESULTS, "mkor_convergence.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path} and mkor_convergence.md")


if __name__ == "__main__":
    main()
