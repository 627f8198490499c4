"""Carry out a plan: read -> convert/copy -> write, overlapped, in bounded memory.

The only module that sequences steps. A reader thread does large sequential reads of the source into a
fixed pool of buffers, the calling thread converts (CPU or GPU backend), a writer thread writes each output
file under a temporary name and renames it when complete. Index and config are written last. Memory is
bounded by the pool (`chunk_bytes` x `depth`), never by shard size.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from dsv3conv.backend import Item, TORCH_DTYPES
from dsv3conv.checkpoint import CONFIG_NAME, INDEX_NAME, read_into
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.plan import FilePlan, Plan, TensorPlan
from dsv3conv.writer import PARTIAL_SUFFIX, AtomicFile, write_bytes_atomic

LOCK_NAME = ".dsv3conv.lock"
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MAX_GAP_BYTES = 1 << 20  # small tensors between two read pieces are read along rather than seeked over


@dataclass
class Batch:
    file: FilePlan
    buf: torch.Tensor | None  # pooled input buffer (uint8)
    items: list[Item]
    out_bytes: int


@dataclass
class Stats:
    files_written: int = 0
    files_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- the dest
def prepare_dest(dest: Path, *, resume: bool, overwrite: bool) -> None:
    """DST must be absent or empty, unless resuming or overwriting."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a directory; choose another output path")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Dsv3Error(f"{dest}: cannot create the output directory ({exc.strerror}); choose a writable path") from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise Dsv3Error(f"{dest}: output directory is not writable; fix its permissions or choose another path")
    entries = [p for p in dest.iterdir() if p.name != LOCK_NAME]
    if entries and not (resume or overwrite):
        raise UsageError(
            f"{dest}: output directory is not empty; pass --resume to finish an earlier run or --overwrite to replace it"
        )


class DestLock:
    """An exclusive lock on DST: a second run on the same output refuses instead of corrupting it."""

    def __init__(self, dest: Path):
        self.path = dest / LOCK_NAME
        self._fd = -1

    def __enter__(self) -> "DestLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise Dsv3Error(f"{self.path.parent}: another dsv3conv run is writing here (lock {self.path}); wait for it") from None
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)


def remove_partials(dest: Path) -> None:
    for p in dest.glob(".*" + PARTIAL_SUFFIX):
        p.unlink(missing_ok=True)


def is_complete(path: Path, file: FilePlan) -> bool:
    """A file under its final name is complete when its size and header are exactly what the plan says."""
    try:
        if path.stat().st_size != file.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(file.header)) == file.header
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- runs
def execute(
    plan: Plan, backend, *, resume: bool = False, overwrite: bool = False, progress=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = 3,
) -> Stats:
    """Write the plan's output. `progress(nbytes, file_index, file_name)` is called as bytes are written."""
    start = time.perf_counter()
    prepare_dest(plan.dest, resume=resume, overwrite=overwrite)
    stats = Stats()
    with DestLock(plan.dest):
        remove_partials(plan.dest)
        if overwrite:
            for name in (INDEX_NAME, CONFIG_NAME):
                (plan.dest / name).unlink(missing_ok=True)
            for p in plan.dest.glob("*.safetensors"):
                p.unlink()
        todo = []
        for k, f in enumerate(plan.files):
            if resume and is_complete(plan.dest / f.name, f):
                stats.files_skipped += 1
                stats.skipped.append(f.name)
                if progress:
                    progress(f.size, k, f.name)
            else:
                todo.append((k, f))
        try:
            if todo:
                _run_files(plan, backend, todo, stats, progress, chunk_bytes, depth)
            for rel in plan.extra_files:
                _copy_file(plan.source / rel, plan.dest / rel)
            if plan.index is not None:
                write_bytes_atomic(plan.dest / INDEX_NAME, (json.dumps(plan.index, indent=2) + "\n").encode())
            if plan.config is not None:
                write_bytes_atomic(plan.dest / CONFIG_NAME, (json.dumps(plan.config, indent=2) + "\n").encode())
        finally:
            remove_partials(plan.dest)
    stats.seconds = time.perf_counter() - start
    return stats


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a file (following symlinks) under a temporary name, then rename it into place."""
    with AtomicFile(dst) as out, open(src, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            out.write(chunk)


def _run_files(plan, backend, todo, stats, progress, chunk_bytes, depth) -> None:
    pool: queue.Queue[torch.Tensor] = queue.Queue()
    for _ in range(depth + 2):
        pool.put(torch.empty(chunk_bytes + MAX_GAP_BYTES, dtype=torch.uint8, pin_memory=backend.pin_memory))
    work_q: queue.Queue = queue.Queue(maxsize=depth)
    write_q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(q: queue.Queue, item) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def get(q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    raise _Stopped() from None

    def reader() -> None:
        try:
            scales = _ScaleCache(plan.source)
            for k, f in todo:
                if stop.is_set():
                    return
                put(work_q, ("open", k, f))
                if f.copy_of is None:
                    for batch in _batches(plan.source, f, pool, chunk_bytes, scales, get, stop):
                        put(work_q, ("batch", batch))
                put(work_q, ("close", k, f))
            put(work_q, None)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            errors.append(exc)
            stop.set()

    def writer() -> None:
        out: AtomicFile | None = None
        try:
            while True:
                msg = get(write_q)
                if msg is None:
                    return
                if msg[0] == "open":
                    _, k, f = msg
                    if f.copy_of is not None:
                        _copy_file(plan.source / f.copy_of, plan.dest / f.name)
                        if progress:
                            progress(f.size, k, f.name)
                        continue
                    out = AtomicFile(plan.dest / f.name)
                    out.write(f.header)
                    if progress:
                        progress(len(f.header), k, f.name)
                elif msg[0] == "batch":
                    _, batch, outs, k = msg
                    for piece in outs:
                        out.write(piece)
                    if batch.buf is not None:
                        pool.put(batch.buf)
                    if progress:
                        progress(batch.out_bytes, k, batch.file.name)
                elif msg[0] == "close":
                    _, k, f = msg
                    if out is not None:
                        if out.written != f.size:
                            raise Dsv3Error(f"{out.final}: wrote {out.written} bytes, the plan says {f.size}; this is a bug")
                        out.commit()
                        out = None
                    stats.files_written += 1
                    stats.bytes_written += f.size
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()
        finally:
            if out is not None:
                out.abort()

    threads = [threading.Thread(target=reader, name="dsv3conv-reader", daemon=True),
               threading.Thread(target=writer, name="dsv3conv-writer", daemon=True)]
    for t in threads:
        t.start()
    try:
        current = -1
        while True:
            msg = get(work_q)
            if msg is None:
                put(write_q, None)
                break
            if msg[0] == "batch":
                batch = msg[1]
                outs = backend.run(batch.buf, batch.items) if batch.items else []
                put(write_q, ("batch", batch, outs, current))
            else:
                current = msg[1]
                put(write_q, msg)
        threads[1].join()
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


class _ScaleCache:
    """Scales are small and may sit in another shard: read each once, as float32."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, info) -> torch.Tensor:
        buf = bytearray(info.nbytes)
        with open(self.root / info.file, "rb", buffering=0) as f:
            read_into(f, info.offset, memoryview(buf), self.root / info.file)
        raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        scale = raw.view(TORCH_DTYPES[info.dtype]).view(info.shape).to(torch.float32)
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bad.any():
            value = scale[bad][0].item()
            raise Dsv3Error(
                f"tensor `{info.name}` in {info.file}: {int(bad.sum())} scale values are not finite and positive "
                f"(first: {value}); the checkpoint is damaged, download that shard again"
            )
        return scale


def _pieces(t: TensorPlan, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start byte, bytes) of the source pieces of one tensor: whole, or row chunks of 128-row multiples."""
    if not t.converts:
        for start in range(0, t.source.nbytes, chunk_bytes):
            yield start, min(chunk_bytes, t.source.nbytes - start)
        if t.source.nbytes == 0:
            yield 0, 0
        return
    rows, cols = t.shape
    rows_per = max(128, (chunk_bytes // max(cols, 1)) // 128 * 128)
    for r0 in range(0, rows, rows_per):
        yield r0 * cols, min(rows_per, rows - r0) * cols


def _batches(root, f: FilePlan, pool, chunk_bytes, scales: _ScaleCache, get, stop) -> Iterator[Batch]:
    """Group the file's tensor pieces into batches of contiguous source bytes, read them into pool buffers."""
    handles: dict[str, object] = {}
    pending: list[tuple[TensorPlan, int, int]] = []  # (tensor, start in tensor, bytes)
    span_start = span_end = -1
    span_file = None

    def flush() -> Batch | None:
        nonlocal pending, span_start, span_end, span_file
        if not pending:
            return None
        buf = get(pool)
        fh = handles.get(span_file) or handles.setdefault(span_file, open(root / span_file, "rb", buffering=0))
        read_into(fh, span_start, memoryview(buf.numpy())[: span_end - span_start], root / span_file)
        items, out_bytes = [], 0
        for t, start, n in pending:
            src_off = t.source.offset + start - span_start
            if t.converts:
                rows_in, cols = n // t.shape[1], t.shape[1]
                r0 = start // cols
                full = scale_cache.setdefault(t.scale.name, scales.get(t.scale))
                sc = full[r0 // 128 : -(-(r0 + rows_in) // 128)]
                items.append(Item(src_off, n, rows_in, cols, sc.contiguous(), t.dtype))
                out_bytes += rows_in * cols * TORCH_DTYPES[t.dtype].itemsize
            else:
                items.append(Item(src_off, n))
                out_bytes += n
        batch = Batch(f, buf, items, out_bytes)
        pending, span_start, span_end, span_file = [], -1, -1, None
        return batch

    scale_cache: dict[str, torch.Tensor] = {}
    try:
        for t in f.tensors:
            for start, n in _pieces(t, chunk_bytes):
                if stop.is_set():
                    return
                a = t.source.offset + start
                fits = (
                    span_file == t.source.file and span_end <= a <= span_end + MAX_GAP_BYTES
                    and a + n - span_start <= chunk_bytes + MAX_GAP_BYTES
                )
                if pending and not fits:
                    yield flush()
                if not pending:
                    span_file, span_start = t.source.file, a
                pending.append((t, start, n))
                span_end = a + n
        if pending:
            yield flush()
    finally:
        for fh in handles.values():
            fh.close()
