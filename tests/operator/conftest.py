"""Fixtures for the operator-surface tests: short temp dirs and a systemd-style notify socket."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from opsupport import NotifyReceiver


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A unique temp dir with a short path (unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lzs-op-") as path:
        yield Path(path)


@pytest.fixture
def notify_receiver(short_tmp: Path) -> Iterator[NotifyReceiver]:
    path = str(short_tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield NotifyReceiver(path, sock)
