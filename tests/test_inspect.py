"""`inspect` and the checkpoint reader: the real layout's figures, the tiny checkpoint's, symlinks, single files."""

from __future__ import annotations

import json
import math
import os

import pytest

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.inspection import inspect_checkpoint
from dsv3conv.synthetic import make_replica, make_tiny
from tests.conftest import bytes_read, cli, cli_process

HEADERS_BOUND = 64 * 1024**2  # opening the replica reads ~21 MB (index, 163 headers); its tensor data is 688 GB


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_replica(tmp_path_factory.mktemp("replica") / "DeepSeek-V3")


def test_replica_figures_from_headers_only(replica):
    # The replica's data is holes (688 GB that take no disk space): inspect reads headers only.
    assert sum(p.stat().st_blocks for p in replica.glob("*.safetensors")) * 512 < 64 * 1024**2
    before = bytes_read()
    proc = cli("inspect", replica, "--json", check=0)
    assert bytes_read() - before < HEADERS_BOUND, "inspect read tensor data, not only headers"
    r = json.loads(proc.stdout)
    assert r["tensors"] == 91991
    assert r["dtypes"] == {"F8_E4M3": 45808, "F32": 45867, "BF16": 316}
    assert r["shards"] == 163
    assert r["tensor_bytes"] == 688_574_839_360
    assert r["mtp_layers"] == [61]
    p = r["params"]
    assert p["main"] == 671_026_419_200
    assert p["mtp"] == 13_463_426_304
    assert p["mtp_unique"] == 11_610_068_224
    assert p["scales"] == 41_540_496
    assert p["embedding"] == p["head"] == 129280 * 7168
    assert round(p["main_activated"] / 1e9, 3) == 36.626
    assert round((p["main_activated"] + p["embedding"]) / 1e9, 3) == 37.552
    assert r["problems"] == []


def test_replica_opens_from_headers_only(replica):
    before = bytes_read()
    ckpt = Checkpoint.open(replica)
    read = bytes_read() - before
    assert len(ckpt.shards) == 163 and not ckpt.problems
    assert read < HEADERS_BOUND, f"opening 163 shards read {read} bytes: more than their headers"


def _independent_params(tensors: dict, config: dict) -> dict:
    """The parameter figures recomputed here from the generator's own tensors, by a different route."""
    n_main, top_k, n_exp = config["num_hidden_layers"], config["num_experts_per_tok"], config["n_routed_experts"]
    mtp_prefix = tuple(f"model.layers.{i}." for i in range(n_main, n_main + config["num_nextn_predict_layers"]))
    numel = {k: math.prod(v.shape) for k, v in tensors.items() if not k.endswith("_scale_inv")}
    mtp = {k: n for k, n in numel.items() if k.startswith(mtp_prefix)}
    main = {k: n for k, n in numel.items() if k not in mtp}
    copies = sum(n for k, n in mtp.items() if k.endswith(("embed_tokens.weight", "shared_head.head.weight")))
    routed_main = sum(n for k, n in main.items() if ".mlp.experts." in k)
    routed_mtp = sum(n for k, n in mtp.items() if ".mlp.experts." in k)
    emb = numel["model.embed_tokens.weight"]
    return {
        "main": sum(main.values()), "mtp": sum(mtp.values()), "mtp_unique": sum(mtp.values()) - copies,
        "embedding": emb, "head": numel["lm_head.weight"],
        "main_activated": sum(main.values()) - emb - routed_main + routed_main * top_k // n_exp,
        "mtp_activated": sum(mtp.values()) - copies - routed_mtp + routed_mtp * top_k // n_exp,
        "scales": sum(math.prod(v.shape) for k, v in tensors.items() if k.endswith("_scale_inv")),
    }


@pytest.mark.parametrize("layers", [3, 5])
def test_tiny_figures_match_an_independent_count(tmp_path, layers):
    tensors = make_tiny(tmp_path / "c", num_hidden_layers=layers)
    ckpt = Checkpoint.open(tmp_path / "c")
    r = inspect_checkpoint(ckpt)
    assert r["params"] == _independent_params(tensors, ckpt.config)
    assert r["mtp_layers"] == [layers]
    assert r["tensors"] == len(tensors)
    assert r["problems"] == []
    assert r["quantization"]["weight_block_size"] == [128, 128]


def test_human_output_names_the_figures(tiny_src):
    proc = cli("inspect", tiny_src, check=0)
    for text in ("deepseek_v3", "MTP layer ids", "F8_E4M3", "main model", "MTP unique", "no problems found"):
        assert text in proc.stdout, proc.stdout


def test_output_off_a_terminal_is_not_wrapped_at_80_columns(tiny_src):
    """In a CI log or a file the quantization row stays on one line (rich would wrap at 80 columns)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = cli_process("inspect", tiny_src, env=env, check=0)  # a real process: its stdout is a pipe
    row = next(line for line in proc.stdout.splitlines() if "quantization" in line)
    assert '"weight_block_size": [128, 128]}' in row, proc.stdout


def test_symlinked_snapshot_directory(tmp_path, tiny_src):
    """A Hugging Face cache snapshot: every file is a symlink into blobs/."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(tiny_src.iterdir())):
        blob = blobs / f"blob{i}"
        blob.write_bytes(p.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    a, b = inspect_checkpoint(Checkpoint.open(snap)), inspect_checkpoint(Checkpoint.open(tiny_src))
    assert a["problems"] == [] and a["params"] == b["params"] and a["tensors"] == b["tensors"]


def test_single_file_checkpoint(tmp_path):
    tensors = make_tiny(tmp_path / "single", single_file=True)
    ckpt = Checkpoint.open(tmp_path / "single")
    assert list(ckpt.shards) == ["model.safetensors"] and ckpt.index is None
    r = inspect_checkpoint(ckpt)
    assert r["tensors"] == len(tensors) and r["problems"] == []


def test_problems_make_exit_code_one(tmp_path):
    make_tiny(tmp_path / "c")
    index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-000004.safetensors"
    (tmp_path / "c" / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = cli("inspect", tmp_path / "c", "--json", check=1)
    problems = json.loads(proc.stdout)["problems"]
    assert any("model.layers.0.ghost.weight" in p for p in problems), problems
