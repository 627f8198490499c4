"""DeepSeek-V4 conversions end to end on V4-Flash shapes: dequant to BF16, dequant --experts fp8, verify --against.

Writes a checkpoint with V4-Flash's dimensions (`dsv3conv.synthetic_v4.v4_flash_config`: hidden 4096, routed
experts 2048 x 4096 packed FP4, 64 heads of 512, LoRA ranks 1024, 8 output groups, CSA/HCA compressors;
`--layers`, `--experts` and `--vocab` shrink it) to DIR, then times each conversion on each `--device` and
checks that every device wrote the same bytes. Prints seconds and GB/s of input read (and of output written).

    python scripts/bench_v4.py DIR [--layers 1] [--experts 32] [--vocab 129280] [--device cpu --device cuda]
                                   [--json PATH]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import time
from pathlib import Path

from _bench import finish

from dsv3conv.api import dequantize, verify_checkpoint
from dsv3conv.synthetic_v4 import make_v4, v4_flash_config


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="work directory (a RAM disk such as /dev/shm measures the converter)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--device", action="append", help="cpu, cuda, cuda:all (repeatable; default cpu)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    devices = args.device or ["cpu"]
    src = args.dir / "v4-src"
    if src.exists():
        shutil.rmtree(src)
    config = v4_flash_config(num_hidden_layers=args.layers, n_routed_experts=args.experts, vocab_size=args.vocab)
    t = time.perf_counter()
    make_v4(src, "flash", config=config, n_shards=max(2, args.layers))
    print(f"wrote {src} in {time.perf_counter() - t:.1f} s")
    results, ok = [], True
    for what, kwargs in (("dequant bf16", {}), ("dequant --experts fp8", {"experts": "fp8"})):
        outs = []
        for device in devices:
            out = args.dir / f"v4-{what.split()[-1]}-{device.replace(':', '_')}"
            if out.exists():
                shutil.rmtree(out)
            r = dequantize(src, out, device=device, **kwargs)
            gbs_in, gbs_out = r["bytes_in"] / r["seconds"] / 1e9, r["bytes_out"] / r["seconds"] / 1e9
            t = time.perf_counter()
            report = verify_checkpoint(out, against=src, full=True, device=device)
            verify_s = time.perf_counter() - t
            row = {"what": what, "device": device, "seconds": r["seconds"], "bytes_in": r["bytes_in"],
                   "bytes_out": r["bytes_out"], "gb_s_in": gbs_in, "gb_s_out": gbs_out,
                   "verify_seconds": verify_s, "verify_ok": report["ok"]}
            print(f"{what} on {device}: {r['seconds']:.2f} s, {gbs_in:.2f} GB/s in, {gbs_out:.2f} GB/s out; "
                  f"verify --full {verify_s:.2f} s, {'ok' if report['ok'] else 'FAILED'}")
            ok &= report["ok"]
            outs.append(out)
            results.append(row)
        for other in outs[1:]:
            same = _same_files(outs[0], other)
            print(f"{what}: {other.name} {'the same bytes as' if same else 'DIFFERS from'} {outs[0].name}")
            ok &= same
    return finish(results, args.json, ok)


if __name__ == "__main__":
    sys.exit(main())
