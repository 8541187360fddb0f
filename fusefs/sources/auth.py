"""Registry authentication: anonymous, basic, and the bearer-token flow of the distribution spec.

The registry names the scheme in its ``WWW-Authenticate`` challenge. For ``Bearer`` the token
comes from the challenge's realm: ``GET realm?service=..&scope=..`` with basic credentials when
there are any, and the OAuth2 ``POST`` form for identity tokens or where the GET is refused, like
containerd's docker resolver. Tokens are cached by (realm, service, scope) until ``expires_in``
runs out; a refused token is fetched again once, and a second refusal is an ``AuthError``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from fusefs.errors import AuthError, TransientSourceError
from fusefs.sources.credentials import Credentials, CredentialStore
from fusefs.sources.hosts import is_loopback

__all__ = ["Authenticator", "Challenge", "parse_challenges"]

log = logging.getLogger(__name__)

_MAX_TOKEN_RESPONSE = 1 << 20
_DEFAULT_EXPIRES_IN = 60
_CHALLENGE_START = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s+(?=[A-Za-z0-9_-]+\s*=)")
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)')
_CLIENT_ID = "lazysnap"


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lowercase scheme and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (quoted values may hold commas) into challenges."""
    out: list[Challenge] = []
    pos = 0
    header = header[:8192]
    while pos < len(header):
        m = _CHALLENGE_START.match(header, pos)
        if m is None:
            scheme = header[pos:].strip().split(" ", 1)[0].rstrip(",")
            if scheme:
                out.append(Challenge(scheme.lower(), {}))
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(header):
            if _CHALLENGE_START.match(header, pos):
                break
            p = _PARAM.match(header, pos)
            if p is None:
                pos = len(header)
                break
            value = p.group(2) if p.group(2) is not None else p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


@dataclass
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Decides the ``Authorization`` header of each registry request; shared by all sources.

    Methods checkpoint (they may fetch a token or run a credential helper) and must run in the
    trio thread. They raise only ``AuthError`` and ``TransientSourceError``.
    """

    def __init__(self, credentials: CredentialStore, client: httpx.AsyncClient,
                 insecure_hosts: tuple[str, ...] = ()) -> None:
        self._credentials = credentials
        self._client = client
        self._insecure_hosts = insecure_hosts
        self._schemes: dict[str, Challenge] = {}
        self._scopes: dict[tuple[str, str], str] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._locks: dict[tuple[str, str, str], trio.Lock] = {}
        self.token_fetches = 0

    async def headers(self, host: str, repository: str) -> dict[str, str]:
        """The auth header to send first: none until the host has challenged us once."""
        challenge = self._schemes.get(host)
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            creds = await self._credentials.get(host)
            return _basic_header(creds) if creds and creds.username else {}
        token = await self._token(host, repository, challenge, refused=None)
        return {"Authorization": f"Bearer {token}"}

    async def refused(self, host: str, repository: str, response: httpx.Response,
                      sent: dict[str, str], final: bool = False) -> dict[str, str]:
        """Handle a 401/403 and return the headers for one more try.

        ``final`` says the request was already retried once with fresh credentials: the call
        then only explains the refusal.

        Raises:
            AuthError: no usable challenge, no credentials where they are required, the
                credentials were already the ones refused, or ``final``.
        """
        status = response.status_code
        challenges = parse_challenges(", ".join(response.headers.get_list("www-authenticate")))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if usable:
            chosen = next((c for c in usable if c.scheme == "bearer"), usable[0])
            self._schemes[host] = chosen
            if chosen.scheme == "bearer":
                scope = chosen.params.get("scope")
                if scope and f"repository:{repository}:" in scope:
                    self._scopes[(host, repository)] = scope
        challenge = self._schemes.get(host)
        sent_auth = sent.get("Authorization", "")
        if challenge is None:
            if status == 401:
                raise AuthError(f"registry {host} answered 401 without a usable WWW-Authenticate challenge")
            raise AuthError(f"registry {host} refused access to {repository} (403)")
        if challenge.scheme == "basic":
            creds = await self._credentials.get(host)
            if creds is None or not creds.username:
                raise AuthError(f"registry {host} requires basic authentication and no credentials "
                                f"are configured for it")
            header = _basic_header(creds)
            if header["Authorization"] == sent_auth:
                self._credentials.invalidate(host)
                raise AuthError(f"registry {host} refused the credentials of user {creds.username!r} "
                                f"({status})")
            return header
        if final:
            raise AuthError(f"registry {host} refused a fresh token for {repository} (HTTP {status}): "
                            f"the token server granted no pull access")
        refused_token = sent_auth[len("Bearer "):] if sent_auth.startswith("Bearer ") else None
        token = await self._token(host, repository, challenge, refused=refused_token)
        if refused_token is not None and token == refused_token:
            raise AuthError(f"registry {host} refused a fresh token for {repository} ({status})")
        return {"Authorization": f"Bearer {token}"}

    async def _token(self, host: str, repository: str, challenge: Challenge, refused: str | None) -> str:
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        scope = self._scopes.get((host, repository), f"repository:{repository}:pull")
        key = (realm, service, scope)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.value != refused and trio.current_time() < cached.expires_at:
                return cached.value
            creds = await self._credentials.get(host)
            value, lifetime = await self._fetch(host, realm, service, scope, creds)
            margin = min(5.0, lifetime * 0.1)
            self._tokens[key] = _Token(value, trio.current_time() + lifetime - margin)
            return value

    async def _fetch(self, host: str, realm: str, service: str, scope: str,
                     creds: Credentials | None) -> tuple[str, float]:
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"registry {host} names an unusable token realm {realm[:200]!r}")
        if (creds is not None and parts.scheme == "http" and not is_loopback(parts.netloc)
                and parts.netloc not in self._insecure_hosts):
            raise AuthError(f"refusing to send credentials for {host} to plain-HTTP realm {realm[:200]!r}")
        self.token_fetches += 1
        if creds is not None and creds.identity_token:
            resp = await self._post(realm, service, scope, creds)
        else:
            params = {"service": service, "scope": scope} if service else {"scope": scope}
            auth = (creds.username, creds.password) if creds and creds.username else None
            resp = await self._send("GET", realm, params=params, auth=auth)
            # Token servers without GET support (or that only check credentials on POST) answer
            # like this; containerd then tries the OAuth2 form.
            if creds is not None and creds.username and resp.status_code in (400, 401, 404, 405):
                resp = await self._post(realm, service, scope, creds)
        if resp.status_code in (401, 403):
            who = f"user {creds.username!r}" if creds and creds.username else "anonymous access"
            raise AuthError(f"token server {parts.netloc} refused {who} for {host} "
                            f"(scope {scope!r}): HTTP {resp.status_code}")
        if resp.status_code == 429 or resp.status_code >= 500:
            raise TransientSourceError(f"token server {parts.netloc} answered HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise AuthError(f"token server {parts.netloc} answered HTTP {resp.status_code} for {host}")
        return _parse_token(resp.content, parts.netloc)

    async def _post(self, realm: str, service: str, scope: str, creds: Credentials) -> httpx.Response:
        form = {"service": service, "scope": scope, "client_id": _CLIENT_ID}
        if creds.identity_token:
            form.update(grant_type="refresh_token", refresh_token=creds.identity_token)
        else:
            form.update(grant_type="password", username=creds.username, password=creds.password)
        return await self._send("POST", realm, data=form)

    async def _send(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            async with self._client.stream(method, url, **kwargs) as resp:  # type: ignore[arg-type]
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_TOKEN_RESPONSE:
                        raise AuthError(f"token server {urlsplit(url).netloc} sent more than "
                                        f"{_MAX_TOKEN_RESPONSE} bytes")
                return httpx.Response(resp.status_code, headers=resp.headers, content=bytes(body))
        except httpx.TransportError as exc:
            raise TransientSourceError(f"token server {urlsplit(url).netloc} unreachable: {exc!r}") from exc


def _basic_header(creds: Credentials) -> dict[str, str]:
    pair = f"{creds.username}:{creds.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def _parse_token(body: bytes, server: str) -> tuple[str, float]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthError(f"token server {server} answered something other than JSON") from exc
    if not isinstance(data, dict):
        raise AuthError(f"token server {server} answered JSON that is not an object")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token or len(token) > 64 * 1024 or not token.isprintable():
        raise AuthError(f"token server {server} answered without a usable token")
    expires_in = data.get("expires_in", _DEFAULT_EXPIRES_IN)
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = _DEFAULT_EXPIRES_IN
    return token, float(min(expires_in, 24 * 3600))
