"""The data scan of `verify`: read the chosen tensors of CKPT once, check their values, and compare each
planned one with what its operation makes of the source.

The expected bytes come from the engine's own steps: the planned tensor (with the scale a quantized weight
emits) is cut into the engine's batches, its source bytes read by the engine's batch reader (scales included,
checked as the engine checks them) and converted by the same backend as the conversion. CKPT's bytes are read
with the checkpoint reader, piece by piece: memory holds a few chunks, never a whole shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3conv.checkpoint import Checkpoint, ShardReader, TensorInfo
from dsv3conv.engine import _batch_specs, _read_batch, _ScaleCache
from dsv3conv.errors import Dsv3Error
from dsv3conv.ops import EMITS_SCALE, Copy, QuantScale
from dsv3conv.plan import FilePlan, TensorPlan
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
    converts = any(t.planned is not None and t.planned.converts for t in tasks)
    if converts:
        from dsv3conv.gpu import make_backend  # imports the kernels: only when needed

        backend = make_backend(device)
    results: dict[str, TensorResult] = {}
    bar = ByteProgress(sum(t.info.nbytes for t in tasks), "verify", enabled=progress)
    scales = _ScaleCache(src_root) if src_root is not None else None
    with bar, ShardReader(ckpt.root) as reader, ShardReader(src_root or ckpt.root) as src_reader:
        for k, task in enumerate(tasks):
            res = results[task.info.name] = TensorResult()
            try:
                if task.planned is not None:
                    _compare(ckpt, reader, src_reader, task, backend, chunk_bytes, scales, res)
                else:
                    _values(reader, task.info, chunk_bytes, res, not task.sampled)
            except (Dsv3Error, OSError) as exc:
                res.error = str(exc)
            bar.advance(task.info.nbytes, f"{k + 1}/{len(tasks)} tensors")
    return results, backend.name if backend is not None else ""


def _values(reader: ShardReader, info: TensorInfo, chunk_bytes: int, res: TensorResult, scale: bool) -> None:
    per = max(1, chunk_bytes // info.itemsize)
    for e0 in range(0, info.numel, per):
        n = min(per, info.numel - e0)
        check_values(_bytes(reader.read(info, e0 * info.itemsize, n * info.itemsize)), info, e0, res, scale)


def _compare(ckpt: Checkpoint, reader: ShardReader, src_reader: ShardReader, task: Task, backend,
             chunk_bytes: int, scales: _ScaleCache, res: TensorResult) -> None:
    """Run the engine's read and convert steps on the task's tensor alone; hold CKPT's bytes to each output piece."""
    t = task.planned
    info = ckpt.tensors[t.name]
    copy = isinstance(t.op, Copy)
    for name, start, want in _expected(src_reader, t, backend, chunk_bytes, scales):
        got_info = ckpt.tensors[name]
        got = _bytes(reader.read(got_info, start, len(want)))
        if name == t.name:
            check_values(got, info, start // info.itemsize, res, not task.sampled)
        differ, first, largest = count_differ(want, got, None if copy else got_info.dtype)
        if name != t.name:
            res.scale_differ += differ
            continue
        if differ and res.diff_first < 0:
            res.diff_first = (start + first) // info.itemsize if copy else start // info.itemsize + first
        res.differ += differ
        res.max_diff = max(res.max_diff, largest)


def _expected(src_reader: ShardReader, t: TensorPlan, backend, chunk_bytes: int,
              scales: _ScaleCache) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(output tensor, byte offset in it, expected bytes) of each piece the engine makes of `t`'s source."""
    from dsv3conv.backend import convert

    buf = torch.empty(0, dtype=torch.uint8)
    outputs = (t,)
    if isinstance(t.op, EMITS_SCALE):  # its scale tensor, written by its pieces
        rows, cols = t.shape
        shape = (-(-rows // t.op.block), -(-cols // t.op.block))
        outputs += (TensorPlan(t.op.scale_name, t.op.scale_dtype, shape, QuantScale(t.name), t.sources),)
    for spec in _batch_specs(0, FilePlan("", outputs, b""), chunk_bytes):
        if buf.numel() < spec.span_len:
            buf = torch.empty(spec.span_len, dtype=torch.uint8)
        items = _read_batch(spec, buf, src_reader, scales)
        placed = [out for pt, start, n in spec.pieces for out in pt.op.outputs(pt, start, n)]
        for piece, (name, offset, _) in zip(convert(backend, buf, items), placed):
            yield name, offset, _bytes(piece)


def _bytes(data) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
