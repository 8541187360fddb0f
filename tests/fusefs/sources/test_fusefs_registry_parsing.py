"""Pure parsing pieces of the registry source: references, challenges, ranges, multipart bodies."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.errors import SourceError
from fusefs.sources.auth import parse_challenges
from fusefs.sources.multirange import (
    Piece,
    coalesce,
    cut,
    multipart_boundary,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    suffix,
)
from fusefs.sources.reference import ImageRef, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("ref", "want"), [
    ("busybox", ImageRef("docker.io", "library/busybox")),
    ("busybox:1.36", ImageRef("docker.io", "library/busybox", "1.36")),
    ("user/app", ImageRef("docker.io", "user/app")),
    ("index.docker.io/library/ubuntu:22.04", ImageRef("docker.io", "library/ubuntu", "22.04")),
    ("127.0.0.1:5000/a/b:v1", ImageRef("127.0.0.1:5000", "a/b", "v1")),
    ("localhost/app", ImageRef("localhost", "app")),
    (f"ghcr.io/o/r@{D}", ImageRef("ghcr.io", "o/r", None, D)),
    (f"reg.example:443/o/r:t@{D}", ImageRef("reg.example:443", "o/r", "t", D)),
    ("[::1]:5000/app:v", ImageRef("[::1]:5000", "app", "v")),
])
def test_references(ref: str, want: ImageRef) -> None:
    assert parse_reference(ref) == want


def test_docker_hub_api_host() -> None:
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize("ref", ["", "h.io/UPPER", "host:5000/../x", "host:5000/a//b", "a/b?x=1", "a/b#f",
                                 "a@sha256:12", "a/b:" + "t" * 200, "h.io/a b", "x" * 5000])
def test_bad_references(ref: str) -> None:
    with pytest.raises(SourceError):
        parse_reference(ref)


def test_challenges() -> None:
    (c,) = parse_challenges('Bearer realm="https://auth.example/token",service="reg.example",'
                            'scope="repository:a/b:pull,push",error="invalid_token"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg.example",
                        "scope": "repository:a/b:pull,push", "error": "invalid_token"}
    basic, bearer = parse_challenges('Basic realm="Registry Realm", Bearer realm="https://x/t",service=s')
    assert (basic.scheme, basic.params) == ("basic", {"realm": "Registry Realm"})
    assert (bearer.scheme, bearer.params) == ("bearer", {"realm": "https://x/t", "service": "s"})
    assert parse_challenges("Negotiate")[0].scheme == "negotiate"


def test_coalesce_and_header() -> None:
    spans = coalesce([(100, 10), (0, 10), (15, 5), (5, 20), (1000, 1)], gap=0, max_bytes=1 << 20)
    assert [(s.start, s.end) for s in spans] == [(0, 25), (100, 110), (1000, 1001)]
    assert range_header(spans) == "bytes=0-24,100-109,1000-1000"
    assert len(coalesce([(0, 10), (20, 10)], gap=100, max_bytes=15)) == 2
    assert len(coalesce([(0, 10), (20, 10)], gap=100, max_bytes=30)) == 1


def test_suffix_span() -> None:
    assert range_header([suffix(4096)]) == "bytes=-4096"
    assert suffix(10).length == 10 and suffix(10).is_suffix
    with pytest.raises(SourceError):
        suffix(0)


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 500)), min_size=1, max_size=30),
       st.integers(0, 2000), st.integers(1, 4000))
def test_coalesced_spans_cover_every_range(ranges: list[tuple[int, int]], gap: int, max_bytes: int) -> None:
    blob = bytes(i % 251 for i in range(6000))
    spans = coalesce(ranges, gap, max_bytes)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    pieces = [Piece(s.start, blob[s.start:s.end]) for s in spans]
    assert cut(ranges, pieces) == [blob[o:o + n] for o, n in ranges]


def test_content_range() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    for bad in ["bytes 9-0/100", "bytes 0-100/100", "items 0-1/2", "bytes -1/2", "bytes 0-1/2, 4-5/9"]:
        with pytest.raises(SourceError):
            parse_content_range(bad)


def _multipart(boundary: bytes, parts: list[tuple[int, bytes]], total: int) -> bytes:
    out = b"preamble\r\n"
    for start, data in parts:
        out += (b"--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Range: bytes {start}-{start + len(data) - 1}/{total}\r\n\r\n".encode()
                + data + b"\r\n")
    return out + b"--" + boundary + b"--\r\n"


def test_multipart_with_boundary_inside_the_data() -> None:
    b = b"3d6b6a416f9b5"
    evil = b"xx\r\n--" + b + b"\r\nContent-Range: bytes 0-1/9\r\n\r\nzz"
    body = _multipart(b, [(10, evil), (500, b"tail")], 1000)
    assert multipart_boundary(f'multipart/byteranges; boundary="{b.decode()}"') == b
    assert parse_multipart_byteranges(body, b) == [Piece(10, evil), Piece(500, b"tail")]


@pytest.mark.parametrize("mangle", [
    lambda body: body[:-40],                                     # truncated part
    lambda body: body.replace(b"Content-Range", b"X-Range"),     # part without Content-Range
    lambda body: body.replace(b"tail\r\n--", b"tailEXTRA\r\n--"),  # data longer than declared
    lambda body: b"no boundary at all",
])
def test_broken_multipart_is_an_error(mangle: object) -> None:
    b = b"BOUNDARY"
    body = _multipart(b, [(0, b"head"), (100, b"tail")], 200)
    with pytest.raises(SourceError):
        parse_multipart_byteranges(mangle(body), b)  # type: ignore[operator]


def test_other_content_types_are_not_multipart() -> None:
    assert multipart_boundary("application/octet-stream") is None
    with pytest.raises(SourceError):
        multipart_boundary("multipart/byteranges")


@pytest.mark.parametrize("known_size", [True, False])
def test_response_body_is_held_once(known_size: bool) -> None:
    import tracemalloc

    from fusefs.sources.registry import _Body

    pieces = [bytes([i]) * 65536 for i in range(64)]  # 4 MiB as h11 hands it over
    size = sum(map(len, pieces))
    tracemalloc.start()
    try:
        body = _Body(size if known_size else 0)
        for piece in pieces:
            body.write(piece)
        value = body.value()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == b"".join(pieces)
    assert peak < 1.3 * size  # not the buffer plus a copy of it
    assert _Body(0).value() == b"" and _Body(3).value() == b"\0\0\0"
