"""Push hand-made variants of an image manifest (e.g. a lying layer annotation) to a registry.

    ref = push_manifest_variant(host, name, manifest, "badtoc",
                                layer_annotations={1: {TOC_DIGEST_ANNOTATION: "sha256:00…"}})

The blobs stay the ones the original manifest references (they are already in the repository);
only the manifest JSON changes, so the new tag names an image with identical content whose
annotations a snapshotter must not trust blindly.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
from collections.abc import Mapping

import httpx

from .procs import HarnessError

__all__ = ["push_layer_variant", "push_manifest_variant"]

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


def _push_blob(host: str, name: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = httpx.post(f"http://{host}/v2/{name}/blobs/uploads/", timeout=10)
    if started.status_code != 202:
        raise HarnessError(f"start upload to {name}: {started.status_code} {started.text[:300]}")
    location = httpx.URL(f"http://{host}").join(started.headers["Location"])
    done = httpx.put(location.copy_merge_params({"digest": digest}), content=data,
                     headers={"Content-Type": "application/octet-stream"}, timeout=30)
    if done.status_code != 201:
        raise HarnessError(f"upload {digest} to {name}: {done.status_code} {done.text[:300]}")
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
    config_desc.update(digest=_push_blob(host, name, config_bytes), size=len(config_bytes))
    layer = layers[index]
    layer.update(digest=_push_blob(host, name, blob), size=len(blob))
    doc["layers"] = layers
    ref, _ = push_manifest_variant(host, name, doc, tag, {index: annotations})
    return ref
