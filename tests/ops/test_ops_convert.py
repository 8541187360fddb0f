"""snapctl convert: a layer tar to an eStargz blob, and an OCI image layout to an eStargz layout
that skopeo pushes to a real registry and lazysnapd then mounts lazily through containerd."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import estargz
from tests.harness import BuiltImage, Containerd, Lazysnapd, Registry
from tests.harness.image import push_layout
from tests.ops.conftest import QUIET_CONFIG

pytestmark = pytest.mark.e2e


def _snapctl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("snapctl")
    assert exe, "snapctl is not on PATH (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _json(layout: Path, digest: str) -> Any:
    return json.loads(_blob(layout, digest).read_bytes())


def _reader(path: Path, toc_digest: str) -> estargz.BlobReader:
    f = estargz.BlobFile(path)
    return estargz.BlobReader(f.read_at, path.stat().st_size, expected_toc_digest=toc_digest)


def test_convert_a_layer_tar(test_image: BuiltImage, tmp_path: Path) -> None:
    src = _blob(test_image.layout, test_image.layer_digests[2])  # gzip tar of layer 3
    out = tmp_path / "layer.esgz"
    res = _snapctl("convert", str(src), str(out), "--json")
    assert res.returncode == 0, res.stderr
    layer = json.loads(res.stdout)["layers"][0]
    assert layer["source"] == test_image.layer_digests[2]
    assert layer["blob_digest"] == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    assert layer["diff_id"] != test_image.diff_ids[2]  # a new tar stream (landmark, TOC entries)
    assert layer["diff_id"] == "sha256:" + hashlib.sha256(gzip.decompress(out.read_bytes())).hexdigest()
    reader = _reader(out, layer["toc_digest"])
    assert reader.read_file("data/layer3.txt") == b"hello from layer 3\n"

    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar" * 100))
    res = _snapctl("convert", str(bad), str(tmp_path / "bad.esgz"))
    assert res.returncode == 2 and "convert:" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "bad.esgz").exists()


def test_convert_an_image_layout_and_mount_it_lazily(
        test_image: BuiltImage, registry: Registry, make_lazysnapd: Callable[..., Lazysnapd],
        make_containerd: Callable[..., Containerd], tmp_path: Path) -> None:
    img = test_image
    out = tmp_path / "esgz-layout"
    res = _snapctl("convert", str(img.layout), str(out), "--json")
    assert res.returncode == 0, res.stderr
    converted = json.loads(res.stdout)["layers"]
    assert [c["source"] for c in converted] == img.layer_digests

    index = json.loads((out / "index.json").read_text())
    manifest = _json(out, index["manifests"][0]["digest"])
    config = _json(out, manifest["config"]["digest"])
    assert config["rootfs"]["diff_ids"] == [c["diff_id"] for c in converted]
    for desc, conv in zip(manifest["layers"], converted, strict=True):
        toc = desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        assert toc == conv["toc_digest"] and desc["digest"] == conv["blob_digest"]
        path = _blob(out, desc["digest"])
        assert desc["size"] == path.stat().st_size
        _reader(path, toc)  # the TOC verifies against the annotation

    ref_name = f"{img.name}-snapctl"
    push_layout(out, img.tag, registry, ref_name)
    ref = f"{registry.host}/{ref_name}:{img.tag}"
    snapd = make_lazysnapd(config=QUIET_CONFIG)
    ctd = make_containerd(proxy_socket=snapd.address, registries=[registry.host])
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
    res = _snapctl("layers", "--control", str(snapd.root / "control.sock"), "--json")
    assert res.returncode == 0, res.stderr
    layers = {layer["digest"]: layer for layer in json.loads(res.stdout)}
    assert set(layers) == {c["blob_digest"] for c in converted}  # every layer mounted lazily
    mount = Path(layers[converted[1]["blob_digest"]]["mountpoints"][0])
    assert (mount / "data/layer2.txt").read_bytes() == b"hello from layer 2\n"
    assert ctd.run(ref, ["cat", "/data/layer3.txt"], "lazysnap") == "hello from layer 3\n"


def test_convert_refuses_a_layout_whose_blob_lies(test_image: BuiltImage, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(test_image.layout, layout)
    blob = _blob(layout, test_image.layer_digests[2])
    raw = gzip.decompress(blob.read_bytes())
    blob.write_bytes(gzip.compress(raw.replace(b"hello from layer 3", b"HELLO FROM LAYER 3")))
    res = _snapctl("convert", str(layout), str(tmp_path / "out"))
    assert res.returncode == 2 and "does not match its digest" in res.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in res.stderr


def _put(layout: Path, value: object) -> dict[str, Any]:
    data = json.dumps(value).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def test_convert_a_multi_platform_layout(test_image: BuiltImage, tmp_path: Path) -> None:
    # index.json → image index → (the image manifest, an attestation manifest)
    layout = tmp_path / "layout"
    shutil.copytree(test_image.layout, layout)
    top = json.loads((layout / "index.json").read_text())
    image = dict(top["manifests"][0], platform={"architecture": "amd64", "os": "linux"})
    attestation = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                   **_put(layout, {"schemaVersion": 2, "layers": []}),
                   "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                   "vnd.docker.reference.digest": image["digest"]}}
    nested = {"mediaType": "application/vnd.oci.image.index.v1+json",
              **_put(layout, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                              "manifests": [image, attestation]})}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [nested]}))

    out = tmp_path / "out"
    res = _snapctl("convert", str(layout), str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["layers"]) == 3
    index_desc = json.loads((out / "index.json").read_text())["manifests"][0]
    index = _json(out, index_desc["digest"])
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]  # attestation dropped
    manifest = _json(out, index["manifests"][0]["digest"])
    for desc in manifest["layers"]:
        _reader(_blob(out, desc["digest"]), desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"])
    res = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{out}"], capture_output=True, text=True,
                         timeout=60)  # skopeo reads the new layout
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["manifests"][0]["digest"] == index["manifests"][0]["digest"]
