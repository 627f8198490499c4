"""Can one process write as fast as several? N threads of one process against N processes, each writing its own
file with os.pwrite in 64 MiB pieces (the pipeline's writers), then N threads reading them back with os.preadv.

    python scripts/bench_write.py --dir /dev/shm/wtest --gb 16 --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PIECE = 64 << 20


def write_file(path: Path, nbytes: int) -> None:
    data = memoryview(bytearray(os.urandom(1 << 20)) * (PIECE >> 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, nbytes, PIECE):
            os.pwrite(fd, data[: min(PIECE, nbytes - off)], off)
    finally:
        os.close(fd)


def threads(paths: list[Path], each: int) -> float:
    t = time.perf_counter()
    ts = [threading.Thread(target=write_file, args=(p, each)) for p in paths]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def processes(paths: list[Path], each: int) -> float:
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--one", str(p), str(each)]) for p in paths]
    for p in procs:
        p.wait()
    return time.perf_counter() - t


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        write_file(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/dsv3conv-wtest"))
    ap.add_argument("--gb", type=float, default=16.0, help="total bytes written per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    total = int(args.gb * 1e9)
    warm = args.dir / "warmup.bin"
    threads([warm], 4 * PIECE)  # first touches of the filesystem and the allocator stay out of the table
    warm.unlink()
    print("| writers | threads of one process GB/s | processes GB/s | processes / threads |")
    print("|---|---|---|---|")
    for n in args.workers:
        paths = [args.dir / f"w{i}.bin" for i in range(n)]
        each = total // n // PIECE * PIECE
        row = []
        for fn in (threads, processes):
            for p in paths:
                p.unlink(missing_ok=True)
            row.append(each * n / fn(paths, each) / 1e9)
        print(f"| {n} | {row[0]:.2f} | {row[1]:.2f} | {row[1] / row[0]:.2f}x |", flush=True)
        for p in paths:
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
