"""systemd integration: readiness notification, the watchdog and socket activation.

Everything here speaks systemd's documented wire protocols directly (no libsystemd):

- ``sd_notify``: one datagram of ``KEY=VALUE`` lines sent to the unix socket named by
  ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
- Socket activation: systemd passes listening sockets as fds 3, 4, ... and describes them in
  ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES``.

The gRPC server (:mod:`snapshotter.rpc`) accepts on any trio listener, so an inherited socket is
served as it is: its path and permissions stay as systemd made them, and a restart never
replaces it.

How the daemon uses this module (from the main thread, before and after serving)::

    listener = pick_listener(listen_fds_with_names(), args.address)   # None when not activated
    sock = listen_unix(args.address, listener=listener)              # the inherited one, or bound
    ... serve sock; notify_ready("serving on " + args.address) ...
    ... run; ping notify_watchdog() every watchdog_interval() / 2 seconds if that is not None ...
    notify_stopping()
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_FD_NAME",
    "ActivatedSocket",
    "listen_fds",
    "listen_fds_with_names",
    "listen_unix",
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "pick_listener",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

LISTEN_FDS_START: Final = 3
"""First fd systemd passes (SD_LISTEN_FDS_START)."""
DEFAULT_FD_NAME: Final = "lazysnap-grpc"
"""``FileDescriptorName=`` of the gRPC socket in ``systemd/lazysnap.socket``."""
MAX_LISTEN_FDS: Final = 64
"""More inherited fds than this is a misconfiguration, not something to loop over."""
"""Concurrent client connections the activation bridge serves; more are refused."""
_MAX_NOTIFY_BYTES: Final = 4096


# --- sd_notify -------------------------------------------------------------------------------


def _notify_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock: and other schemes of newer systemd versions are not supported.
    log.warning("ignoring NOTIFY_SOCKET=%r: only paths and @abstract names are supported", value)
    return None


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd's notification socket.

    Returns False when ``$NOTIFY_SOCKET`` is unset (not started by systemd with ``Type=notify``)
    or the message could not be sent; a failure is logged, never raised, because losing a
    status update must not stop the daemon. Never blocks: a full receive queue is a failure.
    Any thread may call it.

    Raises:
        ValueError: ``state`` is empty, too long or contains a NUL byte.
    """
    if not state or "\0" in state or len(state.encode()) > _MAX_NOTIFY_BYTES:
        raise ValueError(f"invalid sd_notify state {state[:64]!r}")
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _notify_address(target)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def notify_ready(status: str | None = None) -> bool:
    """Tell systemd the daemon is up (``READY=1``): call once the gRPC socket serves."""
    state = "READY=1"
    if status:
        state += "\nSTATUS=" + _one_line(status)
    return notify(state)


def notify_stopping(status: str | None = None) -> bool:
    """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
    state = "STOPPING=1"
    if status:
        state += "\nSTATUS=" + _one_line(status)
    return notify(state)


def notify_status(text: str) -> bool:
    """Set the one-line status ``systemctl status`` shows."""
    return notify("STATUS=" + _one_line(text))


def notify_watchdog() -> bool:
    """Ping the service watchdog (``WATCHDOG=1``); harmless when no watchdog is configured."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (``$WATCHDOG_USEC``) if it applies to this process.

    The daemon should call :func:`notify_watchdog` at about half this interval from a task that
    only runs when the event loop is healthy. None when ``WatchdogSec=`` is not set.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


# --- socket activation -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    """A socket systemd passed us, with its ``FileDescriptorName=`` (``unknown`` if unnamed)."""

    name: str
    sock: socket.socket


def _unset_listen_environment() -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)


def listen_fds_with_names(*, unset_environment: bool = True) -> list[ActivatedSocket]:
    """Take over the sockets systemd passed to this process (socket activation).

    Follows ``sd_listen_fds_with_names``: only when ``$LISTEN_PID`` is our pid, ``$LISTEN_FDS``
    fds from 3 on, named by ``$LISTEN_FDNAMES``. Each fd is marked close-on-exec so helpers we
    spawn don't hold the listener. Fds that are not sockets are skipped with a warning. With
    ``unset_environment`` (the default) the variables are removed so children and a second call
    see nothing. Call once, from the main thread, early at startup.
    """
    pid_text = os.environ.get("LISTEN_PID", "")
    count_text = os.environ.get("LISTEN_FDS", "")
    names_text = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        _unset_listen_environment()
    if not pid_text or pid_text != str(os.getpid()):
        return []
    try:
        count = int(count_text)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r: not a number", count_text)
        return []
    if count <= 0:
        return []
    if count > MAX_LISTEN_FDS:
        log.warning("ignoring LISTEN_FDS=%d: more than %d sockets", count, MAX_LISTEN_FDS)
        return []
    names = names_text.split(":") if names_text is not None else []
    if len(names) != count:
        names = ["unknown"] * count
    result: list[ActivatedSocket] = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("ignoring inherited fd %d (%s): %s", fd, name, exc)
            continue
        result.append(ActivatedSocket(name=name or "unknown", sock=sock))
    return result


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed us, without their names; see :func:`listen_fds_with_names`."""
    return [item.sock for item in listen_fds_with_names(unset_environment=unset_environment)]


def _is_unix_stream_listener(sock: socket.socket) -> bool:
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False
    return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM and listening


def _bound_path(sock: socket.socket) -> str | None:
    name = sock.getsockname()
    if isinstance(name, str) and name.startswith("/"):
        return os.path.realpath(name)
    return None  # abstract or unnamed


def pick_listener(
    inherited: list[ActivatedSocket], address: str, name: str = DEFAULT_FD_NAME
) -> socket.socket | None:
    """Choose the inherited socket the gRPC service should serve on, or None to bind itself.

    Only listening unix stream sockets qualify: the Snapshots API has no authentication besides
    the socket file's permissions, so a TCP socket passed by mistake is refused. A socket bound
    to ``address`` wins; otherwise one named ``name`` (logged, since its path differs from the
    configured address). Inherited sockets not chosen are closed.
    """
    wanted = os.path.realpath(address)
    candidates = [item for item in inherited if _is_unix_stream_listener(item.sock)]
    chosen = next((i for i in candidates if _bound_path(i.sock) == wanted), None)
    if chosen is None:
        chosen = next((i for i in candidates if i.name == name), None)
        if chosen is not None:
            log.warning(
                "serving on inherited socket %r at %s, not the configured address %s",
                chosen.name, _bound_path(chosen.sock), address,
            )
    for item in inherited:
        if item is not chosen:
            log.warning("closing unused inherited socket %r (%s)", item.name, item.sock)
            item.sock.close()
    return chosen.sock if chosen is not None else None


# --- gRPC on an inherited socket -------------------------------------------------------------


def _prepare_socket_dir(address: str) -> None:
    parent = os.path.dirname(address) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    if os.path.lexists(address) and not stat.S_ISSOCK(os.lstat(address).st_mode):
        raise FileExistsError(errno.EEXIST, "refusing to replace a non-socket file", address)


def listen_unix(address: str, *, listener: socket.socket | None = None, mode: int = 0o660,
                backlog: int = 128) -> socket.socket:
    """The listening unix socket to serve ``address`` on.

    With ``listener`` (from :func:`pick_listener`), that socket as it is: its path and
    permissions stay as systemd made them. Without it, a new socket bound to ``address`` with
    ``mode`` (replacing a stale socket file, never another kind of file; the caller checks no
    live server owns it).

    Raises:
        OSError: the socket could not be bound (missing directory rights, path too long, a
            non-socket file in the way).
    """
    if listener is not None:
        return listener
    _prepare_socket_dir(address)
    # Bind inside a fresh 0700 directory, set the mode, then rename into place: nobody can
    # connect before the mode is right, and no process-wide umask change races other threads.
    staging = tempfile.mkdtemp(prefix=".lazysnap-bind-", dir=os.path.dirname(address) or ".")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staged = os.path.join(staging, "s")
        sock.bind(staged)
        os.chmod(staged, mode)
        sock.listen(backlog)
        os.replace(staged, address)
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sock
