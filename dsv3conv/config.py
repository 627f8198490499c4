"""config.json: every field dsv3conv reads, validated once, each fault one line naming the field.

`config_problems` runs when a checkpoint is opened; a config with problems is not used (inspect lists them,
verify fails its config check, conversions refuse). After it, code reads these fields without checking again:

- counts (`num_hidden_layers`, `num_nextn_predict_layers`, `num_experts_per_tok`, `first_k_dense_replace`):
  absent, or an integer from 0 to `MAX_COUNT` (`null` is refused: it is neither a number nor "absent").
- `architectures`: absent or a list of strings; `model_type`, `torch_dtype`, `dtype`: absent, null or a string.
- `quantization_config`: absent, null (no quantization) or an object whose `weight_block_size`, if given, is
  the block dsv3conv implements (`[128, 128]`); `quant_method`, `fmt`, `scale_fmt`, `activation_scheme`:
  strings; `modules_to_not_convert`: a list of strings.
"""

from __future__ import annotations

from pathlib import Path

from dsv3conv.errors import short

BLOCK = 128  # the only block size dsv3conv implements: 128 x 128
MAX_COUNT = 100_000
COUNTS = ("num_hidden_layers", "num_nextn_predict_layers", "num_experts_per_tok", "first_k_dense_replace")
STRINGS = ("model_type", "torch_dtype", "dtype")
QC_STRINGS = ("quant_method", "fmt", "scale_fmt", "activation_scheme")


def is_count(value: object, limit: int = MAX_COUNT) -> bool:
    """A non-negative integer (not a bool) of at most `limit`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def config_problems(config: object, path: Path) -> list[str]:
    """One line per field of `config` that dsv3conv reads and cannot use; empty when all are usable."""
    if not isinstance(config, dict):
        return [f"{path}: is not a JSON object; restore it from the release"]
    fix = "fix config.json"
    problems = []
    for key in COUNTS:
        if key in config and not is_count(config[key]):
            problems.append(f"{path}: {key} is {short(config[key])}, not an integer from 0 to {MAX_COUNT}; {fix}")
    arch = config.get("architectures")
    if "architectures" in config and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        problems.append(f"{path}: architectures is {short(arch)}, not a list of class names; {fix}")
    for key in STRINGS:
        if config.get(key) is not None and not isinstance(config[key], str):
            problems.append(f"{path}: {key} is {short(config[key])}, not a string; {fix}")
    qc = config.get("quantization_config")
    if qc is None:
        return problems
    if not isinstance(qc, dict):
        return [*problems, f"{path}: quantization_config is {short(qc)}, not an object; {fix}"]
    for key in QC_STRINGS:
        if qc.get(key) is not None and not isinstance(qc[key], str):
            problems.append(f"{path}: quantization_config.{key} is {short(qc[key])}, not a string; {fix}")
    modules = qc.get("modules_to_not_convert")
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        problems.append(f"{path}: quantization_config.modules_to_not_convert is {short(modules)}, not a list of "
                        f"module names; {fix}")
    block = qc.get("weight_block_size")
    if "weight_block_size" in qc and not (isinstance(block, list) and [type(b) for b in block] == [int, int]
                                          and block == [BLOCK, BLOCK]):
        problems.append(f"{path}: quantization_config.weight_block_size is {short(block)}; dsv3conv implements "
                        f"[{BLOCK}, {BLOCK}] blocks only: a checkpoint quantized with other blocks cannot be converted")
    return problems
