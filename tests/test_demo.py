"""``commopt demo``: the table it prints, the closing lines computed from it, its data and its errors.

The end-to-end run (2 spawned gloo ranks, 16 steps per setting) is too short to learn anything, so it
checks the table's shape, the byte counts, the predicted columns against the cost model and that every
closing line agrees with the numbers in the table, whichever way they came out. :func:`summary_lines`
is also checked on made-up rows, where the outcome is known.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from commopt import costmodel as cm
from commopt.demo import CLOSE_POINTS, LINKS, SETTINGS, Setting, SyntheticTask, make_mlp, run_demo, summary_lines

ROW = re.compile(
    r"^(?P<name>.+?) +\| +(?P<acc>[\d.]+)% \| +(?P<bytes>[\d.]+) (?P<unit>kB|MB) \| +(?P<ms>[\d.]+) \| "
    r"+(?P<compute>[\d.]+) \| +(?P<p1>[\d.]+) \| +(?P<p2>[\d.]+)$")
N_RANKS, STEPS = 2, 16
(SLOW_LINK, FAST_LINK) = (LINKS[-1][0], LINKS[0][0])


def parse_table(out: str) -> dict[str, dict[str, float]]:
    """Rows of the final table: name -> acc (%), bytes (per rank per step), ms, compute, p1, p2 (ms/step)."""
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m:
            scale = 1e3 if m["unit"] == "kB" else 1e6
            rows[m["name"]] = {"acc": float(m["acc"]), "bytes": float(m["bytes"]) * scale,
                               **{k: float(m[k]) for k in ("ms", "compute", "p1", "p2")}}
    return rows


def closing_lines(out: str) -> list[str]:
    assert "\nwhat this run measured:\n" in out, out[-3000:]
    tail = out.split("\nwhat this run measured:\n", 1)[1]
    return [line for line in tail.splitlines() if line.startswith("- ")]


def check_closing_lines(lines: list[str], rows: dict[str, dict[str, float]], acc_tol: float,
                        required: tuple[str, ...] = ()) -> None:
    """Every closing line states what the table's numbers say (``acc_tol``: rounding of the accuracies, in
    points); the lines about no feedback, feedback, both links and each of ``required`` must be there."""
    dense = rows["dense DDP"]
    seen = set()
    printed_gap = None
    for line in lines:
        m = re.match(r"- without feedback, (.+?) ends ([\d.]+) points (below|above|level with) dense DDP "
                     r"\(([\d.]+)% vs ([\d.]+)%\)\.$", line)
        if m:
            seen.add("plain")
            plain = rows[f"{m[1]}, no feedback"]
            gap = dense["acc"] - plain["acc"]
            assert abs(float(m[2]) - abs(gap)) <= 0.05 + acc_tol, line
            if abs(gap) > 0.05 + acc_tol:
                assert m[3] == ("below" if gap > 0 else "above"), line
            assert abs(float(m[4]) - plain["acc"]) <= 0.05 + acc_tol, line
            assert abs(float(m[5]) - dense["acc"]) <= 0.05 + acc_tol, line
            printed_gap = float(m[2]) if m[3] == "below" else -float(m[2])
            continue
        m = re.match(r"- error feedback closes this share of that gap: (.+) \(100% = ", line)
        if m:
            seen.add("feedback")
            assert printed_gap is not None and printed_gap >= CLOSE_POINTS - 0.05, line
            plain = rows[next(n for n in rows if n.endswith("no feedback"))]
            for part in m[1].split(", "):
                rule, share = part.rsplit(" ", 1)
                row = rows[next(n for n in rows if n.endswith(f"+ {rule}") and n.startswith("TopK"))]
                want = 100 * (row["acc"] - plain["acc"]) / (dense["acc"] - plain["acc"])
                tol = 0.5 + 100 * 2 * (acc_tol + 0.005) / abs(dense["acc"] - plain["acc"]) * (1 + abs(want) / 100)
                assert abs(float(share.rstrip("%")) - want) <= tol, (line, want)
            continue
        if line.startswith("- no gap of"):
            seen.add("feedback")
            assert printed_gap is not None and printed_gap < CLOSE_POINTS + 0.05, line
            continue
        m = re.match(r"- (.+?): ([\d.]+)% \(([+-][\d.]+) points vs dense DDP\) (at|with) (.+)\.$", line)
        if m:
            row = rows[m[1]]
            seen.add(m[1])
            assert abs(float(m[2]) - row["acc"]) <= 0.05 + acc_tol, line
            assert abs(float(m[3]) - (row["acc"] - dense["acc"])) <= 0.05 + 2 * acc_tol, line
            if m[4] == "with" and row["bytes"] > 0:
                fewer = re.fullmatch(r"([\d.]+)x fewer bytes per step", m[5])
                assert fewer and float(fewer[1]) == pytest.approx(dense["bytes"] / row["bytes"], rel=0.01), line
            elif m[4] == "with":
                assert m[5] == "no bytes sent", line
            continue
        m = re.match(r"- predicted for (.+?) \(the most accurate with feedback\): (.+)\.$", line)
        if m:
            seen.add("predicted feedback")
            row = rows[m[1]]
            fb_rows = [r for n, r in rows.items() if n.startswith("TopK") and "+" in n]
            assert row["acc"] >= max(r["acc"] for r in fb_rows) - 2 * acc_tol, line
            parts = re.findall(r"([\d.]+) ms/step at (.+?) \(([\d.]+)x (faster|slower) than dense DDP\)", m[2])
            assert [p[1] for p in parts] == [FAST_LINK, SLOW_LINK], line
            for (t, _, _, word), col in zip(parts, ("p1", "p2"), strict=True):
                assert float(t) == pytest.approx(row[col], abs=0.06), line
                if abs(row[col] - dense[col]) > 0.02:
                    assert word == ("faster" if row[col] < dense[col] else "slower"), line
            continue
        m = re.match(r"- predicted at (.+?): dense DDP ([\d.]+) ms/step; (.+)\.$", line)
        if m:
            seen.add(f"predicted {m[1]}")
            col = "p2" if m[1] == SLOW_LINK else "p1"
            assert float(m[2]) == pytest.approx(dense[col], abs=0.06), line
            close = {n: r for n, r in rows.items() if n != "dense DDP" and r["acc"] >= dense["acc"] - CLOSE_POINTS}
            border = any(abs(r["acc"] - (dense["acc"] - CLOSE_POINTS)) <= 2 * acc_tol for r in rows.values())
            b = re.match(r"the fastest setting at most \d+ point less accurate: (.+), ([\d.]+) ms/step "
                         r"\(([\d.]+)x (faster|slower)\)$", m[3])
            if b is None:
                assert m[3].startswith("every other setting is more than"), line
                assert border or not close, line
                continue
            assert border or b[1] in close, line
            best = rows[b[1]]
            assert float(b[2]) == pytest.approx(best[col], abs=0.06), line
            if not border:
                assert best[col] <= min(r[col] for r in close.values()) + 0.01, line
            assert b[4] == ("faster" if best[col] < dense[col] else "slower") or abs(best[col] - dense[col]) < 0.02
            continue
        raise AssertionError(f"closing line not understood: {line!r}")
    want = {"plain", "feedback", "predicted feedback", f"predicted {SLOW_LINK}", f"predicted {FAST_LINK}", *required}
    assert want <= seen, (want - seen, lines)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_demo_prints_the_table_and_consistent_conclusions(capfd):
    assert run_demo(ranks=N_RANKS, steps=STEPS) == 0
    out = capfd.readouterr().out
    assert "demo finished in" in out

    header = next(line for line in out.splitlines() if line.startswith("setting "))
    for col in ("test acc", "bytes/step", "measured", "compute"):
        assert col in header, header
    assert header.count("predicted*") == 2, header
    assert f"@ {FAST_LINK}" in out and f"@ {SLOW_LINK}" in out
    assert "* predicted, not measured" in out

    rows = parse_table(out)
    assert list(rows) == [s.name for s in SETTINGS], out[-4000:]
    d = sum(p.numel() for p in make_mlp().parameters())
    dense_bytes = cm.ring_allreduce_bytes(d, 4, N_RANKS)
    for s in SETTINGS:
        r = rows[s.name]
        assert 0.0 <= r["acc"] <= 100.0 and r["ms"] > 0 and r["compute"] > 0, (s.name, r)
        if s.kind == "dense":
            assert r["bytes"] == pytest.approx(dense_bytes, abs=51), r
        elif s.kind == "compressed":
            assert 0 < r["bytes"] < dense_bytes / 10, (s.name, r)
        else:
            assert r["bytes"] == pytest.approx(dense_bytes / s.tau, abs=51), (s.name, r)
        # the predicted columns are the cost model's, from the printed compute and bytes
        for col, (_, rate) in (("p1", LINKS[0]), ("p2", LINKS[1])):
            link = cm.Link.parse(rate)
            if s.kind == "co2":
                comm = cm.transfer_seconds(r["bytes"] * s.tau, link)
                want = 1000 * cm.co2_step_seconds(r["compute"] / 1000, comm, s.tau)
            else:
                want = r["compute"] + 1000 * cm.transfer_seconds(r["bytes"], link)
            assert r[col] == pytest.approx(want, abs=0.02 + 0.01 * want), (s.name, col, r)
        assert r["p2"] >= r["p1"] - 0.01 >= r["compute"] - 0.02, (s.name, r)
    topk = [rows[s.name]["bytes"] for s in SETTINGS if s.kind == "compressed" and s.compressor.startswith("topk")]
    randk = [rows[s.name]["bytes"] for s in SETTINGS if s.kind == "compressed" and s.compressor.startswith("randk")]
    assert len(set(topk)) == 1 and randk and max(randk) < min(topk)  # shared indices: values only

    check_closing_lines(closing_lines(out), rows, acc_tol=0.005,
                        required=tuple(s.name for s in SETTINGS if s.kind == "co2" or s.name.startswith("RandK")))


def _row(name: str, kind: str, acc: float, nbytes: float, fast: float, slow: float) -> dict:
    return {"name": name, "kind": kind, "acc": acc, "bytes_step": nbytes,
            "predicted_ms": {LINKS[0][0]: fast, LINKS[1][0]: slow}}


def _table(rows: list[dict]) -> dict[str, dict[str, float]]:
    return {r["name"]: {"acc": 100 * r["acc"], "bytes": r["bytes_step"], "p1": r["predicted_ms"][LINKS[0][0]],
                        "p2": r["predicted_ms"][LINKS[1][0]]} for r in rows}


def test_summary_says_what_the_numbers_say_when_feedback_helps():
    rows = [
        _row("dense DDP", "dense", 0.85, 668_700, 9.0, 60.0),
        _row("TopK 1%, no feedback", "compressed", 0.60, 13_400, 5.0, 6.0),
        _row("TopK 1% + EF14", "compressed", 0.85, 13_400, 6.0, 7.0),
        _row("TopK 1% + EControl", "compressed", 0.80, 13_400, 6.5, 7.5),
        _row("RandK 1% + EF14", "compressed", 0.45, 6_700, 4.0, 4.5),
        _row("CO2, tau 8", "co2", 0.845, 83_600, 3.0, 5.5),
    ]
    lines = summary_lines(rows)
    text = "\n".join(lines)
    assert "- without feedback, TopK 1% ends 25.0 points below dense DDP (60.0% vs 85.0%)." in lines
    assert "EF14 100%, EControl 80%" in text
    assert "- RandK 1% + EF14: 45.0% (-40.0 points vs dense DDP) at 6.7 kB per step." in lines
    assert "- CO2, tau 8: 84.5% (-0.5 points vs dense DDP) with 8.0x fewer bytes per step." in lines
    # EControl is 5 points off, so only EF14 and CO2 count as accurate; CO2 is the faster of the two
    assert f"- predicted at {LINKS[1][0]}: dense DDP 60.0 ms/step; the fastest setting at most 1 point less " \
           f"accurate: CO2, tau 8, 5.5 ms/step (10.9x faster)." in lines
    assert "- predicted for TopK 1% + EF14 (the most accurate with feedback): 6.0 ms/step at 1 Gbit/s (1.5x " \
           "faster than dense DDP), 7.0 ms/step at 100 Mbit/s (8.6x faster than dense DDP)." in lines
    check_closing_lines(lines, _table(rows), acc_tol=0.0, required=("RandK 1% + EF14", "CO2, tau 8"))
    with pytest.raises(AssertionError):  # a "slower" that the numbers contradict
        check_closing_lines([line.replace("(1.5x faster", "(1.5x slower") for line in lines], _table(rows), 0.0)


def test_summary_says_so_when_no_feedback_is_not_behind():
    rows = [
        _row("dense DDP", "dense", 0.70, 668_700, 9.0, 60.0),
        _row("TopK 1%, no feedback", "compressed", 0.72, 13_400, 5.0, 6.0),
        _row("TopK 1% + EF14", "compressed", 0.71, 13_400, 6.0, 7.0),
        _row("CO2, tau 8", "co2", 0.50, 83_600, 3.0, 5.5),
    ]
    lines = summary_lines(rows)
    assert "- without feedback, TopK 1% ends 2.0 points above dense DDP (72.0% vs 70.0%)." in lines
    assert not any("closes" in line for line in lines)
    assert any(line.startswith("- no gap of 1 point or more") for line in lines)
    assert "- CO2, tau 8: 50.0% (-20.0 points vs dense DDP) with 8.0x fewer bytes per step." in lines
    # the fastest accurate setting here is TopK without feedback (more accurate than dense DDP)
    assert any("at most 1 point less accurate: TopK 1%, no feedback, 6.0 ms/step" in line for line in lines)
    # a claim that does not match the numbers is caught by the checker the end-to-end test uses
    check_closing_lines(lines, _table(rows), acc_tol=0.0, required=("CO2, tau 8",))
    with pytest.raises(AssertionError, match="points above|points below"):
        check_closing_lines([line.replace("above", "below") for line in lines], _table(rows), acc_tol=0.0)


def test_summary_when_nothing_is_as_accurate_as_dense():
    rows = [
        _row("dense DDP", "dense", 0.90, 668_700, 9.0, 60.0),
        _row("TopK 1%, no feedback", "compressed", 0.50, 13_400, 5.0, 6.0),
        _row("TopK 1% + EF14", "compressed", 0.40, 13_400, 6.0, 7.0),
    ]
    lines = summary_lines(rows)
    assert any("EF14 -25%" in line for line in lines)  # worse than no feedback: a negative share
    assert f"- predicted at {LINKS[0][0]}: dense DDP 9.0 ms/step; every other setting is more than 1 point " \
           f"less accurate." in lines
    check_closing_lines(lines, _table(rows), acc_tol=0.0)
    with pytest.raises(AssertionError, match="75%"):  # the checker notices a wrong share
        check_closing_lines([line.replace("-25%", "75%") for line in lines], _table(rows), acc_tol=0.0)


def test_heterogeneous_shards_and_balanced_test_set():
    task = SyntheticTask(world_size=2, skew=0.9, train_per_rank=2000, test_size=1000)
    x_t, y_t = task.test
    assert torch.bincount(y_t, minlength=10).tolist() == [100] * 10
    assert torch.equal(task.label(x_t), y_t)
    for rank in range(2):
        x, y = task.train_shard(rank)
        assert x.shape == (2000, 64) and torch.equal(task.label(x), y)  # still the teacher's labels
        own = torch.isin(y, torch.tensor(task.own_classes(rank)))
        assert own.float().mean().item() == pytest.approx(0.9 + 0.1 * 5 / 10, abs=0.002)
        assert torch.bincount(y, minlength=10).tolist() == task.class_counts(rank)
    assert task.own_classes(0) == [0, 2, 4, 6, 8] and task.own_classes(1) == [1, 3, 5, 7, 9]
    x0, _ = task.train_shard(0)
    assert torch.equal(x0, task.train_shard(0)[0])  # deterministic


def test_default_task_is_the_iid_one():
    """``experiments/train_ddp.py`` uses ``SyntheticTask()``: without ``skew`` it is the iid task."""
    task = SyntheticTask()
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1234 + 999_983))
    assert torch.equal(task.test[0], x)
    x1 = torch.randn(16384, 64, generator=torch.Generator().manual_seed(1234 + 7919 * 2))
    assert torch.equal(task.train_shard(1)[0], x1)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_failing_setting_is_reported_with_rank_and_setting(capfd):
    bad = (Setting("bogus compressor", "nosuch:0.5", "none"),)
    assert run_demo(ranks=2, steps=10, settings=bad) == 1
    err = capfd.readouterr().err
    assert re.search(r"demo: rank [01] failed \(setting 'bogus compressor'\)", err), err[-3000:]
    assert "setting 'bogus compressor' failed on rank" in err


def test_demo_refuses_bad_arguments(capfd):
    assert run_demo(ranks=0) == 2
    assert run_demo(ranks=2, steps=3) == 2
    assert run_demo(ranks=11) == 2
    err = capfd.readouterr().err
    assert "--steps must be >= 10" in err and "--ranks must be <= 10" in err
