"""JSON-level TOC parsing: the streaming walk over ``entries`` and parsers for single fields.

Every parser here raises ``ValueError`` with a message naming the field (the builder in
``_index.py`` prefixes the entry) or, for the document structure, ``TOCError``.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import re
from collections.abc import Callable
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
    decode = _DECODER.raw_decode
    ws = _WS.match
    top: dict[str, Any] = {}
    seen_entries = False

    def expect(pos: int, char: str, where: str) -> int:
        pos = ws(text, pos).end()  # type: ignore[union-attr]
        if text[pos : pos + 1] != char:
            raise TOCError(f"TOC JSON: expected {char!r} {where} at character {pos}")
        return pos + 1

    pos = expect(0, "{", "at the start")
    pos = ws(text, pos).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            key, pos = decode(text, ws(text, pos).end())  # type: ignore[union-attr]
            if not isinstance(key, str):
                raise TOCError(f"TOC JSON: object key at character {pos} is not a string")
            pos = expect(pos, ":", f"after key {key!r}")
            pos = ws(text, pos).end()  # type: ignore[union-attr]
            if key == "entries":
                if seen_entries:
                    raise TOCError("TOC JSON has two 'entries' keys")
                seen_entries = True
                pos = expect(pos, "[", "to open 'entries'")
                pos = ws(text, pos).end()  # type: ignore[union-attr]
                if text[pos : pos + 1] == "]":
                    pos += 1
                else:
                    separator = _SEPARATOR.match
                    while True:
                        value, pos = decode(text, pos)
                        on_entry(value)
                        m = separator(text, pos)
                        if m is None:
                            raise TOCError(f"TOC JSON: expected ',' or ']' in 'entries' at character {pos}")
                        pos = m.end()
                        if m.group(1) == "]":
                            break
            else:
                if key in top:
                    raise TOCError(f"TOC JSON has two {key!r} keys")
                top[key], pos = decode(text, pos)
            pos = ws(text, pos).end()  # type: ignore[union-attr]
            sep = text[pos : pos + 1]
            pos += 1
            if sep == "}":
                break
            if sep != ",":
                raise TOCError(f"TOC JSON: expected ',' or '}}' at character {pos - 1}")
    if ws(text, pos).end() != len(text):  # type: ignore[union-attr]
        raise TOCError(f"TOC JSON: trailing data after character {pos}")
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


def clean(name: object, field: str) -> list[str]:
    """Path components of a TOC name; refuses what could leave the layer root."""
    if name.__class__ is not str:
        raise ValueError(f"{field} is not a string")
    assert isinstance(name, str)
    if "\x00" in name:
        raise ValueError(f"{field} {name!r} contains a NUL byte")
    if not name.startswith((".", "/")) and "/." not in name and "//" not in name and len(name) <= 63:
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
