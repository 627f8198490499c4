"""Interoperability: real loaders accept dsv3conv's output.

- transformers (CPU): the BF16 output loads as `DeepseekV3ForCausalLM` with no missing and no unexpected keys
  (with the MTP layer kept, only its keys are unexpected) and gives the logits of a model built from the
  reference-dequantized weights; where every FP8 shape is a multiple of 128 (the only case transformers'
  own FP8 dequantization handles correctly), its `FineGrainedFP8Config(dequantize=True)` load of the FP8
  source equals the load of dsv3conv's output tensor for tensor. Siblings: Qwen3 FP8 and V3.2.
- SGLang's NextN draft: `split-mtp --mtp-out` names and config as its loader reads them (checked against
  the loader's rules, written out here; SGLang itself needs a GPU).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dsv3conv.api import dequantize, split_mtp
from dsv3conv.checkpoint import Checkpoint
from dsv3conv.kernels.fp8_block_dequant import reference_dequant
from dsv3conv.layout import deepseek_v3_tensors, layer_id
from dsv3conv.synthetic import make_sibling, make_tiny, tiny_config

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError as exc:  # pragma: no cover - `make setup` installs it (the `interop` extra)
    transformers = None
    _IMPORT_ERROR = f"transformers is not importable ({exc}); install the extra: pip install -e '.[interop]'"
else:
    _IMPORT_ERROR = ""

needs_transformers = pytest.mark.skipif(transformers is None, reason=_IMPORT_ERROR or "-")
EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Every FP8 shape a multiple of 128: kv_b_proj is [heads * (nope + v), kv_lora] and kv_a_proj_with_mqa
# [kv_lora + rope, hidden], so kv_lora and rope must both be multiples of 128.
ALIGNED = {"hidden_size": 256, "q_lora_rank": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
           "qk_nope_head_dim": 64, "qk_rope_head_dim": 128, "v_head_dim": 64, "kv_lora_rank": 128,
           "intermediate_size": 256, "moe_intermediate_size": 128}


# -------------------------------------------------------------------------------------------- helpers
def _dtype_kw() -> str:
    """transformers 4.56 renamed `torch_dtype` to `dtype` (the old name still works, with a warning)."""
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _load(path: Path, **kwargs):
    """`from_pretrained` in BF16 with eager attention; returns (model, loading info)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, **{_dtype_kw(): torch.bfloat16}, **kwargs
    )
    return model.eval(), info


def _require(name: str) -> None:
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


def _reference_state(tensors: dict[str, torch.Tensor], model_keys: set[str], skip_layers=()) -> dict:
    """The source's weights, FP8 ones through `reference_dequant`, in the model's parameter layout.

    transformers 5 fuses routed experts while loading (`experts.gate_up_proj` [E, 2I, H] = gate then up;
    `experts.down_proj` [E, H, I]); where the model has per-expert parameters they stay as they are.
    """
    state, experts = {}, {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv") or layer_id(name) in skip_layers:
            continue
        value = reference_dequant(t, tensors[name + "_scale_inv"], torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t
        m = EXPERT_RE.match(name)
        if m and f"{m.group(1)}.gate_up_proj" in model_keys:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        else:
            state[name] = value
    for prefix, parts in experts.items():
        ids = sorted({e for e, _ in parts})
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]]) for e in ids])
        state[f"{prefix}.down_proj"] = torch.stack([parts[e, "down_proj"] for e in ids])
    return state


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:8]}"
    for name, w in want.items():
        g = got[name]
        # Parameters transformers keeps in float32 (router weights) hold the BF16 values exactly.
        assert g.shape == w.shape and torch.equal(g.to(w.dtype), w), (
            f"{what}: `{name}` differs, max |diff| {(g.float() - w.float()).abs().max().item()}"
        )


def _assert_clean(info: dict) -> None:
    assert not info["missing_keys"], sorted(info["missing_keys"])
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])
    assert not info["mismatched_keys"] and not info["error_msgs"], info


def _fp8_loader():
    """A `FineGrainedFP8Config(dequantize=True)` for from_pretrained, or a skip naming what is missing."""
    _require("FineGrainedFP8Config")
    pytest.importorskip(
        "accelerate", reason="transformers refuses to load FP8 checkpoints without accelerate "
        "(FineGrainedFP8HfQuantizer.validate_environment); pip install accelerate",
    )
    return transformers.FineGrainedFP8Config(dequantize=True)


# ------------------------------------------------------------------------------- DeepSeek-V3 in BF16
@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> dict:
    """A tiny V3 FP8 source (shapes not multiples of 128, MTP at layer 3) and its BF16 outputs."""
    root = tmp_path_factory.mktemp("interop")
    tensors = make_tiny(root / "src")
    dequantize(root / "src", root / "drop", mtp="drop", device="cpu")
    dequantize(root / "src", root / "keep", mtp="keep", device="cpu")
    config = json.loads((root / "src" / "config.json").read_text())
    return {"root": root, "tensors": tensors, "config": config}


@needs_transformers
def test_bf16_output_loads_clean_and_gives_the_reference_logits(tiny_bf16):
    _require("DeepseekV3ForCausalLM")
    root, n_main = tiny_bf16["root"], tiny_bf16["config"]["num_hidden_layers"]
    model, info = _load(root / "drop")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    _assert_clean(info)
    got = model.state_dict()
    want = _reference_state(tiny_bf16["tensors"], set(got), skip_layers={n_main})
    _assert_same_state(got, want, "from_pretrained of dsv3conv's output")

    # The same model built from the config, with the reference-dequantized weights put in by hand.
    config = AutoConfig.from_pretrained(root / "drop")
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager", **{_dtype_kw(): torch.bfloat16})
    ref.load_state_dict(want, strict=True)
    ref.eval()
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    # Same weights, same modules, same CPU kernels: the logits are bit-identical, not merely close.
    assert a.dtype == torch.bfloat16 and a.abs().max() > 0
    assert torch.equal(a, b), f"logits differ, max |diff| {(a.float() - b.float()).abs().max().item()}"


@needs_transformers
def test_mtp_kept_only_the_mtp_layer_is_unexpected(tiny_bf16):
    _require("DeepseekV3ForCausalLM")
    n_main = tiny_bf16["config"]["num_hidden_layers"]
    model, info = _load(tiny_bf16["root"] / "keep")
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    unexpected = sorted(info["unexpected_keys"])
    assert unexpected, "transformers has no MTP module: the MTP layer's tensors should be reported"
    assert all(k.startswith(f"model.layers.{n_main}.") for k in unexpected), unexpected
    assert {"enorm", "hnorm", "eh_proj"} <= {k.split(".")[3] for k in unexpected}
    # and the main model is loaded exactly as without the MTP layer
    want = _reference_state(tiny_bf16["tensors"], set(model.state_dict()), skip_layers={n_main})
    _assert_same_state(model.state_dict(), want, "from_pretrained with the MTP layer kept")


# ------------------------------------------------------------------- against transformers' FP8 path
@needs_transformers
@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F8_E8M0"])
def test_equals_transformers_fp8_dequantize_where_shapes_are_multiples_of_128(tmp_path, scale_dtype):
    """transformers derives the block size from the scale grid (rows // scale_rows), so it is right only when
    every FP8 dimension is a multiple of 128; on such a checkpoint its load of the FP8 source must equal
    the load of dsv3conv's BF16 output, tensor for tensor."""
    _require("DeepseekV3ForCausalLM")
    quantization = _fp8_loader()
    config = dict(tiny_config(), **ALIGNED)
    fp8_shapes = {shape for _, shape, dtype in deepseek_v3_tensors(config) if dtype == "F8_E4M3"}
    assert all(d % 128 == 0 for shape in fp8_shapes for d in shape), sorted(fp8_shapes)
    tensors = make_tiny(tmp_path / "src", config=config, scale_dtype=scale_dtype)
    dequantize(tmp_path / "src", tmp_path / "out", mtp="drop", device="cpu")

    ours, info = _load(tmp_path / "out")
    _assert_clean(info)
    theirs, info = _load(tmp_path / "src", quantization_config=quantization)
    n_main = config["num_hidden_layers"]
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    assert all(k.startswith(f"model.layers.{n_main}.") for k in info["unexpected_keys"])
    _assert_same_state(ours.state_dict(), theirs.state_dict(), "dsv3conv vs transformers' FP8 dequantize")
    want = _reference_state(tensors, set(ours.state_dict()), skip_layers={n_main})
    _assert_same_state(theirs.state_dict(), want, "transformers' FP8 dequantize vs the reference")


@needs_transformers
def test_qwen3_sibling_loads_and_equals_transformers_fp8_dequantize(tmp_path):
    """A Qwen3 FP8 release (BF16 scales), every FP8 dimension a multiple of 128."""
    _require("Qwen3ForCausalLM")
    quantization = _fp8_loader()
    tensors = make_sibling(tmp_path / "src", "qwen3",
                           config_overrides={"hidden_size": 256, "head_dim": 128, "intermediate_size": 384})
    assert all(d % 128 == 0 for t in tensors.values() if t.dtype == torch.float8_e4m3fn for d in t.shape)
    dequantize(tmp_path / "src", tmp_path / "out", device="cpu")
    ours, info = _load(tmp_path / "out")
    assert type(ours).__name__ == "Qwen3ForCausalLM"
    _assert_clean(info)
    _assert_same_state(ours.state_dict(), _reference_state(tensors, set()), "Qwen3: dsv3conv vs the reference")
    theirs, info = _load(tmp_path / "src", quantization_config=quantization)
    _assert_clean(info)
    _assert_same_state(ours.state_dict(), theirs.state_dict(), "Qwen3: dsv3conv vs transformers' FP8 dequantize")


@needs_transformers
def test_v32_sibling_loads_clean(tmp_path):
    """V3.2: the indexer tensors (wq_b, wk FP8; k_norm, weights_proj BF16) land in DeepseekV32ForCausalLM."""
    _require("DeepseekV32ForCausalLM")
    tensors = make_sibling(tmp_path / "src", "v3.2")
    dequantize(tmp_path / "src", tmp_path / "out", mtp="drop", device="cpu")
    model, info = _load(tmp_path / "out")
    assert type(model).__name__ == "DeepseekV32ForCausalLM"
    _assert_clean(info)
    n_main = json.loads((tmp_path / "src" / "config.json").read_text())["num_hidden_layers"]
    want = _reference_state(tensors, set(model.state_dict()), skip_layers={n_main})
    _assert_same_state(model.state_dict(), want, "V3.2: dsv3conv's output as loaded")


# ------------------------------------------------------------------------------ SGLang's NextN draft
def _sglang_nextn_names(config: dict, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Where SGLang's NextN loader (DeepseekV3ForCausalLMNextN) puts each checkpoint tensor.

    Its rules: exactly one MTP layer (`num_nextn_predict_layers` 1); it reads layer 0 when `num_hidden_layers`
    is 1 (else layer `num_hidden_layers`, the full checkpoint); it skips every other tensor and the layer's
    `embed_tokens` and `shared_head.head` (taken from the target model); enorm, hnorm, eh_proj and
    shared_head.norm become `model.<name>`, everything else `model.decoder.<name>`.
    Returns (checkpoint name -> module name, names it ignores).
    """
    assert config.get("num_nextn_predict_layers") == 1, "SGLang's NextN loader supports exactly one MTP layer"
    prefix = "model.layers.0." if config["num_hidden_layers"] == 1 else f"model.layers.{config['num_hidden_layers']}."
    placed, ignored = {}, []
    for name in names:
        rest = name[len(prefix):]
        if not name.startswith(prefix) or "embed_tokens" in rest or "shared_head.head" in rest:
            ignored.append(name)
        elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj") or rest.startswith("shared_head.norm."):
            placed[name] = "model." + rest
        else:
            placed[name] = "model.decoder." + rest
    return placed, ignored


def test_nextn_draft_has_the_config_and_names_sglang_reads(tiny_src, tmp_path):
    split_mtp(tiny_src, mtp_out=tmp_path / "draft", mtp_layout="sglang")
    src, draft = Checkpoint.open(tiny_src), Checkpoint.open(tmp_path / "draft")
    assert draft.problems == []
    config = draft.config
    assert config["architectures"] == ["DeepseekV3ForCausalLMNextN"]
    assert config["num_hidden_layers"] == 1 and config["num_nextn_predict_layers"] == 1
    assert config["quantization_config"] == src.config["quantization_config"]  # the draft stays FP8
    assert {k: v for k, v in config.items() if k not in ("architectures", "num_hidden_layers", "first_k_dense_replace")} \
        == {k: v for k, v in src.config.items() if k not in ("architectures", "num_hidden_layers", "first_k_dense_replace")}

    placed, ignored = _sglang_nextn_names(config, list(draft.tensors))
    assert ignored == [], f"tensors SGLang would skip: {ignored}"
    assert sorted(n for n in placed.values() if not n.startswith("model.decoder.")) == [
        "model.eh_proj.weight", "model.enorm.weight", "model.hnorm.weight", "model.shared_head.norm.weight"]
    # the decoder is one whole MoE layer of the source (weights and their scales), renamed
    n_main = src.config["num_hidden_layers"]
    moe_layer = [n for n, _, _ in deepseek_v3_tensors(src.config) if layer_id(n) == n_main - 1]
    expected_decoder = {"model.decoder." + n.split(".", 3)[3] for n in moe_layer}
    assert {n for n in placed.values() if n.startswith("model.decoder.")} == expected_decoder
    assert any(n.endswith("_scale_inv") for n in expected_decoder)
    for name, info in draft.tensors.items():  # the bytes of the MTP layer, untouched
        source = src.tensors[f"model.layers.{n_main}." + name.split(".", 3)[3]]
        assert (info.dtype, info.shape) == (source.dtype, source.shape)
        assert draft.read(info) == src.read(source), name


def test_nextn_full_layout_keeps_what_vllm_reads(tiny_src, tmp_path):
    """vLLM's MTP loader reads the layer's own `shared_head.head` (and embed_tokens) from the checkpoint."""
    split_mtp(tiny_src, mtp_out=tmp_path / "draft", mtp_layout="full")
    draft = Checkpoint.open(tmp_path / "draft")
    assert {"model.layers.0.shared_head.head.weight", "model.layers.0.embed_tokens.weight"} <= set(draft.tensors)
    _, ignored = _sglang_nextn_names(draft.config, list(draft.tensors))
    assert sorted(ignored) == ["model.layers.0.embed_tokens.weight", "model.layers.0.shared_head.head.weight"]
