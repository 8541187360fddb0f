"""Pull and run the busybox test image through lazysnap with real containerd, runc and registry.

Issue "Snapshotter core", must-show 2: `ctr image pull --snapshotter lazysnap`, `ctr run` sees
every layer right (files, symlink, hardlink, setuid, xattr, whiteout, opaque dir), and after
`ctr image rm --sync` containerd's GC leaves no snapshot in lazysnap's metadata nor on its disk.
The lazysnapd fixture fails (never skips) when lazysnapd is missing.
"""

from __future__ import annotations

import pytest

from tests.harness import BuiltImage, Containerd, Lazysnapd
from tests.harness.flows import (
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
