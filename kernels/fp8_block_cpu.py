"""FP8 (e4m3) 128x128 block dequant and quant with torch's CPU ops: the "torch" kernel of `fp8_block_host`.

Asked for by name only (`CpuBackend(kernel="torch")`): the CPU path runs on numpy and numba without torch.
Arguments are numpy arrays as `fp8_block_host` takes them, viewed as torch tensors without a copy.

Dequant: a few vectorized torch ops per step of rows (a step stays inside one 128-row scale block and fits
in a core's cache; torch releases the GIL inside its ops, not between them). It decodes e4m3 without
torch's scalar float8 conversion: the byte, sign-extended to 16 bits, shifted left by 7 and with bit 14
cleared, is the float16 of the e4m3 value times 2^-8 (normals and subnormals alike), which the CPU widens
to float32 exactly. Multiplying by 256 * scale gives the exact real product the reference rounds, hence the
same float32 and the same rounded output. Rows holding NaN codes (0x7F, 0xFF) and scales where 256 * scale
is not finite take the reference's own ops instead (NaN bits are then torch's: the engine makes them
canonical, `dsv3conv.finite`).

Quant follows `reference_quant` step for step (block maxima, `block_scales`, division, clamp, cast), a row
block at a time so nothing is padded or repeated. Nothing runs on import.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
import torch

from .fp8_block_dequant import BLOCK_SIZE
from .fp8_block_quant import E4M3_MAX, block_scales

# Elements per step: large enough that Python's share (a few us per op, under the GIL) stays small, small
# enough that the scratch (6 bytes an element) and the step's input and output stay in a core's cache.
STEP_ELEMS = 1 << 18
_F16_SHIFT = 256.0  # float16 of (byte << 7 & ~0x4000) is the e4m3 value / 256
_CLEAR_BIT14 = ~0x4000
_scratch = threading.local()


def _scratch_tensors(elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int16 and float32 work buffers of at least `elems` elements (kept between calls: fresh
    pages in the hot loop would halve the speed)."""
    have = getattr(_scratch, "bufs", None)
    if have is None or have[0].numel() < elems:
        have = _scratch.bufs = (torch.empty(elems, dtype=torch.int16), torch.empty(elems, dtype=torch.float32))
    return have[0][:elems], have[1][:elems]


def _one_thread(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """`fn` with torch's intra-op threads at one in the calling thread: the caller's pool spreads the work."""
    def rows(start: int, stop: int) -> None:
        if not getattr(_scratch, "one_thread", False):
            torch.set_num_threads(1)
            _scratch.one_thread = True
        fn(start, stop)

    return rows


def torch_dequant_task(w: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str) -> Callable[[int, int], None]:
    """`fp8_block_host.dequant_task`'s arguments (checked) as torch tensors, for the torch kernel."""
    out_t = torch.from_numpy(out).view(getattr(torch, dtype))
    return _one_thread(functools.partial(_dequant_rows_torch, torch.from_numpy(w), torch.from_numpy(scale), out_t))


def torch_quant_task(x: np.ndarray, src_dtype: str, q: np.ndarray, scale_out: np.ndarray, scale_fmt: str,
                     scale_dtype: str) -> Callable[[int, int], None]:
    """`fp8_block_host.quant_task`'s arguments (checked) as torch tensors, for the torch kernel."""
    rows, cols = q.shape
    x_t = torch.from_numpy(x).view(getattr(torch, src_dtype)).view(rows, cols)
    s_t = torch.from_numpy(scale_out).view(getattr(torch, scale_dtype))
    return _one_thread(functools.partial(_quant_rows_torch, x_t, torch.from_numpy(q), s_t, scale_fmt, s_t.dtype))


def _dequant_rows_torch(u8: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, start: int,
                        stop: int) -> None:
    """The torch kernel on rows [start, stop) (arguments checked)."""
    cols = u8.shape[1]
    if stop <= start or cols == 0:
        return
    step = max(1, STEP_ELEMS // cols)
    bits, wide = _scratch_tensors(min(step, BLOCK_SIZE) * cols)
    nan_codes = _has_nan_codes(u8[start:stop])
    r = start
    while r < stop:
        block = r // BLOCK_SIZE
        end = min(stop, (block + 1) * BLOCK_SIZE)
        srow = scale_inv[block].to(torch.float32).repeat_interleave(BLOCK_SIZE)[:cols]
        fast_scale = srow * _F16_SHIFT
        scale_ok = bool(torch.isfinite(fast_scale).all())
        for r0 in range(r, end, step):
            r1 = min(end, r0 + step)
            n = (r1 - r0) * cols
            src, dst = u8[r0:r1], out[r0:r1]
            if not scale_ok or (nan_codes and _has_nan_codes(src)):
                dst.copy_(src.view(torch.float8_e4m3fn).to(torch.float32) * srow)  # the reference's own ops
                continue
            h = bits[:n].view(r1 - r0, cols)
            h.copy_(src.view(torch.int8))  # sign-extended: bits 15..7 all equal the e4m3 sign
            h.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT14)  # sign, 4 exponent and 3 mantissa bits
            if out.dtype == torch.float32:
                torch.mul(dst.copy_(h.view(torch.float16)), fast_scale, out=dst)
            else:
                x = wide[:n].view(r1 - r0, cols)
                x.copy_(h.view(torch.float16)).mul_(fast_scale)
                dst.copy_(x)  # round to nearest even
        r = end


def _has_nan_codes(u8: torch.Tensor) -> bool:
    """e4m3fn NaN is 0x7F or 0xFF: the largest byte as uint8 or as int8."""
    return int(u8.max()) == 0xFF or int(u8.view(torch.int8).max()) == 0x7F


def _quant_rows_torch(x: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor, scale_fmt: str,
                      scale_dtype: torch.dtype, start: int, stop: int) -> None:
    """The torch kernel on rows [start, stop) (arguments and range checked)."""
    cols = x.shape[1]
    q8 = q.view(torch.float8_e4m3fn)
    full, tail = cols // BLOCK_SIZE * BLOCK_SIZE, cols % BLOCK_SIZE
    for r0 in range(start, stop, BLOCK_SIZE):
        r1 = min(stop, r0 + BLOCK_SIZE)
        xf = x[r0:r1].to(torch.float32, copy=True)  # divided in place below
        a = xf.abs()
        amax = torch.empty(-(-cols // BLOCK_SIZE), dtype=torch.float32)
        if full:
            torch.amax(a[:, :full].view(r1 - r0, full // BLOCK_SIZE, BLOCK_SIZE), dim=(0, 2), out=amax[: full // BLOCK_SIZE])
        if tail:
            amax[-1] = a[:, full:].amax()
        amax = torch.where(amax.isnan(), float("inf"), amax)  # a NaN anywhere in a block makes its maximum NaN
        scale = block_scales(amax, scale_fmt, scale_dtype)
        scale_out[r0 // BLOCK_SIZE] = scale
        srow = scale.to(torch.float32).repeat_interleave(BLOCK_SIZE)[:cols]
        q8[r0:r1] = xf.div_(srow).clamp_(-E4M3_MAX, E4M3_MAX)
