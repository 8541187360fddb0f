"""containerd ``hosts.toml`` (``certs.d``): which endpoints serve a registry, in which order, how.

``<hosts_dir>/<host>/hosts.toml`` (else ``<hosts_dir>/_default/hosts.toml``) lists mirrors as
``[host."<url>"]`` tables, tried in file order, and ``server`` (the origin, tried last). Keys
understood: ``capabilities``, ``skip_verify``, ``ca``, ``client``, ``header``, ``override_path``.
Relative certificate paths are resolved against the host's directory. A host directory without
``hosts.toml`` is read the docker way (``*.crt`` CAs, ``*.cert``/``*.key`` client pairs). A file
that does not parse is an error, not a silent fallback to the origin.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fusefs.errors import SourceError

__all__ = ["Endpoint", "is_loopback", "load_endpoints"]

_MAX_HOSTS_TOML = 1 << 20
_KNOWN_CAPS = frozenset({"pull", "resolve", "push"})


@dataclass(frozen=True)
class Endpoint:
    """One place to send registry API requests to.

    Attributes:
        scheme: ``https`` or ``http``.
        netloc: ``host[:port]``.
        api_root: path prefix of the API, ``/v2`` unless ``override_path`` says otherwise.
        capabilities: subset of ``pull``, ``resolve``, ``push``.
        skip_verify: do not verify the server certificate.
        ca: CA bundle files to trust in addition to the system store.
        client: ``(certificate, key or None)`` pairs for TLS client authentication.
        headers: extra request headers.
        is_mirror: False for the origin (``server``).
        plain_http_fallback: retry over plain HTTP when HTTPS cannot connect (loopback hosts).
    """

    scheme: str
    netloc: str
    api_root: str = "/v2"
    capabilities: frozenset[str] = frozenset({"pull", "resolve"})
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    is_mirror: bool = False
    plain_http_fallback: bool = False

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.api_root}"

    def blob_url(self, repository: str, digest: str) -> str:
        return f"{self.base_url}/{repository}/blobs/{digest}"

    def tls_key(self) -> tuple[object, ...]:
        """What distinguishes one HTTP client from another for this endpoint."""
        return (self.scheme, self.netloc, self.skip_verify, self.ca, self.client)


def is_loopback(netloc: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1``, with or without a port."""
    host = netloc
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _str_list(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SourceError(f"hosts.toml: {what} must be a string or a list of strings")


def _client_pairs(value: Any, base: Path) -> tuple[tuple[str, str | None], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise SourceError("hosts.toml: client must be a string or a list")
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_resolve(item, base), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            pairs.append((_resolve(item[0], base), _resolve(item[1], base)))
        else:
            raise SourceError("hosts.toml: client entries are a path or a [cert, key] pair")
    return tuple(pairs)


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise SourceError("hosts.toml: header must be a table")
    out: list[tuple[str, str]] = []
    for name, v in value.items():
        for item in _str_list(v, f"header {name}"):
            if "\r" in item or "\n" in item or "\r" in name or "\n" in name:
                raise SourceError("hosts.toml: header names and values must be single lines")
            out.append((name, item))
    return tuple(out)


def _endpoint(url: str, table: Mapping[str, Any], base: Path, *, is_mirror: bool,
              insecure: bool, loopback_fallback: bool) -> Endpoint:
    if "://" not in url:
        url = ("http://" if insecure else "https://") + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        raise SourceError(f"hosts.toml: unusable host URL {url[:200]!r}")
    caps = frozenset(_str_list(table.get("capabilities", ["pull", "resolve"]), "capabilities"))
    if not caps <= _KNOWN_CAPS:
        raise SourceError(f"hosts.toml: unknown capabilities {sorted(caps - _KNOWN_CAPS)}")
    path = parts.path.rstrip("/")
    if not table.get("override_path", False) and not path.endswith("/v2"):
        path += "/v2"
    if ".." in path.split("/"):
        raise SourceError("hosts.toml: host path must not contain '..'")
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise SourceError("hosts.toml: skip_verify must be a boolean")
    return Endpoint(
        scheme=parts.scheme,
        netloc=parts.netloc,
        api_root=path,
        capabilities=caps,
        skip_verify=skip_verify,
        ca=tuple(_resolve(p, base) for p in _str_list(table.get("ca"), "ca")),
        client=_client_pairs(table.get("client"), base),
        headers=_headers(table.get("header")),
        is_mirror=is_mirror,
        plain_http_fallback=loopback_fallback and parts.scheme == "https" and is_loopback(parts.netloc),
    )


def _host_dir_names(host: str) -> list[str]:
    # containerd looks up "host:port" first; "_default" is the catch-all.
    return [host, "_default"]


def load_endpoints(host: str, api_host: str, hosts_dir: Path | None, *,
                   insecure_hosts: tuple[str, ...] = (), localhost_plain_http: bool = True
                   ) -> list[Endpoint]:
    """Endpoints for registry ``host`` in the order to try them: mirrors, then the origin.

    Args:
        host: the registry as named in the image reference (``docker.io``, ``127.0.0.1:5000``).
        api_host: where the origin's API lives when ``server`` is not set.
        hosts_dir: the ``certs.d`` directory, or ``None``.
        insecure_hosts: hosts to reach over plain HTTP.
        localhost_plain_http: allow HTTPS → HTTP fallback for loopback hosts.

    Raises:
        SourceError: a ``hosts.toml`` exists but is unreadable, oversized or invalid.
    """
    insecure = host in insecure_hosts or api_host in insecure_hosts
    table: dict[str, Any] = {}
    base = Path("/")
    if hosts_dir is not None:
        for name in _host_dir_names(host):
            if "/" in name or name in (".", ".."):
                continue
            path = hosts_dir / name / "hosts.toml"
            if path.is_file():
                table = _read_toml(path)
                base = path.parent
                break
            if name != "_default" and path.parent.is_dir():
                table = _docker_style_certs(path.parent)
                base = path.parent
                break
    endpoints: list[Endpoint] = []
    hosts = table.get("host", {})
    if not isinstance(hosts, Mapping):
        raise SourceError("hosts.toml: [host] must be a table of tables")
    for url, sub in hosts.items():
        if not isinstance(sub, Mapping):
            raise SourceError(f"hosts.toml: [host.{url!r}] must be a table")
        netloc = urlsplit(url if "://" in url else f"x://{url}").netloc
        endpoints.append(_endpoint(url, sub, base, is_mirror=True,
                                   insecure=netloc in insecure_hosts,
                                   loopback_fallback=localhost_plain_http))
    server = table.get("server")
    if server is not None and not isinstance(server, str):
        raise SourceError("hosts.toml: server must be a string")
    origin_url = server or api_host
    origin_table = {k: v for k, v in table.items() if k not in ("host", "server")}
    origin_table.setdefault("capabilities", ["pull", "resolve", "push"])
    endpoints.append(_endpoint(origin_url, origin_table, base, is_mirror=False, insecure=insecure,
                               loopback_fallback=localhost_plain_http))
    return endpoints


def _docker_style_certs(directory: Path) -> dict[str, Any]:
    """A host directory without hosts.toml, laid out the docker way: ``*.crt`` are CAs,
    ``<name>.cert`` with ``<name>.key`` are client certificates (containerd reads these too)."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise SourceError(f"cannot list {directory}: {exc.strerror}") from exc
    ca = [n for n in names if n.endswith(".crt")]
    client = [[n, n[:-5] + ".key"] for n in names if n.endswith(".cert") and n[:-5] + ".key" in names]
    table: dict[str, Any] = {}
    if ca:
        table["ca"] = ca
    if client:
        table["client"] = client
    return table


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_HOSTS_TOML + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > _MAX_HOSTS_TOML:
        raise SourceError(f"{path} is larger than {_MAX_HOSTS_TOML} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SourceError(f"{path} is not valid TOML: {exc}") from exc
