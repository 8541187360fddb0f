"""A tiny gRPC server wired the way lazysnapd uses ``snapshotter.systemd`` and ``snapshotter.rpc``.

Usage: ``python activated_echo.py ADDRESS``. It takes a socket-activated listener when systemd
(or a test playing systemd) passed one, else binds ADDRESS itself; serves
``/lazysnap.test.Echo/Ping``, which answers ``pong <pid> <activated> <request>`` (raw bytes, no
protobuf); sends READY=1; stops cleanly on SIGTERM (STOPPING=1, exit 0).
"""

from __future__ import annotations

import os
import signal
import sys

import trio

from snapshotter import rpc, systemd


def main(address: str) -> int:
    listener = systemd.pick_listener(systemd.listen_fds_with_names(), address)
    activated = "activated" if listener is not None else "bound"

    def ping(request: bytes, context: rpc.Context) -> bytes:
        return f"pong {os.getpid()} {activated} ".encode() + request

    echo = rpc.Method("Ping", bytes, ping, encode=bytes)
    server = rpc.Server({"/lazysnap.test.Echo/Ping": echo}, max_workers=4)

    async def serve() -> None:
        sock = systemd.listen_unix(address, listener=listener)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            systemd.notify_ready(f"serving on {address}")
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            systemd.notify_stopping()
            await server.aclose(grace=2)

    trio.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
