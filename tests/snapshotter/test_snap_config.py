"""The TOML config loader: defaults, validation, and that every setting is documented."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.config import Config, setting
from snapshotter.errors import ConfigError


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("")
    assert config.load(str(f)) == Config() == config.load(None)


def test_values_are_read(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root = "/srv/l"\naddress = "/run/x.sock"\nlog_level = "debug"\n'
                 "[grpc]\nmax_workers = 4\nshutdown_grace = 1\n[fuse]\n")
    cfg = config.load(str(f))
    assert (cfg.root, cfg.address, cfg.log_level) == ("/srv/l", "/run/x.sock", "debug")
    assert cfg.grpc.max_workers == 4 and cfg.grpc.shutdown_grace == 1.0
    assert isinstance(cfg.grpc.shutdown_grace, float)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"grpc": {"max_workers": True}}, "grpc.max_workers: must be int, not bool"),
        ({"grpc": {"shutdown_grace": "soon"}}, "grpc.shutdown_grace: must be float"),
        ({"grpc": {"max_message_bytes": 1 << 40}}, "grpc.max_message_bytes: 1099511627776 bytes is above"),
        ({"root": ""}, "root: not a usable path"),
        ({"fuse": {"anything": 1}}, "fuse.anything: unknown key"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.from_mapping(Config, data)
    assert message in str(exc.value)


def _settings(cls: type) -> list[tuple[str, dataclasses.Field[object]]]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            continue
        out.append((f"{cls.__name__}.{f.name}", f))
    return out


def test_every_setting_is_documented() -> None:
    sections = [Config, config.GrpcConfig]
    for name, f in [s for cls in sections for s in _settings(cls)]:
        assert f.metadata.get("help"), f"{name} has no help text"


def test_adding_a_field_is_all_it_takes() -> None:
    @dataclass(frozen=True)
    class Extra:
        ratio: float = setting(0.5, "a fraction", min=0.0, max=1.0)
        names: tuple[str, ...] = setting((), "some names")
        limit: int | None = setting(None, "optional limit", "bytes", min=0)

    got = config.from_mapping(Extra, {"ratio": 1, "names": ["a", "b"], "limit": 7})
    assert got == Extra(ratio=1.0, names=("a", "b"), limit=7)
    with pytest.raises(ConfigError, match=r"names\[1\]: must be str"):
        config.from_mapping(Extra, {"names": ["a", 2]})
    with pytest.raises(ConfigError, match=r"ratio: 2\.0 is above the maximum 1\.0"):
        config.from_mapping(Extra, {"ratio": 2})


def test_paths_bytes_and_required_keys() -> None:
    @dataclass(frozen=True)
    class Section:
        where: Path
        xattr: bytes = setting(b"trusted.x", "an attribute name")

    assert config.from_mapping(Section, {"where": "/c", "xattr": "user.x"}) == Section(Path("/c"), b"user.x")
    with pytest.raises(ConfigError, match="where: required key missing"):
        config.from_mapping(Section, {})
    with pytest.raises(ConfigError, match="where: must be Path"):
        config.from_mapping(Section, {"where": 3})
