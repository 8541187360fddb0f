"""snapctl against a live lazysnapd whose eStargz layers are mounted lazily from a real registry.

What snapctl reports is checked against what the test read through the layer mounts: fetched
bytes grow after a read, a read file is 100% resident, `cache verify` catches a chunk corrupted
on disk and the next read fetches the right bytes again, `cache prune` empties the cache
without breaking the mounted layers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.harness import chain_ids
from tests.ops.conftest import Served

pytestmark = pytest.mark.e2e


def _mount_of(served: Served, digest: str) -> Path:
    mounts = served.layer(digest)["mountpoints"]
    assert mounts, f"layer {digest} is served but bound nowhere"
    return Path(mounts[0])


def _sha256(path: Path, drop_page_cache: bool = False) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_page_cache:  # make the kernel ask FUSE again instead of answering from its cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(os.dup(fd), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    finally:
        os.close(fd)


def test_status_and_layers_follow_reads(served: Served) -> None:
    esgz, img = served.esgz, served.image
    status = served.snapctl_json("status", "--address", str(served.snapd.address))
    daemon = status["daemon"]
    assert status["remote"] == 3 and daemon["layer_filesystem"] and daemon["layers"] == 3
    assert daemon["sockets"]["control"] == str(served.control)
    names = {name for entry in served.snapctl_json("layers") for name in entry["snapshots"]}
    assert names == set(chain_ids(esgz.diff_ids))  # the committed snapshots, by name
    assert {layer["digest"] for layer in served.snapctl_json("layers")} == set(esgz.layer_digests)
    text = served.snapctl("status", "--address", str(served.snapd.address)).stdout
    assert "snapshots: 3 (active 0, view 0, committed 3; remote 3)" in text
    assert "3 served, 3 mounts" in text and str(served.control) in text

    digest = esgz.layer_digests[1]
    before = served.layer(digest)
    assert before["compressed_size"] == esgz.layer_sizes[1] and before["format"] == "estargz"
    mount = _mount_of(served, digest)
    assert (mount / "data/layer2.txt").read_bytes() == b"hello from layer 2\n"

    after = served.layer(digest)
    assert after["fetched_bytes"] > before["fetched_bytes"]
    assert after["cached_bytes"] > before["cached_bytes"]
    tree = served.snapctl_json("layer", digest, "/data")["tree"]
    files = {e["path"]: e for e in tree}
    assert files["/data/layer2.txt"]["cached"] == files["/data/layer2.txt"]["size"] == 19
    assert files["/data/big.bin"]["size"] == img.expected["data/big.bin"].size
    assert files["/data/big.bin"]["cached"] == 0  # never read
    assert files["/data/deep/a/b/file.txt"]["type"] == "file"
    assert files["/data/gone.txt"]["type"] == "whiteout"

    text = served.snapctl("layer", digest, "/data/layer2.txt").stdout
    assert "/data/layer2.txt" in text and "100.0%" in text
    bad = served.snapctl("layer", digest, "/../etc", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    missing = served.snapctl("layer", "sha256:" + "0" * 64, check=False)
    assert missing.returncode == 1 and "not mounted" in missing.stderr


def test_fetch_verify_and_prune_keep_layers_correct(served: Served) -> None:
    esgz, img = served.esgz, served.image
    digest = esgz.layer_digests[1]
    mount = _mount_of(served, digest)
    big = img.expected["data/big.bin"]

    served.snapctl("fetch", digest)
    layer = served.layer(digest)
    assert layer["resident_percent"] == 100.0 and layer["warm"]["state"] == "done"

    # big.bin is one chunk (smaller than the chunk size): its cache key is its sha256
    chunk = served.snapd.root / "cache" / "chunks" / digest[7:] / big.sha256
    assert chunk.stat().st_size == big.size
    with open(chunk, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    fetched = layer["fetched_bytes"]
    result = served.snapctl_json("cache", "verify")
    assert result["corrupt"] == [f"{digest}/{big.sha256}"] and result["checked"] >= 3
    assert not chunk.exists()
    assert _sha256(mount / "data/big.bin") == big.sha256  # first read through the kernel
    assert served.layer(digest)["fetched_bytes"] > fetched
    assert chunk.exists() and hashlib.sha256(chunk.read_bytes()).hexdigest() == big.sha256

    du = served.snapctl_json("cache", "du")
    assert du["bytes"] > 0 and {entry["digest"] for entry in du["layers"]} >= {digest}
    pruned = served.snapctl_json("cache", "prune")
    assert pruned["freed_bytes"] == du["bytes"] and pruned["after_bytes"] == 0
    assert served.layer(digest)["cached_bytes"] == 0
    fetched = served.layer(digest)["fetched_bytes"]
    assert (mount / "data/deep/a/b/file.txt").read_bytes() == b"deep file\n"
    assert _sha256(mount / "data/big.bin", drop_page_cache=True) == big.sha256
    assert served.layer(digest)["fetched_bytes"] > fetched
    assert served.snapctl_json("cache", "du")["bytes"] > 0
    assert served.containerd.run(esgz.ref, ["cat", "/data/layer3.txt"], "lazysnap") == "hello from layer 3\n"

    text = served.snapctl("cache", "prune", "--unused", "--to", "1G").stdout
    assert text.startswith("pruned 0 chunks")  # every cached layer is mounted
    bad = served.snapctl("cache", "prune", "--to", "lots", check=False)
    assert bad.returncode == 2 and "not a size" in bad.stderr


def test_config_from_the_daemon_and_from_a_file(served: Served, tmp_path: Path) -> None:
    cfg = served.snapctl_json("config")
    assert cfg["prefetch"]["noprefetch"] is True and cfg["metrics"]["address"] == "127.0.0.1:0"
    assert cfg["cache"]["max_bytes"] == 10 << 30  # a default the file did not set
    text = served.snapctl("config").stdout
    assert "from the daemon" in text and "[prefetch]\nnoprefetch = true" in text

    offline = tmp_path / "lazysnap.toml"
    offline.write_text('root = "/nonexistent"\n[cache]\nmax_bytes = 1073741824\n')
    res = served.snapctl("config", "--config", str(offline), "--control", str(tmp_path / "none.sock"))
    assert "from the file" in res.stdout and "max_bytes = 1073741824" in res.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("[cache]\nmax_bytes = 'big'\n")
    res = served.snapctl("config", "--config", str(broken), "--control", str(tmp_path / "none.sock"),
                         check=False)
    assert res.returncode == 2 and "cache.max_bytes" in res.stderr and "Traceback" not in res.stderr


def test_fetch_reports_a_registry_that_went_away(served: Served) -> None:
    digest = served.esgz.layer_digests[0]  # busybox: nothing of it was read yet
    served.registry.stop()
    res = served.snapctl("fetch", digest, check=False)
    assert res.returncode == 1 and "fetch failed" in res.stderr and digest in res.stderr
    assert "Traceback" not in res.stderr
    layer = served.layer(digest)
    assert layer["warm"]["state"] == "failed" and layer["errors"]["source"] >= 1
    status = served.snapctl_json("status", "--address", str(served.snapd.address))
    assert status["daemon"]["errors"]["source"] >= 1
    unknown = served.snapctl("fetch", "registry.invalid/nothing:here", check=False)
    assert unknown.returncode == 1 and "no served layer" in unknown.stderr
