"""A shaped path to a registry: host <-veth-> router netns <-veth-> registry netns.

    host veth A.B.0.1/30 <-> r0 A.B.0.2/30 [router netns] r1 A.B.1.1/30 <-> g0 A.B.1.2/30 [registry]

The addresses exist only on these veths, in a 10.x.0.0/16 block no route on this host uses; the
host gets one route to the registry's /30 via the router. Nothing leaves the machine.
Shaping happens in the router on forwarded packets: `tbf` on both egress interfaces for the rate,
and (this kernel has no sch_netem) an iptables NFQUEUE rule whose packets our `nfq-delay`
helper accepts RTT/2 later, in each direction.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .paths import BIN_DIR, HERE
from .procs import BenchError, Daemon, run

log = logging.getLogger(__name__)

NFQ_DELAY = BIN_DIR / "nfq-delay"
NFQ_SOURCE = HERE / "nfqdelay" / "nfq_delay.c"


@dataclass(frozen=True)
class LinkSettings:
    """Delay added to every round trip and the rate limit (tc syntax, e.g. 100mbit; "0" = none)."""

    rtt_ms: int
    rate: str

    def describe(self) -> str:
        rate = "unlimited" if self.rate in ("0", "") else self.rate
        return f"RTT +{self.rtt_ms} ms, {rate}, via network namespaces"


def build_nfq_delay() -> Path:
    """Compile the delay helper if it is missing or older than its source."""
    if NFQ_DELAY.exists() and NFQ_DELAY.stat().st_mtime >= NFQ_SOURCE.stat().st_mtime:
        return NFQ_DELAY
    if not Path("/usr/include/libnetfilter_queue/libnetfilter_queue.h").exists():
        raise BenchError("libnetfilter-queue-dev is not installed")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(NFQ_DELAY), str(NFQ_SOURCE),
         "-lnetfilter_queue", "-lnfnetlink"])
    return NFQ_DELAY


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout
    out += run(["ip", "-4", "-o", "addr", "show"]).stdout
    nets = []
    for word in out.split():
        try:
            net = ipaddress.ip_network(word, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
            nets.append(net)
    return nets


def _free_block() -> ipaddress.IPv4Network:
    """A 10.x.0.0/16 that overlaps no address or route on this host."""
    used = _used_networks()
    candidates = [ipaddress.IPv4Network(f"10.{x}.0.0/16") for x in range(200, 250)]
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            return net
    raise BenchError("no free 10.x.0.0/16 block for the bench network")


class ShapedNetwork:
    """The two namespaces and three veth pairs' worth of plumbing, created and removed by us."""

    def __init__(self, settings: LinkSettings, log_dir: Path):
        token = secrets.token_hex(3)
        self.settings = settings
        self.ns_router = f"lzb-{token}-rt"
        self.ns_registry = f"lzb-{token}-reg"
        self.host_if = f"lzb{token}h"
        self.queue_num = random.randint(1000, 60000)
        base = _free_block().network_address
        self.host_ip = str(base + 1)
        self.router_ip0 = str(base + 2)
        self.router_ip1 = str(base + 257)
        self.registry_ip = str(base + 258)
        self.registry_net = f"{base + 256}/30"
        self.host_net = f"{base}/30"
        self.delay: Daemon | None = None
        self.log_dir = log_dir
        self._created = False

    def _rt(self, *argv: str) -> None:
        run(["ip", "netns", "exec", self.ns_router, *argv])

    def _reg(self, *argv: str) -> None:
        run(["ip", "netns", "exec", self.ns_registry, *argv])

    def up(self) -> None:
        """Create namespaces, links, routes and shaping."""
        self._created = True
        run(["ip", "netns", "add", self.ns_router])
        run(["ip", "netns", "add", self.ns_registry])
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "r0",
             "netns", self.ns_router])
        self._rt("ip", "link", "add", "r1", "type", "veth", "peer", "name", "g0", "netns", self.ns_registry)
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        run(["ip", "route", "add", self.registry_net, "via", self.router_ip0, "dev", self.host_if])
        self._rt("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._rt("ip", "link", "set", "lo", "up")
        self._rt("ip", "addr", "add", f"{self.router_ip0}/30", "dev", "r0")
        self._rt("ip", "addr", "add", f"{self.router_ip1}/30", "dev", "r1")
        self._rt("ip", "link", "set", "r0", "up")
        self._rt("ip", "link", "set", "r1", "up")
        self._reg("ip", "link", "set", "lo", "up")
        self._reg("ip", "addr", "add", f"{self.registry_ip}/30", "dev", "g0")
        self._reg("ip", "link", "set", "g0", "up")
        self._reg("ip", "route", "add", self.host_net, "via", self.router_ip1, "dev", "g0")
        self._shape()

    def _shape(self) -> None:
        s = self.settings
        if s.rate not in ("0", ""):
            for dev in ("r0", "r1"):
                self._rt("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", s.rate,
                         "burst", "32kb", "latency", "100ms")
        if s.rtt_ms > 0:
            helper = build_nfq_delay()
            self.delay = Daemon("nfq-delay", [str(helper), str(self.queue_num), str(s.rtt_ms * 500)],
                                self.log_dir / "nfq-delay.log", netns=self.ns_router)
            self.delay.start()
            self._rt("iptables", "-w", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num",
                     str(self.queue_num), "--queue-bypass")

    def rx_bytes(self) -> int:
        """Bytes the host received from the router so far (includes headers)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def down(self) -> None:
        """Stop the delay helper and delete what `up` created (deleting a netns drops its veths)."""
        if self.delay is not None:
            self.delay.stop()
            self.delay = None
        if not self._created:
            return
        for argv in (["ip", "link", "del", self.host_if], ["ip", "netns", "del", self.ns_router],
                     ["ip", "netns", "del", self.ns_registry]):
            subprocess.run(argv, capture_output=True, check=False)
        self._created = False
