"""Operator-surface fixtures: a live lazysnapd serving an eStargz image lazily from a real
docker-registry, pulled with `ctr-remote image rpull` through a private containerd."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import BuiltImage, Containerd, EstargzImage, Lazysnapd, Registry

__all__ = ["Served", "served"]

# Reads happen only when a test makes them: no prefetch, no background fetch.
QUIET_CONFIG = """\
[prefetch]
noprefetch = true
no_background_fetch = true

[cache]
fsync = false

[registry]
max_retries = 2
min_wait_msec = 10
max_wait_msec = 100

[metrics]
address = "127.0.0.1:0"
"""


@dataclass
class Served:
    """The running stack of one test."""

    snapd: Lazysnapd
    containerd: Containerd
    registry: Registry
    image: BuiltImage
    esgz: EstargzImage

    @property
    def control(self) -> Path:
        return self.snapd.root / "control.sock"

    def snapctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        exe = shutil.which("snapctl")
        assert exe, "snapctl is not on PATH (pip install -e .)"
        # a --control among args comes later, so it wins
        argv = [exe, args[0], "--control", str(self.control), *args[1:]]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if check:
            assert res.returncode == 0, f"snapctl {' '.join(args)}: {res.stderr}"
        return res

    def snapctl_json(self, *args: str) -> Any:
        return json.loads(self.snapctl(*args, "--json").stdout)

    def layer(self, digest: str) -> dict[str, Any]:
        layers = {entry["digest"]: entry for entry in self.snapctl_json("layers")}
        return layers[digest]


@pytest.fixture
def served(make_lazysnapd: Callable[..., Lazysnapd], make_containerd: Callable[..., Containerd],
           ranged_registry: Registry, estargz_image: tuple[BuiltImage, EstargzImage]) -> Served:
    img, esgz = estargz_image
    snapd = make_lazysnapd(config=QUIET_CONFIG)
    ctd = make_containerd(proxy_socket=snapd.address, registries=[ranged_registry.host])
    ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", esgz.ref)
    return Served(snapd, ctd, ranged_registry, img, esgz)
