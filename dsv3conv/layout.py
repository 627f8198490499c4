"""What the tensor names of a DeepSeek-V3-style checkpoint mean: layers, MTP layers, FP8 pairs, parameters.

Everything is derived from config.json and the tensor names; nothing keys on `model_type`, a fixed layer
number or a shard count. `deepseek_v3_tensors` rebuilds the release's full tensor list from a config (used
by the synthetic generator and the header-exact replica).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Mapping

from dsv3conv.checkpoint import SCALE_SUFFIX, TensorInfo
from dsv3conv.config import BLOCK
from dsv3conv.formats import block_scale_shape as scale_shape  # the V3 names' word for it

# Layer and expert numbers as loaders write them: ASCII digits, no leading zero (the reader reports others).
LAYER_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]*)\.(.+)$", re.DOTALL)
ROUTED_EXPERT_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]*)\.mlp\.experts\.(0|[1-9][0-9]*)\.")
FP8_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")


def layer_parts(name: str) -> tuple[int, str] | None:
    """`model.layers.61.mlp.gate.weight` -> (61, "mlp.gate.weight"); None outside the layers."""
    m = LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_id(name: str) -> int | None:
    parts = layer_parts(name)
    return parts[0] if parts else None


def layer_name(layer: int, rest: str) -> str:
    """The inverse of `layer_parts`."""
    return f"model.layers.{layer}.{rest}"


NEXTN_ARCHITECTURE = "DeepseekV3ForCausalLMNextN"


def is_nextn_draft(config: Mapping) -> bool:
    """A standalone MTP draft (`split-mtp --mtp-out`): its layers, numbered from 0, are the MTP modules."""
    return NEXTN_ARCHITECTURE in (config.get("architectures") or [])


def mtp_layer_ids(config: Mapping) -> list[int]:
    """Ids of the MTP layers: they follow the main layers (61 for DeepSeek-V3, 78 for GLM-style models).

    A NextN draft declares `num_nextn_predict_layers` too, but has no layers after its own: none.
    """
    if is_nextn_draft(config):
        return []
    first = int(config.get("num_hidden_layers", 0))
    return list(range(first, first + int(config.get("num_nextn_predict_layers", 0) or 0)))


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def default_config() -> dict:
    """The DeepSeek-V3 release's config.json (shipped with the package)."""
    text = resources.files("dsv3conv").joinpath("data/deepseek_v3_config.json").read_text(encoding="utf-8")
    return json.loads(text)


# ------------------------------------------------------------------------------------- FP8 coverage
@dataclass(frozen=True)
class Fp8Coverage:
    pairs: dict[str, str]  # FP8 weight -> its scale tensor (of a valid shape and dtype)
    unscaled: list[str]  # FP8 weights without a scale
    orphan_scales: list[str]  # scales without an FP8 weight
    bad_scales: list[str]  # one line per scale of the wrong shape or dtype


def fp8_coverage(tensors: Mapping[str, TensorInfo], block: int = BLOCK) -> Fp8Coverage:
    pairs, unscaled, bad = {}, [], []
    for name, info in tensors.items():
        if info.dtype != FP8_DTYPE or is_scale(name):
            continue
        sname = scale_name(name)
        scale = tensors.get(sname)
        if scale is None:
            unscaled.append(name)
            continue
        if len(info.shape) != 2:
            bad.append(f"tensor `{name}` is {FP8_DTYPE} with shape {list(info.shape)}; only 2-D block-scaled weights are supported")
        elif scale.shape != scale_shape(info.shape, block):
            bad.append(
                f"tensor `{sname}` has shape {list(scale.shape)} but `{name}` {list(info.shape)} needs "
                f"{list(scale_shape(info.shape, block))} ({block}x{block} blocks)"
            )
        elif scale.dtype not in SCALE_DTYPES:
            bad.append(f"tensor `{sname}` has dtype {scale.dtype}; scales must be one of {', '.join(SCALE_DTYPES)}")
        else:
            pairs[name] = sname
    scaled = {scale_name(n) for n, t in tensors.items() if t.dtype == FP8_DTYPE and not is_scale(n)}
    orphans = [n for n in tensors if is_scale(n) and n not in scaled]
    return Fp8Coverage(pairs, sorted(unscaled), sorted(orphans), bad)


# ---------------------------------------------------------------------------------------- parameters
EMBEDDINGS = ("model.embed_tokens.weight", "embed.weight")  # DeepSeek-V3 / V4 names
HEADS = ("lm_head.weight", "head.weight")
V4_ROUTED_EXPERT_RE = re.compile(r"^(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.")
V4_MTP_RE = re.compile(r"^mtp\.\d+\.")


def parameter_counts(
    tensors: Iterable[tuple[str, tuple[int, ...]]], config: Mapping, formats: Mapping | None = None
) -> dict[str, int]:
    """Parameter figures; scales are never parameters.

    main            every tensor outside the MTP layers (V4: outside `mtp.*`)
    mtp             every tensor of the MTP layers, as stored
    mtp_unique      mtp without its stored copies of the embedding and the head
    embedding/head  model.embed_tokens / lm_head (V4: embed / head)
    main_activated  per token: main less the embedding and all but `num_experts_per_tok` routed experts per layer
                    (the head counted; add `embedding` for the other convention)
    mtp_activated   likewise for the MTP layers, without their embedding and head copies
    scales          elements of the scale tensors

    `formats` (name -> formats.TensorFormat): tells scales of any naming apart and counts two parameters per
    byte of packed FP4; without it, `*_scale_inv` are the scales.
    """
    mtp_ids = set(mtp_layer_ids(config))
    top_k = int(config.get("num_experts_per_tok", 0) or 0)
    out = dict.fromkeys(("main", "mtp", "mtp_unique", "embedding", "head", "main_activated", "mtp_activated", "scales"), 0)
    routed: dict[tuple, dict[int, int]] = {}  # (layer key, is MTP) -> expert -> params
    for name, shape in tensors:
        n = math.prod(shape)
        kind = formats[name].kind if formats is not None and name in formats else None
        if kind == "scale" or (formats is None and is_scale(name)):
            out["scales"] += n
            continue
        if name.endswith(".inv_freq"):  # rotary buffers some releases store (Kimi-K2): not parameters
            continue
        n *= 2 if kind == "mxfp4" else 1  # two E2M1 values per byte
        in_mtp = layer_id(name) in mtp_ids or V4_MTP_RE.match(name) is not None
        if in_mtp:
            out["mtp"] += n
            if not name.endswith((".embed_tokens.weight", ".shared_head.head.weight")):
                out["mtp_unique"] += n
        else:
            out["main"] += n
        if name in EMBEDDINGS:
            out["embedding"] += n
        elif name in HEADS:
            out["head"] += n
        m = ROUTED_EXPERT_RE.match(name) or V4_ROUTED_EXPERT_RE.match(name)
        if m:
            experts = routed.setdefault((m.group(0).split(".experts.")[0], in_mtp), {})
            e = int(m.group(m.lastindex))
            experts[e] = experts.get(e, 0) + n
    inactive_main = inactive_mtp = 0
    for (_, in_mtp), experts in routed.items():
        total = sum(experts.values())
        per_expert = total / len(experts)
        inactive = total - round(per_expert * min(top_k, len(experts)))
        if in_mtp:
            inactive_mtp += inactive
        else:
            inactive_main += inactive
    out["main_activated"] = out["main"] - out["embedding"] - inactive_main
    out["mtp_activated"] = out["mtp_unique"] - inactive_mtp
    return out


# --------------------------------------------------------------------------------- the release layout
def deepseek_v3_tensors(
    config: Mapping, num_layers: int | None = None, num_experts: int | None = None
) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of a DeepSeek-V3-layout FP8 release, in the release's order.

    `num_layers` / `num_experts` shrink the model (for benchmarks); by default the config's values.
    MTP layers follow the main layers, as the config says.
    """
    c = dict(config)
    hidden, vocab = c["hidden_size"], c["vocab_size"]
    layers = c["num_hidden_layers"] if num_layers is None else num_layers
    experts = c["n_routed_experts"] if num_experts is None else num_experts
    heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_lora, kv_lora = c["q_lora_rank"], c["kv_lora_rank"]
    dense_layers = c.get("first_k_dense_replace", 0)

    out: list[tuple[str, tuple[int, ...], str]] = []

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.append((name, shape, FP8_DTYPE))
        out.append((scale_name(name), scale_shape(shape), "F32"))

    def mlp(prefix: str, inter: int) -> None:
        fp8(f"{prefix}.gate_proj.weight", (inter, hidden))
        fp8(f"{prefix}.up_proj.weight", (inter, hidden))
        fp8(f"{prefix}.down_proj.weight", (hidden, inter))

    def layer(i: int) -> None:
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", (hidden,), "BF16"))
        out.append((f"{p}.post_attention_layernorm.weight", (hidden,), "BF16"))
        fp8(f"{p}.self_attn.q_a_proj.weight", (q_lora, hidden))
        out.append((f"{p}.self_attn.q_a_layernorm.weight", (q_lora,), "BF16"))
        fp8(f"{p}.self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora))
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, hidden))
        out.append((f"{p}.self_attn.kv_a_layernorm.weight", (kv_lora,), "BF16"))
        fp8(f"{p}.self_attn.kv_b_proj.weight", (heads * (nope + v), kv_lora))
        fp8(f"{p}.self_attn.o_proj.weight", (hidden, heads * v))
        if i < dense_layers:
            mlp(f"{p}.mlp", c["intermediate_size"])
            return
        out.append((f"{p}.mlp.gate.weight", (experts, hidden), "BF16"))
        out.append((f"{p}.mlp.gate.e_score_correction_bias", (experts,), "F32"))
        mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c.get("n_shared_experts", 1))
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", c["moe_intermediate_size"])

    out.append(("model.embed_tokens.weight", (vocab, hidden), "BF16"))
    out.append(("model.norm.weight", (hidden,), "BF16"))
    out.append(("lm_head.weight", (vocab, hidden), "BF16"))
    for i in range(layers):
        layer(i)
    for i in range(layers, layers + int(c.get("num_nextn_predict_layers", 0) or 0)):
        layer(i)
        p = f"model.layers.{i}"
        out.append((f"{p}.embed_tokens.weight", (vocab, hidden), "BF16"))
        out.append((f"{p}.enorm.weight", (hidden,), "BF16"))
        out.append((f"{p}.hnorm.weight", (hidden,), "BF16"))
        out.append((f"{p}.eh_proj.weight", (hidden, 2 * hidden), "BF16"))
        out.append((f"{p}.shared_head.norm.weight", (hidden,), "BF16"))
        out.append((f"{p}.shared_head.head.weight", (vocab, hidden), "BF16"))
    return out
