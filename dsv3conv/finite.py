"""NaN and Inf in what dequant writes: found from each piece's input before it converts, on every backend.

The rule is round_to_nearest_even(float32(w) * float32(scale)). The engine refuses a scale that is not
finite and positive, so an output value can only be
- NaN where the e4m3 code is NaN (0x7F or 0xFF; e2m1 has no NaN): one pass over the piece's bytes finds them
  (`kernels/e4m3_nan_scan.py`);
- Inf where the product rounds beyond the output dtype: the largest code magnitude (448 for e4m3, 6 for e2m1)
  times each block's scale, rounded by the rule, bounds every value of the block; only a block whose bound
  is not finite is converted by the reference to find out.
By default the first such value stops the run, naming the tensor and the element. With `allow_nonfinite`
(on the operation) the values are written, every NaN in one encoding whatever the backend (CPU arithmetic
keeps a NaN code's payload, a GPU returns its own canonical NaN): the output dtype's default quiet NaN with
the sign of the code, `NAN_BITS`. Inf is Inf on every backend already.
"""

from __future__ import annotations

import torch

from dsv3conv.errors import Dsv3Error
from dsv3conv.kernels.e4m3_nan_scan import has_nan_code
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.ops import DequantBlockFp8, DequantMxfp4

E4M3_LARGEST = 448.0
E2M1_LARGEST = 6.0
# (positive, negative) NaN of each output dtype, as the signed integer of its bits
NAN_BITS = {
    torch.bfloat16: (torch.int16, 0x7FC0, 0xFFC0 - (1 << 16)),
    torch.float16: (torch.int16, 0x7E00, 0xFE00 - (1 << 16)),
    torch.float32: (torch.int32, 0x7FC00000, 0xFFC00000 - (1 << 32)),
}


def check_piece(t, data: torch.Tensor, r0: int, scale: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the piece of tensor plan `t` (its source bytes `data`, rows from `r0`, float32 `scale` rows)
    converts to NaN or Inf anywhere; refused (Dsv3Error) unless its operation allows them."""
    op = t.op
    if not isinstance(op, (DequantBlockFp8, DequantMxfp4)) or data.numel() == 0:
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
        f"{_name(out_dtype)} output; fix the checkpoint, or pass {{allow_nonfinite}} to write NaN/Inf as they come",
        "allow_nonfinite")


def canonical_nan(data: torch.Tensor, out: memoryview, out_dtype: torch.dtype) -> None:
    """Give every NaN of a dequantized e4m3 piece (`data` its codes, `out` its output bytes) the bits of
    `NAN_BITS`: the code's sign, the output dtype's default quiet NaN."""
    int_dtype, positive, negative = NAN_BITS[out_dtype]
    bits = torch.frombuffer(out, dtype=int_dtype) if len(out) else torch.empty(0, dtype=int_dtype)
    codes = data.view(torch.uint8).reshape(-1)
    bits[codes == 0x7F] = positive
    bits[codes == 0xFF] = negative


def canonical_nan_after(fence, pieces: list[tuple[torch.Tensor, memoryview, torch.dtype]]):
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


def _nan_code(data: torch.Tensor, cols: int) -> tuple[tuple[int, int], str] | None:
    u8 = data.view(torch.uint8)
    if not has_nan_code(u8):
        return None
    first = int(((u8 & 0x7F) == 0x7F).nonzero()[0, 0])
    code = int(u8[first])
    return divmod(first, cols), f"NaN (e4m3 NaN code 0x{code:02X})"


def _overflow(op, data: torch.Tensor, cols: int, scale: torch.Tensor,
              out_dtype: torch.dtype) -> tuple[tuple[int, int], str] | None:
    """The first element whose product rounds to Inf, if any: the blocks whose bound is Inf, converted."""
    largest = E4M3_LARGEST if isinstance(op, DequantBlockFp8) else E2M1_LARGEST
    bound = (largest * scale.to(torch.float32)).to(out_dtype)
    suspect = (~torch.isfinite(bound)).any(dim=1).nonzero().flatten().tolist()
    for b in suspect:  # rows of blocks (e4m3: 128 rows; e2m1: one row) whose bound overflows
        rows = slice(b * op.block, (b + 1) * op.block)
        if isinstance(op, DequantBlockFp8):
            w = data.view(torch.uint8).view(-1, cols)[rows]
            values = reference_dequant(w, scale[b : b + 1], out_dtype)
        else:
            packed = data.view(torch.uint8).view(-1, cols // 2)[rows]
            values = reference_dequant_mxfp4(packed, scale[rows].to(torch.float8_e8m0fnu), out_dtype)
        inf = torch.isinf(values).nonzero()
        if inf.numel():
            row, col = (int(v) for v in inf[0])
            value = float(values[row, col])
            return (b * op.block + row, col), (f"{value} (w * scale beyond the largest {_name(out_dtype)}, "
                                               f"{torch.finfo(out_dtype).max:.4g})")
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
