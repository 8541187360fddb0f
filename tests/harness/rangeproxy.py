"""A small logging HTTP proxy for the test registry that records each request's Range header.

distribution's access log leaves the Range header out; lazy-pull tests need it. The proxy runs in
a thread of the test process on 127.0.0.1:<free port>, forwards every method (request bodies by
Content-Length or chunked) to the registry unchanged, keeps the Host header (so upload Locations
point back at the proxy) and streams responses back. Each completed request becomes one JSON line:
{"method", "path", "status", "bytes", "range", "agent"}.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import AccessLogEntry

__all__ = ["RangeLoggingProxy", "read_proxy_log"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade"}
_COPY_BUF = 1 << 16


def read_proxy_log(text: str) -> list[AccessLogEntry]:
    """Parse the proxy's JSON lines into AccessLogEntry records (a partial last line is skipped)."""
    from .registry import AccessLogEntry

    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.append(AccessLogEntry(rec["method"], rec["path"], rec["status"], rec["bytes"], rec["range"],
                                  rec.get("agent")))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        return  # the JSON log below replaces the stderr log

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        sent = 0
        status = 502
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            status = resp.status
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_BY_HOP:
                    self.send_header(k, v)
            if length is None and self.command != "HEAD" and resp.status not in (204, 304):
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                while chunk := resp.read(_COPY_BUF):
                    self.wfile.write(chunk)
                    sent += len(chunk)
        finally:
            upstream.close()
            self.server.record(self.command, self.path, status, sent, self.headers.get("Range"),
                               self.headers.get("User-Agent"))

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, log_path: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in server_close
        self._lock = threading.Lock()

    def record(self, method: str, path: str, status: int, sent: int, rng: str | None,
               agent: str | None) -> None:
        line = json.dumps({"method": method, "path": path, "status": status, "bytes": sent, "range": rng,
                           "agent": agent})
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()

    def server_close(self) -> None:
        super().server_close()
        self._log.close()


class RangeLoggingProxy:
    """The proxy in a background thread; `start()` returns its "127.0.0.1:PORT"."""

    def __init__(self, upstream: str, log_path: Path) -> None:
        self.log_path = log_path
        self._server = _ProxyServer(upstream, log_path)
        self._thread = threading.Thread(target=self._server.serve_forever, name="range-proxy",
                                        daemon=True)

    def start(self) -> str:
        self._thread.start()
        port: int = self._server.server_address[1]
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
