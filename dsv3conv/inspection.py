"""`inspect`: what a checkpoint holds, from headers only."""

from __future__ import annotations

from collections import Counter

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.formats import classify
from dsv3conv.layout import layer_id, mtp_layer_ids, parameter_counts
from dsv3conv.layout_v4 import is_v4_names, v4_layout


def inspect_checkpoint(ckpt: Checkpoint) -> dict:
    """A JSON-ready report: config facts, layers, MTP, quantization, shards, dtypes, parameters, problems."""
    config = ckpt.config or {}
    problems = list(ckpt.problems)
    formats = classify(ckpt.tensors, config or None)  # with the config cross-check
    problems += formats.problems
    layers = sorted({i for i in map(layer_id, ckpt.tensors) if i is not None})
    declared_mtp = mtp_layer_ids(config)
    mtp_found = [i for i in layers if i in set(declared_mtp)]
    n_main = config.get("num_hidden_layers")
    v4 = v4_layout(ckpt.tensors, config or None) if is_v4_names(ckpt.tensors) else None
    if v4 is not None:
        problems += v4.problems
    elif config:
        main_found = [i for i in layers if i not in set(declared_mtp)]
        if n_main is not None and main_found != list(range(int(n_main))):
            problems.append(
                f"config.json: num_hidden_layers is {n_main} but the tensors hold main layers "
                f"{_ranges(main_found)}; fix config.json or restore the missing shards"
            )
        if mtp_found != declared_mtp:
            problems.append(
                f"config.json: num_nextn_predict_layers declares MTP layers {declared_mtp} but the tensors hold {mtp_found}"
            )
    return {
        "path": str(ckpt.root),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "num_hidden_layers": n_main,
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


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i != (prev + 1 if prev is not None else None):
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = i
        prev = i
    return ", ".join(out)
