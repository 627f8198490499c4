"""The checks that read tensor data: `values` (CKPT alone) and `data_vs_source` (against the plan)."""

from __future__ import annotations

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.errors import counted
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4, QuantBlockFp8, RepackMxfp4Fp8
from dsv3conv.verify.report import Check, fmt_diff, join, where
from dsv3conv.verify.scan import Task
from dsv3conv.verify.values import TensorResult

# What a verify without --against cannot find, said in its output.
UNPROVEN = ("without --against a changed byte that still decodes to a valid value goes unnoticed "
            "(the release carries no checksums)")
KINDS = {Copy: "copy", DequantBlockFp8: "dequant", DequantMxfp4: "dequant", QuantBlockFp8: "quant",
         RepackMxfp4Fp8: "repack"}


def values_check(results: dict[str, TensorResult], tasks: list[Task], ckpt: Checkpoint, fraction: float | None,
                 shards: list[str] | None, against: bool, scale_names: set[str]) -> Check:
    problems = []
    for t in tasks:
        r = results[t.info.name]
        if r.error and t.planned is None:
            problems.append(f"tensor `{t.info.name}`: {r.error}")
        elif r.bad_values:
            what = (counted(r.bad_values, "value that is", "values that are") + " not finite and > 0"
                    if not t.sampled else counted(r.bad_values, "NaN or Inf value"))
            problems.append(f"tensor `{t.info.name}` ({t.info.dtype}, {t.info.file}) has {what} "
                            f"({r.bad_kind} first at {where(r.bad_first, t.info.shape)})")
    sampled = sum(t.sampled for t in tasks)
    scales = len(tasks) - sampled
    others = sum(n not in scale_names and (shards is None or t.file in shards) for n, t in ckpt.tensors.items())
    what = f"{sampled:,} of {counted(others, 'tensor')}" if fraction is not None else f"all {counted(others, 'tensor')}"
    if scales:
        what += f" and all {counted(scales, 'scale')}"
    if problems:
        return Check("values", False, join(problems, limit=20))
    return Check("values", True, f"{what} read: no NaN or Inf" + ("; scales finite and > 0" if scales else "")
                 + (f" (sample {fraction:g}, at least one tensor per dtype)" if fraction is not None else "")
                 + ("" if against else f"; {UNPROVEN}"))


def data_check(results: dict[str, TensorResult], tasks: list[Task], pool: int, fraction: float | None,
               device: str, what: str) -> Check:
    """`pool`: the tensors that could be compared (in this part); `what`: "the source" or "quant of the source"."""
    compared = [t for t in tasks if t.planned is not None]
    lines = [line for t in compared if (line := _differs(t, results[t.info.name]))]
    if lines:
        of = f"of the {len(compared):,} compared tensors"
        return Check("data_vs_source", False,
                     f"{counted(len(lines), f'{of} differs', f'{of} differ')}: " + "; ".join(lines[:20]))
    scope = f"{len(compared):,} of {counted(pool, 'tensor')}" if fraction is not None else f"all {counted(len(compared), 'tensor')}"
    ops = [KINDS[type(t.planned.op)] for t in compared]
    how = [f"{ops.count('dequant'):,} dequantized on {device}" if "dequant" in ops else "",
           f"{ops.count('quant'):,} quantized again on {device}, e4m3 codes and scales" if "quant" in ops else "",
           f"{ops.count('repack'):,} repacked again on {device}, e4m3 codes and scales" if "repack" in ops else "",
           f"{ops.count('copy'):,} copied" if "copy" in ops else ""]
    return Check("data_vs_source", True,
                 f"{scope} bit-identical to {what} ({', '.join(h for h in how if h) or 'none read'})")


def _differs(t: Task, r: TensorResult) -> str:
    info, op = t.info, KINDS[type(t.planned.op)]
    if r.error:
        return f"tensor `{info.name}`: not compared: {r.error}"
    if not (r.differ or r.scale_differ):
        return ""
    head = f"tensor `{info.name}` ({info.file}): "
    if op in ("quant", "repack"):
        return head + (f"{r.differ:,} of {info.numel:,} e4m3 codes and {r.scale_differ:,} of "
                       f"{_scales(t.planned):,} scales differ from {op} of the source")
    if op == "copy":
        of = f"of {info.nbytes:,} bytes"
        return head + (f"{counted(r.differ, f'{of} differs', f'{of} differ')} from the copied source "
                       f"(first at {where(r.diff_first, info.shape)})")
    of = f"of {info.numel:,} elements"
    return head + (f"{counted(r.differ, f'{of} differs', f'{of} differ')} from the dequantized source, largest difference "
                   f"{fmt_diff(r.max_diff)} (first at {where(r.diff_first, info.shape)})")


def _scales(t) -> int:
    rows, cols = t.shape
    return -(-rows // t.op.block) * -(-cols // t.op.block)
