"""lazysnapd as a process: socket ownership and permissions, refusal to share, clean SIGTERM."""

from __future__ import annotations

import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from tests.snapshotter.conftest import Client, Snapd

pytestmark = [pytest.mark.root]


def _run_lazysnapd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lazysnapd")
    assert exe
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def test_socket_is_root_owned_0660(snapd: Snapd) -> None:
    st = snapd.address.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0 and st.st_gid == 0


def test_sigterm_exits_cleanly_and_keeps_snapshots(snapd: Snapd) -> None:
    client = snapd.client()
    try:
        fs = Path(client.Prepare(key="a").mounts[0].source)
        (fs / "file").write_text("kept")
        client.Commit(name="c", key="a")
        client.Prepare(key="b", parent="c")
    finally:
        client.close()
    assert snapd.daemon is not None
    assert snapd.daemon.stop(grace=15, sig=signal.SIGTERM) == 0
    assert not snapd.address.exists()
    assert '"msg": "stopped"' in snapd.log()

    snapd.start()
    client = snapd.client()
    try:
        infos = client.infos()
        assert set(infos) == {"c", "b"} and infos["b"].parent == "c"
        assert (fs / "file").read_text() == "kept"
    finally:
        client.close()


def test_sigint_exits_cleanly(snapd: Snapd) -> None:
    assert snapd.daemon is not None
    assert snapd.daemon.stop(grace=15, sig=signal.SIGINT) == 0


def test_refuses_a_socket_served_by_a_live_process(snapd: Snapd, workdir: Path) -> None:
    res = _run_lazysnapd("--root", str(workdir / "other-root"), "--address", str(snapd.address))
    assert res.returncode == 1
    assert "already served by a live process" in res.stderr
    client = snapd.client()  # the first daemon is untouched and still answers
    try:
        assert client.infos() == {}
    finally:
        client.close()


def test_refuses_a_root_another_daemon_uses(snapd: Snapd, workdir: Path) -> None:
    res = _run_lazysnapd("--root", str(snapd.root), "--address", str(workdir / "second.sock"))
    assert res.returncode == 1 and "in use by another lazysnapd" in res.stderr


def test_replaces_a_stale_socket(workdir: Path) -> None:
    address = workdir / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:  # bound, then closed: nobody listens any more
        s.bind(str(address))
    assert address.is_socket()
    snapd = Snapd(workdir).start()
    try:
        client = snapd.client()
        assert client.infos() == {}
        client.close()
        assert "removing stale socket" in snapd.log()
    finally:
        snapd.stop()


def test_refuses_to_replace_a_file_that_is_not_a_socket(workdir: Path) -> None:
    address = workdir / "not-a-socket"
    address.write_text("precious")
    res = _run_lazysnapd("--root", str(workdir / "root"), "--address", str(address))
    assert res.returncode == 1 and "is not a socket" in res.stderr
    assert address.read_text() == "precious"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[grpc]\nmax_wrkers = 4\n", "grpc.max_wrkers: unknown key"),
        ("[grpc]\nmax_workers = \"many\"\n", "grpc.max_workers: must be int"),
        ("[grpc]\nmax_workers = 0\n", "grpc.max_workers: 0 threads is below the minimum 1 threads"),
        ("log_level = \"loud\"\n", "log_level: 'loud' is not one of"),
        ("[nonsense]\n", "nonsense: unknown key"),
        ("grpc = 3\n", "grpc: must be a table"),
        ("root = \n", "not valid TOML"),
    ],
)
def test_bad_config_is_refused_naming_the_key(workdir: Path, toml: str, message: str) -> None:
    cfg = workdir / "config.toml"
    cfg.write_text(toml)
    res = _run_lazysnapd("--root", str(workdir / "root"), "--address", str(workdir / "s.sock"),
                         "--config", str(cfg))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (workdir / "s.sock").exists()


class _NotifySocket:
    """The receiving end of $NOTIFY_SOCKET, as systemd binds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def next(self) -> str:
        return self.sock.recv(4096).decode()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
def test_socket_activation_and_readiness_notification(workdir: Path) -> None:
    address = workdir / "activated.sock"
    notify = _NotifySocket(workdir / "notify.sock")
    exe = shutil.which("lazysnapd")
    assert exe
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(address), "--fdname=lazysnap-grpc",
         "-E", f"NOTIFY_SOCKET={notify.path}",
         exe, "--root", str(workdir / "root"), "--address", str(address)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and b"Listening on" in proc.stderr.readline()
        inode = address.stat().st_ino
        client = Client(str(address))  # the first connection starts lazysnapd
        try:
            client.Prepare(key="a")
            assert set(client.infos()) == {"a"}
        finally:
            client.close()
        assert notify.next().startswith("READY=1")
        assert address.stat().st_ino == inode  # served through systemd's socket, not a new one
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    try:
        assert notify.next().startswith("STOPPING=1")
    finally:
        notify.sock.close()
