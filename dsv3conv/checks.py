"""What can be wrong with a checkpoint, from its index, headers and config.json: each check written once.

Every function returns `Problem` records (code, subject, one-line message, fix). The reader
(`Checkpoint.open`) records what it finds while opening; these functions add the checks that need the whole
tensor set. `inspect` lists them all, `verify` groups them into its named checks, and the planners refuse a
checkpoint with FP8-pair or layer problems before anything is written. Reads headers only; nothing here
imports the runner, the engine or the command line.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

from dsv3conv.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, TensorInfo
from dsv3conv.errors import Problem, counted
from dsv3conv.formats import Formats, check_config, classify
from dsv3conv.layout import is_nextn_draft, layer_id, mtp_layer_ids
from dsv3conv.layout_v4 import is_v4_names, mtp_module_id, v4_layout

MTP_MARKERS = (".enorm.", ".hnorm.", ".eh_proj.")  # tensors only an MTP layer holds
_MTP_MARKED = re.compile("|".join(map(re.escape, MTP_MARKERS)))  # one search per name, not three


# ------------------------------------------------------------------------------------------ FP8 pairs
def fp8_problems(tensors: Mapping[str, TensorInfo], formats: Formats | None = None) -> list[Problem]:
    """Every quantized weight (block FP8 in any scale naming, packed FP4) has a usable scale, every scale
    its weight, every one-byte weight is one of them (`formats.classify`, without the config cross-check)."""
    formats = formats if formats is not None else classify(tensors)
    unscaled, orphans = set(formats.unscaled), set(formats.orphan_scales)
    out = []
    for text in formats.problems:
        subject = text.split("`")[1] if "`" in text else ""
        code = "fp8-unscaled" if subject in unscaled else "fp8-orphan-scale" if subject in orphans else "fp8-bad-scale"
        out.append(Problem(code, subject, text))
    return out


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def formats_of(ckpt: Checkpoint) -> Formats:
    """`formats.classify` of an opened checkpoint's tensors, once per checkpoint (verify asks several times)."""
    formats = _FORMATS.get(ckpt)
    if formats is None:
        formats = _FORMATS[ckpt] = classify(ckpt.tensors, unread=ckpt.unread)
    return formats


def scale_tensors(formats: Formats) -> set[str]:
    """The names of the scales: those of quantized weights, and scales without their weight."""
    return {f.name for f in formats.of_kind("scale")} | set(formats.orphan_scales)


def quantized(formats: Formats) -> list[str]:
    """The quantized weights: block FP8 and packed FP4."""
    return [f.name for f in formats.tensors.values() if f.kind in ("fp8_block", "mxfp4")]


# ---------------------------------------------------------------------------------- layers and MTP
def layer_problems(tensors: Mapping[str, TensorInfo], config: Mapping, config_path: Path | str) -> list[Problem]:
    """The layers present are exactly the main layers and MTP layers config.json declares (codes `layers`, `mtp`).

    DeepSeek-V4 names: the main layers `layers.N.*` and the `mtp.*` part (an MTP module or a DSpark drafter)."""
    path = str(config_path)
    if is_v4_names(tensors):
        layout = v4_layout(tensors, config)
        return ([Problem("layers", path, t) for t in layout.layer_problems]
                + [Problem("mtp", path, t) for t in layout.mtp_problems])
    ids = {i for i in map(layer_id, tensors) if i is not None}
    n_main = int(config.get("num_hidden_layers", 0) or 0)
    mtp_ids = mtp_layer_ids(config)
    out = []
    missing = sorted(set(range(n_main)) - ids)
    undeclared = sorted(ids - set(range(n_main)) - set(mtp_ids))
    if missing or undeclared:
        parts = [f"no tensors for main layers {ranges(missing)}"] if missing else []
        if undeclared:
            parts.append(f"layers {ranges(undeclared)} hold tensors but are not declared (main or MTP)")
        out.append(Problem("layers", path, f"{path}: num_hidden_layers={n_main}: " + "; ".join(parts),
                           "fix config.json or restore the missing shards"))
    n_mtp = config.get("num_nextn_predict_layers", 0) or 0
    absent = [i for i in mtp_ids if i not in ids]
    if absent:
        out.append(Problem("mtp", path, f"{path}: num_nextn_predict_layers={n_mtp} declares MTP layers "
                           f"{ranges(mtp_ids)} but there are no tensors for {ranges(absent)}",
                           "fix config.json or restore the missing shards"))
    marked = sorted({layer_id(n) for n in tensors if _MTP_MARKED.search(n)} - {None})
    if marked and not is_nextn_draft(config) and marked != [i for i in mtp_ids if i in ids]:
        out.append(Problem("mtp", path, f"{path}: layers {ranges(marked)} hold MTP tensors (enorm/hnorm/eh_proj) "
                           f"but the MTP layers declared are {ranges(mtp_ids)}", "fix config.json"))
    return out


def mtp_rule(tensors: Mapping[str, TensorInfo], config: Mapping) -> Callable[[str], bool]:
    """Which tensors belong to the MTP layers (or a V4 drafter): V4 names under `mtp.*`, else the layers the
    config declares after the main ones."""
    if is_v4_names(tensors):
        return lambda name: mtp_module_id(name) is not None
    ids = set(mtp_layer_ids(config))
    return lambda name: layer_id(name) in ids


def quantization_config_problems(tensors: Mapping[str, TensorInfo], config: Mapping, config_path: Path | str,
                                 formats: Formats | None = None) -> list[Problem]:
    """quantization_config is present exactly when quantized weights (block FP8, packed FP4) are, and says
    what the headers say (`formats.check_config`: block size, naming, `expert_dtype`, compressed-tensors'
    groups and `ignore` list)."""
    formats = formats if formats is not None else classify(tensors)
    has_q = bool(quantized(formats))
    has_qc = bool(config.get("quantization_config"))
    path = str(config_path)
    if has_q and not has_qc:
        return [Problem("quantization-config", path, f"{config_path}: F8_E4M3 tensors present but no "
                        "quantization_config; loaders would read them as plain weights",
                        "restore quantization_config from the release")]
    if has_qc and not has_q:
        return [Problem("quantization-config", path, f"{config_path}: quantization_config present but "
                        "no F8_E4M3 tensors; loaders would try to load the weights as FP8 and fail", "remove it")]
    return [Problem("quantization-config", path, text) for text in check_config(formats, config, presence=False)]


# ---------------------------------------------------------------------------------- files and index
def stray_shards(ckpt: Checkpoint) -> list[Problem]:
    """`*.safetensors` files in the directory that the checkpoint does not consist of."""
    listed = shard_files(ckpt)
    out = []
    for path in sorted(ckpt.root.rglob("*.safetensors")):
        rel = path.relative_to(ckpt.root).as_posix()
        if not rel.startswith(".") and "/." not in rel and rel not in listed:
            out.append(Problem("stray-shard", rel, f"{rel} is not listed in the index (a stray or leftover shard)",
                               "remove it, or restore the index that lists it"))
    return out


def shard_files(ckpt: Checkpoint) -> set[str]:
    """The shard files the checkpoint consists of: the index's, the single file, or the .safetensors found."""
    if ckpt.index is not None:
        return set(ckpt.index["weight_map"].values())
    if (ckpt.root / SINGLE_NAME).exists():
        return {SINGLE_NAME}
    return {p.name for p in ckpt.root.glob("*.safetensors")}


def total_size_problems(ckpt: Checkpoint) -> list[Problem]:
    """The index's metadata.total_size is the sum of the tensors' bytes."""
    if ckpt.index is None:
        return []
    if ckpt.unread:
        files = sorted(set(ckpt.unread.values()))
        return [Problem("total-size", INDEX_NAME, f"{INDEX_NAME} metadata.total_size not checked: {files[0]}"
                        + (f" and {counted(len(files) - 1, 'more shard')}" if len(files) > 1 else "") + " could not be read",
                        "see the files and headers checks")]
    total, actual = (ckpt.index.get("metadata") or {}).get("total_size"), ckpt.tensor_bytes()
    if total is None:
        return [Problem("total-size", INDEX_NAME, f"{INDEX_NAME} has no metadata.total_size; the tensors hold "
                        f"{counted(actual, 'byte')}", "restore the index")]
    if not isinstance(total, int) or isinstance(total, bool) or total != actual:
        return [Problem("total-size", INDEX_NAME, f"{INDEX_NAME} metadata.total_size is {total!r} but the shards' "
                        f"tensors hold {counted(actual, 'byte')}", "restore the index")]
    return []


def ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'; 'none' for no ids. Never longer than a few runs: the rest are counted."""
    if not ids:
        return "none"
    runs: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is None or i != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = i
        prev = i if i is not None else prev
    return ", ".join(runs[:8]) + (f" (and {counted(len(runs) - 8, 'more range')})" if len(runs) > 8 else "")
