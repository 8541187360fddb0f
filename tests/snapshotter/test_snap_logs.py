"""The daemon's JSON log lines, and what --log-level debug lets through."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from snapshotter import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("hpack", "h2")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def test_debug_level_keeps_the_http2_frames_out(restore_logging: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("debug")
    logging.getLogger("snapshotter.test").debug("own record", extra={"key": "k"})
    logging.getLogger("hpack.hpack").debug("Decoded (b':path', b'/x')")
    logging.getLogger("h2.connection").debug("frame")
    logging.getLogger("h2.connection").warning("protocol error")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["logger"], r["level"], r["msg"]) for r in lines] == [
        ("snapshotter.test", "debug", "own record"), ("h2.connection", "warning", "protocol error")]
    assert lines[0]["key"] == "k" and lines[0]["time"].endswith("Z")


def test_a_higher_level_still_applies_to_the_http2_library(restore_logging: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("error")
    logging.getLogger("h2.connection").warning("protocol error")
    logging.getLogger("snapshotter.test").warning("own warning")
    assert capsys.readouterr().err == ""
