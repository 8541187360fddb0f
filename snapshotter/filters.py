"""containerd's filter expressions (``List`` / ``Walk``), parsed and matched against snapshot infos.

Syntax, as containerd's ``filters`` package defines it::

    filter    := selector ("," selector)*          every selector must match
    selector  := fieldpath [operator value]        no operator: the field must be present
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | quoted
    operator  := "==" | "!=" | "~="                "~=" is an unanchored regular-expression search
    value     := quoted | a run of characters other than "," and white space
    quoted    := "..." with Go escapes; for "~=" also /.../ or |...|

Several filter strings are OR'ed; none (or an empty string) matches everything. Snapshot fields
are ``kind`` (active, view, committed), ``name``, ``parent`` and ``labels.<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument

MAX_FILTER_CHARS = 64 * 1024
MAX_FILTERS = 256

Fields = Callable[[tuple[str, ...]], str | None]
"""Looks a field path up on one object: its value, or ``None`` when the field is absent."""

_FIELD_CHARS = re.compile(r"[A-Za-z0-9_]+")
_OPERATORS = ("==", "!=", "~=")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@dataclass(frozen=True, slots=True)
class Selector:
    """One ``fieldpath [op value]`` term."""

    fieldpath: tuple[str, ...]
    operator: str | None
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, fields: Fields) -> bool:
        actual = fields(self.fieldpath)
        if self.operator is None:
            return actual is not None
        if self.operator == "==":
            return actual is not None and actual == self.value
        if self.operator == "!=":
            return (actual or "") != self.value
        assert self.pattern is not None
        return self.pattern.search(actual or "") is not None


@dataclass(frozen=True, slots=True)
class Filter:
    """Any of several conjunctions of selectors; the empty filter matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def matches(self, fields: Fields) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(fields) for s in conj) for conj in self.alternatives)


def parse_all(filters: Sequence[str]) -> Filter:
    """Parse several filter strings into one filter matching any of them.

    Raises:
        InvalidArgument: a filter is malformed, too long, or there are too many of them.
    """
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"too many filters ({len(filters)} > {MAX_FILTERS})")
    alternatives: list[tuple[Selector, ...]] = []
    for text in filters:
        if text == "":
            return Filter(())  # an empty filter matches all, so the union does too
        alternatives.append(_Parser(text).parse())
    return Filter(tuple(alternatives))


class _Parser:
    """A recursive-descent parser over one filter string."""

    def __init__(self, text: str) -> None:
        if len(text) > MAX_FILTER_CHARS:
            raise InvalidArgument(f"filter longer than {MAX_FILTER_CHARS} characters")
        if "\x00" in text:
            raise InvalidArgument("filter contains a NUL character")
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error at offset {self.pos} of {self.text!r}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(selectors)
            if ch != ",":
                raise self.error(f"unexpected input {ch!r}")
            self.pos += 1
            selectors.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(path, None)
        op = self.text[self.pos : self.pos + 2]
        if op not in _OPERATORS:
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.pos += 2
        value = self.value(regex=op == "~=")
        if op != "~=":
            return Selector(path, op, value)
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise self.error(f"bad regular expression {value!r}: {exc}") from exc
        return Selector(path, op, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted('"')
        m = _FIELD_CHARS.match(self.text, self.pos)
        if m is None:
            raise self.error("expected a field name or a quoted string")
        self.pos = m.end()
        return m.group()

    def value(self, regex: bool) -> str:
        ch = self.peek()
        if ch == "":
            raise self.error("expected a value")
        if ch == '"' or (regex and ch in "/|"):
            return self.quoted(ch)
        if ch in "/|":
            raise self.error("invalid quote: only ~= takes /.../ or |...|")
        if ch in ",.":
            raise self.error("expected a value")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self, quote: str) -> str:
        """Decode a quoted string starting at ``self.pos`` (Go escapes; alternate quotes keep others)."""
        self.pos += 1
        out: list[str] = []
        text = self.text
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("quoted literal not terminated")
            ch = text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            if self.pos >= len(text):
                raise self.error("quoted literal not terminated")
            esc = text[self.pos]
            self.pos += 1
            if esc == quote:
                out.append(quote)
            elif quote != '"':
                out.append("\\" + esc)  # a regular expression keeps its own escapes
            elif esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
            elif esc in "xuU01234567":
                out.append(self.numeric_escape(esc))
            else:
                raise self.error(f"illegal escape sequence \\{esc}")

    def numeric_escape(self, esc: str) -> str:
        base, width = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}.get(esc, (8, 3))
        start = self.pos - 1 if base == 8 else self.pos
        digits = self.text[start : start + width]
        try:
            code = int(digits, base) if len(digits) == width else -1
        except ValueError:
            code = -1
        if code < 0 or code > 0x10FFFF:
            raise self.error("illegal numeric escape sequence")
        self.pos = start + width
        return chr(code)
