"""Per-tensor operations: what happens to a tensor's source bytes on their way to its output bytes.

A plan gives every output tensor one operation, as data: a small frozen dataclass. An operation says,
before anything is read, how the source is cut into pieces that convert on their own (`pieces`) and where
each piece's results land in the output (`outputs`). The engine follows that; a backend computes it (one
`backend.Backend` method per converting operation).

A new format adds an operation class here, its `Backend` method (CPU and CUDA) and the name rule in a
planner that chooses it; the engine and the plan model stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Union

from dsv3conv.checkpoint import TensorInfo
from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.layout import BLOCK

# (name of the output tensor, byte offset in that tensor's data, bytes)
Output = tuple[str, int, int]


class TensorPlan(Protocol):
    """What an operation knows of the tensor it makes (a `plan.TensorPlan`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def source(self) -> TensorInfo: ...


@dataclass(frozen=True)
class Copy:
    """The source bytes, unchanged. `scale`: a block scale copied beside its copied weight, its values read
    on the way and refused unless finite and positive, as a scale that converts is (`finite.check_copy`);
    small, so read as one piece of whole values."""

    scale: bool = False
    converts = False

    def pieces(self, t: TensorPlan, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        n = t.source.nbytes
        if self.scale:
            chunk_bytes = max(n, 1)
        yield from ((start, min(chunk_bytes, n - start)) for start in range(0, n, chunk_bytes))
        if n == 0:
            yield 0, 0

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        return [(t.name, start, n)]


class _BlockRows:
    """Operations on a 2-D tensor in whole `block`-row pieces (a block's scale covers `block` rows)."""

    converts = True
    block: int

    def pieces(self, t: TensorPlan, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        rows, cols = t.source.shape
        row_bytes = cols * t.source.itemsize
        rows_per = max(self.block, (chunk_bytes // max(row_bytes, 1)) // self.block * self.block)
        for r0 in range(0, rows, rows_per):
            yield r0 * row_bytes, min(rows_per, rows - r0) * row_bytes

    def rows(self, t: TensorPlan, start: int, n: int) -> tuple[int, int]:
        """(first row, rows) of a piece."""
        row_bytes = t.source.shape[1] * t.source.itemsize
        return (start // row_bytes, n // row_bytes) if row_bytes else (0, 0)

    def _elements(self, t: TensorPlan, start: int, n: int) -> Output:
        """The piece's elements in the output tensor, in the output dtype."""
        size, itemsize = DTYPE_SIZES[t.dtype], t.source.itemsize
        return (t.name, start // itemsize * size, n // itemsize * size)

    def _scales(self, t: TensorPlan, start: int, n: int) -> Output:
        """The piece's rows of block scales in the tensor `scale_name` (pieces hold whole blocks, but at the
        tensor's end), for operations that write one."""
        r0, rows = self.rows(t, start, n)
        row_bytes = -(-t.shape[1] // self.block) * DTYPE_SIZES[self.scale_dtype]
        return (self.scale_name, r0 // self.block * row_bytes, -(-rows // self.block) * row_bytes)


@dataclass(frozen=True)
class DequantBlockFp8(_BlockRows):
    """e4m3 weight (source 0) times the float32 value of its block's scale (source 1, `scale_dtype`),
    rounded once to the output dtype. A value that would be NaN or Inf is refused unless `allow_nonfinite`
    (`dsv3conv.finite`)."""

    scale_dtype: str
    block: int = BLOCK
    allow_nonfinite: bool = False

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        return [self._elements(t, start, n)]

    def scale_rows(self, r0: int, rows: int) -> slice:
        """The rows of the scale tensor that rows r0 .. r0 + rows of the weight use."""
        return slice(r0 // self.block, -(-(r0 + rows) // self.block))


@dataclass(frozen=True)
class QuantBlockFp8(_BlockRows):
    """A BF16/F16/F32 weight to e4m3 with one scale per block (`scale_fmt` "float": amax / 448; "ue8m0":
    rounded up to a power of two), written to the tensor `scale_name` in `scale_dtype`."""

    scale_fmt: str
    scale_dtype: str
    scale_name: str
    block: int = BLOCK

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        """The piece's e4m3 rows, then its rows of scales."""
        return [self._elements(t, start, n), self._scales(t, start, n)]


@dataclass(frozen=True)
class QuantScale:
    """The scales of the `QuantBlockFp8` (or `RepackMxfp4Fp8`) weight `weight`: written by that weight's
    pieces, never read alone."""

    weight: str
    converts = False

    def pieces(self, t: TensorPlan, chunk_bytes: int) -> Iterator[tuple[int, int]]:
        return iter(())

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        return []


@dataclass(frozen=True)
class DequantMxfp4(_BlockRows):
    """Packed FP4 (source 0: [rows, cols / 2] bytes, two E2M1 codes each, low nibble first) times the float32
    value of its group's E8M0 scale (source 1: [rows, ceil(cols / 32)]), rounded once to the output dtype.
    A value that would be Inf is refused unless `allow_nonfinite` (`dsv3conv.finite`)."""

    block: int = 1  # every row has scales of its own
    allow_nonfinite: bool = False

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        size = DTYPE_SIZES[t.dtype]
        return [(t.name, 2 * start * size, 2 * n * size)]  # two values per packed byte

    def scale_rows(self, r0: int, rows: int) -> slice:
        return slice(r0, r0 + rows)


@dataclass(frozen=True)
class RepackMxfp4Fp8(_BlockRows):
    """Packed FP4 (sources as `DequantMxfp4`) to e4m3 [rows, cols] with one scale per 128x128 block, written
    to the tensor `scale_name` in `scale_dtype` (`kernels/mxfp4_to_fp8.py`: exact, or the tensor is refused)."""

    scale_dtype: str
    scale_name: str
    block: int = BLOCK

    def outputs(self, t: TensorPlan, start: int, n: int) -> list[Output]:
        """The piece's e4m3 rows (two values per packed byte), then its rows of block scales."""
        return [(t.name, 2 * start, 2 * n), self._scales(t, start, n)]

    def scale_rows(self, r0: int, rows: int) -> slice:
        return slice(r0, r0 + rows)


EMITS_SCALE = (QuantBlockFp8, RepackMxfp4Fp8)  # operations whose pieces also write a scale tensor

Op = Union[Copy, DequantBlockFp8, DequantMxfp4, QuantBlockFp8, QuantScale, RepackMxfp4Fp8]
