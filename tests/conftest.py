"""Shared fixtures: small checkpoints built by the tests themselves (no network, no hub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsv3conv.synthetic import make_tiny


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory) -> Path:
    """A tiny FP8 checkpoint (F32 scales, MTP at layer 3, a scale in another shard). Read-only for tests."""
    root = tmp_path_factory.mktemp("tiny") / "src"
    make_tiny(root)
    return root


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, dict]:
    """A fresh tiny checkpoint a test may damage, with its tensors."""
    root = tmp_path / "src"
    tensors = make_tiny(root)
    return root, tensors


def run_cli(*args: str, check: int | None = None) -> subprocess.CompletedProcess:
    """Run `dsv3conv` as a user would (a separate process); optionally assert the exit code."""
    proc = subprocess.run([sys.executable, "-m", "dsv3conv", *map(str, args)], capture_output=True, text=True)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}, expected {check}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"
    return proc
