"""Pull and run the busybox test image through lazysnap with real containerd, runc and registry.

Issue "Snapshotter core", must-show 2: `ctr image pull --snapshotter lazysnap`, `ctr run` sees
every layer right (files, symlink, hardlink, setuid, xattr, whiteout, opaque dir), and after
`ctr image rm --sync` containerd's GC leaves no snapshot in lazysnap's metadata nor on its disk.
The same image pulled through containerd's CRI plugin (cri.* labels on Prepare) must land in
lazysnap too. The lazysnapd fixture fails (never skips) when lazysnapd is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness import BuiltImage, Containerd, CriOptions, Lazysnapd
from tests.harness.cri import CriClient
from tests.harness.flows import (
    check_committed_chain,
    check_xattr_and_copy_up,
    pull_and_check_snapshots,
    remove_image_and_gc,
    run_and_compare_tree,
)

pytestmark = pytest.mark.e2e


def test_pull_run_remove_through_lazysnap(containerd: Containerd, lazysnapd: Lazysnapd,
                                          test_image: BuiltImage) -> None:
    pull_and_check_snapshots(containerd, test_image, "lazysnap")
    assert len(lazysnapd.snapshot_dirs()) >= len(test_image.layer_digests)

    run_and_compare_tree(containerd, test_image, "lazysnap")
    check_xattr_and_copy_up(containerd, test_image, "lazysnap")

    remove_image_and_gc(containerd, test_image, "lazysnap")
    assert lazysnapd.snapshot_dirs() == []
    assert lazysnapd.alive(), lazysnapd.log_tail()


def test_cri_pull_unpacks_into_lazysnap(lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd],
                                        test_image: BuiltImage) -> None:
    """CRI (disable_snapshot_annotations = false, so cri.* labels reach Prepare) pulls into lazysnap."""
    ctd = make_containerd(proxy_socket=lazysnapd.address, cri=CriOptions(snapshotter="lazysnap"))
    with CriClient(ctd.address) as cri:
        assert cri.pull_image(test_image.ref).startswith("sha256:")
        assert test_image.ref in cri.list_images()
    check_committed_chain(ctd, test_image.diff_ids, "lazysnap", namespace="k8s.io")
