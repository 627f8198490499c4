"""`verify-combine`: merge the JSON reports of `verify --part K/N` for K = 1..N into one report.

Each report is checked against the schema `verify --part K/N --json` writes before anything is merged:
`{"ok": bool, "part": "K/N", "part_shards": [str], "checks": [{"name": str, "ok": bool, "detail": str}],
"mismatches": [str]}`. A report that is not one is refused with one line naming the file and what is wrong.
Work never grows with N itself: a missing part is named (the first few) and the rest counted.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from dsv3conv.errors import Dsv3Error, UsageError, counted
from dsv3conv.verify.report import Check, result

MAX_REPORT_BYTES = 256 * 1024 * 1024
PART_RE = re.compile(r"(\d{1,18})/(\d{1,18})")
SHOWN = 3  # missing parts named before the rest are counted
_FIELDS = {"ok": bool, "part": str, "part_shards": list, "checks": list, "mismatches": list}
_CHECK_FIELDS = {"name": str, "ok": bool, "detail": str}


def combine_reports(paths: list[str | os.PathLike]) -> dict:
    """One report from every part's: a check passes only if it passes in every part; mismatches are the union.

    Every part must be there exactly once, all of the same N. Raises Dsv3Error (exit 1) for a missing,
    repeated, unreadable or malformed report.
    """
    if not paths:
        raise UsageError("verify-combine: give the JSON reports of `verify --part K/N --json`, one per part")
    by_part: dict[int, dict] = {}
    n_parts: int | None = None
    for path in map(Path, paths):
        report, k, n = read_report(path)
        if n_parts is not None and n != n_parts:
            raise Dsv3Error(f"{path}: part {k}/{n}, but the other reports are parts of {n_parts}")
        n_parts = n
        if k in by_part:
            raise Dsv3Error(f"part {k}/{n} given twice ({by_part[k]['_path']} and {path}); give each part once")
        by_part[k] = {**report, "_path": str(path)}
    _require_all(by_part, n_parts)
    _require_disjoint(by_part, n_parts)
    report = result(_merge_checks(by_part, n_parts), sorted({m for r in by_part.values() for m in r["mismatches"]}))
    report["parts"] = n_parts
    return report


def read_report(path: Path) -> tuple[dict, int, int]:
    """A part report, its K and N; Dsv3Error naming the file and the first thing wrong with it."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise Dsv3Error(f"{path}: not a regular file; give the saved output of `verify --part K/N --json`")
        if st.st_size > MAX_REPORT_BYTES:
            raise Dsv3Error(f"{path}: {st.st_size:,} bytes, far larger than a verify report; give the saved "
                            "output of `verify --part K/N --json`")
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise Dsv3Error(f"{path}: not a JSON report ({exc.__class__.__name__}: {str(exc)[:80]}); save "
                        "`verify --part K/N --json` output") from exc
    except OSError as exc:
        raise Dsv3Error(f"{path}: unreadable ({exc.strerror}); give the saved output of `verify --part K/N --json`") \
            from exc
    problem = schema_problem(report)
    if problem:
        raise Dsv3Error(f"{path}: not the JSON report of `verify --part K/N --json`: {problem}")
    k, n = (int(g) for g in PART_RE.fullmatch(report["part"]).groups())
    return report, k, n


def schema_problem(report: object) -> str:
    """What makes `report` not a part report, in a few words; empty when it is one."""
    if not isinstance(report, dict):
        return f"the file holds {_kind(report)}, not an object"
    for key, kind in _FIELDS.items():
        if key not in report:
            return f"`{key}` is missing"
        if not isinstance(report[key], kind):
            return f"`{key}` is {_kind(report[key])}, not {_kind(kind())}"
    m = PART_RE.fullmatch(report["part"])
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        return f"`part` is {_short(report['part'])}, not K/N with 1 <= K <= N"
    for key in ("part_shards", "mismatches"):
        bad = next((i for i, v in enumerate(report[key]) if not isinstance(v, str)), None)
        if bad is not None:
            return f"`{key}[{bad}]` is {_kind(report[key][bad])}, not a string"
    names: set[str] = set()
    for i, c in enumerate(report["checks"]):
        if not isinstance(c, dict):
            return f"`checks[{i}]` is {_kind(c)}, not an object"
        for key, kind in _CHECK_FIELDS.items():
            if not isinstance(c.get(key), kind):
                return f"`checks[{i}].{key}` is " + ("missing" if key not in c else f"{_kind(c[key])}, not "
                                                                                    f"{_kind(kind())}")
        if c["name"] in names:
            return f"check `{_short(c['name'])}` appears twice"
        names.add(c["name"])
    return ""


def _require_all(by_part: dict[int, dict], n: int) -> None:
    """Every part 1..n is there; the first few missing are named, the rest counted (never a list of n)."""
    if len(by_part) == n:
        return
    missing: list[int] = []
    k = 1
    while len(missing) < SHOWN and k <= n:
        if k not in by_part:
            missing.append(k)
        k += 1
    names = ", ".join(f"{k}/{n}" for k in missing)
    rest = n - len(by_part) - len(missing)
    more = f" (and {counted(rest, 'more part')})" if rest else ""
    raise Dsv3Error(f"no report for part {names}{more}; run `verify --part K/N --json` for it and combine again")


def _require_disjoint(by_part: dict[int, dict], n: int) -> None:
    owner: dict[str, int] = {}
    for k in sorted(by_part):
        for shard in by_part[k]["part_shards"]:
            if shard in owner:
                raise Dsv3Error(f"shard {shard} is in parts {owner[shard]}/{n} and {k}/{n}: "
                                "the reports are not of one checkpoint")
            owner[shard] = k


def _merge_checks(by_part: dict[int, dict], n: int) -> list[Check]:
    order: list[str] = []
    per_name: dict[str, dict[int, dict]] = {}
    for k in sorted(by_part):
        for c in by_part[k]["checks"]:
            if c["name"] not in per_name:
                order.append(c["name"])
                per_name[c["name"]] = {}
            per_name[c["name"]][k] = c
    checks = []
    for name in order:
        got = per_name[name]
        absent = [k for k in sorted(by_part) if k not in got]
        ok = not absent and all(c["ok"] for c in got.values())
        details = {c["detail"] for c in got.values()}
        if len(details) == 1 and not absent:
            detail = details.pop()
        else:
            shown = [k for k in sorted(got) if ok or not got[k]["ok"]]
            detail = "; ".join(f"part {k}/{n}: {got[k]['detail']}" for k in shown)
            detail += "".join(f"; part {k}/{n}: not run" for k in absent)
        checks.append(Check(name, ok, detail.lstrip("; ")))
    return checks


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 40) -> str:
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
