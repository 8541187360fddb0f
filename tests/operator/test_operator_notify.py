"""sd_notify and the watchdog helpers of ``snapshotter.systemd``, against a real datagram socket."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import pytest
from opsupport import ECHO_SERVER, PYTHON, NotifyReceiver, child_env, stop_process

from snapshotter import systemd


def test_ready_status_stopping_reach_the_socket(
    notify_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_receiver.address)
    assert systemd.notify_ready("serving on /run/x.sock")
    assert systemd.notify_status("remounted 3 layers\nof 4")
    assert systemd.notify_stopping()
    messages = notify_receiver.wait_for("STOPPING=1")
    assert messages == [
        "READY=1\nSTATUS=serving on /run/x.sock",
        "STATUS=remounted 3 layers of 4",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lazysnap-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify_ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False


def test_unreachable_or_unsupported_socket_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, short_tmp: os.PathLike[str]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(short_tmp, "nobody-listens"))
    assert systemd.notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify_ready() is False


def test_invalid_state_is_refused(notify_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_receiver.address)
    for bad in ("", "READY=1\0", "STATUS=" + "x" * 5000):
        with pytest.raises(ValueError):
            systemd.notify(bad)


def test_full_receive_queue_does_not_block(
    notify_receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody reads: the kernel queue fills and notify must fail fast instead of hanging the daemon.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_receiver.address)
    results = [systemd.notify_watchdog() for _ in range(5000)]
    assert results[0] is True
    assert False in results


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


def test_child_server_sends_ready_then_stopping(notify_receiver: NotifyReceiver, short_tmp: str) -> None:
    """A separate process, as under systemd: READY=1 comes once its gRPC socket is bound."""
    address = os.path.join(short_tmp, "grpc.sock")
    proc = subprocess.Popen(
        [PYTHON, str(ECHO_SERVER), address], env=child_env(NOTIFY_SOCKET=notify_receiver.address)
    )
    try:
        notify_receiver.wait_for("READY=1")
        assert os.path.exists(address)
    finally:
        assert stop_process(proc) == 0
    notify_receiver.wait_for("STOPPING=1")
