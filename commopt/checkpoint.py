"""Per-rank checkpoint files that are never left half-written and whose read errors no rank waits on.

:func:`save_checkpoint` writes atomically (a temporary file in the same directory, flushed and
fsync'ed, then ``os.replace`` onto the real name, then the directory fsync'ed): a crash or SIGKILL
mid-save leaves the previous file (or none) under the real name, never a truncated one.

:func:`load_checkpoint` is a collective: every rank of the group calls it with its own path. Each rank
reads (and, for torch's zip format, verifies the CRC-32 of every record, which ``torch.load`` does
not), then one small all-gather decides for all: if any rank could not read its file (missing, empty,
truncated, corrupted, refused by ``weights_only``), **every** rank raises the same
:class:`CheckpointError` naming the rank(s), path(s) and cause(s). Without it, the rank whose
``torch.load`` failed raises while the others enter the (collective) ``opt.load_state_dict`` and wait
there until the process-group timeout.

:func:`latest_checkpoint` picks, by agreement, the newest step for which *every* rank has a complete
file (a kill between two ranks' saves leaves one rank a step ahead).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from .consistency import refuse_together

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointError"]

PathLike = Union[str, "os.PathLike[str]"]

_ZIP_MAGIC = b"PK\x03\x04"
_MAX_CAUSE = 400  # characters of a cause kept in the message (torch's own messages can be very long)


class CheckpointError(ValueError):
    """A checkpoint could not be read on at least one rank; raised on every rank with the same message."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: Any, path: PathLike, **save_kwargs: Any) -> str:
    """``torch.save(obj, path)``, atomically: the bytes go to a temporary file next to ``path`` (same
    file system), which is flushed, fsync'ed and then renamed onto ``path`` (``os.replace``, atomic on
    POSIX and Windows); the directory is fsync'ed so that the rename survives a power loss. A crash at
    any point leaves either the old ``path`` or the new one, complete. Not a collective (each rank saves
    its own file); returns ``path`` as a string. ``save_kwargs`` go to ``torch.save``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > _MAX_CAUSE:
        text = text[:_MAX_CAUSE] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Unreadable(Exception):
    """A diagnosed reason why a file cannot be loaded (shown without its type name)."""


def _cause(exc: BaseException) -> str:
    return " ".join(str(exc).split()) if isinstance(exc, _Unreadable) else _short(exc)


def _read(path: str, map_location: Any, weights_only: bool, verify: bool) -> Any:
    """torch.load with the file's state diagnosed first; raises :class:`_Unreadable` saying what is wrong
    (or torch.load's own exception)."""
    if not os.path.exists(path):
        raise _Unreadable("no such file")
    if os.path.isdir(path):
        raise _Unreadable("it is a directory")
    size = os.path.getsize(path)
    if size == 0:
        raise _Unreadable("the file is empty (0 bytes: a save that never wrote, or a truncated copy)")
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    if is_zip:
        if not zipfile.is_zipfile(path):
            raise _Unreadable(f"the file is truncated ({size} bytes, no zip central directory: the save did not "
                              "finish, or the copy was cut short)")
        if verify:
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except Exception as exc:  # noqa: BLE001 - a broken archive
                raise _Unreadable(f"the file is corrupted (its zip structure is damaged: {_short(exc)})") from exc
            if bad is not None:
                raise _Unreadable(f"the file is corrupted (CRC-32 mismatch in record {bad!r}: its bytes changed "
                                  "after they were written)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        if not is_zip:
            raise _Unreadable(f"not a torch checkpoint in torch's zip format, and torch.load failed "
                              f"({_short(exc)})") from exc
        if weights_only and isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            detail = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), "")
            raise _Unreadable(
                "it holds objects that torch.load(weights_only=True) does not allow"
                + (f" ({detail})" if detail else "")
                + "; commopt's own state dicts (CompressedOptimizer, CO2, MKOR) load with weights_only=True. "
                "If you trust the file, pass weights_only=False, or allow the classes with "
                "torch.serialization.add_safe_globals") from exc
        raise


def load_checkpoint(path: PathLike, map_location: Any = None, group: Optional[dist.ProcessGroup] = None, *,
                    weights_only: bool = True, verify: bool = True) -> Any:
    """``torch.load(path)`` on every rank, agreed: **every rank of ``group`` must call it** (each with
    its own path; one ``all_gather_object``). Returns the loaded object, or raises
    :class:`CheckpointError` (a ``ValueError``) on every rank if any rank could not read its file,
    e.g. ``commopt.load_checkpoint refused on rank(s) [1]; nothing was changed on any rank:
    rank 1: could not read ckpt_rank1.pt: the file is truncated (...)``. On the failing rank the
    error is chained (``from``) to the local exception. Nothing is loaded into anything, so after
    the error the run goes on as it was (retry with another file, or train on).

    Args:
        path: this rank's checkpoint file (e.g. ``f"ckpt_rank{rank}.pt"``).
        map_location: as for ``torch.load``.
        group: the process group that agrees (default: the world). Without an initialised process
            group it is a plain, checked ``torch.load`` raising :class:`CheckpointError`.
        weights_only: passed to ``torch.load`` (default True: commopt's optimizer state dicts, model
            state dicts, LR schedulers, ``GradScaler`` and ``torch.get_rng_state()`` all load that way).
            A file holding other objects (e.g. a NumPy RNG state) is refused with a message that says
            so; pass ``weights_only=False`` only for files you trust.
        verify: check the CRC-32 of every record of torch's zip format before loading (one extra read
            of the file); ``torch.load`` itself does not, so a flipped bit would load silently.
    """
    path = os.fspath(path)
    obj, local_exc, error = None, None, None
    try:
        obj = _read(path, map_location, weights_only, verify)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        local_exc = exc
        error = f"could not read {path}: {_cause(exc)}"
    try:
        refuse_together(error, group, "commopt.load_checkpoint")
    except ValueError as agreed:
        raise CheckpointError(str(agreed)) from local_exc
    return obj


def latest_checkpoint(find: Callable[[], "dict[int, str]"], group: Optional[dist.ProcessGroup] = None
                      ) -> "tuple[Optional[int], Optional[str]]":
    """The newest step that **every** rank has a checkpoint for, agreed (a collective).

    ``find()`` returns this rank's complete checkpoints as ``{step: path}`` (files written by
    :func:`save_checkpoint` are complete once they exist under their name). Returns ``(step, path)``
    for this rank, or ``(None, None)`` when no step is common to all ranks. A kill between two ranks'
    saves leaves one rank a step ahead; this picks the last step that all of them reached."""
    mine = dict(find())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, sorted(mine), group=group)
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
    else:
        common = set(mine)
    if not common:
        return None, None
    step = max(common)
    return step, mine[step]


def steps_in(folder: PathLike, pattern: str) -> "dict[int, str]":
    """``{step: path}`` of the files in ``folder`` whose name matches ``pattern``, a regular expression
    with one group capturing the step (e.g. ``r"ckpt_step(\\d+)_rank0\\.pt"``); for
    :func:`latest_checkpoint`."""
    folder = os.fspath(folder)
    out: dict[int, str] = {}
    if not os.path.isdir(folder):
        return out
    rx = re.compile(pattern)
    for name in os.listdir(folder):
        m = rx.fullmatch(name)
        if m:
            out[int(m.group(1))] = os.path.join(folder, name)
    return out
