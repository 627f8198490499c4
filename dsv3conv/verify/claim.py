"""What conversion of SRC a checkpoint claims to be, planned by the planner that conversion runs.

From CKPT's own tensors and config.json:
- a NextN draft (`architectures` DeepseekV3ForCausalLMNextN) of a SRC with MTP layers: `split-mtp --mtp-out`,
  layout `full` when the draft keeps its embedding, else `sglang`; of a DeepSeek-V4 SRC: `mtp.*` tensors and
  no main layer, layout `full` when it holds `head.weight`;
- FP8 weights with scales where SRC has none: `quant`, with the settings CKPT declares (`scale_fmt` and
  `modules_to_not_convert` from its quantization_config, the dtype of its scales, MTP dropped when its config
  has none);
- packed FP4 experts in SRC stored as block FP8 in CKPT: `dequant --experts fp8`, with the dtype of those
  experts' scales, MTP dropped as for dequant;
- FP8 with scales where SRC has them, or neither has any, and SRC's MTP layers left out: `split-mtp --main-out`;
- otherwise `dequant` (of a source without FP8 weights: every tensor copied), to the dtype CKPT's dequantized weights have, MTP dropped when CKPT's config says
  `num_nextn_predict_layers: 0` (or, without a config, when CKPT holds no MTP tensor).
The plan is what `verify` holds tensor set, config and data to; no second description of any conversion.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.checks import formats_of, mtp_rule, quantized, scale_tensors
from dsv3conv.dequant import plan_dequant
from dsv3conv.dtypes import FLOAT_DTYPES, OUT_DTYPES, TORCH_NAMES
from dsv3conv.errors import Dsv3Error, counted
from dsv3conv.formats import FP8, Formats
from dsv3conv.layout import is_nextn_draft
from dsv3conv.layout_v4 import is_v4_names, mtp_module_id, v4_layer_id
from dsv3conv.plan import Plan, TensorPlan
from dsv3conv.quant import plan_quant
from dsv3conv.split_mtp import SHARED_WITH_TARGET, plan_split_main, plan_split_mtp


@dataclass
class Claim:
    """The conversion CKPT claims to be, and its plan (None when the planner refused: `error` says why)."""

    kind: str  # "dequant", "quant", "split-mtp main" or "split-mtp draft"
    settings: str  # the options read from CKPT, for the report
    plan: Plan | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)  # settings no run of the planner can produce

    @property
    def planned(self) -> dict[str, TensorPlan]:
        return {} if self.plan is None else {t.name: t for f in self.plan.files for t in f.tensors}


def claim(ckpt: Checkpoint, src: Checkpoint) -> Claim:
    """Read what CKPT claims to be made from SRC, and plan that conversion of SRC."""
    config = ckpt.config or {}
    src_formats, ckpt_formats = formats_of(src), formats_of(ckpt)
    in_mtp = mtp_rule(src.tensors, src.config or {})
    src_mtp = any(in_mtp(n) for n in src.tensors)
    src_q = quantized(src_formats)
    if src_mtp and _is_v4_draft(ckpt, src):
        layout = "full" if "head.weight" in ckpt.tensors else "sglang"
        return _plan(Claim("split-mtp draft", f"layout {layout}"),
                     lambda: plan_split_mtp(src, ckpt.root, layout))
    if is_nextn_draft(config) and src_mtp:
        full = any(n.endswith(SHARED_WITH_TARGET) for n in ckpt.tensors)
        layout = "full" if full else "sglang"
        return _plan(Claim("split-mtp draft", f"layout {layout}"),
                     lambda: plan_split_mtp(src, ckpt.root, layout))
    ckpt_q = bool(quantized(ckpt_formats))
    mtp = "drop" if src_mtp and _mtp_dropped(ckpt, in_mtp) else "keep"
    if ckpt_q and not _has_fp8(src, src_formats):
        return _claim_quant(ckpt, ckpt_formats, src, mtp)
    repacked = [f.name for f in src_formats.of_kind("mxfp4") if f.name in ckpt_formats.tensors
                and ckpt_formats.tensors[f.name].kind == "fp8_block"]
    if repacked:
        return _claim_repack(ckpt, ckpt_formats, src, repacked, mtp)
    if ckpt_q == bool(src_q) and mtp == "drop":
        return _plan(Claim("split-mtp main", "MTP layers left out"), lambda: plan_split_main(src, ckpt.root))
    converted = Counter(ckpt.tensors[n].dtype for n in src_q if n in ckpt.tensors)
    out_dtype = converted.most_common(1)[0][0] if converted else "BF16"
    dtype_name = TORCH_NAMES.get(out_dtype, "bfloat16") if TORCH_NAMES.get(out_dtype) in OUT_DTYPES else "bfloat16"
    return _plan(Claim("dequant", f"to {FLOAT_DTYPES[dtype_name]}, MTP {mtp}"),
                 lambda: plan_dequant(src, ckpt.root, out_dtype=dtype_name, mtp=mtp, allow_nonfinite=True))


def _claim_repack(ckpt: Checkpoint, formats: Formats, src: Checkpoint, repacked: list[str], mtp: str) -> Claim:
    """`dequant --experts fp8`, its block scales in the dtype CKPT's repacked experts have."""
    scale_dtypes = sorted({formats.tensors[n].scale_dtype for n in repacked})
    scale_dtype = TORCH_NAMES.get(scale_dtypes[0], scale_dtypes[0])
    c = Claim("dequant --experts fp8", f"{len(repacked):,} packed FP4 experts as block FP8, scale dtype "
              f"{scale_dtype}, MTP {mtp}")
    if len(scale_dtypes) > 1:
        c.problems.append(f"repacked experts' scales stored in several dtypes ({', '.join(scale_dtypes)}); "
                          "dequant --experts fp8 writes one")
    return _plan(c, lambda: plan_dequant(src, ckpt.root, mtp=mtp, experts="fp8", scale_dtype=scale_dtype))


def _claim_quant(ckpt: Checkpoint, formats: Formats, src: Checkpoint, mtp: str) -> Claim:
    qc = (ckpt.config or {}).get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    scale_fmt = qc.get("scale_fmt", "float")
    scale_dtypes = sorted({ckpt.tensors[n].dtype for n in scale_tensors(formats)})
    scale_dtype = TORCH_NAMES.get(scale_dtypes[0], scale_dtypes[0]) if scale_dtypes else "float32"
    modules = qc.get("modules_to_not_convert") or []
    skip = ["^" + re.escape(f"{m}.weight") + "$" for m in modules if isinstance(m, str)]
    c = Claim("quant", f"scale_fmt {scale_fmt}, scale dtype {scale_dtype}, {counted(len(skip), 'weight')} skipped, MTP {mtp}")
    if len(scale_dtypes) > 1:
        c.problems.append(f"scales stored in several dtypes ({', '.join(scale_dtypes)}); quant writes one")
    return _plan(c, lambda: plan_quant(src, ckpt.root, scale_fmt=str(scale_fmt), scale_dtype=scale_dtype,
                                       skip=skip, mtp=mtp))


def _plan(c: Claim, make) -> Claim:
    try:
        c.plan = make()
    except Dsv3Error as exc:
        c.error = f"cannot plan {c.kind} of the source with CKPT's settings ({c.settings}): {exc}"
    return c


def _is_v4_draft(ckpt: Checkpoint, src: Checkpoint) -> bool:
    """A DeepSeek-V4 source, and CKPT holds `mtp.*` tensors but no main layer."""
    return (is_v4_names(src.tensors) and any(mtp_module_id(n) is not None for n in ckpt.tensors)
            and not any(v4_layer_id(n) is not None for n in ckpt.tensors))


def _has_fp8(ckpt: Checkpoint, formats: Formats) -> bool:
    """Any quantized weight, FP8 tensor or scale."""
    return bool(quantized(formats) or scale_tensors(formats)) or any(t.dtype == FP8 for t in ckpt.tensors.values())


def _mtp_dropped(ckpt: Checkpoint, in_mtp) -> bool:
    """CKPT's config says it has no MTP layers; without a config, CKPT holds no tensor of SRC's MTP layers."""
    if ckpt.config is not None and "num_nextn_predict_layers" in ckpt.config:
        return not ckpt.config.get("num_nextn_predict_layers")
    return not any(in_mtp(n) for n in ckpt.tensors)
