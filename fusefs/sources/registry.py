"""The registry blob source: byte ranges of one layer blob over the distribution HTTP API.

A :class:`RegistrySource` reads ``GET <api>/<repo>/blobs/<digest>`` with ``Range`` headers from, in
order: a redirect target that still works, the layer's ``remote/urls``, the ``hosts.toml`` mirrors
with the ``pull`` capability, and the origin. Nearby ranges are coalesced and sent as multi-range
requests; servers that ignore ranges or multi-range are detected and read one range at a time
without ever holding a whole blob in memory. Transient failures (429, 5xx, timeouts, resets) are
retried here, with exponential backoff and full jitter, and nowhere else.

Every response is checked against what was asked: status, Content-Range, length. Bytes of the
wrong length are never returned; digests are the caller's job.

Concurrency: everything runs in the trio thread. Any number of tasks may call one source at
once; shared state (redirect target, multi-range support, token cache, plain-HTTP and mirror
cooldown memory) is only read and replaced between awaits, never held across one, so a stale
value costs at most one extra request. Token fetches for one (realm, service, scope) are
serialised by a lock so concurrent 401s cause one fetch.
"""

from __future__ import annotations

import contextvars
import importlib.util
import io
import logging
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from fusefs.errors import AuthError, BlobNotFound, SourceError, TransientSourceError
from fusefs.sources.auth import Authenticator
from fusefs.sources.base import PieceSink, hand_over_whole, read_tail_by_size
from fusefs.sources.config import RegistryConfig
from fusefs.sources.credentials import CredentialStore
from fusefs.sources.hosts import Endpoint, load_endpoints
from fusefs.sources.multirange import (
    Piece,
    Span,
    coalesce,
    cut,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    suffix,
    validate_ranges,
)
from fusefs.sources.reference import ImageRef, parse_reference, validate_digest
from fusefs.spec import LayerSpec

__all__ = ["RegistrySource", "RegistrySourceFactory", "SourceStatistics"]

log = logging.getLogger(__name__)

# A 200 answer to a ranged request this small is read and sliced; a larger one is abandoned.
_SMALL_WHOLE_BODY = 1 << 20
# Where a streamed read (``stream_ranges``) hands its body's pieces: set for the one request's
# task only, so the retry, redirect and auth layers between need not carry it
_STREAM_TO: contextvars.ContextVar[PieceSink | None] = contextvars.ContextVar("stream_to", default=None)
# Room for the part headers and delimiters of a multipart/byteranges body, per part.
_MULTIPART_OVERHEAD = 1024
_MAX_URLS = 8
# Requests one read_ranges call keeps in flight when its ranges need several.
_PARALLEL_REQUESTS = 4
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# A pre-signed redirect target answers these once it expired: resolve again via the registry.
_EXPIRED_STATUS = frozenset({401, 403, 404, 410})


@dataclass(frozen=True)
class SourceStatistics:
    """Counters of one source since it was opened (read by metrics)."""

    requests: int
    bytes_received: int
    retries: int
    redirects_resolved: int
    single_range_fallbacks: int


@dataclass(frozen=True)
class RequestOutcome:
    """Blob requests of a factory's sources that ended one way: an HTTP status, ``timeout`` or
    ``error`` (no response), with their total duration in seconds (read by metrics)."""

    count: int
    seconds: float


class _RangesIgnored(Exception):
    """A multi-range request came back as a whole 200 body: read those spans one at a time."""


@dataclass
class _Reply:
    """What one HTTP exchange produced: pieces of the blob, a redirect, or a size (HEAD)."""

    pieces: list[Piece] | None = None
    location: str | None = None
    size: int | None = None


class RegistrySourceFactory:
    """Opens :class:`RegistrySource` objects; owns the HTTP clients, credentials and token cache.

    Create it in the trio thread; ``open`` and ``aclose`` run there too. One ``httpx.AsyncClient``
    is kept per endpoint (scheme, host and TLS settings) so connections are pooled and kept alive
    across all layers of that host.
    """

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or RegistryConfig()
        self._timeout = httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout)
        self._http2 = importlib.util.find_spec("h2") is not None
        self._clients: dict[tuple[object, ...], httpx.AsyncClient] = {}
        self._endpoints: dict[str, list[Endpoint]] = {}
        self._plain_http: set[str] = set()
        self._cooling: dict[str, float] = {}
        self.credentials = CredentialStore(self.config.docker_config, self.config.credential_helper_timeout)
        self._default_tls: ssl.SSLContext | None = None
        token_client = self._new_client(verify=True, follow_redirects=True)
        self._clients[("token",)] = token_client
        self.auth = Authenticator(self.credentials, token_client, self.config.insecure_hosts)
        self._outcomes: dict[str, tuple[int, float]] = {}

    def request_outcomes(self) -> dict[str, RequestOutcome]:
        """Counts and durations of blob requests since creation, by outcome (monotonic)."""
        return {k: RequestOutcome(n, t) for k, (n, t) in self._outcomes.items()}

    def _record(self, outcome: str, seconds: float) -> None:
        n, t = self._outcomes.get(outcome, (0, 0.0))
        self._outcomes[outcome] = (n + 1, t + seconds)

    def _new_client(self, verify: ssl.SSLContext | bool, follow_redirects: bool = False) -> httpx.AsyncClient:
        if verify is True:
            # httpx would load the CA bundle into a new SSLContext for every client (~0.7 MiB
            # resident each): clients with the default trust share one, made as httpx makes it
            if self._default_tls is None:
                self._default_tls = httpx.create_ssl_context()
            verify = self._default_tls
        return httpx.AsyncClient(
            timeout=self._timeout, verify=verify, http2=self._http2, follow_redirects=follow_redirects,
            max_redirects=self.config.max_redirects,
            headers={"User-Agent": self.config.user_agent},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=30.0))

    async def open(self, spec: LayerSpec) -> RegistrySource:
        """A source for ``spec.digest`` of ``spec.ref``; nothing is fetched yet.

        Raises:
            SourceError: the reference, digest, size or hosts.toml is invalid.
        """
        ref = parse_reference(spec.ref)
        digest = validate_digest(spec.digest)
        if spec.size is not None and spec.size < 0:
            raise SourceError(f"negative blob size {spec.size} for {digest}")
        urls = [u for u in spec.urls if u.startswith(("http://", "https://"))][:_MAX_URLS]
        for url in urls:
            if not urlsplit(url).netloc:
                raise SourceError(f"unusable blob URL {url[:200]!r}")
        return RegistrySource(self, ref, digest, spec.size, tuple(urls), self.endpoints(ref))

    def endpoints(self, ref: ImageRef) -> list[Endpoint]:
        """Mirrors able to pull, then the origin, for the reference's registry (cached)."""
        found = self._endpoints.get(ref.host)
        if found is None:
            every = load_endpoints(ref.host, ref.api_host, self.config.hosts_dir,
                                   insecure_hosts=self.config.insecure_hosts,
                                   localhost_plain_http=self.config.localhost_plain_http)
            found = [e for e in every if "pull" in e.capabilities or not e.is_mirror]
            self._endpoints[ref.host] = found
        return [self.effective(e) for e in found]

    def effective(self, endpoint: Endpoint) -> Endpoint:
        if endpoint.netloc in self._plain_http and endpoint.scheme == "https":
            return replace(endpoint, scheme="http", plain_http_fallback=False)
        return endpoint

    def cool(self, endpoint: Endpoint) -> None:
        """Skip mirror ``endpoint`` for ``config.mirror_cooldown`` seconds after it failed."""
        if self.config.mirror_cooldown > 0:
            log.info("mirror %s failed; using the next endpoint for %.0fs", endpoint.base_url,
                     self.config.mirror_cooldown)
            self._cooling[endpoint.base_url] = trio.current_time() + self.config.mirror_cooldown

    def cooling(self, endpoint: Endpoint) -> bool:
        until = self._cooling.get(endpoint.base_url)
        return until is not None and trio.current_time() < until

    def fall_back_to_plain_http(self, endpoint: Endpoint) -> Endpoint:
        """Remember that ``endpoint``'s loopback host speaks plain HTTP; return the HTTP twin."""
        log.info("registry %s does not answer HTTPS; using plain HTTP (loopback host)", endpoint.netloc)
        self._plain_http.add(endpoint.netloc)
        return self.effective(endpoint)

    def client(self, endpoint: Endpoint | None, url: str) -> httpx.AsyncClient:
        """The shared client for ``endpoint``, or for the bare host of ``url`` (redirects, URLs)."""
        if endpoint is not None and urlsplit(url).netloc == endpoint.netloc:
            key = endpoint.tls_key()
            verify: ssl.SSLContext | bool = True
            if endpoint.scheme == "https":
                verify = _ssl_context(endpoint) or True
        else:
            parts = urlsplit(url)
            key = (parts.scheme, parts.netloc)
            verify = True
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._new_client(verify)
        return client

    async def aclose(self) -> None:
        """Close every pooled connection; sources opened from this factory stop working."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext | None:
    """The endpoint's own TLS settings (hosts.toml), or None for the system's defaults."""
    if not (endpoint.skip_verify or endpoint.ca or endpoint.client):
        return None
    try:
        ctx = ssl.create_default_context()
        for ca in endpoint.ca:
            ctx.load_verify_locations(cafile=ca)
        for cert, key in endpoint.client:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"TLS material for {endpoint.netloc} is unusable: {exc}") from exc
    if endpoint.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RegistrySource:
    """Random access to one blob in a registry. Implements ``fusefs.sources.base.BlobSource``.

    All methods run in the trio thread and checkpoint. They raise only ``fusefs.errors``
    exceptions: ``BlobNotFound`` (404 everywhere), ``AuthError``, ``TransientSourceError`` (after
    ``config.retries`` attempts) and ``SourceError`` (a response that lies about its bytes).
    """

    def __init__(self, factory: RegistrySourceFactory, ref: ImageRef, digest: str, size: int | None,
                 urls: tuple[str, ...], endpoints: list[Endpoint]) -> None:
        self._factory = factory
        self._config = factory.config
        self._ref = ref
        self._digest = digest
        self._size = size
        self._urls = urls
        self._endpoints = endpoints
        self._redirect: str | None = None
        self._multirange = self._config.max_ranges_per_request > 1
        self._last_check = -float("inf")
        self._requests = 0
        self._bytes = 0
        self._retries = 0
        self._redirects_resolved = 0
        self._single_fallbacks = 0
        self._warned_no_ranges = False

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def reference(self) -> ImageRef:
        return self._ref

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(self._requests, self._bytes, self._retries, self._redirects_resolved,
                                self._single_fallbacks)

    async def size(self) -> int:
        """The blob size: from the spec, else from a HEAD (Content-Length), remembered."""
        if self._size is None:
            reply = await self._with_retries("HEAD", [])
            if reply.size is None:
                raise SourceError(f"blob {self._digest}: HEAD answered without Content-Length")
            self._size = reply.size
        return self._size

    async def read_tail(self, length: int) -> bytes:
        """The blob's last ``min(length, size)`` bytes; an unknown size comes with them.

        With the size unknown this is one ``Range: bytes=-N`` request (RFC 9110 suffix range)
        instead of a HEAD and a GET.
        """
        if self._size is not None:
            return await read_tail_by_size(self, length)
        reply = await self._with_retries("GET", [suffix(length)])
        self._last_check = trio.current_time()
        # a multipart answer carries no total in a header we read: ask for it the old way
        size = self._size if self._size is not None else await self.size()
        n = min(length, size)
        (data,) = cut([(size - n, n)], reply.pieces or [])
        if data is None:
            raise SourceError(f"blob {self._digest}: the answer to a suffix range lacks the last {n} bytes")
        return data

    async def check(self) -> None:
        """HEAD the blob, at most once per ``config.check_interval`` seconds while it succeeds.

        A successful read counts as a check too: a layer just mounted is not asked again.
        """
        now = trio.current_time()
        if now - self._last_check < self._config.check_interval:
            return
        reply = await self._with_retries("HEAD", [])
        if self._size is not None and reply.size is not None and reply.size != self._size:
            raise SourceError(f"blob {self._digest}: size changed from {self._size} to {reply.size}")
        self._last_check = trio.current_time()

    async def aclose(self) -> None:
        """Forget the redirect target; connections belong to the factory and stay pooled."""
        self._redirect = None

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Return the bytes of each ``(offset, length)`` range, exactly ``length`` bytes each."""
        if not ranges:
            return []
        spans = self._spans(ranges)
        step = self._config.max_ranges_per_request
        batches = [spans[i:i + step] for i in range(0, len(spans), step)]
        if len(batches) == 1:
            pieces = await self._fetch(batches[0])
        else:
            pieces = await self._fetch_concurrently(batches)
        self._last_check = trio.current_time()
        out = cut(ranges, pieces)
        result: list[bytes] = []
        for (offset, length), data in zip(ranges, out, strict=True):
            if data is None or len(data) != length:
                raise SourceError(f"blob {self._digest}: no data for range {offset}+{length}")
            result.append(data)
        return result

    def _spans(self, ranges: Sequence[tuple[int, int]]) -> list[Span]:
        """The spans one request each would carry for ``ranges``, checked against the blob."""
        validate_ranges(ranges, self._size)
        return coalesce(ranges, self._config.coalesce_gap, self._config.max_request_bytes)

    async def stream_ranges(self, ranges: Sequence[tuple[int, int]], sink: PieceSink) -> None:
        """As ``fusefs.sources.base.stream_ranges``: ranges that coalesce into one span are one
        request whose body goes to ``sink`` as it arrives (retries start the span again); more
        spans than one are read as ``read_ranges`` reads them and handed over afterwards."""
        if not ranges:
            return
        spans = self._spans(ranges)
        if len(spans) > 1:
            await hand_over_whole(self, ranges, sink)
            return
        token = _STREAM_TO.set(sink)
        try:
            pieces = await self._fetch(spans)
        finally:
            _STREAM_TO.reset(token)
        self._last_check = trio.current_time()
        for piece in pieces:  # what came through a path that keeps the body (a whole-blob window)
            if piece.data:
                await sink(piece.start, piece.data)

    async def _fetch_concurrently(self, batches: list[list[Span]]) -> list[Piece]:
        """Fetch batches in parallel (bounded); the first failure cancels the rest and is raised."""
        results: list[list[Piece]] = [[] for _ in batches]
        failures: list[SourceError] = []
        limiter = trio.CapacityLimiter(_PARALLEL_REQUESTS)

        async def one(i: int, nursery: trio.Nursery) -> None:
            async with limiter:
                try:
                    results[i] = await self._fetch(batches[i])
                except SourceError as exc:
                    failures.append(exc)
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for i in range(len(batches)):
                nursery.start_soon(one, i, nursery)
        if failures:
            raise failures[0]
        return [p for r in results for p in r]

    async def _fetch(self, spans: list[Span]) -> list[Piece]:
        got: list[Piece] = []
        todo = spans
        if len(spans) > 1 and self._multirange:
            try:
                got = (await self._with_retries("GET", spans)).pieces or []
            except _RangesIgnored:
                self._no_multirange("answered a multi-range request with the whole blob")
            todo = [s for s in spans if cut([(s.start, s.length)], got)[0] is None]
            if todo and got:
                self._no_multirange("answered only part of a multi-range request")
        for span in todo:
            got.extend((await self._with_retries("GET", [span])).pieces or [])
        return got

    def _no_multirange(self, why: str) -> None:
        if self._multirange:
            log.info("blob %s: server %s; reading ranges one by one", self._digest, why)
        self._multirange = False
        self._single_fallbacks += 1

    async def _with_retries(self, method: str, spans: list[Span]) -> _Reply:
        """One logical request, retried on transient failures with backoff and full jitter."""
        last: TransientSourceError | None = None
        for attempt in range(self._config.retries):
            if attempt:
                self._retries += 1
                await trio.sleep(self._backoff(attempt, last))
            try:
                return await self._try_targets(method, spans)
            except TransientSourceError as exc:
                last = exc
                log.debug("blob %s: attempt %d failed: %s", self._digest, attempt + 1, exc)
        assert last is not None
        raise TransientSourceError(f"blob {self._digest}: giving up after {self._config.retries} "
                                   f"attempts: {last}", last.retry_after) from last

    def _backoff(self, attempt: int, last: TransientSourceError | None) -> float:
        cap = self._config.backoff_max
        if last is not None and last.retry_after is not None:
            return min(cap, max(0.0, last.retry_after))
        return random.uniform(0, min(cap, self._config.backoff_base * 2 ** (attempt - 1)))

    async def _try_targets(self, method: str, spans: list[Span]) -> _Reply:
        """Try the redirect target, the URLs, the mirrors and the origin, in that order, once."""
        errors: list[SourceError] = []
        target = self._redirect
        if target is not None and method == "GET":
            try:
                return await self._direct(method, target, spans, expired_ok=True)
            except _RedirectExpired:
                self._redirects_resolved += 1
                log.debug("blob %s: redirect target expired; resolving again", self._digest)
            except SourceError as exc:
                errors.append(exc)
            if self._redirect == target:  # concurrent reads may have resolved a new one already
                self._redirect = None
        for url in self._urls:
            try:
                return await self._direct(method, url, spans, expired_ok=False)
            except SourceError as exc:
                errors.append(exc)
        factory = self._factory
        for endpoint in self._endpoints:
            if endpoint.is_mirror and factory.cooling(endpoint):
                continue
            try:
                return await self._via_registry(method, endpoint, spans)
            except AuthError as exc:
                if not endpoint.is_mirror:
                    raise
                errors.append(exc)
            except TransientSourceError as exc:
                if endpoint.is_mirror:
                    factory.cool(endpoint)
                errors.append(exc)
            except SourceError as exc:
                errors.append(exc)
        raise _summarise(self._digest, errors)

    async def _direct(self, method: str, url: str, spans: list[Span], expired_ok: bool) -> _Reply:
        """A request to a URL outside the registry API: no credentials are sent there."""
        client = self._factory.client(None, url)
        try:
            reply = await self._exchange(client, method, url, self._base_headers(spans), spans,
                                         expired_ok=expired_ok)
        except _Refused as exc:
            raise AuthError(f"{urlsplit(url).netloc} refused blob {self._digest} "
                            f"(HTTP {exc.response.status_code})") from None
        if reply.location is not None:
            raise SourceError(f"blob {self._digest}: {urlsplit(url).netloc} redirected again")
        return reply

    async def _via_registry(self, method: str, endpoint: Endpoint, spans: list[Span]) -> _Reply:
        endpoint = self._factory.effective(endpoint)  # learnt since open: plain HTTP for loopback
        auth = self._factory.auth
        repo = self._ref.repository
        url = endpoint.blob_url(repo, self._digest)
        headers = self._base_headers(spans)
        headers.update(endpoint.headers)
        headers.update(await auth.headers(endpoint.netloc, repo))
        refused = False
        while True:
            client = self._factory.client(endpoint, url)
            try:
                reply = await self._exchange(client, method, url, headers, spans, expired_ok=False)
            except _ConnectFailed as exc:
                if _certificate_error(exc):
                    raise SourceError(f"TLS certificate of {endpoint.netloc} not trusted: "
                                      f"{_certificate_error(exc)}") from exc
                if not endpoint.plain_http_fallback:
                    raise
                endpoint = self._factory.fall_back_to_plain_http(endpoint)
                url = endpoint.blob_url(repo, self._digest)
                continue
            except _Refused as exc:
                # A refusal of a request that carried no credentials does not count: refresh once.
                had_auth = "Authorization" in headers
                headers.update(await auth.refused(endpoint.netloc, repo, exc.response, headers,
                                                  final=refused))
                refused = refused or had_auth
                continue
            break
        if reply.location is None:
            return reply
        for _hop in range(self._config.max_redirects):
            target = urljoin(url, reply.location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise SourceError(f"blob {self._digest}: redirect to unusable URL {target[:200]!r}")
            client = self._factory.client(None, target)
            try:
                reply = await self._exchange(client, method, target, self._base_headers(spans), spans,
                                             expired_ok=False)
            except _Refused as exc:
                raise SourceError(f"blob {self._digest}: redirect target {urlsplit(target).netloc} "
                                  f"refused it (HTTP {exc.response.status_code})") from None
            if reply.location is None:
                if method == "GET":
                    self._redirect = target
                return reply
            url = target
        raise SourceError(f"blob {self._digest}: more than {self._config.max_redirects} redirects")

    def _base_headers(self, spans: list[Span]) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if spans:
            headers["Range"] = range_header(spans)
        return headers

    async def _exchange(self, client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str],
                        spans: list[Span], *, expired_ok: bool) -> _Reply:
        """Send one request and validate its answer against ``spans``.

        The whole exchange is bounded by ``config.request_timeout``, so a server that trickles
        bytes just fast enough to beat the read timeout cannot hold a read forever.
        """
        where = urlsplit(url).netloc
        self._requests += 1
        status: list[int] = []
        outcome = "error"
        start = time.monotonic()
        try:
            with trio.fail_after(self._config.request_timeout):
                return await self._exchange_once(client, method, url, headers, spans, expired_ok, where,
                                                 status)
        except trio.TooSlowError as exc:
            outcome = "timeout"
            raise TransientSourceError(f"{where} took longer than {self._config.request_timeout}s "
                                       f"for {self._digest}") from exc
        finally:
            self._factory._record(str(status[0]) if status else outcome, time.monotonic() - start)

    async def _exchange_once(self, client: httpx.AsyncClient, method: str, url: str,
                             headers: dict[str, str], spans: list[Span], expired_ok: bool,
                             where: str, seen: list[int]) -> _Reply:
        try:
            async with client.stream(method, url, headers=headers) as resp:
                status = resp.status_code
                seen.append(status)
                if status in _REDIRECT_STATUS:
                    location = resp.headers.get("location")
                    if not location:
                        raise SourceError(f"blob {self._digest}: {where} redirected without Location")
                    return _Reply(location=location)
                if expired_ok and status in _EXPIRED_STATUS:
                    raise _RedirectExpired()
                if status in (401, 403):
                    await _drain(resp, 64 * 1024)
                    raise _Refused(resp)
                if status == 404:
                    raise BlobNotFound(f"blob {self._digest} not found at {where}")
                if status in _TRANSIENT_STATUS:
                    raise TransientSourceError(f"{where} answered HTTP {status} for {self._digest}",
                                               _retry_after(resp))
                if method == "HEAD":
                    if status != 200:
                        raise SourceError(f"{where} answered HTTP {status} to HEAD {self._digest}")
                    return _Reply(size=_content_length(resp))
                _check_encoding(resp)
                if status == 206:
                    return _Reply(pieces=await self._partial(resp, spans, where))
                if status == 200:
                    return _Reply(pieces=await self._whole(resp, spans, where))
                raise SourceError(f"{where} answered HTTP {status} to a range request for {self._digest}")
        except httpx.ConnectError as exc:
            raise _ConnectFailed(f"cannot connect to {where}: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransientSourceError(f"{where}: {type(exc).__name__}: {exc}") from exc
        except httpx.InvalidURL as exc:
            raise SourceError(f"blob {self._digest}: invalid URL for {where}: {exc}") from exc

    async def _partial(self, resp: httpx.Response, spans: list[Span], where: str) -> list[Piece]:
        asked = sum(s.length for s in spans)
        boundary = multipart_boundary(resp.headers.get("content-type", ""))
        if boundary is not None:
            limit = asked + _MULTIPART_OVERHEAD * len(spans) + 4096
            body = await self._read_upto(resp, limit, where)
            pieces = parse_multipart_byteranges(body, boundary)
        else:
            content_range = resp.headers.get("content-range")
            if content_range is None:
                raise SourceError(f"{where} answered 206 without Content-Range for {self._digest}")
            start, end, total = parse_content_range(content_range)
            self._check_total(total, where)
            if spans[0].is_suffix and (total is None or end != total):
                raise SourceError(f"{where} answered a suffix range of {self._digest} with "
                                  f"{content_range!r}, not the blob's end")
            if end - start > asked + self._config.coalesce_gap * len(spans):
                raise SourceError(f"{where} answered {end - start} bytes for a {asked}-byte request")
            declared = _content_length(resp)
            if declared is not None and declared != end - start:
                kind = "short body" if declared < end - start else "oversized body"
                raise SourceError(f"{where}: {kind}: Content-Length {declared} disagrees with "
                                  f"Content-Range {content_range!r} for {self._digest}")
            pieces = [Piece(start, await self._read_exact(resp, end - start, where, start))]
        for piece in pieces:
            if self._size is not None and piece.end > self._size:
                raise SourceError(f"{where} returned bytes past the end of {self._digest}")
        return pieces

    async def _whole(self, resp: httpx.Response, spans: list[Span], where: str) -> list[Piece]:
        """A 200 to a ranged request: the server sent the whole blob, from offset 0."""
        declared = _content_length(resp)
        if declared is not None:
            self._check_total(declared, where)
        total = declared if declared is not None else self._size
        if total is not None and total <= _SMALL_WHOLE_BODY:
            return [Piece(0, await self._read_exact(resp, total, where, 0))]
        if len(spans) > 1:
            raise _RangesIgnored()
        span = spans[0]
        if span.is_suffix:
            if total is None:
                raise SourceError(f"{where} ignored a suffix range of {self._digest} and sent no length")
            span = Span(max(0, total - span.length), total)
        if total is not None and span.end > total:
            raise SourceError(f"{where}: blob {self._digest} is {total} bytes, shorter than asked")
        if not self._warned_no_ranges:
            self._warned_no_ranges = True
            log.warning("blob %s: %s ignores Range; each read streams the blob up to its range",
                        self._digest, where)
        return [Piece(span.start, await self._read_window(resp, span, where))]

    def _check_total(self, total: int | None, where: str) -> None:
        if total is None:
            return
        if self._size is None:
            self._size = total
        elif total != self._size:
            raise SourceError(f"{where} says blob {self._digest} has {total} bytes, expected {self._size}")

    async def _read_exact(self, resp: httpx.Response, n: int, where: str, start: int) -> bytes:
        """The ``n``-byte body starting at blob offset ``start``; in a streamed read, each piece
        goes to the sink as it arrives and nothing is kept (returns ``b""``)."""
        sink = _STREAM_TO.get()
        # one buffer of the announced size (bounded by the caller's range), filled in place and
        # handed out without a copy (see _Body): the body is held once, not twice
        body = _Body(n) if sink is None else None
        got = 0
        async for chunk in resp.aiter_raw():
            if got + len(chunk) > n:
                raise SourceError(f"{where} sent more than the {n} bytes announced for {self._digest}")
            if body is not None:
                body.write(chunk)
            got += len(chunk)
            self._bytes += len(chunk)
            if sink is not None:
                await sink(start + got - len(chunk), chunk)
        if got != n:
            raise SourceError(f"{where} sent {got} of {n} bytes for {self._digest} (short body)")
        return body.value() if body is not None else b""

    async def _read_upto(self, resp: httpx.Response, limit: int, where: str) -> bytes:
        body = _Body()
        got = 0
        async for chunk in resp.aiter_raw():
            got += len(chunk)
            if got > limit:
                raise SourceError(f"{where} sent more than {limit} bytes for a multi-range request")
            body.write(chunk)
        self._bytes += got
        return body.value()

    async def _read_window(self, resp: httpx.Response, span: Span, where: str) -> bytes:
        """Keep only ``span`` of a whole-blob body, then drop the connection."""
        pos = 0
        buf = bytearray()
        async for chunk in resp.aiter_raw():
            self._bytes += len(chunk)
            lo, hi = max(span.start - pos, 0), min(span.end - pos, len(chunk))
            if lo < hi:
                buf += chunk[lo:hi]
            pos += len(chunk)
            if pos >= span.end:
                break
        if len(buf) != span.length:
            raise SourceError(f"{where} ended {self._digest} at {pos} bytes, before {span.end} (short body)")
        return bytes(buf)


class _Body:
    """A response body collected into one ``bytes`` without the final copy.

    ``io.BytesIO.getvalue`` returns its own buffer when nothing else shares it, so the body
    costs its size once, where a bytearray (or a list of pieces) and the ``bytes`` made from it
    cost it twice at the end of every read: a momentary doubling that sets the daemon's peak
    RSS when multi-MiB ranges come in. With a known size the buffer is made at that size first.
    """

    def __init__(self, size: int = 0) -> None:
        self._io = io.BytesIO()
        if size > 0:
            self._io.seek(size - 1)
            self._io.write(b"\0")
            self._io.seek(0)

    def write(self, chunk: bytes) -> None:
        self._io.write(chunk)

    def value(self) -> bytes:
        return self._io.getvalue()


class _ConnectFailed(TransientSourceError):
    """The TCP or TLS connection could not be made (a candidate for the plain-HTTP fallback)."""


class _RedirectExpired(SourceError):
    """The remembered redirect target no longer serves the blob."""


class _Refused(SourceError):
    """401/403 from the registry: the caller re-authenticates once."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _summarise(digest: str, errors: list[SourceError]) -> SourceError:
    if not errors:
        return SourceError(f"blob {digest}: no registry endpoint can pull it")
    detail = "; ".join(str(e) for e in errors)
    if any(isinstance(e, TransientSourceError) for e in errors):
        hints = [e.retry_after for e in errors if isinstance(e, TransientSourceError)]
        retry_after = max((h for h in hints if h is not None), default=None)
        return TransientSourceError(detail, retry_after)
    if all(isinstance(e, BlobNotFound) for e in errors):
        return BlobNotFound(detail)
    auth = [e for e in errors if isinstance(e, AuthError)]
    if auth:
        return AuthError(detail)
    return SourceError(detail)


def _certificate_error(exc: BaseException) -> str | None:
    """The certificate verification failure somewhere in ``exc``'s chain, if there is one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        todo += [e.__cause__, e.__context__]
    return None


def _content_length(resp: httpx.Response) -> int | None:
    value = resp.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise SourceError(f"malformed Content-Length {value[:40]!r}")
    return int(value)


def _check_encoding(resp: httpx.Response) -> None:
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceError(f"server applied Content-Encoding {encoding!r} to blob bytes")


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


async def _drain(resp: httpx.Response, limit: int) -> None:
    """Read a small error body so the connection can be reused; give up past ``limit``."""
    seen = 0
    async for chunk in resp.aiter_raw():
        seen += len(chunk)
        if seen > limit:
            break


if TYPE_CHECKING:
    from fusefs.sources.base import BlobSource, SourceFactory

    def _implements(f: RegistrySourceFactory, s: RegistrySource) -> tuple[SourceFactory, BlobSource]:
        return f, s  # mypy checks here that both satisfy the protocols structurally
