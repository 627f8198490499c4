"""Tensor names are parsed once, structurally: `model.layers.<N>.<rest>`, N as loaders write it.

A number written otherwise in any dotted part of a name (`03`, `003`, Arabic-Indic or full-width digits, a
layer or an expert) names no module a loader would find: the reader reports it (inspect lists it, verify
fails its headers check, conversions refuse) instead of converting it or renumbering it by string length.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from dsv3conv.checkpoint import INDEX_NAME, odd_index
from dsv3conv.layout import layer_id, layer_name, layer_parts
from dsv3conv.split_mtp import _renumber
from tests.conftest import assert_one_line_error, cli


def rename_tensors(root: Path, rename) -> None:
    """Rename tensors in every shard header and in the index (data untouched)."""
    for shard in root.glob("*.safetensors"):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        text = json.dumps({rename(k) if k != "__metadata__" else k: v for k, v in header.items()}).encode()
        text += b" " * (-len(text) % 8)
        shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    index = json.loads((root / INDEX_NAME).read_text())
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (root / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("name, parts", [
    ("model.layers.61.mlp.experts.61.gate_proj.weight", (61, "mlp.experts.61.gate_proj.weight")),
    ("model.layers.0.input_layernorm.weight", (0, "input_layernorm.weight")),
    ("model.layers.03.x", None), ("model.layers.\u0663.x", None), ("model.layers.+3.x", None),
    ("model.layers.3", None), ("model.embed_tokens.weight", None), ("lm_head.weight", None),
])
def test_layer_parts(name, parts):
    assert layer_parts(name) == parts
    assert layer_id(name) == (parts[0] if parts else None)
    if parts:
        assert layer_name(*parts) == name


@pytest.mark.parametrize("name, odd", [
    ("model.layers.10.mlp.experts.0.w", None), ("model.layers.03.x", "03"), ("model.layers.3.mlp.experts.007.w", "007"),
    ("model.layers.\uff13.x", "\uff13"), ("layers.\u0663.attn", "\u0663"), ("mtp.00.norm", "00"),
    ("model.norm.weight", None), ("blk.0.a1b2", None),
])
def test_odd_index(name, odd):
    assert odd_index(name) == odd


@pytest.mark.parametrize("name, shift, new", [
    ("model.layers.61.mlp.experts.61.gate_proj.weight", -61, "model.layers.0.mlp.experts.61.gate_proj.weight"),
    ("model.layers.100.eh_proj.weight", -61, "model.layers.39.eh_proj.weight"),
    ("model.layers.9.enorm.weight", -9, "model.layers.0.enorm.weight"),
    ("model.layers.10.enorm.weight", -9, "model.layers.1.enorm.weight"),
])
def test_renumber_is_structural(name, shift, new):
    assert _renumber(name, shift) == new


@pytest.mark.parametrize("number", ["03", "003", "\u0663", "\uff13"], ids=["03", "003", "arabic-indic", "fullwidth"])
def test_odd_layer_numbers_are_reported_not_renumbered(tiny_src, tmp_path, number):
    """The tiny checkpoint's MTP layer is 3; its tensors renamed `model.layers.<number>.*`."""
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    rename_tensors(src, lambda k: k.replace("model.layers.3.", f"model.layers.{number}.", 1))
    proc = cli("inspect", src, "--json")
    problems = json.loads(proc.stdout)["problems"]
    assert proc.returncode == 1 and any(f"model.layers.{number}." in p and "rename" in p for p in problems), problems
    needle = f"{number!r} is not written the way loaders"
    assert_one_line_error(cli("dequant", src, tmp_path / "out", "--quiet"), 1, needle)
    assert_one_line_error(cli("split-mtp", src, "--mtp-out", tmp_path / "mtp", "--quiet"), 1, needle)
    report = cli("verify", src, "--json")
    headers = next(c for c in json.loads(report.stdout)["checks"] if c["name"] == "headers")
    assert report.returncode == 1 and not headers["ok"] and needle in headers["detail"], headers
    assert not (tmp_path / "out").exists() and not (tmp_path / "mtp").exists()


@pytest.mark.parametrize("old, new", [("model.layers.0.", "model.layers.00."),
                                      ("model.layers.1.mlp.experts.1.", "model.layers.1.mlp.experts.01.")],
                         ids=["main-layer", "expert"])
def test_other_odd_numbers_are_refused(tiny_src, tmp_path, old, new):
    src = Path(shutil.copytree(tiny_src, tmp_path / "src"))
    rename_tensors(src, lambda k: k.replace(old, new, 1))
    for command in (("dequant", src, tmp_path / "out"), ("quant", src, tmp_path / "q")):
        assert_one_line_error(cli(*command, "--quiet"), 1, new, "rename the tensor")
