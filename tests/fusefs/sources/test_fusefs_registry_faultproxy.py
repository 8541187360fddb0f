"""The FaultProxy test harness itself: uploads pass through, records and faults are what it says."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from sourcekit import Blobs, digest_of

from tests.harness.faultproxy import FaultProxy


def test_chunked_upload_and_records(anon_registry: Blobs, proxy: FaultProxy) -> None:
    data = bytes(range(256)) * 400
    digest = digest_of(data)

    def chunks() -> Iterator[bytes]:
        yield data[:30000]
        yield data[30000:]

    with httpx.Client(base_url=proxy.url) as c:
        loc = c.post("/v2/up/load/blobs/uploads/").headers["location"]
        r = c.patch(loc, content=chunks(), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202
        loc = r.headers["location"]
        assert c.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}").status_code == 201
        proxy.fail_next(1, status=429, retry_after=7)
        r = c.get(f"/v2/up/load/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.headers["retry-after"]) == (429, "7")
        r = c.get(f"/v2/up/load/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.content) == (206, data[10:20])
        proxy.strip_range()
        r = c.get(f"/v2/up/load/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert (r.status_code, r.content) == (200, data)
    last = proxy.requests()[-3:]
    assert [(x.method, x.range, x.status) for x in last] == [("GET", "bytes=10-19", 429),
                                                             ("GET", "bytes=10-19", 206),
                                                             ("GET", "bytes=10-19", 200)]
    assert [x.bytes for x in last[1:]] == [10, len(data)] and all(x.is_blob for x in last)
