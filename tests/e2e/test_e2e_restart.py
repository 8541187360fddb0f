"""lazysnapd restarts (clean SIGTERM, or SIGKILL as a crash) keep committed snapshots usable:
containerd reconnects, the chain is still listed, containers still see the right tree, and GC
still removes everything afterwards."""

from __future__ import annotations

import signal

import pytest

from tests.harness import BuiltImage, Containerd, Lazysnapd
from tests.harness.flows import (
    check_committed_chain,
    pull_and_check_snapshots,
    remove_image_and_gc,
    run_and_compare_tree,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_snapshots_survive_lazysnapd_restart(containerd: Containerd, lazysnapd: Lazysnapd,
                                             test_image: BuiltImage, sig: signal.Signals) -> None:
    pull_and_check_snapshots(containerd, test_image, "lazysnap")
    left = lazysnapd.restart(sig)
    assert left == [], f"lazysnapd left mounts after {sig.name}"
    containerd.wait_for_snapshotter("lazysnap")
    check_committed_chain(containerd, test_image.diff_ids, "lazysnap")
    run_and_compare_tree(containerd, test_image, "lazysnap")
    remove_image_and_gc(containerd, test_image, "lazysnap")
    assert lazysnapd.snapshot_dirs() == []
