"""Test-side control of ``fuse_server.py``: start it, send commands, always stop and unmount."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.fusefs.contract import Case

SERVER = Path(__file__).with_name("fuse_server.py")
REPO = Path(__file__).resolve().parents[2]
_MNT_DETACH = 2


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mountinfo."""
    prefix = str(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def force_unmount(path: Path) -> None:
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class FuseServer:
    """One fuse_server.py process with its own session mountpoint and cache under ``work``."""

    def __init__(self, work: Path, roots: list[Path], cache: Path | None = None, **options: Any) -> None:
        self.work = work
        self.fuse = work / "fuse"
        self.cache = cache or work / "cache"
        self.log = work / f"server-{os.urandom(3).hex()}.log"
        self.config = {"fuse": str(self.fuse), "cache": str(self.cache), "roots": [str(r) for r in roots],
                       **options}
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def __enter__(self) -> FuseServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._log_file = open(self.log, "w")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [sys.executable, str(SERVER), json.dumps(self.config)], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        line = self._next(60)
        if line != "READY":
            self.stop()
            raise AssertionError(f"fuse server did not start ({line!r}):\n{self.log.read_text()}")

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def cmd(self, line: str, timeout: float = 60) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        reply = self._next(timeout)
        if reply is None:
            raise AssertionError(f"no reply to {line!r}:\n{self.log.read_text()}")
        result: dict[str, Any] = json.loads(reply)
        return result

    def mount(self, case: Case, mountpoint: Path, command: str = "mount", **extra: Any) -> dict[str, Any]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        req = {"digest": case.digest, "toc_digest": case.toc_digest, "mountpoint": str(mountpoint), **extra}
        return self.cmd(f"{command} {json.dumps(req)}")

    def stats(self, case: Case) -> dict[str, Any]:
        return self.cmd("stats " + case.digest)

    def stop(self) -> None:
        """Ask the server to quit; kill it by PID if it does not; unmount whatever is left."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        finally:
            force_unmount(self.work)
            self._log_file.close()
        self.returncode = proc.returncode

    def kill(self) -> None:
        """Simulate a crash: SIGKILL by PID, leaving its mounts behind (dead, ENOTCONN)."""
        proc, self._proc = self._proc, None
        assert proc is not None
        proc.kill()
        proc.wait(timeout=30)
        self._log_file.close()
        self.returncode = proc.returncode

    def log_text(self) -> str:
        return self.log.read_text()
