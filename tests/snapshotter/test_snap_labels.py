"""containerd labels -> LayerSpec: the parser chain, and refusal of malformed values."""

from __future__ import annotations

import pytest

from fusefs.spec import LayerSpec
from snapshotter import labels as L
from snapshotter.errors import LabelError

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")
REF = "127.0.0.1:5000/lib/app:v1"


def cri(**extra: str) -> dict[str, str]:
    return {L.SNAPSHOT_REF: "chain", L.CRI_IMAGE_REF: REF, L.CRI_LAYER_DIGEST: D1, **extra}


def test_cri_labels() -> None:
    spec = L.layer_spec(cri(**{L.CRI_IMAGE_LAYERS: f"{D1},{D2}", L.CRI_MANIFEST_DIGEST: D3,
                               L.TOC_DIGEST: D2, L.REMOTE_URLS: "ipfs://bafy,https://m.example/b"}))
    assert spec == LayerSpec(ref=REF, digest=D1, neighbours=(D1, D2), toc_digest=D2,
                             urls=("ipfs://bafy", "https://m.example/b"))
    assert spec.format_hints == {L.CRI_MANIFEST_DIGEST: D3}


def test_stargz_labels_and_prefetch() -> None:
    spec = L.layer_spec({L.SNAPSHOT_REF: "c", L.STARGZ_REFERENCE: REF, L.STARGZ_DIGEST: D2,
                         L.STARGZ_LAYERS: f"{D1},{D2}", L.STARGZ_PREFETCH: "4096"})
    assert spec is not None and (spec.digest, spec.neighbours, spec.prefetch_size) == (D2, (D1, D2), 4096)


def test_cri_wins_over_stargz() -> None:
    spec = L.layer_spec(cri(**{L.STARGZ_REFERENCE: "other/ref:x", L.STARGZ_DIGEST: D2}))
    assert spec is not None and (spec.ref, spec.digest) == (REF, D1)


def test_unknown_snapshot_labels_pass_through_as_format_hints() -> None:
    nydus = "containerd.io/snapshot/nydus-bootstrap"
    spec = L.layer_spec(cri(**{nydus: "true", "containerd.io/snapshot/remote": "remote snapshot",
                               "other.io/x": "y"}))
    assert spec is not None and spec.format_hints == {nydus: "true"}


@pytest.mark.parametrize(
    "labels",
    [
        {},
        {L.CRI_IMAGE_REF: REF, L.CRI_LAYER_DIGEST: D1},  # no snapshot.ref: not a layer unpack
        {L.SNAPSHOT_REF: "chain"},
        {L.SNAPSHOT_REF: "chain", L.CRI_IMAGE_REF: REF},  # half a source
    ],
)
def test_no_remote_layer(labels: dict[str, str]) -> None:
    assert L.layer_spec(labels) is None


def test_truncated_image_layers_label_drops_the_cut_digest() -> None:
    spec = L.layer_spec(cri(**{L.CRI_IMAGE_LAYERS: f"{D1},{D2},sha256:abc"}))
    assert spec is not None and spec.neighbours == (D1, D2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({L.CRI_LAYER_DIGEST: "sha256:xyz"}, "cri.layer-digest"),
        ({L.CRI_LAYER_DIGEST: "sha256:" + "A" * 64}, "lowercase hex"),
        ({L.CRI_LAYER_DIGEST: "md5:" + "a" * 32}, "unsupported digest algorithm"),
        ({L.CRI_IMAGE_REF: "bad ref with spaces"}, "image reference"),
        ({L.CRI_IMAGE_REF: "r" * 5000}, "image reference"),
        ({L.CRI_IMAGE_LAYERS: f"sha256:nope,{D1}"}, "cri.image-layers"),
        ({L.TOC_DIGEST: "sha256:../../etc"}, "toc.digest"),
        ({L.REMOTE_URLS: "no-scheme"}, "remote/urls"),
        ({L.REMOTE_URLS: ",".join(["https://x/y"] * 40)}, "more than"),
        ({L.STARGZ_PREFETCH: "-1"}, "stargz.prefetch"),
        ({L.STARGZ_PREFETCH: str(1 << 50)}, "stargz.prefetch"),
        ({L.CRI_MANIFEST_DIGEST: "nope"}, "cri.manifest-digest"),
    ],
)
def test_malformed_values_raise_label_error(extra: dict[str, str], message: str) -> None:
    with pytest.raises(LabelError, match=message):
        L.layer_spec(cri(**extra))
