"""Credential lookup: docker config.json entries and real docker-credential-* helper processes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from sourcekit import basic_entry, helper_script, run, write_docker_config

from fusefs.errors import AuthError
from fusefs.sources.credentials import Credentials, CredentialStore, docker_config_path


def lookup(config: Path, host: str, timeout: float = 5.0) -> Credentials | None:
    return run(lambda: CredentialStore(config, timeout).get(host))


def test_config_path_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    assert docker_config_path() == tmp_path / "dc" / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert docker_config_path() == tmp_path / ".docker" / "config.json"
    assert docker_config_path(tmp_path / "x.json") == tmp_path / "x.json"


def test_auths_entries(tmp_path: Path) -> None:
    cfg = write_docker_config(tmp_path / "c.json", {"auths": {
        "https://reg.example:5000/v1/": basic_entry("bob", "pa:ss"),
        "https://index.docker.io/v1/": {"identitytoken": "tok"},
        "bad.example": {"auth": "%%%"},
        "nocolon.example": {"auth": base64.b64encode(b"justuser").decode()},
    }})
    assert lookup(cfg, "reg.example:5000") == Credentials("bob", "pa:ss")
    assert lookup(cfg, "docker.io") == Credentials(identity_token="tok")
    assert lookup(cfg, "other.example") is None
    assert lookup(tmp_path / "missing.json", "reg.example:5000") is None
    with pytest.raises(AuthError, match="not base64"):
        lookup(cfg, "bad.example")
    with pytest.raises(AuthError, match="no ':'"):
        lookup(cfg, "nocolon.example")
    assert "pa:ss" not in repr(lookup(cfg, "reg.example:5000"))


def test_unreadable_config_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    with pytest.raises(AuthError, match="not valid JSON"):
        lookup(cfg, "r.example")


def test_helpers(tmp_path: Path, helper_path: Path) -> None:
    helper_script(helper_path, "good",
                  'read s; printf \'{"ServerURL":"%s","Username":"u","Secret":"p"}\' "$s"\n')
    helper_script(helper_path, "tok", 'printf \'{"Username":"<token>","Secret":"refresh"}\'\n')
    helper_script(helper_path, "none", 'echo "credentials not found in native keychain"; exit 1\n')
    helper_script(helper_path, "broken", 'echo "keychain locked" >&2; echo "keychain locked"; exit 2\n')
    helper_script(helper_path, "slow", "exec sleep 30\n")
    helper_script(helper_path, "chatty", "exec yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    helper_script(helper_path, "garbage", "echo hello\n")
    cfg = write_docker_config(tmp_path / "c.json", {
        "credsStore": "none",
        "auths": {"fallback.example": basic_entry("f", "g")},
        "credHelpers": {**{name + ".example": name for name in
                           ("good", "tok", "none", "broken", "slow", "chatty", "garbage", "missing")},
                        "evil.example": "../evil"},
    })
    assert lookup(cfg, "good.example") == Credentials("u", "p")
    assert lookup(cfg, "tok.example") == Credentials(identity_token="refresh")
    assert lookup(cfg, "none.example") is None
    assert lookup(cfg, "fallback.example") == Credentials("f", "g")  # credsStore has none: auths
    with pytest.raises(AuthError, match=r"docker-credential-broken failed \(exit 2\): keychain locked"):
        lookup(cfg, "broken.example")
    with pytest.raises(AuthError, match="timed out"):
        lookup(cfg, "slow.example", timeout=0.5)
    with pytest.raises(AuthError, match="more than"):
        lookup(cfg, "chatty.example")
    with pytest.raises(AuthError, match="other than JSON"):
        lookup(cfg, "garbage.example")
    with pytest.raises(AuthError, match="not a plain program name"):
        lookup(cfg, "evil.example")
    with pytest.raises(AuthError, match="not installed"):
        lookup(cfg, "missing.example")
