"""A test image big enough to show lazy pulling, pushed as plain gzip and as our own eStargz.

    tars = lazy_image_tars()                                    # uncompressed layer tars, base first
    gz = push_gzip_image(workdir, registry, tars, "lazysnap/lazy", "gzip")
    esgz = push_estargz_image(workdir, registry, tars, "lazysnap/lazy", "ours")  # estargz.convert

The layers are the harness's three busybox layers (`image.image_layers`: whiteout, opaque dir,
hardlink, symlinks, setuid, `user.*` xattr) plus a fourth with device nodes (char, block, fifo)
and `pad_files` files of incompressible data a workload never reads, so that reading only what
`sh` needs touches a small fraction of the image's bytes.

`push_estargz_image` converts each tar with lazysnap's own writer (`estargz.convert`) and puts
the writer's annotations (`containerd.io/snapshot/stargz/toc.digest`,
`io.containers.estargz.uncompressed-size`) on the layer descriptors, as `ctr-remote image
convert --estargz --oci` does. Images are written as OCI layouts and pushed with
`push_layout` (skopeo, digests preserved).

`LISTING_SCRIPT` is a busybox script printing every path under `LISTING_TOPS` with its type,
mode, owner, size, device numbers, link count and target, and a sha256 per regular file;
`canonical_listing` turns its output into something comparable across snapshotters (inode
numbers replaced by hardlink groups; directory sizes and link counts, which are each
filesystem's own, left out).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import estargz

from .image import (
    MTIME,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    RegistryEndpoint,
    gzip_bytes,
    image_layers,
    push_layout,
    write_layer_tar,
)
from .procs import HarnessError

__all__ = ["LISTING_SCRIPT", "LISTING_TOPS", "PushedImage", "Reference", "canonical_listing",
           "lazy_image_tars",
           "push_estargz_image", "push_gzip_image"]

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
LISTING_TOPS = ("bin", "data", "devices", "etc", "opq", "pad")
_TOPS = " ".join(LISTING_TOPS)
LISTING_SCRIPT = (
    f"cd / && find {_TOPS} -exec stat -c 'P|%n|%F|%a|%u:%g|%s|%t:%T|%h|%i' {{}} + && "
    f"find {_TOPS} -type f -exec sha256sum {{}} + | while read -r h p; do echo \"S|$p|$h\"; done && "
    f"find {_TOPS} -type l | while read -r p; do echo \"L|$p|$(readlink \"$p\")\"; done"
)
"""`sh -c`: `P|path|type|mode|uid:gid|size|major:minor|nlink|inode`, `S|path|sha256`, `L|path|target`."""


@dataclass(frozen=True)
class PushedImage:
    """An image in the registry: its ref and per-layer blob digests, sizes and diff ids (base first)."""

    ref: str
    layer_digests: list[str]
    layer_sizes: list[int]
    diff_ids: list[str]

    @property
    def total_layer_bytes(self) -> int:
        return sum(self.layer_sizes)


@dataclass(frozen=True)
class Reference:
    """An image as containerd's overlayfs snapshotter shows it: `canonical_listing` and pull time."""

    listing: list[str]
    pull_seconds: float


def _devices_and_padding(pad_files: int, pad_size: int) -> bytes:
    buf = io.BytesIO()
    rng = random.Random(4)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(ti: tarfile.TarInfo, data: bytes | None = None) -> None:
            ti.mtime, ti.uname, ti.gname = MTIME, "", ""
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)

        for d in ("devices/", "pad/"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            add(ti)
        for name, kind, mode, major, minor in (("devices/null", tarfile.CHRTYPE, 0o666, 1, 3),
                                               ("devices/loop9", tarfile.BLKTYPE, 0o660, 7, 9),
                                               ("devices/fifo", tarfile.FIFOTYPE, 0o620, 0, 0)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.devmajor, ti.devminor = kind, mode, major, minor
            add(ti)
        for i in range(pad_files):
            ti = tarfile.TarInfo(f"pad/pad-{i}.bin")
            ti.mode = 0o644
            add(ti, rng.randbytes(pad_size))
    return buf.getvalue()


def lazy_image_tars(pad_files: int = 4, pad_size: int = 2 << 20, big_file_size: int = 1 << 20) -> list[bytes]:
    """The uncompressed tars of the four layers described in the module docstring."""
    return [*(write_layer_tar(entries) for entries in image_layers(big_file_size)),
            _devices_and_padding(pad_files, pad_size)]


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _push(workdir: Path, registry: RegistryEndpoint, name: str, tag: str,
          layers: list[tuple[bytes, str, dict[str, str]]], diff_ids: list[str]) -> PushedImage:
    layout = workdir / f"layout-{tag}"
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descriptors = []
    for blob, media_type, layer_annotations in layers:
        digest, size = _put_blob(layout, blob)
        desc: dict[str, object] = {"mediaType": media_type, "digest": digest, "size": size}
        if layer_annotations:
            desc["annotations"] = layer_annotations
        descriptors.append(desc)
    created = "2023-11-14T22:13:20Z"
    arch = _GO_ARCH.get(os.uname().machine, os.uname().machine)
    config = {"architecture": arch, "os": "linux", "created": created,
              "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_digest, cfg_size = _put_blob(layout, _canonical_json(config))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
                "layers": descriptors}
    man_digest, man_size = _put_blob(layout, _canonical_json(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": man_digest, "size": man_size,
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_bytes(_canonical_json(index))
    pushed = push_layout(layout, tag, registry, name)
    if pushed != man_digest:
        raise HarnessError(f"registry holds manifest {pushed}, built {man_digest}: the push rewrote it")
    return PushedImage(ref=f"{registry.host}/{name}:{tag}",
                       layer_digests=[str(d["digest"]) for d in descriptors],
                       layer_sizes=[int(str(d["size"])) for d in descriptors], diff_ids=diff_ids)


def push_gzip_image(workdir: Path, registry: RegistryEndpoint, tars: list[bytes], name: str,
                    tag: str) -> PushedImage:
    """Push the layers as ordinary tar+gzip (what containerd's overlayfs snapshotter unpacks)."""
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    return _push(workdir, registry, name, tag, [(gzip_bytes(t), OCI_LAYER_GZIP, {}) for t in tars], diff_ids)


def push_estargz_image(workdir: Path, registry: RegistryEndpoint, tars: list[bytes], name: str,
                       tag: str, chunk_size: int = 256 << 10) -> PushedImage:
    """Convert each layer with lazysnap's eStargz writer and push with its TOC annotations."""
    layers, diff_ids = [], []
    for t in tars:
        out = io.BytesIO()
        res = estargz.convert(io.BytesIO(t), out, chunk_size=chunk_size, workers=1)
        layers.append((out.getvalue(), res.media_type, res.annotations()))
        diff_ids.append(res.diff_id)
    return _push(workdir, registry, name, tag, layers, diff_ids)


def canonical_listing(text: str) -> list[str]:
    """`LISTING_SCRIPT` output, sorted, with inode numbers replaced by the path's hardlink group.

    Raises ValueError on a malformed line.
    """
    rows: list[list[str]] = []
    by_inode: dict[str, list[str]] = {}
    other: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        kind = line.split("|", 1)[0]
        if kind == "P":
            fields = line.split("|")
            if len(fields) != 9:
                raise ValueError(f"malformed listing line {line!r}")
            rows.append(fields)
            if fields[2] != "directory":
                by_inode.setdefault(fields[8], []).append(fields[1])
        elif kind in ("S", "L"):
            other.append(line)
        else:
            raise ValueError(f"malformed listing line {line!r}")
    out = []
    for fields in rows:
        if fields[2] == "directory":  # sizes and link counts of directories are the filesystem's own
            out.append("|".join([*fields[:5], "-", fields[6], "-", fields[1]]))
            continue
        group = sorted(by_inode.get(fields[8], [fields[1]]))
        out.append("|".join([*fields[:8], ",".join(group)]))
    return sorted(out + other)
