"""``python -m estargz``: inspect, extract and convert eStargz / zstd:chunked blobs.

Library errors become a one-line message on stderr and exit code 1 (2 for usage errors); no
traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ._extract import extract
from ._reader import BlobFile, BlobReader
from ._toc import EntryType
from ._writer import DEFAULT_CHUNK_SIZE, convert_file
from .errors import EstargzError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m estargz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("toc", help="print the TOC digest, entry count and footer kind")
    p.add_argument("blob")
    p = sub.add_parser("ls", help="list the tree: type, mode, uid, gid, size, digest, path")
    p.add_argument("blob")
    p = sub.add_parser("extract", help="extract every file through the TOC, verifying each chunk")
    p.add_argument("blob")
    p.add_argument("dir")
    p = sub.add_parser("convert", help="convert a tar (plain, gzip or zstd) to eStargz")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument(
        "--prioritize",
        metavar="FILE",
        help="paths to put first: one per line, or JSON lines "
        'with a "path" key (ctr-remote --estargz-record-in format)',
    )
    p.add_argument("--zstdchunked", action="store_true", help="write zstd:chunked instead of eStargz")
    p.add_argument("--level", type=int, help="compression level (gzip default 9, zstd default 3)")
    for q in sub.choices.values():
        if q.prog.split()[-1] in ("toc", "ls", "extract"):
            q.add_argument("--toc-digest", help="verify the TOC against this digest first")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        with BlobFile(args.blob) as blob:
            reader = BlobReader(blob.read_at, blob.size, expected_toc_digest=args.toc_digest)
            if args.command == "toc":
                toc = reader.toc
                print(f"digest\t{toc.digest}")
                if toc.manifest_checksum:
                    print(f"manifest-checksum\t{toc.manifest_checksum}")
                print(f"entries\t{len(toc) - 1}")
                print(f"footer\t{reader.footer.kind.value}\t{reader.footer.size}\t{reader.footer.toc_offset}")
                return 0
            if args.command == "ls":
                return _ls(reader)
            extract(reader, args.dir)
            return 0
    except BrokenPipeError:
        sys.stderr.close()  # output piped into head & co: not an error
        return 0
    except (EstargzError, OSError) as exc:
        print(f"estargz: {exc}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    prioritized: list[str] = []
    if args.prioritize:
        with open(args.prioritize, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    prioritized.append(json.loads(line)["path"])
                elif line:
                    prioritized.append(line)
    result = convert_file(
        args.input,
        args.output,
        chunk_size=args.chunk_size,
        level=args.level,
        prioritized=prioritized,
        zstd_chunked=args.zstdchunked,
    )
    print(f"toc-digest\t{result.toc_digest}")
    print(f"diff-id\t{result.diff_id}")
    print(f"uncompressed-size\t{result.uncompressed_size}")
    print(f"blob-digest\t{result.blob_digest}")
    print(f"blob-size\t{result.blob_size}")
    print(f"media-type\t{result.media_type}")
    return 0


def _ls(reader: BlobReader) -> int:
    toc = reader.toc
    for i in toc.iter_tree():
        kind = toc.type(i)
        if kind == EntryType.REG:
            detail = toc.file_digest(i) or ""
        elif kind in (EntryType.SYMLINK, EntryType.HARDLINK):
            detail = "-> " + toc.linkname(i)
        elif kind in (EntryType.CHAR, EntryType.BLOCK):
            major, minor = toc.device(i)
            detail = f"{major}:{minor}"
        else:
            detail = ""
        print(
            f"{kind.label}\t{toc.mode(i):04o}\t{toc.uid(i)}\t{toc.gid(i)}\t{toc.size(i)}\t{detail}\t{toc.path(i)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
