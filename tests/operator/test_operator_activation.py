"""Socket activation: ``listen_fds``/``pick_listener`` and gRPC served on an inherited socket.

The end-to-end tests run ``activated_echo.py`` (wired like lazysnapd) or lazysnapd itself in a
child process that gets a listening socket as fd 3 with ``LISTEN_PID``/``LISTEN_FDS`` set, either
from systemd's own ``systemd-socket-activate`` or from this test playing systemd, and talk real
gRPC to it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opsupport import ECHO_SERVER, PYTHON, NotifyReceiver, child_env, stop_process

from snapshotter import systemd
from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc

# Plays systemd's part: put the listener on fd 3, set LISTEN_PID to the pid that will exec.
_WRAPPER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def ping(address: str, payload: bytes = b"hi", timeout: float = 30.0) -> str:
    with grpc.insecure_channel("unix:" + address) as channel:
        call = channel.unary_unary("/lazysnap.test.Echo/Ping")
        answer: bytes = call(payload, timeout=timeout, wait_for_ready=True)
        return answer.decode()


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(short_tmp / "lazysnap.sock"))
    sock.listen(64)
    yield sock
    sock.close()


def spawn_activated(
    listener: socket.socket, notify: NotifyReceiver, argv: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (default: the echo server) with ``listener`` as its socket-activated fd 3."""
    env = child_env(LISTEN_FDS="1", LISTEN_FDNAMES="lazysnap-grpc", NOTIFY_SOCKET=notify.address)
    fd = listener.fileno()
    argv = argv or [PYTHON, str(ECHO_SERVER), listener.getsockname()]
    return subprocess.Popen([PYTHON, "-c", _WRAPPER, str(fd), *argv], env=env, pass_fds=(fd,))


# --- in-process: environment handling and choosing the listener ------------------------------


def test_listen_fds_ignores_another_pids_sockets_and_unsets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "lazysnap-grpc")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


@pytest.mark.parametrize("count", ["", "zero", "0", "-1", "100000"])
def test_listen_fds_rejects_bad_counts(monkeypatch: pytest.MonkeyPatch, count: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    assert systemd.listen_fds() == []


def _activated(name: str, sock: socket.socket) -> systemd.ActivatedSocket:
    return systemd.ActivatedSocket(name=name, sock=sock)


def test_pick_listener_prefers_the_configured_address(short_tmp: Path) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(short_tmp / "other.sock"))
    other.listen()
    mine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.bind(str(short_tmp / "mine.sock"))
    mine.listen()
    chosen = systemd.pick_listener(
        [_activated("lazysnap-grpc", other), _activated("unknown", mine)], str(short_tmp / "mine.sock")
    )
    assert chosen is mine
    assert other.fileno() == -1  # the unused one was closed
    mine.close()


def test_pick_listener_falls_back_to_the_name(short_tmp: Path) -> None:
    named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    named.bind(str(short_tmp / "named.sock"))
    named.listen()
    assert systemd.pick_listener([_activated("lazysnap-grpc", named)], str(short_tmp / "x.sock")) is named
    named.close()


def test_pick_listener_refuses_tcp_and_non_listening_sockets(short_tmp: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.bind(str(short_tmp / "idle.sock"))
    inherited = [_activated("lazysnap-grpc", tcp), _activated("unknown", idle)]
    assert systemd.pick_listener(inherited, str(short_tmp / "idle.sock")) is None
    assert tcp.fileno() == -1 and idle.fileno() == -1


# --- a real gRPC server in a child process ---------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
def test_systemd_socket_activate_starts_the_server_on_first_connection(
    short_tmp: Path, notify_receiver: NotifyReceiver
) -> None:
    address = str(short_tmp / "lazysnap.sock")
    proc = subprocess.Popen(
        [
            "systemd-socket-activate", "-l", address, "--fdname=lazysnap-grpc",
            "-E", f"NOTIFY_SOCKET={notify_receiver.address}", "-E", f"PYTHONPATH={child_env()['PYTHONPATH']}",
            PYTHON, str(ECHO_SERVER), address,
        ],
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        # systemd-socket-activate reports "Listening on ..." once bound; nothing runs before a client.
        assert b"Listening on" in proc.stderr.readline()
        assert notify_receiver.seen == []
        inode = os.stat(address).st_ino
        answer = ping(address, b"first")
        assert answer == f"pong {proc.pid} activated first"
        notify_receiver.wait_for("READY=1")
        assert os.stat(address).st_ino == inode  # the activated socket was not replaced
    finally:
        assert stop_process(proc) == 0


def test_inherited_socket_survives_a_restart(
    listener: socket.socket, notify_receiver: NotifyReceiver
) -> None:
    """What systemd gives lazysnap on ``systemctl restart``: clients keep the socket across it."""
    address = listener.getsockname()
    inode = os.stat(address).st_ino
    first = spawn_activated(listener, notify_receiver)
    try:
        notify_receiver.wait_for("READY=1")
        assert ping(address) == f"pong {first.pid} activated hi"
    finally:
        assert stop_process(first) == 0
    notify_receiver.wait_for("STOPPING=1")
    assert stat.S_ISSOCK(os.stat(address).st_mode) and os.stat(address).st_ino == inode

    # While no server runs, connecting still succeeds (the kernel queues it) and a call waits.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
        early.connect(address)
    answers: list[str] = []
    caller = threading.Thread(target=lambda: answers.append(ping(address, b"during-restart")))
    caller.start()
    caller.join(1.0)
    assert caller.is_alive() and answers == []

    notify_receiver.seen.clear()
    second = spawn_activated(listener, notify_receiver)
    try:
        caller.join(60)
        assert answers == [f"pong {second.pid} activated during-restart"]
        assert ping(address, b"after") == f"pong {second.pid} activated after"
    finally:
        assert stop_process(second) == 0


def test_concurrent_connections_and_large_messages_on_the_inherited_socket(
    listener: socket.socket, notify_receiver: NotifyReceiver
) -> None:
    address = listener.getsockname()
    proc = spawn_activated(listener, notify_receiver)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        # Each thread has its own channel, so its own connection to the inherited socket.
        try:
            with grpc.insecure_channel("unix:" + address) as channel:
                echo = channel.unary_unary("/lazysnap.test.Echo/Ping")
                for j in range(3):
                    body = f"{i}.{j}:".encode() + os.urandom(1024 * 1024)  # > socket buffers
                    answer: bytes = echo(body, timeout=60, wait_for_ready=True)
                    assert answer.startswith(f"pong {proc.pid} activated ".encode())
                    assert answer.endswith(body)
        except BaseException as exc:
            errors.append(exc)

    try:
        notify_receiver.wait_for("READY=1")
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == [] and not any(t.is_alive() for t in threads)
    finally:
        assert stop_process(proc) == 0


def test_without_activation_the_server_binds_the_address(
    short_tmp: Path, notify_receiver: NotifyReceiver
) -> None:
    address = str(short_tmp / "bound.sock")
    proc = subprocess.Popen(
        [PYTHON, str(ECHO_SERVER), address], env=child_env(NOTIFY_SOCKET=notify_receiver.address)
    )
    try:
        notify_receiver.wait_for("READY=1")
        assert stat.S_IMODE(os.stat(address).st_mode) == 0o660
        assert ping(address) == f"pong {proc.pid} bound hi"
    finally:
        assert stop_process(proc) == 0


@pytest.mark.root
def test_lazysnapd_keeps_the_activated_socket_across_a_restart(
    listener: socket.socket, notify_receiver: NotifyReceiver, short_tmp: Path
) -> None:
    """The real daemon, as lazysnap.service runs it: READY once serving, socket never unlinked."""
    address = listener.getsockname()
    inode = os.stat(address).st_ino
    argv = [PYTHON, "-m", "snapshotter.daemon", "--root", str(short_tmp / "root"), "--address", address]
    for _ in range(2):
        notify_receiver.seen.clear()
        proc = spawn_activated(listener, notify_receiver, argv)
        try:
            notify_receiver.wait_for("READY=1")
            with grpc.insecure_channel("unix:" + address) as channel:
                stub = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
                request = snapshots_pb2.ListSnapshotsRequest(snapshotter="lazysnap")
                assert list(stub.List(request, timeout=30, wait_for_ready=True)) == []
        finally:
            assert stop_process(proc) == 0
        notify_receiver.wait_for("STOPPING=1")
        assert os.stat(address).st_ino == inode
