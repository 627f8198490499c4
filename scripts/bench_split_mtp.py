"""Benchmark `split-mtp --main-out` against `cp -r` of the same source, in the same run.

Builds a checkpoint with the true DeepSeek-V3 layer shapes (fewer layers and experts; the vocabulary is
shrunk too by default so that the whole thing is ~3.6 GB on a shared machine: `--vocab 129280` gives the real
embedding and head, ~10 GB with the defaults), reads it once so that both contenders start from a warm page
cache, then times:

- `cp -r SRC DIR` and the same followed by `sync` of its files (split-mtp fsyncs every file it writes, so
  `cp -r` + sync is the like-for-like figure);
- `python -m dsv3conv split-mtp SRC --main-out DIR` as a user runs it (process start included);

Prints one markdown row. Usage:
    .venv/bin/python scripts/bench_split_mtp.py [--root DIR] [--vocab 16000] [--layers 2] [--experts 16]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsv3conv import synthetic
from dsv3conv.api import split_mtp


def build(root: Path, layers: int, experts: int, vocab: int, shard_mb: int) -> None:
    synthetic.make_real_shapes(root, num_layers=layers, num_experts=experts, mtp=True,
                               shard_bytes=shard_mb * 1024**2, vocab_size=vocab)


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def warm(root: Path) -> None:
    for p in sorted(root.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 * 1024**2):
                pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16000, help="129280 for the real embedding and head")
    ap.add_argument("--shard-mb", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="best of N interleaved runs")
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoint")
    args = ap.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="bench-split-mtp-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    try:
        if not (src / "config.json").exists():
            t = timed(lambda: build(src, args.layers, args.experts, args.vocab, args.shard_mb))
            print(f"built {src} in {t:.0f} s", file=sys.stderr)
        subprocess.run(["sync", *map(str, src.iterdir())], check=True)  # no write-back of the build during timing
        warm(src)
        shards = sorted(src.glob("*.safetensors"))
        out = root / "out"
        args_ = ["split-mtp", str(src), "--main-out", str(out), "--json", "-q"]
        cmd = [sys.executable, "-m", "dsv3conv", *args_]
        runs = {
            "cp": lambda: subprocess.run(["cp", "-r", str(src), str(out)], check=True),
            "cp_sync": lambda: (subprocess.run(["cp", "-r", str(src), str(out)], check=True),
                                subprocess.run(["sync", *map(str, out.iterdir())], check=True)),
            "split": lambda: subprocess.run(cmd, check=True, capture_output=True, text=True),
            "start": lambda: subprocess.run([sys.executable, "-c", "import dsv3conv.api, dsv3conv.runner"]),
        }
        best: dict[str, float] = {}
        for _ in range(args.repeat):  # interleaved, best of N: the machine is shared
            for key, fn in runs.items():
                start = time.perf_counter()
                proc = fn()
                best[key] = min(best.get(key, math.inf), time.perf_counter() - start)
                if key.startswith("split"):  # the run's own time, without the process start
                    inner = json.loads(proc.stdout)["main"]["seconds"]
                    best[key + "_inner"] = min(best.get(key + "_inner", math.inf), inner)
                if key == "split":
                    out_bytes = dir_bytes(out)
                    summary = split_mtp(src, main_out=out, dry_run=True)["main"]
                shutil.rmtree(out, ignore_errors=True)
        t_cp, t_cp_sync, proc_t = best["cp"], best["cp_sync"], best["split"]

        print(f"source {dir_bytes(src) / 1e9:.2f} GB in {len(shards)} shards; main-out {out_bytes / 1e9:.2f} GB "
              f"({summary['shards_copied_whole']} of {summary['shards']} shards copied whole); "
              f"process start (python + torch import) {best['start']:.1f} s; "
              f"split-mtp's own time {best['split_inner']:.1f} s",
              file=sys.stderr)
        print("| source | main-out | cp -r | cp -r + sync | split-mtp --main-out | ratio to cp -r + sync |")
        print("|---|---|---|---|---|---|")
        print(f"| {dir_bytes(src) / 1e9:.2f} GB | {out_bytes / 1e9:.2f} GB | {t_cp:.1f} s | {t_cp_sync:.1f} s "
              f"| {proc_t:.1f} s | {proc_t / t_cp_sync:.2f} |")
    finally:
        if not args.keep and args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
