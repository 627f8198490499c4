"""Host-side launch helpers shared by the Triton kernels: device checks, SM counts, PDL support, tile configs.

Triton is optional: where it is absent, `HAS_TRITON` is False and the plain-torch references still work.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # Triton is optional: the reference must stay usable where it is absent.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain Python: triton.cdiv is a jit function, ~10 us per call from the host


_NO_GUARD = contextlib.nullcontext()


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device; switch only when the tensors live elsewhere."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


# Output dtypes of the dequant kernels; scale dtype -> SCALE_KIND of the FP8 kernels, and the integer view a
# non-float32 scale travels as (its bits, decoded or encoded exactly in the kernel).
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
E8M0 = getattr(torch, "float8_e8m0fnu", None)
SCALE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
if E8M0 is not None:
    SCALE_KIND[E8M0] = 3
SCALE_VIEW = {0: torch.float32, 1: torch.int16, 2: torch.int16, 3: torch.uint8}


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_device(kernel: str, fallback: str, **tensors: torch.Tensor) -> torch.device:
    """The checks every launcher makes first: Triton installed, `tensors` on one device, a CUDA one (or Triton's
    interpreter). `kernel` names the launcher and `fallback` what to call instead, in the errors."""
    if not HAS_TRITON:
        raise RuntimeError(f"triton is not installed; use {fallback} instead")
    devices = {name: t.device for name, t in tensors.items()}
    device = next(iter(devices.values()))
    if any(d != device for d in devices.values()):
        raise ValueError(f"{', '.join(devices)} must share a device, got "
                         + ", ".join(f"{name} on {d}" for name, d in devices.items()))
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"Triton {kernel} needs CUDA tensors, got device {device}; use {fallback} on the CPU")
    return device


def output_for(out: torch.Tensor | None, rows: int, cols: int, dtype: torch.dtype,
               device: torch.device, name: str = "out") -> torch.Tensor:
    """A kernel's [rows, cols] output: `out` once checked (shape, dtype, device, rows contiguous), else new."""
    if out is None:
        return torch.empty((rows, cols), dtype=dtype, device=device)
    if tuple(out.shape) != (rows, cols) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; expected {(rows, cols)} {dtype} on {device}"
        )
    if cols > 1 and out.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along columns, got strides {out.stride()}")
    return out


def resolve_decode_bits(device: torch.device, decode_bits: bool | None) -> bool:
    """`decode_bits=None`: native FP8 loads on sm89+ (and in the interpreter), bit decoding below."""
    if decode_bits is not None:
        return bool(decode_bits)
    if device.type != "cuda":
        return False
    return _device_info(device)[1] < (8, 9)


@functools.cache
def _device_info(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(multiprocessor count, compute capability), looked up once per device."""
    if device.type != "cuda":
        return 132, (9, 0)
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, (props.major, props.minor)


def _num_sms(device: torch.device) -> int:
    return _device_info(device)[0]


@functools.cache
def _triton_has_pdl() -> bool:
    """Triton's `launch_pdl` launch option and its griddepcontrol intrinsics (Triton 3.5+)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")
    except (ImportError, AttributeError):
        return False


def pdl_mode(device: torch.device) -> int:
    """Programmatic dependent launch for single-tensor launches (sm90+ GPUs, a Triton that has it): back to
    back, a small tensor's launch and ramp-up overlap the previous kernel's drain (kernels/NOTES.md).
    0: off (`DSV3CONV_PDL=0`); 1: next launch allowed once a tile has loaded; 2 (default): as soon as a
    tile starts, measured best on an H200 (71% of copy bandwidth on [576, 7168] back to back; 59% off)."""
    mode = os.environ.get("DSV3CONV_PDL", "2")
    if device.type != "cuda" or _interpreting() or mode not in ("1", "2"):
        return 0
    return int(mode) if _device_info(device)[1] >= (9, 0) and _triton_has_pdl() else 0


# A launch config: (BLOCK_M, BLOCK_N, num_warps, VEC, STREAM). VEC -1: 16 bytes of output per vector
# (see `_dequant_tile`), 0: the compiler's choice. STREAM: evict-first loads, streaming stores.
Config = tuple[int, int, int, int, bool]


@functools.lru_cache(maxsize=1024)
def pick_config(rows: int, cols: int, num_sms: int) -> Config:
    """Config for one tensor: 64-row tiles when there are enough of them to keep every SM busy,
    fewer rows per tile for small tensors so more programs are in flight.

    Measured on an H200 (kernels/NOTES.md): large tensors reach 92-93% of copy bandwidth with
    (64, 256, 8 warps); tile shape barely matters above ~2000 tiles; small tensors are bound by launch
    and ramp latency, where (16, 256, 4 warps, VEC=-1) was among the best of 14 configs back to back."""
    block_n = 256 if cols > 128 else 128
    for block_m in (64, 32, 16):
        tiles = _cdiv(rows, block_m) * _cdiv(cols, block_n)
        if tiles >= 8 * num_sms:
            break
    if block_m == 16:
        return 16, block_n, 4, -1, False
    return block_m, block_n, 8, 0, False


def pick_segments_config(total_elems: int, num_sms: int) -> Config:
    """Config for a grouped launch (92-97% of copy bandwidth for a layer's 768 experts on an H200)."""
    if total_elems >= 64 * 256 * 8 * num_sms:
        return 64, 256, 8, 0, False
    return 32, 256, 8, 0, False
