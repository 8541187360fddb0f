"""Structured logs: one JSON object per line on stderr.

Every record has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``msg``; fields passed with
``extra={...}`` are added as they are (e.g. ``remote-snapshot-prepared``), and a traceback, if
any, goes in ``exc``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


# The HTTP/2 library under the gRPC server logs every frame and header at debug: a dozen lines
# per call that bury the daemon's own debug records.
_CHATTY = ("hpack", "h2")


def setup(level: str) -> None:
    """Send every logger's records at ``level`` or above to stderr as JSON lines (the HTTP/2
    library's at info or above)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
