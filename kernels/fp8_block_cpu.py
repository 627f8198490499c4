"""FP8 (e4m3) 128x128 block dequant and quant on the CPU, bit-identical to the references.

`dequant_rows` equals `reference_dequant` and `quant_rows` equals `reference_quant`, bit for bit, on a range
of rows of one tensor, into caller-owned output tensors. Callers run many row ranges at once from a pool of
threads; `row_ranges` cuts a tensor into such ranges, `dequant_task` / `quant_task` check a tensor once for
many ranges.
Nothing runs on import.

Dequant has two kernels:
- "numba" (`fp8_block_numba`): compiled, one pass per element, the GIL released; used wherever numba imports
  and its kernel loads (`numba_kernel()`), for tensors of a million elements or more (the smaller ones of a
  small checkpoint are not worth numba's start-up). Rows holding NaN codes take the reference's own ops.
- "torch": a few vectorized torch ops per step of rows (a step stays inside one 128-row scale block and fits
  in a core's cache; torch releases the GIL inside its ops, not between them). It decodes e4m3 without
  torch's scalar float8 conversion: the byte, sign-extended to 16 bits, shifted left by 7 and with bit 14
  cleared, is the float16 of the e4m3 value times 2^-8 (normals and subnormals alike), which the CPU widens
  to float32 exactly. Multiplying by 256 * scale gives the exact real product the reference rounds, hence the
  same float32 and the same rounded output. Rows holding NaN codes (0x7F, 0xFF) and scales where 256 * scale
  is not finite take the reference's own ops instead.

Quant has the same two kernels: the numba one computes a 128-row block's maxima, its scales and every code
in one call (integer rounding to e4m3); the torch one follows `reference_quant` step for step (block maxima,
`block_scales`, division, clamp, cast), a row block at a time so nothing is padded or repeated.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from .fp8_block_dequant import BLOCK_SIZE
from .fp8_block_quant import E4M3_MAX, SOURCE_DTYPES, block_scales, check_scale_args

# Elements per step: large enough that Python's share (a few us per op, under the GIL) stays small, small
# enough that the scratch (6 bytes an element) and the step's input and output stay in a core's cache.
STEP_ELEMS = 1 << 18
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_F16_SHIFT = 256.0  # float16 of (byte << 7 & ~0x4000) is the e4m3 value / 256
_CLEAR_BIT14 = ~0x4000
_scratch = threading.local()


def _scratch_tensors(elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int16 and float32 work buffers of at least `elems` elements (kept between calls: fresh
    pages in the hot loop would halve the speed)."""
    have = getattr(_scratch, "bufs", None)
    if have is None or have[0].numel() < elems:
        have = _scratch.bufs = (torch.empty(elems, dtype=torch.int16), torch.empty(elems, dtype=torch.float32))
    return have[0][:elems], have[1][:elems]


def row_ranges(rows: int, cols: int, target_elems: int = 1 << 20, align: int = 1) -> list[tuple[int, int]]:
    """Cut `rows` into ranges of about `target_elems` elements, starts a multiple of `align` (quant: 128)."""
    per = max(align, (target_elems // max(cols, 1)) // align * align)
    return [(r0, min(r0 + per, rows)) for r0 in range(0, rows, per)] or [(0, 0)]


def _check_dequant(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor) -> None:
    if w.dtype not in (torch.float8_e4m3fn, torch.uint8) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D float8_e4m3fn (or uint8) tensor, got {w.dtype} {tuple(w.shape)}")
    rows, cols = w.shape
    want = (-(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match w {tuple(w.shape)}: expected {want}")
    if out.dtype not in _OUT_DTYPES or tuple(out.shape) != (rows, cols):
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; expected {(rows, cols)} bfloat16/float16/float32")
    if not (w.is_contiguous() and out.is_contiguous()):
        raise ValueError("w and out must be contiguous")


@functools.cache
def numba_kernel(what: tuple = ()):
    """The compiled kernels (`fp8_block_numba`), the one `what` names ready (("dequant", out dtype) or
    ("quant",): loaded from numba's disk cache, or compiled once per install); None where numba is missing or
    that kernel does not build here (`NUMBA_FAILURES` says why). Imported on first call (numba's import: a
    few tenths of a second)."""
    try:
        from . import fp8_block_numba

        if fp8_block_numba.HAS_NUMBA:
            if what:
                fp8_block_numba.warm(what)
            return fp8_block_numba
        NUMBA_FAILURES[what] = "numba is not installed (or does not import)"
    except Exception as exc:  # an LLVM or numba failure on this machine: the torch kernel stands in
        NUMBA_FAILURES[what] = f"{type(exc).__name__}: {exc}"
    return None


NUMBA_FAILURES: dict[tuple, str] = {}  # why `numba_kernel(what)` gave None, for benchmarks and bug reports


KERNELS = ("auto", "numba", "torch")
# "auto" takes the numba kernels for tensors of at least this many elements: numba's import and the kernel's
# load from its cache (a few tenths of a second, once per process) pay off only on real work, and small
# checkpoints (the tiny examples, tests) convert without them.
AUTO_NUMBA_ELEMS = 1 << 20


def _compiled(kernel: str, what: tuple, elems: int):
    """The numba kernel module, `what` ready (`numba_kernel`), for `kernel` on a tensor of `elems` elements;
    None for the torch kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: choose one of {KERNELS}")
    use = kernel == "numba" or (kernel == "auto" and elems >= AUTO_NUMBA_ELEMS)
    compiled = numba_kernel(what) if use else None
    if kernel == "numba" and compiled is None:
        raise ValueError("kernel 'numba': numba is not installed or its kernel does not build here")
    return compiled


def dequant_task(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor,
                 kernel: str = "auto") -> Callable[[int, int], None]:
    """A function converting rows [start, stop) of `reference_dequant(w, scale_inv, out.dtype)` into the same
    rows of `out`, the arguments checked once. kernel: "numba", "torch", or "auto" (numba where it works, for
    tensors of at least `AUTO_NUMBA_ELEMS` elements)."""
    _check_dequant(w, scale_inv, out)
    compiled = _compiled(kernel, ("dequant", out.dtype), w.numel())
    u8 = w.view(torch.uint8)
    if compiled is None:
        return functools.partial(_dequant_rows_torch, u8, scale_inv, out)
    run = compiled.dequant_task(u8, scale_inv, out)

    def rows(start: int, stop: int) -> None:
        while start < stop:
            start = run(start, stop)
            if start < stop:  # a NaN code or a scale that is not finite: the reference's ops for that row
                _dequant_rows_torch(u8, scale_inv, out, start, start + 1)
                start += 1

    return rows


def dequant_rows(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, start: int = 0,
                 stop: int | None = None, kernel: str = "auto") -> None:
    """Rows [start, stop) of `reference_dequant(w, scale_inv, out.dtype)`, written into the same rows of `out`.

    w: [M, N] float8_e4m3fn or uint8 (raw e4m3 bytes), contiguous; scale_inv: [ceil(M/128), ceil(N/128)] of
    any float dtype; out: [M, N] bfloat16/float16/float32, contiguous; kernel as for `dequant_task`."""
    dequant_task(w, scale_inv, out, kernel)(start, w.shape[0] if stop is None else stop)


def _dequant_rows_torch(u8: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor, start: int,
                        stop: int) -> None:
    """The torch kernel on rows [start, stop) (arguments checked)."""
    cols = u8.shape[1]
    if stop <= start or cols == 0:
        return
    step = max(1, STEP_ELEMS // cols)
    bits, wide = _scratch_tensors(min(step, BLOCK_SIZE) * cols)
    nan_codes = _has_nan_codes(u8[start:stop])
    r = start
    while r < stop:
        block = r // BLOCK_SIZE
        end = min(stop, (block + 1) * BLOCK_SIZE)
        srow = scale_inv[block].to(torch.float32).repeat_interleave(BLOCK_SIZE)[:cols]
        fast_scale = srow * _F16_SHIFT
        scale_ok = bool(torch.isfinite(fast_scale).all())
        for r0 in range(r, end, step):
            r1 = min(end, r0 + step)
            n = (r1 - r0) * cols
            src, dst = u8[r0:r1], out[r0:r1]
            if not scale_ok or (nan_codes and _has_nan_codes(src)):
                dst.copy_(src.view(torch.float8_e4m3fn).to(torch.float32) * srow)  # the reference's own ops
                continue
            h = bits[:n].view(r1 - r0, cols)
            h.copy_(src.view(torch.int8))  # sign-extended: bits 15..7 all equal the e4m3 sign
            h.bitwise_left_shift_(7).bitwise_and_(_CLEAR_BIT14)  # sign, 4 exponent and 3 mantissa bits
            if out.dtype == torch.float32:
                torch.mul(dst.copy_(h.view(torch.float16)), fast_scale, out=dst)
            else:
                x = wide[:n].view(r1 - r0, cols)
                x.copy_(h.view(torch.float16)).mul_(fast_scale)
                dst.copy_(x)  # round to nearest even
        r = end


def _has_nan_codes(u8: torch.Tensor) -> bool:
    """e4m3fn NaN is 0x7F or 0xFF: the largest byte as uint8 or as int8."""
    return int(u8.max()) == 0xFF or int(u8.view(torch.int8).max()) == 0x7F


def _check_quant(x: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor, scale_fmt: str,
                 scale_dtype: torch.dtype) -> None:
    check_scale_args(scale_fmt, scale_dtype)
    if x.dtype not in SOURCE_DTYPES or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2-D bfloat16/float16/float32 tensor, got {x.dtype} {tuple(x.shape)}")
    rows, cols = x.shape
    if q.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(q.shape) != (rows, cols) or not q.is_contiguous():
        raise ValueError(f"q is {q.dtype} {tuple(q.shape)}; expected a contiguous float8_e4m3fn (or uint8) {(rows, cols)}")
    want = (-(-rows // BLOCK_SIZE), -(-cols // BLOCK_SIZE))
    if scale_out.dtype != scale_dtype or tuple(scale_out.shape) != want:
        raise ValueError(f"scale_out is {scale_out.dtype} {tuple(scale_out.shape)}; expected {scale_dtype} {want}")


def quant_task(x: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor, scale_fmt: str = "float",
               scale_dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Callable[[int, int], None]:
    """A function writing rows [start, stop) of `reference_quant(x, scale_fmt, scale_dtype)`: e4m3 codes into
    the same rows of `q`, the scales of their row blocks into `scale_out`; `start` a multiple of 128, so is
    `stop` unless it is the last row. The arguments are checked once; kernel as for `dequant_task`. Codes of a
    block whose scale is not finite (NaN or Inf in it) are left unspecified: callers refuse such blocks."""
    _check_quant(x, q, scale_out, scale_fmt, scale_dtype)
    compiled = _compiled(kernel, ("quant",), x.numel())
    run = (compiled.quant_task(x, q, scale_out, scale_fmt, scale_dtype) if compiled is not None
           else functools.partial(_quant_rows_torch, x, q, scale_out, scale_fmt, scale_dtype))

    def rows(start: int, stop: int) -> None:
        if stop <= start or x.shape[1] == 0:
            return
        if start % BLOCK_SIZE or (stop % BLOCK_SIZE and stop != x.shape[0]):
            raise ValueError(f"rows [{start}, {stop}) must start (and, before row {x.shape[0]}, end) on a 128-row block")
        run(start, stop)

    return rows


def quant_rows(x: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor, scale_fmt: str = "float",
               scale_dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None,
               kernel: str = "auto") -> None:
    """Rows [start, stop) of `reference_quant(x, scale_fmt, scale_dtype)` (`quant_task`)."""
    quant_task(x, q, scale_out, scale_fmt, scale_dtype, kernel)(start, x.shape[0] if stop is None else stop)


def _quant_rows_torch(x: torch.Tensor, q: torch.Tensor, scale_out: torch.Tensor, scale_fmt: str,
                      scale_dtype: torch.dtype, start: int, stop: int) -> None:
    """The torch kernel on rows [start, stop) (arguments and range checked)."""
    cols = x.shape[1]
    q8 = q.view(torch.float8_e4m3fn)
    full, tail = cols // BLOCK_SIZE * BLOCK_SIZE, cols % BLOCK_SIZE
    for r0 in range(start, stop, BLOCK_SIZE):
        r1 = min(stop, r0 + BLOCK_SIZE)
        xf = x[r0:r1].to(torch.float32, copy=True)  # divided in place below
        a = xf.abs()
        amax = torch.empty(-(-cols // BLOCK_SIZE), dtype=torch.float32)
        if full:
            torch.amax(a[:, :full].view(r1 - r0, full // BLOCK_SIZE, BLOCK_SIZE), dim=(0, 2), out=amax[: full // BLOCK_SIZE])
        if tail:
            amax[-1] = a[:, full:].amax()
        amax = torch.where(amax.isnan(), float("inf"), amax)  # a NaN anywhere in a block makes its maximum NaN
        scale = block_scales(amax, scale_fmt, scale_dtype)
        scale_out[r0 // BLOCK_SIZE] = scale
        srow = scale.to(torch.float32).repeat_interleave(BLOCK_SIZE)[:cols]
        q8[r0:r1] = xf.div_(srow).clamp_(-E4M3_MAX, E4M3_MAX)
