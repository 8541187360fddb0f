"""`scripts/bench/run`: install, build, start the stack, measure every snapshotter, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from . import report
from .containerd import Containerd
from .images import IMAGES, ImageBuilder
from .measure import BenchEnv, cold_start, read_throughput
from .network import LinkSettings, ShapedNetwork
from .paths import BENCH_ROOT, BENCH_RUN, REPO, RESULTS_DIR
from .procs import BenchError, free_tcp_port, http_round_trip_ms, run
from .registry import Registry
from .snapshotters import Snapshotter, lazysnap, overlayfs, stargz_go

log = logging.getLogger("bench")

APT_PACKAGES = ["containerd", "runc", "docker-registry", "stargz-snapshotter", "skopeo", "umoci",
                "busybox-static", "debootstrap", "iproute2", "iptables", "gcc", "libnetfilter-queue-dev",
                "golang-go", "golang-github-containerd-stargz-snapshotter-dev"]
ALL_SNAPSHOTTERS = ("overlayfs", "stargz-go", "lazysnap")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run for CI: busybox images, loopback, 1 rep, --strict, no docs update")
    p.add_argument("--images", default="minbase,python,numpy", help="cold-start images (default %(default)s)")
    p.add_argument("--rtt-ms", type=int, default=20, help="round-trip delay added to the link (default 20)")
    p.add_argument("--rate", default="100mbit", help="link rate, tc syntax; 0 = unlimited (default 100mbit)")
    p.add_argument("--loopback", action="store_true", help="registry on 127.0.0.1, no shaping")
    p.add_argument("--reps", type=int, default=3, help="cold repetitions per cell (default 3)")
    p.add_argument("--snapshotters", default=",".join(ALL_SNAPSHOTTERS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--variants", default="esgz,opt,org",
                   help="image variants measured with the proxies (default %(default)s)")
    p.add_argument("--no-read", action="store_true", help="skip the read-throughput benchmark")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start benchmark")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="markdown file whose cold start / read throughput sections are rewritten")
    p.add_argument("--no-docs", action="store_true", help="do not touch the markdown file")
    p.add_argument("--lazysnap-config", type=Path,
                   help="passed to lazysnapd as --config instead of the generated one")
    p.add_argument("--lazysnap-toml", type=Path,
                   help="TOML appended to the generated lazysnapd config (no [registry] table)")
    p.add_argument("--strict", action="store_true", help="fail when a snapshotter is not available")
    p.add_argument("--report", metavar="RUN_ID",
                   help="measure nothing: rewrite the docs sections from a finished run's results")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="attach py-spy to lazysnapd in each run (raw collapsed stacks, idle included)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # a smoke run: every snapshotter asked for must work
        args.reps, args.loopback, args.no_docs, args.strict = 1, True, True, True
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.snapshotters = [s for s in args.snapshotters.split(",") if s]
    for s in args.snapshotters:
        if s not in ALL_SNAPSHOTTERS:
            p.error(f"unknown snapshotter {s!r}")
    args.images = ["busybox"] if args.quick else [i for i in args.images.split(",") if i]
    for i in args.images:
        if i not in IMAGES or IMAGES[i].read_file is not None:
            p.error(f"unknown cold-start image {i!r}")
    args.read_image = "busybox-file" if args.quick else "bigfile"
    return args


def ensure_packages() -> None:
    """apt-get install whichever of APT_PACKAGES is missing."""
    missing = [p for p in APT_PACKAGES if "install ok installed" not in subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, check=False).stdout]
    if missing:
        log.info("apt-get install %s", " ".join(missing))
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.report:
        records, info = report.load_run(RESULTS_DIR, args.report)
        report.write_docs(args.docs, records, info)
        log.info("updated %s from run %s", args.docs, args.report)
        return 0
    if os.geteuid() != 0:
        log.error("run as root: the bench mounts filesystems and creates network namespaces")
        return 2
    signal.signal(signal.SIGTERM, _raise_on_term)
    try:
        return _bench(args)
    except BenchError as exc:
        log.error("%s", exc)
        return 1


def _bench(args: argparse.Namespace) -> int:
    ensure_packages()
    now = datetime.now(UTC)
    run_id = now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    run_dir, sock_dir = BENCH_ROOT / "runs" / run_id, BENCH_RUN / run_id
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    sock_dir.mkdir(parents=True)
    results = RESULTS_DIR / f"{run_id}.jsonl"
    log.info("run %s: logs in %s, results in %s", run_id, logs, results)

    builder = ImageBuilder()
    builder.build([*args.images, args.read_image])

    records: list[dict[str, Any]] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, sock_dir, True)
        stack.callback(shutil.rmtree, run_dir / "state", True)
        local = Registry("registry-loopback", f"127.0.0.1:{free_tcp_port()}",
                         run_dir / "registry-loopback.yml", logs / "registry-loopback.log")
        local.start()
        stack.callback(local.stop)

        proxies = {name: sock_dir / f"{name}.sock" for name in ("stargz-go", "lazysnap")}
        containerd = Containerd(run_dir / "state" / "containerd", sock_dir / "containerd",
                                logs / "containerd.log", proxies)
        stack.callback(containerd.wipe)
        stack.callback(containerd.stop)
        containerd.start()
        builder.publish([*args.images, args.read_image], local, containerd)
        containerd.stop()

        network: ShapedNetwork | None = None
        registry = local
        link = "loopback (127.0.0.1, no shaping)"
        if not args.loopback:
            settings = LinkSettings(args.rtt_ms, args.rate)
            network = ShapedNetwork(settings, logs)
            stack.callback(network.down)
            network.up()
            registry = Registry("registry-netns", f"{network.registry_ip}:5000",
                                run_dir / "registry-netns.yml", logs / "registry-netns.log",
                                netns=network.ns_registry)
            registry.start()
            stack.callback(registry.stop)
            probe = http_round_trip_ms(f"http://{registry.host}/v2/")
            link = (f"{settings.describe()} (measured: a GET /v2/ on a new connection, two round trips, "
                    f"takes {probe:.1f} ms)")

        state = run_dir / "state"
        extra_toml = args.lazysnap_toml.read_text() if args.lazysnap_toml else ""
        makers: dict[str, Callable[[], Snapshotter]] = {"overlayfs": overlayfs,
                  "stargz-go": lambda: stargz_go(state, sock_dir, logs, [registry.host]),
                  "lazysnap": lambda: lazysnap(state, sock_dir, logs, args.lazysnap_config,
                                               [registry.host], extra_toml)}
        snapshotters: dict[str, Snapshotter] = {}
        for name in args.snapshotters:
            sn = makers[name]()
            sn.profile_dir = args.profile
            stack.callback(sn.stop)
            if sn.unavailable is None and sn.root is not None:
                try:
                    sn.reset()  # a daemon that does not come up is reported, not measured
                except BenchError as exc:
                    sn.unavailable = f"did not start: {str(exc).splitlines()[0]} (log {sn.log_path})"
                sn.stop()
            if sn.unavailable is not None:
                log.warning("%s: not available: %s", name, sn.unavailable)
            snapshotters[name] = sn
        measured = {n: s for n, s in snapshotters.items() if s.unavailable is None}
        env = BenchEnv(run_id, registry, containerd, measured, network, logs)

        def record(rec: dict[str, Any]) -> None:
            records.append(rec)
            report.append_jsonl(results, rec)
            print(json.dumps(rec, sort_keys=True), flush=True)

        for rep in range(1, args.reps + 1):
            if not args.no_cold_start:
                for image in args.images:
                    for sn in measured.values():
                        for variant in (v for v in sn.variants if v in args.variants.split(",")):
                            record(cold_start(env, sn, image, variant, rep))
            if not args.no_read:
                for sn in measured.values():
                    record(read_throughput(env, sn, args.read_image, sn.variants[0], rep))
        containerd.stop()

    unavailable = {n: s.unavailable for n, s in snapshotters.items() if s.unavailable is not None}
    info = report.RunInfo(run_id, now.strftime("%Y-%m-%d %H:%M UTC"),
                          shlex.join(["scripts/bench/run", *sys.argv[1:]]), link, args.reps, unavailable,
                          commit)
    report.save_info(RESULTS_DIR / f"{run_id}.info.json", info)
    if records:
        summary = ""
        if any(r["kind"] == "coldstart" for r in records):
            summary += report.cold_start_section(records, info) + "\n"
        if any(r["kind"] == "read" for r in records):
            summary += report.read_section(records, info)
        (run_dir / "summary.md").write_text(summary)
        print(summary)
        if not args.no_docs:
            report.write_docs(args.docs, records, info)
            log.info("updated %s", args.docs)
    failed = [r for r in records if not r.get("ok")]
    for r in failed:
        log.error("FAILED %s %s %s:%s rep %s: %s", r["kind"], r["snapshotter"], r["image"], r["variant"],
                  r["rep"], r.get("error"))
    if not records:
        log.error("nothing was measured")
        return 1
    if args.strict and unavailable:
        return 1
    return 1 if failed else 0
