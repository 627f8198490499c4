"""FP8 (e4m3) 128x128 block dequant compiled with numba: one pass per element, no GIL, bit-exact.

out[i, j] = round_to_nearest_even(float32(w[i, j]) * float32(scale_inv[i // 128, j // 128]))

Each element: its e4m3 byte decoded through an exact 256-entry float32 table (built by torch's own float8
conversion), times its block's float32 scale (an IEEE float32 multiply: no fastmath), then rounded to
bfloat16 or float16 with integer operations on the product's bits (round to nearest even, overflow to inf,
float16 subnormals) or stored as is for float32. A NaN product (a NaN code, or a NaN or infinite scale)
stops the kernel at its row: torch writes NaN bits that depend on its vector code (bfloat16 NaN is 0xFFFF
on x86), so the caller converts that row with torch's ops and resumes after it.

The kernel releases the GIL: callers run many row ranges at once from a pool of threads. numba compiles it
on first use and caches the machine code on disk (`cache=True`): one compile per install and CPU, a load of
the cache afterwards; `warm()` does that ahead of a run. Without numba `HAS_NUMBA` is False and callers use
the torch kernel of `fp8_block_cpu`. Importing this module imports numba (about half a second); nothing
else runs on import.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

try:
    from numba import njit

    HAS_NUMBA = True
except Exception:  # not installed, or broken against this numpy: the torch kernel stands in
    HAS_NUMBA = False

BLOCK = 128
# Output kinds of the kernel: the output is passed as unsigned integers of its width.
KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_OUT_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.uint16, torch.float32: torch.uint32}

if HAS_NUMBA:
    U32 = np.uint32

    @njit(nogil=True, cache=True, inline="always")
    def _product_bits(x, s):
        """float32 bits of e4m3 byte `x` (not NaN) times `s`. The byte's magnitude bits shifted into a float32's
        exponent and mantissa, rebiased 7 -> 127, give the normals; a subnormal is its 3 mantissa bits times
        2^-9 (both exact); the sign bit is or-ed in."""
        mag = U32(x) & U32(0x7F)
        normal = U32((mag << U32(20)) + U32(120 << 23))
        subnormal = np.float32(np.float32(mag) * np.float32(2.0**-9)).view(np.uint32)
        bits = U32((normal if mag >= U32(8) else subnormal) | ((U32(x) & U32(0x80)) << U32(24)))
        return np.float32(bits.view(np.float32) * s).view(np.uint32)

    @njit(nogil=True, cache=True, inline="always")
    def _bf16_bits(b):
        """bfloat16 bits of float32 bits `b` (not NaN), rounded to nearest even (overflow to inf)."""
        return U32((b + U32(0x7FFF) + ((b >> U32(16)) & U32(1))) >> U32(16))

    @njit(nogil=True, cache=True, inline="always")
    def _f16_bits(b):
        """float16 bits of float32 bits `b` (not NaN), rounded to nearest even: overflow to inf, subnormals."""
        a = b & U32(0x7FFFFFFF)
        normal = U32((a - U32(0x38000000) + U32(0xFFF) + ((a >> U32(13)) & U32(1))) >> U32(13))
        # Below 2^-14: the 24-bit significand in units of 2^-24 (shifted right by 126 - exponent), rounded.
        shift = max(min(U32(126) - (a >> U32(23)), U32(31)), U32(1))
        sig = (a & U32(0x7FFFFF)) | U32(0x800000)
        q = sig >> shift
        rem = sig & ((U32(1) << shift) - U32(1))
        half = U32(1) << (shift - U32(1))
        sub = U32(q + ((rem > half) | ((rem == half) & (q & U32(1) == U32(1)))))
        h = U32(0x7C00) if a >= U32(0x477FF000) else (normal if a >= U32(0x38800000) else sub)
        return U32(h | ((b >> U32(16)) & U32(0x8000)))

    @njit(nogil=True, cache=True)
    def _dequant_rows(w, scale, out, start, stop, kind):
        """Rows [start, stop) of `w` (uint8 [M, N]) into `out` (uint16 or uint32 bits [M, N]); scale float32
        [ceil(M/128), ceil(N/128)]. Returns `stop`, or the first row (left unwritten) that holds a NaN code
        or has a scale that is not finite."""
        cols = w.shape[1]
        srow = np.empty(cols, dtype=np.float32)  # this row block's scales, one per column
        finite = True
        for r in range(start, stop):
            if r == start or r % BLOCK == 0:
                block = scale[r // BLOCK]
                finite = np.isfinite(block).all()
                for c in range(cols):
                    srow[c] = block[c // BLOCK]
            wr, orow = w[r], out[r]
            worst = U32(0)
            for c in range(cols):
                worst = max(worst, U32(wr[c]) & U32(0x7F))
            if worst == U32(0x7F) or not finite:
                return r
            if kind == 0:
                for c in range(cols):
                    orow[c] = _bf16_bits(_product_bits(wr[c], srow[c]))
            elif kind == 1:
                for c in range(cols):
                    orow[c] = _f16_bits(_product_bits(wr[c], srow[c]))
            else:
                for c in range(cols):
                    orow[c] = _product_bits(wr[c], srow[c])
        return stop


def dequant_task(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor) -> Callable[[int, int], int]:
    """A function converting rows [start, stop) of the block dequant of `w` (uint8) into `out` (arguments
    checked by the caller: contiguous, matching shapes, out bfloat16/float16/float32). It returns `stop`, or
    the first row left for the caller (a NaN code, or a scale not finite); the rows before it are written."""
    args = (w.numpy(), scale_inv.to(torch.float32).contiguous().numpy(), out.view(_OUT_BITS[out.dtype]).numpy())
    kind = KINDS[out.dtype]
    return lambda start, stop: _dequant_rows(*args, start, stop, kind)


def warm() -> None:
    """Compile (or load from the disk cache) the kernel for every output kind, so no run compiles."""
    w = torch.zeros((1, 1), dtype=torch.uint8)
    for dtype in KINDS:
        dequant_task(w, torch.ones((1, 1)), torch.empty((1, 1), dtype=dtype))(0, 1)


if __name__ == "__main__":  # `python -m dsv3conv.kernels.fp8_block_numba`: compile into the cache once
    from dsv3conv.kernels import fp8_block_numba  # the module as runs import it: its cache, not __main__'s

    if fp8_block_numba.HAS_NUMBA:
        fp8_block_numba.warm()
    print(f"numba kernel {'ready' if fp8_block_numba.HAS_NUMBA else 'unavailable (numba is not installed)'}")
