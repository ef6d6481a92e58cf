"""Teardown in any order and dead peers, in fresh processes (tests/teardown_worker.py, gloo on loopback).

* work still in flight at ``destroy_process_group()`` or at interpreter exit (CO2's outer exchange,
  dense and compressed; 4 ranks) is abandoned cleanly: exit 0, never ``terminate called without an
  active exception`` (a pending ``.then()`` callback run by a gloo thread during interpreter shutdown),
  also when the optimizer outlives ``destroy_process_group()`` until shutdown (``destroy-global``, a
  module-level script: 4 of 16 such CO2 runs aborted without commopt's exit pause);
* an exception that unwinds ``backward()`` with bucket exchanges in flight exits 1 with the user's
  error, not SIGABRT;
* a SIGKILLed peer: every survivor raises an error that names commopt's collective within the
  process-group timeout and exits 1 (CompressedOptimizer, CO2 with its outer all-reduce in flight, MKOR).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from teardown_launch import ROOT, launch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run(which: str, scenario: str, world: int, timeout: float = 150.0, pg_timeout: int = 20):
    out, seconds, hung = launch(which, scenario, world, timeout=timeout, pg_timeout=pg_timeout)
    if hung:
        pytest.fail(f"{which}/{scenario}: a rank hung ({timeout:.0f} s)")
    return out, seconds


@pytest.mark.timeout(200)
@pytest.mark.parametrize("which", ["co2", "co2-topk"])
@pytest.mark.parametrize("scenario", ["destroy", "exit", "destroy-global"])
def test_in_flight_work_at_teardown_exits_cleanly(which, scenario):
    out, _ = _run(which, scenario, world=4)
    for r, (rc, text) in enumerate(out):
        assert "terminate called" not in text, f"rank {r}:\n{text[-3000:]}"
        assert rc == 0, f"rank {r} rc={rc}:\n{text[-3000:]}"
        assert f"rank {r}: exits" in text
        # commopt closes the gloo group at exit after settling its own work (commopt.teardown): a group
        # left open is what lets a gloo thread release the last tensor reference during shutdown (SIGABRT)
        assert f"rank {r}: group open after commopt's exit handler: False" in text, text[-3000:]
        # the discarded round is announced once, not per object or per step
        assert text.count("exits without opt.finish()") == 1, text[-3000:]


@pytest.mark.timeout(200)
def test_exception_unwinding_backward_exits_with_the_users_error():
    out, _ = _run("compressed", "raise", world=2)
    rc0, text0 = out[0]
    # exit 1 with the user's error; before the exit-time drain it was SIGABRT (2 runs of 2 tried). A SIGABRT at
    # interpreter shutdown after the error is still tolerated here (see the killed-peer test below; its rate is
    # counted by experiments/teardown_repeat.py): the error and the warning are what must hold
    assert rc0 in (1, -signal.SIGABRT), f"rc={rc0}:\n{text0[-3000:]}"
    assert "user hook failed on purpose" in text0
    assert text0.count("discards") == 1, text0[-3000:]
    rc1, text1 = out[1]   # the peer's bucket never completes: it raises in its own backward(), named
    assert rc1 in (1, -signal.SIGABRT), f"rc={rc1}:\n{text1[-3000:]}"
    assert "commopt: the all_gather_into_tensor" in text1 or "commopt: the all_reduce" in text1, text1[-3000:]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("which,named", [
    ("compressed", "commopt: the all_gather_into_tensor of a gather exchange"),
    ("co2", "commopt: the outer all_reduce"),
    ("co2-topk", "commopt: the all_gather_into_tensor of a gather exchange"),
    ("mkor", "MKOR"),
])
def test_killed_peer_ends_every_survivor_with_a_named_error(which, named):
    pg_timeout = 10
    out, seconds = _run(which, "kill", world=2, pg_timeout=pg_timeout)
    assert out[1][0] == -signal.SIGKILL, out[1]
    rc, text = out[0]
    # After raising the named error a CompressedOptimizer survivor used to end with SIGABRT now and then (3 of
    # 15 runs): the later buckets' callbacks were still running on a gloo thread when interpreter shutdown
    # began (gdb: pt_gloo_runloop in take_gil -> pthread_exit). The exit drain now waits for the last step's
    # whole chain and gives those threads a moment (hook.settle_last_step): experiments/results/
    # teardown_repeat.md counts what is left. The abort stays tolerated here, since the grace period is a
    # wait, not a join (DDP keeps gloo's threads alive); the error and the end of the job must hold.
    assert rc in (1, -signal.SIGABRT), f"survivor rc={rc}:\n{text[-3000:]}"
    assert "trained 9 steps" not in text, "the survivor trained on alone"
    assert named in text, text[-3000:]
    # one prefix in the error raised (an abort message after it, the known defect, repeats an error)
    assert text.split("terminate called")[0].count("Got the following error when running the callback") <= 1, \
        text[-3000:]


_ORDER_SCRIPT = r'''
import atexit, gc, os, weakref
import torch.distributed as dist
seen = {}
def after():   # registered before commopt is imported: runs after commopt's exit handler
    gc.collect()
    print("after:", dist.is_initialized(), seen["ref"]() is None, flush=True)
atexit.register(after)
import torch, commopt
from commopt import teardown
commopt.init_distributed(backend="gloo")
class Held:
    pass
box = [Held()]
seen["ref"] = weakref.ref(box[0])
def drain():
    print("drain:", dist.is_initialized(), flush=True)
    teardown.keep_until_exit(box.pop())   # the only reference left is the one kept
teardown.on_exit(drain)
print("main ends", flush=True)
'''


def test_exit_handler_drains_then_closes_the_gloo_group_then_releases_what_it_kept(tmp_path):
    """commopt.teardown's order at exit: drains run with the group open, then the gloo group commopt
    initialised is destroyed, then what the drains kept is released, still before later handlers."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.split() == "main ends drain: True after: False True".split(), p.stdout + p.stderr


def test_settle_last_step_waits_for_the_whole_chain_and_keeps_it(monkeypatch):
    """The exit drain waits for the last step's chain (a later bucket may still be failing on a backend
    thread after DDP raised at the first one), keeps its futures for commopt.teardown, and reports it."""
    import threading
    import types

    import torch

    from commopt import teardown
    from commopt.hook import CompressionState

    monkeypatch.setattr(teardown, "_KEPT", [])
    failed: torch.futures.Future = torch.futures.Future()
    failed.set_exception(RuntimeError("bucket 0 failed"))
    late: torch.futures.Future = torch.futures.Future()
    threading.Timer(0.3, lambda: late.set_exception(RuntimeError("bucket 1 failed later"))).start()
    state = types.SimpleNamespace(_last_step=[failed, late])
    t0 = time.monotonic()
    assert CompressionState.settle_last_step(state) == 1       # one was unfinished
    assert time.monotonic() - t0 >= 0.25 and late.done()
    assert state._last_step == [] and teardown._KEPT == [[failed, late]]
    # a step that ended well and completely: nothing to wait for, so the exit handler does not pause
    ok: torch.futures.Future = torch.futures.Future()
    ok.set_result(torch.zeros(1))
    assert CompressionState.settle_last_step(types.SimpleNamespace(_last_step=[ok])) == 0


def test_abandon_in_flight_discards_the_unfinished_step_and_keeps_its_tensors(monkeypatch):
    """An unwound backward's buckets: settled, kept for commopt.teardown, the state left as before the step."""
    import types
    import warnings

    import torch

    from commopt import teardown
    from commopt.hook import CompressionState

    monkeypatch.setattr(teardown, "_KEPT", [])
    f: torch.futures.Future = torch.futures.Future()
    f.set_exception(RuntimeError("unwound"))
    pending = [("block", torch.zeros(3), {"e": torch.ones(3)})]
    state = types.SimpleNamespace(_step_futures=[f], _pending=pending, rank=0, step=7, _failed_steps=set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert CompressionState.abandon_in_flight(state) == 1
    assert sum("discards 1 bucket exchange(s) of step 7" in str(x.message) for x in w) == 1
    assert state._step_futures == [] and state._pending == [] and state._failed_steps == {7}
    assert teardown._KEPT[0] == [f] and teardown._KEPT[1][0][0] == "block"
