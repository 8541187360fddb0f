"""Fixtures for the snapshotter tests: a real lazysnapd process and a gRPC client for it."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from snapshotter.api import snapshots_pb2 as pb  # noqa: E402
from snapshotter.api import snapshots_pb2_grpc  # noqa: E402
from tests.harness.procs import Daemon, short_tempdir, unmount_below, wait_until  # noqa: E402

NAMESPACE = (("containerd-namespace", "testsuite"),)


class Client:
    """A Snapshots API client that sends the namespace header as containerd does."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)

    def __getattr__(self, rpc: str) -> Any:
        method = getattr(self.stub, rpc)

        def call(**fields: Any) -> Any:
            request = getattr(pb, _REQUESTS[rpc])(**fields)
            result = method(request, metadata=NAMESPACE, timeout=60)
            return list(result) if rpc == "List" else result

        return call

    def infos(self, *filters: str) -> dict[str, Any]:
        """Every snapshot matching the filters, by name."""
        return {i.name: i for resp in self.List(filters=list(filters)) for i in resp.info}

    def close(self) -> None:
        self.channel.close()


_REQUESTS = {
    "Prepare": "PrepareSnapshotRequest", "View": "ViewSnapshotRequest", "Mounts": "MountsRequest",
    "Commit": "CommitSnapshotRequest", "Remove": "RemoveSnapshotRequest", "Stat": "StatSnapshotRequest",
    "Update": "UpdateSnapshotRequest", "List": "ListSnapshotsRequest", "Usage": "UsageRequest",
    "Cleanup": "CleanupRequest",
}


def status_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = excinfo.value.code()  # type: ignore[attr-defined]
    return code


class Snapd:
    """One lazysnapd process with its own root and socket; restartable on the same root."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.address = workdir / "s.sock"
        self.extra_args = extra_args
        self.daemon: Daemon | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> Snapd:
        exe = shutil.which("lazysnapd")
        assert exe, "lazysnapd is not on PATH (pip install -e .)"
        self.starts += 1
        argv = [exe, "--root", str(self.root), "--address", str(self.address), "--log-level", "debug",
                *self.extra_args]
        self.daemon = Daemon(f"lazysnapd-{self.starts}", argv, self.workdir)
        daemon = self.daemon

        def ready() -> bool:
            daemon.check_alive()
            return self.address.is_socket() and _accepts(str(self.address))

        wait_until(ready, timeout, f"lazysnapd socket {self.address}")
        return self

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def client(self) -> Client:
        return Client(str(self.address))

    def stop(self, grace: float = 15.0) -> int:
        assert self.daemon is not None
        return self.daemon.stop(grace=grace)

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.stop(grace=5.0, sig=signal.SIGKILL)

    def log(self) -> str:
        assert self.daemon is not None
        return self.daemon.stderr_path.read_text(errors="replace")


def _accepts(address: str) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(address)
        except OSError:
            return False
    return True


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory under /tmp, unmounted and removed afterwards."""
    d = short_tempdir("lzs-")
    yield d
    unmount_below(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def snapd(workdir: Path) -> Iterator[Snapd]:
    """A running lazysnapd on a fresh root, stopped by PID at the end of the test."""
    s = Snapd(workdir).start()
    try:
        yield s
    finally:
        if s.daemon is not None:
            s.stop()


@pytest.fixture
def client(snapd: Snapd) -> Iterator[Client]:
    c = snapd.client()
    yield c
    c.close()
