"""`verify --against --full` speed on real DeepSeek-V3 shapes (fewer layers and experts), one run each.

    python scripts/bench_verify.py [--layers 2] [--experts 4] [--device cpu] [--dir /dev/shm/x]

Writes an FP8 checkpoint, times its dequantization (the engine's speed on these files: the baseline),
then `verify` of the output against it (every tensor compared bit for bit: the same reads and conversions,
the output read instead of written) and of the output alone; prints seconds and GB/s of bytes moved
(source + output).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from dsv3conv.api import dequantize, verify_checkpoint
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.synthetic import make_real_shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        src = make_real_shapes(root / "src", num_layers=args.layers, num_experts=args.experts, vocab_size=8192,
                               shard_bytes=512 * 1024**2)
        start = time.perf_counter()
        dequantize(src, root / "out", device=args.device)
        seconds = time.perf_counter() - start
        moved = Checkpoint.open(src).tensor_bytes() + Checkpoint.open(root / "out").tensor_bytes()
        print(f"dequant (baseline): {seconds:.1f} s, {moved / seconds / 1e9:.2f} GB/s read + written")
        for label, kwargs in (("against --full", {"against": src}), ("alone --full", {})):
            start = time.perf_counter()
            report = verify_checkpoint(root / "out", full=True, device=args.device, **kwargs)
            seconds = time.perf_counter() - start
            read = moved if "against" in kwargs else Checkpoint.open(root / "out").tensor_bytes()
            print(f"verify {label}: {seconds:.1f} s, {read / seconds / 1e9:.2f} GB/s read, ok={report['ok']}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
