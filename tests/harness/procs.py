"""Process and mount plumbing shared by the harness daemons.

`Daemon` starts one program in its own session with stdout/stderr in log files and stops exactly
that PID (SIGTERM, then SIGKILL after a grace period). Nothing here looks processes up by name:
other engineers run the same programs on this machine.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fusefs.mountinfo import unescape

__all__ = [
    "Daemon",
    "HarnessError",
    "free_port",
    "mounts_below",
    "remove_tree",
    "short_tempdir",
    "unmount_below",
    "wait_until",
]

_MNT_DETACH = 2


class HarnessError(RuntimeError):
    """A component of the test stack failed to start, answer or stop; the message says which."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def short_tempdir(prefix: str) -> Path:
    """A fresh private directory under /tmp with a short path.

    Unix socket paths are limited to 107 bytes and overlay mount options to one page, so the
    harness avoids pytest's long tmp_path for daemon roots and sockets.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it returns True; raise HarnessError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def mounts_below(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest (and most recent) first."""
    base = os.path.realpath(directory)
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mnt = unescape(line.split()[4])
            if mnt == base or mnt.startswith(base + "/"):
                found.append(Path(mnt))
    found.reverse()
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def unmount_below(directory: Path) -> list[Path]:
    """Unmount everything mounted at or below `directory`; return what was unmounted.

    A busy mount is detached lazily (MNT_DETACH) so a stuck FUSE daemon cannot wedge cleanup.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    done: list[Path] = []
    for _ in range(5):  # stacked mounts on one path need several rounds
        targets = mounts_below(directory)
        if not targets:
            break
        for mnt in targets:
            path = os.fsencode(mnt)
            if libc.umount2(path, 0) != 0 and libc.umount2(path, _MNT_DETACH) != 0:
                continue
            done.append(mnt)
    return done


class Daemon:
    """One long-running child process, started in its own session, stopped by its PID.

    stdout and stderr go to `<log_dir>/<name>.out` and `<name>.err`. `stop()` is idempotent.
    """

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env=env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise HarnessError with the tail of its stderr if the process has exited."""
        if not self.alive():
            raise HarnessError(
                f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for p in (self.stderr_path, self.stdout_path):
            if p.exists():
                text += "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip()

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait up to `grace` seconds, then SIGKILL; return the exit status."""
        if self.alive():
            try:
                os.kill(self.pid, sig)
                return self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            except ProcessLookupError:
                pass
        return self.proc.wait()


def remove_tree(directory: Path) -> None:
    """rm -rf `directory`, but only once nothing is mounted below it (else HarnessError).

    Deleting through a live mount would delete the mounted filesystem's files (a FUSE layer, a
    container's rootfs), so a leftover mount stops the cleanup loudly instead.
    """
    left = mounts_below(directory)
    if left:
        raise HarnessError(f"not removing {directory}: still mounted below it: {left}")
    shutil.rmtree(directory, ignore_errors=True)
