"""`dequant` of the DeepSeek-V4 family (FP8 + E8M0 `.scale`, MXFP4 experts, MTP or DSpark drafter) and of
compressed-tensors FP8_BLOCK: bit for bit against the plain-torch references, config as loaders expect it,
bad scales and mismatches refused naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch

from dsv3conv.api import dequantize
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.synthetic_v4 import make_compressed_tensors, make_v4
from tests.conftest import bits, cli, load_all, write_at

SCALE_SUFFIXES = (".scale", "_scale_inv", ".weight_scale")


def assert_refused(proc, *needles: str) -> None:
    """Exit 1, one `dsv3conv: error:` line holding every needle (progress lines may precede it), no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsv3conv: error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(n in errors[0] for n in needles), errors[0]


def _scale_of(name: str, src: dict) -> str:
    base = name[: -len(".weight")]
    return next(s for s in (base + ".scale", name + "_scale_inv", base + ".weight_scale") if s in src)


def assert_dequantized(out: dict, src: dict, dtype=torch.bfloat16, dropped=()) -> int:
    """Every quantized tensor of `src` bit-exact in `out` (reference of its format), the rest copied."""
    converted = 0
    for name, t in src.items():
        if name.endswith(SCALE_SUFFIXES) or name in dropped:
            assert name not in out, f"{name} should not be written"
            continue
        if t.dtype in (torch.int8, torch.float8_e4m3fn):
            scale = src[_scale_of(name, src)]
            ref = reference_dequant_mxfp4(t, scale, dtype) if t.dtype == torch.int8 else reference_dequant(t, scale, dtype)
            assert out[name].dtype == dtype and torch.equal(bits(out[name]), bits(ref)), f"{name}: not bit-exact"
            converted += 1
        else:
            assert torch.equal(out[name].view(torch.uint8), t.view(torch.uint8)), f"{name}: copied tensor changed"
    return converted


@pytest.mark.parametrize("kind", ["flash", "flash-base", "0731"])
def test_v4_dequant_bit_exact_and_config(tmp_path, kind) -> None:
    src = make_v4(tmp_path / "src", kind)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    out, _ = load_all(tmp_path / "out")
    assert assert_dequantized(out, src) == summary["tensors_converted"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and "expert_dtype" not in config
    assert config["torch_dtype"] == "bfloat16"
    assert ("removed expert_dtype" in " ".join(summary["config_changes"])) == (kind != "flash-base")
    if kind == "0731":
        assert config["dspark_target_layer_ids"] == [0, 1, 2]  # the drafter is kept, with its fields


def test_v4_dequant_float32(tmp_path) -> None:
    src = make_v4(tmp_path / "src", "flash")
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu", dtype="float32")
    out, _ = load_all(tmp_path / "out")
    assert assert_dequantized(out, src, torch.float32) > 0


@pytest.mark.parametrize("kind", ["flash", "0731"])
def test_v4_mtp_drop_by_names(tmp_path, kind) -> None:
    src = make_v4(tmp_path / "src", kind)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu", mtp="drop")
    out, _ = load_all(tmp_path / "out")
    mtp = {n for n in src if n.startswith("mtp.")}
    assert mtp and not any(n.startswith("mtp.") for n in out)
    assert_dequantized(out, src, dropped=mtp)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert not any(k.startswith("dspark") for k in config), summary["config_changes"]


def test_compressed_tensors_fp8_block_dequant(tmp_path) -> None:
    src = make_compressed_tensors(tmp_path / "src")
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    out, _ = load_all(tmp_path / "out")
    assert assert_dequantized(out, src) == summary["tensors_converted"] == 64
    assert out["lm_head.weight"].dtype == torch.bfloat16  # on the ignore list: copied
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("scale", ["layers.1.attn.wq_b.scale", "layers.2.ffn.experts.1.w2.scale"])
def test_e8m0_nan_scale_refused(tmp_path, scale) -> None:
    make_v4(tmp_path / "src", "flash")
    write_at(tmp_path / "src", scale, 0, b"\xff")
    proc = cli("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu")
    assert_refused(proc, f"`{scale}`")
    assert not (tmp_path / "out" / "config.json").exists()


def test_one_byte_tensor_without_scale_refused(tmp_path) -> None:
    """An I8 weight whose scale is gone (renamed here, index and header alike) is neither FP8 nor packed FP4."""
    make_v4(tmp_path / "src", "flash")
    old, new = "layers.0.ffn.experts.2.w3.scale", "layers.0.ffn.experts.2.w3.scalX"  # same length: offsets hold
    index = tmp_path / "src" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = tmp_path / "src" / data["weight_map"].pop(old)
    data["weight_map"][new] = shard.name
    index.write_text(json.dumps(data))
    shard.write_bytes(shard.read_bytes().replace(old.encode(), new.encode(), 1))
    proc = cli("dequant", tmp_path / "src", tmp_path / "out", "--device", "cpu")
    assert_refused(proc, "`layers.0.ffn.experts.2.w3.weight` is I8 without `layers.0.ffn.experts.2.w3.scale`")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flash", "0731"])
def test_v4_dequant_cuda_bit_exact(tmp_path, kind) -> None:
    src = make_v4(tmp_path / "src", kind)
    summary = dequantize(tmp_path / "src", tmp_path / "out", device="cuda")
    out, _ = load_all(tmp_path / "out")
    assert assert_dequantized(out, src) == summary["tensors_converted"]


# ------------------------------------------------------------------------------------------- split-mtp
@pytest.mark.parametrize("kind", ["flash", "0731"])
def test_v4_split_mtp_main_drops_mtp_names_byte_for_byte(tmp_path, kind) -> None:
    src = make_v4(tmp_path / "src", kind)
    proc = cli("split-mtp", tmp_path / "src", "--main-out", tmp_path / "main")
    assert proc.returncode == 0, proc.stderr
    out, _ = load_all(tmp_path / "main")
    assert set(out) == {n for n in src if not n.startswith("mtp.")}
    for name, t in out.items():
        assert torch.equal(t.view(torch.uint8), src[name].view(torch.uint8)), name
    config = json.loads((tmp_path / "main" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and not any(k.startswith("dspark") for k in config)
    assert config["quantization_config"]["scale_fmt"] == "ue8m0"  # still quantized: kept


@pytest.mark.parametrize(("kind", "layout"), [("flash", "sglang"), ("flash", "full"), ("0731", "sglang"), ("0731", "full")])
def test_v4_split_mtp_draft_byte_for_byte(tmp_path, kind, layout) -> None:
    """The drafter under its own `mtp.*` names (full: with the shared embedding and head), the source's config."""
    src = make_v4(tmp_path / "src", kind)
    proc = cli("split-mtp", tmp_path / "src", "--mtp-out", tmp_path / "draft", "--mtp-layout", layout)
    assert proc.returncode == 0, proc.stderr
    out, _ = load_all(tmp_path / "draft")
    shared = {"embed.weight", "head.weight"} if layout == "full" else set()
    assert set(out) == {n for n in src if n.startswith("mtp.")} | shared
    for name, t in out.items():
        assert torch.equal(t.view(torch.uint8), src[name].view(torch.uint8)), name
    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert config == json.loads((tmp_path / "src" / "config.json").read_text())
