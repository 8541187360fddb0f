"""eStargz through lazysnap: `ctr-remote image rpull` must give the right tree whether lazysnap
serves the layers lazily or falls back to a normal unpack, and must be lazy once the FUSE layer
filesystem is wired into lazysnapd.

Whether a layer was pulled lazily is read off the registry's Range-logging proxy: containerd
downloads a layer it has to unpack itself (User-Agent containerd/…); a remote snapshot means
containerd never GETs the layer blob and lazysnapd reads it by ranges.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness import BuiltImage, Containerd, EstargzImage, Lazysnapd, Registry
from tests.harness.flows import check_committed_chain, remove_image_and_gc, run_and_compare_tree

pytestmark = pytest.mark.e2e


def _rpull(ctd: Containerd, ref: str) -> None:
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)


def test_rpull_estargz_runs_right_and_is_collected(
        lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd], ranged_registry: Registry,
        estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    img, esgz = estargz_image
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[ranged_registry.host])
    _rpull(ctd, esgz.ref)
    check_committed_chain(ctd, esgz.diff_ids, "lazysnap")
    run_and_compare_tree(ctd, img, "lazysnap", ref=esgz.ref)
    remove_image_and_gc(ctd, img, "lazysnap", ref=esgz.ref)
    assert lazysnapd.snapshot_dirs() == []


def test_rpull_estargz_is_lazy(lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd],
                               ranged_registry: Registry,
                               estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    _, esgz = estargz_image
    ctd = make_containerd(proxy_socket=lazysnapd.address, registries=[ranged_registry.host])
    mark = ranged_registry.log_mark()
    _rpull(ctd, esgz.ref)
    assert ctd.run(esgz.ref, ["cat", "/data/layer3.txt"], "lazysnap") == "hello from layer 3\n"
    layer_gets = [e for e in ranged_registry.access_log_entries(since=mark)
                  if e.method == "GET" and e.blob_digest in esgz.layer_digests]
    by_containerd = [e.blob_digest for e in layer_gets if (e.user_agent or "").startswith("containerd")]
    assert by_containerd == [], "containerd downloaded these layers itself (no remote snapshot)"
    assert all(e.range is not None for e in layer_gets), "lazysnapd read a whole blob without Range"
    assert {e.blob_digest for e in layer_gets} <= set(esgz.layer_digests)
    ctd.ctr("image", "rm", "--sync", esgz.ref)
