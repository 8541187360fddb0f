"""scripts/install.sh and scripts/uninstall.sh on this machine, for real.

The containerd-config tests edit temp copies only. The full install test installs system-wide
(/opt/lazysnap, /usr/local/bin, /etc/lazysnap, /etc/systemd/system), runs the installed daemon by
hand, and uninstalls with --purge; it skips when any of those paths already exists, so it never
touches an installation it did not make, and holds a lock so two runs on one host don't collide.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opsupport import REPO, NotifyReceiver, stop_process

from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc

INSTALL = REPO / "scripts" / "install.sh"
UNINSTALL = REPO / "scripts" / "uninstall.sh"
SAMPLE_CONTAINERD_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.6"

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
"""
INSTALLED_PATHS = [
    Path("/opt/lazysnap"), Path("/usr/local/bin/lazysnapd"), Path("/usr/local/bin/snapctl"),
    Path("/etc/lazysnap"), Path("/var/lib/lazysnap"), Path("/etc/systemd/system/lazysnap.service"),
    Path("/etc/systemd/system/lazysnap.socket"),
]

pytestmark = pytest.mark.root


def run(script: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout)


# --- containerd's config ---------------------------------------------------------------------


def test_containerd_entry_is_added_once_and_removed_exactly(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(SAMPLE_CONTAINERD_CONFIG)
    config.chmod(0o600)
    for _ in range(2):
        result = run(INSTALL, "--containerd-only", "--containerd-config", str(config))
        assert result.returncode == 0, result.stderr
    merged = tomllib.loads(config.read_text())
    entry = {"type": "snapshot", "address": "/run/lazysnap/lazysnap.sock"}
    assert merged["proxy_plugins"]["lazysnap"] == entry
    assert merged["proxy_plugins"]["stargz"]["type"] == "snapshot"
    assert config.read_text().count("[proxy_plugins.lazysnap]") == 1
    backups = list(tmp_path.glob("config.toml.lazysnap-*.bak"))
    assert [b.read_text() for b in backups] == [SAMPLE_CONTAINERD_CONFIG]  # one backup, of the original
    assert config.stat().st_mode & 0o777 == 0o600

    result = run(UNINSTALL, "--containerd-only", "--containerd-config", str(config))
    assert result.returncode == 0, result.stderr
    assert config.read_text() == SAMPLE_CONTAINERD_CONFIG


def test_missing_containerd_config_is_created(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "containerd" / "config.toml"
    result = run(INSTALL, "--containerd-only", "--containerd-config", str(config))
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(config.read_text())
    assert parsed["version"] == 2 and parsed["proxy_plugins"]["lazysnap"]["type"] == "snapshot"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[proxy_plugins.lazysnap]\n  type = "snapshot"\n  address = "/elsewhere.sock"\n', "different"),
        ("version = 2\n[plugins\n", "not valid TOML"),
        ('proxy_plugins = { other = { type = "snapshot", address = "/x" } }\n', "cannot take"),
    ],
    ids=["other-address", "invalid-toml", "inline-table"],
)
def test_conflicting_containerd_configs_are_left_untouched(tmp_path: Path, text: str, complaint: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = run(INSTALL, "--containerd-only", "--containerd-config", str(config))
    assert result.returncode == 1 and complaint in result.stderr
    assert config.read_text() == text
    assert list(tmp_path.iterdir()) == [config]


def test_uninstall_leaves_an_entry_it_did_not_add(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    text = '[proxy_plugins.lazysnap]\n  type = "snapshot"\n  address = "/run/lazysnap/lazysnap.sock"\n'
    config.write_text(text)
    result = run(UNINSTALL, "--containerd-only", "--containerd-config", str(config))
    assert result.returncode == 0 and "left in place" in result.stdout
    assert config.read_text() == text


# --- the whole installation ------------------------------------------------------------------


@dataclass
class Installation:
    containerd_config: Path
    install_seconds: list[float]


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    if os.geteuid() != 0:
        pytest.skip("installs system-wide: needs root")
    with open("/run/lock/lazysnap-install-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = [str(p) for p in INSTALLED_PATHS if p.exists() or p.is_symlink()]
        if existing:
            pytest.skip(f"lazysnap is already installed here ({', '.join(existing)}); not touching it")
        config = tmp_path_factory.mktemp("containerd") / "config.toml"
        config.write_text(SAMPLE_CONTAINERD_CONFIG)
        args = ("--no-start", "--configure-containerd", "--containerd-config", str(config))
        seconds = []
        try:
            for _ in range(2):
                started = time.monotonic()
                result = run(INSTALL, *args)
                seconds.append(time.monotonic() - started)
                assert result.returncode == 0, result.stdout + result.stderr
            yield Installation(config, seconds)
        finally:
            if Path("/opt/lazysnap").exists():
                run(UNINSTALL, "--purge", "--containerd-config", str(config))


@pytest.mark.slow
def test_install_twice_leaves_a_complete_install(installation: Installation) -> None:
    first, second = installation.install_seconds
    print(f"install.sh took {first:.1f}s, then {second:.1f}s")
    for cmd in ("lazysnapd", "snapctl"):
        assert os.readlink(f"/usr/local/bin/{cmd}") == f"/opt/lazysnap/bin/{cmd}"
    for unit in ("lazysnap.service", "lazysnap.socket"):
        assert Path("/etc/systemd/system", unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    config = Path("/etc/lazysnap/config.toml")
    assert config.stat().st_mode & 0o777 == 0o600
    tomllib.loads(config.read_text())
    assert Path("/var/lib/lazysnap").stat().st_mode & 0o777 == 0o700
    assert installation.containerd_config.read_text().count("[proxy_plugins.lazysnap]") == 1
    # Installed from a copy: the venv must not point back into the checkout.
    probe = subprocess.run(
        ["/opt/lazysnap/bin/python", "-c", "import snapshotter; print(snapshotter.__file__)"],
        capture_output=True, text=True, check=True, cwd="/",
    )
    assert probe.stdout.startswith("/opt/lazysnap/lib/")
    result = subprocess.run(
        ["/usr/local/bin/lazysnapd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--address" in result.stdout


def installed_source(module: str) -> str | None:
    """The text of ``snapshotter/<module>.py`` as installed in the venv, None if absent."""
    found = sorted(Path("/opt/lazysnap").glob(f"lib/python3*/site-packages/snapshotter/{module}.py"))
    return found[0].read_text() if found else None


def list_snapshots(address: str) -> list[object]:
    with grpc.insecure_channel("unix:" + address) as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        request = snapshots_pb2.ListSnapshotsRequest(snapshotter="lazysnap")
        return list(stub.List(request, timeout=60, wait_for_ready=True))


def daemon_env(notify: NotifyReceiver) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "PYTHON"))}
    env["NOTIFY_SOCKET"] = notify.address
    return env


@pytest.mark.slow
def test_installed_daemon_serves_with_the_installed_config(
    installation: Installation, short_tmp: Path, notify_receiver: NotifyReceiver
) -> None:
    daemon = installed_source("daemon")
    if daemon is None:
        pytest.skip("snapshotter/daemon.py is not written yet")
    address = str(short_tmp / "lazysnap.sock")
    proc = subprocess.Popen(
        ["/usr/local/bin/lazysnapd", "--root", str(short_tmp / "root"), "--address", address,
         "--config", "/etc/lazysnap/config.toml"],
        env=daemon_env(notify_receiver), cwd="/",
    )
    try:
        assert list_snapshots(address) == []
        if "notify_ready" in daemon:
            notify_receiver.wait_for("READY=1")
        if installed_source("snapctl") is not None:
            result = subprocess.run(
                ["/usr/local/bin/snapctl", "status", "--address", address, "--json"],
                capture_output=True, text=True, timeout=60, cwd="/",
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["snapshots"] == 0
    finally:
        assert stop_process(proc) == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing")
def test_installed_daemon_is_socket_activated(
    installation: Installation, short_tmp: Path, notify_receiver: NotifyReceiver
) -> None:
    daemon = installed_source("daemon") or ""
    if "pick_listener" not in daemon:
        pytest.skip("lazysnapd does not take socket-activated listeners yet (snapshotter.systemd unwired)")
    address = str(short_tmp / "lazysnap.sock")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", address, "--fdname=lazysnap-grpc",
         "-E", f"NOTIFY_SOCKET={notify_receiver.address}",
         "/usr/local/bin/lazysnapd", "--root", str(short_tmp / "root"), "--address", address,
         "--config", "/etc/lazysnap/config.toml"],
        env=daemon_env(notify_receiver), cwd="/",
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        inode = os.stat(address).st_ino
        assert list_snapshots(address) == []
        notify_receiver.wait_for("READY=1")
        assert os.stat(address).st_ino == inode
    finally:
        assert stop_process(proc) == 0
    assert os.stat(address).st_ino == inode  # lazysnapd must not unlink systemd's socket


@pytest.mark.slow
def test_uninstall_purge_restores_the_machine(installation: Installation) -> None:
    result = run(UNINSTALL, "--purge", "--containerd-config", str(installation.containerd_config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [p for p in INSTALLED_PATHS if p.exists() or p.is_symlink()] == []
    assert installation.containerd_config.read_text() == SAMPLE_CONTAINERD_CONFIG
