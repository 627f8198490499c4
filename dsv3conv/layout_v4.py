"""DeepSeek-V4 tensor names: main layers, and what lives under `mtp.*` (an MTP module or a DSpark drafter).

V4 names carry no `model.` prefix: `embed.weight`, `head.weight`, `norm.weight`, `hc_head_*` (F32),
`layers.N.{attn,ffn}...`, `layers.N.hc_{attn,ffn}_*` (F32), and `mtp.K.*` after the main layers:
- V4 (Flash, Pro): one MTP module `mtp.0` with `e_proj`, `h_proj` (FP8), `enorm`, `hnorm`, `norm` and its own
  `hc_head_*`, around a full V4 block.
- -0731 and later: a DSpark drafter, stages `mtp.0..S-1` (V4 blocks), `mtp.0.main_proj` (FP8) and
  `main_norm` reading the target's hidden states, the last stage with `markov_head` and `confidence_head`.
Everything is decided from the names, with config.json as a cross-check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from dsv3conv.formats import block_scale_shape, mx_scale_shape

V4_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
MTP_RE = re.compile(r"^mtp\.(\d+)\.")
DRAFTER_PARTS = (".main_proj.", ".main_norm.", ".markov_head.", ".confidence_head.")
MTP_PARTS = (".e_proj.", ".h_proj.", ".enorm.", ".hnorm.")
V4_TOP_LEVEL = ("embed.weight", "head.weight")

TensorSpec = tuple[str, tuple[int, ...], str]


def is_v4_names(names: Iterable[str]) -> bool:
    """V4 naming: the embedding or head at top level, `layers.N.` without the `model.` prefix, or `mtp.K.`
    (a draft holds only those)."""
    return any(n in V4_TOP_LEVEL or V4_LAYER_RE.match(n) or MTP_RE.match(n) for n in names)


def v4_layer_id(name: str) -> int | None:
    m = V4_LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def mtp_module_id(name: str) -> int | None:
    m = MTP_RE.match(name)
    return int(m.group(1)) if m else None


def drafter_declared(config: Mapping) -> bool:
    """config.json declares a DSpark drafter (`dspark_*` fields)."""
    return any(str(k).startswith("dspark") for k in config)


@dataclass
class V4Layout:
    main_layers: list[int]
    mtp_modules: list[int]  # ids K of `mtp.K.*`
    mtp_kind: str | None  # "mtp", "dspark" or None (no `mtp.*` tensors)
    mtp_tensors: int = 0
    layer_problems: list[str] = field(default_factory=list)  # the main layers against the config
    mtp_problems: list[str] = field(default_factory=list)  # the `mtp.*` part, alone and against the config

    @property
    def problems(self) -> list[str]:
        return self.layer_problems + self.mtp_problems

    def summary(self) -> dict:
        return {"main_layers": len(self.main_layers), "mtp_kind": self.mtp_kind,
                "mtp_modules": self.mtp_modules, "mtp_tensors": self.mtp_tensors}


def v4_layout(names: Iterable[str], config: Mapping | None) -> V4Layout:
    """Main layers and the `mtp.*` part from the names; each disagreement with the config one problem line."""
    names = list(names)
    layers = sorted({i for i in map(v4_layer_id, names) if i is not None})
    mtp_names = [n for n in names if mtp_module_id(n) is not None]
    modules = sorted({mtp_module_id(n) for n in mtp_names})
    drafter = [n for n in mtp_names if any(p in n for p in DRAFTER_PARTS)]
    mtp = [n for n in mtp_names if any(p in n for p in MTP_PARTS)]
    kind = "dspark" if drafter else "mtp" if mtp_names else None
    out = V4Layout(layers, modules, kind, len(mtp_names))
    if drafter and mtp:
        out.mtp_problems.append(f"tensors `{mtp[0]}` (MTP) and `{drafter[0]}` (DSpark drafter) both sit under mtp.*; "
                            "the checkpoint mixes two releases")
    if modules and modules != list(range(len(modules))):
        out.mtp_problems.append(f"mtp.* modules {modules} are not numbered 0..{len(modules) - 1}; a shard is missing")
    if config is None:
        return out
    n_main = config.get("num_hidden_layers")
    if n_main is not None and layers and layers != list(range(int(n_main))):
        out.layer_problems.append(f"config.json: num_hidden_layers is {n_main} but the tensors hold layers {_span(layers)}; "
                            "fix config.json or restore the missing shards")
    n_mtp = config.get("num_nextn_predict_layers")
    if n_mtp is not None and int(n_mtp) != len(modules):
        out.mtp_problems.append(f"config.json: num_nextn_predict_layers is {n_mtp} but the tensors hold "
                            f"{len(modules)} mtp.* modules")
    if drafter_declared(config) and kind == "mtp":
        out.mtp_problems.append(f"config.json declares a DSpark drafter (dspark_* fields) but `{mtp[0] if mtp else mtp_names[0]}` "
                            "is an MTP module's tensor")
    if kind == "dspark" and not drafter_declared(config):
        out.mtp_problems.append(f"tensor `{drafter[0]}` belongs to a DSpark drafter but config.json has no dspark_* fields")
    return out


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids[:8])


# --------------------------------------------------------------------------------- the release layout
def deepseek_v4_tensors(config: Mapping, num_experts: int | None = None) -> list[TensorSpec]:
    """(name, shape, dtype) of every tensor of a V4 release under `config` (`expert_dtype: fp4` packs the
    routed experts), then its `mtp.*` part: an MTP module, or a DSpark drafter when config has `dspark_*`."""
    c = dict(config)
    experts = c["n_routed_experts"] if num_experts is None else num_experts
    hidden, vocab, hc = c["hidden_size"], c["vocab_size"], c.get("hc_mult", 4)
    out: list[TensorSpec] = [("embed.weight", (vocab, hidden), "BF16")]
    for i in range(c["num_hidden_layers"]):
        out += _block(f"layers.{i}", c, experts, hash_routed=i < c.get("num_hash_layers", 0),
                      compress=(c.get("compress_ratios") or [0] * (i + 1))[i])
    out += [("norm.weight", (hidden,), "BF16"), ("head.weight", (vocab, hidden), "BF16")]
    out += _hc_head("", hidden, hc)
    stages = int(c.get("num_nextn_predict_layers") or 0)
    for k in range(stages):
        p = f"mtp.{k}"
        out += _block(p, c, experts, hash_routed=False, compress=0)
        if drafter_declared(c):
            targets = len(c.get("dspark_target_layer_ids") or [0])
            if k == 0:
                out += _fp8(f"{p}.main_proj.weight", (hidden, hidden * targets))
                out.append((f"{p}.main_norm.weight", (hidden * targets,), "BF16"))
            if k == stages - 1:
                rank = c.get("dspark_markov_rank", 16)
                out += [(f"{p}.norm.weight", (hidden,), "BF16"),
                        (f"{p}.markov_head.markov_w1.weight", (vocab, rank), "BF16"),
                        (f"{p}.markov_head.markov_w2.weight", (vocab, rank), "BF16"),
                        (f"{p}.confidence_head.proj.weight", (1, hidden + rank), "F32")]
                out += _hc_head(p + ".", hidden, hc)
        else:
            out += _fp8(f"{p}.e_proj.weight", (hidden, hidden)) + _fp8(f"{p}.h_proj.weight", (hidden, hidden))
            out += [(f"{p}.{n}.weight", (hidden,), "BF16") for n in ("enorm", "hnorm", "norm")]
            out += _hc_head(p + ".", hidden, hc)
    return out


def _fp8(name: str, shape: tuple[int, int]) -> list[TensorSpec]:
    return [(name, shape, "F8_E4M3"), (name[: -len(".weight")] + ".scale", block_scale_shape(shape), "F8_E8M0")]


def _fp4(name: str, shape: tuple[int, int]) -> list[TensorSpec]:
    packed = (shape[0], shape[1] // 2)
    return [(name, packed, "I8"), (name[: -len(".weight")] + ".scale", mx_scale_shape(packed), "F8_E8M0")]


def _hc_head(prefix: str, hidden: int, hc: int) -> list[TensorSpec]:
    return [(f"{prefix}hc_head_fn", (hc, hc * hidden), "F32"), (f"{prefix}hc_head_base", (hc,), "F32"),
            (f"{prefix}hc_head_scale", (1,), "F32")]


CSA_RATIO = 4


def _compressor(p: str, hidden: int, dim: int, ratio: int) -> list[TensorSpec]:
    width = dim * (2 if ratio == CSA_RATIO else 1)
    return [(f"{p}.wkv.weight", (width, hidden), "BF16"), (f"{p}.wgate.weight", (width, hidden), "BF16"),
            (f"{p}.ape", (ratio, width), "F32"), (f"{p}.norm.weight", (dim,), "BF16")]


def _block(p: str, c: Mapping, experts: int, hash_routed: bool, compress: int) -> list[TensorSpec]:
    hidden, hc = c["hidden_size"], c.get("hc_mult", 4)
    heads, head_dim, q_lora = c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    o_groups, o_lora, inter = c.get("o_groups", 1), c["o_lora_rank"], c["moe_intermediate_size"]
    mix = (2 + hc) * hc
    out: list[TensorSpec] = [(f"{p}.attn_norm.weight", (hidden,), "BF16"), (f"{p}.ffn_norm.weight", (hidden,), "BF16")]
    for part in ("attn", "ffn"):
        out += [(f"{p}.hc_{part}_fn", (mix, hc * hidden), "F32"), (f"{p}.hc_{part}_base", (mix,), "F32"),
                (f"{p}.hc_{part}_scale", (3,), "F32")]
    a = f"{p}.attn"
    out += _fp8(f"{a}.wq_a.weight", (q_lora, hidden)) + [(f"{a}.q_norm.weight", (q_lora,), "BF16")]
    out += _fp8(f"{a}.wq_b.weight", (heads * head_dim, q_lora))
    out += _fp8(f"{a}.wkv.weight", (head_dim, hidden)) + [(f"{a}.kv_norm.weight", (head_dim,), "BF16")]
    out += _fp8(f"{a}.wo_a.weight", (o_groups * o_lora, heads * head_dim // o_groups))
    out += _fp8(f"{a}.wo_b.weight", (hidden, o_groups * o_lora)) + [(f"{a}.attn_sink", (heads,), "F32")]
    if compress:  # CSA (ratio 4: overlapping windows, twice as wide, with an indexer) or HCA (128)
        out += _compressor(f"{a}.compressor", hidden, head_dim, compress)
        if compress == CSA_RATIO:
            idx_heads, idx_dim = c.get("index_n_heads", 2), c.get("index_head_dim", 32)
            out += _compressor(f"{a}.indexer.compressor", hidden, idx_dim, compress)
            out += _fp8(f"{a}.indexer.wq_b.weight", (idx_heads * idx_dim, q_lora))
            out.append((f"{a}.indexer.weights_proj.weight", (idx_heads, hidden), "BF16"))
    f = f"{p}.ffn"
    out.append((f"{f}.gate.weight", (experts, hidden), "BF16"))
    if hash_routed:
        out.append((f"{f}.gate.tid2eid", (c["vocab_size"], c["num_experts_per_tok"]), "I64"))
    else:
        out.append((f"{f}.gate.bias", (experts,), "F32"))
    shared = inter * c.get("n_shared_experts", 1)
    out += _fp8(f"{f}.shared_experts.w1.weight", (shared, hidden)) + _fp8(f"{f}.shared_experts.w2.weight", (hidden, shared))
    out += _fp8(f"{f}.shared_experts.w3.weight", (shared, hidden))
    packed = _fp4 if c.get("expert_dtype") == "fp4" else _fp8
    for e in range(experts):
        for w, shape in (("w1", (inter, hidden)), ("w2", (hidden, inter)), ("w3", (inter, hidden))):
            out += packed(f"{f}.experts.{e}.{w}.weight", shape)
    return out
