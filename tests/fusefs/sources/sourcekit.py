"""Helpers and fixtures for the registry source tests: real docker-registry instances (anonymous,
htpasswd, token auth), a JWT token server written here, blob uploads over the plain HTTP API.

Anonymous and htpasswd registries come from ``tests.harness.Registry``; the token-auth registry
is started here (the harness has no token mode) with the harness's ``Daemon``. The fixtures are
re-exported by this directory's conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from fusefs.sources.config import RegistryConfig
from fusefs.sources.registry import RegistrySourceFactory
from tests.harness import Registry
from tests.harness.faultproxy import FaultProxy
from tests.harness.manifests import push_blob
from tests.harness.procs import Daemon, HarnessError, free_port, wait_until

T = TypeVar("T")

REPO = "lazysnap/src"
SMALL = 300 * 1024
LARGE = 3 * 1024 * 1024
USER, PASSWORD = "alice", "correct horse"


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async test body under trio."""
    return trio.run(fn)


def blob_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(tmp: Path, **kw: Any) -> RegistryConfig:
    """A config that reads nothing from the machine and retries fast."""
    base: dict[str, Any] = dict(hosts_dir=tmp / "certs.d", docker_config=tmp / "docker" / "config.json",
                                backoff_base=0.01, backoff_max=0.05, retries=3,
                                connect_timeout=5.0, read_timeout=10.0)
    base.update(kw)
    return RegistryConfig(**base)


@asynccontextmanager
async def open_factory(tmp: Path, **kw: Any) -> AsyncIterator[RegistrySourceFactory]:
    """A factory on ``config_for(tmp, **kw)``, closed (its connections) when the block ends."""
    factory = RegistrySourceFactory(config_for(tmp, **kw))
    try:
        yield factory
    finally:
        await factory.aclose()


def write_docker_config(path: Path, content: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def basic_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass
class Blobs:
    host: str
    small: bytes
    large: bytes
    small_digest: str
    large_digest: str


@pytest.fixture(scope="module")
def anon_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blobs]:
    """An anonymous registry holding a small (300 KiB) and a large (3 MiB) blob."""
    with Registry(tmp_path_factory.mktemp("reg")) as reg:
        small, large = blob_bytes(SMALL, 1), blob_bytes(LARGE, 2)
        digests = push_blob(reg.host, REPO, small), push_blob(reg.host, REPO, large)
        yield Blobs(reg.host, small, large, *digests)


@pytest.fixture
def proxy(anon_registry: Blobs) -> Iterator[FaultProxy]:
    with FaultProxy(anon_registry.host) as p:
        yield p


# -- token auth ------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A docker token server: GET with basic auth and POST oauth2 form, RS256 JWTs with x5c.

    Knobs: ``expires_in`` (what it tells clients), ``expired_next`` (how many next tokens carry an
    ``exp`` already past, so the registry rejects them), ``get_disabled`` (GET answers 404),
    ``anonymous_pull`` (pull tokens without credentials, like Docker Hub's public images).
    """

    key: Path
    cert_der: bytes
    issuer: str
    service: str
    users: dict[str, str]
    expires_in: int = 300
    expired_next: int = 0
    get_disabled: bool = False
    anonymous_pull: bool = False
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, user, grant)
    issued: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing_input.encode(), capture_output=True, check=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def issue(self, user: str, scopes: list[str]) -> dict[str, Any]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) == 3:
                access.append({"type": parts[0], "name": parts[1], "actions": parts[2].split(",")})
        now = int(time.time())
        with self.lock:
            expired = self.expired_next > 0
            if expired:
                self.expired_next -= 1
        # distribution allows 60 s of clock leeway: "expired" must be well past that.
        exp = now - 300 if expired else now + 3600
        token = self.sign({"iss": self.issuer, "sub": user, "aud": self.service, "exp": exp,
                           "nbf": now - 30, "iat": now, "jti": uuid.uuid4().hex, "access": access})
        with self.lock:
            self.issued.append(token)
        return {"token": token, "access_token": token, "expires_in": self.expires_in}

    def start(self) -> TokenServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                user = ""
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if owner.users.get(user) != pw:
                        owner.requests.append(("GET", user, "bad"))
                        self._answer(401, {"details": "bad credentials"})
                        return
                owner.requests.append(("GET", user, ""))
                if owner.get_disabled:
                    self._answer(404, {"details": "use POST"})
                    return
                scopes = q.get("scope", [])
                if not user and owner.anonymous_pull:
                    scopes = [sc for sc in scopes if sc.endswith(":pull")]
                elif not user:
                    self._answer(401, {"details": "authentication required"})
                    return
                self._answer(200, owner.issue(user, scopes))

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(n).decode()).items()}
                grant = form.get("grant_type", "")
                user = form.get("username", "")
                ok = False
                if grant == "password":
                    ok = owner.users.get(user) == form.get("password")
                elif grant == "refresh_token":
                    ok = form.get("refresh_token") == "refresh-" + USER
                    user = USER
                owner.requests.append(("POST", user, grant))
                if not ok:
                    self._answer(401, {"details": "bad credentials"})
                    return
                self._answer(200, owner.issue(user, form.get("scope", "").split(" ")))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class TokenRegistry:
    host: str
    tokens: TokenServer
    blob: bytes
    digest: str


def _openssl_key_cert(workdir: Path) -> tuple[Path, Path, bytes]:
    key, cert = workdir / "token.key", workdir / "token.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=lazysnap-test-token-issuer"],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return key, cert, der


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """docker-registry in ``auth: token`` mode trusting a token server started here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the token signing key")
    workdir = tmp_path_factory.mktemp("tokreg")
    key, cert, der = _openssl_key_cert(workdir)
    tokens = TokenServer(key, der, "lazysnap-issuer", "lazysnap-registry", {USER: PASSWORD}).start()
    daemon: Daemon | None = None
    try:
        def config(port: int) -> str:
            return (f"auth:\n  token:\n    realm: {tokens.realm}\n    service: {tokens.service}\n"
                    f"    issuer: {tokens.issuer}\n    rootcertbundle: {cert}\n")

        daemon, port = start_registry(workdir, config, lambda port: httpx.get(
            f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 401)
        host = f"127.0.0.1:{port}"
        push = tokens.issue(USER, [f"repository:{REPO}:pull,push"])["token"]
        blob = blob_bytes(SMALL, 3)
        digest = push_blob(host, REPO, blob, {"Authorization": f"Bearer {push}"})
        tokens.issued.clear()
        yield TokenRegistry(host, tokens, blob, digest)
    finally:
        if daemon is not None:
            daemon.stop(grace=5)
        tokens.stop()


def start_registry(workdir: Path, extra_yaml: Callable[[int], str], answers: Callable[[int], bool]
                   ) -> tuple[Daemon, int]:
    """Start docker-registry on a free loopback port with ``extra_yaml(port)`` appended to its
    config; ``answers(port)`` says when it is up. The caller stops the returned Daemon."""
    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        cfg = workdir / f"registry-{port}.yml"
        cfg.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: lazysnap-test\n" + extra_yaml(port))
        daemon = Daemon(f"registry-{port}", ["/usr/bin/docker-registry", "serve", str(cfg)], workdir)

        def up(port: int = port, d: Daemon = daemon) -> bool:
            d.check_alive()
            try:
                return answers(port)
            except httpx.TransportError:
                return False

        try:
            wait_until(up, 20, f"registry on 127.0.0.1:{port}")
            return daemon, port
        except HarnessError:
            tail = daemon.log_tail()
            daemon.stop()
            if "address already in use" not in tail:
                raise
    raise HarnessError("registry: no free port after 3 attempts")


def helper_script(bindir: Path, name: str, body: str) -> Path:
    """Write an executable ``docker-credential-<name>`` shell script into ``bindir``."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def helper_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bin directory put first on PATH for credential helper scripts."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return bindir
