"""FP8 (e4m3) 128x128 block dequantization: plain-torch reference, Triton kernel and launchers.

out[i, j] = round_to_nearest_even(float32(w[i, j]) * float32(scale_inv[i // B, j // B]))
Edge blocks may be partial (rows or columns not a multiple of B). Nothing runs on import.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128


def reference_dequant(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Plain-torch block dequant: the semantics every other implementation must match bit for bit."""
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block_size, dim=0)[:rows].repeat_interleave(block_size, dim=1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(out_dtype)
