"""`quant`: BF16 (or F16/F32) -> 128x128 block FP8, the way back to the release format after fine-tuning.

Exactly the tensors that are FP8 in the DeepSeek-V3 release are quantized: the 2-D `.weight` of the
attention projections (q_a, q_b, kv_a_proj_with_mqa, kv_b, o) and of every MLP, shared expert and routed
expert (gate/up/down_proj), MTP layers included. Embeddings, heads, norms, the router (`mlp.gate.weight`,
its `e_score_correction_bias`) and `eh_proj` stay as they are; `skip` patterns keep more. Each quantized
weight `W` is written as e4m3 with its scale `W_scale_inv` beside it in the same shard; the recipe is
`dsv3conv.kernels.fp8_block_quant` (module docstring).

The plan reuses `Plan`: a quantized weight is a `TensorPlan` of op "quant" that emits its scale tensor (op
"quant_scale") from the same source rows, so the pipeline streams it like a dequant, in 128-row chunks.
Within each shard, tensors are ordered by element size (largest first, source order otherwise), as the
safetensors library does, so every tensor starts at a multiple of its element size.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dest import check_dest
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.layout import BLOCK, is_scale, layer_id, mtp_layer_ids, scale_name, scale_shape
from dsv3conv.plan import Plan, TensorPlan, _check_layers, _file, _index, _more
from dsv3conv.safetensors_format import DTYPE_SIZES

# The weights the DeepSeek-V3 release stores as FP8 (any layer id, MTP layers included).
FP8_WEIGHT_RE = re.compile(
    r"^model\.layers\.\d+\."
    r"(?:self_attn\.(?:q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:gate_proj|up_proj|down_proj))\.weight$"
)
# Experts stored fused (one tensor for all experts of a layer): a layout the release never has.
FUSED_EXPERTS_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(?!\d+\.)")
SCALE_FMTS = ("float", "ue8m0")
SCALE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float8_e8m0fnu": "F8_E8M0"}
SOURCE_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def is_fp8_weight_name(name: str) -> bool:
    """A tensor the DeepSeek-V3 release stores as FP8 (by name; the shape is checked separately)."""
    return FP8_WEIGHT_RE.match(name) is not None


def plan_quant(
    ckpt: Checkpoint, dest: Path, *, scale_fmt: str = "float", scale_dtype: str = "float32",
    skip: list[str] | tuple[str, ...] = (), mtp: str = "keep",
) -> Plan:
    """Plan BF16/F16/F32 -> block FP8: release-FP8 weights quantized (each with its scale), the rest copied."""
    if scale_fmt not in SCALE_FMTS:
        raise UsageError(f"--scale-fmt {scale_fmt!r}: choose float or ue8m0")
    if scale_dtype not in SCALE_DTYPES:
        raise UsageError(f"--scale-dtype {scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}")
    if scale_dtype == "float8_e8m0fnu" and scale_fmt != "ue8m0":
        raise UsageError("--scale-dtype float8_e8m0fnu holds powers of two only: add --scale-fmt ue8m0")
    if mtp not in ("keep", "drop"):
        raise UsageError(f"--mtp {mtp!r}: choose keep or drop")
    patterns = []
    for text in skip:
        try:
            patterns.append(re.compile(text))
        except re.error as exc:
            raise UsageError(f"--skip {text!r}: not a valid regular expression ({exc})") from None
    check_dest(ckpt.root, dest)
    ckpt.require_clean()
    config = ckpt.require_config()

    fp8 = sorted(n for n, t in ckpt.tensors.items() if t.dtype in FP8_DTYPES or is_scale(n))
    if fp8:
        raise Dsv3Error(
            f"{ckpt.root}: already holds FP8 tensors or scales (`{fp8[0]}`{_more(fp8)}); quant takes a BF16, F16 "
            "or F32 checkpoint: use this one as it is, or `dsv3conv dequant` it first"
        )
    fused = sorted(n for n in ckpt.tensors if FUSED_EXPERTS_RE.match(n))
    if fused:
        raise Dsv3Error(
            f"tensor `{fused[0]}` holds fused experts{_more(fused)}; quant expects the release layout, one tensor "
            "per expert (`mlp.experts.N.gate_proj.weight`): save the model unfused"
        )
    mtp_ids = set(mtp_layer_ids(config))
    if mtp == "drop" and not mtp_ids:
        raise UsageError(
            f"--mtp drop: {ckpt.root / 'config.json'} declares no MTP layers (num_nextn_predict_layers is 0 or absent)"
        )
    _check_layers(ckpt, config)

    def dropped_by_mtp(name: str) -> bool:
        return mtp == "drop" and layer_id(name) in mtp_ids

    candidates = [n for n in ckpt.tensors if is_fp8_weight_name(n) and not dropped_by_mtp(n)]
    if not candidates:
        raise Dsv3Error(
            f"{ckpt.root}: no tensor to quantize: none is named like a DeepSeek-V3 FP8 weight "
            "(model.layers.N.self_attn.*_proj.weight, model.layers.N.mlp.*_proj.weight)"
        )
    for p in patterns:
        if not any(p.search(n) for n in candidates):
            raise UsageError(
                f"--skip {p.pattern!r} matches none of the {len(candidates)} tensors quant would quantize "
                f"(e.g. `{candidates[0]}`); check the pattern"
            )
    skipped = sorted(n for n in candidates if any(p.search(n) for p in patterns))
    targets = set(candidates) - set(skipped)
    if not targets:
        raise UsageError(f"--skip leaves no tensor to quantize (all {len(candidates)} matched)")
    for name in sorted(targets):
        info = ckpt.tensors[name]
        if info.dtype not in SOURCE_DTYPES:
            raise Dsv3Error(
                f"tensor `{name}` in {info.file} is {info.dtype}; quant reads BF16, F16 or F32 weights: "
                "convert it, or keep it as it is with --skip"
            )
        if len(info.shape) != 2:
            raise Dsv3Error(
                f"tensor `{name}` in {info.file} has shape {list(info.shape)}; a block-quantized weight must be 2-D "
                "[out, in]: keep it as it is with --skip"
            )

    fp8_dtype, sdtype = "F8_E4M3", SCALE_DTYPES[scale_dtype]
    files, dropped = [], []
    for shard in ckpt.shards.values():
        entries: list[TensorPlan] = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name:
                continue
            if dropped_by_mtp(info.name):
                dropped.append(info.name)
                continue
            if info.name in targets:
                sc = TensorPlan(scale_name(info.name), info, None, sdtype, scale_shape(info.shape), op="quant_scale")
                entries.append(TensorPlan(info.name, info, None, fp8_dtype, info.shape, op="quant", emits=sc,
                                          scale_fmt=scale_fmt))
                entries.append(sc)
            else:
                entries.append(TensorPlan(info.name, info, None, info.dtype, info.shape))
        if entries:
            entries.sort(key=lambda t: -DTYPE_SIZES[t.dtype])  # stable: source order within a size
            files.append(_file(shard.name, entries))

    new_config = copy.deepcopy(config)
    changes = []
    qc = dict(QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if scale_fmt == "ue8m0" else {}))
    if skipped:
        qc["modules_to_not_convert"] = [n.removesuffix(".weight") for n in skipped]
    old_qc = config.get("quantization_config")
    if old_qc != qc:
        changes.append(f"{'replaced' if old_qc else 'added'} quantization_config (fp8 e4m3, 128x128 blocks"
                       + (", scale_fmt ue8m0" if scale_fmt == "ue8m0" else "")
                       + (f", {len(skipped)} modules_to_not_convert" if skipped else "") + ")")
    new_config["quantization_config"] = qc
    for key in ("torch_dtype", "dtype"):
        if key == "torch_dtype" or key in new_config:
            if new_config.get(key) != "bfloat16":
                changes.append(f"{key}: {new_config.get(key)!r} -> 'bfloat16'")
            new_config[key] = "bfloat16"
    if mtp == "drop":
        changes.append(f"num_nextn_predict_layers: {config.get('num_nextn_predict_layers')} -> 0")
        new_config["num_nextn_predict_layers"] = 0
    plan = Plan("quant", ckpt.root, dest, files, _index(ckpt, files), new_config, changes, ckpt.extra_files(),
                sorted(dropped), fp8_dtype)
    return plan
