"""srun for real: a local SLURM cluster of 2 emulated nodes (experiments/slurm_local), the CPU sbatch
template on 2 nodes × 2 tasks, the inter-node bytes of an srun step on the emulated link against
comm_stats(), one task SIGKILLed, and a node's slurmd stopped (the job requeued and
resumed from its checkpoints). Needs root, iproute2 and Debian's SLURM packages
(scripts/install_slurm.sh installs them in .ci/run); skips, saying why, otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unavailable() -> "str | None":
    sys.path.insert(0, ROOT)
    try:
        from experiments.netem import NetemUnavailable, check_support as net_ok
        from experiments.slurm_local.cluster import SlurmUnavailable, check_support
        check_support()
        net_ok()
    except (SlurmUnavailable, NetemUnavailable) as exc:
        return str(exc)
    return None


WHY = _unavailable()


@pytest.mark.skipif(WHY is not None, reason=f"no local SLURM cluster here: {WHY}")
@pytest.mark.timeout(960)
def test_sbatch_bytes_a_killed_task_and_a_failed_node_on_a_real_local_slurm(tmp_path):
    out = tmp_path / "slurm_local.md"
    p = subprocess.Popen([sys.executable, "-m", "experiments.slurm_local", "--out", str(out), "--only", "sbatch",
                          "--only", "bytes", "--only", "kill", "--only", "slurmd"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        p.terminate()  # SIGTERM: the cluster is torn down (daemons, namespaces, /etc/hosts lines)
        stdout, stderr = p.communicate(timeout=60)
        pytest.fail(f"the SLURM checks took over 840 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    text = out.read_text() if out.exists() else r.stdout
    assert r.returncode == 0, f"{text[-4000:]}\n{r.stderr[-3000:]}"
    assert "## sbatch 2 nodes x 2 tasks: pass" in text
    assert "steady-state inter-node bytes (25 steps): pass" in text  # the emulated link = comm_stats
    assert "## one task SIGKILLed: pass" in text
    assert "## node 1's slurmd stopped, the job requeued and resumed: pass" in text
    # nothing left behind: the /etc/hosts lines and the daemons are gone
    assert "# cmt" not in open("/etc/hosts").read()
    for daemon in ("slurmd", "slurmctld"):
        assert subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 1, f"{daemon} left running"


def test_a_survivors_error_is_clear_only_when_it_names_the_failure_or_comes_from_the_scripts_own_call(tmp_path):
    """The slurmd check's verdict on a survivor's stderr (no cluster needed): commopt's named error passes;
    gloo's peer-lost error passes only from the training script's own ``dist.*`` line (commopt must name the
    failures of its own collectives); a rank that printed no error fails."""
    sys.path.insert(0, ROOT)
    from experiments.slurm_local.__main__ import _clear_error, _task_errors

    def err_file(name: str, frames: "list[tuple[str, str]]", last: str) -> str:
        lines = ["[rank 2] Traceback (most recent call last):"]
        for path, src in frames:
            lines += [f'[rank 2]   File "{path}", line 7, in f', f"[rank 2]     {src}"]
        (tmp_path / name).write_text("\n".join(lines + [f"[rank 2] {last}", ""]))
        return str(tmp_path / name)

    gloo = "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.231.0.2]:28304."
    script = "/x/experiments/train_nanogpt.py"
    named = err_file("task-5-0-2.err", [(script, "sys.exit(main())"), (script, "scaler.step(opt)")],
                     "RuntimeError: CollectiveError: commopt: the all_gather_into_tensor of a gather exchange "
                     "(552 of 55232 values, torch.float32) failed on rank 2 of 4: " + gloo)
    own = err_file("task-5-0-3.err", [(script, "sys.exit(main())"), (script, "dist.all_reduce(m)"),
                                      ("/v/torch/distributed/c10d_logger.py", "return func(*args, **kwargs)")], gloo)
    hidden = err_file("task-6-0-3.err", [(script, "sys.exit(main())"), (script, "scaler.scale(loss).backward()"),
                                         ("/v/torch/_tensor.py", "torch.autograd.backward(")], gloo)
    (tmp_path / "task-7-0-3.err").write_text("[W socket.cpp:207] The hostname cannot be retrieved\n")
    found = _task_errors([named, own, hidden, str(tmp_path / "task-7-0-3.err")])
    assert found["task-5-0-3.err"] == (f"[rank 2] {gloo}", "dist.all_reduce(m)")
    assert found["task-6-0-3.err"][1] == "scaler.scale(loss).backward()"
    verdicts = {k: _clear_error(*v) for k, v in found.items()}
    assert verdicts == {"task-5-0-2.err": True, "task-5-0-3.err": True, "task-6-0-3.err": False,
                        "task-7-0-3.err": False}


def test_the_kill_check_reads_each_ranks_last_words_from_the_jobs_interleaved_output():
    """The kill check's reading of a job's output (no cluster needed): each ``[rank N]`` traceback, even
    interleaved with another's and with srun's lines, gives that rank's last error and the script line it
    was in; a rank in the script's own barrier is clear, one whose peer-lost error surfaced in backward is not."""
    sys.path.insert(0, ROOT)
    from experiments.slurm_local.__main__ import _clear_error, _rank_errors

    gloo = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [10.231.0.2]:34991: Connection reset by peer."
    text = "\n".join([
        "iter     0: train loss 4.4514, val loss 4.4364",
        "[rank 0] Traceback (most recent call last):",
        "[rank 1] Traceback (most recent call last):",
        '[rank 0]   File "/x/experiments/train_nanogpt.py", line 521, in main',
        '[rank 1]   File "/x/experiments/train_nanogpt.py", line 560, in main',
        "[rank 0]     dist.barrier()",
        "[rank 1]     scaler.scale(loss).backward()",
        '[rank 0]   File "/v/torch/distributed/distributed_c10d.py", line 5356, in barrier',
        "[rank 0]     work.wait()",
        f"[rank 0] {gloo}",
        "srun: error: cmt1n1: task 2: Killed",
        f"[rank 1] {gloo}",
        "[rank 3] RuntimeError: Got the following error when running the callback: CollectiveError: commopt: the "
        "all_gather_into_tensor of a gather exchange (552 of 55232 values, torch.float32) failed on rank 3 of 4",
    ])
    found = _rank_errors(text)
    assert sorted(found) == [0, 1, 3]
    assert found[0] == (gloo, "dist.barrier()")
    assert found[1] == (gloo, "scaler.scale(loss).backward()")
    assert {r: _clear_error(*e) for r, e in found.items()} == {0: True, 1: False, 3: True}
