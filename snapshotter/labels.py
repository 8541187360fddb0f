"""containerd snapshot labels turned into a :class:`~fusefs.spec.LayerSpec`.

Where the layer comes from is read by a chain of small parsers, first match wins: CRI labels
(``cri.image-ref`` + ``cri.layer-digest``), then the legacy stargz labels (``remote/stargz.*``).
Both are completed by the format-neutral ones (``remote/urls``, ``stargz/toc.digest``). Labels are
untrusted: digests must be well-formed, references and URLs bounded and printable, numbers in
range; anything else raises :class:`~snapshotter.errors.LabelError` and the layer is unpacked
normally.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from fusefs.spec import LayerSpec
from snapshotter.errors import LabelError

SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""The name (chain ID) containerd will commit the layer under; required for a remote snapshot."""

PREFIX = "containerd.io/snapshot/"
CRI_IMAGE_REF = PREFIX + "cri.image-ref"
CRI_LAYER_DIGEST = PREFIX + "cri.layer-digest"
CRI_MANIFEST_DIGEST = PREFIX + "cri.manifest-digest"
CRI_IMAGE_LAYERS = PREFIX + "cri.image-layers"  # comma-separated, truncated at 4096 bytes by containerd
STARGZ_REFERENCE = PREFIX + "remote/stargz.reference"
STARGZ_DIGEST = PREFIX + "remote/stargz.digest"
STARGZ_LAYERS = PREFIX + "remote/stargz.layers"
STARGZ_PREFETCH = PREFIX + "remote/stargz.prefetch"  # bytes of the landmark prefix
REMOTE_URLS = PREFIX + "remote/urls"  # comma-separated descriptor URLs, ipfs://<cid> included
TOC_DIGEST = PREFIX + "stargz/toc.digest"

MAX_REF_CHARS = 1024
MAX_URLS = 32
MAX_URL_CHARS = 2048
MAX_NEIGHBOURS = 1024
MAX_PREFETCH_BYTES = 1 << 40
MAX_HINTS = 64

# OCI digest grammar, with the two registered algorithms' exact lengths enforced below.
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_PRINTABLE = re.compile(r"[\x21-\x7e]+")

_CONSUMED = {
    CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, CRI_IMAGE_LAYERS, STARGZ_REFERENCE,
    STARGZ_DIGEST, STARGZ_LAYERS, STARGZ_PREFETCH, REMOTE_URLS, TOC_DIGEST,
    PREFIX + "remote",  # our own mark on committed remote snapshots (snapshotter.remote.REMOTE_LABEL)
}


def parse_digest(value: str, what: str) -> str:
    """A well-formed ``algo:hex`` digest, or LabelError naming the label."""
    if not _DIGEST.fullmatch(value):
        raise LabelError(f"{what}: not a digest: {value[:100]!r}")
    algo, _, hexpart = value.partition(":")
    want = _DIGEST_LENGTHS.get(algo)
    if want is None:
        raise LabelError(f"{what}: unsupported digest algorithm {algo!r}")
    if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise LabelError(f"{what}: {algo} digest must be {want} lowercase hex characters")
    return value


def _ref(value: str, what: str) -> str:
    if not value or len(value) > MAX_REF_CHARS or not _PRINTABLE.fullmatch(value):
        raise LabelError(f"{what}: not a usable image reference: {value[:100]!r}")
    return value


def _digest_list(value: str, what: str) -> tuple[str, ...]:
    items = [v for v in value.split(",") if v]
    if len(items) > MAX_NEIGHBOURS:
        raise LabelError(f"{what}: more than {MAX_NEIGHBOURS} digests")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_digest(item, what))
        except LabelError:
            # containerd truncates this label at 4096 bytes, which can cut the last digest.
            if i == len(items) - 1:
                break
            raise
    return tuple(out)


Source = tuple[str, str, tuple[str, ...]]  # (ref, digest, neighbours)


def _from_cri(labels: Mapping[str, str]) -> Source | None:
    if CRI_IMAGE_REF not in labels or CRI_LAYER_DIGEST not in labels:
        return None
    return (
        _ref(labels[CRI_IMAGE_REF], CRI_IMAGE_REF),
        parse_digest(labels[CRI_LAYER_DIGEST], CRI_LAYER_DIGEST),
        _digest_list(labels.get(CRI_IMAGE_LAYERS, ""), CRI_IMAGE_LAYERS),
    )


def _from_stargz(labels: Mapping[str, str]) -> Source | None:
    if STARGZ_REFERENCE not in labels or STARGZ_DIGEST not in labels:
        return None
    return (
        _ref(labels[STARGZ_REFERENCE], STARGZ_REFERENCE),
        parse_digest(labels[STARGZ_DIGEST], STARGZ_DIGEST),
        _digest_list(labels.get(STARGZ_LAYERS, ""), STARGZ_LAYERS),
    )


SOURCE_PARSERS: tuple[Callable[[Mapping[str, str]], Source | None], ...] = (_from_cri, _from_stargz)


def _urls(value: str) -> tuple[str, ...]:
    urls = [u for u in value.split(",") if u]
    if len(urls) > MAX_URLS:
        raise LabelError(f"{REMOTE_URLS}: more than {MAX_URLS} URLs")
    for u in urls:
        if len(u) > MAX_URL_CHARS or not _PRINTABLE.fullmatch(u) or "://" not in u:
            raise LabelError(f"{REMOTE_URLS}: not a usable URL: {u[:100]!r}")
    return tuple(urls)


def _prefetch(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise LabelError(f"{STARGZ_PREFETCH}: not a byte count: {value[:40]!r}")
    size = int(value)
    if size > MAX_PREFETCH_BYTES:
        raise LabelError(f"{STARGZ_PREFETCH}: {size} bytes is more than {MAX_PREFETCH_BYTES}")
    return size


def layer_spec(labels: Mapping[str, str]) -> LayerSpec | None:
    """The layer the labels describe, or ``None`` when they describe no remote layer.

    Raises:
        LabelError: the labels claim a remote layer but a value is malformed.
    """
    if not labels.get(SNAPSHOT_REF):
        return None
    source = None
    for parser in SOURCE_PARSERS:
        source = parser(labels)
        if source is not None:
            break
    if source is None:
        return None
    ref, digest, neighbours = source
    toc = labels.get(TOC_DIGEST)
    hints = {k: v for k, v in labels.items() if k.startswith(PREFIX) and k not in _CONSUMED}
    if CRI_MANIFEST_DIGEST in labels:
        hints[CRI_MANIFEST_DIGEST] = parse_digest(labels[CRI_MANIFEST_DIGEST], CRI_MANIFEST_DIGEST)
    if len(hints) > MAX_HINTS:
        raise LabelError(f"more than {MAX_HINTS} format-specific labels")
    return LayerSpec(
        ref=ref,
        digest=digest,
        urls=_urls(labels.get(REMOTE_URLS, "")),
        toc_digest=parse_digest(toc, TOC_DIGEST) if toc is not None else None,
        neighbours=neighbours,
        prefetch_size=_prefetch(labels[STARGZ_PREFETCH]) if STARGZ_PREFETCH in labels else None,
        format_hints=hints,
    )
