"""MXFP4 dequantization (packed E2M1 pairs, one E8M0 scale per 32 values): torch reference, Triton kernel and
launcher (the CPU backend's exact kernel is `mxfp4_cpu.dequant_rows`, numpy).

Layout (DeepSeek-V4 routed experts): `packed` [rows, cols / 2] of int8/uint8 bytes, two E2M1 codes per byte,
the low nibble the even column, the high nibble the odd one; `scale` [rows, ceil(cols / 32)] of
float8_e8m0fnu (or its raw uint8 bits), byte b meaning 2^(b - 127); 255 is NaN and is refused.

    out[i, j] = round_to_nearest_even(float32(e2m1(code[i, j])) * float32(scale[i, j // 32]))

E2M1 code c: sign c >> 3, exponent (c >> 1) & 3 (bias 1), mantissa c & 1; magnitudes 0, 0.5, 1, 1.5, 2, 3,
4, 6. Code 8 is -0.0 (a decoded weight encodes back to the same code). Nothing runs on import.
"""

from __future__ import annotations

import torch

from .launch import (  # Triton is optional: the reference works without it
    HAS_TRITON,
    _cdiv,
    _device_guard,
    check_out_dtype,
    launch_device,
    output_for,
    tl,
    triton,
)
from .mxfp4_cpu import E2M1_VALUES, E8M0_NAN, GROUP, nan_scale_error  # numpy only

if HAS_TRITON:
    from .fp8_block_dequant import _e8m0_bits_to_f32

_PACKED_DTYPES = (torch.int8, torch.uint8)


def unpacked_shape(packed: torch.Tensor) -> tuple[int, int]:
    rows, pcols = packed.shape
    return rows, 2 * pcols


def _scale_bits(scale: torch.Tensor) -> torch.Tensor:
    """The scale's raw E8M0 bytes as uint8 (accepts float8_e8m0fnu or uint8)."""
    if scale.dtype == torch.uint8:
        return scale
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        return scale.view(torch.uint8)
    raise ValueError(f"scale must be float8_e8m0fnu or uint8 (raw e8m0 bits), got {scale.dtype}")


def check_args(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> tuple[int, int]:
    """Validate dtypes and shapes; return the unpacked (rows, cols)."""
    if packed.dtype not in _PACKED_DTYPES:
        raise ValueError(f"packed must be int8 or uint8 (two E2M1 codes per byte), got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [rows, cols / 2], got shape {tuple(packed.shape)}")
    _scale_bits(scale)
    rows, cols = unpacked_shape(packed)
    want = (rows, -(-cols // GROUP))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match packed shape {tuple(packed.shape)}: "
            f"expected {want} (one scale per {GROUP} values of the {cols} unpacked columns)"
        )
    check_out_dtype(out_dtype)
    return rows, cols


def nan_scale(scale: torch.Tensor) -> tuple[int, int] | None:
    """(row, group) of the first E8M0 NaN (byte 255), or None."""
    bad = _scale_bits(scale) == E8M0_NAN
    if not bool(bad.any()):
        return None
    i, j = (int(v) for v in bad.nonzero()[0])
    return i, j


def refuse_nan_scale(scale: torch.Tensor) -> None:
    where = nan_scale(scale)
    if where is not None:
        raise nan_scale_error(*where)


def reference_dequant_mxfp4(
    packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Plain-torch MXFP4 dequant: the semantics every other implementation must match bit for bit."""
    rows, cols = check_args(packed, scale, out_dtype)
    refuse_nan_scale(scale)
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(rows, cols)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[codes]
    s = _scale_bits(scale).view(torch.float8_e8m0fnu).to(torch.float32)
    s = s.repeat_interleave(GROUP, dim=1)[:, :cols]
    return (values * s).to(out_dtype)


# ------------------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:

    @triton.jit
    def _e2m1_to_f32(code):
        """Exact float32 of E2M1 codes (int32, 0..15): built from the bits, sign kept on zero."""
        c = code.to(tl.uint32)
        e = (c >> 1) & 3
        m = c & 1
        normal = ((e + 126) << 23) | (m << 22)  # 2^(e-1) * (1 + m/2)
        subnormal = m * (126 << 23)  # m * 0.5
        bits = tl.where(e == 0, subnormal, normal) | ((c & 8) << 28)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _mxfp4_dequant_kernel(
        p_ptr,
        s_ptr,
        o_ptr,
        rows,
        pcols,
        stride_p,
        stride_s,
        stride_o,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One BLOCK_M x BLOCK_K tile of packed bytes -> BLOCK_M x 2*BLOCK_K output values."""
        pid = tl.program_id(0)
        tiles_k = tl.cdiv(pcols, BLOCK_K)
        pid_m = pid // tiles_k
        pid_k = pid % tiles_k
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_in = offs_m < rows
        mask = row_in[:, None] & (offs_k < pcols)[None, :]
        rows64 = offs_m.to(tl.int64)
        b = tl.load(p_ptr + rows64[:, None] * stride_p + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        s_bits = tl.load(s_ptr + rows64[:, None] * stride_s + (offs_k // 16)[None, :], mask=mask, other=127)
        s = _e8m0_bits_to_f32(s_bits)
        lo = _e2m1_to_f32(b & 0xF) * s  # float32 product, exact
        hi = _e2m1_to_f32((b >> 4) & 0xF) * s
        out = tl.reshape(tl.join(lo, hi), (BLOCK_M, 2 * BLOCK_K)).to(o_ptr.dtype.element_ty)
        offs_c = pid_k * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
        o_mask = row_in[:, None] & (offs_c < 2 * pcols)[None, :]
        tl.store(o_ptr + rows64[:, None] * stride_o + offs_c[None, :], out, mask=o_mask)


def pick_config(rows: int, pcols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps): 8 KB of packed bytes per tile, narrower tiles for narrow tensors."""
    block_k = 128 if pcols > 64 else 64
    return 64 if block_k == 128 else 128, block_k, 8


def dequant_mxfp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize one MXFP4 tensor on the GPU, bit-identical to `reference_dequant_mxfp4`.

    packed: [rows, cols / 2] int8/uint8; scale: [rows, ceil(cols / 32)] float8_e8m0fnu or uint8 bits.
    The kernel turns scale byte 255 into NaN without a check (a check would wait on the GPU): callers
    refuse such scales first (`nan_scale`). out: optional [rows, cols] of out_dtype, rows contiguous.
    """
    device = launch_device("MXFP4 dequant", "reference_dequant_mxfp4", packed=packed, scale=scale)
    rows, cols = check_args(packed, scale, out_dtype)
    out = output_for(out, rows, cols, out_dtype, device)
    if rows == 0 or cols == 0:
        return out
    launch(packed, scale, out, pick_config(rows, cols // 2))
    return out


def launch(packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, config: tuple[int, int, int]) -> None:
    """Launch the kernel on checked tensors with an explicit (BLOCK_M, BLOCK_K, num_warps) (benchmarks sweep it)."""
    block_m, block_k, num_warps = config
    rows, pcols = packed.shape
    p = packed.view(torch.uint8)
    if p.stride(1) != 1:
        p = p.contiguous()
    s = _scale_bits(scale).contiguous()
    grid = (_cdiv(rows, block_m) * _cdiv(pcols, block_k),)
    with _device_guard(packed.device):
        _mxfp4_dequant_kernel[grid](
            p, s, out, rows, pcols, p.stride(0), s.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )
