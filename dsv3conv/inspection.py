"""`inspect`: what a checkpoint holds, from headers only."""

from __future__ import annotations

from collections import Counter

from dsv3conv.checkpoint import CONFIG_NAME, Checkpoint
from dsv3conv.checks import layer_problems
from dsv3conv.formats import classify
from dsv3conv.layout import layer_id, mtp_layer_ids, parameter_counts
from dsv3conv.layout_v4 import is_v4_names, v4_layout


def inspect_checkpoint(ckpt: Checkpoint) -> dict:
    """A JSON-ready report: config facts, layers, MTP, quantization, shards, dtypes, parameters, problems."""
    config = ckpt.config or {}
    problems = [p.text for p in ckpt.problems]
    formats = classify(ckpt.tensors, config or None, ckpt.unread)  # with the config cross-check
    problems += formats.problems
    layers = sorted({i for i in map(layer_id, ckpt.tensors) if i is not None})
    declared_mtp = mtp_layer_ids(config)
    mtp_found = [i for i in layers if i in set(declared_mtp)]
    v4 = v4_layout(ckpt.tensors, config or None) if is_v4_names(ckpt.tensors) else None
    if v4 is not None:
        problems += v4.problems
    elif ckpt.config is not None:
        problems += [p.text for p in layer_problems(ckpt.tensors, config, ckpt.root / CONFIG_NAME)]
    return {
        "path": str(ckpt.root),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_nextn_predict_layers": config.get("num_nextn_predict_layers"),
        "layers": len(v4.main_layers) + len(v4.mtp_modules) if v4 is not None else len(layers),
        "mtp_layers": mtp_found,
        "quantization": config.get("quantization_config"),
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "tensor_bytes": ckpt.tensor_bytes(),
        "total_size": ((ckpt.index or {}).get("metadata") or {}).get("total_size"),
        "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values()).most_common()),
        "fp8": {
            "weights_with_scale": len(formats.of_kind("fp8_block")),
            "weights_without_scale": len(formats.unscaled),
            "orphan_scales": len(formats.orphan_scales),
        },
        "formats": formats.groups(),
        "layout": v4.summary() if v4 is not None else {"mtp_kind": "mtp" if mtp_found else None},
        "params": parameter_counts(((n, t.shape) for n, t in ckpt.tensors.items()), config, formats.tensors),
        "problems": problems,
    }
