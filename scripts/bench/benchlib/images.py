"""The test images: built once with debootstrap + umoci, pushed as :org, converted to :esgz and :opt.

Every image is a stack of umoci layers over a Debian bookworm minbase (or over busybox for the
quick run). Built images are cached in an OCI layout under BENCH_ROOT and in the registry's data
directory; a build publishes its tag only when complete, so an interrupted build is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .containerd import Containerd
from .paths import CACHE_DIR, IMAGES_DIR, LOGS_DIR, OCI_LAYOUT
from .procs import BenchError, run
from .registry import Registry

log = logging.getLogger(__name__)

SUITE = "bookworm"
REPO_PREFIX = "bench"
WORK_DIR = IMAGES_DIR / "work"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageDef:
    """One test image: its parent, how its top layer is made and the workload it is measured with."""

    name: str
    parent: str | None
    workload: tuple[str, ...]
    #: file read by the read benchmark, if this image is the read image
    read_file: str | None = None


IMAGES: dict[str, ImageDef] = {d.name: d for d in (
    ImageDef("minbase", None, ("/bin/ls", "/")),
    ImageDef("python", "minbase", ("python3", "-c", "print(1)")),
    ImageDef("numpy", "python",
             ("python3", "-c", "import numpy, scipy.linalg; print(numpy.__version__)")),
    ImageDef("bigfile", "minbase", ("/bin/sh", "-c", "wc -c /data/blob.bin"), "/data/blob.bin"),
    ImageDef("busybox", None, ("/bin/ls", "/")),
    ImageDef("busybox-file", "busybox", ("/bin/sh", "-c", "wc -c /data/blob.bin"), "/data/blob.bin"),
)}

BIGFILE_MIB = 128
SMALLFILE_MIB = 16


def ref(host: str, image: str, variant: str) -> str:
    """Registry reference of `image` in `variant` (org, esgz or opt)."""
    return f"{host}/{REPO_PREFIX}/{image}:{variant}"


def closure(names: list[str]) -> list[str]:
    """`names` plus their parents, parents first."""
    out: list[str] = []

    def add(n: str) -> None:
        parent = IMAGES[n].parent
        if parent is not None:
            add(parent)
        if n not in out:
            out.append(n)

    for n in names:
        add(n)
    return out


def _mirror() -> str:
    """The Debian mirror this host's apt uses (so the build needs nothing else)."""
    text = ""
    for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if p.is_file():
            text += p.read_text(errors="replace") + "\n"
    for m in re.finditer(r"(https?://\S+/debian)/?(?:\s|$)", text):
        return m.group(1)
    return "http://deb.debian.org/debian"


def _umoci(*args: str, log_path: Path) -> None:
    run(["umoci", *args], log_path=log_path)


def _has_tag(tag: str) -> bool:
    if not OCI_LAYOUT.exists():
        return False
    out = run(["umoci", "ls", "--layout", str(OCI_LAYOUT)], check=False).stdout.split()
    return tag in out


def _clean_rootfs(root: Path) -> None:
    """Drop apt caches, logs and device nodes, which images don't ship."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
                    "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/apt/*", "var/log/dpkg.log",
                    "tmp/*", "root/.cache", "etc/resolv.conf", "usr/sbin/policy-rc.d", "dev/*"):
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _touch_parents_of_changes(root: Path, since: float) -> int:
    """Bump the mtime of every directory above an entry changed after `since`.

    umoci's diff layers leave out unchanged parent directories (a layer adding usr/bin/x has no
    "usr/" entry); ctr-remote optimize rejects such tars and no docker/buildkit layer looks like
    that. A changed mtime makes umoci emit the directory entry. Returns the number of directories.
    """
    parents: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ctime > since:
                parts = [] if rel == "." else rel.split(os.sep)
                for i in range(1, len(parts) + 1):
                    parents.add(os.sep.join(parts[:i]))
    for rel in parents:
        p = root / rel
        st = os.lstat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000), follow_symlinks=False)
    return len(parents)


def _chroot_apt(root: Path, packages: list[str], log_path: Path) -> None:
    """apt-get install `packages` inside `root` (with /proc mounted and minimal /dev nodes)."""
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    rc_d = root / "usr/sbin/policy-rc.d"
    rc_d.write_text("#!/bin/sh\nexit 101\n")
    rc_d.chmod(0o755)
    (root / "dev").mkdir(exist_ok=True)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("random", 1, 8), ("urandom", 1, 9)):
        node = root / "dev" / name
        if not node.exists():
            os.mknod(node, 0o666 | 0o020000, os.makedev(major, minor))
            node.chmod(0o666)
    run(["mount", "-t", "proc", "proc", str(root / "proc")], log_path=log_path)
    try:
        run(["chroot", str(root), "/usr/bin/env", "-i", PATH_ENV, "DEBIAN_FRONTEND=noninteractive",
             "LANG=C.UTF-8", "sh", "-c",
             "apt-get update -q && apt-get install -y -q --no-install-recommends " + " ".join(packages)],
            log_path=log_path)
    finally:
        run(["umount", str(root / "proc")], log_path=log_path, check=False)


def _write_random(path: Path, mib: int) -> None:
    """A deterministic, incompressible file of `mib` MiB (SHAKE-256 output)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for i in range(mib):
            f.write(hashlib.shake_256(f"lazysnap-bench {i}".encode()).digest(1 << 20))
    os.utime(path, (1704067200, 1704067200))


def _install_busybox(root: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    applets = run(["/bin/busybox", "--list"]).stdout.split()
    for a in applets:
        link = root / "bin" / a
        if a != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")


class ImageBuilder:
    """Builds the OCI layout images and publishes them to a registry in every variant."""

    def __init__(self, log_dir: Path = LOGS_DIR):
        self.log_dir = log_dir
        self.log_path = log_dir / "build-images.log"

    def _layer(self, name: str, make: Callable[[Path], None]) -> None:
        d = IMAGES[name]
        work = WORK_DIR / name
        wip = f"wip-{name}"
        if work.exists():
            shutil.rmtree(work)
        run(["umoci", "rm", "--image", f"{OCI_LAYOUT}:{wip}"], check=False)
        if d.parent is None:
            _umoci("new", "--image", f"{OCI_LAYOUT}:{wip}", log_path=self.log_path)
        else:
            _umoci("tag", "--image", f"{OCI_LAYOUT}:{d.parent}", wip, log_path=self.log_path)
        _umoci("unpack", "--image", f"{OCI_LAYOUT}:{wip}", str(work), log_path=self.log_path)
        rootfs = work / "rootfs"
        # ctime has coarse granularity: leave a clear gap between the unpack and our changes
        stamp = time.time() + 0.05
        time.sleep(0.1)
        make(rootfs)
        _clean_rootfs(rootfs)
        if d.parent is not None:
            n = _touch_parents_of_changes(rootfs, stamp)
            log.info("%s: %d parent directories marked for the diff layer", name, n)
        _umoci("repack", "--image", f"{OCI_LAYOUT}:{wip}", "--history.created_by",
               f"lazysnap bench: {name} layer", str(work), log_path=self.log_path)
        _umoci("config", "--image", f"{OCI_LAYOUT}:{wip}", "--config.env", PATH_ENV,
               "--config.env", "LANG=C.UTF-8", "--config.workingdir", "/",
               "--config.cmd", "/bin/sh", "--history.created_by", f"lazysnap bench: {name} config",
               log_path=self.log_path)
        run(["umoci", "rm", "--image", f"{OCI_LAYOUT}:{name}"], check=False)
        _umoci("tag", "--image", f"{OCI_LAYOUT}:{wip}", name, log_path=self.log_path)
        _umoci("rm", "--image", f"{OCI_LAYOUT}:{wip}", log_path=self.log_path)
        shutil.rmtree(work)

    def _make(self, name: str) -> Callable[[Path], None]:
        logf = self.log_dir / f"build-{name}.log"

        def minbase(root: Path) -> None:
            cache = CACHE_DIR / "debootstrap"
            cache.mkdir(parents=True, exist_ok=True)
            run(["debootstrap", "--variant=minbase", f"--cache-dir={cache}", SUITE, str(root), _mirror()],
                log_path=logf)

        makers: dict[str, Callable[[Path], None]] = {
            "minbase": minbase,
            "python": lambda root: _chroot_apt(root, ["python3"], logf),
            "numpy": lambda root: _chroot_apt(root, ["python3-numpy", "python3-scipy"], logf),
            "bigfile": lambda root: _write_random(root / "data/blob.bin", BIGFILE_MIB),
            "busybox": _install_busybox,
            "busybox-file": lambda root: _write_random(root / "data/blob.bin", SMALLFILE_MIB),
        }
        return makers[name]

    def build(self, names: list[str]) -> None:
        """Build the OCI layout images `names` (and their parents) that are not cached yet."""
        IMAGES_DIR.mkdir(parents=True, exist_ok=True)
        if not (OCI_LAYOUT / "index.json").exists():
            _umoci("init", "--layout", str(OCI_LAYOUT), log_path=self.log_path)
        for name in closure(names):
            if _has_tag(name):
                continue
            log.info("building image %s (log %s)", name, self.log_dir / f"build-{name}.log")
            self._layer(name, self._make(name))
        run(["umoci", "gc", "--layout", str(OCI_LAYOUT)], log_path=self.log_path)

    def publish(self, names: list[str], registry: Registry, containerd: Containerd | None) -> None:
        """Push :org of `names` and make :esgz and :opt with ctr-remote (needs `containerd`)."""
        for name in names:
            repo = f"{REPO_PREFIX}/{name}"
            org = ref(registry.host, name, "org")
            if not registry.has_manifest(repo, "org"):
                log.info("push %s", org)
                run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{OCI_LAYOUT}:{name}",
                     f"docker://{org}"], log_path=self.log_path)
            missing = [v for v in ("esgz", "opt") if not registry.has_manifest(repo, v)]
            if not missing:
                continue
            if containerd is None:
                raise BenchError(f"{repo}: {missing} missing and no containerd to convert with")
            run(containerd.ctr("image", "pull", "--plain-http", org), log_path=self.log_path)
            if "esgz" in missing:
                esgz = ref(registry.host, name, "esgz")
                log.info("convert --estargz --oci -> %s", esgz)
                run(containerd.ctr_remote("image", "convert", "--estargz", "--oci", org, esgz),
                    log_path=self.log_path)
                _push(containerd, esgz, self.log_path)
            if "opt" in missing:
                opt = ref(registry.host, name, "opt")
                log.info("optimize --oci (workload %s) -> %s", IMAGES[name].workload, opt)
                run(containerd.ctr_remote("image", "optimize", "--oci", "--period", "20",
                                          "--entrypoint", "[]", "--args",
                                          json.dumps(list(IMAGES[name].workload)), org, opt),
                    log_path=self.log_dir / f"optimize-{name}.log")
                _push(containerd, opt, self.log_path)


def _push(containerd: Containerd, image: str, log_path: Path) -> None:
    """`ctr image push`, once more if it fails: the docker pusher of containerd 1.6 can panic
    on a race between its writer and its status channel ("send on closed channel", fixed in a
    later release). A push is idempotent: the blobs are content-addressed."""
    argv = containerd.ctr("image", "push", "--plain-http", image)
    if run(argv, log_path=log_path, check=False).returncode != 0:
        log.warning("push of %s failed; pushing again (log: %s)", image, log_path)
        run(argv, log_path=log_path)


def expected_read_digest(name: str) -> str:
    """sha256 of the read image's big file, recomputed from its generator."""
    mib = {"bigfile": BIGFILE_MIB, "busybox-file": SMALLFILE_MIB}[name]
    h = hashlib.sha256()
    for i in range(mib):
        h.update(hashlib.shake_256(f"lazysnap-bench {i}".encode()).digest(1 << 20))
    return h.hexdigest()
