"""The harness checked against parts that exist today: containerd's built-in overlayfs snapshotter,
the registry's access log, the Range-logging proxy, basic auth, eStargz conversion and CRI start.

If these pass and test_pull_run fails, the fault is in lazysnap, not in the stack around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import httpx
import pytest

from tests.harness import BuiltImage, Containerd, CriOptions, Registry, convert_estargz, short_tempdir
from tests.harness.cri import CriClient
from tests.harness.flows import (
    check_xattr_and_copy_up,
    pull_and_check_snapshots,
    remove_image_and_gc,
    run_and_compare_tree,
)
from tests.harness.image import build_image
from tests.harness.procs import mounts_below, remove_tree

pytestmark = pytest.mark.e2e


def test_flow_with_builtin_overlayfs(make_containerd: Callable[..., Containerd],
                                     test_image: BuiltImage) -> None:
    ctd = make_containerd()
    pull_and_check_snapshots(ctd, test_image, "overlayfs")
    run_and_compare_tree(ctd, test_image, "overlayfs")
    check_xattr_and_copy_up(ctd, test_image, "overlayfs")
    remove_image_and_gc(ctd, test_image, "overlayfs")


def test_access_log_counts_every_blob_byte(make_containerd: Callable[..., Containerd],
                                           registry: Registry, test_image: BuiltImage) -> None:
    ctd = make_containerd()
    mark = registry.log_mark()
    ctd.pull(test_image.ref, "overlayfs")
    # the registry logs a request just after its last byte: wait for the pull's last blob
    min_entries = len(test_image.layer_digests) + 2  # layers, config, manifest
    served = registry.blob_bytes(since=mark, min_count=min_entries)
    for digest, size in zip(test_image.layer_digests, test_image.layer_sizes, strict=True):
        assert served[digest] == size
    assert served[test_image.config_digest] > 0
    methods = {(e.method, e.status) for e in registry.access_log_entries(since=mark)}
    assert ("GET", 200) in methods


def test_range_proxy_logs_range_header() -> None:
    work = short_tempdir("lzs-rp-")
    try:
        with Registry(work / "reg", log_ranges=True) as reg:
            img = build_image(work / "img", reg, big_file_size=64 << 10)
            assert reg.host != reg.direct_host
            digest = img.layer_digests[1]
            mark = reg.log_mark()
            r = httpx.get(f"http://{reg.host}/v2/{img.name}/blobs/{digest}",
                          headers={"Range": "bytes=10-109"}, timeout=10)
            assert r.status_code == 206 and len(r.content) == 100
            blob = (img.layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
            assert r.content == blob[10:110]
            entries = reg.access_log_entries(since=mark, min_count=1)
            assert [(e.method, e.status, e.bytes, e.range, e.blob_digest) for e in entries] == [
                ("GET", 206, 100, "bytes=10-109", digest)]
            assert reg.blob_bytes(since=mark) == {digest: 100}
    finally:
        remove_tree(work)


def test_registry_basic_auth() -> None:
    work = short_tempdir("lzs-auth-")
    try:
        with Registry(work / "reg", htpasswd=("tester", "s3cret")) as reg:
            assert httpx.get(f"http://{reg.host}/v2/", timeout=5).status_code == 401
            ok = httpx.get(f"http://{reg.host}/v2/", headers=reg.auth_header(), timeout=5)
            assert ok.status_code == 200
            img = build_image(work / "img", reg, big_file_size=1024)
            r = httpx.get(f"http://{reg.host}/v2/{img.name}/manifests/{img.tag}",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json",
                                   **reg.auth_header()}, timeout=5)
            assert "sha256:" + hashlib.sha256(r.content).hexdigest() == img.manifest_digest
    finally:
        remove_tree(work)


def test_convert_estargz(make_containerd: Callable[..., Containerd], registry: Registry,
                         test_image: BuiltImage) -> None:
    ctd = make_containerd()
    dst = f"{registry.host}/{test_image.name}:esgz"
    esgz = convert_estargz(ctd, test_image.ref, dst)
    assert len(esgz.layer_digests) == len(test_image.layer_digests)
    assert set(esgz.layer_digests).isdisjoint(test_image.layer_digests)
    assert all(t.startswith("sha256:") for t in esgz.toc_digests)
    # the eStargz image still runs as a normal image through overlayfs
    ctd.pull(dst, "overlayfs")
    assert ctd.run(dst, ["cat", "/data/layer3.txt"], "overlayfs") == "hello from layer 3\n"


def test_cri_enabled_containerd_serves_image_service(make_containerd: Callable[..., Containerd],
                                                     test_image: BuiltImage) -> None:
    ctd = make_containerd(cri=CriOptions(snapshotter="overlayfs"))
    plugins = ctd.ctr("plugins", "ls").stdout
    rows = [line.split() for line in plugins.splitlines()]
    assert [r[-1] for r in rows if r[:2] == ["io.containerd.grpc.v1", "cri"]] == ["ok"], plugins
    with CriClient(ctd.address) as cri:
        assert cri.list_images() == []
        image_ref = cri.pull_image(test_image.ref)
        assert image_ref.startswith("sha256:")
        assert test_image.ref in cri.list_images()


def test_stop_kills_tasks_and_unmounts(make_containerd: Callable[..., Containerd],
                                       test_image: BuiltImage) -> None:
    ctd = make_containerd()
    ctd.pull(test_image.ref, "overlayfs")
    ctd.ctr("run", "-d", "--snapshotter", "overlayfs", test_image.ref, "left-running", "sleep", "600")
    assert ctd.shim_pids() and mounts_below(ctd.state)
    ctd.stop()
    assert ctd.shim_pids() == []
    assert mounts_below(ctd.state) == [] and mounts_below(ctd.root) == []
