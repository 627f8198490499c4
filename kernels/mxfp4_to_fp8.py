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

import torch

from .mxfp4_cpu import BLOCK, E2M1_VALUES, E4M3_SHIFT, GROUP, MIN_OFFSET
from .mxfp4_dequant import check_args, refuse_nan_scale

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
