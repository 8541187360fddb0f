"""Format readers by name; a new format is a module here plus one entry in ``READERS``."""

from __future__ import annotations

from fusefs.formats.base import FormatReader
from fusefs.formats.estargz import read_estargz

READERS: dict[str, FormatReader] = {
    "estargz": read_estargz,  # eStargz and zstd:chunked (same TOC, two footers)
}

__all__ = ["READERS", "FormatReader"]
