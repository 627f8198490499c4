"""Split the MTP (Multi-Token-Prediction) layers off a checkpoint, byte for byte.

Two outputs, each a plan of `Copy` operations only; no tensor is ever decoded:

- main (`plan_split_main`): the checkpoint without its MTP layers. Shards that hold no MTP tensor are copied
  whole and unchanged; shards that do are rewritten without them under the same name (an emptied shard is
  left out). config.json gets `num_nextn_predict_layers: 0`; the index loses the MTP tensors.
- draft (`plan_split_mtp`): the MTP layers alone as a standalone checkpoint, `model.layers.{id}.` renamed to
  `model.layers.{id - num_hidden_layers}.`, config with `num_hidden_layers` = the number of MTP layers and
  `architectures: ["DeepseekV3ForCausalLMNextN"]`. Layout `sglang` leaves out the layer's copies of the
  embedding and the head (the draft shares the target model's); `full` keeps them (vLLM-style loaders).

The MTP layer ids come from config.json (`num_hidden_layers` .. + `num_nextn_predict_layers` - 1), never a
fixed 61. DeepSeek-V4 names keep MTP (or a DSpark drafter) under `mtp.*`: main drops those (and the config's
`dspark_*` fields); the draft keeps them under their own names with the source's config unchanged, since the
family's loaders find the drafter by the `mtp.` prefix and size it from `num_hidden_layers`,
`num_nextn_predict_layers` and `dspark_*` (vLLM's DeepSeek-V4 MTP loader, the official inference code).
Layout `full` adds the top-level `embed.weight` and `head.weight`, which the V4 MTP module shares with the
main model and vLLM's loader reads from the draft's directory. FP8, MXFP4 and BF16 checkpoints alike: scales
are tensors like any other and are copied with their weights.
"""

from __future__ import annotations

from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.checks import mtp_rule
from dsv3conv.config_edits import ConfigEdit
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.formats import classify
from dsv3conv.layout import FP8_DTYPE, layer_id, layer_name, layer_parts, mtp_layer_ids
from dsv3conv.layout_v4 import is_v4_names, mtp_module_id, v4_layout
from dsv3conv.plan import (
    FilePlan,
    Plan,
    check_layers,
    copied,
    file_plan,
    index_json,
    require_fp8_pairs,
    shard_files,
)

LAYOUTS = ("sglang", "full")
SHARED_WITH_TARGET = (".embed_tokens.weight", ".shared_head.head.weight")  # left out by the sglang layout
V4_SHARED_WITH_TARGET = ("embed.weight", "head.weight")  # DeepSeek-V4: added by the full layout
DRAFT_SHARD_BYTES = 5 * 1000**3


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise UsageError(f"{{mtp_layout}} {layout!r}: choose sglang (no embed_tokens/shared_head.head) or full",
                         "mtp_layout")


# --------------------------------------------------------------------------------------------- plans
def plan_split_main(ckpt: Checkpoint, dest: Path, extra_files: list[str] | tuple[str, ...] = ()) -> Plan:
    """The checkpoint without its MTP layers: untouched shards copied whole, the others rewritten."""
    config, _ = _mtp_source(ckpt)
    in_mtp = mtp_rule(ckpt.tensors, config)
    files: list[FilePlan] = []
    dropped: list[str] = []
    for shard in ckpt.shards.values():
        entries = [copied(ckpt.tensors[e.name]) for e in shard.header.tensors]
        kept = [t for t in entries if not in_mtp(t.name)]
        dropped += [t.name for t in entries if in_mtp(t.name)]
        if len(kept) == len(entries):  # complete (for resume) when it starts with the source's own header
            files.append(FilePlan(shard.name, tuple(kept), shard.header.file_prefix, copy_of=shard.name))
        elif kept:
            files.append(file_plan(shard.name, kept))
    edit = ConfigEdit(config)
    edit.drop_mtp()
    index = index_json(ckpt, files) if ckpt.index is not None else None
    return Plan(ckpt.root, dest, files, index, edit.config, edit.changes, list(extra_files), sorted(dropped))


def plan_split_mtp(ckpt: Checkpoint, dest: Path, layout: str = "sglang",
                   extra_files: list[str] | tuple[str, ...] = ()) -> Plan:
    """The MTP layers as a standalone draft checkpoint, renumbered from 0.

    `dropped` lists only the MTP tensors the layout leaves out (the main model's tensors are just not taken).
    """
    check_layout(layout)
    config, mtp_ids = _mtp_source(ckpt)
    if is_v4_names(ckpt.tensors):
        return _plan_v4_draft(ckpt, dest, layout, config, extra_files)
    n_main = int(config["num_hidden_layers"])
    chosen, dropped = [], []
    for shard in ckpt.shards.values():  # source order: long sequential reads
        for entry in shard.header.tensors:
            if layer_id(entry.name) not in mtp_ids:
                continue
            if layout == "sglang" and entry.name.endswith(SHARED_WITH_TARGET):
                dropped.append(entry.name)
                continue
            chosen.append(entry.name)
    require_fp8_pairs({name: ckpt.tensors[name] for name in chosen}, "the MTP layer")
    entries = [copied(ckpt.tensors[name], _renumber(name, -n_main)) for name in chosen]
    files = shard_files([("", entries)], DRAFT_SHARD_BYTES)
    edit = ConfigEdit(config)
    edit.nextn_draft(len(mtp_ids))
    if not any(t.dtype == FP8_DTYPE for t in entries):
        edit.drop_quantization("no FP8 tensors in the draft")
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files),
                sorted(dropped), {"mtp_layout": layout})


def _plan_v4_draft(ckpt: Checkpoint, dest: Path, layout: str, config: dict,
                   extra_files: list[str] | tuple[str, ...]) -> Plan:
    """DeepSeek-V4: the `mtp.*` tensors under their own names (with `full`, the shared embedding and head),
    config.json as the source's."""
    shared = V4_SHARED_WITH_TARGET if layout == "full" else ()
    entries = [copied(ckpt.tensors[e.name]) for shard in ckpt.shards.values() for e in shard.header.tensors
               if mtp_module_id(e.name) is not None or e.name in shared]
    files = shard_files([("", entries)], DRAFT_SHARD_BYTES)
    edit = ConfigEdit(config)
    return Plan(ckpt.root, dest, files, index_json(ckpt, files), edit.config, edit.changes, list(extra_files), [],
                {"mtp_layout": layout})


def _mtp_source(ckpt: Checkpoint) -> tuple[dict, set[int]]:
    """The config and MTP layer ids of a clean checkpoint that has MTP layers."""
    ckpt.require_clean()
    config = ckpt.require_config()
    mtp_ids = set(mtp_layer_ids(config))
    if not mtp_ids:
        raise UsageError(
            f"{ckpt.root / 'config.json'}: declares no MTP layers (num_nextn_predict_layers is 0 or absent); "
            "there is nothing to split"
        )
    if is_v4_names(ckpt.tensors):
        problems = v4_layout(ckpt.tensors, config).problems + classify(ckpt.tensors).problems
        if problems:
            raise Dsv3Error(problems[0])
        return config, mtp_ids
    check_layers(ckpt, config)
    require_fp8_pairs(ckpt.tensors)  # copied byte for byte, but never an FP8 weight without its scale
    return config, mtp_ids


def _renumber(name: str, shift: int) -> str:
    """`model.layers.61.mlp.gate.weight`, shift -61 -> `model.layers.0.mlp.gate.weight` (parsed, not sliced)."""
    layer, rest = layer_parts(name)
    return layer_name(layer + shift, rest)
