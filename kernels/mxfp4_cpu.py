"""MXFP4 on the CPU in plain numpy, no torch: dequant (`mxfp4_dequant`'s reference, bit for bit) and the repack
to 128x128 block FP8 (`mxfp4_to_fp8`'s, bit for bit where it is exact).

Both are one table lookup per packed byte (two E2M1 codes, low nibble first), the tables built with the
references' arithmetic in float32 and rounded as they round:
- dequant: [256 scales x 256 bytes] -> the byte's two output values under that E8M0 scale (products of a
  2-bit significand and a power of two: exact in float32, then rounded to the output dtype);
- repack: [16 offsets x 256 bytes] -> the byte's two e4m3 codes at group offset d (e2m1 * 2^d, exact in e4m3
  for d >= -8; the row for lower offsets is read only for groups without a non-zero value).
Nothing runs on import.
"""

from __future__ import annotations

import functools

import numpy as np

from .fp8_numpy import BLOCK, E8M0_NAN, OUT_BITS, e4m3_codes, round_into, to_float32

GROUP = 32  # values per E8M0 scale (the one definition the MXFP4 kernels import)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E4M3_SHIFT = 6  # 6 * 2^6 = 384 <= 448
MIN_OFFSET = -8  # e2m1 * 2^-8 still on e4m3's grid (steps of 2^-9)
_PAIR = {2: np.uint32, 4: np.uint64}  # output itemsize -> integer of two values
_CHUNK_BYTES = 1 << 22  # packed bytes per step: bounds the index temporary


def _pairs() -> np.ndarray:
    """[256, 2] float32: the two e2m1 values of each packed byte (low nibble first)."""
    byte = np.arange(256)
    lut = np.array(E2M1_VALUES, np.float32)
    return np.stack((lut[byte & 0xF], lut[byte >> 4]), axis=-1)


@functools.cache
def pair_table(dtype: str) -> np.ndarray:
    """[256 * 256] integers, each the two `dtype` values byte `i & 255` decodes to under E8M0 scale `i >> 8`
    (entries of scale 255, NaN, are never read: such scales are refused first)."""
    s = to_float32(np.arange(256, dtype=np.uint8), "float8_e8m0fnu")
    with np.errstate(all="ignore"):
        prod = s[:, None, None] * _pairs()[None]
    bits = np.empty(prod.shape, OUT_BITS[dtype])
    round_into(prod, bits, dtype)
    return bits.reshape(-1).view(_PAIR[bits.itemsize])


def nan_scale_error(row: int, group: int) -> ValueError:
    """The refusal of a NaN E8M0 scale (byte 255) at [row, group], in words every MXFP4 kernel shares."""
    return ValueError(f"scale[{row}, {group}] is the E8M0 NaN code {E8M0_NAN}; the scale is damaged")


def _refuse_nan(scale: np.ndarray) -> None:
    bad = np.argwhere(scale == E8M0_NAN)
    if bad.size:
        raise nan_scale_error(int(bad[0, 0]), int(bad[0, 1]))


def dequant_rows(packed: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str, start: int, stop: int) -> None:
    """Rows [start, stop) of `reference_dequant_mxfp4(packed, scale, dtype)` into `out`: packed uint8 [rows,
    cols / 2], scale the E8M0 bytes [rows, ceil(cols / 32)], out the bits of `dtype` [rows, cols], contiguous."""
    _refuse_nan(scale[start:stop])
    table = pair_table(dtype)
    pairs = out.view(table.dtype)  # [rows, cols / 2]: one integer per packed byte
    pcols = packed.shape[1]
    full = pcols // (GROUP // 2)  # groups whose 16 bytes are all present
    step = max(1, _CHUNK_BYTES // max(pcols, 1))
    for r0 in range(start, stop, step):
        r1 = min(stop, r0 + step)
        s = scale[r0:r1].astype(np.int32) << 8
        if full:
            idx = packed[r0:r1, : full * 16].reshape(r1 - r0, full, 16).astype(np.int32)
            idx += s[:, :full, None]
            got = np.take(table, idx.reshape(r1 - r0, full * 16), mode="clip")
            pairs[r0:r1, : full * 16] = got
        if full * 16 < pcols:  # a partial last group: its bytes share the last scale
            pairs[r0:r1, full * 16 :] = table[packed[r0:r1, full * 16 :].astype(np.int32) + s[:, full : full + 1]]


@functools.cache
def pair_codes() -> np.ndarray:
    """[16 * 256] uint16: the two e4m3 codes (low byte: the even column) packed byte b becomes at group offset
    d, entry (d + 9) * 256 + b, for d = -9 .. 6; row -9 stands for every lower offset."""
    d = np.arange(MIN_OFFSET - 1, E4M3_SHIFT + 1, dtype=np.float32)
    codes = e4m3_codes(_pairs()[None] * np.exp2(d)[:, None, None])
    return np.ascontiguousarray(codes).view(np.uint16).reshape(-1)


def _exponents(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S [ceil(rows/128), ceil(groups/4)] block exponents, d [rows, groups] group offsets, d <= 6) of the E8M0
    group exponents k [rows, groups] (int32)."""
    rows, groups = k.shape
    per = BLOCK // GROUP
    br, bc = -(-rows // BLOCK), -(-groups // per)
    padded = np.full((br * BLOCK, bc * per), -1, np.int32)  # padding never wins the max
    padded[:rows, :groups] = k
    s = np.maximum(padded.reshape(br, BLOCK, bc, per).max(axis=(1, 3)) - E4M3_SHIFT, 0)
    return s, k - np.repeat(np.repeat(s, BLOCK, axis=0)[:rows], per, axis=1)[:, :groups]


def repack_rows(packed: np.ndarray, scale: np.ndarray, q_out: np.ndarray, s_out: np.ndarray, scale_dtype: str,
                start: int, stop: int) -> int:
    """Rows [start, stop) (start a multiple of 128) of the repack of `packed` (uint8 [rows, cols / 2]) under
    E8M0 `scale` bytes [rows, ceil(cols / 32)]: e4m3 codes into `q_out` (uint8 [rows, cols]), the block
    scales of their 128-row blocks into `s_out` (uint8 bytes of `scale_dtype`, float8_e8m0fnu or float32,
    [ceil(rows/128), ceil(cols/128) x width]). Returns the blocks that lose values (their codes are then
    unspecified: callers refuse the tensor)."""
    if start % BLOCK:
        raise ValueError(f"start {start} is not a multiple of {BLOCK}")
    if stop <= start:
        return 0
    p, k = packed[start:stop], scale[start:stop].astype(np.int32)
    _refuse_nan(scale[start:stop])
    rows, pcols = p.shape
    groups = k.shape[1]
    s, d = _exponents(k)
    nonzero = np.zeros((rows, groups * (GROUP // 2)), bool)
    nonzero[:, :pcols] = (p & 0x77) != 0
    bad = (d < MIN_OFFSET) & nonzero.reshape(rows, groups, GROUP // 2).any(axis=2)
    lossy = 0
    if bad.any():
        per = BLOCK // GROUP
        padded = np.zeros((s.shape[0] * BLOCK, s.shape[1] * per), bool)
        padded[:rows, :groups] = bad
        lossy = int(padded.reshape(s.shape[0], BLOCK, s.shape[1], per).any(axis=(1, 3)).sum())
    row = (np.maximum(d, MIN_OFFSET - 1) - (MIN_OFFSET - 1)) * 256  # [rows, groups]: the table's row
    idx = np.repeat(row, GROUP // 2, axis=1)[:, :pcols] + p
    q_out[start:stop] = pair_codes()[idx].view(np.uint8).reshape(rows, 2 * pcols)
    if scale_dtype == "float8_e8m0fnu":  # 2^(S - 127) is E8M0 byte S
        stored = s.astype(np.uint8)
    elif scale_dtype == "float32":
        bits = np.where(s == 0, 0x00400000, s.astype(np.uint32) << 23).astype(np.uint32)
        stored = bits.view(np.uint8).reshape(s.shape[0], -1)
    else:
        raise ValueError(f"scale_dtype must be float8_e8m0fnu or float32, got {scale_dtype}")
    s_out[start // BLOCK : start // BLOCK + s.shape[0]] = stored
    return lossy
