"""snapctl: inspect a running lazysnapd over its gRPC socket.

    snapctl status [--address SOCKET | --config FILE] [--json]

``status`` lists every snapshot and prints counts by kind (and how many are remote) and the total
disk usage (committed: as measured at Commit; active: measured now). User errors print one line
and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import grpc

from snapshotter import config as config_mod
from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.errors import ConfigError
from snapshotter.remote import REMOTE_LABEL, REMOTE_LABEL_VALUE
from snapshotter.service import kind_name

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
TIMEOUT = 30.0


@dataclass
class Status:
    """What ``snapctl status`` reports."""

    address: str
    snapshots: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {"active": 0, "view": 0, "committed": 0})
    remote: int = 0
    size_bytes: int = 0
    inodes: int = 0


def collect(address: str) -> Status:
    """Query the daemon at ``address``; raises grpc.RpcError when it cannot be reached."""
    status = Status(address=address)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        listing = stub.List(snapshots_pb2.ListSnapshotsRequest(), timeout=TIMEOUT)
        infos = [i for resp in listing for i in resp.info]
        for info in infos:
            kind = kind_name(info.kind)
            status.by_kind[kind] = status.by_kind.get(kind, 0) + 1
            status.remote += info.labels.get(REMOTE_LABEL) == REMOTE_LABEL_VALUE
            try:
                usage = stub.Usage(snapshots_pb2.UsageRequest(key=info.name), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # removed while we were looking
                    continue
                raise
            status.size_bytes += usage.size
            status.inodes += usage.inodes
        status.snapshots = len(infos)
    return status


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render(status: Status) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in status.by_kind.items())
    return "\n".join([
        f"lazysnapd at {status.address}",
        f"snapshots: {status.snapshots} ({kinds}; remote {status.remote})",
        f"usage:     {_human(status.size_bytes)} in {status.inodes} inodes",
    ])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``snapctl``; returns the exit status."""
    p = argparse.ArgumentParser(prog="snapctl", description="inspect a running lazysnapd")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="snapshot counts and disk usage")
    st.add_argument("--address", help="lazysnapd's socket (default: from --config, else built in)")
    st.add_argument("--config", help="lazysnapd's TOML config, to find its socket")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        address = args.address or config_mod.load(args.config).address
    except ConfigError as exc:
        print(f"snapctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = collect(address)
    except grpc.RpcError as exc:
        print(f"snapctl: cannot query lazysnapd at {address}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(asdict(status)) if args.json else render(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
