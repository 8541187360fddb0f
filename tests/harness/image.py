"""Build the small multi-layer busybox test image deterministically and push it to a registry.

    img = build_image(workdir, registry)        # or the `test_image` pytest fixture
    img.ref                                     # "127.0.0.1:PORT/lazysnap/busybox:v1"
    img.layer_digests, img.diff_ids             # compressed / uncompressed, base layer first
    img.expected                                # {path: TreeEntry}: the merged tree a container sees

Layers (tar + gzip written here, byte-for-byte reproducible; every layer carries the parent
directories of its entries, as containerd and buildkit diffs do):

1. base: /bin/busybox from Debian's busybox-static and a symlink per applet, /etc files, the
   directories runc needs, /data and /opq with files that layer 2 removes.
2. files: a regular file, a symlink, a hardlink, a setuid file, a file with a `user.*` xattr, a
   deep directory, `big_file_size` bytes of incompressible data (for range-fetch tests), a whiteout
   (`data/.wh.gone.txt`) and an opaque directory (`opq/.wh..wh..opq`).
3. top: a small layer that overrides /etc/motd and adds a file.

The image is written as an OCI image layout (`workdir/layout`) and pushed with
`skopeo copy --preserve-digests`; the pushed manifest digest is checked against the local one.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from .procs import HarnessError

__all__ = ["BuiltImage", "LayerEntry", "RegistryEndpoint", "RemoteRegistry", "TreeEntry", "build_image",
           "image_layers"]

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000
XATTR_NAME = "user.lazysnap.test"
XATTR_VALUE = "xattr-from-layer-2"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class RegistryEndpoint(Protocol):
    """Where to push: a harness `Registry` or a `RemoteRegistry` (plain HTTP on loopback)."""

    @property
    def host(self) -> str: ...

    @property
    def auth(self) -> tuple[str, str] | None: ...

    def auth_header(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class RemoteRegistry:
    """A registry the harness did not start (e.g. a benchmark's), reached over plain HTTP."""

    host: str
    auth: tuple[str, str] | None = None

    def auth_header(self) -> dict[str, str]:
        if self.auth is None:
            return {}
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}


@dataclass(frozen=True)
class LayerEntry:
    """One tar entry to write. `kind` is file, dir, symlink, hardlink, whiteout or opaque."""

    path: str
    kind: str
    mode: int = 0o644
    data: bytes = b""
    target: str = ""  # symlink target, or the hardlinked path for hardlinks
    xattrs: dict[str, str] = field(default_factory=dict)
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class TreeEntry:
    """A path of the merged image tree as a container should see it."""

    kind: str  # file, dir or symlink
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)
    hardlink_of: str = ""  # another path of the tree sharing this inode


@dataclass(frozen=True)
class BuiltImage:
    """What `build_image` produced and pushed."""

    ref: str
    host: str
    name: str
    tag: str
    layout: Path
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    layer_sizes: list[int]
    diff_ids: list[str]
    expected: dict[str, TreeEntry]


def _deterministic_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def image_layers(big_file_size: int = 2 << 20) -> list[list[LayerEntry]]:
    """The layer contents described in the module docstring, base layer first."""
    applets = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    base: list[LayerEntry] = [
        LayerEntry("bin", "dir", 0o755),
        LayerEntry("bin/busybox", "file", 0o755, BUSYBOX.read_bytes()),
        *(LayerEntry(f"bin/{a}", "symlink", 0o777, target="busybox")
          for a in sorted(set(applets)) if a != "busybox" and "/" not in a),
        LayerEntry("dev", "dir", 0o755),
        LayerEntry("proc", "dir", 0o555),
        LayerEntry("sys", "dir", 0o555),
        LayerEntry("root", "dir", 0o700),
        LayerEntry("tmp", "dir", 0o1777),
        LayerEntry("etc", "dir", 0o755),
        LayerEntry("etc/passwd", "file", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"
                   b"nobody:x:65534:65534:nobody:/:/bin/false\n"),
        LayerEntry("etc/group", "file", 0o644, b"root:x:0:\nnogroup:x:65534:\n"),
        LayerEntry("etc/motd", "file", 0o644, b"motd from layer 1\n"),
        LayerEntry("data", "dir", 0o755),
        LayerEntry("data/layer1.txt", "file", 0o644, b"hello from layer 1\n"),
        LayerEntry("data/gone.txt", "file", 0o644, b"removed by a whiteout in layer 2\n"),
        LayerEntry("data/owned.txt", "file", 0o640, b"owned by nobody\n", uid=65534, gid=65534),
        LayerEntry("opq", "dir", 0o755),
        LayerEntry("opq/old.txt", "file", 0o644, b"hidden by the opaque dir of layer 2\n"),
        LayerEntry("opq/sub", "dir", 0o755),
        LayerEntry("opq/sub/old2.txt", "file", 0o644, b"also hidden\n"),
    ]
    files: list[LayerEntry] = [
        LayerEntry("data", "dir", 0o755),
        LayerEntry("data/.wh.gone.txt", "whiteout"),
        LayerEntry("data/layer2.txt", "file", 0o644, b"hello from layer 2\n"),
        LayerEntry("data/link", "symlink", 0o777, target="layer2.txt"),
        LayerEntry("data/abs-link", "symlink", 0o777, target="/etc/motd"),
        LayerEntry("data/hard", "hardlink", target="data/layer2.txt"),
        LayerEntry("data/suid", "file", 0o4755, b"#!/bin/sh\necho setuid\n"),
        LayerEntry("data/xattr.txt", "file", 0o644, b"has an xattr\n", xattrs={XATTR_NAME: XATTR_VALUE}),
        LayerEntry("data/empty", "file", 0o600),
        LayerEntry("data/deep", "dir", 0o755),
        LayerEntry("data/deep/a", "dir", 0o750),
        LayerEntry("data/deep/a/b", "dir", 0o755),
        LayerEntry("data/deep/a/b/file.txt", "file", 0o644, b"deep file\n"),
        LayerEntry("data/big.bin", "file", 0o644, _deterministic_bytes(big_file_size, 2)),
        LayerEntry("opq", "dir", 0o755),
        LayerEntry("opq/.wh..wh..opq", "opaque"),
        LayerEntry("opq/new.txt", "file", 0o644, b"only file left in opq\n"),
    ]
    top: list[LayerEntry] = [
        LayerEntry("etc", "dir", 0o755),
        LayerEntry("etc/motd", "file", 0o644, b"motd from layer 3\n"),
        LayerEntry("data", "dir", 0o755),
        LayerEntry("data/layer3.txt", "file", 0o644, b"hello from layer 3\n"),
    ]
    return [base, files, top]


def _tarinfo(e: LayerEntry) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.path + ("/" if e.kind == "dir" else ""))
    ti.mtime = MTIME
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    if e.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, e.target
    elif e.kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, e.target
    elif e.kind in ("whiteout", "opaque"):
        ti.mode = 0o644
    elif e.kind == "file":
        ti.size = len(e.data)
    else:
        raise ValueError(f"unknown entry kind {e.kind!r}")
    if e.xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
    return ti


def write_layer_tar(entries: list[LayerEntry]) -> bytes:
    """The uncompressed tar of one layer, parent directories checked present and first."""
    seen: set[str] = set()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            parent = os.path.dirname(e.path)
            if parent and parent not in seen:
                raise ValueError(f"{e.path}: parent directory {parent} must come earlier in the layer")
            seen.add(e.path)
            ti = _tarinfo(e)
            tar.addfile(ti, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def gzip_bytes(raw: bytes) -> bytes:
    """gzip with a zero mtime and no file name, so equal input gives equal output."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
        gz.write(raw)
    return out.getvalue()


def merge_layers(layers: list[list[LayerEntry]]) -> dict[str, TreeEntry]:
    """Apply layers in order with overlay semantics: whiteouts and opaque dirs hide lower paths."""
    tree: dict[str, TreeEntry] = {}

    def drop_below(prefix: str, include_self: bool) -> None:
        for p in [p for p in tree if p.startswith(prefix + "/") or (include_self and p == prefix)]:
            del tree[p]

    for layer in layers:
        for e in layer:
            d, base = os.path.split(e.path)
            if e.kind == "whiteout":
                drop_below(os.path.join(d, base.removeprefix(".wh.")), include_self=True)
            elif e.kind == "opaque":
                drop_below(d, include_self=False)
        for e in layer:
            if e.kind == "dir":
                tree[e.path] = TreeEntry("dir", e.mode, e.uid, e.gid)
            elif e.kind == "symlink":
                tree[e.path] = TreeEntry("symlink", 0o777, e.uid, e.gid, len(e.target), target=e.target)
            elif e.kind == "file":
                tree[e.path] = TreeEntry("file", e.mode, e.uid, e.gid, len(e.data),
                                         hashlib.sha256(e.data).hexdigest(), xattrs=dict(e.xattrs))
            elif e.kind == "hardlink":
                src = tree[e.target]
                tree[e.path] = TreeEntry(src.kind, src.mode, src.uid, src.gid, src.size, src.sha256,
                                         xattrs=dict(src.xattrs), hardlink_of=e.target)
    return tree


def _go_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return digest, len(data)


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_layout(layout: Path, layers: list[list[LayerEntry]], tag: str,
                     cmd: list[str] | None = None) -> tuple[str, str, list[str], list[int], list[str]]:
    """Write an OCI image layout; return (manifest digest, config digest, layer digests, sizes, diff ids)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    digests, sizes, diff_ids = [], [], []
    for entries in layers:
        raw = write_layer_tar(entries)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        d, n = _put_blob(layout, gzip_bytes(raw))
        digests.append(d)
        sizes.append(n)
    created = "2023-11-14T22:13:20Z"  # MTIME
    config = {
        "architecture": _go_arch(), "os": "linux", "created": created,
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": f"lazysnap test harness layer {i + 1}"}
                    for i in range(len(layers))],
    }
    cfg_digest, cfg_size = _put_blob(layout, _canonical_json(config))
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d, "size": n} for d, n in zip(digests, sizes,
                                                                                          strict=True)],
    }
    man_digest, man_size = _put_blob(layout, _canonical_json(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": man_digest, "size": man_size,
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_bytes(_canonical_json(index))
    return man_digest, cfg_digest, digests, sizes, diff_ids


def push_layout(layout: Path, tag: str, registry: RegistryEndpoint, name: str) -> str:
    """`skopeo copy` the layout's TAG to the registry; return the manifest digest the registry holds."""
    argv = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
    if registry.auth is not None:
        argv.append(f"--dest-creds={registry.auth[0]}:{registry.auth[1]}")
    argv += [f"oci:{layout}:{tag}", f"docker://{registry.host}/{name}:{tag}"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise HarnessError(f"skopeo copy failed ({res.returncode}): {res.stderr.strip()}")
    r = httpx.head(f"http://{registry.host}/v2/{name}/manifests/{tag}",
                   headers={"Accept": OCI_MANIFEST, **registry.auth_header()}, timeout=10)
    r.raise_for_status()
    return r.headers["Docker-Content-Digest"]


def build_image(workdir: Path, registry: RegistryEndpoint, name: str = "lazysnap/busybox", tag: str = "v1",
                big_file_size: int = 2 << 20) -> BuiltImage:
    """Build the test image under `workdir`, push it to `registry`, return what a test compares.

    Raises HarnessError when the push fails or the registry ends up with a different manifest.
    """
    layers = image_layers(big_file_size)
    layout = workdir / "layout"
    man, cfg, digests, sizes, diff_ids = write_oci_layout(layout, layers, tag)
    pushed = push_layout(layout, tag, registry, name)
    if pushed != man:
        raise HarnessError(f"registry holds manifest {pushed}, built {man}: the push rewrote the image")
    return BuiltImage(ref=f"{registry.host}/{name}:{tag}", host=registry.host, name=name, tag=tag,
                      layout=layout, manifest_digest=man, config_digest=cfg, layer_digests=digests,
                      layer_sizes=sizes, diff_ids=diff_ids, expected=merge_layers(layers))



def main(argv: list[str] | None = None) -> int:
    """`python3 -m tests.harness.image HOST`: build the test image and push it to HOST."""
    parser = argparse.ArgumentParser(prog="scripts/build-test-image", description=main.__doc__)
    parser.add_argument("host", help="registry HOST:PORT (plain HTTP)")
    parser.add_argument("--name", default="lazysnap/busybox")
    parser.add_argument("--tag", default="v1")
    parser.add_argument("--big-file-size", type=int, default=2 << 20, help="bytes of /data/big.bin")
    parser.add_argument("--user", help="USER:PASSWORD for basic auth")
    args = parser.parse_args(argv)
    auth: tuple[str, str] | None = None
    if args.user:
        user, _, password = args.user.partition(":")
        auth = (user, password)
    with tempfile.TemporaryDirectory(prefix="lzs-build-") as tmp:
        img = build_image(Path(tmp), RemoteRegistry(args.host, auth), args.name, args.tag,
                          args.big_file_size)
    print(json.dumps({"ref": img.ref, "manifest": img.manifest_digest, "layers": img.layer_digests,
                      "sizes": img.layer_sizes, "diff_ids": img.diff_ids}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
