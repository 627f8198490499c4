"""Bit-exactness and speed of the Triton block quant (BF16/F16/F32 -> e4m3 + 128x128 scales) on a CUDA GPU.

Compares `quant` with `reference_quant` bit for bit (e4m3 bytes and scale bytes): both e4m3 paths (native
`cvt.rn.satfinite` on sm89+, integer encoder), every scale format and dtype, awkward shapes and every FP8
shape of DeepSeek-V3; the reference runs on the same GPU and, for the smaller shapes, on the CPU too (the
CPU is the definition). Also: the encoders on every finite bfloat16 in [-448, 448] and every rounding tie,
special blocks (all-zero, tiny, NaN/Inf, float16 overflow), the `quant` pipeline on CUDA against the CPU
(identical files), and the kernel's speed against the reference (GB/s, counting source bytes read + e4m3
bytes written). Prints PASS/FAIL lines; exits 1 on any failure.

    python scripts/gpu_check_quant.py [--verbose] [--repeat 20]
    TRITON_INTERPRET=1 python scripts/gpu_check_quant.py --smoke   # CPU dry run of this script, small shapes
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3conv.kernels.fp8_block_quant import quant, reference_quant, resolve_encode_bits

DSV3_SHAPES = [
    (7168, 18432), (18432, 7168), (2048, 7168), (7168, 2048), (576, 7168),
    (24576, 1536), (32768, 512), (7168, 16384), (1536, 7168),
]  # fmt: skip
AWKWARD_SHAPES = [(1, 1), (129, 257), (128, 128), (300, 1000), (576, 300), (127, 129), (1, 7168), (7168, 1)]
CONFIGS = [("float", torch.float32), ("float", torch.bfloat16), ("float", torch.float16),
           ("ue8m0", torch.float32), ("ue8m0", torch.float8_e8m0fnu)]
CPU_CHECK_ELEMS = 16 * 2**20  # shapes up to this size are also checked against the CPU reference


def short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float8_e8m0fnu", "e8m0")


def weights(rows: int, cols: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Rows of magnitudes 2^-24 .. 2^4 (exercising e4m3 subnormals and every scale range), zeros, an all-zero block."""
    gen = torch.Generator(device=device).manual_seed(seed)
    mag = torch.exp2(torch.randint(-24, 4, (rows, 1), device=device, generator=gen).float())
    w = torch.randn((rows, cols), device=device, generator=gen) * mag
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0
    return w.to(dtype)


def mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    if got.shape != want.shape or got.dtype != want.dtype:
        return max(want.numel(), 1)
    return int((got.contiguous().view(torch.uint8) != want.contiguous().view(torch.uint8)).sum())


class Report:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.failed: list[str] = []
        self.passed = 0

    def add(self, case: str, bad: int, total: int) -> None:
        if bad:
            self.failed.append(f"{case}: {bad}/{total} bytes differ")
            print(f"FAIL {case}: {bad}/{total} bytes differ", flush=True)
        else:
            self.passed += 1
            if self.verbose:
                print(f"PASS {case}", flush=True)


def encode_paths(device) -> list[bool]:
    """Both e4m3 paths where the GPU has a native FP8 conversion (sm89+); the integer encoder elsewhere."""
    return [True] if resolve_encode_bits(device, None) else [False, True]


def check_encoders(rep: Report, device) -> None:
    """Every finite bfloat16 in [-448, 448] and every tie between neighbouring e4m3 values (and their float32
    neighbours), one per row of a [n, 1] float32 weight whose scale is 1: q must equal torch's CPU cast."""
    bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite() & (bf16.abs() <= 448)]
    codes = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    ties = (codes[1:] + codes[:-1]) / 2
    near = torch.cat([ties, (ties.view(torch.int32) + 1).view(torch.float32), (ties.view(torch.int32) - 1).view(torch.float32)])
    x = torch.cat([bf16, near, -near])
    want = x.to(torch.float8_e4m3fn)
    # One column: 127 values and a 448 in every 128-row block, so every block's scale is exactly 1.
    rows = x.numel()
    xs = torch.cat([x, torch.zeros(-rows % 127)]).view(-1, 127)
    w = torch.cat([xs, torch.full((xs.shape[0], 1), 448.0)], 1).reshape(-1, 1).to(device)
    for encode in encode_paths(device):
        q, s = quant(w, encode_bits=encode)
        got = q.view(torch.uint8).cpu().view(-1, 128)[:, :127].reshape(-1)[:rows]
        bad = int((got != want.view(torch.uint8)).sum()) + int((s.cpu() != 1).sum())
        rep.add(f"encoder encode_bits={encode} ({rows} values)", bad, rows)


def check_shapes(rep: Report, device, shapes, src_dtypes, seed0: int) -> None:
    for k, (rows, cols) in enumerate(shapes):
        for src_dtype in src_dtypes:
            w = weights(rows, cols, src_dtype, device, seed0 + k)
            on_cpu = rows * cols <= CPU_CHECK_ELEMS
            w_cpu = w.cpu() if on_cpu else None
            for fmt, sdt in CONFIGS:
                q_ref, s_ref = reference_quant(w, fmt, sdt)
                if on_cpu:
                    q_cpu, s_cpu = reference_quant(w_cpu, fmt, sdt)
                    rep.add(f"[{rows},{cols}] {short(src_dtype)} {fmt}/{short(sdt)} GPU reference == CPU reference",
                            mismatches(q_ref.cpu(), q_cpu) + mismatches(s_ref.cpu(), s_cpu), q_cpu.numel())
                for encode in encode_paths(device):
                    q, s = quant(w, fmt, sdt, encode_bits=encode)
                    case = f"[{rows},{cols}] {short(src_dtype)} {fmt}/{short(sdt)} encode_bits={encode}"
                    rep.add(case, mismatches(q, q_ref) + mismatches(s, s_ref), q_ref.numel() + s_ref.numel())
            del w, w_cpu


def check_special(rep: Report, device) -> None:
    """All-zero, tiny, NaN, Inf and float16-overflowing blocks: scales (NaN where NaN) and finite blocks' q."""
    w = torch.zeros((130, 260 + 128), dtype=torch.bfloat16)
    w[0:128, 128:256] = 1e-37
    w[128:, 0] = float("nan")
    w[128:, 128] = float("-inf")
    w[128:, 256] = 1e30
    w[:, 300:] = 1.0
    w = w.to(device)
    for fmt, sdt in CONFIGS:
        q_ref, s_ref = reference_quant(w.cpu(), fmt, sdt)
        for encode in encode_paths(device):
            q, s = quant(w, fmt, sdt, encode_bits=encode)
            s_got, s_want = s.cpu().float(), s_ref.float()
            both_nan = s_got.isnan() & s_want.isnan()
            bad = int(((s_got != s_want) & ~both_nan).sum()) + mismatches(q[:128].cpu(), q_ref[:128])
            rep.add(f"special blocks {fmt}/{short(sdt)} encode_bits={encode}", bad, s_ref.numel() + 128 * w.shape[1])


def check_pipeline(rep: Report) -> None:
    """`dsv3conv quant` on CUDA writes the same files as on the CPU (tiny checkpoint, several chunks)."""
    from dsv3conv.api import dequantize, quantize
    from dsv3conv.synthetic import make_tiny


    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_tiny(root / "fp8", num_hidden_layers=4)
        dequantize(root / "fp8", root / "bf16", device="cpu")
        for fmt, sdt in (("float", "float32"), ("ue8m0", "float8_e8m0fnu"), ("float", "bfloat16")):
            quantize(root / "bf16", root / f"cpu-{fmt}-{sdt}", device="cpu", scale_fmt=fmt, scale_dtype=sdt)
            quantize(root / "bf16", root / f"gpu-{fmt}-{sdt}", device="cuda", scale_fmt=fmt, scale_dtype=sdt,
                     buffer_size=200_000)
            bad = total = 0
            for p in sorted((root / f"cpu-{fmt}-{sdt}").iterdir()):
                a, b = p.read_bytes(), (root / f"gpu-{fmt}-{sdt}" / p.name).read_bytes()
                total += len(a)
                bad += len(a) if len(a) != len(b) else sum(x != y for x, y in zip(a, b))
            rep.add(f"pipeline quant --device cuda == cpu ({fmt}/{sdt})", bad, total)


def bench(device, repeat: int) -> list[str]:
    """Kernel vs reference on DeepSeek-V3 shapes: median time, GB/s (2 bytes read + 1 written per element)."""
    lines = ["| shape | Triton quant GB/s | reference GB/s | speed-up |", "|---|---|---|---|"]

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    for rows, cols in DSV3_SHAPES:
        w = weights(rows, cols, torch.bfloat16, device, 7)
        q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=device)
        s = torch.empty((-(-rows // 128), -(-cols // 128)), dtype=torch.float32, device=device)
        t_k = timed(functools.partial(quant, w, out=q, scale_out=s))
        t_r = timed(functools.partial(reference_quant, w))
        gb = rows * cols * 3 / 1e9
        lines.append(f"| [{rows}, {cols}] | {gb / t_k:.0f} | {gb / t_r:.0f} | {t_r / t_k:.1f}x |")
        del w, q, s
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small shapes only (for TRITON_INTERPRET=1 on a CPU)")
    ap.add_argument("--verbose", action="store_true", help="print passing cases too")
    ap.add_argument("--no-pipeline", action="store_true", help="kernel checks only (scripts/gpu_quant_probe.py "
                    "checks the pipeline stage by stage)")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per shape (median)")
    args = ap.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not torch.cuda.is_available() and not interpret:
        print("FAIL: no CUDA GPU visible (use TRITON_INTERPRET=1 ... --smoke for a CPU dry run)")
        return 1
    device = torch.device("cpu" if interpret else "cuda")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"{props.name} (sm{props.major}{props.minor}), torch {torch.__version__}", flush=True)
    print(f"e4m3 paths checked: {['integer encoder' if e else 'native cast' for e in encode_paths(device)]}")
    rep = Report(args.verbose)
    t0 = time.perf_counter()
    check_encoders(rep, device)
    check_special(rep, device)
    if args.smoke:
        check_shapes(rep, device, [(1, 1), (129, 257), (576, 300)], (torch.bfloat16,), 1)
    else:
        check_shapes(rep, device, AWKWARD_SHAPES, (torch.bfloat16, torch.float16, torch.float32), 1)
        check_shapes(rep, device, DSV3_SHAPES, (torch.bfloat16,), 100)
        if not args.no_pipeline:
            check_pipeline(rep)
    print(f"{rep.passed} passed, {len(rep.failed)} failed in {time.perf_counter() - t0:.0f} s")
    if device.type == "cuda" and not args.smoke:
        print("\n".join(bench(device, args.repeat)))
    if rep.failed:
        print("FAIL\n" + "\n".join(f"  {line}" for line in rep.failed))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
