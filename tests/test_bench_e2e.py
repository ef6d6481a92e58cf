"""experiments/bench_e2e.py: the report's arithmetic on synthetic records, and a real two-rank smoke run."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import bench_e2e  # noqa: E402


def _rec(method, evals, bytes_per_step, step_seconds, params=1000, steps=40):
    return {"method": method, "evals": evals, "bytes_per_step": bytes_per_step, "step_seconds": step_seconds,
            "world_size": 2, "spec": {"kind": "test"},
            "params": params, "steps": steps}


def _write(path, rec):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rec, f)


@pytest.fixture
def fake_results(tmp_path, monkeypatch):
    raw, res = tmp_path / "e2e", tmp_path / "results"
    res.mkdir()
    monkeypatch.setattr(bench_e2e, "RAW", str(raw))
    monkeypatch.setattr(bench_e2e, "RESULTS", str(res))
    q, t = raw / "quality" / "2x1", raw / "timing" / "2x1_1gbit"
    _write(str(q / "ddp.json"), _rec("ddp", [(0, 4.0), (10, 3.0), (20, 2.5), (30, 2.4), (40, 2.3)], 8000.0, [0.0]))
    _write(str(q / "commopt_a.json"), _rec("commopt_a", [(0, 4.0), (10, 2.9), (20, 2.6), (30, 2.5), (40, 2.45)],
                                           100.0, [0.0]))
    _write(str(q / "commopt_b.json"), _rec("commopt_b", [(0, 4.0), (10, 3.5), (20, 3.0), (30, 2.9), (40, 2.5)],
                                           10.0, [0.0]))
    _write(str(q / "commopt_c.json"), _rec("commopt_c", [(0, 4.0), (10, 3.5), (20, 3.0), (30, 2.9), (40, 2.8)],
                                           10.0, [0.0]))
    # timing: 10 skipped steps at 9 s, then the window
    _write(str(t / "ddp.json"), _rec("ddp", [], 0, [9.0] * 10 + [2.0] * 24))
    _write(str(t / "commopt_a.json"), _rec("commopt_a", [], 0, [1.0] * 10 + [0.5, 1.5] * 12))
    _write(str(t / "commopt_b.json"), _rec("commopt_b", [], 0, [9.0] * 10 + [0.4] * 24))
    _write(str(t / "commopt_c.json"), _rec("commopt_c", [], 0, [9.0] * 10 + [0.4] * 24))
    _write(str(t / "floor.json"), _rec("floor", [], 0, [9.0] * 10 + [0.4] * 24))
    return res


def test_report_columns_targets_and_times(fake_results):
    a = bench_e2e.parse(["report", "--layouts", "2x1", "--links", "1gbit", "--target-step", "20", "--skip", "10",
                         "--timing-steps", "34", "--methods", "floor", "ddp", "commopt_a", "commopt_b", "commopt_c"])
    rows = bench_e2e.report(a)
    with open(fake_results / "time_to_loss.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["method", "link", "nodes", "ranks_per_node", "ms_per_step", "floor_ms_per_step",
                        "bytes_per_step", "steps_to_target", "seconds_to_target", "final_val_loss"]
    by = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert set(by) == {"floor", "ddp", "commopt_a", "commopt_b", "commopt_c"}
    # target = ddp's loss at step 20 (2.5): ddp reaches it at 20, commopt_a at 30, commopt_b at 40, commopt_c never
    # wall time: the timing run's measured steps (the slow first 10 included), then its steady mean (steps 10..)
    assert by["ddp"]["steps_to_target"] == "20" and by["ddp"]["seconds_to_target"] == "110.0"  # 10·9 + 10·2
    assert by["commopt_a"]["steps_to_target"] == "30" and by["commopt_a"]["seconds_to_target"] == "30.0"  # 10 + 20
    assert by["commopt_a"]["ms_per_step"] == "1000.0" and by["commopt_a"]["floor_ms_per_step"] == "400.0"
    # beyond the 34 measured steps: 90 + 24·0.4 + 6·0.4
    assert by["commopt_b"]["steps_to_target"] == "40" and by["commopt_b"]["seconds_to_target"] == "102.0"
    assert by["commopt_c"]["steps_to_target"] == "" and by["commopt_c"]["seconds_to_target"] == ""
    assert by["floor"]["steps_to_target"] == ""
    md = (fake_results / "time_to_loss.md").read_text()
    assert "First to the target: **commopt_a** (30.0 s)" in md
    assert "3.67× sooner than ddp" in md and "2.50× the compute-only floor" in md
    assert "Did not reach the target within the run: commopt_c" in md
    assert len(rows) == 5


def test_steps_to_ignores_the_initial_evaluation():
    assert bench_e2e.steps_to([(0, 1.0), (10, 3.0), (20, 0.9)], 2.0) == 20
    assert bench_e2e.steps_to([(0, 1.0), (10, 3.0)], 2.0) is None


@pytest.mark.timeout(240)
def test_worker_smoke_two_ranks(tmp_path):
    out = str(tmp_path / "run.json")
    a = bench_e2e.parse(["quality", "--steps", "4", "--eval-every", "2"])
    argv = bench_e2e._worker_argv("commopt_topk1_ef14", a, 4, 2, out)
    rc = bench_e2e.run_local(argv, 2, 1, 29871, str(tmp_path / "log"), timeout=200)
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    rec = json.load(open(out))
    assert [s for s, _ in rec["evals"]] == [0, 2, 4]
    assert len(rec["step_seconds"]) == 4 and rec["world_size"] == 2
    # 2 dense warm-up rounds, then 2 compressed ones: fewer bytes than 4 dense steps, more than 2
    dense = 2 * 4 * rec["params"] * (2 - 1) / 2
    assert 2 * dense < rec["bytes_total"] < 4 * dense
