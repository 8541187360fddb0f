"""Registry authentication against real docker-registry instances: htpasswd and token auth."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from sourcekit import (
    PASSWORD,
    REPO,
    SMALL,
    USER,
    TokenRegistry,
    basic_entry,
    blob_bytes,
    helper_script,
    open_factory,
    run,
    write_docker_config,
)

from fusefs.errors import AuthError
from fusefs.sources.registry import RegistrySourceFactory
from fusefs.spec import LayerSpec
from tests.harness import Registry
from tests.harness.faultproxy import FaultProxy
from tests.harness.manifests import push_blob


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes, str]]:
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd (apache2-utils) is needed for bcrypt entries")
    with Registry(tmp_path_factory.mktemp("basicreg"), htpasswd=(USER, PASSWORD)) as reg:
        blob = blob_bytes(SMALL, 4)
        yield reg.host, blob, push_blob(reg.host, REPO, blob, reg.auth_header())


async def read_with(tmp: Path, host: str, digest: str, ranges: list[tuple[int, int]],
                    factory: RegistrySourceFactory | None = None) -> list[bytes]:
    if factory is None:
        async with open_factory(tmp) as own:
            return await read_with(tmp, host, digest, ranges, own)
    source = await factory.open(LayerSpec(ref=f"{host}/{REPO}:v1", digest=digest, size=SMALL))
    return await source.read_ranges(ranges)


RANGES = [(0, 100), (150000, 4096), (SMALL - 10, 10)]


def expect(blob: bytes) -> list[bytes]:
    return [blob[o:o + n] for o, n in RANGES]


# -- basic auth --------------------------------------------------------------------------------------


def test_basic_auth_from_docker_config(basic_registry: tuple[str, bytes, str], tmp_path: Path) -> None:
    host, blob, digest = basic_registry
    write_docker_config(tmp_path / "docker" / "config.json", {"auths": {host: basic_entry(USER, PASSWORD)}})
    assert run(lambda: read_with(tmp_path, host, digest, RANGES)) == expect(blob)


def test_basic_auth_from_credential_helper(basic_registry: tuple[str, bytes, str], tmp_path: Path,
                                           helper_path: Path) -> None:
    host, blob, digest = basic_registry
    asked = tmp_path / "asked"
    helper_script(helper_path, "lazytest",
                  f'[ "$1" = get ] || exit 3\ncat > {asked}\n'
                  f'printf \'{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}\' '
                  f'"$(cat {asked})"\n')
    write_docker_config(tmp_path / "docker" / "config.json",
                        {"credHelpers": {host: "lazytest"}, "auths": {host: basic_entry(USER, "wrong")}})
    assert run(lambda: read_with(tmp_path, host, digest, RANGES)) == expect(blob)
    assert asked.read_text() == host


def test_wrong_basic_credentials_are_named(basic_registry: tuple[str, bytes, str], tmp_path: Path) -> None:
    host, _blob, digest = basic_registry
    write_docker_config(tmp_path / "docker" / "config.json", {"auths": {host: basic_entry(USER, "nope")}})
    with pytest.raises(AuthError, match=f"registry {host} refused the credentials of user 'alice'"):
        run(lambda: read_with(tmp_path, host, digest, RANGES))


def test_missing_basic_credentials_are_named(basic_registry: tuple[str, bytes, str], tmp_path: Path) -> None:
    host, _blob, digest = basic_registry
    with pytest.raises(AuthError, match="requires basic authentication and no credentials"):
        run(lambda: read_with(tmp_path, host, digest, RANGES))


# -- bearer tokens -----------------------------------------------------------------------------------


@pytest.fixture
def tokens(token_registry: TokenRegistry, tmp_path: Path) -> Iterator[TokenRegistry]:
    """The token registry with default knobs and this test's docker config holding alice."""
    t = token_registry.tokens
    t.expires_in, t.expired_next, t.get_disabled, t.anonymous_pull = 300, 0, False, False
    t.requests.clear()
    t.issued.clear()
    write_docker_config(tmp_path / "docker" / "config.json",
                        {"auths": {token_registry.host: basic_entry(USER, PASSWORD)}})
    yield token_registry


def test_token_flow_fetches_one_token_for_many_reads(tokens: TokenRegistry, tmp_path: Path) -> None:
    async def body() -> int:
        async with open_factory(tmp_path) as factory:
            for _ in range(3):
                got = await read_with(tmp_path, tokens.host, tokens.digest, RANGES, factory)
                assert got == expect(tokens.blob)
            return factory.auth.token_fetches

    assert run(body) == 1
    assert tokens.tokens.requests == [("GET", USER, "")]


def test_token_lifetime_is_honoured(tokens: TokenRegistry, tmp_path: Path) -> None:
    tokens.tokens.expires_in = 1

    async def body() -> int:
        async with open_factory(tmp_path) as factory:
            await read_with(tmp_path, tokens.host, tokens.digest, RANGES, factory)
            await trio.sleep(1.2)
            got = await read_with(tmp_path, tokens.host, tokens.digest, RANGES, factory)
            assert got == expect(tokens.blob)
            return factory.auth.token_fetches

    assert run(body) == 2


def test_token_rejected_by_registry_is_refreshed(tokens: TokenRegistry, tmp_path: Path) -> None:
    tokens.tokens.expired_next = 1  # the first token is already past its exp: the registry says 401

    async def body() -> int:
        async with open_factory(tmp_path) as factory:
            got = await read_with(tmp_path, tokens.host, tokens.digest, RANGES, factory)
            assert got == expect(tokens.blob)
            return factory.auth.token_fetches

    assert run(body) == 2


def test_token_expired_mid_session_is_refreshed(tokens: TokenRegistry, tmp_path: Path) -> None:
    async def body(proxy: FaultProxy) -> int:
        async with open_factory(tmp_path, insecure_hosts=(proxy.host,)) as factory:
            write_docker_config(tmp_path / "docker" / "config.json",
                                {"auths": {proxy.host: basic_entry(USER, PASSWORD)}})
            await read_with(tmp_path, proxy.host, tokens.digest, RANGES, factory)
            proxy.expire_token(tokens.tokens.issued[-1])
            got = await read_with(tmp_path, proxy.host, tokens.digest, RANGES, factory)
            assert got == expect(tokens.blob)
            return factory.auth.token_fetches

    with FaultProxy(tokens.host) as proxy:
        assert run(lambda: body(proxy)) == 2
        statuses = [r.status for r in proxy.requests() if r.is_blob]
    # 401 (no token yet), 206 (one multi-range request), 401 for the expired token, 206 again.
    assert statuses == [401, 206, 401, 206]


def test_post_oauth_form_when_get_is_refused(tokens: TokenRegistry, tmp_path: Path) -> None:
    tokens.tokens.get_disabled = True
    assert run(lambda: read_with(tmp_path, tokens.host, tokens.digest, RANGES)) == expect(tokens.blob)
    assert tokens.tokens.requests == [("GET", USER, ""), ("POST", USER, "password")]


def test_identity_token_uses_refresh_grant(tokens: TokenRegistry, tmp_path: Path) -> None:
    write_docker_config(tmp_path / "docker" / "config.json",
                        {"auths": {tokens.host: {"identitytoken": "refresh-" + USER}}})
    assert run(lambda: read_with(tmp_path, tokens.host, tokens.digest, RANGES)) == expect(tokens.blob)
    assert tokens.tokens.requests == [("POST", USER, "refresh_token")]


def test_wrong_token_credentials_are_named(tokens: TokenRegistry, tmp_path: Path) -> None:
    write_docker_config(tmp_path / "docker" / "config.json",
                        {"auths": {tokens.host: basic_entry(USER, "bad")}})
    with pytest.raises(AuthError, match=r"token server 127\.0\.0\.1:\d+ refused user 'alice'"):
        run(lambda: read_with(tmp_path, tokens.host, tokens.digest, RANGES))


def test_anonymous_refused_by_token_server(tokens: TokenRegistry, tmp_path: Path) -> None:
    (tmp_path / "docker" / "config.json").unlink()
    with pytest.raises(AuthError, match="refused anonymous access"):
        run(lambda: read_with(tmp_path, tokens.host, tokens.digest, RANGES))


def test_forbidden_refreshes_the_token_once(tokens: TokenRegistry, tmp_path: Path) -> None:
    async def body(proxy: FaultProxy) -> int:
        async with open_factory(tmp_path) as factory:
            write_docker_config(tmp_path / "docker" / "config.json",
                                {"auths": {proxy.host: basic_entry(USER, PASSWORD)}})
            await read_with(tmp_path, proxy.host, tokens.digest, RANGES, factory)
            proxy.fail_next(1, status=403)
            got = await read_with(tmp_path, proxy.host, tokens.digest, RANGES, factory)
            assert got == expect(tokens.blob)
            assert factory.auth.token_fetches == 2
            proxy.fail_next(10, status=403)
            with pytest.raises(AuthError, match="refused a fresh token"):
                await read_with(tmp_path, proxy.host, tokens.digest, RANGES, factory)
            return factory.auth.token_fetches

    with FaultProxy(tokens.host) as proxy:
        assert run(lambda: body(proxy)) == 3


def test_anonymous_pull_token(tokens: TokenRegistry, tmp_path: Path) -> None:
    (tmp_path / "docker" / "config.json").unlink()
    tokens.tokens.anonymous_pull = True
    assert run(lambda: read_with(tmp_path, tokens.host, tokens.digest, RANGES)) == expect(tokens.blob)
    assert tokens.tokens.requests == [("GET", "", "")]
