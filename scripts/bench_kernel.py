"""Benchmark the Triton block dequant on a CUDA GPU against a one-tile-per-program baseline and plain torch.

Effective bandwidth counts 1 byte read + 2 bytes written (bf16) per element + 4 bytes per scale, against
the device's copy bandwidth (a large device-to-device copy, bytes read + written). Two timings:
- `triton.testing.do_bench` median of one call (it flushes L2 before each call); inputs also rotate over
  several buffer sets so small shapes are not served from the 50 MB L2;
- "graph": 16 calls over the rotating sets captured in a CUDA graph and replayed, time per call
  (calls back to back, as when a pipeline converts many tensors; no launch gaps).

    python scripts/bench_kernel.py [--sweep] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl
from _bench import write_json
from triton.testing import do_bench

import dsv3conv.kernels.fp8_block_dequant as fbd

SHAPES = [
    (7168, 18432), (18432, 7168), (2048, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384),
    (1536, 7168),
]  # fmt: skip
EXPERT_BATCH = [(2048, 7168)] * 256 + [(2048, 7168)] * 256 + [(7168, 2048)] * 256  # gate, up, down of a layer
# (BLOCK_M, BLOCK_N, num_warps, VEC, STREAM): see fp8_block_dequant.Config.
SWEEP_CONFIGS = [
    (16, 256, 4, 0, False), (16, 256, 4, -1, False), (16, 256, 4, 0, True), (32, 256, 8, 0, False),
    (64, 256, 8, 0, False), (64, 256, 8, 0, True),
]  # fmt: skip
SWEEP_SHAPES = [(7168, 18432), (2048, 7168), (576, 7168), (24576, 1536), (32768, 512), (1536, 7168)]
ROTATE_BYTES = 256 * 2**20  # keep the rotating working set well above L2


@triton.jit
def _baseline_kernel(w_ptr, s_ptr, o_ptr, rows, cols, BLOCK: tl.constexpr):
    """Baseline: one program per 128 x 128 scale block, the layout of the public reference kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs = offs_m[:, None] * cols + offs_n[None, :]
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + pid_m * tl.cdiv(cols, BLOCK) + pid_n)
    tl.store(o_ptr + offs, (w * s).to(o_ptr.dtype.element_ty), mask=mask)


def baseline_dequant(w: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    _baseline_kernel[(triton.cdiv(rows, 128), triton.cdiv(cols, 128))](w, s, out, rows, cols, BLOCK=128)
    return out


def bench(fn) -> float:
    """Median milliseconds of one call, L2 flushed before each (triton's do_bench)."""
    return do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench_graph(fn, launches: int = 16, replays: int = 20) -> float:
    """Milliseconds per call, `launches` calls captured in a CUDA graph and replayed back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * launches)


def host_us_per_call(fn, calls: int = 300) -> float:
    """Host microseconds per call, the GPU not waited on: the launcher's cost when kernels are short."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / calls * 1e6


def copy_bandwidth(device) -> float:
    n = 2 * 2**30
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e12


def dq_bytes(rows: int, cols: int, out_size: int = 2) -> int:
    return rows * cols * (1 + out_size) + math.ceil(rows / 128) * math.ceil(cols / 128) * 4


def tbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def make_sets(rows: int, cols: int, device, gen) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    n_sets = max(1, min(16, math.ceil(ROTATE_BYTES / dq_bytes(rows, cols))))
    sets = []
    for _ in range(n_sets):
        w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
        w[(w & 0x7F) == 0x7F] -= 1
        s_shape = (math.ceil(rows / 128), math.ceil(cols / 128))
        s = torch.exp2(torch.rand(s_shape, device=device, generator=gen) * 8 - 12)
        sets.append(
            (w.view(torch.float8_e4m3fn), s, torch.empty((rows, cols), dtype=torch.bfloat16, device=device))
        )
    return sets


def rotating(sets, call):
    state = {"i": 0}

    def fn():
        w, s, o = sets[state["i"] % len(sets)]
        state["i"] += 1
        call(w, s, o)

    return fn


def ours(w, s, o):
    fbd.dequant(w, s, torch.bfloat16, out=o)


def torch_ref(w, s, o):
    fbd.reference_dequant(w, s, torch.bfloat16)


class ExpertBatch:
    """A layer's routed experts in flat byte buffers, as the pipeline would hold them."""

    def __init__(self, shapes, device, gen) -> None:
        self.shapes = shapes
        self.segments, src_off, dst_off, scale_off = [], 0, 0, 0
        for rows, cols in shapes:
            self.segments.append((src_off, dst_off, scale_off, rows, cols))
            src_off += rows * cols
            dst_off += rows * cols * 2
            scale_off += math.ceil(rows / 128) * math.ceil(cols / 128)
        self.src = torch.randint(0, 256, (src_off,), dtype=torch.uint8, device=device, generator=gen)
        self.src[(self.src & 0x7F) == 0x7F] -= 1
        self.scales = torch.exp2(torch.rand(scale_off, device=device, generator=gen) * 8 - 12)
        self.dst = torch.empty(dst_off, dtype=torch.uint8, device=device)
        self.bytes = sum(dq_bytes(r, c) for r, c in shapes)
        self.view_list = [self.views(k) for k in range(len(shapes))]  # host slicing stays out of the timing

    def views(self, k: int):
        so, do, co, rows, cols = self.segments[k]
        sr, sc = math.ceil(rows / 128), math.ceil(cols / 128)
        w = self.src[so : so + rows * cols].view(torch.float8_e4m3fn).view(rows, cols)
        s = self.scales[co : co + sr * sc].view(sr, sc)
        o = self.dst[do : do + rows * cols * 2].view(torch.bfloat16).view(rows, cols)
        return w, s, o

    def ours(self) -> None:
        fbd.dequant_segments(self.src, self.dst, self.scales, self.segments, torch.bfloat16)

    def baseline(self) -> None:
        for w, s, o in self.view_list:
            baseline_dequant(w, s, o)

    def torch_subset(self, n: int) -> None:
        for w, s, o in self.view_list[:n]:
            o.copy_(fbd.reference_dequant(w, s, torch.bfloat16))

    def check(self) -> bool:
        self.dst.fill_(0xFF)
        self.ours()
        for k in (0, len(self.segments) // 2, len(self.segments) - 1):
            w, s, o = self.views(k)
            if not torch.equal(
                o.view(torch.int16), fbd.reference_dequant(w, s, torch.bfloat16).view(torch.int16)
            ):
                return False
        return True


def run_sweep(device, gen, copy_bw: float, batch: ExpertBatch) -> list[dict]:
    """Our kernel under each config (the launcher's config pickers are patched)."""
    pick, pick_seg = fbd.pick_config, fbd.pick_segments_config
    rows_out = []
    sets = {shape: make_sets(*shape, device, gen) for shape in SWEEP_SHAPES}
    try:
        for cfg in SWEEP_CONFIGS:
            fbd.pick_config = lambda r, c, n, cfg=cfg: cfg
            fbd.pick_segments_config = lambda e, n, cfg=cfg: cfg
            row = {"config": list(cfg)}
            for shape in SWEEP_SHAPES:
                call = rotating(sets[shape], ours)
                key = f"{shape[0]}x{shape[1]}"
                row[key] = round(tbps(dq_bytes(*shape), bench(call)), 3)
                row[key + " graph"] = round(tbps(dq_bytes(*shape), bench_graph(call)), 3)
            row["experts"] = round(tbps(batch.bytes, bench(batch.ours)), 3)
            rows_out.append(row)
            print("sweep", row, flush=True)
    finally:
        fbd.pick_config, fbd.pick_segments_config = pick, pick_seg
    del sets
    for graph in (False, True):
        keys = [k for k in rows_out[0] if k != "config" and k.endswith(" graph") == graph]
        print(f"\nsweep, {'back to back (CUDA graph)' if graph else 'do_bench one call'}: TB/s (% of copy)")
        print("| BLOCK_M, BLOCK_N, warps, VEC, STREAM | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for row in rows_out:
            cells = " | ".join(f"{row[k]:.2f} ({100 * row[k] / copy_bw:.0f}%)" for k in keys)
            print(f"| {tuple(row['config'])} | {cells} |")
    return rows_out


PDL_SWEEP_SHAPES = [(576, 7168), (1536, 7168), (2048, 7168), (32768, 512)]
PDL_SWEEP_CONFIGS = [
    (16, 256, 4, -1, False), (16, 256, 4, 0, False), (32, 256, 8, 0, False), (32, 256, 4, -1, False),
    (16, 128, 4, -1, False), (8, 256, 2, -1, False), (16, 512, 8, -1, False),
]  # fmt: skip


def run_pdl_sweep(device, gen, copy_bw: float) -> list[dict]:
    """Back to back (CUDA graph) TB/s of single-tensor launches: each config under each PDL mode."""
    pick = fbd.pick_config
    rows_out = []
    sets = {shape: make_sets(*shape, device, gen) for shape in PDL_SWEEP_SHAPES}
    try:
        for cfg in PDL_SWEEP_CONFIGS:
            fbd.pick_config = lambda r, c, n, cfg=cfg: cfg
            for mode in ("0", "1", "2"):
                os.environ["DSV3CONV_PDL"] = mode
                row = {"config": list(cfg), "pdl": int(mode)}
                for shape in PDL_SWEEP_SHAPES:
                    call = rotating(sets[shape], ours)
                    row[f"{shape[0]}x{shape[1]}"] = round(tbps(dq_bytes(*shape), bench_graph(call)), 3)
                rows_out.append(row)
                print("pdl sweep", row, flush=True)
    finally:
        fbd.pick_config = pick
        os.environ.pop("DSV3CONV_PDL", None)
    keys = [f"{r}x{c}" for r, c in PDL_SWEEP_SHAPES]
    print("\nPDL sweep, back to back (CUDA graph): TB/s (% of copy)")
    print("| BLOCK_M, BLOCK_N, warps, VEC, STREAM | PDL | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for row in rows_out:
        cells = " | ".join(f"{row[k]:.2f} ({100 * row[k] / copy_bw:.0f}%)" for k in keys)
        print(f"| {tuple(row['config'])} | {row['pdl']} | {cells} |")
    return rows_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument(
        "--sweep", action="store_true", help="also time our kernel under several tile configs"
    )
    parser.add_argument("--pdl-sweep", action="store_true", help="only: small-tensor configs x PDL modes")
    parser.add_argument("--experts", type=int, default=len(EXPERT_BATCH), help="segments in the expert batch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench_kernel needs a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    name = torch.cuda.get_device_name(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    copy_bw = copy_bandwidth(device)
    print(f"device {name}, {sms} SMs; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(f"copy bandwidth (read + write): {copy_bw:.3f} TB/s", flush=True)

    if args.pdl_sweep:
        sweep = run_pdl_sweep(device, gen, copy_bw)
        write_json(args.json, {"device": name, "copy_tbps": copy_bw, "pdl_sweep": sweep})
        return 0

    results = []
    for rows, cols in SHAPES:
        sets = make_sets(rows, cols, device, gen)
        w, s, o = sets[0]
        o.fill_(float("nan"))
        fbd.dequant(w, s, torch.bfloat16, out=o)
        exact = torch.equal(
            o.view(torch.int16), fbd.reference_dequant(w, s, torch.bfloat16).view(torch.int16)
        )
        r = {
            "case": f"[{rows},{cols}]",
            "bytes": dq_bytes(rows, cols),
            "config": list(fbd.pick_config(rows, cols, sms)),
            "exact": exact,
            "ours_ms": bench(rotating(sets, ours)),
            "baseline_ms": bench(rotating(sets, baseline_dequant)),
            "torch_ms": bench(rotating(sets, torch_ref)),
            "ours_graph_ms": bench_graph(rotating(sets, ours)),
            "baseline_graph_ms": bench_graph(rotating(sets, baseline_dequant)),
            "ours_host_us": host_us_per_call(rotating(sets, ours)),
        }
        os.environ["DSV3CONV_PDL"] = "0"  # the same kernel launched without programmatic dependent launch
        r["ours_nopdl_ms"] = bench(rotating(sets, ours))
        r["ours_nopdl_graph_ms"] = bench_graph(rotating(sets, ours))
        del os.environ["DSV3CONV_PDL"]
        results.append(r)
        print(r, flush=True)
        del sets
        torch.cuda.empty_cache()

    batch = ExpertBatch(EXPERT_BATCH[: args.experts], device, gen)
    n_torch = 16
    torch_bytes = sum(dq_bytes(r, c) for r, c in batch.shapes[:n_torch])
    r = {
        "case": f"experts {len(batch.shapes)} segs (1 launch)",
        "bytes": batch.bytes,
        "config": list(fbd.pick_segments_config(sum(r * c for r, c in batch.shapes), sms)),
        "exact": batch.check(),
        "ours_ms": bench(batch.ours),
        "baseline_ms": bench(batch.baseline),  # one launch per expert
        # measured on the first 16 experts, scaled to the batch by bytes
        "torch_ms": bench(lambda: batch.torch_subset(n_torch)) * batch.bytes / torch_bytes,
        "ours_host_us": host_us_per_call(batch.ours, calls=20),
    }
    results.append(r)
    print(r, flush=True)

    sweep = run_sweep(device, gen, copy_bw, batch) if args.sweep else None

    print(f"\n## {name}: copy {copy_bw:.2f} TB/s (read + write); bf16 out; TB/s (% of copy)")
    print("do_bench: median of one call, L2 flushed; graph: calls back to back in a CUDA graph\n")
    print(f"PDL (programmatic dependent launch) on this GPU: {fbd.pdl_mode(device)}; 'no PDL': DSV3CONV_PDL=0\n")
    print(
        "| case | GB moved | ours | ours, no PDL | baseline 128x128/program | torch reference | ours, graph "
        "| ours, graph, no PDL | baseline, graph | ours config | exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        cells = []
        for key in ("ours_ms", "ours_nopdl_ms", "baseline_ms", "torch_ms", "ours_graph_ms", "ours_nopdl_graph_ms",
                    "baseline_graph_ms"):
            if key not in r:
                cells.append("-")
                continue
            bw = tbps(r["bytes"], r[key])
            r[key.replace("_ms", "_tbps")] = bw
            cells.append(f"{bw:.2f} ({100 * bw / copy_bw:.0f}%)")
        line = f"| {r['case']} | {r['bytes'] / 1e9:.2f} | {' | '.join(cells)} | {tuple(r['config'])} | {r['exact']} |"
        print(line)
    print(
        "\nhost us per call (launcher): " + ", ".join(f"{r['case']} {r['ours_host_us']:.0f}" for r in results)
    )
    write_json(args.json, {"device": name, "copy_tbps": copy_bw, "results": results, "sweep": sweep})
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
