"""Carry out a plan: read -> convert/copy -> write, overlapped, in bounded memory.

The only module that sequences steps. A reader thread does large sequential reads of the source into a
fixed pool of buffers, the calling thread converts (CPU or GPU backend), a writer thread writes each output
file under a temporary name and renames it when complete. Index and config are written last. Memory is
bounded by the pool (`chunk_bytes` x `depth`), never by shard size.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from dsv3conv.backend import Item
from dsv3conv.checkpoint import CONFIG_NAME, INDEX_NAME, read_into
from dsv3conv.dest import FINALIZE_LOCK_NAME, LOCK_NAME, DestLock, is_complete, prepare_dest, remove_partials
from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, HeaderError, UsageError
from dsv3conv.plan import FilePlan, Plan, TensorPlan, assign_parts
from dsv3conv.writer import AtomicFile, copy_file_fast, write_bytes_atomic

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MAX_GAP_BYTES = 1 << 20  # small tensors between two read pieces are read along rather than seeked over


@dataclass
class Stats:
    files_written: int = 0
    files_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    finalized: bool = False
    waiting_for: list[str] = field(default_factory=list)  # shards other parts have yet to write


# --------------------------------------------------------------------------------------------- runs
def execute(
    plan: Plan, backend, *, resume: bool = False, overwrite: bool = False, progress=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = 3, part: tuple[int, int] | None = None,
    cancel: threading.Event | None = None,
) -> Stats:
    """Write the plan's output. `progress(nbytes, file_index, file_name)` is called as bytes are written.

    `cancel`: set by another thread to stop this run as Ctrl-C would (partial files removed).
    `part=(k, n)`: write only the shards of part k of n (see `plan.assign_parts`); N such jobs may run at once
    into one DST. Whichever run finds every shard complete writes the other files, the index and the config.
    """
    start = time.perf_counter()
    if part is not None and overwrite:
        raise UsageError("--part and --overwrite exclude each other: parts share DST; empty it first")
    prepare_dest(plan.dest, resume=resume or part is not None, overwrite=overwrite, source=plan.source)
    stats = Stats()
    mine = list(enumerate(plan.files))
    if part is not None:
        owner = assign_parts(plan.files, part[1])
        mine = [(k, f) for k, f in mine if owner[k] == part[0]]
    lock = LOCK_NAME if part is None else f"{LOCK_NAME}.part-{part[0]}-of-{part[1]}"
    with DestLock(plan.dest, lock):
        remove_partials(plan.dest, None if part is None else [f for _, f in mine])
        if overwrite:
            for name in (INDEX_NAME, CONFIG_NAME):
                (plan.dest / name).unlink(missing_ok=True)
            for p in plan.dest.glob("*.safetensors"):
                p.unlink()
        todo = []
        for k, f in mine:
            if (resume or part is not None) and is_complete(plan.dest / f.name, f):
                stats.files_skipped += 1
                stats.skipped.append(f.name)
                if progress:
                    progress(f.size, k, f.name)
            else:
                todo.append((k, f))
        try:
            if todo:
                _run_files(plan, backend, todo, stats, progress, chunk_bytes, depth, cancel)
            if part is None:
                _finalize(plan)
                stats.finalized = True
            else:
                with DestLock(plan.dest, FINALIZE_LOCK_NAME, wait=True):
                    missing = [f.name for f in plan.files if not is_complete(plan.dest / f.name, f)]
                    if not missing:
                        _finalize(plan)
                        stats.finalized = True
                    stats.waiting_for = missing
        finally:
            remove_partials(plan.dest, None if part is None else [f for _, f in mine])
    stats.seconds = time.perf_counter() - start
    return stats


def execute_on_devices(
    plan: Plan, devices: list[str], *, resume: bool = False, progress=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[Stats, int]:
    """One worker per device (`--device cuda:all`): worker i writes part i+1 of N (shards balanced by bytes, so
    all finish together); whichever finishes last writes the index and config, as separate `--part` jobs do.
    Returns the merged stats and the largest GPU memory peak of any worker.

    Workers are threads of this process; `DSV3CONV_WORKERS=processes` makes them spawned processes instead.
    Measured on a 2-GPU H200 host from tmpfs (README, Performance): threads 1.16-1.19x one GPU (two runs),
    processes 0.69x (one run, cause not found), separate `--part` jobs 1.11-1.51x: one process's host side,
    not the GPU, is the limit (two `--part` jobs on one GPU were as fast as on two)."""
    import multiprocessing

    prepare_dest(plan.dest, resume=resume, overwrite=False, source=plan.source)
    n = len(devices)
    as_threads = os.environ.get("DSV3CONV_WORKERS", "threads") != "processes"
    cancel = None
    if as_threads:
        events, cpu_threads, make, cancel = queue.Queue(), 0, threading.Thread, threading.Event()
    else:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or thread state
        events, make = ctx.Queue(), ctx.Process
        cpu_threads = max(1, (os.cpu_count() or 1) // max(1, sum(d == "cpu" for d in devices)))
    workers = [
        make(target=_device_worker, name=f"dsv3conv-{d}",
             args=(plan, d, (i + 1, n), resume, chunk_bytes, events, cpu_threads, progress is not None, cancel))
        for i, d in enumerate(devices)
    ]  # fmt: skip
    start = time.perf_counter()
    for w in workers:
        w.start()
    results: dict[int, tuple] = {}
    try:
        while len(results) < n:
            # Gone before the wait, and still no result after it: a worker puts its result before it ends.
            gone = [k for k, w in enumerate(workers) if not w.is_alive()]
            try:
                kind, i, payload = events.get(timeout=0.5)
            except queue.Empty:
                dead = [k for k in gone if k not in results]
                if dead:  # killed without a word (out of memory, a signal): say which one
                    k = dead[0]
                    raise Dsv3Error(f"the worker for --device {devices[k]} (part {k + 1}/{n}) died with exit code "
                                    f"{getattr(workers[k], 'exitcode', None)}; rerun with --resume to finish the remaining shards") from None
                continue
            if kind == "progress":
                progress(*payload)
            else:
                results[i] = (kind, payload)
                if kind == "error":
                    raise _worker_error(devices[i], i, n, payload)
    except BaseException:
        if cancel is not None:
            cancel.set()
        for w in workers:
            if w.is_alive() and not as_threads:
                os.kill(w.pid, signal.SIGTERM)  # each removes its partial files, as on Ctrl-C
        raise
    finally:
        for w in workers:
            while w.is_alive():
                w.join(timeout=0.1)
                with contextlib.suppress(queue.Empty):  # a process cannot end while its messages wait
                    while True:
                        events.get_nowait()
        if not as_threads:
            events.close()
    total = Stats(seconds=time.perf_counter() - start)
    gpu_peak = 0
    for _, (stats, peak) in results.values():
        total.files_written += stats.files_written
        total.files_skipped += stats.files_skipped
        total.bytes_written += stats.bytes_written
        total.skipped += stats.skipped
        total.finalized |= stats.finalized
        gpu_peak = max(gpu_peak, peak)
    waiting = {f for _, (stats, _) in results.values() for f in stats.waiting_for}
    total.waiting_for = [] if total.finalized else sorted(waiting)
    return total, gpu_peak


def _device_worker(plan, device, part, resume, chunk_bytes, events, cpu_threads, report, cancel=None) -> None:
    """One `execute_on_devices` worker: its part on its device; progress, result or error to the parent."""
    from dsv3conv.backend import make_backend

    i = part[0] - 1

    def stop(signum, frame):  # once: a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    in_process = threading.current_thread() is threading.main_thread()  # a worker process, not a thread
    if in_process:
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    try:
        if device == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)  # CPU workers share the cores
        backend = make_backend(device)
        progress = (lambda *a: events.put(("progress", i, a))) if report else None
        stats = execute(plan, backend, resume=True, progress=progress, chunk_bytes=chunk_bytes, part=part,
                        cancel=cancel)
        peak = torch.cuda.max_memory_allocated(backend.device) if device.startswith("cuda") else 0
        result = ("done", i, (stats, peak))
    except KeyboardInterrupt:
        result = ("error", i, ("KeyboardInterrupt", "interrupted", 130, ""))
    except BaseException as exc:  # noqa: BLE001  (handed to the parent, which exits with it)
        import traceback

        code = exc.exit_code if isinstance(exc, Dsv3Error) else 1
        result = ("error", i, (type(exc).__name__, str(exc), code, traceback.format_exc()))
    if in_process:  # done: a late stop from the parent changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events.put(result)


def _worker_error(device: str, i: int, n: int, payload) -> BaseException:
    name, message, code, tb = payload
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    err_type = {"UsageError": UsageError, "HeaderError": HeaderError}.get(name, Dsv3Error)
    if err_type is Dsv3Error and name != "Dsv3Error":
        message = f"the worker for --device {device} (part {i + 1}/{n}) failed: {name}: {message}"
    err = err_type(message)
    err.exit_code = code
    err.worker_traceback = tb  # shown with --debug
    return err


def _finalize(plan: Plan) -> None:
    """Other files first, then the index, then config.json: a checkpoint is loadable only once all is there."""
    for rel in plan.extra_files:
        _copy_file(plan.source / rel, plan.dest / rel)
    if plan.index is not None:
        write_bytes_atomic(plan.dest / INDEX_NAME, (json.dumps(plan.index, indent=2) + "\n").encode())
    if plan.config is not None:
        write_bytes_atomic(plan.dest / CONFIG_NAME, (json.dumps(plan.config, indent=2) + "\n").encode())


_copy_file = copy_file_fast  # following symlinks; reflink / copy_file_range where the filesystem allows


def _run_files(plan: Plan, backend, todo, stats: Stats, progress, chunk_bytes: int, depth: int,
               cancel: threading.Event | None = None) -> None:
    """Readers fill pooled buffers, this thread converts, writers put each batch at its planned offset.

    Every output byte's offset is known from the plan, so batches may finish in any order: several reader
    and writer threads keep a fast disk (or tmpfs) busy, and each file is renamed into place by whichever
    writer completes its last batch.
    """
    specs = [spec for k, f in todo for spec in _batch_specs(k, f, chunk_bytes)]
    remaining = {k: 0 for k, _ in todo}
    for spec in specs:
        remaining[spec.k] += 1
    open_files: dict[int, AtomicFile] = {}
    files_lock = threading.Lock()
    pool: queue.Queue[torch.Tensor] = queue.Queue()
    # A 128-row block is never split: a very wide FP8 tensor may need more than `chunk_bytes`.
    buf_bytes = max([chunk_bytes + MAX_GAP_BYTES] + [s.span_len for s in specs])
    for _ in range(depth + 2):
        pool.put(torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=backend.pin_memory))
    ready: queue.Queue = queue.Queue()
    out_pool: queue.Queue[torch.Tensor] = queue.Queue()  # outputs of CPU conversions, recycled like inputs
    if getattr(backend, "takes_out", False):
        out_bytes = max([0] + [s.out_bytes for s in specs])
        for _ in range(depth + 2):
            out_pool.put(torch.empty(out_bytes, dtype=torch.uint8))
    stop = threading.Event()
    errors: list[BaseException] = []
    next_spec = iter(specs)
    spec_lock = threading.Lock()
    scales = _ScaleCache(plan.source)
    n_io = max(1, min(4, (os.cpu_count() or 2) // 2))

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        stop.set()

    def get(q: queue.Queue):
        while not stop.is_set():
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass
        raise _Stopped()

    def reader() -> None:
        handles: dict[str, object] = {}
        try:
            while not stop.is_set():
                with spec_lock:
                    spec = next(next_spec, None)
                if spec is None:
                    return
                buf = get(pool) if spec.span_len or spec.pieces else None
                items = _read_batch(plan.source, spec, buf, handles, scales)
                ready.put((spec, buf, items))
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            fail(exc)
        finally:
            for fh in handles.values():
                fh.close()

    def output(spec: _BatchSpec) -> AtomicFile:
        with files_lock:
            out = open_files.get(spec.k)
            if out is None:
                out = open_files[spec.k] = AtomicFile(plan.dest / spec.file.name)
                out.pwrite(spec.file.header, 0)
                if progress:
                    progress(len(spec.file.header), spec.k, spec.file.name)
            return out

    def write(spec: _BatchSpec, buf, obuf, outs) -> None:
        try:
            if stop.is_set():
                return
            if spec.file.copy_of is not None:
                _copy_file(plan.source / spec.file.copy_of, plan.dest / spec.file.name)
                done = True
            else:
                out = output(spec)
                if len(outs) != len(spec.out_offsets):
                    raise Dsv3Error(f"{out.final}: {len(outs)} output pieces for {len(spec.out_offsets)} planned; this is a bug")
                for piece, offset in zip(outs, spec.out_offsets):
                    out.pwrite(piece, offset)
                if buf is not None:
                    pool.put(buf)
                if obuf is not None:
                    out_pool.put(obuf)
                with files_lock:
                    remaining[spec.k] -= 1
                    done = remaining[spec.k] == 0
                    if done:
                        del open_files[spec.k]
                if done:
                    if out.written != spec.file.size:
                        raise Dsv3Error(f"{out.final}: wrote {out.written} bytes, the plan says {spec.file.size}; this is a bug")
                    out.commit()
            if progress:
                progress(spec.out_bytes if spec.file.copy_of is None else spec.file.size, spec.k, spec.file.name)
            if done:
                with files_lock:
                    stats.files_written += 1
                    stats.bytes_written += spec.file.size
        except BaseException as exc:  # noqa: BLE001
            fail(exc)

    readers = [threading.Thread(target=reader, name=f"dsv3conv-reader-{i}", daemon=True) for i in range(n_io)]
    for t in readers:
        t.start()
    writers = ThreadPoolExecutor(max_workers=n_io, thread_name_prefix="dsv3conv-writer")
    try:
        for _ in range(len(specs)):
            spec, buf, items = get(ready)
            obuf = get(out_pool) if getattr(backend, "takes_out", False) and items else None
            outs = (backend.run(buf, items, obuf) if obuf is not None else backend.run(buf, items)) if items else []
            writers.submit(write, spec, buf, obuf, outs)
        writers.shutdown(wait=True)
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        writers.shutdown(wait=True, cancel_futures=True)
        for t in readers:
            t.join()
        for out in open_files.values():
            out.abort()
    if errors:
        raise errors[0]


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


class _ScaleCache:
    """Scales are small and may sit in another shard: read each once, as float32 (the last few kept)."""

    def __init__(self, root: Path, keep: int = 64):
        self.root = root
        self.keep = keep
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, info) -> torch.Tensor:
        with self._lock:
            hit = self._cache.get(info.name)
        if hit is not None:
            return hit
        scale = self._read(info)
        with self._lock:
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[info.name] = scale
        return scale

    def _read(self, info) -> torch.Tensor:
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
    if t.op == "quant_scale":  # written by its weight's pieces
        return
    if not t.converts:
        for start in range(0, t.source.nbytes, chunk_bytes):
            yield start, min(chunk_bytes, t.source.nbytes - start)
        if t.source.nbytes == 0:
            yield 0, 0
        return
    rows, cols = t.shape
    row_bytes = cols * t.source.itemsize
    rows_per = max(128, (chunk_bytes // max(row_bytes, 1)) // 128 * 128)
    for r0 in range(0, rows, rows_per):
        yield r0 * row_bytes, min(rows_per, rows - r0) * row_bytes


@dataclass
class _BatchSpec:
    """One read -> convert -> write step, decided before any data moves."""

    k: int  # index of the output file in the plan
    file: FilePlan
    src_file: str | None
    span_start: int  # absolute offset of the read in the source file
    span_len: int
    pieces: list[tuple[TensorPlan, int, int]]  # (tensor, start byte in the tensor's source, source bytes)
    out_offsets: list[int]  # absolute offset in the output file of each piece the backend returns, in order
    out_bytes: int


def _batch_specs(k: int, f: FilePlan, chunk_bytes: int) -> list[_BatchSpec]:
    """Group the file's tensor pieces into batches of contiguous source bytes (interleaved small scales read along)."""
    if f.copy_of is not None:
        return [_BatchSpec(k, f, None, 0, 0, [], [], f.size)]
    specs: list[_BatchSpec] = []
    where, at = {}, len(f.header)  # each tensor's data offset in the output file
    for t in f.tensors:
        where[t.name] = at
        at += t.nbytes
    cur: _BatchSpec | None = None
    for t in f.tensors:
        for start, n in _pieces(t, chunk_bytes):
            a = t.source.offset + start
            fits = cur is not None and (
                cur.src_file == t.source.file
                and cur.span_start + cur.span_len <= a <= cur.span_start + cur.span_len + MAX_GAP_BYTES
                and a + n - cur.span_start <= chunk_bytes + MAX_GAP_BYTES
            )
            if not fits:
                cur = _BatchSpec(k, f, t.source.file, a, 0, [], [], 0)
                specs.append(cur)
            cur.pieces.append((t, start, n))
            cur.span_len = a + n - cur.span_start
            for offset, out_n in _outputs(t, start, n, where):
                cur.out_offsets.append(offset)
                cur.out_bytes += out_n
    if not specs:  # a file of empty tensors still gets its header
        specs.append(_BatchSpec(k, f, None, 0, 0, [], [], 0))
    return specs


def _outputs(t: TensorPlan, start: int, n: int, where: dict[str, int]) -> list[tuple[int, int]]:
    """(output offset, bytes) of what one source piece becomes: one piece, or for "quant" the FP8 rows
    and then their rows of scales (the piece holds whole 128-row blocks, except at the tensor's end)."""
    if not t.converts:
        return [(where[t.name] + start, n)]
    first, count = start // t.source.itemsize, n // t.source.itemsize  # elements
    size = TORCH_DTYPES[t.dtype].itemsize
    out = [(where[t.name] + first * size, count * size)]
    if t.op == "quant":
        s, cols = t.emits, t.shape[1]
        r0, rows = (first // cols, count // cols) if cols else (0, 0)
        row_bytes = s.shape[1] * TORCH_DTYPES[s.dtype].itemsize
        out.append((where[s.name] + r0 // 128 * row_bytes, -(-rows // 128) * row_bytes))
    return out


def _read_batch(root: Path, spec: _BatchSpec, buf, handles: dict, scales: _ScaleCache) -> list[Item]:
    """Read the batch's source span into `buf`; describe each piece for the backend."""
    if not spec.pieces:
        return []
    fh = handles.get(spec.src_file)
    if fh is None:
        fh = handles[spec.src_file] = open(root / spec.src_file, "rb", buffering=0)
    read_into(fh, spec.span_start, memoryview(buf.numpy())[: spec.span_len], root / spec.src_file)
    items = []
    for t, start, n in spec.pieces:
        src_off = t.source.offset + start - spec.span_start
        if t.op == "quant":
            cols = t.shape[1]
            rows = n // t.source.itemsize // cols if cols else 0
            items.append(Item(src_off, n, rows, cols, None, t.dtype, src_dtype=t.source.dtype,
                              scale_fmt=t.scale_fmt, scale_dtype=t.emits.dtype, name=t.name))
        elif t.converts:
            cols = t.shape[1]
            r0, rows = start // cols, n // cols
            sc = scales.get(t.scale)[r0 // 128 : -(-(r0 + rows) // 128)]
            items.append(Item(src_off, n, rows, cols, sc.clone(), t.dtype))
        else:
            items.append(Item(src_off, n))
    return items
