"""RegistrySource against a real docker-registry: ranges, multi-range, fallbacks, redirects, retries."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sourcekit import REPO, SMALL, Blobs, open_factory, run

from fusefs.errors import BlobNotFound, SourceError, TransientSourceError
from fusefs.sources.registry import RegistrySource
from fusefs.spec import LayerSpec
from tests.harness.faultproxy import FaultProxy


def random_ranges(rng: random.Random, size: int, n: int, max_len: int = 20000) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        offset = rng.randint(0, size - length)
        out.append((offset, length))
    return out


@asynccontextmanager
async def open_source(host: str, digest: str, tmp: Path, size: int | None = None,
                      **cfg: object) -> AsyncIterator[RegistrySource]:
    """A source for ``digest`` in ``host``'s test repository; its factory is closed on exit."""
    async with open_factory(tmp, **cfg) as factory:
        yield await factory.open(LayerSpec(ref=f"{host}/{REPO}:v1", digest=digest, size=size))


def blob_requests(proxy: FaultProxy) -> list[str | None]:
    return [r.range for r in proxy.requests() if r.is_blob and r.method == "GET"]


def test_random_ranges_and_multirange_match_the_blob(anon_registry: Blobs, proxy: FaultProxy,
                                                     tmp_path: Path) -> None:
    blob = anon_registry.large
    rng = random.Random(7)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path,
                               coalesce_gap=0) as source:
            assert await source.size() == len(blob)  # no size in the spec: HEAD
            for _ in range(5):
                ranges = random_ranges(rng, len(blob), rng.randint(1, 12))
                got = await source.read_ranges(ranges)
                assert got == [blob[o:o + n] for o, n in ranges]
            edge = [(0, 1), (len(blob) - 1, 1), (len(blob) - 5000, 5000)]
            assert await source.read_ranges(edge) == [blob[o:o + n] for o, n in edge]
            assert not source.statistics().single_range_fallbacks

    run(body)
    multi = [r for r in blob_requests(proxy) if r and "," in r]
    assert multi, "no multi-range request was sent"


def test_nearby_ranges_are_coalesced_into_one_request(anon_registry: Blobs, proxy: FaultProxy,
                                                      tmp_path: Path) -> None:
    blob = anon_registry.small
    ranges = [(1000, 100), (1200, 50), (5000, 10), (200000, 300)]

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=len(blob), coalesce_gap=8192) as source:
            assert await source.read_ranges(ranges) == [blob[o:o + n] for o, n in ranges]
            # Plain HTTP was learnt on the first request (loopback fallback): one request per read.
            before = source.statistics().requests
            assert await source.read_ranges(ranges[:1]) == [blob[1000:1100]]
            assert source.statistics().requests == before + 1

    run(body)
    assert blob_requests(proxy) == ["bytes=1000-5009,200000-200299", "bytes=1000-1099"]
    # Both went over one kept-alive connection.
    assert len({r.client_port for r in proxy.requests() if r.is_blob}) == 1


@pytest.mark.parametrize("which", ["small", "large"])
def test_server_without_range_support(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path,
                                      which: str) -> None:
    blob = anon_registry.small if which == "small" else anon_registry.large
    digest = anon_registry.small_digest if which == "small" else anon_registry.large_digest
    proxy.strip_range()
    ranges = random_ranges(random.Random(3), len(blob), 6, 4000)

    async def body() -> None:
        async with open_source(proxy.host, digest, tmp_path, size=len(blob), coalesce_gap=0) as source:
            assert await source.read_ranges(ranges) == [blob[o:o + n] for o, n in ranges]
            if which == "large":
                assert source.statistics().single_range_fallbacks >= 1

    run(body)
    gets = [r for r in proxy.requests() if r.is_blob and r.method == "GET"]
    assert all(r.status == 200 for r in gets)
    if which == "large":
        # The first (multi-range) answer was abandoned, then one request per range, each cut short
        # once its range had arrived: never the whole 3 MiB blob per request.
        assert len(gets) == 1 + len(ranges)
        assert all(r.bytes <= len(blob) for r in gets)


def test_server_ignoring_extra_ranges(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    blob = anon_registry.large
    proxy.first_range_only()
    ranges = [(10, 100), (500000, 100), (2000000, 70000)]

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path,
                               size=len(blob), coalesce_gap=0) as source:
            assert await source.read_ranges(ranges) == [blob[o:o + n] for o, n in ranges]
            assert await source.read_ranges(ranges[1:]) == [blob[o:o + n] for o, n in ranges[1:]]

    run(body)
    assert blob_requests(proxy) == ["bytes=10-109,500000-500099,2000000-2069999",
                                    "bytes=500000-500099", "bytes=2000000-2069999",
                                    "bytes=500000-500099", "bytes=2000000-2069999"]


def test_expiring_redirect_target_is_resolved_again(anon_registry: Blobs, proxy: FaultProxy,
                                                    tmp_path: Path) -> None:
    blob = anon_registry.large
    proxy.redirect_blobs(uses=3)
    rng = random.Random(11)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path,
                               size=len(blob), max_ranges_per_request=1) as source:
            for _ in range(10):
                (off, n), = random_ranges(rng, len(blob), 1)
                assert await source.read_ranges([(off, n)]) == [blob[off:off + n]]
            assert source.statistics().redirects_resolved == 3

    run(body)
    recs = [r for r in proxy.requests() if r.is_blob and r.method == "GET"]
    registry_gets = [r for r in recs if r.path.startswith("/v2/")]
    presigned = [r for r in recs if r.path.startswith("/_presigned/")]
    # 10 reads: each redirect target serves 3, so 4 resolutions; 3 of them after a 403.
    assert len(registry_gets) == 4 and all(r.status == 307 for r in registry_gets)
    assert [r.status for r in presigned].count(403) == 3
    assert [r.status for r in presigned].count(206) == 10


def test_retries_recover_from_bursts(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    blob = anon_registry.small

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=len(blob), retries=4) as source:
            proxy.fail_next(3, status=500)
            assert await source.read_ranges([(100, 1000)]) == [blob[100:1100]]
            proxy.fail_next(2, status=429, retry_after=0)
            assert await source.read_ranges([(5000, 10)]) == [blob[5000:5010]]
            proxy.drop_next(1)
            assert await source.read_ranges([(0, 200000)]) == [blob[:200000]]
            assert source.statistics().retries == 6

    run(body)
    statuses = [r.status for r in proxy.requests() if r.is_blob]
    assert statuses == [500, 500, 500, 206, 429, 429, 206, 206, 206]


def test_persistent_failure_is_transient_error(anon_registry: Blobs, proxy: FaultProxy,
                                               tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=SMALL, retries=3) as source:
            proxy.fail_next(100, status=503)
            with pytest.raises(TransientSourceError, match=r"giving up after 3 attempts.*503"):
                await source.read_ranges([(0, 10)])

    run(body)
    assert len([r for r in proxy.requests() if r.is_blob]) == 3


def test_missing_blob_is_not_found(anon_registry: Blobs, tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(anon_registry.host, "sha256:" + "0" * 64, tmp_path) as source:
            with pytest.raises(BlobNotFound):
                await source.read_ranges([(0, 10)])
            with pytest.raises(BlobNotFound):
                await source.size()

    run(body)


def test_short_body_is_source_error(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=SMALL) as source:
            proxy.truncate_next(100, drop_bytes=7)
            with pytest.raises(SourceError, match="short body") as info:
                await source.read_ranges([(0, 5000)])
            assert not isinstance(info.value, TransientSourceError)

    run(body)


def test_flipped_byte_reaches_the_caller_unverified(anon_registry: Blobs, proxy: FaultProxy,
                                                    tmp_path: Path) -> None:
    """The source does not verify (the caller does); the proxy's flip must show up exactly once."""
    blob = anon_registry.small
    proxy.flip_byte(anon_registry.small_digest, 1234)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=len(blob), coalesce_gap=0) as source:
            a, b = await source.read_ranges([(1000, 500), (9000, 10)])
        assert b == blob[9000:9010]
        assert a != blob[1000:1500]
        diff = [i for i in range(500) if a[i] != blob[1000 + i]]
        assert diff == [234] and a[234] == blob[1234] ^ 0xFF

    run(body)


def test_check_is_throttled(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=SMALL, check_interval=3600.0) as source:
            await source.check()
            await source.check()
        async with open_source(proxy.host, "sha256:" + "1" * 64, tmp_path) as source:
            with pytest.raises(BlobNotFound):
                await source.check()

    run(body)
    heads = [r for r in proxy.requests() if r.method == "HEAD"]
    assert [r.status for r in heads] == [200, 404]


def test_untrusted_spec_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with open_factory(tmp_path) as factory:
            for ref, digest in [("127.0.0.1:1/../etc:v1", "sha256:" + "a" * 64),
                                ("127.0.0.1:1/ok:v1", "sha256:../../x"),
                                ("127.0.0.1:1/ok?x=1", "sha256:" + "a" * 64)]:
                with pytest.raises(SourceError):
                    await factory.open(LayerSpec(ref=ref, digest=digest))
            source = await factory.open(LayerSpec(ref="127.0.0.1:1/ok:v1", digest="sha256:" + "a" * 64,
                                                  size=100))
            with pytest.raises(SourceError, match="exceeds blob size"):
                await source.read_ranges([(90, 20)])

    run(body)


def test_read_timeout_is_transient(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.set_delay(1.0)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=SMALL, retries=2, read_timeout=0.3) as source:
            with pytest.raises(TransientSourceError, match="ReadTimeout"):
                await source.read_ranges([(0, 10)])

    run(body)


def test_layer_urls_are_tried_before_the_registry(anon_registry: Blobs, proxy: FaultProxy,
                                                  tmp_path: Path) -> None:
    blob, digest = anon_registry.small, anon_registry.small_digest
    ranges = [(7, 70), (250000, 1000)]
    want = [blob[o:o + n] for o, n in ranges]
    with FaultProxy(anon_registry.host) as cdn:
        url = f"{cdn.url}/v2/{REPO}/blobs/{digest}"

        async def body() -> None:
            async with open_factory(tmp_path) as factory:
                spec = LayerSpec(ref=f"{proxy.host}/{REPO}:v1", digest=digest, size=len(blob),
                                 urls=("ipfs://bafyignored", url))
                source = await factory.open(spec)
                assert await source.read_ranges(ranges) == want
                assert [r.status for r in cdn.requests()] == [206] and blob_requests(proxy) == []
                cdn.fail_next(100, status=404)
                assert await source.read_ranges(ranges) == want
                assert len(blob_requests(proxy)) == 1

        run(body)


def test_many_batches_are_fetched_concurrently_and_correctly(anon_registry: Blobs, proxy: FaultProxy,
                                                             tmp_path: Path) -> None:
    blob = anon_registry.large
    ranges = [(i * 300000, 1000 + i) for i in range(9)]
    proxy.set_delay(0.2)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path,
                               size=len(blob), coalesce_gap=0, max_ranges_per_request=2) as source:
            assert await source.read_ranges(ranges) == [blob[o:o + n] for o, n in ranges]

    run(body)
    assert len(blob_requests(proxy)) == 5
    # Concurrency is visible in the proxy: some requests were in flight together.
    assert max(r.concurrent for r in proxy.requests() if r.is_blob) > 1


def test_whole_request_deadline(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.set_delay(1.0)

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               size=SMALL, retries=1, request_timeout=0.3) as source:
            with pytest.raises(TransientSourceError, match=r"took longer than 0\.3s"):
                await source.read_ranges([(0, 10)])

    run(body)


def test_size_disagreeing_with_the_server_is_refused(anon_registry: Blobs, tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(anon_registry.host, anon_registry.small_digest, tmp_path,
                               size=SMALL + 1) as source:
            with pytest.raises(SourceError, match=f"has {SMALL} bytes, expected {SMALL + 1}"):
                await source.read_ranges([(0, 10)])

    run(body)


@pytest.mark.parametrize("length", [1, 5000, 10 << 20])
def test_tail_with_unknown_size_is_one_suffix_request(anon_registry: Blobs, proxy: FaultProxy,
                                                      tmp_path: Path, length: int) -> None:
    blob = anon_registry.large

    async def body() -> None:
        async with open_source(proxy.host, anon_registry.large_digest, tmp_path) as source:
            assert await source.read_tail(length) == blob[-length:]
            assert await source.size() == len(blob)  # learnt from Content-Range: no HEAD
            assert await source.read_tail(7) == blob[-7:]  # size known: a plain range

    run(body)
    assert [r.method for r in proxy.requests() if r.is_blob] == ["GET", "GET"]
    first, second = blob_requests(proxy)
    assert first == f"bytes=-{length}"
    assert second == f"bytes={len(blob) - 7}-{len(blob) - 1}"


@pytest.mark.parametrize("which", ["small", "large"])
def test_tail_from_a_server_ignoring_range(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path,
                                           which: str) -> None:
    blob = anon_registry.small if which == "small" else anon_registry.large
    digest = anon_registry.small_digest if which == "small" else anon_registry.large_digest
    proxy.strip_range()

    async def body() -> None:
        async with open_source(proxy.host, digest, tmp_path) as source:
            assert await source.read_tail(3000) == blob[-3000:]
            assert await source.size() == len(blob)

    run(body)


def test_a_read_counts_as_a_check(anon_registry: Blobs, proxy: FaultProxy, tmp_path: Path) -> None:
    async def body() -> None:
        async with open_source(proxy.host, anon_registry.small_digest, tmp_path,
                               check_interval=3600.0) as source:
            await source.read_tail(100)
            await source.check()  # the read just reached the blob: no HEAD

    run(body)
    assert [r.method for r in proxy.requests() if r.is_blob] == ["GET"]
