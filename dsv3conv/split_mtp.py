"""Split the MTP (Multi-Token-Prediction) layers off a checkpoint, byte for byte.

Two outputs, each a plan that `pipeline.execute` carries out; no tensor is ever decoded:

- main (`plan_split_main`): the checkpoint without its MTP layers. Shards that hold no MTP tensor are copied
  whole and unchanged; shards that do are rewritten without them under the same name (an emptied shard is
  left out). config.json gets `num_nextn_predict_layers: 0`; the index loses the MTP tensors.
- draft (`plan_split_mtp`): the MTP layers alone as a standalone checkpoint, `model.layers.{id}.` renamed to
  `model.layers.{id - num_hidden_layers}.`, config with `num_hidden_layers` = the number of MTP layers and
  `architectures: ["DeepseekV3ForCausalLMNextN"]`. Layout `sglang` leaves out the layer's copies of the
  embedding and the head (the draft shares the target model's); `full` keeps them (vLLM-style loaders).

The MTP layer ids come from config.json (`num_hidden_layers` .. + `num_nextn_predict_layers` - 1), never a
fixed 61. FP8 and BF16 checkpoints alike: scales are tensors like any other and are copied with their weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint, ShardInfo
from dsv3conv.dest import check_dest
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.layout import FP8_DTYPE, NEXTN_ARCHITECTURE, fp8_coverage, layer_id, mtp_layer_ids
from dsv3conv.plan import (
    FilePlan,
    Plan,
    TensorPlan,
    _check_layers,
    _file,
    _index,
    _shard,
    require_fp8_pairs,
)

LAYOUTS = ("sglang", "full")
LAYOUT_ERROR = "--mtp-layout {!r}: choose sglang (no embed_tokens/shared_head.head) or full"
SHARED_WITH_TARGET = (".embed_tokens.weight", ".shared_head.head.weight")  # left out by the sglang layout
DRAFT_SHARD_BYTES = 5 * 1000**3


# --------------------------------------------------------------------------------------------- plans
def plan_split_main(ckpt: Checkpoint, dest: Path) -> Plan:
    """The checkpoint without its MTP layers: untouched shards copied whole, the others rewritten."""
    config, mtp_ids = _mtp_source(ckpt, dest)
    files: list[FilePlan] = []
    dropped: list[str] = []
    for shard in ckpt.shards.values():
        entries = [_keep(ckpt, e.name) for e in shard.header.tensors]
        kept = [t for t in entries if layer_id(t.name) not in mtp_ids]
        dropped += [t.name for t in entries if layer_id(t.name) in mtp_ids]
        if len(kept) == len(entries):
            files.append(FilePlan(shard.name, tuple(kept), _source_header(shard), copy_of=shard.name))
        elif kept:
            files.append(_file(shard.name, kept))
    new_config = copy.deepcopy(config)
    new_config["num_nextn_predict_layers"] = 0
    changes = [f"num_nextn_predict_layers: {config.get('num_nextn_predict_layers')} -> 0"]
    index = _index(ckpt, files) if ckpt.index is not None else None
    return Plan("split-mtp", ckpt.root, dest, files, index, new_config, changes, ckpt.extra_files(),
                sorted(dropped))


def plan_split_mtp(ckpt: Checkpoint, dest: Path, layout: str = "sglang") -> Plan:
    """The MTP layers as a standalone draft checkpoint, renumbered from 0.

    `dropped` lists only the MTP tensors the layout leaves out (the main model's tensors are just not taken).
    """
    if layout not in LAYOUTS:
        raise UsageError(LAYOUT_ERROR.format(layout))
    config, mtp_ids = _mtp_source(ckpt, dest)
    n_main = int(config["num_hidden_layers"])
    chosen, dropped = [], []
    for shard in ckpt.shards.values():  # source order: long sequential reads
        for entry in shard.header.tensors:
            layer = layer_id(entry.name)
            if layer not in mtp_ids:
                continue
            if layout == "sglang" and entry.name.endswith(SHARED_WITH_TARGET):
                dropped.append(entry.name)
                continue
            chosen.append((entry.name, layer))
    _check_pairs(ckpt, [name for name, _ in chosen])
    entries = [_keep(ckpt, name, _renumber(name, layer, layer - n_main)) for name, layer in chosen]
    files = _shard([("", entries)], DRAFT_SHARD_BYTES)

    new_config = copy.deepcopy(config)
    changes = []
    if n_main != len(mtp_ids):
        changes.append(f"num_hidden_layers: {n_main} -> {len(mtp_ids)}")
    new_config["num_hidden_layers"] = len(mtp_ids)
    if config.get("architectures") != [NEXTN_ARCHITECTURE]:
        changes.append(f"architectures: {config.get('architectures')} -> {[NEXTN_ARCHITECTURE]}")
    new_config["architectures"] = [NEXTN_ARCHITECTURE]
    if new_config.get("first_k_dense_replace"):  # every draft layer is an MoE layer
        changes.append(f"first_k_dense_replace: {new_config['first_k_dense_replace']} -> 0")
        new_config["first_k_dense_replace"] = 0
    if "quantization_config" in new_config and not any(t.dtype == FP8_DTYPE for t in entries):
        del new_config["quantization_config"]
        changes.append("removed quantization_config (no FP8 tensors in the draft)")
    index = _index(ckpt, files)
    return Plan("split-mtp", ckpt.root, dest, files, index, new_config, changes, ckpt.extra_files(),
                sorted(dropped))


def _mtp_source(ckpt: Checkpoint, dest: Path) -> tuple[dict, set[int]]:
    """The config and MTP layer ids of a clean checkpoint that has MTP layers."""
    check_dest(ckpt.root, dest)
    ckpt.require_clean()
    config = ckpt.require_config()
    mtp_ids = set(mtp_layer_ids(config))
    if not mtp_ids:
        raise UsageError(
            f"{ckpt.root / 'config.json'}: declares no MTP layers (num_nextn_predict_layers is 0 or absent); "
            "there is nothing to split"
        )
    _check_layers(ckpt, config)
    require_fp8_pairs(ckpt)  # copied byte for byte, but never an FP8 weight without its scale
    return config, mtp_ids


def _keep(ckpt: Checkpoint, name: str, new_name: str | None = None) -> TensorPlan:
    """A tensor copied byte for byte (no scale: never decoded), optionally under a new name."""
    info = ckpt.tensors[name]
    return TensorPlan(new_name or name, info, None, info.dtype, info.shape)


def _renumber(name: str, layer: int, new_layer: int) -> str:
    """`model.layers.61.mlp.gate.weight` -> `model.layers.0.mlp.gate.weight`."""
    old = f"model.layers.{layer}."
    return f"model.layers.{new_layer}." + name[len(old):]


def _source_header(shard: ShardInfo) -> bytes:
    """The shard's own header bytes: a copied shard is complete (for --resume) when it starts with them."""
    with open(shard.path, "rb") as f:
        header = f.read(shard.header.data_start)
    if len(header) != shard.header.data_start:
        raise Dsv3Error(f"{shard.path}: shorter than its header; the file changed while planning, rerun")
    return header


def _check_pairs(ckpt: Checkpoint, names: list[str]) -> None:
    """An FP8 weight of the draft must travel with its scale (and a scale with its weight)."""
    cov = fp8_coverage({n: ckpt.tensors[n] for n in names})
    if cov.unscaled:
        name = cov.unscaled[0]
        raise Dsv3Error(
            f"tensor `{name}` is F8_E4M3 but `{name}_scale_inv` is missing from the MTP layer; "
            "restore the missing shard or scale"
        )
    if cov.orphan_scales:
        raise Dsv3Error(
            f"tensor `{cov.orphan_scales[0]}` is a scale without its F8_E4M3 weight; "
            "the checkpoint is incomplete"
        )
