"""FP8 (e4m3) 128x128 block dequantization: plain-torch reference, Triton kernel and launchers.

out[i, j] = round_to_nearest_even(float32(w[i, j]) * float32(scale_inv[i // B, j // B]))
Edge blocks may be partial (rows or columns not a multiple of B). Nothing runs on import.

Two launchers share one tile routine:
- `dequant`: one tensor, a 1-D grid of BLOCK_M x BLOCK_N tiles.
- `dequant_segments`: many tensors laid out in flat byte buffers, converted in one grouped launch;
  a small per-tile table (segment id of each tile) is built on the device with torch.
A tile never crosses a 128-row scale block (BLOCK_M divides 128), so each tile reads one row of scales.
`decode_bits=True` loads raw bytes and decodes e4m3 arithmetically, for GPUs without a Triton FP8 type.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .fp8_numpy import BLOCK as BLOCK_SIZE
from .launch import (  # noqa: F401  (re-exported: benchmarks and tests reach them through this module)
    HAS_TRITON,
    SCALE_KIND,
    SCALE_VIEW,
    Config,
    _cdiv,
    _device_guard,
    _num_sms,
    check_out_dtype,
    launch_device,
    output_for,
    pdl_mode,
    pick_config,
    pick_segments_config,
    resolve_decode_bits,
    tl,
    triton,
)

# Element-count limit of one tile's int32 in-tile offsets (BLOCK_M * row stride).
_INT32_MAX = 2**31 - 1


def reference_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Plain-torch block dequant: the semantics every other implementation must match bit for bit."""
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block_size, dim=0)[:rows].repeat_interleave(block_size, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Bit-level decoders. They also keep the compiler from narrowing the float32 multiply: given
    # fptrunc(fmul(fpext(half), fpext(bfloat))) one LLVM (Triton 3.6, sm90) multiplied in half precision
    # and lost bf16 scales below 2^-14, so every scale reaches the multiply as an opaque float32.

    @triton.jit
    def _e4m3_bits_to_f32(bits):
        """Exact float32 of raw e4m3fn bytes: sign, 4-bit exponent (bias 7), 3-bit mantissa, no inf."""
        b = bits.to(tl.uint32)
        mag = b & 0x7F
        exp = mag >> 3
        man = mag & 0x7
        # Normal: 2^(e-7) * (1 + m/8) -> float32 exponent field e - 7 + 127, mantissa m in the top 3 bits.
        normal = ((exp + 120) << 23) | (man << 20)
        subnormal = (man.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # m * 2^-9, exact
        val = tl.where(exp == 0, subnormal, normal)
        val = tl.where(mag == 0x7F, 0x7FF00000, val)  # 0x7F / 0xFF are NaN (torch's CPU bits)
        val = val | ((b & 0x80) << 24)  # sign bit: -0.0 stays -0.0
        return val.to(tl.float32, bitcast=True)

    @triton.jit
    def _e8m0_bits_to_f32(bits):
        """Exact float32 of float8_e8m0fnu bytes: 2^(b-127); 0 -> 2^-127 (subnormal), 255 -> NaN."""
        b = bits.to(tl.int32)
        val = tl.where(b == 0, 0x00400000, b << 23)
        val = tl.where(b == 255, 0x7F800001, val)
        return val.to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_bits_to_f32(bits):
        """Exact float32 of bfloat16 bits (loaded as int16): the top half of a float32."""
        b = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
        return (b << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _f16_bits_to_f32(bits):
        """Exact float32 of float16 bits (loaded as int16): subnormals, inf and NaN payloads included."""
        b = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
        exp = (b >> 10) & 0x1F
        man = b & 0x3FF
        normal = ((exp + 112) << 23) | (man << 13)
        subnormal = (man.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)  # m * 2^-24
        special = 0x7F800000 | (man << 13)
        val = tl.where(exp == 0, subnormal, tl.where(exp == 31, special, normal))
        val = val | ((b & 0x8000) << 16)
        return val.to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_to_f32(s, SCALE_KIND: tl.constexpr):
        """SCALE_KIND: 0 float32, 1 bfloat16 bits, 2 float16 bits, 3 e8m0 bits."""
        if SCALE_KIND == 1:
            return _bf16_bits_to_f32(s)
        elif SCALE_KIND == 2:
            return _f16_bits_to_f32(s)
        elif SCALE_KIND == 3:
            return _e8m0_bits_to_f32(s)
        else:
            return s.to(tl.float32)

    @triton.jit
    def _dequant_tile(
        w_ptr,
        s_ptr,
        o_ptr,
        rows,
        cols,
        stride_w,
        stride_o,
        stride_s,
        pid_m,
        pid_n,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DECODE_BITS: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        VEC: tl.constexpr,
        STREAM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Dequantize one BLOCK_M x BLOCK_N tile; the tile lies inside one 128-row scale block.

        VEC > 0 caps the contiguity the compiler sees at VEC elements (true, weaker than the truth) so
        loads take the stores' register layout (no shared-memory conversion between them); VEC = 0 lets
        the compiler pick. STREAM marks weight loads evict-first and output stores streaming (.cs).
        PDL > 0 (launched with programmatic dependent launch, sm90+): the tile's address arithmetic overlaps
        the previous kernel's tail; memory is touched only after `gdc_wait` (the previous grid complete and
        its writes visible). The next kernel may start launching once this tile has its data (PDL 1), or
        as soon as this tile starts (PDL 2)."""
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        if VEC > 0:
            offs_n = tl.max_contiguous(offs_n, VEC)
        cols_in = (col0 + offs_n) < cols
        mask = ((row0 + offs_m) < rows)[:, None] & cols_in[None, :]
        # 64-bit scalar tile bases; in-tile offsets stay int32 (BLOCK_M * stride < 2^31, checked on the host).
        w_tile = w_ptr + row0.to(tl.int64) * stride_w + col0
        o_tile = o_ptr + row0.to(tl.int64) * stride_o + col0
        s_row = s_ptr + (row0 // 128).to(tl.int64) * stride_s

        w_ptrs = w_tile + offs_m[:, None] * stride_w + offs_n[None, :]
        if PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        if PDL > 0:
            tl.extra.cuda.gdc_wait()
        if STREAM:
            w = tl.load(w_ptrs, mask=mask, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=mask)
        if DECODE_BITS:
            w = _e4m3_bits_to_f32(w)
        else:
            w = w.to(tl.float32)
        s = _scale_to_f32(tl.load(s_row + (col0 + offs_n) // 128, mask=cols_in), SCALE_KIND)
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
        out = (w * s[None, :]).to(o_ptr.dtype.element_ty)  # float32 product, round to nearest even
        o_ptrs = o_tile + offs_m[:, None] * stride_o + offs_n[None, :]
        if STREAM:
            tl.store(o_ptrs, out, mask=mask, cache_modifier=".cs")
        else:
            tl.store(o_ptrs, out, mask=mask)

    @triton.jit(do_not_specialize=["rows"])
    def _dequant_kernel(
        w_ptr,
        s_ptr,
        o_ptr,
        rows,
        cols,
        stride_w,
        stride_o,
        stride_s,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DECODE_BITS: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        VEC: tl.constexpr,
        STREAM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(cols, BLOCK_N)
        pid_m = pid // tiles_n
        pid_n = pid % tiles_n
        _dequant_tile(
            w_ptr, s_ptr, o_ptr, rows, cols, stride_w, stride_o, stride_s, pid_m, pid_n,
            BLOCK_M, BLOCK_N, DECODE_BITS, SCALE_KIND, VEC, STREAM, PDL,
        )  # fmt: skip

    @triton.jit
    def _dequant_segments_kernel(
        src_ptr,
        dst_ptr,
        scale_ptr,
        seg_ptr,
        tile_seg_ptr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DECODE_BITS: tl.constexpr,
        ALIGNED: tl.constexpr,
        DST_ALIGN: tl.constexpr,
        VEC: tl.constexpr,
        STREAM: tl.constexpr,
    ):
        """One program per tile of any segment; seg_ptr rows are int64
        (src_off, dst_off_elems, scale_off, rows, cols, tiles_n, first_tile, n_tiles)."""
        pid = tl.program_id(0)
        seg = tl.load(tile_seg_ptr + pid)
        rec = seg_ptr + seg.to(tl.int64) * 8
        src_off = tl.load(rec)
        dst_off = tl.load(rec + 1)
        scale_off = tl.load(rec + 2)
        rows = tl.load(rec + 3).to(tl.int32)
        cols = tl.load(rec + 4).to(tl.int32)
        tiles_n = tl.load(rec + 5).to(tl.int32)
        first_tile = tl.load(rec + 6)
        if ALIGNED:
            # The host checked these; the hints let loads and stores use 16-byte vectors.
            src_off = tl.multiple_of(src_off, 16)
            dst_off = tl.multiple_of(dst_off, DST_ALIGN)
            cols = tl.multiple_of(cols, 16)
        t = (pid - first_tile).to(tl.int32)
        pid_m = t // tiles_n
        pid_n = t % tiles_n
        _dequant_tile(
            src_ptr + src_off, scale_ptr + scale_off, dst_ptr + dst_off, rows, cols, cols, cols,
            tl.cdiv(cols, 128), pid_m, pid_n, BLOCK_M, BLOCK_N, DECODE_BITS, 0, VEC, STREAM, 0,
        )  # fmt: skip  (no PDL: the segment table is read before any wait, written by the launch before)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _vec(vec: int, out_dtype: torch.dtype) -> int:
    return 16 // out_dtype.itemsize if vec < 0 else vec


def _launch_dequant(
    weight: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    decode_bits: bool,
    config: Config,
) -> None:
    """Launch `_dequant_kernel` on validated tensors with an explicit config."""
    block_m, block_n, num_warps, vec, stream = config
    if BLOCK_SIZE % block_m != 0:
        raise ValueError(f"BLOCK_M={block_m} must divide the scale block {BLOCK_SIZE}")
    rows, cols = weight.shape
    if max(weight.stride(0), out.stride(0)) * block_m > _INT32_MAX:
        raise ValueError(f"row stride {max(weight.stride(0), out.stride(0))} too large for BLOCK_M={block_m}")
    w_dtype = torch.uint8 if decode_bits else torch.float8_e4m3fn
    w = weight if weight.dtype == w_dtype else weight.view(w_dtype)
    scale_kind = SCALE_KIND[scale.dtype]
    s = scale if scale_kind == 0 else scale.view(SCALE_VIEW[scale_kind])
    grid = (_cdiv(rows, block_m) * _cdiv(cols, block_n),)
    mode = pdl_mode(weight.device)
    pdl = {"PDL": mode, "launch_pdl": True} if mode else {"PDL": 0}
    with _device_guard(weight.device):
        _dequant_kernel[grid](
            w, s, out, rows, cols, w.stride(0), out.stride(0), s.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, DECODE_BITS=decode_bits, SCALE_KIND=scale_kind,
            VEC=_vec(vec, out.dtype), STREAM=stream, num_warps=num_warps, **pdl,
        )  # fmt: skip


def dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    decode_bits: bool | None = None,
) -> torch.Tensor:
    """Dequantize one FP8 block-quantized weight on the GPU, bit-identical to `reference_dequant`.

    weight: [M, N] float8_e4m3fn, or uint8 holding raw e4m3 bits. scale_inv: [ceil(M/128), ceil(N/128)]
    float32/bfloat16/float16/float8_e8m0fnu. out: optional [M, N] tensor of out_dtype to write into.
    decode_bits: True decodes e4m3 from raw bytes (pre-sm89 GPUs); None picks by compute capability.
    """
    device = launch_device("dequant", "reference_dequant", weight=weight, scale_inv=scale_inv)
    if weight.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"weight must be float8_e4m3fn or uint8 (raw e4m3 bits), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [M, N], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    want = (_cdiv(rows, BLOCK_SIZE), _cdiv(cols, BLOCK_SIZE))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(weight.shape)}: "
            f"expected {want} (ceil of each dim / {BLOCK_SIZE})"
        )
    if scale_inv.dtype not in SCALE_KIND:
        raise ValueError(f"scale_inv dtype {scale_inv.dtype} unsupported: use float32/bfloat16/float16/e8m0")
    check_out_dtype(out_dtype)
    out = output_for(out, rows, cols, out_dtype, device)
    if rows == 0 or cols == 0:
        return out
    if cols > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    scale = scale_inv.contiguous()
    decode = resolve_decode_bits(device, decode_bits)
    _launch_dequant(weight, scale, out, decode, pick_config(rows, cols, _num_sms(device)))
    return out


def _segment_table(
    segments: Sequence[tuple[int, int, int, int, int]],
    src_bytes: int,
    dst_bytes: int,
    scale_elems: int,
    elem_size: int,
):
    """Validate segments against the buffers; return them as an int64 [n, 5] numpy array.

    numpy, not torch: torch's small CPU ops can wait on its thread pool (ms each on a busy host)."""
    import numpy as np

    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 5)
    src_off, dst_off, scale_off, rows, cols = seg.T
    elems = rows * cols
    n_scales = (rows + BLOCK_SIZE - 1) // BLOCK_SIZE * ((cols + BLOCK_SIZE - 1) // BLOCK_SIZE)
    checks = (
        ((seg < 0).any(1), "has a negative field"),
        ((rows > _INT32_MAX) | (cols * 128 > _INT32_MAX), "is too large (rows < 2^31, cols * 128 < 2^31)"),
        (src_off + elems > src_bytes, f"reads past the end of src ({src_bytes} bytes)"),
        (dst_off % elem_size != 0, f"has a dst offset that is not a multiple of {elem_size}"),
        (dst_off + elems * elem_size > dst_bytes, f"writes past the end of dst ({dst_bytes} bytes)"),
        (scale_off + n_scales > scale_elems, f"reads past the end of scales ({scale_elems} elements)"),
    )
    for bad, what in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"segment {i} (src_off, dst_off, scale_off, rows, cols)={tuple(seg[i].tolist())} {what}"
            )
    return seg


def dequant_segments(
    src: torch.Tensor,
    dst: torch.Tensor,
    scales: torch.Tensor,
    segments: Sequence[tuple[int, int, int, int, int]],
    out_dtype: torch.dtype,
    decode_bits: bool | None = None,
) -> None:
    """Dequantize many FP8 matrices held in flat byte buffers with one grouped launch.

    Each segment (src_byte_offset, dst_byte_offset, scale_elem_offset, rows, cols) is an e4m3 matrix
    [rows, cols] row-major at src[src_byte_offset:], its float32 scales [ceil(rows/128), ceil(cols/128)]
    row-major at scales[scale_elem_offset:], and writes [rows, cols] of out_dtype at dst[dst_byte_offset:].
    Segments whose offsets and columns allow 16-byte vectors run in one launch, any others in a second.
    """
    device = launch_device("dequant", "reference_dequant", src=src, dst=dst, scales=scales)
    import numpy as np  # host-side segment metadata (see _segment_table)

    for name, t, dtype in (
        ("src", src, torch.uint8),
        ("dst", dst, torch.uint8),
        ("scales", scales, torch.float32),
    ):
        if t.dtype != dtype or t.dim() != 1 or (t.numel() > 1 and t.stride(0) != 1):
            raise ValueError(
                f"{name} must be a contiguous 1-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}"
            )
    check_out_dtype(out_dtype)
    elem_size = out_dtype.itemsize
    seg = _segment_table(segments, src.numel(), dst.numel(), scales.numel(), elem_size)
    seg = seg[(seg[:, 3] > 0) & (seg[:, 4] > 0)]
    if seg.shape[0] == 0:
        return
    if dst.storage_offset() % elem_size != 0:
        raise ValueError(f"dst's storage offset {dst.storage_offset()} is not a multiple of {elem_size}")
    decode = resolve_decode_bits(device, decode_bits)
    src_t = src if decode else src.view(torch.float8_e4m3fn)
    dst_t = dst[: dst.numel() - dst.numel() % elem_size].view(out_dtype)

    src_off, dst_off, _, _, cols = seg.T
    aligned = (
        (src_off % 16 == 0) & (dst_off % 16 == 0) & (cols % 16 == 0)
        & (src.data_ptr() % 16 == 0) & (dst.data_ptr() % 16 == 0)
    )  # fmt: skip
    block_m, block_n, num_warps, vec, stream = pick_segments_config(
        int((seg[:, 3] * seg[:, 4]).sum()), _num_sms(device)
    )
    for flag in (True, False):
        part = seg[aligned == flag]
        if part.shape[0] == 0:
            continue
        rows_p, cols_p = part[:, 3], part[:, 4]
        tiles_n = (cols_p + block_n - 1) // block_n
        counts = (rows_p + block_m - 1) // block_m * tiles_n
        table_np = np.zeros((part.shape[0], 8), dtype=np.int64)
        table_np[:, 0] = part[:, 0]
        table_np[:, 1] = part[:, 1] // elem_size
        table_np[:, 2:5] = part[:, 2:5]
        table_np[:, 5] = tiles_n
        table_np[:, 6] = counts.cumsum() - counts
        table_np[:, 7] = counts
        table = torch.from_numpy(table_np)
        total = int(counts.sum())
        if device.type == "cuda":
            # Pinned + non_blocking: a pageable copy would make the host wait for the GPU to go idle.
            table_d = table.pin_memory().to(device, non_blocking=True)
        else:
            table_d = table
        tile_seg = torch.repeat_interleave(
            torch.arange(part.shape[0], dtype=torch.int32, device=device), table_d[:, 7], output_size=total
        )
        with _device_guard(device):
            _dequant_segments_kernel[(total,)](
                src_t, dst_t, scales, table_d, tile_seg,
                BLOCK_M=block_m, BLOCK_N=block_n, DECODE_BITS=decode, ALIGNED=flag,
                DST_ALIGN=16 // elem_size, VEC=_vec(vec, out_dtype), STREAM=stream, num_warps=num_warps,
            )  # fmt: skip
