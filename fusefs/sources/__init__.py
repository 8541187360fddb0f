"""Blob sources: where a layer's bytes come from (registry over HTTP, local files, recorded reads).

httpx's package ``__init__`` imports its command-line client (``httpx._main``) whenever the CLI's
dependencies are installed, and with them rich, click and pygments (~5 MiB of resident memory in
lazysnapd, which serves no terminal). Marking that one module as absent makes httpx fall back to
its stub ``httpx.main`` (the import system raises ImportError for a ``None`` entry in
``sys.modules``); nothing in this process runs httpx's CLI. Done here, before any source module
imports httpx; a no-op if something imported httpx first.
"""

import sys

if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
