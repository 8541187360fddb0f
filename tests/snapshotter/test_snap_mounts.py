"""Mount composition like containerd's overlay snapshotter, and host option detection."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter.mounts import Layout, Mount, OverlayOptions, compose, detect_overlay_options, filesystem_type
from snapshotter.store import Kind

LAYOUT = Layout("/var/lib/lazysnap")


def test_compose_follows_containerd() -> None:
    opts = OverlayOptions(index_off=True)
    fs = LAYOUT.fs
    assert compose(LAYOUT, opts, Kind.ACTIVE, 1, []) == [Mount("bind", fs(1), ("rw", "rbind"))]
    assert compose(LAYOUT, opts, Kind.VIEW, 1, []) == [Mount("bind", fs(1), ("ro", "rbind"))]
    assert compose(LAYOUT, opts, Kind.VIEW, 3, [2]) == [Mount("bind", fs(2), ("ro", "rbind"))]
    assert compose(LAYOUT, opts, Kind.ACTIVE, 3, [2, 1]) == [Mount("overlay", "overlay", (
        "index=off", f"workdir={LAYOUT.work(3)}", f"upperdir={fs(3)}", f"lowerdir={fs(2)}:{fs(1)}"))]
    assert compose(LAYOUT, OverlayOptions(userxattr=True), Kind.VIEW, 3, [2, 1]) == [
        Mount("overlay", "overlay", ("userxattr", f"lowerdir={fs(2)}:{fs(1)}"))]


def test_128_layers_keep_absolute_paths_like_containerd() -> None:
    # containerd's mount.All shortens a lowerdir longer than a page itself (chdir to the common
    # prefix); the conformance suite's 128LayersMount checks that this works end to end.
    [m] = compose(LAYOUT, OverlayOptions(), Kind.ACTIVE, 200, list(range(128, 0, -1)))
    lower = m.options[-1]
    assert lower.startswith("lowerdir=") and lower.count(":") == 127
    assert all(p.startswith("/var/lib/lazysnap/snapshots/") for p in lower[9:].split(":"))


def test_index_off_when_the_kernel_knows_it(tmp_path: Path) -> None:
    expected = Path("/sys/module/overlay/parameters/index").exists()
    assert detect_overlay_options(str(tmp_path)).index_off is expected


@pytest.mark.root
def test_userxattr_only_inside_a_user_namespace(tmp_path: Path) -> None:
    assert detect_overlay_options(str(tmp_path)).userxattr is False  # initial namespace: trusted xattrs
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) missing")
    code = ("import sys; from snapshotter.mounts import detect_overlay_options as d; "
            "print(d(sys.argv[1]).userxattr)")
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", code,
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    if res.returncode != 0 and "Operation not permitted" in res.stderr:
        pytest.skip("user namespaces are disabled here")
    assert res.returncode == 0, res.stderr
    # In a user namespace overlay needs userxattr, except on tmpfs, which refuses user.* xattrs.
    assert res.stdout.strip() == str(filesystem_type(str(tmp_path)) != "tmpfs")
    assert list(tmp_path.iterdir()) == []  # the probe cleaned up after itself
