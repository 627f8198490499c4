"""The output directory: kept apart from the source, prepared, locked, and cleaned of partial files.

Apart means apart on disk, not as path strings: a bind mount, a second mount of one volume or a symlinked
ancestor can make two different strings name one directory. `check_dest` compares the device and inode of
each existing ancestor of one path with the other path's, both ways.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dsv3conv.errors import Dsv3Error, UsageError
from dsv3conv.writer import PARTIAL_SUFFIX, nearest_existing, partial_path

LOCK_NAME = ".dsv3conv.lock"
FINALIZE_LOCK_NAME = ".dsv3conv.finalize.lock"
PLAN_NAME = ".dsv3conv.plan"  # the plan DST is written under: source, options, output files (kept when done)

if TYPE_CHECKING:
    from dsv3conv.plan import FilePlan, Plan


# ----------------------------------------------------------------------------------------- identity
def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing directory or file, following links; None if absent."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def _routes(path: Path) -> list[tuple[tuple[int, int], tuple[str, ...]]]:
    """Each existing ancestor of the path (itself included) as (its identity, the names from it to the path).

    The path is resolved first, so `..` and symlinks are taken as the kernel takes them; a missing tail (an
    output directory not created yet) stays as names under its deepest existing ancestor. Innermost first.
    """
    resolved = Path(os.path.realpath(path))
    routes = []
    for ancestor in (resolved, *resolved.parents):
        ident = _identity(ancestor)
        if ident is not None:
            routes.append((ident, resolved.relative_to(ancestor).parts))
    return routes


def _within(a: Path, b: Path) -> bool:
    """`a` is `b` or lies inside it: some ancestor of `a` is, on disk, `b`'s deepest existing ancestor, and
    the rest of `a`'s route starts with the rest of `b`'s."""
    routes_b = _routes(b)
    if not routes_b:
        return False
    id_b, tail_b = routes_b[0]
    return any(ident == id_b and rel[: len(tail_b)] == tail_b for ident, rel in _routes(a))


def overlaps(a: Path, b: Path) -> bool:
    """True when `a` and `b` are one directory on disk, or one is inside the other (by any route)."""
    return _within(a, b) or _within(b, a)


def check_dest(source: Path, dest: Path) -> None:
    """The output must not be the source directory, inside it, or hold it, by any route on disk."""
    if overlaps(source, dest):
        raise UsageError(
            f"{dest}: the output must not be the input directory or inside it, nor contain it ({source}; compared "
            "on disk, through symlinks and bind mounts); choose another path"
        )
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a directory; choose another output path")


def check_apart(a: Path, b: Path, what_a: str, what_b: str) -> None:
    """Two outputs of one command must be separate directories on disk, neither inside the other."""
    if overlaps(a, b):
        raise UsageError(f"{what_a} {a} and {what_b} {b} must be separate directories, neither inside the other "
                         "(compared on disk, through symlinks and bind mounts); choose two separate paths")


# ------------------------------------------------------------------------------------ preparing DST
def prepare_dest(dest: Path, *, resume: bool, overwrite: bool, source: Path | None = None,
                 create: bool = True) -> None:
    """DST must be absent or empty, unless resuming or overwriting. Created here; with `create=False` (a dry
    run, or the check before a run starts) the same refusals, nothing created.

    With `source`, the aliasing check runs again once DST exists (it may have been created meanwhile).
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pick one")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a directory; choose another output path")
    if not create and not dest.exists():
        _require_creatable(dest)
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Dsv3Error(f"{dest}: cannot create the output directory ({exc.strerror}); choose a writable path") from None
    if source is not None:
        check_dest(source, dest)
    if not os.access(dest, os.W_OK | os.X_OK):
        raise Dsv3Error(f"{dest}: output directory is not writable; fix its permissions or choose another path")
    if held_files(dest) and not (resume or overwrite):
        raise UsageError(
            f"{dest}: output directory is not empty; pass --resume to finish an earlier run or --overwrite to replace it"
        )


def held_files(dest: Path) -> list[Path]:
    """What DST holds besides this tool's lock and plan record: output (partial files included) or other files."""
    ours = (FINALIZE_LOCK_NAME, PLAN_NAME)
    return [p for p in dest.iterdir() if not p.name.startswith(LOCK_NAME) and p.name not in ours]


def _require_creatable(dest: Path) -> None:
    """A DST not made yet: the run would create it under its nearest existing ancestor, which must be a
    directory this process can write (refused now, as the run would refuse it later)."""
    parent = nearest_existing(dest.absolute().parent)
    if not parent.is_dir():
        reason = f"{parent} is not a directory"
    elif not os.access(parent, os.W_OK | os.X_OK):
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        reason = f"{parent} is on a read-only file system" if read_only else f"{parent} is not writable"
    else:
        return
    raise Dsv3Error(f"{dest}: cannot create the output directory ({reason}); choose a writable path")


class DestLock:
    """An exclusive lock on DST (or on one part of it): a second run refuses instead of corrupting it.

    `wait=True` blocks instead (used around the final index/config write that parts may reach together).
    """

    def __init__(self, dest: Path, name: str = LOCK_NAME, wait: bool = False):
        self.path = dest / name
        self.wait = wait
        self._fd = -1

    def __enter__(self) -> "DestLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise Dsv3Error(
                    f"{self.path.parent}: another dsv3conv run is writing here (lock {self.path}); wait for it"
                ) from None
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                return self
            os.close(fd)  # we locked a file the previous holder has just removed: lock the current one

    def __exit__(self, *exc) -> None:
        # Unlink while holding the lock; a run that opened the old file finds it removed and tries again.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)


def remove_partials(dest: Path, files: list[FilePlan] | None = None) -> None:
    """Remove leftovers of interrupted runs: all of them, or only those of `files` (another part may be running)."""
    paths = dest.glob(".*" + PARTIAL_SUFFIX) if files is None else (partial_path(dest / f.name) for f in files)
    for p in paths:
        p.unlink(missing_ok=True)


def is_complete(path: Path, file: FilePlan) -> bool:
    """A file under its final name is complete when its size and header are exactly what the plan says."""
    try:
        if path.stat().st_size != file.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(file.header)) == file.header
    except OSError:
        return False


# ------------------------------------------------------------------------------- the plan DST is under
def plan_record(plan: Plan) -> dict:
    """What a resumed run must share with the run that wrote DST: the source directory, the options that decide
    the output (`Plan.options`), every output file's name and header (tensors, dtypes, offsets), config.json
    and the files copied alongside. A source file may change in between (a damaged shard replaced: the
    documented way to finish a failed run). Kept once DST is complete, so a later `--resume` is the same job;
    it holds digests and option values, no path (DST may be published as it is)."""
    return {
        "source": _digest(os.path.realpath(plan.source).encode()),
        "options": plan.options,
        "output_files": {f.name: _digest(f.header) for f in plan.files},
        "config": _digest(json.dumps(plan.config, sort_keys=True).encode()),
        "extra_files": list(plan.extra_files),
    }


def check_claim(plan: Plan) -> dict | None:
    """Refuse to resume DST begun under another plan, naming what differs (the options first); return the
    record DST holds.

    Without a record (DST left by a run stopped before it began, or by a version of this tool that kept none
    once done), output shards the plan does not hold are refused: they would stay beside the new ones.
    """
    path = plan.dest / PLAN_NAME
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        before = None
    except (OSError, ValueError):
        before = {}  # unreadable: another plan as far as can be told
    now = plan_record(plan)
    if before is None:
        names = set(now["output_files"])
        stray = sorted(p.name for p in plan.dest.glob("*.safetensors") if p.name not in names)
        if stray:
            raise UsageError(f"{plan.dest}: cannot resume, it holds shards this run would not write ({_few(stray)}): "
                             "it was written with other options or from another source; rerun with those, or "
                             "{overwrite} to start again", "overwrite")
        return None
    diffs, options = _differences(before if isinstance(before, dict) else {}, now, plan.source)
    if diffs:
        raise UsageError(f"{plan.dest}: cannot resume, begun under another plan ({'; '.join(diffs)}); rerun with "
                         "that run's source and options, or {overwrite} to start again", *options, "overwrite")
    return before


def claim_dest(plan: Plan, *, resume: bool) -> None:
    """Record the plan in DST before the first output file; resuming (or a part), first `check_claim`."""
    if not resume:
        _write_record(plan.dest / PLAN_NAME, plan_record(plan), replace=True)
        return
    before = check_claim(plan)
    if before is None and not _write_record(plan.dest / PLAN_NAME, plan_record(plan), replace=False):
        check_claim(plan)  # another part recorded its plan meanwhile: hold this one to it
    elif before is not None and before != plan_record(plan):  # an earlier version's record of this job
        _write_record(plan.dest / PLAN_NAME, plan_record(plan), replace=True, shared=True)  # today's form: no path


def release_dest(dest: Path) -> None:
    """A record no run holds any more (left by a run stopped before its first shard) goes."""
    (dest / PLAN_NAME).unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _write_record(path: Path, record: dict, *, replace: bool, shared: bool = False) -> bool:
    """Write the record atomically; without `replace`, only if none exists (False if one does). `shared`: parts
    may write it at once, each through a temporary name of its own."""
    from dsv3conv.writer import write_bytes_atomic

    data = (json.dumps(record, indent=1) + "\n").encode()
    if replace and not shared:
        write_bytes_atomic(path, data)
        return True
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # published only if absent: parts starting together agree on one record
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _differences(before: dict, now: dict, source: Path) -> tuple[list[str], list[str]]:
    """What differs between two plan records, in words (the first few names of each kind), and the options
    named in them. Options that differ say it: the shards and config they change are not listed again."""
    diffs = []
    if before.get("source") not in (now["source"], os.path.realpath(source)):  # an earlier version kept the path
        diffs.append(f"another source than that run's, now {os.path.realpath(source)}")
    old_options = before.get("options")
    if isinstance(old_options, dict):  # a record without them (an earlier version): held to what they make
        options = [k for k, v in now["options"].items() if old_options.get(k) != v]
        if options:
            return diffs + [f"{{{k}}} {_value(old_options.get(k))}, now {_value(now['options'][k])}"
                            for k in options], options
    old_out, new_out = before.get("output_files") or {}, now["output_files"]
    if not isinstance(old_out, dict):
        old_out = {}
    gone, added = sorted(set(old_out) - set(new_out)), sorted(set(new_out) - set(old_out))
    if gone or added:
        diffs.append(f"output shards {len(old_out)} before, {len(new_out)} now"
                     + (f"; not planned now: {_few(gone)}" if gone else ""))
    other = sorted(n for n in set(old_out) & set(new_out) if old_out[n] != new_out[n])
    if other:
        diffs.append(f"other tensors or dtypes in {_few(other)}")
    if before.get("config") != now["config"]:
        diffs.append("another config.json")
    if before.get("extra_files") != now["extra_files"]:
        diffs.append("other files copied alongside")
    return diffs, []


def _value(value) -> str:
    """An option's value as a message shows it."""
    if value is None:
        return "not given"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
