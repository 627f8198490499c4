"""Whether a byte range of e4m3 codes holds a NaN code (0x7F or 0xFF): one pass, 8 bytes a step.

A byte b is a NaN code exactly when its low seven bits are all ones, i.e. when (b & 0x7F) + 1 has bit 7 set;
that sum never carries into the next byte, so eight bytes are tested at once as one 64-bit word, and a whole
range by OR-ing the words together (a loop the compiler vectorizes). Compiled with numba (GIL released,
machine code cached on disk as `fp8_block_numba` does) once numba is loaded, as the CPU path's kernels for
large tensors load it; elsewhere (small checkpoints, the GPU path) `reference_has_nan_code`, two numpy byte
maxima (0xFF is the largest byte as uint8, 0x7F the largest as int8), which is also what tests hold the
compiled scan to. Nothing runs on import.
"""

from __future__ import annotations

import functools

import numpy as np

from .fp8_block_host import numba_loaded
from .fp8_numpy import has_nan_code as reference_has_nan_code

LOW7 = 0x7F7F7F7F7F7F7F7F
ONES = 0x0101010101010101
HIGH = 0x8080808080808080


def has_nan_code(u8: np.ndarray) -> bool:
    """Any byte of the contiguous uint8 array `u8` is 0x7F or 0xFF: compiled once numba is loaded."""
    scan = _compiled() if numba_loaded() else None
    if scan is None or u8.size < 64:
        return reference_has_nan_code(u8)
    flat = u8.reshape(-1)
    head = -flat.ctypes.data % 8  # bytes before the first 8-byte aligned word
    body = (flat.size - head) // 8 * 8
    edges = np.concatenate((flat[:head], flat[head + body :]))
    return bool(((edges & 0x7F) == 0x7F).any()) or bool(scan(flat[head : head + body].view(np.uint64)))


@functools.cache
def _compiled():
    """The numba scan, or None where numba is missing or does not compile here."""
    try:
        from numba import njit
    except Exception:  # not installed, or broken against this numpy: numpy's scan stands in
        return None
    low7, ones, high = np.uint64(LOW7), np.uint64(ONES), np.uint64(HIGH)

    @njit(nogil=True, cache=True)
    def any_nan_word(words):
        acc = np.uint64(0)
        for i in range(words.shape[0]):
            acc |= (words[i] & low7) + ones
        return (acc & high) != 0

    try:
        any_nan_word(np.zeros(1, dtype=np.uint64))
    except Exception:  # an LLVM or numba failure on this machine
        return None
    return any_nan_word
