"""`quant`: BF16 (or F16/F32) -> 128x128 block FP8, the way back to the release format after fine-tuning.

Exactly the tensors that are FP8 in the DeepSeek-V3 release are quantized: the 2-D `.weight` of the
attention projections (q_a, q_b, kv_a_proj_with_mqa, kv_b, o) and of every MLP, shared expert and routed
expert (gate/up/down_proj), MTP layers included. Embeddings, heads, norms, the router (`mlp.gate.weight`,
its `e_score_correction_bias`) and `eh_proj` stay as they are; `skip` patterns keep more. Each quantized
weight `W` is written as e4m3 with its scale `W_scale_inv` beside it in the same shard; the recipe is
`dsv3conv.kernels.fp8_block_quant` (module docstring).

DeepSeek-V4 names (`layers.N.*`, `mtp.K.*`): the weights V4-Flash-Base stores as FP8 (attention `wq_a`,
`wq_b`, `wkv`, `wo_a`, `wo_b`, the indexer's `wq_b`, shared and routed experts `w1`/`w2`/`w3`, the MTP
module's `e_proj`/`h_proj`, the drafter's `main_proj`), each with its scale `<module>.scale`; routed
experts become block FP8, not packed FP4, and config.json says so (`expert_dtype: "fp8"`). MTP drop removes
`mtp.*` (and `dspark_*` from config.json).

A quantized weight is a `TensorPlan` of operation `QuantBlockFp8` that also writes its scale tensor (a
`QuantScale`) from the same source rows, so the engine streams it like a dequant, in whole-block row chunks.
Within each shard, tensors are ordered by element size (largest first, source order otherwise), as the
safetensors library does, so every tensor starts at a multiple of its element size.
"""

from __future__ import annotations

import re
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.checks import mtp_rule
from dsv3conv.config_edits import ConfigEdit
from dsv3conv.dtypes import DTYPE_SIZES, FLOAT_DTYPES, SCALE_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError, counted
from dsv3conv.layout import BLOCK, V4_ROUTED_EXPERT_RE, is_scale, mtp_layer_ids, scale_name, scale_shape
from dsv3conv.ops import QuantBlockFp8, QuantScale
from dsv3conv.plan import Plan, TensorPlan, check_layers, copied, file_plan, index_json, more

# The weights the DeepSeek-V3 release stores as FP8 (any layer id, MTP layers included).
FP8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\."
    r"(?:self_attn\.(?:q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate_proj|up_proj|down_proj))\.weight$"
)
V4_FP8_WEIGHT_RE = re.compile(
    r"^(?:layers|mtp)\.\d+\."
    r"(?:attn\.(?:wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.(?:shared_experts|experts\.\d+)\.w[123]"
    r"|e_proj|h_proj|main_proj)\.weight$"
)
# Experts stored fused (one tensor for all experts of a layer): a layout the release never has.
FUSED_EXPERTS_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(?!\d+\.)")
SCALE_FMTS = ("float", "ue8m0")
SOURCE_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def is_fp8_weight_name(name: str) -> bool:
    """A tensor the DeepSeek-V3 (or V4) release stores as FP8 (by name; the shape is checked separately)."""
    return FP8_WEIGHT_RE.match(name) is not None or V4_FP8_WEIGHT_RE.match(name) is not None


def quant_scale_name(weight: str) -> str:
    """`x.weight_scale_inv` (DeepSeek-V3 names) or `x.scale` (DeepSeek-V4 names)."""
    return weight[: -len(".weight")] + ".scale" if V4_FP8_WEIGHT_RE.match(weight) else scale_name(weight)


def plan_quant(
    ckpt: Checkpoint, dest: Path, *, scale_fmt: str = "float", scale_dtype: str = "float32",
    skip: list[str] | tuple[str, ...] = (), mtp: str = "keep", extra_files: list[str] | tuple[str, ...] = (),
) -> Plan:
    """Plan BF16/F16/F32 -> block FP8: release-FP8 weights quantized (each with its scale), the rest copied."""
    if scale_fmt not in SCALE_FMTS:
        raise UsageError(f"{{scale_fmt}} {scale_fmt!r}: choose float or ue8m0", "scale_fmt")
    if scale_dtype not in SCALE_DTYPES:
        raise UsageError(f"{{scale_dtype}} {scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}", "scale_dtype")
    if scale_dtype == "float8_e8m0fnu" and scale_fmt != "ue8m0":
        raise UsageError("{scale_dtype} float8_e8m0fnu holds powers of two only: add {scale_fmt} ue8m0",
                         "scale_dtype", "scale_fmt")
    if mtp not in ("keep", "drop"):
        raise UsageError(f"{{mtp}} {mtp!r}: choose keep or drop", "mtp")
    patterns = []
    for text in skip:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(f"{{skip}} {text!r}: not a valid regular expression ({exc})", "skip") from exc
    ckpt.require_clean()
    config = ckpt.require_config()
    if mtp == "drop" and not mtp_layer_ids(config):
        raise UsageError(f"{{mtp}} drop: {ckpt.root / 'config.json'} declares no MTP layers "
                         "(num_nextn_predict_layers is 0 or absent)", "mtp")
    rule = mtp_rule(ckpt.tensors, config)
    dropped = sorted(n for n in ckpt.tensors if mtp == "drop" and rule(n))
    targets, skipped = _targets(ckpt, config, patterns, set(dropped))

    fp8_dtype, sdtype = "F8_E4M3", FLOAT_DTYPES[scale_dtype]
    files = []
    for shard in ckpt.shards.values():
        entries: list[TensorPlan] = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name or info.name in dropped:
                continue
            if info.name in targets:
                sname = quant_scale_name(info.name)
                op = QuantBlockFp8(scale_fmt, sdtype, sname)
                entries.append(TensorPlan(info.name, fp8_dtype, info.shape, op, (info,)))
                entries.append(TensorPlan(sname, sdtype, scale_shape(info.shape), QuantScale(info.name), ()))
            else:
                entries.append(copied(info))
        if entries:
            entries.sort(key=lambda t: -DTYPE_SIZES[t.dtype])  # stable: source order within a size
            files.append(file_plan(shard.name, entries))

    qc = dict(QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    if skipped:
        qc["modules_to_not_convert"] = [n.removesuffix(".weight") for n in skipped]
    edit = ConfigEdit(config)
    edit.set_quantization(qc, f"fp8 e4m3, {BLOCK}x{BLOCK} blocks" + (", scale_fmt ue8m0" if scale_fmt == "ue8m0" else "")
                          + (f", {len(skipped)} modules_to_not_convert" if skipped else ""))
    edit.set_dtype("bfloat16")
    if any(V4_ROUTED_EXPERT_RE.match(n) for n in targets):
        edit.set_expert_dtype("fp8")
    if dropped:
        edit.drop_mtp()
    options = {"scale_fmt": scale_fmt, "scale_dtype": scale_dtype, "skip": sorted(skip), "mtp": mtp}
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files), dropped,
                options)


def _v4_quantized(name: str, dtype: str) -> bool:
    """A DeepSeek-V4 scale (`x.scale` beside `x.weight`) or packed FP4 weight: the checkpoint is quantized."""
    return (name.endswith(".scale") and V4_FP8_WEIGHT_RE.match(name[: -len(".scale")] + ".weight") is not None
            or dtype in ("I8", "U8") and V4_FP8_WEIGHT_RE.match(name) is not None)


def _targets(ckpt: Checkpoint, config: dict, patterns: list[re.Pattern], dropped: set[str]) -> tuple[set[str], list[str]]:
    """The weights to quantize and those `skip` keeps, once the checkpoint is known to be quant's input."""
    fp8 = sorted(n for n, t in ckpt.tensors.items() if t.dtype in FP8_DTYPES or is_scale(n) or _v4_quantized(n, t.dtype))
    if fp8:
        raise Dsv3Error(
            f"{ckpt.root}: already holds FP8 tensors or scales (`{fp8[0]}`{more(fp8)}); quant takes a BF16, F16 "
            "or F32 checkpoint: use this one as it is, or `dsv3conv dequant` it first"
        )
    fused = sorted(n for n in ckpt.tensors if FUSED_EXPERTS_RE.match(n))
    if fused:
        raise Dsv3Error(
            f"tensor `{fused[0]}` holds fused experts{more(fused)}; quant expects the release layout, one tensor "
            "per expert (`mlp.experts.N.gate_proj.weight`): save the model unfused"
        )
    check_layers(ckpt, config)
    candidates = [n for n in ckpt.tensors if is_fp8_weight_name(n) and n not in dropped]
    if not candidates:
        raise Dsv3Error(
            f"{ckpt.root}: no tensor to quantize: none is named like a DeepSeek-V3 FP8 weight "
            "(model.layers.N.self_attn.*_proj.weight, model.layers.N.mlp.*_proj.weight) or a V4 one "
            "(layers.N.attn.wq_a.weight, layers.N.ffn.experts.E.w1.weight, ...)"
        )
    for p in patterns:
        if not any(p.search(n) for n in candidates):
            raise UsageError(
                f"{{skip}} {p.pattern!r} matches none of the {counted(len(candidates), 'tensor')} quant would quantize "
                f"(e.g. `{candidates[0]}`); check the pattern", "skip"
            )
    skipped = sorted(n for n in candidates if any(p.search(n) for p in patterns))
    targets = set(candidates) - set(skipped)
    if not targets:
        raise UsageError(f"{{skip}} leaves no tensor to quantize (all {len(candidates)} matched)", "skip")
    for name in sorted(targets):
        info = ckpt.tensors[name]
        if info.dtype not in SOURCE_DTYPES:
            raise Dsv3Error(
                f"tensor `{name}` in {info.file} is {info.dtype}; quant reads BF16, F16 or F32 weights: "
                "convert it, or keep it as it is with {skip}", "skip"
            )
        if len(info.shape) != 2:
            raise Dsv3Error(
                f"tensor `{name}` in {info.file} has shape {list(info.shape)}; a block-quantized weight must be 2-D "
                "[out, in]: keep it as it is with {skip}", "skip"
            )
    return targets, skipped
