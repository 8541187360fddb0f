"""``snapctl convert``: layer tars and OCI image layouts to eStargz, with the estargz writer.

* :func:`convert_layer`: one tar (plain, gzip or zstd) → one eStargz blob file.
* :func:`convert_layout`: an OCI image layout directory (nested indexes included; attestation
  manifests are dropped) → a new layout whose image manifests
  have eStargz layers annotated with ``containerd.io/snapshot/stargz/toc.digest`` and the
  uncompressed size, and configs with the new diffIDs. Layers that already carry a TOC digest
  annotation are copied as they are.

The input layout is untrusted: blob names must be ``sha256:<64 hex>``, JSON documents are
bounded (``MAX_JSON``), every blob read is checked against its digest and size, indexes nest at
most ``MAX_INDEX_DEPTH`` deep, and unknown media types are refused with a :class:`ConvertError`.
``progress`` is called with the number of source bytes consumed since the previous call.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import estargz

MAX_JSON = 4 << 20
MAX_INDEX_DEPTH = 4
TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
                "application/vnd.oci.image.layer.v1.tar+zstd",
                "application/vnd.docker.image.rootfs.diff.tar.gzip")

Progress = Callable[[int], None]


class ConvertError(Exception):
    """The input cannot be converted; the message says why."""


@dataclass(frozen=True)
class LayerResult:
    source_digest: str
    result: estargz.ConvertResult


class _Counting(io.RawIOBase):
    """A raw reader over a file that hashes and reports what is read."""

    def __init__(self, f: IO[bytes], progress: Progress | None) -> None:
        super().__init__()
        self._f = f
        self._progress = progress
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._f.read(len(buf))
        buf[:len(data)] = data
        self.hash.update(data)
        if self._progress is not None and data:
            self._progress(len(data))
        return len(data)


def convert_layer(src: str, dst: str, progress: Progress | None = None, **options: Any) -> LayerResult:
    """Convert layer tar ``src`` into eStargz blob ``dst`` (written to a temp name, then renamed).

    Raises:
        ConvertError: unreadable input, or what the writer refuses (corrupt tar, escaping names).
    """
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(src, "rb") as f, open(tmp, "wb") as out:
            counting = _Counting(f, progress)
            stream = io.BufferedReader(counting, 1 << 20)
            result = estargz.convert(stream, out, **options)
            while stream.read(1 << 20):  # hash what the tar reader left (padding after the end)
                pass
        os.replace(tmp, dst)
    except estargz.InputError as exc:
        raise ConvertError(f"{src}: {exc}") from None
    except OSError as exc:
        raise ConvertError(f"{exc.filename or src}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return LayerResult("sha256:" + counting.hash.hexdigest(), result)


def is_layout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "oci-layout"))


class _Layout:
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def blob_path(self, digest: str) -> Path:
        m = _DIGEST.fullmatch(digest if isinstance(digest, str) else "")
        if m is None:
            raise ConvertError(f"unsupported or malformed digest {str(digest)[:80]!r}")
        return self.root / "blobs" / "sha256" / m.group(1)

    def read_json(self, desc: dict[str, Any]) -> Any:
        data = self.read_small(desc)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ConvertError(f"blob {desc['digest']} is not JSON: {exc}") from None

    def read_small(self, desc: dict[str, Any]) -> bytes:
        size = desc.get("size")
        if not isinstance(size, int) or not 0 <= size <= MAX_JSON:
            raise ConvertError(f"descriptor {desc.get('digest')!r}: size missing or over {MAX_JSON} bytes")
        path = self.blob_path(desc["digest"])
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_JSON + 1)
        except OSError as exc:
            raise ConvertError(f"{path}: {exc.strerror}") from None
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
            raise ConvertError(f"blob {desc['digest']} does not match its descriptor (size or digest)")
        return data

    def write_blob(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"digest": digest, "size": len(data)}


def layout_layers(src: str) -> list[dict[str, Any]]:
    """Descriptors of every layer of every image manifest in layout ``src`` (for progress totals)."""
    layout = _Layout(src)
    out: list[dict[str, Any]] = []

    def walk(descs: list[dict[str, Any]], depth: int) -> None:
        for desc in descs:
            if _is_attestation(desc):
                continue
            if desc.get("mediaType") in _INDEX_TYPES:
                walk(_index_manifests(layout.read_json(desc), desc["digest"], depth + 1), depth + 1)
            else:
                out.extend(layout.read_json(desc).get("layers", []))

    walk(_top_manifests(layout), 0)
    return out


def _top_manifests(layout: _Layout) -> list[dict[str, Any]]:
    try:
        index = json.loads((layout.root / "index.json").read_bytes()[:MAX_JSON])
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{layout.root}/index.json: {exc}") from None
    return _index_manifests(index, f"{layout.root}/index.json", 0)


def _index_manifests(index: Any, where: str, depth: int) -> list[dict[str, Any]]:
    if depth > MAX_INDEX_DEPTH:
        raise ConvertError(f"{where}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ConvertError(f"{where} lists no manifests")
    for desc in manifests:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise ConvertError(f"{where}: a manifest descriptor is not an object with a digest")
        if desc.get("mediaType") not in _MANIFEST_TYPES + _INDEX_TYPES:
            raise ConvertError(f"{where}: unsupported manifest media type {desc.get('mediaType')!r}")
    return manifests


def _is_attestation(desc: dict[str, Any]) -> bool:
    annotations = desc.get("annotations") or {}
    return bool(annotations.get("vnd.docker.reference.type") == "attestation-manifest")


class _Converter:
    """One layout conversion: converted layers are shared between the manifests that use them."""

    def __init__(self, source: _Layout, target: _Layout, progress: Progress | None,
                 options: dict[str, Any]) -> None:
        self.source = source
        self.target = target
        self.progress = progress
        self.options = options
        self.done: dict[str, tuple[dict[str, Any], str]] = {}  # layer digest → (descriptor, diffID)
        self.results: list[LayerResult] = []

    def descriptors(self, descs: list[dict[str, Any]], depth: int) -> list[dict[str, Any]]:
        # Attestations describe the original manifests, which the converted image no longer has.
        return [self.descriptor(d, depth) for d in descs if not _is_attestation(d)]

    def descriptor(self, desc: dict[str, Any], depth: int) -> dict[str, Any]:
        if desc.get("mediaType") in _INDEX_TYPES:
            index = self.source.read_json(desc)
            index["manifests"] = self.descriptors(_index_manifests(index, desc["digest"], depth + 1),
                                                  depth + 1)
            return {**desc, **self.target.write_blob(_canonical(index))}
        return {**desc, **self.manifest(desc)}

    def manifest(self, desc: dict[str, Any]) -> dict[str, Any]:
        manifest = self.source.read_json(desc)
        layers = manifest.get("layers")
        config_desc = manifest.get("config")
        if not isinstance(layers, list) or not isinstance(config_desc, dict):
            raise ConvertError(f"manifest {desc['digest']} has no layers or config")
        config = self.source.read_json(config_desc)
        diff_ids = config.get("rootfs", {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise ConvertError(f"config {config_desc['digest']}: diff_ids do not match the layers")
        new_layers = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
                raise ConvertError(f"manifest {desc['digest']}: a layer descriptor is not an object")
            if layer["digest"] not in self.done:
                self.done[layer["digest"]] = _convert_one(self.source, self.target, layer, diff_ids[i],
                                                          self.results, self.progress, self.options)
            new_desc, diff_ids[i] = self.done[layer["digest"]]
            new_layers.append(new_desc)
        manifest["config"] = {**config_desc, **self.target.write_blob(_canonical(config))}
        manifest["layers"] = new_layers
        manifest.setdefault("mediaType", desc["mediaType"])
        return self.target.write_blob(_canonical(manifest))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def convert_layout(src: str, dst: str, progress: Progress | None = None,
                   **options: Any) -> list[LayerResult]:
    """Convert OCI layout ``src`` into a new layout ``dst`` (must not exist); returns the layers done.

    Nested indexes (multi-platform images) are converted recursively; attestation manifests
    are dropped, since they describe manifests the new layout does not have.

    Raises:
        ConvertError: see the module docstring.
    """
    if os.path.exists(dst):
        raise ConvertError(f"{dst} already exists")
    source = _Layout(src)
    manifests = _top_manifests(source)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(os.path.abspath(dst))))
    try:
        converter = _Converter(source, _Layout(str(work)), progress, options)
        new_index = converter.descriptors(manifests, 0)
        (work / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": new_index}))
        (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        os.rename(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return converter.results


def _convert_one(source: _Layout, target: _Layout, layer: dict[str, Any], diff_id: str,
                 results: list[LayerResult], progress: Progress | None,
                 options: dict[str, Any]) -> tuple[dict[str, Any], str]:
    src_path = source.blob_path(layer["digest"])
    annotations = layer.get("annotations") or {}
    if layer.get("mediaType") not in _LAYER_TYPES:
        raise ConvertError(f"layer {layer['digest']}: unsupported media type {layer.get('mediaType')!r}")
    if TOC_ANNOTATION in annotations:  # already eStargz: copy it
        dst_path = target.blob_path(layer["digest"])
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_path, dst_path)
        return layer, diff_id
    tmp = target.root / "blobs" / f".layer-{layer['digest'][7:19]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    res = convert_layer(str(src_path), str(tmp), progress, **options)
    if res.source_digest != layer["digest"]:
        raise ConvertError(f"layer blob {layer['digest']} does not match its digest "
                           f"(read {res.source_digest})")
    final = target.blob_path(res.result.blob_digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    results.append(res)
    desc = {"mediaType": res.result.media_type, "digest": res.result.blob_digest,
            "size": res.result.blob_size, "annotations": {**annotations, **res.result.annotations()}}
    return desc, res.result.diff_id
