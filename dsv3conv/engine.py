"""The engine: read -> convert -> write one plan's output files, overlapped, in bounded memory.

Reader threads do large sequential reads of the source into a pool of buffers, the calling thread hands
each batch to a backend, writer threads hand each converted batch to a sink: `FileSink` puts each piece at
its planned offset and renames a file into place when its last piece is written (`run_files`); verify's
sink compares the pieces with a checkpoint's bytes instead (`run_batches`). Batches of several files are in
flight at once, taking turns (`interleaved`), and several writes: fast storage (tmpfs, NVMe) reaches its
speed only with many writes at once, and a file system takes one write into a file at a time.

The backend may still be starting (a `Future`: torch and CUDA initialising): meanwhile readers take the batches
that convert nothing first, writers write them, and batches that convert wait until it is there, or convert
on the Future's `stand_in` backend (the CPU) if it has one.

A backend may convert asynchronously (a GPU): it returns at once with a fence, the calling thread goes on
to the next batch, and the writer waits on the fence before writing. A batch's read buffer is reused once
its conversion is done (or, when the batch holds copied bytes, once they are written); its output arena
once it is written. Buffers and arenas are plain memory (numpy, no torch) made on first need by the
backend's `host_buffer` (pinned for a GPU), at most a fixed count of each: memory is bounded by `chunk_bytes` x the counts, never by shard size. What to run and
when (destination, devices, index and config) is the runner's job.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from dsv3conv import profiling
from dsv3conv.backend import Backend, Fence, Item, OutputArena, convert_async, host_buffer
from dsv3conv.batches import LOOKAHEAD, BatchSpec, Schedule, batch_specs, interleaved
from dsv3conv.checkpoint import ShardReader, read_tensor
from dsv3conv.devices import io_threads
from dsv3conv.dtypes import TORCH_NAMES
from dsv3conv.errors import Dsv3Error, counted
from dsv3conv.finite import check_copy, check_piece, scale_values
from dsv3conv.plan import FilePlan, Plan
from dsv3conv.writer import AtomicFile, copy_file_fast, fs_type

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
POOL_BUDGET_BYTES = 5 << 28  # 1.25 GiB of buffers and arenas: beyond that, more in flight only adds memory


def pool_counts(buffers: int, arenas: int, buf_bytes: int, out_bytes: int,
                budget: int = POOL_BUDGET_BYTES) -> tuple[int, int]:
    """(read buffers, arenas): as asked, less arenas and then buffers (down to 2 each) while both pools
    together would hold more than `budget` bytes. Host memory stays near the budget whatever the machine."""
    while arenas > 2 and buffers * buf_bytes + arenas * out_bytes > budget:
        arenas -= 1
    while buffers > 2 and buffers * buf_bytes + arenas * out_bytes > budget:
        buffers -= 1
    return buffers, arenas


def run_files(plan: Plan, backend: Backend | Future | None, todo: list[tuple[int, FilePlan]], progress=None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = 3,
              cancel: threading.Event | None = None) -> tuple[int, int]:
    """Write the files `todo` ((index in `plan.files`, file) pairs) of the plan; return (files, bytes) written.

    Readers fill pooled buffers, this thread converts, writers put each batch at its planned offset. Every
    output byte's offset is known from the plan, so batches may finish in any order: several reader and writer
    threads keep a fast disk (or tmpfs) busy, and each file is renamed into place by whichever writer completes
    its last batch. `depth`: buffers and arenas beyond one per reader and writer (batches converting).
    `progress(nbytes, file_index, file_name)` is called as bytes are written; `cancel`, set by another
    thread, stops the run as Ctrl-C would. `backend` may be None when nothing converts, or a `Future` of the
    backend while it starts (its error, if it fails, is the run's once a batch needs it; its `stand_in`, if
    set, converts meanwhile).
    """
    with profiling.run_profile() as prof:  # DSV3CONV_PROFILE=1: seconds per stage, one line on stderr
        sink = FileSink(plan, progress, prof)
        _Run(plan, backend, todo, sink, chunk_bytes, depth, cancel, prof).run()
    return sink.files_written, sink.bytes_written


def run_batches(plan: Plan, backend: Backend | Future | None, todo: list[tuple[int, FilePlan]], sink: Sink,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = 3, cancel: threading.Event | None = None) -> None:
    """`run_files` with `sink` in place of the file writer: the same reads, conversions and bounded memory."""
    with profiling.run_profile() as prof:
        _Run(plan, backend, todo, sink, chunk_bytes, depth, cancel, prof).run()


class Sink(Protocol):
    """The write stage: takes each converted batch, from several writer threads at once, in any order."""

    def start(self, specs: list[BatchSpec]) -> None:
        """The run's batches, before the first is read."""

    def put(self, spec: BatchSpec, outs: list[memoryview]) -> None:
        """The batch's output pieces, in the order of `spec.out_offsets` (valid until this returns)."""

    def skip(self, spec: BatchSpec, exc: Exception) -> bool:
        """Reading or converting the batch failed with `exc` (Dsv3Error or OSError): True when the sink has
        taken note and the run goes on without the batch, False to stop the run with `exc`."""

    def close(self) -> None:
        """The run ended (finished, failed or cancelled): let go of what is not done."""


class _Pool:
    """At most `count` buffers, each made by `make` on first need; the most recently returned is handed out
    first, so a run that needs few in flight touches few."""

    def __init__(self, make: Callable[[], object], count: int, keep: Callable[[object], bool] | None = None):
        self._make, self._left, self._keep = make, count, keep  # keep(item) False: dropped, made anew
        self._free: list = []
        self._cond = threading.Condition()

    def get(self, check: Callable[[], None]):
        """A free buffer; `check()` is called while waiting (it raises to stop the wait)."""
        with self._cond:
            while True:
                while self._free:
                    item = self._free.pop()
                    if self._keep is None or self._keep(item):
                        return item
                    self._left += 1  # given way: made anew below
                if self._left:
                    self._left -= 1
                    break
                check()
                self._cond.wait(0.05)
        return self._make()

    def put(self, item) -> None:
        with self._cond:
            if self._keep is None or self._keep(item):
                self._free.append(item)
            else:  # made anew by the next `get`
                self._left += 1
            self._cond.notify()


class _Run:
    """One engine run: its batches, buffer pools and threads; the batches go to `sink`."""

    def __init__(self, plan: Plan, backend: Backend | Future | None, todo, sink: Sink, chunk_bytes: int, depth: int,
                 cancel: threading.Event | None, prof: profiling.Profile | None = None):
        self.plan, self.sink, self.cancel, self.prof = plan, sink, cancel, prof
        self.starting = backend if isinstance(backend, Future) else None  # None once the backend is there
        self.backend = None if self.starting else backend
        self.stand_in = getattr(self.starting, "stand_in", None)  # converts while the backend starts, if given
        self.n_readers, self.n_writers = io_threads()
        self.specs = interleaved([batch_specs(k, f, chunk_bytes) for k, f in todo], self.n_writers)
        sink.start(self.specs)
        # A block of rows is never split: a very wide tensor may need more than `chunk_bytes`.
        buf_bytes = max([chunk_bytes] + [s.span_len for s in self.specs])
        out_bytes = max([0] + [s.out_bytes for s in self.specs])
        count, arenas = pool_counts(self.n_readers + depth, self.n_writers + depth, buf_bytes, out_bytes)
        # Memory made while the backend starts is plain: once it is there, if it makes its own (pinned for a
        # GPU), each such read buffer or arena gives way to the backend's the next time it passes its pool
        self.interim: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> such memory, while alive
        self.pool = _Pool(lambda: _buffer(buf_bytes, count, self._make), count, self._current)  # read buffers
        self.arenas = _Pool(lambda: OutputArena(out_bytes, self._make), arenas, lambda a: self._current(a.memory))
        self.ready: queue.Queue = queue.Queue()  # (batch, its buffer, its items: None when skipped), read
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.schedule = Schedule(self.specs, lambda: (s := self.starting) is not None and not s.done(),
                                  LOOKAHEAD)
        self.scales = _ScaleCache(plan.source)

    def _make(self, nbytes: int):
        """Memory of the backend's kind (`host_buffer`); plain memory, noted as made meanwhile, while it starts.
        One look at `self.backend` decides both: it may arrive at any moment."""
        backend = self.backend
        if backend is not None:
            return backend.host_buffer(nbytes)
        buf = host_buffer(nbytes)
        self.interim[id(buf)] = buf
        return buf

    def _current(self, buf) -> bool:
        """False for memory made while the backend started, once it is there and makes its own memory: the
        pool drops it (it gives way). Decided once per buffer, then forgotten."""
        if buf is None or self.interim.get(id(buf)) is not buf:
            return True
        backend = self.backend
        if backend is None:
            return True
        self.interim.pop(id(buf), None)
        return backend.host_buffer is host_buffer

    def run(self) -> None:
        readers = [threading.Thread(target=self._reader, name=f"dsv3conv-reader-{i}", daemon=True)
                   for i in range(self.n_readers)]
        for t in readers:
            t.start()
        writers = ThreadPoolExecutor(max_workers=self.n_writers, thread_name_prefix="dsv3conv-writer")
        if self.starting is not None:  # wakes this thread when the backend is there (or failed)
            self.starting.add_done_callback(lambda _: self.ready.put(_STARTED))
        waiting: deque = deque()  # batches read while the backend starts, that need it
        try:
            done = 0
            while done < len(self.specs):
                with profiling.stage(self.prof, "wait_read"):
                    got = self._get(self.ready)
                if got is _STARTED:
                    self.backend, self.starting = self.starting.result(), None  # raises the start's error
                    if self.prof is not None:
                        self.prof.mark_once("backend_s")
                    while waiting:
                        self._convert(writers, *waiting.popleft())
                        done += 1
                    continue
                if got[2] and got[0].converts and self.starting is not None:
                    if self.stand_in is None:
                        waiting.append(got)
                        continue
                    self._convert(writers, *got, backend=self.stand_in)
                    done += 1
                    continue
                self._convert(writers, *got)
                done += 1
            with profiling.stage(self.prof, "wait_write"):
                writers.shutdown(wait=True)
        except _Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.stop.set()
            writers.shutdown(wait=True, cancel_futures=True)
            for t in readers:
                t.join()
            self.sink.close()
        if self.errors:
            raise self.errors[0]

    def _convert(self, writers: ThreadPoolExecutor, spec: BatchSpec, buf, items: list[Item] | None,
                 backend: Backend | None = None) -> None:
        """Convert the batch on `backend` (default: the run's; asynchronously where it can), hand it to a writer."""
        backend = backend or self.backend
        if items is None:  # its read failed and the sink took note
            return
        arena, fence, outs = None, None, []
        if spec.converts:
            with profiling.stage(self.prof, "wait_arena"):
                arena = self.arenas.get(self._check)
        if items:
            with profiling.stage(self.prof, "convert", spec.out_bytes):
                try:
                    outs, fence = convert_async(backend, buf, items, arena)
                except (Dsv3Error, OSError) as exc:
                    if not self.sink.skip(spec, exc):
                        raise
                    outs, fence = None, backend and backend.fence()  # what was enqueued
        writers.submit(self._write, spec, buf, arena, outs, fence)

    def _fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def _check(self) -> None:
        """Raise if another stage failed (`_Stopped`) or the run is cancelled."""
        if self.stop.is_set():
            raise _Stopped()
        if self.cancel is not None and self.cancel.is_set():
            raise KeyboardInterrupt

    def _get(self, q: queue.Queue):
        """The next item of `q`, unless another stage failed (`_Stopped`) or the run is cancelled."""
        while True:
            self._check()
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass

    def _reader(self) -> None:
        """Read batches into pooled buffers until none is left. A reader takes its next batch only once it holds
        a buffer: a batch taken never waits for memory, so while the backend starts, a batch that converts nothing
        is read as soon as it is taken, however many converting batches hold buffers meanwhile."""
        handles = ShardReader(self.plan.source)  # a bounded number of open files, however many shards
        buf = None  # the buffer held for the next batch
        try:
            while not self.stop.is_set() and self.schedule.left():
                if buf is None:
                    with profiling.stage(self.prof, "wait_buffer"):
                        buf = self.pool.get(self._check)
                spec = self.schedule.next()
                if spec is None:
                    return
                # A batch with nothing to read (a whole file copied) leaves the buffer to the next
                mine = None
                if spec.span_len or spec.pieces:
                    mine, buf = buf, None
                with profiling.stage(self.prof, "read", spec.span_len):
                    try:
                        items = _read_batch(spec, mine, handles, self.scales)
                    except (Dsv3Error, OSError) as exc:
                        if not self.sink.skip(spec, exc):
                            raise
                        if mine is not None:
                            self.pool.put(mine)
                        mine = items = None
                if self.prof is not None:
                    self.prof.mark_once("first_read_s")
                self.ready.put((spec, mine, items))
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the main thread
            self._fail(exc)
        finally:
            if buf is not None:
                self.pool.put(buf)
            handles.close()

    def _write(self, spec: BatchSpec, buf, arena: OutputArena | None, outs: list[memoryview] | None,
               fence: Fence | None) -> None:
        """Hand the batch to the sink (`outs` None: its conversion failed and the sink took note)."""
        try:
            if fence is not None:  # always waited for: the device may still use the buffer and the arena
                with profiling.stage(self.prof, "wait_convert"):
                    try:
                        fence.wait()
                    except (Dsv3Error, OSError) as exc:
                        if not self.sink.skip(spec, exc):
                            raise
                        outs = None
            if buf is not None and not spec.copies:  # converted: the buffer may take the next read now
                self.pool.put(buf)
                buf = None
            if self.stop.is_set():
                return
            if outs is not None:
                with profiling.stage(self.prof, "write", spec.out_bytes):
                    self.sink.put(spec, outs)
            if buf is not None:
                self.pool.put(buf)
            if arena is not None:
                arena.reset()
                self.arenas.put(arena)
        except BaseException as exc:  # handed to the main thread
            self._fail(exc)


class FileSink:
    """The conversion's sink: each batch's pieces written at their planned offsets into the output file,
    opened by its first writer and renamed into place by the writer of its last batch."""

    def __init__(self, plan: Plan, progress=None, prof: profiling.Profile | None = None):
        self.plan, self.progress, self.prof = plan, progress, prof
        self.remaining: Counter = Counter()  # batches still to write, per output file
        self.open_files: dict[int, AtomicFile] = {}
        self.opening: dict[int, threading.Lock] = {}  # one per output file: its first writer opens it
        self.files_lock = threading.Lock()
        # One write() into a file at a time: on tmpfs, copies through mappings may run in parallel (measured
        # only when asked: DSV3CONV_MAP_WRITES=1)
        self.map_writes = os.environ.get("DSV3CONV_MAP_WRITES", "") == "1" and fs_type(plan.dest) == "tmpfs"
        self.files_written = self.bytes_written = 0

    def start(self, specs: list[BatchSpec]) -> None:
        """A file is committed when the last of its batches is written."""
        self.remaining.update(spec.k for spec in specs)

    def put(self, spec: BatchSpec, outs: list[memoryview]) -> None:
        if spec.file.copy_of is not None:
            copy_file_fast(self.plan.source / spec.file.copy_of, self.plan.dest / spec.file.name)
            done = True
        else:
            done = self._place(spec, outs)
        if self.progress:
            self.progress(spec.out_bytes if spec.file.copy_of is None else spec.file.size, spec.k, spec.file.name)
        if done:
            with self.files_lock:
                self.files_written += 1
                self.bytes_written += spec.file.size

    def skip(self, spec: BatchSpec, exc: Exception) -> bool:
        return False  # a conversion never leaves a batch out

    def close(self) -> None:
        for out in self.open_files.values():
            out.abort()

    def _output(self, spec: BatchSpec) -> AtomicFile:
        """The batch's output file, opened by the first writer that needs it (the others of that file wait)."""
        with self.files_lock:
            out = self.open_files.get(spec.k)
            if out is not None:
                return out
            opening = self.opening.setdefault(spec.k, threading.Lock())
        with opening:  # writers of other files go on meanwhile
            with self.files_lock:
                out = self.open_files.get(spec.k)
            if out is not None:
                return out
            out = AtomicFile(self.plan.dest / spec.file.name)
            try:
                if self.map_writes:
                    out.map_writes(spec.file.size)
                out.pwrite(spec.file.header, 0)
            except BaseException:
                out.abort()
                raise
            with self.files_lock:
                self.open_files[spec.k] = out
        if self.prof is not None:
            self.prof.mark_once("first_write_s")
        if self.progress:
            self.progress(len(spec.file.header), spec.k, spec.file.name)
        return out

    def _place(self, spec: BatchSpec, outs: list[memoryview]) -> bool:
        """Write the batch's pieces at their planned offsets; commit the file once all its batches are in."""
        out = self._output(spec)
        if len(outs) != len(spec.out_offsets):
            raise Dsv3Error(f"{out.final}: {len(outs)} output pieces for {len(spec.out_offsets)} planned; this is a bug")
        for piece, offset in zip(outs, spec.out_offsets):
            out.pwrite(piece, offset)
        with self.files_lock:
            self.remaining[spec.k] -= 1
            done = self.remaining[spec.k] == 0
            if done:
                del self.open_files[spec.k]
        if done:
            if out.written != spec.file.size:
                raise Dsv3Error(f"{out.final}: wrote {counted(out.written, 'byte')}, the plan says {spec.file.size}; this is a bug")
            out.commit()
        return done


def _buffer(nbytes: int, count: int, make: Callable[[int], np.ndarray] = host_buffer) -> np.ndarray:
    """One buffer of the pool; a failed allocation is the user's buffer size, said in one line."""
    try:
        return make(nbytes)
    except (RuntimeError, MemoryError):
        raise Dsv3Error(f"cannot allocate {counted(count, 'buffer')} of {nbytes:,} bytes (--buffer-size, or the widest tensor's "
                        "128-row block); give a smaller --buffer-size or free memory") from None


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


_STARTED = object()  # put in the read queue when the backend's start ends


class _ScaleCache:
    """Scales are small and may sit in another shard: read each once, as float32 (the last few kept)."""

    def __init__(self, root: Path, keep: int = 64):
        self.root = root
        self.keep = keep
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, info) -> np.ndarray:
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

    def _read(self, info) -> np.ndarray:
        return scale_values(info, np.frombuffer(read_tensor(self.root, info), dtype=np.uint8))


def _read_batch(spec: BatchSpec, buf, handles: ShardReader, scales: _ScaleCache) -> list[Item]:
    """Read the batch's source span into `buf`; describe each piece for the backend."""
    if not spec.pieces:
        return []
    handles.read_span(spec.src_file, spec.span_start, memoryview(buf)[: spec.span_len])
    items = []
    for t, start, n in spec.pieces:
        src_off = t.source.offset + start - spec.span_start
        if not t.converts:
            check_copy(t, buf[src_off : src_off + n])  # a copied scale: its values read and checked
            items.append(Item(t.op, src_off, n, name=t.name))
            continue
        r0, rows = t.op.rows(t, start, n)
        scale = scales.get(t.sources[1])[t.op.scale_rows(r0, rows)].copy() if len(t.sources) > 1 else None
        nonfinite = check_piece(t, buf[src_off : src_off + n], r0, scale, TORCH_NAMES[t.dtype])
        items.append(Item(t.op, src_off, n, rows, t.shape[1], t.source.dtype, t.dtype, scale, t.name, nonfinite))
    return items
