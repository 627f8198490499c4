"""Compute backends: where FP8 blocks become BF16 (or FP16/FP32).

- `CpuBackend`: `dsv3conv.kernels.fp8_block_cpu` (vectorized torch, no compile step) on a pool of threads.
- `CudaBackend`: the Triton kernel of `dsv3conv.kernels.fp8_block_dequant`, one grouped launch per batch,
  host buffers pinned, copies asynchronous on a side stream.
Both compute round_to_nearest_even(float32(w) * float32(scale)) and are tested bit for bit against
`reference_dequant`. The way back, BF16 -> FP8 (`quant`), follows `reference_quant` bit for bit: on the CPU
with `fp8_block_cpu.quant_rows`, on CUDA with `dsv3conv.kernels.fp8_block_quant`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.kernels.fp8_block_cpu import dequant_rows, quant_rows, row_ranges
from dsv3conv.kernels.fp8_block_dequant import BLOCK_SIZE, HAS_TRITON


@dataclass
class Item:
    """One piece of a batch: a tensor chunk to convert, or bytes to copy through unchanged.

    A chunk to dequantize (`scale` set) gives one output piece; a chunk to quantize (`scale_fmt` set) gives
    two: its e4m3 bytes, then its rows of scales (`scale_dtype`).
    """

    src_offset: int  # in the batch's input buffer
    nbytes: int  # input bytes
    rows: int = 0
    cols: int = 0
    scale: torch.Tensor | None = None  # float32 [ceil(rows/128), ceil(cols/128)] for this chunk
    out_dtype: str = ""
    src_dtype: str = ""  # quant: BF16, F16 or F32
    scale_fmt: str = ""  # quant: "float" or "ue8m0"
    scale_dtype: str = ""  # quant: F32, BF16, F16 or F8_E8M0
    name: str = ""  # quant: the tensor, for error messages

    @property
    def converts(self) -> bool:
        return self.scale is not None

    @property
    def quantizes(self) -> bool:
        return bool(self.scale_fmt)


def _typed(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes viewed as `dtype`; copied first when their offset is not a multiple of the element size."""
    if data.storage_offset() % dtype.itemsize or data.data_ptr() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


def _quant_outputs(q: torch.Tensor, scale: torch.Tensor) -> list[memoryview]:
    return [memoryview(q.reshape(-1).view(torch.uint8).numpy()).cast("B"),
            memoryview(scale.reshape(-1).view(torch.uint8).numpy()).cast("B")]


def check_quant_scales(it: Item, scale: torch.Tensor, w: torch.Tensor) -> None:
    """A scale that is not finite means NaN/Inf in the block, or a scale beyond the scale dtype: refuse."""
    s = scale.to(torch.float32)
    bad = ~torch.isfinite(s)
    if not bool(bad.any()):
        return
    i, j = (int(v) for v in bad.nonzero()[0])
    block = w[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE, j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE].to(torch.float32)
    if not bool(torch.isfinite(block).all()):
        raise Dsv3Error(
            f"tensor `{it.name}` holds NaN or Inf values ({int(bad.sum())} of the 128x128 blocks read at once); "
            "fix the weights, or keep the tensor unquantized with --skip"
        )
    raise Dsv3Error(
        f"tensor `{it.name}`: a block's largest magnitude {block.abs().max().item():g} needs a scale beyond "
        f"{it.scale_dtype} (largest {torch.finfo(TORCH_DTYPES[it.scale_dtype]).max:g}); use --scale-dtype float32"
    )


class CpuBackend:
    """Every core at once: each tensor piece is cut into row ranges (whole 128-row blocks), converted by a pool
    of threads (one torch intra-op thread each; torch releases the GIL in its ops) straight into its output."""

    name = "cpu"
    pin_memory = False
    takes_out = True  # run() accepts a recycled output buffer

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or cpu_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dsv3conv-cpu",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self, buf: torch.Tensor, items: list[Item], out: torch.Tensor | None = None) -> list[memoryview]:
        """Convert or pass through each item of `buf`; return the output pieces in order.

        Converted pieces are written into `out` (a uint8 buffer the caller recycles) where it has room.
        """
        pieces: list[list[memoryview]] = []
        jobs: list[tuple] = []
        quantized = []
        pos = 0
        for it in items:
            data = buf[it.src_offset : it.src_offset + it.nbytes]
            if it.quantizes:
                w = _typed(data, TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
                q, pos = _take(out, pos, it.rows * it.cols)
                scale = torch.empty(_blocks(it.rows, it.cols), dtype=TORCH_DTYPES[it.scale_dtype])
                jobs += [(quant_rows, w, q.view(it.rows, it.cols), scale, it.scale_fmt, scale.dtype, r0, r1)
                         for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK_SIZE)]
                quantized.append((it, scale, w))
                pieces.append(_quant_outputs(q, scale))
            elif it.converts:
                w = data.view(it.rows, it.cols)
                dtype = TORCH_DTYPES[it.out_dtype]
                dst, pos = _take(out, pos, it.rows * it.cols * dtype.itemsize, dtype.itemsize)
                jobs += [(dequant_rows, w, it.scale, dst.view(dtype).view(it.rows, it.cols), r0, r1)
                         for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS)]
                pieces.append([memoryview(dst.numpy())])
            else:
                pieces.append([memoryview(data.numpy())])
        self._run_all(jobs)
        for it, scale, w in quantized:
            check_quant_scales(it, scale, w)
        return [m for p in pieces for m in p]

    def _run_all(self, jobs: list[tuple]) -> None:
        futures = [self._pool.submit(*job) for job in jobs]
        try:
            for f in futures:
                f.result()
        finally:  # on a failure (or Ctrl-C) stop what has not started; the rest ends with its row range
            for f in futures:
                f.cancel()

    @staticmethod
    def _quant(data: torch.Tensor, it: Item) -> list[memoryview]:
        """One item quantized in the calling thread: (e4m3 bytes, scale bytes)."""
        w = _typed(data, TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
        q = torch.empty((it.rows, it.cols), dtype=torch.uint8)
        scale = torch.empty(_blocks(it.rows, it.cols), dtype=TORCH_DTYPES[it.scale_dtype])
        quant_rows(w, q, scale, it.scale_fmt, scale.dtype)
        check_quant_scales(it, scale, w)
        return _quant_outputs(q, scale)


# Elements per task of the CPU pool: a few milliseconds of work, many tasks per 64 MB batch.
TASK_ELEMS = 1 << 20


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE)


def _take(out: torch.Tensor | None, pos: int, nbytes: int, align: int = 1) -> tuple[torch.Tensor, int]:
    """`nbytes` of `out` from `pos` rounded up to `align` (the element size), or a new buffer where it is full."""
    pos = -(-pos // align) * align
    if out is not None and pos + nbytes <= out.numel():
        return out[pos : pos + nbytes], pos + nbytes
    return torch.empty(nbytes, dtype=torch.uint8), pos


def cpu_threads() -> int:
    """Threads of the CPU backend: `DSV3CONV_CPU_THREADS`, else every core this process may run on."""
    env = os.environ.get("DSV3CONV_CPU_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"DSV3CONV_CPU_THREADS={env!r}: give a whole number of threads, 1 or more")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CudaBackend:
    name = "cuda"
    pin_memory = True

    def __init__(self, device: torch.device):
        from dsv3conv.kernels import fp8_block_dequant as k

        if not hasattr(k, "dequant_segments"):
            raise Dsv3Error("the Triton kernel is unavailable (is triton installed?); rerun with --device cpu")
        self._k = k
        self.device = device
        self.name = str(device)
        self.stream = torch.cuda.Stream(device)

    def run(self, buf: torch.Tensor, items: list[Item]) -> list[memoryview]:
        conv = [it for it in items if it.converts]
        quants = self._quant(buf, [it for it in items if it.quantizes])
        outs: list[memoryview | None] = [None] * len(items)
        if conv:
            out_size = sum(it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize for it in conv)
            segments, scales, dst_off, scale_off = [], [], 0, 0
            for it in conv:
                segments.append((it.src_offset, dst_off, scale_off, it.rows, it.cols))
                scales.append(it.scale.reshape(-1))
                dst_off += it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize
                scale_off += it.scale.numel()
            host_out = torch.empty(out_size, dtype=torch.uint8, pin_memory=True)
            used = max(it.src_offset + it.nbytes for it in conv)
            with torch.cuda.stream(self.stream):
                src = buf[:used].to(self.device, non_blocking=True)
                dst = torch.empty(out_size, dtype=torch.uint8, device=self.device)
                sc = torch.cat(scales).to(self.device, non_blocking=True)
                for dtype in {it.out_dtype for it in conv}:
                    segs = [s for s, it in zip(segments, conv) if it.out_dtype == dtype]
                    self._k.dequant_segments(src, dst, sc, segs, TORCH_DTYPES[dtype])
                host_out.copy_(dst, non_blocking=True)
            self.stream.synchronize()
            view = memoryview(host_out.numpy())
            pos = 0
            conv_views = []
            for it in conv:
                n = it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize
                conv_views.append(view[pos : pos + n])
                pos += n
            conv_iter = iter(conv_views)
        pieces: list[memoryview] = []
        for i, it in enumerate(items):
            if it.converts:
                outs[i] = next(conv_iter)
            elif it.quantizes:
                pieces += quants.pop(0)
                continue
            else:
                outs[i] = memoryview(buf[it.src_offset : it.src_offset + it.nbytes].numpy())
            pieces.append(outs[i])
        return pieces

    def _quant(self, buf: torch.Tensor, items: list[Item]) -> list[list[memoryview]]:
        """Quantize each item with the Triton kernel, one launch per chunk; e4m3 and scales back in pinned memory."""
        if not items:
            return []
        from dsv3conv.kernels import fp8_block_quant as kq

        results = []
        with torch.cuda.stream(self.stream):
            for it in items:
                src = buf[it.src_offset : it.src_offset + it.nbytes].to(self.device, non_blocking=True)
                w = _typed(src, TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
                q, s = kq.quant(w, it.scale_fmt, TORCH_DTYPES[it.scale_dtype])
                host_q = torch.empty(q.shape, dtype=torch.uint8, pin_memory=True)
                host_s = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
                host_q.copy_(q.view(torch.uint8), non_blocking=True)
                host_s.copy_(s, non_blocking=True)
                results.append((it, host_q, host_s))
        self.stream.synchronize()
        outs = []
        for it, host_q, host_s in results:
            w = _typed(buf[it.src_offset : it.src_offset + it.nbytes], TORCH_DTYPES[it.src_dtype])
            check_quant_scales(it, host_s, w.view(it.rows, it.cols))
            outs.append(_quant_outputs(host_q, host_s))
        return outs


def device_list(device: str) -> list[str]:
    """`cuda:all`: every visible GPU; `cuda:0,cuda:1`: those (a device may be named twice: two workers);
    anything else: that one device."""
    if device == "cuda:all":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda:all: no CUDA GPU is visible to torch; use --device cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [d.strip() for d in device.split(",") if d.strip()] or [device]


def check_device(device: str) -> str:
    """The device's name once checked (`auto` resolved): a CUDA device must exist; nothing is started on it."""
    if device == "auto":  # the GPU path needs Triton (the `gpu` extra)
        device = "cuda" if torch.cuda.is_available() and HAS_TRITON else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
        if not HAS_TRITON:
            raise UsageError(f"--device {device}: the GPU path needs triton, which is not installed; "
                             "pip install 'dsv3conv[gpu]', or use --device cpu")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
        return device
    raise UsageError(f"--device {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list (cuda:0,cuda:1)")


def make_backend(device: str):
    """`auto`: a CUDA GPU when present, else the CPU; `cpu`; `cuda`; `cuda:N`."""
    device = check_device(device)
    return CpuBackend() if device == "cpu" else CudaBackend(torch.device(device))
