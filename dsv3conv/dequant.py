"""The `dequant` plan: quantized weights to BF16 (or F16/F32), scales dropped, every other tensor copied.

Which tensors convert is decided per tensor from the headers (`formats.classify`): a 128x128 block-FP8
weight (`_scale_inv`, V4 `.scale` or compressed-tensors `.weight_scale`, any scale dtype) becomes a
`DequantBlockFp8`, a packed-FP4 expert (V4 `expert_dtype: fp4`) a `DequantMxfp4`; everything else but the
scales is a `Copy`. The config cross-checks; a mismatch is refused naming the tensor.

`experts="fp8"` (`--experts fp8`): only the packed-FP4 experts convert, each to 128x128 block FP8 with a
`.scale` (`RepackMxfp4Fp8`, exact or refused) of power-of-two values, stored F8_E8M0 as the release's other
FP8 weights are (its quantization_config says `scale_fmt: ue8m0`) or, with `scale_dtype="float32"`, F32 (the
same values); every other tensor, scales included, is copied byte for byte, the scales once found finite and
positive (`Copy(scale=True)`, the rule for a scale that converts).
"""

from __future__ import annotations

from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.checks import mtp_rule
from dsv3conv.config_edits import dequant_config, repack_config
from dsv3conv.dtypes import FLOAT_DTYPES, OUT_DTYPES
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.formats import BLOCK, FP8, TensorFormat, block_scale_shape, check_config, classify
from dsv3conv.ops import DequantBlockFp8, DequantMxfp4, QuantScale, RepackMxfp4Fp8
from dsv3conv.plan import Plan, TensorPlan, check_layers, copied, index_json, more, shard_files

EXPERTS = ("dequant", "fp8")
EXPERT_SCALE_DTYPES = ("float8_e8m0fnu", "float32")  # what `--experts fp8` stores block scales in (exact)


def plan_dequant(
    ckpt: Checkpoint, dest: Path, *, out_dtype: str = "bfloat16", mtp: str = "keep",
    max_shard_size: int | None = None, extra_files: list[str] | tuple[str, ...] = (), experts: str = "dequant",
    allow_nonfinite: bool = False, scale_dtype: str | None = None,
) -> Plan:
    """Plan `out_dtype` of the opened checkpoint `ckpt` into `dest`; `extra_files` are copied alongside.
    `experts`: "dequant" (as every quantized weight) or "fp8" (packed-FP4 experts repacked, the rest copied),
    their block scales stored in `scale_dtype` (one of `EXPERT_SCALE_DTYPES`, default float8_e8m0fnu).
    A value that would come out NaN or Inf stops the run unless `allow_nonfinite` (`dsv3conv.finite`)."""
    if out_dtype not in OUT_DTYPES:
        raise UsageError(f"{{dtype}} {out_dtype!r}: choose one of {', '.join(OUT_DTYPES)}", "dtype")
    if experts not in EXPERTS:
        raise UsageError(f"{{experts}} {experts!r}: choose dequant or fp8", "experts")
    if experts == "fp8" and out_dtype != "bfloat16":
        raise UsageError(f"{{experts}} fp8 copies every tensor but the packed FP4 experts; {{dtype}} {out_dtype} "
                         "does not apply", "experts", "dtype")
    scale_dtype = _expert_scale_dtype(experts, scale_dtype)
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

    repack = experts == "fp8"
    packed = {f.scale: f.name for f in formats.of_kind("mxfp4")}
    if repack and not packed:
        raise UsageError(f"{{experts}} fp8: {ckpt.root} holds no packed FP4 (MXFP4) experts to repack", "experts")
    scales = {f.name for f in formats.of_kind("scale")}
    dropped = {n for n in ckpt.tensors if (n in scales and not repack) or (mtp == "drop" and in_mtp(n))}
    skipped = dropped | (set(packed) if repack else set())  # a repacked expert's scale: rewritten with it
    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in ckpt.shards.values():
        entries = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name or info.name in skipped:
                continue
            f = formats.tensors[info.name]
            if repack and f.kind == "mxfp4":
                entries += _repacked(ckpt, f, FLOAT_DTYPES[scale_dtype])
            elif f.kind in ("fp8_block", "mxfp4") and not repack:
                entries.append(_dequantized(ckpt, f, FLOAT_DTYPES[out_dtype], allow_nonfinite))
            else:  # a scale copied with its weight: read and checked on the way
                entries.append(copied(info, scale=f.kind == "scale"))
        groups.append((shard.name, entries))
    files = shard_files(groups, max_shard_size)
    drop = mtp == "drop"
    edit = repack_config(config, drop) if repack else dequant_config(config, out_dtype, drop_mtp=drop)
    # `allow_nonfinite` is left out: a shard written without it has no NaN or Inf, the same bytes either way
    options = {"dtype": out_dtype, "mtp": mtp, "experts": experts, "scale_dtype": scale_dtype if repack else None,
               "max_shard_size": max_shard_size}
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files),
                sorted(dropped), options)


def _dequantized(ckpt: Checkpoint, f: TensorFormat, dtype: str, allow_nonfinite: bool) -> TensorPlan:
    info, scale = ckpt.tensors[f.name], ckpt.tensors[f.scale]
    if f.kind == "mxfp4":
        op = DequantMxfp4(allow_nonfinite=allow_nonfinite)
        return TensorPlan(f.name, dtype, (info.shape[0], 2 * info.shape[1]), op, (info, scale))
    op = DequantBlockFp8(scale.dtype, allow_nonfinite=allow_nonfinite)
    return TensorPlan(f.name, dtype, info.shape, op, (info, scale))


def _expert_scale_dtype(experts: str, scale_dtype: str | None) -> str:
    """The dtype `--experts fp8` stores its block scales in; any other `experts` writes no scales."""
    if scale_dtype is None:
        return EXPERT_SCALE_DTYPES[0]
    if experts != "fp8":
        raise UsageError(f"{{scale_dtype}} {scale_dtype} sets the block scales {{experts}} fp8 writes; "
                         f"{{experts}} {experts} writes none: add {{experts}} fp8 or leave {{scale_dtype}} out",
                         "scale_dtype", "experts")
    if scale_dtype not in EXPERT_SCALE_DTYPES:
        raise UsageError(f"{{scale_dtype}} {scale_dtype!r}: choose float8_e8m0fnu or float32 (the repacked "
                         "experts' block scales are powers of two, exact in both)", "scale_dtype")
    return scale_dtype


def _repacked(ckpt: Checkpoint, f: TensorFormat, scale_dtype: str) -> list[TensorPlan]:
    """A packed-FP4 expert as e4m3 [rows, cols], then its 128x128 block scale (F8_E8M0 or F32) under the
    same `.scale` name."""
    info, scale = ckpt.tensors[f.name], ckpt.tensors[f.scale]
    shape = (info.shape[0], 2 * info.shape[1])
    return [TensorPlan(f.name, FP8, shape, RepackMxfp4Fp8(scale_dtype, f.scale, BLOCK), (info, scale)),
            TensorPlan(f.scale, scale_dtype, block_scale_shape(shape), QuantScale(f.name), ())]


def _mtp_rule(ckpt: Checkpoint, config: dict):
    """Which tensors are MTP (or a V4 drafter), once the config's layer counts match the tensors."""
    check_layers(ckpt, config)
    return mtp_rule(ckpt.tensors, config)
