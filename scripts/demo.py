"""`make demo`: build a tiny DeepSeek-V3-shaped FP8 checkpoint and run the main job on it, as a user would."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from dsv3conv.synthetic import make_tiny


def run(*args: str) -> None:
    cmd = ["dsv3conv", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "dsv3conv", *args])
    if proc.returncode != 0:
        sys.exit(f"demo: `{shlex.join(cmd)}` exited with {proc.returncode}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dsv3conv-demo-") as tmp:
        src, dst = Path(tmp) / "DeepSeek-V3-tiny", Path(tmp) / "DeepSeek-V3-tiny-bf16"
        make_tiny(src)
        print(f"built a tiny DeepSeek-V3-shaped FP8 checkpoint in {src}")
        run("inspect", str(src))
        run("dequant", str(src), str(dst), "--dry-run")
        run("dequant", str(src), str(dst))
        run("inspect", str(dst))
        run("verify", str(dst), "--against", str(src), "--full")
        print("\ndemo: done")


if __name__ == "__main__":
    main()
