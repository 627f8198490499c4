"""`quant` of a DeepSeek-V4 BF16 checkpoint back to the V4 layout: FP8 weights with `<module>.scale` (E8M0
with `--scale-fmt ue8m0 --scale-dtype float8_e8m0fnu`), routed experts as block FP8; the tensor set, dtypes,
shapes and config.json of V4-Flash-Base (with `expert_dtype: "fp8"`, which V4 loaders need for block-FP8
experts); dequant(quant(x)) == x bit for bit; verified against its source."""

from __future__ import annotations

import json

import pytest

from dsv3conv.api import dequantize, quantize, verify_checkpoint
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.synthetic_v4 import make_v4
from tests.conftest import cli
from tests.test_repack_v4 import assert_same_tensors
from tests.test_verify import failed

E8M0 = {"scale_fmt": "ue8m0", "scale_dtype": "float8_e8m0fnu"}


def test_flash_base_round_trip(tmp_path) -> None:
    make_v4(tmp_path / "src", "flash-base")
    dequantize(tmp_path / "src", tmp_path / "bf16", device="cpu")
    quantize(tmp_path / "bf16", tmp_path / "q", device="cpu", **E8M0)
    src, q = Checkpoint.open(tmp_path / "src"), Checkpoint.open(tmp_path / "q")
    assert {n: (t.dtype, t.shape) for n, t in q.tensors.items()} == {n: (t.dtype, t.shape) for n, t in src.tensors.items()}
    assert "expert_dtype" not in src.config and q.config == dict(src.config, expert_dtype="fp8")
    dequantize(tmp_path / "q", tmp_path / "again", device="cpu")
    assert_same_tensors(tmp_path / "bf16", tmp_path / "again")
    report = verify_checkpoint(tmp_path / "q", against=tmp_path / "bf16", full=True)
    assert report["ok"], failed(report)


@pytest.mark.parametrize(("kind", "mtp"), [("flash", "keep"), ("0731", "drop")])
def test_packed_fp4_release_requantized_as_block_fp8(tmp_path, kind, mtp) -> None:
    make_v4(tmp_path / "src", kind)
    dequantize(tmp_path / "src", tmp_path / "bf16", device="cpu")
    quantize(tmp_path / "bf16", tmp_path / "q", device="cpu", mtp=mtp, **E8M0)
    q = Checkpoint.open(tmp_path / "q")
    expert = q.tensors["layers.1.ffn.experts.3.w1.weight"]
    assert expert.dtype == "F8_E4M3" and q.tensors["layers.1.ffn.experts.3.w1.scale"].dtype == "F8_E8M0"
    assert q.tensors["layers.1.ffn.gate.weight"].dtype == "BF16" and q.tensors["embed.weight"].dtype == "BF16"
    assert any(n.startswith("mtp.") for n in q.tensors) == (mtp == "keep")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["expert_dtype"] == "fp8" and config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert json.loads(cli("inspect", tmp_path / "q", "--json", check=0).stdout)["problems"] == []
    if mtp == "drop":
        assert not any(k.startswith("dspark") for k in config)
    report = verify_checkpoint(tmp_path / "q", against=tmp_path / "bf16", full=True)
    assert report["ok"], failed(report)
    assert f"MTP {mtp}" in {c["name"]: c["detail"] for c in report["checks"]}["tensor_set"]
