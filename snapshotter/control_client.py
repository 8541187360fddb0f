"""The client side of the control API (``snapshotter.control``), for ``snapctl``.

Blocking (httpx over the unix socket); every failure is a :class:`ControlError` whose message is
fit for a user: the socket is missing or refuses, the daemon answered an error, or the answer
is not JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

TIMEOUT = 600.0  # cache verify re-hashes everything: allow it time
MAX_ANSWER = 256 << 20
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


class ControlError(Exception):
    """The control API could not be used; the message says why."""


class ControlClient:
    """Calls lazysnapd's control API on the unix socket ``path``."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://lazysnapd",
                                    timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, route: str, **params: str) -> Any:
        return self._call("GET", route, params=params)

    def post(self, route: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", route, content=json.dumps(body or {}).encode())

    def _call(self, method: str, route: str, **kwargs: Any) -> Any:
        try:
            resp = self._client.request(method, route, **kwargs)
        except (httpx.ConnectError, FileNotFoundError, PermissionError) as exc:
            raise ControlError(f"cannot reach lazysnapd's control socket {self.path}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ControlError(f"control socket {self.path}: {exc}") from None
        if len(resp.content) > MAX_ANSWER:
            raise ControlError("answer too large")
        try:
            data = resp.json()
        except ValueError:
            raise ControlError(f"lazysnapd answered {resp.status_code} without JSON") from None
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ControlError(str(message or f"HTTP {resp.status_code}"))
        return data


def parse_size(text: str) -> int:
    """Bytes from ``1048576``, ``512M``, ``1.5GiB``, ``10g`` (binary units); ValueError otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 0, 512M, 2GiB)")
    scale = 1 << (10 * " kmgt".index(m.group(2).lower() or " "))
    return int(float(m.group(1)) * scale)


def human_size(n: float) -> str:
    """``1.5 GiB``-style size."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
