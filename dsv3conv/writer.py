"""Write output files safely: a temporary name first, then an atomic rename to the final name.

An interrupted run (Ctrl-C, kill -9, a full disk) never leaves a partial file under a final name: the
partial file has a `.dsv3conv-partial` suffix and is removed on failure or by the next run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import threading
from pathlib import Path

from dsv3conv.errors import Dsv3Error

PARTIAL_SUFFIX = ".dsv3conv-partial"
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): share the source's extents (btrfs, XFS, bcachefs)
COPY_CHUNK = 64 * 1024 * 1024
MAP_MIN_BYTES = 1 << 20  # smaller writes go through write(): a mapping costs more than it saves
# copy_file_range cannot serve these files here (another filesystem, old kernel, unsupported): stream instead
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.ETXTBSY)


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a run would create it)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
            self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # RDWR: mappable
        except OSError as exc:
            raise _write_error(final, exc) from exc
        self.written = 0
        self._lock = threading.Lock()
        self._mapped = False

    def map_writes(self, size: int) -> None:
        """Give the file its `size` bytes now and let large `pwrite`s copy through a mapping of their pages.

        For tmpfs: it takes one write() into a file at a time, while copies into a mapping of one file run
        in parallel. The space is reserved first (fallocate), so a full file system is refused here, in one
        line, and never reached later through the mapping (where it would kill the process with SIGBUS)."""
        if size <= 0:
            return
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            raise _write_error(self.final, exc) from exc
        self._mapped = True

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
            if self._mapped and total >= MAP_MIN_BYTES:
                _copy_mapped(self._fd, view, offset)
                view = view[total:]
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


def _copy_mapped(fd: int, view: memoryview, offset: int) -> None:
    """Copy `view` to `offset` of the file through a mapping of just those pages (unmapped at once: resident
    memory stays small); numpy copies without holding the GIL."""
    import numpy as np

    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + len(view) - start, offset=start) as pages:
        dst = np.frombuffer(pages, dtype=np.uint8, count=len(view), offset=offset - start)
        dst[:] = np.frombuffer(view, dtype=np.uint8)
        del dst  # the mapping closes only without views of it


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` ("tmpfs", "ext4", ...; "" where unknown)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    real, best, kind = os.path.realpath(path), "", ""
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):  # the last of equal mounts is the one on top
            best, kind = mount, rest.split()[0]
    return kind


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
