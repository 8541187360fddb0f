"""Knobs of the fusefs half, one frozen dataclass per concern; the snapshotter config embeds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CacheConfig:
    """The on-disk chunk cache.

    Attributes:
        dir: root of the cache (chunks and verified layer indexes); created if missing.
        max_bytes: bound on cached chunk bytes (default 10 GiB). Chunks of layers not mounted are
            evicted least recently used first; mounted layers are pinned.
        fsync: fsync each chunk file before renaming it into place (default on). Cached chunks
            are not re-hashed on read, so turning this off trades safety after a power loss
            (a renamed but unwritten file) for fewer disk flushes.
    """

    dir: Path
    max_bytes: int = 10 << 30
    fsync: bool = True


@dataclass(frozen=True)
class FetchConfig:
    """The miss path.

    Attributes:
        max_range_bytes: most compressed bytes asked in one coalesced range (default 16 MiB).
        max_ranges_per_read: most ranges in one ``read_ranges`` call (default 32).
        thread_threshold: chunks at least this large (compressed bytes) decode and hash in a
            worker thread (default 64 KiB).
        failure_ttl: seconds a failed chunk keeps failing fast before the next read retries
            (default 2 s).
        memory_bytes: per layer, verified chunks the disk cache could not keep are held in
            memory up to this many bytes, so the kernel's small reads of one chunk don't each
            refetch it (default 32 MiB).
        neighbour_bytes: a miss also takes the uncached chunks right after it in the blob, up
            to this many compressed bytes from the start of the miss, in the same request
            (default 32 KiB; 0 = only what was asked).
        speculate_file_bytes: a file's first miss also fetches the rest of the file alongside
            (a request of its own, not waited for) when that is at most this many compressed
            bytes (default 4 MiB; 0 = off).
        speculate_dir_bytes: a small file's first miss also fetches the small files of its
            directory alongside, up to this many compressed bytes (default 0 = off).
        small_file_bytes: what a small file is for ``speculate_dir_bytes`` (default 64 KiB).
        speculate_scan_bytes: the second file of a kind (name suffix: ``.cpython-311.pyc``)
            missed in a directory also fetches the first chunk of the directory's other files
            of that kind, up to this many compressed bytes (default 4 MiB; 0 = off).
        speculate_scan_files: ... unless the directory holds more than this many files of the
            kind (default 40).
        speculate_import_bytes: a Python module's first miss also fetches the modules of the
            layer it imports, and theirs in turn, read from its bytes (names in a ``.pyc``,
            ``import`` statements in a ``.py``), up to this many compressed bytes (default
            8 MiB; 0 = off).
        speculate_library_bytes: an ELF file's first miss at its start also fetches what the
            dynamic loader reads of it next (dynamic section, writable segment) and the first
            chunk of each library of the layer it needs, and so on down the chain, up to this
            many compressed bytes (default 16 MiB; 0 = off).
    """

    max_range_bytes: int = 16 << 20
    max_ranges_per_read: int = 32
    thread_threshold: int = 64 << 10
    failure_ttl: float = 2.0
    memory_bytes: int = 32 << 20
    neighbour_bytes: int = 32 << 10
    speculate_file_bytes: int = 4 << 20
    speculate_dir_bytes: int = 0
    small_file_bytes: int = 64 << 10
    speculate_scan_bytes: int = 4 << 20
    speculate_scan_files: int = 40
    speculate_import_bytes: int = 8 << 20
    speculate_library_bytes: int = 16 << 20


@dataclass(frozen=True)
class PrefetchConfig:
    """Work done at mount time and in the background.

    Attributes:
        prefetch: fetch the landmark prefix at mount (default on); ``spec.prefetch_size`` bytes only
            for a layer with no landmark, nothing for one marked ``.no.prefetch.landmark``.
        background: fetch the rest of each layer in the background, yielding to on-demand
            reads (default on).
        background_rate: bytes per second the background fetch may use, 0 = unlimited
            (default 0).
        background_step_bytes: compressed bytes per background request (default 4 MiB).
        background_silence: seconds without on-demand fetching (and since the last mount)
            before background fetch may send a request (default 5, as stargz-snapshotter's
            silence period): on a slow link a background request in flight delays the
            container's next read.
    """

    prefetch: bool = True
    background: bool = True
    background_rate: int = 0
    background_step_bytes: int = 4 << 20
    background_silence: float = 5.0


@dataclass(frozen=True)
class FuseConfig:
    """The single FUSE session.

    Attributes:
        mountpoint: where the session is mounted; its top-level directories are the layers.
        attr_timeout: seconds the kernel may cache attributes (layers are immutable; default 1 day).
        entry_timeout: seconds the kernel may cache name lookups (default 1 day).
        allow_other: let every user (container processes) read the layers (default on).
        opaque_xattr: the overlay opaque attribute name; ``user.overlay.opaque`` when the
            overlay mount uses ``userxattr``.
        fsname: the filesystem name shown in /proc/mounts.
    """

    mountpoint: Path
    attr_timeout: float = 86400.0
    entry_timeout: float = 86400.0
    allow_other: bool = True
    opaque_xattr: bytes = b"trusted.overlay.opaque"
    fsname: str = "lazysnap"


@dataclass(frozen=True)
class FusefsConfig:
    """Everything fusefs needs.

    Attributes:
        allow_unverified_toc: mount layers whose TOC digest is unknown (no label); logged.
            Default off: such layers fall back to a normal pull.
        check_interval: seconds between two real ``check`` calls on one layer's source.
        formats: format readers to try, by name, in order (see ``fusefs.formats.READERS``).
    """

    cache: CacheConfig
    fuse: FuseConfig
    fetch: FetchConfig = field(default_factory=FetchConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    allow_unverified_toc: bool = False
    check_interval: float = 30.0
    formats: tuple[str, ...] = ("estargz",)
