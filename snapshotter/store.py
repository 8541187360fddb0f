"""The snapshot metadata store: one sqlite database, ``<root>/metadata.db``, with containerd's semantics.

A snapshot has a key (its name once committed), a numeric id that never changes and names its
directory ``<root>/snapshots/<id>``, a kind, an optional committed parent, labels, creation and
update times (nanoseconds since the epoch, returned identically by every call) and, once committed,
its disk usage. Ids come from an AUTOINCREMENT column, so the id of a removed snapshot is never
handed out again.

Every method is synchronous and may block on disk: call it from a gRPC worker thread or through
``trio.to_thread``, never on the trio loop. One connection is shared by all threads; a lock
serialises transactions, which are short (no hashing or directory walks inside them). The database
runs in WAL mode with ``synchronous=FULL``, so a transaction that returned is on disk: ``kill -9``
or a power cut after an acknowledged Commit cannot lose it.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

MAX_LABEL_PAIR_BYTES = 4096  # containerd's limit on len(key) + len(value) of one label
MAX_LABELS = 1024
MAX_KEY_BYTES = 4096

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT    NOT NULL UNIQUE,
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    inodes      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    value       TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, name)
);
"""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in the Snapshots API enum."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The name containerd filters use: ``active``, ``view`` or ``committed``."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage: bytes allocated (512-byte blocks) and distinct inodes, like containerd's."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Record:
    """One snapshot row."""

    id: int
    key: str
    kind: Kind
    parent: str  # the parent's key, "" when none
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    usage: Usage = Usage()


def validate_key(key: str, what: str = "key") -> None:
    """Refuse empty, oversized or NUL-containing snapshot keys (InvalidArgument)."""
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if "\x00" in key:
        raise InvalidArgument(f"snapshot {what} contains a NUL character")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidArgument(f"snapshot {what} longer than {MAX_KEY_BYTES} bytes")


def clean_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as containerd stores them: empty values dropped, sizes bounded (InvalidArgument)."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)} > {MAX_LABELS})")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"label {k!r} contains a NUL character")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_PAIR_BYTES:
            raise InvalidArgument(f"label {k!r}: key and value exceed {MAX_LABEL_PAIR_BYTES} bytes")
        if v:
            out[k] = v
    return out


class Store:
    """The sqlite metadata database. Thread-safe; every call may block."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str) -> Store:
        """Open (creating if needed) the database at ``path``."""
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged Commit survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(f"{path}: schema version {version} is newer than lazysnap's {_SCHEMA_VERSION}")
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
        return cls(conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction: one consistent snapshot of the database."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield Tx(self._conn)
            finally:
                self._conn.execute("ROLLBACK")


class Tx:
    """Operations inside one transaction; only valid within the ``with`` block that made it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _row(self, where: str, arg: object) -> Record | None:
        row = self._conn.execute(
            "SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.created_ns, s.updated_ns, s.size, s.inodes "
            f"FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE {where}",
            (arg,),
        ).fetchone()
        if row is None:
            return None
        return self._record(row, self._labels(row[0]))

    @staticmethod
    def _record(row: tuple[int, str, int, str, int, int, int, int], labels: dict[str, str]) -> Record:
        sid, key, kind, parent, created, updated, size, inodes = row
        return Record(sid, key, Kind(kind), parent, created, updated, labels, Usage(size, inodes))

    def _labels(self, sid: int) -> dict[str, str]:
        rows = self._conn.execute("SELECT name, value FROM labels WHERE snapshot_id = ?", (sid,))
        return dict(rows.fetchall())

    def _set_labels(self, sid: int, labels: dict[str, str]) -> None:
        self._conn.execute("DELETE FROM labels WHERE snapshot_id = ?", (sid,))
        self._conn.executemany(
            "INSERT INTO labels (snapshot_id, name, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in labels.items()],
        )

    def find(self, key: str) -> Record | None:
        """The snapshot under ``key``, or ``None``."""
        return self._row("s.key = ?", key)

    def get(self, key: str) -> Record:
        """The snapshot under ``key``; raises NotFound."""
        rec = self.find(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec

    def by_id(self, sid: int) -> Record | None:
        return self._row("s.id = ?", sid)

    def parent_ids(self, rec: Record) -> list[int]:
        """Ids of the parent chain, nearest first (empty without a parent)."""
        rows = self._conn.execute(
            "WITH RECURSIVE chain(id, parent_id, depth) AS ("
            " SELECT id, parent_id, 0 FROM snapshots"
            "  WHERE id = (SELECT parent_id FROM snapshots WHERE id = ?)"
            " UNION ALL SELECT s.id, s.parent_id, c.depth + 1"
            "  FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
            " SELECT id FROM chain ORDER BY depth",
            (rec.id,),
        ).fetchall()
        return [r[0] for r in rows]

    def insert(self, kind: Kind, key: str, parent: str, labels: dict[str, str], now_ns: int) -> Record:
        """Add an active or view snapshot; raises AlreadyExists, NotFound (parent), InvalidArgument."""
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(f"only active or view snapshots can be created, not {kind.filter_name}")
        labels = clean_labels(labels)
        parent_id = None
        if parent:
            prec = self.find(parent)
            if prec is None:
                raise NotFound(f"missing parent {parent!r}")
            if prec.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = prec.id
        if self.find(key) is not None:
            raise AlreadyExists(f"snapshot {key!r} already exists")
        cur = self._conn.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), now_ns, now_ns),
        )
        sid = cur.lastrowid
        assert sid is not None
        self._set_labels(sid, labels)
        return Record(sid, key, kind, parent, now_ns, now_ns, labels)

    def commit_active(self, key: str, name: str, labels: dict[str, str], usage: Usage, now_ns: int) -> Record:
        """Turn active ``key`` into committed ``name`` (same id, labels replaced, times reset)."""
        labels = clean_labels(labels)
        if self.find(name) is not None:
            raise AlreadyExists(f"committed snapshot {name!r} already exists")
        rec = self.find(key)
        if rec is None:
            raise NotFound(f"active snapshot {key!r} does not exist")
        if rec.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, size = ?, inodes = ?"
            " WHERE id = ?",
            (name, int(Kind.COMMITTED), now_ns, now_ns, usage.size, usage.inodes, rec.id),
        )
        self._set_labels(rec.id, labels)
        return Record(rec.id, name, Kind.COMMITTED, rec.parent, now_ns, now_ns, labels, usage)

    def update_labels(self, key: str, labels: dict[str, str], fieldpaths: list[str], now_ns: int) -> Record:
        """containerd's UpdateInfo: only ``labels`` and ``labels.<k>`` may change (InvalidArgument)."""
        rec = self.get(key)
        new = dict(rec.labels)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    name = path[len("labels.") :]
                    new[name] = labels.get(name, "")
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
        else:
            new = dict(labels)
        new = clean_labels(new)
        self._conn.execute("UPDATE snapshots SET updated_ns = ? WHERE id = ?", (now_ns, rec.id))
        self._set_labels(rec.id, new)
        return Record(rec.id, rec.key, rec.kind, rec.parent, rec.created_ns, now_ns, new, rec.usage)

    def has_children(self, rec: Record) -> bool:
        row = self._conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (rec.id,)).fetchone()
        return row is not None

    def delete(self, key: str) -> Record:
        """Remove ``key``; raises NotFound, or FailedPrecondition when it has children."""
        rec = self.get(key)
        if self.has_children(rec):
            raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def all(self) -> list[Record]:
        """Every snapshot, in id order."""
        labels: dict[int, dict[str, str]] = {}
        for sid, name, value in self._conn.execute("SELECT snapshot_id, name, value FROM labels"):
            labels.setdefault(sid, {})[name] = value
        rows = self._conn.execute(
            "SELECT s.id, s.key, s.kind, COALESCE(p.key, ''), s.created_ns, s.updated_ns, s.size, s.inodes "
            "FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.id"
        ).fetchall()
        return [self._record(row, labels.get(row[0], {})) for row in rows]

    def ids(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}

    def delete_by_id(self, sid: int) -> None:
        """Drop a row during recovery (its labels go with it)."""
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
