#!/usr/bin/env python
"""Time to a target validation loss on emulated links: dense DDP, bf16, PowerSGD, local SGD and commopt.

Every method trains the same character-level GPT (``experiments/e2e_worker.py``: the Python
standard library's sources, AdamW, warm-up + cosine, clipping; fixed seeds) and is measured twice:

1. **quality** (``quality``): the whole run on local processes, the validation loss every
   ``--eval-every`` steps and the bytes each rank exchanged. A run's iterates do not depend on
   the link (batches and initialisation are functions of the seed; every exchange is
   deterministic; CO2 applies a round's average exactly one round later whatever the link), so
   the loss against steps is measured once per layout.
2. **timing** (``timing``): a short run on the emulated cluster of ``experiments/netem``
   (M network namespaces on a bridge, each node's link shaped with ``tc`` to ``--links``; ranks
   of a node share its loopback): the time per step on that link, the first ``--skip`` steps
   (warm-ups, one CO2 round) left out, averaged over whole CO2 rounds.

``report`` joins them: wall time to a step = steps × the link's mean time per step (evaluation
excluded); the target is dense DDP's validation loss at ``--target-step``. Writes
``experiments/results/time_to_loss.csv`` / ``.md`` / ``.png``; raw records under
``experiments/results/e2e/``. Needs root and iproute2 for ``timing``.

    sudo .venv/bin/python experiments/bench_e2e.py all                 # quality + timing + report
    .venv/bin/python experiments/bench_e2e.py quality --layouts 2x1 --methods ddp commopt_co2_t12
    sudo .venv/bin/python experiments/bench_e2e.py timing --links 1gbit --layouts 2x1
    .venv/bin/python experiments/bench_e2e.py report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
RAW = os.path.join(RESULTS, "e2e")
WORKER = os.path.join(HERE, "e2e_worker.py")
sys.path.insert(0, ROOT)

#: the methods of the issue, in table order (``e2e_worker.METHODS`` has their definitions and more)
DEFAULT_METHODS = [
    "floor", "ddp", "ddp_bf16", "powersgd_r4", "localsgd",
    "commopt_topk1_ef14", "commopt_topk1_econtrol", "commopt_randk1_econtrol",
    "commopt_co2_t12", "commopt_co2_t12_topk10", "commopt_mkor_topk1_ef14",
]
LAYOUTS = {"2x1": (2, 1), "4x1": (4, 1), "2x2": (2, 2)}


def layout(name: str) -> tuple[int, int]:
    if name not in LAYOUTS:
        raise SystemExit(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _worker_argv(method: str, a: argparse.Namespace, steps: int, eval_every: int, out: str) -> list[str]:
    return [sys.executable, WORKER, "--method", method, "--steps", str(steps), "--eval-every", str(eval_every),
            "--model", a.model, "--batch-size", str(a.batch_size), "--lr-decay-iters", str(a.steps),
            "--out", out]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- quality


def run_local(argv: list[str], world: int, local: int, port: int, log: str, timeout: float) -> int:
    """``world`` processes of ``argv`` on this machine (torchrun's variables), all or nothing."""
    procs = []
    with open(log, "w") as f:
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % local),
                       LOCAL_WORLD_SIZE=str(local), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       PYTHONUNBUFFERED="1")
            for k in [k for k in env if k.startswith(("SLURM_", "PMI_", "OMPI_"))]:
                del env[k]
            procs.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        codes: list[Optional[int]] = [None] * world
        while time.time() < deadline and any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
            if any(c not in (None, 0) for c in codes):
                time.sleep(5)
                break
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                p.kill()
        return max(abs(p.wait()) for p in procs)   # a killed rank (-9) counts as a failure


def quality(a: argparse.Namespace) -> None:
    for lay in a.layouts:
        nodes, rpn = layout(lay)
        os.makedirs(os.path.join(RAW, "quality", lay), exist_ok=True)
        for i, m in enumerate(a.methods):
            out = os.path.join(RAW, "quality", lay, f"{m}.json")
            if os.path.exists(out) and not a.force:
                _say(f"quality {lay} {m}: have it ({os.path.relpath(out, ROOT)})")
                continue
            _say(f"quality {lay} {m} ({i + 1}/{len(a.methods)}): {a.steps} steps on {nodes * rpn} local ranks")
            t = time.time()
            rc = run_local(_worker_argv(m, a, a.steps, a.eval_every, out), nodes * rpn, rpn, a.port + i % 50,
                           out + ".log", a.timeout)
            if rc != 0 or not os.path.exists(out):
                _say(f"quality {lay} {m}: FAILED (rc {rc}), see {out}.log")
                continue
            os.remove(out + ".log")
            rec = json.load(open(out))
            _say(f"quality {lay} {m}: final val {rec['evals'][-1][1]:.4f}, "
                 f"{rec['bytes_per_step'] / 1e6:.3f} MB/step, {time.time() - t:.0f} s")


# ----------------------------------------------------------------------------------------------- timing


def timing(a: argparse.Namespace) -> None:
    from experiments.netem import Cluster

    for lay in a.layouts:
        nodes, rpn = layout(lay)
        for link in a.links:
            d = os.path.join(RAW, "timing", f"{lay}_{link}")
            os.makedirs(d, exist_ok=True)
            todo = [m for m in a.methods if a.force or not os.path.exists(os.path.join(d, f"{m}.json"))]
            if not todo:
                _say(f"timing {lay} {link}: have all")
                continue
            with Cluster(nodes=nodes, ranks_per_node=rpn, rate=link) as c:
                for i, m in enumerate(todo):
                    out = os.path.join(d, f"{m}.json")
                    _say(f"timing {lay} {link} {m} ({i + 1}/{len(todo)}): {a.timing_steps} steps")
                    procs = c.start_ranks(_worker_argv(m, a, a.timing_steps, 0, out),
                                          env={"MASTER_PORT": str(a.port + i)},
                                          log_dir=None if a.verbose else subprocess.DEVNULL)
                    codes = c.wait(timeout=a.timeout, procs=procs)
                    if any(code is None for code in codes):
                        c.kill_all()
                    if any(codes) or not os.path.exists(out):
                        _say(f"timing {lay} {link} {m}: FAILED {codes}")
                        continue
                    rec = json.load(open(out))
                    ms = mean_ms(rec, a.skip)
                    _say(f"timing {lay} {link} {m}: {ms:.1f} ms/step (median "
                         f"{1e3 * statistics.median(rec['step_seconds'][a.skip:]):.1f})")


def validate(a: argparse.Namespace) -> None:
    """Check the method of the report on one method: its full run (with evaluations) on the emulated link
    must give bitwise the quality run's losses, and its measured training time must match
    steps × the timing run's mean step time."""
    from experiments.netem import Cluster

    for lay in a.layouts:
        nodes, rpn = layout(lay)
        for link in a.links:
            d = os.path.join(RAW, "validate", f"{lay}_{link}")
            os.makedirs(d, exist_ok=True)
            with Cluster(nodes=nodes, ranks_per_node=rpn, rate=link) as c:
                for i, m in enumerate(a.methods):
                    out = os.path.join(d, f"{m}.json")
                    _say(f"validate {lay} {link} {m}: {a.steps} steps with evaluations on the emulated link")
                    procs = c.start_ranks(_worker_argv(m, a, a.steps, a.eval_every, out),
                                          env={"MASTER_PORT": str(a.port + 60 + i)}, log_dir=subprocess.DEVNULL)
                    codes = c.wait(timeout=a.timeout, procs=procs)
                    if any(code is None for code in codes):
                        c.kill_all()
                    if any(codes) or not os.path.exists(out):
                        _say(f"validate {lay} {link} {m}: FAILED {codes}")


def quality_lines(a: argparse.Namespace) -> list[str]:
    """Every quality run of each layout (also methods without a timing run): bytes and loss at equal steps."""
    lines = []
    for lay in a.layouts:
        qdir = os.path.join(RAW, "quality", lay)
        ddp = _load(os.path.join(qdir, "ddp.json"))
        if ddp is None:
            continue
        recs = []
        for name in sorted(os.listdir(qdir)):
            if name.endswith(".json") and name != "floor.json":
                recs.append(_load(os.path.join(qdir, name)))
        base_b, base_l = ddp["bytes_per_step"], ddp["evals"][-1][1]
        lines += [f"## Quality at equal steps, {lay} ({ddp['world_size']} ranks, {ddp['steps']} steps)", "",
                  "| method | MB/step | bytes vs DDP | final val | vs DDP | what it is |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in sorted(recs, key=lambda r: r["evals"][-1][1]):
            spec = r.get("spec", {})
            what = ", ".join(f"{k}={v}" for k, v in spec.items())
            fewer = base_b / r["bytes_per_step"] if r["bytes_per_step"] else float("inf")
            lines.append(f"| {r['method']} | {r['bytes_per_step'] / 1e6:.3f} | {fewer:.1f}× fewer | "
                         f"{r['evals'][-1][1]:.4f} | {100 * (r['evals'][-1][1] / base_l - 1):+.1f}% | {what} |")
        lines.append("")
    return lines


def validation_lines(a: argparse.Namespace) -> list[str]:
    lines = []
    for lay in a.layouts:
        for link in a.links:
            d = os.path.join(RAW, "validate", f"{lay}_{link}")
            for m in a.methods:
                v = _load(os.path.join(d, f"{m}.json"))
                q = _load(os.path.join(RAW, "quality", lay, f"{m}.json"))
                t = _load(os.path.join(RAW, "timing", f"{lay}_{link}", f"{m}.json"))
                if not (v and q and t):
                    continue
                same = v["evals"] == q["evals"]
                measured = sum(v["step_seconds"])
                predicted = time_to(t, len(v["step_seconds"]), a.skip)
                lines.append(f"- {m}, {lay}, {link}: the full run on the emulated link gave "
                             f"{'bitwise the same' if same else 'DIFFERENT'} validation losses as the local run; "
                             f"its {v['steps']} steps took {measured:.1f} s of training, the report's wall-time "
                             f"model (the timing run, then its steady mean) gives {predicted:.1f} s "
                             f"({100 * (predicted / measured - 1):+.1f}%).")
    if lines:
        lines = ["## Check of the method (`bench_e2e.py validate`)", ""] + lines
    return lines


def mean_ms(rec: dict, skip: int) -> float:
    """Steady-state ms per step: the mean over the timing run's steps ``skip``.. (whole CO2 rounds)."""
    s = rec["step_seconds"][skip:]
    if not s:
        raise SystemExit(f"a timing run of {len(rec['step_seconds'])} steps has none after --skip {skip}")
    return 1e3 * sum(s) / len(s)


def time_to(rec: dict, steps: int, skip: int) -> float:
    """Seconds of training to reach ``steps``: the timing run's measured steps as they came (warm-ups,
    dense rounds, density warm-up included), then the steady mean for the steps beyond it."""
    s = rec["step_seconds"]
    return sum(s[:steps]) + max(0, steps - len(s)) * mean_ms(rec, skip) / 1e3


# ----------------------------------------------------------------------------------------------- report


def _load(path: str) -> Optional[dict]:
    return json.load(open(path)) if os.path.exists(path) else None


def steps_to(evals: list, target: float) -> Optional[int]:
    for step, loss in evals:
        if step > 0 and loss <= target:
            return int(step)
    return None


def collect(a: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for lay in a.layouts:
        nodes, rpn = layout(lay)
        qdir = os.path.join(RAW, "quality", lay)
        ddp = _load(os.path.join(qdir, "ddp.json"))
        if ddp is None:
            continue
        target = dict((s, l) for s, l in ddp["evals"]).get(a.target_step)
        if target is None:
            raise SystemExit(f"dense DDP's {lay} run has no evaluation at step {a.target_step}")
        for link in a.links:
            tdir = os.path.join(RAW, "timing", f"{lay}_{link}")
            floor = _load(os.path.join(tdir, "floor.json"))
            floor_ms = mean_ms(floor, a.skip) if floor else None
            for m in a.methods:
                q, t = _load(os.path.join(qdir, f"{m}.json")), _load(os.path.join(tdir, f"{m}.json"))
                if q is None and m == "floor" and t is not None:
                    q = {"bytes_per_step": 0.0, "evals": [], "params": t["params"], "steps": t["steps"]}
                if q is None:
                    continue
                ms = mean_ms(t, a.skip) if t else None
                med = 1e3 * statistics.median(t["step_seconds"][a.skip:]) if t else None
                st = None if m == "floor" else steps_to(q["evals"], target)
                rows.append({
                    "method": m, "link": link, "nodes": nodes, "ranks_per_node": rpn,
                    "ms_per_step": ms, "median_ms_per_step": med, "floor_ms_per_step": floor_ms,
                    "bytes_per_step": q["bytes_per_step"], "steps_to_target": st,
                    "seconds_to_target": time_to(t, st, a.skip) if (st is not None and t is not None) else None,
                    "wall": [time_to(t, s, a.skip) for s, _ in q["evals"]] if t is not None else None,
                    "final_val_loss": q["evals"][-1][1] if q["evals"] else None, "target": target, "evals": q["evals"],
                    "params": q["params"], "steps": q["steps"],
                })
    return rows


COLUMNS = ["method", "link", "nodes", "ranks_per_node", "ms_per_step", "floor_ms_per_step", "bytes_per_step",
           "steps_to_target", "seconds_to_target", "final_val_loss"]


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([
                r["method"], r["link"], r["nodes"], r["ranks_per_node"], _fmt(r["ms_per_step"]),
                _fmt(r["floor_ms_per_step"]), _fmt(r["bytes_per_step"], 0), _fmt(r["steps_to_target"]),
                _fmt(r["seconds_to_target"]), _fmt(r["final_val_loss"], 4)])


def verdict(sel: list[dict]) -> list[str]:
    """Who reaches the target first on one layout and link, and the issue's targets, from the numbers."""
    done = [r for r in sel if r["seconds_to_target"] is not None]
    if not done:
        return ["No method reached the target."]
    by = {r["method"]: r for r in sel}
    best = min(done, key=lambda r: r["seconds_to_target"])
    ours = [r for r in done if r["method"].startswith("commopt")]
    out = [f"First to the target: **{best['method']}** ({best['seconds_to_target']:.1f} s)."]
    if ours:
        b = min(ours, key=lambda r: r["seconds_to_target"])
        parts = [f"Best commopt: **{b['method']}**, {b['seconds_to_target']:.1f} s"]
        for ref in ("ddp", "powersgd_r4", "localsgd", "ddp_bf16"):
            r = by.get(ref)
            if r is None:
                continue
            if r["seconds_to_target"] is None:
                parts.append(f"{ref} never reached it")
            else:
                x = r["seconds_to_target"] / b["seconds_to_target"]
                parts.append(f"{x:.2f}× sooner than {ref}" if x >= 1 else f"{1 / x:.2f}× later than {ref}")
        if b["ms_per_step"] and b["floor_ms_per_step"]:
            parts.append(f"step time {b['ms_per_step'] / b['floor_ms_per_step']:.2f}× the compute-only floor")
        out.append("; ".join(parts) + ".")
    missed = [r["method"] for r in sel if r["seconds_to_target"] is None and r["method"] != "floor"]
    if missed:
        out.append(f"Did not reach the target within the run: {', '.join(missed)}.")
    return out


def write_md(rows: list[dict], a: argparse.Namespace, path: str, extra: str = "") -> None:
    lines = ["# Time to a target validation loss on emulated links (experiments/bench_e2e.py)", ""]
    if rows:
        r0 = rows[0]
        targets = ", ".join(sorted({"%d×%d: %.4f" % (r["nodes"], r["ranks_per_node"], r["target"]) for r in rows}))
        lines += [
            f"Model: character-level GPT, {r0['params'] / 1e6:.2f}M parameters (`--model {a.model}`), "
            f"{a.batch_size} sequences × 64 characters per rank and step, AdamW (lr 1e-3, warm-up 20, cosine to "
            f"1e-4 at step {a.steps}), clipping 1.0, {r0['steps']} steps; data: the Python standard library's "
            f"sources (every 10th file held out). CPU, gloo, one thread per rank, this 2-core machine.",
            "",
            f"Target: dense DDP's validation loss at step {a.target_step} "
            f"({targets}). "
            f"Losses are evaluated every {a.eval_every} steps, so steps to target are multiples of that.",
            "",
            "How the columns are measured: `final_val_loss`, `steps_to_target` and `bytes_per_step` (per rank, "
            "SPEC §3 formulas, averaged over the whole run including warm-up rounds) come from the full run on "
            "local processes, whose iterates do not depend on the link; `ms_per_step` is the steady mean time "
            f"per step of a separate {a.timing_steps}-step run on the emulated link (network namespaces, "
            f"`tc tbf` on each node's link), over its steps {a.skip}..{a.timing_steps}, evaluation excluded; "
            "`seconds_to_target` is that run's measured time for its first steps (dense warm-up rounds, "
            "PowerSGD's dense start, the density warm-up included) plus the steady mean for each step beyond "
            "it. Empty: the target was not reached in the run (or, for `floor`, which trains without "
            "exchanging anything, not applicable). The validation loss is rank 0's model as it stands at the "
            "evaluation: for CO2 and local SGD between averagings its local model, for CompressedUpdates "
            "(`co2_t1`) the replicated model minus its own step still in flight; MKOR's statistics all-reduce "
            "(Σ(d_in + d_out) values every 10 steps) is not counted in the bytes.",
            "",
        ]
    for lay in a.layouts:
        for link in a.links:
            sel = [r for r in rows if f"{r['nodes']}x{r['ranks_per_node']}" == lay and r["link"] == link]
            if not sel:
                continue
            ddp = next((r for r in sel if r["method"] == "ddp"), None)
            lines += [f"## {lay} ({sel[0]['nodes']} nodes × {sel[0]['ranks_per_node']} ranks), {link}", "",
                      "| method | ms/step | × floor | MB/step | steps to target | s to target | vs DDP | final val |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in sel:
                xf = (r["ms_per_step"] / r["floor_ms_per_step"]) if r["ms_per_step"] and r["floor_ms_per_step"] else None
                vs = (ddp["seconds_to_target"] / r["seconds_to_target"]) if (
                    ddp and ddp["seconds_to_target"] and r["seconds_to_target"]) else None
                lines.append(f"| {r['method']} | {_fmt(r['ms_per_step'])} | {_fmt(xf, 2)} | "
                             f"{_fmt(r['bytes_per_step'] / 1e6, 3)} | {_fmt(r['steps_to_target'])} | "
                             f"{_fmt(r['seconds_to_target'])} | {(_fmt(vs, 2) + '×') if vs else ''} | "
                             f"{_fmt(r['final_val_loss'], 4)} |")
            lines += ["", *verdict(sel), ""]
    if extra:
        lines += [extra, ""]
    lines.append(f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                 f"`python experiments/bench_e2e.py report` from the records in `experiments/results/e2e/`.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_png(rows: list[dict], a: argparse.Namespace, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib missing: no plot (pip install matplotlib)")
        return
    panels = [(lay, link) for lay in a.layouts for link in a.links
              if any(f"{r['nodes']}x{r['ranks_per_node']}" == lay and r["link"] == link for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for (lay, link), (ax_t, ax_b) in zip(panels, axes):
        sel = [r for r in rows if f"{r['nodes']}x{r['ranks_per_node']}" == lay and r["link"] == link
               and r["method"] != "floor"]
        for r in sel:
            steps = [s for s, _ in r["evals"]]
            loss = [v for _, v in r["evals"]]
            style = "-" if r["method"].startswith("commopt") else "--"
            if r["wall"]:
                ax_t.plot([max(0.1, w) for w in r["wall"]], loss, style, label=r["method"])
            ax_b.plot([max(1.0, s * r["bytes_per_step"] / 1e6) for s in steps], loss, style, label=r["method"])
        for ax in (ax_t, ax_b):
            ax.axhline(sel[0]["target"], color="grey", lw=0.8, ls=":")
            ax.set_ylabel("validation loss")
            ax.set_ylim(top=min(3.6, max(v for r in sel for _, v in r["evals"])))
            ax.grid(alpha=0.3)
        ax_t.set_xscale("log")
        ax_t.set_xlabel(f"wall time (s) at {link}, {lay}")
        ax_b.set_xscale("log")
        ax_b.set_xlabel(f"MB sent per rank, {lay}")
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(a: argparse.Namespace) -> list[dict]:
    rows = collect(a)
    write_csv(rows, os.path.join(RESULTS, "time_to_loss.csv"))
    write_md(rows, a, os.path.join(RESULTS, "time_to_loss.md"), extra="\n".join(quality_lines(a) + validation_lines(a)))
    write_png(rows, a, os.path.join(RESULTS, "time_to_loss.png"))
    for r in rows:
        print(f"{r['method']:<28} {r['nodes']}x{r['ranks_per_node']} {r['link']:>8} {_fmt(r['ms_per_step']):>8} ms  "
              f"{r['bytes_per_step'] / 1e6:8.3f} MB  to target: {_fmt(r['steps_to_target']):>4} steps "
              f"{_fmt(r['seconds_to_target']):>8} s  final {_fmt(r['final_val_loss'], 4)}")
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("phase", choices=["quality", "timing", "validate", "report", "all"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--layouts", nargs="+", default=["2x1", "2x2"])
    p.add_argument("--links", nargs="+", default=["1gbit", "100mbit"])
    p.add_argument("--model", default="6m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=160, help="steps of the quality runs (and the cosine's length)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target-step", type=int, default=100)
    p.add_argument("--timing-steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=16,
                   help="timing: steps left out of the steady mean (warm-ups, the first CO2 round); the window "
                        "should hold whole CO2 rounds with their waits (16..40: the ends of rounds 2 and 3)")
    p.add_argument("--port", type=int, default=29700)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--force", action="store_true", help="rerun what already has a record")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.phase in ("quality", "all"):
        quality(a)
    if a.phase in ("timing", "all"):
        timing(a)
    if a.phase == "validate":
        validate(a)
    if a.phase in ("report", "all"):
        report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
