"""The engine: read -> convert -> write one plan's output files, overlapped, in bounded memory.

Reader threads do large sequential reads of the source into a fixed pool of buffers, the calling thread
converts each batch with a backend, writer threads put each converted piece at its planned offset and
rename a file into place when its last piece is written. Memory is bounded by the pool (`chunk_bytes` x
`depth`), never by shard size. What to run and when (destination, devices, index and config) is the
runner's job.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from dsv3conv.backend import Item
from dsv3conv.checkpoint import read_into
from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error
from dsv3conv.plan import FilePlan, Plan, TensorPlan
from dsv3conv.writer import AtomicFile, copy_file_fast

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MAX_GAP_BYTES = 1 << 20  # small tensors between two read pieces are read along rather than seeked over


class CopyOnly:
    """The backend of plans that only copy: nothing to convert."""

    name = "none"
    pin_memory = False

    def run(self, buf, items):
        return [memoryview(buf[it.src_offset : it.src_offset + it.nbytes].numpy()) for it in items]


def run_files(plan: Plan, backend, todo, progress, chunk_bytes: int = DEFAULT_CHUNK_BYTES, depth: int = 3,
              cancel: threading.Event | None = None) -> tuple[int, int]:
    """Readers fill pooled buffers, this thread converts, writers put each batch at its planned offset.

    Every output byte's offset is known from the plan, so batches may finish in any order: several reader
    and writer threads keep a fast disk (or tmpfs) busy, and each file is renamed into place by whichever
    writer completes its last batch. `todo`: (index in `plan.files`, file) pairs. `progress(nbytes, file_index,
    file_name)` is called as bytes are written; `cancel`, set by another thread, stops the run as Ctrl-C would.
    Returns (files written, bytes written).
    """
    written = [0, 0]
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
                copy_file_fast(plan.source / spec.file.copy_of, plan.dest / spec.file.name)
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
                    written[0] += 1
                    written[1] += spec.file.size
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
    return written[0], written[1]


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
