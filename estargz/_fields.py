"""JSON-level TOC parsing: the streaming walk over ``entries`` and parsers for single fields.

Every parser here raises ``ValueError`` with a message naming the field (the builder in
``_index.py`` prefixes the entry) or, for the document structure, ``TOCError``.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from .errors import TOCError

__all__ = [
    "MAX_PATH",
    "MAX_U32",
    "MAX_U63",
    "NO_DIGEST",
    "clean",
    "digest_bytes",
    "parse_time",
    "parse_xattrs",
    "uint",
    "walk_json",
    "walk_json_pieces",
    "within_limits",
]

MAX_PATH = 4096
_MAX_NAME = 255
MAX_U32 = (1 << 32) - 1
MAX_U63 = (1 << 63) - 1
NO_DIGEST = bytes(32)
_WS = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):(\d\d))"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _reject(*_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject)


def walk_json(text: str, on_entry: Callable[[Any], None]) -> dict[str, Any]:
    """Call ``on_entry`` for each element of the top-level ``entries``; return the other keys."""
    return walk_json_pieces(iter((text,)), on_entry)


_AHEAD = 64 << 10  # text kept ahead of the walk while more is to come (entries are far smaller)


class _NeedMore(Exception):
    pass


class _Window:
    """The part of a streamed JSON text the walk still needs: ``text`` starts at ``base``."""

    __slots__ = ("base", "eof", "pieces", "text")

    def __init__(self, pieces: Iterator[str]) -> None:
        self.pieces = pieces
        self.text = ""
        self.base = 0
        self.eof = False

    def advance(self, pos: int, ahead: int) -> int:
        """Drop the text before ``pos`` and read on until ``ahead`` characters follow it (or the
        end); returns the position of the same character in the new ``text`` (0)."""
        parts = [self.text[pos:]]
        have = len(parts[0])
        while have < ahead and not self.eof:
            piece = next(self.pieces, None)
            if piece is None:
                self.eof = True
            else:
                parts.append(piece)
                have += len(piece)
        self.base += pos
        self.text = "".join(parts) if len(parts) > 1 else parts[0]
        return 0


def walk_json_pieces(pieces: Iterator[str], on_entry: Callable[[Any], None]) -> dict[str, Any]:
    """:func:`walk_json` over a text that arrives in pieces (e.g. as it is decompressed).

    Only a window of the text is held: what follows the current position, at least ``_AHEAD``
    characters of it while more is to come, more when one value is larger. A value or separator
    cut by the end of the window is read again with more text, so the pieces may split the
    text anywhere. Error positions count from the start of the whole text.
    """
    decode = _DECODER.raw_decode
    ws = _WS.match
    separator = _SEPARATOR.match
    win = _Window(pieces)
    top: dict[str, Any] = {}
    seen_entries = False
    text = ""
    pos = 0

    def ahead(pos: int, n: int = _AHEAD) -> int:
        nonlocal text
        if len(text) - pos < n and not win.eof:
            pos = win.advance(pos, n)
            text = win.text
        return pos

    def more(pos: int) -> int:
        """Read on after a cut: at least twice what is left, so a long value costs log steps."""
        nonlocal text
        pos = win.advance(pos, 2 * (len(text) - pos) + _AHEAD)
        text = win.text
        return pos

    def skip_ws(pos: int) -> int:
        pos = ahead(pos)
        end = ws(text, pos).end()  # type: ignore[union-attr]
        while end == len(text) and not win.eof:
            pos = more(end)
            end = ws(text, pos).end()  # type: ignore[union-attr]
        return end

    def value_at(pos: int) -> tuple[Any, int]:
        pos = skip_ws(pos)
        while True:
            try:
                value, end = decode(text, pos)
            except json.JSONDecodeError as exc:
                if win.eof:
                    raise json.JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
                pos = more(pos)
                continue
            if end == len(text) and not win.eof:  # a number may go on in the next piece
                pos = more(pos)
                continue
            return value, end

    def expect(pos: int, char: str, where: str) -> int:
        pos = skip_ws(pos)
        if text[pos : pos + 1] != char:
            raise TOCError(f"TOC JSON: expected {char!r} {where} at character {win.base + pos}")
        return pos + 1

    pos = expect(0, "{", "at the start")
    pos = skip_ws(pos)
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            key, pos = value_at(skip_ws(pos))
            if not isinstance(key, str):
                raise TOCError(f"TOC JSON: object key at character {win.base + pos} is not a string")
            pos = expect(pos, ":", f"after key {key!r}")
            pos = skip_ws(pos)
            if key == "entries":
                if seen_entries:
                    raise TOCError("TOC JSON has two 'entries' keys")
                seen_entries = True
                pos = expect(pos, "[", "to open 'entries'")
                pos = skip_ws(pos)
                if text[pos : pos + 1] == "]":
                    pos += 1
                else:
                    while True:
                        # the hot path: one entry, then ',' or ']' (whitespace on both sides)
                        if len(text) - pos < _AHEAD and not win.eof:
                            pos = ahead(pos)
                        try:
                            value, pos = decode(text, pos)
                            if pos == len(text) and not win.eof:
                                raise _NeedMore
                        except (json.JSONDecodeError, _NeedMore):
                            value, pos = value_at(pos)
                        on_entry(value)
                        m = separator(text, pos)
                        if m is None:  # whitespace may run on into the next piece
                            pos = skip_ws(pos)
                            m = separator(text, pos)
                            if m is None:
                                at = win.base + pos
                                raise TOCError(f"TOC JSON: expected ',' or ']' in 'entries' "
                                               f"at character {at}")
                        pos = m.end()
                        if m.group(1) == "]":
                            break
            else:
                if key in top:
                    raise TOCError(f"TOC JSON has two {key!r} keys")
                top[key], pos = value_at(pos)
            pos = skip_ws(pos)
            sep = text[pos : pos + 1]
            pos += 1
            if sep == "}":
                break
            if sep != ",":
                raise TOCError(f"TOC JSON: expected ',' or '}}' at character {win.base + pos - 1}")
    if skip_ws(pos) != len(text) or not win.eof:
        raise TOCError(f"TOC JSON: trailing data after character {win.base + pos}")
    if not seen_entries:
        raise TOCError("TOC JSON has no 'entries' array")
    return top


def parse_time(value: str) -> tuple[int, int]:
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise ValueError(f"modtime {value!r} is not RFC 3339")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    frac = m.group(7) or ""
    if m.group(8):
        offset = 0
    else:
        sign = -1 if m.group(9) == "-" else 1
        offset = sign * (int(m.group(10)) * 3600 + int(m.group(11)) * 60)
    if second == 60:
        second = 59
    when = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    seconds = (when - _EPOCH) // dt.timedelta(seconds=1) - offset
    return seconds, int(frac.ljust(9, "0")) if frac else 0


def digest_bytes(value: object, field: str) -> bytes:
    if (
        value.__class__ is not str
        or len(value) != 71
        or not value.startswith("sha256:")
        or not value.islower()
    ):
        raise ValueError(f"{field} {value!r} is not sha256:<64 lowercase hex digits>")
    try:
        raw = bytes.fromhex(value[7:])
    except ValueError:
        raise ValueError(f"{field} {value!r} is not sha256:<64 lowercase hex digits>") from None
    if len(raw) != 32:  # fromhex skips whitespace: 64 characters that hold fewer bytes
        raise ValueError(f"{field} {value!r} is not sha256:<64 lowercase hex digits>")
    if raw == NO_DIGEST:
        raise ValueError(f"{field} is the all-zero digest")
    return raw


def within_limits(name: str) -> bool:
    """Whether ``name`` is too short for any of its components or itself to break a byte limit:
    at most 63 characters (4 UTF-8 bytes each: 252 bytes), or at most 255 ASCII ones."""
    return len(name) <= _MAX_NAME // 4 or (len(name) <= _MAX_NAME and name.isascii())


def clean(name: object, field: str) -> list[str]:
    """Path components of a TOC name; refuses what could leave the layer root."""
    if name.__class__ is not str:
        raise ValueError(f"{field} is not a string")
    assert isinstance(name, str)
    if "\x00" in name:
        raise ValueError(f"{field} {name!r} contains a NUL byte")
    if not name.startswith((".", "/")) and "/." not in name and "//" not in name and within_limits(name):
        # Fast path (nearly every name): no "." or ".." component, no empty component, and too
        # short for any length limit to matter.
        return name.rstrip("/").split("/") if name else []
    if name.startswith("/") and name.strip("/"):
        raise ValueError(f"{field} {name!r} is absolute")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"{field} {name!r} contains '..'")
    if len(name.encode("utf-8")) > MAX_PATH:
        raise ValueError(f"{field} is longer than {MAX_PATH} bytes")
    for p in parts:
        if len(p.encode("utf-8")) > _MAX_NAME:
            raise ValueError(f"{field} has a component longer than {_MAX_NAME} bytes")
    return parts


def uint(e: dict[str, Any], key: str, limit: int) -> int:
    v = e.get(key, 0)
    if type(v) is not int or v < 0 or v > limit:
        raise ValueError(f"{key} {v!r} is not an integer in [0, {limit}]")
    return v


def parse_xattrs(raw: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(raw, dict):
        raise ValueError("xattrs is not an object")
    out = []
    for k, v in raw.items():
        if not k or "\x00" in k or len(k) > 255 or not isinstance(v, str):
            raise ValueError(f"xattr {k[:64]!r} has an invalid name or a non-string value")
        try:
            out.append((k, binascii.a2b_base64(v, strict_mode=True)))
        except binascii.Error as exc:
            raise ValueError(f"xattr {k!r} is not valid base64: {exc}") from None
    return tuple(sorted(out))
