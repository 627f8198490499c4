"""FP8 (e4m3) 128x128 block dequant and quant in plain numpy: exact, compile-free, no torch.

The CPU path's kernels for small tensors (and the whole CPU path where numba is missing for the small ones):
numpy starts in tens of milliseconds where torch takes seconds and numba a compile or a cache load.

Dequant: a 256-entry table gives each e4m3 byte's float32 value exactly, numpy multiplies by the block's
float32 scale (one IEEE float32 multiply), and the product is rounded to the output dtype: bfloat16 with an
integer round to nearest even on its bits, float16 by numpy's conversion (round to nearest even, subnormals
and overflow to inf included), float32 kept. That is round_to_nearest_even(float32(w) * float32(scale)),
`reference_dequant`'s result, bit for bit; a NaN comes out as the output dtype's default quiet NaN with the
sign of its e4m3 code (`NAN_BITS`).

Quant follows `reference_quant` step for step on a 128-row block at a time: block maxima of |x| (NaN as
inf), the scales (`block_scales`), a correctly rounded float32 division, the clamp to 448 and an integer
round to nearest even to e4m3 (subnormals included). Nothing runs on import but the tables (microseconds).
"""

from __future__ import annotations

import threading

import numpy as np

BLOCK = 128  # rows and columns of a scale block (the one definition the kernels import)
E4M3_MAX = 448.0
E8M0_NAN = 255  # the E8M0 byte that is NaN (every other byte b is 2^(b - 127))
U32 = np.uint32
STEP_ELEMS = 1 << 18  # elements per step: the step's temporaries stay in a core's cache
# (positive, negative) default quiet NaN of each output dtype, as bits
NAN_BITS = {"bfloat16": (0x7FC0, 0xFFC0), "float16": (0x7E00, 0xFE00), "float32": (0x7FC00000, 0xFFC00000)}
OUT_BITS = {"bfloat16": np.uint16, "float16": np.uint16, "float32": np.uint32}  # an output's integer view
# Largest finite value of each dtype named in error messages
FINITE_MAX = {"float32": float(np.finfo(np.float32).max), "bfloat16": 3.3895313892515355e38, "float16": 65504.0,
              "float8_e8m0fnu": 2.0**127}
_scratch = threading.local()


def _e4m3_table() -> np.ndarray:
    """float32 of every e4m3 byte: magnitude bits shifted into a float32 and rebiased 7 -> 127 for normals, the
    3 mantissa bits times 2^-9 for subnormals, the sign or-ed in; 0x7F / 0xFF the signed quiet NaN."""
    code = np.arange(256, dtype=U32)
    mag = code & U32(0x7F)
    normal = (mag << U32(20)) + U32(120 << 23)
    subnormal = (mag.astype(np.float32) * np.float32(2.0**-9)).view(U32)
    bits = np.where(mag >= 8, normal, subnormal)
    bits[mag == 0x7F] = U32(0x7FC00000)
    return (bits | ((code & U32(0x80)) << U32(24))).view(np.float32)


E4M3_F32 = _e4m3_table()


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of `raw` (uint8 bytes of `dtype`, a torch dtype name), exactly as torch's `.to(float32)`
    gives them (float64 rounded to nearest even). A new array."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if dtype == "float32":
        return raw.view(np.float32).copy()
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(U32) << U32(16)).view(np.float32)
    if dtype == "float16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "float64":
        return raw.view(np.float64).astype(np.float32)
    if dtype == "float8_e4m3fn":
        return E4M3_F32[raw]
    if dtype == "float8_e5m2":  # e5m2 is the high byte of a float16
        return (raw.astype(np.uint16) << np.uint16(8)).view(np.float16).astype(np.float32)
    if dtype == "float8_e8m0fnu":  # 2^(b - 127); 0: 2^-127 (a float32 subnormal); 255: NaN
        b = raw.astype(U32)
        bits = np.where(b == 0, U32(0x00400000), b << U32(23))
        return np.where(b == E8M0_NAN, U32(0x7FC00000), bits).view(np.float32)
    raise ValueError(f"no float32 view of dtype {dtype!r}")


def round_into(x: np.ndarray, out: np.ndarray, dtype: str, tmp: np.ndarray | None = None) -> None:
    """float32 `x` (not NaN) rounded to nearest even into `out`, the bits of `dtype` (uint16 or uint32).
    `tmp`: uint32 scratch of x's shape (bfloat16 only)."""
    if dtype == "float32":
        np.copyto(out, x.view(U32))
    elif dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504: inf, as the rule says
            np.copyto(out.view(np.float16), x, casting="same_kind")
    else:  # bits + 0x7FFF + (bit 16), shifted: ties to even, overflow to inf
        b = x.view(U32)
        t = np.right_shift(b, U32(16), out=tmp)
        t &= U32(1)
        t += U32(0x7FFF)
        t += b
        t >>= U32(16)
        np.copyto(out, t, casting="unsafe")


def canonical_nan(x: np.ndarray, out: np.ndarray, dtype: str) -> None:
    """Where float32 `x` is NaN, `out` (bits of `dtype`) gets `NAN_BITS` with x's sign."""
    nan = np.isnan(x)
    if nan.any():
        positive, negative = NAN_BITS[dtype]
        out[nan] = np.where(np.signbit(x[nan]), negative, positive)


def _scratch_arrays(elems: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's float32 and uint32 work arrays of at least `elems` elements (kept between calls)."""
    have = getattr(_scratch, "bufs", None)
    if have is None or have[0].size < elems:
        have = _scratch.bufs = (np.empty(elems, np.float32), np.empty(elems, U32))
    return have[0][:elems], have[1][:elems]


def dequant_rows(w: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str, start: int, stop: int) -> None:
    """Rows [start, stop) of the block dequant of `w` (uint8 [M, N]) under float32 `scale` [ceil(M/128),
    ceil(N/128)] into `out` ([M, N] bits of `dtype`: bfloat16, float16 or float32)."""
    cols = w.shape[1]
    if stop <= start or cols == 0:
        return
    step = max(1, min(BLOCK, STEP_ELEMS // cols))
    xs, ts = _scratch_arrays(step * cols)
    r = start
    while r < stop:
        block = r // BLOCK
        end = min(stop, (block + 1) * BLOCK)
        srow = np.repeat(scale[block], BLOCK)[:cols]
        odd = not np.isfinite(srow).all()
        for r0 in range(r, end, step):
            r1 = min(end, r0 + step)
            n = (r1 - r0) * cols
            x, t = xs[:n].reshape(r1 - r0, cols), ts[:n].reshape(r1 - r0, cols)
            np.take(E4M3_F32, w[r0:r1], out=x, mode="clip")
            with np.errstate(all="ignore"):  # 0 * inf: NaN, as the reference makes it
                x *= srow
            round_into(x, out[r0:r1], dtype, t)
            if odd or has_nan_code(w[r0:r1]):
                canonical_nan(x, out[r0:r1], dtype)
        r = end


def has_nan_code(u8: np.ndarray) -> bool:
    """e4m3fn NaN is 0x7F or 0xFF: the largest byte as uint8 or as int8."""
    return u8.size > 0 and (int(u8.max()) == 0xFF or int(u8.view(np.int8).max()) == 0x7F)


def block_scales(amax: np.ndarray, scale_fmt: str, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored bits as uint8 bytes [.., blocks x width], float32 value) of the scales of float32 block maxima
    `amax` (NaN already inf), as `fp8_block_quant.block_scales` computes them."""
    s = amax / np.float32(E4M3_MAX)
    s = np.where(amax == 0, np.float32(1.0), s)
    s = np.maximum(s, np.float32(2.0**-14 if scale_dtype == "float16" else 2.0**-126))
    if scale_fmt == "ue8m0":  # up to the next power of two, on the bits
        bits = s.view(U32)
        s = np.where(bits & U32(0x7FFFFF), (bits & U32(0xFF800000)) + U32(0x800000), bits).view(np.float32)
    if scale_dtype == "float32":
        stored = s
    elif scale_dtype == "bfloat16":
        stored = np.empty(s.shape, np.uint16)
        round_into(s, stored, "bfloat16")
    elif scale_dtype == "float16":
        with np.errstate(over="ignore"):  # inf: callers refuse the block
            stored = s.astype(np.float16)
    elif scale_dtype == "float8_e8m0fnu":  # a power of two (ue8m0): its exponent field; inf -> 255
        stored = (s.view(U32) >> U32(23)).astype(np.uint8)
    else:
        raise ValueError(f"scale_dtype {scale_dtype!r}: choose float32, bfloat16, float16 or float8_e8m0fnu")
    value = s if scale_dtype == "float8_e8m0fnu" else to_float32(stored.view(np.uint8), scale_dtype)
    return stored.view(np.uint8), value


def e4m3_codes(y: np.ndarray) -> np.ndarray:
    """e4m3fn codes (uint8) of float32 `y` clamped to [-448, 448], rounded to nearest even (NaN: unspecified)."""
    u = y.view(U32)
    a = np.minimum(u & U32(0x7FFFFFFF), U32(0x43E00000))
    # Normal (|y| >= 2^-6): keep 3 mantissa bits (a carry moves into the exponent), rebias 127 -> 7.
    normal = ((a + U32(0x7FFFF) + ((a >> U32(20)) & U32(1))) >> U32(20)) - U32(120 << 3)
    # Below 2^-6: |y| + 2^14 rounds |y| to a multiple of 2^-9 (the ulp at 2^14), to nearest even.
    sub = (a.view(np.float32) + np.float32(16384.0)).view(U32) - U32(0x46800000)
    return (np.where(a < U32(0x3C800000), sub, normal) | ((u >> U32(24)) & U32(0x80))).astype(np.uint8)


def quant_rows(x: np.ndarray, src_dtype: str, q: np.ndarray, scale_out: np.ndarray, scale_fmt: str,
               scale_dtype: str, start: int, stop: int) -> None:
    """Rows [start, stop) (start a multiple of 128) of `reference_quant(x)`: x the raw bytes [M, N x width] of
    `src_dtype` (bfloat16, float16, float32), e4m3 codes into `q` (uint8 [M, N]), the scales of their row
    blocks into `scale_out` (uint8 [ceil(M/128), ceil(N/128) x the scale's width])."""
    cols = q.shape[1]
    if stop <= start or cols == 0:
        return
    pad = -cols % BLOCK
    for r0 in range(start, stop, BLOCK):
        r1 = min(stop, r0 + BLOCK)
        xf = to_float32(x[r0:r1], src_dtype).reshape(r1 - r0, cols)
        a = np.abs(xf).max(axis=0)  # NaN anywhere in a column makes its maximum NaN
        a = np.where(np.isnan(a), np.float32(np.inf), a)
        amax = np.concatenate((a, np.zeros(pad, np.float32))).reshape(-1, BLOCK).max(axis=1)
        stored, value = block_scales(amax, scale_fmt, scale_dtype)
        scale_out[r0 // BLOCK] = stored
        with np.errstate(all="ignore"):
            y = xf / np.repeat(value, BLOCK)[:cols]
        q[r0:r1] = e4m3_codes(y)
