"""``snapshotter.rpc``: the daemon's gRPC server, driven by a real gRPC client (grpcio).

The server runs in its own trio loop in a thread, on a unix socket; each test talks to it as
containerd would. containerd's own client (Go) is covered by the conformance suite and the
end-to-end tests, which go through the daemon.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio
from google.protobuf import wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter import rpc, systemd


@dataclass
class Running:
    """A server serving in a background trio loop."""

    address: str
    server: rpc.Server
    token: trio.lowlevel.TrioToken | None
    observed: list[tuple[str, rpc.StatusCode]] = field(default_factory=list)

    def call(self, method: str, payload: bytes = b"", timeout: float = 30.0) -> bytes:
        with grpc.insecure_channel("unix:" + self.address) as channel:
            answer: bytes = channel.unary_unary(method)(payload, timeout=timeout)
            return answer

    def stream(self, method: str, payload: bytes = b"") -> list[bytes]:
        # HTTP/2's initial 64 KiB window, not grown by probing: the server must wait for the
        # client's window updates as it reads
        options = [("grpc.http2.lookahead_bytes", 65535), ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel("unix:" + self.address, options=options) as channel:
            return list(channel.unary_stream(method)(payload, timeout=30))

    def close(self, grace: float) -> None:
        assert self.token is not None
        trio.from_thread.run(self.server.aclose, grace, trio_token=self.token)


def _listener(address: str) -> trio.SocketListener:
    """A listener on ``address``, bound as the daemon binds its own."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(systemd.listen_unix(address)))


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err: Any = excinfo.value
    return err.code(), err.details()


class Handlers:
    def __init__(self) -> None:
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def echo(self, request: bytes, context: rpc.Context) -> bytes:
        return b"echo:" + request

    def fail(self, request: bytes, context: rpc.Context) -> bytes:
        context.abort(rpc.StatusCode.NOT_FOUND, request.decode())

    def crash(self, request: bytes, context: rpc.Context) -> bytes:
        raise RuntimeError("a bug")

    def chunks(self, request: bytes, context: rpc.Context) -> Iterator[bytes]:
        count, size = (int(x) for x in request.decode().split("x"))
        return iter([bytes([i % 251]) * size for i in range(count)])

    def slow(self, request: bytes, context: rpc.Context) -> bytes:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.release.wait(float(request.decode() or 30))
            return b"done"
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def running(tmp_path: Path, handlers: Handlers) -> Iterator[Running]:
    methods = {
        f"/test.Svc/{name}": rpc.Method(name, bytes, getattr(handlers, name.lower()),
                                        streaming=name == "Chunks", encode=bytes)
        for name in ("Echo", "Fail", "Crash", "Chunks", "Slow")
    }
    # a protobuf request, as the Snapshots methods have: its bytes may not decode
    methods["/test.Svc/Proto"] = rpc.Method("Proto", wrappers_pb2.StringValue.FromString,
                                            lambda request, context: request)
    address = str(tmp_path / "rpc.sock")
    observed: list[tuple[str, rpc.StatusCode]] = []
    server = rpc.Server(methods, max_message_bytes=1 << 20, max_workers=2,
                        observe=lambda name, code, seconds: observed.append((name, code)))
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, _listener(address))
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(10)
    run = Running(address, server, box["token"], observed)
    yield run
    handlers.release.set()
    if thread.is_alive():  # the shutdown test closed it already
        run.close(grace=5)
    thread.join(10)
    assert not thread.is_alive()


def test_a_unary_call(running: Running) -> None:
    assert running.call("/test.Svc/Echo", b"hi") == b"echo:hi"
    assert running.call("/test.Svc/Echo", b"") == b"echo:"
    request = wrappers_pb2.StringValue(value="h\u00e9").SerializeToString()
    assert running.call("/test.Svc/Proto", request) == request


def test_a_request_that_does_not_decode_is_internal(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Proto", b"\x0a\x05ab")  # a string field running past the end
    assert _code(excinfo)[0] == grpc.StatusCode.INTERNAL


def test_an_abort_is_the_client_s_status_with_its_message(running: Running) -> None:
    message = "no snapshot \u201ck\u201d: 100% gone, not %41\nsecond line"
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Fail", message.encode())
    assert _code(excinfo) == (grpc.StatusCode.NOT_FOUND, message)


def test_a_handler_bug_is_unknown_and_the_server_serves_on(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Crash")
    assert _code(excinfo) == (grpc.StatusCode.UNKNOWN, "RuntimeError: a bug")
    assert running.call("/test.Svc/Echo", b"again") == b"echo:again"


def test_an_unknown_method_is_unimplemented(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Nope")
    assert _code(excinfo)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_larger_than_the_flow_control_windows(running: Running) -> None:
    # 40 messages of 200 KB: 8 MB, far over HTTP/2's initial 64 KiB windows
    messages = running.stream("/test.Svc/Chunks", b"40x200000")
    assert [len(m) for m in messages] == [200000] * 40
    assert all(m == bytes([i % 251]) * 200000 for i, m in enumerate(messages))
    assert running.stream("/test.Svc/Chunks", b"0x1") == []


def test_messages_over_the_limit_are_refused_and_the_server_serves_on(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Echo", bytes(2 << 20))
    assert _code(excinfo)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as excinfo:
        running.stream("/test.Svc/Chunks", b"1x2000000")  # a response over the limit
    assert _code(excinfo)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.call("/test.Svc/Echo", bytes(1000)) == b"echo:" + bytes(1000)


def test_calls_run_in_at_most_max_workers_threads(running: Running, handlers: Handlers) -> None:
    threads = [threading.Thread(target=running.call, args=("/test.Svc/Slow", b"0.3")) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert handlers.most_active == 2


def test_a_client_gone_mid_call_leaves_the_server_serving(running: Running, handlers: Handlers) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        running.call("/test.Svc/Slow", b"2", timeout=0.3)
    assert _code(excinfo)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # not HTTP/2 at all
        raw.connect(running.address)
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        raw.settimeout(10)
        while raw.recv(4096):
            pass  # the server closes the connection
    assert running.call("/test.Svc/Echo", b"ok") == b"echo:ok"


def test_shutdown_answers_the_calls_in_flight_and_refuses_new_ones(running: Running,
                                                                   handlers: Handlers) -> None:
    results: list[bytes | BaseException] = []
    with grpc.insecure_channel("unix:" + running.address) as channel:
        channel.unary_unary("/test.Svc/Echo")(b"", timeout=10)  # connected
        slow = threading.Thread(target=lambda: results.append(
            channel.unary_unary("/test.Svc/Slow")(b"1", timeout=30)))
        slow.start()
        deadline = time.monotonic() + 10
        while handlers.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        closing = threading.Thread(target=running.close, args=(10,))
        closing.start()
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as excinfo:
            channel.unary_unary("/test.Svc/Echo")(b"late", timeout=10)
        assert _code(excinfo)[0] == grpc.StatusCode.UNAVAILABLE
        slow.join(30)
        closing.join(30)
    assert results == [b"done"]


def test_every_call_is_observed_with_its_status(running: Running) -> None:
    running.call("/test.Svc/Echo")
    with pytest.raises(grpc.RpcError):
        running.call("/test.Svc/Fail", b"x")
    with pytest.raises(grpc.RpcError):
        running.call("/test.Svc/Nope")  # no method: nothing to observe
    assert running.observed == [("Echo", rpc.StatusCode.OK), ("Fail", rpc.StatusCode.NOT_FOUND)]


class _OnceOutOfDescriptors(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose first accept fails as under EMFILE, then accepts as ``inner`` does."""

    def __init__(self, inner: trio.SocketListener) -> None:
        self.inner = inner
        self.failed = False

    async def accept(self) -> trio.abc.Stream:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_running_out_of_descriptors_does_not_stop_the_server(tmp_path: Path) -> None:
    address = str(tmp_path / "rpc.sock")
    echo = rpc.Method("Echo", bytes, lambda request, context: b"echo:" + request, encode=bytes)
    server = rpc.Server({"/test.Svc/Echo": echo})
    answers: list[bytes] = []

    async def main() -> None:
        listener = _OnceOutOfDescriptors(_listener(address))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            client = Running(address, server, None)
            answers.append(await trio.to_thread.run_sync(client.call, "/test.Svc/Echo", b"x"))
            assert listener.failed
            await server.aclose(grace=1)

    trio.run(main)
    assert answers == [b"echo:x"]


def _raw_call(address: str, headers: list[tuple[str, str]], body: bytes) -> dict[str, str]:
    """One request sent with h2's client, any headers and body; the response's headers and
    trailers merged (raises if the server breaks the connection instead of answering)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
                                      *headers])
        conn.send_data(stream_id, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        answer: dict[str, str] = {}
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the connection without answering"
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answer.update((str(k), str(v)) for k, v in event.headers)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded):
                    return answer
            sock.sendall(conn.data_to_send())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from(["/test.Svc/Echo", "/test.Svc/Proto", "/test.Svc/Chunks", "/test.Svc/Nope", "/",
                              "x"]),
       content_type=st.sampled_from(["application/grpc", "application/grpc+proto", "text/plain"]),
       encoding=st.sampled_from([None, "identity", "gzip"]),
       body=st.one_of(st.binary(max_size=64),
                      st.binary(max_size=40).map(lambda m: b"\x00" + len(m).to_bytes(4, "big") + m),
                      st.tuples(st.integers(0, 1), st.integers(0, 1 << 32 - 1), st.binary(max_size=20)).map(
                          lambda t: bytes([t[0]]) + t[1].to_bytes(4, "big") + t[2])))
def test_fuzz_any_request_gets_a_status_and_the_server_serves_on(
        running: Running, path: str, content_type: str, encoding: str | None, body: bytes) -> None:
    headers = [(":path", path), ("content-type", content_type), ("te", "trailers")]
    if encoding is not None:
        headers.append(("grpc-encoding", encoding))
    answer = _raw_call(running.address, headers, body)
    assert answer[":status"] == "200"
    assert int(answer["grpc-status"]) in {c.value for c in rpc.StatusCode}
    assert running.call("/test.Svc/Echo", b"still") == b"echo:still"
