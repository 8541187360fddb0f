"""Reusable e2e steps: pull → check snapshots → run and compare the tree → xattr/copy-up → GC.

Each step takes the snapshotter name, so the same checks run on lazysnap and on containerd's
built-in overlayfs (the harness self-test). They raise AssertionError with the difference.
"""

from __future__ import annotations

import os
import secrets

from .containerd import Containerd
from .estargz import chain_ids
from .image import XATTR_NAME, XATTR_VALUE, BuiltImage
from .procs import wait_until
from .tree import diff_trees, listing_script, parse_listing

TOPS = ("bin", "etc", "data", "opq")

# What a few explicit commands print in the container: one file per layer, the layer-3 override,
# the whiteout and opaque dir, the symlink and the setuid bit.
PROBE = ("cat /data/layer1.txt /data/layer2.txt /data/layer3.txt /etc/motd; "
         "ls -a /opq; ls /data; readlink /data/link; stat -c '%a %u:%g' /data/suid /data/owned.txt; "
         "cat /data/link /data/hard; test -e /data/gone.txt || echo gone.txt-whited-out")
PROBE_OUT = """hello from layer 1
hello from layer 2
hello from layer 3
motd from layer 3
.
..
new.txt
abs-link
big.bin
deep
empty
hard
layer1.txt
layer2.txt
layer3.txt
link
owned.txt
suid
xattr.txt
layer2.txt
4755 0:0
640 65534:65534
hello from layer 2
hello from layer 2
gone.txt-whited-out
"""


def pull_and_check_snapshots(ctd: Containerd, image: BuiltImage, snapshotter: str) -> None:
    """Pull with `snapshotter`; its committed snapshots must be exactly the image's chain ids."""
    ctd.pull(image.ref, snapshotter)
    check_committed_chain(ctd, image.diff_ids, snapshotter)


def check_committed_chain(ctd: Containerd, diff_ids: list[str], snapshotter: str,
                          namespace: str | None = None) -> None:
    """The snapshotter holds exactly the committed chain for these layers, parents in order."""
    rows = ctd.snapshots(snapshotter, namespace)
    chain = chain_ids(diff_ids)
    assert sorted(key for key, _, _ in rows) == sorted(chain), rows
    parents = {key: parent for key, parent, _ in rows}
    assert [parents[c] for c in chain] == ["", *chain[:-1]]
    assert {kind for _, _, kind in rows} == {"Committed"}


def run_and_compare_tree(ctd: Containerd, image: BuiltImage, snapshotter: str,
                         ref: str | None = None) -> None:
    """`ctr run --rm`: the container sees exactly the image's merged tree and the probe output.

    `ref` runs another image with the same content (e.g. its eStargz copy) instead of `image.ref`.
    """
    ref = ref or image.ref
    listing = ctd.run(ref, ["sh", "-c", listing_script(TOPS)], snapshotter)
    observed = parse_listing(listing)
    assert len(observed) > 250, listing[-2000:]
    assert diff_trees(image.expected, observed, TOPS) == []
    assert ctd.run(ref, ["sh", "-c", PROBE], snapshotter) == PROBE_OUT


def check_xattr_and_copy_up(ctd: Containerd, image: BuiltImage, snapshotter: str) -> None:
    """In a running container: the xattr is visible on the host side of its rootfs, a write goes
    to the container's own layer, and a fresh container still sees the image's file."""
    cid = f"xattr-{secrets.token_hex(4)}"
    ctd.ctr("run", "-d", "--snapshotter", snapshotter, image.ref, cid, "sleep", "600")
    try:
        rootfs = ctd.task_rootfs(cid)
        wait_until(lambda: (rootfs / "data").is_dir(), 20, f"rootfs of {cid}")
        assert os.getxattr(rootfs / "data" / "xattr.txt", XATTR_NAME) == XATTR_VALUE.encode()
        res = ctd.ctr("task", "exec", "--exec-id", "w1", cid, "sh", "-c",
                      "echo changed > /data/layer1.txt && cat /data/layer1.txt /data/layer2.txt")
        assert res.stdout == "changed\nhello from layer 2\n"
    finally:
        ctd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        ctd.ctr("task", "delete", "--force", cid, check=False, timeout=30)
        ctd.ctr("container", "delete", cid)
    assert ctd.run(image.ref, ["cat", "/data/layer1.txt"], snapshotter) == "hello from layer 1\n"


def remove_image_and_gc(ctd: Containerd, image: BuiltImage, snapshotter: str,
                        ref: str | None = None) -> None:
    """`ctr image rm --sync` runs containerd's GC: every snapshot of the image must go."""
    ctd.ctr("image", "rm", "--sync", ref or image.ref)
    assert ctd.snapshots(snapshotter) == []
