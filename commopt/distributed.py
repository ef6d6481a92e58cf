"""Launcher-agnostic initialisation of ``torch.distributed``.

:func:`init_distributed` turns whatever the job launcher put into the
environment into the ``env://`` variables PyTorch expects (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and initialises the
default process group.  Supported launchers, checked in this order:

* ``torchrun``  -- ``RANK`` and ``WORLD_SIZE`` (and usually ``LOCAL_RANK``) set;
* ``slurm``     -- ``srun``: ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``;
* ``openmpi``   -- ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``;
* ``mpich``     -- Hydra (MPICH, Intel MPI): ``PMI_RANK`` / ``PMI_SIZE`` /
  ``MPI_LOCALRANKID``;
* ``mpi4py``    -- any other MPI launcher, detected by asking mpi4py;
* ``single``    -- one process, world size 1.

Only :func:`init_distributed` touches global state; :func:`detect_launcher`,
:func:`launcher_ranks` and :func:`parse_slurm_nodelist` are pure functions of
their arguments.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import zlib
from collections.abc import Mapping, MutableMapping
from typing import NamedTuple

import torch
import torch.distributed as dist

from .teardown import mark_used

__all__ = [
    "DistInfo",
    "LAUNCHER_ENV_VARS",
    "detect_launcher",
    "init_distributed",
    "launcher_ranks",
    "parse_slurm_nodelist",
]

#: Environment variables each launcher is recognised by (for ``commopt info``).
LAUNCHER_ENV_VARS: dict[str, tuple[str, ...]] = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    "slurm": (
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_ID",
        "SLURM_STEP_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_NODELIST",
    ),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
}

#: Prefixes of variables set by MPI process managers; their presence (or the
#: ``COMMOPT_PROBE_MPI4PY=1`` override) makes :func:`init_distributed` ask
#: mpi4py for the world size.  Without any of them mpi4py is not imported, so
#: a plain single-process run never calls ``MPI_Init``.
_MPI_HINT_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MV2_", "PALS_", "ALPS_", "HYDI_", "MPI_LOCALRANKID")

_DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class DistInfo(NamedTuple):
    """Where this process sits in the job, as returned by :func:`init_distributed`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str


#: What the last successful :func:`init_distributed` returned; later calls
#: on the still-initialised group return it unchanged.
_INFO: DistInfo | None = None


# --------------------------------------------------------------------------- pure helpers


def _get_int(env: Mapping[str, str], name: str) -> int:
    """Read ``env[name]`` as an integer, raising a ``ValueError`` naming the variable."""
    raw = env[name]
    try:
        return int(raw.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _slurm_world_var(env: Mapping[str, str]) -> str | None:
    """Name of the variable holding the SLURM step's task count, if any."""
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"):
        if name in env:
            return name
    return None


def _mpi_env_launcher(env: Mapping[str, str]) -> str | None:
    """``"openmpi"`` / ``"mpich"`` if the environment carries that MPI's rank variables."""
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        return "openmpi"
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return "mpich"
    return None


def _mpi4py_world_size() -> int | None:
    """World size reported by mpi4py (initialising MPI), or ``None`` if unavailable."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    try:
        from mpi4py import MPI
    except Exception:  # noqa: BLE001 -- a broken MPI install must not break single-process runs
        return None
    return int(MPI.COMM_WORLD.Get_size())


def _should_probe_mpi4py(env: Mapping[str, str]) -> bool:
    """Whether asking mpi4py is worthwhile (see ``_MPI_HINT_PREFIXES``)."""
    flag = env.get("COMMOPT_PROBE_MPI4PY", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on") or "mpi4py.MPI" in sys.modules:
        return True
    return any(key.startswith(_MPI_HINT_PREFIXES) for key in env)


def detect_launcher(env: Mapping[str, str] = os.environ, *, probe_mpi4py: bool = False) -> str:
    """Name the launcher that started this process, from its environment.

    Returns one of ``"torchrun"``, ``"slurm"``, ``"openmpi"``, ``"mpich"``,
    ``"mpi4py"`` or ``"single"``.  The function is pure unless
    ``probe_mpi4py=True``, in which case, when no launcher variables are found,
    it imports ``mpi4py.MPI`` (initialising MPI) and returns ``"mpi4py"`` if the
    MPI world has more than one process.

    ``RANK`` plus ``WORLD_SIZE`` means torchrun (or any launcher following its
    ``env://`` convention).  SLURM wins over MPI variables unless they
    contradict each other: ``mpirun`` inside an ``sbatch`` script inherits the
    batch step's ``SLURM_PROCID=0`` in every process, so when MPI rank/size
    disagree with SLURM's, the MPI launcher is reported instead.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    mpi = _mpi_env_launcher(env)
    slurm_world = _slurm_world_var(env)
    if "SLURM_PROCID" in env and slurm_world is not None:
        if mpi is None:
            return "slurm"
        rank_var, size_var = (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE") if mpi == "openmpi" else ("PMI_RANK", "PMI_SIZE")
        )
        if env[rank_var].strip() == env["SLURM_PROCID"].strip() and env[size_var].strip() == env[slurm_world].strip():
            return "slurm"
        return mpi
    if mpi is not None:
        return mpi
    if probe_mpi4py:
        size = _mpi4py_world_size()
        if size is not None and size > 1:
            return "mpi4py"
    return "single"


def launcher_ranks(env: Mapping[str, str], launcher: str) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` for ``launcher`` read from ``env``; validated.

    For ``"mpi4py"`` the values come from mpi4py (``env`` is ignored) and for
    ``"single"`` they are ``(0, 1, 0)``; every other launcher is read purely
    from ``env``.  Raises ``ValueError`` naming the offending variables when a value is
    missing, not an integer or inconsistent (negative rank, ``rank >=
    world_size``, ...).
    """
    if launcher == "torchrun":
        rank_var, world_var, local_var = "RANK", "WORLD_SIZE", "LOCAL_RANK"
    elif launcher == "slurm":
        world = _slurm_world_var(env)
        if world is None:
            raise ValueError("SLURM launch without SLURM_NTASKS / SLURM_STEP_NUM_TASKS in the environment")
        rank_var, world_var, local_var = "SLURM_PROCID", world, "SLURM_LOCALID"
    elif launcher == "openmpi":
        rank_var, world_var, local_var = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"
    elif launcher == "mpich":
        rank_var, world_var, local_var = "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"
    elif launcher == "mpi4py":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        try:
            return comm.Get_rank(), comm.Get_size(), local.Get_rank()
        finally:
            local.Free()
    elif launcher == "single":
        return 0, 1, 0
    else:
        raise ValueError(f"unknown launcher {launcher!r}")

    for name in (rank_var, world_var):
        if name not in env:
            raise ValueError(f"launcher {launcher!r} needs environment variable {name}, which is not set")
    rank = _get_int(env, rank_var)
    world_size = _get_int(env, world_var)
    # A missing local rank (e.g. hand-set RANK/WORLD_SIZE) is taken as 0.
    local_rank = _get_int(env, local_var) if local_var in env else 0
    if world_size < 1:
        raise ValueError(f"{world_var}={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_var}={rank} must satisfy 0 <= {rank_var} < {world_var}={world_size}")
    if not 0 <= local_rank < world_size:
        raise ValueError(f"{local_var}={local_rank} must satisfy 0 <= {local_var} < {world_var}={world_size}")
    return rank, world_size, local_rank


_HOST_TOKEN = re.compile(r"\[([^\[\]]*)\]")


def _expand_brackets(body: str, host: str) -> list[str]:
    """Expand the inside of one ``[...]`` group: ``"01-03,07"`` -> ``["01", "02", "03", "07"]``."""
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty range in SLURM hostlist entry {host!r}")
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in SLURM hostlist entry {host!r}")
        if not sep:
            out.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise ValueError(f"descending range {part!r} in SLURM hostlist entry {host!r}")
        width = len(lo) if lo.startswith("0") else 0  # zero-padded ranges keep their width
        out.extend(str(i).zfill(width) for i in range(start, stop + 1))
    return out


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets, checking bracket balance."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in SLURM hostlist {s!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM hostlist {s!r}")
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM hostlist {s!r}")
    parts.append(s[start:])
    return parts


def parse_slurm_nodelist(s: str) -> list[str]:
    """Expand a compressed SLURM hostlist into host names, in order.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07",
    "gpu5"]``.  Zero padding is kept, several bracket groups in one name expand
    to their cartesian product (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``)
    and duplicates are kept.  An empty string gives ``[]``; malformed input
    raises ``ValueError``.
    """
    hosts: list[str] = []
    s = s.strip()
    if not s:
        return hosts
    for entry in _split_top_level(s):
        entry = entry.strip()
        if not entry:
            continue
        expanded = [""]
        pos = 0
        for m in _HOST_TOKEN.finditer(entry):
            prefix = entry[pos : m.start()]
            choices = _expand_brackets(m.group(1), entry)
            expanded = [e + prefix + c for e in expanded for c in choices]
            pos = m.end()
        tail = entry[pos:]
        if "[" in tail or "]" in tail:
            raise ValueError(f"malformed SLURM hostlist entry {entry!r}")
        hosts.extend(e + tail for e in expanded)
    return hosts


def _slurm_default_port(env: Mapping[str, str]) -> int:
    """A port in [20000, 32000) derived from SLURM_JOB_ID (and the step id).

    Jobs (and steps of one job) sharing a first node thus rarely collide,
    while all tasks of one step agree without communicating.
    """
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")).strip()
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")).strip()
    job_n = int(job) if job.isdigit() else zlib.crc32(job.encode())
    step_n = int(step) if step.isdigit() else 0
    return 20000 + (job_n * 13 + step_n) % 12000


# --------------------------------------------------------------------------- side effects


def _first_slurm_host(env: Mapping[str, str]) -> str:
    """First host of the step (or job) nodelist; ``scontrol`` if installed, else our parser."""
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        nodelist = env.get(name, "").strip()
        if not nodelist:
            continue
        scontrol = shutil.which("scontrol")
        if scontrol is not None:
            try:
                out = subprocess.run(
                    [scontrol, "show", "hostnames", nodelist],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout.split()
                if out:
                    return out[0]
            except (OSError, subprocess.SubprocessError):
                pass
        hosts = parse_slurm_nodelist(nodelist)
        if hosts:
            return hosts[0]
    raise RuntimeError(
        "SLURM launch but neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set"
    )


def _free_port() -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _routable_address() -> str:
    """This host's address as other hosts would reach it (best effort)."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
        if not addr.startswith("127."):
            return host
    except OSError:
        pass
    # Hostname resolves to loopback (common /etc/hosts setup): ask the routing
    # table which interface reaches the outside.  UDP connect sends no packet.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
    except OSError:
        return host


def _mpi_rendezvous(env: MutableMapping[str, str], master_port: int) -> None:
    """Fill MASTER_ADDR / MASTER_PORT for an MPI launch, agreeing via mpi4py if possible."""
    need_addr = "MASTER_ADDR" not in env
    need_port = "MASTER_PORT" not in env
    if not (need_addr or need_port):
        return
    if importlib.util.find_spec("mpi4py") is None:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(master_port))
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    proposal = None
    if comm.Get_rank() == 0:
        single_host = all(h == hosts[0] for h in hosts)
        proposal = ("127.0.0.1" if single_host else _routable_address(), _free_port())
    addr, port = comm.bcast(proposal, root=0)
    if need_addr:
        env["MASTER_ADDR"] = addr
    if need_port:
        env["MASTER_PORT"] = str(port)


def _info_from_initialised(launcher: str) -> DistInfo:
    """Describe an already-initialised default process group."""
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        local_rank = 0
    if torch.cuda.is_available() and dist.get_backend() != "gloo":
        device = torch.device("cuda", torch.cuda.current_device())
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, launcher)


def init_distributed(
    backend: str | None = None,
    timeout: datetime.timedelta = _DEFAULT_TIMEOUT,
    master_port: int = 29500,
) -> DistInfo:
    """Initialise the default ``torch.distributed`` process group from the launcher's environment.

    Detects the launcher (:func:`detect_launcher`), exports ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and calls
    ``init_process_group(init_method="env://")``.  Values already present in
    ``MASTER_ADDR`` / ``MASTER_PORT`` are respected.  Defaults when they are not:

    * torchrun: ``127.0.0.1`` : ``master_port`` (torchrun normally sets both);
    * SLURM: first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``)
      : a port derived from ``SLURM_JOB_ID``;
    * MPI: rank 0's address and a free port picked by rank 0, broadcast with
      mpi4py (``127.0.0.1`` when all ranks share a host); without mpi4py
      ``127.0.0.1`` : ``master_port`` (set MASTER_ADDR yourself for multi-node);
    * single process: ``127.0.0.1`` and a free port.

    ``timeout`` (default 10 minutes) bounds every collective of the default group: when a peer dies or
    its link partitions, the survivors' pending collective fails after at most ``timeout`` and commopt
    raises it from ``backward()`` / ``step()`` as an error naming the collective (a killed peer whose
    sockets close is usually noticed at once). Choose it above your longest legitimate wait (a slow
    checkpoint on one rank, a first ``torch.compile``); tests use a few seconds.

    ``backend=None`` picks ``"nccl"`` when CUDA is available, else ``"gloo"``.
    With CUDA the current device becomes ``cuda:(local_rank % device_count)``
    (so one-GPU-per-task bindings also work).  If the process group is already
    initialised nothing is re-initialised and its description is returned.

    A gloo group still open when the interpreter exits is destroyed by commopt after its own collectives
    have settled (:mod:`commopt.teardown`: without it gloo's threads can abort the exiting process).

    Raises ``ValueError`` for malformed or inconsistent launcher variables and
    ``RuntimeError`` when a requested backend is unavailable.
    """
    global _INFO
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        if _INFO is not None and _INFO.rank == dist.get_rank() and _INFO.world_size == dist.get_world_size():
            return _INFO
        return _info_from_initialised(detect_launcher(env))
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")

    launcher = detect_launcher(env, probe_mpi4py=_should_probe_mpi4py(env))
    rank, world_size, local_rank = launcher_ranks(env, launcher)

    if launcher == "slurm":
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env)
        env.setdefault("MASTER_PORT", str(_slurm_default_port(env)))
    elif launcher in ("openmpi", "mpich", "mpi4py"):
        _mpi_rendezvous(env, master_port)
    elif launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    else:  # torchrun or hand-set RANK / WORLD_SIZE
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(master_port))
    _get_int(env, "MASTER_PORT")  # validate a user-supplied value early, naming the variable

    env["RANK"] = str(rank)
    env["WORLD_SIZE"] = str(world_size)
    env["LOCAL_RANK"] = str(local_rank)

    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not (cuda and dist.is_nccl_available()):
        raise RuntimeError("backend='nccl' requested but CUDA/NCCL is not available; use backend='gloo'")
    if backend == "mpi" and not dist.is_mpi_available():
        raise RuntimeError("backend='mpi' requested but this PyTorch build lacks MPI support")

    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
    )
    mark_used()   # a gloo group left open at exit is closed by commopt (commopt.teardown)
    _INFO = DistInfo(rank, world_size, local_rank, device, launcher)
    return _INFO
