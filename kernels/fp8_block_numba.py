"""FP8 (e4m3) 128x128 block dequant and quant compiled with numba: GIL released, bit-exact.

Dequant, one pass per element: out[i, j] = round_to_nearest_even(float32(w[i, j]) * float32(scale[i // 128,
j // 128])). The e4m3 byte is decoded exactly with integer operations, multiplied by its block's float32
scale (an IEEE float32 multiply: no fastmath), and the product rounded to bfloat16 or float16 with integer
operations on its bits (round to nearest even, overflow to inf, float16 subnormals) or stored as is for
float32. A row holding a NaN code, or a block whose scale is not finite, is left to the caller, which
converts that row with numpy (`fp8_numpy`: NaN as the output dtype's canonical NaN) and resumes after it.

Quant, per 128-row block, as `reference_quant`: block maxima of |x| (NaN as inf) as integers, `block_scales`
(the division by 448, the floor, ue8m0's power of two, the scale dtype's rounding) per block, then every
element divided by its stored scale (IEEE float32 division), clamped to 448 and rounded to e4m3 (to nearest
even, subnormals included). Codes of blocks whose scale is not finite are unspecified: callers refuse them.

The kernels release the GIL: callers run many row ranges at once from a pool of threads. numba compiles them
on first use and caches the machine code on disk (`cache=True`): one compile per install and CPU, a load of
the cache afterwards; `warm()` (or `python -m dsv3conv.kernels.fp8_block_numba`) does that ahead of a run.
Division by zero follows IEEE (error_model="numpy"), which lets the loops vectorize. Without numba
`HAS_NUMBA` is False and callers use the numpy kernels (`fp8_numpy`) or torch's (`fp8_block_cpu`). Importing this module imports
numba (about half a second); nothing else runs on import.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .fp8_numpy import BLOCK

try:
    from numba import njit

    HAS_NUMBA = True
except Exception:  # not installed, or broken against this numpy: the torch kernel stands in
    HAS_NUMBA = False

# Output kinds of the kernel (torch dtype names): the output is passed as unsigned integers of its width.
KINDS = {"bfloat16": 0, "float16": 1, "float32": 2}

if HAS_NUMBA:
    U32 = np.uint32

    @njit(nogil=True, cache=True, error_model="numpy", inline="always")
    def _product_bits(x, s):
        """float32 bits of e4m3 byte `x` (not NaN) times `s`. The byte's magnitude bits shifted into a float32's
        exponent and mantissa, rebiased 7 -> 127, give the normals; a subnormal is its 3 mantissa bits times
        2^-9 (both exact); the sign bit is or-ed in."""
        mag = U32(x) & U32(0x7F)
        normal = U32((mag << U32(20)) + U32(120 << 23))
        subnormal = np.float32(np.float32(mag) * np.float32(2.0**-9)).view(np.uint32)
        bits = U32((normal if mag >= U32(8) else subnormal) | ((U32(x) & U32(0x80)) << U32(24)))
        return np.float32(bits.view(np.float32) * s).view(np.uint32)

    @njit(nogil=True, cache=True, error_model="numpy", inline="always")
    def _bf16_bits(b):
        """bfloat16 bits of float32 bits `b` (not NaN), rounded to nearest even (overflow to inf)."""
        return U32((b + U32(0x7FFF) + ((b >> U32(16)) & U32(1))) >> U32(16))

    @njit(nogil=True, cache=True, error_model="numpy", inline="always")
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

    @njit(nogil=True, cache=True, error_model="numpy")
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
            worst = np.uint8(0)  # in bytes: a third faster than wider lanes
            for c in range(cols):
                worst = max(worst, np.uint8(wr[c] & np.uint8(0x7F)))
            if worst == 0x7F or not finite:
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


    @njit(nogil=True, cache=True, error_model="numpy", inline="always")
    def _f16_to_f32_bits(h):
        """float32 bits of float16 bits `h`, exactly (subnormals, inf and NaN included)."""
        h = U32(h)
        sign = (h & U32(0x8000)) << U32(16)
        exp, man = (h >> U32(10)) & U32(0x1F), h & U32(0x3FF)
        subnormal = np.float32(np.float32(man) * np.float32(2.0**-24)).view(np.uint32)
        other = U32(((h & U32(0x7FFF)) << U32(13)) + (U32(0x38000000) if exp != U32(0x1F) else U32(0x70000000)))
        return U32((subnormal if exp == U32(0) else other) | sign)

    @njit(nogil=True, cache=True, error_model="numpy")
    def _source_bits(xr, src_kind, bits):
        """One source row (uint16: bfloat16 or float16 bits, or float32 as two halves) as float32 bits."""
        if src_kind == 0:
            for c in range(bits.size):
                bits[c] = U32(xr[c]) << U32(16)
        elif src_kind == 1:
            for c in range(bits.size):
                bits[c] = _f16_to_f32_bits(xr[c])
        else:
            for c in range(bits.size):
                bits[c] = U32(xr[2 * c]) | (U32(xr[2 * c + 1]) << U32(16))

    @njit(nogil=True, cache=True, error_model="numpy", inline="always")
    def _e4m3_bits(u):
        """e4m3fn code of the float32 of bits `u` clamped to [-448, 448] (not NaN: its block's scale is not
        finite, and callers refuse those), rounded to nearest even."""
        a = min(u & U32(0x7FFFFFFF), U32(0x43E00000))  # |y|, at most 448
        # Normal (|y| >= 2^-6): keep 3 mantissa bits (a carry moves into the exponent), rebias 127 -> 7.
        normal = U32(((a + U32(0x7FFFF) + ((a >> U32(20)) & U32(1))) >> U32(20)) - U32(120 << 3))
        # Below 2^-6: |y| + 2^14 rounds |y| to a multiple of 2^-9 (the ulp at 2^14), to nearest even; the
        # bits above 2^14's are that multiple (up to 8, e4m3's smallest normal).
        sub = U32(np.float32(U32(a).view(np.float32) + np.float32(16384.0)).view(np.uint32) - U32(0x46800000))
        return U32((sub if a < U32(0x3C800000) else normal) | ((u >> U32(24)) & U32(0x80)))

    @njit(nogil=True, cache=True, error_model="numpy")
    def _stored_scale(amax_bits, scale_kind, ue8m0, tiny):
        """`block_scales` of one block maximum (float32 bits, NaN already inf): (stored bits, as float32)."""
        s = np.float32(U32(amax_bits).view(np.float32) / np.float32(448.0))
        s = np.float32(1.0) if amax_bits == U32(0) else max(s, np.float32(tiny))
        u = np.float32(s).view(np.uint32)
        if ue8m0 and u & U32(0x7FFFFF):  # up to the next power of two
            u = U32((u & U32(0xFF800000)) + U32(0x800000))
        if scale_kind == 1:  # bfloat16
            r = U32((u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) & U32(0xFFFF0000))
            return U32(r >> U32(16)), U32(r).view(np.float32)
        if scale_kind == 2:  # float16
            h = _f16_bits(u)
            return U32(h), U32(_f16_to_f32_bits(h)).view(np.float32)
        if scale_kind == 3:  # e8m0: the exponent field (a power of two; inf -> 0xFF)
            return U32((u >> U32(23)) & U32(0xFF)), U32(u).view(np.float32)
        return U32(u), U32(u).view(np.float32)

    @njit(nogil=True, cache=True, error_model="numpy")
    def _quant_rows(x, src_kind, q, scale_bytes, scale_kind, ue8m0, tiny, start, stop):
        """Rows [start, stop) (whole 128-row blocks but the last) of x (uint16 bits [M, N or 2N]) into e4m3 codes
        `q` (uint8 [M, N]) and their blocks' scales into `scale_bytes` (uint8 [ceil(M/128), ceil(N/128) x the
        scale's width], little-endian), as `reference_quant` does."""
        cols = q.shape[1]
        blocks = (cols + BLOCK - 1) // BLOCK
        width = scale_bytes.shape[1] // max(blocks, 1)
        bits = np.empty(cols, dtype=np.uint32)
        colmax = np.empty(cols, dtype=np.uint32)  # |x| bits, NaN as inf: integer order is float order
        srow = np.empty(cols, dtype=np.float32)
        for r0 in range(start, stop, BLOCK):
            r1 = min(stop, r0 + BLOCK)
            colmax[:] = 0
            for r in range(r0, r1):
                _source_bits(x[r], src_kind, bits)
                for c in range(cols):
                    colmax[c] = max(colmax[c], min(bits[c] & U32(0x7FFFFFFF), U32(0x7F800000)))
            for b in range(blocks):
                c0, c1 = b * BLOCK, min(cols, (b + 1) * BLOCK)
                stored, value = _stored_scale(colmax[c0:c1].max(), scale_kind, ue8m0, tiny)
                for k in range(width):
                    scale_bytes[r0 // BLOCK, b * width + k] = (stored >> U32(8 * k)) & U32(0xFF)
                srow[c0:c1] = value
            for r in range(r0, r1):
                _source_bits(x[r], src_kind, bits)
                qr = q[r]
                for c in range(cols):
                    qr[c] = _e4m3_bits(np.float32(U32(bits[c]).view(np.float32) / srow[c]).view(np.uint32))


def dequant_task(w: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str) -> Callable[[int, int], int]:
    """A function converting rows [start, stop) of the block dequant of `w` (uint8 [M, N]) under float32 `scale`
    into `out` (the bits of `dtype` [M, N], uint16 or uint32; arguments checked by the caller: contiguous,
    matching shapes). It returns `stop`, or the first row left for the caller (a NaN code, or a scale not
    finite); the rows before it are written."""
    kind = KINDS[dtype]
    return lambda start, stop: _dequant_rows(w, scale, out, start, stop, kind)


_SOURCE_KINDS = {"bfloat16": 0, "float16": 1, "float32": 2}
_SCALE_KINDS = {"float32": 0, "bfloat16": 1, "float16": 2, "float8_e8m0fnu": 3}


def quant_task(x: np.ndarray, src_dtype: str, q: np.ndarray, scale_out: np.ndarray, scale_fmt: str,
               scale_dtype: str) -> Callable[[int, int], None]:
    """A function quantizing rows [start, stop) (start a multiple of 128, stop too unless it is the last row) of
    `x` (the raw bytes [M, N x width] of `src_dtype`) into `q` (uint8 [M, N]) and the scales of their row blocks
    into `scale_out` (uint8 [ceil(M/128), ceil(N/128) x the scale's width]), as `reference_quant` does
    (arguments checked by the caller: contiguous, matching shapes)."""
    args = (x.view(np.uint16), _SOURCE_KINDS[src_dtype], q, scale_out, _SCALE_KINDS[scale_dtype],
            scale_fmt == "ue8m0", 2.0**-14 if scale_dtype == "float16" else 2.0**-126)
    return lambda start, stop: _quant_rows(*args, start, stop)


def warm(what: tuple = ()) -> None:
    """Compile (or load from the disk cache) the kernel `what` names, ("dequant", out dtype name) or
    ("quant",), or all of them, so that no run compiles."""
    w = np.zeros((1, 1), dtype=np.uint8)
    for dtype in KINDS:
        if what in ((), ("dequant", dtype)):
            dequant_task(w, np.ones((1, 1), np.float32), np.empty((1, 1), np.uint32 if dtype == "float32" else np.uint16),
                         dtype)(0, 1)
    if what in ((), ("quant",)):
        quant_task(np.zeros((1, 4), np.uint8), "float32", w, np.empty((1, 4), np.uint8), "float", "float32")(0, 1)


if __name__ == "__main__":  # `python -m dsv3conv.kernels.fp8_block_numba`: compile into the cache once
    from dsv3conv.kernels import fp8_block_numba  # the module as runs import it: its cache, not __main__'s

    if fp8_block_numba.HAS_NUMBA:
        fp8_block_numba.warm()
    print(f"numba kernel {'ready' if fp8_block_numba.HAS_NUMBA else 'unavailable (numba is not installed)'}")
