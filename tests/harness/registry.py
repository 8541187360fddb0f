"""A private plain-HTTP registry on loopback: Debian's docker-registry (distribution 2.8).

    with Registry(workdir) as reg:          # or the `registry` pytest fixture
        reg.host                            # "127.0.0.1:PORT", what clients pull from
        mark = reg.log_mark()
        ...                                 # pull something
        reg.access_log_entries(since=mark)  # [AccessLogEntry(method, path, status, bytes, range)]
        reg.blob_bytes(since=mark)          # {"sha256:...": bytes served}

distribution writes an Apache "combined" access log on stdout; it records the User-Agent but not
the request's Range header. `Registry(..., log_ranges=True)` puts a small logging proxy
(`rangeproxy`) in front: `host` is then the proxy, `direct_host` the registry, and entries come
from the proxy's log with the Range header filled in. `htpasswd=(user, password)` turns on basic auth.
"""

from __future__ import annotations

import base64
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from .procs import Daemon, HarnessError, free_port, wait_until
from .rangeproxy import RangeLoggingProxy, read_proxy_log

__all__ = ["AccessLogEntry", "Registry", "parse_combined_log"]

_BIN = "/usr/bin/docker-registry"
_COMBINED = re.compile(
    r'^(?P<client>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-)(?: "[^"]*" "(?P<agent>[^"]*)")?')
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class AccessLogEntry:
    """One completed request as the registry (or the range proxy) logged it."""

    method: str
    path: str
    status: int
    bytes: int
    range: str | None = None  # the request's Range header; None when not logged or absent
    user_agent: str | None = None  # who asked: "containerd/1.6…", lazysnapd's client, skopeo…

    @property
    def blob_digest(self) -> str | None:
        """The digest when this request addressed a blob (`/v2/<name>/blobs/<digest>`)."""
        m = _BLOB_PATH.match(self.path.split("?", 1)[0])
        return m.group("digest") if m else None


def parse_combined_log(text: str) -> list[AccessLogEntry]:
    """Parse Apache combined-format lines; lines of any other shape are skipped."""
    out = []
    for line in text.splitlines():
        m = _COMBINED.match(line)
        if m:
            size = m.group("bytes")
            out.append(AccessLogEntry(m.group("method"), m.group("path"), int(m.group("status")),
                                      0 if size == "-" else int(size), None, m.group("agent")))
    return out


def _htpasswd_line(user: str, password: str) -> str:
    # distribution accepts only bcrypt entries; htpasswd (apache2-utils) writes them
    res = subprocess.run(["htpasswd", "-nbB", user, password], check=True, capture_output=True, text=True)
    return res.stdout.strip()


class Registry:
    """docker-registry serving from `workdir/data` on 127.0.0.1:<free port>; a context manager.

    Raises HarnessError when it does not answer `GET /v2/` within `start_timeout` seconds.
    """

    def __init__(self, workdir: Path, *, log_ranges: bool = False,
                 htpasswd: tuple[str, str] | None = None, start_timeout: float = 20.0) -> None:
        self.workdir = workdir
        self.log_ranges = log_ranges
        self.auth = htpasswd
        self.start_timeout = start_timeout
        self._daemon: Daemon | None = None
        self._proxy: RangeLoggingProxy | None = None
        self.direct_host = ""
        self.host = ""

    @property
    def pid(self) -> int:
        if self._daemon is None:
            raise HarnessError("registry not started")
        return self._daemon.pid

    @property
    def access_log_path(self) -> Path:
        """Where entries are read from: the proxy's log with log_ranges, else the registry's."""
        if self._proxy is not None:
            return self._proxy.log_path
        if self._daemon is None:
            raise HarnessError("registry not started")
        return self._daemon.stdout_path

    def _write_config(self, port: int) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.auth is not None:
            htfile = self.workdir / "htpasswd"
            htfile.write_text(_htpasswd_line(*self.auth) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {htfile}\n"
        cfg = self.workdir / "registry.yml"
        cfg.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: lazysnap-test-harness\n"
            + auth
        )
        return cfg

    def start(self) -> Registry:
        """Start the registry (and the proxy); on any failure stop what was started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = free_port()
            cfg = self._write_config(port)
            self._daemon = Daemon("registry", [_BIN, "serve", str(cfg)], self.workdir)
            self.direct_host = f"127.0.0.1:{port}"
            try:
                wait_until(self._answers, self.start_timeout, f"registry on {self.direct_host}")
                break
            except HarnessError:
                tail = self._daemon.log_tail()
                self._daemon.stop()
                if "address already in use" not in tail:
                    raise HarnessError(f"registry did not start: {tail}") from None
        else:
            raise HarnessError("registry: no free port after 3 attempts")
        self.host = self.direct_host
        if self.log_ranges:
            self._proxy = RangeLoggingProxy(self.direct_host, self.workdir / "proxy-access.jsonl")
            self.host = self._proxy.start()

    def _answers(self) -> bool:
        assert self._daemon is not None
        self._daemon.check_alive()
        try:
            r = httpx.get(f"http://{self.direct_host}/v2/", timeout=1.0)
        except httpx.TransportError:
            return False
        return r.status_code in (200, 401)

    def auth_header(self) -> dict[str, str]:
        """The Authorization header for the configured user (empty without auth)."""
        if self.auth is None:
            return {}
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def stop(self) -> None:
        """Stop the proxy and the registry (by PID). Idempotent."""
        if self._proxy is not None:
            self._proxy.stop()
        if self._daemon is not None:
            self._daemon.stop(grace=5.0)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_mark(self) -> int:
        """An opaque position in the access log; pass it as `since` to see only later requests."""
        path = self.access_log_path
        return path.stat().st_size if path.exists() else 0

    def access_log_entries(self, since: int = 0, min_count: int = 0,
                           timeout: float = 5.0) -> list[AccessLogEntry]:
        """Requests completed so far (after `since`), in completion order.

        The registry (and the proxy) log a request just after its last byte went out, so a client
        can be faster than the log: `min_count` waits up to `timeout` s for that many entries.
        """
        entries: list[AccessLogEntry] = []

        def enough() -> bool:
            nonlocal entries
            entries = self._read_entries(since)
            return len(entries) >= min_count

        wait_until(enough, timeout, f"{min_count} access log entries in {self.access_log_path}")
        return entries

    def _read_entries(self, since: int) -> list[AccessLogEntry]:
        path = self.access_log_path
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        if self._proxy is not None:
            return read_proxy_log(text)
        return parse_combined_log(text)

    def blob_bytes(self, since: int = 0, min_count: int = 0) -> dict[str, int]:
        """Response bytes per blob digest for successful blob GETs after `since`."""
        totals: dict[str, int] = {}
        for e in self.access_log_entries(since, min_count):
            d = e.blob_digest
            if d is not None and e.method == "GET" and e.status in (200, 206):
                totals[d] = totals.get(d, 0) + e.bytes
        return totals
