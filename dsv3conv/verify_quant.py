"""`verify CKPT --against SRC` when CKPT is what `quant` makes of a BF16/F16/F32 SRC.

The expected output is planned by `quant.plan_quant` itself, with the settings CKPT declares: `scale_fmt` and
`modules_to_not_convert` from its quantization_config, the scale dtype of its scale tensors, `--mtp drop` when
its config has no MTP layers but SRC has. Then:
- tensor_set: the planned tensors, with their dtypes and shapes, and nothing else;
- config_vs_source: config.json equal to the planned one;
- data_vs_source: each compared weight quantized again from SRC by the CPU backend the engine uses (bit
  for bit `reference_quant`), e4m3 bytes and scale bytes equal to CKPT's; copied tensors byte-identical.
Tensors are read one at a time (copied ones in chunks): memory is bounded by the largest quantized weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3conv.checkpoint import Checkpoint, TensorInfo, read_into
from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.errors import Dsv3Error
from dsv3conv.layout import FP8_DTYPE, fp8_coverage, is_scale, mtp_layer_ids
from dsv3conv.ops import QuantBlockFp8
from dsv3conv.plan import TensorPlan

SCALE_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E8M0": "float8_e8m0fnu"}
COPY_CHUNK = 64 * 1024 * 1024
LIST_LIMIT = 5  # names shown in one check's detail before "(and N more)"


def is_quant_output(ckpt: Checkpoint, src: Checkpoint) -> bool:
    """CKPT holds block-FP8 weights with scales, SRC none: CKPT is to be held to `quant`, not `dequant`."""
    return bool(fp8_coverage(ckpt.tensors).pairs) and not any(
        t.dtype == FP8_DTYPE or is_scale(n) for n, t in src.tensors.items())


@dataclass
class QuantMatch:
    planned: dict[str, TensorPlan] = field(default_factory=dict)  # name -> its plan, when CKPT's is well-formed
    problems: list[str] = field(default_factory=list)
    misformed: list[str] = field(default_factory=list)
    config: dict | None = None
    settings: str = ""
    error: str = ""


def names(items: list[str], limit: int = LIST_LIMIT) -> str:
    """`a`, `b`, ... (and N more): tensor names in one check's detail."""
    shown = ", ".join(f"`{n}`" for n in items[:limit])
    return shown + (f" (and {len(items) - limit:,} more)" if len(items) > limit else "")


def match_quant(ckpt: Checkpoint, src: Checkpoint) -> QuantMatch:
    """Plan `quant` of SRC with CKPT's declared settings; hold CKPT's tensor set to the plan."""
    from dsv3conv.quant import plan_quant

    m = QuantMatch()
    qc = (ckpt.config or {}).get("quantization_config") or {}
    scale_fmt = qc.get("scale_fmt", "float")
    scale_dtypes = sorted({t.dtype for n, t in ckpt.tensors.items() if is_scale(n)})
    scale_dtype = SCALE_DTYPE_NAMES.get(scale_dtypes[0], scale_dtypes[0]) if scale_dtypes else "float32"
    skip = ["^" + re.escape(f"{module}.weight") + "$" for module in qc.get("modules_to_not_convert") or []]
    src_mtp = mtp_layer_ids(src.config or {})
    mtp = "drop" if src_mtp and ckpt.config is not None and not ckpt.config.get("num_nextn_predict_layers") else "keep"
    m.settings = (f"scale_fmt {scale_fmt}, scale dtype {scale_dtype}, {len(skip)} weights skipped, MTP {mtp}")
    if len(scale_dtypes) > 1:
        m.problems.append(f"scales stored in several dtypes ({', '.join(scale_dtypes)}); quant writes one")
    try:
        plan = plan_quant(src, Path(ckpt.root), scale_fmt=scale_fmt, scale_dtype=scale_dtype, skip=skip, mtp=mtp)
    except Dsv3Error as exc:
        m.error = f"cannot plan quant of the source with CKPT's settings ({m.settings}): {exc}"
        return m
    m.config = plan.config
    want = {t.name: t for f in plan.files for t in f.tensors}
    missing = sorted(set(want) - set(ckpt.tensors))
    extra = sorted(set(ckpt.tensors) - set(want))
    if extra:
        m.problems.append(f"not made from the source: {names(extra)}")
    if missing:
        m.problems.append(f"missing from CKPT: {names(missing)}")
    for name in sorted(set(want) & set(ckpt.tensors)):
        got, t = ckpt.tensors[name], want[name]
        if got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape):
            m.planned[name] = t
        else:
            m.misformed.append(name)
            m.problems.append(f"tensor `{name}` is {got.dtype} {list(got.shape)}; quant of the source makes "
                              f"{t.dtype} {list(t.shape)}")
    return m


@dataclass
class QuantCompare:
    differ: dict[str, str] = field(default_factory=dict)  # tensor -> what differs
    quantized: int = 0
    copied: int = 0


def compare_quant(ckpt: Checkpoint, src: Checkpoint, planned: dict[str, TensorPlan], names: list[str]) -> QuantCompare:
    """Quantize each named weight of SRC again (CPU path) and compare it and its scale with CKPT; compare copied
    tensors byte for byte."""
    from dsv3conv.backend import CpuBackend, Item

    out = QuantCompare()
    files: dict[Path, object] = {}

    def read(root: Path, info: TensorInfo, start: int = 0, n: int | None = None) -> torch.Tensor:
        n = info.nbytes - start if n is None else n
        buf = torch.empty(n, dtype=torch.uint8)
        path = root / info.file
        if path not in files:
            files[path] = open(path, "rb", buffering=0)  # noqa: SIM115  (closed below)
        read_into(files[path], info.offset + start, memoryview(buf.numpy()), path)
        return buf

    try:
        for name in names:
            t = planned[name]
            got = ckpt.tensors[name]
            if isinstance(t.op, QuantBlockFp8):
                rows, cols = t.shape
                item = Item(t.op, 0, t.source.nbytes, rows, cols, t.source.dtype, t.dtype, name=name)
                try:
                    q, s = CpuBackend._quant(read(src.root, t.source), item)
                except Dsv3Error as exc:
                    out.differ[name] = f"the source cannot be quantized: {exc}"
                    continue
                s_info = ckpt.tensors[t.op.scale_name]
                q_got, s_got = read(ckpt.root, got), read(ckpt.root, s_info)
                q_want, s_want = torch.frombuffer(q, dtype=torch.uint8), torch.frombuffer(s, dtype=torch.uint8)
                bad_q, bad_s = int((q_got != q_want).sum()), _elements_differ(s_got, s_want, s_info.dtype)
                if bad_q or bad_s:
                    out.differ[name] = (f"{bad_q:,} of {got.numel:,} e4m3 codes and {bad_s:,} of "
                                        f"{s_info.numel:,} scales differ from quant of the source")
                out.quantized += 1
            else:
                n_bad = 0
                for start in range(0, got.nbytes, COPY_CHUNK):
                    n = min(COPY_CHUNK, got.nbytes - start)
                    n_bad += int((read(ckpt.root, got, start, n) != read(src.root, t.source, start, n)).sum())
                if n_bad:
                    out.differ[name] = f"{n_bad:,} of {got.nbytes:,} bytes differ from the copied source"
                out.copied += 1
    finally:
        for f in files.values():
            f.close()
    return out


def _elements_differ(a: torch.Tensor, b: torch.Tensor, dtype: str) -> int:
    size = DTYPE_SIZES[dtype]
    return int((a.view(-1, size) != b.view(-1, size)).any(dim=1).sum())
