"""The snapshotters under test and how each is brought back to a cold state between runs.

`overlayfs` is containerd's built-in snapshotter fed by a full pull. `stargz-go` is the Go stargz
snapshotter (our small `anchor/main.go` over Debian's library). `lazysnap` is `lazysnapd`.
Both proxies are reset by stopping the daemon, unmounting what is left below its root, deleting the
root (snapshots and caches) and starting it again.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .paths import BIN_DIR, HERE
from .procs import BenchError, Daemon, run, umount_below, wait_for

log = logging.getLogger(__name__)

ANCHOR_BIN = BIN_DIR / "stargz-anchor"
ANCHOR_SOURCE = HERE / "anchor" / "main.go"


def build_anchor(log_path: Path) -> Path:
    """Build the Go anchor against Debian's Go packages (GOPATH mode, offline)."""
    if ANCHOR_BIN.exists() and ANCHOR_BIN.stat().st_mtime >= ANCHOR_SOURCE.stat().st_mtime:
        return ANCHOR_BIN
    lib = Path("/usr/share/gocode/src/github.com/containerd/stargz-snapshotter/fs")
    if not lib.is_dir():
        raise BenchError("golang-github-containerd-stargz-snapshotter-dev is not installed")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    cache = BIN_DIR.parent / "cache" / "gocache"
    run(["go", "build", "-trimpath", "-o", f"{ANCHOR_BIN}.new", "."], log_path=log_path,
        env={"GO111MODULE": "off", "GOFLAGS": "", "GOPATH": "/usr/share/gocode", "GOCACHE": str(cache)},
        cwd=ANCHOR_SOURCE.parent)
    Path(f"{ANCHOR_BIN}.new").rename(ANCHOR_BIN)
    return ANCHOR_BIN


@dataclass
class Snapshotter:
    """One column of the results: how to pull with it and, for proxies, its daemon."""

    name: str
    #: image variants measured with this snapshotter, in table order
    variants: tuple[str, ...]
    #: root and socket of the proxy daemon (None for the built-in overlayfs)
    root: Path | None = None
    socket: Path | None = None
    argv: tuple[str, ...] = ()
    log_path: Path | None = None
    stop_signal: signal.Signals = signal.SIGINT
    daemon: Daemon | None = None
    #: why this snapshotter cannot be measured (None = it can)
    unavailable: str | None = None
    #: `--profile`: attach py-spy to each daemon started, writing `<dir>/<name>-<label>.txt`
    profile_dir: Path | None = None
    profile_label: str = "run"
    profiler: subprocess.Popen[bytes] | None = None

    @property
    def containerd_name(self) -> str:
        """The name containerd knows it by (`--snapshotter`)."""
        return "overlayfs" if self.root is None else self.name

    def pull_argv(self, ctr: list[str], ctr_remote: list[str], image_ref: str) -> list[str]:
        """The pull command: a full pull for overlayfs, `ctr-remote image rpull` for the proxies."""
        if self.root is None:
            return [*ctr, "image", "pull", "--plain-http", image_ref]
        return [*ctr_remote, "image", "rpull", "--plain-http", "--snapshotter", self.name, image_ref]

    def stop(self) -> None:
        """Stop the daemon (by PID) and unmount what it left below its root."""
        if self.daemon is not None:
            self.daemon.stop(self.stop_signal, timeout=30)
            self.daemon = None
        if self.profiler is not None:  # it writes its file once the daemon it samples is gone
            try:
                self.profiler.wait(60)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait(10)
            self.profiler = None
        if self.root is not None and self.root.exists():
            umount_below(self.root)

    def reset(self) -> None:
        """Stop, wipe every snapshot and cache, start again and wait for the socket."""
        if self.root is None:
            return
        assert self.socket is not None and self.log_path is not None
        self.stop()
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.socket.unlink(missing_ok=True)
        self.daemon = Daemon(self.name, list(self.argv), self.log_path)
        self.daemon.start()
        sock = self.socket
        wait_for(sock.exists, f"{self.name} socket {sock}", 60, self.daemon)
        if self.profile_dir is not None and self.name == "lazysnap":
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            out = self.profile_dir / f"{self.name}-{self.profile_label}.txt"
            # --idle: cold starts wait on the network; where the daemon waits is the question
            self.profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(self.daemon.pid), "--idle", "--threads", "--nonblocking",
                 "--rate", "200", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def peak_rss_kib(self) -> int | None:
        return self.daemon.peak_rss_kib() if self.daemon is not None else None


def overlayfs() -> Snapshotter:
    return Snapshotter("overlayfs", ("org",))


def stargz_go(state: Path, sock_dir: Path, log_dir: Path, plain_http: list[str]) -> Snapshotter:
    """The Go anchor; builds it first if needed."""
    root, sock = state / "stargz-go", sock_dir / "stargz-go.sock"
    logf = log_dir / "stargz-go.log"
    s = Snapshotter("stargz-go", ("esgz", "opt", "org"), root, sock,
                    (str(ANCHOR_BIN), "-address", str(sock), "-root", str(root),
                     "-plain-http", ",".join(plain_http)), logf)
    try:
        build_anchor(log_dir / "build-anchor.log")
    except BenchError as exc:
        s.unavailable = f"the Go anchor does not build: {exc}"
    return s


def write_lazysnap_config(path: Path, plain_http: list[str], extra: str = "") -> Path:
    """A lazysnapd config reaching the bench registries over HTTP, with no host's certs.d applied.

    `extra` (TOML without a [registry] table) is appended, e.g. "[prefetch]\\nno_background_fetch = true".
    """
    hosts_dir = path.parent / "certs.d"
    hosts_dir.mkdir(parents=True, exist_ok=True)
    hosts = ", ".join(f'"{h}"' for h in plain_http)
    path.write_text(f'[registry]\ninsecure_hosts = [{hosts}]\nhosts_dir = "{hosts_dir}"\n\n{extra}\n')
    return path


def lazysnap(state: Path, sock_dir: Path, log_dir: Path, config: Path | None,
             plain_http: list[str], extra_toml: str = "") -> Snapshotter:
    """lazysnapd; marked unavailable (with the reason) when it is not installed or does not start.

    Without an explicit `config`, one is written that marks `plain_http` registries insecure.
    """
    root, sock = state / "lazysnap", sock_dir / "lazysnap.sock"
    if config is None:
        config = write_lazysnap_config(state / "lazysnap-config" / "lazysnap.toml", plain_http, extra_toml)
    argv = ["lazysnapd", "--root", str(root), "--address", str(sock), "--config", str(config)]
    s = Snapshotter("lazysnap", ("esgz", "opt", "org"), root, sock, tuple(argv),
                    log_dir / "lazysnap.log")
    exe = shutil.which("lazysnapd")
    if exe is None:
        s.unavailable = "lazysnapd is not installed"
        return s
    probe = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        s.unavailable = f"`lazysnapd --help` exits {probe.returncode}: {last[0][:160]}"
    return s
