"""MXFP4 -> 128x128 block FP8 (e4m3) repack, in plain torch (runs on the CPU or a CUDA device as it is).

Per 128x128 block of the unpacked [rows, cols] weight, the 4 x 128 E8M0 group exponents k (2^(k - 127))
give the block exponent S = max(k_max - 6, 0) and each group the offset d = k - S <= 6; the e4m3 value is
e2m1 * 2^d and the block scale 2^(S - 127). 6 * 2^6 = 384 fits e4m3 (largest 448); e2m1 * 2^d is exact in
e4m3 while d >= -8 (its smallest step 2^-9), so the repack is lossless exactly when no group of a block
holding a non-zero value sits more than 14 binades under the block's largest. Otherwise the lost blocks
are counted and the caller refuses or reports. dequant(repacked) == dequant(source), bit for bit, where
lossless; zeros keep their sign.
"""

from __future__ import annotations

import functools

import torch

from .mxfp4_dequant import E2M1_VALUES, GROUP, check_args, refuse_nan_scale

BLOCK = 128
E4M3_SHIFT = 6  # 6 * 2^6 = 384 <= 448
MIN_OFFSET = -8  # e2m1 * 2^-8 still on e4m3's grid (steps of 2^-9)
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32)


def repack_mxfp4_to_fp8(
    packed: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype = torch.float8_e8m0fnu
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(e4m3 weight [rows, cols], block scales [ceil(rows/128), ceil(cols/128)] of `scale_dtype`, lossy blocks).

    `lossy blocks`: how many 128x128 blocks lose values (0: the repack is exact). E8M0 NaN scales are refused.
    """
    rows, cols = check_args(packed, scale, torch.float32)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float8_e8m0fnu or float32, got {scale_dtype}")
    refuse_nan_scale(scale)
    dev = packed.device
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(rows, cols)
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=dev)[codes]
    k = scale.view(torch.uint8).to(torch.int32)  # [rows, groups]
    s, d = _exponents(k, rows, cols)
    offsets = torch.ldexp(torch.ones((), device=dev), d.to(torch.float32))
    q = (values * offsets.repeat_interleave(GROUP, 1)[:, :cols]).to(torch.float8_e4m3fn)
    groups = k.shape[1]
    has_value = torch.nn.functional.pad(values != 0, (0, groups * GROUP - cols)).view(rows, groups, GROUP).any(2)
    return q, _block_scales(s, scale_dtype), _lossy_blocks((d < MIN_OFFSET) & has_value, s.shape)


def _exponents(k: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [ceil(rows/128), ceil(cols/128)] block exponents, d [rows, groups] group offsets, d <= 6) from the
    E8M0 group exponents k [rows, groups] (int32)."""
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    per = BLOCK // GROUP
    padded = torch.full((br * BLOCK, bc * per), -1, dtype=torch.int32, device=k.device)
    padded[:rows, : k.shape[1]] = k  # padding (-1) never wins the max
    kmax = padded.view(br, BLOCK, bc, per).amax(dim=(1, 3))
    s = (kmax - E4M3_SHIFT).clamp(min=0)
    s_groups = s.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(per, 1)[:, : k.shape[1]]
    return s, k - s_groups


def _lossy_blocks(bad_groups: torch.Tensor, blocks: tuple[int, int]) -> int:
    """The 128x128 blocks holding a group that loses values."""
    br, bc = blocks
    per = BLOCK // GROUP
    bad = torch.zeros((br * BLOCK, bc * per), dtype=torch.bool, device=bad_groups.device)
    bad[: bad_groups.shape[0], : bad_groups.shape[1]] = bad_groups
    return int(bad.view(br, BLOCK, bc, per).any(dim=3).any(dim=1).sum())


def _block_scales(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    return torch.ldexp(torch.ones((), device=s.device), (s - 127).to(torch.float32)).to(scale_dtype)


def repack_rows(packed: torch.Tensor, scale: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor,
                start: int, stop: int) -> int:
    """Rows [start, stop) of `repack_mxfp4_to_fp8(packed, scale, s_out.dtype)`, written into the same rows of
    `q_out` (uint8 or e4m3 [rows, cols]) and their 128-row blocks of `s_out`; returns the lossy blocks.

    The CPU path: one table lookup per packed byte (`_pair_codes`), equal to the reference bit for bit where
    the rows are exact; rows with a lossy block (or a NaN scale) go through the reference itself.
    `start` must be a multiple of 128: the block exponents of whole blocks equal those of the whole tensor."""
    if start % BLOCK:
        raise ValueError(f"start {start} is not a multiple of {BLOCK}")
    p, sc = packed[start:stop].view(torch.uint8), scale[start:stop]
    check_args(p, sc, torch.float32)
    k = sc.view(torch.uint8).to(torch.int32)
    rows, pcols = p.shape
    groups = k.shape[1]
    s, d = _exponents(k, rows, 2 * pcols)
    nonzero = torch.nn.functional.pad((p & 0x77) != 0, (0, groups * (GROUP // 2) - pcols))
    bad = (d < MIN_OFFSET) & nonzero.view(rows, groups, GROUP // 2).any(2)
    if bool(bad.any()) or bool((k == 255).any()):
        q, blocks, lossy = repack_mxfp4_to_fp8(p, sc, s_out.dtype)  # refuses a NaN scale
    else:
        row = (d.clamp(min=MIN_OFFSET - 1) - (MIN_OFFSET - 1)) * 256  # [rows, groups]: the table's row
        idx = row.repeat_interleave(GROUP // 2, dim=1)[:, :pcols] + p
        q = _pair_codes().index_select(0, idx.reshape(-1)).view(torch.uint8).view(rows, 2 * pcols)
        blocks, lossy = _block_scales(s, s_out.dtype), 0
    q_out[start:stop].copy_(q.view(torch.uint8).view(q_out.dtype))
    s_out[start // BLOCK : start // BLOCK + blocks.shape[0]].copy_(blocks)
    return lossy


@functools.cache
def _pair_codes() -> torch.Tensor:
    """[16 * 256] int16: the two e4m3 codes (low byte: the even column) packed byte b becomes at group offset d,
    entry (d + 9) * 256 + b, for d = -9 .. 6; row -9 stands for every lower offset and is read only for bytes
    of groups without a non-zero value (zeros keep their sign). Built with the reference's arithmetic."""
    d = torch.arange(MIN_OFFSET - 1, E4M3_SHIFT + 1, dtype=torch.float32)
    byte = torch.arange(256, dtype=torch.int64)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    pairs = torch.stack((lut[byte & 0xF], lut[byte >> 4]), dim=-1)  # [256, 2]
    codes = (pairs[None] * torch.exp2(d)[:, None, None]).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.contiguous().view(torch.int16).reshape(-1)
