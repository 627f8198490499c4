"""End-to-end `quant` benchmark: each device against the storage bound, on one real-shapes BF16 checkpoint.

The source is a real-shapes synthetic FP8 checkpoint dequantized to BF16 by dsv3conv (what a fine-tuned
model looks like). In one run: storage bound (`cat` of the input + `dd conv=fsync` of an output-sized file),
then `dsv3conv quant --device D` for each device given; every output is compared byte for byte with the
first device's (the CPU path and the Triton kernel must write the same files).

    python scripts/bench_quant_convert.py --device cpu --gb 2 --dir /tmp/qbench
    python scripts/bench_quant_convert.py --device cpu --device cuda --gb 8 --dir /dev/shm/qbench
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import write_json  # noqa: E402
from bench_convert import cat_seconds, dd_seconds, timed  # noqa: E402  (one harness for the benchmarks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", action="append", help="repeat to compare (default: cpu)")
    ap.add_argument("--gb", type=float, default=4.0, help="approximate FP8 bytes before dequantizing")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3conv-qbench"))
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    devices = args.device or ["cpu"]

    from dsv3conv.api import dequantize
    from dsv3conv.checkpoint import Checkpoint
    from dsv3conv.synthetic import make_real_shapes

    shutil.rmtree(args.dir, ignore_errors=True)
    fp8, src = args.dir / "fp8", args.dir / "bf16"
    layers = max(2, round((args.gb - 0.8) / (0.23 + 0.044 * args.experts)) + 1)
    make_real_shapes(fp8, num_layers=layers, num_experts=args.experts, shard_bytes=int(4e9), vocab_size=16384)
    dequantize(fp8, src, device=devices[-1])
    shutil.rmtree(fp8)
    in_bytes = Checkpoint.open(src).tensor_bytes()

    t_read = cat_seconds(src)
    out_estimate = in_bytes // 2 + in_bytes // 100  # e4m3 is half of BF16, plus scales and unquantized tensors
    t_write = dd_seconds(args.dir, out_estimate, 1)
    bound = t_read + t_write
    results = {"input_bytes": in_bytes, "read_s": t_read, "write_s": t_write, "runs": {}}
    first = None
    for device in devices:
        dst = args.dir / f"out-{device.replace(':', '')}"
        run = timed([sys.executable, "-m", "dsv3conv", "quant", str(src), str(dst), "--device", device,
                     "--json", "--quiet"])
        same = None
        if first is None:
            first = dst
        else:
            names = sorted(p.name for p in first.iterdir())
            same = names == sorted(p.name for p in dst.iterdir()) and all(
                filecmp.cmp(first / n, dst / n, shallow=False) for n in names)
            shutil.rmtree(dst)
        results["runs"][device] = {"s": run["s"], "rss": run["rss"], "identical_to_first": same,
                                   "gpu_peak": json.loads(run["stdout"]).get("gpu_peak_bytes")}
    shutil.rmtree(args.dir, ignore_errors=True)

    gb = in_bytes / 1e9
    print(f"\nBF16 input {gb:.2f} GB ({layers} layers, {args.experts} experts each)")
    print("| run | wall s | BF16 GB/s | peak RSS | vs storage bound | output identical to the first run |")
    print("|---|---|---|---|---|---|")
    print(f"| storage bound (cat {t_read:.1f} s + dd write {t_write:.1f} s) | {bound:.1f} | {gb / bound:.2f} | - | 1.00x | - |")
    for device, r in results["runs"].items():
        same = "-" if r["identical_to_first"] is None else ("yes" if r["identical_to_first"] else "NO")
        print(f"| dsv3conv quant --device {device} | {r['s']:.1f} | {gb / r['s']:.2f} | {r['rss'] / 1e9:.2f} GB "
              f"| {r['s'] / bound:.2f}x | {same} |")
    base = results["runs"][devices[0]]["s"]
    for device in devices[1:]:
        print(f"--device {device} vs {devices[0]}: {base / results['runs'][device]['s']:.2f}x")
    write_json(args.json, results)
    if any(r["identical_to_first"] is False for r in results["runs"].values()):
        raise SystemExit("FAIL: outputs differ between devices")


if __name__ == "__main__":
    main()
