"""Compute backends: where the converting operations of a plan (`ops`) run.

`Backend` is the interface: one method per converting operation, given all of a batch's pieces of that
operation at once; `convert` hands each piece of a batch to the method of its operation. The engine's
memory is plain numpy (`host_buffer`), which every backend views without a copy; a backend that needs other
memory (a GPU: pinned pages) makes it through its own `host_buffer`.
- `CpuBackend`: numpy and numba on a pool of threads (`dsv3conv.kernels.fp8_block_host`, `mxfp4_cpu`), no torch
  (unless asked for, or where numba is missing: its kernels for large tensors).
- `dsv3conv.gpu.CudaBackend`: the Triton kernels, asynchronous (a batch is done when its `fence()` says so).
- `Spread`: several backends as one, taking turns per batch (`--device cuda:all` or a list).
Both compute round_to_nearest_even(float32(w) * float32(scale)) and are tested bit for bit against
`reference_dequant`. The way back, BF16 -> FP8 (`quant`), follows `reference_quant` bit for bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from dsv3conv.devices import cpu_kernel, cpu_threads
from dsv3conv.dtypes import DTYPE_SIZES, TORCH_NAMES
from dsv3conv.errors import Dsv3Error, counted
from dsv3conv.finite import canonical_nan_after
from dsv3conv.kernels import fp8_block_host, mxfp4_cpu
from dsv3conv.kernels.fp8_block_host import row_ranges
from dsv3conv.kernels.fp8_numpy import FINITE_MAX, OUT_BITS, to_float32
from dsv3conv.layout import BLOCK
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
    scale: np.ndarray | None = None  # DequantBlockFp8, DequantMxfp4: float32 scales of these rows
    name: str = ""  # the tensor, for error messages
    nonfinite: bool = False  # its output holds NaN or Inf (allowed): NaN bits made canonical (`finite`)


def host_buffer(nbytes: int) -> np.ndarray:
    """`nbytes` of host memory, uninitialized: the engine's read buffers and arenas (a backend's own
    `host_buffer` may give other memory, pinned for a GPU)."""
    return np.empty(nbytes, dtype=np.uint8)


class OutputArena:
    """Host memory a backend converts into: the engine recycles one per batch in flight once it is written.

    Made by `make` (a backend's `host_buffer`) on first use; a piece that does not fit gets memory of its own.
    """

    def __init__(self, capacity: int, make: Callable[[int], np.ndarray] = host_buffer):
        self.capacity = capacity
        self._make = make
        self._buf: np.ndarray | None = None
        self._pos = 0

    @property
    def memory(self) -> np.ndarray | None:
        """The arena's memory (None until first used)."""
        return self._buf

    def take(self, nbytes: int, align: int = 1) -> np.ndarray:
        """`nbytes` of the arena (uint8), starting at a multiple of `align` (the element size)."""
        if self._buf is None and nbytes <= self.capacity:
            self._buf = self._make(self.capacity)
        pos = -(-self._pos // align) * align
        if self._buf is None or pos + nbytes > self._buf.size:
            return host_buffer(nbytes)
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
    that operation at once (`buf`: the batch's read buffer, uint8) and returning each piece's output bytes
    (`ops.<Op>.outputs` says where they go).

    The bytes may still be on their way: after a batch's methods, `fence()` says what to wait on before
    reading them or reusing the batch's input buffer and arena (None: they are already there)."""

    name: str

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """At least `nbytes` of host memory for the engine's read buffers and arenas (uint8)."""

    def dequant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def fence(self) -> Fence | None:
        """Called once a batch's methods have returned: what completes that batch (None: nothing left)."""

    def close(self) -> None:
        """Release what the backend holds (the CPU's thread pool)."""

    def quant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def dequant_mxfp4(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...

    def repack_mxfp4_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        ...


# The backend method of each converting operation (Copy needs none: its output is its input).
METHODS: dict[type, Callable[[Backend], Callable[..., list[list[memoryview]]]]] = {
    DequantBlockFp8: lambda b: b.dequant_block_fp8,
    QuantBlockFp8: lambda b: b.quant_block_fp8,
    DequantMxfp4: lambda b: b.dequant_mxfp4,
    RepackMxfp4Fp8: lambda b: b.repack_mxfp4_fp8,
}


def convert(backend: Backend | None, buf: np.ndarray, items: list[Item], out: OutputArena | None = None,
            ) -> list[memoryview]:
    """The output pieces of `items`, in order, complete (see `convert_async`)."""
    pieces, fence = convert_async(backend, buf, items, out)
    if fence is not None:
        fence.wait()
    return pieces


def convert_async(backend: Backend | None, buf: np.ndarray, items: list[Item], out: OutputArena | None = None,
                  ) -> tuple[list[memoryview], Fence | None]:
    """The output pieces of `items`, in order, and what to wait on before reading them (None: nothing).
    A copy is a view of `buf`; the pieces of each converting operation go to the backend together (one
    launch per batch on a GPU). `buf`: uint8 (anything numpy views as bytes)."""
    buf = np.asarray(buf).reshape(-1).view(np.uint8)
    out = out or OutputArena(0)
    results: list[list[memoryview]] = [[] for _ in items]
    groups: dict[type, list[int]] = {}
    for i, it in enumerate(items):
        if isinstance(it.op, Copy):
            results[i] = [memoryview(buf[it.src_offset : it.src_offset + it.nbytes])]
        else:
            groups.setdefault(type(it.op), []).append(i)
    for op_type, idx in groups.items():
        for i, outs in zip(idx, METHODS[op_type](backend)(buf, [items[i] for i in idx], out)):
            results[i] = outs
    fence = backend.fence() if groups else None
    nans = [(buf[it.src_offset : it.src_offset + it.nbytes], results[i][0], TORCH_NAMES[it.out_dtype])
            for i, it in enumerate(items) if it.nonfinite and isinstance(it.op, DequantBlockFp8)]
    if nans:  # NaN made the same on every backend, once the bytes are there
        fence = canonical_nan_after(fence, nans)
    return [piece for outs in results for piece in outs], fence


def quant_outputs(q: np.ndarray, scale: np.ndarray) -> list[memoryview]:
    """A quantized piece's outputs: its e4m3 bytes, then its scales' bytes."""
    return [memoryview(q.reshape(-1).view(np.uint8)), memoryview(scale.reshape(-1).view(np.uint8))]


def check_quant_scales(it: Item, stored: np.ndarray, w: np.ndarray) -> None:
    """A scale that is not finite means NaN/Inf in the block, or a scale beyond the scale dtype: refuse.
    `stored`: the piece's scale bytes; `w`: its source bytes."""
    scale_dtype = TORCH_NAMES[it.op.scale_dtype]
    s = to_float32(stored, scale_dtype).reshape(blocks(it.rows, it.cols))
    bad = ~np.isfinite(s)
    if not bad.any():
        return
    i, j = (int(v) for v in np.argwhere(bad)[0])
    x = to_float32(w, TORCH_NAMES[it.src_dtype]).reshape(it.rows, it.cols)
    block = x[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
    if not np.isfinite(block).all():
        raise Dsv3Error(
            f"tensor `{it.name}` holds NaN or Inf values ({int(bad.sum())} of the 128x128 blocks read at once); "
            "fix the weights, or keep the tensor unquantized with {skip}", "skip"
        )
    raise Dsv3Error(
        f"tensor `{it.name}`: a block's largest magnitude {float(np.abs(block).max()):g} needs a scale beyond "
        f"{it.op.scale_dtype} (largest {FINITE_MAX[scale_dtype]:g}); use {{scale_dtype}} float32",
        "scale_dtype",
    )


def check_repack(it: Item, lossy: int) -> None:
    """A repack is exact or refused: name the tensor and what to do instead."""
    if lossy:
        raise Dsv3Error(
            f"tensor `{it.name}`: {counted(lossy, 'of its 128x128 blocks holds', 'of its 128x128 blocks hold')} "
            "32-value groups more than 14 binades apart, "
            "which e4m3 under one block scale cannot hold exactly; the FP8 repack would change values: "
            "dequantize without {experts} fp8", "experts"
        )


def e8m0_bits(scale: np.ndarray) -> np.ndarray:
    """float32 powers of two (the engine's scales) back to their E8M0 bytes, exactly (2^-127 included)."""
    bits = np.ascontiguousarray(scale, dtype=np.float32).view(np.uint32)
    return np.where(bits == 0x00400000, 0, bits >> 23).astype(np.uint8)


def blocks(rows: int, cols: int) -> tuple[int, int]:
    """128x128 blocks of a [rows, cols] tensor, down and across."""
    return -(-rows // BLOCK), -(-cols // BLOCK)


# Elements per task of the CPU pool: a few milliseconds of work, many tasks per 64 MB batch.
TASK_ELEMS = 1 << 20


class CpuBackend:
    """Every core at once: each tensor piece is cut into row ranges, converted by a pool of threads straight
    into its output (numba's kernels and numpy's array operations release the GIL). `kernel`: which dequant and
    quant kernel (`fp8_block_host.KERNELS`; default `DSV3CONV_CPU_KERNEL`, else "auto")."""

    name = "cpu"

    def __init__(self, threads: int | None = None, kernel: str | None = None) -> None:
        self.threads = threads or cpu_threads()
        self.kernel = kernel or cpu_kernel()  # numba and each of its kernels load with the first piece needing them
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dsv3conv-cpu")

    host_buffer = staticmethod(host_buffer)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fence(self) -> None:
        """Nothing to wait for: the methods return finished bytes."""

    def dequant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into row ranges for the pool, converted straight into the arena."""
        jobs, results = [], []
        for it in items:
            w = buf[it.src_offset : it.src_offset + it.nbytes].reshape(it.rows, it.cols)
            dtype = TORCH_NAMES[it.out_dtype]
            dst = out.take(it.rows * it.cols * DTYPE_SIZES[it.out_dtype], DTYPE_SIZES[it.out_dtype])
            scale = np.ascontiguousarray(it.scale, dtype=np.float32)
            task = fp8_block_host.dequant_task(w, scale, dst.view(OUT_BITS[dtype]).reshape(it.rows, it.cols), dtype,
                                               self.kernel)
            jobs += [(task, r0, r1) for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS)]
            results.append([memoryview(dst)])
        self._run_all(jobs)
        return results

    def quant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into whole-block row ranges for the pool: e4m3 into the arena, then its scales."""
        jobs, results, quantized = [], [], []
        for it in items:
            width = DTYPE_SIZES[it.src_dtype]
            x = _aligned(buf[it.src_offset : it.src_offset + it.nbytes], width).reshape(it.rows, it.cols * width)
            q = out.take(it.rows * it.cols).reshape(it.rows, it.cols)
            bm, bn = blocks(it.rows, it.cols)
            scale = host_buffer(bm * bn * DTYPE_SIZES[it.op.scale_dtype]).reshape(bm, -1)
            task = fp8_block_host.quant_task(x, TORCH_NAMES[it.src_dtype], q, scale, it.op.scale_fmt,
                                             TORCH_NAMES[it.op.scale_dtype], self.kernel)
            jobs += [(task, r0, r1) for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK)]
            quantized.append((it, scale, x))
            results.append(quant_outputs(q, scale))
        self._run_all(jobs)
        for it, scale, x in quantized:
            check_quant_scales(it, scale, x)
        return results

    def dequant_mxfp4(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into row ranges for the pool; one table lookup per packed byte (exact)."""
        jobs, results = [], []
        for it in items:
            packed = buf[it.src_offset : it.src_offset + it.nbytes].reshape(it.rows, it.cols // 2)
            dtype = TORCH_NAMES[it.out_dtype]
            size = DTYPE_SIZES[it.out_dtype]
            dst = out.take(it.rows * it.cols * size, size)
            bits = e8m0_bits(it.scale)
            view = dst.view(OUT_BITS[dtype]).reshape(it.rows, it.cols)
            for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS):
                jobs.append((mxfp4_cpu.dequant_rows, packed, bits, view, dtype, r0, r1))
            results.append([memoryview(dst)])
        self._run_all(jobs)
        return results

    def repack_mxfp4_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece cut into whole-block row ranges for the pool: e4m3 into the arena, then its block scales;
        a piece that would lose values is refused (`check_repack`)."""
        jobs, results, lossy = [], [], []
        for it in items:
            packed = buf[it.src_offset : it.src_offset + it.nbytes].reshape(it.rows, it.cols // 2)
            bm, bn = blocks(it.rows, it.cols)
            size = DTYPE_SIZES[it.op.scale_dtype]
            q = out.take(it.rows * it.cols).reshape(it.rows, it.cols)
            scale = out.take(bm * bn * size, size).reshape(bm, bn * size)
            bits, sdtype = e8m0_bits(it.scale), TORCH_NAMES[it.op.scale_dtype]
            lossy.append([])
            for r0, r1 in row_ranges(it.rows, it.cols, TASK_ELEMS, BLOCK):
                jobs.append((_count_into, lossy[-1], mxfp4_cpu.repack_rows, packed, bits, q, scale, sdtype, r0, r1))
            results.append(quant_outputs(q, scale))
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


class Spread:
    """Several backends as one (`--device cuda:all` or a list): each batch goes to the next in turn, so one
    set of reader and writer threads feeds every device."""

    def __init__(self, backends: list):
        self.backends = backends
        self.name = ",".join(b.name for b in backends)
        # the engine's memory suits every device: a GPU's (pinned) where one is among them
        self.host_buffer = next((b.host_buffer for b in backends if b.host_buffer is not host_buffer),
                                host_buffer)
        self._turn = 0

    def _current(self):
        return self.backends[self._turn]

    def dequant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        return self._current().dequant_block_fp8(buf, items, out)

    def quant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        return self._current().quant_block_fp8(buf, items, out)

    def dequant_mxfp4(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        return self._current().dequant_mxfp4(buf, items, out)

    def repack_mxfp4_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        return self._current().repack_mxfp4_fp8(buf, items, out)

    def fence(self) -> Fence | None:
        fence = self._current().fence()
        self._turn = (self._turn + 1) % len(self.backends)
        return fence

    def close(self) -> None:
        for b in self.backends:
            b.close()


def _aligned(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Bytes whose address is a multiple of `itemsize`: these, or a copy."""
    return data if data.ctypes.data % itemsize == 0 else data.copy()


def _count_into(counts: list[int], fn, *args) -> None:
    counts.append(fn(*args))
