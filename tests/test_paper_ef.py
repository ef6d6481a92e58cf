"""experiments/paper_ef.py in its quick configuration: the known outcomes of SPEC §5 E1/E2, EControl's η
range and EF21's tolerance of steps above its theory, asserted from the measured numbers."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import paper_ef  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def res():
    return paper_ef.run_all(paper_ef.CONFIGS["quick"])


def _row(rows, key, value):
    return next(r for r in rows if r[key] == value)


def test_e1_no_feedback_grows_by_1_plus_11lr_over_6(res):
    growth = res["e1"]["growth"]
    assert [g["lr"] for g in growth] == [0.01, 0.1, 1.0]
    for g in growth:
        assert g["q"] == pytest.approx(1 + 11 * g["lr"] / 6, rel=1e-15)
        assert g["x_rel_dev"] < 1e-12 and g["f_rel_dev"] < 1e-12
        assert g["x_ratio_min"] == pytest.approx(g["q"], rel=1e-12)
        assert g["x_ratio_max"] == pytest.approx(g["q"], rel=1e-12)
        assert g["dense_first"] == pytest.approx(1 - 7 * g["lr"] / 6, rel=1e-12)
    curve = res["e1"]["curves"]["none"]
    q = 1 + 11 * res["e1"]["lr"] / 6
    assert curve[-1] / curve[1] == pytest.approx(q ** (2 * (len(curve) - 2)), rel=1e-9)


@pytest.mark.parametrize("name", ["EF14", "EF21", "EControl η=0.1"])
def test_e1_feedback_reaches_1e_minus_15(res, name):
    row = _row(res["e1"]["rows"], "method", name)
    assert row["final"] < 1e-15
    assert row["first_below"] is not None and row["first_below"] <= res["e1"]["steps"]
    assert row["holds"]


def test_e2_outcomes_and_ordering(res):
    e2 = res["e2"]
    assert e2["gamma"] == pytest.approx(5.06e-3, rel=1e-3)  # SPEC: ≈ 5e−3
    final = {r["method"]: r["final"] for r in e2["rows"]}
    assert all(math.isfinite(v) for v in final.values())
    assert final["EF21"] < 1e-8 and final["EControl η=δ"] < 1e-8
    assert final["EF14"] > 1e-3
    assert final["none"] > 0.1
    assert max(final["EF21"], final["EControl η=δ"]) < final["EF14"] < final["none"]
    assert all(r["holds"] for r in e2["rows"])


def test_eta_sweep_converges_up_to_2delta_diverges_at_4delta(res):
    rows = res["eta"]["rows"]
    assert {r["mult"] for r in rows} >= {0.25, 1.0, 4.0}
    for r in rows:
        if r["mult"] <= 2.0:
            assert r["final"] < 1e-8, r
        else:
            assert (not math.isfinite(r["final"])) or r["final"] > 1e6 * res["eta"]["curves"][r["mult"]][0], r
    assert _row(rows, "mult", 4.0)["diverged"]


def test_logreg_ef21_tolerates_steps_above_theory(res):
    lr = res["logreg"]
    final, g0 = lr["final"], lr["g0"]
    # EF21 converges at 16× its theory step and not at 512×; EF14 at 16× stalls far above EF21
    assert final["EF21"][16.0] <= paper_ef.LOGREG_CONVERGED * g0
    assert final["EF21"][512.0] > paper_ef.LOGREG_CONVERGED * g0
    assert final["EF14"][16.0] > 100 * final["EF21"][16.0]
    largest = _row(lr["summary"], "method", "EF21")["largest"]
    assert largest is not None and largest >= 16.0
    p = lr["prob"]
    assert p["gamma_theory"] == pytest.approx(paper_ef.ef21_theory_step(p["L"], p["L_i"], p["delta"]))
    assert p["gamma_theory"] * p["L"] < 0.05  # the theory step is far below 1/L at δ = 1/40


def test_report_and_plots(res, tmp_path):
    text = paper_ef.markdown(res["e1"], res["e2"], res["eta"], res["logreg"], "python experiments/paper_ef.py --quick",
                             (1.0, 1.0))
    assert "## 4. EF21's step-size tolerance" in text and "**no**" not in text
    paper_ef.plot_e1(res["e1"], str(tmp_path / "e1.png"))
    paper_ef.plot_e2(res["e2"], str(tmp_path / "e2.png"))
    paper_ef.plot_eta(res["eta"], str(tmp_path / "eta.png"))
    paper_ef.plot_logreg(res["logreg"], str(tmp_path / "logreg.png"))
    for name in ("e1", "e2", "eta", "logreg"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
