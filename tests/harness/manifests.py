"""Push blobs and hand-made variants of an image manifest (e.g. a lying layer annotation) to a
registry.

    digest = push_blob(host, repo, data)                 # monolithic upload
    ref = push_manifest_variant(host, name, manifest, "badtoc",
                                layer_annotations={1: {TOC_DIGEST_ANNOTATION: "sha256:00…"}})

``push_manifest_variant`` keeps the blobs the original manifest references (they are already in
the repository); only the manifest JSON changes, so the new tag names an image with identical
content whose annotations a snapshotter must not trust blindly. ``push_layer_variant`` replaces
one layer's blob, and the config's diff id with it.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import ssl
from collections.abc import Mapping

import httpx

from .procs import HarnessError

__all__ = ["push_blob", "push_layer_variant", "push_manifest_variant"]

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def push_manifest_variant(host: str, name: str, manifest: Mapping[str, object], tag: str,
                          layer_annotations: Mapping[int, Mapping[str, str]]) -> tuple[str, str]:
    """PUT a copy of ``manifest`` as ``name:tag`` with layer ``i``'s annotations updated.

    Returns (the pushed reference, its manifest digest); HarnessError when the registry refuses it.
    """
    doc = copy.deepcopy(dict(manifest))
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise HarnessError("manifest has no layers list")
    for i, changes in layer_annotations.items():
        layer = layers[i]
        layer.setdefault("annotations", {}).update(changes)
    body = json.dumps(doc, separators=(",", ":")).encode()
    media_type = str(doc.get("mediaType") or _OCI_MANIFEST)
    r = httpx.put(f"http://{host}/v2/{name}/manifests/{tag}", content=body,
                  headers={"Content-Type": media_type}, timeout=10)
    if r.status_code != 201:
        raise HarnessError(f"PUT manifest {name}:{tag}: {r.status_code} {r.text[:300]}")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if r.headers.get("Docker-Content-Digest", digest) != digest:
        raise HarnessError(f"registry stored {name}:{tag} as {r.headers['Docker-Content-Digest']}")
    return f"{host}/{name}:{tag}", digest


def push_blob(host: str, repo: str, data: bytes, headers: Mapping[str, str] | None = None,
              scheme: str = "http", verify: ssl.SSLContext | bool = True) -> str:
    """Monolithic upload of ``data`` into ``repo`` (POST, then PUT with the digest); returns the
    digest. HarnessError unless the registry answers 202 then 201."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = f"{scheme}://{host}"
    with httpx.Client(base_url=base, headers=dict(headers or {}), timeout=30, verify=verify) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        if started.status_code != 202:
            raise HarnessError(f"start upload to {repo}: {started.status_code} {started.text[:300]}")
        location = httpx.URL(base).join(started.headers["Location"])
        done = client.put(location.copy_merge_params({"digest": digest}), content=data,
                          headers={"Content-Type": "application/octet-stream"})
        if done.status_code != 201:
            raise HarnessError(f"upload {digest} to {repo}: {done.status_code} {done.text[:300]}")
    return digest


def push_layer_variant(host: str, name: str, manifest: Mapping[str, object], tag: str, index: int,
                       blob: bytes, annotations: Mapping[str, str]) -> str:
    """Push ``name:tag``: ``manifest``'s image with layer ``index`` replaced by ``blob`` (gzip),
    that layer's annotations updated, and the config's diff id of it made to match ``blob``, so
    the image is still consistent for a normal unpack. Returns the pushed reference."""
    doc = copy.deepcopy(dict(manifest))
    config_desc = doc["config"]
    layers = doc["layers"]
    if not isinstance(config_desc, dict) or not isinstance(layers, list):
        raise HarnessError("manifest has no config or layers")
    got = httpx.get(f"http://{host}/v2/{name}/blobs/{config_desc['digest']}", timeout=10)
    got.raise_for_status()
    config = got.json()
    config["rootfs"]["diff_ids"][index] = "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    config_desc.update(digest=push_blob(host, name, config_bytes), size=len(config_bytes))
    layer = layers[index]
    layer.update(digest=push_blob(host, name, blob), size=len(blob))
    doc["layers"] = layers
    ref, _ = push_manifest_variant(host, name, doc, tag, {index: annotations})
    return ref
