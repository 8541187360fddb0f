"""gRPC on trio: the daemon's server for containerd's Snapshots API, over HTTP/2 (``h2``).

containerd dials a proxy snapshotter's unix socket with HTTP/2 prior knowledge and makes unary
calls (and one server-streaming call, ``List``). This module serves such calls for any protobuf
service: HTTP/2 framing, flow control and header compression are ``h2``'s; what is here is
gRPC's thin layer on top (the 5-byte message prefix, ``grpc-status`` trailers) and the tasks.

Why not grpcio, which the daemon used before: its core library and libstdc++ are 10.8 MiB of the
idle daemon's ~60 MiB resident memory (docs/benchmarks.md), it brings its own threads next to
trio's, and it cannot serve a listening socket it did not bind, so socket activation needed a
bridge. Here the listener is any trio listener, inherited or bound.

Each call's handler runs in a worker thread (handlers block: sqlite, mount syscalls), at most
``max_workers`` at a time, and may call into the trio loop with ``trio.from_thread.run``. A
handler ends a call with a status by raising :class:`RpcError` (``context.abort``); any other
exception is logged and answered UNKNOWN. Requests are refused before they are decoded when
larger than ``max_message_bytes``, compressed (no ``grpc-encoding`` is offered), or for a method
the service does not have. On shutdown the server stops accepting connections, answers new calls
UNAVAILABLE and gives the calls in flight ``grace`` seconds to answer.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

log = logging.getLogger(__name__)

__all__ = ["Context", "Method", "RpcError", "Server", "StatusCode", "service_methods"]

_READ_BYTES = 64 << 10
_ACCEPT_CAPACITY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)
_ACCEPT_RETRY = 0.1  # seconds
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)  # what a vanished client raises
_PREFIX = 5  # compressed flag, then the message length (big-endian u32)


class StatusCode(enum.Enum):
    """gRPC's status codes, with its names and numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """Ends a call with ``code`` and ``details`` (raised by :meth:`Context.abort`)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Context:
    """What a handler gets besides its request."""

    def abort(self, code: StatusCode, details: str) -> NoReturn:
        """End the call with a status other than OK."""
        raise RpcError(code, details)


Handler = Callable[[Any, Context], Any]
Observer = Callable[[str, StatusCode, float], None]  # method name, status, seconds


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


@dataclass(frozen=True)
class Method:
    """One method served: how its request decodes, its handler, whether it streams responses,
    and how a response encodes (protobuf messages by default)."""

    name: str
    decode: Callable[[bytes], Any]
    handler: Handler
    streaming: bool = False
    encode: Callable[[Any], bytes] = _serialize


def service_methods(service: ServiceDescriptor, servicer: object) -> dict[str, Method]:
    """The methods of ``service`` that ``servicer`` implements, by request path
    (``/package.Service/Method``). Client-streaming methods are not supported."""
    methods = {}
    for m in service.methods:
        handler = getattr(servicer, m.name, None)
        if handler is None or m.client_streaming:
            continue
        methods[f"/{service.full_name}/{m.name}"] = Method(
            m.name, GetMessageClass(m.input_type).FromString, handler, m.server_streaming)
    return methods


@dataclass
class _Call:
    method: Method | None
    body: bytearray = field(default_factory=bytearray)
    refused: tuple[StatusCode, str] | None = None
    reset: bool = False


class Server:
    """Serves ``methods`` on the listeners given to :meth:`serve` until :meth:`aclose`."""

    def __init__(self, methods: dict[str, Method], *, max_message_bytes: int = 4 << 20,
                 max_workers: int = 16, observe: Observer | None = None) -> None:
        self._methods = methods
        self._max_message = max_message_bytes
        self._workers = trio.CapacityLimiter(max_workers)
        self._observe = observe
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._scope: trio.CancelScope | None = None
        self._accepting: trio.CancelScope | None = None
        self._closing = False

    async def serve(self, listener: trio.abc.Listener[trio.abc.Stream], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until :meth:`aclose` (or cancellation)."""
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as self._accepting:
                    task_status.started()
                    async with listener:
                        while True:
                            try:
                                stream = await listener.accept()
                            except OSError as exc:
                                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                                    raise
                                # out of descriptors or memory for now: the clients connected
                                # still need serving, and a closed one frees what this wants
                                log.error("gRPC server cannot accept a connection (%s); retrying", exc)
                                await trio.sleep(_ACCEPT_RETRY)
                                continue
                            nursery.start_soon(self._serve_connection, stream)

    async def aclose(self, grace: float) -> None:
        """Stop accepting connections and calls, let the calls in flight answer for ``grace``
        seconds, then close every connection."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        with trio.move_on_after(grace):
            await self._idle.wait()
        if self._scope is not None:
            self._scope.cancel()

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await _Connection(self, stream).run()
        except Exception as exc:  # one connection's end, never the server's
            if not _disconnected(exc):
                log.exception("gRPC connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    # -- calls ---------------------------------------------------------------------------------

    def _started(self) -> None:
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle = trio.Event()

    def _ended(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def _invoke(self, call: _Call) -> tuple[StatusCode, str, list[bytes]]:
        """Decode the request, run the handler in a worker thread, encode the responses."""
        method = call.method
        if call.refused is not None:
            return (*call.refused, [])
        assert method is not None
        body = call.body
        if body[:1] == b"\x01":
            return StatusCode.UNIMPLEMENTED, "compressed requests are not supported", []
        declared = int.from_bytes(body[1:_PREFIX], "big")
        if len(body) < _PREFIX or body[0] != 0 or declared != len(body) - _PREFIX:
            return StatusCode.INTERNAL, "the request is not one length-prefixed message", []
        try:
            request = method.decode(bytes(body[_PREFIX:]))
        except (DecodeError, ValueError) as exc:
            return StatusCode.INTERNAL, f"the request does not decode: {exc}", []
        call.body = bytearray()  # decoded: the bytes are not needed while the handler runs
        return await trio.to_thread.run_sync(self._run_handler, method, request, limiter=self._workers)

    def _run_handler(self, method: Method, request: Any) -> tuple[StatusCode, str, list[bytes]]:
        try:
            result = method.handler(request, Context())
            responses: Iterable[Any] = result if method.streaming else (result,)
            frames = [_frame(method.encode(m)) for m in responses]
        except RpcError as exc:
            return exc.code, exc.details, []
        except Exception as exc:
            log.exception("unexpected error in %s", method.name)
            return StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}", []
        if any(len(f) - _PREFIX > self._max_message for f in frames):
            return StatusCode.RESOURCE_EXHAUSTED, "a response exceeds the message size limit", []
        return StatusCode.OK, "", frames


def _disconnected(exc: BaseException) -> bool:
    """Whether ``exc`` only says the client went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_disconnected(e) for e in exc.exceptions)
    return isinstance(exc, _GONE)


def _frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _status_headers(code: StatusCode, details: str) -> list[tuple[str, str]]:
    headers = [("grpc-status", str(code.value))]
    if details:
        # percent-encoded as the gRPC spec asks: printable ASCII but '%' stays as it is
        headers.append(("grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    return headers


class _Connection:
    """One client connection: the h2 state machine, and one task per call."""

    def __init__(self, server: Server, stream: trio.abc.Stream) -> None:
        self._server = server
        self._stream = stream
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self._calls: dict[int, _Call] = {}
        self._send_lock = trio.Lock()
        self._window = trio.Event()  # set (and replaced) whenever the peer opens its windows

    async def run(self) -> None:
        self._h2.initiate_connection()
        await self._flush()
        async with trio.open_nursery() as calls:
            open_ = True
            while open_:
                try:
                    data = await self._stream.receive_some(_READ_BYTES)
                except _GONE:
                    break  # the client went away: its calls have nobody to answer to
                if not data:
                    break
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    log.info("gRPC client broke HTTP/2 (%s): closing its connection", exc)
                    open_ = False
                    events = []
                for event in events:
                    open_ = self._on_event(event, calls) and open_
                try:
                    await self._flush()
                except _GONE:
                    break
            calls.cancel_scope.cancel()

    def _on_event(self, event: h2.events.Event, calls: trio.Nursery) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            headers = {str(k): str(v) for k, v in event.headers or ()}  # str: header_encoding is set
            self._calls[event.stream_id] = self._new_call(headers)
        elif isinstance(event, h2.events.DataReceived):
            call = self._calls.get(event.stream_id)
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if call is not None and call.refused is None:
                if len(call.body) + len(event.data) > self._server._max_message + _PREFIX:
                    call.refused = (StatusCode.RESOURCE_EXHAUSTED, "the request exceeds the size limit")
                    call.body = bytearray()
                else:
                    call.body += event.data
        elif isinstance(event, h2.events.StreamEnded):
            call = self._calls.get(event.stream_id)
            if call is not None:
                self._server._started()
                calls.start_soon(self._answer, event.stream_id, call)
        elif isinstance(event, h2.events.StreamReset):
            call = self._calls.pop(event.stream_id, None)
            if call is not None:
                call.reset = True
            self._window_opened()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _new_call(self, headers: dict[str, str]) -> _Call:
        method = self._server._methods.get(headers.get(":path", ""))
        call = _Call(method)
        if not headers.get("content-type", "").startswith("application/grpc"):
            call.refused = (StatusCode.INTERNAL, f"content-type {headers.get('content-type')!r} is not gRPC")
        elif headers.get("grpc-encoding", "identity") != "identity":
            encoding = headers["grpc-encoding"]
            call.refused = (StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding!r} is not supported")
        elif method is None:
            call.refused = (StatusCode.UNIMPLEMENTED, f"unknown method {headers.get(':path')!r}")
        elif self._server._closing:
            call.refused = (StatusCode.UNAVAILABLE, "the snapshotter is shutting down")
        return call

    def _window_opened(self) -> None:
        self._window.set()
        self._window = trio.Event()

    async def _answer(self, stream_id: int, call: _Call) -> None:
        start = time.perf_counter()
        code = StatusCode.UNKNOWN
        try:
            code, details, frames = await self._server._invoke(call)
            if not call.reset:
                await self._respond(stream_id, code, details, frames)
        except (h2.exceptions.ProtocolError, *_GONE):
            pass  # the stream reset by the client, or its connection gone, while we answered
        finally:
            self._calls.pop(stream_id, None)
            self._server._ended()
            if call.method is not None and self._server._observe is not None:
                self._server._observe(call.method.name, code, time.perf_counter() - start)

    async def _respond(self, stream_id: int, code: StatusCode, details: str, frames: list[bytes]) -> None:
        head = [(":status", "200"), ("content-type", "application/grpc")]
        if code is not StatusCode.OK:  # trailers only
            async with self._send_lock:
                self._h2.send_headers(stream_id, head + _status_headers(code, details), end_stream=True)
                await self._flush_locked()
            return
        async with self._send_lock:
            self._h2.send_headers(stream_id, head)
        for frame in frames:
            await self._send_data(stream_id, frame)
        async with self._send_lock:
            self._h2.send_headers(stream_id, _status_headers(code, details), end_stream=True)
            await self._flush_locked()

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        """Send ``data`` on the stream as fast as the peer's flow-control windows allow."""
        view = memoryview(data)
        while view:
            async with self._send_lock:
                room = min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
                if room > 0:
                    self._h2.send_data(stream_id, bytes(view[:room]))
                    view = view[room:]
                    await self._flush_locked()
                    continue
                opened = self._window
            await opened.wait()

    async def _flush(self) -> None:
        async with self._send_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        data = self._h2.data_to_send()
        if data:
            await self._stream.send_all(data)
