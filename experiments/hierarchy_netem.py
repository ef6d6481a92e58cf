#!/usr/bin/env python
"""Flat against hierarchical compression, and 8-byte against compact messages, on an emulated
cluster of 2 nodes × 2 ranks (SPEC §8–9; issue: multi-node).

Every method trains the benchmark GPT of ``experiments/e2e_worker.py`` (AdamW, warm-up + cosine,
clipping, fixed seeds) and is run twice:

1. **quality**: ``--steps`` steps on 4 local processes (``LOCAL_WORLD_SIZE=2``), validation loss at
   the end and commopt's byte counters. The iterates do not depend on the link.
2. **timing**: ``--timing-steps`` steps on ``experiments/netem``'s cluster (2 namespaces on a bridge,
   each node's link shaped to ``--rate``; the two ranks of a node share its loopback). Besides the
   time per step, the bytes that really crossed each node's shaped link (``eth0``'s kernel counters,
   read before and after the run; TCP/IP headers and the rendezvous included) are set against
   ``comm_stats()["bytes_inter_node"]``.

    sudo .venv/bin/python experiments/hierarchy_netem.py              # everything (~20 min on 2 cores)
    sudo .venv/bin/python experiments/hierarchy_netem.py --methods ddp hier_topk1 --no-write

Writes ``experiments/results/hierarchy_netem.md`` (+ ``.json`` with the raw records).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from bench_e2e import run_local  # noqa: E402

WORKER = os.path.join(HERE, "e2e_worker.py")
NODES, RPN = 2, 2

#: name -> e2e_worker method spec; all TopK 1 % with EF14, AdamW, 2 dense warm-up steps
METHODS: dict[str, dict[str, Any]] = {
    "ddp": {"kind": "ddp"},
    "flat_topk1": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef14"},
    "hier_topk1": {"kind": "compressed", "compressor": "topk:0.01", "feedback": "ef14", "node_size": 2},
    "flat_topk1_compact": {"kind": "compressed", "compressor": "topk:0.01,chunk=4096,values=int8",
                           "feedback": "ef14"},
    "hier_topk1_compact": {"kind": "compressed", "compressor": "topk:0.01,chunk=4096,values=int8",
                           "feedback": "ef14", "node_size": 2},
    # the longest chunk whose local indices still fit in 16 bits: the same bytes per entry
    "flat_topk1_compact64k": {"kind": "compressed", "compressor": "topk:0.01,chunk=65536,values=int8",
                              "feedback": "ef14"},
    "hier_topk1_compact64k": {"kind": "compressed", "compressor": "topk:0.01,chunk=65536,values=int8",
                              "feedback": "ef14", "node_size": 2},
    # which part of the compact message costs what: chunking alone, int8 alone
    "flat_topk1_chunk": {"kind": "compressed", "compressor": "topk:0.01,chunk=4096", "feedback": "ef14"},
    "flat_topk1_int8": {"kind": "compressed", "compressor": "topk:0.01,values=int8", "feedback": "ef14"},
    # compressing the AdamW step instead (CompressedUpdates = CO2 with tau 1), 8-byte and compact
    "updates_topk1": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None, "penalty": None,
                      "compressor": "topk:0.01", "feedback": "ef14"},
    "updates_topk1_compact": {"kind": "co2", "tau": 1, "outer_momentum": 0.0, "clip": None, "penalty": None,
                              "compressor": "topk:0.01,chunk=4096,values=int8", "feedback": "ef14"},
}
LABEL = {
    "ddp": "dense DDP (all-reduce, fp32)",
    "flat_topk1": "flat TopK 1% + EF14, 8 B/entry",
    "hier_topk1": "hierarchical (node_size=2) TopK 1% + EF14, 8 B/entry",
    "flat_topk1_compact": "flat TopK 1%, chunk 4096 + int8",
    "hier_topk1_compact": "hierarchical TopK 1%, chunk 4096 + int8",
    "flat_topk1_compact64k": "flat TopK 1%, chunk 65536 + int8",
    "hier_topk1_compact64k": "hierarchical TopK 1%, chunk 65536 + int8",
    "flat_topk1_chunk": "flat TopK 1%, chunk 4096, fp32 values",
    "flat_topk1_int8": "flat TopK 1%, int32 indices, int8 values",
    "updates_topk1": "CompressedUpdates (AdamW step) TopK 1% + EF14, 8 B/entry",
    "updates_topk1_compact": "CompressedUpdates TopK 1%, chunk 4096 + int8",
}


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def worker_argv(name: str, a: argparse.Namespace, steps: int, evals: bool, out: str) -> list[str]:
    spec = dict(METHODS[name], name=name)
    return [sys.executable, WORKER, "--method", json.dumps(spec), "--steps", str(steps),
            "--eval-every", str(steps if evals else 0), "--model", a.model, "--batch-size", str(a.batch_size),
            "--lr-decay-iters", str(a.steps), "--out", out]


def inter_stats(rec: dict) -> dict:
    """The CompressedOptimizer's comm_stats of a worker record, or {} (dense DDP)."""
    return rec.get("comm_stats", {}).get("CompressedOptimizer", {})


def link_bytes(c: Any) -> list[int]:
    """rx + tx bytes of every node's shaped link (its eth0), read inside its namespace."""
    out = []
    for node in range(NODES):
        tot = 0
        for what in ("rx_bytes", "tx_bytes"):
            r = c._ns(node, "cat", f"/sys/class/net/eth0/statistics/{what}")
            tot += int(r.stdout.strip())
        out.append(tot)
    return out


def quality(name: str, a: argparse.Namespace, tmp: str, port: int) -> Optional[dict]:
    out = os.path.join(tmp, f"q_{name}.json")
    if os.path.exists(out):  # a finished run of an earlier invocation with the same --work-dir
        return json.load(open(out))
    rc = run_local(worker_argv(name, a, a.steps, True, out), NODES * RPN, RPN, port, out + ".log", a.timeout)
    if rc != 0 or not os.path.exists(out):
        _say(f"quality {name}: FAILED (rc {rc}); log: {out}.log")
        print(open(out + ".log").read()[-3000:])
        return None
    return json.load(open(out))


def timing(name: str, a: argparse.Namespace, tmp: str, c: Any, port: int) -> Optional[dict]:
    out = os.path.join(tmp, f"t_{name}.json")
    if os.path.exists(out):  # recorded by an earlier invocation with the same --work-dir
        rec = json.load(open(out))
        if "link_bytes" in rec and rec.get("link_counter"):
            return rec
    before = link_bytes(c)
    # start_ranks fills in {rank}-style fields: the JSON method spec's braces are doubled to stay literal
    argv = [x.replace("{", "{{").replace("}", "}}") for x in worker_argv(name, a, a.timing_steps, False, out)]
    argv += ["--link-iface", "eth0"]  # rank 0 (node 0) reads its node's shaped link after every step
    procs = c.start_ranks(argv, env={"MASTER_PORT": str(port)}, log_dir=tmp)
    codes = c.wait(timeout=a.timeout, procs=procs)
    after = link_bytes(c)
    if any(code is None for code in codes):
        c.kill_all()
    if any(codes) or not os.path.exists(out):
        _say(f"timing {name}: FAILED {codes}; logs in {tmp}")
        return None
    rec = json.load(open(out))
    rec["link_bytes"] = [b - s for s, b in zip(before, after)]
    with open(out, "w") as f:
        json.dump(rec, f)
    return rec


def row(name: str, q: Optional[dict], t: Optional[dict], a: argparse.Namespace) -> dict:
    r: dict[str, Any] = {"method": name, "label": LABEL[name]}
    if q is not None:
        r["final_val"] = q["evals"][-1][1]
    if t is not None:
        s = t["step_seconds"][a.skip:]
        r["ms_per_step"] = 1e3 * sum(s) / len(s)
        r["ms_median"] = 1e3 * statistics.median(s)
        # steady state, steps skip.. (after the dense warm-up): counters after each step, index 0 = before step 0
        n = len(t["step_seconds"]) - a.skip
        lc, ci = t["link_counter"], t["counted_inter"]
        # node 0's link carries what its RPN ranks receive from and send to node 1: per rank (rx + tx) / 2 / RPN
        r["link_per_step"] = (lc[-1] - lc[a.skip]) / n / 2 / RPN
        r["inter_per_step"] = (ci[-1] - ci[a.skip]) / n
        st = inter_stats(t)
        r["intra_per_step"] = st.get("bytes_intra_node", 0) / len(t["step_seconds"]) if st else 0.0
    return r


def report(rows: list[dict], a: argparse.Namespace, cmd: str) -> str:
    base = next((r for r in rows if r["method"] == "ddp"), None)
    lines = [
        f"# Flat vs hierarchical compression, 8-byte vs compact messages: {NODES} nodes × {RPN} ranks at {a.rate}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (the 4 ranks share them: compute is oversubscribed); command: `{cmd}`",
        f"- model: the e2e benchmark GPT (`--model {a.model}`, AdamW, batch {a.batch_size} × 64 per rank, fixed seeds); "
        "every compressed method: TopK 1% + EF14, 2 dense warm-up steps",
        f"- quality: {a.steps} steps on 4 local ranks (validation loss of rank 0's model at the end); timing: "
        f"{a.timing_steps} steps on the emulated cluster (`experiments/netem`, each node's link shaped to {a.rate} with "
        f"tc tbf, the two ranks of a node on its loopback), mean over steps {a.skip}..",
        f"- inter-node MB/step: commopt's `comm_stats()['bytes_inter_node']` per rank and step in the timing run's "
        f"steady state (steps {a.skip}.., after the dense warm-up; SPEC §3/§8 formulas; flat counts every byte as "
        "inter-node); dense DDP: the ring all-reduce formula 2(n−1)/n·4d. intra-node MB/step: `bytes_intra_node` "
        "over the whole timing run (on gloo the node's reduce-scatter is an all-reduce: 3(L−1)·⌈d/L⌉·4 per bucket)",
        "- link MB/step: what really crossed the shaped link in the same steps, from node 0's eth0 kernel counters "
        "read by rank 0 after every step ((rx + tx) / 2 per rank: TCP/IP headers included)",
        "- inter vs flat: the flat method's inter-node bytes / this one's (same compressor); vs 8-byte: the 8-byte "
        "message's inter-node bytes / this one's, and the final loss against the 8-byte run's",
        "",
        "| method | inter-node MB/step | link MB/step | intra-node MB/step | inter vs flat | bytes vs 8-byte | loss vs 8-byte | ms/step | final val | vs DDP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {r["method"]: r for r in rows}

    def ratio(a_: Optional[dict], b_: dict, key: str) -> Optional[float]:
        return a_[key] / b_[key] if a_ and key in a_ and key in b_ and b_[key] else None

    for r in rows:
        m = r["method"]
        flat_ref = by.get("flat_" + m[len("hier_"):]) if m.startswith("hier_") else None
        x = ratio(flat_ref, r, "inter_per_step")
        vs_flat = f"{x:.2f}× fewer" if x else ""
        base8 = m.split("_compact")[0].replace("_chunk", "").replace("_int8", "")
        eight = by.get(base8) if base8 != m else None
        x = ratio(eight, r, "inter_per_step")
        vs_8 = f"{x:.2f}× fewer" if x else ""
        y = ratio(r, eight, "final_val") if eight else None
        loss_8 = f"{100 * (y - 1):+.2f}%" if y else ""
        vs_ddp = (f"{100 * (r['final_val'] / base['final_val'] - 1):+.2f}%"
                  if base and "final_val" in r and "final_val" in base else "")
        lines.append(
            f"| {r['label']} | {r.get('inter_per_step', float('nan')) / 1e6:.3f} | "
            f"{r.get('link_per_step', float('nan')) / 1e6:.3f} | "
            f"{r.get('intra_per_step', float('nan')) / 1e6:.3f} | {vs_flat} | {vs_8} | {loss_8} | "
            f"{r.get('ms_per_step', float('nan')):.1f} | "
            f"{r.get('final_val', float('nan')):.4f} | {vs_ddp} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--timing-steps", type=int, default=25)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--model", default="6m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--port", type=int, default=29710)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "hierarchy_netem.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--work-dir", default=None, help="records and logs (default: a new temporary folder); "
                    "quality runs already recorded there are reused")
    a = ap.parse_args()
    from experiments.netem import Cluster

    tmp = a.work_dir or tempfile.mkdtemp(prefix="commopt-hier-")
    os.makedirs(tmp, exist_ok=True)
    qs: dict[str, Optional[dict]] = {}
    ts: dict[str, Optional[dict]] = {}
    if not a.skip_quality:
        for i, m in enumerate(a.methods):
            _say(f"quality {m}: {a.steps} steps on {NODES * RPN} local ranks")
            qs[m] = quality(m, a, tmp, a.port + i)
            if qs[m]:
                _say(f"quality {m}: val {qs[m]['evals'][-1][1]:.4f}")
    with Cluster(nodes=NODES, ranks_per_node=RPN, rate=a.rate) as c:
        for i, m in enumerate(a.methods):
            _say(f"timing {m}: {a.timing_steps} steps on the emulated cluster")
            ts[m] = timing(m, a, tmp, c, a.port + 20 + i)
            if ts[m]:
                s = ts[m]["step_seconds"][a.skip:]
                _say(f"timing {m}: {1e3 * sum(s) / len(s):.1f} ms/step, link bytes {ts[m]['link_bytes']}")
    rows = [row(m, qs.get(m), ts.get(m), a) for m in a.methods]
    text = report(rows, a, " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]))
    print(text)
    if not a.no_write:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"rows": rows, "quality": qs, "timing": ts}, f)
    failed = [m for m in a.methods if (not a.skip_quality and qs.get(m) is None) or ts.get(m) is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
