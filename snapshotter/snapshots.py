"""containerd's snapshotter semantics over the store and the snapshot directories, plus the
remote-snapshot handshake and its fallback.

Every public method is synchronous and blocks (sqlite, directory walks, mount syscalls): the gRPC
worker threads call them directly. Calls into a :class:`~snapshotter.remote.LayerFilesystem` go to
the trio loop with ``trio.from_thread.run``; :meth:`Snapshots.restore_remote` runs on the loop and
pushes its blocking work to threads.

Crash safety: a snapshot directory is built under a temporary name, renamed to its id inside the
write transaction that inserts the row, and the rename is fsynced before that transaction commits.
So after ``kill -9`` a row always has its directory; a directory may lack a row (crash between the
rename and the commit, or between a Remove's commit and its ``rmtree``) and :meth:`recover`
removes it at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Protocol, TypeVar, runtime_checkable

import trio

from fusefs.spec import LayerSpec
from snapshotter import filters, labels, syscalls
from snapshotter.diskusage import disk_usage
from snapshotter.errors import AlreadyExists, FailedPrecondition, LabelError, Unavailable
from snapshotter.mounts import Layout, Mount, OverlayOptions, compose
from snapshotter.remote import REMOTE_LABEL, REMOTE_LABEL_VALUE, REMOTE_PREPARED_LOG_KEY, LayerFilesystem
from snapshotter.store import Kind, Record, Store, Tx, Usage, validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")

TEMP_PREFIX = "new-"


@runtime_checkable
class ForgetsLayers(Protocol):
    """A layer filesystem that can drop what it keeps (cache) for a layer released for good."""

    async def forget_layer(self, digest: str) -> None: ...


def is_remote(rec: Record) -> bool:
    return rec.kind == Kind.COMMITTED and rec.labels.get(REMOTE_LABEL) == REMOTE_LABEL_VALUE


class Snapshots:
    """The snapshotter: Prepare, View, Mounts, Commit, Remove, Stat, Update, Usage, Walk, Cleanup.

    Args:
        store: the metadata store.
        layout: where snapshot directories live.
        overlay: host-dependent overlay options.
        layerfs: serves remote layers; ``None`` disables remote snapshots.
        trio_token: the loop ``layerfs`` runs on (required with ``layerfs``).
    """

    def __init__(self, store: Store, layout: Layout, overlay: OverlayOptions,
                 layerfs: LayerFilesystem | None = None,
                 trio_token: trio.lowlevel.TrioToken | None = None) -> None:
        if layerfs is not None and trio_token is None:
            raise ValueError("a layer filesystem needs the trio token of the loop it runs on")
        self.store = store
        self.layout = layout
        self.overlay = overlay
        self.layerfs = layerfs
        self._token = trio_token

    def attach_layer_filesystem(self, layerfs: LayerFilesystem, trio_token: trio.lowlevel.TrioToken) -> None:
        """Enable remote snapshots, served by ``layerfs`` on the loop of ``trio_token``."""
        self.layerfs = layerfs
        self._token = trio_token

    def _on_loop(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    # -- creation ---------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels_: dict[str, str]) -> list[Mount]:
        """Create an active snapshot, or answer AlreadyExists after committing a remote layer."""
        validate_key(key)
        spec = self._remote_candidate(key, labels_)
        if spec is None:
            return self._create(Kind.ACTIVE, key, parent, labels_)
        return self._prepare_remote(key, parent, labels_, spec)

    def view(self, key: str, parent: str, labels_: dict[str, str]) -> list[Mount]:
        """Create a read-only view of ``parent``."""
        validate_key(key)
        return self._create(Kind.VIEW, key, parent, labels_)

    def _create(self, kind: Kind, key: str, parent: str, labels_: dict[str, str]) -> list[Mount]:
        self._check_parent(parent)
        rec, chain = self._create_record(kind, key, parent, labels_)
        return compose(self.layout, self.overlay, kind, rec.id, [r.id for r in chain])

    def _check_parent(self, parent: str, *, wait: bool = True) -> None:
        """Unavailable if a remote layer in ``parent``'s chain is not served (checked before creating)."""
        if not parent or self.layerfs is None:
            return
        with self.store.read() as tx:
            prec = tx.find(parent)
            chain = [prec, *self._chain(tx, prec)] if prec is not None else []
        self._check_remote_chain(chain, wait=wait)

    def _create_record(self, kind: Kind, key: str, parent: str,
                       labels_: dict[str, str]) -> tuple[Record, list[Record]]:
        os.makedirs(self.layout.snapshots, mode=0o700, exist_ok=True)
        # The write lock is held from mkdtemp to commit, so Cleanup never sees our temp dir unowned.
        with self.store.write() as tx:
            td = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.layout.snapshots)
            path = ""
            try:
                os.mkdir(os.path.join(td, "fs"))
                os.chmod(os.path.join(td, "fs"), 0o755)  # not left to the umask: containers need it
                if kind == Kind.ACTIVE:
                    os.mkdir(os.path.join(td, "work"))
                    os.chmod(os.path.join(td, "work"), 0o711)
                rec = tx.insert(kind, key, parent, labels_, time.time_ns())
                chain = self._chain(tx, rec)
                if chain:
                    st = os.stat(self.layout.fs(chain[0].id))
                    os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)
                path = self.layout.dir(rec.id)
                os.rename(td, path)
                td = ""
                _fsync_dir(self.layout.snapshots)
            except BaseException:
                for leftover in (td, path):
                    if leftover:
                        shutil.rmtree(leftover, ignore_errors=True)
                raise
        return rec, chain

    @staticmethod
    def _chain(tx: Tx, rec: Record) -> list[Record]:
        out = []
        for pid in tx.parent_ids(rec):
            prec = tx.by_id(pid)
            if prec is not None:
                out.append(prec)
        return out

    # -- the remote handshake ---------------------------------------------------------------

    def _remote_candidate(self, key: str, labels_: dict[str, str]) -> LayerSpec | None:
        if self.layerfs is None:
            return None
        try:
            return labels.layer_spec(labels_)
        except LabelError as exc:
            log.info("labels do not describe a usable remote layer; unpacking normally",
                     extra={"key": key, REMOTE_PREPARED_LOG_KEY: False, "reason": str(exc)})
            return None

    def _prepare_remote(self, key: str, parent: str, labels_: dict[str, str], spec: LayerSpec) -> list[Mount]:
        target = labels_[labels.SNAPSHOT_REF]
        validate_key(target, "name")
        with self.store.read() as tx:
            existing = tx.find(target)
        if existing is not None and existing.kind == Kind.COMMITTED:
            raise AlreadyExists(f"target snapshot {target!r} already exists")
        # the layers below may still be mounting: only what runs on this one needs them served
        self._check_parent(parent, wait=False)
        rec, chain = self._create_record(Kind.ACTIVE, key, parent, labels_)
        spec = replace(spec, lower=_lower_layers(chain))
        mountpoint = self.layout.fs(rec.id)
        assert self.layerfs is not None
        try:
            self._on_loop(self.layerfs.start_mount, spec, mountpoint)
        except Exception as exc:
            log.info("remote mount failed; falling back to a normal unpack",
                     extra={"key": key, "digest": spec.digest, REMOTE_PREPARED_LOG_KEY: False,
                            "reason": f"{type(exc).__name__}: {exc}"})
            _detach_stale(mountpoint)  # a mount that broke its contract must not receive the unpack
            return compose(self.layout, self.overlay, Kind.ACTIVE, rec.id, [r.id for r in chain])
        committed_labels = dict(labels_)
        committed_labels[REMOTE_LABEL] = REMOTE_LABEL_VALUE
        try:
            with self.store.write() as tx:
                tx.commit_active(key, target, committed_labels, Usage(), time.time_ns())
        except Exception:
            # Mounted but not committed (typically a concurrent Prepare committed the same target
            # first, and AlreadyExists is then the right answer): release the layer and our active
            # snapshot, and return the error as is; no fallback once a layer was mounted.
            self._unmount_quietly(mountpoint)
            try:
                with self.store.write() as tx:
                    tx.delete(key)
                remove_snapshot_dir(self.layout.dir(rec.id))
            except Exception:
                log.exception("could not remove the active snapshot of a failed remote commit",
                              extra={"key": key})
            raise
        log.info("remote snapshot committed", extra={"key": key, "snapshot": target, "digest": spec.digest,
                                                     REMOTE_PREPARED_LOG_KEY: True})
        raise AlreadyExists(f"target snapshot {target!r}")

    def _check_remote_chain(self, chain: Sequence[Record], *, wait: bool = True) -> None:
        """Unavailable unless every remote layer of ``chain`` is served; waits for the ones still
        mounting (``start_mount``) unless ``wait`` is False."""
        if self.layerfs is None:
            return
        for rec in chain:
            if is_remote(rec):
                try:
                    self._on_loop(partial(self.layerfs.check, self.layout.fs(rec.id), wait=wait))
                except Exception as exc:
                    raise Unavailable(f"remote layer {rec.key!r} is not available: {exc}") from exc

    def _unmount_quietly(self, mountpoint: str) -> None:
        assert self.layerfs is not None
        try:
            self._on_loop(self.layerfs.unmount, mountpoint)
        except Exception:
            log.exception("could not unmount remote layer", extra={"mountpoint": mountpoint})

    async def restore_remote(self) -> None:
        """Mount every committed remote snapshot again (at start). Runs on the trio loop.

        A layer that cannot be mounted is logged and left: snapshots built on it answer
        Unavailable until it can be served again.
        """
        if self.layerfs is None:
            return

        def remote_records() -> list[tuple[Record, tuple[str, ...]]]:
            with self.store.read() as tx:
                return [(r, _lower_layers(self._chain(tx, r))) for r in tx.all() if is_remote(r)]

        for rec, lower in await trio.to_thread.run_sync(remote_records):
            mountpoint = self.layout.fs(rec.id)
            try:
                spec = labels.layer_spec(rec.labels)
                if spec is None:
                    raise LabelError("labels no longer describe a remote layer")
                spec = replace(spec, lower=lower)
                await trio.to_thread.run_sync(_detach_stale, mountpoint)
                await self.layerfs.mount(spec, mountpoint)
            except Exception as exc:
                log.error("could not restore remote snapshot",
                          extra={"snapshot": rec.key, "mountpoint": mountpoint,
                                 "reason": f"{type(exc).__name__}: {exc}"})
            else:
                log.info("remote snapshot restored", extra={"snapshot": rec.key, "mountpoint": mountpoint})

    # -- queries and updates ----------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active or view snapshot (FailedPrecondition for committed ones)."""
        with self.store.read() as tx:
            rec = tx.get(key)
            if rec.kind == Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is committed, not active or view")
            chain = self._chain(tx, rec)
        self._check_remote_chain(chain)
        return compose(self.layout, self.overlay, rec.kind, rec.id, [r.id for r in chain])

    def commit(self, name: str, key: str, labels_: dict[str, str]) -> None:
        """Commit active ``key`` as ``name``, recording its disk usage."""
        validate_key(name, "name")
        with self.store.read() as tx:
            rec = tx.get(key)
        usage = disk_usage(self.layout.fs(rec.id)) if rec.kind == Kind.ACTIVE else Usage()
        with self.store.write() as tx:
            tx.commit_active(key, name, labels_, usage, time.time_ns())

    def remove(self, key: str) -> None:
        """Remove ``key`` and its directory; FailedPrecondition if it has children."""
        with self.store.read() as tx:
            rec = tx.get(key)
            if tx.has_children(rec):
                raise FailedPrecondition(f"failed to remove: cannot remove snapshot {key!r} with child")
        if is_remote(rec) and self.layerfs is not None:
            self._on_loop(self.layerfs.unmount, self.layout.fs(rec.id))
        with self.store.write() as tx:
            tx.delete(key)
        remove_snapshot_dir(self.layout.dir(rec.id))
        if is_remote(rec):
            self._forget_if_last(rec)

    def _forget_if_last(self, removed: Record) -> None:
        """Tell the layer filesystem to drop a layer's cache once no remote snapshot uses it."""
        if not isinstance(self.layerfs, ForgetsLayers):
            return
        digest = _layer_digest(removed)
        if digest is None:
            return
        with self.store.read() as tx:
            if any(is_remote(r) and _layer_digest(r) == digest for r in tx.all()):
                return
        try:
            self._on_loop(self.layerfs.forget_layer, digest)
        except Exception:
            log.exception("could not forget a removed remote layer", extra={"digest": digest})
        else:
            log.info("remote layer forgotten", extra={"snapshot": removed.key, "digest": digest})

    def stat(self, key: str) -> Record:
        with self.store.read() as tx:
            return tx.get(key)

    def update(self, key: str, labels_: dict[str, str], fieldpaths: list[str]) -> Record:
        with self.store.write() as tx:
            return tx.update_labels(key, labels_, fieldpaths, time.time_ns())

    def usage(self, key: str) -> Usage:
        """Stored usage for committed snapshots, measured now for active ones (views use none)."""
        with self.store.read() as tx:
            rec = tx.get(key)
        if rec.kind == Kind.ACTIVE:
            return disk_usage(self.layout.fs(rec.id))
        return rec.usage

    def walk(self, filter_exprs: Sequence[str]) -> list[Record]:
        """Snapshots matching any of the filters (all when there are none)."""
        flt = filters.parse_all(filter_exprs)
        with self.store.read() as tx:
            records = tx.all()
        return [r for r in records if flt.matches(_fields_of(r))]

    # -- housekeeping -----------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove snapshot directories that have no row (removed, or left by a crash). Returns them."""
        os.makedirs(self.layout.snapshots, mode=0o700, exist_ok=True)
        with self.store.write() as tx:
            ids = tx.ids()
            orphans = [os.path.join(self.layout.snapshots, d) for d in os.listdir(self.layout.snapshots)
                       if not (d.isdigit() and int(d) in ids)]
        for path in orphans:
            remove_snapshot_dir(path)
        return orphans

    def recover(self) -> None:
        """Finish or undo work a crash interrupted. Call once at start, before serving."""
        removed = self.cleanup()
        if removed:
            log.info("removed snapshot directories without metadata", extra={"paths": removed})
        with self.store.write() as tx:
            for rec in tx.all():
                if os.path.isdir(self.layout.fs(rec.id)):
                    continue
                if rec.kind != Kind.COMMITTED and not tx.has_children(rec):
                    log.warning("dropping snapshot whose directory is missing",
                                extra={"key": rec.key, "id": rec.id})
                    tx.delete_by_id(rec.id)
                else:
                    log.error("committed snapshot has no directory", extra={"key": rec.key, "id": rec.id})


def _fields_of(rec: Record) -> filters.Fields:
    def lookup(path: tuple[str, ...]) -> str | None:
        head = path[0] if path else ""
        if head == "kind":
            return rec.kind.filter_name
        if head == "name":
            return rec.key
        if head == "parent":
            return rec.parent
        if head == "labels" and rec.labels:
            return rec.labels.get(".".join(path[1:]))
        return None

    return lookup


def _layer_digest(rec: Record) -> str | None:
    try:
        spec = labels.layer_spec(rec.labels)
    except LabelError:
        return None
    return spec.digest if spec is not None else None


def _lower_layers(chain: Sequence[Record]) -> tuple[str, ...]:
    """The digests of the remote layers in ``chain`` (a snapshot's parents, nearest first)."""
    return tuple(d for d in (_layer_digest(r) for r in chain if is_remote(r)) if d is not None)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _detach_stale(mountpoint: str) -> None:
    """Lazily unmount whatever a previous process left mounted on ``mountpoint``."""
    for point in syscalls.mounts_under(mountpoint):
        try:
            syscalls.unmount(point, detach=True)
        except OSError as exc:
            log.warning("could not detach stale mount", extra={"mountpoint": point, "reason": str(exc)})


def remove_snapshot_dir(path: str) -> None:
    """Delete a snapshot directory without ever deleting through a mount inside it.

    Mounts below ``path`` (a layer left mounted by a crash) are detached first; if one stays,
    the directory is left for a later Cleanup.
    """
    if os.path.islink(path):  # resolving it would reach mounts outside our root
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    _detach_stale(path)
    if syscalls.mounts_under(path):
        log.warning("snapshot directory still has mounts; left for Cleanup", extra={"path": path})
        return
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)  # not ours to keep: only snapshot directories belong in snapshots/
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("failed to remove snapshot directory", extra={"path": path, "reason": str(exc)})
