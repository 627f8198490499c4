"""CPU kernels in memory: `CpuBackend` dequant and quant (numba, numpy and torch kernels) at 1, 2, 4, ...
threads beside the plain-torch references, on DeepSeek-V3 shapes, with a bit-for-bit check; no files, no I/O.

    python scripts/bench_cpu_kernels.py [--repeat 3] [--threads 1,2,16] [--kernels numba,numpy,torch]
        [--scale-fmt float|ue8m0] [--task ELEMS] [--step ELEMS] [--small] [--json FILE]

Prints G elements/s (median of repeats) per shape, and over all shapes (their elements over their summed
times); the pipeline hands the backend one 64 MB piece at a time, as here. Thread counts default to 1, 2,
4, 8, 16 capped at the cores, plus the core count. --task (elements per task handed to a thread) and --step
(elements per step of the numpy and torch kernels' ops) override the defaults. --small: shapes a quarter the size.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
from _bench import median_seconds, write_json

from dsv3conv import backend as cpu_backend
from dsv3conv.backend import CpuBackend, Item, OutputArena, convert
from dsv3conv.kernels import fp8_block_cpu, fp8_block_host, fp8_numpy
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.fp8_block_quant import reference_quant
from dsv3conv.ops import DequantBlockFp8, QuantBlockFp8

SHAPES = [(3584, 18432), (2048, 7168), (7168, 2048), (576, 7168), (24576, 1536), (32768, 512)]


def cases(rows: int, cols: int, scale_fmt: str):
    """(dequant item, its input, the reference bytes), (quant item, its input, the reference bytes)."""
    gen = torch.Generator().manual_seed(rows + cols)
    x = (torch.randn((rows, cols), generator=gen) * 0.02).to(torch.bfloat16)
    q, s = reference_quant(x, scale_fmt)
    raw_q, raw_x = q.view(torch.uint8).reshape(-1), x.view(-1).view(torch.uint8)
    deq = (Item(DequantBlockFp8("F32"), 0, raw_q.numel(), rows, cols, "F8_E4M3", "BF16", s), raw_q,
           reference_dequant(q, s).view(torch.uint8))
    quant = (Item(QuantBlockFp8(scale_fmt, "F32", "bench_scale_inv"), 0, raw_x.numel(), rows, cols, "BF16", "F8_E4M3",
                  name="bench"), raw_x, torch.cat([raw_q, s.view(-1).view(torch.uint8)]))
    return deq, quant, (q, s, x)


def _convert(backend: CpuBackend, raw: torch.Tensor, item: Item, out: OutputArena) -> list[memoryview]:
    out.reset()
    return convert(backend, raw, [item], out)


def thread_counts(cores: int, given: str | None) -> list[int]:
    if given:
        return [int(t) for t in given.split(",")]
    counts = [t for t in (1, 2, 4, 8, 16) if t <= cores]
    return counts + ([cores] if counts[-1] != cores else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", help="thread counts, e.g. 1,2 (default 1, 2, 4, 8, 16 up to the cores, and the cores)")
    ap.add_argument("--kernels", default="numba,numpy,torch", help="kernels to compare (numba, numpy, torch)")
    ap.add_argument("--scale-fmt", default="float", choices=("float", "ue8m0"))
    ap.add_argument("--step", type=int, default=fp8_block_cpu.STEP_ELEMS)
    ap.add_argument("--task", type=int, default=cpu_backend.TASK_ELEMS)
    ap.add_argument("--small", action="store_true", help="shapes a quarter the size (a quick run)")
    ap.add_argument("--json", type=Path, help="write the rates here too")
    args = ap.parse_args()
    fp8_block_cpu.STEP_ELEMS = fp8_numpy.STEP_ELEMS = args.step
    cpu_backend.TASK_ELEMS = args.task
    cores = len(os.sched_getaffinity(0))
    counts = thread_counts(cores, args.threads)
    kernels = args.kernels.split(",")
    t = time.perf_counter()
    compiled = fp8_block_host.numba_kernel()
    try:
        if compiled is not None:
            compiled.warm()  # every kernel: loaded from numba's cache (compiled there first if need be)
    except Exception as exc:
        fp8_block_host.NUMBA_FAILURES["warm"] = f"{type(exc).__name__}: {exc}"
        compiled = None
    load_s = time.perf_counter() - t
    if "numba" in kernels and compiled is None:
        print(f"the numba kernels are left out: {fp8_block_host.NUMBA_FAILURES}", file=sys.stderr)
        kernels.remove("numba")
    backends = {(k, n): CpuBackend(threads=n, kernel=k) for k in kernels for n in counts}
    runs = [(op, k) for op in ("dequant", "quant") for k in kernels]
    heads = " | ".join(f"{op} {k} {n} thr" for op, k in runs for n in counts)
    print(f"torch {torch.__version__}, numba {getattr(sys.modules.get('numba'), '__version__', None)}, {cores} cores, "
          f"scale_fmt {args.scale_fmt}, task {args.task}, numpy/torch step "
          f"{args.step}; numba kernel loaded in {load_s:.2f} s; G elements/s")
    print(f"| shape | {heads} | dequant reference | quant reference | bit-exact |")
    print("|---|" + "---:|" * (len(runs) * len(counts) + 2) + "---|")
    shapes = [(r // 2, c // 2) for r, c in SHAPES] if args.small else SHAPES
    results, totals = [], {}
    for rows, cols in shapes:
        (d_item, d_in, d_ref), (q_item, q_in, q_ref), (q, s, x) = cases(rows, cols, args.scale_fmt)
        out = OutputArena(rows * cols * 2)  # recycled, as the engine does
        n = rows * cols
        rates, exact = {}, True
        for op, k in runs:
            item, raw, ref = (d_item, d_in, d_ref) if op == "dequant" else (q_item, q_in, q_ref)
            for threads in counts:
                run = functools.partial(_convert, backends[(k, threads)], raw, item, out)
                sec = median_seconds(run, args.repeat)
                rates[f"{op} {k} {threads}"] = n / sec / 1e9
                totals[f"{op} {k} {threads}"] = totals.get(f"{op} {k} {threads}", 0.0) + sec
                exact &= b"".join(bytes(m) for m in run()) == bytes(ref.reshape(-1).numpy())
        rates["dequant reference"] = n / median_seconds(functools.partial(reference_dequant, q, s), args.repeat) / 1e9
        rates["quant reference"] = n / median_seconds(functools.partial(reference_quant, x, args.scale_fmt), args.repeat) / 1e9
        results.append({"shape": [rows, cols], "rates": rates, "bit_exact": exact})
        print(f"| [{rows}, {cols}] | " + " | ".join(f"{r:.2f}" for r in rates.values()) + f" | {exact} |", flush=True)
    elems = sum(r * c for r, c in shapes) / 1e9
    overall = {key: elems / sec for key, sec in totals.items()}
    print("| all shapes | " + " | ".join(f"{overall[key]:.2f}" for key in totals) + " | | | |")
    for op, k in runs:
        most = counts[-1]
        print(f"{op} {k}: {most} threads vs 1: {overall[f'{op} {k} {most}'] / overall[f'{op} {k} {counts[0]}']:.2f}x")
    for b in backends.values():
        b.close()
    write_json(args.json, {"torch": torch.__version__, "cores": cores, "threads": counts, "numba_load_s": load_s,
                           "task": args.task, "shapes": results, "all_shapes": overall})


if __name__ == "__main__":
    main()
