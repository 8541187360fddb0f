"""Run the lazysnap daemon under test: `lazysnapd --root DIR --address SOCKET [--config FILE]`.

    with Lazysnapd(workdir, config="...toml...") as snapd:   # or the `lazysnapd` pytest fixture
        snapd.address        # the gRPC socket to give containerd as proxy_plugins address
        snapd.root           # its root: metadata.db, snapshots/<id>/..., caches
        snapd.snapshot_dirs()

`start()` raises HarnessError when the `lazysnapd` executable is missing, exits early or does
not create its socket in time (the message carries the tail of its log). `stop()` sends SIGTERM,
then SIGKILL after `grace` seconds, and unmounts whatever is still mounted below its root
(returned by `stop()`, so a test can assert the daemon cleaned up by itself).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType

from .procs import Daemon, HarnessError, unmount_below, wait_until

__all__ = ["Lazysnapd", "find_lazysnapd"]


def find_lazysnapd(binary: str = "lazysnapd") -> str:
    """The path of the lazysnapd executable; HarnessError when it is not installed or cannot start."""
    path = shutil.which(binary)
    if path is None:
        raise HarnessError(f"{binary} not found on PATH (pip install -e . installs it)")
    res = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise HarnessError(f"{path} --help failed ({res.returncode}): {res.stderr.strip()[-1500:]}")
    return path


class Lazysnapd:
    """One lazysnapd process with its own root and socket under `workdir`."""

    def __init__(self, workdir: Path, *, config: str | None = None, binary: str = "lazysnapd",
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 start_timeout: float = 30.0) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.address = workdir / "lazysnap.sock"
        self.config_path = workdir / "config.toml" if config is not None else None
        self.config = config
        self.binary = binary
        self.extra_args = extra_args
        self.env = env
        self.start_timeout = start_timeout
        self._daemon: Daemon | None = None

    @property
    def pid(self) -> int:
        if self._daemon is None:
            raise HarnessError("lazysnapd not started")
        return self._daemon.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "lazysnapd.err"

    def start(self) -> Lazysnapd:
        exe = find_lazysnapd(self.binary)
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [exe, "--root", str(self.root), "--address", str(self.address)]
        if self.config_path is not None and self.config is not None:
            self.config_path.write_text(self.config)
            argv += ["--config", str(self.config_path)]
        argv += list(self.extra_args)
        self.address.unlink(missing_ok=True)
        self._daemon = Daemon("lazysnapd", argv, self.workdir, env=self.env)

        def ready() -> bool:
            assert self._daemon is not None
            self._daemon.check_alive()
            return self.address.is_socket()

        try:
            wait_until(ready, self.start_timeout, f"lazysnapd socket {self.address}")
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self._daemon is not None and self._daemon.alive()

    def log_tail(self, lines: int = 40) -> str:
        return self._daemon.log_tail(lines) if self._daemon is not None else ""

    def stop(self, grace: float = 15.0) -> list[Path]:
        """SIGTERM, SIGKILL after `grace` s; unmount leftovers below root and return them."""
        if self._daemon is not None:
            self._daemon.stop(grace=grace)
        return unmount_below(self.root)

    def restart(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> list[Path]:
        """Stop with `sig` (SIGKILL simulates a crash), then start again on the same root/socket.

        Returns what had to be unmounted in between (nothing, for a daemon that cleans up).
        """
        left: list[Path] = []
        if self._daemon is not None:
            self._daemon.stop(grace=grace, sig=sig)
            left = unmount_below(self.root) if sig != signal.SIGKILL else []
        self.start()
        return left

    @property
    def returncode(self) -> int | None:
        return None if self._daemon is None else self._daemon.proc.returncode

    def snapshot_dirs(self) -> list[Path]:
        """The entries of `<root>/snapshots/` (one directory per snapshot)."""
        d = self.root / "snapshots"
        return sorted(d.iterdir()) if d.is_dir() else []

    def __enter__(self) -> Lazysnapd:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
