"""dsv3conv: convert DeepSeek-V3-style FP8 block-quantized checkpoints."""

__version__ = "0.1.0"
