"""CPU conversion benchmark: `dsv3conv dequant --device cpu` at 1, 2, 4, ... threads beside the storage and a
naive converter, in one run on the same files.

The source is one MoE layer of real DeepSeek-V3 shapes (attention, shared expert, routed experts
[2048, 7168] / [7168, 2048] in FP8 with F32 scales), its experts scaled to about --gb of FP8, in four shards.
Measured, each in its own process:
  cat        a sequential read of the input
  writers    N parallel writes (dd) of an output-sized total, N = cores capped at 8
  eager      the naive converter: load_file a whole shard, repeat_interleave the scales, multiply, save_file
  dsv3conv   `DSV3CONV_CPU_THREADS=T dsv3conv dequant --device cpu` for T = 1, 2, 4, ... up to the cores, then
             with the default thread count; the profile of its start-up (DSV3CONV_PROFILE) for the most threads
  small      dsv3conv at the most threads on a second checkpoint a quarter the size: the two sizes give the
             steady rate and the fixed start-up cost
  start-up   before all that, the numba kernel's first use (a compile where none is cached yet) and its load
             from the cache; then `dsv3conv --help`, a refusal (a non-empty DST) and the tiny example
             checkpoint converted end to end (each the median of three processes)
Reported: wall seconds, GB/s of FP8 input, peak RSS; dsv3conv's output is compared with the eager one, tensor
by tensor. A JSON file and a markdown table go to --out.

    CUDA_VISIBLE_DEVICES= python scripts/bench_cpu.py --gb 4 --dir /dev/shm/dsv3conv-bench --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import EAGER, cat_seconds, checkpoint_sizes, dd_seconds, timed  # noqa: E402  (one harness for the conversion benchmarks)

EXPERT_BYTES = 3 * 2048 * 7168  # FP8 bytes of one routed expert (gate, up, down)
LAYER_BYTES = 200_000_000  # FP8 bytes of the rest of a MoE layer (attention, shared expert), roughly


def experts_for(fp8_gb: float) -> int:
    return max(1, round((fp8_gb * 1e9 - LAYER_BYTES) / EXPERT_BYTES))


def build(root: Path, experts: int) -> Path:
    """A one-MoE-layer checkpoint of real shapes with `experts` routed experts, in four shards."""
    from dsv3conv.synthetic import make_real_shapes

    if (root / "model.safetensors.index.json").exists():
        return root
    make_real_shapes(root, num_layers=1, num_experts=experts, vocab_size=1024,
                     shard_bytes=int((LAYER_BYTES + experts * EXPERT_BYTES) / 4) + 1)
    return root


def dsv3conv(src: Path, dst: Path, threads: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    env = dict(os.environ, DSV3CONV_PROFILE="1")
    env.pop("DSV3CONV_CPU_THREADS", None)
    if threads:  # 0: the default thread count
        env["DSV3CONV_CPU_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "dsv3conv", "dequant", str(src), str(dst), "--device", "cpu", "--json", "--quiet"]
    r = timed(cmd, env=env)
    summary = json.loads(r["stdout"])
    profile = next((json.loads(line.split(":", 1)[1]) for line in r["stderr"] if line.startswith("dsv3conv profile:")),
                   {})
    return {"threads": threads, "s": r["s"], "rss": r["rss"], "seconds": summary.get("seconds"),
            "startup_seconds": summary.get("startup_seconds"),
            "profile": {k: v for k, v in profile.items() if k.endswith("_s")}}


KERNEL_LOAD = """import json, time
t = time.perf_counter()
from dsv3conv.kernels.fp8_block_host import numba_kernel
loaded = numba_kernel(("dequant", "bfloat16")) is not None
t1 = time.perf_counter()
import torch  # not on the CPU path: what it would cost
print(json.dumps({"numba_s": t1 - t, "torch_import_s": time.perf_counter() - t1, "loaded": loaded}))"""


def kernel_load() -> dict:
    """The numba dequant kernel's first use in this install (compiled if not cached yet), then its load from
    the cache (numba's import included), as a `dequant --device cpu` run loads it."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", KERNEL_LOAD], check=True, capture_output=True,
                                      text=True).stdout) for _ in range(2)]
    return {"first_s": runs[0]["numba_s"], "cached_s": runs[1]["numba_s"], "torch_import_s": runs[1]["torch_import_s"],
            "loaded": runs[1]["loaded"]}


def startup(work: Path) -> dict:
    """Median wall seconds of three processes each: --help, a refusal, the tiny checkpoint end to end."""
    tiny, full, out = work / "tiny", work / "full", work / "tiny-out"
    cli = [sys.executable, "-m", "dsv3conv"]
    for d in (tiny, full, out):
        shutil.rmtree(d, ignore_errors=True)
    subprocess.run([*cli, "example", "fp8", str(tiny)], check=True, capture_output=True)
    full.mkdir()
    (full / "keep.txt").write_text("not empty\n")

    def median(cmd: list[str], expect: int, fresh: Path | None = None) -> float:
        times = []
        for _ in range(3):
            if fresh:
                shutil.rmtree(fresh, ignore_errors=True)
            t = time.perf_counter()
            rc = subprocess.run(cmd, capture_output=True).returncode
            times.append(time.perf_counter() - t)
            if rc != expect:
                raise SystemExit(f"{shlex.join(cmd)} exited with {rc}, expected {expect}")
        return statistics.median(times)

    r = {"help_s": median([*cli, "--help"], 0),
         "refusal_s": median([*cli, "dequant", str(tiny), str(full), "--device", "cpu"], 2),
         "tiny_s": median([*cli, "dequant", str(tiny), str(out), "--device", "cpu", "--quiet"], 0, out)}
    for d in (tiny, full, out):
        shutil.rmtree(d, ignore_errors=True)
    return r


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint `a` is in `b` with the same dtype, shape and bytes, and no other."""
    import torch
    from safetensors import safe_open

    def handles(root: Path) -> dict:
        files = [safe_open(str(p), "pt") for p in sorted(root.glob("*.safetensors"))]
        return {k: f for f in files for k in f.keys()}

    ha, hb = handles(a), handles(b)
    if ha.keys() != hb.keys():
        return False
    for name, f in ha.items():
        x, y = f.get_tensor(name), hb[name].get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8),
                                                                       y.view(-1).view(torch.uint8)):
            return False
    return True


def thread_counts(cores: int, given: str | None) -> list[int]:
    if given:
        return [int(t) for t in given.split(",")]
    counts = [1 << k for k in range(cores.bit_length()) if 1 << k <= cores]
    return counts + ([cores] if counts[-1] != cores else [])


def machine(bench_dir: Path) -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    fs = next((line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
               if str(bench_dir.resolve()).startswith(line.split()[1])), "?")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "memory_bytes": mem, "torch": torch.__version__,
            "python": platform.python_version(), "dir": str(bench_dir), "filesystem": fs,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def table(r: dict) -> str:
    gb = r["large"]["fp8_bytes"] / 1e9
    eager = r["eager"]["s"]
    lines = [f"{r['date']}, {r['machine']['cpu']}, {r['machine']['cores']} cores, torch {r['machine']['torch']}, "
             f"{r['machine']['dir']} ({r['machine']['filesystem']}); `{r['command']}`", "",
             f"Input {r['large']['input_bytes'] / 1e9:.2f} GB ({gb:.2f} GB FP8) in {r['large']['shards']} shards, "
             f"output {r['large']['output_bytes'] / 1e9:.2f} GB.", "",
             "| run | wall s | FP8 GB/s | peak RSS | vs eager |", "|---|---:|---:|---:|---:|",
             f"| cat of the input | {r['cat_s']:.1f} | {gb / r['cat_s']:.3g} | - | - |",
             f"| {r['writers']} parallel output-sized writes | {r['write_s']:.1f} | {gb / r['write_s']:.3g} | - | - |",
             f"| eager whole-shard converter | {eager:.1f} | {gb / eager:.3g} | {r['eager']['rss'] / 1e9:.2f} GB | 1.00x |"]
    for d in r["dsv3conv"] + [r["default"]]:
        threads = (f"{d['threads']} thread" + ("s" if d["threads"] > 1 else "") if d["threads"] else
                   f"default threads ({r['default_threads']})")
        lines.append(f"| dsv3conv, {threads} | {d['s']:.1f} | {gb / d['s']:.3g} | {d['rss'] / 1e9:.2f} GB "
                     f"| {eager / d['s']:.2f}x |")
    most = r["dsv3conv"][-1]
    fit = ("no steady rate (the smaller run was not faster)" if r["steady_fp8_gbps"] is None else
           f"steady state {r['steady_fp8_gbps']:.3g} GB/s of FP8, fixed start-up {r['startup_s']:.2f} s")
    lines += ["", f"dsv3conv at {most['threads']} threads vs 1 thread: {r['scaling']:.2f}x; {fit} "
                  f"(from {r['small']['fp8_bytes'] / 1e9:.2f} GB in {r['small']['s']:.1f} s and {gb:.2f} GB in "
                  f"{most['s']:.1f} s; the run's own startup_seconds: {most.get('startup_seconds')}); "
                  f"output bit-identical to the eager converter's: {r['bit_exact_vs_eager']}.", "",
              f"Start-up of the {most['threads']}-thread run (DSV3CONV_PROFILE, seconds from the start): "
              + ", ".join(f"{k} {v:.2f}" for k, v in most["profile"].items()) + ".", "",
              f"Start-up: numba kernel first use {r['kernel']['first_s']:.2f} s, loaded from its cache "
              f"{r['kernel']['cached_s']:.2f} s (loaded: {r['kernel']['loaded']}; torch's import, which the CPU path "
              f"no longer pays, {r['kernel']['torch_import_s']:.2f} s); "
              f"`dsv3conv --help` {r['startup']['help_s']:.2f} s, a refusal (non-empty DST) {r['startup']['refusal_s']:.2f} s, "
              f"the tiny example end to end {r['startup']['tiny_s']:.2f} s (medians of 3)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="GB of FP8 weights in the large checkpoint")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3conv-bench-cpu"), help="where the files go")
    ap.add_argument("--out", type=Path, required=True, help="directory for bench_cpu.json and bench_cpu.md")
    ap.add_argument("--threads", help="thread counts to run, e.g. 1,4,16 (default 1, 2, 4, ... all cores)")
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoints for the next run")
    args = ap.parse_args()
    start = time.perf_counter()
    cores = len(os.sched_getaffinity(0))
    args.out.mkdir(parents=True, exist_ok=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    experts = experts_for(args.gb)
    if experts < 8:
        raise SystemExit(f"--gb {args.gb}: too small for two sizes of one MoE layer; give 0.6 or more")
    kernel = kernel_load()  # first: the runs below load a cached kernel, as after `make setup`
    print(f"numba kernel: first use {kernel['first_s']:.2f} s, cached {kernel['cached_s']:.2f} s", file=sys.stderr)
    large, small = build(args.dir / f"src-{experts}", experts), build(args.dir / f"src-{experts // 4}", experts // 4)
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    r: dict = {"date": datetime.date.today().isoformat(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "machine": machine(args.dir), "large": checkpoint_sizes(large), "small": checkpoint_sizes(small),
               "kernel": kernel, "startup": startup(args.dir)}
    writers = min(cores, 8)
    r.update(cat_s=cat_seconds(large), writers=writers, write_s=dd_seconds(args.dir, r["large"]["output_bytes"], writers))
    eager_out = args.dir / "eager"
    shutil.rmtree(eager_out, ignore_errors=True)
    eager = timed([sys.executable, "-c", EAGER, str(large), str(eager_out), "cpu"])
    r["eager"] = {"s": eager["s"], "rss": eager["rss"]}
    print(f"eager {eager['s']:.1f} s", file=sys.stderr, flush=True)
    out = args.dir / "dsv3conv"
    r["dsv3conv"] = []
    counts = thread_counts(cores, args.threads)
    for threads in reversed(counts):  # the most threads first: its output is the one compared
        r["dsv3conv"].insert(0, dsv3conv(large, out, threads))
        print(f"dsv3conv {threads} threads {r['dsv3conv'][0]['s']:.1f} s", file=sys.stderr, flush=True)
        if threads == counts[-1]:
            r["bit_exact_vs_eager"] = same_tensors(eager_out, out)
            shutil.rmtree(eager_out)
    r["default"] = dsv3conv(large, out, 0)
    r["default_threads"] = max(1, cores // 2)
    print(f"dsv3conv default threads {r['default']['s']:.1f} s", file=sys.stderr, flush=True)
    r["small"].update(dsv3conv(small, out, counts[-1]))
    shutil.rmtree(out)
    most, one = r["dsv3conv"][-1], r["dsv3conv"][0]
    r["steady_fp8_gbps"] = r["startup_s"] = None  # no fit where the smaller run was not the faster one
    if most["s"] > r["small"]["s"]:
        rate = (r["large"]["fp8_bytes"] - r["small"]["fp8_bytes"]) / (most["s"] - r["small"]["s"])
        r["steady_fp8_gbps"] = rate / 1e9
        r["startup_s"] = r["small"]["s"] - r["small"]["fp8_bytes"] / rate
    r["scaling"] = one["s"] / most["s"]
    r["bench_seconds"] = time.perf_counter() - start
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    (args.out / "bench_cpu.json").write_text(json.dumps(r, indent=2) + "\n")
    text = table(r)
    (args.out / "bench_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
