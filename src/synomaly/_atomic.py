"""Atomic file output: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    A reader never sees a half-written file, and an interrupted write leaves the old file intact.
    ``path`` itself must not be a symbolic link (its folder may be one, e.g. a scratch space).
    The temporary name keeps the target's suffixes, so suffix-driven writers still work.
    """
    path = Path(path)
    if path.is_symlink():  # a planted link would carry the output elsewhere
        from synomaly.errors import InputError

        raise InputError(path, "is a symbolic link: outputs are never written through links; remove it or choose "
                               "another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs follow the umask
        os.replace(tmp_path, path)
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
    from synomaly.errors import OutputExistsError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
