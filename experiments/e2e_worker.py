#!/usr/bin/env python
"""One rank of ``experiments/bench_e2e.py``: trains the benchmark GPT with one method and writes a JSON record.

Started once per rank with torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), by ``bench_e2e.py`` on local processes (quality runs) or on the emulated
cluster of ``experiments/netem`` (timing runs)::

    python experiments/e2e_worker.py --method commopt_topk1_econtrol --steps 240 --out run.json

Model and data: a GPT (``experiments/train_nanogpt.py``'s) at character level on the source
files of the Python standard library, every 10th file held out for validation. Batches are a
pure function of (seed, step, rank), the model's initialisation of the seed, so a run's losses
do not depend on the link it ran on (only its times do). The training loop is nanoGPT's:
AdamW with a decay / no-decay group, linear warm-up + cosine learning rate written into
``param_groups``, gradient clipping at 1.0.

``--eval-every N``: rank 0 evaluates the validation loss of its model every N steps (fixed
batches; not counted in the step times). Step time: wall time of forward + backward (with the
exchange it waits for) + clipping + optimizer step, measured on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_nanogpt import GPT, GPTConfig, build_dataset, get_batch  # noqa: E402

import commopt  # noqa: E402
from commopt.exchange import ring_allreduce_bytes  # noqa: E402

#: The benchmark's methods. ``kind`` picks the code path; the rest are its arguments.
METHODS: dict[str, dict[str, Any]] = {
    "floor": {"kind": "floor"},
    "ddp": {"kind": "ddp"},
    "ddp_bf16": {"kind": "ddp_bf16"},
    "powersgd_r4": {"kind": "powersgd", "rank": 4, "start_iter": 10},
    "localsgd": {"kind": "localsgd", "period": 12, "warmup": 2},
    "commopt_topk1_ef14": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef14"},
    "commopt_topk1_econtrol": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "econtrol"},
    "commopt_topk1_ef21sgdm": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef21sgdm"},
    "commopt_randk1_econtrol": {"kind": "compressed", "compressor": "randk:0.01", "feedback": "econtrol"},
    "commopt_randk5_econtrol": {"kind": "compressed", "compressor": "randk:0.05", "feedback": "econtrol"},
    "commopt_topk2_ef14": {"kind": "compressed", "compressor": "topk:0.02", "feedback": "ef14"},
    "commopt_topk2_econtrol": {"kind": "compressed", "compressor": "topk:0.02", "feedback": "econtrol"},
    "commopt_topk1_econtrol_dw": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "econtrol",
                                  "density_warmup": [0.1, 30]},
    "commopt_topk1_ef14_dw": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef14",
                              "density_warmup": [0.1, 30]},
    "commopt_topk2_econtrol_dw": {"kind": "compressed", "compressor": "topk:0.02", "feedback": "econtrol",
                                  "density_warmup": [0.1, 30]},
    "commopt_topk2_ef14_dw": {"kind": "compressed", "compressor": "topk:0.02", "feedback": "ef14",
                              "density_warmup": [0.1, 30]},
    "commopt_topk1_none": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "none"},
    "commopt_co2_t12": {"kind": "co2", "tau": 12},
    "commopt_co2_t12_topk10": {"kind": "co2", "tau": 12, "compressor": "topk:0.1", "feedback": "ef14"},
    # compress after the inner optimizer: every rank steps AdamW on its own gradient, the step's
    # displacement is compressed with error feedback and averaged (CO2 with tau = 1, no outer momentum)
    "commopt_co2_t1_topk1_ef14": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None, "penalty": None,
                                  "compressor": "topk:0.01", "feedback": "ef14"},
    "commopt_co2_t1_topk1_econtrol": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None,
                                      "penalty": None, "compressor": "topk:0.01", "feedback": "econtrol"},
    "commopt_co2_t1_topk05_ef14": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None, "penalty": None,
                                   "compressor": "topk:0.005", "feedback": "ef14"},
    "commopt_co2_t1_topk025_ef14": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None, "penalty": None,
                                    "compressor": "topk:0.0025", "feedback": "ef14"},
    "commopt_co2_t2_topk1_ef14": {"kind": "co2", "tau": 2, "outer_momentum": 0.0, "clip": None, "penalty": None,
                                  "compressor": "topk:0.01", "feedback": "ef14"},
    # CO2 with tau = 12 as asynchronous local SGD: no outer momentum, penalty or clipping
    "commopt_co2_t12_plain": {"kind": "co2", "tau": 12, "outer_momentum": 0.0, "clip": None, "penalty": None},
    "commopt_co2_t24_bf16": {"kind": "co2", "tau": 24, "buffer_dtype": "bfloat16"},
    "commopt_co2_t48": {"kind": "co2", "tau": 48},
    "commopt_mkor_topk1_ef14": {"kind": "mkor_compressed", "compressor": "topk:0.01", "feedback": "ef14"},
    "commopt_mkor_topk1_econtrol": {"kind": "mkor_compressed", "compressor": "topk:0.01", "feedback": "econtrol"},
    "commopt_mkor_ddp": {"kind": "mkor"},
}

MODEL_SIZES = {
    "6m": dict(n_layer=6, n_head=6, n_embd=288),
    "11m": dict(n_layer=6, n_head=6, n_embd=384),
    "20m": dict(n_layer=8, n_head=8, n_embd=448),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, help="a name in METHODS, or a JSON object of a method spec")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=0, help="0: no evaluation (timing runs)")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--model", choices=sorted(MODEL_SIZES), default="6m")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--lr-decay-iters", type=int, default=160)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="JSON record written by rank 0")
    p.add_argument("--link-iface", default=None,
                   help="record this interface's rx + tx byte counters and commopt's inter-node byte count "
                        "after every step (rank 0; e.g. eth0 of an experiments/netem node)")
    return p.parse_args(argv)


def method_spec(name: str) -> dict[str, Any]:
    if name.startswith("{"):
        return json.loads(name)
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return dict(METHODS[name])


def get_lr(it: int, a: argparse.Namespace) -> float:
    if it < a.warmup_iters:
        return a.lr * (it + 1) / a.warmup_iters
    if it >= a.lr_decay_iters:
        return a.min_lr
    ratio = (it - a.warmup_iters) / max(1, a.lr_decay_iters - a.warmup_iters)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


def _no_comm_hook(state, bucket):
    """The compute-only floor: the local gradient, averaged over nobody (no collective at all)."""
    fut = Future()
    fut.set_result(bucket.buffer())
    return fut


def _bf16_hook(state, bucket):
    """``default_hooks.bf16_compress_hook``'s math (bf16 copy all-reduced, divided by n, copied back);
    torch's own hook refuses to run without CUDA + NCCL."""
    buf = bucket.buffer()
    n = dist.get_world_size()
    low = buf.to(torch.bfloat16).div_(n)
    fut = dist.all_reduce(low, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


# DDP checks the hook's annotations (this module's are strings under `from __future__ import annotations`)
for _h in (_no_comm_hook, _bf16_hook):
    _h.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def powersgd_bytes_per_step(model: nn.Module, rank: int, n: int) -> float:
    """Bytes per rank of one PowerSGD step (SPEC §3 ring formula): P and Q of every compressed
    matrix, the uncompressed tensors (1-D, or where compression does not pay: PowerSGD's
    ``min_compression_rate`` = 2) dense."""
    total = 0.0
    for p in model.parameters():
        if p.dim() <= 1:
            total += ring_allreduce_bytes(p.numel(), 4, n)
            continue
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        r = min(rank, rows, cols)
        if (rows + cols) * r * 2 <= rows * cols:
            total += ring_allreduce_bytes((rows + cols) * r, 4, n)
        else:
            total += ring_allreduce_bytes(p.numel(), 4, n)
    return total


def build(spec: dict[str, Any], ddp: DDP, base: torch.optim.Optimizer, n: int):
    """(optimizer to step, bytes-per-step function or None when commopt counts them)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState, post_localSGD_hook)
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    kind = spec["kind"]
    d = sum(p.numel() for p in ddp.module.parameters())
    if kind == "floor":
        ddp.register_comm_hook(None, _no_comm_hook)
        return base, lambda step: 0.0
    if kind == "ddp":
        return base, lambda step: ring_allreduce_bytes(d, 4, n)
    if kind == "ddp_bf16":
        ddp.register_comm_hook(None, _bf16_hook)
        return base, lambda step: ring_allreduce_bytes(d, 2, n)
    if kind == "powersgd":
        st = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=spec["rank"],
                                         start_powerSGD_iter=spec["start_iter"], use_error_feedback=True,
                                         warm_start=True, random_seed=0)
        ddp.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
        compressed = powersgd_bytes_per_step(ddp.module, spec["rank"], n)
        return base, lambda step: ring_allreduce_bytes(d, 4, n) if step < spec["start_iter"] else compressed
    if kind == "localsgd":
        # after warm-up the hook all-reduces within `subgroup` only: one group per rank = no exchange
        alone, _ = dist.new_subgroups(group_size=1)
        st = PostLocalSGDState(process_group=None, subgroup=alone, start_localSGD_iter=spec["warmup"])
        ddp.register_comm_hook(st, post_localSGD_hook)
        opt = PostLocalSGDOptimizer(optim=base, averager=PeriodicModelAverager(
            period=spec["period"], warmup_steps=spec["warmup"], process_group=dist.group.WORLD))
        # warm-up steps all-reduce the gradients; then PeriodicModelAverager averages the parameters at its
        # steps warmup, warmup + period, ... ((step - warmup) % period == 0, its own counter = this step)
        return opt, lambda step: ring_allreduce_bytes(d, 4, n) if (
            step < spec["warmup"] or (step - spec["warmup"]) % spec["period"] == 0) else 0.0
    if kind == "compressed":
        extra = {k: spec[k] for k in ("warmup_steps", "node_size") if k in spec}
        if "density_warmup" in spec:
            extra["density_warmup"] = tuple(spec["density_warmup"])
        fb = spec["feedback"]
        if "eta" in spec:
            fb = commopt.EControl(eta=spec["eta"])
        return commopt.CompressedOptimizer(ddp, base, compressor=spec["compressor"], feedback=fb, **extra), None
    if kind == "co2":
        kw: dict[str, Any] = {}
        for k in ("compressor", "feedback", "outer_lr", "outer_momentum", "penalty", "variant", "clip"):
            if k in spec:
                kw[k] = spec[k]
        if "buffer_dtype" in spec:
            kw["buffer_dtype"] = getattr(torch, spec["buffer_dtype"])
        return commopt.CO2(ddp, base, tau=spec["tau"], **kw), None
    if kind == "mkor":
        return commopt.MKOR(ddp, base), lambda step: ring_allreduce_bytes(d, 4, n)
    if kind == "mkor_compressed":
        inner = commopt.MKOR(ddp, base)
        return commopt.CompressedOptimizer(ddp, inner, compressor=spec["compressor"],
                                           feedback=spec["feedback"]), None
    raise SystemExit(f"unknown kind {kind!r}")


def _iface_bytes(iface: str) -> int:
    """rx + tx bytes of a network interface of this process's namespace (Linux sysfs)."""
    return sum(int(open(f"/sys/class/net/{iface}/statistics/{w}_bytes").read()) for w in ("rx", "tx"))


def _inter_node_bytes(opt: Any) -> float:
    """commopt's inter-node byte count of this rank so far (bytes_inter_node; bytes_sent where absent)."""
    total = 0.0
    while opt is not None:
        if hasattr(opt, "comm_stats"):
            s = opt.comm_stats()
            total += float(s.get("bytes_inter_node", s.get("bytes_sent", 0.0)))
        opt = getattr(opt, "optimizer", None)
    return total


def commopt_bytes(opt: Any) -> tuple[float, dict]:
    """Total bytes this rank exchanged so far according to commopt's counters (and the stats)."""
    inner = opt
    total, stats = 0.0, {}
    while inner is not None:
        if hasattr(inner, "comm_stats"):
            s = inner.comm_stats()
            stats[type(inner).__name__] = s
            total += float(s.get("bytes_sent", 0.0))
        inner = getattr(inner, "optimizer", None)
    return total, stats


@torch.no_grad()
def val_loss(model: nn.Module, val: torch.Tensor, a: argparse.Namespace) -> float:
    model.eval()
    losses = []
    for k in range(a.eval_batches):
        x, y = get_batch(val, 16, a.block_size, a.seed, "eval", k)
        losses.append(float(model(x, y)[1]))
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(1)
    spec = method_spec(a.method)
    info = commopt.init_distributed(backend="gloo")
    rank, n = info.rank, info.world_size
    train, val, meta = build_dataset(2_000_000, 200_000, 400_000)
    torch.manual_seed(a.seed)
    cfg = GPTConfig(block_size=a.block_size, vocab_size=98, dropout=0.0, bias=True, **MODEL_SIZES[a.model])
    model = GPT(cfg)
    d = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, bucket_cap_mb=a.bucket_mb)
    base, _ = model.configure_optimizers(a.weight_decay, a.lr, (0.9, 0.95))
    opt, bytes_fn = build(spec, ddp, base, n)
    evals: list[tuple[int, float]] = []
    times: list[float] = []
    link: list[int] = []       # --link-iface: the interface's rx + tx bytes after each step
    counted: list[float] = []  # --link-iface: commopt's bytes_inter_node (or the formula's) after each step
    sent = 0.0
    if a.link_iface and rank == 0:
        link.append(_iface_bytes(a.link_iface))
        counted.append(0.0)
    if a.eval_every and rank == 0:
        evals.append((0, val_loss(model, val, a)))
    for it in range(a.steps):
        lr = get_lr(it, a)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train, a.batch_size, a.block_size, a.seed, "train", it, rank)
        t0 = time.perf_counter()
        _, loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if a.link_iface and rank == 0:
            link.append(_iface_bytes(a.link_iface))
            counted.append(_inter_node_bytes(opt) if bytes_fn is None else sent + bytes_fn(it))
        if bytes_fn is not None:
            sent += bytes_fn(it)
        if not math.isfinite(float(loss)):
            raise SystemExit(f"rank {rank}: loss {float(loss)} at step {it}")
        if a.eval_every and rank == 0 and ((it + 1) % a.eval_every == 0 or it + 1 == a.steps):
            evals.append((it + 1, val_loss(model, val, a)))
    if hasattr(opt, "finish"):
        opt.finish()
    if bytes_fn is None:
        sent, stats = commopt_bytes(opt)
    else:
        stats = {}
    dist.barrier()
    if rank == 0 and a.out:
        rec = {"method": a.method if not a.method.startswith("{") else spec.get("name", a.method), "spec": spec,
               "world_size": n, "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", n)),
               "params": d, "steps": a.steps, "model": a.model, "batch_size": a.batch_size,
               "block_size": a.block_size, "bucket_mb": a.bucket_mb, "lr": a.lr,
               "step_seconds": times, "bytes_total": sent, "bytes_per_step": sent / max(1, a.steps),
               "evals": evals, "comm_stats": stats, "data": meta, "link_counter": link, "counted_inter": counted,
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, a.out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
