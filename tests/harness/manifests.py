"""Push hand-made variants of an image manifest (e.g. a lying layer annotation) to a registry.

    ref = push_manifest_variant(host, name, manifest, "badtoc",
                                layer_annotations={1: {TOC_DIGEST_ANNOTATION: "sha256:00…"}})

The blobs stay the ones the original manifest references (they are already in the repository);
only the manifest JSON changes, so the new tag names an image with identical content whose
annotations a snapshotter must not trust blindly.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping

import httpx

from .procs import HarnessError

__all__ = ["push_manifest_variant"]

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
