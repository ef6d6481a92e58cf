"""Command line: ``commopt info``, ``commopt demo`` and ``commopt bench`` (also ``python -m commopt``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence

__all__ = ["main", "info_lines"]


def _version() -> str:
    """Installed commopt version, or ``"dev"`` for a source checkout."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("commopt")
    except (ImportError, PackageNotFoundError):
        return "dev"


def _try(fn, default: str = "?") -> str:  # type: ignore[no-untyped-def]
    """``str(fn())``, or ``"<default> (<error>)"`` if it raises."""
    try:
        return str(fn())
    except Exception as exc:  # noqa: BLE001 -- info must report, never crash
        return f"{default} ({type(exc).__name__}: {exc})"


def _backend_lines() -> list[str]:
    import torch.distributed as dist

    if not dist.is_available():
        return ["torch.distributed: not available in this build"]
    out = []
    for name in ("nccl", "gloo", "mpi", "ucc", "xccl"):
        check = getattr(dist, f"is_{name}_available", None)
        if check is not None:
            out.append(f"  {name:<5} {'yes' if check() else 'no'}")
    return ["torch.distributed backends:"] + out


def _cupy_line() -> str:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy: not installed"
    try:
        import cupy

        return f"CuPy: {cupy.__version__}"
    except Exception as exc:  # noqa: BLE001
        return f"CuPy: installed but import failed ({type(exc).__name__}: {exc})"


def _kernels_lines() -> list[str]:
    """commopt.kernels.describe(): the COMMOPT_KERNELS mode and which path CPU and CUDA tensors run and why.
    Never raises: any failure (import, OpenCL probe, CuPy) is reported in one line."""
    try:
        from commopt import kernels

        lines = list(kernels.describe())
        return lines or ["kernels: describe() returned nothing"]
    except Exception as exc:  # noqa: BLE001 -- info must print whatever is broken
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [f"kernels: could not be described ({type(exc).__name__}: {msg}); the reference path is the safe choice"]


def _mpi_lines() -> list[str]:
    """mpi4py and MPI library versions, without calling MPI_Init if we can avoid it."""
    if importlib.util.find_spec("mpi4py") is None:
        return ["mpi4py: not installed"]
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            # MPI_Get_library_version may be called before MPI_Init.
            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
        from mpi4py import MPI

        lib = MPI.Get_library_version().strip().splitlines()
        return [f"mpi4py: {mpi4py.__version__}", f"MPI library: {lib[0] if lib else '?'}"]
    except Exception as exc:  # noqa: BLE001
        return [f"mpi4py: import failed ({type(exc).__name__}: {exc})"]


def info_lines() -> list[str]:
    """What ``commopt info`` prints; never initialises a process group."""
    import torch

    from commopt.distributed import LAUNCHER_ENV_VARS, detect_launcher

    lines = [
        f"commopt: {_version()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__}",
    ]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        lines.append(f"CUDA: available, {n} device(s), CUDA {torch.version.cuda}")
        lines += [f"  cuda:{i} {_try(lambda i=i: torch.cuda.get_device_name(i))}" for i in range(n)]
    else:
        lines.append("CUDA: not available")
    lines += _backend_lines()
    lines.append(_cupy_line())
    lines += _kernels_lines()
    lines += _mpi_lines()
    launcher = detect_launcher(os.environ)
    lines.append(f"launcher (from environment): {launcher}")
    names = list(LAUNCHER_ENV_VARS.get(launcher, ()))
    names += [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in names]
    for name in names:
        if name in os.environ:
            lines.append(f"  {name}={os.environ[name]}")
    from .hierarchy import local_world_size

    L = local_world_size(os.environ)
    lines.append(f"ranks per node (launcher): {L if L is not None else 'not set'}"
                 f" (node_size='auto' {'compresses between nodes of ' + str(L) + ' ranks' if L and L > 1 else 'runs flat'})")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()), flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from commopt.demo import run_demo

    return run_demo(ranks=args.ranks, steps=args.steps, quick=args.quick)


def _cmd_bench(args: argparse.Namespace) -> int:
    from commopt.bench import config_from_args, run_bench

    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return run_bench(cfg, ranks=args.ranks)


_BENCH_HELP = """Measure all-reduce and all-gather latency and bandwidth (4 KiB .. 64 MiB, fitted by least squares) on the
ranks it is launched on (torchrun, srun, mpiexec, or --ranks N local CPU processes), and the compression
throughput of TopK / RandK with each feedback rule on the local device; then, for --params or --model,
predict each method's communication time per step (dense DDP, bf16, TopK, RandK, CO2, local SGD) with the
SPEC section 3/6 cost model and recommend one. Rank 0 prints progress, the figures and the table.

examples:
  commopt bench --ranks 2 --params 350M
  torchrun --nnodes 2 --nproc_per_node 8 ... -m commopt bench --params 1.3B --compute-ms 250
  mpiexec -n 4 python -m commopt bench --model mymodel.py:build --tau 24"""


def _parser() -> argparse.ArgumentParser:
    from commopt.demo import DEFAULT_STEPS, QUICK_STEPS

    p = argparse.ArgumentParser(prog="commopt", description="Communication-efficient data-parallel training.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show versions, accelerators, backends and the detected launcher")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="compare dense and compressed DDP on local CPU ranks (~1 min)")
    demo.add_argument("--ranks", type=int, default=2, help="number of local processes (default 2)")
    demo.add_argument(
        "--steps", type=int, default=None, help=f"steps per setting (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)"
    )
    demo.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    demo.set_defaults(func=_cmd_demo)
    from commopt.bench import add_arguments

    bench = sub.add_parser("bench", help="measure links and compressors, predict each method's time per step",
                           description=_BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``commopt`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
