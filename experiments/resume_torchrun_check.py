"""Kill a worker under ``torchrun --max-restarts``, let torchrun restart the group, compare with an uninterrupted run.

For each optimizer (CompressedOptimizer, CO2, MKOR; ``experiments/resume_torchrun.py``):

  A: ``torchrun --standalone --nproc_per_node 2 resume_torchrun.py --opt X`` (no failure);
  B: the same with ``--max-restarts 2 --kill-at K``: on the first attempt rank 1 SIGKILLs itself before
     step K; torchrun restarts both workers (TORCHELASTIC_RESTART_COUNT=1), which resume from the newest
     checkpoint every rank has and train to the end.

The final parameters of B must equal A's bitwise on every rank. Writes
``experiments/results/resume_torchrun.md``::

    .venv/bin/python experiments/resume_torchrun_check.py [--opts compressed,co2,mkor] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "resume_torchrun.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(args: list[str], restarts: int, log: Path) -> tuple[int, float, str]:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts),
           "--monitor-interval", "0.5", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    wall = time.perf_counter() - t0
    log.write_text(" ".join(cmd) + "\n\n" + proc.stdout)
    return proc.returncode, wall, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opts", default="compressed,co2,mkor")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kill-at", type=int, default=23)
    p.add_argument("--work", default=None, help="folder for checkpoints, outputs and logs (default: a temp dir)")
    p.add_argument("--md", default=str(ROOT / "experiments" / "results" / "resume_torchrun.md"))
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="resume_torchrun_"))
    rows, details = [], []
    for kind in args.opts.split(","):
        common = ["--opt", kind, "--steps", str(args.steps), "--save-every", str(args.save_every)]
        d = work / kind
        d.mkdir(parents=True, exist_ok=True)
        rc_a, wall_a, _ = torchrun(common + ["--ckpt-dir", str(d / "A_ck"), "--out", str(d / "A")], 0, d / "A.log")
        rc_b, wall_b, out_b = torchrun(common + ["--ckpt-dir", str(d / "B_ck"), "--out", str(d / "B"),
                                                 "--kill-at", str(args.kill_at), "--kill-rank", "1"], 2, d / "B.log")
        res = [json.loads((d / "B" / f"result_rank{r}.json").read_text()) if (d / "B" / f"result_rank{r}.json").exists()
               else {} for r in range(2)]
        equal, worst = [], 0.0
        for r in range(2):
            try:
                a = torch.load(d / "A" / f"final_rank{r}.pt")
                b = torch.load(d / "B" / f"final_rank{r}.pt")
            except FileNotFoundError:
                equal.append(None)
                continue
            ok = all(torch.equal(x, y) for key in a for x, y in zip(a[key], b[key]))
            worst = max([worst] + [float((x - y).abs().max()) for key in a for x, y in zip(a[key], b[key])])
            equal.append(ok)
        killed = len(re.findall(r"SIGKILL before step", out_b))
        attempts = sorted(set(int(m) for m in re.findall(rf"\] {kind} attempt (\d+):", out_b)))
        co2 = res[0].get("resumed_checkpoint_co2") if res and res[0] else None
        rows.append({
            "opt": kind, "rc_A": rc_a, "rc_B": rc_b, "kills": killed, "attempts": attempts,
            "restart_count": [x.get("restart_count") for x in res],
            "resumed_from": [x.get("resumed_from") for x in res],
            "newest_local": [x.get("newest_local_checkpoint") for x in res],
            "co2": co2, "equal": equal, "worst": worst, "wall_A": wall_a, "wall_B": wall_b,
        })
        details.append(f"### {kind}\n\n```\n" + "\n".join(
            ln for ln in out_b.splitlines() if re.search(r"attempt|SIGKILL|Restart|restart|exitcode|RESULT", ln)
            and "UserWarning" not in ln)[:6000] + "\n```\n")
        print(json.dumps(rows[-1]), flush=True)
    write_md(Path(args.md), rows, details, args, work)


def write_md(md: Path, rows: list[dict], details: list[str], args, work: Path) -> None:
    yes = lambda v: "yes" if v is True else ("no" if v is False else "missing")  # noqa: E731
    lines = [
        "# Kill and restart under `torchrun --max-restarts`",
        "",
        "Written by `experiments/resume_torchrun_check.py` (training script: `experiments/resume_torchrun.py`).",
        f"2 worker processes on one host over loopback (gloo, CPU; `torchrun --standalone --nproc_per_node 2`), "
        f"{args.steps} steps, per-rank checkpoints every {args.save_every} steps with `commopt.save_checkpoint` "
        "(atomic), resume with `commopt.latest_checkpoint` + `commopt.load_checkpoint`. Run A is uninterrupted; in "
        f"run B (`--max-restarts 2`) rank 1 SIGKILLs itself before step {args.kill_at} on the first attempt only "
        "(`TORCHELASTIC_RESTART_COUNT` = 0); torchrun restarts both workers, which resume from the newest step that "
        "every rank has a complete file for and train to the end. Model: 16-32-32-4 MLP with dropout, AdamW, cosine "
        "LR; checkpoints hold model, optimizer, LR scheduler, the sampler's generator and torch's RNG state. "
        "Not an emulated multi-node run (that is `experiments/netem/`'s job): loopback only.",
        "",
        "| optimizer | torchrun exit (A / B) | workers SIGKILLed | restart count seen by the workers | "
        "resumed from step (rank 0, rank 1) | newest own file at restart (rank 0, rank 1) | final params bitwise equal "
        "to A (rank 0, rank 1) | wall s (A / B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['opt']} | {r['rc_A']} / {r['rc_B']} | {r['kills']} | {', '.join(map(str, r['restart_count']))} | "
            f"{', '.join(map(str, r['resumed_from']))} | {', '.join(map(str, r['newest_local']))} | "
            f"{', '.join(yes(e) for e in r['equal'])} | {r['wall_A']:.0f} / {r['wall_B']:.0f} |")
    co2 = [r for r in rows if r["opt"] == "co2" and r["co2"]]
    if co2:
        c = co2[0]["co2"]
        lines += ["", f"CO2 (tau = 4): the checkpoint it resumed from was taken at position {c['position']} of the "
                      f"round, with the previous round's outer all-reduce {'not yet applied' if c['pending'] else 'applied'}"
                      f" (in flight: {c['in_flight']}); CO2's final parameters are compared before and after "
                      "`opt.finish()`."]
    lines += ["", "A rank whose newest own file is newer than the step it resumed from was a save ahead of the killed "
                  "rank (CO2's local steps do not wait on the peer until the round end); `latest_checkpoint` picks the "
                  "newest step common to all ranks.", "", "Under torchrun the script prefixes the process group's store keys per attempt (`TORCHELASTIC_RESTART_COUNT`): without it, every restart here failed in `init_process_group(\"gloo\")` with `Gloo connectFullMesh failed ... Connection refused` (the new workers read the dead attempt's peer addresses; torch 2.13, `--standalone`).", "", "## Worker output of run B (filtered)", ""] + details
    lines += ["", f"Logs of this run: `{work}` (not kept)."]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
