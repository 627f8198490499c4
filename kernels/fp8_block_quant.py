"""BF16/F16/F32 -> FP8 (e4m3) 128x128 block quantization: plain-torch reference, Triton kernel, launcher.

The recipe, per 128x128 block of `w` (edge blocks partial; padding never enters the amax):

    x      = float32(w)                                    exact for bfloat16, float16, float32
    amax   = max |x| over the block's stored elements      NaN counts as +inf
    s      = amax / 448                                    float32, correctly rounded (448: largest e4m3 value)
    s      = 1                                             if amax == 0 (all-zero block: any s gives q == 0)
    s      = max(s, tiny)                                  tiny: smallest normal of the scale dtype
                                                           (2^-14 for float16, else 2^-126), so s > 0
    s      = 2^ceil(log2(s))                               scale_fmt "ue8m0" only (exact, on the bits)
    stored = scale_dtype(s)                                round to nearest even; float16 overflow -> inf
    q      = e4m3(clamp(x / float32(stored), -448, 448))   division correctly rounded, cast RNE

A block holding NaN or Inf, or whose scale overflows float16, gets an infinite scale (e8m0: NaN): callers
check the scales and refuse (q is then unspecified). Clamping before the cast matters: on CUDA, casting
float32 beyond +-448 to float8_e4m3fn gives NaN. Nothing runs on import.

One Triton program quantizes one whole 128x128 block held in registers. Stored e4m3 bytes come either from
the GPU's native conversion (`cvt.rn.satfinite`, sm89+) or from an integer round-to-nearest-even encoder
(`encode_bits=True`: GPUs without an FP8 type, and Triton's interpreter, whose float32 -> fp8 cast is not
RNE). Scales are rounded to bfloat16/float16 with integer arithmetic too, so no path depends on a cast's
rounding mode.
"""

from __future__ import annotations

import torch

from .fp8_numpy import BLOCK as BLOCK_SIZE
from .fp8_numpy import E4M3_MAX
from .launch import (  # Triton is optional: the reference works without it
    E8M0,
    HAS_TRITON,
    SCALE_KIND,
    SCALE_VIEW,
    _cdiv,
    _device_guard,
    _device_info,
    launch_device,
    output_for,
    tl,
    triton,
)

SCALE_FMTS = ("float", "ue8m0")
SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_F16_TINY = 2.0**-14
_F32_TINY = 2.0**-126


def scale_floor(scale_dtype: torch.dtype) -> float:
    """Smallest scale stored: the smallest normal of the scale dtype (float32's for bfloat16 and e8m0)."""
    return _F16_TINY if scale_dtype == torch.float16 else _F32_TINY


def check_scale_args(scale_fmt: str, scale_dtype: torch.dtype) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt {scale_fmt!r}: choose one of {SCALE_FMTS}")
    if scale_dtype not in SCALE_KIND:
        raise ValueError(f"scale_dtype {scale_dtype}: choose float32, bfloat16, float16 or float8_e8m0fnu")
    if scale_dtype == E8M0 and scale_fmt != "ue8m0":
        raise ValueError("float8_e8m0fnu scales hold powers of two only: use scale_fmt='ue8m0'")


def block_scales(amax: torch.Tensor, scale_fmt: str, scale_dtype: torch.dtype) -> torch.Tensor:
    """The stored scales (in `scale_dtype`) of float32 block maxima `amax` (NaN already mapped to inf)."""
    # A tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its reciprocal,
    # which is not the correctly rounded quotient the kernels and the CPU compute.
    s = amax / torch.full_like(amax, E4M3_MAX)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    s = torch.clamp_min(s, scale_floor(scale_dtype))
    if scale_fmt == "ue8m0":
        bits = s.view(torch.int32)
        up = (bits & -0x800000) + 0x800000  # next power of two: clear the mantissa, add one to the exponent
        s = torch.where((bits & 0x7FFFFF) != 0, up, bits).view(torch.float32)
    return s.to(scale_dtype)


def reference_quant(
    w: torch.Tensor,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch block quantization: (q float8_e4m3fn [M, N], scale [ceil(M/B), ceil(N/B)] of scale_dtype).

    The semantics every other implementation must match bit for bit (module docstring)."""
    check_scale_args(scale_fmt, scale_dtype)
    if w.dtype not in SOURCE_DTYPES or w.dim() != 2:
        raise ValueError(f"w must be a 2-D bfloat16/float16/float32 tensor, got {w.dtype} {tuple(w.shape)}")
    rows, cols = w.shape
    x = w.to(torch.float32)
    a = x.abs()
    a = torch.where(a.isnan(), torch.full_like(a, float("inf")), a)
    pr, pc = -rows % block_size, -cols % block_size
    padded = torch.nn.functional.pad(a, (0, pc, 0, pr))  # zeros: never raise a maximum of |x|
    amax = padded.view((rows + pr) // block_size, block_size, (cols + pc) // block_size, block_size).amax(dim=(1, 3))
    scale = block_scales(amax, scale_fmt, scale_dtype)
    full = scale.to(torch.float32).repeat_interleave(block_size, 0)[:rows].repeat_interleave(block_size, 1)[:, :cols]
    q = (x / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _f32_to_e4m3_bits(y):
        """e4m3fn bits of float32 `y` (|y| <= 448, finite), rounded to nearest even, with integer ops only."""
        u = y.to(tl.int32, bitcast=True)
        sign = (u >> 24) & 0x80
        a = u & 0x7FFFFFFF
        exp = a >> 23
        # Normal (|y| >= 2^-6): keep 3 mantissa bits, RNE on the 20 dropped; a carry moves into the exponent.
        # Exponent rebias 127 -> 7: subtract 120 << 3 from (exponent << 3 | mantissa).
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # Subnormal: |y| in units of 2^-9 is the 24-bit significand shifted right by 141 - exp; RNE on the rest.
        shift = tl.maximum(tl.minimum(141 - exp, 31), 1)  # only 21..31 is used
        sig = (a & 0x7FFFFF) | 0x800000
        q = sig >> shift
        rem = sig & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        q = tl.where(exp == 0, 0, q)  # float32 zero or subnormal: far below e4m3's smallest step
        code = tl.where(a < 0x3C800000, q, normal) | sign
        return code.to(tl.uint8)

    @triton.jit
    def _store_scale(s_ptr, s, SCALE_KIND: tl.constexpr):
        """Store positive scale `s` (float32 scalar) in its dtype; return the stored value as float32."""
        u = s.to(tl.int32, bitcast=True)
        if SCALE_KIND == 1:  # bfloat16: round the 16 dropped bits to nearest even
            r = (u + 0x7FFF + ((u >> 16) & 1)) & -65536
            tl.store(s_ptr, (r >> 16).to(tl.int16))
            return r.to(tl.float32, bitcast=True)
        elif SCALE_KIND == 2:  # float16 (s >= 2^-14: normal): round 13 bits, rebias 127 -> 15; overflow: inf
            r = (u + 0xFFF + ((u >> 13) & 1)) & -8192
            over = r >= 0x47800000  # rounds to 65536 or more
            tl.store(s_ptr, tl.where(over, 0x7C00, (r >> 13) - (112 << 10)).to(tl.int16))
            return tl.where(over, 0x7F800000, r).to(tl.float32, bitcast=True)
        elif SCALE_KIND == 3:  # e8m0 (a power of two): the exponent field; inf -> 0xFF (NaN)
            tl.store(s_ptr, ((u >> 23) & 0xFF).to(tl.uint8))
            return s
        else:
            tl.store(s_ptr, s)
            return s

    @triton.jit(do_not_specialize=["rows"])
    def _quant_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        rows,
        cols,
        stride_x,
        stride_q,
        stride_s,
        TINY: tl.constexpr,
        UE8M0: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        ENCODE_BITS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Quantize one BLOCK x BLOCK block: amax, scale, then every element divided by the stored scale."""
        pid = tl.program_id(0)
        blocks_n = tl.cdiv(cols, BLOCK)
        pid_m = pid // blocks_n
        pid_n = pid % blocks_n
        row0 = pid_m * BLOCK
        col0 = pid_n * BLOCK
        offs_m = tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        mask = ((row0 + offs_m) < rows)[:, None] & ((col0 + offs_n) < cols)[None, :]
        x_tile = x_ptr + row0.to(tl.int64) * stride_x + col0
        x = tl.load(x_tile + offs_m[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)

        a = tl.abs(x)
        a = tl.where(a != a, float("inf"), a)  # noqa: PLR0124  (NaN -> inf: an infinite scale, callers refuse it)
        amax = tl.max(tl.max(a, axis=1), axis=0)
        s = tl.math.div_rn(amax, 448.0)
        s = tl.where(amax == 0.0, 1.0, s)
        s = tl.maximum(s, TINY)
        if UE8M0:
            u = s.to(tl.int32, bitcast=True)
            up = (u & -0x800000) + 0x800000
            s = tl.where((u & 0x7FFFFF) != 0, up, u).to(tl.float32, bitcast=True)
        s = _store_scale(s_ptr + pid_m.to(tl.int64) * stride_s + pid_n, s, SCALE_KIND)

        y = tl.math.div_rn(x, tl.full(x.shape, 0.0, tl.float32) + s)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        q_ptrs = q_ptr + row0.to(tl.int64) * stride_q + col0 + offs_m[:, None] * stride_q + offs_n[None, :]
        if ENCODE_BITS:
            tl.store(q_ptrs, _f32_to_e4m3_bits(y), mask=mask)
        else:
            tl.store(q_ptrs, y.to(tl.float8e4nv), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def resolve_encode_bits(device: torch.device, encode_bits: bool | None) -> bool:
    """`None`: the native FP8 conversion on sm89+ GPUs; the integer encoder below sm89 and in the interpreter."""
    if encode_bits is not None:
        return bool(encode_bits)
    if device.type != "cuda":
        return True
    return _device_info(device)[1] < (8, 9)


def quant(
    w: torch.Tensor,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    encode_bits: bool | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one 2-D weight on the GPU, bit-identical to `reference_quant`: returns (q, scale).

    w: [M, N] bfloat16/float16/float32. q: float8_e4m3fn [M, N]; scale: [ceil(M/128), ceil(N/128)] of
    scale_dtype. out / scale_out: optional tensors to write into (float8_e4m3fn or uint8; scale_dtype).
    encode_bits: True encodes e4m3 with integer arithmetic (pre-sm89 GPUs); None picks by compute capability.
    """
    device = launch_device("quant", "reference_quant", w=w)
    check_scale_args(scale_fmt, scale_dtype)
    if w.dtype not in SOURCE_DTYPES:
        raise ValueError(f"w must be bfloat16, float16 or float32, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [M, N], got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols > 1 and w.stride(1) != 1:
        w = w.contiguous()
    sshape = (_cdiv(rows, BLOCK_SIZE), _cdiv(cols, BLOCK_SIZE))
    if out is not None and out.dtype == torch.uint8:
        out = out.view(torch.float8_e4m3fn)  # raw e4m3 bytes: the same storage
    out = output_for(out, rows, cols, torch.float8_e4m3fn, device)
    scale_out = output_for(scale_out, *sshape, scale_dtype, device, name="scale_out")
    if rows == 0 or cols == 0:
        return out, scale_out
    encode = resolve_encode_bits(device, encode_bits)
    q = out.view(torch.uint8) if encode else out.view(torch.float8_e4m3fn)
    kind = SCALE_KIND[scale_dtype]
    s = scale_out.view(SCALE_VIEW[kind])
    grid = (sshape[0] * sshape[1],)
    with _device_guard(device):
        _quant_kernel[grid](
            w, q, s, rows, cols, w.stride(0), q.stride(0), s.stride(0),
            TINY=scale_floor(scale_dtype), UE8M0=scale_fmt == "ue8m0", SCALE_KIND=kind, ENCODE_BITS=encode,
            BLOCK=BLOCK_SIZE, num_warps=8,
        )  # fmt: skip
    return out.view(torch.float8_e4m3fn), scale_out
