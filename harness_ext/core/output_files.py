"""Writing outputs: atomic writes whose failures are user errors, early checks of output paths, and a lock for read-modify-write.

An output path that cannot be written (its parent is a file, no permission, a read-only disk) is a NeedlesError
naming the path, never a traceback. ``locked`` serialises processes that update the same file (two CI jobs
upserting into one leaderboard CSV) with ``fcntl.flock`` on a sidecar lock file.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness_ext.core.atomic_io import write_atomic
from harness_ext.core.errors import NeedlesError


def _why_not(path: Path, exc: OSError) -> str:
    """The reason a path cannot be written, in words (the first ancestor that is a file, when that is it)."""
    try:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a folder"
                break
        if exc.errno == errno.EISDIR or path.is_dir():
            return f"{path} is a folder"
    except OSError:  # cannot even look (no permission): the original error says enough
        pass
    return exc.strerror or str(exc)


def output_error(path: str | Path, exc: OSError, what: str = "output") -> NeedlesError:
    """The NeedlesError for an output that could not be written."""
    path = Path(path)
    return NeedlesError(
        f"cannot write the {what} {path}: {_why_not(path, exc)}",
        fix="choose an output path in a folder you can write to",
    )


def _unwritable(path: Path, folder: bool) -> str | None:
    """Why ``path`` (a file, or with ``folder`` a folder to write into) clearly cannot be written, else None."""
    try:
        if folder and path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder"
        for parent in [path, *path.parents] if folder else path.parents:
            if parent.exists():
                if not parent.is_dir():
                    return f"{parent} is a file, not a folder"
                if not os.access(parent, os.W_OK | os.X_OK):
                    return f"no permission to write in {parent}"
                return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_output(path: str | Path | None, what: str = "output") -> None:
    """Fail early, before any work, when the file ``path`` clearly cannot be written (a folder, under a file, read-only)."""
    if path is None or str(path) == "-":
        return
    problem = _unwritable(Path(path), folder=False)
    if problem:
        raise NeedlesError(
            f"cannot write the {what} {path}: {problem}", fix="choose an output path in a folder you can write to"
        )


def check_output_dir(path: str | Path | None, what: str = "output folder") -> None:
    """Fail early when a folder to write into cannot be one (it is a file, it lies under a file, read-only)."""
    if path is None:
        return
    problem = _unwritable(Path(path), folder=True)
    if problem:
        raise NeedlesError(f"cannot write the {what} {path}: {problem}", fix="choose a folder you can write to")


def write_output(path: str | Path, data: str | bytes, what: str = "output") -> None:
    """Write ``data`` to ``path`` atomically (creating folders); an unwritable path is a NeedlesError."""
    try:
        write_atomic(Path(path), data)
    except OSError as exc:
        raise output_error(path, exc, what) from None


def append_output(path: str | Path, text: str, what: str = "output") -> None:
    """Append to a file others also append to (GitHub's step summary): never replaced, so not atomic."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise output_error(path, exc, what) from None


def lock_path(path: str | Path) -> Path:
    """The sidecar lock file of ``path``: ``.<name>.lock`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def locked(path: str | Path, what: str = "output") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (via its sidecar lock file) for a read-modify-write.

    The sidecar, not the file itself, is locked because the file is replaced by an atomic rename: a lock on
    the old inode would not exclude a process that opened the new one. The holder deletes the sidecar before
    releasing it, so none is left behind; a waiter that then gets the lock of a deleted sidecar sees that the
    name now points elsewhere (or nowhere) and starts over.
    """
    sidecar = lock_path(path)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(sidecar)
    except OSError as exc:
        raise output_error(path, exc, what) from None
    try:
        yield
    finally:
        sidecar.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def _acquire(sidecar: Path) -> int:
    while True:
        fd = os.open(sidecar, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(sidecar)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the sidecar was deleted by the previous holder: lock the current one instead
