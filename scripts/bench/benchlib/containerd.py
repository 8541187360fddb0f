"""A private containerd (own root, state, socket and namespace) with the bench's proxy snapshotters."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from .procs import Daemon, run, umount_below, wait_for

CONTAINERD_BIN = "/usr/bin/containerd"
NAMESPACE = "lazysnap-bench"


class Containerd:
    """containerd 1.6 with CRI disabled and `proxies` (name -> socket) as proxy snapshotters."""

    def __init__(self, root: Path, state: Path, log_path: Path, proxies: dict[str, Path]):
        self.root = root
        self.state = state
        self.socket = state / "containerd.sock"
        self.config = root.parent / f"{root.name}.toml"
        self.log_path = log_path
        self.proxies = proxies
        self.daemon = Daemon("containerd", [CONTAINERD_BIN, "--config", str(self.config)], log_path)

    def _write_config(self) -> None:
        proxies = "".join(
            f'\n[proxy_plugins."{name}"]\n  type = "snapshot"\n  address = "{sock}"\n'
            for name, sock in self.proxies.items()
        )
        disabled = ", ".join(f'"io.containerd.{p}"' for p in (
            "grpc.v1.cri", "snapshotter.v1.aufs", "snapshotter.v1.btrfs", "snapshotter.v1.zfs",
            "snapshotter.v1.devmapper"))
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\nstate = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  level = "info"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.root}-opt"\n'
            + proxies
        )

    def start(self) -> None:
        """Start containerd and wait until it answers on its socket."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.daemon.start()
        wait_for(lambda: self.ctr_ok(), f"containerd on {self.socket}", 60, self.daemon)

    def ctr_ok(self) -> bool:
        if not self.socket.exists():
            return False
        return subprocess.run(["ctr", "-a", str(self.socket), "version"], capture_output=True,
                              check=False).returncode == 0

    def ctr(self, *args: str) -> list[str]:
        """argv of `ctr` against this containerd and namespace."""
        return ["ctr", "-a", str(self.socket), "-n", NAMESPACE, *args]

    def ctr_remote(self, *args: str) -> list[str]:
        """argv of `ctr-remote` (stargz-snapshotter's ctr) against this containerd."""
        return ["ctr-remote", "-a", str(self.socket), "-n", NAMESPACE, *args]

    def _kill_tasks(self) -> None:
        tasks = run(self.ctr("task", "ls", "-q"), check=False).stdout.split()
        for t in tasks:
            run(self.ctr("task", "kill", "-s", "KILL", t), check=False)
        for t in tasks:
            run(self.ctr("task", "rm", "-f", t), check=False)
        for c in run(self.ctr("container", "ls", "-q"), check=False).stdout.split():
            run(self.ctr("container", "rm", c), check=False)

    def stop(self) -> None:
        """Kill our containers, then stop containerd (by PID)."""
        if self.daemon.alive():
            with contextlib.suppress(Exception):
                self._kill_tasks()
        self.daemon.stop()

    def wipe(self) -> None:
        """Remove all content, images and snapshots (containerd must be stopped)."""
        for d in (self.state, self.root, Path(f"{self.root}-opt")):
            if d.exists():
                umount_below(d)
                shutil.rmtree(d)
