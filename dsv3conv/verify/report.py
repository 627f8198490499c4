"""The report of `verify`: named checks (pass/fail and a one-line detail), the tensors that differ, and the
text helpers that keep every detail one readable line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from dsv3conv.errors import Problem, counted

LIST_LIMIT = 5  # names shown in one check's detail before "(and N more)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def check_of(name: str, problems: list[Problem], passed: str) -> Check:
    """A check that fails with its problems' lines, or passes with `passed`."""
    if problems:
        return Check(name, False, join([p.text for p in problems]))
    return Check(name, True, passed)


def result(checks: list[Check], mismatches: list[str], k_n: tuple[int, int] | None = None,
           shards: list[str] | None = None) -> dict:
    """The JSON report: `{"ok", "checks", "mismatches"}`, with `part` also `"part"` and `"part_shards"`."""
    report = {"ok": all(c.ok for c in checks), "checks": [c.as_dict() for c in checks], "mismatches": mismatches}
    if k_n is not None:
        report["part"] = f"{k_n[0]}/{k_n[1]}"
        report["part_shards"] = list(shards or [])
    return report


def names(items: list[str], limit: int = LIST_LIMIT) -> str:
    shown = ", ".join(f"`{n}`" for n in items[:limit])
    return shown + (f" (and {len(items) - limit:,} more)" if len(items) > limit else "")


def join(lines: list[str], limit: int = 10) -> str:
    text = "; ".join(lines[:limit])
    return text + (f" (and {counted(len(lines) - limit, 'more problem')})" if len(lines) > limit else "")


def where(flat: int, shape: tuple[int, ...]) -> str:
    """Element `flat` of a tensor of `shape` as an index: 1000 of [144, 200] -> '[5, 0]'."""
    idx = []
    for dim in reversed(shape):
        idx.append(flat % dim if dim else 0)
        flat //= dim if dim else 1
    return "[" + ", ".join(map(str, reversed(idx))) + "]"


def fmt_diff(x: float) -> str:
    return "inf (NaN or Inf on one side)" if math.isinf(x) else f"{x:.6g}"


def short_json(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def config_diffs(want: dict, got: dict, prefix: str = "") -> list[str]:
    """One line per differing key of two config.json objects; nested objects (quantization_config) key by key."""
    missing = object()
    diffs = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key, missing), got.get(key, missing)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diffs(a, b, f"{prefix}{key}.")
            continue
        shown_a = "absent" if a is missing else short_json(a)
        shown_b = "absent" if b is missing else short_json(b)
        diffs.append(f"`{prefix}{key}`: expected {shown_a}, found {shown_b}")
    return diffs
