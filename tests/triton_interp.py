"""Run a test module's `check_*` functions once, in a child process under Triton's interpreter.

TRITON_INTERPRET=1 must be set before any `@triton.jit` function is created, and another test in the same
pytest process may already have imported a kernel module without it. So the checks run in a child
(`python -m <the test module> RESULT.json` from the repository root), and each test asserts on one result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
WORKER_TIMEOUT_S = 600


def collect_checks(namespace: dict) -> list[str]:
    return [name for name in namespace if name.startswith("check_")]


def run_checks(namespace: dict, result_path: str) -> None:
    """Child process body: run every check, write {name: "ok" | message} to `result_path`."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run me through interpreted(): TRITON_INTERPRET=1 is not set")
    import torch

    torch.set_num_threads(2)
    results = {}
    for name in collect_checks(namespace):
        try:
            namespace[name]()
            results[name] = "ok"
        except AssertionError as e:
            results[name] = f"AssertionError: {e}"
        except Exception:  # noqa: BLE001 - report any failure of a check as its result
            results[name] = traceback.format_exc(limit=6)
    Path(result_path).write_text(json.dumps(results))


def interpreted(module: str, out_dir: Path) -> dict[str, str]:
    """Run `module`'s checks in a child with TRITON_INTERPRET=1; its results, or a failed test."""
    path = out_dir / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", module, str(path)], env=dict(os.environ, TRITON_INTERPRET="1"), cwd=REPO,
        capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False,
    )
    if proc.returncode != 0 or not path.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())
