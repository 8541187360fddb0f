"""A docker-registry (distribution 2.8) instance and the accounting of what it served."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .paths import REGISTRY_DATA
from .procs import Daemon, http_ok, wait_for

REGISTRY_BIN = "/usr/bin/docker-registry"

# Access-log lines are in combined log format: ... "GET /v2/... HTTP/1.1" 206 1048576 ...
_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')

_MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


@dataclass(frozen=True)
class Traffic:
    """What the registry answered between two points in its access log."""

    bytes: int
    requests: int
    blob_requests: int


def write_config(path: Path, listen: str) -> None:
    """Write a registry config serving REGISTRY_DATA on `listen` with an access log on stdout."""
    REGISTRY_DATA.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {REGISTRY_DATA}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: {listen}\n"
    )


class Registry:
    """One registry process; `host` is the host:port clients use to reach it."""

    def __init__(self, name: str, host: str, config: Path, log_path: Path, netns: str | None = None):
        self.host = host
        self.log_path = log_path
        write_config(config, host)
        self.daemon = Daemon(name, [REGISTRY_BIN, "serve", str(config)], log_path, netns=netns)

    def start(self) -> None:
        self.daemon.start()
        wait_for(lambda: http_ok(f"http://{self.host}/v2/"), f"registry on {self.host}", 30, self.daemon)

    def stop(self) -> None:
        self.daemon.stop()

    def log_offset(self) -> int:
        """The current end of the access log, to pass to `traffic_since` later."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def traffic_since(self, offset: int) -> Traffic:
        """Bytes and requests of the GET/HEAD responses logged after `offset`."""
        total = requests = blobs = 0
        with self.log_path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                m = _ACCESS.search(raw.decode(errors="replace"))
                if m is None:
                    continue
                requests += 1
                if "/blobs/" in m.group(2):
                    blobs += 1
                if m.group(4) != "-":
                    total += int(m.group(4))
        return Traffic(total, requests, blobs)

    def has_manifest(self, repo: str, tag: str) -> bool:
        """True if `repo:tag` resolves in this registry."""
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag}", method="HEAD",
                                     headers={"Accept": _MANIFEST_TYPES})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError:
            return False

    def manifest(self, repo: str, tag: str) -> dict[str, object]:
        """The manifest (or index) of `repo:tag` as JSON."""
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag}",
                                     headers={"Accept": _MANIFEST_TYPES})
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc: dict[str, object] = json.load(resp)
            return doc
