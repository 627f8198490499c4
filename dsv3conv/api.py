"""The Python API: what the commands do, for programs and notebooks.

    from dsv3conv.api import dequantize
    summary = dequantize("DeepSeek-V3", "DeepSeek-V3-bf16", mtp="drop")
"""

from __future__ import annotations

import os
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.errors import UsageError
from dsv3conv.plan import Plan, assign_parts, parse_part, parse_size, plan_dequant


def dequantize(
    src: str | os.PathLike, dst: str | os.PathLike, *, mtp: str = "keep", device: str = "auto",
    dtype: str = "bfloat16", resume: bool = False, overwrite: bool = False,
    max_shard_size: str | int | None = None, dry_run: bool = False, progress: bool = False,
    buffer_size: str | int | None = None, part: str | tuple[int, int] | None = None,
) -> dict:
    """Convert an FP8 checkpoint to `dtype`; return the summary `--json` prints.

    `part="K/N"`: convert only part K of N (N independent jobs writing into one DST; the last one to finish
    writes the index and config).
    """
    ckpt = Checkpoint.open(src)
    size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    plan = plan_dequant(ckpt, Path(dst), out_dtype=dtype, mtp=mtp, max_shard_size=size)
    return run_plan(plan, device=device, resume=resume, overwrite=overwrite, dry_run=dry_run, progress=progress,
                    buffer_size=buffer_size, part=part)


def run_plan(plan: Plan, *, device: str = "auto", resume: bool = False, overwrite: bool = False,
             dry_run: bool = False, progress: bool = False, buffer_size: str | int | None = None,
             part: str | tuple[int, int] | None = None) -> dict:
    part = parse_part(part) if isinstance(part, str) else part
    summary = plan.summary()
    if part is not None:
        owner = assign_parts(plan.files, part[1])
        summary["part"] = f"{part[0]}/{part[1]}"
        summary["part_shards"] = [f.name for f, k in zip(plan.files, owner) if k == part[0]]
    if dry_run:
        summary["files"] = [
            {"name": f.name, "tensors": len(f.tensors), "converted": sum(t.converts for t in f.tensors),
             "bytes": f.size, "copy_of": f.copy_of}
            for f in plan.files
        ]
        summary["dropped"] = plan.dropped
        summary["config"] = plan.config
        return summary
    from dsv3conv.backend import check_device, device_list, make_backend
    from dsv3conv.pipeline import DEFAULT_CHUNK_BYTES, execute, execute_on_devices
    from dsv3conv.progress import ByteProgress

    devices = device_list(device) if plan.converted else []
    if len(devices) > 1 and (part is not None or overwrite):
        raise UsageError(f"--device {device}: several devices run as parts of one job; "
                         "not with --part (one device per job) or --overwrite (empty DST first)")
    devices = [check_device(d) for d in devices]  # refuse a bad name before any worker starts
    on_gpu = any(d.startswith("cuda") for d in devices)
    chunk = parse_size(buffer_size, "--buffer-size") if isinstance(buffer_size, str) else buffer_size
    chunk = chunk or (DEFAULT_CHUNK_BYTES * 4 if on_gpu else DEFAULT_CHUNK_BYTES)
    gpu_peak = None
    with ByteProgress(plan, enabled=progress) as bar:
        if len(devices) > 1:
            stats, peak = execute_on_devices(plan, devices, resume=resume, progress=bar.advance, chunk_bytes=chunk)
            gpu_peak = peak if on_gpu else None
        else:
            backend = make_backend(devices[0]) if devices else _NoCompute()
            stats = execute(plan, backend, resume=resume, overwrite=overwrite, progress=bar.advance,
                            chunk_bytes=chunk, part=part)
            if on_gpu:
                import torch

                gpu_peak = torch.cuda.max_memory_allocated(backend.device)
    summary.update(
        device=",".join(devices) if devices else "none", shards_skipped=stats.files_skipped,
        bytes_written=stats.bytes_written, seconds=round(stats.seconds, 3), buffer_bytes=chunk,
        finalized=stats.finalized, waiting_for=stats.waiting_for,
    )
    if gpu_peak is not None:
        summary["gpu_peak_bytes"] = gpu_peak
    return summary


class _NoCompute:
    """For plans that only copy: nothing to convert."""

    name = "none"
    pin_memory = False

    def run(self, buf, items):
        return [memoryview(buf[it.src_offset : it.src_offset + it.nbytes].numpy()) for it in items]
from dsv3conv.quant import quantize  # noqa: E402,F401  (re-exported: the quant API)
from dsv3conv.split_mtp import split_mtp  # noqa: E402,F401  (re-exported: the split-mtp API)
from dsv3conv.verify import verify_checkpoint  # noqa: E402,F401  (re-exported: the verify API)
