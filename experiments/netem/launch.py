"""Run a command on an emulated cluster of M nodes × R ranks (network namespaces on a bridge, tc-shaped links).

    python -m experiments.netem --nodes 2 --ranks-per-node 2 --rate 1gbit --delay 5ms -- python train.py
    python -m experiments.netem --nodes 2 --mode torchrun -- train.py --steps 100
    python experiments/netem/launch.py --cleanup          # remove leftovers of a killed run

``--mode ranks`` (default) starts the command once per rank with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR (node 0's IP), MASTER_PORT set; ``{rank}``, ``{node}``,
``{local_rank}`` in the command are substituted. ``--mode torchrun`` starts one
``torchrun --nnodes M --nproc_per_node R --node_rank i --master_addr <node 0>`` per node, the
command being torchrun's script and arguments. Output lines are prefixed with ``[rN]`` /
``[nodeN]``. The job ends as a whole: when one process fails (nonzero exit) the others get
``--grace`` seconds to end by themselves, then are killed. Exit status: the first nonzero
return code, else 0. Needs root and iproute2; exits with status 2 and the reason otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

if __package__ in (None, ""):  # run as a file: make `experiments.netem` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from experiments.netem.cluster import Cluster, NetemUnavailable, cleanup_stale
else:
    from .cluster import Cluster, NetemUnavailable, cleanup_stale


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
        sys.stdout.flush()


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.netem", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", "-M", type=int, default=2)
    ap.add_argument("--ranks-per-node", "-R", type=int, default=1)
    ap.add_argument("--rate", default="1gbit", help="each link's rate each way (tc syntax); 'none' = unshaped")
    ap.add_argument("--delay", default="0ms", help="one-way delay added to what each node sends")
    ap.add_argument("--loss", type=float, default=0.0, help="random loss of each node's outgoing packets, %%")
    ap.add_argument("--mode", choices=("ranks", "torchrun"), default="ranks")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--subnet", default="10.231.0")
    ap.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds (exit 124)")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds the others may run on after one process failed, before they are killed")
    ap.add_argument("--torchrun-arg", action="append", default=[], help="extra torchrun argument (repeatable)")
    ap.add_argument("--cleanup", action="store_true", help="remove every leftover namespace/link of ours and exit")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.command and a.command[0] == "--":
        a.command = a.command[1:]
    if not a.cleanup and not a.command:
        ap.error("no command given (put it after --)")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.cleanup:
        try:
            removed = cleanup_stale(all_=True)
        except NetemUnavailable as e:
            print(f"netem: {e}", file=sys.stderr)
            return 2
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        return 0

    def on_signal(signum, frame):  # SIGTERM / SIGHUP: unwind through Cluster.__exit__
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell left SIGINT ignored
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        cluster = Cluster(a.nodes, a.ranks_per_node, None if a.rate.lower() == "none" else a.rate, a.delay, a.loss,
                          subnet=a.subnet, master_port=a.master_port)
        cluster.up()
    except NetemUnavailable as e:
        print(f"netem: cannot build the emulated cluster: {e}", file=sys.stderr)
        return 2
    rc = 0
    try:
        with cluster:
            print(f"netem: {a.nodes} node(s) x {a.ranks_per_node} rank(s), links {cluster.rate or 'unshaped'} "
                  f"delay {cluster.delay} loss {cluster.loss:g}%, master {cluster.master_addr}:{cluster.master_port}",
                  flush=True)
            # piped output, so each line can be prefixed
            procs = (cluster.start_torchrun(a.command, log_dir=subprocess.PIPE, torchrun_args=a.torchrun_arg)
                     if a.mode == "torchrun" else cluster.start_ranks(a.command, log_dir=subprocess.PIPE))
            pumps = []
            for p in procs:
                prefix = f"[r{p.rank}]" if p.rank is not None else f"[node{p.node}]"
                t = threading.Thread(target=_pump, args=(p.popen.stdout, prefix), daemon=True)
                t.start()
                pumps.append(t)
            t0 = time.time()
            failed_at = None
            while True:
                codes = [p.popen.poll() for p in procs]
                bad = [c for c in codes if c not in (None, 0)]
                if bad and failed_at is None:
                    failed_at = time.time()
                    rc = bad[0]
                if all(c is not None for c in codes):
                    break
                if failed_at is not None and time.time() - failed_at > a.grace:
                    print(f"netem: a process failed {a.grace:g} s ago; killing the rest", file=sys.stderr, flush=True)
                    break
                if a.timeout is not None and time.time() - t0 > a.timeout:
                    print(f"netem: timeout after {a.timeout:g} s; killing the job", file=sys.stderr, flush=True)
                    rc = rc or 124
                    break
                time.sleep(0.1)
            cluster.kill_all()
            for t in pumps:
                t.join(2.0)
            codes = [p.popen.poll() for p in procs]
            print("netem: exit codes " + " ".join(
                f"{'r%d' % p.rank if p.rank is not None else 'node%d' % p.node}={c}" for p, c in zip(procs, codes)),
                flush=True)
            if rc == 0:
                rc = next((c for c in codes if c not in (0, None)), 0)
    except KeyboardInterrupt:
        print("netem: interrupted; tearing down", file=sys.stderr, flush=True)
        rc = 130
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    raise SystemExit(main())
