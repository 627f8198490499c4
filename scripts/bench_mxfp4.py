"""MXFP4 dequant: bit-exactness on the GPU and speed against the device's copy bandwidth; the CPU path's speed.

Bytes moved per packed byte: 1 read + 1/16 scale read + 2 values written (4 bytes of bf16), the bar of the FP8
kernel's benchmark (scripts/bench_kernel.py). The GPU part checks each shape bit for bit against the torch
reference, then times `dequant_mxfp4` (triton's do_bench: median, L2 flushed) on DeepSeek-V4 expert shapes
and a config sweep, each against a device-to-device copy of the same bytes (half read, half written) and
against a large copy (the device's peak), and a whole V4-Flash layer of experts (768 tensors launched back to
back, CUDA events) against one copy of its bytes. Without CUDA it says so and runs the CPU part only.

    python scripts/bench_mxfp4.py [--json PATH] [--cpu-rows N]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from _bench import median_seconds, write_json

from dsv3conv.kernels import mxfp4_cpu
from dsv3conv.kernels import mxfp4_dequant as mx

# Unpacked [out, in] of routed experts: V4-Flash w1/w3, w2; V4-Pro w1/w3, w2.
SHAPES = [(2048, 4096), (4096, 2048), (3072, 7168), (7168, 3072)]
SWEEP = [(64, 128, 8), (32, 128, 4), (128, 64, 8), (64, 256, 8), (16, 128, 4), (128, 128, 8)]


def _inputs(rows: int, cols: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, generator=gen)
    scale = torch.randint(110, 130, (rows, -(-cols // 32)), dtype=torch.uint8, generator=gen)
    return packed.to(device), scale.to(device)


def moved_bytes(rows: int, cols: int, out_dtype: torch.dtype) -> int:
    return rows * cols // 2 + rows * cols // 32 + rows * cols * out_dtype.itemsize


def copy_ms(nbytes: int) -> float:
    """Median ms of a device-to-device copy moving `nbytes` (half read, half written)."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")


def check_exact(results: dict) -> None:
    exact = []
    for rows, cols in SHAPES + [(1, 2), (129, 514), (576, 7168)]:
        p, s = _inputs(rows, cols, "cpu", seed=rows + cols)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            ref = mx.reference_dequant_mxfp4(p, s, dt)
            got = mx.dequant_mxfp4(p.cuda(), s.cuda(), dt).cpu()
            it = {2: torch.int16, 4: torch.int32}[dt.itemsize]
            same = torch.equal(ref.view(it), got.view(it))
            exact.append(same)
            if not same:
                print(f"MISMATCH [{rows},{cols}] -> {dt}: {int((ref.view(it) != got.view(it)).sum())} values")
    results["bit_exact_cases"] = f"{sum(exact)}/{len(exact)}"
    results["all_exact"] = all(exact)
    print(f"bit-exact vs reference: {sum(exact)}/{len(exact)} cases")


def per_shape(results: dict, peak: float) -> None:
    from triton.testing import do_bench

    rows_out = []
    for rows, cols in SHAPES:
        p, s = _inputs(rows, cols, "cuda")
        out = torch.empty((rows, cols), dtype=torch.bfloat16, device="cuda")
        nbytes = moved_bytes(rows, cols, torch.bfloat16)
        same = nbytes / copy_ms(nbytes) / 1e9
        for config in [mx.pick_config(rows, cols // 2)] + SWEEP:
            ms = do_bench(lambda c=config: mx.launch(p, s, out, c), warmup=25, rep=150, return_mode="median")
            tbs = nbytes / ms / 1e9
            rows_out.append({"shape": [rows, cols], "config": list(config), "ms": ms, "tb_s": tbs,
                             "copy_same_bytes_tb_s": same, "pct_copy_same_bytes": 100 * tbs / same,
                             "pct_copy": 100 * tbs / peak})
            print(f"[{rows},{cols}] config {config}: {ms * 1e3:.1f} us, {tbs:.2f} TB/s ({100 * tbs / same:.0f}% "
                  f"of a copy of the same {nbytes / 1e6:.0f} MB at {same:.2f} TB/s, {100 * tbs / peak:.0f}% of peak)")
    results["gpu"] = rows_out


def layer(results: dict, peak: float, experts: int = 256) -> None:
    """A V4-Flash layer's routed experts (w1, w3 [2048, 4096], w2 [4096, 2048]) from flat buffers, one launch
    per tensor back to back, as a conversion issues them; against one copy of the same bytes."""
    shapes = [(2048, 4096), (2048, 4096), (4096, 2048)] * experts
    packed = torch.randint(-128, 128, (sum(r * c // 2 for r, c in shapes),), dtype=torch.int8, device="cuda")
    scales = torch.randint(110, 130, (sum(r * c // 32 for r, c in shapes),), dtype=torch.uint8, device="cuda")
    out = torch.empty(sum(r * c for r, c in shapes), dtype=torch.bfloat16, device="cuda")
    views, po, so, oo = [], 0, 0, 0
    for r, c in shapes:
        views.append((packed[po : po + r * c // 2].view(r, c // 2), scales[so : so + r * c // 32].view(r, c // 32),
                      out[oo : oo + r * c].view(r, c), mx.pick_config(r, c // 2)))
        po, so, oo = po + r * c // 2, so + r * c // 32, oo + r * c
    nbytes = sum(moved_bytes(r, c, torch.bfloat16) for r, c in shapes)

    def run() -> None:
        for p, s, o, config in views:
            mx.launch(p, s, o, config)

    run()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    same = nbytes / copy_ms(nbytes) / 1e9
    tbs = nbytes / ms / 1e9
    results["layer"] = {"tensors": len(shapes), "gb_moved": nbytes / 1e9, "ms": ms, "tb_s": tbs,
                        "copy_same_bytes_tb_s": same, "pct_copy_same_bytes": 100 * tbs / same,
                        "pct_copy": 100 * tbs / peak}
    print(f"V4-Flash layer, {len(shapes)} experts back to back: {nbytes / 1e9:.1f} GB moved in {ms:.1f} ms, "
          f"{tbs:.2f} TB/s ({100 * tbs / same:.0f}% of one copy of the same bytes at {same:.2f} TB/s)")


def gpu(results: dict) -> None:
    peak = 2 * 2**30 / copy_ms(2 * 2**30) / 1e9
    results["copy_tb_s"] = peak
    print(f"device copy, 2 GiB moved: {peak:.2f} TB/s (read + write)")
    check_exact(results)
    per_shape(results, peak)
    layer(results, peak)


def cpu(results: dict, rows: int) -> None:
    """The CPU backend's MXFP4 dequant (`mxfp4_cpu.dequant_rows`, numpy), one thread, [rows, 4096] -> bf16."""
    p, s = _inputs(rows, 4096, "cpu")
    out = np.empty((rows, 4096), dtype=np.uint16)
    packed, scale = p.view(torch.uint8).numpy(), s.numpy()
    dt = median_seconds(lambda: mxfp4_cpu.dequant_rows(packed, scale, out, "bfloat16", 0, rows), 3)
    rate = rows * 4096 / dt / 1e9
    results["cpu_g_elements_s"] = rate
    results["cpu_threads"] = 1
    print(f"CPU (numpy table, the CPU backend's kernel): [{rows},4096] -> bf16 in {dt * 1e3:.1f} ms, "
          f"{rate:.2f} G elements/s (1 thread)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cpu-rows", type=int, default=2048)
    args = ap.parse_args()
    results: dict = {}
    if torch.cuda.is_available():
        gpu(results)
    else:
        print("no CUDA GPU: GPU checks and timings skipped")
    cpu(results, args.cpu_rows)
    write_json(args.json, results)
    return 0 if results.get("all_exact", True) else 1


if __name__ == "__main__":
    sys.exit(main())
