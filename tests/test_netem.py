"""experiments/netem: an emulated 2-node cluster (network namespaces on a bridge, tc-shaped links).

Needs root and iproute2; the tests that build namespaces skip with the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.netem import Cluster, NetemUnavailable, check_support, list_objects  # noqa: E402
from experiments.netem import cluster as netem_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
WORKER = os.path.join(ROOT, "experiments", "fault_worker.py")


def ours(c: Cluster) -> list[str]:
    objs = list_objects()
    return [n for n in objs["netns"] + objs["links"] if n.startswith(c.tag)]


def env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


# --------------------------------------------------------------------------- anywhere


def test_rank_env_2x2_layout():
    c = Cluster(2, 2, "1gbit", master_port=29999)
    got = [(e["RANK"], e["LOCAL_RANK"], e["NODE_RANK"]) for e in (c.rank_env(r) for r in range(4))]
    assert got == [("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]
    e = c.rank_env(3)
    assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) == ("4", "2", c.ips[0], "29999")
    assert c.torchrun_argv(1, ["train.py"])[-9:] == ["--nproc_per_node", "2", "--node_rank", "1", "--master_addr",
                                                     c.ips[0], "--master_port", "29999", "train.py"]


def test_not_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(netem_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(NetemUnavailable, match="root"):
        check_support()


def test_missing_ip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(netem_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netem_cluster.shutil, "which", lambda tool: None)
    with pytest.raises(NetemUnavailable, match="iproute2"):
        check_support()


def test_bad_arguments():
    with pytest.raises(ValueError, match="rate"):
        Cluster(2, 1, "fast")
    with pytest.raises(ValueError, match="nodes"):
        Cluster(0, 1)
    with pytest.raises(ValueError, match="delay"):
        Cluster(2, 1, delay="soon")


# --------------------------------------------------------------------------- root + iproute2

ALLREDUCE = """
import os, torch, torch.distributed as dist, datetime
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
x = torch.full((4,), float(dist.get_rank() + 1)); dist.all_reduce(x)
print("SUM", dist.get_rank(), x.tolist(), os.environ["MASTER_ADDR"], os.environ["NETEM_NODE_IP"], flush=True)
dist.destroy_process_group()
"""


def test_allreduce_across_namespaces_and_teardown(netem, tmp_path):
    with Cluster(2, 1, "1gbit", master_port=29641) as c:
        assert len(ours(c)) == 2 + 2 + 1  # namespaces, host veths, bridge
        assert "tbf" in c.qdisc(0) and "rate 1Gbit" in c.qdisc(1)
        procs = c.start_ranks([PY, "-c", ALLREDUCE], env=env(), log_dir=str(tmp_path))
        assert c.wait(timeout=90) == [0, 0], [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(2)]
        for r in range(2):
            out = (tmp_path / f"rank{r}.log").read_text()
            assert f"SUM {r} [3.0, 3.0, 3.0, 3.0] {c.ips[0]} {c.ips[r]}" in out
        assert procs[0].popen.args[:4] == ["ip", "netns", "exec", c.netns[0]]
    assert ours(c) == []


def test_teardown_after_failed_command(netem):
    with Cluster(2, 1, None) as c:
        c.start_ranks(["sh", "-c", "exit $((RANK + 3))"])
        assert c.wait(timeout=20) == [3, 4]
    assert ours(c) == []


def test_teardown_after_exception_kills_processes(netem):
    with pytest.raises(RuntimeError, match="boom"):
        with Cluster(2, 1, "100mbit") as c:
            procs = c.start_ranks(["sleep", "60"])
            raise RuntimeError("boom")
    assert ours(c) == []
    assert all(p.popen.poll() is not None for p in procs)


def test_partition_and_heal(netem):
    probe = ("import socket, sys\ns = socket.socket(); s.settimeout(1.0)\n"
             "try:\n    s.connect((sys.argv[1], 9)); print('up')\n"
             "except ConnectionRefusedError: print('reachable')\nexcept OSError as e: print('cut', e)\n")

    def reach(c):
        out = c._ns(0, PY, "-c", probe, c.ips[1], check=False).stdout.strip()
        return out.split()[0] if out else "?"

    with Cluster(2, 1, "1gbit") as c:
        assert reach(c) == "reachable"  # nothing listens on port 9: an RST comes back
        c.partition(1)
        assert reach(c) == "cut"        # silently dropped: the connect times out
        c.heal(1)
        assert reach(c) == "reachable"
        c.partition(1, how="down")
        assert reach(c) == "cut"
        c.heal(1)
        assert reach(c) == "reachable"
    assert ours(c) == []


def test_sigterm_to_a_script_tears_down(netem):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1])\nfrom experiments.netem import Cluster\n"
              "with Cluster(2, 1, '1gbit') as c:\n    c.start_ranks(['sleep', '60'])\n"
              "    print(c.tag, flush=True); time.sleep(60)\n")
    p = subprocess.Popen([PY, "-c", script, ROOT], stdout=subprocess.PIPE, text=True)
    tag = p.stdout.readline().strip()
    assert tag.startswith("cnm")
    p.terminate()
    assert p.wait(20) == 128 + 15
    objs = list_objects()
    assert [n for n in objs["netns"] + objs["links"] if n.startswith(tag)] == []


def test_cli_runs_per_rank_and_returns_first_failure(netem):
    res = subprocess.run([PY, "-m", "experiments.netem", "--nodes", "2", "--ranks-per-node", "2", "--rate", "none",
                          "--grace", "5", "--", "sh", "-c", "echo R$RANK/$WORLD_SIZE L$LOCAL_RANK; exit $((RANK == 2))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    for r in range(4):
        assert f"R{r}/4 L{r % 2}" in res.stdout
    assert "exit codes r0=0 r1=0 r2=1 r3=0" in res.stdout


def test_dead_rank_compressed_optimizer_fails_fast(netem, tmp_path):
    """CompressedOptimizer, rank 1 SIGKILLed at step 5: rank 0 raises and exits nonzero within the timeout."""
    e = dict(env(), OPT="compressed", KILL_AT="5", PG_TIMEOUT="10")
    with Cluster(2, 1, "1gbit", master_port=29643) as c:
        procs = c.start_ranks([PY, WORKER], env=e, log_dir=str(tmp_path))
        t0 = time.time()
        procs[1].popen.wait(60)
        t_kill = time.time()
        rc = c.wait(timeout=25, procs=procs[:1])[0]
        out = (tmp_path / "rank0.log").read_text()
        assert rc not in (None, 0), out[-3000:]
        assert time.time() - t_kill < 25
    assert procs[1].popen.returncode == -9
    # the named error is raised; the exit may still be SIGABRT at interpreter shutdown (a known defect,
    # see tests/test_teardown.py::test_killed_peer_ends_every_survivor_with_a_named_error)
    assert "FAULT_ERROR rank 0" in out and "commopt: the all_gather_into_tensor" in out
    assert ours(c) == []
    del t0
