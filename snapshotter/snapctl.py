"""snapctl: inspect and operate a running lazysnapd (gRPC socket and control API).

    snapctl status  [--address SOCKET] [--config FILE] [--control SOCKET] [--json]
    snapctl layers  [--json]
    snapctl layer   DIGEST [PATH] [--limit N] [--json]
    snapctl cache   du | prune [--unused] [--to SIZE] | verify      [--json]
    snapctl fetch   DIGEST|IMAGE [--json]
    snapctl convert SRC DST [--zstd-chunked] [--chunk-size N] [--level N]
    snapctl config  [--config FILE] [--json]

``status`` lists every snapshot over gRPC (counts by kind, remote ones, disk usage: committed as
measured at Commit, active measured now) and adds the daemon's own report from the control API
when it answers. Every other command except ``convert`` talks to the control API
(``snapshotter.control``), found with ``--control``, else from ``--config``, else the default
``/var/lib/lazysnap/control.sock``. Human tables by default, ``--json`` for scripts. User errors
print one line and exit non-zero (1: daemon unreachable or refused, 2: bad usage or input),
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from snapshotter import config as config_mod
from snapshotter import control_convert
from snapshotter import control_render as render
from snapshotter.api import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.control import control_address, effective_config
from snapshotter.control_client import ControlClient, ControlError, human_size, parse_size
from snapshotter.errors import ConfigError
from snapshotter.remote import REMOTE_LABEL, REMOTE_LABEL_VALUE
from snapshotter.service import kind_name

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
TIMEOUT = 30.0


@dataclass
class Status:
    """What ``snapctl status`` reports."""

    address: str
    snapshots: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {"active": 0, "view": 0, "committed": 0})
    remote: int = 0
    size_bytes: int = 0
    inodes: int = 0


def collect(address: str) -> Status:
    """Query the daemon at ``address``; raises grpc.RpcError when it cannot be reached."""
    status = Status(address=address)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        listing = stub.List(snapshots_pb2.ListSnapshotsRequest(), timeout=TIMEOUT)
        infos = [i for resp in listing for i in resp.info]
        for info in infos:
            kind = kind_name(info.kind)
            status.by_kind[kind] = status.by_kind.get(kind, 0) + 1
            status.remote += info.labels.get(REMOTE_LABEL) == REMOTE_LABEL_VALUE
            try:
                usage = stub.Usage(snapshots_pb2.UsageRequest(key=info.name), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # removed while we were looking
                    continue
                raise
            status.size_bytes += usage.size
            status.inodes += usage.inodes
        status.snapshots = len(infos)
    return status


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render_snapshots(status: Status) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in status.by_kind.items())
    return "\n".join([
        f"lazysnapd at {status.address}",
        f"snapshots: {status.snapshots} ({kinds}; remote {status.remote})",
        f"usage:     {_human(status.size_bytes)} in {status.inodes} inodes",
    ])


# -- the control API commands -------------------------------------------------------------


def _control_path(args: argparse.Namespace) -> str:
    if getattr(args, "control", None):
        return str(args.control)
    cfg = config_mod.load(getattr(args, "config", None))
    return control_address(cfg)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    address = args.address or cfg.address
    try:
        status = collect(address)
    except grpc.RpcError as exc:
        print(f"snapctl: cannot query lazysnapd at {address}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    daemon: dict[str, object] | None = None
    problem = None
    try:
        with ControlClient(args.control or control_address(cfg), timeout=TIMEOUT) as client:
            daemon = client.get("/v1/status")
    except ControlError as exc:
        problem = str(exc)
    if args.json:
        _print_json({**asdict(status), "daemon": daemon, "control_error": problem})
        return 0
    con = render.console()
    con.print(render_snapshots(status), highlight=False)
    if daemon is not None:
        con.print(render.daemon_table(daemon))
    else:
        con.print(f"control API: {problem}", highlight=False)
    return 0


def cmd_layers(args: argparse.Namespace, client: ControlClient) -> int:
    layers = client.get("/v1/layers")["layers"]
    if args.json:
        _print_json(layers)
    else:
        render.console().print(render.layers_table(layers))
    return 0


def cmd_layer(args: argparse.Namespace, client: ControlClient) -> int:
    layer = client.get(f"/v1/layers/{args.digest}", path=args.path, limit=str(args.limit))
    if args.json:
        _print_json(layer)
    else:
        render.console().print(render.tree_table(layer))
    return 0


def cmd_cache(args: argparse.Namespace, client: ControlClient) -> int:
    if args.action == "du":
        result = client.get("/v1/cache")
        if not args.json:
            render.console().print(render.cache_table(result))
            return 0
    elif args.action == "prune":
        result = client.post("/v1/cache/prune", {"unused": args.unused, "to": args.to})
        if not args.json:
            print(f"pruned {result['chunks']} chunks, {human_size(result['freed_bytes'])}: "
                  f"cache {human_size(result['before_bytes'])} -> {human_size(result['after_bytes'])}")
            return 0
    else:
        result = client.post("/v1/cache/verify")
        if not args.json:
            print(f"verified {result['checked']} chunks: {len(result['corrupt'])} corrupt, dropped")
            for bad in result["corrupt"]:
                print(f"  corrupt: {bad}")
            return 0
    _print_json(result)
    return 0


def cmd_fetch(args: argparse.Namespace, client: ControlClient) -> int:
    layers = client.get("/v1/layers")["layers"]
    target = args.target
    digests = [layer["digest"] for layer in layers if target in (layer["digest"], layer["ref"])]
    if not digests:
        raise ControlError(f"no served layer is {target!r} or belongs to that image")
    total = sum(layer["uncompressed_size"] for layer in layers if layer["digest"] in digests)
    for digest in digests:
        client.post(f"/v1/layers/{digest}/fetch")
    failed: list[str] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=render.console(), disable=args.json) as progress:
        task = progress.add_task(f"fetching {len(digests)} layer(s)", total=total)
        pending = set(digests)
        while pending:
            cached = 0
            for digest in digests:
                layer = client.get(f"/v1/layers/{digest}", path="/", limit="1")
                cached += layer["cached_bytes"]
                state = (layer.get("warm") or {}).get("state")
                if digest in pending and state in ("done", "failed"):
                    pending.discard(digest)
                    if state == "failed":
                        failed.append(f"{digest}: {layer['warm']['error']}")
            progress.update(task, completed=cached)
            if pending:
                time.sleep(0.2)
    if args.json:
        _print_json({"layers": digests, "failed": failed})
    for message in failed:
        print(f"snapctl: fetch failed: {message}", file=sys.stderr)
    return EXIT_UNREACHABLE if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    source = "daemon"
    try:
        with ControlClient(_control_path(args), timeout=TIMEOUT) as client:
            cfg = client.get("/v1/config")
    except ControlError:
        cfg = effective_config(config_mod.load(args.config))
        source = f"file {args.config}" if args.config else "built-in defaults"
    if args.json:
        _print_json(cfg)
    else:
        print(f"# effective config from the {source}")
        print(render.config_toml(cfg))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    options: dict[str, object] = {"zstd_chunked": args.zstd_chunked, "chunk_size": args.chunk_size}
    if args.level is not None:
        options["level"] = args.level
    layout = control_convert.is_layout(args.src)
    total = (sum(int(d.get("size", 0)) for d in control_convert.layout_layers(args.src)) if layout
             else os.path.getsize(args.src))
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=render.console(), disable=args.json) as progress:
        task = progress.add_task(f"converting {args.src}", total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        if layout:
            results = control_convert.convert_layout(args.src, args.dst, advance, **options)
        else:
            results = [control_convert.convert_layer(args.src, args.dst, advance, **options)]
    summary = [{"source": r.source_digest, **asdict(r.result), "annotations": r.result.annotations()}
               for r in results]
    if args.json:
        _print_json({"destination": args.dst, "layers": summary})
    else:
        for r in results:
            print(f"{r.source_digest[:19]} -> {r.result.blob_digest} ({human_size(r.result.blob_size)}, "
                  f"toc {r.result.toc_digest})")
        print(f"wrote {args.dst}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapctl", description="inspect and operate a running lazysnapd")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="lazysnapd's TOML config (to find its sockets)")
    common.add_argument("--control", help="the control socket (default: from --config, else "
                        "/var/lib/lazysnap/control.sock)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", parents=[common], help="snapshots, layers, cache, fetch rates")
    st.add_argument("--address", help="lazysnapd's gRPC socket (default: from --config, else built in)")
    sub.add_parser("layers", parents=[common], help="served layers")
    ly = sub.add_parser("layer", parents=[common], help="one layer's tree with per-file residency")
    ly.add_argument("digest")
    ly.add_argument("path", nargs="?", default="/")
    ly.add_argument("--limit", type=int, default=10_000, help="most entries listed (default 10000)")
    ca = sub.add_parser("cache", parents=[common], help="the chunk cache")
    ca.add_argument("action", choices=("du", "prune", "verify"))
    ca.add_argument("--unused", action="store_true", help="prune: only layers no snapshot mounts")
    ca.add_argument("--to", type=_size_arg, default=0, help="prune: down to this size (default 0)")
    fe = sub.add_parser("fetch", parents=[common], help="fetch a served layer (or an image's) fully")
    fe.add_argument("target", metavar="DIGEST|IMAGE")
    co = sub.add_parser("convert", parents=[common], help="tar layer or OCI layout to eStargz")
    co.add_argument("src", help="a layer tar (plain, gzip, zstd) or an OCI image layout directory")
    co.add_argument("dst", help="the eStargz blob, or the new OCI layout directory")
    co.add_argument("--zstd-chunked", action="store_true", help="write zstd:chunked instead of gzip")
    co.add_argument("--chunk-size", type=_size_arg, default=4 << 20, help="file chunk size (default 4MiB)")
    co.add_argument("--level", type=int, help="compression level")
    sub.add_parser("config", parents=[common], help="the effective config, defaults included")
    return p


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``snapctl``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return cmd_status(args)
        if args.command == "config":
            return cmd_config(args)
        if args.command == "convert":
            return cmd_convert(args)
        handler = {"layers": cmd_layers, "layer": cmd_layer, "cache": cmd_cache, "fetch": cmd_fetch}
        with ControlClient(_control_path(args)) as client:
            return handler[args.command](args, client)
    except ConfigError as exc:
        print(f"snapctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except control_convert.ConvertError as exc:
        print(f"snapctl: convert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"snapctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
