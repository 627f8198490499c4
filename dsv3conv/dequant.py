"""The `dequant` plan: quantized weights to BF16 (or F16/F32), scales dropped, every other tensor copied.

Which tensors convert is decided per tensor from the headers (`formats.classify`): a 128x128 block-FP8
weight (`_scale_inv`, V4 `.scale` or compressed-tensors `.weight_scale`, any scale dtype) becomes a
`DequantBlockFp8`, a packed-FP4 expert (V4 `expert_dtype: fp4`) a `DequantMxfp4`; everything else but the
scales is a `Copy`. The config cross-checks; a mismatch is refused naming the tensor.
"""

from __future__ import annotations

from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.checks import mtp_rule
from dsv3conv.config_edits import dequant_config
from dsv3conv.dtypes import FLOAT_DTYPES, OUT_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.formats import check_config, classify
from dsv3conv.ops import DequantBlockFp8, DequantMxfp4
from dsv3conv.plan import Plan, TensorPlan, check_layers, copied, index_json, more, shard_files


def plan_dequant(
    ckpt: Checkpoint, dest: Path, *, out_dtype: str = "bfloat16", mtp: str = "keep",
    max_shard_size: int | None = None, extra_files: list[str] | tuple[str, ...] = (),
) -> Plan:
    """Plan `out_dtype` of the opened checkpoint `ckpt` into `dest`; `extra_files` are copied alongside."""
    if out_dtype not in OUT_DTYPES:
        raise UsageError(f"{{dtype}} {out_dtype!r}: choose one of {', '.join(OUT_DTYPES)}", "dtype")
    if mtp not in ("keep", "drop"):
        raise UsageError(f"{{mtp}} {mtp!r}: choose keep or drop", "mtp")
    ckpt.require_clean()
    config = ckpt.require_config()
    formats = classify(ckpt.tensors)
    problems = formats.problems + check_config(formats, config, presence=False)
    if problems:
        raise Dsv3Error(problems[0] + more(problems))
    in_mtp = _mtp_rule(ckpt, config)
    if mtp == "drop" and not any(in_mtp(n) for n in ckpt.tensors):
        raise UsageError(f"{{mtp}} drop: {ckpt.root / 'config.json'} declares no MTP layers "
                         "(num_nextn_predict_layers is 0 or absent)", "mtp")

    dtype = FLOAT_DTYPES[out_dtype]
    dropped = {n for n, f in formats.tensors.items() if f.kind == "scale" or (mtp == "drop" and in_mtp(n))}
    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in ckpt.shards.values():
        entries = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name or info.name in dropped:
                continue
            f = formats.tensors[info.name]
            if f.kind == "fp8_block":
                scale = ckpt.tensors[f.scale]
                entries.append(TensorPlan(info.name, dtype, info.shape, DequantBlockFp8(scale.dtype), (info, scale)))
            elif f.kind == "mxfp4":
                shape = (info.shape[0], 2 * info.shape[1])
                entries.append(TensorPlan(info.name, dtype, shape, DequantMxfp4(), (info, ckpt.tensors[f.scale])))
            else:
                entries.append(copied(info))
        groups.append((shard.name, entries))
    files = shard_files(groups, max_shard_size)
    edit = dequant_config(config, out_dtype, drop_mtp=mtp == "drop")
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files),
                sorted(dropped))


def _mtp_rule(ckpt: Checkpoint, config: dict):
    """Which tensors are MTP (or a V4 drafter), once the config's layer counts match the tensors."""
    check_layers(ckpt, config)
    return mtp_rule(ckpt.tensors, config)
