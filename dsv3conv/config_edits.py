"""The config.json edits of the converting commands, in one place: planners apply them, verify expects them.

Each edit changes a copy of the source's config and records one line per change (what `--dry-run` and the
summary show as `config_changes`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from dsv3conv.layout import NEXTN_ARCHITECTURE


class ConfigEdit:
    """A copy of a config.json being edited, and the changes made so far."""

    def __init__(self, config: Mapping):
        self.config: dict = copy.deepcopy(dict(config))
        self.changes: list[str] = []

    def set(self, key: str, value: object) -> None:
        old = self.config.get(key)
        if old != value:
            self.changes.append(f"{key}: {old!r} -> {value!r}")
        self.config[key] = value

    def set_dtype(self, dtype: str) -> None:
        """`torch_dtype`, and `dtype` where newer transformers wrote it, name the weights' dtype."""
        for key in ("torch_dtype", "dtype"):
            if key == "torch_dtype" or key in self.config:
                self.set(key, dtype)

    def drop_quantization(self, why: str = "") -> None:
        """Loaders would read unquantized weights as FP8 while `quantization_config` is there."""
        if "quantization_config" in self.config:
            del self.config["quantization_config"]
            self.changes.append("removed quantization_config" + (f" ({why})" if why else ""))

    def drop(self, key: str, why: str) -> None:
        if key in self.config:
            old = self.config.pop(key)
            self.changes.append(f"removed {key} (was {old!r}; {why})")

    def set_expert_dtype(self, value: str) -> None:
        """DeepSeek-V4's `expert_dtype` where the config keeps it (top level, or inside `quantization_config`),
        top level where it has none: V4 loaders (vLLM's) read a missing field as packed FP4."""
        qc = self.config.get("quantization_config")
        inside = isinstance(qc, dict) and "expert_dtype" in qc
        if inside and qc["expert_dtype"] != value:
            self.changes.append(f"quantization_config.expert_dtype: {qc['expert_dtype']!r} -> {value!r}")
            qc["expert_dtype"] = value
        if "expert_dtype" in self.config or not inside:
            self.set("expert_dtype", value)

    def set_quantization(self, qc: dict, description: str) -> None:
        old = self.config.get("quantization_config")
        if old != qc:
            self.changes.append(f"{'replaced' if old else 'added'} quantization_config ({description})")
        self.config["quantization_config"] = qc

    def drop_mtp(self) -> None:
        """No MTP layers, nor a DeepSeek-V4 DSpark drafter's `dspark_*` fields."""
        self.set("num_nextn_predict_layers", 0)
        for key in [k for k in self.config if str(k).startswith("dspark")]:
            self.drop(key, "the DSpark drafter was dropped")

    def nextn_draft(self, n_mtp: int) -> None:
        """The MTP layers as a standalone draft model: its layers are the MTP layers, every one an MoE layer."""
        self.set("num_hidden_layers", n_mtp)
        self.set("architectures", [NEXTN_ARCHITECTURE])
        if self.config.get("first_k_dense_replace"):
            self.set("first_k_dense_replace", 0)


def dequant_config(config: Mapping, dtype: str, drop_mtp: bool) -> ConfigEdit:
    """What `dequant` writes: no quantization_config, no `expert_dtype` (DeepSeek-V4: loaders would build
    packed-FP4 or block-FP8 experts), the output dtype, no MTP layers (nor a DSpark drafter's fields) if they
    were dropped."""
    edit = ConfigEdit(config)
    edit.drop_quantization()
    edit.drop("expert_dtype", f"the routed experts are {dtype} now")
    edit.set_dtype(dtype)
    if drop_mtp:
        edit.drop_mtp()
    return edit


def repack_config(config: Mapping, drop_mtp: bool) -> ConfigEdit:
    """What `dequant --experts fp8` writes: the source's config (still block FP8, `quantization_config`
    kept) with `expert_dtype: "fp8"` (a missing one would be read as packed FP4); MTP as `dequant_config`."""
    edit = ConfigEdit(config)
    edit.set_expert_dtype("fp8")
    if drop_mtp:
        edit.drop_mtp()
    return edit
