"""`verify` (alone and `--against`) on the DeepSeek-V4 family and compressed-tensors FP8_BLOCK: the outputs of
dequant and split-mtp pass whole; damage is found naming the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsv3conv.api import dequantize, split_mtp, verify_checkpoint
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.synthetic_v4 import make_compressed_tensors, make_v4
from tests.conftest import write_at
from tests.test_verify import failed, flip_byte

EXPERT = "layers.1.ffn.experts.2.w3.weight"  # packed FP4 in V4 Flash and -0731, FP8 in Flash-Base
DENSE = "layers.2.attn.wq_b.weight"  # FP8 + E8M0 `.scale`
CT_WEIGHT = "model.layers.1.mlp.experts.0.up_proj.weight"  # FP8 + `.weight_scale`


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4src")
    out = {}
    for kind in ("flash", "flash-base", "0731"):
        make_v4(root / kind, kind)
        out[kind] = root / kind
    make_compressed_tensors(root / "ct")
    out["ct"] = root / "ct"
    return out


def _passes(report: dict) -> dict[str, str]:
    assert report["ok"], failed(report)
    return {c["name"]: c["detail"] for c in report["checks"]}


@pytest.mark.parametrize("kind", ["flash", "flash-base", "0731", "ct"])
def test_sources_verify_alone(sources, kind) -> None:
    detail = _passes(verify_checkpoint(sources[kind], full=True))
    if kind == "ct":
        assert detail["fp8_scales"].startswith("64 FP8 weights")
        return
    packed = {"flash": 48, "0731": 72, "flash-base": 0}[kind]
    assert ("packed FP4" in detail["fp8_scales"]) == bool(packed), detail["fp8_scales"]
    assert detail["mtp"].endswith(("a DSpark drafter at mtp.0-2 present" if kind == "0731" else "MTP at mtp.0 present"))


@pytest.mark.parametrize("kind", ["flash", "flash-base", "0731", "ct"])
@pytest.mark.parametrize("mtp", ["keep", "drop"])
def test_dequant_output_verifies_against_source(sources, tmp_path, kind, mtp) -> None:
    dequantize(sources[kind], tmp_path / "out", device="cpu", mtp=mtp)
    detail = _passes(verify_checkpoint(tmp_path / "out", against=sources[kind], full=True))
    assert f"dequant of the source makes them (to BF16, MTP {mtp})" in detail["tensor_set"]
    assert ("dequantized from packed FP4" in detail["tensor_set"]) == (kind in ("flash", "0731"))
    assert detail["data_vs_source"].startswith("all ") and "bit-identical" in detail["data_vs_source"]
    if kind in ("flash", "0731"):
        assert "expert_dtype removed" in detail["config_vs_source"]


def test_float32_dequant_verifies(sources, tmp_path) -> None:
    dequantize(sources["flash"], tmp_path / "out", device="cpu", dtype="float32")
    assert "to F32" in _passes(verify_checkpoint(tmp_path / "out", against=sources["flash"]))["tensor_set"]


@pytest.mark.parametrize(("kind", "tensor", "element"), [("flash", EXPERT, 77), ("flash", DENSE, 5),
                                                          ("ct", CT_WEIGHT, 300)])
def test_changed_value_found(sources, tmp_path, kind, tensor, element) -> None:
    dequantize(sources[kind], tmp_path / "out", device="cpu")
    flip_byte(tmp_path / "out", tensor, element)
    report = verify_checkpoint(tmp_path / "out", against=sources[kind], full=True)
    bad = failed(report)
    assert set(bad) == {"data_vs_source"}, bad
    assert f"tensor `{tensor}`" in bad["data_vs_source"] and "1 of " in bad["data_vs_source"]
    assert report["mismatches"] == [tensor]


@pytest.mark.parametrize(("value", "needle"), [
    ("fp4", "config.json says expert_dtype fp4 but routed expert"),
    ("fp8", "config.json says expert_dtype fp8 but routed expert `layers.0.ffn.experts.0.w1.weight` is BF16"),
])
def test_expert_dtype_left_in_config_found(sources, tmp_path, value, needle) -> None:
    dequantize(sources["flash"], tmp_path / "out", device="cpu")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["expert_dtype"] = value
    config_path.write_text(json.dumps(config))
    bad = failed(verify_checkpoint(tmp_path / "out", against=sources["flash"]))
    assert f"`expert_dtype`: expected absent, found \"{value}\"" in bad["config_vs_source"]
    assert needle in bad["quantization_config"]


def test_e8m0_nan_scale_found(sources, tmp_path) -> None:
    src = Path(shutil.copytree(sources["flash"], tmp_path / "src"))
    write_at(src, "layers.1.ffn.experts.2.w3.scale", 3, b"\xff")
    bad = failed(verify_checkpoint(src, full=True))
    assert set(bad) == {"values"}, bad
    assert "`layers.1.ffn.experts.2.w3.scale` (F8_E8M0" in bad["values"] and "not finite and > 0" in bad["values"]


def test_missing_scale_named_with_its_naming(sources, tmp_path) -> None:
    src = Path(shutil.copytree(sources["flash"], tmp_path / "src"))
    from tests.test_verify import remove_tensor

    remove_tensor(src, "layers.2.attn.wq_b.scale")
    bad = failed(verify_checkpoint(src))
    assert "`layers.2.attn.wq_b.weight` is F8_E4M3 but `layers.2.attn.wq_b.scale` is missing" in bad["fp8_scales"]


def test_compressed_tensors_ignore_list_checked(sources, tmp_path) -> None:
    src = Path(shutil.copytree(sources["ct"], tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:.*up_proj$")
    (src / "config.json").write_text(json.dumps(config))
    bad = failed(verify_checkpoint(src))
    assert set(bad) == {"quantization_config"}, bad
    assert "matches quantization_config.ignore entry 're:.*up_proj$'" in bad["quantization_config"]


@pytest.mark.parametrize("kind", ["flash", "0731"])
def test_split_mtp_main_verifies(sources, tmp_path, kind) -> None:
    split_mtp(sources[kind], main_out=tmp_path / "main")
    detail = _passes(verify_checkpoint(tmp_path / "main", against=sources[kind], full=True))
    assert "split-mtp main of the source" in detail["tensor_set"]
    assert detail["mtp"] == "no mtp.* tensors declared, none present"


def test_compressed_tensors_split_mtp_verifies(sources, tmp_path) -> None:
    """`.weight_scale` pairs travel with their weights into both outputs."""
    split_mtp(sources["ct"], main_out=tmp_path / "main", mtp_out=tmp_path / "draft")
    for out, kind in (("main", "split-mtp main"), ("draft", "split-mtp draft")):
        detail = _passes(verify_checkpoint(tmp_path / out, against=sources["ct"], full=True))
        assert f"{kind} of the source" in detail["tensor_set"]
    assert any(n.endswith(".weight_scale") for n in Checkpoint.open(tmp_path / "draft").tensors)


@pytest.mark.parametrize("kind", ["flash", "0731"])
@pytest.mark.parametrize("layout", ["sglang", "full"])
def test_split_mtp_draft_verifies(sources, tmp_path, kind, layout) -> None:
    split_mtp(sources[kind], mtp_out=tmp_path / "draft", mtp_layout=layout)
    detail = _passes(verify_checkpoint(tmp_path / "draft", against=sources[kind], full=True))
    assert f"split-mtp draft of the source makes them (layout {layout})" in detail["tensor_set"]
    assert "no main layers" in detail["layers"]


def test_split_mtp_draft_missing_tensor_found(sources, tmp_path) -> None:
    from tests.test_verify import remove_tensor

    split_mtp(sources["0731"], mtp_out=tmp_path / "draft")
    remove_tensor(tmp_path / "draft", "mtp.2.markov_head.markov_w1.weight")
    bad = failed(verify_checkpoint(tmp_path / "draft", against=sources["0731"]))
    assert "missing from CKPT: `mtp.2.markov_head.markov_w1.weight`" in bad["tensor_set"]


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["dequant", "fp8"])
def test_verify_on_cuda(sources, tmp_path, experts) -> None:
    """The comparison runs the conversion again on the GPU backend (MXFP4 Triton kernel, repack on device)."""
    dequantize(sources["0731"], tmp_path / "out", device="cpu", experts=experts)
    detail = _passes(verify_checkpoint(tmp_path / "out", against=sources["0731"], full=True, device="cuda"))
    assert "on cuda" in detail["data_vs_source"]
