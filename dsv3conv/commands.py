"""What each converting command does: open the source, plan, hand the plan to the runner, add to its summary;
and `write_example`, the example checkpoints (the bf16 one is a converted one).

`dsv3conv.api` re-exports these functions for programs; the CLI calls them with its options.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.dequant import plan_dequant
from dsv3conv.dest import check_apart, check_claim, check_dest, prepare_dest
from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.layout import mtp_layer_ids
from dsv3conv.ops import QuantScale
from dsv3conv.plan import parse_part, parse_size
from dsv3conv.preflight import check_space_together, space_needed
from dsv3conv.quant import plan_quant
from dsv3conv.runner import buffer_bytes, run_plan
from dsv3conv.split_mtp import check_layout, plan_split_main, plan_split_mtp


def dequantize(
    src: str | os.PathLike, dst: str | os.PathLike, *, mtp: str = "keep", device: str = "auto",
    dtype: str = "bfloat16", resume: bool = False, overwrite: bool = False,
    max_shard_size: str | int | None = None, dry_run: bool = False, progress: bool = False,
    buffer_size: str | int | None = None, part: str | tuple[int, int] | None = None, allow_noop: bool = False,
    space_check: bool = True, follow_links: bool = False, experts: str = "dequant", allow_nonfinite: bool = False,
    scale_dtype: str | None = None,
) -> dict:
    """Convert an FP8 checkpoint to `dtype`; return the summary `--json` prints.

    `experts="fp8"`: repack DeepSeek-V4's packed-FP4 experts to 128x128 block FP8 and copy everything else;
    `scale_dtype` ("float8_e8m0fnu", the default, or "float32"): the dtype of their block scales.

    `part="K/N"`: convert only part K of N (N independent jobs writing into one DST; the last one to finish
    writes the index and config). A checkpoint with no FP8 weight is refused unless `allow_noop` (a copy).
    `follow_links`: read files whose links lead outside the checkpoint (refused otherwise).
    `allow_nonfinite`: write values that come out NaN or Inf (NaN codes, overflow) instead of stopping.
    """
    started = time.perf_counter()
    part = parse_part(part)  # options first: a bad number is refused before the data is read
    buffer_bytes(buffer_size)
    ckpt = Checkpoint.open(src)
    size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    check_dest(ckpt.root, Path(dst))
    plan = plan_dequant(ckpt, Path(dst), out_dtype=dtype, mtp=mtp, max_shard_size=size,
                        extra_files=ckpt.extra_files(), experts=experts, allow_nonfinite=allow_nonfinite,
                        scale_dtype=scale_dtype)
    ckpt.require_links_inside(follow_links)
    if not plan.converted and not allow_noop:
        dtypes = ", ".join(sorted({t.dtype for t in ckpt.tensors.values()}))
        raise Dsv3Error(f"{ckpt.root}: no FP8 weights to dequantize (its tensors are {dtypes}): nothing to convert; "
                        "pass {allow_noop} to copy it anyway", "allow_noop")
    return run_plan(plan, device=device, resume=resume, overwrite=overwrite, dry_run=dry_run, progress=progress,
                    buffer_size=buffer_size, part=part, space_check=space_check, started=started)


def quantize(
    src: str | os.PathLike, dst: str | os.PathLike, *, scale_fmt: str = "float", scale_dtype: str = "float32",
    skip: list[str] | tuple[str, ...] = (), mtp: str = "keep", device: str = "auto", resume: bool = False,
    overwrite: bool = False, dry_run: bool = False, progress: bool = False, buffer_size: str | int | None = None,
    part: str | tuple[int, int] | None = None, space_check: bool = True, follow_links: bool = False,
) -> dict:
    """Quantize a BF16 checkpoint to 128x128 block FP8; return the summary `--json` prints.

        from dsv3conv.api import quantize
        quantize("V3-finetuned-bf16", "V3-finetuned-fp8", scale_fmt="ue8m0")
    """
    started = time.perf_counter()
    part = parse_part(part)  # options first: a bad number is refused before the data is read
    buffer_bytes(buffer_size)
    ckpt = Checkpoint.open(src)
    check_dest(ckpt.root, Path(dst))
    plan = plan_quant(ckpt, Path(dst), scale_fmt=scale_fmt, scale_dtype=scale_dtype, skip=skip, mtp=mtp,
                      extra_files=ckpt.extra_files())
    ckpt.require_links_inside(follow_links)
    result = run_plan(plan, device=device, resume=resume, overwrite=overwrite, dry_run=dry_run, progress=progress,
                      buffer_size=buffer_size, part=part, space_check=space_check, started=started)
    qc = (plan.config or {}).get("quantization_config") or {}
    result["scales_written"] = sum(isinstance(t.op, QuantScale) for f in plan.files for t in f.tensors)
    result["tensors_skipped"] = len(qc.get("modules_to_not_convert") or [])
    result["scale_fmt"] = qc.get("scale_fmt", "float")
    return result


def split_mtp(
    src: str | os.PathLike,
    main_out: str | os.PathLike | None = None,
    mtp_out: str | os.PathLike | None = None,
    mtp_layout: str = "sglang", resume: bool = False, overwrite: bool = False, dry_run: bool = False,
    progress: bool = False, part: str | tuple[int, int] | None = None, space_check: bool = True,
    follow_links: bool = False,
) -> dict:
    """Write the checkpoint without its MTP layers (`main_out`) and/or the MTP draft (`mtp_out`).

    Both plans are made, and both outputs checked, before anything is written. Returns
    `{"source", "mtp_layers", "main": summary | None, "mtp": summary | None}` (what `--json` prints).
    """
    started = time.perf_counter()
    if main_out is None and mtp_out is None:
        raise UsageError("give {main_out} DIR, {mtp_out} DIR or both", "main_out", "mtp_out")
    check_layout(mtp_layout)
    if resume and overwrite:
        raise UsageError("{resume} and {overwrite} exclude each other; pick one", "resume", "overwrite")
    if main_out is not None and mtp_out is not None:
        check_apart(Path(main_out), Path(mtp_out), "--main-out", "--mtp-out")
    part = parse_part(part)
    ckpt = Checkpoint.open(src)
    extra = ckpt.extra_files()
    plans = {}
    if main_out is not None:
        check_dest(ckpt.root, Path(main_out))
        plans["main"] = plan_split_main(ckpt, Path(main_out), extra)
    if mtp_out is not None:
        check_dest(ckpt.root, Path(mtp_out))
        plans["mtp"] = plan_split_mtp(ckpt, Path(mtp_out), mtp_layout, extra)
    ckpt.require_links_inside(follow_links)
    for plan in plans.values():  # refuse a non-empty second output before writing the first (a dry run too)
        prepare_dest(plan.dest, resume=resume or part is not None, overwrite=overwrite, source=ckpt.root,
                     create=False)
        if (resume or part is not None) and plan.dest.is_dir():
            check_claim(plan)  # the second output begun under another plan: refused before the first is written
    if space_check and part is None:  # each output's own check comes in run_plan; here both on one filesystem
        check_space_together([(p.dest, space_needed(p, p.files, resume=resume, overwrite=overwrite))
                              for p in plans.values()])

    n_main = int(ckpt.config["num_hidden_layers"])
    mtp_ids = sorted(mtp_layer_ids(ckpt.config))
    result = {"source": str(ckpt.root), "mtp_layers": mtp_ids, "main": None, "mtp": None}
    for key, plan in plans.items():
        summary = run_plan(plan, resume=resume, overwrite=overwrite, dry_run=dry_run, progress=progress, part=part,
                           space_check=space_check, started=started)
        summary["shards_copied_whole"] = sum(f.copy_of is not None for f in plan.files)
        if key == "mtp":
            summary["layout"] = mtp_layout
            summary["renamed"] = [f"model.layers.{i}. -> model.layers.{i - n_main}." for i in mtp_ids]
        result[key] = summary
    return result


def write_example(kind: str, dst: str | os.PathLike) -> Path:
    """Write the example checkpoint `kind` into `dst`, an absent or empty directory: "bf16" (the "fp8" example
    dequantized, through a temporary directory beside DST) or a key of `synthetic_v4.ALL_EXAMPLES`."""
    from dsv3conv.synthetic_v4 import ALL_EXAMPLES, make_any_example  # the generators, only when asked for

    dst = Path(dst)
    if kind not in ALL_EXAMPLES and kind != "bf16":
        raise UsageError(f"example {kind!r}: choose one of fp8, bf16, {', '.join(k for k in ALL_EXAMPLES if k != 'fp8')}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"{dst}: exists and is not an empty directory; choose a new path")
    if kind != "bf16":
        return make_any_example(kind, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dsv3conv-example-", dir=dst.parent) as tmp:
        make_any_example("fp8", tmp)
        dequantize(tmp, dst, device="cpu")
    return dst
