"""A corrupted chunk of a lazily mounted layer is refused, never served nor cached, and recovers.

A FaultProxy in front of the real registry flips one byte inside the compressed extent of one
chunk of ``/data/big.bin`` (layer 2 of the eStargz test image). Reading that file in a container
fails with EIO; the chunk's cache file never appears; lazysnapd's log names the layer digest and
the chunk. Once the proxy is healthy again and the failure TTL has passed, the same read returns
the right bytes and the verified chunk is cached.
"""

from __future__ import annotations

import errno
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import BuiltImage, Containerd, EstargzImage, Lazysnapd, Registry
from tests.harness.daemonlog import REMOTE_PREPARED, daemon_log_mark, log_records, remote_prepared
from tests.harness.esgzlayout import file_chunks
from tests.harness.faultproxy import FaultProxy
from tests.harness.mountinfo import mounts_with_types
from tests.harness.snapdconfig import lazysnapd_config

pytestmark = pytest.mark.e2e

FAILURE_TTL = 1.0
BIG = "data/big.bin"


@pytest.fixture
def fault_proxy(ranged_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(ranged_registry.direct_host) as proxy:
        yield proxy


def _read_big(ctd: Containerd, ref: str) -> tuple[int, str, str]:
    """sha256sum of the file in a fresh container: (exit status, stdout, stderr)."""
    cid = f"chunk-{secrets.token_hex(4)}"
    res = ctd.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, cid, "sha256sum", f"/{BIG}",
                  check=False)
    return res.returncode, res.stdout, res.stderr


def _cached_chunk_files(root: Path, layer_digest: str, chunk_digest: str) -> list[Path]:
    """The chunk's file in lazysnapd's chunk cache (default dir <root>/cache), if it is there."""
    chunks = root / "cache" / "chunks"
    assert chunks.is_dir(), "no chunk cache where lazysnapd keeps it by default"
    path = chunks / layer_digest.split(":")[1] / chunk_digest.split(":")[1]
    return [path] if path.is_file() else []


def test_flipped_byte_gives_eio_and_recovers_after_ttl(
        make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd],
        fault_proxy: FaultProxy, estargz_image: tuple[BuiltImage, EstargzImage]) -> None:
    img, esgz = estargz_image
    layer = esgz.layer_digests[1]
    chunks = file_chunks(fault_proxy.upstream, img.name, layer, BIG, toc_digest=esgz.toc_digests[1])
    bad = chunks[len(chunks) // 2]
    fault_proxy.flip_byte(layer, (bad.blob_offset + bad.blob_end) // 2)

    # nothing fetched ahead of the reads: the corrupt chunk is reached by the container's read only
    snapd = make_lazysnapd(config=lazysnapd_config(background=False, prefetch=False,
                                                   failure_ttl=FAILURE_TTL))
    ctd = make_containerd(proxy_socket=snapd.address, registries=[fault_proxy.host])
    ref = f"{fault_proxy.host}/{img.name}:esgz"
    mark = daemon_log_mark(snapd.log_path)
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
    outcomes = remote_prepared(snapd.log_path, since=mark)
    assert [r[REMOTE_PREPARED] for r in outcomes] == [True] * len(esgz.layer_digests), outcomes

    status, out, err = _read_big(ctd, ref)
    assert status != 0 and out == "", (status, out, err)
    assert "Input/output error" in err or "I/O error" in err, err
    # the snapshot's own mount (a bind of the layer's FUSE tree) answers EIO too, not bytes
    layer_fs = [m.mountpoint for m in mounts_with_types(snapd.root)
                if m.fstype.startswith("fuse") and m.mountpoint.name == "fs"
                and m.root == "/" + layer.split(":")[1][:16]]
    assert len(layer_fs) == 1, mounts_with_types(snapd.root)
    with pytest.raises(OSError) as info:
        (layer_fs[0] / BIG).read_bytes()
    assert info.value.errno == errno.EIO
    assert _cached_chunk_files(snapd.root, layer, bad.digest) == []
    named = [r for r in log_records(snapd.log_path, since=mark)
             if layer in r.get("msg", "") and bad.digest.split(":")[1] in r.get("msg", "")
             and str(bad.blob_offset) in r.get("msg", "")]
    assert named, "lazysnapd's log does not name the layer and the chunk"

    # still failing within the TTL is allowed; after a healthy registry and the TTL it must read
    fault_proxy.reset()
    time.sleep(FAILURE_TTL + 0.5)
    status, out, err = _read_big(ctd, ref)
    assert status == 0, err
    assert out.split()[0] == img.expected[BIG].sha256
    cached = _cached_chunk_files(snapd.root, layer, bad.digest)
    assert len(cached) == 1
    assert "sha256:" + hashlib.sha256(cached[0].read_bytes()).hexdigest() == bad.digest
    ctd.ctr("image", "rm", "--sync", ref)
