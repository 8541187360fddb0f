"""A private containerd 1.6 with lazysnap registered as a proxy snapshotter.

    with Containerd(workdir, proxy_socket=lazysnapd.address, registries=[reg.host]) as ctd:
        ctd.pull(ref, "lazysnap")                    # ctr image pull --plain-http --snapshotter
        out = ctd.run(ref, ["cat", "/etc/motd"], "lazysnap")   # ctr run --rm ...; returns stdout
        ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
        ctd.snapshots("lazysnap")                    # [(key, parent, kind)]
        ctd.wait_for_snapshotter("lazysnap")         # after restarting the snapshotter

Everything lives under `workdir` (config, root, state, socket, logs; keep the path short: the
socket path is limited to 107 bytes). Each instance uses its own namespace (`namespace`, unique by
default) because runc keeps its state under the shared /run/containerd/runc/<namespace>.
The CRI plugin is off unless `cri=CriOptions(...)` is given; it then runs with the given default
snapshotter, `disable_snapshot_annotations = false`, an empty CNI config dir and the registry
hosts from `registries` (plain HTTP, via `certs.d/<host>/hosts.toml`, which `hosts_dir` also offers
to ctr's `--hosts-dir`).

`stop()` kills and deletes every task and container of every namespace, stops containerd (SIGTERM,
then SIGKILL), kills the shims this instance started (matched by their `-address` argument, killed
by PID), and unmounts whatever is left below its root and state.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .procs import Daemon, HarnessError, unmount_below, wait_until

__all__ = ["Containerd", "CriOptions"]

_BIN = "/usr/bin/containerd"


@dataclass(frozen=True)
class CriOptions:
    """Settings of the CRI plugin when a test turns it on."""

    snapshotter: str = "lazysnap"
    disable_snapshot_annotations: bool = False
    sandbox_image: str = "registry.k8s.io/pause:3.6"


def _toml_str(value: str | Path) -> str:
    s = str(value)
    if any(c in s for c in '"\\\n'):
        raise HarnessError(f"refusing to put {s!r} into a TOML string")
    return f'"{s}"'


class Containerd:
    """A containerd process with its own root, state, socket and config under `workdir`."""

    def __init__(self, workdir: Path, *, proxy_socket: Path | None = None, proxy_name: str = "lazysnap",
                 namespace: str | None = None, registries: Sequence[str] = (),
                 cri: CriOptions | None = None, log_level: str = "info",
                 start_timeout: float = 30.0) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.address = workdir / "containerd.sock"
        self.config_path = workdir / "containerd.toml"
        self.hosts_dir = workdir / "certs.d"
        self.proxy_socket = proxy_socket
        self.proxy_name = proxy_name
        self.namespace = namespace or f"lzs-{secrets.token_hex(4)}"
        self.registries = list(registries)
        self.cri = cri
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._daemon: Daemon | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._daemon is None:
            raise HarnessError("containerd not started")
        return self._daemon.pid

    @property
    def log_path(self) -> Path:
        """containerd's log (it logs to stderr)."""
        return self.workdir / "containerd.err"

    def _write_hosts(self) -> None:
        for host in self.registries:
            d = self.hosts_dir / host
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts.toml").write_text(
                f'server = "http://{host}"\n\n[host."http://{host}"]\n'
                '  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n')

    def config_text(self) -> str:
        """The config.toml this instance runs with."""
        disabled = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
        if self.cri is None:
            disabled.insert(0, "io.containerd.grpc.v1.cri")
        lines = [
            "# written by tests/harness/containerd.py",
            "version = 2",
            f"root = {_toml_str(self.root)}",
            f"state = {_toml_str(self.state)}",
            "disabled_plugins = [" + ", ".join(f'"{p}"' for p in disabled) + "]",
            "",
            "[grpc]",
            f"  address = {_toml_str(self.address)}",
            "[ttrpc]",
            f"  address = {_toml_str(str(self.address) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            f'  level = "{self.log_level}"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(self.workdir / 'opt')}",
        ]
        if self.proxy_socket is not None:
            lines += ["", f"[proxy_plugins.{self.proxy_name}]", '  type = "snapshot"',
                      f"  address = {_toml_str(self.proxy_socket)}"]
        if self.cri is not None:
            cri = '[plugins."io.containerd.grpc.v1.cri"]'
            annotations = "true" if self.cri.disable_snapshot_annotations else "false"
            lines += [
                "", cri,
                "  disable_tcp_service = true",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                f"  sandbox_image = {_toml_str(self.cri.sandbox_image)}",
                f"{cri[:-1]}.containerd]",
                f"  snapshotter = {_toml_str(self.cri.snapshotter)}",
                f"  disable_snapshot_annotations = {annotations}",
                f"{cri[:-1]}.cni]",
                f"  bin_dir = {_toml_str(self.workdir / 'cni' / 'bin')}",
                f"  conf_dir = {_toml_str(self.workdir / 'cni' / 'conf')}",
                f"{cri[:-1]}.registry]",
                f"  config_path = {_toml_str(self.hosts_dir)}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Containerd:
        """Write the config, start containerd and wait until `ctr version` answers."""
        for d in (self.root, self.state, self.hosts_dir, self.workdir / "cni" / "bin",
                  self.workdir / "cni" / "conf"):
            d.mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        self.config_path.write_text(self.config_text())
        self.address.unlink(missing_ok=True)
        self._daemon = Daemon("containerd", [_BIN, "--config", str(self.config_path)], self.workdir)

        def ready() -> bool:
            assert self._daemon is not None
            self._daemon.check_alive()
            return self.address.exists() and self.ctr("version", check=False, timeout=5).returncode == 0

        try:
            wait_until(ready, self.start_timeout, f"containerd on {self.address}", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill tasks, delete containers, stop containerd and its shims, unmount leftovers."""
        if self._daemon is None:
            return
        if self._daemon.alive():
            try:
                self._remove_workloads()
            except (subprocess.TimeoutExpired, OSError) as exc:
                # a hung snapshotter must not keep containerd running: stop it anyway
                print(f"harness: containerd cleanup via ctr failed: {exc}", file=sys.stderr)
        self._daemon.stop(grace=15.0)
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        unmount_below(self.state)
        unmount_below(self.root)
        # only our own namespace: "k8s.io" (CRI) or "default" may be in use by another instance
        for ns in (self.namespace,):
            _rmdir_quiet(Path("/run/containerd/runc") / ns)
            for ctl in Path("/sys/fs/cgroup").glob("*"):
                _rmdir_quiet(ctl / ns)
            _rmdir_quiet(Path("/sys/fs/cgroup") / ns)

    def _remove_workloads(self) -> None:
        res = self.ctr_in(None, "namespaces", "ls", "-q", check=False, timeout=10)
        namespaces = set(res.stdout.split()) | {self.namespace}
        for ns in namespaces:
            tasks = self.ctr_in(ns, "tasks", "ls", "-q", check=False, timeout=10).stdout.split()
            for t in tasks:
                self.ctr_in(ns, "tasks", "kill", "-s", "SIGKILL", t, check=False, timeout=10)
            for t in tasks:
                self.ctr_in(ns, "tasks", "delete", "--force", t, check=False, timeout=20)
            for c in self.ctr_in(ns, "containers", "ls", "-q", check=False, timeout=10).stdout.split():
                self.ctr_in(ns, "containers", "delete", c, check=False, timeout=20)

    def shim_pids(self) -> list[int]:
        """PIDs of containerd-shim processes started by this instance (by their -address)."""
        want = os.fsencode(str(self.address))
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and want in argv:
                pids.append(int(entry.name))
        return pids

    # ---- clients ---------------------------------------------------------------------------

    def ctr_in(self, namespace: str | None, *args: str, check: bool = True, timeout: float = 120,
               binary: str = "ctr") -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCK [-n NAMESPACE] ARGS`; raise HarnessError on failure when `check`."""
        argv = [binary, "-a", str(self.address)]
        if namespace is not None:
            argv += ["-n", namespace]
        argv += list(args)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr.strip()}"
                               f"\n{res.stdout.strip()[-2000:]}")
        return res

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`ctr -a SOCK -n NAMESPACE ARGS` in this instance's namespace."""
        return self.ctr_in(self.namespace, *args, check=check, timeout=timeout)

    def ctr_remote(self, *args: str, check: bool = True,
                   timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`ctr-remote -a SOCK -n NAMESPACE ARGS` (stargz-snapshotter's ctr with convert/rpull)."""
        return self.ctr_in(self.namespace, *args, check=check, timeout=timeout, binary="ctr-remote")

    def pull(self, ref: str, snapshotter: str, *extra: str) -> None:
        """`ctr image pull --plain-http --snapshotter S REF` (unpacks into that snapshotter)."""
        self.ctr("image", "pull", "--plain-http", "--snapshotter", snapshotter, *extra, ref, timeout=180)

    def run(self, ref: str, cmd: Sequence[str], snapshotter: str, container_id: str | None = None,
            extra: Sequence[str] = (), timeout: float = 120) -> str:
        """`ctr run --rm --snapshotter S REF ID CMD...`; return the container's stdout."""
        cid = container_id or f"run-{secrets.token_hex(4)}"
        res = self.ctr("run", "--rm", "--snapshotter", snapshotter, *extra, ref, cid, *cmd, timeout=timeout)
        return res.stdout

    def snapshots(self, snapshotter: str, namespace: str | None = None) -> list[tuple[str, str, str]]:
        """`ctr snapshots --snapshotter S ls` as (key, parent, kind) rows (CRI uses "k8s.io")."""
        out = self.ctr_in(namespace or self.namespace, "snapshots", "--snapshotter", snapshotter,
                          "ls").stdout.splitlines()
        rows = []
        for line in out[1:]:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], parts[1], parts[2]))
            elif len(parts) == 2:  # a base layer has no parent
                rows.append((parts[0], "", parts[1]))
        return rows

    def wait_for_snapshotter(self, snapshotter: str, timeout: float = 20.0) -> None:
        """Wait until containerd reaches `snapshotter` again (after its daemon restarted).

        containerd's gRPC client keeps the last dial error through its reconnect backoff (up to
        3 s in 1.6), so calls right after a restart can fail with Unavailable although the new
        daemon is already listening.
        """
        wait_until(lambda: self.ctr("snapshots", "--snapshotter", snapshotter, "ls", check=False,
                                    timeout=10).returncode == 0,
                   timeout, f"containerd to reach snapshotter {snapshotter}", interval=0.2)

    def task_rootfs(self, container_id: str) -> Path:
        """Where a running task's rootfs is mounted on the host (to look at it from outside)."""
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / container_id / "rootfs"


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
