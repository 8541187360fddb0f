"""A tiny gRPC server wired the way lazysnapd uses ``snapshotter.systemd``, run by the tests.

Usage: ``python activated_echo.py ADDRESS``. It takes a socket-activated listener when systemd
(or a test playing systemd) passed one, else binds ADDRESS itself; serves
``/lazysnap.test.Echo/Ping``, which answers ``pong <pid> <activated> <request>``; sends READY=1;
stops cleanly on SIGTERM (STOPPING=1, exit 0).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures

import grpc

from snapshotter import systemd


def main(address: str) -> int:
    listener = systemd.pick_listener(systemd.listen_fds_with_names(), address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    endpoint: systemd.GrpcEndpoint | None = None

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        activated = "activated" if endpoint is not None and endpoint.activated else "bound"
        return f"pong {os.getpid()} {activated} ".encode() + request

    handler = grpc.method_handlers_generic_handler(
        "lazysnap.test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server.add_generic_rpc_handlers((handler,))
    endpoint = systemd.bind_grpc_server(server, address, listener=listener)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    systemd.notify_ready(f"serving on {address}")
    stop.wait()
    systemd.notify_stopping()
    server.stop(grace=2).wait()
    endpoint.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
