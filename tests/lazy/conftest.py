"""Fixtures of the lazy eStargz tests: the harness's, plus the lazy test image in three forms and
what containerd's own overlayfs snapshotter shows of it (the reference every lazy pull must equal).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.harness import Containerd, Registry, convert_estargz, remove_tree, short_tempdir
from tests.harness.lazyimage import (
    LISTING_SCRIPT,
    PushedImage,
    Reference,
    canonical_listing,
    lazy_image_tars,
    push_estargz_image,
    push_gzip_image,
)

__all__ = ["lazy_images", "reference"]

IMAGE_NAME = "lazysnap/lazy"


@pytest.fixture(scope="session")
def lazy_images(ranged_registry: Registry) -> Iterator[dict[str, PushedImage]]:
    """`gzip`: the plain image; `upstream`: its eStargz by ctr-remote; `ours`: by lazysnap's writer."""
    work = short_tempdir("lzs-lazyimg-")
    tars = lazy_image_tars()
    gz = push_gzip_image(work, ranged_registry, tars, IMAGE_NAME, "gzip")
    ours = push_estargz_image(work, ranged_registry, tars, IMAGE_NAME, "esgz-ours")
    with Containerd(work / "convert") as builder:
        up = convert_estargz(builder, gz.ref, f"{ranged_registry.host}/{IMAGE_NAME}:esgz-upstream")
    yield {"gzip": gz, "ours": ours,
           "upstream": PushedImage(up.ref, up.layer_digests, up.layer_sizes, up.diff_ids)}
    remove_tree(work)


@pytest.fixture(scope="session")
def reference(lazy_images: dict[str, PushedImage], ranged_registry: Registry) -> Iterator[Reference]:
    work = short_tempdir("lzs-lazyref-")
    gz = lazy_images["gzip"]
    with Containerd(work / "ctd", registries=[ranged_registry.host]) as ctd:
        start = time.monotonic()
        ctd.pull(gz.ref, "overlayfs")
        pulled = time.monotonic() - start
        listing = canonical_listing(ctd.run(gz.ref, ["sh", "-c", LISTING_SCRIPT], "overlayfs"))
        ctd.ctr("image", "rm", "--sync", gz.ref)
    remove_tree(work)
    assert len(listing) > 300, listing
    yield Reference(listing, pulled)
