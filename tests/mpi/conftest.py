"""Multi-rank tests: torch.distributed (gloo) initialised once per session from mpi4py.

Run them with::

    .venv/bin/mpiexec -n 2 .venv/bin/python -m pytest --with-mpi tests/mpi -q
    .venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi tests/mpi -q

Every test is marked ``@pytest.mark.mpi(min_size=2)``, so a plain ``pytest`` run
(without ``--with-mpi``) skips them; mpi4py is imported only under ``--with-mpi``.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# tests/ (reference.py) and tests/mpi (mpi_helpers.py) importable whatever the import mode
for _p in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


@dataclass(frozen=True)
class World:
    rank: int
    size: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def world(request) -> World:
    """gloo process group over all MPI ranks (rank/size from MPI.COMM_WORLD); set up once per session."""
    if not request.config.getoption("--with-mpi", default=False):
        pytest.skip("multi-rank test: run under mpiexec with --with-mpi")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        pytest.skip("multi-rank test: needs at least 2 MPI ranks")
    torch.set_num_threads(1)
    created = False
    if not dist.is_initialized():
        port = _free_port() if rank == 0 else None
        port = comm.bcast(port, root=0)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        # a bounded timeout: a rank that fails inside a collective must not hang the others forever
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=120))
        created = True
    assert dist.get_rank() == rank and dist.get_world_size() == size
    yield World(rank, size)
    if created and dist.is_initialized():
        comm.Barrier()
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _in_step(request):
    """Start each multi-rank test on all ranks together, single-threaded, from the same seed."""
    if request.node.get_closest_marker("mpi") is None or not request.config.getoption("--with-mpi", default=False):
        yield
        return
    from mpi4py import MPI

    torch.set_num_threads(1)
    torch.manual_seed(1234)
    MPI.COMM_WORLD.Barrier()
    yield
