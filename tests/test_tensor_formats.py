"""Per-tensor format classification from headers, the config cross-check, V4 names (MTP vs DSpark drafter)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.formats import classify
from dsv3conv.layout_v4 import deepseek_v4_tensors, v4_layout
from dsv3conv.synthetic_v4 import ct_config, make_compressed_tensors, make_v4, v4_tiny_config


@dataclass(frozen=True)
class Info:
    dtype: str
    shape: tuple[int, ...]


def headers(specs) -> dict[str, Info]:
    return {n: Info(d, tuple(s)) for n, s, d in specs}


def v4(kind: str = "flash") -> tuple[dict[str, Info], dict]:
    config = v4_tiny_config(kind)
    return headers(deepseek_v4_tensors(config)), config


# ------------------------------------------------------------------------------------ the three families
@pytest.mark.parametrize("kind", ["flash", "flash-base", "0731"])
def test_v4_synthetic_checkpoints_classify_cleanly(tmp_path, kind) -> None:
    make_v4(tmp_path / kind, kind)
    ckpt = Checkpoint.open(tmp_path / kind)
    assert ckpt.problems == []
    formats = classify(ckpt.tensors, ckpt.config)
    assert formats.problems == []
    groups = formats.groups()
    fp4 = kind != "flash-base"
    assert ("mxfp4 (E2M1 pairs, F8_E8M0 scale per 32)" in groups) == fp4, groups
    assert groups["fp8_block (scale, F8_E8M0 scales)"] > 0 and groups["copy I64"] == 1, groups
    expert = formats.tensors["layers.1.ffn.experts.3.w2.weight"]
    assert (expert.kind, expert.scale) == ("mxfp4" if fp4 else "fp8_block", "layers.1.ffn.experts.3.w2.scale")
    assert formats.tensors["layers.1.ffn.experts.3.w2.scale"].kind == "scale"
    assert formats.tensors["layers.0.hc_attn_fn"].kind == "copy"


def test_compressed_tensors_checkpoint_classifies_cleanly(tmp_path) -> None:
    make_compressed_tensors(tmp_path / "ct")
    ckpt = Checkpoint.open(tmp_path / "ct")
    formats = classify(ckpt.tensors, ckpt.config)
    assert formats.problems == []
    assert formats.namings == {"weight_scale"}
    q = formats.tensors["model.layers.0.self_attn.q_a_proj.weight"]
    assert (q.kind, q.scale, q.scale_dtype) == ("fp8_block", "model.layers.0.self_attn.q_a_proj.weight_scale", "BF16")
    # Modules on the ignore list stay BF16 copies.
    assert formats.tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].kind == "copy"
    assert formats.tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"


def test_v3_naming_still_recognized() -> None:
    tensors = {"a.weight": Info("F8_E4M3", (576, 300)), "a.weight_scale_inv": Info("F32", (5, 3))}
    formats = classify(tensors)
    assert formats.problems == [] and formats.tensors["a.weight"].naming == "scale_inv"
    tensors["b.weight"] = Info("F8_E4M3", (128, 128))
    assert classify(tensors).problems == [
        "tensor `b.weight` is F8_E4M3 but `b.weight_scale_inv` is missing from the index and from every shard; "
        "restore the missing shard or scale"
    ]


# ------------------------------------------------------------------------------------ refusals from headers
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.pop("layers.0.attn.wq_a.scale"), "`layers.0.attn.wq_a.weight` is F8_E4M3 but `layers.0.attn.wq_a.scale` is missing"),
        (lambda t: t.update({"layers.0.attn.wq_a.scale": Info("F8_E8M0", (1, 1))}),
         "`layers.0.attn.wq_a.scale` has shape [1, 1] but `layers.0.attn.wq_a.weight` [96, 256] needs [1, 2]"),
        (lambda t: t.update({"layers.0.attn.wq_a.scale": Info("I8", (1, 2))}), "block scales must be one of"),
        (lambda t: t.pop("layers.1.ffn.experts.0.w1.scale"),
         "`layers.1.ffn.experts.0.w1.weight` is I8 without `layers.1.ffn.experts.0.w1.scale`: neither FP8 nor packed FP4"),
        (lambda t: t.update({"layers.1.ffn.experts.0.w1.scale": Info("F8_E8M0", (160, 4))}),
         "packed FP4 `layers.1.ffn.experts.0.w1.weight` [160, 128] needs F8_E8M0 [160, 8]"),
        (lambda t: t.update({"layers.1.ffn.experts.0.w1.scale": Info("F32", (160, 8))}), "is F32 [160, 8], but packed FP4"),
        (lambda t: t.update({"stray.weight": Info("U8", (4, 4))}), "`stray.weight` is U8 without `stray.scale`"),
        (lambda t: t.pop("layers.0.attn.wq_a.weight"), "`layers.0.attn.wq_a.scale` is a scale without its F8_E4M3 weight"),
        (lambda t: t.update({"layers.0.attn.wq_a.weight_scale_inv": Info("F32", (1, 2))}), "has several scales"),
    ],
)
def test_bad_tensors_refused_naming_the_tensor(change, needle) -> None:
    tensors, config = v4()
    change(tensors)
    problems = classify(tensors, config).problems
    assert any(needle in p for p in problems), problems


def test_per_channel_compressed_tensors_scale_refused() -> None:
    tensors = {"m.weight": Info("F8_E4M3", (256, 300)), "m.weight_scale": Info("BF16", (256, 1))}
    problems = classify(tensors).problems
    assert problems and "per-channel or per-tensor FP8 is not supported" in problems[0], problems


# ------------------------------------------------------------------------------------ config cross-check
def test_config_mismatches_named() -> None:
    tensors, config = v4()
    no_field = {k: v for k, v in config.items() if k != "expert_dtype"}
    assert classify(tensors, no_field).problems == []  # missing: the headers decide
    fp8 = classify(tensors, dict(config, expert_dtype="fp8")).problems
    assert 'is packed FP4 but config.json says `expert_dtype: "fp8"`' in fp8[0]

    base_tensors, base_config = v4("flash-base")
    problems = classify(base_tensors, dict(base_config, expert_dtype="fp4")).problems
    assert "expert_dtype fp4 but routed expert `layers.0.ffn.experts.0.w1.weight` is not packed FP4" in problems[0]

    bad_block = copy.deepcopy(config)
    bad_block["quantization_config"]["weight_block_size"] = [64, 64]
    assert "weight_block_size [64, 64]" in classify(tensors, bad_block).problems[0]

    no_qc = {k: v for k, v in config.items() if k != "quantization_config"}
    assert "has no quantization_config" in classify(tensors, no_qc).problems[0]


def test_compressed_tensors_config_checked() -> None:
    config = ct_config()
    tensors = {"model.layers.0.mlp.up_proj.weight": Info("F8_E4M3", (300, 200)),
               "model.layers.0.mlp.up_proj.weight_scale": Info("BF16", (3, 2))}
    assert classify(tensors, config).problems == []

    channel = copy.deepcopy(config)
    channel["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "channel"
    assert "strategy=channel" in classify(tensors, channel).problems[0]

    ignoring = copy.deepcopy(config)
    ignoring["quantization_config"]["ignore"].append("re:.*up_proj$")
    problem = classify(tensors, ignoring).problems[0]
    assert "`model.layers.0.mlp.up_proj.weight` is F8_E4M3 but its module matches" in problem, problem

    v3_names = {"model.layers.0.mlp.up_proj.weight": Info("F8_E4M3", (300, 200)),
                "model.layers.0.mlp.up_proj.weight_scale_inv": Info("F32", (3, 2))}
    assert "compressed-tensors names block scales" in classify(v3_names, config).problems[0]


# ------------------------------------------------------------------------------------ V4 names
def test_v4_layout_mtp_and_drafter() -> None:
    tensors, config = v4("flash")
    layout = v4_layout(tensors, config)
    assert (layout.main_layers, layout.mtp_kind, layout.mtp_modules, layout.problems) == ([0, 1, 2], "mtp", [0], [])
    tensors, config = v4("0731")
    layout = v4_layout(tensors, config)
    assert (layout.mtp_kind, layout.mtp_modules, layout.problems) == ("dspark", [0, 1, 2], [])
    assert "mtp.0.main_proj.weight" in tensors and "mtp.2.markov_head.markov_w1.weight" in tensors


def test_v4_layout_config_disagreements() -> None:
    tensors, config = v4("flash")
    problems = v4_layout(tensors, dict(config, dspark_target_layer_ids=[0])).problems
    assert any("declares a DSpark drafter" in p for p in problems), problems
    problems = v4_layout(tensors, dict(config, num_nextn_predict_layers=2)).problems
    assert any("num_nextn_predict_layers is 2 but the tensors hold 1 mtp.* modules" in p for p in problems), problems
    problems = v4_layout(tensors, dict(config, num_hidden_layers=4)).problems
    assert any("num_hidden_layers is 4 but the tensors hold layers 0..2" in p for p in problems), problems
    drafter, dconfig = v4("0731")
    no_fields = {k: v for k, v in dconfig.items() if not k.startswith("dspark")}
    assert any("has no dspark_* fields" in p for p in v4_layout(drafter, no_fields).problems)
    assert v4_layout(tensors, None).problems == []


# ------------------------------------------------------------------------------------ inspect
@pytest.mark.parametrize("kind", ["flash", "0731"])
def test_inspect_v4_formats_layout_and_parameters(tmp_path, kind) -> None:
    from dsv3conv.inspection import inspect_checkpoint

    make_v4(tmp_path / kind, kind)
    r = inspect_checkpoint(Checkpoint.open(tmp_path / kind))
    assert r["problems"] == []
    c = v4_tiny_config(kind)
    stages = c["num_nextn_predict_layers"]
    # w1, w2, w3 of every routed expert in the main layers and the mtp.* modules
    assert r["formats"]["mxfp4 (E2M1 pairs, F8_E8M0 scale per 32)"] == (3 + stages) * 4 * 3
    assert r["layout"] == {"main_layers": 3, "mtp_kind": "mtp" if kind == "flash" else "dspark",
                           "mtp_modules": list(range(stages)), "mtp_tensors": r["layout"]["mtp_tensors"]}
    # Figures from the config alone: routed experts unpacked (2 values per byte), scales apart.
    h, v, inter, e, k = c["hidden_size"], c["vocab_size"], c["moe_intermediate_size"], c["n_routed_experts"], c["num_experts_per_tok"]
    p = r["params"]
    assert p["embedding"] == p["head"] == v * h
    expert = 3 * inter * h
    assert p["main"] - p["main_activated"] - p["embedding"] == c["num_hidden_layers"] * (e - k) * expert
    assert p["mtp_unique"] - p["mtp_activated"] == stages * (e - k) * expert
    scales = sum(math.prod(s) for n, s, d in deepseek_v4_tensors(c) if d == "F8_E8M0")
    assert p["scales"] == scales


def test_v4_flash_dimensions_classify_cleanly() -> None:
    """The full V4-Flash layout from its dimensions (headers only): every tensor classified, config consistent,
    one MTP module of 1,575 tensors; 256 experts x 3 x 43 layers (+ MTP) packed FP4."""
    from dsv3conv.synthetic_v4 import v4_flash_config

    config = v4_flash_config()
    tensors = headers(deepseek_v4_tensors(config))
    formats = classify(tensors, config)
    assert formats.problems == [] and v4_layout(tensors, config).problems == []
    assert len(formats.of_kind("mxfp4")) == 256 * 3 * 44
    assert sum(n.startswith("mtp.0.") for n in tensors) == 1575
    assert tensors["layers.2.attn.compressor.wkv.weight"].shape == (1024, 4096)  # CSA: 2 x head_dim
    assert tensors["layers.3.attn.compressor.wkv.weight"].shape == (512, 4096)  # HCA
    assert "layers.3.attn.indexer.wq_b.weight" not in tensors and "layers.2.attn.indexer.wq_b.weight" in tensors
