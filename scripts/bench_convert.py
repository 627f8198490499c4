"""End-to-end conversion benchmark: dsv3conv against the storage bound and an eager whole-shard converter.

In one run, on the same files (a real-shapes synthetic FP8 checkpoint):
  storage bound  plain sequential read of the input (cat) + write of an output-sized file (dd conv=fsync)
  eager          how the existing scripts work: load a whole shard (onto the device), dequantize each tensor
                 with plain torch, `save_file`, fsync
  parallel bound the same with N reads and N writes at once (`--parallel-io N`): what N workers can hope for
  dsv3conv       `dsv3conv dequant --device DEVICE`, once per `--device` given (e.g. cuda, then cuda:all);
                 `--device parts:cuda:0,cuda:1` runs one process per listed device at once, each `--part k/N`;
                 `--device processes:cuda:all` runs the device workers as spawned processes (default: threads)
Reports wall time, GB/s of FP8 input, peak host RSS and peak GPU memory. Peak RSS is the largest single
process of the run: with `parts:` or `processes:` each worker process counts alone, with threads one process
holds every worker.

    python scripts/bench_convert.py --device cpu --gb 8 --dir /tmp/bench
    python scripts/bench_convert.py --device cuda --gb 20 --dir /dev/shm/bench   # tmpfs
    python scripts/bench_convert.py --device cuda --device cuda:all --parallel-io 2 --skip-eager --dir /dev/shm/b
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

EAGER = r"""
import json, os, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dst.mkdir(parents=True, exist_ok=True)
index = json.loads((src / "model.safetensors.index.json").read_text())
where = index["weight_map"]
peak = 0
for shard in sorted(set(where.values())):
    state = load_file(str(src / shard), device=device)
    out = {}
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            sname = name + "_scale_inv"
            s = state[sname] if sname in state else load_file(str(src / where[sname]), device=device)[sname]
            s = s.float().repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            out[name] = (t.float() * s).to(torch.bfloat16)
        else:
            out[name] = t
    save_file({k: v.cpu() for k, v in out.items()} if device != "cpu" else out, str(dst / shard), {"format": "pt"})
    fd = os.open(dst / shard, os.O_RDONLY); os.fsync(fd); os.close(fd)
    if device.startswith("cuda"):
        peak = max(peak, torch.cuda.max_memory_allocated())
    del state, out
print(json.dumps({"gpu_peak": peak}))
"""


# Linux starts a new program's peak-RSS count at the RSS of the process it was forked from (this script,
# which may hold gigabytes after building a checkpoint): a small wrapper process launches the measured one.
RSS_WRAPPER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); "
    "sys.stderr.write(f'@@maxrss {ru.ru_maxrss}\\n'); sys.exit(os.waitstatus_to_exitcode(st))"
)


def timed(cmd: list[str], env=None) -> tuple[float, int, str]:
    """Run a command in its own process: wall seconds, peak RSS bytes (its process tree's largest), stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RSS_WRAPPER, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    lines = err.decode(errors="replace").splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with {proc.returncode}:\n" + "\n".join(lines[-20:]))
    rss = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("@@maxrss"))
    return elapsed, rss * 1024, out.decode()


def all_of(commands: list[str]) -> str:
    """A shell script running the commands at once and failing if any of them fails."""
    starts = "; ".join(f"{c} & p{k}=$!" for k, c in enumerate(commands))
    waits = "; ".join(f"wait $p{k} || rc=1" for k in range(len(commands)))
    return f"rc=0; {starts}; {waits}; exit $rc"


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", help="repeat to compare devices in one run (default: cpu)")
    ap.add_argument("--parallel-io", type=int, default=0, help="also measure N concurrent reads + writes")
    ap.add_argument("--gb", type=float, default=8.0, help="approximate FP8+BF16 bytes of the source checkpoint")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3conv-bench"))
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--keep", action="store_true", help="keep the source between runs")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    ap.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (real: 256)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    devices = args.device or ["cpu"]

    from dsv3conv.checkpoint import Checkpoint
    from dsv3conv.synthetic import make_real_shapes

    src = args.dir / "src"
    # Real tensor shapes; a MoE layer holds ~0.23 GB + 44 MB per expert (3.1 GB with 64 experts), the dense
    # layer 0 ~0.8 GB (vocab shrunk to 16384 so that the BF16 embedding and head stay as small a share as in
    # the release).
    experts = args.experts
    moe_gb = 0.23 + 0.044 * experts
    layers = max(2, round((args.gb - 0.8) / moe_gb) + 1)
    if not (src / "model.safetensors.index.json").exists():
        shutil.rmtree(args.dir, ignore_errors=True)
        t = time.perf_counter()
        make_real_shapes(src, num_layers=layers, num_experts=experts, shard_bytes=int(args.shard_gb * 1e9),
                         vocab_size=16384)
        print(f"built {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    ckpt = Checkpoint.open(src)
    fp8_bytes = sum(t.nbytes for t in ckpt.tensors.values() if t.dtype == "F8_E4M3")
    in_bytes = ckpt.tensor_bytes()
    out_bytes = in_bytes + fp8_bytes - sum(t.nbytes for n, t in ckpt.tensors.items() if n.endswith("_scale_inv"))
    shards = sorted(p for p in src.glob("*.safetensors"))
    results = {"devices": devices, "input_bytes": in_bytes, "fp8_bytes": fp8_bytes, "output_bytes": out_bytes,
               "shards": len(shards), "largest_shard": max(p.stat().st_size for p in shards)}

    if args.cold:
        drop_caches()
    t_read, _, _ = timed(["sh", "-c", f"cat {src}/*.safetensors > /dev/null"])
    blob = args.dir / "write-test.bin"
    t_write, _, _ = timed(["dd", "if=/dev/zero", f"of={blob}", "bs=16M", f"count={out_bytes // (16 << 20) + 1}",
                           "conv=fsync", "status=none"])
    blob.unlink()
    results["read_s"], results["write_s"] = t_read, t_write
    results["storage_bound_s"] = t_read + t_write
    if args.parallel_io > 1:
        n = args.parallel_io
        groups = [" ".join(str(p) for p in shards[i::n]) for i in range(n)]
        if args.cold:
            drop_caches()
        t_read_n, _, _ = timed(["sh", "-c", all_of([f"cat {g} > /dev/null" for g in groups if g])])
        count = out_bytes // n // (16 << 20) + 1
        t_write_n, _, _ = timed(["sh", "-c", all_of([
            f"dd if=/dev/zero of={args.dir}/write-test-{i}.bin bs=16M count={count} conv=fsync status=none"
            for i in range(n)])])
        for i in range(n):
            (args.dir / f"write-test-{i}.bin").unlink()
        results["parallel_io"], results["parallel_read_s"], results["parallel_write_s"] = n, t_read_n, t_write_n

    if not args.skip_eager:
        if args.cold:
            drop_caches()
        dst = args.dir / "eager"
        shutil.rmtree(dst, ignore_errors=True)
        eager_device = devices[0].split(":", 1)[1] if devices[0].startswith(("parts:", "processes:")) else devices[0]
        eager_device = "cuda:0" if eager_device == "cuda:all" else eager_device.split(",")[0]
        t, rss, out = timed([sys.executable, "-c", EAGER, str(src), str(dst), eager_device])
        results["eager_s"], results["eager_rss"] = t, rss
        results["eager_gpu_peak"] = json.loads(out.strip().splitlines()[-1])["gpu_peak"]
        shutil.rmtree(dst, ignore_errors=True)

    for device in devices:
        if args.cold:
            drop_caches()
        dst = args.dir / "dsv3conv"
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [sys.executable, "-m", "dsv3conv", "dequant", str(src), str(dst), "--json", "--quiet"]
        if device.startswith("parts:"):
            devs = device.removeprefix("parts:").split(",")
            t, rss, _ = timed(["sh", "-c", all_of([
                f"{shlex.join(cmd)} --device {d} --part {k}/{len(devs)} > {shlex.quote(str(args.dir / f'part-{k}.json'))}"
                for k, d in enumerate(devs, 1)])])
            parts = [json.loads((args.dir / f"part-{k}.json").read_text()) for k in range(1, len(devs) + 1)]
            summary = {"gpu_peak_bytes": max(p.get("gpu_peak_bytes") or 0 for p in parts)}
        else:
            env = dict(os.environ, DSV3CONV_WORKERS="processes") if device.startswith("processes:") else None
            t, rss, out = timed(cmd + ["--device", device.removeprefix("processes:")], env=env)
            summary = json.loads(out)
        if device in results.get("dsv3conv", {}):
            device = f"{device} (again)"
        results.setdefault("dsv3conv", {})[device] = {"s": t, "rss": rss, "gpu_peak": summary.get("gpu_peak_bytes")}
        shutil.rmtree(dst, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)

    gb = fp8_bytes / 1e9
    r = results
    print(f"\ninput {in_bytes / 1e9:.2f} GB ({gb:.2f} GB FP8) in {r['shards']} shards (largest {r['largest_shard'] / 1e9:.2f} GB), "
          f"output {out_bytes / 1e9:.2f} GB")
    print("| run | wall s | FP8 GB/s | peak RSS | vs storage bound |")
    print("|---|---|---|---|---|")
    sb = r["storage_bound_s"]
    print(f"| storage bound (cat {r['read_s']:.1f} s + dd write {r['write_s']:.1f} s) | {sb:.1f} | {gb / sb:.2f} | - | 1.00x |")
    if "parallel_io" in r:
        pb = r["parallel_read_s"] + r["parallel_write_s"]
        print(f"| parallel bound, {r['parallel_io']} streams (cat {r['parallel_read_s']:.1f} s + dd write "
              f"{r['parallel_write_s']:.1f} s) | {pb:.1f} | {gb / pb:.2f} | - | {pb / sb:.2f}x |")
    if "eager_s" in r:
        print(f"| eager whole-shard converter ({devices[0]}) | {r['eager_s']:.1f} | {gb / r['eager_s']:.2f} | {r['eager_rss'] / 1e9:.2f} GB | {r['eager_s'] / sb:.2f}x |")
    for device, d in r["dsv3conv"].items():
        print(f"| dsv3conv dequant --device {device} | {d['s']:.1f} | {gb / d['s']:.2f} | {d['rss'] / 1e9:.2f} GB | {d['s'] / sb:.2f}x |")
    first = r["dsv3conv"][devices[0]]["s"]
    if "eager_s" in r:
        print(f"dsv3conv ({devices[0]}) is {r['eager_s'] / first:.2f}x faster than the eager converter")
    for device in devices[1:]:
        print(f"--device {device} vs {devices[0]}: {first / r['dsv3conv'][device]['s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
