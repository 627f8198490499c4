"""NaN and Inf in what dequant writes: found from each piece's input before it converts, on every backend.

The rule is round_to_nearest_even(float32(w) * float32(scale)). A scale that is not finite and positive (an
E8M0 byte 255, a NaN, Inf, zero or negative F32/BF16 value) is refused (`scale_values`), whether its weight
converts or both are copied (`check_copy`), so an output value can only be
- NaN where the e4m3 code is NaN (0x7F or 0xFF; e2m1 has no NaN): one pass over the piece's bytes finds them
  (`kernels/e4m3_nan_scan.py`);
- Inf where the product rounds beyond the output dtype: the largest code magnitude (448 for e4m3, 6 for e2m1)
  times each block's scale, rounded by the rule, bounds every value of the block; only a block whose bound
  is not finite is converted (exactly, by `kernels/fp8_numpy.py`) to find out.
By default the first such value stops the run, naming the tensor and the element. With `allow_nonfinite`
(on the operation) the values are written, every NaN in one encoding whatever the backend (CPU arithmetic
keeps a NaN code's payload, a GPU returns its own canonical NaN): the output dtype's default quiet NaN with
the sign of the code, `NAN_BITS`. Inf is Inf on every backend already.
"""

from __future__ import annotations

import numpy as np

from dsv3conv.dtypes import TORCH_NAMES
from dsv3conv.errors import Dsv3Error, counted
from dsv3conv.kernels import fp8_numpy, mxfp4_cpu
from dsv3conv.kernels.e4m3_nan_scan import has_nan_code
from dsv3conv.kernels.fp8_numpy import FINITE_MAX, NAN_BITS, OUT_BITS
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4

E4M3_LARGEST = 448.0
E2M1_LARGEST = 6.0
__all__ = ["NAN_BITS", "canonical_nan", "canonical_nan_after", "check_copy", "check_piece", "scale_values"]


def scale_values(info, raw: np.ndarray) -> np.ndarray:
    """The scale tensor `info` (its bytes `raw`, uint8) as float32 in its shape; refused (Dsv3Error, naming the
    tensor and its shard) unless every value is finite and positive."""
    scale = fp8_numpy.to_float32(raw, TORCH_NAMES[info.dtype]).reshape(info.shape)
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        value = float(scale[bad][0])
        raise Dsv3Error(
            f"tensor `{info.name}` in {info.file}: "
            f"{counted(int(bad.sum()), 'scale value is', 'scale values are')} not finite and positive "
            f"(first: {value}); the checkpoint is damaged, download that shard again"
        )
    return scale


def check_copy(t, data: np.ndarray) -> None:
    """A copied tensor of plan `t` (its source bytes `data`, uint8): a scale (`Copy(scale=True)`, one piece) is
    held to `scale_values`, so a damaged scale is never copied on; anything else passes as it is."""
    if isinstance(t.op, Copy) and t.op.scale:
        scale_values(t.source, data)


def check_piece(t, data: np.ndarray, r0: int, scale: np.ndarray, out_dtype: str) -> bool:
    """Whether the piece of tensor plan `t` (its source bytes `data`, uint8, rows from `r0`, float32 `scale`
    rows) converts to NaN or Inf anywhere in `out_dtype` (a torch dtype name); refused (Dsv3Error) unless its
    operation allows them."""
    op = t.op
    if not isinstance(op, (DequantBlockFp8, DequantMxfp4)) or data.size == 0:
        return False
    cols = t.shape[1]
    found = _nan_code(data, cols) if isinstance(op, DequantBlockFp8) else None
    if found is None:
        found = _overflow(op, data, cols, scale, out_dtype)
    if found is None:
        return False
    if op.allow_nonfinite:
        return True
    (row, col), what = found
    raise Dsv3Error(
        f"tensor `{t.name}` in {t.source.file}: element [{r0 + row}, {col}] would be {what} in the "
        f"{out_dtype} output; fix the checkpoint, or pass {{allow_nonfinite}} to write NaN/Inf as they come",
        "allow_nonfinite")


def canonical_nan(data: np.ndarray, out: memoryview, out_dtype: str) -> None:
    """Give every NaN of a dequantized e4m3 piece (`data` its codes, `out` its output bytes) the bits of
    `NAN_BITS`: the code's sign, the output dtype's default quiet NaN."""
    bits = np.frombuffer(out, dtype=OUT_BITS[out_dtype])
    positive, negative = NAN_BITS[out_dtype]
    codes = np.asarray(data).reshape(-1).view(np.uint8)
    bits[codes == 0x7F] = positive
    bits[codes == 0xFF] = negative


def canonical_nan_after(fence, pieces: list[tuple[np.ndarray, memoryview, str]]):
    """`canonical_nan` on each (codes, output, dtype) piece once its bytes are there: at once when `fence` is
    None, else when the fence is waited on (a backend still converting); returns the fence to wait on."""
    if fence is None:
        for piece in pieces:
            canonical_nan(*piece)
        return None
    return _ThenCanonical(fence, pieces)


class _ThenCanonical:
    """A backend's fence, then `canonical_nan` on the pieces (before the engine reuses their input buffer)."""

    def __init__(self, fence, pieces):
        self._fence, self._pieces = fence, pieces

    def wait(self) -> None:
        self._fence.wait()
        for piece in self._pieces:
            canonical_nan(*piece)


def _nan_code(data: np.ndarray, cols: int) -> tuple[tuple[int, int], str] | None:
    u8 = data.reshape(-1)
    if not has_nan_code(u8):
        return None
    first = int(np.flatnonzero((u8 & 0x7F) == 0x7F)[0])
    return divmod(first, cols), f"NaN (e4m3 NaN code 0x{int(u8[first]):02X})"


def _overflow(op, data: np.ndarray, cols: int, scale: np.ndarray,
              out_dtype: str) -> tuple[tuple[int, int], str] | None:
    """The first element whose product rounds to Inf, if any: the blocks whose bound is Inf, converted."""
    largest = E4M3_LARGEST if isinstance(op, DequantBlockFp8) else E2M1_LARGEST
    with np.errstate(over="ignore"):  # Inf is what is looked for
        bound = _rounded(np.float32(largest) * scale.astype(np.float32), out_dtype)
    suspect = np.flatnonzero(np.isinf(bound).reshape(bound.shape[0], -1).any(axis=1)).tolist()
    for b in suspect:  # rows of blocks (e4m3: 128 rows; e2m1: one row) whose bound overflows
        r0 = b * op.block
        if isinstance(op, DequantBlockFp8):
            w = data.reshape(-1, cols)[r0 : r0 + op.block]
            bits = np.empty(w.shape, OUT_BITS[out_dtype])
            fp8_numpy.dequant_rows(w, scale[b : b + 1], bits, out_dtype, 0, w.shape[0])
        else:
            packed = data.reshape(-1, cols // 2)[r0 : r0 + op.block]
            bits = np.empty((packed.shape[0], cols), OUT_BITS[out_dtype])
            e8m0 = (scale[r0 : r0 + op.block].view(np.uint32) >> 23).astype(np.uint8)  # powers of two, > 2^-127
            mxfp4_cpu.dequant_rows(packed, e8m0, bits, out_dtype, 0, packed.shape[0])
        values = fp8_numpy.to_float32(bits.view(np.uint8), out_dtype).reshape(bits.shape)
        inf = np.argwhere(np.isinf(values))
        if inf.size:
            row, col = (int(v) for v in inf[0])
            return (r0 + row, col), (f"{float(values[row, col])} (w * scale beyond the largest {out_dtype}, "
                                     f"{FINITE_MAX[out_dtype]:.4g})")
    return None


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `x` (no NaN) rounded to `dtype` and back: Inf where it overflows."""
    bits = np.empty(x.shape, OUT_BITS[dtype])
    fp8_numpy.round_into(np.ascontiguousarray(x), bits, dtype)
    return fp8_numpy.to_float32(bits.view(np.uint8), dtype).reshape(x.shape)
