"""Time per step of dense DDP, PyTorch's PowerSGD hook and commopt's compressed hook over a slow link.

Two ranks run in two network namespaces joined by a veth pair whose both ends
are rate-limited with ``tc`` (token bucket), so every byte of the gradient
exchange crosses an emulated Ethernet link. Needs root and iproute2; the
namespaces are removed at the end (also on failure).

    sudo python experiments/compressed_slow_link.py --rate 1gbit --steps 30
    python experiments/compressed_slow_link.py --local   # no namespaces: loopback, for a quick look

Each setting trains the same MLP (``--width``, default 2048: ~4.7M parameters) on
synthetic data for ``--steps`` steps after warm-up and reports the median time
per step, the final loss and the bytes each rank received per step
(commopt's own counter; for dense DDP and PowerSGD the ring formula).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

NS = ("commopt_ns0", "commopt_ns1")
VETH = ("commopt_v0", "commopt_v1")
ADDR = ("10.231.77.1", "10.231.77.2")

SETTINGS = [
    ("dense DDP (all-reduce)", None, None),
    ("PowerSGD rank 4 (torch hook)", "powersgd", None),
    ("commopt TopK 1% + EControl", "topk:0.01", "econtrol"),
    ("commopt TopK 0.1% + EControl", "topk:0.001", "econtrol"),
    ("commopt RandK 1% + EF21-SGDM", "randk:0.01", "ef21sgdm"),
]


def sh(cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def setup(rate: str, delay: str) -> None:
    teardown()
    for ns in NS:
        sh(f"ip netns add {ns}")
    sh(f"ip link add {VETH[0]} type veth peer name {VETH[1]}")
    for ns, veth, addr in zip(NS, VETH, ADDR):
        sh(f"ip link set {veth} netns {ns}")
        sh(f"ip netns exec {ns} ip addr add {addr}/24 dev {veth}")
        sh(f"ip netns exec {ns} ip link set {veth} up")
        sh(f"ip netns exec {ns} ip link set lo up")
        netem = f" delay {delay}" if delay else ""
        if netem:
            sh(f"ip netns exec {ns} tc qdisc add dev {veth} root handle 1: netem{netem}")
            sh(f"ip netns exec {ns} tc qdisc add dev {veth} parent 1: handle 2: tbf rate {rate} burst 256kb latency 400ms")
        else:
            sh(f"ip netns exec {ns} tc qdisc add dev {veth} root tbf rate {rate} burst 256kb latency 400ms")


def teardown() -> None:
    for ns in NS:
        sh(f"ip netns del {ns}", check=False)
    sh(f"ip link del {VETH[0]}", check=False)


def worker(rank: int, world: int, addr: str, port: int, steps: int, width: int, ifname: str | None) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commopt

    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(100 + rank)
    xs = torch.randn(steps + 8, 32, 256, generator=gen)
    teacher = torch.nn.Linear(256, 10)
    torch.manual_seed(0)
    teacher.weight.data.normal_()
    ys = teacher(xs).argmax(-1).detach()
    rows = []
    for name, comp, fb in SETTINGS:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                    torch.nn.ReLU(), torch.nn.Linear(width, 10))
        d = sum(p.numel() for p in model.parameters())
        ddp = DDP(model, bucket_cap_mb=100)  # one bucket: the same layout for every setting
        inner = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        opt = inner
        if comp == "powersgd":
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, psgd.powerSGD_hook)
        elif comp is not None:
            opt = commopt.CompressedOptimizer(ddp, inner, compressor=comp, feedback=fb)
        times, losses = [], []
        for t in range(steps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(ddp(xs[t]), ys[t])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        ms = statistics.median(times[3:]) * 1e3
        if comp is None:
            per_step = 2 * (world - 1) / world * 4 * d
        elif comp == "powersgd":
            shapes = [p.shape for p in model.parameters()]
            vals = sum(4 * (s[0] + s[1]) if len(s) == 2 else s.numel() for s in shapes)
            per_step = 2 * (world - 1) / world * 4 * vals
        else:
            st = opt.comm_stats()
            per_step = (st["bytes_sent"] - 2 * 2 * (world - 1) / world * 4 * d) / (st["steps"] - 2)
        rows.append((name, ms, sum(losses[-5:]) / 5, per_step / 1e6))
        dist.barrier()
    if rank == 0:
        base = rows[0][1]
        print(f"model: {d / 1e6:.2f}M parameters, {world} ranks, median of {steps} steps")
        print(f"{'setting':32s} {'ms/step':>9s} {'speed-up':>9s} {'MB/step':>9s} {'loss':>8s}")
        for name, ms, loss, mb in rows:
            print(f"{name:32s} {ms:9.1f} {base / ms:8.2f}x {mb:9.3f} {loss:8.4f}")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit", help="tc rate of each direction (default 1gbit)")
    ap.add_argument("--delay", default="", help="extra one-way latency, e.g. 1ms (netem)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=2048, help="hidden width (2048: ~4.7M parameters)")
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--local", action="store_true", help="no namespaces: both ranks on loopback")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--addr", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ifname", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, 2, args.addr, args.port, args.steps, args.width, args.ifname)
        return 0
    me = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps), "--width", str(args.width),
          "--port", str(args.port)]
    if args.local:
        print("link: loopback (no rate limit)")
        procs = [subprocess.Popen(me + ["--worker", str(r), "--addr", "127.0.0.1"]) for r in range(2)]
        return max(p.wait() for p in procs)
    print(f"link: veth between two network namespaces, tc tbf rate {args.rate} each way"
          + (f", netem delay {args.delay}" if args.delay else ""))
    try:
        setup(args.rate, args.delay)
        procs = [subprocess.Popen(["ip", "netns", "exec", NS[r]] + me + ["--worker", str(r), "--addr", ADDR[0],
                                                                         "--ifname", VETH[r]]) for r in range(2)]
        return max(p.wait() for p in procs)
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
