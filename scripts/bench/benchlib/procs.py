"""Running commands and daemons: every daemon is tracked by its PID and stopped by that PID only."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and where to look."""


def run(argv: list[str], *, log_path: Path | None = None, check: bool = True,
        env: dict[str, str] | None = None, timeout: float | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; its output goes to `log_path` (appended) or is captured.

    Raises BenchError when `check` and the command fails, quoting the end of its output.
    """
    log.debug("run: %s", shlex.join(argv))
    full_env = {**os.environ, **env} if env else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True,
                                  env=full_env, timeout=timeout, check=False, cwd=cwd)
        output = ""
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout,
                              check=False, cwd=cwd)
        output = (proc.stdout or "") + (proc.stderr or "")
    if check and proc.returncode != 0:
        where = f" (log: {log_path})" if log_path else ""
        tail = _tail(log_path) if log_path else output[-2000:]
        raise BenchError(f"{shlex.join(argv)} exited {proc.returncode}{where}:\n{tail}")
    return proc


def _tail(path: Path | None, size: int = 2000) -> str:
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: object, what: str, timeout: float = 30.0, proc: Daemon | None = None) -> None:
    """Poll `check()` every 0.1 s until it is true; BenchError after `timeout` or if `proc` died."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited while waiting for {what}; log: {proc.log_path}\n"
                             f"{_tail(proc.log_path)}")
        time.sleep(0.1)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_round_trip_ms(url: str, tries: int = 5) -> float:
    """Median time of a GET of `url` over a new connection each time (TCP handshake included)."""
    times = []
    for _ in range(tries):
        t0 = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
        times.append((time.monotonic() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def http_ok(url: str) -> bool:
    """True if a GET of `url` answers 2xx within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= int(resp.status) < 300
    except OSError:
        return False


@dataclass
class Daemon:
    """A background process in its own session (optionally inside a network namespace)."""

    name: str
    argv: list[str]
    log_path: Path
    netns: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; its output is appended to `log_path`."""
        argv = ["ip", "netns", "exec", self.netns, *self.argv] if self.netns else self.argv
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # `ip netns exec` execs the command, so the PID is the daemon's own.
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env={**os.environ, **self.env})
        log.info("started %s pid %d (log %s)", self.name, self.popen.pid, self.log_path)

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} was never started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def peak_rss_kib(self) -> int | None:
        """The process's peak resident set (VmHWM, KiB), or None if it is gone."""
        if not self.alive():
            return None
        return read_vmhwm_kib(self.pid)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send `sig` to our PID, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored %s for %.0fs: SIGKILL", self.name, self.pid, sig.name,
                            timeout)
                self.popen.kill()
                self.popen.wait(10)
        rc = self.popen.returncode
        log.info("stopped %s (pid %d, exit %s)", self.name, self.pid, rc)
        self.popen = None
        return rc


def read_vmhwm_kib(pid: int) -> int | None:
    """VmHWM of `pid` from /proc/PID/status in KiB, or None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def umount_below(root: Path) -> None:
    """Unmount every mount point at or below `root`, deepest first (lazily if busy)."""
    prefix = str(root.resolve())
    points: list[str] = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mnt = line.split()[1].replace("\\040", " ")
        if mnt == prefix or mnt.startswith(prefix + "/"):
            points.append(mnt)
    for mnt in sorted(points, key=len, reverse=True):
        if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
