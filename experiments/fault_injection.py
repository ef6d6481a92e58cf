"""Fault injection on an emulated 2-node cluster: killed rank, partitioned node, slow link, for
CompressedOptimizer, CO2 and MKOR (2 ranks, gloo, CPU). Writes ``experiments/results/faults.md``.

    sudo .venv/bin/python experiments/fault_injection.py                  # everything (~15 min on 2 cores)
    sudo .venv/bin/python experiments/fault_injection.py --only kill-torchrun --opts co2 --no-write

Each rank runs ``experiments/fault_worker.py`` (see there for what is killed when). Scenarios:

* ``kill-torchrun``: 2 nodes (``experiments.netem`` namespaces, 1 Gbit/s links), one
  ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank i`` per node (static rendezvous at node 0);
  rank 1 SIGKILLs itself mid-step.
* ``kill-mpiexec``: ``mpiexec -n 2`` on this machine (no namespaces); rank 1 SIGKILLs itself.
* ``partition``: 2 nodes, one process per rank; once rank 0 is past step 30, node 1's bridge port
  stops forwarding (every packet to and from it silently dropped).
* ``slow``: 2 nodes, one process per rank, 150 steps; node 1's link at 1 Gbit/s (baseline), then
  50 and 10 Mbit/s; mean step time after the first 20 steps. This kernel has no sch_netem, so an
  added *delay* cannot be emulated (the script records the error ``Cluster.slow`` raises); a slower
  link stands in for the slow node.

A fault passes when every survivor raised an error and the whole job ended with a nonzero status
within the process group's timeout plus a margin, without ``terminate called ...``. Re-run after a
fix to confirm it; the exit status is 1 when any scenario failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments.netem import Cluster, NetemUnavailable, check_support  # noqa: E402

WORKER = os.path.join(ROOT, "experiments", "fault_worker.py")
PY = sys.executable
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
OPTS = ("compressed", "co2", "mkor")
LABEL = {"compressed": "CompressedOptimizer (TopK 5 % + EControl, AdamW)", "co2": "CO2 (tau 4, SGD)",
         "mkor": "MKOR (SGD)"}
PG_TIMEOUT = 20.0
MARGIN = 25.0
KILL_AT = 30
COLLECTIVE_RE = re.compile(r"all_?reduce|all_?gather|broadcast|reduce_scatter|barrier|all_?to_?all", re.I)
OP_RE = re.compile(r"\b(recv|send|read|write|connect)\b", re.I)


def base_env(opt: str, **extra) -> dict[str, str]:
    env = {"OPT": opt, "PG_TIMEOUT": str(int(PG_TIMEOUT)), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def parse(text: str) -> dict:
    """What the worker lines (and launchers) said."""
    out = {"errors": {}, "detail": {}, "steps": {}, "kill": None, "results": {}}
    for m in re.finditer(r"^.*?FAULT_ERROR rank (\d+) t=([\d.]+) (.*)$", text, re.M):
        out["errors"].setdefault(int(m.group(1)), (float(m.group(2)), m.group(3).strip()))
    for m in re.finditer(r"^.*?FAULT_DETAIL rank (\d+) (.*)$", text, re.M):
        out["detail"].setdefault(int(m.group(1)), m.group(2))
    for m in re.finditer(r"^.*?rank (\d+) step (\d+) t=([\d.]+)", text, re.M):
        out["steps"].setdefault(int(m.group(1)), []).append((int(m.group(2)), float(m.group(3))))
    m = re.search(r"KILLING rank (\d+) step (\d+) t=([\d.]+)", text)
    if m:
        out["kill"] = (int(m.group(1)), int(m.group(2)), float(m.group(3)))
    for m in re.finditer(r"RESULT rank (\d+) steps (\d+) mean_step_ms ([\d.]+) median_step_ms ([\d.]+)", text):
        out["results"][int(m.group(1))] = (float(m.group(3)), float(m.group(4)))
    out["terminate"] = "terminate called" in text
    out["core"] = bool(re.search(r"core dumped|SIGABRT|Aborted", text))
    return out


def watch(procs: dict[str, subprocess.Popen], logs: list[str], trigger, deadline_after_fault: float,
          startup_limit: float = 180.0):
    """Poll until every process ended. ``trigger(text)`` returns the fault's wall time once it happened
    (it may inject the fault itself). Returns (t_fault, {name: (rc, t_exit)}, hung names)."""
    t0, t_fault, ended, hung = time.time(), None, {}, []
    while True:
        now = time.time()
        for name, p in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = (p.returncode, now)
        if len(ended) == len(procs):
            break
        if t_fault is None:
            t_fault = trigger("".join(read(x) for x in logs))
            if t_fault is None and now - t0 > startup_limit:
                hung = [n for n in procs if n not in ended]
                print(f"  no fault within {startup_limit:.0f} s of the start; giving up", flush=True)
                break
        elif now - t_fault > deadline_after_fault:
            hung = [n for n in procs if n not in ended]
            break
        time.sleep(0.05)
    return t_fault, ended, hung


def kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if p.poll() is not None:
            break
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            pass


def first_error_line(text: str) -> str:
    m = re.search(r"^.*(terminate called.*)$", text, re.M)
    if m:
        return m.group(1).strip()
    m = re.search(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception)\b.*)$", text, re.M)
    return m.group(1).strip() if m else ""


def short(s: str, n: int = 230) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def judge(row: dict, text: str, info: dict, survivors: list[int], job_ok: bool) -> None:
    problems = []
    if row["hung"]:
        problems.append(f"hung: {', '.join(row['hung'])} still running {row['deadline']:.0f} s after the fault "
                        f"(killed by this script)")
    if info["terminate"]:
        problems.append("`terminate called ...` (abort) in the output")
    for r in survivors:
        if r not in info["errors"]:
            problems.append(f"rank {r} raised no error")
        steps_after = [s for s, t in info["steps"].get(r, []) if row["t_fault"] and t > row["t_fault"] + 1.0]
        if len(steps_after) >= 3:
            problems.append(f"rank {r} trained on after the fault (steps up to {max(steps_after)})")
    if not job_ok:
        problems.append("the job did not end with a nonzero status")
    row["problems"] = problems
    row["verdict"] = "ok" if not problems else "FAIL: " + "; ".join(problems)


def scenario_kill_torchrun(opt: str, tmp: str, port: int) -> dict:
    logs = [os.path.join(tmp, f"node{i}.log") for i in range(2)]
    with Cluster(2, 1, "1gbit", master_port=port) as c:
        argv0 = c.torchrun_argv(0, [WORKER])
        procs = c.start_torchrun([WORKER], env=base_env(opt, KILL_AT=KILL_AT), log_dir=tmp)
        named = {f"torchrun node{p.node}": p.popen for p in procs}

        def trigger(text):
            k = parse(text)["kill"]
            return k[2] if k else None

        t_fault, ended, hung = watch(named, logs, trigger, PG_TIMEOUT + MARGIN)
        for p in procs:
            kill_group(p.popen)
    text = "\n".join(read(x) for x in logs)
    info = parse(text)
    row = dict(opt=opt, fault="rank 1 SIGKILLed", launcher="torchrun x2 nodes",
               command=f"ip netns exec {c.netns[0]} {' '.join(argv0)} (same on node1 with --node_rank 1)",
               t_fault=t_fault, ended=ended, hung=hung, deadline=PG_TIMEOUT + MARGIN, info=info)
    survivor = "torchrun node0"
    row["survivor_rc"] = ended.get(survivor, (None,))[0]
    row["t_exit"] = ended[survivor][1] - t_fault if survivor in ended and t_fault else None
    row["t_job_end"] = (max(t for _, t in ended.values()) - t_fault) if t_fault and not hung else None
    row["t_error"] = info["errors"][0][0] - t_fault if 0 in info["errors"] and t_fault else None
    row["error"] = info["errors"].get(0, (0, first_error_line(read(logs[0]))))[1]
    row["detail"] = info["detail"].get(0, "")
    worker_rc = re.findall(r"exitcode\s*:\s*(-?\d+)", read(logs[0]))
    row["worker_rc"] = int(worker_rc[0]) if worker_rc else None
    job_ok = not hung and all(rc != 0 for rc, _ in ended.values())
    judge(row, text, info, [0], job_ok)
    return row


def scenario_kill_mpiexec(opt: str, tmp: str, port: int) -> dict:
    log = os.path.join(tmp, "mpiexec.log")
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(base_env(opt, KILL_AT=KILL_AT))
    argv = [MPIEXEC, "-n", "2", PY, WORKER]
    with open(log, "w") as f:
        p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

        def trigger(text):
            k = parse(text)["kill"]
            return k[2] if k else None

        try:
            t_fault, ended, hung = watch({"mpiexec": p}, [log], trigger, PG_TIMEOUT + MARGIN)
        finally:
            kill_group(p)
    text = read(log)
    info = parse(text)
    row = dict(opt=opt, fault="rank 1 SIGKILLed", launcher="mpiexec -n 2 (one host)",
               command=f"KILL_AT={KILL_AT} OPT={opt} {' '.join(argv)}", t_fault=t_fault, ended=ended, hung=hung,
               deadline=PG_TIMEOUT + MARGIN, info=info, worker_rc=None)
    row["survivor_rc"] = ended.get("mpiexec", (None,))[0]
    row["t_exit"] = ended["mpiexec"][1] - t_fault if "mpiexec" in ended and t_fault else None
    row["t_job_end"] = row["t_exit"]
    row["t_error"] = info["errors"][0][0] - t_fault if 0 in info["errors"] and t_fault else None
    row["error"] = info["errors"].get(0, (0, first_error_line(text)))[1]
    row["detail"] = info["detail"].get(0, "")
    job_ok = not hung and row["survivor_rc"] not in (0, None)
    # hydra may kill rank 0 when it sees rank 1 die, before rank 0's collective fails: the job still ends
    judge(row, text, info, [], job_ok)
    if 0 not in info["errors"] and row["verdict"] == "ok":
        row["verdict"] = "ok (mpiexec ended rank 0 before it raised)"
    m = re.search(r"^.*(BAD TERMINATION.*|KILLED BY SIGNAL.*)$", text, re.M)
    row["launcher_said"] = m.group(1).strip() if m else ""
    return row


def scenario_partition(opt: str, tmp: str, port: int) -> dict:
    logs = [os.path.join(tmp, f"rank{r}.log") for r in range(2)]
    with Cluster(2, 1, "1gbit", master_port=port) as c:
        procs = c.start_ranks([PY, WORKER], env=base_env(opt), log_dir=tmp)
        named = {f"rank{p.rank}": p.popen for p in procs}

        def trigger(text):
            steps = [s for s, _ in parse(text)["steps"].get(0, [])]
            if steps and max(steps) >= 30:
                c.partition(1)
                return time.time()
            return None

        t_fault, ended, hung = watch(named, logs, trigger, PG_TIMEOUT + MARGIN)
        c.kill_all()
    text = "\n".join(read(x) for x in logs)
    info = parse(text)
    row = dict(opt=opt, fault="node 1 partitioned (all packets dropped)", launcher="1 process per rank, 2 nodes",
               command=f"RANK=r WORLD_SIZE=2 MASTER_ADDR={c.master_addr} ip netns exec {c.tag}-n<r> {PY} {WORKER}; "
                       f"then bridge link set dev {c.host_if[1]} state 0",
               t_fault=t_fault, ended=ended, hung=hung, deadline=PG_TIMEOUT + MARGIN, info=info, worker_rc=None)
    row["survivor_rc"] = ended.get("rank0", (None,))[0]
    row["other_rc"] = ended.get("rank1", (None,))[0]
    row["t_exit"] = ended["rank0"][1] - t_fault if "rank0" in ended and t_fault else None
    row["t_exit1"] = ended["rank1"][1] - t_fault if "rank1" in ended and t_fault else None
    row["t_job_end"] = (max(t for _, t in ended.values()) - t_fault) if t_fault and not hung else None
    row["t_error"] = info["errors"][0][0] - t_fault if 0 in info["errors"] and t_fault else None
    row["error"] = info["errors"].get(0, (0, first_error_line(read(logs[0]))))[1]
    row["error1"] = info["errors"].get(1, (0, first_error_line(read(logs[1]))))[1]
    row["detail"] = info["detail"].get(0, "")
    row["names_collective"] = bool(COLLECTIVE_RE.search(row["detail"] or row["error"]))
    m = OP_RE.search(row["detail"] or row["error"])
    row["names_op"] = m.group(1) if m else None
    job_ok = not hung and all(rc != 0 for rc, _ in ended.values())
    judge(row, text, info, [0, 1], job_ok)
    if row["verdict"] == "ok" and not row["names_collective"]:
        row["verdict"] = "ok in time, but the error names no collective"
    return row


def scenario_slow(opt: str, tmp: str, port: int, rate: str | None) -> dict:
    logs = [os.path.join(tmp, f"rank{r}.log") for r in range(2)]
    with Cluster(2, 1, "1gbit", master_port=port) as c:
        if rate:
            c.set_rate(1, rate)
        shaping = c.shaping[1]
        procs = c.start_ranks([PY, WORKER], env=base_env(opt, STEPS=150), log_dir=tmp)
        named = {f"rank{p.rank}": p.popen for p in procs}
        _, ended, hung = watch(named, logs, lambda text: None, 0, startup_limit=400)
        c.kill_all()
    info = parse("\n".join(read(x) for x in logs))
    mean, median = info["results"].get(0, (None, None))
    return dict(opt=opt, rate=rate or "1gbit", shaping=shaping, step_ms=mean, median_ms=median,
                rc=[ended.get(f"rank{r}", (None,))[0] for r in range(2)], hung=hung)


def delay_probe() -> str:
    try:
        with Cluster(2, 1, "1gbit") as c:
            c.slow(1, "30ms")
        return "Cluster.slow(1, '30ms') worked (sch_netem present)"
    except NetemUnavailable as e:
        return f"Cluster.slow(1, '30ms') raised NetemUnavailable: {e}"


def fmt(x, unit="s"):
    return "-" if x is None else f"{x:.1f} {unit}"


def write_md(path: str, rows: list[dict], slow: list[dict], probe: str, started: str, argv: list[str]) -> None:
    L = []
    L.append("# Fault injection: killed rank, partitioned node, slow link (2 ranks, gloo, CPU)")
    L.append("")
    L.append(f"Written by `experiments/fault_injection.py` ({' '.join(argv) or 'all scenarios'}) on {started}: "
             f"Linux {platform.release()}, torch {__import__('torch').__version__}, process-group timeout "
             f"{PG_TIMEOUT:.0f} s (`commopt.init_distributed(timeout=...)`), pass mark: the job ends within "
             f"timeout + {MARGIN:.0f} s of the fault. Nodes are network namespaces on a bridge "
             f"(`experiments/netem`), 1 Gbit/s tbf-shaped links; each rank runs `experiments/fault_worker.py` "
             f"(the model: MLP 64-256-256-8, batch 64). Times are from the fault (the killed rank's last line, "
             f"or the moment the partition was applied) to the survivor's exception (`error at`) and to the "
             f"process's exit (`exit at`).")
    L.append("")
    if rows:
        L.append("| method | fault | launcher | survivor rc | error at | exit at | job ended | verdict | first line of the survivor's error |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            rc = r["survivor_rc"]
            rcs = f"{rc}" + (f" (worker {r['worker_rc']})" if r.get("worker_rc") is not None else "")
            if r["fault"].startswith("node"):
                rcs = f"r0 {r['survivor_rc']}, r1 {r['other_rc']}"
            L.append(f"| {LABEL[r['opt']]} | {r['fault']} | {r['launcher']} | {rcs} | {fmt(r['t_error'])} | "
                     f"{fmt(r['t_exit'])} | {fmt(r['t_job_end'])} | {short(r['verdict'], 160)} | `{short(r['error'])}` |")
        L.append("")
        parts = [r for r in rows if r["fault"].startswith("node")]
        if parts:
            L.append("**Partition: does the error name the collective?** (rank 0's whole message searched for "
                     "all_reduce / all_gather / broadcast / reduce_scatter / barrier / all_to_all, and for the "
                     "transport operation: send / recv / read / write / connect)")
            L.append("")
            L.append("| method | names the collective | names the operation | rank 1 exit at | rank 1's first error line |")
            L.append("|---|---|---|---|---|")
            for r in parts:
                L.append(f"| {LABEL[r['opt']]} | {'yes' if r['names_collective'] else 'no'} | {r['names_op'] or 'no'} | "
                         f"{fmt(r['t_exit1'])} | `{short(r['error1'])}` |")
            L.append("")
        L.append("## Details")
        L.append("")
        for r in rows:
            L.append(f"- **{LABEL[r['opt']]}, {r['fault']}, {r['launcher']}**: `{r['command']}`. "
                     + (f"Killed at step {r['info']['kill'][1]}. " if r["info"]["kill"] else "")
                     + "Exit status and time from the fault: "
                     + ", ".join(f"{n} rc {rc} at {t - r['t_fault']:.1f} s" if r["t_fault"] else f"{n} rc {rc}"
                                 for n, (rc, t) in sorted(r["ended"].items()))
                     + (f"; {', '.join(r['hung'])} still running (killed)" if r["hung"] else "")
                     + (f". mpiexec said: `{short(r['launcher_said'], 120)}`" if r.get("launcher_said") else "")
                     + (f". Rank 0's whole message: `{short(r['detail'], 700)}`" if r["detail"] else "")
                     + ".")
        L.append("")
    if slow:
        L.append("## Slow link")
        L.append("")
        L.append(f"{probe}.")
        L.append("")
        L.append("So node 1's link rate is lowered instead (tbf both ways; node 0 stays at 1 Gbit/s). 150 steps, "
                 "mean step time (wall time per step, waits included) on rank 0 over steps 20-149, the median in "
                 "brackets (the machine's 2 cores are shared with other jobs, so the means carry noise; CO2's "
                 "median is a plain inner step, its mean includes the wait for the outer all-reduce at the end "
                 "of each round):")
        L.append("")
        base = {s["opt"]: s["step_ms"] for s in slow if s["rate"] == "1gbit"}
        rates = []
        for s in slow:
            if s["rate"] not in rates:
                rates.append(s["rate"])
        L.append("| method | " + " | ".join(f"node 1 at {x}" for x in rates) + " |")
        L.append("|---|" + "---|" * len(rates))
        for opt in dict.fromkeys(s["opt"] for s in slow):
            cells = []
            for x in rates:
                s = next((s for s in slow if s["opt"] == opt and s["rate"] == x), None)
                if s is None or s["step_ms"] is None:
                    cells.append("-" if s is None else f"failed (rc {s['rc']}{', hung' if s['hung'] else ''})")
                else:
                    rel = f" ({s['step_ms'] / base[opt]:.2f}x)" if base.get(opt) and x != "1gbit" else ""
                    cells.append(f"{s['step_ms']:.1f} ms{rel} [{s['median_ms']:.1f}]")
            L.append(f"| {LABEL[opt]} | " + " | ".join(cells) + " |")
        L.append("")
        n = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 8 + 8
        L.append(f"Bytes per step: the model has {n:,} float32 parameters ({4 * n / 1e3:.0f} KB). DDP under MKOR "
                 f"all-reduces them every step; CompressedOptimizer all-gathers TopK 5 % per bucket (values + int32 "
                 f"indices, ~{0.05 * n * 8 / 1e3:.0f} KB); CO2 all-reduces {4 * n / 1e3:.0f} KB once per round of 4 "
                 f"steps, overlapped with the next round.")
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))
    print(f"wrote {path}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=("kill-torchrun", "kill-mpiexec", "partition", "slow"))
    ap.add_argument("--opts", nargs="+", choices=OPTS, default=list(OPTS))
    ap.add_argument("--rates", nargs="+", default=["50mbit", "10mbit"])
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "faults.md"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    which = a.only or ["kill-torchrun", "kill-mpiexec", "partition", "slow"]
    try:
        check_support()
    except NetemUnavailable as e:
        print(f"cannot run: {e}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rows, slow, port = [], [], 29611
    tmp_root = tempfile.mkdtemp(prefix="commopt-faults-")
    print(f"logs under {tmp_root}", flush=True)
    for kind in ("kill-torchrun", "kill-mpiexec", "partition"):
        if kind not in which:
            continue
        for opt in a.opts:
            if kind == "kill-mpiexec" and MPIEXEC is None:
                print("no mpiexec; skipping kill-mpiexec", flush=True)
                break
            port += 1
            tmp = os.path.join(tmp_root, f"{kind}-{opt}")
            os.makedirs(tmp)
            print(f"== {kind} {opt}", flush=True)
            fn = {"kill-torchrun": scenario_kill_torchrun, "kill-mpiexec": scenario_kill_mpiexec,
                  "partition": scenario_partition}[kind]
            row = fn(opt, tmp, port)
            print(f"  survivor rc {row['survivor_rc']}, error at {fmt(row['t_error'])}, exit at {fmt(row['t_exit'])}: "
                  f"{row['verdict']}\n  error: {row['error'][:300]}", flush=True)
            rows.append(row)
    probe = ""
    if "slow" in which:
        probe = delay_probe()
        print(probe, flush=True)
        for opt in a.opts:
            for rate in [None, *a.rates]:
                port += 1
                tmp = os.path.join(tmp_root, f"slow-{opt}-{rate or '1gbit'}")
                os.makedirs(tmp)
                s = scenario_slow(opt, tmp, port, rate)
                print(f"== slow {opt} node1 {s['rate']}: step mean {s['step_ms']} median {s['median_ms']} ms rc {s['rc']}",
                      flush=True)
                slow.append(s)
    if not a.no_write:
        write_md(a.out, rows, slow, probe, started, sys.argv[1:])
    failed = [r for r in rows if r["verdict"].startswith("FAIL")] + [s for s in slow if s["step_ms"] is None]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
