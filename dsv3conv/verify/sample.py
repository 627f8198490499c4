"""Which tensors the data scan reads: a deterministic sample (or all), every scale, in file order."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

from dsv3conv.checkpoint import Checkpoint
from dsv3conv.ops import QuantScale
from dsv3conv.plan import TensorPlan
from dsv3conv.verify.scan import Task


def choose(names: list[str], group: Callable[[str], object], fraction: float | None) -> list[str]:
    """Deterministic sample: names in the order of a hash of each name, the first ceil(fraction * n), then
    the first of every group (dtype, ...) not yet represented. `fraction` None: every name."""
    if fraction is None:
        return list(names)
    order = sorted(names, key=lambda n: hashlib.blake2b(n.encode(), digest_size=8).digest())
    k = math.ceil(fraction * len(order))
    chosen = order[:k]
    seen = {group(n) for n in chosen}
    for n in order[k:]:
        g = group(n)
        if g not in seen:
            seen.add(g)
            chosen.append(n)
    return chosen


def tasks(ckpt: Checkpoint, compared: dict[str, TensorPlan], fraction: float | None,
          shards: list[str] | None, scales: set[str]) -> list[Task]:
    """The sample of CKPT's tensors (at least one per dtype and operation) and all its `scales`, in the files
    of `shards` (None: all), each with its plan when it is compared; sorted to read each shard front to back.

    The sample is the whole run's, cut to the part: the parts of a job array add up to it."""
    def group(n: str) -> tuple:
        t = compared.get(n)
        return ckpt.tensors[n].dtype, None if t is None else type(t.op).__name__

    def plan(n: str) -> TensorPlan | None:
        t = compared.get(n)
        return None if t is None or isinstance(t.op, QuantScale) else t  # compared with its weight

    pool = [n for n in ckpt.tensors if n not in scales]
    chosen = [Task(ckpt.tensors[n], plan(n), True) for n in choose(pool, group, fraction)]
    chosen += [Task(t, plan(n), False) for n, t in ckpt.tensors.items() if n in scales]
    if shards is not None:
        in_part = set(shards)
        chosen = [t for t in chosen if t.info.file in in_part]
    return sorted(chosen, key=lambda t: (t.info.file, t.info.offset))
