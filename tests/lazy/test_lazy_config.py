"""lazysnapd's [fuse]/[cache]/[fetch]/[prefetch]/[registry] settings and how the daemon hands
them to fusefs; docs/config.md is what scripts/gen-config-doc.py writes from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter import config, daemon
from snapshotter.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_config_doc_is_current() -> None:
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-config-doc.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_defaults_live_under_root() -> None:
    cfg = config.from_mapping(config.Config, {"root": "/srv/lz"})
    fz = daemon.fusefs_config(cfg, userxattr=False)
    assert (str(fz.fuse.mountpoint), str(fz.cache.dir)) == ("/srv/lz/fuse", "/srv/lz/cache")
    assert fz.fuse.opaque_xattr == b"trusted.overlay.opaque"
    assert fz.prefetch.prefetch and fz.prefetch.background and not fz.allow_unverified_toc
    assert daemon.default_layerfs_factory(cfg) is daemon.open_lazy_layers


def test_settings_reach_fusefs_and_the_registry_source(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'root = "{tmp_path}/r"\n'
                 f'[fuse]\nmountpoint = "{tmp_path}/f"\nattr_timeout = 5\n'
                 f'[cache]\ndir = "{tmp_path}/c"\nmax_bytes = 2097152\nmemory_bytes = 0\n'
                 '[fetch]\nallow_no_verification = true\nvalid_interval = 7\n'
                 '[prefetch]\nnoprefetch = true\nno_background_fetch = true\n'
                 '[registry]\ninsecure_hosts = ["127.0.0.1:5000"]\nmax_retries = 2\nmin_wait_msec = 30\n'
                 'max_wait_msec = 300\nforce_single_range_mode = true\nfetching_timeout_sec = 9\n'
                 'hosts_dir = "/etc/x/certs.d"\n')
    cfg = config.load(str(f))
    fz = daemon.fusefs_config(cfg, userxattr=True)
    assert fz.fuse.mountpoint == tmp_path / "f" and fz.fuse.attr_timeout == 5.0
    assert fz.fuse.opaque_xattr == b"user.overlay.opaque"
    assert (fz.cache.dir, fz.cache.max_bytes, fz.fetch.memory_bytes) == (tmp_path / "c", 2 << 20, 0)
    assert fz.allow_unverified_toc and fz.check_interval == 7.0
    assert not fz.prefetch.prefetch and not fz.prefetch.background
    reg = daemon.registry_config(cfg)
    assert reg.insecure_hosts == ("127.0.0.1:5000",) and str(reg.hosts_dir) == "/etc/x/certs.d"
    assert (reg.retries, reg.backoff_base, reg.backoff_max) == (2, 0.03, 0.3)
    assert (reg.max_ranges_per_request, reg.request_timeout, reg.check_interval) == (1, 9.0, 7.0)


def test_fuse_can_be_switched_off() -> None:
    cfg = config.from_mapping(config.Config, {"fuse": {"enable": False}})
    assert daemon.default_layerfs_factory(cfg) is None


@pytest.mark.parametrize(("data", "message"), [
    ({"prefetch": {"no_prefetch": True}}, "prefetch.no_prefetch: unknown key"),
    ({"cache": {"max_bytes": 10}}, "cache.max_bytes: 10 bytes is below the minimum"),
    ({"cache": {"dir": ""}}, "cache.dir: not a usable path"),
    ({"registry": {"insecure_hosts": "127.0.0.1:5000"}}, "registry.insecure_hosts: must be a list"),
    ({"registry": {"max_retries": 0}}, "registry.max_retries: 0 attempts is below the minimum 1"),
    ({"fetch": {"valid_interval": "1m"}}, "fetch.valid_interval: must be float"),
])
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(config.Config, data)
    assert message in str(exc.value)
