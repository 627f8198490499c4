"""CPU kernels in memory: `CpuBackend` dequant and quant at 1, 2, 4, ... threads beside the plain-torch
references, on DeepSeek-V3 shapes, with a bit-for-bit check; no files, no I/O.

    python scripts/bench_cpu_kernels.py [--repeat 3] [--threads 1,2,16] [--scale-fmt float|ue8m0]
        [--step ELEMS] [--task ELEMS]

Prints G elements/s (median of repeats); the pipeline hands the backend one 64 MB piece at a time, as here.
--step (elements per step of torch ops inside a thread) and --task (elements per task handed to a thread)
override the defaults, to see where many threads start waiting on Python's GIL.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch

from dsv3conv import backend as cpu_backend
from dsv3conv.backend import CpuBackend, Item, OutputArena, convert
from dsv3conv.kernels import fp8_block_cpu
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.fp8_block_quant import reference_quant
from dsv3conv.ops import DequantBlockFp8, QuantBlockFp8

SHAPES = [(3584, 18432), (2048, 7168), (7168, 2048), (576, 7168), (24576, 1536), (32768, 512)]


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm up: pages of the buffers, the threads of the pool
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", help="thread counts, e.g. 1,2 (default 1 and every core)")
    ap.add_argument("--scale-fmt", default="float", choices=("float", "ue8m0"))
    ap.add_argument("--step", type=int, default=fp8_block_cpu.STEP_ELEMS)
    ap.add_argument("--task", type=int, default=cpu_backend.TASK_ELEMS)
    args = ap.parse_args()
    fp8_block_cpu.STEP_ELEMS, cpu_backend.TASK_ELEMS = args.step, args.task
    cores = len(os.sched_getaffinity(0))
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    backends = {t: CpuBackend(threads=t) for t in counts}
    heads = " | ".join(f"{op} {t} thr" for op in ("dequant", "quant") for t in counts)
    print(f"torch {torch.__version__}, {cores} cores, scale_fmt {args.scale_fmt}, step {args.step}, "
          f"task {args.task}; G elements/s")
    print(f"| shape | {heads} | dequant reference | quant reference | bit-exact |")
    print("|---|" + "---:|" * (2 * len(counts) + 2) + "---|")
    for rows, cols in SHAPES:
        (d_item, d_in, d_ref), (q_item, q_in, q_ref), (q, s, x) = cases(rows, cols, args.scale_fmt)
        out = OutputArena(rows * cols * 2)  # recycled, as the engine does
        n = rows * cols / 1e9
        rates, exact = [], True
        for item, raw, ref in ((d_item, d_in, d_ref), (q_item, q_in, q_ref)):
            for t in counts:
                run = functools.partial(_convert, backends[t], raw, item, out)
                rates.append(n / median_seconds(run, args.repeat))
                exact &= b"".join(bytes(m) for m in run()) == bytes(ref.reshape(-1).numpy())
        d_eager = n / median_seconds(functools.partial(reference_dequant, q, s), args.repeat)
        q_eager = n / median_seconds(functools.partial(reference_quant, x, args.scale_fmt), args.repeat)
        cells = " | ".join(f"{r:.2f}" for r in rates)
        print(f"| [{rows}, {cols}] | {cells} | {d_eager:.2f} | {q_eager:.2f} | {exact} |", flush=True)
    for b in backends.values():
        b.close()


if __name__ == "__main__":
    main()
