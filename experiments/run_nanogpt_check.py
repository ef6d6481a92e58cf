#!/usr/bin/env python
"""Checkpoint/resume check of ``experiments/train_nanogpt.py`` for ddp, compressed, co2 and mkor on 2 ranks.

For every optimizer:

1. *full*: train ``N`` iterations from scratch with a checkpoint at ``N/2`` (and at ``N``);
2. *resumed*, per checkpoint mode (``--modes``): a fresh ``torchrun`` loads the ``N/2`` checkpoint
   on every rank (``--resume``) and trains to ``N``. ``master``: rank 0's single file on every rank
   (nanoGPT); ``per-rank``: each rank its own file. With both modes the full run writes both kinds
   (``--ckpt-mode both``);

then compares the final train/val losses (and whether the replicas agree at the end), and writes
``experiments/results/nanogpt_check.md`` with a table and, for failed runs, the traceback.

    .venv/bin/python experiments/run_nanogpt_check.py --modes master per-rank
    .venv/bin/python experiments/run_nanogpt_check.py --opts compressed mkor --iters 4 --extra --dtype fp16

Runs use ``.venv/bin/torchrun --nproc_per_node 2 --master_port <free port>``, ``OMP_NUM_THREADS=1``
and a timeout each. Outputs (logs, checkpoints, result.json) go to ``--work-dir``
(default ``results/nanogpt_check``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "train_nanogpt.py"
OPTS = ("ddp", "compressed", "co2", "mkor")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun() -> str:
    cand = ROOT / ".venv" / "bin" / "torchrun"
    return str(cand) if cand.exists() else str(Path(sys.executable).with_name("torchrun"))


def launch(opt: str, out_dir: Path, train_args: list[str], timeout: float, nproc: int) -> dict:
    """One torchrun; returns rc, wall time, the log path and the parsed result.json (if any)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [torchrun(), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(SCRIPT),
           "--opt", opt, "--out-dir", str(out_dir), *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = out_dir / "log.txt"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        # a new session, so that a timeout can end torchrun together with its workers
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    res_path = out_dir / "result.json"
    result = json.loads(res_path.read_text()) if res_path.exists() and rc == 0 else None
    return {"cmd": shlex.join(cmd), "rc": rc, "wall_s": wall, "log": str(log), "result": result}


def error_excerpt(log_path: str, max_lines: int = 60) -> str:
    """The first rank's traceback (lines prefixed ``[rank N]`` by the training script), else the log's tail."""
    lines = Path(log_path).read_text(errors="replace").splitlines()
    tagged = [ln for ln in lines if re.match(r"\[rank \d+\]", ln)]
    if tagged:
        first = tagged[0].split("]")[0] + "]"
        mine = [ln for ln in tagged if ln.startswith(first)]
        others = sorted({ln.split("]")[0] + "]" for ln in tagged} - {first})
        text = "\n".join(mine[-max_lines:])
        if others:
            last = {o: [ln for ln in tagged if ln.startswith(o)][-1] for o in others}
            text += "\n" + "\n".join(f"(also {o}: {v[len(o):].strip()})" for o, v in last.items())
        return text
    warn = [ln for ln in lines if "Warning" in ln or "warning" in ln]
    return "\n".join((warn[:5] + ["..."] if warn else []) + lines[-max_lines:])


def warnings_in(log_path: str) -> list[str]:
    lines = Path(log_path).read_text(errors="replace").splitlines()
    return sorted({ln.strip() for ln in lines if re.search(r"(Warning|warning:)", ln)})[:8]


def fmt(x, nd: int = 4) -> str:
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opts", nargs="+", choices=OPTS, default=list(OPTS))
    p.add_argument("--modes", nargs="+", choices=("master", "per-rank"), default=["master"],
                   help="checkpoint modes: master (rank 0 writes, every rank loads it; nanoGPT) and/or per-rank")
    p.add_argument("--iters", type=int, default=20, help="N (even); the checkpoint is taken at N/2")
    p.add_argument("--tau", type=int, default=5,
                   help="CO2's local steps per round (2 rounds per half of the default 20 iterations)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="default: N/2 (CO2 calls finish() at every evaluation, so keep it a multiple of tau)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout", type=float, default=115.0, help="seconds per torchrun")
    p.add_argument("--work-dir", default=str(ROOT / "results" / "nanogpt_check"))
    p.add_argument("--summary", default=str(ROOT / "experiments" / "results" / "nanogpt_check.md"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train_nanogpt.py arguments (last)")
    a = p.parse_args()
    if a.iters % 2:
        p.error("--iters must be even")
    half = a.iters // 2
    ev = a.eval_every or half
    if half % ev:
        p.error(f"the checkpoint iteration {half} must be a multiple of --eval-every {ev}")
    common = ["--max-iters", str(a.iters), "--eval-every", str(ev), "--tau", str(a.tau), *a.extra]
    work = Path(a.work_dir)
    # one full run per optimizer writes both kinds of checkpoint (rank 0's single file, every rank's own)
    save_mode = "both" if len(a.modes) > 1 else a.modes[0]

    def show(name: str, run: dict | None) -> None:
        if run is None:
            return
        print(f"   {name}: rc {run['rc']}, {run['wall_s']:.0f} s, log {run['log']}", flush=True)
        if run["result"]:
            r = run["result"]
            print(f"   {name}: final train {fmt(r['final_train_loss'])}, val {fmt(r['final_val_loss'])}, "
                  f"replicas agree {r['replicas_agree']}", flush=True)

    rows = []  # (opt, mode, full, resumed)
    for opt in a.opts:
        d = work / opt
        print(f"== {opt}: full run, {a.iters} iters, checkpoint at {half} ({save_mode})", flush=True)
        full = launch(opt, d / "full", [*common, "--save-every", str(half), "--ckpt-mode", save_mode],
                      a.timeout, a.nproc)
        show("full", full)
        for mode in a.modes:
            name = f"ckpt_{half:06d}.pt" if mode == "master" else f"ckpt_{half:06d}.rank{{rank}}.pt"
            ckpt = d / "full" / name
            resumed = None
            if (d / "full" / name.replace("{rank}", "0")).exists():
                print(f"== {opt}: resume ({mode}) from {ckpt} to {a.iters}", flush=True)
                resumed = launch(opt, d / f"resumed-{mode}",
                                 [*common, "--resume", str(ckpt), "--ckpt-mode", mode], a.timeout, a.nproc)
                show(f"resumed ({mode})", resumed)
            else:
                print(f"   no checkpoint {ckpt}: resume skipped", flush=True)
            rows.append((opt, mode, full, resumed))

    out = [f"# nanoGPT checkpoint/resume check ({a.nproc} ranks, gloo, CPU)", "",
           f"`{' '.join(['.venv/bin/python', 'experiments/run_nanogpt_check.py', *sys.argv[1:]])}`: "
           f"each optimizer trains {a.iters} iterations of `experiments/train_nanogpt.py` from scratch "
           f"(checkpoint at iteration {half}), then a fresh `torchrun` loads the iteration-{half} checkpoint "
           f"on every rank and trains to {a.iters}. Checkpoint modes: *master* = rank 0's single file, "
           f"loaded by every rank (nanoGPT's pattern); *per-rank* = every rank saves and loads its own file. "
           f"Losses: mean over the ranks of the same fixed evaluation batches at iteration {a.iters}; an exact "
           f"resume gives Δ = 0. Common arguments: `{' '.join(common)}`.", "",
           "| opt | ckpt | full: rc | full: train / val | resumed: rc | resumed: train / val "
           "| Δval (resumed − full) | replicas agree (full / resumed) | s (full / resumed) |",
           "|---|---|---|---|---|---|---|---|---|"]
    details, seen_full = [], set()
    for opt, mode, full, res in rows:
        fr, rr = full["result"], (res or {}).get("result")
        dval = (rr["final_val_loss"] - fr["final_val_loss"]) if fr and rr else None
        out.append("| " + " | ".join([
            opt, mode, str(full["rc"]),
            f"{fmt(fr and fr['final_train_loss'])} / {fmt(fr and fr['final_val_loss'])}",
            str(res["rc"]) if res else "not run",
            f"{fmt(rr and rr['final_train_loss'])} / {fmt(rr and rr['final_val_loss'])}",
            f"{dval:+.6f}" if dval is not None else "—",
            f"{fmt(fr and fr['replicas_agree'])} / {fmt(rr and rr['replicas_agree'])}",
            f"{full['wall_s']:.0f} / {res['wall_s']:.0f}" if res else f"{full['wall_s']:.0f} / —",
        ]) + " |")
        runs = [(f"resumed ({mode})", res)]
        if opt not in seen_full:
            seen_full.add(opt)
            runs.insert(0, ("full", full))
        for name, run in runs:
            if run is None:
                continue
            if run["rc"] != 0:
                details += [f"### {opt}, {name} run: rc {run['rc']}", "", f"`{run['cmd']}`", "", "```",
                            error_excerpt(run["log"]), "```", ""]
            elif run["result"]:
                r = run["result"]
                hist = ", ".join(f"{h['iter']}: {h['train']:.4f}/{h['val']:.4f}" for h in r["history"])
                details += [f"### {opt}, {name} run", "", f"iter: train/val loss: {hist}", "",
                            f"comm_stats (rank 0): `{r['comm_stats']}`", ""]
                if r.get("scaler_scale") is not None:
                    details += [f"GradScaler at the end: scale {r['scaler_scale']:g}, "
                                f"{r.get('skipped_steps')} step(s) skipped in this run", ""]
            w = warnings_in(run["log"])
            if w:
                details += ["warnings (deduplicated):", "", "```", *w, "```", ""]
    out += ["", "## Runs", "", *details]
    Path(a.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(a.summary).write_text("\n".join(out) + "\n")
    print(f"wrote {a.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
