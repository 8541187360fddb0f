"""A small HTTP/1.1 server on trio (h11), for the control API and the metrics endpoint.

One request per connection (``Connection: close``): the clients are ``snapctl`` and Prometheus,
neither needs keep-alive. Request heads are bounded by h11 (``MAX_HEAD``), bodies by
``max_body``, and a client gets ``READ_TIMEOUT`` seconds to send its request; the handler's own
work is not timed. Listeners: a unix socket created with mode 0600 (``open_unix_listener``) or
TCP (``open_listener`` parses ``host:port``, ``unix:/path`` or ``/path``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from snapshotter.sockets import SocketInUse, remove_stale_socket

log = logging.getLogger(__name__)

MAX_HEAD = 16 << 10
READ_TIMEOUT = 30.0
DRAIN_TIMEOUT = 2.0
DRAIN_LIMIT = 4 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class ListenError(Exception):
    """An address cannot be parsed or listened on."""


async def serve(listener: trio.abc.Listener[trio.abc.Stream], handler: Handler,
                max_body: int = 64 << 10) -> None:
    """Answer requests on ``listener`` with ``handler`` until cancelled."""

    async def one(stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                await _handle(stream, handler, max_body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.debug("http connection dropped: %s", exc)

    await trio.serve_listeners(one, [listener])


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection,
                        max_body: int) -> Request | Response:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
            if not data and conn.their_state is not h11.DONE:
                raise trio.BrokenResourceError("client closed before its request ended")
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                return _error(413, f"request body over {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = urlsplit(head.target.decode("ascii", "replace"))
            return Request(head.method.decode("ascii", "replace"), target.path,
                           dict(parse_qsl(target.query)), bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client closed the connection")


async def _handle(stream: trio.abc.Stream, handler: Handler, max_body: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        with trio.fail_after(READ_TIMEOUT):
            got = await _read_request(stream, conn, max_body)
    except h11.RemoteProtocolError as exc:
        got = _error(exc.error_status_hint, f"bad request: {exc}")
    except trio.TooSlowError:
        got = _error(408, "request not received in time")
    if isinstance(got, Request):
        try:
            response = await handler(got)
        except Exception:
            log.exception("unexpected error answering %s %s", got.method, got.path)
            response = _error(500, "internal error (see the daemon log)")
    else:
        response = got
    headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
               ("connection", "close"), *response.headers.items()]
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    if out:
        await stream.send_all(out)
    body = conn.send(h11.Data(data=response.body))
    if body:
        await stream.send_all(body)
    end = conn.send(h11.EndOfMessage())
    if end:
        await stream.send_all(end)
    if not isinstance(got, Request):
        await _discard_rest(stream)


async def _discard_rest(stream: trio.abc.Stream) -> None:
    # Closing with unread input makes the kernel reset the connection, and the client may lose
    # the error answer: let it see our end first, then drop what it still sends (bounded).
    if isinstance(stream, trio.SocketStream):
        await stream.send_eof()
    with trio.move_on_after(DRAIN_TIMEOUT):
        drained = 0
        while drained < DRAIN_LIMIT:
            data = await stream.receive_some(65536)
            if not data:
                break
            drained += len(data)


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"error": message}).encode())


def json_response(value: object, status: int = 200) -> Response:
    """``value`` as a JSON response."""
    return Response(status, json.dumps(value).encode())


def error_response(status: int, message: str) -> Response:
    """``{"error": message}`` with ``status``."""
    return _error(status, message)


async def open_unix_listener(path: str, mode: int = 0o600) -> trio.SocketListener:
    """Listen on unix socket ``path`` (created with ``mode``; a stale socket file is replaced).

    Raises:
        ListenError: the path is served by a live process, is not a socket, or cannot be bound.
    """
    if len(os.fsencode(path)) >= 108:
        raise ListenError(f"{path}: unix socket path too long")
    try:
        remove_stale_socket(path)
    except SocketInUse as exc:
        raise ListenError(str(exc)) from exc
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o711, exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(64)
    return trio.SocketListener(sock)


def parse_address(address: str) -> tuple[str, str, int]:
    """``("unix", path, 0)`` or ``("tcp", host, port)`` from ``unix:/p``, ``/p`` or ``host:port``.

    Raises:
        ListenError: anything else.
    """
    if address.startswith("unix:"):
        address = address[5:]
        if not address.startswith("/"):
            raise ListenError(f"unix socket address must be absolute: {address!r}")
    if address.startswith("/"):
        return "unix", address, 0
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"not host:port, unix:/path or /path: {address!r}")
    return "tcp", host, int(port)


async def open_listener(address: str) -> trio.SocketListener:
    """A listener for ``address`` (see ``parse_address``); unix sockets get mode 0600."""
    kind, host, port = parse_address(address)
    if kind == "unix":
        return await open_unix_listener(host)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror}") from exc
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


def bound_address(listener: trio.SocketListener) -> str:
    """What ``listener`` listens on, as ``host:port`` or the socket path."""
    name = listener.socket.getsockname()
    if isinstance(name, tuple):
        host = name[0]
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return str(name)
