"""FP8 (e4m3) 128x128 block dequant and quant on the CPU, on numpy arrays: which kernel runs a tensor.

- "numba" (`fp8_block_numba`): compiled, one pass per element, the GIL released; "auto" takes it for tensors of
  a million elements or more where numba imports and its kernel loads from its cache (`numba_kernel`). The
  first such tensor starts that load in a background thread (about a second: numba's import and LLVM's start)
  and goes to numpy meanwhile, as does every tensor until the load is done: the first bytes are not held up.
- "numpy" (`fp8_numpy`): exact, nothing to compile or load: "auto" takes it for smaller tensors, so a small
  checkpoint converts without numba's start-up.
- "torch" (`fp8_block_cpu`): torch's vectorized ops, imported only when asked for, or by "auto" for the large
  tensors where numba is missing or fails to load (faster there than numpy's many passes; numpy where torch
  is missing too).
All give `reference_dequant` / `reference_quant` bit for bit, NaN bits aside: numba and numpy write a NaN as
the output dtype's default quiet NaN with the sign of its e4m3 code (`fp8_numpy.NAN_BITS`), torch its own
(the engine makes every NaN canonical where NaN is allowed at all, `dsv3conv.finite`). Callers run
many row ranges of a task at once from a pool of threads; `row_ranges` cuts a tensor into such ranges. No
torch, no numba on import.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Callable

import numpy as np

from . import fp8_numpy

BLOCK = fp8_numpy.BLOCK
KERNELS = ("auto", "numba", "numpy", "torch")
# "auto" takes the numba kernels for tensors of at least this many elements: numba's import and the kernel's
# load from its cache (a few tenths of a second, once per process) pay off only on real work.
AUTO_NUMBA_ELEMS = 1 << 20
NUMBA_FAILURES: dict[tuple, str] = {}  # why `numba_kernel(what)` gave None, for benchmarks and bug reports
OUT_DTYPES = tuple(fp8_numpy.OUT_BITS)
SOURCE_DTYPES = ("bfloat16", "float16", "float32")
SCALE_DTYPES = ("float32", "bfloat16", "float16", "float8_e8m0fnu")
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e8m0fnu": 1}


def row_ranges(rows: int, cols: int, target_elems: int = 1 << 20, align: int = 1) -> list[tuple[int, int]]:
    """Cut `rows` into ranges of about `target_elems` elements, starts a multiple of `align` (quant: 128)."""
    per = max(align, (target_elems // max(cols, 1)) // align * align)
    return [(r0, min(r0 + per, rows)) for r0 in range(0, rows, per)] or [(0, 0)]


_loads: dict[tuple, threading.Thread] = {}  # numba kernels loading (or loaded) in the background
_loads_lock = threading.Lock()
_numba_loaded = threading.Event()  # numba imported and a kernel of it ready


def numba_loaded() -> bool:
    """numba is imported and works (a kernel of it was loaded): compiled helpers may be used at no cost."""
    return _numba_loaded.is_set()


@functools.cache
def numba_kernel(what: tuple = ()):
    """The compiled kernels (`fp8_block_numba`), the one `what` names ready (("dequant", out dtype name) or
    ("quant",): loaded from numba's disk cache, or compiled once per install); None where numba is missing or
    that kernel does not build here (`NUMBA_FAILURES` says why). Imported on first call."""
    try:
        from . import fp8_block_numba

        if fp8_block_numba.HAS_NUMBA:
            if what:
                fp8_block_numba.warm(what)
            _numba_loaded.set()
            return fp8_block_numba
        NUMBA_FAILURES[what] = "numba is not installed (or does not import)"
    except Exception as exc:  # an LLVM or numba failure on this machine: numpy stands in
        NUMBA_FAILURES[what] = f"{type(exc).__name__}: {exc}"
    return None


def load_in_background(what: tuple):
    """numba's kernel `what` if it is loaded; else None, its load started in a background thread (once)."""
    with _loads_lock:
        loading = _loads.get(what)
        if loading is None:
            # a daemon: a run that ends first does not wait for the load (numba writes its cache by renaming)
            loading = _loads[what] = threading.Thread(target=numba_kernel, args=(what,), name="dsv3conv-numba-load",
                                                      daemon=True)
            loading.start()
    return None if loading.is_alive() else numba_kernel(what)


def wait_for_loads() -> None:
    """Wait for the kernels loading in the background (tests, benchmarks)."""
    with _loads_lock:
        loads = list(_loads.values())
    for loading in loads:
        loading.join()


def choose(kernel: str, what: tuple, elems: int):
    """The kernel that runs a tensor of `elems` elements: the numba module (`what` ready), "numpy" or "torch"."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: choose one of {KERNELS}")
    if kernel in ("numpy", "torch"):
        return kernel
    if kernel == "numba":
        compiled = numba_kernel(what)
        if compiled is None:
            raise ValueError("kernel 'numba': numba is not installed or its kernel does not build here")
        return compiled
    if elems < AUTO_NUMBA_ELEMS:
        return "numpy"
    compiled = load_in_background(what)
    if compiled is not None:
        return compiled
    return "torch" if what in NUMBA_FAILURES and _has_torch() else "numpy"


@functools.cache
def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _check_dequant(w: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str) -> None:
    if w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous:
        raise ValueError(f"w must be a contiguous 2-D uint8 array (e4m3 bytes), got {w.dtype} {w.shape}")
    rows, cols = w.shape
    want = (-(-rows // BLOCK), -(-cols // BLOCK))
    if scale.dtype != np.float32 or scale.shape != want:
        raise ValueError(f"scale is {scale.dtype} {scale.shape}; expected float32 {want}")
    bits = fp8_numpy.OUT_BITS.get(dtype)
    if bits is None or out.dtype != bits or out.shape != (rows, cols) or not out.flags.c_contiguous:
        raise ValueError(f"out is {out.dtype} {out.shape}; expected the contiguous bits ({bits}) of {dtype} {w.shape}")


def dequant_task(w: np.ndarray, scale: np.ndarray, out: np.ndarray, dtype: str, kernel: str = "auto",
                 ) -> Callable[[int, int], None]:
    """A function converting rows [start, stop) of the block dequant of `w` (uint8 [M, N]) under float32
    `scale` [ceil(M/128), ceil(N/128)] into `out` (the bits of `dtype` [M, N]: uint16 for bfloat16/float16,
    uint32 for float32), the arguments checked once. The rows the numba kernel leaves (a NaN code, a scale
    that is not finite) go to numpy's."""
    _check_dequant(w, scale, out, dtype)
    run = choose(kernel, ("dequant", dtype), w.size)
    plain = functools.partial(fp8_numpy.dequant_rows, w, scale, out, dtype)
    if run == "numpy":
        return plain
    if run == "torch":
        from .fp8_block_cpu import torch_dequant_task

        return torch_dequant_task(w, scale, out, dtype)
    compiled = run.dequant_task(w, scale, out, dtype)

    def rows(start: int, stop: int) -> None:
        while start < stop:
            start = compiled(start, stop)
            if start < stop:
                plain(start, start + 1)
                start += 1

    return rows


def _check_quant(x: np.ndarray, src_dtype: str, q: np.ndarray, scale_out: np.ndarray, scale_fmt: str,
                 scale_dtype: str) -> None:
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"scale_fmt {scale_fmt!r}: choose one of ('float', 'ue8m0')")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype}: choose float32, bfloat16, float16 or float8_e8m0fnu")
    if scale_dtype == "float8_e8m0fnu" and scale_fmt != "ue8m0":
        raise ValueError("float8_e8m0fnu scales hold powers of two only: use scale_fmt='ue8m0'")
    if src_dtype not in SOURCE_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {src_dtype}")
    rows, cols = q.shape if q.ndim == 2 else (-1, -1)
    if (q.dtype != np.uint8 or not q.flags.c_contiguous or x.dtype != np.uint8 or not x.flags.c_contiguous
            or x.shape != (rows, cols * _WIDTH[src_dtype])):
        raise ValueError(f"x {x.dtype} {x.shape} and q {q.dtype} {q.shape}: expected contiguous uint8 bytes, "
                         f"[M, N x {_WIDTH[src_dtype]}] and [M, N]")
    want = (-(-rows // BLOCK), -(-cols // BLOCK) * _WIDTH[scale_dtype])
    if scale_out.dtype != np.uint8 or scale_out.shape != want or not scale_out.flags.c_contiguous:
        raise ValueError(f"scale_out is {scale_out.dtype} {scale_out.shape}; expected contiguous uint8 {want}")


def quant_task(x: np.ndarray, src_dtype: str, q: np.ndarray, scale_out: np.ndarray, scale_fmt: str = "float",
               scale_dtype: str = "float32", kernel: str = "auto") -> Callable[[int, int], None]:
    """A function writing rows [start, stop) of `reference_quant`: `x` the raw bytes [M, N x width] of
    `src_dtype`, e4m3 codes into the same rows of `q` (uint8 [M, N]), the scales of their row blocks into
    `scale_out` (uint8 [ceil(M/128), ceil(N/128) x the scale's width]); `start` a multiple of 128, so is `stop`
    unless it is the last row. Codes of a block whose scale is not finite are unspecified: callers refuse it."""
    _check_quant(x, src_dtype, q, scale_out, scale_fmt, scale_dtype)
    run = choose(kernel, ("quant",), q.size)
    if run == "numpy":
        inner = functools.partial(fp8_numpy.quant_rows, x, src_dtype, q, scale_out, scale_fmt, scale_dtype)
    elif run == "torch":
        from .fp8_block_cpu import torch_quant_task

        inner = torch_quant_task(x, src_dtype, q, scale_out, scale_fmt, scale_dtype)
    else:
        inner = run.quant_task(x, src_dtype, q, scale_out, scale_fmt, scale_dtype)

    def rows(start: int, stop: int) -> None:
        if stop <= start or q.shape[1] == 0:
            return
        if start % BLOCK or (stop % BLOCK and stop != q.shape[0]):
            raise ValueError(f"rows [{start}, {stop}) must start (and, before row {q.shape[0]}, end) on a 128-row block")
        inner(start, stop)

    return rows
