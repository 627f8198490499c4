"""MXFP4 -> block FP8 repack: dequant(source) == dequant(repacked) bit for bit where lossless; losses counted."""

from __future__ import annotations

import pytest
import torch

from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8, repack_rows

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


@pytest.mark.parametrize("shape", [(300, 500), (129, 8), (1, 16), (128, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32])
def test_row_ranges_equal_the_whole_tensor(shape, scale_dtype) -> None:
    """repack_rows over 128-row ranges (the CPU pool's tasks) writes what one whole-tensor repack makes."""
    rows, pcols = shape
    gen = torch.Generator().manual_seed(rows * 7 + pcols)
    packed = torch.randint(0, 256, (rows, pcols), dtype=torch.uint8, generator=gen)
    scale = torch.randint(100, 140, (rows, -(-2 * pcols // 32)), dtype=torch.uint8, generator=gen)  # some lossy
    q, s, lossy = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
    q_out = torch.empty((rows, 2 * pcols), dtype=torch.uint8)
    s_out = torch.empty(s.shape, dtype=scale_dtype)
    got = sum(repack_rows(packed, scale, q_out, s_out, r0, min(r0 + 128, rows)) for r0 in range(0, rows, 128))
    assert got == lossy
    assert torch.equal(q_out, q.view(torch.uint8)) and torch.equal(s_out.view(torch.uint8), s.view(torch.uint8))


def test_row_range_must_start_on_a_block() -> None:
    with pytest.raises(ValueError, match="multiple of 128"):
        repack_rows(torch.zeros((256, 8), dtype=torch.uint8), torch.zeros((256, 1), dtype=torch.uint8),
                    torch.empty((256, 16), dtype=torch.uint8), torch.empty((2, 1), dtype=torch.float32), 64, 256)


def test_table_path_every_byte_and_offset(monkeypatch) -> None:
    """The CPU table path alone (the reference is not called) on every packed byte at every exact offset
    d = -8 .. 6, both scale dtypes: the reference's bytes."""
    import dsv3conv.kernels.mxfp4_to_fp8 as m

    rows, pcols = 256, 128  # 8 groups per row, 2 x 2 blocks
    packed = ((torch.arange(rows)[:, None] * pcols + torch.arange(pcols)[None, :]) % 256).to(torch.uint8)
    k = 116 + (torch.arange(rows)[:, None] + torch.arange(8)[None, :]) % 15  # 116 .. 130 in every block
    scale = k.to(torch.uint8)
    for scale_dtype in (torch.float8_e8m0fnu, torch.float32):
        q, s, lossy = repack_mxfp4_to_fp8(packed, scale, scale_dtype)
        assert lossy == 0
        q_out = torch.empty((rows, 2 * pcols), dtype=torch.uint8)
        s_out = torch.empty(s.shape, dtype=scale_dtype)
        with monkeypatch.context() as patch:
            patch.setattr(m, "repack_mxfp4_to_fp8", None)  # the table path must not need it
            assert m.repack_rows(packed, scale, q_out, s_out, 0, 128) + m.repack_rows(packed, scale, q_out, s_out, 128, 256) == 0
        assert torch.equal(q_out, q.view(torch.uint8)) and torch.equal(s_out.view(torch.uint8), s.view(torch.uint8))
