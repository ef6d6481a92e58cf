"""experiments/bench_kernels.py on tiny buckets (it writes the table), its target lines, and the packaging of csrc/."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench_kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _opencl_ok() -> bool:
    try:
        from commopt.kernels.opencl import available
        return available()[0]
    except Exception:  # noqa: BLE001
        return False


def test_bench_kernels_writes_table(tmp_path: Path) -> None:
    paths = "torch,opencl" if _opencl_ok() else "torch"
    out = tmp_path / "kernels_tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1000,3k", "--densities", "1%,0.1",
                           "--paths", paths, "--repeats", "1", "--warmup", "0", "--copy-size", "100k",
                           "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (tmp_path / "kernels_tiny.md").read_text()
    assert "| workload | d | density | k | path | ms | GB/s | × ref | % copy | same |" in md
    assert "copy bandwidth" in md and "CPU figures" in md
    rows = list(csv.DictReader(open(tmp_path / "kernels_tiny.csv")))
    n_paths = len(paths.split(","))
    assert len(rows) == 2 * 2 * 5 * n_paths  # sizes × densities × workloads × paths
    assert {r["workload"] for r in rows} == {"topk+ef14", "randk+ef14", "topk+econtrol", "sum2", "sum8"}
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0
        assert r["same"] in ("ref", "yes"), r  # every kernel path gives the reference path's message
        if r["path"] == "torch":
            assert float(r["speedup"]) == 1.0
    k = {(int(r["d"]), float(r["density"])): int(r["k"]) for r in rows}
    assert k[(3000, 0.01)] == 30 and k[(1000, 0.1)] == 100
    r = next(r for r in rows if r["workload"] == "topk+econtrol")
    assert int(r["floor_bytes"]) == 20 * int(r["d"])
    r = next(r for r in rows if r["workload"] == "sum8")
    assert int(r["floor_bytes"]) == 4 * int(r["d"]) + 8 * 8 * int(r["k"])


def test_bench_kernels_refuses_unavailable_path(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1000", "--paths", "cuda", "--device", "cpu",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cuda path cannot run" in proc.stderr


def test_target_lines() -> None:
    bk = _load()
    row = {"path": "cuda", "workload": "topk+ef14", "d": 25_000_000, "density": 0.01, "speedup": 6.0,
           "gbps": 2000.0, "copy_gbps": 4000.0, "copy_fraction": 0.5}
    lines = bk.target_lines([row], ["torch", "cuda"])
    assert len(lines) == 2 and all(line.endswith("PASS") for line in lines)
    lines = bk.target_lines([{**row, "speedup": 4.0, "copy_fraction": 0.3, "gbps": 1200.0}], ["torch", "cuda"])
    assert all(line.endswith("MISS") for line in lines)
    assert "not measured" in bk.target_lines([{**row, "d": 1_000_000}], ["torch", "cuda"])[0]


def test_parse_helpers() -> None:
    bk = _load()
    assert [bk.parse_size(s) for s in ("1000", "1M", "25M", "2.5k")] == [1000, 10**6, 25 * 10**6, 2500]
    assert [bk.parse_density(s) for s in ("0.1%", "1%", "0.1")] == [0.001, 0.01, 0.1]
    assert [bk.fmt_size(d) for d in (1000, 10**6, 25 * 10**6, 1234)] == ["1k", "1M", "25M", "1234"]


def test_pyproject_lists_every_package() -> None:
    """pyproject lists the packages (so csrc/ ships as commopt/kernels/csrc): a new subpackage must be added."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "commopt").rglob("__init__.py")}
    assert set(cfg["packages"]) == found | {"commopt.kernels.csrc"}
    assert cfg["package-dir"]["commopt.kernels.csrc"] == "csrc"
    assert (REPO / "csrc" / "portable.h").is_file()
