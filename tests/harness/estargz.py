"""eStargz copies of test images, made by stargz-snapshotter's `ctr-remote`, and chain ids.

`convert_estargz(containerd, src_ref, dst_ref)` pulls `src_ref` into the instance's content store
without unpacking, runs `ctr-remote image convert --estargz --oci`, pushes the result with
`ctr-remote image push --plain-http` and reads the pushed manifest back from the registry, so a
test gets each layer's blob digest, size and `containerd.io/snapshot/stargz/toc.digest`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from .procs import HarnessError

if TYPE_CHECKING:
    from .containerd import Containerd

__all__ = ["TOC_DIGEST_ANNOTATION", "EstargzImage", "chain_ids", "convert_estargz"]

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containerd.snapshotter.v1.stargz/uncompressed-size"
_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class EstargzImage:
    """The pushed eStargz image: one entry per layer, base first."""

    ref: str
    manifest_digest: str
    layer_digests: list[str]
    layer_sizes: list[int]
    toc_digests: list[str]
    diff_ids: list[str]
    manifest: dict[str, object]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's chain ids (the committed snapshot names) for layers with these diff ids."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _split_ref(ref: str) -> tuple[str, str, str]:
    host, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    if not host or not name or not tag:
        raise HarnessError(f"expected HOST/NAME:TAG, got {ref!r}")
    return host, name, tag


def _push(containerd: Containerd, ref: str) -> None:
    """`ctr-remote image push`, once more if the pusher panicked: the docker pusher of the
    containerd release Debian's ctr-remote is built from can panic on a race between its
    writer and its status channel ("send on closed channel", containerd PR 8379 fixed it
    later). A push is idempotent: what the first attempt stored is content-addressed."""
    res = containerd.ctr_remote("image", "push", "--plain-http", ref, check=False)
    if res.returncode != 0 and "panic:" in res.stderr and "remotes/docker" in res.stderr:
        res = containerd.ctr_remote("image", "push", "--plain-http", ref, check=False)
    if res.returncode != 0:
        raise HarnessError(f"ctr-remote image push {ref} failed ({res.returncode}):\n"
                           f"{res.stderr.strip()[-2000:]}")


def convert_estargz(containerd: Containerd, src_ref: str, dst_ref: str,
                    extra_convert_args: tuple[str, ...] = ()) -> EstargzImage:
    """Convert `src_ref` to eStargz as `dst_ref` and push it; HarnessError if any step fails.

    The source is fetched with `--all-platforms`, which makes ctr skip the unpack, so no
    snapshotter is involved. Both refs must be on the plain-HTTP loopback registry.
    """
    containerd.ctr("image", "pull", "--plain-http", "--all-platforms", src_ref, timeout=180)
    containerd.ctr_remote("image", "convert", "--estargz", "--oci", *extra_convert_args, src_ref, dst_ref)
    _push(containerd, dst_ref)
    host, name, tag = _split_ref(dst_ref)
    r = httpx.get(f"http://{host}/v2/{name}/manifests/{tag}", headers={"Accept": _ACCEPT}, timeout=10)
    r.raise_for_status()
    manifest = json.loads(r.content)
    layers = manifest.get("layers", [])
    tocs = [str(layer.get("annotations", {}).get(TOC_DIGEST_ANNOTATION, "")) for layer in layers]
    if not all(tocs):
        raise HarnessError(f"{dst_ref}: a layer lacks the {TOC_DIGEST_ANNOTATION} annotation")
    cfg = httpx.get(f"http://{host}/v2/{name}/blobs/{manifest['config']['digest']}", timeout=10)
    cfg.raise_for_status()
    diff_ids = [str(d) for d in json.loads(cfg.content)["rootfs"]["diff_ids"]]
    return EstargzImage(
        ref=dst_ref, manifest_digest="sha256:" + hashlib.sha256(r.content).hexdigest(),
        layer_digests=[str(layer["digest"]) for layer in layers],
        layer_sizes=[int(layer["size"]) for layer in layers], toc_digests=tocs, diff_ids=diff_ids,
        manifest=manifest)
