"""The data scan of `verify`: read the chosen tensors of CKPT once, check their values, and compare each
planned one with what its operation makes of the source.

The expected bytes come from the engine itself (`run_batches`): the planned tensors (with the scale a quantized
weight emits) are cut into the engine's batches, their source bytes read by its reader threads (scales
included, checked as the conversion checks them) and converted by the same backend as the conversion, the
reads, conversions and comparisons overlapped in the engine's bounded pools. Its sink (`_Comparer`) reads
CKPT's bytes of each converted piece, from the writer threads, and holds them to the piece.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dsv3conv.batches import BatchSpec
from dsv3conv.checkpoint import Checkpoint, ShardReader, TensorInfo
from dsv3conv.engine import run_batches
from dsv3conv.errors import Dsv3Error
from dsv3conv.ops import EMITS_SCALE, Copy, QuantScale
from dsv3conv.plan import FilePlan, Plan, TensorPlan
from dsv3conv.verify.values import TensorResult, check_values, count_differ


@dataclass(frozen=True)
class Task:
    """One tensor of CKPT whose data is read: value-checked, and compared when `planned` is set."""

    info: TensorInfo
    planned: TensorPlan | None  # its plan (op copy, dequant or quant), when CKPT's dtype and shape match it
    sampled: bool  # False for scales, which are always read (and must be finite and > 0)


def scan(ckpt: Checkpoint, src_root: Path | None, tasks: list[Task], device: str, chunk_bytes: int,
         progress: bool) -> tuple[dict[str, TensorResult], str]:
    """Every task's results, and the name of the device that converted (empty when nothing was)."""
    from dsv3conv.progress import ByteProgress

    backend = None
    compared = [t for t in tasks if t.planned is not None]
    if any(t.planned.converts for t in compared):
        from dsv3conv.compute import make_backend  # imports the kernels: only when needed

        backend = make_backend(device)
    results = {t.info.name: TensorResult() for t in tasks}
    bar = ByteProgress(sum(t.info.nbytes for t in tasks), "verify", enabled=progress)
    with bar:
        if compared:
            files = _file_plans(compared)
            plan = Plan(src_root, ckpt.root, files, None, None, [], [])
            sink = _Comparer(ckpt, compared, results, bar)
            run_batches(plan, backend, list(enumerate(files)), sink, chunk_bytes)
        with ShardReader(ckpt.root) as reader:
            for task in tasks:
                if task.planned is None:
                    try:
                        _values(reader, task.info, chunk_bytes, results[task.info.name], not task.sampled)
                    except (Dsv3Error, OSError) as exc:
                        results[task.info.name].error = str(exc)
                    bar.advance(task.info.nbytes, task.info.name)
    return results, backend.name if backend is not None else ""


def _file_plans(compared: list[Task]) -> list[FilePlan]:
    """The compared tensors as the engine's files, one tensor each (a quantized weight with the scale its pieces
    emit), in source order: a batch never mixes two tensors, so a source piece that cannot be read or
    converted leaves only its own tensor uncompared."""
    files = []
    for task in sorted(compared, key=lambda t: (t.planned.source.file, t.planned.source.offset)):
        t = task.planned
        outputs = (t,)
        if isinstance(t.op, EMITS_SCALE):
            rows, cols = t.shape
            shape = (-(-rows // t.op.block), -(-cols // t.op.block))
            outputs += (TensorPlan(t.op.scale_name, t.op.scale_dtype, shape, QuantScale(t.name), t.sources),)
        files.append(FilePlan(t.name, outputs, b""))
    return files


def _values(reader: ShardReader, info: TensorInfo, chunk_bytes: int, res: TensorResult, scale: bool) -> None:
    per = max(1, chunk_bytes // info.itemsize)
    for e0 in range(0, info.numel, per):
        n = min(per, info.numel - e0)
        check_values(_bytes(reader.read(info, e0 * info.itemsize, n * info.itemsize)), info, e0, res, scale)


@dataclass
class _Piece:
    """What one converted piece showed, merged into its tensor's result under the comparer's lock."""

    found: TensorResult = field(default_factory=TensorResult)
    start: int = 0  # element of the piece's first value in its tensor


class _Comparer:
    """The engine's sink for verify: CKPT's bytes of each converted piece, read at the piece's offset in its
    tensor, value-checked and compared bit for bit (from several writer threads at once)."""

    def __init__(self, ckpt: Checkpoint, compared: list[Task], results: dict[str, TensorResult], bar):
        self.ckpt, self.results, self.bar = ckpt, results, bar
        self.task_of: dict[str, Task] = {}  # output tensor -> the compared task it belongs to
        for task in compared:
            self.task_of[task.planned.name] = task
            if isinstance(task.planned.op, EMITS_SCALE):
                self.task_of[task.planned.op.scale_name] = task
        self.lock = threading.Lock()
        self.local = threading.local()  # one CKPT reader per writer thread
        self.readers: list[ShardReader] = []

    def start(self, specs: list[BatchSpec]) -> None:
        pass

    def put(self, spec: BatchSpec, outs: list[memoryview]) -> None:
        local = self.local
        if not hasattr(local, "reader"):
            local.reader, local.buf = ShardReader(self.ckpt.root), np.empty(0, dtype=np.uint8)
            with self.lock:
                self.readers.append(local.reader)
        placed = [out for pt, start, n in spec.pieces for out in pt.op.outputs(pt, start, n)]
        for piece, (name, offset, _) in zip(outs, placed):
            task = self.task_of[name]
            if local.buf.size < len(piece):  # CKPT's bytes are read into one buffer per thread, reused
                local.buf = np.empty(len(piece), dtype=np.uint8)
            try:
                self._compare(local.reader, local.buf[: len(piece)], task, name, offset, _bytes(piece))
            except (Dsv3Error, OSError) as exc:
                with self.lock:
                    self.results[task.info.name].error = str(exc)

    def skip(self, spec: BatchSpec, exc: Exception) -> bool:
        with self.lock:
            for t, _, _ in spec.pieces:
                task = self.task_of[t.name]
                self.results[task.info.name].error = str(exc)
        return True

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def _compare(self, reader: ShardReader, got: np.ndarray, task: Task, name: str, start: int,
                 want: np.ndarray) -> None:
        """Hold CKPT's bytes of output tensor `name` from byte `start` (read into `got`) to `want`."""
        info, got_info = task.info, self.ckpt.tensors[name]
        if len(got):
            reader.read_into(got_info, start, memoryview(got))
        copy = isinstance(task.planned.op, Copy)
        found = TensorResult()
        if name == info.name:
            check_values(got, info, start // info.itemsize, found, not task.sampled)
        differ, first, largest = count_differ(want, got, None if copy else got_info.dtype)
        if differ and name == info.name:
            found.diff_first = (start + first) // info.itemsize if copy else start // info.itemsize + first
        with self.lock:
            _merge(self.results[info.name], found, differ if name == info.name else 0, largest,
                   differ if name != info.name else 0)
        if name == info.name:
            self.bar.advance(len(got), info.name)


def _merge(res: TensorResult, found: TensorResult, differ: int, largest: float, scale_differ: int) -> None:
    """Add one piece's findings to its tensor's; the first bad or differing element is the lowest seen."""
    if found.bad_values and (res.bad_first < 0 or found.bad_first < res.bad_first):
        res.bad_first, res.bad_kind = found.bad_first, found.bad_kind
    res.bad_values += found.bad_values
    if differ and (res.diff_first < 0 or found.diff_first < res.diff_first):
        res.diff_first = found.diff_first
    res.differ += differ
    res.scale_differ += scale_differ
    if differ:
        res.max_diff = max(res.max_diff, largest)


def _bytes(data) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)
