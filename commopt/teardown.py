"""What commopt does when the interpreter exits: settle its own collectives, then close gloo groups.

A script may end without ``opt.finish()`` or ``destroy_process_group()``, with a CO2 outer exchange or a
DDP bucket exchange still in flight. Two things can then abort the process with ``terminate called
without an active exception`` (SIGABRT, exit 134) after training has finished:

* a pending ``.then()`` callback is Python code that a gloo worker thread would run during interpreter
  shutdown;
* a completed collective whose Python tensors the main thread has already dropped: the gloo worker
  thread still holds the work for a moment after ``wait()`` returns, so *its* release is the last one,
  and freeing a tensor that has a Python object needs the GIL, which a thread cannot take while the
  interpreter is being finalised (the same abort with plain torch: pytorch/pytorch#190489, #65231).

So the work is ordered, in one ``atexit`` handler registered when commopt is imported (handlers that a
script registers later run before it):

1. every *drain* commopt registered (CO2's outer exchange, the hook's unfinished buckets) waits for its
   collectives and hands what they hold to :func:`keep_until_exit` instead of dropping it;
2. if commopt was used and a gloo default group is still initialised, ``destroy_process_group()``: its
   worker threads are joined once nothing else holds the group (gloo only: the call is local; NCCL groups
   are left to the script, as torch asks). A DDP model keeps the group and its threads alive past this
   call, so the hook's drain also waits for the last step's callback chain and then yields the GIL
   briefly (``commopt.hook._drain_at_exit``);
3. what was kept is released, on the main thread, while the interpreter still runs;
4. the handler releases the GIL for :data:`GRACE_S`: a script that called ``destroy_process_group()``
   itself with its DDP model or optimizer still alive (a module-level script, nanoGPT's style) leaves the
   group's worker threads running, and one that finishes a collective then needs the GIL to release its
   tensors. Without this pause 14 of 64 such runs aborted at exit (CO2, CO2 + TopK, CompressedOptimizer
   and plain DDP, 16 each; plain DDP's aborts are torch's own race), with it none:
   ``experiments/results/teardown_destroy_global.md`` and ``..._nopause.md``.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any, Callable

import torch.distributed as dist

__all__ = ["on_exit", "keep_until_exit", "mark_used"]

_DRAINS: list[Callable[[], None]] = []
_KEPT: list[Any] = []
_USED: list[bool] = []


def on_exit(drain: Callable[[], None]) -> None:
    """Run ``drain`` at exit before the group is closed (each function once; the last registered first)."""
    mark_used()
    if drain not in _DRAINS:
        _DRAINS.append(drain)


def mark_used() -> None:
    """commopt trains in this process: close a gloo default group left open at exit (step 2 above)."""
    if not _USED:
        _USED.append(True)


def keep_until_exit(*objs: Any) -> None:
    """Hold objects of a settled collective (its work, futures, tensors) until the group is closed at
    exit, so that the backend's thread never releases the last reference to them (module docstring)."""
    _KEPT.extend(o for o in objs if o is not None)


def _close_gloo_group() -> None:
    if not (_USED and dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() != "gloo":
        return
    dist.destroy_process_group()


# how long the exit handler releases the GIL after dropping what it kept (step 4 of the module docstring);
# COMMOPT_EXIT_GRACE_S=0 turns the pause off (experiments/teardown_repeat.py measures both)
def _grace_from_env(default: float = 0.2) -> float:
    try:
        return max(0.0, float(os.environ.get("COMMOPT_EXIT_GRACE_S", default)))
    except ValueError:  # a malformed value never breaks the import
        return default


GRACE_S = _grace_from_env()


def _at_exit() -> None:
    for drain in reversed(_DRAINS):
        try:
            drain()
        except Exception:  # noqa: BLE001 - never fail at exit
            pass
    try:
        _close_gloo_group()
    except Exception:  # noqa: BLE001 - never fail at exit
        pass
    _KEPT.clear()
    if _USED and GRACE_S > 0:
        # a gloo worker thread that still holds a finished collective (a group the script destroyed while a
        # DDP model or an optimizer kept it alive, so its threads were not joined) needs the GIL to release
        # the collective's tensors; released here, it gets it before the interpreter is finalised
        time.sleep(GRACE_S)


atexit.register(_at_exit)
