"""Results: JSON lines per measurement, and the markdown sections of docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import IMAGES

COLD_HEADING = "## cold start"
READ_HEADING = "## read throughput"


@dataclass(frozen=True)
class RunInfo:
    """What the tables are headed with: when, where, over which link, how invoked."""

    run_id: str
    date: str
    command: str
    link: str
    reps: int
    unavailable: dict[str, str]
    #: the repository's HEAD when the run started (lazysnapd runs from the working tree)
    commit: str = ""


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (f"{cpu}, {os.cpu_count()} cores, {mem_kib / (1 << 20):.0f} GiB RAM, "
            f"Linux {platform.release()}")


def save_info(path: Path, info: RunInfo) -> None:
    path.write_text(json.dumps(dataclasses.asdict(info), indent=1) + "\n")


def load_run(results: Path, run_id: str) -> tuple[list[dict[str, Any]], RunInfo]:
    """The records and RunInfo a finished run left in `results`."""
    info = RunInfo(**json.loads((results / f"{run_id}.info.json").read_text()))
    with (results / f"{run_id}.jsonl").open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, info


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _ok(records: Iterable[dict[str, Any]], **match: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("ok") and all(r.get(k) == v for k, v in match.items())]


def _failed(records: Iterable[dict[str, Any]], **match: str) -> int:
    return sum(1 for r in records if not r.get("ok") and all(r.get(k) == v for k, v in match.items()))


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _span(rows: list[dict[str, Any]], key: str, unit: str, digits: int = 2) -> str:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f} {unit}"
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "n/a"
    r = a / b
    return f"{r:.2f}" if r >= 0.1 else f"{r:.4f}"


def _lazy_note(records: list[dict[str, Any]], kind: str, variant: str, **match: str) -> str:
    """A footnote mark when lazysnap mounted no layer lazily in these runs (its figure is a full pull)."""
    mounts = median_of(_ok(records, kind=kind, snapshotter="lazysnap", variant=variant, **match),
                       "new_fuse_mounts")
    return " \\*" if mounts == 0 else ""


FULL_PULL_NOTE = ("\n\\* lazysnap mounted no layer lazily in these runs: every layer was downloaded and "
                  "unpacked (its fallback path), so the ratio compares a full pull with the other column.\n")


class Table:
    def __init__(self, header: list[str]):
        self.rows = [header, ["---"] * len(header)]

    def add(self, row: list[str]) -> None:
        self.rows.append(row)

    def render(self) -> str:
        return "\n".join("| " + " | ".join(r) + " |" for r in self.rows) + "\n"


def _columns(records: list[dict[str, Any]], kind: str) -> list[tuple[str, str]]:
    """(snapshotter, variant) pairs present in the run, in measurement order."""
    seen: list[tuple[str, str]] = []
    for r in records:
        key = (r["snapshotter"], r["variant"])
        if r["kind"] == kind and key not in seen:
            seen.append(key)
    return seen


def _unavailable_note(info: RunInfo) -> str:
    return "".join(f"- **{name}: not available** — {why}\n" for name, why in info.unavailable.items())


def _preamble(info: RunInfo) -> str:
    return (f"Run `{info.run_id}`, {info.date}, on {machine()}. Link to the registry: {info.link}. "
            f"{info.reps} cold repetition{'s' if info.reps > 1 else ''} per cell, snapshotters interleaved. "
            f"Command: `{info.command}`"
            + (f", lazysnap at commit `{info.commit}` (working tree)" if info.commit else "") + ".\n\n")


def _mb(rows: list[dict[str, Any]], key: str) -> str:
    v = median_of(rows, key)
    return "n/a" if v is None else f"{v / 1e6:.1f} MB"


def _cell(rows: list[dict[str, Any]], failed: int, text: str) -> str:
    if not rows:
        return f"failed x{failed}" if failed else "n/a"
    return text + (f" ({failed} failed)" if failed else "")


def cold_start_section(records: list[dict[str, Any]], info: RunInfo) -> str:
    cols = _columns(records, "coldstart")
    images = list(dict.fromkeys(r["image"] for r in records if r["kind"] == "coldstart"))
    out = [COLD_HEADING + "\n\n", _preamble(info),
           "Cold start = `ctr image pull` (overlayfs) or `ctr-remote image rpull` (lazy snapshotters) plus "
           "`ctr run` of the workload until it exits, from a wiped containerd, snapshotter and page cache. "
           "Median seconds (min-max).\n\n", _unavailable_note(info)]
    head = ["image (workload)", *[f"{s} `:{v}`" for s, v in cols]]
    times, traffic, rss = Table(head), Table(head), Table(head)
    for img in images:
        label = f"{img} (`{' '.join(IMAGES[img].workload)}`)"
        trow, brow, rrow = [label], [img], [img]
        for s, v in cols:
            rows = _ok(records, kind="coldstart", image=img, snapshotter=s, variant=v)
            failed = _failed(records, kind="coldstart", image=img, snapshotter=s, variant=v)
            trow.append(_cell(rows, failed, _span(rows, "total_s", "s")))
            req = median_of(rows, "reg_requests")
            mounts = median_of(rows, "new_fuse_mounts")
            text = "n/a" if req is None else f"{_mb(rows, 'reg_bytes')}, {req:.0f} req"
            if s != "overlayfs" and mounts is not None:
                text += f", {mounts:.0f} lazy" if mounts else ", no lazy layer"
            brow.append(_cell(rows, failed, text))
            kib = median_of(rows, "snapshotter_peak_rss_kib")
            if s == "overlayfs":
                kib = median_of(rows, "containerd_peak_rss_kib")
            rrow.append(_cell(rows, failed, "n/a" if kib is None else f"{kib / 1024:.0f} MiB"))
        times.add(trow)
        traffic.add(brow)
        rss.add(rrow)
    out += [times.render(), "\nFetched from the registry by the time the workload exited (median response "
            "bytes and requests, from the registry's access log) and, for the proxy snapshotters, how many "
            "layers were mounted lazily (FUSE mounts that appeared; \"no lazy layer\" = every layer was "
            "downloaded and unpacked):\n\n", traffic.render(),
            "\nPeak RSS (VmHWM, median) of the snapshotter daemon; for overlayfs, of containerd:\n\n",
            rss.render(), "\n", ratios_section(records, images, info)]
    return "".join(out)


def ratios_section(records: list[dict[str, Any]], images: list[str], info: RunInfo) -> str:
    """lazysnap/Go and lazysnap/overlayfs cold-start ratios, from this run's medians."""
    if "lazysnap" in info.unavailable:
        why = info.unavailable["lazysnap"]
        return f"Ratios lazysnap/stargz-go and lazysnap/overlayfs: not available ({why}).\n"
    t = Table(["image", "lazysnap/stargz-go `:esgz`", "lazysnap/stargz-go `:opt`",
               "lazysnap `:esgz` / overlayfs `:org`"])
    for img in images:
        def med(s: str, v: str, img: str = img) -> float | None:
            return median_of(_ok(records, kind="coldstart", image=img, snapshotter=s, variant=v), "total_s")
        esgz = _lazy_note(records, "coldstart", "esgz", image=img)
        opt = _lazy_note(records, "coldstart", "opt", image=img)
        t.add([img, _ratio(med("lazysnap", "esgz"), med("stargz-go", "esgz")) + esgz,
               _ratio(med("lazysnap", "opt"), med("stargz-go", "opt")) + opt,
               _ratio(med("lazysnap", "esgz"), med("overlayfs", "org")) + esgz])
    note = FULL_PULL_NOTE if any("\\*" in cell for row in t.rows for cell in row) else ""
    return ("Cold-start time ratios (below 1 = lazysnap faster), from the medians above:\n\n"
            + t.render() + note)


def read_section(records: list[dict[str, Any]], info: RunInfo) -> str:
    cols = _columns(records, "read")
    sizes = [int(r["bytes"]) for r in records if r["kind"] == "read" and r.get("bytes")]
    size = f"{max(sizes) >> 20} MiB" if sizes else "big"
    out = [READ_HEADING + "\n\n", _preamble(info),
           f"Sequential reads (1 MiB `read`s) of a {size} incompressible file through a running container's "
           "rootfs: **cold** right after the cold pull (lazy snapshotters fetch it from the registry now), "
           "**warm** after `drop_caches` (served from the snapshotter's own cache, or the local disk for "
           "overlayfs), **hot** immediately again (page cache). Median MiB/s (min-max); the content is "
           "checked against its generator after the reads.\n\n", _unavailable_note(info)]
    t = Table(["snapshotter (image)", "cold", "warm", "hot", "fetched",
               "peak RSS (containerd for overlayfs)"])
    for s, v in cols:
        rows = _ok(records, kind="read", snapshotter=s, variant=v)
        failed = _failed(records, kind="read", snapshotter=s, variant=v)
        image = next(r["image"] for r in records if r["kind"] == "read" and r["snapshotter"] == s)
        kib = median_of(rows, "containerd_peak_rss_kib" if s == "overlayfs" else "snapshotter_peak_rss_kib")
        t.add([f"{s} (`{image}:{v}`)",
               *[_cell(rows, failed, _span(rows, f"{p}_MiBps", "MiB/s", 1)) for p in ("cold", "warm", "hot")],
               _cell(rows, failed, _mb(rows, "reg_bytes")),
               "n/a" if kib is None else f"{kib / 1024:.0f} MiB"])
    out.append(t.render())
    if "lazysnap" not in info.unavailable:
        r = Table(["phase", "lazysnap/stargz-go", "lazysnap/overlayfs"])
        for p in ("cold", "warm", "hot"):
            def med(s: str, v: str, p: str = p) -> float | None:
                return median_of(_ok(records, kind="read", snapshotter=s, variant=v), f"{p}_MiBps")
            note = _lazy_note(records, "read", "esgz")
            r.add([p, _ratio(med("lazysnap", "esgz"), med("stargz-go", "esgz")) + note,
                   _ratio(med("lazysnap", "esgz"), med("overlayfs", "org")) + note])
        note = FULL_PULL_NOTE if any("\\*" in cell for row in r.rows for cell in row) else ""
        out += ["\nThroughput ratios (above 1 = lazysnap faster):\n\n", r.render(), note]
    else:
        out.append(f"\nRatios lazysnap/stargz-go and lazysnap/overlayfs: not available "
                   f"({info.unavailable['lazysnap']}).\n")
    return "".join(out)


def replace_section(doc: str, heading: str, body: str) -> str:
    """`doc` with the section under `heading` (up to the next `## `) replaced by `body`."""
    pattern = re.compile(rf"^{re.escape(heading)}\s*\n.*?(?=^## |\Z)", re.M | re.S)
    body = body.rstrip("\n") + "\n\n"
    if pattern.search(doc):
        return pattern.sub(lambda _m: body, doc, count=1)
    return doc.rstrip("\n") + "\n\n" + body


def write_docs(path: Path, records: list[dict[str, Any]], info: RunInfo) -> None:
    """Rewrite only our two sections of docs/benchmarks.md (other sections are left as they are)."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if any(r["kind"] == "coldstart" for r in records):
        doc = replace_section(doc, COLD_HEADING, cold_start_section(records, info))
    if any(r["kind"] == "read" for r in records):
        doc = replace_section(doc, READ_HEADING, read_section(records, info))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(doc.rstrip("\n") + "\n")
    tmp.replace(path)
