"""See a file tree from inside a container and compare it with the tree an image should give.

`listing_script(tops)` is a busybox shell script that prints one line per path under `tops`
(relative to /): `P|<path>|<raw mode hex>|<uid>|<gid>|<size>|<nlink>|<inode>`, then
`S|<path>|<sha256>` per regular file and `L|<path>|<target>` per symlink. `parse_listing` turns
that output into `Observed` records and `diff_trees(expected, observed)` lists every difference
(an empty list means the container sees exactly the image).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .image import TreeEntry

__all__ = ["Observed", "diff_trees", "listing_script", "parse_listing"]


@dataclass
class Observed:
    """One path as `stat`/`sha256sum`/`readlink` reported it inside the container."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    inode: int
    sha256: str = ""
    target: str = ""


def listing_script(tops: Iterable[str]) -> str:
    """A `sh -c` script listing the trees under `tops` (paths relative to /)."""
    t = " ".join(sorted(tops))
    return (
        f"cd / && find {t} -exec stat -c 'P|%n|%f|%u|%g|%s|%h|%i' {{}} + && "
        f"find {t} -type f -exec sha256sum {{}} + | while read -r h p; do echo \"S|$p|$h\"; done && "
        f"find {t} -type l | while read -r p; do echo \"L|$p|$(readlink \"$p\")\"; done"
    )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return f"other({stat.S_IFMT(mode):o})"


def parse_listing(text: str) -> dict[str, Observed]:
    """Parse `listing_script` output; raises ValueError on a malformed line."""
    out: dict[str, Observed] = {}
    for line in text.splitlines():
        if not line:
            continue
        tag, path, *rest = line.split("|")
        if tag == "P":
            raw, uid, gid, size, nlink, ino = rest
            mode = int(raw, 16)
            out[path] = Observed(_kind(mode), stat.S_IMODE(mode), int(uid), int(gid), int(size),
                                 int(nlink), int(ino))
        elif tag == "S":
            out[path].sha256 = rest[0]
        elif tag == "L":
            out[path].target = "|".join(rest)
        else:
            raise ValueError(f"unexpected listing line: {line!r}")
    return out


def diff_trees(expected: dict[str, TreeEntry], observed: dict[str, Observed],
               tops: Iterable[str] | None = None) -> list[str]:
    """Human-readable differences; only expected paths under `tops` are considered when given."""
    if tops is not None:
        prefixes = tuple(tops)
        expected = {p: e for p, e in expected.items() if p in prefixes or p.startswith(
            tuple(t + "/" for t in prefixes))}
    problems: list[str] = []
    for path in sorted(set(expected) - set(observed)):
        problems.append(f"missing: {path}")
    for path in sorted(set(observed) - set(expected)):
        problems.append(f"unexpected: {path} ({observed[path].kind})")
    for path in sorted(set(expected) & set(observed)):
        e, o = expected[path], observed[path]
        if e.kind != o.kind:
            problems.append(f"{path}: kind {o.kind}, expected {e.kind}")
            continue
        if e.kind != "symlink" and e.mode != o.mode:
            problems.append(f"{path}: mode {o.mode:o}, expected {e.mode:o}")
        if (e.uid, e.gid) != (o.uid, o.gid):
            problems.append(f"{path}: owner {o.uid}:{o.gid}, expected {e.uid}:{e.gid}")
        if e.kind == "file" and (e.size, e.sha256) != (o.size, o.sha256):
            problems.append(f"{path}: size/sha256 {o.size}/{o.sha256[:12]}, "
                            f"expected {e.size}/{e.sha256[:12]}")
        if e.kind == "symlink" and e.target != o.target:
            problems.append(f"{path}: symlink to {o.target!r}, expected {e.target!r}")
        if e.hardlink_of:
            other = observed.get(e.hardlink_of)
            if other is None or other.inode != o.inode or o.nlink < 2:
                problems.append(f"{path}: not a hardlink of {e.hardlink_of}")
    return problems
