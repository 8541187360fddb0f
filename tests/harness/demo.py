"""The demo behind `scripts/demo`: lazysnap pulling and running an image end to end.

    python3 -m tests.harness.demo [--estargz] [--hold] [--keep-logs]

Starts a registry on loopback, builds and pushes the busybox test image, starts lazysnapd and a
private containerd wired to it, pulls the image with `--snapshotter lazysnap` (with `--estargz`:
converts it with `ctr-remote image convert --estargz --oci` in a throwaway containerd and pulls
it lazily with `ctr-remote image rpull`), runs a container, shows lazysnap's snapshots and how
many blob bytes came from the registry, then stops everything it started, by PID, also on Ctrl-C
or SIGTERM. `--hold` keeps the stack up until Enter is pressed and prints how to reach it.
Exit status: 0 on success, 1 when a step fails (the failing component's log tail is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .containerd import Containerd
from .estargz import convert_estargz
from .image import build_image
from .lazysnapd import Lazysnapd
from .procs import HarnessError, mounts_below, remove_tree, short_tempdir
from .registry import Registry

DEMO_CMD = ("echo '--- inside a container whose layers lazysnap serves:'; cat /etc/motd; "
            "cat /data/layer1.txt /data/layer2.txt /data/layer3.txt; ls -l /data; "
            "echo \"big.bin: $(wc -c < /data/big.bin) bytes, "
            "sha256 $(sha256sum /data/big.bin | cut -c1-16)\"")


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _layer_bytes(reg: Registry, mark: int, layers: dict[str, int]) -> str:
    served = reg.blob_bytes(since=mark)
    got = sum(n for d, n in served.items() if d in layers)
    touched = len(set(served) & set(layers))
    return f"{got} of {sum(layers.values())} ({touched} of {len(layers)} layers touched)"


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_demo(work: Path, estargz: bool, hold: bool) -> None:
    """Run the demo under `work`; every component is stopped when this returns or raises."""
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(Registry(work / "registry"))
        _say(f"registry (docker-registry pid {reg.pid}) on http://{reg.host}")
        img = build_image(work / "image", reg)
        layers = dict(zip(img.layer_digests, img.layer_sizes, strict=True))
        _say(f"pushed {img.ref}: {len(layers)} layers, {sum(layers.values())} bytes compressed")

        ref = img.ref
        if estargz:
            ref = f"{reg.host}/{img.name}:esgz"
            with Containerd(work / "convert") as builder:
                esgz = convert_estargz(builder, img.ref, ref)
            layers = dict(zip(esgz.layer_digests, esgz.layer_sizes, strict=True))
            _say(f"converted to eStargz and pushed {ref} ({sum(layers.values())} bytes, TOC digests "
                 f"{', '.join(t[7:19] for t in esgz.toc_digests)})")

        snapd = stack.enter_context(Lazysnapd(work / "lazysnapd"))
        _say(f"lazysnapd pid {snapd.pid}: root {snapd.root}, socket {snapd.address}")
        ctd = stack.enter_context(Containerd(work / "containerd", proxy_socket=snapd.address,
                                             registries=[reg.host], namespace="demo"))
        _say(f"containerd pid {ctd.pid}: socket {ctd.address}, proxy_plugins.lazysnap -> {snapd.address}")

        mark = reg.log_mark()
        t0 = time.monotonic()
        if estargz:
            _say(f"$ ctr-remote image rpull --plain-http --snapshotter lazysnap {ref}")
            ctd.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
        else:
            _say(f"$ ctr image pull --plain-http --snapshotter lazysnap {ref}")
            ctd.pull(ref, "lazysnap")
        _say(f"pulled in {time.monotonic() - t0:.2f}s; layer bytes from the registry so far: "
             f"{_layer_bytes(reg, mark, layers)}")

        _say(f"$ ctr run --rm --snapshotter lazysnap {ref} demo sh -c ...")
        print(ctd.run(ref, ["sh", "-c", DEMO_CMD], "lazysnap", "demo"), end="", flush=True)
        _say(f"layer bytes from the registry after the run: {_layer_bytes(reg, mark, layers)}; "
             f"FUSE/overlay mounts under lazysnap's root: {len(mounts_below(snapd.root))}")

        _say("$ ctr snapshots --snapshotter lazysnap ls")
        print(ctd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout, end="", flush=True)

        if hold:
            _say(f"holding. Try: ctr -a {ctd.address} -n demo images ls")
            _say(f"logs: {work}/*/*.err. Press Enter to stop everything.")
            with contextlib.suppress(EOFError):
                input()
        _say("stopping containerd, lazysnapd and the registry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0] if __doc__
                                     else None)
    parser.add_argument("--estargz", action="store_true",
                        help="convert the image to eStargz and pull it lazily with ctr-remote rpull")
    parser.add_argument("--hold", action="store_true", help="keep the stack running until Enter")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs) afterwards")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    work = short_tempdir("lazysnap-demo-")
    _say(f"work dir {work}")
    status = 0
    try:
        run_demo(work, args.estargz, args.hold)
    except HarnessError as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM/SIGHUP via _raise_exit
        _say("interrupted: everything the demo started is stopped")
        return exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
    finally:
        if args.keep_logs or status:
            _say(f"logs kept in {work}")
        else:
            remove_tree(work)
    if status == 0:
        _say("done: everything the demo started is stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
