"""Soak: resident memory of each commopt optimizer over a long 2-rank run (gloo, CPU; torchrun).

For each optimizer, ``torchrun --nproc_per_node 2`` runs this file in ``--worker`` mode: a small MLP
(64-256-256-8, Tanh, batch 32, MSE on a fixed random teacher) under

    compressed   CompressedOptimizer(DDP, AdamW), TopK 5 % + EControl
    co2          CO2(DDP, AdamW inner), tau = 8
    mkor         MKOR(DDP, SGD), statistics every 10 steps (MKOR over the DDP-wrapped model)

Every ``--every`` steps each rank records VmRSS (``/proc/self/status``), the number of live torch
tensors (``gc.get_objects()`` after ``gc.collect()``: leak-sensitive and free of allocator noise)
and ``torch.cuda.memory_allocated()`` when CUDA is available. The driver parses the ranks' lines
and reports, per optimizer and rank, the RSS at the end of warm-up and at the end, the growth in
between and its verdict against ``--bound-mb``; live tensors must not grow after warm-up.

    python experiments/soak.py                                   # 20,000 steps each, writes results/soak.md
    python experiments/soak.py --steps 3000 --opts mkor --out -  # quick look, print only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPTS = {
    "compressed": "CompressedOptimizer(DDP, AdamW lr 1e-3), TopK 5 % + EControl",
    "co2": "CO2(DDP, AdamW lr 1e-3), tau = 8",
    "mkor": "MKOR(DDP, SGD lr 0.05), update_every = 10",
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def live_tensors() -> int:
    import torch
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, ROOT)
    import commopt

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    r = dist.get_rank()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 8)).to(dev)
    teacher = torch.nn.Linear(64, 8).to(dev)
    ddp = DDP(model, bucket_cap_mb=0.1)
    if args.worker == "compressed":
        opt = commopt.CompressedOptimizer(ddp, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                          compressor="topk:0.05", feedback="econtrol")
    elif args.worker == "co2":
        opt = commopt.CO2(ddp, torch.optim.AdamW(model.parameters(), lr=1e-3), tau=8)
    elif args.worker == "mkor":
        opt = commopt.MKOR(ddp, torch.optim.SGD(model.parameters(), lr=0.05), update_every=10)
    else:
        raise SystemExit(f"unknown optimizer {args.worker!r}")
    gen = torch.Generator(device=dev).manual_seed(1 + r)
    log = open(os.path.join(args.logdir, f"{args.worker}.rank{r}.jsonl"), "w")
    t0 = time.time()

    def record(t: int, loss: float) -> None:
        rec = {"rank": r, "step": t, "rss_mb": round(rss_mb(), 2), "tensors": live_tensors(),
               "cuda_mb": round(torch.cuda.memory_allocated() / 2**20, 3) if torch.cuda.is_available() else None,
               "loss": round(loss, 5), "t": round(time.time() - t0, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()

    for t in range(args.steps):
        x = torch.randn(32, 64, generator=gen, device=dev)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        if t % args.every == 0 or t == args.steps - 1:
            record(t, float(loss))
        del x, y, loss
    if args.worker == "co2":
        opt.finish()
    log.close()
    dist.destroy_process_group()


def launch(opt: str, args: argparse.Namespace, port: int) -> subprocess.Popen:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), os.path.abspath(__file__),
           "--worker", opt, "--steps", str(args.steps), "--every", str(args.every), "--device", args.device,
           "--logdir", args.logdir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = open(os.path.join(args.logdir, f"{opt}.out"), "w")
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def collect(opt: str, args: argparse.Namespace) -> list[dict]:
    recs = []
    for r in range(2):
        path = os.path.join(args.logdir, f"{opt}.rank{r}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                recs += [json.loads(line) for line in f if line.strip()]
    return recs


def summarise(opt: str, recs: list[dict], rc: int, wall: float, args: argparse.Namespace) -> list[dict]:
    rows = []
    for rank in sorted({x["rank"] for x in recs}):
        mine = sorted((x for x in recs if x["rank"] == rank), key=lambda x: x["step"])
        warm = next((x for x in mine if x["step"] >= args.warmup), mine[-1])
        after = [x for x in mine if x["step"] >= warm["step"]]
        end = mine[-1]
        growth = end["rss_mb"] - warm["rss_mb"]
        peak = max(x["rss_mb"] for x in after) - warm["rss_mb"]
        tensors_grow = max(x["tensors"] for x in after) - warm["tensors"]
        ok = rc == 0 and end["step"] == args.steps - 1 and growth <= args.bound_mb and tensors_grow <= 0
        rows.append({"opt": opt, "rank": rank, "rc": rc, "wall_s": round(wall), "warm_step": warm["step"],
                     "end_step": end["step"], "rss_start": mine[0]["rss_mb"], "rss_warm": warm["rss_mb"],
                     "rss_end": end["rss_mb"], "growth": round(growth, 1), "peak_growth": round(peak, 1),
                     "tensors_warm": warm["tensors"], "tensors_end": end["tensors"], "tensor_growth": tensors_grow,
                     "cuda_warm": warm["cuda_mb"], "cuda_end": end["cuda_mb"], "loss_end": end["loss"],
                     "pass": ok})
    return rows


def report(rows: list[dict], series: dict, args: argparse.Namespace, cmdline: str) -> str:
    out = ["# Soak: resident memory of each optimizer over a long 2-rank run", "",
           f"Generated by `{cmdline}` (this file is the script's own output). 2 ranks under "
           f"`torchrun --nproc_per_node 2`, gloo, device {args.device}, one torch thread per rank, "
           f"MLP 64-256-256-8 (Tanh), batch 32, {args.steps} steps; a record every {args.every} steps.", "",
           "Verdict per rank: **pass** when the run finished, the RSS (VmRSS) grew by at most "
           f"{args.bound_mb:g} MB from the end of warm-up (step {args.warmup}) to the end, and the number of "
           "live torch tensors (gc) never exceeded its warm-up value.", "",
           "| optimizer | rank | RSS step 0 (MB) | RSS warm-up (MB) | RSS end (MB) | growth after warm-up (MB) | "
           "max growth (MB) | live tensors warm-up → end | CUDA allocated (MB) | final loss | wall (s) | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        cuda = "n/a (no CUDA)" if x["cuda_end"] is None else f"{x['cuda_warm']} → {x['cuda_end']}"
        out.append(f"| {x['opt']} | {x['rank']} | {x['rss_start']:.1f} | {x['rss_warm']:.1f} (step {x['warm_step']}) | "
                   f"{x['rss_end']:.1f} (step {x['end_step']}) | {x['growth']:+.1f} | {x['peak_growth']:+.1f} | "
                   f"{x['tensors_warm']} → {x['tensors_end']} | {cuda} | {x['loss_end']} | {x['wall_s']} | "
                   f"{'pass' if x['pass'] else 'FAIL'} |")
    out += ["", "Optimizers: " + "; ".join(f"`{k}` = {OPTS[k]}" for k in series), "",
            "Rank 0's RSS (MB) every record:", ""]
    for opt, recs in series.items():
        mine = sorted((x for x in recs if x["rank"] == 0), key=lambda x: x["step"])
        out.append(f"- `{opt}`: " + ", ".join(f"{x['step']}: {x['rss_mb']:.1f}" for x in mine))
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(OPTS), help=argparse.SUPPRESS)
    ap.add_argument("--opts", default=",".join(OPTS), help="comma-separated subset of " + ", ".join(OPTS))
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--bound-mb", type=float, default=10.0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--logdir", default=None, help="per-rank record files (default: a temporary folder)")
    ap.add_argument("--parallel", action="store_true", help="run the optimizers' jobs concurrently")
    ap.add_argument("--port", type=int, default=29851)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak.md"), help="'-' prints only")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.logdir is None:
        args.logdir = tempfile.mkdtemp(prefix="soak.")
    os.makedirs(args.logdir, exist_ok=True)
    shown, skip = [], False
    for a in sys.argv[1:]:  # the command line without where the files went
        if skip:
            skip = False
        elif a in ("--out", "--logdir", "--port"):
            skip = True
        elif not a.startswith(("--out=", "--logdir=", "--port=")):
            shown.append(a)
    cmdline = " ".join(["python experiments/soak.py"] + shown)
    rows, series = [], {}
    opts = args.opts.split(",")
    # --parallel: every optimizer's 2 ranks at once (less wall time on a shared machine, same per-step work)
    groups = [opts] if args.parallel else [[o] for o in opts]
    for group in groups:
        t0 = time.time()
        procs = {o: launch(o, args, args.port + opts.index(o)) for o in group}
        for opt, p in procs.items():
            rc = p.wait()
            if rc != 0:
                with open(os.path.join(args.logdir, f"{opt}.out")) as f:
                    print(f.read()[-4000:], file=sys.stderr)
            recs = collect(opt, args)
            series[opt] = recs
            got = summarise(opt, recs, rc, time.time() - t0, args)
            rows += got
            for x in got:
                print(json.dumps(x), flush=True)
        if args.out != "-":  # partial results survive an interrupted soak
            with open(args.out, "w") as f:
                f.write(report(rows, series, args, cmdline.strip()))
    print(report(rows, series, args, cmdline.strip()))
    if not rows or not all(x["pass"] for x in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
