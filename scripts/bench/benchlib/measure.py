"""The two measurements, each from a cold state: cold start (pull + run) and big-file reads."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .containerd import NAMESPACE, Containerd
from .images import IMAGES, expected_read_digest, ref
from .network import ShapedNetwork
from .paths import REPO
from .procs import BenchError, run
from .registry import Registry
from .snapshotters import Snapshotter

log = logging.getLogger(__name__)

READ_BUFFER = 1 << 20


def drop_caches() -> None:
    """Write back dirty pages and drop the page, dentry and inode caches (machine-wide)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fuse_mounts(root: Path | None) -> int:
    """FUSE mounts below `root` (the snapshotter's own: other FUSE users on the host don't count)."""
    if root is None:
        return 0
    prefix = str(root.resolve()) + "/"
    count = 0
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2].startswith("fuse") and fields[1].replace("\\040", " ").startswith(prefix):
            count += 1
    return count


@dataclass
class BenchEnv:
    """Everything a measurement needs: the registry, containerd, the link and all snapshotters."""

    run_id: str
    registry: Registry
    containerd: Containerd
    snapshotters: dict[str, Snapshotter]
    network: ShapedNetwork | None
    log_dir: Path
    settle_s: float = 1.0

    def make_cold(self, sn: Snapshotter) -> None:
        """containerd and every snapshotter stopped and wiped; `sn` and containerd started fresh."""
        self.containerd.stop()
        for other in self.snapshotters.values():
            other.stop()  # no lazy daemon may keep fetching in the background meanwhile
        self.containerd.wipe()
        sn.reset()
        self.containerd.start()
        drop_caches()
        time.sleep(self.settle_s)

    def rx_bytes(self) -> int:
        return self.network.rx_bytes() if self.network is not None else 0

    def base_record(self, sn: Snapshotter, image: str, variant: str, rep: int) -> dict[str, Any]:
        # lazysnapd is restarted from the working tree for every run: record which code that was
        head = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
        return {"ts": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": self.run_id,
                "repo_head": head,
                "snapshotter": sn.name, "image": image, "variant": variant, "rep": rep,
                "ref": ref(self.registry.host, image, variant)}


def _elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 3)


def cold_start(env: BenchEnv, sn: Snapshotter, image: str, variant: str, rep: int) -> dict[str, Any]:
    """Pull `image:variant` and run its workload to completion, from cold. One JSON record."""
    rec = env.base_record(sn, image, variant, rep)
    rec["kind"] = "coldstart"
    rec["cmd"] = list(IMAGES[image].workload)
    runlog = env.log_dir / f"coldstart-{sn.name}-{image}-{variant}-{rep}.log"
    sn.profile_label = f"coldstart-{image}-{variant}-{rep}"
    try:
        env.make_cold(sn)
    except BenchError as exc:
        rec.update(ok=False, error=f"reset failed: {exc}")
        return rec
    c = env.containerd
    offset, rx0, fm0 = env.registry.log_offset(), env.rx_bytes(), fuse_mounts(sn.root)
    t0 = time.monotonic()
    error = None
    pull = run(sn.pull_argv(c.ctr(), c.ctr_remote(), rec["ref"]), log_path=runlog, check=False)
    rec["pull_s"] = _elapsed(t0)
    if pull.returncode != 0:
        error = f"pull exited {pull.returncode}"
    else:
        t1 = time.monotonic()
        res = run(c.ctr("run", "--rm", "--snapshotter", sn.containerd_name, rec["ref"],
                        f"lzb-{os.getpid()}-{rep}", *IMAGES[image].workload), log_path=runlog, check=False)
        rec["run_s"] = _elapsed(t1)
        if res.returncode != 0:
            error = f"workload exited {res.returncode}"
    rec["total_s"] = _elapsed(t0)
    rx1 = env.rx_bytes()
    time.sleep(0.3)  # the registry logs a request after its response is complete
    traffic = env.registry.traffic_since(offset)
    rec.update(reg_bytes=traffic.bytes, reg_requests=traffic.requests,
               reg_blob_requests=traffic.blob_requests, link_rx_bytes=rx1 - rx0,
               new_fuse_mounts=fuse_mounts(sn.root) - fm0, snapshotter_peak_rss_kib=sn.peak_rss_kib(),
               containerd_peak_rss_kib=c.daemon.peak_rss_kib(), ok=error is None, log=str(runlog))
    if error:
        rec["error"] = error
        log.error("%s %s:%s rep %d: %s (see %s)", sn.name, image, variant, rep, error, runlog)
    return rec


def _timed_read(path: Path) -> tuple[float, int]:
    buf = bytearray(READ_BUFFER)
    total = 0
    t0 = time.monotonic()
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return time.monotonic() - t0, total


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_BUFFER):
            h.update(chunk)
    return h.hexdigest()


def read_throughput(env: BenchEnv, sn: Snapshotter, image: str, variant: str, rep: int) -> dict[str, Any]:
    """Sequential reads of the image's big file through a running container's rootfs.

    cold: first read after the cold pull (lazy snapshotters fetch it now); warm: after drop_caches
    (from the snapshotter's own cache, or local disk for overlayfs); hot: right after (page cache).
    The content is then checked against the generator's digest.
    """
    rec = env.base_record(sn, image, variant, rep)
    rec["kind"] = "read"
    file = IMAGES[image].read_file
    assert file is not None
    rec["file"] = file
    runlog = env.log_dir / f"read-{sn.name}-{image}-{variant}-{rep}.log"
    c = env.containerd
    cid = f"lzb-read-{os.getpid()}-{rep}"
    try:
        env.make_cold(sn)
        offset, fm0 = env.registry.log_offset(), fuse_mounts(sn.root)
        run(sn.pull_argv(c.ctr(), c.ctr_remote(), rec["ref"]), log_path=runlog)
        run(c.ctr("run", "-d", "--snapshotter", sn.containerd_name, rec["ref"], cid, "sleep", "1000000"),
            log_path=runlog)
        path = c.state / "io.containerd.runtime.v2.task" / NAMESPACE / cid / "rootfs" / file.lstrip("/")
        drop_caches()
        for phase in ("cold", "warm", "hot"):
            if phase == "warm":
                drop_caches()
            secs, size = _timed_read(path)
            rec[f"{phase}_s"] = round(secs, 3)
            rec[f"{phase}_MiBps"] = round(size / secs / (1 << 20), 1)
            rec["bytes"] = size
        digest = _sha256(path)
        time.sleep(0.3)
        traffic = env.registry.traffic_since(offset)
        rec.update(reg_bytes=traffic.bytes, reg_requests=traffic.requests,
                   new_fuse_mounts=fuse_mounts(sn.root) - fm0, snapshotter_peak_rss_kib=sn.peak_rss_kib(),
                   containerd_peak_rss_kib=c.daemon.peak_rss_kib(), ok=digest == expected_read_digest(image))
        if not rec["ok"]:
            rec["error"] = f"{file} read back with sha256 {digest}, not the generated content"
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        rec.update(ok=False, error=str(exc)[:2000])
    finally:
        run(c.ctr("task", "kill", "-s", "KILL", cid), check=False)
    if not rec["ok"]:
        log.error("%s read %s:%s rep %d: %s", sn.name, image, variant, rep, rec.get("error"))
    return rec
