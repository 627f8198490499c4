"""safetensors dtype names, their sizes and their torch dtypes (one table for the project).

The name tables need no torch: planning modules use them and start fast. `TORCH_DTYPES` (the floating-point
types: weights, scales, outputs), `INTEGER_DTYPES` (integer types some checkpoints also store: packed FP4
bytes, router tables) and `SAFETENSORS_DTYPES` (torch dtype -> name, both kinds) import torch on first use.
"""

from __future__ import annotations

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# safetensors name -> the torch attribute of that dtype
TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
INTEGER_NAMES: dict[str, str] = {
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
}
# the torch name, as options and configs spell a dtype -> its safetensors name ("bfloat16" -> "BF16")
FLOAT_DTYPES: dict[str, str] = {v: k for k, v in TORCH_NAMES.items()}
OUT_DTYPES = ("bfloat16", "float16", "float32")  # what dequant writes
SCALE_DTYPES = ("float32", "bfloat16", "float16", "float8_e8m0fnu")  # what quant writes scales in


def __getattr__(name: str):
    if name not in ("TORCH_DTYPES", "INTEGER_DTYPES", "SAFETENSORS_DTYPES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    torch_dtypes = {k: getattr(torch, v) for k, v in TORCH_NAMES.items()}
    integer_dtypes = {k: getattr(torch, v) for k, v in INTEGER_NAMES.items()}
    every = {**torch_dtypes, **integer_dtypes}
    globals().update(TORCH_DTYPES=torch_dtypes, INTEGER_DTYPES=integer_dtypes,
                     SAFETENSORS_DTYPES={v: k for k, v in every.items()})
    return globals()[name]
