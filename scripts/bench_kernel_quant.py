"""Speed of the Triton block quant (BF16 -> e4m3 + 128x128 float32 scales) on a CUDA GPU, beside the
plain-torch reference, on the FP8 shapes of DeepSeek-V3. GB/s count 2 bytes read and 1 written per element;
each figure is the median of `--repeat` timed calls (CUDA events). Bit-exactness is tests/test_gpu_kernels.py's.

    python scripts/bench_kernel_quant.py [--repeat 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from _bench import finish, median_seconds

from dsv3conv.kernels.fp8_block_quant import quant, reference_quant

SHAPES = [
    (7168, 18432), (18432, 7168), (2048, 7168), (7168, 2048), (576, 7168),
    (24576, 1536), (32768, 512), (7168, 16384), (1536, 7168),
]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per shape (median)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench_kernel_quant needs a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    gen = torch.Generator(device=device).manual_seed(7)
    results = []
    print("| shape | Triton quant GB/s | reference GB/s | speed-up |\n|---|---:|---:|---:|")
    for rows, cols in SHAPES:
        w = torch.randn((rows, cols), device=device, generator=gen).to(torch.bfloat16)
        q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=device)
        s = torch.empty((-(-rows // 128), -(-cols // 128)), dtype=torch.float32, device=device)
        t_kernel = median_seconds(functools.partial(quant, w, out=q, scale_out=s), args.repeat, gpu=True)
        t_ref = median_seconds(functools.partial(reference_quant, w), args.repeat, gpu=True)
        gb = rows * cols * 3 / 1e9
        results.append({"shape": [rows, cols], "kernel_s": t_kernel, "reference_s": t_ref, "gb": gb})
        print(f"| [{rows}, {cols}] | {gb / t_kernel:.0f} | {gb / t_ref:.0f} | {t_ref / t_kernel:.1f}x |", flush=True)
        del w, q, s
        torch.cuda.empty_cache()
    return finish({"device": torch.cuda.get_device_name(device), "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
