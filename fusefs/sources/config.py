"""Settings of the registry blob source: where host and credential config live, timeouts, retries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    """How :class:`fusefs.sources.registry.RegistrySourceFactory` talks to registries.

    Attributes:
        hosts_dir: containerd ``certs.d`` directory holding ``<host>/hosts.toml`` and
            ``_default/hosts.toml``; ``None`` disables mirror configuration.
        docker_config: explicit ``config.json`` path; ``None`` means ``$DOCKER_CONFIG/config.json``
            then ``~/.docker/config.json``.
        connect_timeout: seconds to establish a connection (TCP and TLS).
        read_timeout: seconds without receiving a byte before a read is abandoned.
        request_timeout: seconds one whole request (headers and body) may take.
        retries: attempts per request before a transient failure is reported (>= 1).
        backoff_base: seconds of the first retry delay; doubles per attempt, with full jitter.
        backoff_max: cap in seconds for one retry delay (also caps honoured ``Retry-After``).
        max_ranges_per_request: ranges sent in one multi-range request (1 disables multi-range).
        coalesce_gap: ranges closer than this many bytes are fetched as one.
        max_request_bytes: upper bound of bytes asked in one request after coalescing.
        insecure_hosts: ``host[:port]`` names reached over plain HTTP without trying HTTPS.
        localhost_plain_http: fall back to plain HTTP for loopback registries when HTTPS fails,
            as containerd does.
        check_interval: seconds during which a successful ``check()`` is not repeated.
        user_agent: the ``User-Agent`` header sent with every request.
        credential_helper_timeout: seconds a ``docker-credential-*`` helper may run.
        max_redirects: redirect hops followed for one blob request.
        mirror_cooldown: seconds a mirror that failed transiently is skipped (0: never skipped),
            so a black-holed mirror costs one timeout rather than one per read.
    """

    hosts_dir: Path | None = Path("/etc/containerd/certs.d")
    docker_config: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    request_timeout: float = 120.0
    retries: int = 4
    backoff_base: float = 0.2
    backoff_max: float = 5.0
    max_ranges_per_request: int = 16
    coalesce_gap: int = 64 * 1024
    max_request_bytes: int = 64 * 1024 * 1024
    insecure_hosts: tuple[str, ...] = field(default_factory=tuple)
    localhost_plain_http: bool = True
    check_interval: float = 60.0
    user_agent: str = "lazysnap/0.1"
    credential_helper_timeout: float = 10.0
    max_redirects: int = 3
    mirror_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ValueError("retries must be at least 1")
        if self.max_ranges_per_request < 1:
            raise ValueError("max_ranges_per_request must be at least 1")
        if self.coalesce_gap < 0 or self.max_request_bytes < 1:
            raise ValueError("coalesce_gap must be >= 0 and max_request_bytes >= 1")
