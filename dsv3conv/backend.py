"""Compute backends: where FP8 blocks become BF16 (or FP16/FP32).

- `CpuBackend`: one fused pass per tensor chunk (`torch.compile`; eager torch when compiling is unavailable).
- `CudaBackend`: the Triton kernel of `dsv3conv.kernels.fp8_block_dequant`, one grouped launch per batch,
  host buffers pinned, copies asynchronous on a side stream.
Both compute round_to_nearest_even(float32(w) * float32(scale)) and are tested bit for bit against
`reference_dequant`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from dsv3conv.dtypes import TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.kernels.fp8_block_dequant import BLOCK_SIZE



@dataclass
class Item:
    """One piece of a batch: a tensor chunk to convert, or bytes to copy through unchanged."""

    src_offset: int  # in the batch's input buffer
    nbytes: int  # input bytes
    rows: int = 0
    cols: int = 0
    scale: torch.Tensor | None = None  # float32 [ceil(rows/128), ceil(cols/128)] for this chunk
    out_dtype: str = ""

    @property
    def converts(self) -> bool:
        return self.scale is not None


def _fused_dequant(w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """One pass over `w`: each element times its block's scale, rounded once to `out_dtype`."""
    rows, cols = w.shape
    r = torch.arange(rows, device=w.device) // BLOCK_SIZE
    c = torch.arange(cols, device=w.device) // BLOCK_SIZE
    return (w.to(torch.float32) * scale[r[:, None], c[None, :]]).to(out_dtype)


@functools.cache
def _compiled_dequant():
    """The fused dequant compiled once for any shape; eager torch where compilation is unavailable."""
    if os.environ.get("DSV3CONV_NO_COMPILE"):
        return _fused_dequant
    try:
        fn = torch.compile(_fused_dequant, dynamic=True)
        probe = torch.zeros((3, 5), dtype=torch.float8_e4m3fn)
        fn(probe, torch.ones((1, 1)), torch.bfloat16)  # compile now, so a failure falls back here
        return fn
    except Exception:  # noqa: BLE001  (no compiler toolchain, unsupported platform: stay correct, be slower)
        return _fused_dequant


class CpuBackend:
    name = "cpu"
    pin_memory = False

    def __init__(self) -> None:
        self._fn = _compiled_dequant()

    def run(self, buf: torch.Tensor, items: list[Item]) -> list[memoryview]:
        """Convert or pass through each item of `buf`; return the output pieces in order."""
        outs = []
        for it in items:
            data = buf[it.src_offset : it.src_offset + it.nbytes]
            if not it.converts:
                outs.append(memoryview(data.numpy()))
                continue
            w = data.view(torch.float8_e4m3fn).view(it.rows, it.cols)
            out = self._fn(w, it.scale, TORCH_DTYPES[it.out_dtype])
            outs.append(memoryview(out.view(torch.uint8).numpy()).cast("B"))
        return outs


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
        for i, it in enumerate(items):
            if it.converts:
                outs[i] = next(conv_iter)
            else:
                outs[i] = memoryview(buf[it.src_offset : it.src_offset + it.nbytes].numpy())
        return outs  # type: ignore[return-value]


def make_backend(device: str):
    """`auto`: a CUDA GPU when present, else the CPU; `cpu`; `cuda`; `cuda:N`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return CpuBackend()
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
        return CudaBackend(dev)
    raise UsageError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
