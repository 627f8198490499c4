"""`verify_checkpoint`: the checks in order, from the options to the report."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint, require_dir
from dsv3conv.checks import formats_of, scale_tensors, shard_files
from dsv3conv.errors import Dsv3Error, UsageError, counted
from dsv3conv.ops import EMITS_SCALE, QuantScale
from dsv3conv.plan import assign_parts, parse_part
from dsv3conv.verify.against import config_check, misformed, source_check, tensor_set_check
from dsv3conv.verify.alone import header_checks
from dsv3conv.verify.claim import Claim, claim
from dsv3conv.verify.data import data_check, values_check
from dsv3conv.verify.report import Check, result
from dsv3conv.verify.sample import tasks as choose_tasks
from dsv3conv.verify.scan import scan

DEFAULT_SAMPLE = 0.05
CHUNK_BYTES = 32 * 1024 * 1024


def verify_checkpoint(
    ckpt_path: str | os.PathLike, against: str | os.PathLike | None = None, sample: float | None = None,
    full: bool = False, device: str = "cpu", progress: bool = False, chunk_bytes: int = CHUNK_BYTES,
    part: str | None = None,
) -> dict:
    """Check `ckpt_path` (and, with `against`, that it is what the conversion it claims to be makes of it).

    `sample`: the fraction of tensors whose data is read (default 0.05); `full`: read every tensor.
    `part`: "K/N": read only the data of the shards assigned to part K of N (the header checks run whole).
    Returns `{"ok": bool, "checks": [{"name", "ok", "detail"}], "mismatches": [tensor names]}`, with `part`
    also `"part": "K/N"` and `"part_shards": [file names]`; problems in the data are reported there, never
    raised. Raises UsageError for impossible requests.
    """
    k_n = parse_part(part)
    fraction = _fraction(sample, full)
    if chunk_bytes <= 0:
        raise UsageError(f"chunk_bytes {chunk_bytes}: must be positive")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r}: verify runs on one device: choose auto, cpu, cuda or cuda:N")
    root = require_dir(ckpt_path, "CKPT")
    src_root = require_dir(against, "--against") if against is not None else None
    try:
        ckpt = Checkpoint.open(root)
    except Dsv3Error as exc:
        return result([Check("files", False, str(exc))], [], k_n, [])
    shards = part_shards(ckpt, *k_n) if k_n is not None else None
    formats = formats_of(ckpt)
    scales = scale_tensors(formats)
    checks = header_checks(ckpt, formats)
    against_checks, c, src = _against(ckpt, src_root)
    compared = _comparable(ckpt, c)
    todo = choose_tasks(ckpt, compared, fraction, shards, scales)
    results, used = scan(ckpt, src_root if src is not None else None, todo, device, chunk_bytes, progress)
    data_checks = [values_check(results, todo, ckpt, fraction, shards, against is not None, scales)]
    mismatches = set(misformed(ckpt, c)) if c is not None else set()
    if c is not None:  # the source opened (else its check says why, and nothing is compared)
        pool = sum(not isinstance(t.op, QuantScale) and (shards is None or ckpt.tensors[n].file in shards)
                   for n, t in compared.items())
        what = {"quant": "quant of the source", "dequant --experts fp8": "the repack of the source"}.get(c.kind, "the source")
        data_checks.append(data_check(results, todo, pool, fraction, used, what) if c.plan is not None
                           else Check("data_vs_source", False, f"not compared: {c.error}"))
        mismatches |= {t.info.name for t in todo if t.planned is not None and (
            results[t.info.name].differ or results[t.info.name].scale_differ)}
    if k_n is not None:
        where = f" [part {k_n[0]}/{k_n[1]}: {len(shards)} of {counted(len(shard_files(ckpt)), 'shard')}]"
        data_checks = [Check(d.name, d.ok, d.detail + where) for d in data_checks]
    return result(checks + data_checks[:1] + against_checks + data_checks[1:], sorted(mismatches), k_n, shards)


def _against(ckpt: Checkpoint, src_root: Path | None) -> tuple[list[Check], Claim | None, Checkpoint | None]:
    """source, tensor_set and config_vs_source; the claim they were held to, and the source."""
    if src_root is None:
        return [], None, None
    try:
        src = Checkpoint.open(src_root)
    except Dsv3Error as exc:
        return [Check("source", False, str(exc))], None, None
    c = claim(ckpt, src)
    return [source_check(src), tensor_set_check(ckpt, c), config_check(ckpt, src, c)], c, src


def _comparable(ckpt: Checkpoint, c: Claim | None) -> dict:
    """The planned tensors CKPT holds as planned (a quantized weight: with its scale as planned too)."""
    if c is None:
        return {}
    bad = misformed(ckpt, c)
    ok = {n: t for n, t in c.planned.items() if n in ckpt.tensors and n not in bad}
    return {n: t for n, t in ok.items() if not isinstance(t.op, EMITS_SCALE) or t.op.scale_name in ok}


def _fraction(sample: float | None, full: bool) -> float | None:
    if full and sample is not None:
        raise UsageError("--sample and --full exclude each other; pick one")
    fraction = None if full else (DEFAULT_SAMPLE if sample is None else float(sample))
    if fraction is not None and not 0 < fraction <= 1:
        raise UsageError(f"--sample {sample}: give a fraction of the tensors in (0, 1], such as 0.05, or --full")
    return fraction


def part_shards(ckpt: Checkpoint, k: int, n: int) -> list[str]:
    """The shard files of part `k` of `n`: largest first to the lightest part, ties by name (assign_parts)."""
    names = sorted(shard_files(ckpt))
    sized = []
    for name in names:
        shard = ckpt.shards.get(name)
        path = ckpt.root / name
        size = shard.file_size if shard is not None else (path.stat().st_size if path.is_file() else 0)
        sized.append(_SizedFile(name, size))
    return [name for name, p in zip(names, assign_parts(sized, n)) if p == k]


class _SizedFile:
    """What plan.assign_parts reads of a file: its name and size."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size
