"""The upstream eStargz / zstd:chunked fixture layers (made by ctr-remote), as contract cases."""

from __future__ import annotations

from pathlib import Path

from fusefs.config import FetchConfig
from tests.fusefs.contract import Case

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "estargz" / "ctr-remote"

# variant -> ((layer 0 blob, toc digest), (layer 1 blob, toc digest)); from PROVENANCE.md
_LAYERS = {
    "esgz-default": (
        ("46bddd770c1d652e7a65e097d7b4e26d1816b1c9f153b27396ff36d349ecd44b",
         "sha256:1a1d34180f06f164e054690cc59e5b1e8503dd9a33f93d6c38379fd02efd7ff6"),
        ("ff7a4b8d2f2b10e49c757e52230048266f983c5582f03211bb73435c44817b97",
         "sha256:7636d2d4b8b7cc129bdd6d830dacb17881077d87168645c8d4a632df13557719"),
    ),
    "esgz-prefetch": (
        ("660852fa479a5339a2a717d2b1209e6b64720f8590fc5d50d73f391d4e9831ee",
         "sha256:5ce7a1a992fe316a07bdb00e3858258574a66a1b61f03155d45081de32e8ee6e"),
        ("09edca1f526580646a8886776887833dcab88d6e1fd438b3961c184df37be5f7",
         "sha256:f86ae28c4cb895daab77d98ccb9469ab1295b4926f4e8313d2e10364881e0ad5"),
    ),
    "zstdchunked-default": (
        ("1260daad5659009f38c969288abbd637c85d79a47958128dca2bee58b6b633db",
         "sha256:aa850455027971ea08c28b3620ff14036d8320289cda739b43e8c63840756c19"),
        ("714fdc59f5118dbd03131108b5a8ce71675c7bd4ebfc9aac12b2861e9e679fef",
         "sha256:07037290c9ab725b1c50d615df229086002bfcd932bc4d9e069602a086a53c98"),
    ),
}

VARIANTS = tuple(_LAYERS)


def layer_case(variant: str, layer: int) -> Case:
    blob, toc = _LAYERS[variant][layer]
    return Case(f"{variant}-layer{layer}", FIXTURES / variant / "blobs" / "sha256" / blob, toc,
                FIXTURES / f"expected-layer{layer}.tsv")


CASES = tuple(layer_case(v, n) for v in VARIANTS for n in (0, 1))


#: the miss path alone, no speculative fetches: for tests that count the requests a read makes
MISS_ONLY = FetchConfig(speculate_file_bytes=0, speculate_dir_bytes=0)
