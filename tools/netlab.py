#!/usr/bin/env python3
"""Network lab for dispatch: a client host with three shaped uplinks to a server.

The lab is made of two Linux network namespaces joined by veth pairs::

    CLIENT namespace (<name>-client)          SERVER namespace (<name>-server)
      dlab-up1  198.51.100.18/28  ---- tbf ----  dlab-srv1  198.51.100.17/28
      dlab-up2  198.51.100.34/28  ---- tbf ----  dlab-srv2  198.51.100.33/28
      dlab-up3  198.51.100.50/28  ---- tbf ----  dlab-srv3  198.51.100.49/28
                                                 lo  203.0.113.80/32  (SERVICE)

* Every veth end is shaped on egress with ``tc tbf`` (default 1200, 1200 and
  400 kB/s, kB = 1000 bytes), so both download and upload are limited.  The
  rate is a *wire* rate: tbf counts Ethernet headers, so TCP goodput tops out
  at about 95.6 % of it with a 1500-byte MTU.  A rate of 0 leaves the link
  unshaped: as fast as the veth pair goes (benchmarks).
* The server runs strict reverse-path filtering (rp_filter=1): a packet that
  arrives on uplink 1 with uplink 2's source address is dropped, which is the
  real-world failure mode dispatch must avoid.
* Two client routing setups:

  ``rules``    one routing table per uplink and ``ip rule from ADDR table N``:
               binding the source address is enough to pick the uplink.
  ``metrics``  one default route per uplink with metrics 100/200/300 and no
               rules (the usual desktop): a socket bound only to uplink 2's
               address still leaves through uplink 1 and the server drops it;
               binding to the device (SO_BINDTODEVICE) is needed.

* A link can be made *dark* (loses every packet) with a blackhole route for
  its client address on the server side: :meth:`Lab.darken` / :meth:`Lab.restore`.
* A link's rate can be changed while traffic flows (both directions):
  :meth:`Lab.set_rate`, or ``netlab.py rate INDEX KBPS``.
* ``Lab(ipv6=True)`` (the ``rules`` setup) gives every uplink an IPv6 /64
  too (client ``2001:db8:100:I::2``, server ``::1``), the server the service
  address ``2001:db8:80::80``, with the same rules by source address, and
  the phone (if any) ``fd99::2/64`` on the client's ``fd99::1``.
* ``Lab(phone=True)`` adds a PHONE namespace (``<name>-phone``), a device
  on the client's LAN that knows nothing of proxies: ``dlab-phone``
  10.99.0.2/24, its default route through the client's ``dlab-lan``
  10.99.0.1/24, and the client forwards.  The server has no route back to
  the LAN: what the client forwards as it came gets no answer.

Namespaces are named ``<name>-client`` and ``<name>-server`` (default name
``dlab``); the veth pairs are created directly inside the namespaces, so
interface names never collide between two labs or with the host.  Nothing is
added to the host namespace.  Must run as root.

Use it as a module (``sys.path.insert(0, "tools"); import netlab``)::

    with netlab.Lab(name="dlab-t1", setup="metrics") as lab:
        lab.start_peer_echo(port=7007)
        print(lab.peer_address(7007, bind_dev="dlab-up2"))

or from the command line: ``python tools/netlab.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import http.server
import os
import random
import select
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import NamedTuple
from collections.abc import Iterator, Sequence

DEFAULT_NAME = "dlab"
SETUPS = ("rules", "metrics")
DEFAULT_RATES = (1_200_000, 1_200_000, 400_000)  # bytes per second, per uplink
SERVICE_ADDRESS = "203.0.113.80"  # TEST-NET-3; the eth0 of this host uses 192.0.2.0/24
UPLINK_NET = "198.51.100"  # TEST-NET-2, one /28 per uplink
HTTP_PORT = 8080
PEER_ECHO_PORT = 7007
LAN_IFNAME = "dlab-lan"  # the client's end of the phone's LAN
LAN_ADDRESS = "10.99.0.1"
PHONE_IFNAME = "dlab-phone"
PHONE_ADDRESS = "10.99.0.2"
LAN_PREFIXLEN = 24
SERVICE_ADDRESS6 = "2001:db8:80::80"
UPLINK_NET6 = "2001:db8:100"  # uplink i: 2001:db8:100:i::/64
LAN_ADDRESS6 = "fd99::1"
PHONE_ADDRESS6 = "fd99::2"
CMD_TIMEOUT = 20.0  # seconds, for every ip/tc command we run

_CLONE_NEWNET = 0x40000000
_TABLE_BASE = 100  # uplink i uses routing table 100+i in the "rules" setup
_RULE_PREF_BASE = 1000


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _run(argv: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise with stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(argv)}\n{proc.stderr.strip()}")
    return proc


def tbf_params(rate: int) -> tuple[int, int]:
    """Return (burst, limit) in bytes for a tbf of ``rate`` bytes/s.

    burst: 20 ms worth of tokens but at least 16 kB.  tbf refuses a packet
    bigger than the burst and must split GSO super-packets (up to 64 kB on
    veth) into MTU segments; a burst of a few full frames keeps the pacing
    smooth at these rates without letting big bursts through.
    limit: the queue, 100 ms worth of data (plus the burst).  It must exceed
    the bandwidth-delay product so a single TCP stream keeps the link busy
    after a loss; measured: one stream reaches ~95 % of the wire rate.
    """
    burst = max(16_000, rate // 50)
    limit = rate // 10 + burst
    return burst, limit


class Counters(NamedTuple):
    """Byte counters of the client end of an uplink."""

    tx_bytes: int
    rx_bytes: int


@dataclass(frozen=True)
class Uplink:
    """One client<->server link; ``index`` is 1-based."""

    index: int
    client_ifname: str
    client_addr: str
    server_ifname: str
    server_addr: str
    rate: int  # bytes per second, applied in both directions; 0: unshaped
    prefixlen: int = 28

    @property
    def table(self) -> int:
        """Routing table used for this uplink in the ``rules`` setup."""
        return _TABLE_BASE + self.index

    @property
    def metric(self) -> int:
        """Default-route metric used for this uplink in the ``metrics`` setup."""
        return 100 * self.index


def make_uplinks(rates: Sequence[int]) -> list[Uplink]:
    """Plan the uplinks: uplink i gets 198.51.100.(16 i)/28 (server .1, client .2)."""
    if not 1 <= len(rates) <= 14:
        raise ValueError("between 1 and 14 uplinks")
    return [
        Uplink(
            index=i,
            client_ifname=f"dlab-up{i}",
            client_addr=f"{UPLINK_NET}.{16 * i + 2}",
            server_ifname=f"dlab-srv{i}",
            server_addr=f"{UPLINK_NET}.{16 * i + 1}",
            rate=int(rate),
        )
        for i, rate in enumerate(rates, start=1)
    ]


# --------------------------------------------------------------------------- #
# Entering a namespace from Python (for sockets)
# --------------------------------------------------------------------------- #


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Switch the *calling thread* into network namespace ``name`` for a while.

    A socket belongs for life to the namespace it was created in, so the
    idiom is ``with netns(ns): sock = socket.socket()`` and then use the
    socket anywhere.  Other threads are not affected.  ``None`` is a no-op.
    Note: /sys is *not* remounted (unlike ``ip netns exec``).
    """
    if name is None:
        yield
        return
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)


def open_connection(
    host: str,
    port: int,
    *,
    ns: str | None = None,
    bind_addr: str | None = None,
    bind_dev: str | None = None,
    timeout: float = 5.0,
) -> socket.socket:
    """Connect a TCP socket created in namespace ``ns``.

    ``bind_addr`` binds the source address, ``bind_dev`` binds to a device
    (SO_BINDTODEVICE).  The timeout applies to connect and later I/O.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if bind_dev:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind_dev.encode())
        if bind_addr:
            sock.bind((bind_addr, 0))
        sock.connect((host, port))
        return sock
    except BaseException:
        sock.close()
        raise


# --------------------------------------------------------------------------- #
# The lab
# --------------------------------------------------------------------------- #


class Lab:
    """A client namespace with shaped uplinks to a server namespace.

    ``Lab(...)`` only plans; :meth:`up` builds (after cleaning leftovers with
    the same name), :meth:`down` tears down (idempotent).  It is also a
    context manager: ``with Lab() as lab: ...`` builds and always tears down.
    """

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        setup: str = "rules",
        rates: Sequence[int] = DEFAULT_RATES,
        service_address: str = SERVICE_ADDRESS,
        phone: bool = False,
        ipv6: bool = False,
    ) -> None:
        if setup not in SETUPS:
            raise ValueError(f"setup must be one of {SETUPS}, not {setup!r}")
        if ipv6 and setup != "rules":
            raise ValueError("an IPv6 lab has the rules setup")
        self.ipv6 = ipv6
        self.service_address6 = SERVICE_ADDRESS6 if ipv6 else None
        self.name = name
        self.setup = setup
        self.client_ns = f"{name}-client"
        self.server_ns = f"{name}-server"
        self.phone_ns = f"{name}-phone" if phone else None
        self.uplinks: list[Uplink] = make_uplinks(rates)
        self.service_address = service_address
        self._procs: list[subprocess.Popen] = []

    # -- availability -------------------------------------------------------

    @staticmethod
    def available() -> tuple[bool, str]:
        """Can a lab be built here?  Returns (ok, reason-if-not)."""
        if not sys.platform.startswith("linux"):
            return False, "network lab needs Linux"
        if os.geteuid() != 0:
            return False, "network lab needs root"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return False, f"network lab needs '{tool}' (iproute2)"
        probe = f"dlab-probe-{os.getpid()}"
        try:
            proc = _run(["ip", "netns", "add", probe], check=False)
            if proc.returncode != 0:
                return False, f"'ip netns add' failed: {proc.stderr.strip()}"
            return True, ""
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"'ip netns' unusable: {exc}"
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=CMD_TIMEOUT)

    # -- commands in namespaces --------------------------------------------

    def _ns(self, which: str) -> str:
        namespaces = {"client": self.client_ns, "server": self.server_ns}
        if self.phone_ns is not None:
            namespaces["phone"] = self.phone_ns
        return namespaces[which]

    def _namespaces(self) -> list[str]:
        return [self.client_ns, self.server_ns, *([self.phone_ns] if self.phone_ns else [])]

    def ns_command(self, which: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in the 'client' or 'server' namespace."""
        return ["ip", "netns", "exec", self._ns(which), *argv]

    def popen(self, which: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in a namespace; the process is killed by :meth:`down`."""
        proc = subprocess.Popen(self.ns_command(which, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def client_popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return self.popen("client", argv, **kwargs)

    def server_popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return self.popen("server", argv, **kwargs)

    def phone_popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return self.popen("phone", argv, **kwargs)

    def run_in(
        self, which: str, argv: Sequence[str], timeout: float = 60.0, check: bool = False, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run to completion in a namespace (text, captured output by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.ns_command(which, argv), timeout=timeout, check=check, **kwargs)

    def run_in_client(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return self.run_in("client", argv, **kwargs)

    def run_in_server(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return self.run_in("server", argv, **kwargs)

    def _ip(self, which: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["ip", "-n", self._ns(which), *args], check=check)

    def _sysctl(self, which: str, key: str, value: str | int) -> None:
        # Write /proc/sys directly: ``ip netns exec`` gives the netns' view.
        path = "/proc/sys/" + key.replace(".", "/")
        _run(self.ns_command(which, ["sh", "-c", f"echo {value} > {path}"]))

    # -- build / tear down --------------------------------------------------

    def exists(self) -> bool:
        """Do this lab's namespaces exist (possibly leftovers)?"""
        return any(os.path.exists(f"/run/netns/{ns}") for ns in self._namespaces())

    def up(self) -> Lab:
        """Build the lab from scratch (leftovers with the same name are removed)."""
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for ns in self._namespaces():
            _run(["ip", "netns", "add", ns])
        for which in ("client", "server"):
            self._ip(which, "link", "set", "lo", "up")
            # Forwarding off: these are hosts, not routers.
            self._sysctl(which, "net.ipv4.ip_forward", 0)
        # Strict reverse-path filtering on the server: the effective value is
        # max(all, <iface>), so set both; "default" covers interfaces added later.
        for key in ("all", "default", "lo"):
            self._sysctl("server", f"net.ipv4.conf.{key}.rp_filter", 1)
        # The client is a plain desktop with loose filtering (a common distro
        # default); strict mode there would drop replies in the metrics setup.
        for key in ("all", "default"):
            self._sysctl("client", f"net.ipv4.conf.{key}.rp_filter", 2)
        self._ip("server", "addr", "add", f"{self.service_address}/32", "dev", "lo")
        for link in self.uplinks:
            self._build_uplink(link)
        self._build_client_routes()
        if self.ipv6:
            self._build_ipv6()
        if self.phone_ns is not None:
            self._build_phone()

    def client_addr6(self, index: int) -> str:
        """The IPv6 address of the client's end of uplink ``index``."""
        return f"{UPLINK_NET6}:{index}::2"

    def _build_ipv6(self) -> None:
        """IPv6 beside IPv4: an address on each uplink's ends (no DAD: usable
        at once), the service address, one table and rule per uplink."""
        self._ip("server", "-6", "addr", "add", f"{SERVICE_ADDRESS6}/128", "dev", "lo")
        for link in self.uplinks:
            server = f"{UPLINK_NET6}:{link.index}::1"
            self._ip(
                "client", "-6", "addr", "add", f"{self.client_addr6(link.index)}/64", "dev", link.client_ifname, "nodad"
            )
            self._ip("server", "-6", "addr", "add", f"{server}/64", "dev", link.server_ifname, "nodad")
            self._ip(
                "client",
                "-6",
                "route",
                "add",
                "default",
                "via",
                server,
                "dev",
                link.client_ifname,
                "table",
                str(link.table),
            )
            self._ip(
                "client",
                "-6",
                "rule",
                "add",
                "from",
                self.client_addr6(link.index),
                "table",
                str(link.table),
                "pref",
                str(_RULE_PREF_BASE + link.index),
            )
        first = self.uplinks[0]
        self._ip(
            "client",
            "-6",
            "route",
            "add",
            "default",
            "via",
            f"{UPLINK_NET6}:{first.index}::1",
            "dev",
            first.client_ifname,
        )

    def _build_phone(self) -> None:
        """The phone's LAN: a veth pair, the phone's default route through
        the client, and the client forwarding (a gateway)."""
        _run(
            [
                "ip",
                "link",
                "add",
                LAN_IFNAME,
                "netns",
                self.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                PHONE_IFNAME,
                "netns",
                self._ns("phone"),
            ]
        )
        self._ip("phone", "link", "set", "lo", "up")
        for which, ifname, addr in (("client", LAN_IFNAME, LAN_ADDRESS), ("phone", PHONE_IFNAME, PHONE_ADDRESS)):
            self._ip(which, "addr", "add", f"{addr}/{LAN_PREFIXLEN}", "dev", ifname)
            self._ip(which, "link", "set", ifname, "up")
        self._ip("phone", "route", "add", "default", "via", LAN_ADDRESS, "dev", PHONE_IFNAME)
        self._sysctl("client", "net.ipv4.ip_forward", 1)
        if self.ipv6:
            self._ip("client", "-6", "addr", "add", f"{LAN_ADDRESS6}/64", "dev", LAN_IFNAME, "nodad")
            self._ip("phone", "-6", "addr", "add", f"{PHONE_ADDRESS6}/64", "dev", PHONE_IFNAME, "nodad")
            self._ip("phone", "-6", "route", "add", "default", "via", LAN_ADDRESS6, "dev", PHONE_IFNAME)
            self._sysctl("client", "net.ipv6.conf.all.forwarding", 1)

    def set_forwarding(self, on: bool) -> None:
        """Turn the client's IPv4 forwarding on or off."""
        self._sysctl("client", "net.ipv4.ip_forward", int(on))

    def _build_uplink(self, link: Uplink) -> None:
        # Create the pair directly inside the namespaces: no host-side names.
        _run(
            [
                "ip",
                "link",
                "add",
                link.client_ifname,
                "netns",
                self.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                link.server_ifname,
                "netns",
                self.server_ns,
            ]
        )
        for which, ifname, addr in (
            ("client", link.client_ifname, link.client_addr),
            ("server", link.server_ifname, link.server_addr),
        ):
            self._ip(which, "addr", "add", f"{addr}/{link.prefixlen}", "dev", ifname)
            self._ip(which, "link", "set", ifname, "up")
            if link.rate:
                self._shape(which, ifname, link.rate)
        self._sysctl("server", f"net.ipv4.conf.{link.server_ifname}.rp_filter", 1)
        # The server reaches each client address through the connected /28 of
        # its own uplink, so replies go back on the link they came in on.

    def _shape(self, which: str, ifname: str, rate: int, verb: str = "replace") -> None:
        burst, limit = tbf_params(rate)
        _run(
            [
                "tc",
                "-n",
                self._ns(which),
                "qdisc",
                verb,
                "dev",
                ifname,
                "root",
                "tbf",
                "rate",
                f"{rate * 8}bit",
                "burst",
                str(burst),
                "limit",
                str(limit),
            ]
        )

    def _build_client_routes(self) -> None:
        first = self.uplinks[0]
        if self.setup == "rules":
            # Unbound sockets use the main table: default via uplink 1.
            self._ip("client", "route", "add", "default", "via", first.server_addr, "dev", first.client_ifname)
            for link in self.uplinks:
                table = str(link.table)
                self._ip(
                    "client",
                    "route",
                    "add",
                    f"{link.server_addr}/32",
                    "dev",
                    link.client_ifname,
                    "src",
                    link.client_addr,
                    "table",
                    table,
                )
                self._ip(
                    "client",
                    "route",
                    "add",
                    "default",
                    "via",
                    link.server_addr,
                    "dev",
                    link.client_ifname,
                    "table",
                    table,
                )
                self._ip(
                    "client",
                    "rule",
                    "add",
                    "from",
                    link.client_addr,
                    "table",
                    table,
                    "pref",
                    str(_RULE_PREF_BASE + link.index),
                )
        else:
            for link in self.uplinks:
                self._ip(
                    "client",
                    "route",
                    "add",
                    "default",
                    "via",
                    link.server_addr,
                    "dev",
                    link.client_ifname,
                    "metric",
                    str(link.metric),
                )

    def down(self) -> None:
        """Tear everything down; safe to call any number of times."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        for ns in self._namespaces():
            _kill_namespace_processes(ns)
            if os.path.exists(f"/run/netns/{ns}"):
                # Deleting the namespace deletes the veths (both ends) with it.
                _run(["ip", "netns", "del", ns], check=False)

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- dark links -----------------------------------------------------------

    def uplink(self, index: int) -> Uplink:
        """Uplink by 1-based index."""
        if not 1 <= index <= len(self.uplinks):
            raise IndexError(f"uplink index {index} out of 1..{len(self.uplinks)}")
        return self.uplinks[index - 1]

    def darken(self, index: int) -> None:
        """Make uplink ``index`` lose every packet (server blackholes its client).

        Replies to the client address are dropped, and so are packets *from*
        it: the strict rp_filter check fails against a blackhole route.
        """
        if not self.is_dark(index):
            self._ip("server", "route", "add", "blackhole", f"{self.uplink(index).client_addr}/32")

    def restore(self, index: int) -> None:
        """Undo :meth:`darken` (no-op if the link is not dark)."""
        if self.is_dark(index):
            self._ip("server", "route", "del", "blackhole", f"{self.uplink(index).client_addr}/32")

    # -- rates ----------------------------------------------------------------

    def set_rate(self, index: int, rate: int) -> None:
        """Shape uplink ``index`` to ``rate`` bytes/s both ways, on the live lab.

        Traffic keeps flowing: ``tc qdisc change`` retunes the tbf of both
        veth ends in place (packets already queued stay queued), with the
        burst and limit that :func:`tbf_params` gives for the new rate.
        """
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        link = self.uplink(index)
        for which, ifname in (("client", link.client_ifname), ("server", link.server_ifname)):
            self._shape(which, ifname, int(rate), verb="change")
        self.uplinks[index - 1] = dataclasses.replace(link, rate=int(rate))

    def is_dark(self, index: int) -> bool:
        out = self._ip("server", "route", "show", "type", "blackhole").stdout
        return any(line.split()[1:2] == [self.uplink(index).client_addr] for line in out.splitlines())

    # -- counters -----------------------------------------------------------

    def counters(self) -> dict[int, Counters]:
        """Byte counters of the client end of every uplink, by 1-based index.

        Read through ``ip netns exec`` because only that remounts /sys for the
        namespace; a plain read of /sys/class/net would show the host's view.
        """
        paths = [
            f"/sys/class/net/{link.client_ifname}/statistics/{what}"
            for link in self.uplinks
            for what in ("tx_bytes", "rx_bytes")
        ]
        values = [
            int(v) for v in self.run_in("client", ["cat", *paths], check=True, timeout=CMD_TIMEOUT).stdout.split()
        ]
        return {link.index: Counters(values[2 * n], values[2 * n + 1]) for n, link in enumerate(self.uplinks)}

    def rp_filter_drops(self) -> int:
        """Packets the server dropped for failing the reverse-path check
        (TcpExt IPReversePathFilter of the server namespace)."""
        lines = self.run_in("server", ["cat", "/proc/net/netstat"], check=True, timeout=CMD_TIMEOUT).stdout.splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                stats = dict(zip(names.split()[1:], values.split()[1:]))
                return int(stats.get("IPReversePathFilter", 0))
        return 0

    # -- servers --------------------------------------------------------------

    def start_server(
        self, kind: str, port: int, *extra: str, lifetime: float = 3600.0, ready_timeout: float = 10.0
    ) -> subprocess.Popen:
        """Start ``netlab.py serve KIND`` in the server namespace; wait until ready."""
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "serve",
            kind,
            "--port",
            str(port),
            "--lifetime",
            str(lifetime),
            *extra,
        ]
        proc = self.server_popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            proc.kill()
            raise RuntimeError(f"server {kind} on port {port} did not start")
        return proc

    def start_http_server(self, port: int = HTTP_PORT, size: int = 50_000_000, **kwargs) -> subprocess.Popen:
        """HTTP/1.1 server of one generated file of ``size`` bytes (any path), Range-aware."""
        return self.start_server("http", port, "--size", str(size), **kwargs)

    def start_peer_echo(self, port: int = PEER_ECHO_PORT, **kwargs) -> subprocess.Popen:
        """TCP server that writes the peer's IP and a newline, then closes."""
        return self.start_server("peer-echo", port, **kwargs)

    def http_url(self, port: int = HTTP_PORT, path: str = "/file") -> str:
        return f"http://{self.service_address}:{port}{path}"

    # -- probing from the client -------------------------------------------

    def connect(self, port: int, host: str | None = None, **kwargs) -> socket.socket:
        """TCP connection made from the client namespace (see :func:`open_connection`)."""
        return open_connection(host or self.service_address, port, ns=self.client_ns, **kwargs)

    def peer_address(
        self,
        port: int = PEER_ECHO_PORT,
        *,
        bind_addr: str | None = None,
        bind_dev: str | None = None,
        timeout: float = 3.0,
    ) -> str | None:
        """Ask the peer-echo server which source address it saw; None on failure/timeout."""
        try:
            with self.connect(port, bind_addr=bind_addr, bind_dev=bind_dev, timeout=timeout) as sock:
                data = _recv_line(sock)
        except OSError:
            return None
        return data or None

    def uplink_of(self, addr: str | None) -> int | None:
        """1-based index of the uplink owning client address ``addr``."""
        for link in self.uplinks:
            if link.client_addr == addr:
                return link.index
        return None

    def wait_for_port(self, port: int, host: str = "127.0.0.1", which: str = "client", timeout: float = 10.0) -> bool:
        """Poll until something listens on host:port inside a namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                open_connection(host, port, ns=self._ns(which), timeout=1.0).close()
                return True
            except OSError:
                time.sleep(0.1)
        return False

    # -- status ---------------------------------------------------------------

    def status(self) -> str:
        """Human-readable description of the live lab."""
        if not self.exists():
            return f"lab {self.name!r}: not running"
        out = [
            f"lab {self.name!r}: namespaces {self.client_ns}, {self.server_ns}; "
            f"service {self.service_address}; setup {self.detect_setup()}"
        ]
        counters = self.counters()
        for link in self.uplinks:
            qdisc = self._ip_tc("client", link.client_ifname)
            count = counters[link.index]
            out.append(
                f"  uplink {link.index}: {link.client_ifname} {link.client_addr} <-> "
                f"{link.server_ifname} {link.server_addr}  "
                f"{'DARK' if self.is_dark(link.index) else 'lit'}  "
                f"tx {count.tx_bytes} rx {count.rx_bytes}  [{qdisc}]"
            )
        for which, title, args in (
            ("client", "client rules", ("rule",)),
            ("client", "client routes", ("route", "show", "table", "all")),
            ("server", "server routes", ("route", "show", "table", "all")),
        ):
            out.append(f"  {title}:")
            lines = self._ip(which, "-4", *args).stdout.splitlines()
            # The kernel's local/broadcast routes are noise here.
            out += ["    " + line for line in lines if "table local" not in line]
        pids = {ns: _namespace_pids(ns) for ns in (self.client_ns, self.server_ns)}
        out.append(f"  processes: {pids}")
        return "\n".join(out)

    def detect_setup(self) -> str:
        """'rules' or 'metrics', from the live client rules."""
        rules = self._ip("client", "rule").stdout
        return "rules" if any(link.client_addr in rules for link in self.uplinks) else "metrics"

    def _ip_tc(self, which: str, ifname: str) -> str:
        out = _run(["tc", "-n", self._ns(which), "qdisc", "show", "dev", ifname], check=False)
        return out.stdout.strip()


def _namespace_pids(ns: str) -> list[int]:
    if not os.path.exists(f"/run/netns/{ns}"):
        return []
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_namespace_processes(ns: str) -> None:
    """Kill what still runs in ``ns``: it would keep the namespace alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline and _namespace_pids(ns):
            time.sleep(0.05)


def _recv_line(sock: socket.socket, limit: int = 256) -> str:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = sock.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# --------------------------------------------------------------------------- #
# Servers (run inside the server namespace with the ``serve`` subcommand)
# --------------------------------------------------------------------------- #


class GeneratedFile:
    """A virtual file of ``size`` bytes: a fixed pseudo-random block repeated.

    The block length is prime so chunk boundaries do not line up with it,
    which lets a client verify any byte range with :meth:`read`.
    """

    BLOCK = random.Random(20240601).randbytes(65_521)

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, start: int, length: int) -> bytes:
        block = self.BLOCK
        offset = start % len(block)
        reps = (offset + length) // len(block) + 1
        return (block * reps)[offset : offset + length] if reps > 1 else block[offset : offset + length]

    def iter_range(self, start: int, end: int, piece: int = 65_536) -> Iterator[bytes]:
        """Yield the bytes [start, end] (inclusive) in pieces."""
        pos = start
        while pos <= end:
            n = min(piece, end + 1 - pos)
            yield self.read(pos, n)
            pos += n


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a single 'bytes=a-b' / 'bytes=a-' / 'bytes=-n' range; None = whole file.

    Raises ValueError for an unsatisfiable or unsupported range.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError("only one byte range supported")
    first, _, last = spec.strip().partition("-")
    if first == "":
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise ValueError("unsatisfiable range")
    return start, end


def make_http_handler(file: GeneratedFile) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real file server
        timeout = 30  # seconds of client silence before the thread gives up

        def do_HEAD(self) -> None:
            self._respond(send_body=False)

        def do_GET(self) -> None:
            self._respond(send_body=True)

        def _respond(self, send_body: bool) -> None:
            size = self._size()
            try:
                rng = parse_range(self.headers.get("Range"), size)
            except ValueError:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = rng if rng else (0, size - 1)
            self.send_response(206 if rng else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end + 1 - start))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if send_body:
                for piece in file.iter_range(start, end):
                    self.wfile.write(piece)

        def _size(self) -> int:
            """File size: the server's, or ``?size=N`` in the URL (benchmarks
            pick a size per measurement without restarting the server)."""
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            try:
                return max(1, int(query["size"][0]))
            except (KeyError, ValueError):
                return file.size

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: benchmarks make thousands of requests

    return Handler


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # many connections arrive at once through the proxy


class _ThreadingHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a download manager opens its connections at once


class _PeerEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        self.request.sendall(f"{self.client_address[0]}\n".encode())


def serve(kind: str, port: int, host: str = "0.0.0.0", size: int = 50_000_000, lifetime: float = 3600.0) -> None:
    """Run a lab server in the current namespace until ``lifetime`` seconds pass."""
    if kind == "http":
        server: socketserver.TCPServer = _ThreadingHTTPServer((host, port), make_http_handler(GeneratedFile(size)))
    elif kind == "peer-echo":
        server = _ThreadingTCPServer((host, port), _PeerEchoHandler)
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    print(f"ready {kind} {host}:{port}", flush=True)
    try:
        time.sleep(lifetime)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _rates_arg(text: str) -> list[int]:
    """'1200,1200,400' (kB/s) -> bytes/s."""
    return [int(float(v) * 1000) for v in text.split(",")]


def _probe(lab: Lab, port: int) -> None:
    """Show which uplink a connection uses with each kind of binding."""
    print(f"setup {lab.detect_setup()}; peer-echo at {lab.service_address}:{port}")
    for link in lab.uplinks:
        for label, kwargs in (
            ("bind addr", {"bind_addr": link.client_addr}),
            ("bind dev ", {"bind_dev": link.client_ifname}),
            ("bind both", {"bind_addr": link.client_addr, "bind_dev": link.client_ifname}),
        ):
            before, drops = lab.counters(), lab.rp_filter_drops()
            seen = lab.peer_address(port, **kwargs)
            after = lab.counters()
            used = [i for i in after if after[i].tx_bytes > before[i].tx_bytes]
            print(
                f"  uplink {link.index} {label}: "
                f"{'TIMEOUT' if seen is None else 'server saw ' + seen:<28}"
                f" sent via uplink(s) {used}, server rp_filter drops "
                f"+{lab.rp_filter_drops() - drops}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT_NAME, help="lab name, prefix of the namespaces (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="build the lab (removes leftovers first)")
    p.add_argument("--setup", choices=SETUPS, default="rules")
    p.add_argument(
        "--rates",
        type=_rates_arg,
        default=list(DEFAULT_RATES),
        help="uplink rates in kB/s, comma-separated (default 1200,1200,400)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help=f"also start the HTTP ({HTTP_PORT}) and peer-echo ({PEER_ECHO_PORT}) servers; 'down' stops them",
    )
    p.add_argument("--size", type=int, default=50_000_000, help="HTTP file size in bytes")
    sub.add_parser("down", help="tear the lab down (idempotent)")
    sub.add_parser("status", help="show namespaces, links, routes, counters")
    sub.add_parser("counters", help="print client-side tx/rx bytes per uplink")
    for verb in ("darken", "restore"):
        p = sub.add_parser(verb, help=f"{verb} uplink INDEX (1-based)")
        p.add_argument("index", type=int)
    p = sub.add_parser("rate", help="shape uplink INDEX to KBPS kB/s both ways, traffic flowing")
    p.add_argument("index", type=int)
    p.add_argument("kbps", type=float, help="kB/s (1 kB = 1000 bytes)")
    p = sub.add_parser("probe", help="which uplink do bind-addr / bind-dev connections use?")
    p.add_argument("--port", type=int, default=PEER_ECHO_PORT)
    p = sub.add_parser("exec", help="run a command in a namespace: exec client -- CMD...")
    p.add_argument("where", choices=("client", "server"))
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("serve", help="run a lab server here (use inside the server namespace)")
    p.add_argument("kind", choices=("http", "peer-echo"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int)
    p.add_argument("--size", type=int, default=50_000_000, help="HTTP file size in bytes")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after SECONDS")

    args = parser.parse_args(argv)
    if args.command == "serve":
        port = args.port or (HTTP_PORT if args.kind == "http" else PEER_ECHO_PORT)
        serve(args.kind, port, args.host, args.size, args.lifetime)
        return 0
    if args.command == "up":
        lab = Lab(args.name, args.setup, args.rates).up()
        if args.serve:
            for kind, port in (("http", HTTP_PORT), ("peer-echo", PEER_ECHO_PORT)):
                # Detach: the servers outlive this command; 'down' kills them.
                lab.start_server(kind, port, "--size", str(args.size))
            lab._procs.clear()
        print(lab.status())
        return 0
    lab = Lab(args.name)
    if args.command == "down":
        lab.down()
    elif args.command == "status":
        print(lab.status())
    elif args.command == "counters":
        for index, count in lab.counters().items():
            print(f"uplink {index}: tx_bytes {count.tx_bytes} rx_bytes {count.rx_bytes}")
    elif args.command == "darken":
        lab.darken(args.index)
    elif args.command == "restore":
        lab.restore(args.index)
    elif args.command == "rate":
        lab.set_rate(args.index, int(args.kbps * 1000))
    elif args.command == "probe":
        _probe(lab, args.port)
    elif args.command == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return subprocess.call(lab.ns_command(args.where, cmd or ["sh"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
