"""Peak extra memory of CompressedOptimizer per feedback rule and commit mode, measured (CPU; CUDA if present).

Each setting runs in fresh processes (2 ranks, gloo on the CPU; NCCL on GPUs when ``--device cuda``)
training an MLP of 6 x Linear(2048, 2048) (25.2M float32 parameters, 100.7 MB) with DDP buckets of
25 MB. After warm-up, for 3 steps each rank records

* ``state``: memory held between steps beyond dense DDP's (the rule's feedback state),
* ``peak``: the high-water mark during forward + backward + step beyond dense DDP's high-water mark.

CPU: resident memory, with the high-water mark reset before each step (``/proc/self/clear_refs``) and
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set.
CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.

Target (issue 7): peak extra ≤ the rule's state + one bucket's transient buffers. The script prints the
rule's state (slots × model bytes) and one bucket's transient (the unscaled gradient copy, the vector to
compress and the rule's new slots for one bucket: (2 + slots) × bucket bytes).

    python experiments/memory_overhead.py            # writes experiments/results/memory_overhead.md
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH, DEPTH, BUCKET_MB = 2048, 6, 25
RULES = ["none", "ef14", "ef21", "ef21sgdm", "econtrol"]
SLOTS = {"none": 0, "ef14": 1, "ef21": 2, "ef21sgdm": 3, "econtrol": 3}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(rank: int, world: int, port: int, device: str, setting: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    import commopt
    from torch.nn.parallel import DistributedDataParallel as DDP
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH, bias=False), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers).to(dev)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB, device_ids=[rank] if device == "cuda" else None)
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    rule, commit = setting
    opt = inner if rule == "dense" else commopt.CompressedOptimizer(
        ddp, inner, compressor="topk:0.01", feedback=rule, commit=commit)
    x = torch.randn(8, WIDTH, device=dev)

    def step():
        opt.zero_grad(set_to_none=False)
        ddp(x).square().mean().backward()
        opt.step()

    def held() -> int:
        return torch.cuda.memory_allocated(dev) if device == "cuda" else _status("VmRSS")

    for _ in range(4):  # warm-up (2 dense rounds), bucket rebuild, first compressed steps
        step()
    samples = []
    for _ in range(3):
        dist.barrier()
        if device == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _reset_peak()
        before = held()
        step()
        if device == "cuda":
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
        else:
            peak = _status("VmHWM")
        samples.append((before, peak))
    buckets = [b.d for b in opt.hook_state.blocks().values()] if rule != "dense" else []
    if rank == 0:
        out.put({"setting": setting, "held": min(s[0] for s in samples), "peak": max(s[1] for s in samples),
                 "buckets": buckets})
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setting: tuple, device: str, world: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, device, setting, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(timeout=120)
        if p.exitcode != 0:
            raise RuntimeError(f"{setting}: a worker exited with {p.exitcode}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_overhead.md"))
    args = ap.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the spawned workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model_bytes = WIDTH * WIDTH * DEPTH * 4
    t0 = time.time()
    base = measure(("dense", None), args.device, args.world)
    rows = []
    for rule in RULES:
        for commit in ("step", "block"):
            if rule == "none" and commit == "block":
                continue
            r = measure((rule, commit), args.device, args.world)
            bucket = max(r["buckets"]) * 4
            state = r["held"] - base["held"]
            peak = r["peak"] - base["peak"]
            slots = SLOTS[rule]
            target = slots * model_bytes + (2 + slots) * bucket
            rows.append((rule, commit, slots, state, peak, target, bucket))
            print(f"{rule:9s} {commit:5s} state {state / 1e6:8.1f} MB  peak extra {peak / 1e6:8.1f} MB  "
                  f"target {target / 1e6:8.1f} MB", flush=True)
    lines = [
        f"# Peak extra memory per feedback rule ({args.device}, {args.world} ranks, rank 0)",
        "",
        f"`python experiments/memory_overhead.py --device {args.device}`; {DEPTH} x Linear({WIDTH}, {WIDTH}), "
        f"{WIDTH * WIDTH * DEPTH / 1e6:.1f}M fp32 parameters = {model_bytes / 1e6:.1f} MB, DDP buckets of "
        f"{BUCKET_MB} MB (largest compression block {rows[0][6] / 1e6:.1f} MB), TopK 1%. Dense DDP: "
        f"{base['held'] / 1e6:.0f} MB held between steps, {base['peak'] / 1e6:.0f} MB peak"
        + (" (resident set)." if args.device == "cpu" else " (allocated)."),
        "",
        "Extra over dense DDP. *state*: held between steps; *peak*: high-water mark during a step; *target*:",
        "the rule's state + one bucket's transient ((2 + slots) × bucket bytes).",
        "",
        "| feedback | commit | slots | state MB (× model) | peak extra MB (× model) | target MB | peak ≤ target |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, commit, slots, state, peak, target, _ in rows:
        lines.append(f"| {rule} | {commit} | {slots} | {state / 1e6:.1f} ({state / model_bytes:.2f}) | "
                     f"{peak / 1e6:.1f} ({peak / model_bytes:.2f}) | {target / 1e6:.1f} | "
                     f"{'yes' if peak <= target else 'no'} |")
    lines += ["", f"Wall time {time.time() - t0:.0f} s; torch {torch.__version__}."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
