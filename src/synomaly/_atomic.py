"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A write that fails because of where it goes (a full disk, a read-only folder, a file where a folder
should be) raises :class:`~synomaly.errors.OutputError`, one line naming the file; every writer of
the package goes through :func:`atomic_path`, so this holds for images, JSON, CSV, HTML, weights and
checkpoints alike. :func:`check_writable` finds the same problems before any work is done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synomaly.errors import InputError, OutputError, OutputExistsError, SynomalyError

_mkstemp = tempfile.mkstemp  # every output file starts here (tests inject read-only folders through it)
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "the file is too large for the file system"}
_DENIED = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)


def _not_a_folder(folder: Path) -> str | None:
    """How ``folder`` fails to be (or to become) a folder: it, or a path above it, is a file; None when it can."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        return None
    kind = "a file" if existing.is_file() else "not a folder"
    return f"is {kind}, not a folder" if existing == folder else f"sits under {existing}, which is {kind}"


def write_failure(path: Path, error: BaseException) -> OutputError | None:
    """The one-line error for a write of ``path`` that failed because of its place, or None for other failures.

    The cause is looked for along the exception's chain (writers such as nibabel or torch wrap the
    ``OSError``); a write that fails on a full file system with another error counts as a full disk.
    """
    seen: BaseException | None = error
    while seen is not None:
        code = getattr(seen, "errno", None) if isinstance(seen, OSError) else None
        if code in _FULL:
            return OutputError(path, f"cannot be written: {_FULL[code]}; free space and run the same command again")
        if code in _DENIED:
            return OutputError(path, f"cannot be written: {_DENIED[code]}; choose a writable output folder")
        if code in _NOT_A_FOLDER and (problem := _not_a_folder(path.parent)):
            return OutputError(path.parent, f"{problem}; choose another output folder")
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        if os.statvfs(path.parent).f_bavail == 0:
            return OutputError(path, f"cannot be written: {_FULL[errno.ENOSPC]} ({type(error).__name__}: {error}); "
                                     "free space and run the same command again")
    return None


@contextlib.contextmanager
def named_failures(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` into :class:`OutputError` when :func:`write_failure` recognises it."""
    try:
        yield
    except SynomalyError:
        raise
    except Exception as error:
        failure = write_failure(Path(path), error)
        if failure is None:
            raise
        raise failure from error


def check_writable(folder: str | Path, hint: str = "choose a writable output folder") -> None:
    """Refuse, before any work, a folder that outputs cannot be written into.

    The folder (or, while it does not exist, the nearest existing folder above it, where it will be
    made) must be a folder in which a file can be created: this catches a path that is a file or sits
    under one, a read-only folder or file system, and missing permissions. Nothing is left behind.
    ``hint`` ends the message of a folder that cannot be written.

    Raises:
        OutputError: Naming the folder and the problem.
    """
    folder = Path(folder)
    problem = _not_a_folder(folder)
    if problem:
        raise OutputError(folder, f"{problem}; choose another output folder")
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = _mkstemp(prefix=".synomaly-write-test.", dir=existing)
    except OSError as error:
        where = "" if existing == folder else f" (it would be made in {existing})"
        reason = _DENIED.get(error.errno or 0) or _FULL.get(error.errno or 0) or error.strerror or str(error)
        raise OutputError(folder, f"cannot be written{where}: {reason}; {hint}") from None
    os.close(fd)
    os.unlink(probe)


def _commit(tmp: Path, path: Path) -> None:
    """Give the finished temporary file the umask's permissions (mkstemp makes 0600 files) and rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    ``path`` itself must not be a symbolic link (its folder may be one, e.g. a scratch space).
    The temporary name keeps the target's suffixes, so suffix-driven writers still work.

    Raises:
        OutputError: The write failed because of its place (see :func:`write_failure`).
    """
    path = Path(path)
    if path.is_symlink():  # a planted link would carry the output elsewhere
        raise InputError(path, "is a symbolic link: outputs are never written through links; remove it or choose "
                               "another output folder")
    with named_failures(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes)
        fd, tmp = _mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with named_failures(path):
            yield tmp_path
            _commit(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN written as ``null``-free ``NaN`` is refused)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) while one run writes into it.

    The lock is ``fcntl.flock`` on the folder itself (no lock file is left behind), released by the
    operating system when the process ends however it ends, so a killed run never leaves a stale
    lock. Where ``fcntl`` is missing (Windows) no lock is taken.

    Raises:
        OutputExistsError: Another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problem = _not_a_folder(folder) or f"cannot be made ({error.strerror})"
        raise OutputError(folder, f"{problem}; choose another output folder") from None
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(folder, f"another {what} is writing into this folder; wait for it to finish or "
                                            "choose another output folder") from None
        yield
    finally:
        os.close(fd)
