"""Start the ranks of a tests/teardown_worker.py scenario as fresh processes on loopback (gloo) and collect
them: used by tests/test_teardown.py (one run per test) and experiments/teardown_repeat.py (many runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("teardown_worker.py")
ROOT = WORKER.parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(which: str, scenario: str, world: int, timeout: float = 150.0, pg_timeout: int = 20
           ) -> tuple[list[tuple[int, str]], float, bool]:
    """``([(exit code, output) per rank], seconds, hung)``; when a rank outlives ``timeout`` every rank is
    killed and ``hung`` is True."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PG_TIMEOUT=str(pg_timeout),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), which, scenario], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    out, hung = [], False
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            hung = True
            for q in procs:
                q.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out, time.monotonic() - t0, hung
