"""Fast checks of the harness's own logic (no daemons): the expected tree, tree diffs, logs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

from tests.harness.estargz import chain_ids
from tests.harness.image import LayerEntry, image_layers, merge_layers, write_layer_tar, write_oci_layout
from tests.harness.registry import parse_combined_log
from tests.harness.tree import Observed, diff_trees, parse_listing


def test_merge_applies_whiteout_opaque_and_override() -> None:
    tree = merge_layers(image_layers(big_file_size=16))
    assert "data/gone.txt" not in tree
    assert "opq/new.txt" in tree and "opq/old.txt" not in tree and "opq/sub" not in tree
    assert tree["data/hard"].hardlink_of == "data/layer2.txt"
    assert tree["data/suid"].mode == 0o4755
    assert tree["data/xattr.txt"].xattrs == {"user.lazysnap.test": "xattr-from-layer-2"}
    assert tree["bin/sh"].target == "busybox"
    assert not any(".wh." in p for p in tree)


def test_every_layer_carries_its_parent_directories() -> None:
    for layer in image_layers(big_file_size=16):
        names: list[str] = []
        with tarfile.open(fileobj=io.BytesIO(write_layer_tar(layer))) as tar:
            for m in tar.getmembers():
                name = m.name.rstrip("/")
                parent = name.rpartition("/")[0]
                assert not parent or parent in names, f"{name} before its parent"
                names.append(name)


def test_layout_is_reproducible(tmp_path: Path) -> None:
    layers = image_layers(big_file_size=1024)
    first = write_oci_layout(tmp_path / "a", layers, "v1")
    second = write_oci_layout(tmp_path / "b", layers, "v1")
    assert first == second


def test_diff_trees_reports_each_kind_of_difference() -> None:
    expected = merge_layers([[
        LayerEntry("d", "dir", 0o755),
        LayerEntry("d/f", "file", 0o644, b"abc"),
        LayerEntry("d/h", "hardlink", target="d/f"),
        LayerEntry("d/l", "symlink", 0o777, target="f"),
    ]])
    listing = (
        "P|d|41ed|0|0|4096|2|10\nP|d/f|81a4|0|0|3|2|11\nP|d/h|81a4|0|0|3|2|11\nP|d/l|a1ff|0|0|1|1|12\n"
        "S|d/f|ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        "S|d/h|ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\nL|d/l|f\n"
    )
    observed = parse_listing(listing)
    assert diff_trees(expected, observed) == []

    def changed(path: str, **kw: object) -> dict[str, Observed]:
        copy = {p: dataclasses.replace(o) for p, o in observed.items()}
        copy[path] = dataclasses.replace(copy[path], **kw)  # type: ignore[arg-type]
        return copy

    assert diff_trees(expected, changed("d/f", mode=0o600)) == ["d/f: mode 600, expected 644"]
    assert diff_trees(expected, changed("d/f", uid=1)) == ["d/f: owner 1:0, expected 0:0"]
    assert diff_trees(expected, changed("d/l", target="g")) == ["d/l: symlink to 'g', expected 'f'"]
    assert diff_trees(expected, changed("d/h", inode=99)) == ["d/h: not a hardlink of d/f"]
    assert len(diff_trees(expected, changed("d/f", sha256="0" * 64))) == 1
    assert diff_trees(expected, changed("d/f", kind="dir")) == ["d/f: kind dir, expected file"]
    missing = {p: o for p, o in observed.items() if p != "d/l"}
    assert diff_trees(expected, missing) == ["missing: d/l"]
    extra = {**observed, "d/x": observed["d/f"]}
    assert diff_trees(expected, extra) == ["unexpected: d/x (file)"]


def test_parse_combined_access_log() -> None:
    text = (
        '127.0.0.1 - - [25/Nov/2026:16:46:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"\n'
        '127.0.0.1 - - [25/Nov/2026:16:46:00 +0000] "HEAD /v2/a/b/blobs/sha256:' + "a" * 64
        + ' HTTP/1.1" 200 0 "" "containerd/1.6"\n'
        "time=... level=info msg=not-an-access-line\n"
    )
    entries = parse_combined_log(text)
    assert [(e.method, e.status, e.bytes) for e in entries] == [("GET", 200, 2), ("HEAD", 200, 0)]
    assert [e.user_agent for e in entries] == ["curl/7.88.1", "containerd/1.6"]
    assert entries[1].blob_digest == "sha256:" + "a" * 64 and entries[0].blob_digest is None


def test_chain_ids_match_containerd() -> None:
    # the e2e pull tests also compare chain_ids with the keys `ctr snapshots ls` shows
    assert chain_ids(["sha256:aa"]) == ["sha256:aa"]
    two = chain_ids(["sha256:aa", "sha256:bb"])
    assert two[1] == "sha256:" + hashlib.sha256(b"sha256:aa sha256:bb").hexdigest()
