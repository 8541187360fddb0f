"""The Prometheus endpoint of a live lazysnapd serving lazy layers: parsed with
prometheus_client's own parser, and its counters move when files are read."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import Served

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _scrape(address: str) -> Samples:
    resp = httpx.get(f"http://{address}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    documented = DOC.read_text()
    for family in text_string_to_metric_families(resp.text):
        assert family.name.startswith("lazysnap_"), family.name
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exposed}`" in documented, f"{exposed} is not in docs/metrics.md"
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _sum(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def test_metrics_count_reads_fetches_and_calls(served: Served) -> None:
    status = served.snapctl_json("status", "--address", str(served.snapd.address))
    address = status["daemon"]["sockets"]["metrics"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    digest = served.esgz.layer_digests[1]
    layer = {"layer": digest, "ref": served.layer(digest)["ref"]}

    before = _scrape(address)
    assert _value(before, "lazysnap_layers_served") == 3
    assert _value(before, "lazysnap_cache_max_bytes") == 10 << 30
    assert _value(before, "lazysnap_layer_mount_duration_seconds_count", result="ok") >= 3
    # a remote layer's Prepare answers ALREADY_EXISTS: containerd then skips its download
    assert _value(before, "lazysnap_grpc_requests_total", method="Prepare", code="ALREADY_EXISTS") >= 3
    assert _value(before, "lazysnap_grpc_request_duration_seconds_count", method="Prepare") >= 3

    mount = Path(served.layer(digest)["mountpoints"][0])
    data = (mount / "data/big.bin").read_bytes()
    assert len(data) == served.image.expected["data/big.bin"].size

    after = _scrape(address)
    for name in ("lazysnap_layer_fetched_bytes_total", "lazysnap_layer_served_bytes_total",
                 "lazysnap_layer_reads_total", "lazysnap_layer_cached_bytes"):
        assert _value(after, name, **layer) > _value(before, name, **layer), name
    assert _value(after, "lazysnap_layer_served_bytes_total", **layer) >= len(data)
    assert _value(after, "lazysnap_served_bytes_total") > _value(before, "lazysnap_served_bytes_total")
    assert _value(after, "lazysnap_fetched_bytes_total") > _value(before, "lazysnap_fetched_bytes_total")
    assert _value(after, "lazysnap_cache_stored_total") > _value(before, "lazysnap_cache_stored_total")
    assert _value(after, "lazysnap_fuse_operations_total", op="read") > \
        _value(before, "lazysnap_fuse_operations_total", op="read")
    assert _value(after, "lazysnap_fuse_operation_seconds_total", op="read") > \
        _value(before, "lazysnap_fuse_operation_seconds_total", op="read")
    assert _value(after, "lazysnap_registry_requests_total", status="206") > \
        _value(before, "lazysnap_registry_requests_total", status="206")
    assert _value(after, "lazysnap_fetch_requests_total", priority="on_demand") > \
        _value(before, "lazysnap_fetch_requests_total", priority="on_demand")
    assert _value(after, "lazysnap_fetch_errors_total", kind="integrity") == 0

    # a second read of the same bytes comes from the kernel's page cache or the chunk cache,
    # never from the registry
    (mount / "data/big.bin").read_bytes()
    again = _scrape(address)
    assert _value(again, "lazysnap_fetched_bytes_total") == _value(after, "lazysnap_fetched_bytes_total")

    assert httpx.get(f"http://{address}/other", timeout=30).status_code == 404

    # released layers take their per-layer series along, but the totals never go backwards
    served.containerd.ctr("image", "rm", "--sync", served.esgz.ref)
    gone = _scrape(address)
    assert _value(gone, "lazysnap_layers_served") == 0
    assert _sum(gone, "lazysnap_layer_fetched_bytes_total") == 0
    for name in ("lazysnap_fetched_bytes_total", "lazysnap_served_bytes_total",
                 "lazysnap_chunks_fetched_total"):
        assert _value(gone, name) == _value(again, name) > 0, name
    assert _value(gone, "lazysnap_layer_unmounts_total", result="ok") >= 3
