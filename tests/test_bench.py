"""``commopt bench``: parsing, the cost model against hand-computed values, the fit, a tiny 2-rank run.

The check of the predictions against a measured run on an emulated link is tests/test_bench_netem.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch.distributed as dist

from commopt import costmodel as cm
from commopt.bench import (BenchConfig, default_sizes, fit_affine, fit_link, inspect_model, parse_params, parse_size,
                           predict, recommend, run_bench)
from commopt.cli import main
from commopt.costmodel import Link, MeasuredCurve
from commopt.exchange import choose_exchange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, n", [("350M", 350_000_000), ("1.3B", 1_300_000_000), ("20000000", 20_000_000),
                                     ("125k", 125_000), ("7e9", 7_000_000_000), ("1_000", 1000), (" 2.5m ", 2_500_000),
                                     (42, 42)])
def test_parse_params(text, n):
    assert parse_params(text) == n


@pytest.mark.parametrize("text", ["abc", "0", "-5", "3X", "", "1.3BB", "M"])
def test_parse_params_refuses(text):
    with pytest.raises(ValueError, match="parameter count"):
        parse_params(text)


@pytest.mark.parametrize("text, n", [("4KB", 4096), ("64MB", 64 << 20), ("1MiB", 1 << 20), ("4096", 4096),
                                     ("16k", 16384), ("1GB", 1 << 30)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["big", "2", "4 parsecs", "-4KB"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_default_sizes():
    assert default_sizes() == [4096 << i for i in range(15)]  # 4 KiB .. 64 MiB
    assert default_sizes(4096, 10240) == [4096, 8192, 10240]
    with pytest.raises(ValueError, match="below"):
        default_sizes(8192, 4096)


def test_cli_refuses_bad_arguments(capfd):
    assert main(["bench", "--params", "lots"]) == 2
    assert "cannot read the parameter count" in capfd.readouterr().err
    assert main(["bench", "--params", "1M", "--tau", "0"]) == 2
    assert main(["bench", "--params", "1M", "--min-size", "4KB", "--max-size", "4KB"]) == 2
    assert "the fit needs two or more" in capfd.readouterr().err
    assert main(["bench", "--model", "/nonexistent/model.py:build"]) == 2
    assert "no file" in capfd.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --params and --model exclude each other
        main(["bench", "--params", "1M", "--model", "x.py:f"])


def test_config_from_args():
    import argparse

    from commopt.bench import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--params", "1.3B", "--compute-ms", "250", "--tau", "24", "--ratio", "0.05",
                                         "--max-size", "16MB", "--predict-from", "fit", "--compress-numel", "1M"]))
    assert (cfg.params, cfg.compute_ms, cfg.tau, cfg.ratio) == (1_300_000_000, 250.0, 24, 0.05)
    assert (cfg.min_size, cfg.max_size, cfg.predict_from, cfg.compress_numel) == (4096, 16 << 20, "fit", 1_000_000)
    assert config_from_args(p.parse_args([])).params is None  # measure only


def test_ranks_under_a_launcher_is_refused(monkeypatch, capfd):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_bench(BenchConfig(params=1000), ranks=2) == 2
    assert "started by torchrun" in capfd.readouterr().err
    assert run_bench(BenchConfig(params=1000), ranks=0) == 2


MODEL = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 10))

def frozen():
    m = build()
    m[0].weight.requires_grad_(False)
    return m

def needs_real_tensors():  # fails on the meta device: .item() has no value there
    scale = float(torch.ones(1).item())
    return nn.Linear(10, int(10 * scale))

def not_a_model():
    return 3
"""


def test_inspect_model(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL)
    params, buckets = inspect_model(f"{path}:build")
    assert params == 2 * (1024 * 1024 + 1024) + 1024 * 10 + 10
    # DDP's assignment: gradients in reverse order, a bucket closes once it holds >= 1 MiB (the first) or
    # >= 25 MiB: [last layer, second layer], [first layer]
    assert buckets == [1024 * 10 + 10 + 1024 * 1024 + 1024, 1024 * 1024 + 1024]
    assert inspect_model(f"{path}:frozen")[0] == params - 1024 * 1024  # trainable parameters only
    assert inspect_model(f"{path}:needs_real_tensors")[0] == 110
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        inspect_model(f"{path}:not_a_model")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        inspect_model(f"{path}:nope")
    with pytest.raises(ValueError, match="path.py:factory"):
        inspect_model(str(path))


# ------------------------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("alpha, bw, hops", [(50e-6, 10e9, 2), (2e-3, 100e6, 6), (0.0, 1e9, 1)])
def test_fit_recovers_alpha_and_bandwidth_from_exact_times(alpha, bw, hops):
    wire = [float(s) for s in default_sizes()]
    times = [hops * alpha + 8 * w / bw for w in wire]
    link, misfit = fit_link(wire, times, hops)
    assert link.latency == pytest.approx(alpha, rel=1e-6, abs=1e-12)
    assert link.bandwidth == pytest.approx(bw, rel=1e-6)
    assert misfit < 1e-6


def test_fit_recovers_alpha_and_bandwidth_from_noisy_times():
    rnd = random.Random(7)
    alpha, bw, hops = 30e-6, 25e9, 2
    wire, times = [], []
    for w in default_sizes():
        for _ in range(5):  # 5 noisy medians per size, +-5 % each
            wire.append(float(w))
            times.append((hops * alpha + 8 * w / bw) * (1 + rnd.uniform(-0.05, 0.05)))
    link, misfit = fit_link(wire, times, hops)
    assert link.bandwidth == pytest.approx(bw, rel=0.05)
    assert link.latency == pytest.approx(alpha, rel=0.15)
    assert 0.01 < misfit <= 0.12


def test_fit_clamps_to_non_negative_and_refuses_one_size():
    # times that fall faster than linear at small sizes would give a negative intercept: clamped to 0
    a, b = fit_affine([1e3, 1e6, 4e6], [1e-6, 1e-3, 4.5e-3])
    assert a == 0.0 and b > 0
    a, b = fit_affine([1e3, 1e6], [2e-3, 1e-3])  # no size dependence: latency only
    assert b == 0.0 and a == pytest.approx(2 / (1 / 2e-3 + 1 / 1e-3))
    with pytest.raises(ValueError, match="two or more"):
        fit_affine([4096, 4096], [1e-3, 1e-3])


def test_measured_curve():
    curve = MeasuredCurve((1e3, 1e4, 1e5), (2e-3, 1e-3, 9e-3), Link(8e6))
    assert curve.seconds == (1e-3, 1e-3, 9e-3)  # a time above a larger message's is lowered to it
    assert curve.time(10) == 1e-3
    assert curve.time(5.5e4) == pytest.approx(5e-3)
    assert curve.time(2e5) == pytest.approx(9e-3 + 8 * 1e5 / 8e6)  # beyond: the fitted bandwidth
    assert cm.ring_allreduce_seconds(25_000, 4, 2, curve) == pytest.approx(9e-3)  # 2(n-1)/n * 4 * 25000 = 1e5 bytes
    with pytest.raises(ValueError, match="increase"):
        MeasuredCurve((2.0, 1.0), (1.0, 1.0), Link(1.0))


# ------------------------------------------------------------------------------------------- the cost model


def test_cost_model_formulas_by_hand():
    link = Link(bandwidth=1e9, latency=1e-5)
    # ring all-reduce of 1e6 fp32 values over 4 ranks: 2*3 hops, 2*3/4 * 4e6 bytes = 6e6 bytes
    assert cm.ring_allreduce_seconds(1_000_000, 4, 4, link) == pytest.approx(6e-5 + 8 * 6e6 / 1e9)
    # all-gather of 8e5-byte messages over 4 ranks: 3 hops, 3 * 8e5 bytes
    assert cm.allgather_seconds(8e5, 4, link) == pytest.approx(3e-5 + 8 * 2.4e6 / 1e9)
    assert cm.ring_allreduce_seconds(10, 4, 1, link) == 0.0
    assert cm.co2_step_seconds(0.1, 2.0, 12) == pytest.approx(0.1 + 0.8 / 12)
    assert cm.co2_step_seconds(0.2, 2.0, 12) == pytest.approx(0.2)  # hidden: 12 * 0.2 >= 2
    assert cm.local_sgd_step_seconds(0.1, 2.0, 12) == pytest.approx(0.1 + 2 / 12)
    assert cm.sync_step_seconds(0.1, 0.3) == pytest.approx(0.4)
    assert cm.pipelined_seconds([1, 1], [2, 2]) == 5     # transfer-bound: first work, then every transfer
    assert cm.pipelined_seconds([3, 3], [1, 1]) == 7     # work-bound: every work, then the last transfer
    assert cm.pipelined_seconds([4], [3]) == 7
    buckets = cm.ddp_bucket_numels(350_000_000)
    assert buckets[0] == 262_144 and set(buckets[1:-1]) == {6_553_600} and sum(buckets) == 350_000_000
    assert len(buckets) == 1 + math.ceil((350_000_000 - 262_144) / 6_553_600) == 55
    # one latency per bucket: 55 buckets x 2(n-1) hops on top of the bytes of one flat all-reduce
    assert cm.bucketed_allreduce_seconds(350_000_000, 4, 4, link) == pytest.approx(
        55 * 6e-5 + 8 * 1.5 * 4 * 350_000_000 / 1e9)
    assert cm.exchange_bytes("gather", 100, 10_000, 4) == 3 * 8 * 100
    assert cm.exchange_bytes("shared", 100, 10_000, 4) == pytest.approx(1.5 * 400)
    assert cm.exchange_bytes("dense", 100, 10_000, 4) == pytest.approx(1.5 * 40_000)


def test_compressed_exchange_rule_matches_the_hook():
    for shared in (False, True):
        for n in (2, 3, 4, 8):
            for d in (10, 100, 1000):
                for k in (1, d // 10, d // n - 1, d // n, d // n + 1, d - 1, d):
                    if k >= 1:
                        assert cm.compressed_exchange(shared, k, d, n) == choose_exchange(shared, k, d, n)


def test_predict_by_hand():
    P, n = 1_000_000, 2
    link = Link(bandwidth=1e9, latency=1e-4)
    rates = {"topk+ef14": 1e8, "topk+ef21sgdm": 5e7, "topk+econtrol": 2.5e7, "randk+ef14": 2e8,
             "randk+ef21sgdm": 1e8, "randk+econtrol": 1e8, "bf16": 1e9}
    rows = {r.name: r for r in predict(P, n, link, link, rates, ratio=0.01, tau=10, compute_s=0.01)}
    b = [262_144, P - 262_144]                       # 1 MiB first bucket, then the rest
    # dense: per bucket 2(n-1) = 2 hops and 2(n-1)/n * 4b = 4b bytes
    dense = sum(2e-4 + 8 * 4 * x / 1e9 for x in b)
    assert rows["dense DDP fp32"].comm_s == pytest.approx(dense)
    assert rows["dense DDP fp32"].bytes_per_step == 4 * P
    assert rows["dense DDP fp32"].step_s == pytest.approx(0.01 + dense)
    # TopK 1 %: k = floor(0.01 b) per bucket; all-gather of 8k bytes, 1 hop; compression b / rate, pipelined
    k = [2621, 7378]
    gather = [1e-4 + 8 * 8 * x / 1e9 for x in k]
    work = [x / 1e8 for x in b]
    done1 = work[0] + gather[0]
    expected = max(done1, work[0] + work[1]) + gather[1]
    topk = rows["TopK 1% + EF14"]
    assert topk.comm_s == pytest.approx(expected) and topk.bytes_per_step == 8 * sum(k)
    assert topk.link_s == pytest.approx(sum(gather)) and topk.compress_s == pytest.approx(P / 1e8)
    assert "all-gather" in topk.exchange
    # RandK 1 %: all-reduce of the k shared values, 4k bytes
    randk = rows["RandK 1% + EF14"]
    assert randk.bytes_per_step == 4 * sum(k)
    shared = [2e-4 + 8 * 4 * x / 1e9 for x in k]
    assert randk.comm_s == pytest.approx(max(b[0] / 2e8 + shared[0], P / 2e8) + shared[1])
    # CO2 / local SGD: one flat all-reduce D of P values every tau = 10 steps
    D = 2e-4 + 8 * 4 * P / 1e9
    assert rows["CO2 tau=10"].comm_s == 0.0 and rows["CO2 tau=10"].step_s == pytest.approx(0.01)  # 10c >= D
    assert rows["local SGD tau=10 (blocking)"].step_s == pytest.approx(0.01 + D / 10)
    assert rows["CO2 tau=10"].bytes_per_step == pytest.approx(4 * P / 10)
    # bf16: half the bytes plus the cast
    assert rows["DDP bf16 all-reduce"].bytes_per_step == 2 * P


def test_predict_dense_fallback_and_recommendations():
    link = Link(1e9, 1e-4)
    rows = predict(10_000_000, 2, link, link, {}, ratio=0.5, tau=12)
    topk = next(r for r in rows if r.name.startswith("TopK"))
    assert "all-reduce (dense)" in topk.exchange and "dense fallback" in topk.note  # k/d >= 1/n (SPEC §3)
    assert next(r for r in rows if r.name.startswith("RandK")).exchange.startswith("all-reduce (k)")
    # a slow link and enough compute to hide the exchange: CO2; a fast link: dense DDP
    rates = {f"{c}+{f}": 5e7 for c in ("topk", "randk") for f in ("ef14", "ef21sgdm", "econtrol")}
    slow = predict(100_000_000, 4, Link(1e9, 1e-4), Link(1e9, 1e-4), rates, tau=12, compute_s=0.1)
    lines = recommend(slow, 0.1)
    assert lines[0].startswith("recommendation: CO2 tau=12") and "with a gradient exchange every step" in lines[1]
    fast = predict(1_000_000, 4, Link(400e9, 1e-6), Link(400e9, 1e-6), {}, compute_s=0.1)
    assert recommend(fast, 0.1)[0].startswith("recommendation: dense DDP")
    assert "give --compute-ms" in recommend(predict(10_000_000, 2, link, link, {}), None)[-1]
    with pytest.raises(ValueError, match="2 ranks"):
        predict(1000, 1, link, link, {})


# ------------------------------------------------------------------------------------------- runs


@pytest.mark.timeout(240)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_local_ranks_run_prints_progress_and_table(tmp_path, capfd):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--ranks", "2", "--params", "20M", "--compute-ms", "5", "--max-size", "64KB",
               "--time-per-size", "0.02", "--compress-numel", "64k", "--json", str(out_json)])
    out = capfd.readouterr().out
    assert rc == 0, out[-3000:]
    assert "commopt bench: 2 rank(s) (gloo, cpu" in out
    for progress in ("measuring all_reduce 4 KiB (1/10)...", "measuring all_gather 64 KiB per rank (10/10)...",
                     "measuring compression TopK 1% + EControl", "timed round 5/5"):
        assert progress in out, out[-3000:]
    for row in ("dense DDP fp32", "DDP bf16 all-reduce", "TopK 1% + EF14", "TopK 1% + EF21-SGDM", "RandK 1% + EControl",
                "CO2 tau=12", "local SGD tau=12 (blocking)"):
        assert f"\n  {row:<29} |" in out, row
    assert "step ms" in out and "\nrecommendation: " in out and "fit all_reduce: t = 2*alpha" in out
    data = json.loads(out_json.read_text())
    assert data["measured"]["world_size"] == 2 and len(data["measured"]["allreduce"]) == 5
    assert data["measured"]["allreduce_link"]["bandwidth"] > 0
    assert set(data["measured"]["rates"]) == {f"{c}+{f}" for c in ("topk", "randk")
                                              for f in ("ef14", "ef21sgdm", "econtrol")} | {"bf16"}
    assert all(r["step_s"] >= 0.005 for r in data["predictions"])


@pytest.mark.timeout(120)
def test_single_process_measures_compression_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "commopt", "bench", "--params", "1M", "--compress-numel", "16k"],
                         capture_output=True, text=True, timeout=110, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rank: no collective to measure" in res.stdout
    assert "TopK 1% + EF14" in res.stdout and "M elements/s" in res.stdout
    assert "predicted communication" not in res.stdout
