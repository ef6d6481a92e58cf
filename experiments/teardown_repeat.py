"""How often a teardown scenario of tests/teardown_worker.py ends badly, over many fresh runs.

    python experiments/teardown_repeat.py [--runs 20] [--out experiments/results/teardown_repeat.md]

Each run starts the ranks as fresh processes on loopback (gloo), as tests/test_teardown.py does, and
records every rank's exit code and whether it printed ``terminate called`` (a SIGABRT at interpreter
shutdown). The single test run in CI can only catch an intermittent abort by luck; this counts it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "teardown_worker.py"

# (optimizer, scenario, world, the exit code every rank should have; in ``kill`` the last rank kills itself
# and only the survivors count)
SCENARIOS = [
    ("co2-topk", "exit", 4, 0),
    ("co2", "exit", 4, 0),
    ("co2-topk", "destroy", 4, 0),
    ("compressed", "kill", 2, 1),
    ("compressed", "raise", 2, 1),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_once(which: str, scenario: str, world: int, timeout: float = 150.0) -> list[tuple[int, bool]]:
    """(exit code, printed 'terminate called') of every rank; a rank that hangs counts as rc -9."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PG_TIMEOUT="10" if scenario == "kill" else "20",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), which, scenario], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
        out.append((p.returncode, "terminate called" in text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", action="append", default=[], help="OPTIMIZER:SCENARIO (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "teardown_repeat.md"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Teardown scenarios repeated in fresh processes", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; "
             f"command: `python experiments/teardown_repeat.py --runs {args.runs}` (this file is its output)",
             f"- machine: {os.cpu_count()} cores; ranks are processes on loopback, gloo; "
             "worker: `tests/teardown_worker.py`", "",
             "| optimizer | scenario | world | runs | runs with every rank as expected | exit codes seen "
             "(surviving ranks) | runs that printed `terminate called` | seconds per run |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for which, scenario, world, want in SCENARIOS:
        if args.only and f"{which}:{scenario}" not in args.only:
            continue
        codes: collections.Counter = collections.Counter()
        good = aborted = 0
        t0 = time.monotonic()
        for _ in range(args.runs):
            ranks = run_once(which, scenario, world)
            survivors = ranks[:-1] if scenario == "kill" else ranks
            codes.update(rc for rc, _ in survivors)
            aborted += any(t for _, t in survivors)
            good += all(rc == want and not t for rc, t in survivors)
        per_run = (time.monotonic() - t0) / args.runs
        seen = ", ".join(f"{rc}: {n}" for rc, n in sorted(codes.items()))
        lines.append(f"| {which} | {scenario} | {world} | {args.runs} | {good} | {seen} | {aborted} | "
                     f"{per_run:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", "Expected: exit 0 on every rank for `exit` / `destroy`; exit 1 on the survivor for `kill` and on "
              "both ranks for `raise` (rank 0's backward raises the user's error, its peer's raises commopt's); "
              "-6 is SIGABRT at interpreter shutdown."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
