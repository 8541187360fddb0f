"""The control API of a live lazysnapd refuses what it should: other users, oversized or broken
requests, malformed digests and bodies; and the small parsers behind snapctl and the config."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from snapshotter.control_client import ControlClient, ControlError, parse_size
from snapshotter.control_http import ListenError, parse_address
from tests.harness import Lazysnapd

pytestmark = pytest.mark.e2e


def _client(snapd: Lazysnapd) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(snapd.root / "control.sock")),
                        base_url="http://lazysnapd", timeout=30)


def _raw(snapd: Lazysnapd, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(snapd.root / "control.sock"))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_control_socket_is_root_only_and_refuses_bad_requests(
        make_lazysnapd: Callable[..., Lazysnapd]) -> None:
    snapd = make_lazysnapd()
    sock = snapd.root / "control.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0

    with _client(snapd) as c:
        assert c.get("/v1/status").json()["layer_filesystem"] is True
        assert c.get("/v1/layers").json() == {"layers": []}
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and "no route" in r.json()["error"]
        r = c.get("/v1/layers/sha256:../../etc")
        assert r.status_code == 400 and "sha256:<64 hex digits>" in r.json()["error"]
        r = c.get("/v1/layers/sha256:" + "a" * 64)
        assert r.status_code == 404 and "not mounted" in r.json()["error"]
        for body in (b"[]", b"{not json", b'{"to": -1}', b'{"to": "1G"}', b'{"unused": 1}', b'{"x": 1}'):
            r = c.post("/v1/cache/prune", content=body)
            assert r.status_code == 400, body
        r = c.post("/v1/cache/prune", content=b"{" + b" " * (128 << 10) + b"}")
        assert r.status_code == 413
        assert c.post("/v1/cache/verify").json() == {"checked": 0, "corrupt": []}

    assert b" 400 " in _raw(snapd, b"NONSENSE\r\n\r\n").split(b"\r\n")[0] + b" "
    huge_head = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (64 << 10) + b"\r\n\r\n"
    assert _raw(snapd, huge_head).startswith(b"HTTP/1.1 4")
    # the daemon still answers after all that
    with ControlClient(str(sock)) as client:
        assert client.get("/v1/status")["pid"] == snapd.pid

    # a user other than root cannot connect
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c",
                          f"import socket; socket.socket(socket.AF_UNIX).connect({str(sock)!r})"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Permission denied" in res.stderr


def test_without_lazy_layers_the_layer_routes_say_so(make_lazysnapd: Callable[..., Lazysnapd]) -> None:
    snapd = make_lazysnapd(config="[fuse]\nenable = false\n")
    with ControlClient(str(snapd.root / "control.sock")) as client:
        assert client.get("/v1/status")["layer_filesystem"] is False
        with pytest.raises(ControlError, match="without a layer filesystem"):
            client.get("/v1/layers")


def test_snapctl_reports_a_missing_control_socket(tmp_path: Path) -> None:
    res = subprocess.run(["snapctl", "layers", "--control", str(tmp_path / "none.sock")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot reach lazysnapd's control socket" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("4096", 4096), ("512M", 512 << 20),
                                             ("1.5GiB", 3 << 29), ("10g", 10 << 30), ("2 KiB", 2048)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1X", "lots", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9101") == ("tcp", "127.0.0.1", 9101)
    assert parse_address("[::1]:0") == ("tcp", "::1", 0)
    assert parse_address("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
    assert parse_address("/run/x.sock") == ("unix", "/run/x.sock", 0)
    for bad in ("9101", "localhost", "unix:relative", "host:99999", ":80"):
        with pytest.raises(ListenError):
            parse_address(bad)


def test_metrics_on_a_unix_socket(make_lazysnapd: Callable[..., Lazysnapd], tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    snapd = make_lazysnapd(config=f'[metrics]\naddress = "unix:{path}"\n')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=30) as c:
        text = c.get("http://lazysnapd/metrics").text
    assert "lazysnap_layers_served 0.0" in text and "lazysnap_cache_max_bytes" in text
    with ControlClient(str(snapd.root / "control.sock")) as client:
        assert client.get("/v1/status")["sockets"]["metrics"] == str(path)


def test_a_bad_metrics_address_stops_the_start(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\naddress = "localhost"\n')
    argv = ["lazysnapd", "--root", str(tmp_path / "root"), "--address", str(tmp_path / "s.sock"),
            "--config", str(cfg)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "not host:port, unix:/path or /path" in res.stderr
    assert not (tmp_path / "s.sock").exists() and not (tmp_path / "root" / "control.sock").exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # FUSE session unmounted
