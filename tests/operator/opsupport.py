"""Helpers shared by the operator-surface tests (imported by name: tests/operator is on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ECHO_SERVER = Path(__file__).resolve().parent / "activated_echo.py"


@dataclass
class NotifyReceiver:
    """The receiving end of ``$NOTIFY_SOCKET``, as systemd binds it."""

    address: str
    sock: socket.socket
    seen: list[str] = field(default_factory=list)

    def wait_for(self, line: str, timeout: float = 30.0) -> list[str]:
        """Block until a message containing the line ``line`` arrives; return all messages so far."""
        deadline = time.monotonic() + timeout
        while not any(line in message.split("\n") for message in self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line!r} on the notify socket; got {self.seen!r}")
            self.sock.settimeout(remaining)
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.seen


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment minus systemd's variables, plus ``extra``, able to import the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM the process by pid, SIGKILL it if it lingers; return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


PYTHON = sys.executable
