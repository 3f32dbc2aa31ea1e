"""Files: where mars_ref keeps what it makes once per machine, how it replaces a file whole or not at all, and
how an error of the file system becomes a message that says what happened and what to do."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def cache_dir() -> Path:
    """Where downloads and compiled kernels are kept: ``$MARS_REF_CACHE``, else
    ``${XDG_CACHE_HOME:-~/.cache}/mars_ref``."""
    if os.environ.get("MARS_REF_CACHE"):
        return Path(os.environ["MARS_REF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mars_ref"


class StorageError(OSError):
    """A file or directory cannot be written (a full or read-only disk, a path through a file); the message says
    what was being done and what to do. ``errno`` is the original error's."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file is too large for this file system"}


def os_error_message(e: OSError, where: str | Path, action: str, instead: str, when_full: str = "") -> str:
    """One line for an ``OSError`` met while ``action`` in ``where``, with what to do.

    ``instead`` is the other place to try ("choose another --out-dir"); ``when_full`` the advice for a full disk
    (default: "free some space, or " + ``instead``)."""
    if e.errno in FULL:
        return f"{where}: {FULL[e.errno]} while {action}: {when_full or 'free some space, or ' + instead}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return f"{where}: cannot write ({why}) while {action}: make it writable, or {instead}"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{where}: a path component is a file, not a directory ({e}) while {action}: {instead}"
    return f"{where}: {action} failed: {e.strerror or e}"


@contextmanager
def storage(where: str | Path, action: str, instead: str, when_full: str = "", after: str = "") -> Iterator[None]:
    """Turn an ``OSError`` of the file system into a ``StorageError`` with ``os_error_message``'s text (and
    ``after`` appended)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(os_error_message(e, where, action, instead, when_full) + after, e.errno) from e


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reserve(f: BinaryIO, n_bytes: int) -> None:
    """Ask the file system for the space up front, so that a full disk fails before anything is written."""
    if n_bytes > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, n_bytes)
        except OSError as e:
            if e.errno in FULL:
                raise
            # EOPNOTSUPP, EINVAL, ...: this file system cannot; the writes will tell


def write_atomic(path: str | Path, content: str | bytes | Iterable | Callable[[BinaryIO], None], *,
                 tmp: str | Path | None = None, reserve: int = 0,
                 write: Callable[[BinaryIO, bytes], None] | None = None) -> None:
    """Replace ``path`` by ``content`` whole or not at all: written to a temporary file in the same directory,
    flushed and synced, renamed onto ``path``, and the rename synced. On any failure (a full disk, a kill) the
    temporary file is removed and ``path`` is as it was.

    ``content``: text (UTF-8), bytes, an iterable of bytes-like pieces, or a function that writes into the open
    binary file. ``tmp``: the temporary file's path (default: a unique name, so that concurrent writers never
    share one). ``reserve``: bytes to allocate first (``posix_fallocate``). ``write(f, piece)``: how each piece is
    written (default ``f.write``)."""
    path = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        f = os.fdopen(fd, "w+b")
        os.chmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
    else:
        tmp = Path(tmp)
        f = open(tmp, "w+b")
    try:
        with f:
            _reserve(f, reserve)
            if callable(content):
                content(f)
            else:
                pieces = [content.encode("utf-8") if isinstance(content, str) else content] if isinstance(
                    content, (str, bytes, bytearray, memoryview)) else content
                put = write or (lambda f, piece: f.write(piece))
                for piece in pieces:
                    put(f, piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
