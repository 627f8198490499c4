"""Per-tensor results of the data scan: values that are not numbers (or not positive scales), and bytes that
differ from what the planned operation makes of the source."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dsv3conv.checkpoint import TensorInfo
from dsv3conv.dtypes import TORCH_NAMES
from dsv3conv.kernels.fp8_numpy import to_float32
from dsv3conv.safetensors_format import DTYPE_SIZES

_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# Bits that are all ones exactly when an IEEE value is Inf or NaN.
_EXPONENT_MASKS = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000, "F64": 0x7FF0000000000000}


@dataclass
class TensorResult:
    """What the scan found in one tensor of CKPT (element indices are flat, within the tensor)."""

    bad_values: int = 0
    bad_first: int = -1
    bad_kind: str = ""
    differ: int = 0  # elements (bytes for a copied tensor) unlike the planned output
    diff_first: int = -1
    max_diff: float = 0.0
    scale_differ: int = 0  # quant: elements of the emitted scale unlike the planned one
    error: str = ""


def bad_mask(raw: np.ndarray, dtype: str, scale: bool) -> np.ndarray | None:
    """Which elements of `raw` (uint8 bytes of `dtype`) are NaN or Inf (for scales also <= 0); None: not checked."""
    if dtype in _EXPONENT_MASKS:
        bits = raw.view(_INT_OF_SIZE[DTYPE_SIZES[dtype]])
        m = _EXPONENT_MASKS[dtype]
        bad = (bits & m) == m
        return bad | (bits <= 0) if scale else bad  # sign bit set or +0.0: not a positive scale
    if dtype == "F8_E4M3":
        bad = (raw & 0x7F) == 0x7F  # 0x7F / 0xFF are NaN; e4m3fn has no Inf
    elif dtype == "F8_E5M2":
        bad = (raw & 0x7C) == 0x7C  # exponent all ones: Inf or NaN
    elif dtype == "F8_E8M0":
        return raw == 0xFF  # NaN; every other code is a power of two > 0
    else:
        return None
    return bad | ((raw & 0x7F) == 0) | (raw >= 0x80) if scale else bad


def _maybe_bad(raw: np.ndarray, dtype: str) -> bool:
    """A fast test that is never wrong when it says False: a NaN or Inf makes the sum NaN or Inf (float32 and
    float64), or has every exponent bit set (the 16-bit floats)."""
    if dtype in ("F32", "F64"):
        with np.errstate(all="ignore"):
            return not bool(np.isfinite(raw.view(np.float32 if dtype == "F32" else np.float64).sum()))
    if dtype in _EXPONENT_MASKS:
        m = _EXPONENT_MASKS[dtype]
        return int((raw.view(np.uint16) & np.uint16(m)).max()) == m
    if dtype == "F8_E4M3":
        return int((raw | 0x80).max()) == 0xFF
    return True


def check_values(raw: np.ndarray, info: TensorInfo, e0: int, res: TensorResult, scale: bool) -> None:
    """Count the bad values of `raw`, the elements of `info` from element `e0` on (`scale`: must be > 0)."""
    if raw.size == 0 or (not scale and not _maybe_bad(raw, info.dtype)):
        return
    bad = bad_mask(raw, info.dtype, scale)
    count = int(bad.sum()) if bad is not None else 0
    if not count:
        return
    if res.bad_first < 0:
        res.bad_first = e0 + int(np.flatnonzero(bad)[0])
        values = _as_float64(raw, info.dtype)[bad]
        kinds = ("NaN", np.isnan(values)), ("Inf", np.isinf(values))
        res.bad_kind = next((k for k, hit in kinds if bool(hit.any())), "<= 0")
    res.bad_values += count


def count_differ(want: np.ndarray, got: np.ndarray, dtype: str | None) -> tuple[int, int, float]:
    """(elements that differ, index of the first, largest difference) of two byte buffers holding `dtype`
    (None: compared byte by byte, no difference measured)."""
    if _same(want, got):
        return 0, -1, 0.0
    size = DTYPE_SIZES[dtype] if dtype is not None else 1
    differ = want.view(_INT_OF_SIZE[size]) != got.view(_INT_OF_SIZE[size])
    first = int(np.flatnonzero(differ)[0])
    if dtype not in TORCH_NAMES:
        return int(differ.sum()), first, 0.0
    a, b = _as_float64(want, dtype)[differ], _as_float64(got, dtype)[differ]
    with np.errstate(all="ignore"):
        diff = np.nan_to_num(np.abs(a - b), nan=math.inf)  # a NaN on either side counts as infinitely far
    return int(differ.sum()), first, float(diff.max())


def _as_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The values of `raw` (bytes of the float dtype `dtype`) as float64."""
    return raw.view(np.float64) if dtype == "F64" else to_float32(raw, TORCH_NAMES[dtype]).astype(np.float64)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Byte equality, 8 bytes at a time."""
    if a.size != b.size:
        return False
    n8 = a.size // 8 * 8
    return bool(np.array_equal(a[:n8].view(np.int64), b[:n8].view(np.int64))) and bool(np.array_equal(a[n8:], b[n8:]))
