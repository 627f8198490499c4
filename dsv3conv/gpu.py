"""The GPU backend, and which backend runs where.

- `CudaBackend`: the Triton kernel of `dsv3conv.kernels.fp8_block_dequant`, one grouped launch per batch;
  copies and kernels enqueued on streams taking turns, results copied into the engine's pinned arena, done
  when the batch's `fence()` says so (the engine converts the next batch meanwhile).
- `check_device`, `device_list`, `make_backend`: `--device` names asked of torch (which GPUs exist), and
  the backend of each (`--device` spelling is checked earlier, without torch, by `dsv3conv.devices`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from dsv3conv import profiling
from dsv3conv.backend import (
    CpuBackend,
    Item,
    OutputArena,
    blocks,
    check_quant_scales,
    check_repack,
    e8m0_bits,
    quant_outputs,
)
from dsv3conv.devices import gpu_missing, parse_devices
from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.kernels.fp8_block_dequant import HAS_TRITON


class CudaFence:
    """The end of one batch on a CUDA stream, and what the host checks once it is there."""

    def __init__(self, event, spans: list, checks: list):
        self.event, self.spans, self.checks = event, spans, checks

    def wait(self) -> None:
        self.event.synchronize()  # releases the GIL: the other threads go on meanwhile
        for spans, labels in self.spans:
            spans.report(*labels)
        for check in self.checks:
            check()


class CudaBackend:
    """One GPU. A batch's copies and kernels are enqueued on one of `STREAMS` streams taking turns, so the
    results of one batch come back while the next goes in and a third converts; every method returns at
    once, `fence()` marks the batch's end. Inputs come from the engine's pinned read buffers, results go to
    its pinned arenas (`host_buffer`: numpy views of pinned tensors; nothing is pinned per batch); device memory is what one batch needs per stream,
    reused through torch's caching allocator (a tensor freed on a stream is reused only by later work of
    that stream)."""

    name = "cuda"
    STREAMS = 3

    def __init__(self, device: torch.device):
        from dsv3conv.kernels import fp8_block_dequant as k

        if not hasattr(k, "dequant_segments"):
            raise Dsv3Error("the Triton kernel is unavailable (is triton installed?); rerun with {device} cpu", "device")
        self._k = k
        self.device = device
        self.name = str(device)
        self.streams = [torch.cuda.Stream(device) for _ in range(self.STREAMS)]
        self._turn = 0
        self._spans: list = []  # (profiling.StreamSpans, labels) of the batch being enqueued
        self._checks: list[Callable[[], None]] = []  # host checks once the batch is back

    @staticmethod
    def host_buffer(nbytes: int) -> np.ndarray:
        """Pinned host memory (the GPU copies to and from it asynchronously), allocated once and reused by the
        engine, as a numpy view that keeps the tensor alive. torch's pinned allocator rounds every request up
        to a power of two: the buffer gets all of it."""
        nbytes = 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()

    @property
    def stream(self) -> torch.cuda.Stream:
        """The stream of the batch being enqueued."""
        return self.streams[self._turn]

    def fence(self) -> CudaFence:
        event = torch.cuda.Event(blocking=True)  # a waiting writer sleeps rather than spins: cores are for writes
        event.record(self.stream)
        fence = CudaFence(event, self._spans, self._checks)
        self._spans, self._checks = [], []
        self._turn = (self._turn + 1) % len(self.streams)
        return fence

    def close(self) -> None:
        """Let enqueued work end (a failed run stops mid-batch); the caching allocator keeps the memory."""
        for stream in self.streams:
            stream.synchronize()

    def dequant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """All pieces in one grouped launch per output dtype; the results copied back into the arena."""
        sizes = [it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize for it in items]
        segments, scales, starts, dst_off, scale_off = [], [], [], 0, 0
        for it, n in zip(items, sizes):
            segments.append((it.src_offset, dst_off, scale_off, it.rows, it.cols))
            scales.append(np.asarray(it.scale, dtype=np.float32).reshape(-1))
            starts.append(dst_off)
            dst_off += n
            scale_off += scales[-1].size
        host = out.take(dst_off, 16)
        host_out = torch.from_numpy(host)
        used = max(it.src_offset + it.nbytes for it in items)
        spans = profiling.StreamSpans(profiling.current())
        with torch.cuda.stream(self.stream):
            spans.point()
            src = torch.from_numpy(buf[:used]).to(self.device, non_blocking=True)
            sc = torch.from_numpy(np.concatenate(scales)).pin_memory().to(self.device, non_blocking=True)
            dst = torch.empty(dst_off, dtype=torch.uint8, device=self.device)
            spans.point()
            for dtype in sorted({it.out_dtype for it in items}):
                segs = [s for s, it in zip(segments, items) if it.out_dtype == dtype]
                self._k.dequant_segments(src, dst, sc, segs, TORCH_DTYPES[dtype])
            spans.point()
            host_out.copy_(dst, non_blocking=True)
            spans.point()
        self._spans.append((spans, (("h2d", used), ("kernel", dst_off), ("d2h", dst_off))))
        view = memoryview(host)
        return [[view[a : a + n]] for a, n in zip(starts, sizes)]

    def dequant_mxfp4(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece with the Triton MXFP4 kernel; the results copied back into the arena."""
        from dsv3conv.kernels.mxfp4_dequant import dequant_mxfp4

        results = []
        with torch.cuda.stream(self.stream):
            for it in items:
                host = out.take(it.rows * it.cols * TORCH_DTYPES[it.out_dtype].itemsize, 16)
                packed = _tensor(buf[it.src_offset : it.src_offset + it.nbytes]).to(self.device, non_blocking=True)
                bits = torch.from_numpy(e8m0_bits(it.scale)).pin_memory().to(self.device, non_blocking=True)
                got = dequant_mxfp4(packed.view(it.rows, it.cols // 2), bits, TORCH_DTYPES[it.out_dtype])
                torch.from_numpy(host).copy_(got.view(torch.uint8).reshape(-1), non_blocking=True)
                results.append([memoryview(host)])
        return results

    def quant_block_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Each piece with the Triton kernel, one launch per piece; e4m3 and scales copied back into the
        arena, the scales checked on the host once there (`fence`)."""
        from dsv3conv.kernels import fp8_block_quant as kq

        results = []
        spans = profiling.StreamSpans(profiling.current())
        with torch.cuda.stream(self.stream):
            spans.point()
            for it in items:
                scale_dtype = TORCH_DTYPES[it.op.scale_dtype]
                shape = blocks(it.rows, it.cols)
                host_q = out.take(it.rows * it.cols)
                host_s = out.take(shape[0] * shape[1] * scale_dtype.itemsize, scale_dtype.itemsize)
                src = _tensor(buf[it.src_offset : it.src_offset + it.nbytes]).to(self.device, non_blocking=True)
                w = _typed(src, TORCH_DTYPES[it.src_dtype]).view(it.rows, it.cols)
                q, s = kq.quant(w, it.op.scale_fmt, scale_dtype)
                torch.from_numpy(host_q).view(it.rows, it.cols).copy_(q.view(torch.uint8), non_blocking=True)
                torch.from_numpy(host_s).view(scale_dtype).view(shape).copy_(s, non_blocking=True)
                source = buf[it.src_offset : it.src_offset + it.nbytes]
                self._checks.append(functools.partial(check_quant_scales, it, host_s, source))
                results.append(quant_outputs(host_q, host_s))
            spans.point()
        self._spans.append((spans, (("quant_gpu", sum(it.nbytes for it in items)),)))
        return results

    def repack_mxfp4_fp8(self, buf: np.ndarray, items: list[Item], out: OutputArena) -> list[list[memoryview]]:
        """Packed FP4 -> block FP8 (`dequant --experts fp8`): the plain-torch kernel on this GPU, piece by piece,
        synchronous (its results are in the arena when it returns; the batch's fence has nothing left of it)."""
        with torch.cuda.stream(self.stream):
            return [repack_on_device(buf, it, out, self.device) for it in items]


def repack_on_device(buf: np.ndarray, it: Item, out: OutputArena, device: torch.device) -> list[memoryview]:
    """One `RepackMxfp4Fp8` piece converted on `device` (the plain-torch kernel runs anywhere), its e4m3 and
    block scales copied back into the arena, checked; synchronous. The GPU path of the repack."""
    from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8

    sdtype = TORCH_DTYPES[it.op.scale_dtype]
    shape = blocks(it.rows, it.cols)
    packed = _tensor(buf[it.src_offset : it.src_offset + it.nbytes]).view(it.rows, it.cols // 2)
    bits = torch.from_numpy(e8m0_bits(it.scale))
    q = out.take(it.rows * it.cols)
    scale = out.take(shape[0] * shape[1] * sdtype.itemsize, sdtype.itemsize)
    got_q, got_s, lossy = repack_mxfp4_to_fp8(packed.to(device), bits.to(device), sdtype)
    torch.from_numpy(q).view(it.rows, it.cols).copy_(got_q.view(torch.uint8))
    torch.from_numpy(scale).view(sdtype).view(shape).copy_(got_s)
    check_repack(it, lossy)
    return quant_outputs(q, scale)


def _tensor(data: np.ndarray) -> torch.Tensor:
    """Engine memory as a torch tensor, no copy (pinned stays pinned: the pages are the same)."""
    return torch.from_numpy(data)


def _typed(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes viewed as `dtype`; copied first when their offset is not a multiple of the element size."""
    if data.storage_offset() % dtype.itemsize or data.data_ptr() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


def device_list(device: str) -> list[str]:
    """`cuda:all`: every visible GPU; `cuda:0,cuda:1`: those (a device may be named twice: two workers);
    anything else: that one device."""
    names = parse_devices(device)
    if names == ["cuda:all"]:
        if not torch.cuda.is_available():
            raise gpu_missing("cuda:all", 0)
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
            raise gpu_missing(device, 0)
        if not HAS_TRITON:
            raise UsageError(f"{{device}} {device}: the GPU path needs triton, which is not installed; "
                             "pip install 'dsv3conv[gpu]', or use {device} cpu", "device")
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UsageError(f"{{device}} {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list", "device") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise gpu_missing(device, torch.cuda.device_count())
        return device
    raise UsageError(f"{{device}} {device!r}: choose auto, cpu, cuda, cuda:N, cuda:all or a list (cuda:0,cuda:1)",
                     "device")


def make_backend(device: str, cpu_threads: int | None = None):
    """`auto`: a CUDA GPU when present, else the CPU; `cpu`; `cuda`; `cuda:N`. `cpu_threads`: the CPU
    backend's threads (default `devices.cpu_threads()`)."""
    device = check_device(device)
    return CpuBackend(cpu_threads) if device == "cpu" else CudaBackend(torch.device(device))
