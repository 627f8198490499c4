"""The checks of CKPT alone that read no tensor data: files, headers, total_size, config, layers, mtp,
quantization_config, fp8_scales. Each is the reader's problems and `dsv3conv.checks`' grouped under a name."""

from __future__ import annotations

from dsv3conv.checkpoint import CONFIG_NAME, SINGLE_NAME, Checkpoint
from dsv3conv.checks import (
    fp8_problems,
    layer_problems,
    quantization_config_problems,
    quantized,
    ranges,
    shard_files,
    stray_shards,
    total_size_problems,
)
from dsv3conv.errors import counted
from dsv3conv.formats import BLOCK, MX_GROUP, Formats
from dsv3conv.layout import mtp_layer_ids
from dsv3conv.layout_v4 import is_v4_names, v4_layout
from dsv3conv.verify.report import Check, check_of

HEADER_CODES = ("header", "odd-index")  # the reader's problems that verify's `headers` check reports


def header_checks(ckpt: Checkpoint, formats: Formats) -> list[Check]:
    """The eight checks from index, headers and config.json, in the report's order."""
    files = [p for p in ckpt.problems if p.code not in HEADER_CODES + ("config",)]
    files += stray_shards(ckpt)
    if ckpt.index is None:
        passed = f"{SINGLE_NAME}: {counted(len(ckpt.tensors), 'tensor')}, no other shards"
    else:
        passed = f"{counted(len(shard_files(ckpt)), 'shard file')}, {counted(len(ckpt.tensors), 'tensor')}; index and shards agree"
    size = sum(s.file_size for s in ckpt.shards.values())
    checks = [
        check_of("files", files, passed),
        check_of("headers", [p for p in ckpt.problems if p.code in HEADER_CODES],
                 f"{counted(len(ckpt.shards), 'header')} valid; file sizes match the headers ({counted(size, 'byte')})"),
        check_of("total_size", total_size_problems(ckpt), _total_size_passed(ckpt)),
    ]
    return checks + _config_checks(ckpt, formats) + [_fp8_check(ckpt, formats)]


def _total_size_passed(ckpt: Checkpoint) -> str:
    if ckpt.index is None:
        return f"single file, no index; {counted(ckpt.tensor_bytes(), 'tensor byte')}"
    return f"{counted(ckpt.tensor_bytes(), 'byte')}, the sum of the tensors"


def _config_checks(ckpt: Checkpoint, formats: Formats) -> list[Check]:
    """config, layers, mtp and quantization_config."""
    path = ckpt.root / CONFIG_NAME
    config = ckpt.config
    if config is None:
        why = next((p.text for p in ckpt.problems if p.code == "config"), f"{path}: missing or unreadable")
        return [Check("config", False, why)] + [
            Check(n, False, f"not checked: {why}") for n in ("layers", "mtp", "quantization_config")]
    layers = layer_problems(ckpt.tensors, config, path)
    n_main = int(config.get("num_hidden_layers", 0) or 0)
    mtp_passed = _mtp_passed(ckpt, config)
    has_q = bool(quantized(formats))
    return [
        Check("config", True, f"{path.name}: model_type {config.get('model_type')!r}"),
        check_of("layers", [p for p in layers if p.code == "layers"], _layers_passed(ckpt, n_main)),
        check_of("mtp", [p for p in layers if p.code == "mtp"], mtp_passed),
        check_of("quantization_config", quantization_config_problems(ckpt.tensors, config, path, formats),
                 "present, FP8 tensors present" if has_q else "absent, no FP8 tensors"),
    ]


def _layers_passed(ckpt: Checkpoint, n_main: int) -> str:
    if is_v4_names(ckpt.tensors) and not v4_layout(ckpt.tensors, None).main_layers:
        return f"num_hidden_layers={n_main}: no main layers (a draft of the mtp.* tensors alone)"
    return f"num_hidden_layers={n_main}" + (f": main layers 0..{n_main - 1} present" if n_main else "")


def _mtp_passed(ckpt: Checkpoint, config: dict) -> str:
    n_mtp = config.get("num_nextn_predict_layers", 0) or 0
    if is_v4_names(ckpt.tensors):
        layout = v4_layout(ckpt.tensors, config)
        if layout.mtp_kind is None:
            return "no mtp.* tensors declared, none present"
        what = "a DSpark drafter" if layout.mtp_kind == "dspark" else "MTP"
        return f"num_nextn_predict_layers={n_mtp}: {what} at mtp.{ranges(layout.mtp_modules)} present"
    mtp_ids = mtp_layer_ids(config)
    if mtp_ids:
        return (f"num_nextn_predict_layers={n_mtp}: MTP {'layers' if len(mtp_ids) > 1 else 'layer'} "
                f"{ranges(mtp_ids)} present")
    return "no MTP layers declared, none present"


def _fp8_check(ckpt: Checkpoint, formats: Formats) -> Check:
    block = formats.of_kind("fp8_block")
    packed = formats.of_kind("mxfp4")
    parts = []
    if block:
        parts.append(f"{counted(len(block), 'FP8 weight')}, each with a scale of [ceil(M/{BLOCK}), ceil(N/{BLOCK})]")
    if packed:
        parts.append(f"{counted(len(packed), 'packed FP4 weight')}, each with an E8M0 scale per {MX_GROUP} values")
    passed = "; ".join(parts) if parts else "no FP8 weights, no scales"
    return check_of("fp8_scales", fp8_problems(ckpt.tensors, formats), passed)
