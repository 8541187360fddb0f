"""hosts.toml: mirrors before the origin, capabilities, TLS material, plain HTTP; real registries."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from sourcekit import REPO, SMALL, Blobs, blob_bytes, config_for, open_factory, run, start_registry

from fusefs.errors import SourceError
from fusefs.sources.hosts import load_endpoints
from fusefs.sources.registry import RegistrySourceFactory
from fusefs.spec import LayerSpec
from tests.harness.faultproxy import FaultProxy
from tests.harness.manifests import push_blob

RANGES = [(0, 10), (100000, 5000)]


def write_hosts(certs_d: Path, host: str, text: str) -> Path:
    d = certs_d / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


async def read(tmp: Path, host: str, digest: str, factory: RegistrySourceFactory | None = None,
               **cfg: object) -> list[bytes]:
    if factory is None:
        async with open_factory(tmp, **cfg) as own:
            return await read(tmp, host, digest, own)
    source = await factory.open(LayerSpec(ref=f"{host}/{REPO}:v1", digest=digest, size=SMALL))
    return await source.read_ranges(RANGES)


def blob_gets(proxy: FaultProxy) -> list[int]:
    return [r.status for r in proxy.requests() if r.is_blob and r.method == "GET"]


def test_mirror_first_then_origin_when_it_fails(anon_registry: Blobs, tmp_path: Path) -> None:
    blob, digest = anon_registry.small, anon_registry.small_digest
    want = [blob[o:o + n] for o, n in RANGES]
    with FaultProxy(anon_registry.host) as origin, FaultProxy(anon_registry.host) as mirror, \
            FaultProxy(anon_registry.host) as idle:
        write_hosts(tmp_path / "certs.d", origin.host,
                    f'server = "http://{origin.host}"\n'
                    f'[host."http://{idle.host}"]\n  capabilities = ["resolve"]\n'
                    f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
                    f'  [host."http://{mirror.host}".header]\n    x-test = "1"\n')

        async def body() -> None:
            async with open_factory(tmp_path, mirror_cooldown=3.0) as factory:
                assert await read(tmp_path, origin.host, digest, factory) == want
                assert blob_gets(mirror) == [206] and blob_gets(origin) == []
                mirror.fail_next(100, status=502)
                assert await read(tmp_path, origin.host, digest, factory) == want
                assert blob_gets(origin) == [206] and blob_gets(mirror) == [206, 502]
                # While it cools down the failed mirror is not asked again.
                assert await read(tmp_path, origin.host, digest, factory) == want
                assert blob_gets(origin) == [206, 206] and blob_gets(mirror) == [206, 502]
                mirror.reset()
                await trio.sleep(3.1)
                assert await read(tmp_path, origin.host, digest, factory) == want
                assert blob_gets(mirror) == [206, 502, 206]

        run(body)
        assert idle.requests() == []  # a mirror without "pull" is never asked for blobs


def test_mirror_404_falls_through_to_origin(anon_registry: Blobs, tmp_path: Path) -> None:
    other = tmp_path / "empty-registry"
    other.mkdir()
    daemon, port = start_registry(other, lambda _p: "", lambda p: httpx.get(
        f"http://127.0.0.1:{p}/v2/", timeout=1).status_code == 200)
    try:
        write_hosts(tmp_path / "certs.d", anon_registry.host,
                    f'[host."http://127.0.0.1:{port}"]\n  capabilities = ["pull"]\n')
        got = run(lambda: read(tmp_path, anon_registry.host, anon_registry.small_digest))
        assert got == [anon_registry.small[o:o + n] for o, n in RANGES]
    finally:
        daemon.stop(grace=5)


def test_default_dir_and_override_path(tmp_path: Path) -> None:
    write_hosts(tmp_path, "_default",
                'server = "https://origin.example"\n'
                '[host."https://mirror.example/cache/v2"]\n  override_path = true\n'
                '[host."https://plain.example/sub"]\n  skip_verify = true\n  ca = "ca.pem"\n'
                '  client = [["c.pem", "k.pem"]]\n')
    mirror, plain, origin = load_endpoints("r.example", "r.example", tmp_path)
    assert mirror.blob_url("a/b", "sha256:x") == "https://mirror.example/cache/v2/a/b/blobs/sha256:x"
    assert plain.base_url == "https://plain.example/sub/v2" and plain.skip_verify
    assert plain.ca == (str(tmp_path / "_default" / "ca.pem"),)
    assert plain.client == ((str(tmp_path / "_default" / "c.pem"), str(tmp_path / "_default" / "k.pem")),)
    assert origin.base_url == "https://origin.example/v2" and not origin.is_mirror
    assert not origin.plain_http_fallback


def test_insecure_and_loopback_hosts() -> None:
    host = "reg.internal:5000"
    (ep,) = load_endpoints(host, host, None, insecure_hosts=(host,))
    assert ep.base_url == "http://reg.internal:5000/v2"
    (ep,) = load_endpoints("localhost:5000", "localhost:5000", None)
    assert ep.scheme == "https" and ep.plain_http_fallback
    (ep,) = load_endpoints("example.com", "example.com", None)
    assert ep.scheme == "https" and not ep.plain_http_fallback


@pytest.mark.parametrize("text", ['server = 1\n', '[host."ftp://x"]\n',
                                  '[host."https://x"]\n  capabilities = ["fly"]\n',
                                  'not toml [', '[host."https://x/../y"]\n'])
def test_invalid_hosts_toml_is_an_error(tmp_path: Path, text: str) -> None:
    write_hosts(tmp_path, "r.example", text)
    with pytest.raises(SourceError):
        load_endpoints("r.example", "r.example", tmp_path)


# -- TLS ---------------------------------------------------------------------------------------------


@dataclass
class TlsRegistry:
    host: str
    dir: Path
    blob: bytes
    digest: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _sign(cwd: Path, name: str, subject: str, ext: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=cwd)
    (cwd / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    """A registry over TLS (test CA) that also requires a client certificate from that CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test CA")
    d = tmp_path_factory.mktemp("tlsreg")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=lazysnap-test-ca", cwd=d)
    _sign(d, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _sign(d, "client", "/CN=lazysnap-client", "extendedKeyUsage=clientAuth\n")
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))

    def tls(_port: int) -> str:
        return (f"  tls:\n    certificate: {d / 'server.crt'}\n    key: {d / 'server.key'}\n"
                f"    clientcas:\n      - {d / 'ca.crt'}\n")

    daemon, port = start_registry(d, tls, lambda p: httpx.get(
        f"https://127.0.0.1:{p}/v2/", verify=ctx, timeout=1).status_code == 200)
    try:
        host = f"127.0.0.1:{port}"
        blob = blob_bytes(SMALL, 5)
        yield TlsRegistry(host, d, blob, push_blob(host, REPO, blob, scheme="https", verify=ctx))
    finally:
        daemon.stop(grace=5)


def test_tls_with_ca_and_client_certificate(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    write_hosts(tmp_path / "certs.d", tls_registry.host,
                f'server = "https://{tls_registry.host}"\nca = "{tls_registry.dir / "ca.crt"}"\n'
                f'client = [["{tls_registry.dir / "client.crt"}", "{tls_registry.dir / "client.key"}"]]\n')
    got = run(lambda: read(tmp_path, tls_registry.host, tls_registry.digest))
    assert got == [tls_registry.blob[o:o + n] for o, n in RANGES]


def test_tls_skip_verify(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    write_hosts(tmp_path / "certs.d", tls_registry.host,
                f'server = "https://{tls_registry.host}"\nskip_verify = true\n'
                f'client = [["{tls_registry.dir / "client.crt"}", "{tls_registry.dir / "client.key"}"]]\n')
    got = run(lambda: read(tmp_path, tls_registry.host, tls_registry.digest))
    assert got == [tls_registry.blob[o:o + n] for o, n in RANGES]


def test_untrusted_certificate_is_not_downgraded(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    """A loopback registry whose certificate fails verification must not fall back to plain HTTP."""
    with pytest.raises(SourceError, match="certificate") as info:
        run(lambda: read(tmp_path, tls_registry.host, tls_registry.digest))
    assert "http://" not in str(info.value)


def test_tls_docker_style_certs_directory(tls_registry: TlsRegistry, tmp_path: Path) -> None:
    """No hosts.toml: the host directory holds ca.crt and client.cert/client.key, docker style."""
    d = tmp_path / "certs.d" / tls_registry.host
    d.mkdir(parents=True)
    shutil.copy(tls_registry.dir / "ca.crt", d / "ca.crt")
    shutil.copy(tls_registry.dir / "client.crt", d / "client.cert")
    shutil.copy(tls_registry.dir / "client.key", d / "client.key")
    got = run(lambda: read(tmp_path, tls_registry.host, tls_registry.digest))
    assert got == [tls_registry.blob[o:o + n] for o, n in RANGES]


def test_clients_with_default_trust_share_one_tls_context(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[ssl.SSLContext] = []
    real = httpx.create_ssl_context

    def create_ssl_context(*args: object, **kwargs: object) -> ssl.SSLContext:
        ctx = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(ctx)
        return ctx

    monkeypatch.setattr(httpx, "create_ssl_context", create_ssl_context)
    factory = RegistrySourceFactory(config_for(tmp_path))
    try:
        clients = {id(factory.client(None, url)) for url in
                   ("https://a.example/v2/", "https://b.example/v2/", "http://c.example/v2/")}
        assert len(clients) == 3
        assert len(made) == 1  # the token client's, shared by the three
    finally:
        trio.run(factory.aclose)
