"""Real SLURM checks on a local cluster of emulated nodes (root):

    sudo .venv/bin/python -m experiments.slurm_local                  # all checks, writes the results file
    sudo .venv/bin/python -m experiments.slurm_local --only sbatch --no-write

* ``sbatch``: ``slurm/train_cpu.sbatch`` on 2 nodes × 2 tasks (``sbatch --wait``); the job's output
  must show world size 4, MASTER_ADDR = the first node, ``node_size`` 2 from ``node_size="auto"``, the
  training's end and ``comm_stats``; the bytes on the emulated links (the nodes' eth0 kernel counters
  during the job) are set against ``comm_stats()["bytes_inter_node"]``.
* ``bytes``: ``srun`` of the e2e benchmark GPT (6M parameters, TopK 1 % + EF14, ``node_size="auto"``) with
  rank 0 reading node 0's eth0 counters after every step: the steady-state bytes on the emulated link
  against ``comm_stats()["bytes_inter_node"]`` (within 5 %).
* ``kill``: the same job, longer; once it trains, one task on node 1 is SIGKILLed from outside; the job
  must end as a whole (``--kill-on-bad-exit``) within the process group's timeout, the survivors with
  commopt's named error, nothing left running.
* ``timeout``: a job cut by its 1-minute time limit after per-rank checkpoints resumes in a new ``sbatch``
  and ends with the uninterrupted job's losses.
* ``slurmd``: node 1's slurmd is stopped while a job trains: the controller marks the node down and
  requeues the job, every rank ends (none hangs), node 1's with a clear error (commopt's named error, or
  gloo's peer-lost error from the script's own ``dist`` call, by where the rank was); slurmd comes back,
  and the requeued job resumes from the newest checkpoint of every rank and finishes (with ``timeout``
  run too: with the uninterrupted job's losses).

The time-limit and node-failure jobs are sized by a short pace run (about 100 s of training), so that
they outlast the limit or the node timeout on a quiet and on a loaded machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from experiments.slurm_local.cluster import SlurmCluster  # noqa: E402

PY = os.path.join(ROOT, ".venv", "bin", "python")
SBATCH = os.path.join(ROOT, "slurm", "train_cpu.sbatch")


def link_bytes(sc: SlurmCluster) -> list[int]:
    out = []
    for ns in sc.net.netns:
        tot = 0
        for w in ("rx_bytes", "tx_bytes"):
            r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/eth0/statistics/{w}"],
                               capture_output=True, text=True, check=True)
            tot += int(r.stdout)
        out.append(tot)
    return out


def job_state(sc: SlurmCluster, job: str) -> str:
    r = sc.run(["scontrol", "show", "job", job], timeout=30)
    m = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", r.stdout, re.S)
    return f"{m.group(1)} exit {m.group(2)}" if m else (r.stdout + r.stderr).strip()[:200]


def check_sbatch(sc: SlurmCluster) -> dict:
    out = os.path.join(sc.dir, "sbatch-%j.out")
    before = link_bytes(sc)
    t0 = time.time()
    r = sc.run(["sbatch", "--wait", "-o", out, "--export=ALL", SBATCH, "--out-dir", os.path.join(sc.dir, "out1")],
               timeout=600,
               env={"PYTHON": PY, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    after = link_bytes(sc)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    job = m.group(1) if m else "?"
    text = open(out.replace("%j", job)).read() if m else r.stdout + r.stderr
    stats = re.search(r"comm_stats \(rank 0\): (\{.*\})", text)
    st = eval(stats.group(1), {}) if stats else {}  # the script prints a dict literal
    first = sc.names[0]
    per_rank_link = sum(b - a for a, b in zip(before, after)) / 2 / 2 / 2  # (rx + tx) / 2, 2 nodes, 2 ranks each
    checks = {
        "exit 0": r.returncode == 0,
        "world size 4": "slurm: world 4" in text,
        f"MASTER_ADDR = first node ({first})": f"master {first}:" in text,
        "node_size 2 (auto)": st.get("node_size") == 2,
        "finished (iter 20)": re.search(r"^iter\s+20:", text, re.M) is not None,
        "comm_stats printed": bool(st),
    }
    return {"name": "sbatch 2 nodes x 2 tasks", "job": job, "wall_s": wall, "checks": checks,
            "state": job_state(sc, job), "comm_stats": st, "link_per_rank": per_rank_link,
            "counted_inter": st.get("bytes_inter_node"), "tail": "\n".join(text.strip().splitlines()[-14:])}


def check_bytes(sc: SlurmCluster, steps: int = 25, skip: int = 5) -> dict:
    """srun of the e2e benchmark GPT (6M parameters, TopK 1 % + EF14, node_size="auto") with rank 0 reading
    node 0's eth0 counters after every step: steady-state bytes on the emulated link against comm_stats."""
    import json

    out = os.path.join(sc.dir, "bytes.json")
    spec = json.dumps({"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef14", "node_size": "auto",
                       "name": "hier_topk1_auto"})
    r = sc.run(["srun", "-N", "2", "-n", "4", "--kill-on-bad-exit=1", PY, os.path.join(ROOT, "experiments", "e2e_worker.py"),
                "--method", spec, "--steps", str(steps), "--link-iface", "eth0", "--out", out], timeout=900,
               env={"OMP_NUM_THREADS": "1"})
    rec = json.load(open(out)) if os.path.exists(out) else {}
    checks = {"exit 0": r.returncode == 0, "record written": bool(rec)}
    res = {"name": f"srun 2 nodes x 2 tasks, steady-state inter-node bytes ({steps} steps)", "job": "srun",
           "state": f"exit {r.returncode}", "checks": checks,
           "tail": "\n".join([ln for ln in (r.stdout + r.stderr).strip().splitlines() if "Warning" not in ln][-6:])}
    if rec:
        n = len(rec["step_seconds"]) - skip
        lc, ci = rec["link_counter"], rec["counted_inter"]
        link = (lc[-1] - lc[skip]) / n / 2 / 2  # node 0's (rx + tx) / 2 per rank of its 2
        counted = (ci[-1] - ci[skip]) / n
        st = rec["comm_stats"].get("CompressedOptimizer", {})
        checks["node_size 2 from SLURM_TASKS_PER_NODE"] = st.get("node_size") == 2
        checks["link bytes within 5% of comm_stats"] = abs(link / counted - 1) < 0.05
        res["steady"] = (link, counted)
    return res


def _last_iter(text: str) -> "tuple[int, str] | None":
    found = re.findall(r"^iter\s+(\d+): (train loss \S+, val loss \S+)", text, re.M)
    return (int(found[-1][0]), found[-1][1]) if found else None


def pace(sc: SlurmCluster) -> float:
    """Seconds per training iteration of the CPU template's model on this cluster now (a 40-iteration srun):
    the time-limit and node-failure checks size their jobs by it, so that they outlast the 1-minute limit
    or the controller's node timeout on a quiet machine as on a loaded one."""
    r = sc.run(["srun", "-N", "2", "-n", "4", "--kill-on-bad-exit=1", PY, os.path.join(ROOT, "experiments", "train_nanogpt.py"),
                "--opt", "compressed", "--node-size", "auto", "--n-layer", "2", "--n-embd", "64", "--max-iters", "40",
                "--eval-every", "20", "--out-dir", os.path.join(sc.dir, "pace")], timeout=300,
               env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    ms = re.findall(r"([\d.]+) ms/iter", r.stdout)
    if r.returncode != 0 or not ms:
        raise RuntimeError(f"the pace job failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return float(ms[-1]) / 1e3


def job_iters(sec_per_iter: float, seconds: float = 100) -> int:
    """Iterations of a job that trains for about ``seconds`` (at least 400, a multiple of 25)."""
    return max(400, -(-int(seconds / sec_per_iter) // 25) * 25)


def check_timeout(sc: SlurmCluster, iters: int = 400, extra: "tuple[str, ...]" = ()) -> dict:
    """A job that hits its time limit (1 min) after per-rank checkpoints resumes from them in a new sbatch
    and ends with the uninterrupted job's losses."""
    # checkpoints at evaluation points: train_nanogpt.py resumes exactly from those (run_nanogpt_check.py's rule)
    common = ["--max-iters", str(iters), "--eval-every", "25", "--save-every", "25", "--ckpt-mode", "per-rank",
              *extra]
    env = {"PYTHON": PY, "PYTHONUNBUFFERED": "1"}
    d1, d2 = os.path.join(sc.dir, "t_cut"), os.path.join(sc.dir, "t_full")
    out_a, out_b, out_c = (os.path.join(sc.dir, f"timeout-{x}-%j.out") for x in "abc")
    ra = sc.run(["sbatch", "--wait", "--time=1", "-o", out_a, "--export=ALL", SBATCH, *common, "--out-dir", d1],
                timeout=400, env=env)
    ja = re.search(r"Submitted batch job (\d+)", ra.stdout).group(1)
    state_a = job_state(sc, ja)
    text_a = open(out_a.replace("%j", ja)).read()
    rb = sc.run(["sbatch", "--wait", "-o", out_b, "--export=ALL", SBATCH, *common, "--out-dir", d1, "--resume"],
                timeout=600, env=env)
    jb = re.search(r"Submitted batch job (\d+)", rb.stdout).group(1)
    text_b = open(out_b.replace("%j", jb)).read()
    rc = sc.run(["sbatch", "--wait", "-o", out_c, "--export=ALL", SBATCH, *common, "--out-dir", d2],
                timeout=600, env=env)
    jc = re.search(r"Submitted batch job (\d+)", rc.stdout).group(1)
    text_c = open(out_c.replace("%j", jc)).read()
    saved = re.findall(r"saved checkpoint at iter (\d+)", text_a)
    resumed = re.search(r"resum\w* .*?iter (\d+)", text_b)
    lb, lc = _last_iter(text_b), _last_iter(text_c)
    checks = {
        "the first job hit its time limit": "TIMEOUT" in state_a,
        "it had saved checkpoints": bool(saved),
        "the resumed job finished": rb.returncode == 0 and lb is not None and lb[0] == iters,
        "the uninterrupted job finished": rc.returncode == 0 and lc is not None and lc[0] == iters,
        "identical final losses (resumed = uninterrupted)": lb is not None and lb == lc,
    }
    return {"name": f"time limit, then resume in a new sbatch ({iters} iterations, per-rank checkpoints)",
            "job": f"{ja} (cut), {jb} (resumed), {jc} (uninterrupted)", "state": state_a, "checks": checks,
            "uninterrupted": lc,
            "tail": "\n".join([f"cut job: last checkpoint at iter {saved[-1] if saved else '-'}",
                               f"resumed: {resumed.group(0) if resumed else '?'}",
                               f"resumed job, iter {lb[0] if lb else '?'}: {lb[1] if lb else '?'}",
                               f"uninterrupted job, iter {lc[0] if lc else '?'}: {lc[1] if lc else '?'}"])}


def _ranks_in(sc: SlurmCluster, node: int) -> list[int]:
    """pids of training ranks running in node ``node``'s namespace."""
    pids = subprocess.run(["ip", "netns", "pids", sc.net.netns[node]], capture_output=True, text=True).stdout.split()
    out = []
    for p in pids:
        try:
            if "train_nanogpt.py" in open(f"/proc/{p}/cmdline").read().replace("\0", " "):
                out.append(int(p))
        except OSError:  # ended meanwhile
            pass
    return out


def _start_training_job(sc: SlurmCluster, tag: str, args: "tuple[str, ...] | None" = None,
                        until: str = r"^iter\s+0:", settle: float = 5, env: "dict[str, str] | None" = None
                        ) -> "tuple[str, str]":
    """sbatch the CPU template (``args``: its train_nanogpt.py arguments, by default a long job) and return
    (job id, output path) once its output matches ``until`` (default: past its first evaluation) and
    ``settle`` s more have passed."""
    out = os.path.join(sc.dir, f"{tag}-%j.out")
    if args is None:
        # evaluated and checkpointed only every 1000 iterations: a fault lands in training steps
        args = ("--max-iters", "2000", "--eval-every", "1000", "--save-every", "1000",
                "--out-dir", os.path.join(sc.dir, f"out-{tag}"))
    r = sc.run(["sbatch", "-o", out, "--export=ALL", SBATCH, *args], timeout=60,
               env={"PYTHON": PY, "PYTHONUNBUFFERED": "1", **(env or {})})
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    path = out.replace("%j", job)
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(path) and re.search(until, open(path).read(), re.M):
            break
        time.sleep(1)
    time.sleep(settle)
    return job, path


def _wait_gone(sc: SlurmCluster, job: str, since: float, limit: float) -> "float | None":
    """Seconds from ``since`` until the job left the queue, or None (then it is cancelled) after ``limit``."""
    while time.time() < since + limit:
        q = sc.run(["squeue", "-h", "-j", job], timeout=30)
        if not q.stdout.strip():
            return time.time() - since
        time.sleep(1)
    sc.run(["scancel", job])
    return None


def _named_errors(text: str) -> list[str]:
    return sorted(set(re.findall(r"(commopt: the [^\n]*?failed on rank \d+ of \d+)", text)))


def check_kill(sc: SlurmCluster, limit: float = 80) -> dict:
    """One task on node 1 SIGKILLed mid-training: the job must end by itself (``--kill-on-bad-exit``), a
    survivor with commopt's named error, every survivor that printed an error with a clear one, none left
    running. The job checkpoints and evaluates only every 1000 iterations, so the kill (about 5 s into
    training) lands in the training steps, whose only collectives are commopt's."""
    job, path = _start_training_job(sc, "kill")
    victims = _ranks_in(sc, 1)
    t_kill = time.time()
    os.kill(victims[0], signal.SIGKILL)
    ended = _wait_gone(sc, job, t_kill, limit)
    time.sleep(2)
    text = open(path).read()
    left = _ranks_in(sc, 0) + _ranks_in(sc, 1)
    errors = _named_errors(text)
    last_words = _rank_errors(text)
    checks = {
        "job ended by itself": ended is not None,
        "a survivor raised commopt's named error": bool(errors),
        "every survivor that printed an error ended with a clear one": all(
            _clear_error(*e) for e in last_words.values()),
        "no rank left running": not left,
    }
    return {"name": "one task SIGKILLed", "job": job, "killed_pid": victims[0], "ended_s": ended, "checks": checks,
            "state": job_state(sc, job), "errors": errors[:3],
            "tail": "\n".join([ln for ln in text.strip().splitlines() if "Warning" not in ln][-12:])}


def _last_words(lines: "list[str]") -> "tuple[str, str]":
    """(the last line that names an error, the source line of the innermost training-script frame of the
    traceback, or "" when there is none) of one task's output lines."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    errs = [ln for ln in lines if re.search(r"error|Error|failed|Terminated|CANCELLED", ln)]
    where = ""
    for i, ln in enumerate(lines[:-1]):
        if re.search(r'File "[^"]*train_nanogpt\.py", line \d+', ln):
            where = re.sub(r"^\[rank \S+\]\s*", "", lines[i + 1])
    return (errs or lines or ["(nothing)"])[-1][:400], where


def _task_errors(paths: "list[str]") -> "dict[str, tuple[str, str]]":
    """Each task's last words (:func:`_last_words`), from its own stderr file."""
    return {os.path.basename(p): _last_words(list(open(p, errors="replace"))) for p in sorted(paths)}


def _rank_errors(text: str) -> "dict[int, tuple[str, str]]":
    """The last words (:func:`_last_words`) of every rank that printed a traceback into a job's output
    (train_nanogpt.py prefixes each of its lines with ``[rank N]``)."""
    per: dict[int, list[str]] = {}
    for ln in text.splitlines():
        m = re.match(r"\[rank (\d+)\]\s?(.*)", ln)
        if m:
            per.setdefault(int(m.group(1)), []).append(m.group(2))
    return {r: _last_words(lines) for r, lines in sorted(per.items())}


def _clear_error(err: str, where: str) -> bool:
    """A survivor's error is clear when it is commopt's named error (a commopt collective lost its peers), or
    gloo's peer-lost error raised by the training script's own ``dist.*`` call (its evaluation all-reduce,
    its checkpoint barrier): which of the two a rank meets depends on where it was when its peers went."""
    if "commopt: the" in err:
        return True
    return bool(re.search(r"Connection (closed|reset) by peer|Broken pipe", err)) and where.startswith("dist.")


def check_slurmd_stop(sc: SlurmCluster, iters: int = 400, reference: "tuple[int, str] | None" = None,
                      limit: float = 150) -> dict:
    """Node 1's slurmd is stopped (SIGTERM by its pid, as ``systemctl stop slurmd`` would) while a job
    trains with per-rank checkpoints. The controller marks the node DOWN after ``SlurmdTimeout``, cancels
    the job (NODE_FAIL) and requeues it; every rank must end (node 0's terminated by SLURM, node 1's, whose
    slurmd is gone, by a clear error once their peers are gone: see :func:`_clear_error`), nothing left
    running. slurmd is
    then restarted: the requeued job runs again, resumes from the newest checkpoint every rank has and
    finishes; with ``reference`` (the uninterrupted job of :func:`check_timeout`, same arguments) its final
    losses must be the same."""
    common = ["--max-iters", str(iters), "--eval-every", "25", "--save-every", "25", "--ckpt-mode", "per-rank"]
    errdir = os.path.join(sc.dir, "slurmd-tasks")
    os.makedirs(errdir, exist_ok=True)
    # each task's stderr in its own file, written on its node (srun's --error, read from the environment):
    # a task's last words survive srun's end
    job, path = _start_training_job(sc, "slurmd", (*common, "--out-dir", os.path.join(sc.dir, "t_node")),
                                    until="saved checkpoint at iter 50", settle=3,
                                    env={"SLURM_STDERRMODE": os.path.join(errdir, "task-%j-%s-%t.err")})
    before = _ranks_in(sc, 1)
    t_stop = time.time()
    pid = sc.stop_slurmd(1)
    all_ended = None
    while time.time() < t_stop + limit:
        if not _ranks_in(sc, 0) and not _ranks_in(sc, 1):
            all_ended = time.time() - t_stop
            break
        time.sleep(1)
    left = _ranks_in(sc, 0) + _ranks_in(sc, 1)
    for p in left:  # never leave them behind, whatever the verdict
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node_state = sc.run(["sinfo", "-h", "-n", sc.names[1], "-o", "%T %E"], timeout=20).stdout.strip()
    queued = sc.run(["squeue", "-h", "-j", job, "-o", "%T %r"], timeout=20).stdout.strip()
    tasks = _task_errors([os.path.join(errdir, f) for f in os.listdir(errdir) if f.startswith(f"task-{job}-0-")])
    # the node comes back: the requeued job runs again and resumes
    t_back = time.time()
    sc.start_slurmd(1)
    sc.run(["scontrol", "update", f"nodename={sc.names[1]}", "state=resume"], timeout=20)
    finished = _wait_gone(sc, job, t_back, 900)
    text = open(path).read()
    runs = re.findall(r"^job \d+ \(run (\d+)\)", text, re.M)
    resumed = re.search(r"resumed from \S+ at iter (\d+)", text)
    last = _last_iter(text)
    checks = {
        "node 1 had ranks training when its slurmd stopped": bool(before),
        "every rank ended (none hung)": all_ended is not None and not left,
        "node 1 marked down": node_state.startswith("down"),
        "the job was requeued": "PENDING" in queued or len(runs) > 1,
        "node 1's ranks ended with a clear error (commopt's named error, or gloo's in the script's own dist call)":
            sum(_clear_error(*e) for k, e in tasks.items() if int(k.rsplit("-", 1)[1][:-4]) >= 2) == 2,
        "the requeued job ran again, resumed from a checkpoint and finished": (
            finished is not None and runs[-1:] == ["2"] and resumed is not None and last is not None
            and last[0] == iters),
    }
    if reference is not None:
        checks["its final losses = the uninterrupted job's"] = last == reference
    tail = [f"job {job}: node 1's slurmd (pid {pid}) stopped after the checkpoint of iter 50",
            f"every rank had ended {all_ended:.1f} s later" if all_ended is not None else "ranks still running",
            f"node 1: {node_state}; job: {queued or 'not queued'}",
            *(f"{k}: {e}" + (f"  [in the script's `{w}`]" if w and "commopt: the" not in e else "")
              for k, (e, w) in tasks.items()),
            f"run 2: {resumed.group(0) if resumed else 'no resume'}; iter {last[0] if last else '?'}: "
            f"{last[1] if last else '?'}",
            f"uninterrupted job (time-limit check), iter {reference[0]}: {reference[1]}" if reference else ""]
    return {"name": "node 1's slurmd stopped, the job requeued and resumed", "job": job, "checks": checks,
            "state": job_state(sc, job), "tail": "\n".join(t for t in tail if t)}


def report(results: list[dict], cmd: str, notes: "list[str]" = ()) -> str:
    lines = ["# Real SLURM on a local cluster of emulated nodes", "",
             f"- date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; command: `{cmd}` (this file is its output)",
             "- cluster: `experiments/slurm_local` — 2 nodes, each a network namespace of `experiments/netem` "
             "(1 Gbit/s links, tc tbf) with its own UTS namespace and host name, one `slurmd -N` per node, "
             "`slurmctld` in node 0's, one munged; Debian's slurm 22.05 packages", *notes, ""]
    for r in results:
        ok = all(r["checks"].values())
        lines += [f"## {r['name']}: {'pass' if ok else 'FAIL'}", "", f"job {r['job']}, final state: {r['state']}", ""]
        lines += [f"- {'ok' if v else 'FAILED'}: {k}" for k, v in r["checks"].items()]
        if "link_per_rank" in r and r.get("counted_inter"):
            lines.append(f"- inter-node bytes per rank over the job: {r['link_per_rank'] / 1e6:.3f} MB on the emulated "
                         f"links (eth0 counters, (rx + tx) / 2 / ranks; TCP/IP headers, rendezvous and evaluation "
                         f"all-reduces included) against {r['counted_inter'] / 1e6:.3f} MB counted by "
                         f"`comm_stats()['bytes_inter_node']` (ratio {r['link_per_rank'] / r['counted_inter']:.3f})")
        if r.get("steady"):
            link, counted = r["steady"]
            lines.append(f"- steady state (steps 5..): {link / 1e6:.4f} MB per rank and step on the emulated link "
                         f"(node 0's eth0 counters read by rank 0 after every step) against {counted / 1e6:.4f} MB "
                         f"counted by `comm_stats()['bytes_inter_node']` (ratio {link / counted:.4f})")
        if r.get("ended_s") is not None:
            lines.append(f"- the job ended {r['ended_s']:.1f} s after the kill")

        for e in r.get("errors", []):
            lines.append(f"- survivor error: `{e}`")
        lines += ["", "```", r["tail"], "```", ""]
    return "\n".join(lines)


CHECKS = ("sbatch", "bytes", "kill", "slurmd", "timeout")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=CHECKS)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "slurm_local.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the cluster's folder (logs, checkpoints) even "
                    "when every check passes (it is always kept when one fails)")
    a = ap.parse_args()
    todo = a.only or list(CHECKS)
    # SIGTERM (a test's timeout, scancel of a CI job) tears the cluster down as an exception would
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[dict] = []
    with SlurmCluster(nodes=2, cpus=2, rate="1gbit") as sc:
        notes = []
        iters = 400
        if {"timeout", "slurmd"} & set(todo):
            sec = pace(sc)
            iters = job_iters(sec)
            notes.append(f"- pace: {sec * 1e3:.1f} ms per iteration (a 40-iteration srun), so the time-limit and "
                         f"node-failure jobs train {iters} iterations (about 100 s uninterrupted)")
        if "sbatch" in todo:
            results.append(check_sbatch(sc))
        if "bytes" in todo:
            results.append(check_bytes(sc))
        if "kill" in todo:
            results.append(check_kill(sc))
        if "timeout" in todo:
            results.append(check_timeout(sc, iters=iters))
        if "slurmd" in todo:
            ref = results[-1].get("uninterrupted") if "timeout" in todo else None
            results.append(check_slurmd_stop(sc, iters=iters, reference=ref))
    text = report(results, " ".join(["python -m experiments.slurm_local", *sys.argv[1:]]), notes)
    print(text)
    if not a.no_write:
        with open(a.out, "w") as f:
            f.write(text)
    ok = all(all(r["checks"].values()) for r in results)
    if ok and not a.keep:
        shutil.rmtree(sc.dir, ignore_errors=True)  # checkpoints of the long jobs: hundreds of MB
    else:
        print(f"logs and checkpoints kept in {sc.dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
