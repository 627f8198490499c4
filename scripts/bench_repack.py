"""MXFP4 -> 128x128 block FP8 repack (`dequant --experts fp8`): exactness and speed on DeepSeek-V4 expert shapes.

For each shape: the repack on the CPU (`mxfp4_cpu.repack_rows` in 128-row ranges, the table path the CPU
backend's pool runs, here in one thread) and, with CUDA, the same plain-torch kernel on the GPU; checks GPU == CPU bit for bit, no
lossy block, and dequant(repacked) == dequant(source) (bf16); prints ms and G elements/s.
Without CUDA it says so and runs the CPU part only.

    python scripts/bench_repack.py [--json PATH] [--rows N]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _bench import finish

from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_cpu import repack_rows
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.kernels.mxfp4_to_fp8 import repack_mxfp4_to_fp8

# Unpacked [out, in] of routed experts: V4-Flash w1/w3, w2; V4-Pro w1/w3, w2.
SHAPES = [(2048, 4096), (4096, 2048), (3072, 7168), (7168, 3072)]


def _inputs(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    scale = torch.randint(115, 125, (rows, cols // 32), dtype=torch.uint8, generator=gen)
    return packed, scale


def _cpu(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    q = torch.empty((rows, cols), dtype=torch.uint8)
    s = torch.empty((-(-rows // 128), -(-cols // 128)), dtype=torch.float8_e8m0fnu)
    args = (packed.numpy(), scale.numpy(), q.numpy(), s.view(torch.uint8).numpy(), "float8_e8m0fnu")
    repack_rows(*args, 0, min(128, rows))  # warm-up (builds the lookup table)
    t = time.perf_counter()
    lossy = sum(repack_rows(*args, r0, min(r0 + 128, rows)) for r0 in range(0, rows, 128))
    return q, s, lossy, time.perf_counter() - t


def _gpu(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    p, sc = packed.cuda(), scale.cuda()
    repack_mxfp4_to_fp8(p, sc)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    q, s, _ = repack_mxfp4_to_fp8(p, sc)
    end.record()
    torch.cuda.synchronize()
    return q.cpu(), s.cpu(), start.elapsed_time(end) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--rows", type=int, default=0, help="use only the first N rows of each shape (quick runs)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA GPU: GPU checks and timings skipped")
    results, ok = [], True
    for rows, cols in SHAPES:
        rows = min(rows, args.rows) if args.rows else rows
        packed, scale = _inputs(rows, cols, seed=rows + cols)
        q, s, lossy, cpu_s = _cpu(packed, scale)
        exact = lossy == 0 and torch.equal(
            reference_dequant(q.view(torch.float8_e4m3fn), s, torch.bfloat16).view(torch.int16),
            reference_dequant_mxfp4(packed, scale, torch.bfloat16).view(torch.int16))
        row = {"shape": [rows, cols], "cpu_ms_1_thread": cpu_s * 1e3, "cpu_g_elements_s": rows * cols / cpu_s / 1e9,
               "lossy_blocks": lossy, "round_trip_exact": exact}
        line = f"[{rows},{cols}] CPU 1 thread {cpu_s * 1e3:.1f} ms ({row['cpu_g_elements_s']:.3f} G el/s), exact {exact}"
        if cuda:
            gq, gs, gpu_s = _gpu(packed, scale)
            same = torch.equal(gq.view(torch.uint8), q) and torch.equal(gs.view(torch.uint8), s.view(torch.uint8))
            row.update(gpu_ms=gpu_s * 1e3, gpu_g_elements_s=rows * cols / gpu_s / 1e9, gpu_equals_cpu=same)
            line += f"; GPU {gpu_s * 1e3:.2f} ms ({row['gpu_g_elements_s']:.1f} G el/s), same bytes as CPU {same}"
            ok &= same
        ok &= exact
        results.append(row)
        print(line)
    return finish(results, args.json, ok)


if __name__ == "__main__":
    sys.exit(main())
