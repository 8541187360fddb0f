"""The gRPC servicer for ``containerd.services.snapshots.v1.Snapshots``: decode, call, encode.

Methods run in the gRPC server's worker threads (:mod:`snapshotter.rpc`) and call
:class:`~snapshotter.snapshots.Snapshots` directly (it blocks; that is what those threads are
for). One wrapper turns errors into status codes through :data:`snapshotter.errors.STATUS_CODES`;
anything unexpected is logged with its traceback and becomes INTERNAL. The
``containerd-namespace`` metadata header is accepted and ignored: containerd's metadata store has
already namespaced the keys it sends to a proxy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter.api import mount_pb2, snapshots_pb2
from snapshotter.errors import status_code_for
from snapshotter.mounts import Mount
from snapshotter.rpc import Context, StatusCode
from snapshotter.snapshots import Snapshots
from snapshotter.store import Kind, Record

log = logging.getLogger(__name__)

LIST_BATCH = 100  # infos per streamed List message, as containerd's own service sends them

F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Run a servicer method, turning snapshotter errors into gRPC statuses."""

    @functools.wraps(method)
    def wrapper(self: SnapshotsService, request: Any, context: Context) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            code = status_code_for(exc)
            if code is None:
                log.exception("unexpected error in %s", method.__name__, extra={"rpc": method.__name__})
                context.abort(StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            log.debug("%s: %s", method.__name__, exc, extra={"rpc": method.__name__, "code": code.name})
            context.abort(code, str(exc))

    return wrapper  # type: ignore[return-value]


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_message(rec: Record) -> snapshots_pb2.Info:
    """The API ``Info`` of a stored snapshot."""
    return snapshots_pb2.Info(
        name=rec.key,
        parent=rec.parent,
        kind=snapshots_pb2.Kind.Name(int(rec.kind)),
        created_at=_timestamp(rec.created_ns),
        updated_at=_timestamp(rec.updated_ns),
        labels=rec.labels,
    )


class SnapshotsService:
    """Serves one :class:`Snapshots` over gRPC."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    @rpc
    def Prepare(self, request: snapshots_pb2.PrepareSnapshotRequest,
                context: Context) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self.snapshots.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @rpc
    def View(self, request: snapshots_pb2.ViewSnapshotRequest,
             context: Context) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self.snapshots.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @rpc
    def Mounts(self, request: snapshots_pb2.MountsRequest,
               context: Context) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.snapshots.mounts(request.key)))

    @rpc
    def Commit(self, request: snapshots_pb2.CommitSnapshotRequest,
               context: Context) -> empty_pb2.Empty:
        self.snapshots.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @rpc
    def Remove(self, request: snapshots_pb2.RemoveSnapshotRequest,
               context: Context) -> empty_pb2.Empty:
        self.snapshots.remove(request.key)
        return empty_pb2.Empty()

    @rpc
    def Stat(self, request: snapshots_pb2.StatSnapshotRequest,
             context: Context) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=info_message(self.snapshots.stat(request.key)))

    @rpc
    def Update(self, request: snapshots_pb2.UpdateSnapshotRequest,
               context: Context) -> snapshots_pb2.UpdateSnapshotResponse:
        info, paths = request.info, list(request.update_mask.paths)
        rec = self.snapshots.update(info.name, dict(info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_message(rec))

    @rpc
    def List(self, request: snapshots_pb2.ListSnapshotsRequest,
             context: Context) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        # Collected before streaming, so no lock is held while the client handles a batch (it
        # may call Stat from its walk callback).
        infos = [info_message(r) for r in self.snapshots.walk(list(request.filters))]
        return iter([snapshots_pb2.ListSnapshotsResponse(info=infos[i : i + LIST_BATCH])
                     for i in range(0, len(infos), LIST_BATCH)])

    @rpc
    def Usage(self, request: snapshots_pb2.UsageRequest,
              context: Context) -> snapshots_pb2.UsageResponse:
        usage = self.snapshots.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @rpc
    def Cleanup(self, request: snapshots_pb2.CleanupRequest,
                context: Context) -> empty_pb2.Empty:
        self.snapshots.cleanup()
        return empty_pb2.Empty()


def kind_name(kind: int) -> str:
    """``active``/``view``/``committed`` for an API kind number (``unknown`` otherwise)."""
    try:
        return Kind(kind).filter_name
    except ValueError:
        return "unknown"
