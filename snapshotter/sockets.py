"""Claiming a unix socket path: refuse one a live process serves, replace a stale one."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)


class SocketInUse(Exception):
    """The path is served by a live process, is not a socket, or cannot be probed."""


def remove_stale_socket(path: str) -> None:
    """Make ``path`` free to bind: nothing there, or a socket nobody answers on (removed).

    Raises:
        SocketInUse: something answers on ``path``, or the path is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SocketInUse(f"{path}: cannot tell whether it is in use: {exc}") from exc
        else:
            raise SocketInUse(f"{path} is already served by a live process")
    log.info("removing stale socket", extra={"address": path})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
