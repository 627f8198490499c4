"""Compute backends: where the converting operations of a plan (`ops`) run.

`Backend` is the interface: one method per converting operation, given all of a batch's pieces of that
operation at once; `convert` hands each piece of a batch to the method of its operation.
- `CpuBackend`: `dsv3conv.kernels.fp8_block_cpu` (vectorized torch, no compile step) on a pool of threads.
- `CudaBackend`: the Triton kernel of `dsv3conv.kernels.fp8_block_dequant`, one grouped launch per batch,
  host buffers pinned, copies asynchronous on a side stream.
Both compute round_to_nearest_even(float32(w) * float32(scale)) and are tested bit for bit against
`reference_dequant`. The way back, BF16 -> FP8 (`quant`), follows `reference_quant` bit for bit: on the CPU
with `fp8_block_cpu.quant_rows`, on CUDA with `dsv3conv.kernels.fp8_block_quant`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from dsv3conv import profiling
from dsv3conv.devices import cpu_threads, parse_devices
from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.kernels.fp8_block_cpu import dequant_rows, quant_rows, row_ranges
from dsv3conv.kernels.fp8_block_dequant import BLOCK_SIZE, HAS_TRITON
from dsv3conv.kernels.mxfp4_dequant import cpu_dequant_mxfp4
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4, Op, QuantBlockFp8


@dataclass
class Item:
    """One piece of a batch for a backend: a chunk of one tensor in the batch's input buffer and its operation."""

    op: Op
    src_offset: int  # in the batch's input buffer
    nbytes: int  # input bytes
    rows: int = 0
    cols: int = 0
    src_dtype: str = ""
    out_dtype: str = ""
    scale: torch.Tensor | None = None  # DequantBlockFp8, DequantMxfp4: float32 scales of these rows
    name: str = ""  # the tensor, for error messages


class OutputArena:
    """Host memory a backend may convert into: the engine recycles one per batch in flight once it is written.

    The buffer is allocated on first use, so a backend that brings its own memory (CUDA's pinned buffers)
    costs nothing here; a piece that does not fit gets memory of its own.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buf: torch.Tensor | None = None
        self._pos = 0

    def take(self, nbytes: int, align: int = 1) -> torch.Tensor:
        """`nbytes` of the arena, starting at a multiple of `align` (the element size)."""
        if self._buf is None and nbytes <= self.capacity:
            self._buf = torch.empty(self.capacity, dtype=torch.uint8)
        pos = -(-self._pos // align) * align
        if self._buf is None or pos + nbytes > self._buf.numel():
            return torch.empty(nbytes, dtype=torch.uint8)
        self._pos = pos + nbytes
        return self._buf[pos : pos + nbytes]

    def reset(self) -> None:
        self._pos = 0


class Backend(Protocol):
    """Where the converting operations run: one method per operation, each given all of a batch's pieces of
    that operation at once and returning each piece's output bytes (`ops.<Op>.outputs` says where they go)."""

    name: str
    pin_memory: bool  # the engine's read buffers are pinned (copied to a GPU asynchronously)

    def dequant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def close(self) -> None:
        """Release what the backend holds (the CPU's thread pool)."""

    def quant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def dequant_mxfp4(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...


# The backend method of each converting operation (Copy needs none: its output is its input).
METHODS: dict[type, Callable[[Backend], Callable[..., list[list[memoryview]]]]] = {
    DequantBlockFp8: lambda b: b.dequant_block_fp8,
    QuantBlockFp8: lambda b: b.quant_block_fp8,
    DequantMxfp4: lambda b: b.dequant_mxfp4,
}


def e8m0_bits(scale: torch.Tensor) -> torch.Tensor:
    """float32 powers of two (the engine's scales) back to their E8M0 bytes, exactly (2^-127 included)."""
    return scale.to(torch.float8_e8m0fnu).view(torch.uint8)


def convert(backend: Backend | None, buf: torch.Tensor, items: list[Item], out: OutputArena | None = None,
            ) -> list[memoryview]:
    """The output pieces of `items`, in order. A copy is a view of `buf`; the pieces of each converting
    operation go to the backend together (one launch per batch on a GPU)."""
    out = out or OutputArena(0)
    results: list[list[memoryview]] = [[] for _ in items]
    groups: dict[type, list[int]] = {}
    for i, it in enumerate(items):
        if isinstance(it.op, Copy):
            results[i] = [memoryview(buf[it.src_offset : it.src_offset + it.nbytes].numpy())]
        else:
            groups.setdefault(type(it.op), []).append(i)
    for op_type, idx in groups.items():
        for i, outs in zip(idx, METHODS[op_type](backend)(buf, [items[i] for i in idx], out)):
            results[i] = outs
    return [piece for outs in results for piece in outs]


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
            "fix the weights, or keep the tensor unquantized with {skip}", "skip"
        )
    raise Dsv3Error(
        f"tensor `{it.name}`: a block's largest magnitude {block.abs().max().item():g} needs a scale beyond "
        f"{it.op.scale_dtype} (largest {torch.finfo(TORCH_DTYPES[it.op.scale_dtype]).max:g}); use {{scale_dtype}} float32",
        "scale_dtype",
    )


class CpuBackend:
    """Every core at once: each tensor piece is cut into row ranges (whole 128-row blocks), converted by a pool
    of threads (one torch intra-op thread each; torch releases the GIL in its ops) straight into its output."""

    name = "cpu"
    pin_memory = False

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or cpu_threads()
        self._torch_threads = torch.get_num_threads()  # the pool's initializer changes torch's default
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dsv3conv-cpu",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._torch_threads)

    def dequant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into row ranges for the pool, converted straight into the arena."""
        jobs, results = [], []
        for it in items:
            w = buf[it.src_offset : it.src_offset + it.nbytes].view(it.rows, it.cols)
            dtype = TORCH_DTYPES[it.out_dtype]
            dst = out.take(it.rows * it.cols * dtype.itemsize, dtype.itemsize)
            jobs += [(dequant_rows, w, it.scale, dst.view(dtype).view(it.rows, it.cols), r0, r1)
                     for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS)]
            results.append([memoryview(dst.numpy())])
        self._run_all(jobs)
        return results

    def quant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into whole-block row ranges for the pool: e4m3 into the arena, then its scales."""
        jobs, results, quantized = [], [], []
        for it in items:
            w = _typed(buf[it.src_offset : it.src_offset + it.nbytes], TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
            q = out.take(it.rows * it.cols)
            scale = torch.empty(_blocks(it.rows, it.cols), dtype=TORCH_DTYPES[it.op.scale_dtype])
            jobs += [(quant_rows, w, q.view(it.rows, it.cols), scale, it.op.scale_fmt, scale.dtype, r0, r1)
                     for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK_SIZE)]
            quantized.append((it, scale, w))
            results.append(_quant_outputs(q, scale))
        self._run_all(jobs)
        for it, scale, w in quantized:
            check_quant_scales(it, scale, w)
        return results

    def dequant_mxfp4(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into row ranges for the pool; one table lookup per packed byte (exact)."""
        jobs, results = [], []
        for it in items:
            packed = buf[it.src_offset : it.src_offset + it.nbytes].view(it.rows, it.cols // 2)
            dtype = TORCH_DTYPES[it.out_dtype]
            dst = out.take(it.rows * it.cols * dtype.itemsize, dtype.itemsize).view(dtype).view(it.rows, it.cols)
            bits = e8m0_bits(it.scale)
            for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS):
                jobs.append((cpu_dequant_mxfp4, packed[r0:r1], bits[r0:r1], dtype, dst[r0:r1]))
            results.append([memoryview(dst.view(torch.uint8).reshape(-1).numpy())])
        self._run_all(jobs)
        return results

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
        scale = torch.empty(_blocks(it.rows, it.cols), dtype=TORCH_DTYPES[it.op.scale_dtype])
        quant_rows(w, q, scale, it.op.scale_fmt, scale.dtype)
        check_quant_scales(it, scale, w)
        return _quant_outputs(q, scale)


# Elements per task of the CPU pool: a few milliseconds of work, many tasks per 64 MB batch.
TASK_ELEMS = 1 << 20


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE)


class CudaBackend:
    name = "cuda"
    pin_memory = True

    def __init__(self, device: torch.device):
        from dsv3conv.kernels import fp8_block_dequant as k

        if not hasattr(k, "dequant_segments"):
            raise Dsv3Error("the Triton kernel is unavailable (is triton installed?); rerun with {device} cpu", "device")
        self._k = k
        self.device = device
        self.name = str(device)
        self.stream = torch.cuda.Stream(device)

    def close(self) -> None:
        """Nothing to release: the caching allocator keeps the device memory for the process."""

    def dequant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """All pieces in one grouped launch per output dtype; the results back in pinned host memory."""
        out_size = sum(it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize for it in items)
        segments, scales, dst_off, scale_off = [], [], 0, 0
        for it in items:
            segments.append((it.src_offset, dst_off, scale_off, it.rows, it.cols))
            scales.append(it.scale.reshape(-1))
            dst_off += it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize
            scale_off += it.scale.numel()
        prof = profiling.current()
        spans = profiling.StreamSpans(prof)
        with profiling.stage(prof, "pin_alloc", out_size):
            host_out = torch.empty(out_size, dtype=torch.uint8, pin_memory=True)
        used = max(it.src_offset + it.nbytes for it in items)
        with torch.cuda.stream(self.stream):
            spans.point()
            src = buf[:used].to(self.device, non_blocking=True)
            dst = torch.empty(out_size, dtype=torch.uint8, device=self.device)
            sc = torch.cat(scales).to(self.device, non_blocking=True)
            spans.point()
            for dtype in {it.out_dtype for it in items}:
                segs = [s for s, it in zip(segments, items) if it.out_dtype == dtype]
                self._k.dequant_segments(src, dst, sc, segs, TORCH_DTYPES[dtype])
            spans.point()
            host_out.copy_(dst, non_blocking=True)
            spans.point()
        with profiling.stage(prof, "sync"):
            self.stream.synchronize()
        spans.report(("h2d", used), ("kernel", out_size), ("d2h", out_size))
        view = memoryview(host_out.numpy())
        results, pos = [], 0
        for it in items:
            n = it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize
            results.append([view[pos : pos + n]])
            pos += n
        return results

    def dequant_mxfp4(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece with the Triton MXFP4 kernel; the results back in one pinned host buffer."""
        from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4

        sizes = [it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize for it in items]
        host_out = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        results, pos = [], 0
        with torch.cuda.stream(self.stream):
            for it, n in zip(items, sizes):
                packed = buf[it.src_offset : it.src_offset + it.nbytes].to(self.device, non_blocking=True)
                bits = e8m0_bits(it.scale).to(self.device, non_blocking=True)
                got = dequant_mxfp4(packed.view(it.rows, it.cols // 2), bits, TORCH_DTYPES[it.out_dtype])
                host_out[pos : pos + n].copy_(got.view(torch.uint8).reshape(-1), non_blocking=True)
                results.append([memoryview(host_out[pos : pos + n].numpy())])
                pos += n
        self.stream.synchronize()
        return results

    def quant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece with the Triton kernel, one launch per piece; e4m3 and scales back in pinned memory."""
        from dsv3conv.kernels import fp8_block_quant as kq

        results = []
        prof = profiling.current()
        spans = profiling.StreamSpans(prof)
        with torch.cuda.stream(self.stream):
            spans.point()
            for it in items:
                src = buf[it.src_offset : it.src_offset + it.nbytes].to(self.device, non_blocking=True)
                w = _typed(src, TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
                q, s = kq.quant(w, it.op.scale_fmt, TORCH_DTYPES[it.op.scale_dtype])
                host_q = torch.empty(q.shape, dtype=torch.uint8, pin_memory=True)
                host_s = torch.empty(s.shape, dtype=s.dtype, pin_memory=True)
                host_q.copy_(q.view(torch.uint8), non_blocking=True)
                host_s.copy_(s, non_blocking=True)
                results.append((it, host_q, host_s))
            spans.point()
        with profiling.stage(prof, "sync"):
            self.stream.synchronize()
        spans.report(("quant_gpu", sum(it.nbytes for it in items)))
        outs = []
        for it, host_q, host_s in results:
            w = _typed(buf[it.src_offset : it.src_offset + it.nbytes], TORCH_DTYPES[it.src_dtype])
            check_quant_scales(it, host_s, w.view(it.rows, it.cols))
            outs.append(_quant_outputs(host_q, host_s))
        return outs


def device_list(device: str) -> list[str]:
    """`cuda:all`: every visible GPU; `cuda:0,cuda:1`: those (a device may be named twice: two workers);
    anything else: that one device."""
    names = parse_devices(device)
    if names == ["cuda:all"]:
        if not torch.cuda.is_available():
            raise UsageError("{device} cuda:all: no CUDA GPU is visible to torch; use {device} cpu", "device")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


def check_device(device: str) -> str:
    """The device's name once checked (`auto` resolved): a CUDA device must exist; nothing is started on it."""
    if device == "auto":  # the GPU path needs Triton (the `gpu` extra)
        device = "cuda" if torch.cuda.is_available() and HAS_TRITON else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"{{device}} {device}: no CUDA GPU is visible to torch; use {{device}} cpu", "device")
        if not HAS_TRITON:
            raise UsageError(f"{{device}} {device}: the GPU path needs triton, which is not installed; "
                             "pip install 'dsv3conv[gpu]', or use {device} cpu", "device")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UsageError(f"{{device}} {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list", "device") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{{device}} {device}: only {torch.cuda.device_count()} CUDA devices are visible", "device")
        return device
    raise UsageError(f"{{device}} {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list (cuda:0,cuda:1)",
                     "device")


def make_backend(device: str, cpu_threads: int | None = None):
    """`auto`: a CUDA GPU when present, else the CPU; `cpu`; `cuda`; `cuda:N`. `cpu_threads`: the CPU
    backend's threads (default `devices.cpu_threads()`)."""
    device = check_device(device)
    return CpuBackend(cpu_threads) if device == "cpu" else CudaBackend(torch.device(device))
