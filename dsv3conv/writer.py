"""Write output files safely: a temporary name first, then an atomic rename to the final name.

An interrupted run (Ctrl-C, kill -9, a full disk) never leaves a partial file under a final name: the
partial file has a `.dsv3conv-partial` suffix and is removed on failure or by the next run.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from dsv3conv.errors import Dsv3Error

PARTIAL_SUFFIX = ".dsv3conv-partial"


def partial_path(final: Path) -> Path:
    return final.with_name("." + final.name + PARTIAL_SUFFIX)


class AtomicFile:
    """A file written sequentially under a temporary name and renamed into place by `commit()`."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = partial_path(final)
        self._fd = -1
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise _write_error(final, exc) from None
        self.written = 0
        self._lock = threading.Lock()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.written += n
        except OSError as exc:
            self.abort()
            raise _write_error(self.final, exc) from None

    def pwrite(self, data, offset: int) -> None:
        """Write `data` at `offset`; safe from several threads writing disjoint ranges."""
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise _write_error(self.final, exc) from None
        with self._lock:
            self.written += total

    def commit(self) -> None:
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise _write_error(self.final, exc) from None

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with AtomicFile(final) as f:
        f.write(data)


def _write_error(path: Path, exc: OSError) -> Dsv3Error:
    if exc.errno == errno.ENOSPC:
        return Dsv3Error(f"{path}: disk full while writing; free space and rerun with --resume")
    if exc.errno == errno.EFBIG:
        return Dsv3Error(f"{path}: file size limit reached while writing; raise the limit and rerun with --resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Dsv3Error(f"{path}: not writable ({exc.strerror}); choose a writable output directory")
    return Dsv3Error(f"{path}: write failed ({exc.strerror})")
