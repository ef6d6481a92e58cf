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
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from teardown_launch import launch  # noqa: E402 - tests/ is not a package

# (optimizer, scenario, world, the exit code every rank should have; in ``kill`` the last rank kills itself
# and only the survivors count)
SCENARIOS = [
    ("co2-topk", "exit", 4, 0),
    ("co2", "exit", 4, 0),
    ("co2-topk", "destroy", 4, 0),
    # destroy_process_group() with the model and optimizer alive until shutdown (a module-level script); plain
    # DDP without commopt's optimizers is the reference for torch's own behaviour there
    ("co2", "destroy-global", 2, 0),
    ("co2-topk", "destroy-global", 2, 0),
    ("compressed", "destroy-global", 2, 0),
    ("ddp", "destroy-global", 2, 0),
    ("compressed", "kill", 2, 1),
    ("compressed", "raise", 2, 1),
]


def run_once(which: str, scenario: str, world: int) -> list[tuple[int, bool]]:
    """(exit code, printed 'terminate called') of every rank; ranks that hang are killed (rc -9)."""
    out, _, _ = launch(which, scenario, world, pg_timeout=10 if scenario == "kill" else 20)
    return [(rc, "terminate called" in text) for rc, text in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", action="append", default=[], help="OPTIMIZER:SCENARIO (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "teardown_repeat.md"))
    ap.add_argument("--grace", type=float, default=None,
                    help="COMMOPT_EXIT_GRACE_S for the ranks (default: commopt's own, 0.2 s; 0 turns it off)")
    args = ap.parse_args()
    if args.grace is not None:
        os.environ["COMMOPT_EXIT_GRACE_S"] = str(args.grace)
    flags = "".join(f" --only {o}" for o in args.only) + (f" --grace {args.grace:g}" if args.grace is not None else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Teardown scenarios repeated in fresh processes", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; "
             f"command: `python experiments/teardown_repeat.py --runs {args.runs}{flags}` (this file is its output)",
             f"- commopt's exit pause (COMMOPT_EXIT_GRACE_S): {os.environ.get('COMMOPT_EXIT_GRACE_S', '0.2 (default)')} s",
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
    lines += ["", "Expected: exit 0 on every rank for `exit` / `destroy` / `destroy-global` (`ddp`: plain DDP and "
              "SGD, no commopt optimizer; the worker starts it with commopt.init_distributed, so commopt's exit pause applies, "
              "and a script that never imports commopt has the `--grace 0` behaviour); exit 1 on the survivor for `kill` and on "
              "both ranks for `raise` (rank 0's backward raises the user's error, its peer's raises commopt's); "
              "-6 is SIGABRT at interpreter shutdown."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
