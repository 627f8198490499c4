"""DSV3CONV_PROFILE=1: one line per engine run on stderr, seconds and bytes per stage; nothing when unset."""

from __future__ import annotations

import json
import struct

import pytest

from dsv3conv.checkpoint import Checkpoint
from tests.conftest import cli

PREFIX = "dsv3conv profile: "


def profile_lines(stderr: str) -> list[dict]:
    return [json.loads(line[len(PREFIX):]) for line in stderr.splitlines() if line.startswith(PREFIX)]


def data_bytes(root) -> int:
    """Tensor bytes of the shards under `root`: each file less its 8-byte length field and header."""
    total = 0
    for path in root.glob("*.safetensors"):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        total += path.stat().st_size - 8 - n
    return total


def test_profile_line_counts_the_bytes_of_each_stage(tiny_src, tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3CONV_PROFILE", "1")
    proc = cli("dequant", tiny_src, tmp_path / "out", "--quiet", "--device", "cpu", check=0)
    (p,) = profile_lines(proc.stderr)
    stages = p["stages"]
    assert {"wait_buffer", "read", "wait_read", "wait_arena", "convert", "write", "wait_write"} <= stages.keys()
    assert stages["write"]["bytes"] == stages["convert"]["bytes"] == data_bytes(tmp_path / "out"), stages
    src = Checkpoint.open(tiny_src)
    fp8 = sum(t.nbytes for t in src.tensors.values() if t.dtype == "F8_E4M3")
    assert fp8 <= stages["read"]["bytes"] <= src.tensor_bytes(), stages["read"]
    assert all(v["s"] >= 0 and v["calls"] >= 1 and v["threads"] >= 1 for v in stages.values()), stages
    assert p["wall_s"] >= 0 and 0 <= p["start_s"] <= p["first_write_s"], p
    steps = ["planned_s", "torch_s", "backend_s", "start_s", "first_read_s", "first_write_s"]  # start-up, in order
    assert [p[k] for k in steps] == sorted(p[k] for k in steps), p


def test_each_run_shows_its_own_start_up_steps(tiny_src, tmp_path, monkeypatch):
    """Two runs in one process: the second line's start-up steps are the second run's, not the first's."""
    monkeypatch.setenv("DSV3CONV_PROFILE", "1")
    (a,) = profile_lines(cli("dequant", tiny_src, tmp_path / "a", "--quiet", "--device", "cpu", check=0).stderr)
    (b,) = profile_lines(cli("dequant", tiny_src, tmp_path / "b", "--quiet", "--device", "cpu", check=0).stderr)
    assert a["first_write_s"] <= b["planned_s"] <= b["first_write_s"], (a, b)


@pytest.mark.parametrize("value", ["", "0"])
def test_no_profile_unless_asked(tiny_src, tmp_path, monkeypatch, value):
    monkeypatch.setenv("DSV3CONV_PROFILE", value)
    proc = cli("dequant", tiny_src, tmp_path / "out", "--quiet", "--device", "cpu", check=0)
    assert PREFIX not in proc.stderr, proc.stderr
