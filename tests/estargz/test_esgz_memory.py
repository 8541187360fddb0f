"""Memory of TOC indexing: the decompressed JSON is held once while the entries are walked."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc

import pytest

import estargz
import estargz._parse as parse_module
from estargz._footer import estargz_footer


def _toc_member(n: int) -> tuple[bytes, int]:
    entries = [{"name": f"dir{k // 50}/file{k}", "type": "reg", "size": 10, "offset": 100 + 64 * k,
                "digest": "sha256:" + f"{k + 1:064x}", "chunkDigest": "sha256:" + f"{k + 1:064x}",
                "modtime": "2024-03-01T10:00:00Z", "mode": 0o644} for k in range(n)]
    raw = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    return gzip.compress(buf.getvalue(), 1), len(raw)


def test_json_bytes_are_dropped_before_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    member, json_size = _toc_member(20_000)
    data_end = 100 + 64 * 20_000
    tail = member + estargz_footer(data_end)
    footer = estargz.parse_footer(tail[-64:], data_end + len(tail))
    held: list[int] = []
    real = parse_module.index_toc_text

    def index_toc_text(text: str, *args: object, **kwargs: object) -> object:
        held.append(tracemalloc.get_traced_memory()[0])  # the JSON text (and nothing as large)
        return real(text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(parse_module, "index_toc_text", index_toc_text)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        toc = estargz.parse_toc(member, footer)
    finally:
        tracemalloc.stop()
    assert len(toc) == 20_000 + 400 + 1 and toc.json_size == json_size
    # the text is json_size bytes (ASCII); the bytes it came from would be as many again
    assert held and held[0] - before < 1.5 * json_size
