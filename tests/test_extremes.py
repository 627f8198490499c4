"""Legal inputs at their extremes: zero-element quantized weights; a quantization_config of the wrong kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3conv.synthetic import tiny_config, write_checkpoint
from tests.conftest import cli


@pytest.fixture(scope="module")
def zero_rows(tmp_path_factory) -> Path:
    """A BF16 checkpoint with a zero-row weight of a kind quant quantizes, beside a normal one."""
    import torch

    from dsv3conv.synthetic import tensor_bytes

    root = tmp_path_factory.mktemp("zero") / "bf16"
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    config = dict(tiny_config(), num_hidden_layers=1, num_nextn_predict_layers=0)
    config.pop("quantization_config", None)
    write_checkpoint(root, [[("model.layers.0.mlp.gate_proj.weight", "BF16", (0, 200), lambda: b""),
                             ("model.layers.0.mlp.up_proj.weight", "BF16", (300, 200), lambda: tensor_bytes(w))]],
                     config)
    return root


def test_zero_element_weights_convert_and_verify(zero_rows, tmp_path):
    fp8, back = tmp_path / "fp8", tmp_path / "back"
    cli("quant", zero_rows, fp8, "--device", "cpu", "--quiet", check=0)
    cli("verify", fp8, "--against", zero_rows, "--full", "--device", "cpu", "--quiet", check=0)
    cli("dequant", fp8, back, "--device", "cpu", "--quiet", check=0)
    cli("verify", back, "--against", fp8, "--full", "--device", "cpu", "--quiet", check=0)


@pytest.mark.parametrize("value", ["fp8", ["fp8"], 1, True, {"weight_block_size": [112, 112]}],
                         ids=["string", "list", "number", "bool", "block-112"])
def test_verify_against_a_quant_output_with_a_bad_quantization_config(zero_rows, tmp_path, value):
    fp8 = tmp_path / "fp8"
    cli("quant", zero_rows, fp8, "--device", "cpu", "--quiet", check=0)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = value
    (fp8 / "config.json").write_text(json.dumps(config))
    proc = cli("verify", fp8, "--against", zero_rows, "--full", "--device", "cpu", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    failed = {c["name"]: c["detail"] for c in json.loads(proc.stdout)["checks"] if not c["ok"]}
    assert "quantization_config" in failed["config"], failed
