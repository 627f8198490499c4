"""MXFP4 -> block FP8 repack: dequant(source) == dequant(repacked) bit for bit where lossless; losses counted.
The reference (`repack_mxfp4_to_fp8`, torch: the GPU path's) and the CPU backend's numpy kernel (`mxfp4_cpu`)."""

from __future__ import annotations

import pytest
import torch

from dsv3conv.kernels import mxfp4_cpu
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8

_INT = {2: torch.int16, 4: torch.int32}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(_INT[a.itemsize]), b.view(_INT[b.itemsize]))


@pytest.mark.parametrize("shape", [(128, 64), (256, 128), (129, 100), (1, 16), (300, 1000)])
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_round_trip_exact_within_14_binades(shape, scale_dtype) -> None:
    rows, pcols = shape
    gen = torch.Generator().manual_seed(rows + pcols)
    packed = torch.randint(-128, 128, (rows, pcols), dtype=torch.int8, generator=gen)
    scale = torch.randint(110, 125, (rows, -(-2 * pcols // 32)), dtype=torch.uint8, generator=gen)  # 14 apart
    q, s, lossy = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
    assert lossy == 0
    assert q.dtype == torch.float8_e4m3fn and q.shape == (rows, 2 * pcols)
    assert s.dtype == scale_dtype and s.shape == (-(-rows // 128), -(-2 * pcols // 128))
    for out_dtype in (torch.bfloat16, torch.float32, torch.float16):
        want = reference_dequant_mxfp4(packed, scale, out_dtype)
        assert _same_bits(reference_dequant(q, s, out_dtype), want), f"{shape} -> {out_dtype}"


def test_extreme_scales_and_zero_signs() -> None:
    """Scales at both ends of E8M0 (0 and 254), -0.0 codes: exact; block scale never below 2^-127."""
    packed = torch.tensor([[0x18, 0x81], [0x77, 0x00]], dtype=torch.uint8).repeat(1, 8)  # [2, 16]
    for k in (0, 3, 127, 254):
        scale = torch.full((2, 1), k, dtype=torch.uint8)
        q, s, lossy = repack_mxfp4_to_fp8(packed, scale)
        assert lossy == 0
        assert _same_bits(reference_dequant(q, s, torch.float32), reference_dequant_mxfp4(packed, scale, torch.float32))


def test_losses_counted_per_block() -> None:
    packed = torch.full((256, 64), 0x11, dtype=torch.uint8)  # 0.5 everywhere, two 128x128 blocks
    scale = torch.full((256, 4), 120, dtype=torch.uint8)
    scale[5, 2] = 120 + 15  # block (0, 0): a group 15 binades above another -> the smallest lose values
    q, s, lossy = repack_mxfp4_to_fp8(packed, scale)
    assert lossy == 1
    assert not _same_bits(reference_dequant(q, s, torch.float32), reference_dequant_mxfp4(packed, scale, torch.float32))
    scale[5, 2] = 120 + 14  # 14 binades: still exact
    assert repack_mxfp4_to_fp8(packed, scale)[2] == 0


def test_nan_scale_refused() -> None:
    scale = torch.full((1, 1), 255, dtype=torch.uint8)
    with pytest.raises(ValueError, match="NaN code 255"):
        repack_mxfp4_to_fp8(torch.zeros((1, 16), dtype=torch.int8), scale)


def cpu_repack(packed: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype, ranges=None):
    """`mxfp4_cpu.repack_rows` (the CPU backend's kernel) over 128-row ranges as the pool cuts them: (e4m3 codes
    as uint8 [rows, cols], block scales of `scale_dtype`, lossy blocks)."""
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    q = torch.full((rows, cols), 0x7F, dtype=torch.uint8)  # e4m3 NaN where nothing is written
    s = torch.full((-(-rows // 128), -(-cols // 128)), 255, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    s = s.to(scale_dtype) if scale_dtype != torch.float8_e8m0fnu else s
    ranges = ranges or [(r0, min(r0 + 128, rows)) for r0 in range(0, rows, 128)]
    lossy = sum(mxfp4_cpu.repack_rows(packed.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy(), q.numpy(),
                                      s.view(torch.uint8).numpy(), str(scale_dtype).removeprefix("torch."), r0, r1)
                for r0, r1 in ranges)
    return q, s, lossy


def _lossy_blocks(packed: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] bool: the blocks whose repack loses values (each judged by the reference
    on that block alone: a block's exponent depends on its own groups only)."""
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    lossy = torch.zeros((-(-rows // 128), -(-cols // 128)), dtype=torch.bool)
    for i in range(lossy.shape[0]):
        for j in range(lossy.shape[1]):
            block = packed[i * 128 : (i + 1) * 128, j * 64 : (j + 1) * 64], scale[i * 128 : (i + 1) * 128, j * 4 : (j + 1) * 4]
            lossy[i, j] = repack_mxfp4_to_fp8(*block, scale_dtype)[2] > 0
    return lossy


@pytest.mark.parametrize("shape", [(300, 500), (129, 8), (1, 16), (128, 64), (1, 1), (129, 257)])
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_cpu_kernel_equals_the_reference(shape, scale_dtype) -> None:
    """repack_rows over 128-row ranges (the CPU pool's tasks): the reference's block scales and lossy count, and
    its e4m3 codes in every block that keeps its values (the codes of a lossy block are unspecified)."""
    rows, pcols = shape
    gen = torch.Generator().manual_seed(rows * 7 + pcols)
    packed = torch.randint(0, 256, (rows, pcols), dtype=torch.uint8, generator=gen)
    scale = torch.randint(110, 125, (rows, -(-2 * pcols // 32)), dtype=torch.uint8, generator=gen)  # 14 apart
    many = rows > 128 or pcols > 64
    if many:
        scale[0, 0] = 140  # block (0, 0) loses values, the others keep them
    q_ref, s_ref, lossy_ref = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
    q, s, lossy = cpu_repack(packed, scale, scale_dtype)
    assert lossy == lossy_ref and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8)), (lossy, lossy_ref)
    exact = ~_lossy_blocks(packed, scale, scale_dtype)
    assert int((~exact).sum()) == lossy_ref == many and bool(exact.any()), (lossy_ref, exact)
    keep = exact.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, : 2 * pcols]
    bad = (q != q_ref.view(torch.uint8)) & keep
    assert not bool(bad.any()), f"{shape}: {int(bad.sum())} codes differ in exact blocks, first at {bad.nonzero()[0].tolist()}"


def test_cpu_kernel_row_range_must_start_on_a_block() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        cpu_repack(torch.zeros((256, 8), dtype=torch.uint8), torch.zeros((256, 1), dtype=torch.uint8), torch.float32,
                   ranges=[(64, 256)])


def test_cpu_kernel_nan_scale_refused() -> None:
    scale = torch.full((130, 1), 127, dtype=torch.uint8)
    scale[129, 0] = 255
    with pytest.raises(ValueError, match=r"scale\[1, 0\] is the E8M0 NaN code 255"):  # row 1 of the range
        cpu_repack(torch.zeros((130, 8), dtype=torch.uint8), scale, torch.float8_e8m0fnu)


def test_cpu_kernel_every_byte_and_offset() -> None:
    """Every packed byte at every exact offset d = -8 .. 6 (E8M0 exponents 116 .. 130 in every block), both scale
    dtypes: the reference's bytes."""
    rows, pcols = 256, 128  # 8 groups per row, 2 x 2 blocks
    packed = ((torch.arange(rows)[:, None] * pcols + torch.arange(pcols)[None, :]) % 256).to(torch.uint8)
    k = 116 + (torch.arange(rows)[:, None] + torch.arange(8)[None, :]) % 15  # 116 .. 130 in every block
    scale = k.to(torch.uint8)
    for scale_dtype in (torch.float8_e8m0fnu, torch.float32):
        q_ref, s_ref, lossy_ref = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
        q, s, lossy = cpu_repack(packed, scale, scale_dtype)
        assert lossy == lossy_ref == 0
        assert torch.equal(q, q_ref.view(torch.uint8)) and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))
