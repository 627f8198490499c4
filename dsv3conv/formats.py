"""The storage format of every tensor, decided from the headers (names, dtypes, shapes); the config cross-checks.

Formats (`TensorFormat.kind`):
- `fp8_block`: F8_E4M3 [M, N] with one scale per 128x128 block, [ceil(M/128), ceil(N/128)] of F32, BF16, F16
  or F8_E8M0, named after one of three conventions (`FP8_NAMINGS`):
    `scale_inv`     `x.weight` + `x.weight_scale_inv`   DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8, ...
    `scale`         `x.weight` + `x.scale`              DeepSeek-V4 (scales F8_E8M0)
    `weight_scale`  `x.weight` + `x.weight_scale`       compressed-tensors FP8_BLOCK (llm-compressor)
  In every convention the scale is a multiplier: value = float32(w) * float32(scale).
- `mxfp4`: I8/U8 [M, K/2] holding two E2M1 codes per byte (low nibble first) with `x.scale` F8_E8M0
  [M, ceil(K/32)], one scale per 32 values (DeepSeek-V4 routed experts with `expert_dtype: fp4`).
- `scale`: the scale of one of the above; `copy`: anything else (BF16, F32, I64, ...), kept byte for byte.

Nothing here reads tensor data: an E8M0 scale byte 255 (NaN) is refused by the conversion itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Mapping, NamedTuple, Protocol

from dsv3conv.config import BLOCK

MX_GROUP = 32
FP8 = "F8_E4M3"
E8M0 = "F8_E8M0"
SCALE_DTYPES = ("F32", "BF16", "F16", E8M0)
PACKED_DTYPES = ("I8", "U8")
FP8_NAMINGS = ("scale_inv", "scale", "weight_scale")
COMPRESSED_TENSORS = "compressed-tensors"
ROUTED_EXPERT_RE = re.compile(r"(^|\.)experts\.\d+\.[^.]+\.weight$")


class _Info(Protocol):
    dtype: str
    shape: tuple[int, ...]


class TensorFormat(NamedTuple):
    """One tensor's format (a tuple: one is made per tensor, 92k for DeepSeek-V3)."""

    name: str
    kind: str  # fp8_block, mxfp4, scale, copy
    dtype: str  # the stored dtype
    scale: str | None = None  # fp8_block / mxfp4: the scale tensor; scale: the weight it belongs to
    scale_dtype: str | None = None
    naming: str | None = None  # fp8_block: one of FP8_NAMINGS; mxfp4: "scale"


@dataclass
class Formats:
    """Every tensor's format, the problems found (one line each, naming the tensor), the family seen."""

    tensors: dict[str, TensorFormat]
    problems: list[str] = field(default_factory=list)
    unscaled: list[str] = field(default_factory=list)  # F8_E4M3 weights without any scale
    orphan_scales: list[str] = field(default_factory=list)  # scales without their weight

    def of_kind(self, kind: str) -> list[TensorFormat]:
        return [f for f in self.tensors.values() if f.kind == kind]

    @property
    def namings(self) -> set[str]:
        return {f.naming for f in self.tensors.values() if f.kind == "fp8_block"}

    def groups(self) -> dict[str, int]:
        """Tensor counts per format label, e.g. `fp8_block (scale, F8_E8M0)`, `mxfp4`, `copy BF16`."""
        counts: Counter[str] = Counter()
        for f in self.tensors.values():
            if f.kind == "fp8_block":
                counts[f"fp8_block ({f.naming}, {f.scale_dtype} scales)"] += 1
            elif f.kind == "mxfp4":
                counts["mxfp4 (E2M1 pairs, F8_E8M0 scale per 32)"] += 1
            elif f.kind == "copy":
                counts[f"copy {f.dtype}"] += 1
        return dict(sorted(counts.items()))


def scale_names(weight: str) -> dict[str, str]:
    """Candidate scale tensor of `weight` under each naming convention."""
    if not weight.endswith(".weight"):
        return {"scale_inv": weight + "_scale_inv"}
    base = weight[:-7]
    return {"scale_inv": weight + "_scale_inv", "scale": base + ".scale", "weight_scale": base + ".weight_scale"}


def _weight_of(scale: str) -> str:
    """The weight a scale tensor belongs to, by name (the inverse of `scale_names`)."""
    for suffix, weight in (("_scale_inv", ""), (".weight_scale", ".weight"), (".scale", ".weight")):
        if scale.endswith(suffix):
            return scale[: -len(suffix)] + weight
    return scale


def block_scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block), -(-cols // block))


def mx_scale_shape(packed_shape: tuple[int, ...]) -> tuple[int, int]:
    rows, pcols = packed_shape
    return (rows, -(-2 * pcols // MX_GROUP))


def classify(tensors: Mapping[str, _Info], config: Mapping | None = None, unread: Collection[str] = ()) -> Formats:
    """Classify every tensor from its header entry; check the config against what the headers say.

    `unread`: the tensors the index places in shards that could not be read (reported as such): a weight whose
    scale, or a scale whose weight, is among them is not reported as missing it.

    Problems come in this order: missing scales, bad FP8 scales, orphan scales, one-byte weights that are
    not packed FP4, then the config's disagreements.
    """
    out = Formats({})
    bad_fp8: list[str] = []
    bad_packed: list[str] = []
    claimed: dict[str, str] = {}  # scale -> weight
    missing = out.unscaled
    unread = set(unread)
    for name, info in tensors.items():
        if info.dtype == FP8:
            fmt = _classify_fp8(name, info, tensors, bad_fp8, missing)
        elif info.dtype in PACKED_DTYPES and name.endswith(".weight"):
            if scale_names(name)["scale"] in unread:
                continue
            fmt = _classify_packed(name, info, tensors, bad_packed)
        else:
            continue
        if fmt is not None:
            out.tensors[name] = fmt
            claimed[fmt.scale] = name
    for name, info in tensors.items():
        if name in out.tensors:
            continue
        if name in claimed:
            out.tensors[name] = TensorFormat(name, "scale", info.dtype, claimed[name], info.dtype)
        elif info.dtype != FP8 and not (info.dtype in PACKED_DTYPES and name.endswith(".weight")):
            if _looks_like_scale(name, info.dtype, tensors):
                out.orphan_scales.append(name)
            out.tensors[name] = TensorFormat(name, "copy", info.dtype)
    out.unscaled[:] = [name for name in missing if unread.isdisjoint(scale_names(name).values())]
    out.orphan_scales[:] = [name for name in out.orphan_scales if _weight_of(name) not in unread]
    naming = _expected_naming(out, tensors, config)
    out.problems += [f"tensor `{name}` is F8_E4M3 but `{scale_names(name).get(naming, name + '_scale_inv')}` is "
                     "missing from the index and from every shard; restore the missing shard or scale"
                     for name in out.unscaled]
    out.problems += bad_fp8
    out.problems += [f"tensor `{name}` is a scale without its F8_E4M3 weight (nor a packed FP4 one); "
                     "the checkpoint is incomplete" for name in out.orphan_scales]
    out.problems += bad_packed
    if config is not None:
        out.problems += check_config(out, config)
    return out


def _expected_naming(formats: Formats, tensors: Mapping[str, _Info], config: Mapping | None) -> str:
    """The scale naming of this checkpoint: the one its other FP8 weights use, else its family's."""
    seen = Counter(f.naming for f in formats.of_kind("fp8_block"))
    if seen:
        return seen.most_common(1)[0][0]
    if ((config or {}).get("quantization_config") or {}).get("quant_method") == COMPRESSED_TENSORS:
        return "weight_scale"
    return "scale" if any(n in ("embed.weight", "head.weight") or n.startswith("layers.") for n in tensors) else "scale_inv"


def _classify_fp8(
    name: str, info: _Info, tensors: Mapping[str, _Info], problems: list[str], missing: list[str]
) -> TensorFormat | None:
    found = {k: s for k, s in scale_names(name).items() if s in tensors}
    if not found:
        missing.append(name)
        return None
    if len(found) > 1:
        problems.append(f"tensor `{name}` has several scales ({', '.join(sorted(found.values()))}); keep one")
        return None
    naming, sname = next(iter(found.items()))
    scale = tensors[sname]
    if len(info.shape) != 2:
        problems.append(f"tensor `{name}` is F8_E4M3 with shape {list(info.shape)}; only 2-D block-scaled weights are supported")
        return None
    if scale.dtype not in SCALE_DTYPES:
        problems.append(f"tensor `{sname}` has dtype {scale.dtype}; block scales must be one of {', '.join(SCALE_DTYPES)}")
        return None
    want = block_scale_shape(info.shape)
    if tuple(scale.shape) != want:
        problems.append(
            f"tensor `{sname}` has shape {list(scale.shape)} but `{name}` {list(info.shape)} needs {list(want)} "
            f"({BLOCK}x{BLOCK} blocks); per-channel or per-tensor FP8 is not supported"
        )
        return None
    return TensorFormat(name, "fp8_block", FP8, sname, scale.dtype, naming)


def _classify_packed(name: str, info: _Info, tensors: Mapping[str, _Info], problems: list[str]) -> TensorFormat | None:
    """A one-byte integer weight must be packed FP4 with its E8M0 scale; anything else is refused."""
    sname = scale_names(name)["scale"]
    scale = tensors.get(sname)
    if scale is None:
        problems.append(
            f"tensor `{name}` is {info.dtype} without `{sname}`: neither FP8 nor packed FP4 (MXFP4); "
            "restore the missing scale or the original file"
        )
        return None
    if len(info.shape) != 2 or scale.dtype != E8M0 or tuple(scale.shape) != mx_scale_shape(info.shape):
        want = list(mx_scale_shape(info.shape)) if len(info.shape) == 2 else "[rows, cols / 16]"
        problems.append(
            f"tensor `{sname}` is {scale.dtype} {list(scale.shape)}, but packed FP4 `{name}` {list(info.shape)} "
            f"needs F8_E8M0 {want} (one scale per {MX_GROUP} values); the checkpoint is damaged"
        )
        return None
    return TensorFormat(name, "mxfp4", info.dtype, sname, E8M0, "scale")


def _looks_like_scale(name: str, dtype: str, tensors: Mapping[str, _Info]) -> bool:
    if name.endswith(("_scale_inv", ".weight_scale")):
        return True
    return name.endswith(".scale") and (dtype == E8M0 or name[: -len(".scale")] + ".weight" in tensors)


# ------------------------------------------------------------------------------------ config cross-check
def check_config(formats: Formats, config: Mapping, presence: bool = True) -> list[str]:
    """What config.json says against what the headers say; each mismatch one line naming a tensor.

    `presence`: also report a quantization_config without quantized tensors, or the reverse (inspect does;
    a conversion, which drops or writes that field anyway, need not).
    """
    qc = config.get("quantization_config")
    quantized = formats.of_kind("fp8_block") + formats.of_kind("mxfp4")
    if not isinstance(qc, Mapping) or not quantized:
        if not presence:
            return _check_expert_dtype(formats, config)
        if quantized:
            return [f"config.json: tensor `{quantized[0].name}` is quantized but the config has no quantization_config"]
        return ["config.json: quantization_config present but no tensor is quantized"] if isinstance(qc, Mapping) else []
    if qc.get("quant_method") == COMPRESSED_TENSORS:
        return _check_compressed_tensors(formats, qc)
    problems = []
    block = qc.get("weight_block_size")
    if block is not None and list(block) != [BLOCK, BLOCK]:
        problems.append(f"config.json: weight_block_size {block} but the scales of `{quantized[0].name}` are {BLOCK}x{BLOCK}")
    for f in formats.of_kind("fp8_block"):
        if f.naming == "weight_scale":
            problems.append(f"tensor `{f.scale}` uses compressed-tensors naming but quant_method is {qc.get('quant_method')!r}")
            break
    problems += _check_expert_dtype(formats, config)
    return problems


def _check_expert_dtype(formats: Formats, config: Mapping) -> list[str]:
    """The headers decide each expert's format; a missing `expert_dtype` (as in published copies of the V4
    configs) is no contradiction, only an explicit value the routed experts disagree with: `"fp4"` beside a
    routed expert that is not packed FP4, anything else beside one that is, `"fp8"` where no routed expert is
    block FP8 (routed experts kept BF16 beside block-FP8 ones, as `quant --skip` leaves them, are accepted)."""
    declared = config.get("expert_dtype")
    if declared is None:
        declared = (config.get("quantization_config") or {}).get("expert_dtype")
    if declared is None:
        return []
    mx = formats.of_kind("mxfp4")
    if mx and declared != "fp4":
        return [f"tensor `{mx[0].name}` is packed FP4 but config.json says `expert_dtype: {json.dumps(declared)}`; "
                "set it to \"fp4\" or remove it from config.json"]
    routed = [f for f in formats.tensors.values() if f.kind in ("fp8_block", "copy") and f.name.endswith(".weight")
              and ROUTED_EXPERT_RE.search(f.name)]
    if declared == "fp4" and routed:
        f = routed[0]
        fix = 'set it to "fp8"' if f.kind == "fp8_block" else "remove `expert_dtype` from config.json"
        return [f"config.json says expert_dtype fp4 but routed expert `{f.name}` is not packed FP4; {fix}"]
    if declared == "fp8" and routed and not any(f.kind == "fp8_block" for f in routed):
        return [f"config.json says expert_dtype fp8 but routed expert `{routed[0].name}` is {routed[0].dtype}, "
                "not block FP8; remove `expert_dtype` from config.json"]
    return []


def _check_compressed_tensors(formats: Formats, qc: Mapping) -> list[str]:
    problems = []
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        return ["config.json: quantization_config (compressed-tensors) has no config_groups"]
    for gname, group in groups.items():
        w = (group or {}).get("weights") or {}
        scheme = (w.get("num_bits"), w.get("type"), w.get("strategy"), list(w.get("block_structure") or []))
        if scheme != (8, "float", "block", [BLOCK, BLOCK]):
            problems.append(
                f"config.json: config_groups.{gname} quantizes weights as num_bits={scheme[0]} type={scheme[1]} "
                f"strategy={scheme[2]} block_structure={scheme[3]}; only FP8_BLOCK (8-bit float, 128x128 blocks) is supported"
            )
    if formats.of_kind("mxfp4"):
        problems.append(f"tensor `{formats.of_kind('mxfp4')[0].name}` is packed FP4 in a compressed-tensors FP8_BLOCK checkpoint")
    ignore = [p for p in qc.get("ignore") or [] if isinstance(p, str)]
    for f in formats.of_kind("fp8_block"):
        if f.naming != "weight_scale":
            problems.append(f"tensor `{f.scale}`: compressed-tensors names block scales `<module>.weight_scale`")
            break
        module = f.name[: -len(".weight")]
        hit = next((p for p in ignore if ignored(module, p)), None)
        if hit is not None:
            problems.append(f"tensor `{f.name}` is F8_E4M3 but its module matches quantization_config.ignore entry {hit!r}")
            break
    return problems


def ignored(module: str, pattern: str) -> bool:
    """A compressed-tensors ignore entry: `re:<regex>` (matched from the start) or a module's full name."""
    if pattern.startswith("re:"):
        try:
            return re.match(pattern[3:], module) is not None
        except re.error:
            return False
    return module == pattern
