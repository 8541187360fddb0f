"""The kernel read-ahead window of the FUSE session: larger reads, several in flight.

The kernel caps a FUSE mount's read-ahead at 128 KiB when the session starts (libfuse answers
INIT with the kernel's own default), so a sequential reader sends one 128 KiB request at a time.
Raising the session's ``read_ahead_kb`` (its backing device in ``/sys/class/bdi``) after INIT
lets the kernel ask for up to ``max_pages`` (1 MiB with libfuse 3) per request and keep several
requests in flight: warm reads from the chunk cache go about twice as fast (docs/benchmarks.md,
"read path"). Layers are read-only and immutable, so a larger window never reads stale data;
random access is unaffected, since the kernel only grows the window for sequential readers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fusefs.mountinfo import unescape

log = logging.getLogger(__name__)

READ_AHEAD_KIB = 4096
_MOUNTINFO = Path("/proc/self/mountinfo")
_BDI = Path("/sys/class/bdi")


def session_device(mountpoint: str, mountinfo: Path = _MOUNTINFO) -> str | None:
    """``major:minor`` of the FUSE session mounted at ``mountpoint``, or None.

    Reads mountinfo, never the mount itself: callable from inside a FUSE handler.
    """
    found = None
    with mountinfo.open(encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            head, _, tail = line.partition(" - ")
            if len(fields) > 4 and unescape(fields[4]) == mountpoint and tail.startswith("fuse"):
                found = head.split(" ")[2]  # the last one mounted there is the one in use
    return found


def set_session_readahead(mountpoint: str, kib: int = READ_AHEAD_KIB, bdi: Path = _BDI) -> bool:
    """Set the read-ahead window of the FUSE session at ``mountpoint``; False if it could not.

    Call it after the session answered INIT (any request after the first), from any thread.
    Best effort: without it reads are smaller, not wrong, so failures are logged, not raised.
    """
    try:
        device = session_device(mountpoint)
        if device is None:
            log.info("no FUSE session at %s in mountinfo: read-ahead left as is", mountpoint)
            return False
        (bdi / device / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.info("could not set the read-ahead of the FUSE session at %s: %s", mountpoint, exc)
        return False
    return True
