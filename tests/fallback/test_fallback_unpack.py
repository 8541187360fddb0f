"""Layers lazysnap cannot (or must not) serve lazily fall back to a normal unpack, and the image
still runs right (issue "Lazy eStargz layers end to end", must-shows 2 and 3).

Each case pulls through a real containerd into lazysnapd with its layer filesystem on and checks
three things: lazysnapd logged the outcome under its fixed key ``remote-snapshot-prepared`` (with
a reason when it fell back), only the layers that could be served lazily are FUSE-backed, and a
container sees exactly the image's tree.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.estargz.esgz_support import with_toc_entry
from tests.harness import BuiltImage, Containerd, EstargzImage, Lazysnapd, Registry
from tests.harness.daemonlog import REMOTE_PREPARED, daemon_log_mark, fallbacks, remote_prepared
from tests.harness.esgzlayout import toc_extent
from tests.harness.estargz import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from tests.harness.faultproxy import FaultProxy
from tests.harness.flows import check_committed_chain, remove_image_and_gc, run_and_compare_tree
from tests.harness.manifests import push_layer_variant, push_manifest_variant
from tests.harness.mountinfo import mounts_with_types

pytestmark = pytest.mark.e2e


def _rpull(ctd: Containerd, ref: str) -> None:
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)


def _fuse_backed_snapshots(snapd: Lazysnapd) -> int:
    return sum(1 for m in mounts_with_types(snapd.root)
               if m.fstype.startswith("fuse") and m.mountpoint.name == "fs")


def test_plain_gzip_layers_fall_back(lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd],
                                     test_image: BuiltImage) -> None:
    ctd = make_containerd(proxy_socket=lazysnapd.address)
    mark = daemon_log_mark(lazysnapd.log_path)
    _rpull(ctd, test_image.ref)  # stargz labels on every layer, but the blobs are plain tar+gzip
    check_committed_chain(ctd, test_image.diff_ids, "lazysnap")
    outcomes = remote_prepared(lazysnapd.log_path, since=mark)
    assert [r[REMOTE_PREPARED] for r in outcomes] == [False] * len(test_image.layer_digests), outcomes
    assert all(r.get("reason") for r in outcomes), outcomes
    assert _fuse_backed_snapshots(lazysnapd) == 0
    run_and_compare_tree(ctd, test_image, "lazysnap")
    remove_image_and_gc(ctd, test_image, "lazysnap")


def test_wrong_toc_digest_annotation_falls_back(
        lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd], ranged_registry: Registry,
        estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    img, esgz = estargz_image
    lying = "sha256:" + hashlib.sha256(b"not the TOC of this layer").hexdigest()
    ref, _ = push_manifest_variant(ranged_registry.host, img.name, esgz.manifest, "esgz-badtoc",
                                   {1: {TOC_DIGEST_ANNOTATION: lying}})
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[ranged_registry.host])
    mark = daemon_log_mark(lazysnapd.log_path)
    _rpull(ctd, ref)
    check_committed_chain(ctd, esgz.diff_ids, "lazysnap")
    outcomes = {r.get("digest"): r for r in remote_prepared(lazysnapd.log_path, since=mark)}
    assert set(outcomes) == set(esgz.layer_digests), outcomes
    bad = outcomes[esgz.layer_digests[1]]
    assert bad[REMOTE_PREPARED] is False and lying in bad.get("reason", ""), bad
    assert [outcomes[d][REMOTE_PREPARED] for d in esgz.layer_digests] == [True, False, True]
    assert _fuse_backed_snapshots(lazysnapd) == 2
    run_and_compare_tree(ctd, img, "lazysnap", ref=ref)
    remove_image_and_gc(ctd, img, "lazysnap", ref=ref)


def test_toc_that_matches_its_digest_but_does_not_index(
        lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd], ranged_registry: Registry,
        estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    """Prepare answers once a layer's TOC matches the manifest's digest, and the index is built
    after. A TOC that matches but may not be indexed (an entry named ``../escape``, in the top
    layer) is caught then: the container's Prepare fails with the reason, and the image pulled
    again has that layer unpacked and runs."""
    img, esgz = estargz_image
    host, top = ranged_registry.host, len(esgz.layer_digests) - 1
    blob = httpx.get(f"http://{host}/v2/{img.name}/blobs/{esgz.layer_digests[top]}", timeout=30).content
    bad, toc_digest = with_toc_entry(blob, {"name": "../escape", "type": "reg", "size": 0})
    annotations = {TOC_DIGEST_ANNOTATION: toc_digest,
                   UNCOMPRESSED_SIZE_ANNOTATION: str(len(gzip.decompress(bad)))}
    ref = push_layer_variant(host, img.name, esgz.manifest, "esgz-escape", top, bad, annotations)
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[host])
    mark = daemon_log_mark(lazysnapd.log_path)
    _rpull(ctd, ref)
    outcomes = remote_prepared(lazysnapd.log_path, since=mark)
    assert [r[REMOTE_PREPARED] for r in outcomes] == [True] * (top + 1), outcomes
    failed = ctd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, "escape-1", "true", check=False)
    assert failed.returncode != 0
    assert "cannot be served" in failed.stderr and "'../escape'" in failed.stderr, failed.stderr
    ctd.ctr("image", "rm", "--sync", ref)
    assert ctd.snapshots("lazysnap") == []

    mark = daemon_log_mark(lazysnapd.log_path)
    _rpull(ctd, ref)
    outcomes = remote_prepared(lazysnapd.log_path, since=mark)
    assert [r[REMOTE_PREPARED] for r in outcomes] == [True] * top + [False], outcomes
    assert "failed to index before" in outcomes[top]["reason"]
    run_and_compare_tree(ctd, img, "lazysnap", ref=ref)
    remove_image_and_gc(ctd, img, "lazysnap", ref=ref)


@pytest.fixture
def fault_proxy(ranged_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(ranged_registry.direct_host) as proxy:
        yield proxy


@pytest.mark.parametrize("fault", ["blobs-503", "toc-corrupted"])
def test_registry_faults_at_prepare_fall_back(
        lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd], fault_proxy: FaultProxy,
        estargz_image: tuple[BuiltImage, EstargzImage], fault: str) -> None:
    """The image's content is in containerd already; then the registry fails lazysnapd at Prepare:
    every blob request answers 503, or the base layer's TOC arrives with one byte flipped."""
    img, esgz = estargz_image
    ref = f"{fault_proxy.host}/{img.name}:esgz"
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[fault_proxy.host])
    ctd.ctr("image", "pull", "--plain-http", "--all-platforms", ref, timeout=180)  # fetch, no unpack
    if fault == "blobs-503":
        fault_proxy.fail_next(1 << 30, status=503)
        expected = [False] * len(esgz.layer_digests)
    else:
        start, end = toc_extent(fault_proxy.upstream, img.name, esgz.layer_digests[0])
        fault_proxy.flip_byte(esgz.layer_digests[0], (start + end) // 2)
        expected = [False] + [True] * (len(esgz.layer_digests) - 1)
    fault_proxy.clear_requests()
    mark = daemon_log_mark(lazysnapd.log_path)
    _rpull(ctd, ref)
    check_committed_chain(ctd, esgz.diff_ids, "lazysnap")
    outcomes = remote_prepared(lazysnapd.log_path, since=mark)
    assert [r[REMOTE_PREPARED] for r in outcomes] == expected, outcomes
    assert [r.get("digest") for r in outcomes] == esgz.layer_digests
    assert all(r.get("reason") for r in outcomes if r[REMOTE_PREPARED] is False), outcomes
    tried = {r.path.rsplit("/", 1)[-1] for r in fault_proxy.requests() if r.is_blob}
    assert tried >= {d for d, lazy in zip(esgz.layer_digests, expected, strict=True) if not lazy}
    if fault == "blobs-503":
        assert {r.status for r in fault_proxy.requests() if r.is_blob} == {503}
    assert _fuse_backed_snapshots(lazysnapd) == expected.count(True)
    run_and_compare_tree(ctd, img, "lazysnap", ref=ref)
    remove_image_and_gc(ctd, img, "lazysnap", ref=ref)


def test_image_unpacked_for_overlayfs_then_run_with_lazysnap(
        lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd], ranged_registry: Registry,
        estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    img, esgz = estargz_image
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[ranged_registry.host])
    ctd.pull(esgz.ref, "overlayfs")
    mark, log_mark = ranged_registry.log_mark(), daemon_log_mark(lazysnapd.log_path)
    # `ctr run --snapshotter lazysnap` unpacks the image again, for lazysnap, without remote labels
    run_and_compare_tree(ctd, img, "lazysnap", ref=esgz.ref)
    check_committed_chain(ctd, esgz.diff_ids, "lazysnap")
    assert remote_prepared(lazysnapd.log_path, since=log_mark) == []
    assert fallbacks(lazysnapd.log_path, since=log_mark) == []
    assert _fuse_backed_snapshots(lazysnapd) == 0
    layer_gets = [e for e in ranged_registry.access_log_entries(since=mark)
                  if e.method == "GET" and e.blob_digest in esgz.layer_digests]
    assert layer_gets == [], "the layers were in containerd's content store already"
    remove_image_and_gc(ctd, img, "lazysnap", ref=esgz.ref)
