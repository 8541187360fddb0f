"""Lazy eStargz pulls end to end: real docker-registry (behind the Range-logging proxy), a private
containerd 1.6, runc and lazysnapd serving layers through fusefs.

For eStargz made by upstream's `ctr-remote image convert` and by lazysnap's own writer:
`ctr-remote image rpull` mounts one FUSE subtree per layer, a container runs after reading a
small fraction of the layer bytes, and every file a container sees (content, type, mode, owner,
device numbers, links, hardlink groups, whiteouts, opaque dirs) equals what containerd's overlayfs
snapshotter unpacks from the plain gzip image. Then: a restarted lazysnapd mounts every committed
layer again from its cache without a registry GET, a cache bound smaller than the image holds,
and `[fuse] enable = false` makes containerd download and unpack every layer instead.

Figures (bytes fetched, pull times) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Containerd, Lazysnapd, Registry
from tests.harness.image import XATTR_NAME, XATTR_VALUE
from tests.harness.lazyimage import LISTING_SCRIPT, LISTING_TOPS, PushedImage, Reference, canonical_listing

pytestmark = pytest.mark.e2e

# Neither the mount-time prefetch nor the background fetch: what is fetched is what was read.
LAZY_ONLY = "[prefetch]\nnoprefetch = true\nno_background_fetch = true\n"
WORKLOAD = ["cat", "/data/layer3.txt"]
WORKLOAD_OUT = "hello from layer 3\n"
LAZY_FRACTION = 0.25


def _rpull(ctd: Containerd, ref: str) -> float:
    start = time.monotonic()
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
    return time.monotonic() - start


def _fuse_binds(root: Path) -> dict[str, str]:
    """lazysnap FUSE mounts below `root/snapshots`: mountpoint → the subtree of the session it shows."""
    base = os.path.realpath(root / "snapshots") + "/"
    out = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split()
            if tail.split()[0] == "fuse.lazysnap" and fields[4].startswith(base):
                out[fields[4]] = fields[3]
    return out


def _layer_gets(reg: Registry, since: int, img: PushedImage) -> list[tuple[str, int, str]]:
    """(digest, bytes, user agent) of each blob GET for the image's layers logged after `since`."""
    return [(e.blob_digest or "", e.bytes, e.user_agent or "") for e in reg.access_log_entries(since)
            if e.method == "GET" and e.blob_digest in img.layer_digests and e.status in (200, 206)]


def _assert_same_tree(observed: list[str], reference: list[str]) -> None:
    diff = "\n".join(difflib.unified_diff(reference, observed, "overlayfs", "lazysnap", lineterm="", n=0))
    assert observed == reference, f"the container's tree differs from overlayfs's:\n{diff[:6000]}"


def _xattrs_seen_from_host(ctd: Containerd, ref: str) -> dict[str, dict[str, bytes]]:
    """Every non-security xattr under the listing tops, read from the host side of a container's rootfs."""
    cid = f"xattrs-{os.getpid()}-{time.monotonic_ns() % 100000}"
    ctd.ctr("run", "-d", "--snapshotter", "lazysnap", ref, cid, "sleep", "600")
    try:
        rootfs = ctd.task_rootfs(cid)
        out: dict[str, dict[str, bytes]] = {}
        for top in LISTING_TOPS:
            for dirpath, dirnames, filenames in os.walk(rootfs / top):
                for name in [*dirnames, *filenames, ""]:
                    path = os.path.join(dirpath, name) if name else dirpath
                    names = [n for n in os.listxattr(path, follow_symlinks=False)
                             if not n.startswith("security.")]
                    if names:
                        out[os.path.relpath(path, rootfs)] = {
                            n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        return out
    finally:
        ctd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        ctd.ctr("task", "delete", "--force", cid, check=False, timeout=30)
        ctd.ctr("container", "delete", cid, check=False)


@pytest.mark.parametrize("variant", ["upstream", "ours"])
def test_lazy_pull_reads_little_and_shows_what_overlayfs_shows(
        variant: str, lazy_images: dict[str, PushedImage], reference: Reference, ranged_registry: Registry,
        make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd]) -> None:
    img = lazy_images[variant]
    snapd = make_lazysnapd(config=LAZY_ONLY)
    ctd = make_containerd(proxy_socket=snapd.address, registries=[ranged_registry.host])
    mark = ranged_registry.log_mark()
    pull_seconds = _rpull(ctd, img.ref)

    binds = _fuse_binds(snapd.root)
    expected_subtrees = sorted("/" + d.split(":", 1)[1][:16] for d in img.layer_digests)
    assert sorted(binds.values()) == expected_subtrees, f"one FUSE subtree per layer expected: {binds}"
    pulled = _layer_gets(ranged_registry, mark, img)

    assert ctd.run(img.ref, WORKLOAD, "lazysnap") == WORKLOAD_OUT
    gets = _layer_gets(ranged_registry, mark, img)
    assert [g for g in gets if g[2].startswith("containerd")] == [], "containerd downloaded a layer itself"
    fetched = sum(n for _, n, _ in gets)
    print(f"\n[{variant}] layers {len(img.layer_digests)}, layer bytes {img.total_layer_bytes}, "
          f"rpull {pull_seconds:.2f}s fetching {sum(n for _, n, _ in pulled)} B in {len(pulled)} GETs; "
          f"after `cat`: {fetched} B in {len(gets)} GETs "
          f"({100 * fetched / img.total_layer_bytes:.1f}%); overlayfs pull {reference.pull_seconds:.2f}s")
    assert fetched < LAZY_FRACTION * img.total_layer_bytes

    listing = canonical_listing(ctd.run(img.ref, ["sh", "-c", LISTING_SCRIPT], "lazysnap"))
    _assert_same_tree(listing, reference.listing)
    assert _xattrs_seen_from_host(ctd, img.ref) == {"data/xattr.txt": {XATTR_NAME: XATTR_VALUE.encode()}}


def test_restarted_daemon_remounts_layers_from_its_cache(
        lazy_images: dict[str, PushedImage], ranged_registry: Registry,
        make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd]) -> None:
    img = lazy_images["ours"]
    snapd = make_lazysnapd(config=LAZY_ONLY)
    ctd = make_containerd(proxy_socket=snapd.address, registries=[ranged_registry.host])
    _rpull(ctd, img.ref)
    assert ctd.run(img.ref, WORKLOAD, "lazysnap") == WORKLOAD_OUT
    before = _fuse_binds(snapd.root)
    assert len(before) == len(img.layer_digests)

    mark = ranged_registry.log_mark()
    assert snapd.restart() == [], "lazysnapd left mounts behind after SIGTERM"
    ctd.wait_for_snapshotter("lazysnap")
    assert _fuse_binds(snapd.root) == before
    assert ctd.run(img.ref, WORKLOAD, "lazysnap") == WORKLOAD_OUT

    requests = [e for e in ranged_registry.access_log_entries(mark) if e.blob_digest in img.layer_digests]
    methods = sorted(e.method for e in requests)
    print(f"\n[restart] layer blob requests after the restart: {len(requests)} {methods}")
    assert [e for e in requests if e.method == "GET"] == [], "TOCs or chunks were fetched again"


def test_cache_bound_smaller_than_the_image_holds(
        lazy_images: dict[str, PushedImage], reference: Reference, ranged_registry: Registry,
        make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd]) -> None:
    img = lazy_images["upstream"]
    limit = 2 << 20
    assert limit < img.total_layer_bytes / 4
    snapd = make_lazysnapd(config=f"[cache]\nmax_bytes = {limit}\n" + LAZY_ONLY)
    ctd = make_containerd(proxy_socket=snapd.address, registries=[ranged_registry.host])
    _rpull(ctd, img.ref)

    listing = canonical_listing(ctd.run(img.ref, ["sh", "-c", LISTING_SCRIPT], "lazysnap"))
    _assert_same_tree(listing, reference.listing)
    chunks = snapd.root / "cache" / "chunks"
    cached = sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file())
    print(f"\n[cache] limit {limit} B, chunk bytes on disk after reading everything: {cached} B")
    assert 0 < cached <= limit

    ctd.ctr("image", "rm", "--sync", img.ref)
    assert snapd.snapshot_dirs() == []
    layer_dirs = {d.split(":", 1)[1] for d in img.layer_digests}
    left = [p.name for sub in ("chunks", "indexes") if (snapd.root / "cache" / sub).is_dir()
            for p in (snapd.root / "cache" / sub).iterdir() if p.name in layer_dirs]
    assert left == [], "removing the image's last snapshots left its layers in the cache"


def test_fuse_disabled_unpacks_every_layer(
        lazy_images: dict[str, PushedImage], ranged_registry: Registry,
        make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd]) -> None:
    img = lazy_images["ours"]
    snapd = make_lazysnapd(config="[fuse]\nenable = false\n")
    ctd = make_containerd(proxy_socket=snapd.address, registries=[ranged_registry.host])
    mark = ranged_registry.log_mark()
    _rpull(ctd, img.ref)
    assert _fuse_binds(snapd.root) == {}
    assert not (snapd.root / "fuse").exists()
    assert ctd.run(img.ref, WORKLOAD, "lazysnap") == WORKLOAD_OUT
    gets = _layer_gets(ranged_registry, mark, img)
    downloaded = {d for d, _, agent in gets if agent.startswith("containerd")}
    assert downloaded == set(img.layer_digests), "with [fuse] enable = false containerd unpacks every layer"
