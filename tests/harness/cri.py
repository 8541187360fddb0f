"""A minimal CRI ImageService client (runtime.v1) for tests of containerd's CRI path.

Only what tests need: `list_images()` (repo tags) and `pull_image(ref)` (returns the image id).
The few messages involved are encoded by hand in protobuf wire format, so the test harness needs
neither the cri-api protos nor generated code.

    with CriClient(containerd.address) as cri:
        cri.pull_image("127.0.0.1:PORT/name:tag")   # unpacks into the CRI default snapshotter
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import grpc

__all__ = ["CriClient"]

_SERVICE = "/runtime.v1.ImageService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, bytes | int]]:
    """Decode one message level into (field number, value) pairs; nested messages stay bytes."""
    out: list[tuple[int, bytes | int]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            out.append((number, buf[pos:pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


class CriClient:
    """ImageService calls over containerd's gRPC socket (CRI plugin enabled)."""

    def __init__(self, address: Path, timeout: float = 120.0) -> None:
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout

    def _call(self, method: str, request: bytes) -> bytes:
        call = self._channel.unary_unary(_SERVICE + method, request_serializer=None,
                                         response_deserializer=None)
        response: bytes = call(request, timeout=self.timeout)
        return response

    def list_images(self) -> list[str]:
        """Repo tags of every image CRI knows."""
        tags: list[str] = []
        for number, image in _fields(self._call("ListImages", b"")):
            if number == 1 and isinstance(image, bytes):
                tags += [v.decode() for n, v in _fields(image) if n == 2 and isinstance(v, bytes)]
        return tags

    def pull_image(self, ref: str) -> str:
        """PullImage(ref) with no auth and no sandbox config; returns the image ref (id)."""
        request = _field_bytes(1, _field_bytes(1, ref.encode()))
        for number, value in _fields(self._call("PullImage", request)):
            if number == 1 and isinstance(value, bytes):
                return value.decode()
        raise ValueError("PullImage response without image_ref")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
