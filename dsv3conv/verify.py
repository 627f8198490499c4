"""`verify`: prove a checkpoint is whole, and that a converted one equals its dequantized source.

Checks of the checkpoint alone come from the index, the headers and config.json (files, headers, total_size,
config, layers, mtp, quantization_config, fp8_scales) and from the tensor data (values: no NaN or Inf, scales
finite and > 0). With a source (`against`), the tensor set, config.json and every compared tensor are held to
what `dequant` makes of that source: the same backend computes the expected bytes, which must match bit
for bit. A CKPT that `quant` made from a BF16/F16/F32 source is held to quant of it instead (verify_quant.py).

Data checks cover a deterministic sample of tensors by default (a hash of each name orders them; at least one
per dtype) or every tensor with `full`. Tensors are read in row chunks with pread by a reader thread into a
small pool of buffers, never a whole shard at once; the calling thread computes and compares.

With `part` (K/N, a job array index) the data checks cover only the tensors stored in the shards assigned to
part K (by size, the rule of plan.assign_parts); the header checks run in every part. `combine_reports`
merges the N part reports into one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import queue
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3conv.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    TensorInfo,
    read_into,
    require_dir,
)
from dsv3conv.dtypes import DTYPE_SIZES, FLOAT_DTYPES, OUT_DTYPES, TORCH_DTYPES
from dsv3conv.errors import Dsv3Error, HeaderError, UsageError
from dsv3conv.layout import (
    BLOCK,
    FP8_DTYPE,
    fp8_coverage,
    is_nextn_draft,
    is_scale,
    layer_id,
    mtp_layer_ids,
    scale_name,
    scale_shape,
)
from dsv3conv.ops import Copy, DequantBlockFp8, QuantBlockFp8, QuantScale
from dsv3conv.plan import assign_parts, parse_part
from dsv3conv.safetensors_format import read_header
from dsv3conv.verify_quant import QuantMatch, compare_quant, is_quant_output, match_quant
from dsv3conv.verify_quant import names as _names

DEFAULT_SAMPLE = 0.05
CHUNK_BYTES = 32 * 1024 * 1024
DEPTH = 3
MTP_MARKERS = (".enorm.", ".hnorm.", ".eh_proj.")  # tensors only an MTP layer holds

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bits that are all ones exactly when an IEEE value is Inf or NaN.
_EXPONENT_MASKS = {"BF16": 0x7F80, "F16": 0x7C00, "F32": 0x7F800000, "F64": 0x7FF0000000000000}
_DTYPE_NAMES = {FLOAT_DTYPES[n]: n for n in OUT_DTYPES}  # "BF16" -> "bfloat16": what dequant writes


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


# ---------------------------------------------------------------------------------------------- the API
def verify_checkpoint(
    ckpt_path: str | os.PathLike,
    against: str | os.PathLike | None = None,
    sample: float | None = None,
    full: bool = False,
    device: str = "cpu",
    progress: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    part: str | None = None,
) -> dict:
    """Check `ckpt_path` (and, with `against`, that it is what `dequant` makes of that FP8 source).

    `sample`: the fraction of tensors whose data is read (default 0.05); `full`: read every tensor.
    `part`: "K/N": read only the data of the shards assigned to part K of N (the header checks run whole).
    Returns `{"ok": bool, "checks": [{"name", "ok", "detail"}], "mismatches": [tensor names]}`, with `part`
    also `"part": "K/N"` and `"part_shards": [file names]`; problems in the data are reported there, never
    raised. Raises UsageError for impossible requests.
    """
    k_n = parse_part(part)
    if full and sample is not None:
        raise UsageError("--sample and --full exclude each other; pick one")
    fraction = None if full else (DEFAULT_SAMPLE if sample is None else float(sample))
    if fraction is not None and not 0 < fraction <= 1:
        raise UsageError(f"--sample {sample}: give a fraction of the tensors in (0, 1], such as 0.05, or --full")
    if chunk_bytes <= 0:
        raise UsageError("chunk_bytes must be positive")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r}: verify runs on one device: choose auto, cpu, cuda or cuda:N")
    root = require_dir(Path(ckpt_path), "CKPT")
    src_root = require_dir(Path(against), "--against") if against is not None else None

    try:
        ckpt = Checkpoint.open(root)
    except Dsv3Error as exc:
        return _result([Check("files", False, str(exc))], [], k_n, [])
    shards = part_shards(ckpt, *k_n) if k_n is not None else None
    checks = [_check_files(ckpt), _check_headers(ckpt), _check_total_size(ckpt)]
    checks += _check_config(ckpt)
    checks.append(_check_fp8_scales(ckpt))

    src: Checkpoint | None = None
    match: _Match | None = None
    qmatch: QuantMatch | None = None
    against_checks: list[Check] = []
    mismatches: set[str] = set()
    if src_root is not None:
        try:
            src = Checkpoint.open(src_root)
        except Dsv3Error as exc:
            against_checks.append(Check("source", False, str(exc)))
        if src is not None:
            against_checks.append(_check_source(src))
            if is_quant_output(ckpt, src):
                qmatch = match_quant(ckpt, src)
                mismatches |= set(qmatch.misformed)
                against_checks += _quant_checks(ckpt, qmatch)
            else:
                match = _match_tensors(ckpt, src)
                mismatches |= set(match.misformed)
                against_checks += [_check_tensor_set(match),
                                   _check_config_vs_source(ckpt, src, match.out_dtype, match.mtp_dropped)]
    if qmatch is not None:  # CKPT is a quant output: its data is held to quant of SRC (verify_quant.py)
        quant_check, differ = _quant_data_check(ckpt, src, qmatch, fraction, shards)
        mismatches |= differ
        src = None  # the scan below checks CKPT's values only

    expected = match.expected if match is not None else {}
    tasks = _tasks(ckpt, src, expected, fraction)
    if shards is not None:  # the sample is the whole run's, cut to this part: the parts add up to it
        in_part = set(shards)
        tasks = [t for t in tasks if t.info.file in in_part]
        expected = {n: e for n, e in expected.items() if ckpt.tensors[n].file in in_part}
    scan = _scan(ckpt, src, tasks, device if src is not None else None, chunk_bytes, progress)
    data_checks = [_values_check(scan, tasks, ckpt, fraction, shards)]
    if src is not None:
        data_checks.append(_data_check(scan, tasks, expected, fraction))
        mismatches |= set(scan.differs)
    if qmatch is not None:
        data_checks.append(quant_check)
    if k_n is not None:
        where = f" [part {k_n[0]}/{k_n[1]}: {len(shards)} of {len(_shard_files(ckpt))} shards]"
        data_checks = [Check(c.name, c.ok, c.detail + where) for c in data_checks]
    checks.append(data_checks[0])
    return _result(checks + against_checks + data_checks[1:], sorted(mismatches), k_n, shards)


def _result(checks: list[Check], mismatches: list[str], k_n: tuple[int, int] | None = None,
            shards: list[str] | None = None) -> dict:
    ok = all(c.ok for c in checks)
    report = {"ok": ok, "checks": [c.as_dict() for c in checks], "mismatches": mismatches}
    if k_n is not None:
        report["part"] = f"{k_n[0]}/{k_n[1]}"
        report["part_shards"] = list(shards or [])
    return report


# ------------------------------------------------------------------------------------ parts of a run
@dataclass(frozen=True)
class _SizedFile:
    """What plan.assign_parts reads of an output file: its name and size."""

    name: str
    size: int


def part_shards(ckpt: Checkpoint, k: int, n: int) -> list[str]:
    """The shard files of part `k` of `n`: largest first to the lightest part, ties by name (assign_parts)."""
    names = sorted(_shard_files(ckpt))
    sized = []
    for name in names:
        shard = ckpt.shards.get(name)
        path = ckpt.root / name
        size = shard.file_size if shard is not None else (path.stat().st_size if path.is_file() else 0)
        sized.append(_SizedFile(name, size))
    return [name for name, p in zip(names, assign_parts(sized, n)) if p == k]


def combine_reports(paths: list[str | os.PathLike]) -> dict:
    """Merge the JSON reports of `verify --part K/N` for K = 1..N into one report.

    Every part must be there exactly once, all of the same N. A check passes only if it passes in every part;
    mismatches are the union. Raises Dsv3Error (exit 1) for a missing, repeated or unreadable report.
    """
    if not paths:
        raise UsageError("verify-combine: give the JSON reports of `verify --part K/N --json`, one per part")
    by_part: dict[int, dict] = {}
    n_parts: int | None = None
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise Dsv3Error(f"{path}: not a JSON report ({exc}); save `verify --part K/N --json` output") from None
        if not isinstance(report, dict) or not isinstance(report.get("part"), str) or "checks" not in report:
            raise Dsv3Error(f"{path}: not the JSON report of `verify --part K/N --json`")
        try:
            k, n = parse_part(report["part"])
        except UsageError:
            raise Dsv3Error(f"{path}: part {report['part']!r} is not K/N") from None
        if n_parts is not None and n != n_parts:
            raise Dsv3Error(f"{path}: part {k}/{n}, but the other reports are parts of {n_parts}")
        n_parts = n
        if k in by_part:
            raise Dsv3Error(f"part {k}/{n} given twice ({by_part[k]['_path']} and {path}); give each part once")
        by_part[k] = {**report, "_path": str(path)}
    missing = [k for k in range(1, n_parts + 1) if k not in by_part]
    if missing:
        names = ", ".join(f"{k}/{n_parts}" for k in missing)
        raise Dsv3Error(f"no report for part {names}; run `verify --part K/N --json` for it and combine again")
    owner: dict[str, int] = {}
    for k in sorted(by_part):
        for shard in by_part[k].get("part_shards", []):
            if shard in owner:
                raise Dsv3Error(f"shard {shard} is in parts {owner[shard]}/{n_parts} and {k}/{n_parts}: "
                                "the reports are not of one checkpoint")
            owner[shard] = k

    order: list[str] = []
    per_name: dict[str, dict[int, dict]] = {}
    for k in sorted(by_part):
        for c in by_part[k]["checks"]:
            if c["name"] not in per_name:
                order.append(c["name"])
                per_name[c["name"]] = {}
            per_name[c["name"]][k] = c
    checks = []
    for name in order:
        got = per_name[name]
        absent = [k for k in sorted(by_part) if k not in got]
        ok = not absent and all(c["ok"] for c in got.values())
        details = {c["detail"] for c in got.values()}
        if len(details) == 1 and not absent:
            detail = details.pop()
        else:
            shown = [k for k in sorted(got) if ok or not got[k]["ok"]]
            detail = "; ".join(f"part {k}/{n_parts}: {got[k]['detail']}" for k in shown)
            detail += "".join(f"; part {k}/{n_parts}: not run" for k in absent)
        checks.append(Check(name, ok, detail.lstrip("; ")))
    mismatches = sorted({m for r in by_part.values() for m in r.get("mismatches", [])})
    report = _result(checks, mismatches)
    report["parts"] = n_parts
    return report


# ---------------------------------------------------------------------------- checks from headers only
def _shard_files(ckpt: Checkpoint) -> set[str]:
    """The shard files the checkpoint consists of: the index's, the single file, or the .safetensors found."""
    if ckpt.index is not None:
        return set(ckpt.index["weight_map"].values())
    if (ckpt.root / SINGLE_NAME).exists():
        return {SINGLE_NAME}
    return {p.name for p in ckpt.root.glob("*.safetensors")}


def _check_files(ckpt: Checkpoint) -> Check:
    """Index <-> shards: nothing missing, nothing extra, nothing stored twice or under another file."""
    problems: list[str] = []
    listed = _shard_files(ckpt)
    if ckpt.index is not None:
        weight_map: dict[str, str] = ckpt.index["weight_map"]
        problems += [f"{name} is listed in {INDEX_NAME} but missing"
                     for name in sorted(listed) if not (ckpt.root / name).is_file()]
        problems += [f"tensor `{n}` appears {k} times in {INDEX_NAME}" for n, k in _duplicate_index_keys(ckpt)]
        if not weight_map:
            problems.append(f"{INDEX_NAME}: `weight_map` is empty")
    elif SINGLE_NAME not in listed:
        problems.append(f"no {INDEX_NAME} and no {SINGLE_NAME}; {len(listed)} .safetensors files without an index")
    problems += [f"{name} is not listed in the index (a stray or leftover shard)"
                 for name in _safetensors_on_disk(ckpt.root) if name not in listed]

    owner: dict[str, str] = {}
    for shard in ckpt.shards.values():
        for entry in shard.header.tensors:
            if entry.name in owner:
                problems.append(
                    f"tensor `{entry.name}` is stored twice: in {owner[entry.name]} and in {shard.name}")
            else:
                owner[entry.name] = shard.name
    if ckpt.index is not None:
        for tensor, file in weight_map.items():
            if file not in ckpt.shards:
                continue  # the missing or damaged file is reported on its own
            listed_as = f"tensor `{tensor}` is listed in the index under {file}"
            if tensor not in owner:
                problems.append(f"{listed_as} but absent from every shard")
            elif owner[tensor] != file:
                problems.append(f"{listed_as} but stored in {owner[tensor]}")
        problems += [f"tensor `{t}` is stored in {f} but missing from the index"
                     for t, f in owner.items() if t not in weight_map]
    if problems:
        return Check("files", False, _join(problems))
    if ckpt.index is None:
        return Check("files", True, f"{SINGLE_NAME}: {len(ckpt.tensors):,} tensors, no other shards")
    return Check("files", True,
                 f"{len(listed)} shard files, {len(ckpt.tensors):,} tensors; index and shards agree")


def _duplicate_index_keys(ckpt: Checkpoint) -> list[tuple[str, int]]:
    """Tensor names given more than once in the index's weight_map (json.loads keeps only the last)."""
    seen: list[Counter] = []

    def hook(pairs):
        seen.append(Counter(k for k, _ in pairs))
        return dict(pairs)

    try:
        json.loads((ckpt.root / INDEX_NAME).read_text(encoding="utf-8"), object_pairs_hook=hook)
    except (OSError, ValueError):
        return []
    weight_map_keys = set(ckpt.index["weight_map"]) if ckpt.index else set()
    out = []
    for counts in seen:
        if set(counts) == weight_map_keys:
            out += [(n, k) for n, k in sorted(counts.items()) if k > 1]
    return out


def _safetensors_on_disk(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.safetensors")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(".") and "/." not in rel:
            out.append(rel)
    return out


def _check_headers(ckpt: Checkpoint) -> Check:
    """Every present shard has a valid header and exactly the size its header describes."""
    problems = []
    for name in sorted(_shard_files(ckpt)):
        path = ckpt.root / name
        if name in ckpt.shards or not path.is_file():
            continue  # valid, or missing (reported under files)
        try:
            read_header(path)
        except HeaderError as exc:
            problems.append(str(exc))
    if problems:
        return Check("headers", False, _join(problems))
    size = sum(s.file_size for s in ckpt.shards.values())
    return Check("headers", True,
                 f"{len(ckpt.shards)} headers valid; file sizes match the headers ({size:,} bytes)")


def _check_total_size(ckpt: Checkpoint) -> Check:
    actual = ckpt.tensor_bytes()
    if ckpt.index is None:
        return Check("total_size", True, f"single file, no index; {actual:,} tensor bytes")
    total = (ckpt.index.get("metadata") or {}).get("total_size")
    if total is None:
        return Check("total_size", False,
                     f"{INDEX_NAME} has no metadata.total_size; the tensors hold {actual:,} bytes")
    if not isinstance(total, int) or isinstance(total, bool) or total != actual:
        return Check("total_size", False,
                     f"{INDEX_NAME} metadata.total_size is {total!r} but the shards' tensors hold {actual:,} bytes")
    return Check("total_size", True, f"{total:,} bytes, the sum of the tensors")


def _check_config(ckpt: Checkpoint) -> list[Check]:
    """config.json against the tensors: layer count, MTP layers, quantization_config."""
    path = ckpt.root / CONFIG_NAME
    config = ckpt.config
    if config is None:
        why = next((p for p in ckpt.problems if p.startswith(str(path))), f"{path}: missing or unreadable")
        return [Check("config", False, why)] + [
            Check(n, False, f"not checked: {why}") for n in ("layers", "mtp", "quantization_config")]
    checks = [Check("config", True, f"{path.name}: model_type {config.get('model_type')!r}")]

    ids = {i for i in map(layer_id, ckpt.tensors) if i is not None}
    n_main = config.get("num_hidden_layers")
    mtp_ids = _mtp_ids(config)
    if not isinstance(n_main, int) or isinstance(n_main, bool) or n_main < 0:
        checks.append(Check("layers", False, f"{path}: num_hidden_layers is {n_main!r}, not a layer count"))
    else:
        missing = sorted(set(range(n_main)) - ids)
        undeclared = sorted(ids - set(range(n_main)) - set(mtp_ids))
        if missing or undeclared:
            parts = [f"{path}: num_hidden_layers={n_main}"]
            if missing:
                parts.append(f"no tensors for main layers {_ids(missing)}")
            if undeclared:
                parts.append(f"layers {_ids(undeclared)} hold tensors but are not declared (main or MTP)")
            parts.append("fix config.json or restore the missing shards")
            checks.append(Check("layers", False, "; ".join(parts)))
        else:
            present = f": main layers 0..{n_main - 1} present" if n_main else ""
            checks.append(Check("layers", True, f"num_hidden_layers={n_main}{present}"))

    n_mtp = config.get("num_nextn_predict_layers", 0) or 0
    problems = []
    if not isinstance(n_mtp, int) or isinstance(n_mtp, bool) or n_mtp < 0:
        problems.append(f"num_nextn_predict_layers is {n_mtp!r}, not a layer count")
    absent = [i for i in mtp_ids if i not in ids]
    if absent:
        problems.append(f"num_nextn_predict_layers={n_mtp} declares MTP layers {_ids(mtp_ids)} but there are "
                        f"no tensors for {_ids(absent)}")
    marked = sorted({layer_id(n) for n in ckpt.tensors if any(m in n for m in MTP_MARKERS)} - {None})
    if marked and not is_nextn_draft(config) and marked != [i for i in mtp_ids if i in ids]:
        problems.append(f"layers {_ids(marked)} hold MTP tensors (enorm/hnorm/eh_proj) but the MTP layers "
                        f"declared are {_ids(mtp_ids) or 'none'}")
    if problems:
        checks.append(Check("mtp", False, f"{path}: " + "; ".join(problems) + "; fix config.json"))
    elif mtp_ids:
        layers = "layers" if len(mtp_ids) > 1 else "layer"
        checks.append(Check("mtp", True,
                            f"num_nextn_predict_layers={n_mtp}: MTP {layers} {_ids(mtp_ids)} present"))
    else:
        checks.append(Check("mtp", True, "no MTP layers declared, none present"))

    has_fp8 = any(t.dtype == FP8_DTYPE and not is_scale(n) for n, t in ckpt.tensors.items())
    has_qc = bool(config.get("quantization_config"))
    if has_fp8 and not has_qc:
        checks.append(Check("quantization_config", False,
                            f"{path}: F8_E4M3 tensors present but no quantization_config; loaders would read "
                            "them as plain weights"))
    elif has_qc and not has_fp8:
        checks.append(Check("quantization_config", False,
                            f"{path}: quantization_config present but no F8_E4M3 tensors; loaders would try to load "
                            "the weights as FP8 and fail: remove it"))
    else:
        checks.append(Check("quantization_config", True,
                            "present, FP8 tensors present" if has_fp8 else "absent, no FP8 tensors"))
    return checks


def _mtp_ids(config: dict) -> list[int]:
    """MTP layer ids as the config declares them; none where the counts are not integers."""
    try:
        return mtp_layer_ids(config)
    except (TypeError, ValueError):
        return []


def _check_fp8_scales(ckpt: Checkpoint) -> Check:
    cov = fp8_coverage(ckpt.tensors)
    problems = [f"tensor `{n}` is F8_E4M3 but `{scale_name(n)}` is missing" for n in cov.unscaled]
    problems += cov.bad_scales
    problems += [f"tensor `{n}` is a scale without its F8_E4M3 weight" for n in cov.orphan_scales]
    if problems:
        return Check("fp8_scales", False, _join(problems))
    if not cov.pairs:
        return Check("fp8_scales", True, "no FP8 weights, no scales")
    return Check("fp8_scales", True,
                 f"{len(cov.pairs):,} FP8 weights, each with a scale of [ceil(M/{BLOCK}), ceil(N/{BLOCK})]")


# ------------------------------------------------------------------------ checks against the source
@dataclass(frozen=True)
class _Expect:
    """What one tensor of CKPT must equal: a source tensor, dequantized with `scale` or copied."""

    source: TensorInfo
    scale: TensorInfo | None


def _check_source(src: Checkpoint) -> Check:
    problems = list(src.problems)
    cov = fp8_coverage(src.tensors)
    problems += [f"tensor `{n}` is F8_E4M3 but `{scale_name(n)}` is missing" for n in cov.unscaled]
    problems += cov.bad_scales
    if problems:
        return Check("source", False, f"{src.root}: " + _join(problems))
    return Check("source", True,
                 f"{src.root}: {len(src.tensors):,} tensors, {len(cov.pairs):,} FP8 weights with scales")


@dataclass
class _Match:
    """CKPT's tensors held to what dequant makes of the source."""

    expected: dict[str, _Expect]  # present with the right dtype and shape: compared
    missing: list[str]
    extra: list[str]
    misformed: dict[str, str]  # name -> what is wrong with its dtype or shape
    out_dtype: str | None  # dtype of the dequantized tensors ("BF16")
    mtp_dropped: bool
    dropped: int  # source tensors dequant leaves out


def _match_tensors(ckpt: Checkpoint, src: Checkpoint) -> _Match:
    """The names dequant keeps (scales dropped, MTP dropped when CKPT's config says so, or when CKPT has no
    config and no MTP tensors), each with the dtype and shape dequant gives it."""
    pairs = fp8_coverage(src.tensors).pairs
    src_mtp = set(_mtp_ids(src.config or {}))
    if ckpt.config is not None and "num_nextn_predict_layers" in ckpt.config:
        mtp_dropped = bool(src_mtp) and not ckpt.config.get("num_nextn_predict_layers")
    else:
        mtp_dropped = bool(src_mtp) and not any(layer_id(n) in src_mtp for n in ckpt.tensors)
    want = {n for n in src.tensors if not is_scale(n) and not (mtp_dropped and layer_id(n) in src_mtp)}
    converted_dtypes = Counter(ckpt.tensors[n].dtype for n in pairs if n in ckpt.tensors)
    out_dtype = converted_dtypes.most_common(1)[0][0] if converted_dtypes else None
    expected, misformed = {}, {}
    for name in sorted(want & set(ckpt.tensors)):
        got, source = ckpt.tensors[name], src.tensors[name]
        scale = src.tensors[pairs[name]] if name in pairs else None
        if scale is not None and not _usable_pair(source, scale):
            continue  # the source check reports it; there is nothing to compare with
        if scale is not None:
            ok_dtype = got.dtype in _DTYPE_NAMES and got.dtype == out_dtype
            want_dtype = out_dtype if out_dtype in _DTYPE_NAMES else "BF16, F16 or F32"
        else:
            ok_dtype, want_dtype = got.dtype == source.dtype, source.dtype
        if ok_dtype and got.shape == source.shape:
            expected[name] = _Expect(source, scale)
        else:
            misformed[name] = (f"tensor `{name}` is {got.dtype} {list(got.shape)} but the source's "
                               f"{source.dtype} {list(source.shape)} makes {want_dtype} {list(source.shape)}")
    return _Match(expected, sorted(want - set(ckpt.tensors)), sorted(set(ckpt.tensors) - want), misformed,
                  out_dtype, mtp_dropped, len(src.tensors) - len(want))


def _usable_pair(weight: TensorInfo, scale: TensorInfo) -> bool:
    return (len(weight.shape) == 2 and scale.shape == scale_shape(weight.shape)
            and scale.dtype in TORCH_DTYPES and scale.dtype != FP8_DTYPE)


def _check_tensor_set(m: _Match) -> Check:
    problems = []
    if m.extra:
        problems.append(f"not made from the source: {_names(m.extra)}")
    if m.missing:
        problems.append(f"missing from CKPT: {_names(m.missing)}")
    problems += m.misformed.values()
    if problems:
        return Check("tensor_set", False, _join(problems))
    n_conv = sum(e.scale is not None for e in m.expected.values())
    to = f" to {m.out_dtype}" if m.out_dtype else ""
    why = "scales and the MTP layers" if m.mtp_dropped else "scales"
    return Check("tensor_set", True, f"{len(m.expected):,} tensors as expected: {n_conv:,} dequantized{to}, "
                 f"{len(m.expected) - n_conv:,} copied; {m.dropped:,} dropped ({why})")


def _check_config_vs_source(
    ckpt: Checkpoint, src: Checkpoint, out_dtype: str | None, mtp_dropped: bool
) -> Check:
    """config.json must be the source's with exactly dequant's changes (see plan.plan_dequant)."""
    if ckpt.config is None or src.config is None:
        which = ckpt.root if ckpt.config is None else src.root
        return Check("config_vs_source", False, f"{which / CONFIG_NAME}: missing or unreadable")
    dtype_name = _DTYPE_NAMES.get(out_dtype or "") or ckpt.config.get("torch_dtype")
    want = copy.deepcopy(src.config)
    want.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key == "torch_dtype" or key in want:
            want[key] = dtype_name
    if mtp_dropped:
        want["num_nextn_predict_layers"] = 0
    diffs = _config_diffs(want, ckpt.config)
    if diffs:
        return Check("config_vs_source", False, f"{ckpt.root / CONFIG_NAME}: " + _join(diffs))
    return Check("config_vs_source", True, "the source's config with only dequant's changes"
                 + f" (quantization_config removed, torch_dtype {dtype_name!r}"
                 + (", num_nextn_predict_layers 0)" if mtp_dropped else ")"))


def _config_diffs(want: dict, got: dict, prefix: str = "") -> list[str]:
    """One line per differing key; nested objects (quantization_config) key by key."""
    missing = object()
    diffs = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key, missing), got.get(key, missing)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diffs(a, b, f"{prefix}{key}.")
            continue
        shown_a = "absent" if a is missing else _short_json(a)
        shown_b = "absent" if b is missing else _short_json(b)
        diffs.append(f"`{prefix}{key}`: expected {shown_a}, found {shown_b}")
    return diffs


def _quant_checks(ckpt: Checkpoint, m: QuantMatch) -> list[Check]:
    """tensor_set and config_vs_source of a quant output (verify_quant.match_quant)."""
    if m.error:
        return [Check("tensor_set", False, m.error), Check("config_vs_source", False, m.error)]
    if m.problems:
        tensor_set = Check("tensor_set", False, _join(m.problems))
    else:
        n_quant = sum(isinstance(t.op, QuantBlockFp8) for t in m.planned.values())
        n_copy = sum(isinstance(t.op, Copy) for t in m.planned.values())
        tensor_set = Check("tensor_set", True, f"{len(m.planned):,} tensors as quant of the source makes them "
                           f"({m.settings}): {n_quant:,} quantized, each with its scale, {n_copy:,} copied")
    if ckpt.config is None:
        config = Check("config_vs_source", False, f"{ckpt.root / CONFIG_NAME}: missing or unreadable")
    else:
        diffs = _config_diffs(m.config or {}, ckpt.config)
        config = (Check("config_vs_source", False, f"{ckpt.root / CONFIG_NAME}: " + _join(diffs)) if diffs else
                  Check("config_vs_source", True, "the source's config with only quant's changes "
                        "(quantization_config added, torch_dtype 'bfloat16')"))
    return [tensor_set, config]


def _quant_data_check(ckpt: Checkpoint, src: Checkpoint, m: QuantMatch, fraction: float | None,
                      shards: list[str] | None) -> tuple[Check, set[str]]:
    """data_vs_source of a quant output: a sample (or all) of the weights quantized again and compared."""
    pool = [n for n, t in m.planned.items() if not isinstance(t.op, QuantScale)
            and (shards is None or ckpt.tensors[n].file in shards)]
    names = sorted(_choose(pool, lambda n: (type(m.planned[n].op).__name__, ckpt.tensors[n].dtype), fraction),
                   key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].offset))
    if m.error:
        return Check("data_vs_source", False, f"not compared: {m.error}"), set()
    result = compare_quant(ckpt, src, m.planned, names)
    if result.differ:
        lines = [f"tensor `{n}` ({ckpt.tensors[n].file}): {what}" for n, what in result.differ.items()]
        head = f"{len(lines):,} of the {len(names):,} compared tensors differ: "
        return Check("data_vs_source", False, head + "; ".join(lines[:20])), set(result.differ)
    total = len(pool)
    scope = f"{len(names):,} of {total:,}" if fraction is not None else f"all {len(names):,}"
    return Check("data_vs_source", True, f"{scope} tensors bit-identical to quant of the source "
                 f"({result.quantized:,} quantized again on cpu, e4m3 codes and scales; {result.copied:,} copied)"), set()


# ---------------------------------------------------------------------------------- the data scan
@dataclass(frozen=True)
class _Task:
    """One tensor whose data is read: value-checked, and compared when `expect` is set."""

    info: TensorInfo
    expect: _Expect | None
    sampled: bool  # False for scales, which are always checked


@dataclass
class _TensorResult:
    bad_values: int = 0
    bad_first: int = -1
    bad_kind: str = ""
    differ: int = 0
    max_diff: float = 0.0
    diff_first: int = -1
    error: str = ""


@dataclass
class _Scan:
    results: dict[str, _TensorResult] = field(default_factory=dict)
    differs: list[str] = field(default_factory=list)
    device: str = ""


def _tasks(
    ckpt: Checkpoint, src: Checkpoint | None, expected: dict[str, _Expect], fraction: float | None
) -> list[_Task]:
    pool = [n for n in ckpt.tensors if not is_scale(n)]
    if src is not None:
        def group(n: str) -> tuple:
            e = expected.get(n)
            return ckpt.tensors[n].dtype, None if e is None else e.scale is not None
    else:
        def group(n: str) -> tuple:
            return (ckpt.tensors[n].dtype,)
    chosen = set(_choose(pool, group, fraction))
    tasks = [_Task(ckpt.tensors[n], expected.get(n), True) for n in chosen]
    tasks += [_Task(t, expected.get(n), False) for n, t in ckpt.tensors.items() if is_scale(n)]
    tasks.sort(key=lambda t: (t.info.file, t.info.offset))  # read each shard front to back
    return tasks


def _choose(names: list[str], group: Callable[[str], object], fraction: float | None) -> list[str]:
    """Deterministic sample: names in the order of a hash of each name, the first ceil(fraction * n), then
    the first of every group (dtype, ...) not yet represented. `fraction` None: every name."""
    if fraction is None:
        return list(names)
    order = sorted(names, key=lambda n: hashlib.blake2b(n.encode(), digest_size=8).digest())
    k = math.ceil(fraction * len(order))
    chosen = order[:k]
    seen = {group(n) for n in chosen}
    for n in order[k:]:
        g = group(n)
        if g not in seen:
            seen.add(g)
            chosen.append(n)
    return chosen


def _pieces(task: _Task, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(first element, elements) of the chunks of one tensor; dequantized ones in 128-row multiples."""
    info = task.info
    if info.numel == 0:
        return
    if task.expect is not None and task.expect.scale is not None:
        rows, cols = info.shape
        rows_per = max(BLOCK, (chunk_bytes // max(cols * info.itemsize, 1)) // BLOCK * BLOCK)
        for r0 in range(0, rows, rows_per):
            yield r0 * cols, min(rows_per, rows - r0) * cols
        return
    per = max(1, chunk_bytes // info.itemsize)
    for e0 in range(0, info.numel, per):
        yield e0, min(per, info.numel - e0)


def _scan(ckpt: Checkpoint, src: Checkpoint | None, tasks: list[_Task], device: str | None,
          chunk_bytes: int, progress: bool) -> _Scan:
    """Read every task's data once (CKPT and, when compared, the source), check values, compare."""
    from dsv3conv.backend import Item, convert, make_backend  # imports the kernels: only when needed

    scan = _Scan(results={t.info.name: _TensorResult() for t in tasks})
    backend = None
    if any(t.expect is not None and t.expect.scale is not None for t in tasks):
        backend = make_backend(device or "cpu")
        scan.device = backend.name
    pin = bool(getattr(backend, "pin_memory", False))

    def piece_bytes(t: _Task, n: int) -> tuple[int, int]:
        src_n = n * t.expect.source.itemsize if t.expect is not None else 0
        return src_n, n * t.info.itemsize

    largest = max((sum(piece_bytes(t, n)) for t in tasks for _, n in _pieces(t, chunk_bytes)), default=0)
    buf_bytes = _align(largest) + 64
    total = sum(sum(piece_bytes(t, n)) for t in tasks for _, n in _pieces(t, chunk_bytes))
    pool: queue.Queue[torch.Tensor] = queue.Queue()
    for _ in range(DEPTH + 1 if tasks else 0):
        pool.put(torch.empty(buf_bytes, dtype=torch.uint8, pin_memory=pin))
    work: queue.Queue = queue.Queue(maxsize=DEPTH)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                work.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def take_buffer() -> torch.Tensor | None:
        while not stop.is_set():
            try:
                return pool.get(timeout=0.1)
            except queue.Empty:
                pass
        return None

    def reader() -> None:
        files = _Files()
        try:
            for k, t in enumerate(tasks):
                full_scale = None
                for e0, n in _pieces(t, chunk_bytes):
                    buf = take_buffer()
                    if buf is None:
                        return
                    src_n, out_n = piece_bytes(t, n)
                    out_at = _align(src_n)
                    try:
                        view = memoryview(buf.numpy())
                        files.read(ckpt.root, t.info, e0 * t.info.itemsize, view[out_at : out_at + out_n])
                        sc = None
                        if t.expect is not None:
                            files.read(src.root, t.expect.source, e0 * t.expect.source.itemsize, view[:src_n])
                            if t.expect.scale is not None:
                                if full_scale is None:
                                    full_scale = _read_scale(src.root, t.expect.scale, files)
                                cols = t.info.shape[1]
                                r0, rows = e0 // cols, n // cols
                                sc = full_scale[r0 // BLOCK : -(-(r0 + rows) // BLOCK)].contiguous()
                    except (Dsv3Error, OSError) as exc:
                        pool.put(buf)
                        put(("error", k, str(exc)))
                        break
                    put(("piece", k, e0, n, buf, src_n, out_at, out_n, sc))
            put(None)
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            put(("fatal", exc))
        finally:
            files.close()

    thread = threading.Thread(target=reader, name="dsv3conv-verify-reader", daemon=True)
    bar = _Progress(total, len(tasks), progress)
    try:
        thread.start()
        while True:
            msg = work.get()
            if msg is None:
                break
            if msg[0] == "fatal":
                raise msg[1]
            if msg[0] == "error":
                _, k, text = msg
                scan.results[tasks[k].info.name].error = text
                continue
            _, k, e0, n, buf, src_n, out_at, out_n, sc = msg
            t = tasks[k]
            try:
                got = buf[out_at : out_at + out_n]
                res = scan.results[t.info.name]
                _check_values(got, t.info, e0, res)
                if t.expect is not None:
                    if sc is not None:
                        cols = t.info.shape[1]
                        item = Item(DequantBlockFp8(t.expect.scale.dtype), 0, src_n, n // cols, cols, "F8_E4M3",
                                    t.info.dtype, sc, t.info.name)
                        want = torch.frombuffer(convert(backend, buf[:src_n], [item])[0], dtype=torch.uint8)
                    else:
                        want = buf[:src_n]
                    _compare(want, got, t.info, e0, res)
            finally:
                pool.put(buf)
            bar.advance(src_n + out_n, k)
    finally:
        stop.set()
        thread.join()
        bar.close()
    scan.differs = sorted(n for n, r in scan.results.items() if r.differ)
    return scan


class _Files:
    """Open shard files, kept for reuse; at most a few dozen at once."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}

    def read(self, root: Path, info: TensorInfo, start: int, view: memoryview) -> None:
        path = root / info.file
        f = self._open.get(path)
        if f is None:
            if len(self._open) >= 32:
                self.close()
            f = self._open[path] = open(path, "rb", buffering=0)  # noqa: SIM115  (kept open for reuse)
        read_into(f, info.offset + start, view, path)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _read_scale(root: Path, info: TensorInfo, files: _Files) -> torch.Tensor:
    """A whole scale tensor as float32, the way dequant reads it."""
    buf = bytearray(info.nbytes)
    files.read(root, info, 0, memoryview(buf))
    raw = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    return raw.view(TORCH_DTYPES[info.dtype]).view(info.shape).to(torch.float32)


def _align(n: int) -> int:
    return -(-n // 64) * 64


def _bad_mask(raw: torch.Tensor, dtype: str, scale: bool) -> torch.Tensor | None:
    """Which elements of `raw` (bytes of `dtype`) are NaN or Inf (for scales also <= 0); None: not checked."""
    if dtype in _EXPONENT_MASKS:
        bits = raw.view(_INT_OF_SIZE[DTYPE_SIZES[dtype]])
        m = _EXPONENT_MASKS[dtype]
        bad = (bits & m) == m
        return bad | (bits <= 0) if scale else bad  # sign bit set or +0.0: not a positive scale
    if dtype == "F8_E4M3":
        bad = (raw & 0x7F) == 0x7F  # 0x7F / 0xFF are NaN; e4m3fn has no Inf
    elif dtype == "F8_E5M2":
        bad = (raw & 0x7C) == 0x7C  # exponent all ones: Inf or NaN
    elif dtype == "F8_E8M0":
        return raw == 0xFF  # NaN; every other code is a power of two > 0
    else:
        return None
    return bad | ((raw & 0x7F) == 0) | (raw >= 0x80) if scale else bad



def _maybe_bad(raw: torch.Tensor, dtype: str) -> bool:
    """A fast test that is never wrong when it says False: a NaN or Inf makes the sum NaN or Inf."""
    if dtype in _EXPONENT_MASKS:
        return not bool(torch.isfinite(raw.view(TORCH_DTYPES[dtype]).sum()))
    if dtype == "F8_E4M3":
        return int((raw | 0x80).max()) == 0xFF
    return True


def _check_values(raw: torch.Tensor, info: TensorInfo, e0: int, res: _TensorResult) -> None:
    scale = is_scale(info.name)
    if raw.numel() == 0 or (not scale and not _maybe_bad(raw, info.dtype)):
        return
    bad = _bad_mask(raw, info.dtype, scale)
    if bad is None:
        return
    count = int(bad.sum())
    if count:
        if res.bad_first < 0:
            res.bad_first = e0 + int(bad.nonzero()[0, 0])
            values = raw.view(TORCH_DTYPES[info.dtype])[bad].to(torch.float32)
            kinds = ("NaN", values.isnan()), ("Inf", values.isinf())
            res.bad_kind = next((k for k, hit in kinds if bool(hit.any())), "<= 0")
        res.bad_values += count


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality, 8 bytes at a time where the buffers allow."""
    if a.numel() != b.numel():
        return False
    n8 = a.numel() // 8 * 8
    try:
        head = torch.equal(a[:n8].view(torch.int64), b[:n8].view(torch.int64))
    except RuntimeError:  # not 8-byte aligned
        return torch.equal(a, b)
    return head and torch.equal(a[n8:], b[n8:])


def _compare(want: torch.Tensor, got: torch.Tensor, info: TensorInfo, e0: int, res: _TensorResult) -> None:
    if _same(want, got):
        return
    isize = info.itemsize
    w_bits, g_bits = want.view(_INT_OF_SIZE[isize]), got.view(_INT_OF_SIZE[isize])
    differ = w_bits != g_bits
    count = int(differ.sum())
    if res.diff_first < 0:
        res.diff_first = e0 + int(differ.nonzero()[0, 0])
    res.differ += count
    if info.dtype in TORCH_DTYPES:
        a = want.view(TORCH_DTYPES[info.dtype])[differ].to(torch.float64)
        b = got.view(TORCH_DTYPES[info.dtype])[differ].to(torch.float64)
    else:
        a, b = w_bits[differ].to(torch.float64), g_bits[differ].to(torch.float64)
    diff = torch.nan_to_num((a - b).abs(), nan=math.inf)  # a NaN on either side counts as infinitely far
    res.max_diff = max(res.max_diff, float(diff.max()))


def _values_check(scan: _Scan, tasks: list[_Task], ckpt: Checkpoint, fraction: float | None,
                  shards: list[str] | None = None) -> Check:
    problems = []
    for t in tasks:
        r = scan.results[t.info.name]
        if r.error:
            problems.append(f"tensor `{t.info.name}`: {r.error}")
        elif r.bad_values:
            what = "values that are not finite and > 0" if is_scale(t.info.name) else "NaN or Inf values"
            problems.append(f"tensor `{t.info.name}` ({t.info.dtype}, {t.info.file}) has {r.bad_values:,} "
                            f"{what} ({r.bad_kind} first at {_where(r.bad_first, t.info.shape)})")
    sampled = sum(t.sampled for t in tasks)
    scales = len(tasks) - sampled
    others = sum(not is_scale(n) and (shards is None or t.file in shards) for n, t in ckpt.tensors.items())
    what = f"{sampled:,} of {others:,} tensors" if fraction is not None else f"all {others:,} tensors"
    if scales:
        what += f" and all {scales:,} scales"
    if problems:
        return Check("values", False, _join(problems, limit=20))
    return Check("values", True, f"{what} read: no NaN or Inf" + ("; scales finite and > 0" if scales else "")
                 + (f" (sample {fraction:g}, at least one tensor per dtype)" if fraction is not None else ""))


def _data_check(
    scan: _Scan, tasks: list[_Task], expected: dict[str, _Expect], fraction: float | None
) -> Check:
    compared = [t for t in tasks if t.expect is not None]
    n_conv = sum(t.expect.scale is not None for t in compared)
    lines = []
    for t in compared:
        r = scan.results[t.info.name]
        if r.error:
            lines.append(f"tensor `{t.info.name}`: not compared: {r.error}")
        elif r.differ:
            lines.append(
                f"tensor `{t.info.name}` ({t.info.file}): {r.differ:,} of {t.info.numel:,} elements differ "
                f"from the {'dequantized' if t.expect.scale is not None else 'copied'} source, largest "
                f"difference {_fmt_diff(r.max_diff)} (first at {_where(r.diff_first, t.info.shape)})")
    scope = f"{len(compared):,} of {len(expected):,}" if fraction is not None else f"all {len(compared):,}"
    how = f"{n_conv:,} dequantized on {scan.device}, {len(compared) - n_conv:,} copied" if n_conv else "copied"
    if lines:
        head = f"{len(lines):,} of the {len(compared):,} compared tensors differ: "
        return Check("data_vs_source", False, head + "; ".join(lines))
    return Check("data_vs_source", True, f"{scope} tensors bit-identical to the source ({how})")


# ------------------------------------------------------------------------------------------- helpers
class _Progress:
    """Bytes read, throughput and ETA on stderr."""

    def __init__(self, total: int, n_tensors: int, enabled: bool):
        from dsv3conv.progress import ByteProgress

        self.n = n_tensors
        self._p = ByteProgress(total, "verify", enabled=enabled).__enter__()

    def advance(self, nbytes: int, k: int) -> None:
        self._p.advance(nbytes, f"{k + 1}/{self.n} tensors")

    def close(self) -> None:
        self._p.close()


def _where(flat: int, shape: tuple[int, ...]) -> str:
    idx = []
    for dim in reversed(shape):
        idx.append(flat % dim if dim else 0)
        flat //= dim if dim else 1
    return "[" + ", ".join(map(str, reversed(idx))) + "]"


def _fmt_diff(x: float) -> str:
    return "inf (NaN or Inf on one side)" if math.isinf(x) else f"{x:.6g}"


def _short_json(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(problems: list[str], limit: int = 10) -> str:
    text = "; ".join(problems[:limit])
    return text + (f" (and {len(problems) - limit:,} more problems)" if len(problems) > limit else "")


def _ids(ids: list[int]) -> str:
    if not ids:
        return "none"
    parts, start, prev = [], ids[0], ids[0]
    for i in [*ids[1:], None]:
        if i is None or i != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = i
        prev = i if i is not None else prev
    return ", ".join(parts)
