"""The plan model: every byte of output decided from headers and options, before the first write.

A plan is pure data: which output file holds which tensor, the source tensors each is made from and its
operation (`ops`), the output dtype and byte range, the new index and config, and the files copied
alongside. The planners (`dequant`, `quant`, `split_mtp`) make plans from an opened checkpoint without
touching the file system; the runner carries a plan out; `--dry-run` prints it. The helpers below are
shared by the planners.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from pathlib import Path

from dsv3conv.checkpoint import Checkpoint, TensorInfo
from dsv3conv.checks import layer_problems
from dsv3conv.dtypes import DTYPE_SIZES
from dsv3conv.errors import Dsv3Error, UsageError, counted, refuse, short
from dsv3conv.formats import classify
from dsv3conv.ops import Copy, Op, QuantScale
from dsv3conv.safetensors_format import build_header

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, dtype and shape, the source tensors it is made from, and how (`op`).

    `sources[0]` is the tensor converted or copied; a `DequantBlockFp8` reads its scale from `sources[1]`;
    a `QuantScale` reads nothing (its weight's pieces write it).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Op
    sources: tuple[TensorInfo, ...]

    @property
    def source(self) -> TensorInfo:
        return self.sources[0]

    @cached_property  # asked for again and again when a plan of ~100,000 tensors is summed up
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def converts(self) -> bool:
        """Computed from its source (dequantized or quantized), not copied; a scale emitted counts as neither."""
        return self.op.converts


def copied(info: TensorInfo, name: str | None = None, scale: bool = False) -> TensorPlan:
    """A source tensor written byte for byte, optionally under a new name; a `scale` is checked on the way."""
    return TensorPlan(name or info.name, info.dtype, info.shape, Copy(scale), (info,))


@dataclass(frozen=True)
class FilePlan:
    """One output shard: its name, its tensors in write order, its exact header bytes."""

    name: str
    tensors: tuple[TensorPlan, ...]
    header: bytes
    copy_of: str | None = None  # a source shard copied unchanged, byte for byte

    @cached_property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    source: Path
    dest: Path
    files: list[FilePlan]
    index: dict | None  # the index JSON to write (None for a single-file output)
    config: dict | None
    config_changes: list[str]
    extra_files: list[str]
    dropped: list[str] = field(default_factory=list)  # source tensors not written (scales, MTP)
    # The options that decide the output's bytes and layout, by parameter name: `--resume` holds DST to them.
    # Those that change only speed or where it runs (device, threads, buffers, part) are not here.
    options: dict = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for f in self.files for t in f.tensors)

    @property
    def bytes_in(self) -> int:
        return sum(s.nbytes for f in self.files for t in f.tensors for s in t.sources)

    @property
    def converted(self) -> int:
        return sum(t.converts for f in self.files for t in f.tensors)

    @property
    def copied(self) -> int:
        return sum(isinstance(t.op, Copy) for f in self.files for t in f.tensors)

    def summary(self) -> dict:
        return {
            "source": str(self.source), "output": str(self.dest), "shards": len(self.files),
            "tensors_converted": self.converted, "tensors_copied": self.copied, "tensors_dropped": len(self.dropped),
            "bytes_in": self.bytes_in, "bytes_out": sum(f.size for f in self.files), "total_size": self.total_size,
            "config_changes": self.config_changes, "extra_files": self.extra_files,
        }


MAX_PARTS = 10_000  # jobs of one array; more would be shards of a few bytes each
MAX_SHARD_SIZE = 10**15
BUFFER_RANGE = (1 << 20, 16 << 30)  # --buffer-size: 1 MiB (per-batch overhead) .. 16 GiB (x5 resident)
MIN_BUFFER_BYTES = 4096  # the smallest a program may pass as an integer (tests: many batches per tensor)


def parse_part(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2/3' (or (2, 3)) -> (2, 3): part 2 of 3 (1-based), as a job array index would give it."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*", value)
        k, n = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    else:
        k, n = value if isinstance(value, tuple) and len(value) == 2 else (0, 0)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (k, n)) or not 1 <= k <= n <= MAX_PARTS:
        raise UsageError(f"{{part}} {short(value)}: give K/N with 1 <= K <= N <= {MAX_PARTS}, e.g. {{part}} 2/8", "part")
    return k, n


def assign_parts(files: list[FilePlan], n_parts: int) -> list[int]:
    """Part (1-based) of each output file: largest first to the lightest part, so parts end together.

    Deterministic: every job of an array computes the same assignment from the same plan. Ties go to the
    lowest part number, so only the first len(files) parts can receive a file: work and memory depend on the
    number of files, never on `n_parts`.
    """
    lightest = [(0, k) for k in range(min(n_parts, len(files)))]  # (load, part index): a heap
    part = [0] * len(files)
    for i in sorted(range(len(files)), key=lambda i: (-files[i].size, files[i].name)):
        load, k = heapq.heappop(lightest)
        part[i] = k + 1
        heapq.heappush(lightest, (load + files[i].size, k))
    return part


def parse_size(text: str, param: str = "max_shard_size", limits: tuple[int, int] = (1, MAX_SHARD_SIZE)) -> int:
    """'5GB', '500MB', '4GiB', '123' -> bytes, refused outside `limits` (inclusive); `param` names the parameter."""
    m = re.fullmatch(r"\s*([0-9]{1,16}(?:\.[0-9]{1,6})?)\s*([KMGTP]?)(I?B?)\s*", text.upper())
    if not m:
        raise UsageError(f"{{{param}}} {short(text)}: give a size such as 5GB, 500MB or 4GiB", param)
    power = " KMGTP".index(m.group(2) or " ")
    base = 1024 if m.group(3).startswith("I") else 1000
    size = int(Decimal(m.group(1)) * base**power)
    if not limits[0] <= size <= limits[1]:
        raise UsageError(f"{{{param}}} {short(text)}: give a size from {_size_text(limits[0])} to {_size_text(limits[1])}",
                         param)
    return size


def _size_text(n: int) -> str:
    for unit, factor in (("PB", 10**15), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return counted(n, "byte")


EVERYWHERE = "the index and from every shard"


def require_fp8_pairs(tensors: Mapping[str, TensorInfo], where: str = EVERYWHERE) -> None:
    """Every quantized weight of `tensors` (block FP8 in any scale naming, packed FP4) has a usable scale and
    every scale a weight, or they are refused (`formats.classify`).

    `where`: what the tensors are, for the message of a missing scale ("missing from `where`").
    """
    problems = classify(tensors).problems
    if problems:
        raise Dsv3Error(problems[0].replace(f"missing from {EVERYWHERE}", f"missing from {where}") + more(problems))


def check_layers(ckpt: Checkpoint, config: dict) -> None:
    """The config's layer counts must match the tensors, or MTP handling would be wrong (dsv3conv.checks)."""
    refuse(layer_problems(ckpt.tensors, config, ckpt.root / "config.json"))


def more(items: list) -> str:
    """' (and N more)' after the first of `items` named in a message."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def shard_files(groups: list[tuple[str, list[TensorPlan]]], max_shard_size: int | None) -> list[FilePlan]:
    """Keep the source's shard names (less emptied ones), or re-shard to at most `max_shard_size` bytes."""
    if max_shard_size is None:
        return [file_plan(name, entries) for name, entries in groups if entries]
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or not (
            1 <= max_shard_size <= MAX_SHARD_SIZE):
        raise UsageError(f"{{max_shard_size}} {short(max_shard_size)}: must be positive, at most {MAX_SHARD_SIZE} bytes",
                         "max_shard_size")
    chunks: list[list[TensorPlan]] = [[]]
    size = 0
    for _, entries in groups:
        for t in entries:
            if chunks[-1] and size + t.nbytes > max_shard_size and not isinstance(t.op, QuantScale):  # with its weight
                chunks.append([])
                size = 0
            chunks[-1].append(t)
            size += t.nbytes
    n = len(chunks)
    return [file_plan(f"model-{k + 1:05d}-of-{n:05d}.safetensors", c) for k, c in enumerate(chunks)]


def file_plan(name: str, entries: list[TensorPlan]) -> FilePlan:
    """An output shard written tensor by tensor, in the order of `entries`."""
    header, _ = build_header([(t.name, t.dtype, t.shape) for t in entries], SHARD_METADATA)
    return FilePlan(name, tuple(entries), header)


def index_json(ckpt: Checkpoint, files: list[FilePlan]) -> dict:
    """The output's index: the source's metadata with the new total_size, and the new weight map."""
    metadata = dict((ckpt.index or {}).get("metadata") or {})
    metadata["total_size"] = sum(t.nbytes for f in files for t in f.tensors)
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


