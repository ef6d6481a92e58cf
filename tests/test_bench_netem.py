"""``commopt bench``'s predictions against a measured run on an emulated link (experiments/netem).

Two emulated nodes (network namespaces on a bridge, each link ``tc tbf``-shaped to RATE each way), one
rank each, one job per rank (this file run as a script, :func:`_worker`): first ``commopt bench --model``
(the CLI's entry point) measures the link and the compressors there and predicts the communication per
step of a 1.18 M-parameter MLP (two DDP buckets); then real DDP training steps of that MLP are timed:
plain DDP, commopt's hook with TopK 10 % + EF14 and TopK 10 % + EControl, and the plain step under
``no_sync()`` (compute only). Measured communication per step = step time − compute-only step time; it
must lie within ±25 % of the prediction for dense DDP and ±30 % for the two compressed runs. The fitted
all-reduce bandwidth must be near the configured rate.

On the loaded 2-core machine this was written on (load average 4-11), seven runs gave ratios predicted /
measured of 0.93-1.01 (dense), 0.94-1.15 (TopK + EF14) and 0.97-1.22 (TopK + EControl).

Needs root and iproute2 (skips otherwise). About 50 s.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: the emulated link (each way) and its rate in bit/s
RATE, RATE_BPS = "50mbit", 50e6
#: predicted vs measured communication per step, relative: dense DDP (link only), and the compressed runs
#: (their compression is CPU time that other jobs' load changes between the bench and the run)
TOLERANCE, TOLERANCE_COMPRESSED = 0.25, 0.30
WIDTH = 768
PARAMS = 2 * (WIDTH * WIDTH + WIDTH)
#: the model both runs use (``--model`` of the bench: DDP's bucket layout, two buckets of W·W + W)
MODEL_SRC = f"""
from torch import nn

def build():
    return nn.Sequential(nn.Linear({WIDTH}, {WIDTH}), nn.ReLU(), nn.Linear({WIDTH}, {WIDTH}))
"""
#: the compressed runs, at k/d = 10 %: TopK (k/d < 1/n: the all-gather) with EF14 and with EControl. The link
#: dominates both: how much of the compression the hook hides behind the other bucket's collective varies
#: with the load on this CPU, so these checks do not tell a right compression term from a missing one
#: (test_bench.py checks the formula). RandK + EF14 (an all-reduce of the k values, which gloo sums on the
#: CPU) is left out: under the other jobs' load its measured time swung from 0.84x to 1.45x the prediction.
RATIO = 0.1
CASES = (("topk", "ef14", "TopK", "EF14"), ("topk", "econtrol", "TopK", "EControl"))
STEPS, WARMUP = 7, 2


def _worker(model_spec: str, out_path: str, bench_args: "list[str]") -> None:
    """One rank (started inside a node's namespace with the env:// variables set): first ``commopt bench
    <bench_args>`` (the CLI's entry point, in this process: one interpreter start less), then the
    measured training steps in a fresh process group."""
    import datetime
    import statistics
    import time
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commopt
    from commopt.bench import _load_factory

    from commopt.cli import main as cli_main

    torch.set_num_threads(1)
    rc = cli_main(["bench", *bench_args])
    if rc != 0:
        raise SystemExit(rc)
    os.environ["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)  # the bench's store port may linger
    commopt.init_distributed(timeout=datetime.timedelta(seconds=60))
    tick = torch.zeros(1)

    def make() -> DDP:
        torch.manual_seed(0)
        return DDP(_load_factory(model_spec)(), init_sync=False)  # same seed on every rank: no broadcast needed

    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    x, y = torch.randn(16, WIDTH, generator=gen), torch.randn(16, WIDTH, generator=gen)

    def timed_steps(ddp: DDP, opt, sync: bool, warmup: int = WARMUP, steps: int = STEPS) -> float:
        times = []
        for _ in range(warmup + steps):
            dist.all_reduce(tick)  # line the ranks up
            t0 = time.perf_counter()
            with nullcontext() if sync else ddp.no_sync():
                loss = F.mse_loss(ddp(x), y)
                opt.zero_grad()
                loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(times[warmup:], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return statistics.median(slowest.tolist())

    dense = make()
    assert sum(p.numel() for p in dense.parameters()) == PARAMS
    dense_opt = torch.optim.SGD(dense.parameters(), lr=1e-3)
    res = {"compute_before": timed_steps(dense, dense_opt, sync=False)}
    res["dense"] = timed_steps(dense, dense_opt, sync=True, steps=5)  # 0.8 s each and steady
    for comp, fb, _, _ in CASES:
        model = make()
        opt = commopt.CompressedOptimizer(model, torch.optim.SGD(model.parameters(), lr=1e-3),
                                          compressor=f"{comp}:{RATIO}", feedback=fb, warmup_steps=1)
        res[f"{comp}+{fb}"] = timed_steps(model, opt, sync=True, warmup=WARMUP + 1)  # + its dense warm-up step
        res[f"{comp}+{fb} collectives"] = dict(opt.comm_stats().get("collectives", {}))
    res["compute_after"] = timed_steps(dense, dense_opt, sync=False)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
    raise SystemExit(0)


from experiments.netem import Cluster, list_objects  # noqa: E402

pytestmark = pytest.mark.timeout(240)
PY = sys.executable


def _logs(tmp, names) -> str:
    return "\n".join(f"--- {n}\n" + ((tmp / n).read_text()[-3000:] if (tmp / n).exists() else "(none)")
                     for n in names)


def test_bench_predicts_measured_comm_on_emulated_link(netem, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    pred_path, meas_path = str(tmp_path / "bench.json"), str(tmp_path / "measured.json")
    (tmp_path / "mlp.py").write_text(MODEL_SRC)
    model = f"{tmp_path / 'mlp.py'}:build"
    bench = ["--model", model, "--ratio", str(RATIO), "--max-size", "3MB", "--time-per-size", "0.2",
             "--compress-numel", "1M", "--json", pred_path]
    with Cluster(2, 1, RATE, master_port=29671) as c:
        tag = c.tag
        procs = c.start_ranks([PY, os.path.abspath(__file__), model, meas_path, *bench], env=env,
                              log_dir=str(tmp_path))
        codes = c.wait(timeout=150, procs=procs)
        assert codes == [0, 0], _logs(tmp_path, ["rank0.log", "rank1.log"])
    objs = list_objects()
    assert [o for o in objs["netns"] + objs["links"] if o.startswith(tag)] == []

    out = (tmp_path / "rank0.log").read_text()
    assert "measuring all_reduce 3 MiB" in out and "measuring compression TopK 10% + EControl" in out
    assert "recommendation:" in out and "dense DDP fp32" in out
    pred = json.load(open(pred_path))
    meas = json.load(open(meas_path))
    rows = {r["name"]: r for r in pred["predictions"]}
    assert pred["config"]["params"] == PARAMS and pred["config"]["buckets"] == [PARAMS // 2] * 2
    link = pred["measured"]["allreduce_link"]
    print(f"\nfit: all_reduce alpha {1e6 * link['latency']:.0f} us/hop, B {link['bandwidth'] / 1e6:.1f} Mbit/s; "
          f"all_gather B {pred['measured']['allgather_link']['bandwidth'] / 1e6:.1f} Mbit/s (link {RATE})")
    # the fits see the shaped rate (less TCP/IP headers), not the CPU or loopback; gloo's all-gather gets less
    # of it than its all-reduce (about 2/3 here), so only its upper bound is checked
    assert 0.8 * RATE_BPS <= link["bandwidth"] <= 1.05 * RATE_BPS, link
    assert pred["measured"]["allgather_link"]["bandwidth"] <= 1.05 * RATE_BPS, pred["measured"]["allgather_link"]

    compute = (meas["compute_before"] + meas["compute_after"]) / 2
    pct = f"{100 * RATIO:g}%"
    checks = [("dense DDP fp32", meas["dense"] - compute)]
    checks += [(f"{cname} {pct} + {fname}", meas[f"{comp}+{fb}"] - compute) for comp, fb, cname, fname in CASES]
    report = []
    for name, measured in checks:
        predicted = rows[name]["comm_s"]
        report.append(f"{name}: predicted {1e3 * predicted:.1f} ms (link {1e3 * rows[name]['link_s']:.1f}, "
                      f"compress {1e3 * rows[name]['compress_s']:.1f}), measured {1e3 * measured:.1f} ms "
                      f"(step {1e3 * (measured + compute):.1f} - compute {1e3 * compute:.1f}), "
                      f"ratio {predicted / measured:.2f}")
    print("\n".join(report))
    for i, ((name, measured), line) in enumerate(zip(checks, report)):
        assert abs(rows[name]["comm_s"] / measured - 1) <= (TOLERANCE if i == 0 else TOLERANCE_COMPRESSED), line
    # the runs compressed with the collective the prediction assumed (SPEC §3: all-gather while k/d < 1/n);
    # "dense": the warm-up step
    for comp, fb, cname, fname in CASES:
        assert set(meas[f"{comp}+{fb} collectives"]) == {"dense", "gather"}, meas
        assert rows[f"{cname} {pct} + {fname}"]["exchange"].startswith("all-gather")
