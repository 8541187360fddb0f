"""Which files of a layer a Python module is about to import.

A Python program imports its modules one after another, each a file read on first use: on a
lazily fetched layer, a round trip each, in series (numpy's import is ~90 of them). The names
a module imports are in its bytes, so the files they resolve to in the same layer can be
fetched together as soon as the module itself has been: one round trip per level of the import
tree instead of one per module.

Nothing here executes or unmarshals layer bytes. A compiled module (``.pyc``) is scanned for
the short ASCII strings of the marshal format that spell a dotted identifier (every name its
code uses, imports among them); a source module for its ``import`` and ``from`` statements.
A name counts only if it resolves to a module file of the layer, relative to the module's
package or to its ``sys.path`` root (the directory above its outermost package), the way the
import system looks for it: a package directory's ``__init__``, a ``__pycache__`` file of the
reading module's cache tag, a ``.py`` file or an extension module. Names that are attributes
rather than imports resolve to nothing mostly, and a few to a module of the package that is
fetched for nothing: the price of reading no bytecode.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fusefs.index import LayerIndex, NodeId

_SOURCE_IMPORT = re.compile(
    rb"^([ \t]*)(?:from[ \t]+([.\w]+)[ \t]+import[ \t]+(?:\(([^)]{0,4096})\)|([\w \t,]*))"
    rb"|import[ \t]+([\w. \t,]+))",
    re.MULTILINE)
_COMMENT = re.compile(rb"#[^\n]*")
_MARGIN_STATEMENT = re.compile(rb"^(?:(def|class|async|@)|[^\s#])", re.MULTILINE)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z")
_PYC_HEADER = 16  # magic, flags, then source mtime and size (or source hash)
_MAX_DEPTH = 200
# marshal type codes (the high bit of each is the reference flag)
_REF, _CODE, _LONG, _DICT, _NULL, _BYTES, _SMALL_TUPLE = b"rcl{0s)"
_FLOAT_TEXT, _COMPLEX_TEXT = b"fx"
_EXTENDED_ARG = 144  # CPython 3.8-3.12 opcodes
_IMPORT_OPS = frozenset((108, 109))  # IMPORT_NAME, IMPORT_FROM
_SHORT_STRINGS = frozenset(b"zZ")
_COUNTED = frozenset(b"sautA")
_SEQUENCES = frozenset(b")([<>")
_FIXED = {kind: size for kind, size in zip(b"0NFTS.igy", (0, 0, 0, 0, 0, 0, 4, 8, 16), strict=True)}
_PYCACHE = b"__pycache__"
_CPYTHON_TAG = re.compile(rb"cpython-(3)(\d+)(?:\..*)?")
_INIT = b"__init__"


@dataclass(frozen=True)
class Module:
    """A module file of a layer: compiled (``tag`` is its cache tag) or source (``tag`` None)."""

    node: NodeId
    directory: NodeId  # the directory the module's name lives in (above ``__pycache__``)
    tag: bytes | None


def compiled_names(data: bytes) -> set[str]:
    """The modules a ``.pyc``'s module-level code imports when it runs.

    ``import a.b`` names ``a.b``; ``from .m import c`` names ``m`` and ``c`` (which may be a
    module of ``m``); imports inside functions and classes (done lazily, if ever) are not among
    them. Read from the outermost code object's bytecode (the names its ``IMPORT_NAME`` and
    ``IMPORT_FROM`` instructions take) for CPython 3.8 to 3.12; for 3.13, whose instructions are
    numbered differently, every name of that code object (its ``co_names``: the imports with the
    globals and attributes it uses). Empty for a file that is not such a compiled module, or
    whose marshal data does not parse.
    """
    if len(data) < _PYC_HEADER or data[2:4] != b"\r\n":
        return set()
    magic = int.from_bytes(data[:2], "little")
    if not 3400 <= magic < 3600:
        return set()
    try:
        code, names = _Marshal(data, _PYC_HEADER, legacy=magic < 3450).module_code()
        if magic < 3550 and code is not None:
            names = _imported(code, names)
        text = (name.decode("utf-8", "surrogatepass") for name in names)
        return {name for name in text if _IDENTIFIER.match(name)}
    except (_Malformed, IndexError, UnicodeDecodeError):
        return set()


def _imported(code: bytes, names: list[bytes]) -> list[bytes]:
    """The names that the import instructions of ``code`` (CPython 3.8-3.12 wordcode) take."""
    out: list[bytes] = []
    extended = 0
    for pos in range(0, len(code) - 1, 2):
        op, arg = code[pos], code[pos + 1] | extended
        if op == _EXTENDED_ARG:
            extended = arg << 8
            continue
        extended = 0
        if op in _IMPORT_OPS and arg < len(names):
            out.append(names[arg])
    return out


class _Malformed(Exception):
    pass


class _Marshal:
    """Walks marshal data without building objects, to find the module code's ``co_names``.

    Strings may be written once and referred to later by number (``r``): each value written
    with the reference flag takes the next number, in the order the values begin.
    """

    def __init__(self, data: bytes, offset: int, *, legacy: bool) -> None:
        self._data = data
        self._pos = offset
        self._legacy = legacy  # CPython 3.8-3.10's code object layout
        self._refs: list[bytes | list[bytes] | None] = []

    def module_code(self) -> tuple[bytes | None, list[bytes]]:
        """The outermost code object's bytecode (None if it is not plain bytes) and names."""
        if self._data[self._pos] & 0x7F != _CODE:
            raise _Malformed("not a code object")
        self._pos += 1
        if self._data[self._pos - 1] & 0x80:
            self._refs.append(None)
        self._take(4 * (6 if self._legacy else 5))  # argument counts, stack size, flags
        code = None
        if self._data[self._pos] & 0x7F == _BYTES:
            if self._data[self._pos] & 0x80:
                self._refs.append(None)  # bytes: never looked up by reference here
            length = self._long_at(self._pos + 1)
            if length < 0:
                raise _Malformed("negative length")
            code = self._take(length + 5)[5:]
        else:
            self._value(1)
        self._value(1)  # constants: nested code objects among them
        names = self._value(1)
        return code, names if isinstance(names, list) else []

    def _long_at(self, pos: int) -> int:
        if pos + 4 > len(self._data):
            raise _Malformed("truncated")
        return int.from_bytes(self._data[pos:pos + 4], "little", signed=True)

    def _long(self) -> int:
        end = self._pos + 4
        if end > len(self._data):
            raise _Malformed("truncated")
        value = int.from_bytes(self._data[self._pos:end], "little", signed=True)
        self._pos = end
        return value

    def _take(self, length: int) -> bytes:
        end = self._pos + length
        if length < 0 or end > len(self._data):
            raise _Malformed("truncated")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def _value(self, depth: int) -> bytes | list[bytes] | None:
        """Skip one value; return it if it is a string (its bytes), or a tuple's strings."""
        if depth > _MAX_DEPTH:
            raise _Malformed("nested too deeply")
        data = self._data
        pos = self._pos
        code = data[pos]
        kind = code & 0x7F
        pos += 1
        if kind == _REF:  # the commonest first
            index = int.from_bytes(data[pos:pos + 4], "little")
            self._pos = pos + 4
            if index >= len(self._refs):
                raise _Malformed("bad reference")
            return self._refs[index]
        slot = len(self._refs)
        if code & 0x80:
            self._refs.append(None)
        result: bytes | list[bytes] | None = None
        if kind in _SHORT_STRINGS:
            end = pos + 1 + data[pos]
            result = data[pos + 1:end]
            pos = end
        elif kind in _COUNTED:  # bytes (bytecode, line tables) or longer strings
            end = pos + 4 + int.from_bytes(data[pos:pos + 4], "little")
            if kind != _BYTES:
                result = data[pos + 4:end]
            pos = end
        elif kind in _SEQUENCES:
            if kind == _SMALL_TUPLE:
                count = data[pos]
                pos += 1
            else:
                count = int.from_bytes(data[pos:pos + 4], "little", signed=True)
                pos += 4
                if count < 0:
                    raise _Malformed("negative length")
            self._pos = pos
            items = [self._value(depth + 1) for _ in range(count)]
            result = [item for item in items if isinstance(item, bytes)]
            pos = self._pos
        elif kind == _CODE:
            self._pos = pos
            self._code(depth)
            pos = self._pos
        elif kind in _FIXED:
            pos += _FIXED[kind]
        elif kind == _LONG:
            digits = int.from_bytes(data[pos:pos + 4], "little", signed=True)
            pos += 4 + 2 * abs(digits)
        elif kind == _FLOAT_TEXT:
            pos += 1 + data[pos]
        elif kind == _COMPLEX_TEXT:
            pos += 1 + data[pos]
            pos += 1 + data[pos]
        elif kind == _DICT:
            self._pos = pos
            while data[self._pos] != _NULL:
                self._value(depth + 1)
                self._value(depth + 1)
            pos = self._pos + 1
        else:
            raise _Malformed(f"unknown marshal type {code:#x}")
        if pos > len(data):
            raise _Malformed("truncated")
        self._pos = pos
        if code & 0x80:
            self._refs[slot] = result
        return result

    def _code(self, depth: int) -> None:
        self._take(4 * (6 if self._legacy else 5))  # argument counts, stack size, flags
        for _ in range(8):  # bytecode, constants, names, names of locals and cells, file name, name
            self._value(depth + 1)  # (and qualified name)
        self._long()
        self._value(depth + 1)  # line table
        if not self._legacy:
            self._value(depth + 1)  # exception table


def source_names(data: bytes) -> set[str]:
    """The modules named by the ``import`` and ``from … import`` statements of a ``.py``'s bytes.

    ``from p import a, b`` yields ``p``, ``p.a`` and ``p.b`` (``a`` may be a submodule); a
    relative ``from . import a`` yields ``a``, and ``from .m import a`` yields ``m`` and
    ``m.a`` (resolved against the module's own package).
    """
    names: set[str] = set()
    # statements at the left margin, and whether each opens a function or class body (whose
    # imports run later, if ever) rather than a block run on import (try, if)
    margin = [(m.start(), m.group(1) is not None) for m in _MARGIN_STATEMENT.finditer(data)]
    starts = [start for start, _ in margin]
    for match in _SOURCE_IMPORT.finditer(data):
        if match.group(1):  # indented: inside whichever statement at the margin came last
            last = bisect.bisect_right(starts, match.start()) - 1
            if last >= 0 and margin[last][1]:
                continue
        source, grouped, listed, plain = match.groups()[1:]
        if plain is not None:
            for part in plain.split(b","):
                words = part.split()
                if words:
                    names.add(words[0].decode("ascii", "replace"))
            continue
        package = source.lstrip(b".").decode("ascii", "replace")
        if package:
            names.add(package)
        items = _COMMENT.sub(b"", grouped) if grouped is not None else listed
        for part in items.split(b","):
            words = part.split()
            if words:
                item = words[0].decode("ascii", "replace")
                names.add(f"{package}.{item}" if package else item)
    return {name for name in names if _IDENTIFIER.match(name)}


class ModuleResolver:
    """Resolves module names to the files of one layer that an import of them would read.

    Each directory's module table is built once, by one pass over its entries (and its
    ``__pycache__``'s), and kept for the resolver's life: make one per burst of work.
    """

    def __init__(self, index: LayerIndex, directory_of: Callable[[NodeId], NodeId],
                 name_of: Callable[[NodeId], bytes]) -> None:
        self._index = index
        self._directory_of = directory_of
        self._name_of = name_of
        self._tables: dict[tuple[NodeId, bytes | None], dict[str, _Entry]] = {}

    def module(self, node: NodeId) -> Module | None:
        """``node`` as a module file (``.pyc`` in a ``__pycache__``, or ``.py``), or None."""
        index = self._index
        directory = self._directory_of(node)
        name = self._name_of(node)
        if name.endswith(b".py"):
            return Module(node, directory, None)
        if not name.endswith(b".pyc"):
            return None
        above = self._directory_of(directory)
        if above == directory or index.lookup(above, _PYCACHE) != directory:
            return None
        parts = name[:-4].split(b".", 1)
        return Module(node, above, parts[1]) if len(parts) == 2 and parts[1] else None

    def resolve(self, module: Module, names: Iterable[str]) -> dict[NodeId, Module | None]:
        """The files that importing each of ``names`` from ``module`` would read: each file's
        module, or None for an extension module (a library, not Python to read further).

        A name is looked up in the module's own package (a relative import, or a name its
        code uses) and from its ``sys.path`` root; the packages on the way count too (importing
        ``a.b`` runs ``a/__init__``).
        """
        bases = [module.directory]
        root = self._root(module)
        if root != module.directory:
            bases.append(root)
        for directory in (root, *self._standard_library(module.tag)):
            if directory not in bases:
                bases.append(directory)
            # the standard library's extension modules are a sys.path entry of their own
            dynload = self._index.lookup(directory, b"lib-dynload")
            if dynload is not None and self._index.is_dir(dynload):
                bases.append(dynload)
        found: dict[NodeId, Module | None] = {}
        packages: dict[NodeId, None] = {}
        for name in names:
            parts = name.split(".")
            for base in bases:
                self._walk(base, parts, module.tag, found, packages)
        # ``from p import a`` names p and a apart: a may be a module of p
        simple = [name for name in names if "." not in name]
        for package in packages:
            for name in simple:
                self._walk(package, [name], module.tag, found, None)
        found.pop(module.node, None)
        return found

    def resolve_absolute(self, tag: bytes, names: Iterable[str]) -> dict[NodeId, Module | None]:
        """What importing ``names`` absolutely reads from this layer's ``sys.path`` roots for
        cache tag ``tag``: the standard library and its ``lib-dynload``, the site directories
        (another layer's module imports them; this one has those roots)."""
        bases: list[NodeId] = []
        for directory in self._standard_library(tag):
            bases.append(directory)
            for sub in (b"lib-dynload", b"site-packages", b"dist-packages"):
                node = self._index.lookup(directory, sub)
                if node is not None and self._index.is_dir(node):
                    bases.append(node)
        debian = self._index.resolve(b"usr/lib/python3/dist-packages")
        if debian is not None and self._index.is_dir(debian):
            bases.append(debian)
        found: dict[NodeId, Module | None] = {}
        for name in names:
            for base in bases:
                self._walk(base, name.split("."), tag, found, None)
        return found

    def _walk(self, base: NodeId, parts: list[str], tag: bytes | None,
              found: dict[NodeId, Module | None], packages: dict[NodeId, None] | None) -> None:
        directory = base
        for part in parts:
            entry = self._table(directory, tag).get(part)
            if entry is None:
                return
            file, package = entry
            if isinstance(file, Module):
                found[file.node] = file
            elif file is not None:
                found[file] = None
            if package is None:
                return
            directory = package
        if packages is not None:
            packages[directory] = None

    def _standard_library(self, tag: bytes | None) -> list[NodeId]:
        """The standard library's directories of this layer for a CPython cache tag
        (``cpython-311``: ``usr/lib/python3.11`` as Debian lays it out, ``usr/local/lib/python3.11``
        as the python images built from source do)."""
        match = _CPYTHON_TAG.fullmatch(tag or b"")
        if match is None:
            return []
        version = match.group(1) + b"." + match.group(2)
        found = []
        for prefix in (b"usr/lib", b"usr/local/lib"):
            directory = self._index.resolve(prefix + b"/python" + version)
            if directory is not None and self._index.is_dir(directory):
                found.append(directory)
        return found

    def _root(self, module: Module) -> NodeId:
        """The directory above the module's outermost package (its ``sys.path`` entry)."""
        directory = module.directory
        while self._init(directory, module.tag) is not None:
            above = self._directory_of(directory)
            if above == directory:
                break
            directory = above
        return directory

    def _init(self, directory: NodeId, tag: bytes | None) -> Module | None:
        """A package directory's ``__init__`` module (compiled for ``tag`` if there is one)."""
        index = self._index
        if tag is not None:
            cache = index.lookup(directory, _PYCACHE)
            if cache is not None:
                compiled = index.lookup(cache, _INIT + b"." + tag + b".pyc")
                if compiled is not None:
                    return Module(compiled, directory, tag)
        source = index.lookup(directory, _INIT + b".py")
        return Module(source, directory, None) if source is not None else None

    def _table(self, directory: NodeId, tag: bytes | None) -> dict[str, _Entry]:
        """Module name → (what importing it reads, the package directory to walk into)."""
        key = (directory, tag)
        table = self._tables.get(key)
        if table is not None:
            return table
        index = self._index
        table = {}
        for _, name, child in index.children(directory):
            if name.startswith(b".") or name == _PYCACHE:
                continue
            if index.is_dir(child):
                # without an __init__ it may be a namespace package: walk into it, read nothing
                table[name.decode("ascii", "replace")] = (self._init(child, tag), child)
            elif name.endswith(b".py"):
                table.setdefault(name[:-3].decode("ascii", "replace"), (Module(child, directory, None), None))
            elif name.endswith(b".so") and index.size(child) > 0:
                table.setdefault(name.split(b".", 1)[0].decode("ascii", "replace"), (child, None))
        cache = index.lookup(directory, _PYCACHE) if tag is not None else None
        if cache is not None and tag is not None:
            suffix = b"." + tag + b".pyc"
            for _, name, child in index.children(cache):
                stem = name[:-len(suffix)]
                if not name.endswith(suffix) or not stem or b"." in stem:
                    continue
                text = stem.decode("ascii", "replace")
                current = table.get(text)
                if current is None or current[1] is None:  # Python reads it instead of the .py
                    table[text] = (Module(child, directory, tag), None)
        self._tables[key] = table
        return table


# what importing a name reads (a module to read further, an extension module's file, or
# nothing), and the package directory its submodules are in
_Entry = tuple[Module | NodeId | None, NodeId | None]
