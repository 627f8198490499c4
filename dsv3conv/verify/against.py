"""The checks of CKPT against SRC that read no tensor data: source, tensor_set, config_vs_source.

Both compare CKPT with the plan of the conversion it claims to be (`claim.py`): the planned output tensors
with their dtypes and shapes, and the planned config.json."""

from __future__ import annotations

from collections import Counter

from dsv3conv.checkpoint import CONFIG_NAME, Checkpoint
from dsv3conv.checks import formats_of, fp8_problems
from dsv3conv.errors import counted
from dsv3conv.ops import Copy, DequantBlockFp8, DequantMxfp4, QuantBlockFp8, RepackMxfp4Fp8
from dsv3conv.verify.claim import Claim
from dsv3conv.verify.report import Check, config_diffs, join, names, short_json

OP_WORDS = {DequantBlockFp8: "dequantized", DequantMxfp4: "dequantized from packed FP4",
            QuantBlockFp8: "quantized, each with its scale",
            RepackMxfp4Fp8: "repacked from packed FP4 to block FP8, each with its scale", Copy: "copied"}
DEQUANT_OPS = (DequantBlockFp8, DequantMxfp4)


def source_check(src: Checkpoint) -> Check:
    formats = formats_of(src)
    problems = [p.text for p in list(src.problems) + fp8_problems(src.tensors, formats)]
    if problems:
        return Check("source", False, f"{src.root}: " + join(problems))
    packed = len(formats.of_kind("mxfp4"))
    return Check("source", True, f"{src.root}: {counted(len(src.tensors), 'tensor')}, "
                 f"{counted(len(formats.of_kind('fp8_block')), 'FP8 weight')} with scales"
                 + (f", {counted(packed, 'packed FP4 weight')} with scales" if packed else ""))


def misformed(ckpt: Checkpoint, c: Claim) -> dict[str, str]:
    """Planned tensors CKPT holds with another dtype or shape: name -> the line saying so."""
    out = {}
    for name, t in c.planned.items():
        got = ckpt.tensors.get(name)
        if got is not None and (got.dtype != t.dtype or tuple(got.shape) != tuple(t.shape)):
            out[name] = (f"tensor `{name}` is {got.dtype} {list(got.shape)}; {c.kind} of the source makes "
                         f"{t.dtype} {list(t.shape)}")
    return out


def tensor_set_check(ckpt: Checkpoint, c: Claim) -> Check:
    """CKPT holds exactly the planned tensors, each with its planned dtype and shape."""
    if c.plan is None:
        return Check("tensor_set", False, c.error)
    planned = c.planned
    extra = sorted(set(ckpt.tensors) - set(planned))
    missing = sorted(set(planned) - set(ckpt.tensors))
    problems = list(c.problems)
    if extra:
        problems.append(f"not made from the source: {names(extra)}")
    if missing:
        problems.append(f"missing from CKPT: {names(missing)}")
    problems += misformed(ckpt, c).values()
    if problems:
        return Check("tensor_set", False, join(problems))
    ops = Counter(type(t.op) for t in planned.values())
    counts = ", ".join(f"{ops[op]:,} {word}" for op, word in OP_WORDS.items() if ops[op])
    if ops[DequantBlockFp8] or ops[DequantMxfp4]:
        counts = counts.replace("dequantized", f"dequantized to {_out_dtype(planned)}", 1)
    return Check("tensor_set", True, f"{counted(len(planned), 'tensor')} as {c.kind} of the source makes them "
                 f"({c.settings}): {counts}; {counted(len(c.plan.dropped), 'source tensor')} left out")


def config_check(ckpt: Checkpoint, src: Checkpoint, c: Claim) -> Check:
    """CKPT's config.json is the planned one."""
    if c.plan is None:
        return Check("config_vs_source", False, c.error)
    if ckpt.config is None:
        return Check("config_vs_source", False, f"{ckpt.root / CONFIG_NAME}: missing or unreadable")
    want = c.plan.config or {}
    diffs = config_diffs(want, ckpt.config)
    if diffs:
        return Check("config_vs_source", False, f"{ckpt.root / CONFIG_NAME}: " + join(diffs))
    before = src.config or {}
    changes = [f"{k} removed" if k not in want else f"{k} {short_json(want[k])}"
               for k in sorted(set(want) | set(before)) if want.get(k) != before.get(k)]
    return Check("config_vs_source", True, f"the source's config with only {c.kind}'s changes"
                 + (f" ({', '.join(changes)})" if changes else " (none)"))


def _out_dtype(planned: dict) -> str:
    return next(t.dtype for t in planned.values() if isinstance(t.op, DEQUANT_OPS))
