"""Registry credentials from docker's ``config.json`` and ``docker-credential-*`` helpers.

Lookup order for a host, as docker does it: ``credHelpers[host]``, then ``credsStore``, then
``auths[host]`` (``auth`` = base64 ``user:password``, or ``identitytoken``). Helpers run with a
bounded time and output size; their failures are named, never swallowed, except the helper's own
"credentials not found" which means anonymous.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

from fusefs.errors import AuthError

__all__ = ["CredentialStore", "Credentials", "docker_config_path"]

log = logging.getLogger(__name__)

_MAX_CONFIG = 4 << 20
_MAX_HELPER_OUTPUT = 64 * 1024
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """What a registry or token server may be shown.

    Attributes:
        username: user name for basic auth or the token GET; empty with an identity token only.
        password: password or personal access token.
        identity_token: an OAuth2 refresh token (docker's ``identitytoken``), used with POST.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"Credentials(username={self.username!r}, password=***, identity_token=***)"


def docker_config_path(explicit: Path | None = None) -> Path:
    """``explicit``, else ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    if explicit is not None:
        return explicit
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def _server_keys(host: str) -> tuple[str, ...]:
    if host in _DOCKER_HUB_KEYS:
        return _DOCKER_HUB_KEYS
    return (host,)


class CredentialStore:
    """Finds credentials for a registry host; results are cached per host for the store's life.

    ``get`` may run a helper process; it checkpoints and may be cancelled (the helper is killed).
    """

    def __init__(self, config_path: Path | None = None, helper_timeout: float = 10.0) -> None:
        self._path = docker_config_path(config_path)
        self._helper_timeout = helper_timeout
        self._cache: dict[str, Credentials | None] = {}
        self._config: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._config is not None:
            return self._config
        try:
            with open(self._path, "rb") as f:
                raw = f.read(_MAX_CONFIG + 1)
        except FileNotFoundError:
            self._config = {}
            return self._config
        except OSError as exc:
            raise AuthError(f"cannot read docker config {self._path}: {exc.strerror}") from exc
        if len(raw) > _MAX_CONFIG:
            raise AuthError(f"docker config {self._path} is larger than {_MAX_CONFIG} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AuthError(f"docker config {self._path} is not valid JSON: {exc}") from exc
        self._config = data if isinstance(data, dict) else {}
        return self._config

    def invalidate(self, host: str) -> None:
        """Forget cached credentials for ``host`` (after a registry refused them)."""
        self._cache.pop(host, None)

    async def get(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (``host[:port]``), or ``None`` for anonymous access.

        Raises:
            AuthError: the config is unreadable, an entry is malformed or a helper failed.
        """
        if host in self._cache:
            return self._cache[host]
        creds = await self._lookup(host)
        self._cache[host] = creds
        return creds

    async def _lookup(self, host: str) -> Credentials | None:
        config = self._load()
        keys = _server_keys(host)
        helpers = config.get("credHelpers")
        if isinstance(helpers, dict):
            for key, name in helpers.items():
                if _host_of(key) in keys and isinstance(name, str):
                    return await self._run_helper(name, keys[0])
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            creds = await self._run_helper(store, keys[0])
            if creds is not None:
                return creds
        auths = config.get("auths")
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if isinstance(entry, dict) and _host_of(key) in keys:
                    return _from_auth_entry(entry, key)
        return None

    async def _run_helper(self, name: str, server: str) -> Credentials | None:
        if not _HELPER_NAME.match(name):
            raise AuthError(f"credential helper name {name[:80]!r} is not a plain program name")
        program = f"docker-credential-{name}"
        try:
            # Helpers answer on stdout, errors included ("credentials not found"), as docker reads them.
            proc = await trio.lowlevel.open_process(
                [program, "get"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise AuthError(f"credential helper {program} is not installed") from exc
        try:
            out: bytes | None = None
            code = -1
            with trio.move_on_after(self._helper_timeout) as scope:
                out = await _talk(proc, server.encode())
                if out is not None:  # else it is still writing: killed below
                    code = await proc.wait()
            if scope.cancelled_caught:
                raise AuthError(f"credential helper {program} timed out after {self._helper_timeout}s")
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        if out is None:
            raise AuthError(f"credential helper {program} wrote more than {_MAX_HELPER_OUTPUT} bytes")
        text = out.decode("utf-8", "replace").strip()
        if code != 0:
            if "credentials not found" in text.lower():
                return None
            raise AuthError(f"credential helper {program} failed (exit {code}): {text[:200]}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AuthError(f"credential helper {program} printed something other than JSON") from exc
        if not isinstance(data, dict):
            raise AuthError(f"credential helper {program} printed JSON that is not an object")
        user, secret = data.get("Username", ""), data.get("Secret", "")
        if not isinstance(user, str) or not isinstance(secret, str):
            raise AuthError(f"credential helper {program} printed non-string Username/Secret")
        if user == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(username=user, password=secret)


async def _talk(proc: trio.Process, data: bytes) -> bytes | None:
    """Write ``data`` to the helper's stdin, read its output; ``None`` if it exceeds the limit."""
    assert proc.stdin is not None and proc.stdout is not None
    # A helper may exit without reading its input (an error, or not needing it): not our failure.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with proc.stdin:
            await proc.stdin.send_all(data)
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await proc.stdout.receive_some(8192)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > _MAX_HELPER_OUTPUT:
            return None
        chunks.append(bytes(chunk))


def _from_auth_entry(entry: dict[str, Any], key: str) -> Credentials | None:
    identity = entry.get("identitytoken", "")
    identity = identity if isinstance(identity, str) else ""
    auth = entry.get("auth", "")
    user, password = "", ""
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError(f"docker config: auths[{key!r}].auth is not base64 of user:password") from exc
        user, sep, password = decoded.partition(":")
        if not sep:
            raise AuthError(f"docker config: auths[{key!r}].auth has no ':' between user and password")
    else:
        u, p = entry.get("username", ""), entry.get("password", "")
        user, password = (u, p) if isinstance(u, str) and isinstance(p, str) else ("", "")
    if not (user or password or identity):
        return None
    return Credentials(username=user, password=password, identity_token=identity)

