"""safetensors dtype names of the floating-point types and their torch dtypes (one map for the project).

The name table needs no torch: planning modules use it and start fast. `TORCH_DTYPES` (and its inverse
`SAFETENSORS_DTYPES`) import torch on first use, where computing happens.
"""

from __future__ import annotations

# safetensors name -> the torch attribute of that dtype
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


def __getattr__(name: str):
    if name not in ("TORCH_DTYPES", "SAFETENSORS_DTYPES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    torch_dtypes = {k: getattr(torch, v) for k, v in TORCH_NAMES.items()}
    globals().update(TORCH_DTYPES=torch_dtypes, SAFETENSORS_DTYPES={v: k for k, v in torch_dtypes.items()})
    return globals()[name]
