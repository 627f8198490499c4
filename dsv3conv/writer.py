"""Write output files safely: a temporary name first, then an atomic rename to the final name.

An interrupted run (Ctrl-C, kill -9, a full disk) never leaves a partial file under a final name: the
partial file has a `.dsv3conv-partial` suffix and is removed on failure or by the next run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from pathlib import Path

from dsv3conv.errors import Dsv3Error

PARTIAL_SUFFIX = ".dsv3conv-partial"
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): share the source's extents (btrfs, XFS, bcachefs)
COPY_CHUNK = 64 * 1024 * 1024
# copy_file_range cannot serve these files here (another filesystem, old kernel, unsupported): stream instead
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.ETXTBSY)


def partial_path(final: Path) -> Path:
    """`.NAME.dsv3conv-partial`; for a name too long to take the suffix (a file name has at most 255 bytes)
    `.HASH.dsv3conv-partial`, derived from the name: a later run finds and removes it all the same."""
    name = "." + final.name + PARTIAL_SUFFIX
    if len(os.fsencode(name)) > 255:
        name = "." + hashlib.sha256(os.fsencode(final.name)).hexdigest()[:40] + PARTIAL_SUFFIX
    return final.with_name(name)


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
            raise _write_error(final, exc) from exc
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
            raise _write_error(self.final, exc) from exc

    def pwrite(self, data, offset: int) -> None:
        """Write `data` at `offset`; safe from several threads writing disjoint ranges."""
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise _write_error(self.final, exc) from exc
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
            raise _write_error(self.final, exc) from exc

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
        return Dsv3Error(f"{path}: disk full while writing; free space and rerun with {{resume}}", "resume")
    if exc.errno == errno.EFBIG:
        return Dsv3Error(f"{path}: file size limit reached while writing; raise the limit and rerun with {{resume}}",
                         "resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Dsv3Error(f"{path}: not writable ({exc.strerror}); choose a writable output directory")
    return Dsv3Error(f"{path}: write failed ({exc.strerror})")


def copy_file_fast(src: Path, dst: Path) -> None:
    """Copy `src` (following symlinks) to `dst`: a temporary name, fsync, then an atomic rename.

    The copy's permissions are the usual ones for a new file, less any the source lacks.

    Fastest first: a reflink (FICLONE; the filesystem shares the extents), else `copy_file_range` (the
    kernel copies, no trip through user space; ext4, NFS 4.2 and CIFS do it server- or block-side), else a
    plain streamed copy. Never a hard link: a later edit of either file must not change the other.
    """
    tmp = partial_path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # created afresh below: its mode starts from the umask
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            st = os.fstat(fin.fileno())
            size = st.st_size
            # Never more readable (or writable) than the source: a 0600 secret stays 0600.
            os.fchmod(fout.fileno(), os.fstat(fout.fileno()).st_mode & st.st_mode & 0o777)
            if not _reflink(fin.fileno(), fout.fileno()):
                done = _copy_range(fin.fileno(), fout.fileno(), size)
                _stream(fin, fout, done)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS) or exc.filename in (str(tmp), str(dst.parent)):
            raise _write_error(dst, exc) from None  # the output side: disk full, size limit, not writable
        raise Dsv3Error(f"{dst}: copying {src} failed ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reflink(fd_in: int, fd_out: int) -> bool:
    try:
        fcntl.ioctl(fd_out, FICLONE, fd_in)
        return True
    except OSError:  # EOPNOTSUPP (ext4, tmpfs), EXDEV (another filesystem), EINVAL...: copy instead
        return False


def _copy_range(fd_in: int, fd_out: int, size: int) -> int:
    """Bytes copied in the kernel; stops early (for the stream to finish) where the kernel cannot."""
    if not hasattr(os, "copy_file_range"):
        return 0
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(fd_in, fd_out, min(COPY_CHUNK * 16, size - done), done, done)
        except OSError as exc:
            if exc.errno in NO_KERNEL_COPY:
                return done
            raise
        if n == 0:  # a filesystem that reports nothing copied (some virtual ones): stream the rest
            return done
        done += n
    return done


def _stream(fin, fout, start: int) -> None:
    fin.seek(start)
    fout.seek(start)
    while chunk := fin.read(COPY_CHUNK):
        fout.write(chunk)
