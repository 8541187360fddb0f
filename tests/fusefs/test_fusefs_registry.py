"""Layers mounted from a real docker-registry through the registry source (loopback only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fusefs import contract
from tests.fusefs.fixtures import layer_case
from tests.fusefs.fuse_client import FuseServer, force_unmount
from tests.harness.fixtures import registry
from tests.harness.manifests import push_blob
from tests.harness.registry import Registry

pytestmark = [pytest.mark.root]
__all__ = ["registry"]  # the session registry fixture, re-exported for pytest

REPO = "lazysnap-fusefs/fixture"


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = Path(tmp_path_factory.mktemp("fusereg"))
    yield path
    force_unmount(path)


def test_layers_from_a_real_registry(registry: Registry, work: Path) -> None:
    layer0, layer1 = layer_case("esgz-default", 0), layer_case("esgz-default", 1)
    for case in (layer0, layer1):
        push_blob(registry.direct_host, REPO, case.blob.read_bytes(), registry.auth_header())
    mark = registry.log_mark()
    ref = f"{registry.host}/{REPO}:latest"
    with FuseServer(work, [], registry_hosts=[registry.host]) as server:
        for case, name in ((layer0, "l0"), (layer1, "l1")):
            reply = server.mount(case, work / name, ref=ref, size=case.blob.stat().st_size)
            assert reply.get("ok"), reply
        rows, inodes = contract.tree_from_fs(str(work / "l0"))
        contract.assert_tree(rows, inodes, contract.load_tsv(layer0.expected))
        merged = work / "merged"
        merged.mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={work / 'l1'}:{work / 'l0'}",
                        str(merged)], check=True, capture_output=True)
        try:
            assert os.listdir(merged / "whiteme") == []
            assert sorted(os.listdir(merged / "opaque")) == ["new.txt"]
            assert (merged / "etc" / "hostname").read_bytes() == b"fixture-layer2\n"
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    ranged = [e for e in registry.access_log_entries(mark, min_count=1) if e.blob_digest == layer0.digest]
    assert ranged, "the layer was read from the registry"
    assert server.returncode == 0 and "Traceback" not in server.log_text()
