"""The systemd units: valid for systemd itself and consistent with the daemon and each other."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from opsupport import REPO

from snapshotter import systemd

UNITS = REPO / "systemd"
# Settings that give the service its own mount namespace: its FUSE and overlay mounts would then
# be invisible to containerd.
MOUNT_NAMESPACE_SETTINGS = {
    "PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices", "PrivateMounts", "ReadOnlyPaths",
    "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "ProcSubset", "RootDirectory", "RootImage", "MountAPIVFS", "DynamicUser",
    "PrivateUsers", "PrivateNetwork",
}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, keeping repeated keys (configparser cannot)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    daemon = tmp_path / "lazysnapd"
    daemon.write_text("#!/bin/sh\nexit 0\n")
    daemon.chmod(0o755)
    for name in ("lazysnap.service", "lazysnap.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/lazysnapd", str(daemon))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "lazysnap.socket", "lazysnap.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    # verify only warns about unknown keys or sections: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_service_contract() -> None:
    service = unit_settings(UNITS / "lazysnap.service")
    assert service["Service.Type"] == ["notify"]
    assert service["Service.KillMode"] == ["mixed"]
    assert service["Service.Restart"] == ["always"]
    assert "containerd.service" in service["Unit.Before"][0].split()
    assert {"network-online.target", "local-fs.target"} <= set(service["Unit.After"][0].split())
    assert "lazysnap.socket" in service["Unit.Requires"][0].split()
    assert int(service["Service.LimitNOFILE"][0]) >= 65536
    assert "CAP_SYS_ADMIN" in service["Service.CapabilityBoundingSet"][0].split()
    assert "/dev/fuse rw" in service["Service.DeviceAllow"]
    keys = {key.partition(".")[2] for key in service}
    assert not keys & MOUNT_NAMESPACE_SETTINGS


def test_socket_matches_the_service_and_the_daemon() -> None:
    service = unit_settings(UNITS / "lazysnap.service")
    sock = unit_settings(UNITS / "lazysnap.socket")
    argv = shlex.split(service["Service.ExecStart"][0])
    assert argv[0] == "/usr/local/bin/lazysnapd"
    address = argv[argv.index("--address") + 1]
    assert sock["Socket.ListenStream"] == [address] == ["/run/lazysnap/lazysnap.sock"]
    assert sock["Socket.FileDescriptorName"] == [systemd.DEFAULT_FD_NAME]
    assert sock["Socket.SocketMode"] == ["0660"]
    assert sock["Socket.SocketUser"] == sock["Socket.SocketGroup"] == ["root"]
    assert service["Service.Sockets"] == ["lazysnap.socket"]
