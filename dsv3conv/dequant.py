"""The `dequant` plan: FP8 weights to BF16 (or F16/F32), scales dropped, every other tensor copied.

Which tensors convert is decided by the names and dtypes of the headers alone: an F8_E4M3 weight with its
`_scale_inv` of the right shape becomes a `DequantBlockFp8`; everything else but the scales is a `Copy`.
"""

from __future__ import annotations

from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.config_edits import dequant_config
from dsv3conv.dtypes import FLOAT_DTYPES, OUT_DTYPES
from dsv3conv.errors import UsageError
from dsv3conv.layout import is_scale, layer_id, mtp_layer_ids
from dsv3conv.ops import DequantBlockFp8
from dsv3conv.plan import Plan, TensorPlan, check_layers, copied, index_json, require_fp8_pairs, shard_files


def plan_dequant(
    ckpt: Checkpoint, dest: Path, *, out_dtype: str = "bfloat16", mtp: str = "keep",
    max_shard_size: int | None = None, extra_files: list[str] | tuple[str, ...] = (),
) -> Plan:
    """Plan FP8 -> `out_dtype` of the opened checkpoint `ckpt` into `dest`; `extra_files` are copied alongside."""
    if out_dtype not in OUT_DTYPES:
        raise UsageError(f"{{dtype}} {out_dtype!r}: choose one of {', '.join(OUT_DTYPES)}", "dtype")
    if mtp not in ("keep", "drop"):
        raise UsageError(f"{{mtp}} {mtp!r}: choose keep or drop", "mtp")
    ckpt.require_clean()
    config = ckpt.require_config()
    cov = require_fp8_pairs(ckpt.tensors)
    mtp_ids = set(mtp_layer_ids(config)) if mtp == "drop" else set()
    if mtp == "drop" and not mtp_ids:
        raise UsageError(f"{{mtp}} drop: {ckpt.root / 'config.json'} declares no MTP layers "
                         "(num_nextn_predict_layers is 0 or absent)", "mtp")
    check_layers(ckpt, config)

    dtype = FLOAT_DTYPES[out_dtype]
    dropped = {n for n in ckpt.tensors if is_scale(n) or layer_id(n) in mtp_ids}
    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in ckpt.shards.values():
        entries = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name or info.name in dropped:
                continue
            if info.name in cov.pairs:
                scale = ckpt.tensors[cov.pairs[info.name]]
                entries.append(TensorPlan(info.name, dtype, info.shape, DequantBlockFp8(scale.dtype), (info, scale)))
            else:
                entries.append(copied(info))
        groups.append((shard.name, entries))
    files = shard_files(groups, max_shard_size)
    edit = dequant_config(config, out_dtype, drop_mtp=bool(mtp_ids))
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files),
                sorted(dropped))
