"""``commopt demo`` end to end (2 spawned gloo ranks, a few steps per setting): exit 0 and the table."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from commopt.demo import SETTINGS, run_demo


@pytest.mark.timeout(300)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_demo_runs_every_setting_and_exits_0(capfd):
    assert run_demo(ranks=2, steps=10) == 0
    out = capfd.readouterr().out
    assert "demo finished in" in out
    for s in SETTINGS:
        assert f"\n{s.name:<24} |" in out, f"no table row for {s.name!r}:\n{out[-3000:]}"


def test_demo_refuses_bad_arguments(capfd):
    assert run_demo(ranks=0) == 2
    assert run_demo(ranks=2, steps=3) == 2
    assert "--steps must be >= 10" in capfd.readouterr().err
