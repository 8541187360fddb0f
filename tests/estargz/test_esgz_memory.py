"""Memory of TOC indexing: the decompressed JSON is walked in pieces, never held whole."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc

import pytest
from esgz_support import FIXTURES

import estargz
import estargz._index as index_module
from estargz._footer import estargz_footer

N = 40_000


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


def test_json_is_never_held_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    member, json_size = _toc_member(N)
    data_end = 100 + 64 * N
    tail = member + estargz_footer(data_end)
    footer = estargz.parse_footer(tail[-64:], data_end + len(tail))
    largest: list[int] = []
    real_finish = index_module._Builder.finish

    def finish(self: index_module._Builder) -> object:
        # the walk is over: nothing as large as the JSON (bytes or text) may be alive
        largest.append(max(t.size for t in tracemalloc.take_snapshot().traces))
        return real_finish(self)

    monkeypatch.setattr(index_module._Builder, "finish", finish)
    tracemalloc.start()
    try:
        toc = estargz.parse_toc(member, footer)
    finally:
        tracemalloc.stop()
    assert len(toc) == N + N // 50 + 1 and toc.json_size == json_size
    assert toc.digest == "sha256:" + __import__("hashlib").sha256(
        gzip.decompress(member)[512:512 + json_size]).hexdigest()
    assert largest and largest[0] < json_size // 4


# -- the piecewise walk gives what the whole text gives, wherever the pieces are cut ----------

FIXTURE_JSON = FIXTURES / "nydus-texture" / "estargz_sample.json"
BIG_FOOTER = estargz.Footer(kind=estargz.FooterKind.ESTARGZ, size=51, toc_offset=1 << 30,
                            toc_end=(1 << 30) + 1)


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _outcome(texts: list[str]) -> object:
    try:
        toc, top = index_module.index_toc_pieces(iter(texts), BIG_FOOTER, codec=estargz.Codec.GZIP)
    except estargz.TOCError as exc:
        return type(exc)
    return ({name: getattr(toc, name) for name in toc.__slots__ if hasattr(toc, name)}, top)


DOCS = [
    FIXTURE_JSON.read_text(),
    json.dumps({"version": 1, "entries": [{"name": "a", "type": "dir"}, {"name": "a/b", "type": "symlink",
                                                                       "linkName": "x" * 300}]},
               indent=7),
    ' \n {  "x" : [ 1 , 2.5e3 , "s" ] ,"version":1,"entries" :[ {"name":"d","type":"dir","mode":493} ] ,'
    '"tail": 12345678901234567890 }  \n ',
    '{"version": 1, "entries": []}',
    '{"version": 1, "entries": [1]}',
    '{"version": 1, "entries": []} trailing',
    '{"version": 1, "entries": [{"name": "a", "type": "dir"} {"name": "b"}]}',
    '{"version": 1, "entries": [{"name": "a", "type": "dir"}',
    '{"version": 12',
]


@pytest.mark.parametrize("doc", range(len(DOCS)))
@pytest.mark.parametrize("ahead", [1, 3, 16])
@pytest.mark.parametrize("size", [1, 2, 5, 64])
def test_pieces_cut_anywhere_give_the_same_toc(doc: int, ahead: int, size: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import estargz._fields as fields

    text = DOCS[doc]
    want = _outcome([text])
    monkeypatch.setattr(fields, "_AHEAD", ahead)
    assert _outcome(_pieces(text, size)) == want
