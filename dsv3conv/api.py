"""The Python API: what the commands do, for programs and notebooks.

    from dsv3conv.api import dequantize
    summary = dequantize("DeepSeek-V3", "DeepSeek-V3-bf16", mtp="drop")

Each function takes the command's options as keyword arguments and returns the summary its `--json` prints.
Nothing inside the package imports this module.
"""

from __future__ import annotations

from dsv3conv.commands import dequantize, quantize, split_mtp
from dsv3conv.verify import combine_reports, verify_checkpoint

__all__ = ["combine_reports", "dequantize", "quantize", "split_mtp", "verify_checkpoint"]
