"""Fuzzing footer and TOC parsing: whatever the bytes, only EstargzError subclasses come out.

Bounded to about 30 s in total through ``max_examples``; when a TOC does parse, every accessor
is exercised on every entry, so a half-validated index cannot crash a later reader either.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from esgz_support import make_blob, toc_member
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import estargz
from estargz._footer import estargz_footer, zstd_chunked_footer


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)


PREFIX = bytes(2048)


def _walk(toc: estargz.TOC) -> None:
    for i in range(len(toc)):
        toc.entry(i)
        toc.chunks(i)
        toc.children(i)
        assert toc.lookup(toc.path(i)) in (i, None) or toc.type(i) is not estargz.EntryType.DIR
    list(toc.iter_tree())


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6)
valid_tails = st.sampled_from([estargz_footer(1000), zstd_chunked_footer(1008, 20, 40), estargz_footer(0)])


@fuzz(1500)
@given(tail=st.one_of(st.binary(max_size=64), valid_tails), changes=edits, size=st.integers(0, 1 << 40))
def test_fuzz_footer(tail: bytes, changes: list[tuple[int, int]], size: int) -> None:
    tail = _mutate(tail, changes)
    size = max(size, len(tail))
    tail = (bytes(64) + tail)[-min(size, 64) :]
    try:
        footer = estargz.parse_footer(tail, size)
    except estargz.EstargzError:
        return
    assert 0 <= footer.toc_offset <= footer.toc_end <= size


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 100, 511, 512, 1999, 2047, 2048, 4096, 2**31, 2**63]),
    st.text(max_size=8),
    st.sampled_from(
        [
            "a",
            "a/b",
            "./",
            "/",
            "..",
            "a/../b",
            "dir/",
            "sha256:" + "0" * 64,
            "sha256:" + "ab" * 32,
            "2023-11-14T22:13:20Z",
            "aGVsbG8=",
            "zeros",
            ".prefetch.landmark",
        ]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
entry_keys = st.sampled_from(
    [
        "name",
        "type",
        "size",
        "modtime",
        "linkName",
        "mode",
        "uid",
        "gid",
        "userName",
        "groupName",
        "offset",
        "endOffset",
        "innerOffset",
        "chunkOffset",
        "chunkSize",
        "chunkDigest",
        "chunkType",
        "digest",
        "devMajor",
        "devMinor",
        "xattrs",
        "NumLink",
    ]
)
types = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "bogus"])
entries = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "a/b", "a/b/c", "./", "c/", ".prefetch.landmark", "x/../y"]),
        "type": st.one_of(types, json_values),
    },
    optional={},
).flatmap(
    lambda base: st.dictionaries(entry_keys, json_values, max_size=6).map(lambda extra: {**extra, **base})
)


def _parse(raw: bytes) -> None:
    blob = make_blob(raw, PREFIX)
    footer = estargz.parse_footer(blob[-64:], len(blob))
    try:
        toc = estargz.parse_toc(blob[footer.toc_offset : footer.toc_end], footer)
    except estargz.EstargzError:
        return
    _walk(toc)


@fuzz(300)
@given(items=st.lists(entries, max_size=8), version=st.sampled_from([1, 1, 1, 2, "1", None]))
def test_fuzz_toc_entries(items: list[dict[str, Any]], version: Any) -> None:
    _parse(json.dumps({"version": version, "entries": items}).encode())


@fuzz(400)
@given(doc=json_values, changes=edits)
def test_fuzz_toc_json_shapes(doc: Any, changes: list[tuple[int, int]]) -> None:
    _parse(_mutate(json.dumps({"version": 1, "entries": doc}).encode(), changes))


VALID_TOC = json.dumps(
    {
        "version": 1,
        "entries": [
            {"name": "d/", "type": "dir", "mode": 493},
            {
                "name": "d/f",
                "type": "reg",
                "size": 5,
                "offset": 100,
                "chunkSize": 3,
                "digest": "sha256:" + "ab" * 32,
                "chunkDigest": "sha256:" + "cd" * 32,
            },
            {
                "name": "d/f",
                "type": "chunk",
                "offset": 200,
                "chunkOffset": 3,
                "chunkDigest": "sha256:" + "ef" * 32,
            },
            {"name": "l", "type": "hardlink", "linkName": "d/f"},
            {
                "name": ".no.prefetch.landmark",
                "type": "reg",
                "size": 1,
                "offset": 300,
                "digest": "sha256:" + "12" * 32,
                "chunkDigest": "sha256:" + "12" * 32,
            },
        ],
    }
).encode()


def test_valid_toc_for_mutation_parses() -> None:
    toc = estargz.parse_toc(toc_member(VALID_TOC), _footer_for(VALID_TOC))
    _walk(toc)
    assert toc.nlink(toc.lookup("d/f") or 0) == 2 and toc.no_prefetch_landmark


def _footer_for(raw: bytes) -> estargz.Footer:
    blob = make_blob(raw, PREFIX)
    return estargz.parse_footer(blob[-64:], len(blob))


@fuzz(800)
@given(
    changes=st.lists(st.tuples(st.integers(0, len(VALID_TOC)), st.integers(32, 126)), min_size=1, max_size=4)
)
def test_fuzz_toc_json_bytes(changes: list[tuple[int, int]]) -> None:
    _parse(_mutate(VALID_TOC, changes))


@fuzz(500)
@given(changes=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_compressed_toc_member(changes: list[tuple[int, int]]) -> None:
    member = _mutate(toc_member(VALID_TOC), changes)
    blob = PREFIX + member + estargz_footer(len(PREFIX))
    footer = estargz.parse_footer(blob[-64:], len(blob))
    try:
        toc = estargz.parse_toc(blob[footer.toc_offset : footer.toc_end], footer)
    except estargz.EstargzError:
        return
    _walk(toc)


@pytest.mark.parametrize("codec", list(estargz.Codec))
@fuzz(200)
@given(data=st.binary(max_size=200), inner=st.integers(0, 64), size=st.integers(0, 4096))
def test_fuzz_decode_chunk(codec: estargz.Codec, data: bytes, inner: int, size: int) -> None:
    try:
        out = estargz.decode_chunk(data, codec=codec, inner_offset=inner, size=size, expected_digest=None)
    except estargz.EstargzError:
        return
    assert len(out) == size
