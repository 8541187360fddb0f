"""containerd's filter syntax: parsing, quoting and matching."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.errors import InvalidArgument
from snapshotter.filters import parse_all

SNAP = {
    ("kind",): "active",
    ("name",): "/tmp/work/a,b",
    ("parent",): "",
    ("labels", "containerd.io/gc.root"): "x",
    ("labels", "l"): "2",
}


def fields(path: tuple[str, ...]) -> str | None:
    if path[0] == "labels":
        return SNAP.get(("labels", ".".join(path[1:])))
    return SNAP.get(path)


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        ([], True),
        ([""], True),
        (["kind==active"], True),
        (["kind==view"], False),
        (["kind==view", "kind==active"], True),  # several filters are OR'ed
        (["kind==active,labels.l==3"], False),  # selectors in one filter are AND'ed
        (['labels."containerd.io/gc.root"==x'], True),
        (["labels.containerd.io/gc.root"], False),  # unquoted dots split the path (and '/' is illegal)
        (["labels.l"], True),
        (["labels.missing"], False),
        (['parent!=""'], False),
        (['parent==""'], True),
        (["labels.missing!=x"], True),  # absent compares as ""
        (['name=="/tmp/work/a,b"'], True),
        (['name~=/^\\/tmp\\/work/'], True),
        (["name~=|a,b$|"], True),
        (["labels.l ==  2 , kind == active"], True),
        (['name=="\\x2ftmp\\u002fwork/a,b"'], True),
    ],
)
def test_matching(filters: list[str], matches: bool) -> None:
    try:
        flt = parse_all(filters)
    except InvalidArgument:
        assert not matches
        return
    assert flt.matches(fields) is matches


@pytest.mark.parametrize(
    "bad",
    ["name==", "==x", "name=x", "name==a,", "name==/a/", '"unterminated==x', 'name=="\\q"', "name~=/(/",
     "labels.", "name==a b", "kind==active\x00"],
)
def test_malformed_filters_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_all([bad])


@given(st.text(max_size=60))
def test_quoted_values_round_trip(value: str) -> None:
    # Go's %q-style quoting of any value must select exactly that value.
    escaped = "".join({"\\": "\\\\", '"': '\\"', "\n": "\\n"}.get(c, c) for c in value)
    if "\x00" in value:
        return
    flt = parse_all([f'name=="{escaped}"'])
    assert flt.matches(lambda p: value if p == ("name",) else None)
    assert not flt.matches(lambda p: value + "x" if p == ("name",) else None)


@given(st.text(max_size=40))
def test_arbitrary_input_is_parsed_or_invalid_argument(text: str) -> None:
    with contextlib.suppress(InvalidArgument):  # anything else (IndexError...) fails the test
        parse_all([text])
