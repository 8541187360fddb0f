"""A fault-injecting HTTP proxy in front of a test registry, for source and end-to-end tests.

    with FaultProxy("127.0.0.1:5000") as proxy:     # listens on 127.0.0.1:<free port>
        proxy.host                                  # what clients use instead of the registry
        proxy.fail_next(3, status=503)              # the next 3 blob requests answer 503
        proxy.flip_byte(digest, 1234)               # blob byte 1234 arrives with its bits flipped
        proxy.requests()                            # [Recorded(method, path, range, status, bytes)]

It runs in threads of the test process (``http.server``), forwards every method unchanged (Host
header kept, so upload Locations point back at the proxy) and buffers each upstream response, so
faults can rewrite it: keep test blobs to a few MiB. Faults apply to blob requests
(``/blobs/sha256:...``) unless noted; every switch is thread-safe and ``reset()`` clears them all.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["FaultProxy", "Recorded"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "content-length"}
_BLOB = re.compile(r"/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_PRESIGNED = re.compile(r"^/_presigned/(?P<id>[0-9a-f]{32})(?P<path>/v2/.+)$")
_PART_RANGE = re.compile(rb"Content-Range: bytes (\d+)-(\d+)/\d+\r\n(?:[^\r\n]*\r\n)*\r\n", re.IGNORECASE)
_SINGLE_RANGE = re.compile(r"bytes (\d+)-(\d+)/")


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request the proxy answered."""

    method: str
    path: str
    range: str | None
    status: int
    bytes: int
    authorization: str | None = None
    concurrent: int = 1  # requests in flight at the proxy when this one arrived, itself included
    client_port: int = 0  # the client's TCP port: equal ports mean one kept-alive connection

    @property
    def is_blob(self) -> bool:
        return _BLOB.search(self.path.split("?", 1)[0]) is not None


@dataclass
class _Faults:
    fail_left: int = 0
    fail_status: int = 500
    fail_retry_after: int | None = None
    delay: float = 0.0
    drop_left: int = 0
    truncate_left: int = 0
    truncate_bytes: int = 0
    strip_range: bool = False
    first_range_only: bool = False
    redirect_uses: int | None = None


class FaultProxy:
    """Forwards to ``upstream`` (``host:port`` or ``http://host:port``) with switchable faults."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self._lock = threading.Lock()
        self._faults = _Faults()
        self._flips: dict[str, set[int]] = {}
        self._expired_tokens: set[str] = set()
        self._presigned: dict[str, tuple[int, str | None]] = {}
        self._records: list[Recorded] = []
        self._in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.host = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close the socket. Idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- fault switches ------------------------------------------------------------------------

    def reset(self) -> None:
        """Clear every fault (recorded requests are kept)."""
        with self._lock:
            self._faults = _Faults()
            self._flips.clear()
            self._expired_tokens.clear()

    def fail_next(self, n: int, status: int = 500, retry_after: int | None = None) -> None:
        """Answer the next ``n`` blob requests with ``status`` (and ``Retry-After`` if given)."""
        with self._lock:
            self._faults.fail_left, self._faults.fail_status = n, status
            self._faults.fail_retry_after = retry_after

    def set_delay(self, seconds: float) -> None:
        """Wait ``seconds`` before answering each blob request."""
        with self._lock:
            self._faults.delay = seconds

    def drop_next(self, n: int) -> None:
        """For the next ``n`` blob GETs, send the headers and half the body, then close."""
        with self._lock:
            self._faults.drop_left = n

    def truncate_next(self, n: int, drop_bytes: int) -> None:
        """Cut ``drop_bytes`` off the next ``n`` blob bodies, with a Content-Length that agrees."""
        with self._lock:
            self._faults.truncate_left, self._faults.truncate_bytes = n, drop_bytes

    def strip_range(self, enabled: bool = True) -> None:
        """Forward blob requests without their Range header: the answer is 200 and the whole blob."""
        with self._lock:
            self._faults.strip_range = enabled

    def first_range_only(self, enabled: bool = True) -> None:
        """Forward only the first range of a multi-range request (a server ignoring the rest)."""
        with self._lock:
            self._faults.first_range_only = enabled

    def flip_byte(self, digest: str, offset: int) -> None:
        """Flip the bits of blob byte ``offset`` in every response that carries it."""
        with self._lock:
            self._flips.setdefault(digest, set()).add(offset)

    def expire_token(self, token: str) -> None:
        """The next request bearing ``token`` reaches the registry without it (so it gets a 401)."""
        with self._lock:
            self._expired_tokens.add(token)

    def redirect_blobs(self, uses: int | None) -> None:
        """Redirect blob GETs (307) to one-off ``/_presigned/...`` URLs valid for ``uses`` requests.

        After that they answer 403, like an expired pre-signed storage URL. ``None`` turns it off.
        """
        with self._lock:
            self._faults.redirect_uses = uses

    # -- records -------------------------------------------------------------------------------

    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._records)

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self._records.append(rec)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients under test abandon responses on purpose (timeouts, range windows): not errors.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    _concurrent = 1
    protocol_version = "HTTP/1.1"
    timeout = 60

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        with self.owner._lock:
            self.owner._in_flight += 1
            self._concurrent = self.owner._in_flight
        try:
            self._serve()
        finally:
            with self.owner._lock:
                self.owner._in_flight -= 1

    def _serve(self) -> None:
        owner = self.owner
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        path = self.path
        presigned = _PRESIGNED.match(path)
        if presigned:
            if not self._use_presigned(presigned.group("id"), headers):
                self._reply(403, {"Content-Type": "text/plain"}, b"presigned URL expired\n")
                return
            path = presigned.group("path")
        blob = _BLOB.search(path.split("?", 1)[0])
        if blob is not None and self._apply_request_faults(headers, path, presigned is not None):
            return
        status, resp_headers, resp_body = self._forward(path, headers, body)
        if blob is not None and self.command == "GET" and status in (200, 206):
            resp_body = self._apply_flips(blob.group("digest"), status, resp_headers, resp_body)
            with owner._lock:
                f = owner._faults
                truncate = f.truncate_left > 0
                drop = not truncate and f.drop_left > 0
                if truncate:
                    f.truncate_left -= 1
                if drop:
                    f.drop_left -= 1
                cut = f.truncate_bytes
            if truncate:
                resp_body = resp_body[:max(0, len(resp_body) - cut)]
            if drop:
                self._reply_dropped(status, resp_headers, resp_body)
                return
        self._reply(status, resp_headers, resp_body)

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked (pushes from ctr/skopeo use both)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _use_presigned(self, key: str, headers: dict[str, str]) -> bool:
        with self.owner._lock:
            left, auth = self.owner._presigned.get(key, (0, None))
            if left <= 0:
                return False
            self.owner._presigned[key] = (left - 1, auth)
        headers.pop("Authorization", None)
        if auth is not None:
            headers["Authorization"] = auth
        return True

    def _apply_request_faults(self, headers: dict[str, str], path: str, presigned: bool) -> bool:
        """Apply faults that act before forwarding; True when the request was answered here."""
        owner = self.owner
        with owner._lock:
            f = owner._faults
            delay = f.delay
            fail = f.fail_left > 0
            if fail:
                f.fail_left -= 1
            status, retry_after = f.fail_status, f.fail_retry_after
            strip, first_only, redirect = f.strip_range, f.first_range_only, f.redirect_uses
            auth = headers.get("Authorization", "")
            if auth.startswith("Bearer ") and auth[7:] in owner._expired_tokens:
                owner._expired_tokens.discard(auth[7:])
                headers.pop("Authorization")
        if delay:
            time.sleep(delay)
        if fail:
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            self._reply(status, {"Content-Type": "application/json", **extra},
                        b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}')
            return True
        rng = headers.get("Range")
        if rng is not None and strip:
            headers.pop("Range")
        elif rng is not None and first_only and "," in rng:
            headers["Range"] = rng.split(",", 1)[0]
        if redirect is not None and not presigned and self.command == "GET":
            key = uuid.uuid4().hex
            with owner._lock:
                owner._presigned[key] = (redirect, headers.get("Authorization"))
            self._reply(307, {"Location": f"http://{owner.host}/_presigned/{key}{path}"}, b"")
            return True
        return False

    def _forward(self, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=60)
        try:
            conn.request(self.command, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            if self.command == "HEAD" and resp.getheader("Content-Length"):
                out["Content-Length"] = resp.getheader("Content-Length") or "0"
            return resp.status, out, data
        except OSError as exc:
            return 502, {"Content-Type": "text/plain"}, f"upstream: {exc}\n".encode()
        finally:
            conn.close()

    def _apply_flips(self, digest: str, status: int, headers: dict[str, str], body: bytes) -> bytes:
        with self.owner._lock:
            offsets = sorted(self.owner._flips.get(digest, ()))
        if not offsets:
            return body
        spans: list[tuple[int, int, int]] = []  # (blob start, blob end inclusive, body position)
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        crange = next((v for k, v in headers.items() if k.lower() == "content-range"), "")
        if status == 200:
            spans.append((0, len(body) - 1, 0))
        elif ctype.startswith("multipart/byteranges"):
            for m in _PART_RANGE.finditer(body):
                spans.append((int(m.group(1)), int(m.group(2)), m.end()))
        elif (m2 := _SINGLE_RANGE.match(crange)) is not None:
            spans.append((int(m2.group(1)), int(m2.group(2)), 0))
        data = bytearray(body)
        for offset in offsets:
            for start, end, pos in spans:
                if start <= offset <= end and pos + offset - start < len(data):
                    data[pos + offset - start] ^= 0xFF
        return bytes(data)

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "date", "server"):
                self.send_header(k, v)
        length = headers.get("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length if length is not None else str(len(body)))
        # Recorded before the body goes out, so a client that has its answer sees the record.
        self._log(status, len(body) if self.command != "HEAD" else 0)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()

    def _reply_dropped(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        half = body[: len(body) // 2]
        self._log(status, len(half))
        self.end_headers()
        self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _log(self, status: int, sent: int) -> None:
        self.owner._record(Recorded(self.command, self.path, self.headers.get("Range"), status, sent,
                                    self.headers.get("Authorization"), self._concurrent,
                                    self.client_address[1]))
