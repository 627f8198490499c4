"""Interoperability of the DeepSeek-V4 family: transformers' `DeepseekV4ForCausalLM` loads dsv3conv's BF16
output of each tiny V4 checkpoint with no missing key (it maps the release's names itself and ignores
`mtp.*`), and holds the plain-torch reference dequantization of every weight checked: dense FP8 + E8M0, and
the routed experts (packed FP4 or FP8) that it stacks into `gate_up_proj` / `down_proj`.

transformers cannot load the quantized V4 source itself on a CPU (packed FP4 experts, E8M0 block scales), so
the reference is dsv3conv's own plain-torch one (`kernels/*`), not a second loader."""

from __future__ import annotations

import pytest
import torch

from dsv3conv.api import dequantize
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.kernels.mxfp4_dequant import reference_dequant_mxfp4
from dsv3conv.synthetic_v4 import make_v4, v4_tiny_config
from tests.conftest import bits

transformers = pytest.importorskip("transformers", reason="install the interop extra: pip install -e '.[interop]'")
if "deepseek_v4" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
    pytest.skip(f"transformers {transformers.__version__} does not know deepseek_v4", allow_module_level=True)


def _ref(src: dict, weight: str) -> torch.Tensor:
    """The reference dequantization of `weight` (packed FP4 or FP8 with its `.scale`) to BF16."""
    w, scale = src[weight], src[weight[: -len(".weight")] + ".scale"]
    if w.dtype == torch.int8:
        return reference_dequant_mxfp4(w, scale, torch.bfloat16)
    return reference_dequant(w, scale, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flash", "flash-base", "0731"])
def test_transformers_loads_v4_bf16_output(tmp_path, kind) -> None:
    src = make_v4(tmp_path / "src", kind)
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV4ForCausalLM"
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"]), info["unexpected_keys"]
    params = dict(model.named_parameters())
    assert torch.equal(bits(params["lm_head.weight"]), bits(src["head.weight"]))
    for layer in range(v4_tiny_config(kind)["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        assert torch.equal(bits(params[f"{p}.self_attn.q_b_proj.weight"]), bits(_ref(src, f"layers.{layer}.attn.wq_b.weight")))
        gate_up, down = params[f"{p}.mlp.experts.gate_up_proj"], params[f"{p}.mlp.experts.down_proj"]
        for e in range(gate_up.shape[0]):
            f = f"layers.{layer}.ffn.experts.{e}"
            want = torch.cat((_ref(src, f"{f}.w1.weight"), _ref(src, f"{f}.w3.weight")))
            assert torch.equal(bits(gate_up[e]), bits(want)), f"{f}: w1/w3 not bit-exact in gate_up_proj"
            assert torch.equal(bits(down[e]), bits(_ref(src, f"{f}.w2.weight"))), f"{f}.w2 not bit-exact"
    logits = model(torch.tensor([[1, 7, 42, 3]])).logits
    assert logits.shape == (1, 4, v4_tiny_config(kind)["vocab_size"]) and bool(torch.isfinite(logits).all())
