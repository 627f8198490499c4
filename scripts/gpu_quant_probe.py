"""Where does `quant --device cuda` go wrong? Each stage runs in its own process (a crash names its stage).

Stages, from the smallest piece of the CUDA quant path to the whole pipeline:
  backend        CudaBackend.run on a batch of quant items, no threads, against CpuBackend.run
  pipeline-1io   `quantize(device="cuda")` with one reader and one writer thread
  pipeline       `quantize(device="cuda")` as users run it (several reader and writer threads)
  pipeline-sync  the same with CUDA_LAUNCH_BLOCKING=1 (run only when `pipeline` fails)
  pipeline-compiled  `pipeline` with the CPU side compiled too (exactly what users run)
  cpu-compiled   the CPU path as users get it (torch.compile), on DeepSeek-V3 shapes and a tiny checkpoint
                 (the other stages use eager torch for the CPU side)

    python scripts/gpu_quant_probe.py                 # every stage, a line each; exits 1 on any failure
    python scripts/gpu_quant_probe.py --stages a,b    # those stages, each in its own process
    python scripts/gpu_quant_probe.py STAGE           # one stage in this process
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ["backend", "pipeline-1io", "pipeline", "cpu-compiled", "pipeline-compiled"]


def stage_backend() -> None:
    import torch

    from dsv3conv.backend import CpuBackend, CudaBackend, Item

    gen = torch.Generator().manual_seed(0)
    shapes = [(576, 7168), (1, 1), (129, 257), (256, 384), (7, 300)]
    for fmt, sdt in (("float", "F32"), ("ue8m0", "F8_E8M0"), ("float", "BF16")):
        raws, items, off = [], [], 0
        for rows, cols in shapes:
            w = (torch.randn((rows, cols), generator=gen) * 3).to(torch.bfloat16)
            raw = w.reshape(-1).view(torch.uint8)
            raws.append(raw)
            items.append(Item(off, raw.numel(), rows, cols, None, "F8_E4M3", src_dtype="BF16", scale_fmt=fmt,
                              scale_dtype=sdt, name=f"t{len(items)}"))
            off += raw.numel()
            raws.append(torch.arange(6, dtype=torch.uint8))  # a passthrough piece between them
            items.append(Item(off, 6))
            off += 6
        buf = torch.cat(raws)
        want = [bytes(m) for m in CpuBackend().run(buf.clone(), items)]
        got = [bytes(m) for m in CudaBackend(torch.device("cuda")).run(buf.pin_memory(), items)]
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        if len(want) != len(got) or bad:
            raise SystemExit(f"backend {fmt}/{sdt}: {len(got)} pieces for {len(want)}; differing pieces {bad}")
        print(f"backend {fmt}/{sdt}: {len(got)} pieces identical to the CPU", flush=True)


def stage_pipeline(one_io: bool) -> None:
    if one_io:
        os.cpu_count = lambda: 2  # the pipeline starts cpu_count // 2 reader and writer threads
    from dsv3conv.api import dequantize, quantize
    from dsv3conv.synthetic import make_tiny

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_tiny(root / "fp8", num_hidden_layers=4)
        dequantize(root / "fp8", root / "bf16", device="cpu")
        for fmt, sdt in (("float", "float32"), ("ue8m0", "float8_e8m0fnu"), ("float", "bfloat16")):
            quantize(root / "bf16", root / "cpu", device="cpu", scale_fmt=fmt, scale_dtype=sdt, overwrite=True)
            print(f"  cpu {fmt}/{sdt} done", flush=True)
            quantize(root / "bf16", root / "gpu", device="cuda", scale_fmt=fmt, scale_dtype=sdt,
                     buffer_size=200_000, overwrite=True)
            print(f"  cuda {fmt}/{sdt} done", flush=True)
            diff = [p.name for p in sorted((root / "cpu").iterdir())
                    if p.read_bytes() != (root / "gpu" / p.name).read_bytes()]
            if diff:
                raise SystemExit(f"pipeline {fmt}/{sdt}: files differ: {diff}")
            print(f"pipeline {fmt}/{sdt}: every file identical to the CPU's", flush=True)


def stage_cpu_compiled() -> None:
    import torch

    from dsv3conv.api import dequantize, quantize
    from dsv3conv.backend import CpuBackend, Item
    from dsv3conv.kernels.fp8_block_quant import reference_quant
    from dsv3conv.synthetic import make_tiny

    gen = torch.Generator().manual_seed(1)
    for rows, cols in ((2048, 7168), (7168, 2048), (576, 7168), (300, 1000), (129, 257)):
        w = (torch.randn((rows, cols), generator=gen) * 3).to(torch.bfloat16)
        raw = w.reshape(-1).view(torch.uint8)
        q, s = CpuBackend().run(raw, [Item(0, raw.numel(), rows, cols, None, "F8_E4M3", src_dtype="BF16",
                                           scale_fmt="float", scale_dtype="F32", name="w")])
        q_ref, s_ref = reference_quant(w)
        if bytes(q) != q_ref.view(torch.uint8).numpy().tobytes() or bytes(s) != s_ref.numpy().tobytes():
            raise SystemExit(f"compiled CPU quant [{rows},{cols}] differs from reference_quant")
        print(f"compiled CPU quant [{rows},{cols}]: identical to reference_quant", flush=True)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_tiny(root / "fp8", num_hidden_layers=4)
        dequantize(root / "fp8", root / "bf16", device="cpu")
        quantize(root / "bf16", root / "q", device="cpu", scale_fmt="ue8m0", scale_dtype="float8_e8m0fnu")
        print("compiled CPU quant of a tiny checkpoint: done", flush=True)


def run_stage(stage: str) -> None:
    faulthandler.enable(all_threads=True)
    if stage == "cpu-compiled":
        stage_cpu_compiled()
        return
    if stage == "pipeline-compiled":
        stage_pipeline(one_io=False)
        return
    os.environ.setdefault("DSV3CONV_NO_COMPILE", "1")  # the CPU side is the reference here: eager is enough
    if stage == "backend":
        stage_backend()
    elif stage == "pipeline-1io":
        stage_pipeline(one_io=True)
    elif stage in ("pipeline", "pipeline-sync"):
        stage_pipeline(one_io=False)
    else:
        raise SystemExit(f"unknown stage {stage!r}: choose from {STAGES + ['pipeline-sync']}")  # noqa: E501


def main() -> int:
    stages = list(STAGES)
    if len(sys.argv) == 3 and sys.argv[1] == "--stages":
        stages = sys.argv[2].split(",")
    elif len(sys.argv) > 1:
        run_stage(sys.argv[1])
        return 0
    failed = []
    while stages:
        stage = stages.pop(0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if stage == "pipeline-sync":
            env["CUDA_LAUNCH_BLOCKING"] = "1"
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, stage], env=env,
                              capture_output=True, text=True, timeout=600)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"== {stage}: {status}", flush=True)
        print(proc.stdout.rstrip(), flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-6000:], flush=True)
            failed.append(stage)
            if stage == "pipeline":
                stages.append("pipeline-sync")
    print("FAIL " + ", ".join(failed) if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
