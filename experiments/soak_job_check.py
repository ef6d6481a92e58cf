"""Runs experiments/soak_job.py the ways real jobs fail and writes what it saw (2 ranks, gloo, CPU).

    python experiments/soak_job_check.py [--steps 6000] [--out experiments/results/soak_job.md]

1. **peer killed**: ranks started as separate processes, rank 1 SIGKILLs itself at step 200; the survivor
   must raise (rc 1, an error naming commopt's collective), not train on alone or hang;
2. **long run under load**: ``torchrun --nproc_per_node 2`` for ``--steps`` steps with two busy processes
   beside the ranks (a Python spin loop and a torch matmul loop); it must finish (rc 0, no SIGABRT at exit:
   the script is module-level and calls ``destroy_process_group()`` with its model alive) with rank 0's
   resident memory flat after warm-up (growth from step 1000 to the end within ``--bound-mb``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "experiments" / "soak_job.py"
BUSY = {
    "spin": "while True: pass",
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a = (a @ a).tanh()",
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_killed(timeout: float = 120) -> dict:
    port = _port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   KILL_AT="200", STEPS="20000", PG_TIMEOUT="30", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(JOB)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    rc0, text0 = out[0]
    err = next((ln for ln in reversed(text0.splitlines()) if "Error" in ln), "")
    checks = {"rank 1 was killed": out[1][0] == -9,
              "the survivor exited 1": rc0 == 1,
              "its error names commopt's collective": "commopt: the" in text0,
              "no SIGABRT": "terminate called" not in text0}
    return {"name": "peer killed at step 200", "checks": checks, "seconds": time.monotonic() - t0,
            "tail": [f"rank 0 rc {rc0}, rank 1 rc {out[1][0]}", err[:400]]}


def long_run_under_load(steps: int, bound_mb: float) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for code in BUSY.values()]
    try:
        t0 = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
                            "--master-port", str(_port()), str(JOB)], cwd=ROOT, env=dict(os.environ, STEPS=str(steps)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=580)
        seconds = time.monotonic() - t0
    finally:
        for b in busy:
            b.kill()
            b.wait()
    rss = {int(m.group(1)): float(m.group(2))
           for m in re.finditer(r"rank 0 step (\d+) rss ([\d.]+) MB", r.stdout)}
    done = re.findall(r"rank \d done (\d+) compressed rounds", r.stdout)
    after = [v for s, v in rss.items() if s >= 1000]
    growth = (after[-1] - after[0]) if len(after) >= 2 else float("nan")
    checks = {"finished, rc 0": r.returncode == 0 and len(done) == 2,
              "no SIGABRT at exit": "terminate called" not in r.stdout,
              f"RSS flat after step 1000 (within {bound_mb:g} MB)": abs(growth) <= bound_mb}
    lines = [f"rank 0 step {s} rss {v:.1f} MB" for s, v in sorted(rss.items())]
    return {"name": f"{steps} steps under torchrun beside two busy processes ({', '.join(BUSY)})", "checks": checks,
            "seconds": seconds,
            "tail": lines + [f"compressed rounds per rank: {', '.join(done)}; RSS growth from step 1000: "
                             f"{growth:+.1f} MB"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--bound-mb", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "soak_job.md"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = [peer_killed(), long_run_under_load(args.steps, args.bound_mb)]
    lines = ["# experiments/soak_job.py: a killed peer, a busy machine, a long run (2 ranks, gloo, CPU)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; command: "
             f"`python experiments/soak_job_check.py --steps {args.steps}` (this file is its output)",
             f"- machine: {os.cpu_count()} cores", ""]
    ok = True
    for res in results:
        passed = all(res["checks"].values())
        ok &= passed
        lines += [f"## {res['name']}: {'pass' if passed else 'FAIL'} ({res['seconds']:.0f} s)", ""]
        lines += [f"- {'ok' if v else 'FAILED'}: {k}" for k, v in res["checks"].items()]
        lines += ["", "```", *res["tail"], "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
