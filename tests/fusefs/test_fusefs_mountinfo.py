"""mountinfo path fields decode the kernel's octal escapes, and only those."""

from __future__ import annotations

from fusefs.mountinfo import unescape


def test_octal_escapes_become_the_characters_they_name() -> None:
    assert unescape(r"/run/a\040b\011c\012d\134e") == "/run/a b\tc\nd\\e"


def test_fields_without_escapes_and_non_ascii_names_are_unchanged() -> None:
    assert unescape("/var/lib/lazysnap/fuse") == "/var/lib/lazysnap/fuse"
    assert unescape("/tmp/größe\\040x") == "/tmp/größe x"
