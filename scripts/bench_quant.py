"""CPU quant speed in memory: the compiled path beside the plain-torch reference, and dequant's for comparison.

    python scripts/bench_quant.py [--repeat 3] [--scale-fmt float|ue8m0]

For real DeepSeek-V3 shapes: G elements/s (median of repeats) of BF16 -> e4m3 + scales through
`CpuBackend` (compiled block maxima, then one divide-and-cast pass), of `reference_quant` (eager torch), and
of `CpuBackend`'s fused FP8 -> BF16 dequant; checks that the compiled quant equals the reference bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from dsv3conv.backend import CpuBackend, Item
from dsv3conv.kernels.fp8_block_quant import reference_quant

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import median_seconds  # noqa: E402  (one timing helper for the CPU benchmarks)

SHAPES = [(7168, 18432), (2048, 7168), (7168, 2048), (576, 7168), (24576, 1536), (32768, 512)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale-fmt", default="float", choices=("float", "ue8m0"))
    args = ap.parse_args()
    backend = CpuBackend()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, scale_fmt {args.scale_fmt}, F32 scales")
    print("| shape | quant compiled G el/s | quant eager reference G el/s | speed-up | bit-exact "
          "| dequant compiled G el/s |")
    print("|---|---|---|---|---|---|")
    for rows, cols in SHAPES:
        gen = torch.Generator().manual_seed(rows + cols)
        w = (torch.randn((rows, cols), generator=gen) * 0.02).to(torch.bfloat16)
        raw = w.view(-1).view(torch.uint8)
        q_item = Item(0, raw.numel(), rows, cols, None, "F8_E4M3", src_dtype="BF16", scale_fmt=args.scale_fmt,
                      scale_dtype="F32", name="bench")
        fused = median_seconds(functools.partial(backend.run, raw, [q_item]), args.repeat)
        eager = median_seconds(functools.partial(reference_quant, w, args.scale_fmt), args.repeat)
        q_bytes, s_bytes = backend.run(raw, [q_item])
        q_ref, s_ref = reference_quant(w, args.scale_fmt)
        exact = (bytes(q_bytes) == q_ref.view(torch.uint8).numpy().tobytes()
                 and bytes(s_bytes) == s_ref.view(torch.uint8).numpy().tobytes())
        fp8 = torch.frombuffer(bytearray(q_bytes), dtype=torch.uint8)
        d_item = Item(0, fp8.numel(), rows, cols, s_ref, "BF16")
        dequant = median_seconds(functools.partial(backend.run, fp8, [d_item]), args.repeat)
        n = rows * cols / 1e9
        print(f"| [{rows}, {cols}] | {n / fused:.2f} | {n / eager:.2f} | {eager / fused:.1f}x | {exact} "
              f"| {n / dequant:.2f} |", flush=True)


if __name__ == "__main__":
    main()
