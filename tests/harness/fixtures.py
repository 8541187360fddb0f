"""pytest fixtures over the harness; import them into a conftest.py:

    from tests.harness.fixtures import (containerd, lazysnapd, make_containerd, make_lazysnapd,
                                        registry, test_image)

- `registry` (session): one docker-registry for the run; use `registry.log_mark()` to scope logs.
- `test_image` (session): the busybox test image, built and pushed once (`BuiltImage`).
- `make_lazysnapd(config=None)` / `lazysnapd`: a lazysnapd with its own root and socket per test.
  Fails the test (never skips) when lazysnapd is missing or does not start.
- `ranged_registry` (session): a second registry behind the Range-logging proxy, and
  `estargz_image` (session): the test image pushed there plus its eStargz copy
  (`(BuiltImage, EstargzImage)`, converted in a throwaway containerd), for lazy-pull tests.
- `make_containerd(proxy_socket=..., cri=...)` / `containerd`: a private containerd per test;
  `containerd` is wired to `lazysnapd` (proxy plugin "lazysnap") and knows `registry`.

Teardown stops every process by PID, unmounts what is left and removes the work dirs; a
lazysnapd that left mounts behind after SIGTERM fails the test at teardown. When the test itself
failed, the tails of the lazysnapd and containerd logs are printed (pytest shows them under
"Captured stdout teardown"); this needs the `pytest_runtest_makereport` hook below imported into
the conftest.py as well.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .containerd import Containerd
from .estargz import EstargzImage, convert_estargz
from .image import BuiltImage, build_image
from .lazysnapd import Lazysnapd
from .procs import HarnessError, remove_tree, short_tempdir
from .registry import Registry

__all__ = [
    "containerd",
    "estargz_image",
    "lazysnapd",
    "make_containerd",
    "make_lazysnapd",
    "pytest_runtest_makereport",
    "ranged_registry",
    "registry",
    "test_image",
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Remember on the test item whether its call phase failed (for the log dumps at teardown)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


_FAILED = pytest.StashKey[bool]()


def _dump_logs_if_failed(request: pytest.FixtureRequest, name: str, path: Path) -> None:
    if request.node.stash.get(_FAILED, False) and path.exists():
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-60:])
        print(f"\n----- last lines of {name} log {path} -----\n{tail}")


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    work = short_tempdir("lzs-reg-")
    with Registry(work) as reg:
        yield reg
    remove_tree(work)


@pytest.fixture(scope="session")
def test_image(registry: Registry) -> Iterator[BuiltImage]:
    work = short_tempdir("lzs-img-")
    yield build_image(work, registry)
    remove_tree(work)


@pytest.fixture(scope="session")
def ranged_registry() -> Iterator[Registry]:
    work = short_tempdir("lzs-rreg-")
    with Registry(work, log_ranges=True) as reg:
        yield reg
    remove_tree(work)


@pytest.fixture(scope="session")
def estargz_image(ranged_registry: Registry) -> Iterator[tuple[BuiltImage, EstargzImage]]:
    work = short_tempdir("lzs-esgz-")
    img = build_image(work / "image", ranged_registry)
    with Containerd(work / "convert") as builder:
        esgz = convert_estargz(builder, img.ref, f"{ranged_registry.host}/{img.name}:esgz")
    yield img, esgz
    remove_tree(work)


@pytest.fixture
def make_lazysnapd(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lazysnapd]]:
    started: list[tuple[Lazysnapd, Path]] = []

    def make(**kwargs: Any) -> Lazysnapd:
        work = short_tempdir("lzs-snapd-")
        snapd = Lazysnapd(work, **kwargs)
        started.append((snapd, work))
        try:
            snapd.start()
        except HarnessError as exc:
            pytest.fail(f"lazysnapd did not start: {exc}\n{snapd.log_tail()}", pytrace=False)
        return snapd

    yield make
    leftovers = []
    for snapd, work in reversed(started):
        left = snapd.stop()
        _dump_logs_if_failed(request, "lazysnapd", snapd.log_path)
        if left:
            leftovers.append(f"{snapd.root}: {[str(p) for p in left]}")
        remove_tree(work)
    if leftovers:
        pytest.fail(f"lazysnapd left mounts after SIGTERM: {leftovers}", pytrace=False)


@pytest.fixture
def lazysnapd(make_lazysnapd: Callable[..., Lazysnapd]) -> Lazysnapd:
    return make_lazysnapd()


@pytest.fixture
def make_containerd(request: pytest.FixtureRequest, registry: Registry,
                    make_lazysnapd: Callable[..., Lazysnapd]) -> Iterator[Callable[..., Containerd]]:
    # depending on make_lazysnapd makes pytest stop containerd before any lazysnapd it talks to
    started: list[tuple[Containerd, Path]] = []

    def make(**kwargs: Any) -> Containerd:
        kwargs.setdefault("registries", [registry.host])
        work = short_tempdir("lzs-ctd-")
        ctd = Containerd(work, **kwargs)
        started.append((ctd, work))
        ctd.start()
        return ctd

    yield make
    for ctd, work in reversed(started):
        ctd.stop()
        _dump_logs_if_failed(request, "containerd", ctd.log_path)
        remove_tree(work)


@pytest.fixture
def containerd(lazysnapd: Lazysnapd, make_containerd: Callable[..., Containerd]) -> Containerd:
    return make_containerd(proxy_socket=lazysnapd.address)
