"""End-to-end dequant benchmark: dsv3conv against the storage's bounds and an eager converter, in one run.

For each size (`--layers 1 2`: checkpoints of real DeepSeek-V3 shapes with that many MoE layers), on the
same files:
  cat            one sequential read of the input (`cat SHARDS > /dev/null`)
  dd             one sequential write of an output-sized file (`dd conv=fsync`; `--skip-single-dd`: not run)
  dd xN          N writers at once (`--writers`, default 8), each writing 1/N of the output size into its own
                 file, each file fsync'd at its end
  overlap bound  max(cat, dd xN): what a converter that overlaps reading with N parallel writes can reach
  eager          a DeepSeek-style converter: a whole shard onto the device, each tensor dequantized with
                 plain torch, `save_file`, fsync
  dsv3conv       `dsv3conv dequant --device D` for each `--device` (run with DSV3CONV_PROFILE=1: seconds per
                 stage); `parts:cuda:0,cuda:1` runs one `--part k/N` process per listed device at once,
                 `processes:cuda:all` runs the device workers as spawned processes, `mapped:cuda` writes
                 through mappings (DSV3CONV_MAP_WRITES=1), `standin:cuda` converts on the CPU while the GPU
                 starts (DSV3CONV_STAND_IN=1); `--io R:W` (repeatable) runs it once per setting
                 with R reader and W writer threads (DSV3CONV_READERS, DSV3CONV_WRITERS). dsv3conv fsyncs each
                 output file before renaming it into place: its time includes writing the bytes to the disk,
                 as dd's does.
  dry run        `dsv3conv dequant --dry-run` alone: planning, part of the fixed cost
`--cold`: before each step the input is pushed out of the page cache (dirty pages written first, sync):
through /proc/sys/vm/drop_caches (root) or posix_fadvise(POSIX_FADV_DONTNEED) on each input file (no
privilege needed). A sandbox may accept either and do nothing (gVisor ignores fadvise's advice), so whether
one works is measured, not assumed: the first 1 GiB of one input file is read from the cache, then after each
method until one makes the read 1.5x slower; every time is printed, and the method that evicted is used
(none: the table says so, and its "cold" steps are warm-cache steps).

From the two sizes, each method's steady-state rate (extra FP8 input bytes / extra seconds) and fixed cost
(the seconds left at zero bytes). Peak RSS is the largest single process of a run; GPU peak the largest
device memory a run allocated; first byte the seconds from a dsv3conv process's start to its first write
(from its profile line, with the start-up steps before it); engine s the engine's wall time once its
backend was there (its profile: on one GPU the backend starts beside the engine, which copies and reads
meanwhile), and bound / engine that time's rate as a share of the overlap bound's. Results go to
OUT/bench_convert.json, the table to stdout and OUT/bench_convert.md.

    python scripts/bench_convert.py --device cuda --layers 1 2 --dir /dev/shm/bench --out /tmp/out
    python scripts/bench_convert.py --device cpu --layers 1 2 --experts 2 --vocab 1024 --dir /tmp/b --out /tmp/o
    python scripts/bench_convert.py --device cuda --layers 2 --shard-gb 1 --skip-eager --io 2:8 --io 4:16 ...
    python scripts/bench_convert.py --device cuda --layers 1 2 --shard-gb 1 --cold --dir /disk/b --out /tmp/o
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
import json, os, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dst.mkdir(parents=True, exist_ok=True)
where = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
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
PROFILE_PREFIX = "dsv3conv profile: "
PREFIXES = ("parts:", "processes:", "mapped:", "standin:")  # how a --device entry is run, before the device


def timed(cmd: list[str], env=None) -> dict:
    """Run a command in its own process: wall seconds, peak RSS (its process tree's largest), stdout, stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RSS_WRAPPER, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    lines = err.decode(errors="replace").splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd[:6])} failed with {proc.returncode}:\n" + "\n".join(lines[-20:]))
    rss = next(int(line.split()[1]) for line in reversed(lines) if line.startswith("@@maxrss"))
    return {"s": elapsed, "rss": rss * 1024, "stdout": out.decode(), "stderr": lines}


def all_of(commands: list[str]) -> str:
    """A shell script running the commands at once and failing if any of them fails."""
    starts = "; ".join(f"{c} & p{k}=$!" for k, c in enumerate(commands))
    waits = "; ".join(f"wait $p{k} || rc=1" for k in range(len(commands)))
    return f"rc=0; {starts}; {waits}; exit $rc"


EVICTIONS = ("drop_caches", "fadvise")  # ways to push files out of the page cache, tried in this order
EVICTED = 1.5  # a re-read this many times slower than from the cache came from the disk


def evict(paths: list[Path], method: str) -> str | None:
    """Push `paths` out of the page cache, dirty pages written first: `drop_caches` the whole cache (root),
    `fadvise` each file's pages (no privilege needed). None when done, else why it could not be done."""
    os.sync()
    if method == "drop_caches":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            return f"/proc/sys/vm/drop_caches: {exc.strerror or exc}"
        return None
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except (OSError, AttributeError) as exc:
        return f"posix_fadvise: {getattr(exc, 'strerror', None) or exc}"
    return None


def read_seconds(path: Path, limit: int = 1 << 30) -> float:
    """Seconds to read the first `limit` bytes of `path`."""
    buf = bytearray(16 << 20)
    start, done = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while done < limit and (n := f.readinto(buf)):
            done += n
    return time.perf_counter() - start


def eviction_check(path: Path, methods: tuple[str, ...]) -> dict:
    """Which of `methods` evicts here: the first 1 GiB of `path` read from the cache (the best of three), then
    after each method in turn until one makes the read EVICTED times slower. `method`: that one, or None."""
    read_seconds(path)  # into the cache
    cached = min(read_seconds(path) for _ in range(3))  # the best of three: a busy machine's noise is slower
    check = {"file": path.name, "bytes": min(path.stat().st_size, 1 << 30), "cached_s": cached,
             "tried": {}, "method": None}
    for method in methods:
        why = evict([path], method)
        check["tried"][method] = why or read_seconds(path)  # the read puts the pages back for the next method
        if why is None and check["tried"][method] >= EVICTED * check["cached_s"]:
            check["method"] = method
            break
    return check


def eviction_line(check: dict) -> str:
    tried = "; ".join(f"after {m}: " + (f"{v:.2f} s ({v / max(check['cached_s'], 1e-9):.1f}x)" if isinstance(v, float)
                                        else f"not done ({v})") for m, v in check["tried"].items())
    verdict = (f"{check['method']} evicts: the cold steps read from the disk" if check["method"] else
               f"no method made the read {EVICTED}x slower: the pages most likely stayed cached, so the 'cold' "
               "steps are warm-cache steps")
    return (f"cache eviction: {check['bytes'] / 1e9:.2f} GB of {check['file']} read in {check['cached_s']:.2f} s "
            f"from the cache; {tried}. {verdict}")


def profiles(stderr: list[str]) -> list[dict]:
    return [json.loads(line[len(PROFILE_PREFIX):]) for line in stderr if line.startswith(PROFILE_PREFIX)]


def dsv3conv_run(src: Path, dst: Path, device: str, work: Path, io: tuple[int, int] | None = None) -> dict:
    """One `dsv3conv dequant` (or several `--part` processes at once), profiled; `io`: (readers, writers)."""
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "dsv3conv", "dequant", str(src), str(dst), "--json", "--quiet"]
    env = dict(os.environ, DSV3CONV_PROFILE="1")
    if io is not None:
        env.update(DSV3CONV_READERS=str(io[0]), DSV3CONV_WRITERS=str(io[1]))
    if device.startswith("parts:"):
        devs = device.removeprefix("parts:").split(",")
        r = timed(["sh", "-c", all_of([
            f"{shlex.join(cmd)} --device {d} --part {k}/{len(devs)} > {shlex.quote(str(work / f'part-{k}.json'))}"
            for k, d in enumerate(devs, 1)])], env=env)
        parts = [json.loads((work / f"part-{k}.json").read_text()) for k in range(1, len(devs) + 1)]
        gpu_peak = max(p.get("gpu_peak_bytes") or 0 for p in parts)
    else:
        if device.startswith("processes:"):
            env["DSV3CONV_WORKERS"] = "processes"
        if device.startswith("mapped:"):
            env["DSV3CONV_MAP_WRITES"] = "1"
        if device.startswith("standin:"):
            env["DSV3CONV_STAND_IN"] = "1"
        r = timed(cmd + ["--device", device.split(":", 1)[1] if device.startswith(PREFIXES) else device], env=env)
        gpu_peak = json.loads(r["stdout"]).get("gpu_peak_bytes")
    shutil.rmtree(dst, ignore_errors=True)
    return {"s": r["s"], "rss": r["rss"], "gpu_peak": gpu_peak, "profile": profiles(r["stderr"])}


def cat_seconds(src: Path) -> float:
    """One sequential read of every shard of `src`."""
    shards = " ".join(shlex.quote(str(p)) for p in sorted(src.glob("*.safetensors")))
    return timed(["sh", "-c", f"cat {shards} > /dev/null"])["s"]


def dd_seconds(work: Path, total_bytes: int, writers: int) -> float:
    """`writers` dd processes at once, writing `total_bytes` in all (fsync'd), in `work`."""
    blobs = [work / f"dd-{i}.bin" for i in range(writers)]
    count = -(-total_bytes // writers // (16 << 20))
    t = timed(["sh", "-c", all_of([f"dd if=/dev/zero of={shlex.quote(str(b))} bs=16M count={count} conv=fsync "
                                   "status=none" for b in blobs])])["s"]
    for b in blobs:
        b.unlink()
    return t


def measure(src: Path, work: Path, args, out_bytes: int, evicted: str | None = None) -> dict:
    """Every method once on the checkpoint at `src`: {method: {"s": seconds, ...}}."""
    res: dict[str, dict] = {}
    shards = sorted(src.glob("*.safetensors"))
    # The method that evicted; where none did, the one asked (auto: fadvise, which at least writes dirty pages)
    method = evicted or (EVICTIONS[-1] if args.cold == "auto" else args.cold)

    def fresh() -> None:
        if args.cold:
            evict(shards, method)

    fresh()
    res["cat"] = {"s": cat_seconds(src)}
    if not args.skip_single_dd:
        fresh()
        res["dd"] = {"s": dd_seconds(work, out_bytes, 1)}
    fresh()
    n = args.writers
    res[f"dd x{n}"] = {"s": dd_seconds(work, out_bytes, n)}
    res["overlap bound"] = {"s": max(res["cat"]["s"], res[f"dd x{n}"]["s"])}
    if not args.skip_eager:
        fresh()
        device = args.device[0].split(":", 1)[1] if args.device[0].startswith(PREFIXES) else args.device[0]
        device = "cuda:0" if device == "cuda:all" else device.split(",")[0]
        r = timed([sys.executable, "-c", EAGER, str(src), str(work / "eager"), device])
        res["eager"] = {"s": r["s"], "rss": r["rss"], "gpu_peak": json.loads(r["stdout"].splitlines()[-1])["gpu_peak"]}
        shutil.rmtree(work / "eager", ignore_errors=True)
    for device in args.device:
        for io in args.io or [None]:
            fresh()
            label = f"dsv3conv {device}" + (f" r{io[0]} w{io[1]}" if io else "")
            res[label] = dsv3conv_run(src, work / "dsv3conv", device, work, io)
        dry = timed([sys.executable, "-m", "dsv3conv", "dequant", str(src), str(work / "dry"), "--dry-run", "--json",
                     "--device", device.split(":", 1)[1] if device.startswith(PREFIXES) else device])
        res[f"dry run {device}"] = {"s": dry["s"], "rss": dry["rss"]}
    return res


def checkpoint_sizes(root: Path) -> dict:
    """Input, FP8 and dequantized output bytes of the checkpoint at `root`, and its shard count."""
    from dsv3conv.checkpoint import Checkpoint

    ckpt = Checkpoint.open(root)
    fp8 = sum(t.nbytes for t in ckpt.tensors.values() if t.dtype == "F8_E4M3")
    scales = sum(t.nbytes for n, t in ckpt.tensors.items() if n.endswith("_scale_inv"))
    total = ckpt.tensor_bytes()
    return {"input_bytes": total, "fp8_bytes": fp8, "output_bytes": total + fp8 - scales,
            "shards": len(list(root.glob("*.safetensors")))}


def build(src: Path, layers: int, args) -> dict:
    """A checkpoint of `layers` MoE layers (no dense layer) at `src`; its sizes."""
    from dsv3conv.synthetic import make_real_shapes

    if not (src / "model.safetensors.index.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        make_real_shapes(src, num_layers=layers, num_experts=args.experts, shard_bytes=int(args.shard_gb * 1e9),
                         vocab_size=args.vocab, dense_layers=0)
        print(f"built {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return {"layers": layers, **checkpoint_sizes(src)}


def steady(sizes: list[dict], method: str) -> dict | None:
    """Rate at the margin (FP8 GB/s) and fixed seconds, from the smallest and the largest size."""
    a, b = sizes[0], sizes[-1]
    if len(sizes) < 2 or method not in a["results"] or method not in b["results"] or b["fp8_bytes"] == a["fp8_bytes"]:
        return None
    dt = b["results"][method]["s"] - a["results"][method]["s"]
    if dt <= 0:
        return {"gb_per_s": None, "fixed_s": None}
    rate = (b["fp8_bytes"] - a["fp8_bytes"]) / dt
    return {"gb_per_s": rate / 1e9, "fixed_s": a["results"][method]["s"] - a["fp8_bytes"] / rate}


def table(report: dict) -> str:
    sizes = report["sizes"]
    head = " | ".join(f"{s['layers']} layer(s): s" for s in sizes)
    lines = [f"| method | {head} | FP8 GB/s at the margin | fixed s | peak RSS | GPU peak | first byte s "
             "| end to end / bound | engine s | bound / engine |", "|---|" + "---:|" * (len(sizes) + 8)]
    bound = sizes[-1]["results"]["overlap bound"]["s"]
    for method in sizes[-1]["results"]:
        cells = [f"{s['results'][method]['s']:.2f}" if method in s["results"] else "-" for s in sizes]
        st = report["steady"].get(method) or {}
        rate = f"{st['gb_per_s']:.2f}" if st.get("gb_per_s") else "-"
        fixed = f"{st['fixed_s']:.2f}" if st.get("fixed_s") is not None else "-"
        last = sizes[-1]["results"][method]
        rss = f"{last['rss'] / 1e9:.2f} GB" if last.get("rss") else "-"
        gpu = f"{last['gpu_peak'] / 1e9:.2f} GB" if last.get("gpu_peak") else "-"
        first = first_byte(last)
        first = f"{first:.2f}" if first is not None else "-"
        e2e = f"{last['s'] / bound:.2f}" if not method.startswith("dry run") else "-"
        walls = [engine_seconds(p) for p in last.get("profile") or []]
        engine = f"{max(walls):.2f} | {bound / max(walls):.2f}" if walls else "- | -"
        lines.append(f"| {method} | {' | '.join(cells)} | {rate} | {fixed} | {rss} | {gpu} | {first} | {e2e} "
                     f"| {engine} |")
    for s in sizes:
        lines.append(f"\n{s['layers']} layer(s): input {s['input_bytes'] / 1e9:.2f} GB ({s['fp8_bytes'] / 1e9:.2f} GB FP8) "
                     f"in {s['shards']} shards, output {s['output_bytes'] / 1e9:.2f} GB, in {report['dir']} "
                     f"({report['fs_type']})")
        if s.get("eviction"):
            lines.append("  " + eviction_line(s["eviction"]))
        for method, r in s["results"].items():
            for p in r.get("profile") or []:
                marks = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if k.endswith("_s") and k != "wall_s" and v is not None)
                stages = ", ".join(f"{k} {v['s']:.2f} s" for k, v in p["stages"].items())
                lines.append(f"  {method} profile: wall {p['wall_s']:.2f} s; since the process start: {marks}; {stages}")
    return "\n".join(lines)


def engine_seconds(p: dict) -> float:
    """The engine's wall time once its backend was there (on one GPU the backend starts beside the engine:
    the seconds before that are start-up, copies and reads ahead)."""
    start, ready = p.get("start_s"), p.get("backend_s")
    if start is None or ready is None or ready <= start:
        return p["wall_s"]
    return max(start + p["wall_s"] - ready, 1e-9)


def first_byte(result: dict) -> float | None:
    """Seconds from a dsv3conv process's start to its first write (the earliest of its parts), if profiled."""
    marks = [p["first_write_s"] for p in result.get("profile") or [] if p.get("first_write_s") is not None]
    return min(marks) if marks else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", help="repeat to compare devices in one run (default: cpu)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="MoE layers of each size (two sizes)")
    ap.add_argument("--experts", type=int, default=256, help="routed experts per MoE layer (DeepSeek-V3: 256)")
    ap.add_argument("--vocab", type=int, default=16384, help="vocabulary (embedding and head are BF16 copies)")
    ap.add_argument("--shard-gb", type=float, default=4.3)
    ap.add_argument("--writers", type=int, default=8, help="parallel dd writers of the write bound")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv3conv-bench"), help="where checkpoints go")
    ap.add_argument("--out", type=Path, required=True, help="directory for bench_convert.json and .md")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by the next run)")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-single-dd", action="store_true", help="no single dd (the bound needs only dd xN)")
    ap.add_argument("--io", type=io_setting, action="append", metavar="R:W",
                    help="run dsv3conv with R reader and W writer threads (repeat for several settings)")
    ap.add_argument("--cold", nargs="?", const="auto", choices=("auto", *EVICTIONS),
                    help="push the input out of the page cache before each step: the first of drop_caches and "
                         "fadvise that works here (auto), or the one named")
    args = ap.parse_args()
    args.device = args.device or ["cpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    warm_up(args.dir / "warm-up", args.device)
    sizes = []
    for layers in sorted(set(args.layers)):
        src = args.dir / f"src-{layers}"
        # FP8 input ~ layers x (0.2 GB + 44 MB per expert); a run holds the input and the output (twice that)
        need = 3.1 * layers * (0.2e9 + args.experts * 3 * 2048 * 7168) + 6 * args.vocab * 7168 * 2
        free = shutil.disk_usage(args.dir).free + sum(p.stat().st_size for p in src.glob("*.safetensors"))
        if free < need:
            raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, {layers} layer(s) of {args.experts} experts need "
                             f"about {need / 1e9:.1f} GB; use fewer --experts or another --dir")
        size = build(src, layers, args)
        if args.cold:
            methods = EVICTIONS if args.cold == "auto" else (args.cold,)
            size["eviction"] = eviction_check(sorted(src.glob("*.safetensors"))[0], methods)
            print(eviction_line(size["eviction"]), file=sys.stderr, flush=True)
        size["results"] = measure(src, work, args, size["output_bytes"], size.get("eviction", {}).get("method"))
        sizes.append(size)
        print(f"{layers} layer(s) measured", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    from dsv3conv.writer import fs_type

    report = {"devices": args.device, "writers": args.writers, "experts": args.experts, "cold": args.cold,
              "io": args.io, "dir": str(args.dir), "fs_type": fs_type(args.dir) or "?", "sizes": sizes}
    report["steady"] = {m: steady(sizes, m) for m in sizes[-1]["results"] if not m.startswith("dry run")}
    text = table(report)
    print(text)
    (args.out / "bench_convert.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_convert.md").write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)


def io_setting(text: str) -> tuple[int, int]:
    """`R:W` -> (readers, writers)."""
    try:
        r, w = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give readers:writers, e.g. 2:8") from None
    if r < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: readers and writers are 1 or more")
    return r, w


def warm_up(root: Path, devices: list[str]) -> None:
    """One tiny conversion per device first: kernel compilation and caches are not what is measured."""
    from dsv3conv.synthetic import make_tiny

    shutil.rmtree(root, ignore_errors=True)
    make_tiny(root / "src")
    for device in devices:
        dsv3conv_run(root / "src", root / "out", device, root)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
