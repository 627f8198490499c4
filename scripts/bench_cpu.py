"""CPU dequant speed in memory: dsv3conv's fused compiled pass beside the plain-torch reference, one run.

    python scripts/bench_cpu.py [--repeat 5]

Prints G elements/s (median of repeats) for real DeepSeek-V3 shapes and checks the two agree bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3conv.backend import CpuBackend, Item
from dsv3conv.kernels.fp8_block_dequant import reference_dequant

SHAPES = [(7168, 18432), (3584, 18432), (2048, 7168), (7168, 2048), (576, 7168), (24576, 1536), (32768, 512)]


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm up (and compile)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    backend = CpuBackend()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; [3584, 18432] is one 64 MB chunk as the "
          "pipeline converts [7168, 18432]")
    print("| shape | fused compiled G el/s | eager reference G el/s | speed-up | bit-exact |")
    print("|---|---|---|---|---|")
    for rows, cols in SHAPES:
        gen = torch.Generator().manual_seed(rows + cols)
        raw = torch.randint(0, 256, (rows * cols,), dtype=torch.uint8, generator=gen)
        raw[(raw & 0x7F) == 0x7F] = 0
        scale = torch.rand((-(-rows // 128), -(-cols // 128)), generator=gen) + 1e-3
        item = Item(0, raw.numel(), rows, cols, scale, "BF16")
        w = raw.view(torch.float8_e4m3fn).view(rows, cols)
        out = torch.empty(rows * cols * 2, dtype=torch.uint8)  # recycled, as the pipeline does
        fused = median_seconds(lambda: backend.run(raw, [item], out), args.repeat)
        eager = median_seconds(lambda: reference_dequant(w, scale), args.repeat)
        (got,) = backend.run(raw, [item])
        exact = bytes(got) == reference_dequant(w, scale).view(torch.uint8).numpy().tobytes()
        n = rows * cols / 1e9
        print(f"| [{rows}, {cols}] | {n / fused:.2f} | {n / eager:.2f} | {eager / fused:.1f}x | {exact} |")


if __name__ == "__main__":
    main()
