"""`verify`: prove a checkpoint is whole, and that a converted one is what its conversion makes of the source.

- `alone.py`: checks from index, headers and config.json (files, headers, total_size, config, layers, mtp,
  quantization_config, fp8_scales), the problems of the reader and of `dsv3conv.checks`;
- `claim.py`: with a source, which conversion CKPT claims to be (dequant, quant, a split-mtp part), planned
  by that conversion's own planner; `against.py` holds tensor set and config.json to the plan;
- `sample.py`, `scan.py`, `values.py`, `data.py`: the data checks: a deterministic sample of tensors (or all),
  values checked (no NaN or Inf, scales finite and > 0), planned tensors compared bit for bit with what the
  engine's read and convert steps make of the source;
- `run.py`: the checks in order (`verify_checkpoint`); `combine.py`: merging the reports of `--part K/N` jobs.
"""

from dsv3conv.verify.combine import combine_reports
from dsv3conv.verify.run import part_shards, verify_checkpoint

__all__ = ["combine_reports", "part_shards", "verify_checkpoint"]
