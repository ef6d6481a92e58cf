"""Launcher detection, SLURM hostlists and single-process init_distributed (no MPI needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from commopt.distributed import (
    _slurm_default_port,
    detect_launcher,
    launcher_ranks,
    parse_slurm_nodelist,
)

REPO = Path(__file__).resolve().parents[1]

# Variables of any launcher; stripped from the environment of the subprocess tests.
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_", "HYDI_", "MV2_", "PALS_", "TORCHELASTIC_")
_LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "COMMOPT_PROBE_MPI4PY"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- detect_launcher

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "gpu[01-02]"}
OMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "9"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "single"),
        ({"PATH": "/usr/bin", "HOME": "/root"}, "single"),
        (TORCHRUN, "torchrun"),
        ({"RANK": "0", "WORLD_SIZE": "1"}, "torchrun"),  # hand-set env://, no LOCAL_RANK
        ({"RANK": "0"}, "single"),  # RANK alone is not a launch
        ({**SLURM, **TORCHRUN}, "torchrun"),  # torchrun started by srun: torchrun's vars win
        (SLURM, "slurm"),
        ({**SLURM, "SLURM_STEP_NUM_TASKS": "8"}, "slurm"),
        ({"SLURM_PROCID": "0", "SLURM_NPROCS": "2"}, "slurm"),
        ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1"}, "single"),  # salloc shell, no task
        (OMPI, "openmpi"),
        (MPICH, "mpich"),
        ({"PMI_RANK": "0"}, "single"),  # incomplete
        ({**OMPI, **MPICH}, "openmpi"),
        # srun --mpi=pmi2 sets PMI_* consistent with SLURM: still slurm
        ({**SLURM, "PMI_RANK": "3", "PMI_SIZE": "8"}, "slurm"),
        # mpirun inside sbatch: every process inherits SLURM_PROCID=0 -> trust MPI
        ({**SLURM, "SLURM_PROCID": "0", **OMPI}, "openmpi"),
        ({**SLURM, "SLURM_PROCID": "0", **MPICH}, "mpich"),
    ],
)
def test_detect_launcher(env: dict[str, str], expected: str) -> None:
    assert detect_launcher(env) == expected


def test_detect_launcher_is_pure_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import commopt.distributed as d

    def boom() -> int:
        raise AssertionError("mpi4py must not be probed")

    monkeypatch.setattr(d, "_mpi4py_world_size", boom)
    assert detect_launcher({}) == "single"


@pytest.mark.parametrize("size, expected", [(4, "mpi4py"), (1, "single"), (None, "single")])
def test_detect_launcher_mpi4py_probe(monkeypatch: pytest.MonkeyPatch, size: int | None, expected: str) -> None:
    import commopt.distributed as d

    monkeypatch.setattr(d, "_mpi4py_world_size", lambda: size)
    assert detect_launcher({}, probe_mpi4py=True) == expected
    assert detect_launcher(TORCHRUN, probe_mpi4py=True) == "torchrun"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"PATH": "/bin"}, False),
        ({"PMI_FD": "3"}, True),
        ({"PMIX_RANK": "0"}, True),
        ({"MV2_COMM_WORLD_RANK": "0"}, True),
        ({"PMI_FD": "3", "COMMOPT_PROBE_MPI4PY": "0"}, False),
        ({"COMMOPT_PROBE_MPI4PY": "1"}, True),
    ],
)
def test_should_probe_mpi4py(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool) -> None:
    import commopt.distributed as d

    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    assert d._should_probe_mpi4py(env) is expected


# --------------------------------------------------------------------------- launcher_ranks


@pytest.mark.parametrize(
    "env, launcher, expected",
    [
        (TORCHRUN, "torchrun", (1, 4, 1)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, "torchrun", (0, 1, 0)),
        (SLURM, "slurm", (3, 8, 3)),
        ({**SLURM, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, "slurm", (1, 4, 1)),
        (OMPI, "openmpi", (2, 4, 0)),
        (MPICH, "mpich", (1, 2, 1)),
        ({" RANK": "x"}, "single", (0, 1, 0)),
        ({"RANK": " 2 ", "WORLD_SIZE": "3\n"}, "torchrun", (2, 3, 0)),
    ],
)
def test_launcher_ranks(env: dict[str, str], launcher: str, expected: tuple[int, int, int]) -> None:
    assert launcher_ranks(env, launcher) == expected


@pytest.mark.parametrize(
    "env, launcher, names",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "torchrun", ["RANK", "WORLD_SIZE"]),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "torchrun", ["RANK"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "torchrun", ["WORLD_SIZE"]),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "torchrun", ["RANK", "zero"]),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, "torchrun", ["WORLD_SIZE"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5"}, "torchrun", ["LOCAL_RANK"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": ""}, "torchrun", ["LOCAL_RANK"]),
        ({**SLURM, "SLURM_PROCID": "8"}, "slurm", ["SLURM_PROCID", "SLURM_NTASKS"]),
        ({**SLURM, "SLURM_NTASKS": "eight"}, "slurm", ["SLURM_NTASKS"]),
        ({"SLURM_PROCID": "0"}, "slurm", ["SLURM_NTASKS"]),
        ({**OMPI, "OMPI_COMM_WORLD_RANK": "4"}, "openmpi", ["OMPI_COMM_WORLD_RANK"]),
        ({"PMI_RANK": "0"}, "mpich", ["PMI_SIZE"]),
        ({}, "bogus", ["bogus"]),
    ],
)
def test_launcher_ranks_errors_name_the_variable(env: dict[str, str], launcher: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as exc:
        launcher_ranks(env, launcher)
    for name in names:
        assert name in str(exc.value)


def test_slurm_default_port() -> None:
    a = _slurm_default_port({"SLURM_JOB_ID": "1234"})
    b = _slurm_default_port({"SLURM_JOB_ID": "1235"})
    c = _slurm_default_port({"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "1"})
    assert len({a, b, c}) == 3
    assert a == _slurm_default_port({"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0"})
    for env in ({}, {"SLURM_JOB_ID": "abc"}, {"SLURM_JOB_ID": "99999999999", "SLURM_STEP_ID": "batch"}):
        assert 20000 <= _slurm_default_port(env) < 32000


# --------------------------------------------------------------------------- parse_slurm_nodelist


@pytest.mark.parametrize(
    "s, expected",
    [
        ("", []),
        ("   ", []),
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("node[7]", ["node7"]),
        ("gpu[1,3],cpu[002-003]", ["gpu1", "gpu3", "cpu002", "cpu003"]),
        ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("nid[001234-001235]", ["nid001234", "nid001235"]),
        ("a-b-c,d.e.f", ["a-b-c", "d.e.f"]),
        ("node[1-2],node[1-2]", ["node1", "node2", "node1", "node2"]),
        ("node[0-0]", ["node0"]),
        ("x[10-12,1]", ["x10", "x11", "x12", "x1"]),
        ("node1,", ["node1"]),
    ],
)
def test_parse_slurm_nodelist(s: str, expected: list[str]) -> None:
    assert parse_slurm_nodelist(s) == expected


@pytest.mark.parametrize("s", ["node[1-3", "node1-3]", "node[[1]]", "node[3-1]", "node[a-b]", "node[]", "node[1,,2]",
                               "node[1-]", "n[1]x]"])
def test_parse_slurm_nodelist_rejects(s: str) -> None:
    with pytest.raises(ValueError):
        parse_slurm_nodelist(s)


# --------------------------------------------------------------------------- init_distributed (subprocess)

_INIT_SNIPPET = """
import os, torch, torch.distributed as dist
from commopt.distributed import init_distributed
info = init_distributed()
again = init_distributed()
t = torch.ones(3)
dist.all_reduce(t)
assert t.tolist() == [1.0, 1.0, 1.0]
print(info.rank, info.world_size, info.local_rank, info.device, info.launcher, again == info,
      dist.get_backend(), os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], sep="|")
dist.destroy_process_group()
"""


def _run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_init_distributed_single_process() -> None:
    proc = _run_python(_INIT_SNIPPET, _clean_env())
    assert proc.returncode == 0, proc.stderr
    rank, world, local, device, launcher, same, backend, env_rank, env_world, addr = proc.stdout.strip().split("|")
    assert (rank, world, local, launcher, same) == ("0", "1", "0", "single", "True")
    assert (env_rank, env_world, addr) == ("0", "1", "127.0.0.1")
    import torch

    expected_device, expected_backend = ("cuda:0", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    assert device == expected_device and backend == expected_backend


def test_init_distributed_slurm_single_task() -> None:
    env = _clean_env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="987654",
                     SLURM_STEP_NODELIST="localhost", PATH="/usr/bin:/bin")  # PATH: no scontrol
    proc = _run_python(_INIT_SNIPPET, env)
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.strip().split("|")
    assert fields[4] == "slurm" and fields[-1] == "localhost"


def test_init_distributed_rejects_bad_env() -> None:
    proc = _run_python(_INIT_SNIPPET, _clean_env(RANK="3", WORLD_SIZE="2"))
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "RANK=3" in proc.stderr


def test_cli_info() -> None:
    proc = subprocess.run([sys.executable, "-m", "commopt", "info"], env=_clean_env(COMMOPT_KERNELS="auto"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout
    assert "launcher (from environment): single" in proc.stdout
    # the kernel lines are commopt.kernels.describe()'s: the mode and the path of CPU tensors, with why
    assert "kernels: COMMOPT_KERNELS=auto" in proc.stdout
    assert "  cpu tensors: torch (" in proc.stdout
    assert "  opencl: " in proc.stdout and "  cuda kernels: " in proc.stdout


def test_cli_info_kernels_lines_follow_describe(monkeypatch: pytest.MonkeyPatch) -> None:
    import commopt.cli as cli
    import commopt.kernels as kernels

    monkeypatch.setattr(kernels, "describe", lambda: ["kernels: COMMOPT_KERNELS=auto", "  cpu tensors: torch (x)"])
    lines = cli.info_lines()
    i = lines.index("kernels: COMMOPT_KERNELS=auto")
    assert lines[i + 1] == "  cpu tensors: torch (x)"


def test_cli_info_never_crashes_on_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    import commopt.cli as cli
    import commopt.kernels as kernels

    def broken() -> list[str]:
        raise RuntimeError("probe exploded\nsecond line")

    monkeypatch.setattr(kernels, "describe", broken)
    lines = [ln for ln in cli.info_lines() if ln.startswith("kernels")]
    assert lines == ["kernels: could not be described (RuntimeError: probe exploded); "
                     "the reference path is the safe choice"]


def test_cli_info_bad_kernels_mode() -> None:
    proc = subprocess.run([sys.executable, "-m", "commopt", "info"], env=_clean_env(COMMOPT_KERNELS="bogus"),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kernels: COMMOPT_KERNELS='bogus': expected one of auto, torch, opencl" in proc.stdout


def test_cli_info_reports_launcher_vars() -> None:
    proc = subprocess.run([sys.executable, "-m", "commopt", "info"],
                          env=_clean_env(**SLURM, SLURM_NTASKS_PER_NODE="4"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "launcher (from environment): slurm" in proc.stdout
    assert "SLURM_JOB_NODELIST=gpu[01-02]" in proc.stdout
    assert "ranks per node (launcher): 4 (node_size='auto' compresses between nodes of 4 ranks)" in proc.stdout
