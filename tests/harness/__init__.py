"""End-to-end test harness: real registry, containerd, runc and lazysnapd, started per test.

Public API (import from `tests.harness`):

- `Registry(workdir, log_ranges=False, htpasswd=None)`: docker-registry on 127.0.0.1:<free port>;
  `host`, `access_log_entries(since)`, `blob_bytes(since)`, `log_mark()`. See `registry.py`.
- `Containerd(workdir, proxy_socket=..., registries=[host], cri=CriOptions(...))`: a private
  containerd 1.6; `ctr(...)`, `ctr_remote(...)`, `pull`, `run`, `snapshots`, `task_rootfs`.
  See `containerd.py`.
- `Lazysnapd(workdir, config=None)`: the daemon under test; `address`, `root`, `snapshot_dirs()`.
  See `lazysnapd.py`.
- `build_image(workdir, registry)`: the 3-layer busybox image, pushed (to a `Registry` or a
  `RemoteRegistry(host)`; CLI: `scripts/build-test-image HOST`); returns `BuiltImage` with
  the ref, layer digests, diff ids and the expected merged tree. See `image.py`.
- `listing_script`, `parse_listing`, `diff_trees`: compare what a container sees with that tree.
- `convert_estargz(containerd, src_ref, dst_ref)`: eStargz copy via ctr-remote, pushed; returns
  `EstargzImage` (layer digests, sizes, TOC digests, diff ids).
- `chain_ids(diff_ids)`: containerd's snapshot names for an image's layers.
- `tests.harness.flows`: the reusable pull → snapshots → run/compare → xattr/copy-up → GC steps.
- `tests.harness.cri.CriClient(containerd.address)`: CRI ImageService `pull_image`/`list_images`.
- `tests.harness.demo`: what `scripts/demo` runs.
- pytest fixtures in `tests.harness.fixtures` (`registry`, `test_image`, `ranged_registry`,
  `estargz_image`, `lazysnapd`, `containerd`, `make_containerd`, `make_lazysnapd`); import them
  into a conftest.py as tests/e2e/conftest.py does.

Every class is a context manager, stops its processes by PID and unmounts what they left; use
`short_tempdir(prefix)` for work dirs (socket paths must stay under 108 bytes). Everything raises
`HarnessError` with the component's log tail when something does not come up.
"""

from __future__ import annotations

from .containerd import Containerd, CriOptions
from .estargz import EstargzImage, chain_ids, convert_estargz
from .image import BuiltImage, LayerEntry, RemoteRegistry, TreeEntry, build_image
from .lazysnapd import Lazysnapd, find_lazysnapd
from .procs import HarnessError, free_port, remove_tree, short_tempdir, unmount_below
from .registry import AccessLogEntry, Registry
from .tree import Observed, diff_trees, listing_script, parse_listing

__all__ = [
    "AccessLogEntry",
    "BuiltImage",
    "Containerd",
    "CriOptions",
    "EstargzImage",
    "HarnessError",
    "LayerEntry",
    "Lazysnapd",
    "Observed",
    "Registry",
    "RemoteRegistry",
    "TreeEntry",
    "build_image",
    "chain_ids",
    "convert_estargz",
    "diff_trees",
    "find_lazysnapd",
    "free_port",
    "listing_script",
    "parse_listing",
    "remove_tree",
    "short_tempdir",
    "unmount_below",
]
