"""Compute backends: where the converting operations of a plan (`ops`) run.

`Backend` is the interface: one method per converting operation, given all of a batch's pieces of that
operation at once; `convert` hands each piece of a batch to the method of its operation.
- `CpuBackend`: `dsv3conv.kernels.fp8_block_cpu` on a pool of threads (dequant and quant compiled with numba
  where it is installed, else vectorized torch).
- `dsv3conv.gpu.CudaBackend`: the Triton kernels, asynchronous (a batch is done when its `fence()` says so).
Both compute round_to_nearest_even(float32(w) * float32(scale)) and are tested bit for bit against
`reference_dequant`. The way back, BF16 -> FP8 (`quant`), follows `reference_quant` bit for bit: on the CPU
with `fp8_block_cpu.quant_rows`, on CUDA with `dsv3conv.kernels.fp8_block_quant`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from dsv3conv.devices import cpu_threads
from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error
from dsv3conv.finite import canonical_nan_after
from dsv3conv.kernels.fp8_block_cpu import dequant_task, quant_task, row_ranges
from dsv3conv.kernels.fp8_block_dequant import BLOCK_SIZE
from dsv3conv.kernels.mxfp4_dequant import cpu_dequant_mxfp4
from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8, repack_rows
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4, Op, QuantBlockFp8, RepackMxfp4Fp8


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
    nonfinite: bool = False  # its output holds NaN or Inf (allowed): NaN bits made canonical (`finite`)


def host_buffer(nbytes: int, pin_memory: bool = False) -> torch.Tensor:
    """`nbytes` of host memory (at least); pinned ones are allocated once and reused by the caller.

    torch's pinned allocator rounds every request up to a power of two: the buffer gets all of it."""
    if pin_memory and nbytes > 0:
        nbytes = 1 << (nbytes - 1).bit_length()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)


class OutputArena:
    """Host memory a backend converts into: the engine recycles one per batch in flight once it is written.

    Allocated on first use (pinned when `pin_memory`: a GPU copies its results into it asynchronously); a
    piece that does not fit gets memory of its own.
    """

    def __init__(self, capacity: int, pin_memory: bool = False):
        self.capacity = capacity
        self.pin_memory = pin_memory
        self._buf: torch.Tensor | None = None
        self._pos = 0

    def take(self, nbytes: int, align: int = 1) -> torch.Tensor:
        """`nbytes` of the arena, starting at a multiple of `align` (the element size)."""
        if self._buf is None and nbytes <= self.capacity:
            self._buf = host_buffer(self.capacity, self.pin_memory)
        pos = -(-self._pos // align) * align
        if self._buf is None or pos + nbytes > self._buf.numel():
            return torch.empty(nbytes, dtype=torch.uint8)
        self._pos = pos + nbytes
        return self._buf[pos : pos + nbytes]

    def reset(self) -> None:
        self._pos = 0


class Fence(Protocol):
    """A batch converted asynchronously: `wait()` returns once its output bytes are in host memory (and its
    input buffer is no longer read); it raises what the conversion found wrong."""

    def wait(self) -> None:
        ...


class Backend(Protocol):
    """Where the converting operations run: one method per operation, each given all of a batch's pieces of
    that operation at once and returning each piece's output bytes (`ops.<Op>.outputs` says where they go).

    The bytes may still be on their way: after a batch's methods, `fence()` says what to wait on before
    reading them or reusing the batch's input buffer and arena (None: they are already there)."""

    name: str
    pin_memory: bool  # the engine's read buffers and arenas are pinned (copied to a GPU asynchronously)

    def dequant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def fence(self) -> Fence | None:
        """Called once a batch's methods have returned: what completes that batch (None: nothing left)."""

    def close(self) -> None:
        """Release what the backend holds (the CPU's thread pool)."""

    def quant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def dequant_mxfp4(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def repack_mxfp4_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...


# The backend method of each converting operation (Copy needs none: its output is its input).
METHODS: dict[type, Callable[[Backend], Callable[..., list[list[memoryview]]]]] = {
    DequantBlockFp8: lambda b: b.dequant_block_fp8,
    QuantBlockFp8: lambda b: b.quant_block_fp8,
    DequantMxfp4: lambda b: b.dequant_mxfp4,
    RepackMxfp4Fp8: lambda b: b.repack_mxfp4_fp8,
}


def e8m0_bits(scale: torch.Tensor) -> torch.Tensor:
    """float32 powers of two (the engine's scales) back to their E8M0 bytes, exactly (2^-127 included)."""
    return scale.to(torch.float8_e8m0fnu).view(torch.uint8)


def convert(backend: Backend | None, buf: torch.Tensor, items: list[Item], out: OutputArena | None = None,
            ) -> list[memoryview]:
    """The output pieces of `items`, in order, complete (see `convert_async`)."""
    pieces, fence = convert_async(backend, buf, items, out)
    if fence is not None:
        fence.wait()
    return pieces


def convert_async(backend: Backend | None, buf: torch.Tensor, items: list[Item], out: OutputArena | None = None,
                  ) -> tuple[list[memoryview], Fence | None]:
    """The output pieces of `items`, in order, and what to wait on before reading them (None: nothing).
    A copy is a view of `buf`; the pieces of each converting operation go to the backend together (one
    launch per batch on a GPU)."""
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
    fence = backend.fence() if groups else None
    nans = [(buf[it.src_offset : it.src_offset + it.nbytes], results[i][0], TORCH_DTYPES[it.out_dtype])
            for i, it in enumerate(items) if it.nonfinite and isinstance(it.op, DequantBlockFp8)]
    if nans:  # NaN made the same on every backend, once the bytes are there
        fence = canonical_nan_after(fence, nans)
    return [piece for outs in results for piece in outs], fence


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
    """Every core at once: each tensor piece is cut into row ranges, converted by a pool of threads straight
    into its output (the numba kernels release the GIL for a whole range; torch's ops, one intra-op thread
    each, release it inside each op). `kernel`: the dequant and quant kernel (`fp8_block_cpu.KERNELS`)."""

    name = "cpu"
    pin_memory = False

    def __init__(self, threads: int | None = None, kernel: str = "auto") -> None:
        self.threads = threads or cpu_threads()
        self.kernel = kernel  # numba and each of its kernels are loaded by the first piece that needs them
        self._torch_threads = torch.get_num_threads()  # the pool's initializer changes torch's default
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dsv3conv-cpu",
                                        initializer=torch.set_num_threads, initargs=(1,))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._torch_threads)

    def fence(self) -> None:
        """Nothing to wait for: the methods return finished bytes."""

    def dequant_block_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into row ranges for the pool, converted straight into the arena."""
        jobs, results = [], []
        for it in items:
            w = buf[it.src_offset : it.src_offset + it.nbytes].view(it.rows, it.cols)
            dtype = TORCH_DTYPES[it.out_dtype]
            dst = out.take(it.rows * it.cols * dtype.itemsize, dtype.itemsize)
            task = dequant_task(w, it.scale, dst.view(dtype).view(it.rows, it.cols), self.kernel)
            jobs += [(task, r0, r1) for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS)]
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
            task = quant_task(w, q.view(it.rows, it.cols), scale, it.op.scale_fmt, scale.dtype, self.kernel)
            jobs += [(task, r0, r1) for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK_SIZE)]
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

    def repack_mxfp4_fp8(self, buf: torch.Tensor, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into whole-block row ranges for the pool: e4m3 into the arena, then its block scales;
        a piece that would lose values is refused (`check_repack`)."""
        jobs, results, lossy = [], [], []
        for it in items:
            packed, bits, q, scale = repack_buffers(buf, it, out)
            lossy.append([])
            for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK_SIZE):
                jobs.append((_count_into, lossy[-1], repack_rows, packed, bits, q, scale, r0, r1))
            results.append(_quant_outputs(q, scale))
        self._run_all(jobs)
        for it, counts in zip(items, lossy):
            check_repack(it, sum(counts))
        return results

    def _run_all(self, jobs: list[tuple]) -> None:
        futures = [self._pool.submit(*job) for job in jobs]
        try:
            for f in futures:
                f.result()
        finally:  # on a failure (or Ctrl-C) stop what has not started; the rest ends with its row range
            for f in futures:
                f.cancel()

def repack_buffers(buf: torch.Tensor, it: Item, out: OutputArena) -> tuple[torch.Tensor, ...]:
    """A `RepackMxfp4Fp8` piece's packed bytes [rows, cols / 2] and E8M0 scale bytes, and the arena memory its
    e4m3 [rows, cols] and block scales go to."""
    packed = buf[it.src_offset : it.src_offset + it.nbytes].view(it.rows, it.cols // 2)
    sdtype = TORCH_DTYPES[it.op.scale_dtype]
    blocks = _blocks(it.rows, it.cols)
    q = out.take(it.rows * it.cols).view(it.rows, it.cols)
    scale = out.take(blocks[0] * blocks[1] * sdtype.itemsize, sdtype.itemsize).view(sdtype).view(blocks)
    return packed, e8m0_bits(it.scale), q, scale


def repack_on_device(buf: torch.Tensor, it: Item, out: OutputArena, device: torch.device) -> list[memoryview]:
    """One `RepackMxfp4Fp8` piece converted on `device` (the plain-torch kernel runs anywhere), its e4m3 and
    block scales copied back into the arena, checked; synchronous. The GPU path of the repack."""
    packed, bits, q, scale = repack_buffers(buf, it, out)
    got_q, got_s, lossy = repack_mxfp4_to_fp8(packed.to(device), bits.to(device), scale.dtype)
    q.copy_(got_q.view(torch.uint8))
    scale.copy_(got_s)
    check_repack(it, lossy)
    return _quant_outputs(q, scale)


def check_repack(it: Item, lossy: int) -> None:
    """A repack is exact or refused: name the tensor and what to do instead."""
    if lossy:
        raise Dsv3Error(
            f"tensor `{it.name}`: {lossy} of its 128x128 blocks hold 32-value groups more than 14 binades apart, "
            "which e4m3 under one block scale cannot hold exactly; the FP8 repack would change values: "
            "dequantize without {experts} fp8", "experts"
        )


def _count_into(counts: list[int], fn, *args) -> None:
    counts.append(fn(*args))


# Elements per task of the CPU pool: a few milliseconds of work, many tasks per 64 MB batch.
TASK_ELEMS = 1 << 20


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    return -(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE)
