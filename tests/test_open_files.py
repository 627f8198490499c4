"""More shards than the process may open files: dequant and verify keep a bounded number open.

A run under `ulimit -n 1024` (the common default) on 1,100 shards: one handle per source shard would fail
part-way (after about 1,015 shards); the reader's bounded set of handles converts and verifies them all.
"""

from __future__ import annotations

import os
import resource

import pytest
import torch

from dsv3conv.checkpoint import Checkpoint, ShardReader
from dsv3conv.synthetic import quantize_blocks, tensor_bytes, tiny_config, write_checkpoint
from tests.conftest import cli_process

N_SHARDS = 1100
NOFILE = 1024


def _limit_open_files() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """1,100 shards, each an FP8 weight; every odd weight's scale one shard before it."""
    root = tmp_path_factory.mktemp("nofile") / "src"
    q, s = quantize_blocks(torch.randn(128, 16) * 0.02)
    q_bytes, s_bytes = tensor_bytes(q), tensor_bytes(s)
    shards = []
    for k in range(N_SHARDS):
        items = [(f"w{k}.weight", "F8_E4M3", (128, 16), lambda: q_bytes)]
        if k % 2 == 0:
            items.append((f"w{k}.weight_scale_inv", "F32", (1, 1), lambda: s_bytes))
            if k + 1 < N_SHARDS:
                items.append((f"w{k + 1}.weight_scale_inv", "F32", (1, 1), lambda: s_bytes))
        shards.append(items)
    write_checkpoint(root, shards, dict(tiny_config(), num_hidden_layers=0, num_nextn_predict_layers=0))
    return root


def test_reader_keeps_at_most_max_open_files(tiny_src):
    ckpt = Checkpoint.open(tiny_src)
    shards = sorted({str(tiny_src / t.file) for t in ckpt.tensors.values()})
    assert len(shards) > 2
    with ShardReader(tiny_src, max_open=2) as reader:
        for _ in range(2):
            for info in ckpt.tensors.values():
                assert bytes(reader.read(info)) == bytes(ckpt.read(info)), info.name
                assert len(_open_fds() & set(shards)) <= 2
    assert not _open_fds() & set(shards)


@pytest.mark.slow
def test_dequant_and_verify_under_ulimit_n_1024(many_shards, tmp_path):
    out = tmp_path / "out"
    proc = cli_process("dequant", many_shards, out, "--device", "cpu", "--quiet", preexec_fn=_limit_open_files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("*.safetensors"))) == N_SHARDS
    proc = cli_process("verify", out, "--against", many_shards, "--full", "--device", "cpu", "--quiet",
                       preexec_fn=_limit_open_files)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
