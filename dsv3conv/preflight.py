"""Would this run start? Free space on the destination, checked before any work and by `--dry-run`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

from dsv3conv.errors import Dsv3Error
from dsv3conv.plan import FilePlan, Plan
from dsv3conv.writer import nearest_existing


def space_needed(plan: Plan, files: list[FilePlan], *, resume: bool, overwrite: bool) -> int:
    """Bytes this run adds to DST: its output files and the other files it copies, less what is already there
    (a file of the planned size is kept by --resume; --overwrite deletes the old shards first)."""
    needed = sum(f.size for f in files)
    needed += sum((plan.source / rel).stat().st_size for rel in plan.extra_files if (plan.source / rel).exists())
    if plan.dest.is_dir():
        for f in files:
            old = plan.dest / f.name
            if old.is_file() and (overwrite or (resume and old.stat().st_size == f.size)):
                needed -= old.stat().st_size
    return max(needed, 0)


def space_free(dest: Path) -> int | None:
    """Free bytes on the filesystem that will hold `dest` (its nearest existing ancestor when it is absent);
    None where nothing can be written (the run refuses that with its own message)."""
    where = nearest_existing(dest)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        return None
    return shutil.disk_usage(where).free


def check_space(dest: Path, needed: int, free: int | None) -> None:
    if free is not None and needed > free:
        raise Dsv3Error(f"{dest}: this run needs {_size(needed)} of free space and {_size(free)} is available there; "
                        "free space or choose another destination (--no-space-check skips this check)")


def check_space_together(needs: list[tuple[Path, int]]) -> None:
    """Outputs of one command on one filesystem (split-mtp's two) need their bytes together: refused before the
    first is written, as each alone would be."""
    by_fs: dict[int, list[tuple[Path, int]]] = {}
    for dest, needed in needs:
        where = nearest_existing(dest)
        if where.is_dir():
            by_fs.setdefault(where.stat().st_dev, []).append((dest, needed))
    for group in by_fs.values():
        needed, free = sum(n for _, n in group), space_free(group[0][0])
        if len(group) > 1 and free is not None and needed > free:
            raise Dsv3Error(f"{' and '.join(str(d) for d, _ in group)}: these outputs need {_size(needed)} of free "
                            f"space together and {_size(free)} is available there; free space or choose other "
                            "destinations (--no-space-check skips this check)")


def _size(n: int) -> str:
    return f"{tqdm.format_sizeof(n, 'B', 1000)} ({n:,} bytes)"
