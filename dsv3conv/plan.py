"""Plans: every byte of output decided from headers and options, before the first write.

A plan is pure data: which output file holds which tensor, where each comes from (and its scale), the output
dtype and byte range, the new index and config, and the files copied alongside. `pipeline.execute` carries a
plan out; `--dry-run` prints it. Both `dequant` and `split-mtp` produce the same `Plan` type.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint, TensorInfo
from dsv3conv.dest import check_dest
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.layout import fp8_coverage, is_scale, layer_id, mtp_layer_ids
from dsv3conv.safetensors_format import DTYPE_SIZES, build_header

OUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, where it comes from, and what happens to it.

    op: "copy" (bytes unchanged), "dequant" (FP8 with `scale` -> `dtype`), "quant" (BF16/F16/F32 -> FP8; the
    weight also emits `emits`, its scale tensor, from the same source rows) or "quant_scale" (that scale:
    written by its weight's pieces, never read on its own). Left empty, op follows `scale`.
    """

    name: str
    source: TensorInfo
    scale: TensorInfo | None  # set when the tensor is dequantized
    dtype: str  # output dtype
    shape: tuple[int, ...]
    op: str = ""
    emits: TensorPlan | None = None  # op "quant": the scale tensor planned in the same file
    scale_fmt: str = ""  # op "quant": "float" or "ue8m0"

    def __post_init__(self) -> None:
        if not self.op:
            object.__setattr__(self, "op", "dequant" if self.scale is not None else "copy")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def converts(self) -> bool:
        """Computed from its source (dequantized or quantized), not copied; a scale emitted counts as neither."""
        return self.op in ("dequant", "quant")


@dataclass(frozen=True)
class FilePlan:
    """One output shard: its name, its tensors in write order, its exact header bytes."""

    name: str
    tensors: tuple[TensorPlan, ...]
    header: bytes
    copy_of: str | None = None  # a source shard copied unchanged, byte for byte

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    kind: str  # "dequant", "split-mtp" or "quant"
    source: Path
    dest: Path
    files: list[FilePlan]
    index: dict | None  # the index JSON to write (None for a single-file output)
    config: dict | None
    config_changes: list[str]
    extra_files: list[str]
    dropped: list[str] = field(default_factory=list)  # source tensors not written (scales, MTP)
    out_dtype: str = ""

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)

    @property
    def bytes_in(self) -> int:
        return sum(t.source.nbytes + (t.scale.nbytes if t.scale else 0)
                   for f in self.files for t in f.tensors if t.op != "quant_scale")

    @property
    def converted(self) -> int:
        return sum(t.converts for f in self.files for t in f.tensors)

    @property
    def copied(self) -> int:
        return sum(t.op == "copy" for f in self.files for t in f.tensors)

    def summary(self) -> dict:
        return {
            "source": str(self.source), "output": str(self.dest), "shards": len(self.files),
            "tensors_converted": self.converted, "tensors_copied": self.copied, "tensors_dropped": len(self.dropped),
            "bytes_in": self.bytes_in, "bytes_out": sum(f.size for f in self.files), "total_size": self.total_size,
            "config_changes": self.config_changes, "extra_files": self.extra_files,
        }


def parse_part(text: str | None) -> tuple[int, int] | None:
    """'2/3' -> (2, 3): part 2 of 3 (1-based), as a job array index would give it."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(f"--part {text!r}: give K/N with 1 <= K <= N, e.g. --part 2/8")
    return int(m.group(1)), int(m.group(2))


def assign_parts(files: list[FilePlan], n_parts: int) -> list[int]:
    """Part (1-based) of each output file: largest first to the lightest part, so parts end together.

    Deterministic: every job of an array computes the same assignment from the same plan.
    """
    load = [0] * n_parts
    part = [0] * len(files)
    for i in sorted(range(len(files)), key=lambda i: (-files[i].size, files[i].name)):
        k = min(range(n_parts), key=lambda k: (load[k], k))
        part[i] = k + 1
        load[k] += files[i].size
    return part


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '4GiB', '123' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*", text.upper())
    if not m:
        raise UsageError(f"{option} {text!r}: give a size such as 5GB, 500MB or 4GiB")
    power = " KMGT".index(m.group(2) or " ")
    base = 1024 if m.group(3).startswith("I") else 1000
    return int(float(m.group(1)) * base**power)


# ------------------------------------------------------------------------------------------ dequant
def plan_dequant(
    ckpt: Checkpoint, dest: Path, *, out_dtype: str = "bfloat16", mtp: str = "keep", max_shard_size: int | None = None
) -> Plan:
    """Plan FP8 -> `out_dtype`: FP8 weights converted, scales dropped, everything else copied byte for byte."""
    if out_dtype not in OUT_DTYPES:
        raise UsageError(f"--dtype {out_dtype!r}: choose one of {', '.join(OUT_DTYPES)}")
    if mtp not in ("keep", "drop"):
        raise UsageError(f"--mtp {mtp!r}: choose keep or drop")
    check_dest(ckpt.root, dest)
    ckpt.require_clean()
    config = ckpt.require_config()
    cov = require_fp8_pairs(ckpt)
    mtp_ids = set(mtp_layer_ids(config))
    if mtp == "drop" and not mtp_ids:
        raise UsageError(
            f"--mtp drop: {ckpt.root / 'config.json'} declares no MTP layers (num_nextn_predict_layers is 0 or absent)"
        )
    _check_layers(ckpt, config)

    dtype = OUT_DTYPES[out_dtype]
    dropped: list[str] = []
    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in ckpt.shards.values():
        entries = []
        for entry in shard.header.tensors:
            info = ckpt.tensors[entry.name]
            if info.file != shard.name:
                continue
            if is_scale(info.name) or (mtp == "drop" and layer_id(info.name) in mtp_ids):
                dropped.append(info.name)
                continue
            if info.name in cov.pairs:
                scale = ckpt.tensors[cov.pairs[info.name]]
                entries.append(TensorPlan(info.name, info, scale, dtype, info.shape))
            else:
                entries.append(TensorPlan(info.name, info, None, info.dtype, info.shape))
        groups.append((shard.name, entries))
    if mtp == "drop":
        dropped += [n for n in ckpt.tensors if layer_id(n) in mtp_ids and n not in dropped]  # noqa: PERF401

    files = _shard(groups, max_shard_size)
    new_config = copy.deepcopy(config)
    changes = []
    if "quantization_config" in new_config:
        del new_config["quantization_config"]
        changes.append("removed quantization_config")
    for key in ("torch_dtype", "dtype"):
        if key == "torch_dtype" or key in new_config:
            if new_config.get(key) != out_dtype:
                changes.append(f"{key}: {new_config.get(key)!r} -> {out_dtype!r}")
            new_config[key] = out_dtype
    if mtp == "drop":
        changes.append(f"num_nextn_predict_layers: {config.get('num_nextn_predict_layers')} -> 0")
        new_config["num_nextn_predict_layers"] = 0
    return Plan(
        "dequant", ckpt.root, dest, files, _index(ckpt, files), new_config, changes, ckpt.extra_files(),
        sorted(set(dropped)), dtype,
    )


def require_fp8_pairs(ckpt: Checkpoint):
    """Every FP8 weight has a usable scale and every scale a weight, or the checkpoint is refused."""
    cov = fp8_coverage(ckpt.tensors)
    if cov.unscaled:
        name = cov.unscaled[0]
        raise Dsv3Error(
            f"tensor `{name}` is F8_E4M3 but `{name}_scale_inv` is missing from the index and from every shard"
            f"{_more(cov.unscaled)}; restore the missing shard or scale"
        )
    if cov.bad_scales:
        raise Dsv3Error(cov.bad_scales[0] + _more(cov.bad_scales))
    if cov.orphan_scales:
        name = cov.orphan_scales[0]
        raise Dsv3Error(f"tensor `{name}` is a scale without its F8_E4M3 weight{_more(cov.orphan_scales)}; the checkpoint is incomplete")
    return cov


def _check_layers(ckpt: Checkpoint, config: dict) -> None:
    """The config's layer counts must match the tensors, or MTP handling would be wrong."""
    ids = {layer_id(n) for n in ckpt.tensors} - {None}
    if not ids:
        return
    n_main, mtp_ids = int(config.get("num_hidden_layers", 0)), mtp_layer_ids(config)
    expected = set(range(n_main)) | set(mtp_ids)
    if ids != expected:
        extra, missing = sorted(ids - expected), sorted(expected - ids)
        raise Dsv3Error(
            f"{ckpt.root / 'config.json'}: num_hidden_layers={n_main}, num_nextn_predict_layers={len(mtp_ids)} "
            f"do not match the tensors (layers present but not declared: {extra[:5]}, declared but absent: {missing[:5]}); "
            "fix config.json"
        )


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _shard(groups: list[tuple[str, list[TensorPlan]]], max_shard_size: int | None) -> list[FilePlan]:
    """Keep the source's shard names (less emptied ones), or re-shard to at most `max_shard_size` bytes."""
    if max_shard_size is None:
        return [_file(name, entries) for name, entries in groups if entries]
    if max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    chunks: list[list[TensorPlan]] = [[]]
    size = 0
    for _, entries in groups:
        for t in entries:
            if chunks[-1] and size + t.nbytes > max_shard_size:
                chunks.append([])
                size = 0
            chunks[-1].append(t)
            size += t.nbytes
    n = len(chunks)
    return [_file(f"model-{k + 1:05d}-of-{n:05d}.safetensors", c) for k, c in enumerate(chunks)]


def _file(name: str, entries: list[TensorPlan], copy_of: str | None = None) -> FilePlan:
    header, _ = build_header([(t.name, t.dtype, t.shape) for t in entries], SHARD_METADATA)
    return FilePlan(name, tuple(entries), header, copy_of)


def _index(ckpt: Checkpoint, files: list[FilePlan]) -> dict:
    metadata = dict((ckpt.index or {}).get("metadata") or {})
    metadata["total_size"] = sum(t.nbytes for f in files for t in f.tensors)
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


