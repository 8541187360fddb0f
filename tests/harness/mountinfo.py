"""What is mounted below a directory, with filesystem types (FUSE layers vs overlay vs binds)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fusefs.mountinfo import unescape

__all__ = ["MountEntry", "mounts_with_types"]


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: Path
    fstype: str  # "fuse.lazysnap", "overlay", "ext4" (a bind keeps its source's type)
    source: str
    root: str  # the path inside the source filesystem that is mounted (a bind's subtree)


def mounts_with_types(directory: Path) -> list[MountEntry]:
    """Mounts at or below ``directory``, in mount order."""
    base = os.path.realpath(directory)
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = unescape(fields[4])
            if point == base or point.startswith(base + "/"):
                out.append(MountEntry(Path(point), fields[sep + 1], unescape(fields[sep + 2]),
                                      unescape(fields[3])))
    return out
