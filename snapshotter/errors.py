"""Errors of the snapshotter and the one table that turns them into gRPC status codes.

    SnapshotError                 a request containerd made cannot be satisfied
    ├── NotFound                  no snapshot (or parent) under that key
    ├── AlreadyExists             the key or name is taken; also the remote-snapshot handshake
    ├── FailedPrecondition        wrong kind for the operation, or it still has children
    ├── InvalidArgument           a malformed filter, an immutable field path, a bad key
    └── Unavailable               a remote layer below the snapshot is no longer served
    ConfigError                   the TOML config or a command-line value is wrong
    LabelError                    labels do not describe a usable remote layer (never sent to containerd)

containerd turns the status codes back into its errdefs (``errdefs.FromGRPC``), so the code is part
of the contract; the message is for humans. Anything else raised in a servicer becomes INTERNAL.
"""

from __future__ import annotations

from snapshotter.rpc import StatusCode


class SnapshotError(Exception):
    """Base of the errors that containerd sees as a gRPC status."""


class NotFound(SnapshotError):
    """The snapshot, or a parent it names, does not exist."""


class AlreadyExists(SnapshotError):
    """The key or committed name is taken."""


class FailedPrecondition(SnapshotError):
    """The snapshot is of the wrong kind for the operation, or has children."""


class InvalidArgument(SnapshotError):
    """The request is malformed: bad filter, immutable field path, unusable key."""


class Unavailable(SnapshotError):
    """A remote layer the snapshot depends on is not served at the moment."""


class ConfigError(Exception):
    """The configuration file or a command-line value is invalid; the message names the key."""


class LabelError(ValueError):
    """Snapshot labels are present but malformed; the layer then takes the normal unpack path."""


STATUS_CODES: dict[type[SnapshotError], StatusCode] = {
    NotFound: StatusCode.NOT_FOUND,
    AlreadyExists: StatusCode.ALREADY_EXISTS,
    FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    InvalidArgument: StatusCode.INVALID_ARGUMENT,
    Unavailable: StatusCode.UNAVAILABLE,
}


def status_code_for(exc: BaseException) -> StatusCode | None:
    """The gRPC code for a snapshotter error, or ``None`` when the error is unexpected."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return None
