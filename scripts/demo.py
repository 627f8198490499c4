"""`make demo`: the README's workflow on a tiny example checkpoint, run as a user would; the files stay.

Writes demo-out/tiny-fp8 (made by `dsv3conv example fp8`) and demo-out/tiny-bf16 (its conversion), replacing
the demo-out/ of an earlier demo.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")


def run(*args: str) -> None:
    cmd = ["dsv3conv", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "dsv3conv", *args])
    if proc.returncode != 0:
        sys.exit(f"demo: `{shlex.join(cmd)}` exited with {proc.returncode}")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)  # the previous demo's files
    src, dst = str(OUT / "tiny-fp8"), str(OUT / "tiny-bf16")
    run("example", "fp8", src)
    run("inspect", src)
    run("dequant", src, dst, "--mtp", "drop", "--dry-run")
    run("dequant", src, dst, "--mtp", "drop")
    run("verify", dst, "--against", src, "--full")
    print(f"\ndemo: done; the checkpoints are in {OUT.resolve()} (FP8 source tiny-fp8, BF16 output tiny-bf16).\n"
          "Run the tool yourself with .venv/bin/dsv3conv, or after `source .venv/bin/activate` as dsv3conv.")


if __name__ == "__main__":
    main()
