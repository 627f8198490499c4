"""Bit-exactness of the Triton block dequant on a CUDA GPU.

Compares `dequant` and `dequant_segments` with `reference_dequant` computed on the same GPU (and, for
a few shapes, on the CPU) bit for bit: both decode paths, every out dtype, every scale dtype, awkward
shapes and every FP8 shape of DeepSeek-V3, random e4m3 data. Prints a PASS/FAIL table; exit 1 on any
failure.

    python scripts/gpu_check.py [--full] [--verbose]
    TRITON_INTERPRET=1 python scripts/gpu_check.py --smoke   # CPU dry run of this script, small shapes
                                                             # (16-bit cases fail there: not RNE)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dsv3conv.kernels.fp8_block_dequant import (
    dequant,
    dequant_segments,
    reference_dequant,
    resolve_decode_bits,
)

DSV3_SHAPES = [
    (7168, 18432), (18432, 7168), (2048, 7168), (7168, 2048), (576, 7168),
    (24576, 1536), (32768, 512), (7168, 16384), (1536, 7168),
]  # fmt: skip
AWKWARD_SHAPES = [(1, 1), (129, 257), (128, 128), (300, 1000), (576, 300), (127, 129), (1, 7168), (7168, 1)]
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float8_e8m0fnu", "e8m0")


def random_e4m3(rows: int, cols: int, device, gen, kind: str = "bytes") -> torch.Tensor:
    """Random e4m3 as raw bytes: uniform bytes with NaN codes replaced, or a clamped randn cast."""
    if kind == "bytes":
        w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
        w[(w & 0x7F) == 0x7F] -= 1
        return w
    x = torch.randn((rows, cols), device=device, generator=gen) * 64
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)


def random_scale(rows: int, cols: int, dtype: torch.dtype, device, gen) -> torch.Tensor:
    shape = ((rows + 127) // 128, (cols + 127) // 128)
    if dtype == torch.float8_e8m0fnu:
        exps = torch.randint(-24, 8, shape, device=device, generator=gen).to(torch.float32)
        return torch.exp2(exps).to(dtype)
    # Wide range: products overflow float16 and underflow into subnormals in places.
    logs = torch.rand(shape, device=device, generator=gen) * 36 - 24
    return torch.exp2(logs).to(dtype)


def bit_mismatches(out: torch.Tensor, ref: torch.Tensor) -> int:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return -1
    iv = _INT_VIEW[out.dtype]
    return int((out.view(iv) != ref.view(iv)).sum())


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int, int]] = []

    def add(self, group: str, case: str, mismatches: int, elems: int, verbose: bool) -> None:
        status = "PASS" if mismatches == 0 else "FAIL"
        self.rows.append((group, case, status, mismatches, elems))
        if verbose or status == "FAIL":
            print(f"{status} {group:22s} {case:58s} mismatches={mismatches}/{elems}", flush=True)

    def table(self) -> str:
        groups: dict[str, list] = {}
        for row in self.rows:
            groups.setdefault(row[0], []).append(row)
        lines = ["| group | cases | pass | fail | elements checked |", "|---|---:|---:|---:|---:|"]
        for group, rows in groups.items():
            fails = sum(r[2] == "FAIL" for r in rows)
            lines.append(
                f"| {group} | {len(rows)} | {len(rows) - fails} | {fails} | {sum(r[4] for r in rows):,} |"
            )
        failed = [r for r in self.rows if r[2] == "FAIL"]
        lines.append(
            f"\n{'PASS' if not failed else 'FAIL'}: {len(self.rows) - len(failed)}/{len(self.rows)} cases"
        )
        for r in failed[:40]:
            lines.append(f"  FAIL {r[0]} {r[1]} mismatches={r[3]}/{r[4]}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return all(r[2] == "PASS" for r in self.rows)


def check_decoder(rep: Report, device) -> None:
    """All 256 e4m3 codes, both paths, float32 out, scale 1: bits equal torch's CPU conversion, NaN at 0x7F/0xFF."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(2, 128)
    ref = codes.view(torch.float8_e4m3fn).to(torch.float32)
    for decode_bits in (False, True):
        out = dequant(
            codes.to(device), torch.ones((1, 1), device=device), torch.float32, decode_bits=decode_bits
        )
        out = out.cpu()
        nan_bad = int((out.isnan() != ref.isnan()).sum())
        keep = ~ref.isnan()
        bad = int((out.view(torch.int32)[keep] != ref.view(torch.int32)[keep]).sum()) + nan_bad
        rep.add("e4m3 codes exhaustive", f"decode_bits={decode_bits}", bad, 256, True)


def check_scale_codes(rep: Report, device) -> None:
    """Every bfloat16 / float16 (65536) and e8m0 (256) scale code: weight 1.0, float32 out == torch's
    conversion of the scale (bits equal; NaN where torch gives NaN)."""
    for dtype, n_codes in ((torch.bfloat16, 65536), (torch.float16, 65536), (torch.float8_e8m0fnu, 256)):
        if n_codes == 65536:
            codes = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        else:
            codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
        ref = codes.to(torch.float32)
        cols = 128 * (n_codes - 1) + 1
        w = torch.full((1, cols), 0x38, dtype=torch.uint8, device=device)  # e4m3 0x38 == 1.0
        for decode_bits in (False, True):
            out = dequant(w, codes.reshape(1, -1).to(device), torch.float32, decode_bits=decode_bits)
            got = out[0, ::128].cpu()
            bad = int((got.isnan() != ref.isnan()).sum())
            keep = ~ref.isnan()
            bad += int((got.view(torch.int32)[keep] != ref.view(torch.int32)[keep]).sum())
            rep.add("scale codes exhaustive", f"{short(dtype)} decode={int(decode_bits)}", bad, n_codes, True)


def check_single(rep: Report, device, gen, shapes, full: bool, verbose: bool) -> None:
    for rows, cols in shapes:
        for decode_bits in (False, True):
            w = random_e4m3(rows, cols, device, gen, "bytes" if decode_bits else "randn")
            for scale_dtype in SCALE_DTYPES:
                for out_dtype in OUT_DTYPES:
                    if not full and scale_dtype != torch.float32 and out_dtype != torch.bfloat16:
                        continue
                    s = random_scale(rows, cols, scale_dtype, device, gen)
                    w_in = w.view(torch.float8_e4m3fn) if (rows + cols) % 2 else w
                    out = dequant(w_in, s, out_dtype, decode_bits=decode_bits)
                    ref = reference_dequant(w, s, out_dtype)
                    case = f"decode={int(decode_bits)} scale={short(scale_dtype)} out={short(out_dtype)}"
                    rep.add(f"[{rows},{cols}]", case, bit_mismatches(out, ref), rows * cols, verbose)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_vs_cpu(rep: Report, device, gen, shapes) -> None:
    """GPU kernel vs the reference computed on the CPU (torch's CPU rounding)."""
    for rows, cols in shapes:
        w = random_e4m3(rows, cols, device, gen)
        for scale_dtype in (torch.float32, torch.float8_e8m0fnu):
            s = random_scale(rows, cols, scale_dtype, device, gen)
            for out_dtype in OUT_DTYPES:
                for decode_bits in (False, True):
                    out = dequant(w, s, out_dtype, decode_bits=decode_bits).cpu()
                    ref = reference_dequant(w.cpu(), s.cpu(), out_dtype)
                    case = f"[{rows},{cols}] decode={int(decode_bits)} scale={short(scale_dtype)} out={short(out_dtype)}"
                    rep.add("vs CPU reference", case, bit_mismatches(out, ref), rows * cols, False)


def check_nan_inputs(rep: Report, device, gen, rows: int, cols: int) -> None:
    """NaN codes in the weight give NaN at the same places; every other element bit-exact."""
    w = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, device=device, generator=gen)
    s = random_scale(rows, cols, torch.float32, device, gen)
    for decode_bits in (False, True):
        for out_dtype in OUT_DTYPES:
            out = dequant(w, s, out_dtype, decode_bits=decode_bits)
            ref = reference_dequant(w, s, out_dtype)
            keep = ~ref.isnan()
            iv = _INT_VIEW[out_dtype]
            bad = int((out.isnan() != ref.isnan()).sum()) + int(
                (out.view(iv)[keep] != ref.view(iv)[keep]).sum()
            )
            rep.add(
                "NaN inputs", f"decode={int(decode_bits)} out={short(out_dtype)}", bad, rows * cols, False
            )


def check_segments(
    rep: Report, device, gen, n_experts: int, extra_odd: bool, label: str, smoke: bool
) -> None:
    """A layer-like batch through one dequant_segments call; dst poisoned with 0xFF (NaN) bytes."""
    m, n = (256, 384) if smoke else (2048, 7168)
    shapes = [(m, n)] * n_experts + [(n, m)] * (n_experts // 2)
    if extra_odd:
        shapes += [(129, 257), (1, 1), (300, 1000)] + ([] if smoke else [(576, 7168), (24576, 1536)])
    for decode_bits in (False, True):
        for out_dtype in (torch.bfloat16, torch.float32) if n_experts <= 16 else (torch.bfloat16,):
            esize = torch.empty((), dtype=out_dtype).element_size()
            segments, src_off, dst_off, scale_off = [], 0, 0, 0
            for k, (rows, cols) in enumerate(shapes):
                if extra_odd and k % 7 == 3:
                    src_off += 5  # misaligned: exercises the generic launch next to the aligned one
                    dst_off += esize
                n_scale = ((rows + 127) // 128) * ((cols + 127) // 128)
                segments.append((src_off, dst_off, scale_off, rows, cols))
                src_off += rows * cols
                dst_off += rows * cols * esize
                scale_off += n_scale
            src = torch.randint(0, 256, (src_off,), dtype=torch.uint8, device=device, generator=gen)
            src[(src & 0x7F) == 0x7F] -= 1
            scales = torch.exp2(torch.rand(scale_off, device=device, generator=gen) * 24 - 16)
            dst = torch.full((dst_off + 64,), 0xFF, dtype=torch.uint8, device=device)
            dequant_segments(src, dst, scales, segments, out_dtype, decode_bits=decode_bits)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bad = 0
            written = torch.zeros(dst.numel(), dtype=torch.bool, device=device)
            for so, do, co, rows, cols in segments:
                sr, sc = (rows + 127) // 128, (cols + 127) // 128
                w = src[so : so + rows * cols].view(rows, cols)
                ref = reference_dequant(w, scales[co : co + sr * sc].view(sr, sc), out_dtype)
                got = dst[do : do + rows * cols * esize].view(out_dtype).view(rows, cols)
                bad += bit_mismatches(got, ref)
                written[do : do + rows * cols * esize] = True
            bad += int((dst[~written] != 0xFF).sum())
            case = (
                f"{len(segments)} segs decode={int(decode_bits)} out={short(out_dtype)} "
                f"src={src_off / 2**30:.2f}GiB dst={dst_off / 2**30:.2f}GiB"
            )
            rep.add(label, case, bad, sum(r * c for r, c in shapes), True)
            del src, dst, scales, written
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="every dtype combination on the DeepSeek-V3 shapes too"
    )
    parser.add_argument("--verbose", action="store_true", help="print every case")
    parser.add_argument("--smoke", action="store_true", help="small shapes only; runs on the CPU interpreter")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name, cap = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device, name, cap = torch.device("cpu"), "CPU (Triton interpreter)", (0, 0)
    else:
        print("no CUDA device: gpu_check needs a GPU (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    print(f"device: {name}, sm{cap[0]}{cap[1]}; torch {torch.__version__}", flush=True)
    print(f"auto decode_bits on this device: {resolve_decode_bits(device, None)}", flush=True)
    gen = torch.Generator(device=device).manual_seed(1234)
    rep = Report()
    t0 = time.perf_counter()
    if args.smoke:
        full_shapes, dsv3_shapes, cpu_shapes, nan_shape = (
            AWKWARD_SHAPES[:5],
            [],
            [(129, 257), (1, 1)],
            (129, 300),
        )
    else:
        full_shapes = AWKWARD_SHAPES + [(576, 7168), (2048, 7168)]
        dsv3_shapes, nan_shape = DSV3_SHAPES, (576, 7168)
        cpu_shapes = [(576, 7168), (129, 257), (300, 1000), (1, 1), (2048, 7168)]
    steps = [
        ("decoder", lambda: check_decoder(rep, device)),
        ("scale codes", lambda: check_scale_codes(rep, device)),
        ("awkward shapes, every dtype combination",
         lambda: check_single(rep, device, gen, full_shapes, True, args.verbose)),
        ("DeepSeek-V3 shapes",
         lambda: check_single(rep, device, gen, dsv3_shapes, args.full, args.verbose)),
        ("vs CPU", lambda: check_vs_cpu(rep, device, gen, cpu_shapes)),
        ("NaN inputs", lambda: check_nan_inputs(rep, device, gen, *nan_shape)),
        ("segments small", lambda: check_segments(rep, device, gen, 4 if args.smoke else 8, True,
                                                  "segments mixed", args.smoke)),
    ]  # fmt: skip
    if not args.smoke:
        steps.append(
            ("segments large", lambda: check_segments(rep, device, gen, 160, False, "segments >2GiB", False))
        )
    for label, step in steps:
        t = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a crash is a failed case, the table still prints
            rep.add(label, f"raised {type(e).__name__}: {e}"[:200], -1, 0, True)
        print(f"-- {label}: {time.perf_counter() - t:.1f}s", flush=True)
    print(f"\ngpu_check on {name} (sm{cap[0]}{cap[1]}), {time.perf_counter() - t0:.0f}s")
    print(rep.table())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
