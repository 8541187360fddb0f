"""RegistrySource.stream_ranges against a real docker-registry: a span's body is handed over as it
arrives, a retry after a body cut short hands it over again from the start, and ranges in several
spans come whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from sourcekit import Blobs, run
from test_fusefs_registry_source import blob_requests, open_source

from fusefs.errors import SourceError
from fusefs.sources.base import stream_ranges
from fusefs.sources.file import FileSource
from tests.harness.faultproxy import FaultProxy


class Collector:
    """A sink that keeps every piece, and the bytes of one range as a careful caller would: each
    blob byte once, from whichever piece brought it first."""

    def __init__(self, offset: int, length: int) -> None:
        self.pieces: list[tuple[int, int]] = []
        self.start, self.end = offset, offset + length
        self.data = bytearray()

    async def __call__(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, len(data)))
        have = self.start + len(self.data)
        if offset <= have < offset + len(data):
            self.data += data[have - offset:min(len(data), self.end - offset)]


def test_one_span_comes_in_pieces_in_blob_order(anon_registry: Blobs, proxy: FaultProxy,
                                                tmp_path: Path) -> None:
    blob = anon_registry.large
    sink = Collector(1000, 2_000_000)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path, size=len(blob)) as source:
            await stream_ranges(source, [(1000, 2_000_000)], sink)

    run(body)
    assert bytes(sink.data) == blob[1000:2_001_000]
    assert len(sink.pieces) > 1, "the body was handed over in one piece, not as it arrived"
    ends = [o + n for o, n in sink.pieces]
    assert [o for o, _ in sink.pieces] == [1000, *ends[:-1]]  # contiguous, in blob order
    assert blob_requests(proxy) == ["bytes=1000-2000999"]


@pytest.mark.parametrize("cuts", [1, 2], ids=["retried", "given-up"])
def test_a_body_cut_short_is_handed_over_again_from_its_start(anon_registry: Blobs, proxy: FaultProxy,
                                                               tmp_path: Path, cuts: int) -> None:
    blob = anon_registry.large
    sink = Collector(0, len(blob))

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path, size=len(blob),
                               retries=2, backoff_base=0.0) as source:
            proxy.drop_next(cuts)  # headers and half the body, then the connection closes
            if cuts == 1:
                await stream_ranges(source, [(0, len(blob))], sink)
            else:
                with pytest.raises(SourceError):
                    await stream_ranges(source, [(0, len(blob))], sink)
            assert source.statistics().retries == 1

    run(body)
    restarts = [i for i, (o, _) in enumerate(sink.pieces) if o == 0]
    assert len(restarts) == 2, sink.pieces[:5]
    handed = sum(n for _, n in sink.pieces[:restarts[1]])
    assert 0 < handed < len(blob)  # the first attempt's half came through before the retry
    if cuts == 1:
        assert bytes(sink.data) == blob
    else:  # what came before the error stays handed over; the rest never came
        assert 0 < len(sink.data) < len(blob)


def test_ranges_in_several_spans_come_whole_one_per_range(anon_registry: Blobs, proxy: FaultProxy,
                                                          tmp_path: Path) -> None:
    blob = anon_registry.large
    ranges = [(10, 100), (2_000_000, 5000), (3_000_000, 7)]
    got: list[tuple[int, bytes]] = []

    async def sink(offset: int, data: bytes) -> None:
        got.append((offset, data))

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path, size=len(blob),
                               coalesce_gap=0) as source:
            await stream_ranges(source, ranges, sink)

    run(body)
    assert got == [(o, blob[o:o + n]) for o, n in ranges]


def test_a_source_that_does_not_stream_hands_each_range_over_whole(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 64)
    got: list[tuple[int, bytes]] = []

    async def sink(offset: int, data: bytes) -> None:
        got.append((offset, data))

    async def body() -> None:
        await stream_ranges(FileSource(path, "sha256:" + "0" * 64), [(5, 10), (1000, 3)], sink)

    run(body)
    data = path.read_bytes()
    assert got == [(5, data[5:15]), (1000, data[1000:1003])]
