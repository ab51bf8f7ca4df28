"""dispatch: a SOCKS proxy that balances connections across network links.

Each new connection is given one local address (the link with the least open
work for its measured capacity, or in turn by weights) and all of its traffic
leaves through that address's interface, so several links (a cable, a Wi-Fi, a
phone hotspot) add up for clients that open many connections: download
managers, BitTorrent clients, browsers.

The protocol, as served (RFC 1928 and the SOCKS4/4a papers)::

    client -> proxy   05 NMETHODS METHODS...          SOCKS5 greeting
    proxy  -> client  05 00                           "no authentication"
                      (or 05 02, then RFC 1929: 01 ULEN USER PLEN PASS -> 01 00)
    client -> proxy   05 01 00 ATYP DST.ADDR DST.PORT  CONNECT request
    proxy  -> client  05 REP 00 ATYP BND.ADDR BND.PORT after the upstream connect
    ... then bytes are copied both ways until each side has closed.

SOCKS4 sends ``04 01 DST.PORT DST.IP USERID 00`` (4a: DST.IP 0.0.0.x and the
host name after the user id) and gets ``00 5A|5B DST.PORT DST.IP``.

The same port serves HTTP proxy clients, told apart by the first byte (a
letter): ``CONNECT host:port HTTP/1.1`` tunnels and absolute-form requests
(``GET http://host/path HTTP/1.1``). SOCKS5 UDP ASSOCIATE relays datagrams
framed as ``00 00 FRAG ATYP DST.ADDR DST.PORT DATA``.

Only the standard library is needed to proxy through IP addresses; the
``ifaddr`` package is needed for interface names and ``dispatch list``, and
``dnspython`` to look names up through the links (without it, the system's
resolver looks them up).

Map of this module, in order; each section uses only what is above it:

    platform probes    what this OS offers: device binding, splice, selectors
    platform start-up  where the log and state go; descriptor limit, one CPU, stop signals
    errors             reply codes of SOCKS5, SOCKS4 and HTTP in one table; errno mapping
    deadline I/O       DeadlineReader: exact reads with a deadline, nothing stranded
    wire formats       socket addresses; SOCKS requests and replies, UDP headers
    HTTP framing       HTTP request and status lines, header fields, bodies (lengths, chunks)
    proxy clients      the client side of SOCKS5, SOCKS4 and HTTP CONNECT, to upstream proxies
    access             AccessPolicy: the allow-list and logins
    interfaces         Interface: this machine's interfaces (Windows names too), their usable
                       addresses, default routes; whether an address is this machine's
    links              LocalAddress, Link, LinkSet: the links named, an interface's addresses
                       followed; ProxyURL, ProxyAddress: another proxy as a link
    health             Health: failures, background retests, checks; what is up and why not
    choice             WeightedRoundRobin, MeasuredChoice, StickyTable, Balancer: which
                       address a connection gets (tiers, sticky sites)
    meter              Meter: per-address counters, rates, history; CapacityEstimator;
                       the state file (read_state, write_state); LinkCapacities: the two joined
    data caps          DataCap, DataBudget: what a link that costs money may carry per
                       day, month or rolling window; its usage kept (read_usage)
    device binding     a socket that leaves by the chosen link; the system's lookup
    name servers       the system's DNS servers (per link where it says) and hosts file
    resolver           Resolver: names through the links; DnsCache, the hedged query
    proxy links        a client handshake with another proxy, on a socket that races or
                       waits; a bond's subflow counters
    connect            Upstream: the hedged connect (_Race) with failover; UpstreamLease
    relay              relay(): the two-way copy (poll, splice on Linux)
    sessions           Session, SocksSession, UdpAssociation; ExchangeRecord; what the
                       pages show (Status, StatsRow: TypedDicts)
    local pages        the status page, /stats.json, /metrics, /proxy.pac, as text
    HTTP proxy         HttpProxySession: forwarding, CONNECT, answering the local pages
    transparent sessions  TransparentSession, UdpFlow: what the firewall sends here (Linux)
    firewall rules     TransparentRules: transparent mode's nftables table and its undo
    desktop proxy      ProxySettings (GNOME, KDE, macOS, Windows), SystemProxy: the user's
                       proxy settings pointed here, saved first, put back at stop and after a crash
    MPTCP endpoints    MptcpEndpoints: the kernel's subflow addresses for bonds, added,
                       followed and removed (at stop, and after a crash); choose_bond()
    server             the first byte picks the session; Admission; the listener
    steering           LinkSteering: links held back while it runs (data caps reached,
                       paused, closed), their weights; the control API's changes
    options            DispatcherOptions: every option of a Dispatcher, validated as a whole
    Dispatcher         the library face; owns the listeners and the background tasks
                       (interfaces, meter samples, retests, checks), the firewall rules
    service units      systemd, launchd and Task Scheduler files for ``dispatch service``
    reports            format_table(), format_stats(): tables of the links and their traffic
    control client     steer_link(): ``dispatch link``, a change asked of a running dispatch
    arguments          the command line's values parsed and validated: ports, durations, caps...
    command line       ``dispatch list|start|rules|service|system-proxy|link``; main()

A SOCKS connection's way through them: ConnectionHandler.handle ->
SocksSession.serve -> SocksSession.handshake -> Session.connect ->
Upstream.connect -> _Race.run -> Session.relay_through -> relay.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime
import enum
import errno
import functools
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import queue
import re
import select
import selectors
import shutil
import signal
import socket
import socketserver
import stat
import statistics
import struct
import subprocess
import sys
import threading
import time
import types
import typing
import urllib.parse
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Generic, Literal, NamedTuple, NoReturn, Protocol, TextIO, TypedDict, TypeVar, cast

__version__ = "0.3.0"
__all__ = [
    "AccessPolicy",
    "AddressError",
    "AddressHistory",
    "BalanceName",
    "Balancer",
    "BondCarried",
    "BondCounters",
    "BondMember",
    "BondStatus",
    "CapReport",
    "CapacitySource",
    "DeadlineReader",
    "Dispatcher",
    "DispatcherOptions",
    "ExchangeRecord",
    "Health",
    "History",
    "HttpError",
    "Link",
    "LinkCapacities",
    "LinkSet",
    "LinkReport",
    "LinkState",
    "LocalAddress",
    "Meter",
    "Retest",
    "SocksError",
    "StatsRow",
    "Status",
    "Tier",
    "Totals",
    "Upstream",
    "UpstreamLease",
    "WeightedRoundRobin",
    "credentials_match",
    "format_rate",
    "format_stats",
    "format_table",
    "main",
    "parse_address",
    "parse_credentials",
    "resolve_links",
    "stats_row",
    "usable_addresses",
    "usable_interfaces",
]

logger = logging.getLogger("dispatch")

# ---------------------------------------------------------------------------
# Platform probes: what this OS offers
# ---------------------------------------------------------------------------

# DISPATCH_PORTABLE=1 switches off what only Linux has (splice, binding to a
# device by name, CPU affinity, poll) so that the code paths Windows takes
# (and macOS, but for its own binding to a device) run, and are tested, on
# Linux too.
PORTABLE = os.environ.get("DISPATCH_PORTABLE", "") not in ("", "0")

_ON_LINUX = sys.platform.startswith("linux") and not PORTABLE

if sys.platform != "win32":
    import fcntl as _fcntl
else:  # pragma: no cover - Windows has no fcntl
    _fcntl = None

# Linux lets a socket bound to an address with port 0 defer choosing the port
# until connect(), when the destination is known. Without it, the kernel must
# pick a port unique for the address alone and runs out after ~28,000
# connections in TIME_WAIT. Python exposes the name from 3.12 on.
_IP_BIND_ADDRESS_NO_PORT: int | None = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24) if _ON_LINUX else None

# Binding a socket to a device makes it leave by that device whatever the
# routing table says: Linux SO_BINDTODEVICE (an interface name), macOS
# IP_BOUND_IF / IPV6_BOUND_IF (an interface index). Windows picks the
# interface by the source address only where nothing else decides: with two
# adapters on one subnet, every connection leaves by the first. Its
# IP_UNICAST_IF / IPV6_UNICAST_IF (ws2ipdef.h; an interface index) decide.
_SO_BINDTODEVICE: int | None = getattr(socket, "SO_BINDTODEVICE", 25) if _ON_LINUX else None
_IP_BOUND_IF: int | None = getattr(socket, "IP_BOUND_IF", 25) if sys.platform == "darwin" else None
_IPV6_BOUND_IF: int | None = getattr(socket, "IPV6_BOUND_IF", 125) if sys.platform == "darwin" else None
_IP_UNICAST_IF = 31
_IPV6_UNICAST_IF = 31
_CAN_BIND_TO_DEVICE = _SO_BINDTODEVICE is not None or _IP_BOUND_IF is not None or sys.platform == "win32"

# Created non-blocking in one call where the platform allows it.
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)

# splice() moves bytes between sockets through a pipe without copying them
# into the process (Linux only).
_CAN_SPLICE = _ON_LINUX and _fcntl is not None and hasattr(os, "splice") and hasattr(os, "pipe2")
_SPLICE_FLAGS: int = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
if sys.platform == "linux":
    _splice = os.splice
    _pipe2 = os.pipe2
else:

    def _splice(src: int, dst: int, count: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "splice() is Linux only")

    def _pipe2(flags: int) -> tuple[int, int]:
        raise OSError(errno.ENOSYS, "pipe2() is not here")


_F_SETPIPE_SZ: int = getattr(_fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: int = getattr(_fcntl, "F_GETPIPE_SZ", 1032)

# Transparent mode (Linux): where a connection the firewall redirected was
# going. Neither has a name in the socket module: SO_ORIGINAL_DST is defined
# in linux/netfilter_ipv4.h, IP6T_SO_ORIGINAL_DST in
# linux/netfilter_ipv6/ip6_tables.h. SO_MARK (asm-generic/socket.h) sets the
# firewall mark of what a socket sends.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SO_MARK: int = getattr(socket, "SO_MARK", 36)

# Windows's option that keeps a port to one socket (winsock2.h defines it as
# ~SO_REUSEADDR); the number elsewhere lets the Windows path run in tests.
_SO_EXCLUSIVEADDRUSE: int = getattr(socket, "SO_EXCLUSIVEADDRUSE", ~4)
_EXCLUSIVE_PORTS = sys.platform == "win32"
# Linux gives an accepted socket the listener's TCP_NODELAY and SO_KEEPALIVE
# (the new socket is a clone of the listening one), so they are set once.
_ACCEPTED_SOCKETS_INHERIT_OPTIONS = _ON_LINUX

# Multipath TCP (Linux 5.6+): one connection whose subflows leave by several
# links. Python names the protocol from 3.10 on, the socket options not yet
# (linux/mptcp.h, linux/tcp.h).
_IPPROTO_MPTCP: int = getattr(socket, "IPPROTO_MPTCP", 262)
_SOL_MPTCP = 284
_MPTCP_TCPINFO = 2
_MPTCP_SUBFLOW_ADDRS = 3
_TCP_IS_MPTCP = 43
_MPTCP_SYSCTL = "/proc/sys/net/mptcp/enabled"


def mptcp_unavailable(platform: str | None = None) -> str | None:
    """Why MPTCP sockets cannot be made here, in one line; None where they can."""
    if not (platform or sys.platform).startswith("linux"):
        return "MPTCP (mptcp+ links, --mptcp) needs Linux: this system has no Multipath TCP dispatch can use"
    try:
        with open(_MPTCP_SYSCTL) as enabled:
            if enabled.read().strip() == "0":
                return "MPTCP is switched off: net.mptcp.enabled is 0 (sysctl -w net.mptcp.enabled=1)"
    except OSError:
        return "this kernel has no MPTCP: the sysctl net.mptcp.enabled is missing (CONFIG_MPTCP, Linux 5.6+)"
    return None


def _selector() -> selectors.BaseSelector:
    """A selector for a few sockets of one thread.

    poll needs no descriptor of its own (epoll does) and has no 1024 limit
    (select does); Windows has neither poll nor epoll.
    """
    if sys.platform != "win32" and not PORTABLE:
        return selectors.PollSelector()
    return selectors.SelectSelector()


# What poll() says of a socket, as selectors' events: an error or a hang-up
# makes it both readable and writable, so the next call finds out which.
_POLLIN: int = getattr(select, "POLLIN", 1)
_POLLOUT: int = getattr(select, "POLLOUT", 4)
_POLL_MASKS = (0, _POLLIN, _POLLOUT, _POLLIN | _POLLOUT)  # by EVENT_READ | EVENT_WRITE
# select.poll where _selector() would choose it.
_new_poll: Callable[[], Any] | None = (
    getattr(select, "poll", None) if sys.platform != "win32" and not PORTABLE else None
)


def _poll_events(revents: int) -> int:
    return (selectors.EVENT_WRITE if revents & ~_POLLIN else 0) | (selectors.EVENT_READ if revents & ~_POLLOUT else 0)


def _milliseconds(timeout: float | None) -> int | None:
    """A poll() timeout: rounded up, so a wait never ends just short of its
    deadline and spins."""
    return None if timeout is None else max(0, math.ceil(timeout * 1000))


def _connect_failures(writers: list[socket.socket]) -> list[socket.socket]:
    """select()'s exceptional list: Windows tells a failed connect there;
    elsewhere it means urgent data, which would wake every wait."""
    return writers if sys.platform == "win32" else []


def _wait_for(sock: socket.socket, events: int, timeout: float | None) -> int:
    """Wait up to ``timeout`` seconds (None: for ever) until ``sock`` is
    ready for some of ``events`` (selectors' EVENT_READ, EVENT_WRITE); return
    those it is ready for, 0 if none came in time. The same as a selector,
    without making one for each wait."""
    if _new_poll is not None:
        poller = _new_poll()
        poller.register(sock, _POLL_MASKS[events])
        ready = poller.poll(_milliseconds(timeout))
        return _poll_events(ready[0][1]) if ready else 0
    read = [sock] if events & selectors.EVENT_READ else []
    write = [sock] if events & selectors.EVENT_WRITE else []
    readable, writable, failed = select.select(read, write, _connect_failures(write), timeout)
    return (selectors.EVENT_READ if readable else 0) | (selectors.EVENT_WRITE if writable or failed else 0)


class _PairWaiter:
    """Waits on the two sockets of a relayed connection, each for the events
    asked for this time: poll() with the sockets registered as the events
    change (select() where there is no poll)."""

    def __init__(self, first: socket.socket, second: socket.socket) -> None:
        self._first, self._second = first, second
        self._first_fd = first.fileno()
        self._poller = _new_poll() if _new_poll is not None else None
        self._first_registered = self._second_registered = 0

    def wait(self, first_events: int, second_events: int, timeout: float | None) -> tuple[int, int]:
        """The events each socket is ready for, of those asked; (0, 0) once
        ``timeout`` seconds passed with none."""
        poller = self._poller
        if poller is None:
            return self._select(first_events, second_events, timeout)
        # Unwatched, a socket's hang-up would wake every wait. The two sockets
        # are written out rather than looped over: every turn of every relay passes here.
        if first_events != self._first_registered:
            self._first_registered = first_events
            if first_events:
                poller.register(self._first, _POLL_MASKS[first_events])  # registers, or modifies
            else:
                poller.unregister(self._first)
        if second_events != self._second_registered:
            self._second_registered = second_events
            if second_events:
                poller.register(self._second, _POLL_MASKS[second_events])
            else:
                poller.unregister(self._second)
        first_ready = second_ready = 0
        for fd, revents in poller.poll(None if timeout is None else _milliseconds(timeout)):
            if fd == self._first_fd:
                first_ready = _poll_events(revents) & first_events
            else:
                second_ready = _poll_events(revents) & second_events
        return first_ready, second_ready

    def _select(self, first_events: int, second_events: int, timeout: float | None) -> tuple[int, int]:
        asked = ((self._first, first_events), (self._second, second_events))
        read = [sock for sock, events in asked if events & selectors.EVENT_READ]
        write = [sock for sock, events in asked if events & selectors.EVENT_WRITE]
        readable, writable, failed = select.select(read, write, _connect_failures(write), timeout)
        ready = [0, 0]
        for index, sock in enumerate((self._first, self._second)):
            ready[index] = (selectors.EVENT_READ if sock in readable else 0) | (
                selectors.EVENT_WRITE if sock in writable or sock in failed else 0
            )
        return ready[0], ready[1]


class SocketWaiter:
    """Waits on the few sockets of one thread for the events set for each:
    what a selector does, made and used more cheaply (no key objects), as
    every connection's connect waits on one."""

    def __init__(self) -> None:
        self._poller = _new_poll() if _new_poll is not None else None
        self._events: dict[socket.socket, int] = {}  # EVENT_READ | EVENT_WRITE
        self._by_fd: dict[int, socket.socket] = {}

    def set(self, sock: socket.socket, events: int) -> None:
        """Wait on ``sock`` for ``events`` from now on (0: not at all)."""
        if events:
            if self._poller is not None:
                self._poller.register(sock, _POLL_MASKS[events])  # registers, or modifies
            self._events[sock] = events
            self._by_fd[sock.fileno()] = sock
        elif self._events.pop(sock, 0):
            if self._poller is not None:
                self._poller.unregister(sock)
            fd = sock.fileno()
            if self._by_fd.get(fd) is sock:
                del self._by_fd[fd]
            else:  # closed already: its number is gone
                self._by_fd = {fd: other for fd, other in self._by_fd.items() if other is not sock}

    def wait(self, timeout: float | None) -> list[tuple[socket.socket, int]]:
        """The sockets that are ready, with the events of theirs they are
        ready for; none once ``timeout`` seconds (None: for ever) passed."""
        if self._poller is not None:
            ready = []
            for fd, revents in self._poller.poll(_milliseconds(timeout)):
                sock = self._by_fd[fd]
                ready.append((sock, _poll_events(revents) & self._events[sock]))
            return ready
        read = [sock for sock, events in self._events.items() if events & selectors.EVENT_READ]
        write = [sock for sock, events in self._events.items() if events & selectors.EVENT_WRITE]
        readable, writable, failed = select.select(read, write, _connect_failures(write), timeout)
        found: dict[socket.socket, int] = {}
        for sock in readable:
            found[sock] = selectors.EVENT_READ
        for sock in (*writable, *failed):
            found[sock] = found.get(sock, 0) | selectors.EVENT_WRITE
        return list(found.items())


def _errnos(*names: str) -> frozenset[int]:
    """The numbers of the errno names this platform has.

    Errors are named, not numbered, so that every platform's numbers are
    right (Windows spells some of them WSAE...).
    """
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


# ---------------------------------------------------------------------------
# Platform start-up: where files go, descriptors, one CPU, signals
# ---------------------------------------------------------------------------

# What a process started from the command line or as a service sets up
# before it serves, and the platform's places for its log and state.


def default_log_path() -> str:
    """Where logs go without ``-d``: the platform's usual place for them."""
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "dispatch", "Logs", "dispatch.log")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Logs", "dispatch", "dispatch.log")
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative path is to be ignored
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "dispatch", "dispatch.log")


def default_state_path() -> str:
    """Where each link's capacity is kept across restarts without
    ``--state-file``: the platform's state directory (beside the log on
    Linux and Windows)."""
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "dispatch", "state.json")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Application Support", "dispatch", "state.json")
    return os.path.join(os.path.dirname(default_log_path()), "state.json")


class LogLineFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 INFO message``: what Formatter("%(asctime)s
    %(levelname)s %(message)s") writes, with the time's text made once a
    second instead of for every line (a busy proxy logs every connection)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second_text: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        made, text = self._second_text  # one tuple: threads see a whole pair
        if made != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second_text = (second, text)
        return f"{text},{int(record.msecs):03d}"  # as default_msec_format

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.message}"


class AppendingFileHandler(logging.Handler):
    """Writes each record as one line in one write() to a file opened for
    appending. The system keeps each write whole, so threads need not take
    turns on a lock as they do around FileHandler's buffered stream: with a
    line for every connection, that lock made the threads queue."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        self._fd: int | None = os.open(path, flags, 0o644)
        self._failing = False  # told on stderr once, until a line is written again

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + os.linesep).encode("utf-8", "backslashreplace")
            fd = self._fd
            if fd is None:
                return  # closed: a line logged while the process ends
            while line:
                line = line[os.write(fd, line) :]
            self._failing = False
        except OSError as error:  # a full disk, a gone device: said once, not a traceback a line
            if not self._failing:
                self._failing = True
                with contextlib.suppress(OSError, ValueError):
                    print(
                        f"dispatch: cannot write the log {self.path}: {error.strerror or error}",
                        file=sys.stderr,
                        flush=True,
                    )
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock or contextlib.nullcontext():
            fd, self._fd = self._fd, None
            if fd is not None:
                # The number stays open, on the null device: a thread past
                # its look at _fd may still write, and must not reach what
                # would be given the number next (a client's socket).
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        super().close()


OPEN_MAX_FALLBACK = 10_240  # macOS's OPEN_MAX: the most it gives a process


def raise_descriptor_limit() -> int | None:
    """Raise the soft limit on open descriptors to the hard limit (to
    OPEN_MAX_FALLBACK where that is unlimited or refused).

    Each connection holds two sockets (and a pipe, two descriptors, for each
    direction in bulk), so the usual soft limit of 1,024 would cap a
    BitTorrent client's few thousand connections. Returns the new limit, or None where
    there is no such limit (Windows).
    """
    if sys.platform == "win32":
        return None
    import resource

    unlimited = resource.RLIM_INFINITY  # -1 on Linux, 2**63 - 1 on macOS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == unlimited:
        return None
    # An unlimited hard limit (macOS) is no number to ask for, and some
    # systems refuse more than OPEN_MAX whatever the hard limit says.
    fallback = OPEN_MAX_FALLBACK if hard == unlimited else min(hard, OPEN_MAX_FALLBACK)
    for wanted in (hard, fallback):
        if wanted == unlimited or wanted <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            continue
        return wanted
    return soft


# When thousands of connections end at once, thousands of threads wait for
# the GIL, and each of them wakes every switch interval to ask for it. At the
# default 5 ms that alone kept the CPU busy for seconds: 3,000 held
# connections closed at once took 6 to 10 s to be released, and 2.1 s at
# 50 ms (tools/bench.py). The relay's threads give the GIL up at each system
# call anyway, so a longer interval delays nothing else.
GIL_SWITCH_INTERVAL = 0.05


def run_on_one_cpu() -> set[int] | None:
    """Keep the process on one CPU, where the system allows it (Linux);
    return the CPUs it had, to give back with os.sched_setaffinity.

    Only one thread at a time runs Python (the GIL), and every system call
    hands it to another thread and back. Between threads on different CPUs
    each hand-over is a cross-CPU wake-up, costlier than the work handed
    over: on one CPU, short connections went 1.7x faster (tools/bench.py),
    and bulk transfers did not slow down, the kernel's share of them being
    done by the other side's CPU time anyway.
    """
    if sys.platform != "linux" or PORTABLE:
        return None
    cpus = set(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, {min(cpus)})
    except OSError:
        return None  # not allowed here: slower, not wrong
    return cpus


class _StopSignals:
    """Ctrl-C, SIGTERM and SIGHUP (a terminal closed; unless ignored, as
    under nohup) while the proxy serves: the first asks it to stop
    (``stopping``), the second to cut the grace period short (``hurry``);
    any more change nothing. The handlers before are put back on leaving.

    The Python-level handlers do nothing: a handler runs in the main thread
    between any two of its steps, maybe inside ``stopping.wait()`` with the
    event's own lock held, and setting the event there would wait for that
    lock for ever. Instead each signal's number goes down a socket pair
    (``signal.set_wakeup_fd``, written by the C-level handler) to a thread of
    its own, which sets the events."""

    _STOPPING = frozenset({signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])})

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict[int, Any] = {}
        self._wakeup, self._signalled = socket.socketpair()
        self._previous_wakeup_fd = -1
        self._reader = threading.Thread(target=self._read_signals, name="dispatch-signals", daemon=True)

    def __enter__(self) -> _StopSignals:
        self._wakeup.setblocking(False)  # as set_wakeup_fd requires: a full pair drops, never blocks
        try:  # ValueError outside the main thread, as signal.signal() raises there
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup.fileno(), warn_on_full_buffer=False)
        except BaseException:
            self._close_pair()
            raise
        for signum in self._STOPPING:
            if signum == getattr(signal, "SIGHUP", None) and signal.getsignal(signum) is signal.SIG_IGN:
                continue  # nohup: the terminal's going is no stop
            self._previous[signum] = signal.signal(signum, self.on_stop_signal)
        self._reader.start()  # a signal before it runs waits in the pair
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        with contextlib.suppress(OSError):
            self._wakeup.send(b"\0")  # no signal has number 0: the reader's sign to end
        self._reader.join(timeout=1.0)
        self._close_pair()

    def _close_pair(self) -> None:
        self._wakeup.close()
        self._signalled.close()

    @staticmethod
    def on_stop_signal(signum: int, frame: Any) -> None:
        """The Python-level handler, set once the wakeup byte's way is: a
        handler must be set for that byte to be written, and this one keeps
        Ctrl-C from raising KeyboardInterrupt."""

    def _read_signals(self) -> None:
        """The reader's thread: the first stop signal sets ``stopping``, the second ``hurry``."""
        while True:
            try:
                signums = self._signalled.recv(64)
            except OSError:
                return
            if not signums:
                return
            for signum in signums:
                if signum == 0:
                    return
                if signum in self._previous:
                    (self.hurry if self.stopping.is_set() else self.stopping).set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop; return whether one came."""
        return self.stopping.wait(timeout)


# ---------------------------------------------------------------------------
# Errors: one table of reply codes for SOCKS5, SOCKS4 and HTTP
# ---------------------------------------------------------------------------


class Reply(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928, section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks4Reply(enum.IntEnum):
    """SOCKS4 reply codes. dispatch sends the first two (SOCKS4 has one code
    for every kind of failure); an upstream SOCKS4 proxy may send any."""

    GRANTED = 0x5A
    REJECTED = 0x5B
    NO_IDENTD = 0x5C
    IDENTD_MISMATCH = 0x5D


class AuthStatus(enum.IntEnum):
    """RFC 1929 status: zero is success, anything else closes the connection."""

    SUCCESS = 0x00
    FAILURE = 0x01


# Each outcome of a request as each protocol says it: the message of the
# SOCKS5 reply, the SOCKS4 reply, and the HTTP status of an HTTP proxy client.
REPLY_TABLE: dict[Reply, tuple[str, Socks4Reply, HTTPStatus]] = {
    Reply.SUCCEEDED: ("succeeded", Socks4Reply.GRANTED, HTTPStatus.OK),
    Reply.GENERAL_FAILURE: ("general failure", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
    Reply.NOT_ALLOWED: ("connection not allowed by ruleset", Socks4Reply.REJECTED, HTTPStatus.FORBIDDEN),
    Reply.NETWORK_UNREACHABLE: ("network unreachable", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
    Reply.HOST_UNREACHABLE: ("host unreachable", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
    Reply.CONNECTION_REFUSED: ("connection refused", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
    Reply.TTL_EXPIRED: ("timed out", Socks4Reply.REJECTED, HTTPStatus.GATEWAY_TIMEOUT),
    Reply.COMMAND_NOT_SUPPORTED: ("command not supported", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: ("address type not supported", Socks4Reply.REJECTED, HTTPStatus.BAD_GATEWAY),
}
REPLY_MESSAGES = {reply: message for reply, (message, _, _) in REPLY_TABLE.items()}

# The errno names of each reply.
_ERRNO_REPLIES = {
    Reply.CONNECTION_REFUSED: ("ECONNREFUSED", "WSAECONNREFUSED"),
    Reply.NETWORK_UNREACHABLE: ("ENETUNREACH", "ENETDOWN", "WSAENETUNREACH", "WSAENETDOWN"),
    Reply.HOST_UNREACHABLE: ("EHOSTUNREACH", "EHOSTDOWN", "WSAEHOSTUNREACH", "WSAEHOSTDOWN"),
    Reply.TTL_EXPIRED: ("ETIMEDOUT", "WSAETIMEDOUT"),
}
_REPLY_BY_ERRNO = {number: reply for reply, names in _ERRNO_REPLIES.items() for number in _errnos(*names)}

# Errors of a connect that are the link's fault, not the target's answer: the
# connection is tried again through another address. A refusal (ECONNREFUSED)
# is the target's answer: another link would get the same.
_LINK_FAILURE_ERRNOS = _errnos(
    "ENETUNREACH",
    "ENETDOWN",
    "EHOSTUNREACH",
    "EADDRNOTAVAIL",
    "ENODEV",
    "WSAENETUNREACH",
    "WSAENETDOWN",
    "WSAEHOSTUNREACH",
    "WSAEADDRNOTAVAIL",
)
# Errors that prove a packet went out and the target answered.
_TARGET_ANSWER_ERRNOS = _errnos("ECONNREFUSED", "WSAECONNREFUSED")
# A peer that hung up (closed or reset): an ordinary end of a connection.
_HANG_UP_ERRNOS = _errnos("EPIPE", "ECONNRESET", "ECONNABORTED", "WSAECONNRESET", "WSAECONNABORTED")
# Errors of binding to a device when the process may not.
_NOT_PERMITTED_ERRNOS = _errnos("EPERM", "EACCES")
# A non-blocking connect under way.
_CONNECT_IN_PROGRESS = _errnos("EINPROGRESS", "EWOULDBLOCK", "EAGAIN", "WSAEWOULDBLOCK")


class SocksError(OSError):
    """A request that gets a failure reply; ``reply`` is the SOCKS5 code."""

    def __init__(self, reply: Reply, message: str | None = None) -> None:
        super().__init__(message or REPLY_MESSAGES[reply])
        self.reply = reply


class ProtocolError(SocksError):
    """Bytes that are not the protocol: the connection is closed."""

    def __init__(self, message: str) -> None:
        super().__init__(Reply.GENERAL_FAILURE, message)


class LineTooLongError(ProtocolError):
    """A line (an HTTP request or header line) past its length cap."""


class HttpError(OSError):
    """A request that gets an HTTP error response; ``status`` is its code."""

    def __init__(self, status: HTTPStatus, message: str | None = None) -> None:
        super().__init__(message or status.phrase)
        self.status = status


class AddressError(ValueError):
    """An ADDRESS given on the command line or to Dispatcher is malformed, or unusable here."""


class ProxyLinkError(SocksError):
    """An upstream proxy failed as a link (it is down, refused the login or
    does not speak its protocol), not the target: another link may succeed,
    and this one is out until a retest gets through it."""


def _reply_code(error: OSError) -> Reply:
    """Map the OS error of a failed upstream connect to a SOCKS5 reply code."""
    if isinstance(error, SocksError):
        return error.reply
    if isinstance(error, socket.gaierror):
        return Reply.HOST_UNREACHABLE
    if isinstance(error, TimeoutError):
        return Reply.TTL_EXPIRED
    return _REPLY_BY_ERRNO.get(error.errno or 0, Reply.GENERAL_FAILURE)


def _socks4_reply(reply: Reply) -> Socks4Reply:
    """The SOCKS4 reply that says what the SOCKS5 ``reply`` says."""
    return REPLY_TABLE[reply][1]


def _http_status(error: OSError) -> HTTPStatus:
    """The HTTP status for the error of a request."""
    if isinstance(error, HttpError):
        return error.status
    return REPLY_TABLE[_reply_code(error)][2]


def _is_link_failure(error: OSError) -> bool:
    """Whether a failed upstream connect is the fault of the local link
    (unreachable, down, address gone, timed out), so that another local
    address may succeed where this one failed."""
    if isinstance(error, ProxyLinkError):
        return True
    if isinstance(error, SocksError):
        return False
    if isinstance(error, TimeoutError):
        return True
    return error.errno in _LINK_FAILURE_ERRNOS


def _is_target_answer(error: OSError) -> bool:
    """Whether a failed connect got an answer from the target (a refusal):
    the link that carried it works."""
    return not isinstance(error, SocksError) and error.errno in _TARGET_ANSWER_ERRNOS


def _describe(error: OSError) -> str:
    """A short, plain description of an OS error for the log."""
    if isinstance(error, SocksError):
        return str(error)
    if isinstance(error, TimeoutError):
        return error.strerror or "timed out"
    return error.strerror or str(error)


# ---------------------------------------------------------------------------
# Deadline I/O: one reader with a deadline for handshakes, bodies, datagrams
# ---------------------------------------------------------------------------

MAX_SOCKS4_FIELD = 1024  # cap on a SOCKS4 user id or SOCKS4a host name
# The most the reader receives ahead of what it has used: a SOCKS4 field and
# its NUL. A whole SOCKS5 greeting and request fit in it too, so most
# handshakes take one receive.
HANDSHAKE_WINDOW = MAX_SOCKS4_FIELD + 1
BULK_READ_SIZE = 64 * 1024  # what one read of a body or an idle client takes


def _wait_until(sock: socket.socket, events: int, deadline: float) -> None:
    """Wait until ``sock`` is ready for ``events``; TimeoutError past ``deadline``."""
    if not _wait_for(sock, events, max(0.0, deadline - time.monotonic())):
        raise TimeoutError("timed out")


# The handshake's sockets are non-blocking and these try the call first, then
# wait: a socket with a timeout would poll before every call, and each call
# hands the GIL to another thread and back. Fewer calls, more connections.
def _recv_by(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Receive up to ``size`` bytes from a non-blocking socket, waiting until ``deadline``."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            _wait_until(sock, selectors.EVENT_READ, deadline)


def _send_all_by(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Send all of ``data`` on a non-blocking socket, waiting until ``deadline``."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            _wait_until(sock, selectors.EVENT_WRITE, deadline)


class DeadlineReader:
    """Reads a byte stream message by message, each read bounded by a deadline.

    The socket may be non-blocking: a read waits for data until ``deadline``
    (time.monotonic(); it may be moved) and then raises TimeoutError, so a
    whole handshake must arrive by then, however slowly its bytes drip in.
    With no socket, it reads ``data`` alone (a datagram).

    It receives what the peer has sent so far, but never more than
    HANDSHAKE_WINDOW bytes beyond what it has used, so a hostile client
    cannot make it hold more. What it did receive beyond a message (a client
    may send its first payload right behind the request) is kept, for
    ``rest()`` to hand on: nothing is stranded.
    """

    def __init__(
        self,
        sock: socket.socket | None,
        deadline: float = math.inf,
        *,
        eof_message: str = "client closed during the handshake",
        data: bytes = b"",
    ) -> None:
        self._sock = sock
        self.deadline = deadline
        self._buffer = bytearray(data)
        self._eof_message = eof_message

    def _receive(self, size: int) -> bytes:
        return _recv_by(self._sock, size, self.deadline) if self._sock else b""

    def _fill(self, needed: int = 1) -> None:
        data = self._receive(max(needed, HANDSHAKE_WINDOW - len(self._buffer)))
        if not data:
            raise ProtocolError(self._eof_message)
        self._buffer += data

    def has_more(self) -> bool:
        """Wait for the next byte; False if the peer closed instead."""
        if not self._buffer:
            self._buffer += self._receive(BULK_READ_SIZE)
        return bool(self._buffer)

    def peek_byte(self) -> int:
        """Return the next byte without consuming it."""
        if not self._buffer:
            self._fill()
        return self._buffer[0]

    def read_some(self, limit: int) -> bytes:
        """Return up to ``limit`` bytes, at least one; b"" at EOF."""
        if not self._buffer:
            return self._receive(limit)
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return data

    def read_line(self, limit: int) -> bytes:
        """Return the next line with its line end.

        Raises LineTooLongError if no LF comes within ``limit`` bytes and
        ProtocolError on EOF.
        """
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) >= limit:
                raise LineTooLongError(f"a line longer than {limit} bytes")
            self._fill()

    def read(self, size: int) -> bytes:
        """Return exactly ``size`` bytes, or raise ProtocolError on EOF."""
        while len(self._buffer) < size:
            self._fill(size - len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_byte(self) -> int:
        """Return one byte as an integer."""
        if not self._buffer:
            self._fill()
        byte = self._buffer[0]
        del self._buffer[0]
        return byte

    def read_until_nul(self, limit: int) -> bytes:
        """Return the bytes before the next NUL, which is consumed.

        Raises ProtocolError if no NUL comes within ``limit`` bytes, without
        buffering more than the limit and the NUL from the client.
        """
        while True:
            end = self._buffer.find(b"\0", 0, limit + 1)
            if end >= 0:
                data = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return data
            if len(self._buffer) > limit:
                raise ProtocolError(f"no NUL within {limit} bytes")
            self._fill(limit + 1 - len(self._buffer))

    @property
    def buffered(self) -> int:
        """How many bytes were received and not read yet."""
        return len(self._buffer)

    def rest(self) -> bytes:
        """Return and forget what was received beyond the last message read."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


# ---------------------------------------------------------------------------
# Wire formats: socket addresses, SOCKS requests and replies, UDP headers
# ---------------------------------------------------------------------------


# Every connection asks of its target, mostly the same few: parsing an
# address each time cost a tenth of a short connection's time.
@functools.lru_cache(maxsize=1024)
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _family_of(ip: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address, AF_INET for an IPv4 one."""
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _family_name(family: socket.AddressFamily) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _split_host(address: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) of a socket address of any family."""
    return address[0], address[1]


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A host name: labels of letters, digits, "-" and "_" (as in _dmarc.example),
# 1 to 63 characters each, joined by dots, with one dot at the end at most.
# Anything else names no host: "@" and "." would be looked up as the DNS
# root, and "\\" starts an escape for a DNS library. (How long a whole name
# may be is the protocols' to say: 255 bytes in SOCKS5.)
_NAME_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}\Z")


def _is_host_name(text: str) -> bool:
    """Whether ``text`` is a host name to look up (not an IP address)."""
    name = text[:-1] if text.endswith(".") else text
    return all(_NAME_LABEL.match(label) for label in name.split("."))


# SOCKS -----------------------------------------------------------------------

SOCKS4_VERSION = 4
SOCKS4_REPLY_VERSION = 0  # a SOCKS4 reply's first byte
SOCKS5_VERSION = 5
AUTH_VERSION = 1  # the version byte of RFC 1929 username/password messages
MAX_AUTH_FIELD = 255  # an RFC 1929 user name or password has a one-byte length


class Command(enum.IntEnum):
    """SOCKS request commands (the same numbers in SOCKS4 and SOCKS5)."""

    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(enum.IntEnum):
    """SOCKS5 ATYP values."""

    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Method(enum.IntEnum):
    """SOCKS5 authentication methods."""

    NO_AUTHENTICATION = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Request(NamedTuple):
    """What a client asks for: a command and the target's host and port.
    (A tuple: every request makes one, and a frozen dataclass is slower to make.)"""

    command: int
    host: str
    port: int


def read_socks5_methods(reader: DeadlineReader) -> bytes:
    """Read NMETHODS and METHODS, the rest of a SOCKS5 greeting."""
    return reader.read(reader.read_byte())


def read_socks5_request(reader: DeadlineReader) -> Request:
    """Read VER CMD RSV ATYP DST.ADDR DST.PORT.

    Raises SocksError with the reply to send for a wrong version or an
    unusable address, ProtocolError on EOF.
    """
    version, command, _reserved = reader.read(3)
    if version != SOCKS5_VERSION:
        raise SocksError(Reply.GENERAL_FAILURE, f"request version {version}, not 5")
    host, port = read_socks5_address(reader)
    return Request(command, host, port)


def read_socks5_address(reader: DeadlineReader) -> tuple[str, int]:
    """Read ATYP, DST.ADDR and DST.PORT; return (host, port).

    Raises SocksError(ADDRESS_TYPE_NOT_SUPPORTED) for an unknown ATYP.
    """
    atyp = reader.read_byte()
    # An address and its port in one read: every request has them.
    if atyp == AddressType.IPV4:
        address = reader.read(6)
        return socket.inet_ntop(socket.AF_INET, address[:4]), int.from_bytes(address[4:], "big")
    if atyp == AddressType.IPV6:
        address = reader.read(18)
        return socket.inet_ntop(socket.AF_INET6, address[:16]), int.from_bytes(address[16:], "big")
    if atyp == AddressType.DOMAIN:
        host = _decode_name(reader.read(reader.read_byte()))  # judged before the port is waited for
        return host, int.from_bytes(reader.read(2), "big")
    raise SocksError(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type {atyp}")


def read_socks4_request(reader: DeadlineReader) -> Request:
    """Read CMD DST.PORT DST.IP USERID 00, and HOST 00 for SOCKS4a.

    The version byte has been read. The user id is not used. Raises
    ProtocolError on EOF or when a field has no NUL within MAX_SOCKS4_FIELD
    bytes, SocksError for an unusable host name.
    """
    command = reader.read_byte()
    port, packed_ip = struct.unpack("!H4s", reader.read(6))
    reader.read_until_nul(MAX_SOCKS4_FIELD)
    if packed_ip[:3] == b"\0\0\0" and packed_ip[3] != 0:
        # SOCKS4a: the host name follows, to be resolved here.
        host = _decode_name(reader.read_until_nul(MAX_SOCKS4_FIELD))
    else:
        host = socket.inet_ntoa(packed_ip)
    return Request(command, host, port)


def read_auth_request(reader: DeadlineReader) -> tuple[bytes, bytes]:
    """Read an RFC 1929 request, VER ULEN UNAME PLEN PASSWD; return (user, password).

    Raises ProtocolError for a version other than 1 or on EOF.
    """
    version = reader.read_byte()
    if version != AUTH_VERSION:
        raise ProtocolError(f"authentication version {version}, not {AUTH_VERSION}")
    user = reader.read(reader.read_byte())
    password = reader.read(reader.read_byte())
    return user, password


def encode_socks5_address(host: str, port: int) -> bytes:
    """Encode ATYP, ADDR and PORT as they stand in a SOCKS5 request or reply."""
    # inet_pton, not ipaddress: every reply encodes an address, and parsing
    # one into an object took a tenth of a short connection's handshake.
    try:
        if ":" in host:
            address = bytes([AddressType.IPV6]) + socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        else:
            address = bytes([AddressType.IPV4]) + socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):  # ValueError: a NUL in it
        name = host.encode("ascii")
        address = bytes([AddressType.DOMAIN, len(name)]) + name
    return address + port.to_bytes(2, "big")


def encode_socks5_reply(reply: Reply, bound: tuple[Any, ...] = ("0.0.0.0", 0)) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT."""
    return bytes([SOCKS5_VERSION, reply, 0]) + encode_socks5_address(*_split_host(bound))


def encode_socks4_reply(reply: Socks4Reply, bound: tuple[Any, ...] = ("0.0.0.0", 0)) -> bytes:
    """00 REP DST.PORT DST.IP; an IPv6 bound address is given as 0.0.0.0."""
    host, port = _split_host(bound)
    ip = host if _family_of(host) == socket.AF_INET else "0.0.0.0"
    return struct.pack("!BBH4s", SOCKS4_REPLY_VERSION, reply, port, socket.inet_aton(ip))


def _decode_name(name: bytes) -> str:
    """A host name from the wire, or SocksError(HOST_UNREACHABLE).

    Only printable ASCII without spaces is a host name; anything else could
    forge lines in the log, where the name is written.
    """
    if not name:
        raise SocksError(Reply.HOST_UNREACHABLE, "empty host name")
    if not all(0x21 <= byte <= 0x7E for byte in name):
        raise SocksError(Reply.HOST_UNREACHABLE, "host name is not printable ASCII")
    host = name.decode("ascii")
    if not _is_ip(host) and not _is_host_name(host):
        raise SocksError(Reply.HOST_UNREACHABLE, f"{host[:80]!r} is not a host name")
    return host


# SOCKS5 UDP: the largest datagram IPv4 or IPv6 carries without jumbograms.
UDP_BUFFER_SIZE = 65535


def encode_udp_header(host: str, port: int) -> bytes:
    """The header of a SOCKS5 UDP datagram from or to (host, port), unfragmented."""
    return b"\0\0\0" + encode_socks5_address(host, port)


def parse_udp_datagram(datagram: bytes) -> tuple[int, str, int, bytes]:
    """Split a SOCKS5 UDP datagram into (FRAG, host, port, data).

    Raises SocksError for a datagram too short or of an unknown address type.
    """
    reader = DeadlineReader(None, eof_message="truncated UDP datagram", data=datagram)
    frag = reader.read(3)[2]
    host, port = read_socks5_address(reader)
    return frag, host, port, reader.rest()


# ---------------------------------------------------------------------------
# HTTP framing: request and status lines, header fields, bodies and chunks
# ---------------------------------------------------------------------------

Headers = list[tuple[str, str]]

MAX_HEADER_LINE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
# Responses carry more than requests: real sites send Content-Security-Policy
# and Set-Cookie lines of 10 KB and more. Browsers take 256 KiB of head.
MAX_RESPONSE_HEADER_LINE = 64 * 1024
MAX_RESPONSE_HEADER_BYTES = 256 * 1024
# Removed from every forwarded message, along with the headers that its
# Connection header names. Trailer is not among them (RFC 9110, 6.6.2): it
# says which trailer fields follow, end to end.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "upgrade",
    }
)
# The framing of a body is never passed on as it came: it is read, checked
# and written out afresh (framing_headers), so that the next hop reads the
# message exactly as this one did.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
# Requests that may be sent twice with the effect of once (RFC 9110, 9.2.2):
# only these are sent again when a kept origin connection fails under them.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB: never in a field value or a reason
# phrase (RFC 9110, 5.5). A bare CR or a NUL among them would let the next
# hop read another message than this one did.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,19}")
# A request's method: letters, and the hyphens of registered ones
# (VERSION-CONTROL, RFC 3253); its target: visible ASCII (RFC 9112, 3.2).
_METHOD = re.compile(r"[A-Za-z][A-Za-z-]*")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\r\n")


class Framing(enum.IntEnum):
    """How a body other than one of a known length ends (see body_length)."""

    CHUNKED = -1
    UNTIL_CLOSE = -2


def parse_request_line(line: str) -> tuple[str, str, str]:
    """Split ``METHOD TARGET HTTP/1.x`` into its three parts; ValueError if malformed."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {line[:80]!r}")
    method, target, version = parts
    if not _METHOD.fullmatch(method) or not _VISIBLE_ASCII.fullmatch(target):
        raise ValueError(f"bad request line {line[:80]!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise ValueError(f"unsupported version {version[:20]!r}")
    return method, target, version


def parse_status_line(line: str) -> tuple[str, int, str]:
    """Split ``HTTP/1.x CODE REASON`` into (version, code, reason); ValueError if malformed.

    The reason may be empty, and so may its space before it (it is written
    back with its space: RFC 9112, 4).
    """
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.0", "HTTP/1.1") or not _DIGITS.fullmatch(code) or len(code) != 3:
        raise ValueError(f"bad status line {line[:80]!r}")
    if _CONTROL.search(reason):
        raise ValueError(f"a control character in the status line {line[:80]!r}")
    return version, int(code), reason


def parse_header_lines(lines: Sequence[str]) -> Headers:
    """Turn ``Name: value`` lines into (name, value) pairs; ValueError if malformed.

    A name is a token; whitespace before the colon and folded lines are
    refused (RFC 9112, 5): they are how requests are smuggled past other
    proxies. So is a value with a control character other than HTAB (a bare
    CR, a NUL: RFC 9110, 5.5).
    """
    headers = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ValueError(f"bad header line {line[:80]!r}")
        value = value.strip(" \t")
        if _CONTROL.search(value):
            raise ValueError(f"a control character in the {name[:40]} header")
        headers.append((name, value))
    return headers


def header_tokens(headers: Headers, name: str) -> list[str]:
    """The comma-separated values of every ``name`` header, lowercased.

    Only spaces and tabs around them are removed (RFC 9110, 5.6.1), not
    what str.strip() takes for whitespace too (a form feed, a non-breaking
    space): ``chunked\\xa0`` is not ``chunked``.
    """
    name = name.lower()
    return [
        token.strip(" \t").lower()
        for key, value in headers
        if key.lower() == name
        for token in value.split(",")
        if token.strip(" \t")
    ]


def _is_number(text: str) -> bool:
    # isdigit() alone admits superscripts ("²") and other scripts' digits.
    return text.isascii() and text.isdigit()


def _split_host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    """Split ``host[:port]`` (``[v6]:port`` for IPv6); ValueError if malformed."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or not _is_ip(host) or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {authority[:80]!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host or not host.isascii() or any(c in host for c in "@/ "):
        raise ValueError(f"bad host {authority[:80]!r}")
    if not port_text and default_port is not None:
        return host, default_port
    if not _is_number(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {authority[:80]!r}")
    return host, int(port_text)


# The longest name DNS can carry, in characters (255 bytes on the wire).
MAX_HOST_NAME = 253


def _validate_target_host(host: str, authority: str) -> None:
    """Raise ValueError unless ``host`` (of ``authority``) is an IP address
    or a host name to look up (see _is_host_name)."""
    if not _is_ip(host) and not (_is_host_name(host) and len(host.rstrip(".")) <= MAX_HOST_NAME):
        raise ValueError(f"bad host {authority[:80]!r}")


def parse_connect_target(target: str) -> tuple[str, int]:
    """(host, port) of a CONNECT request's ``host:port``; ValueError if malformed."""
    host, port = _split_host_port(target, None)
    _validate_target_host(host, target)
    return host, port


def parse_absolute_url(url: str) -> tuple[str, int, str]:
    """Split ``http://host[:port]/path?query`` into (host, port, origin-form path).

    ValueError for anything else: a proxy gets the absolute form (RFC 9112,
    3.2.2), and https URLs come by CONNECT.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != "http":
        raise ValueError(f"not an absolute http URL: {url[:80]!r}")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    host, port = _split_host_port(rest[:end], 80)
    _validate_target_host(host, rest[:end])
    path = rest[end:].partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def body_length(headers: Headers, request: bool) -> int:
    """How a message body is framed: its length, or a Framing.

    Follows RFC 9112, 6.3. A request without either header has no body.
    ValueError where the framing is ambiguous or malformed: a request with
    both Transfer-Encoding and Content-Length (a response with both is
    chunked), lengths that disagree (``5, 5`` is one length: RFC 9110, 8.6),
    or a transfer coding other than ``chunked`` alone, which could not be
    framed here exactly as the next hop frames it.
    """
    codings = [value.strip(" \t").lower() for key, value in headers if key.lower() == "transfer-encoding"]
    lengths = [value for key, value in headers if key.lower() == "content-length"]
    length = None
    if lengths:  # checked even where chunked wins: a bad one shows a broken sender
        values = {part.strip(" \t") for value in lengths for part in value.split(",")}
        if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise ValueError(f"bad Content-Length {', '.join(lengths)[:80]!r}")
        length = int(values.pop())
    if codings:
        # Exactly one field, exactly "chunked": a list with empty elements
        # or a coding twice is read one way here and another way elsewhere.
        if codings != ["chunked"]:
            raise ValueError(f"unsupported Transfer-Encoding {', '.join(codings)[:80]!r}")
        if request and lengths:
            raise ValueError("both Transfer-Encoding and Content-Length")
        return Framing.CHUNKED
    if length is not None:
        return length
    return 0 if request else Framing.UNTIL_CLOSE


def framing_headers(headers: Headers, length: int) -> Headers:
    """The framing header of a message as body_length read it, written out
    afresh: ``Transfer-Encoding: chunked``, one ``Content-Length`` (where the
    message had one), or none for a body ended by the close."""
    if length == Framing.CHUNKED:
        return [("Transfer-Encoding", "chunked")]
    if length >= 0 and any(key.lower() == "content-length" for key, _ in headers):
        return [("Content-Length", str(length))]
    return []


def response_has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries a body at all."""
    return not (method == "HEAD" or status < 200 or status in (204, 304))


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk's size line, with its CRLF; ValueError if malformed.

    Extensions are read past (and not passed on); padding around the size
    and a bare LF are refused: another reader would start the next chunk
    somewhere else (RFC 9112, 7.1).
    """
    match = _CHUNK_SIZE_LINE.fullmatch(line)
    if match is None:
        raise ValueError(f"bad chunk size line {line[:40]!r}")
    return int(match[1], 16)


def forwarded_headers(headers: Headers) -> Headers:
    """The headers without the hop-by-hop ones, which concern one connection
    only, and without the framing ones (see framing_headers)."""
    dropped = HOP_BY_HOP_HEADERS | FRAMING_HEADERS | set(header_tokens(headers, "connection"))
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def keeps_alive(version: str, headers: Headers) -> bool:
    """Whether the connection stays open after this message.

    HTTP/1.0 peers get one message per connection: that avoids their
    keep-alive dialect and chunked bodies they cannot read.
    """
    return version == "HTTP/1.1" and "close" not in header_tokens(headers, "connection")


def basic_credentials(headers: Headers, header: str = "proxy-authorization") -> tuple[str, str] | None:
    """(user, password) from a ``Basic`` credentials header, or None."""
    for name, value in headers:
        if name.lower() != header:
            continue
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            continue
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, colon, password = decoded.partition(":")
        return (user, password) if colon else None
    return None


def encode_head(start_line: str, headers: Headers) -> bytes:
    """The bytes of a message head: start line, headers, empty line."""
    lines = [start_line, *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def error_response(status: HTTPStatus, detail: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete error response with a short text body; the connection closes after it."""
    body = f"{status.value} {status.phrase}: {detail}\n".encode("utf-8", "replace")
    head = [
        *headers,
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return encode_head(f"HTTP/1.1 {status.value} {status.phrase}", head) + body


def read_head(reader: DeadlineReader, max_line: int = MAX_HEADER_LINE, max_head: int = MAX_HEADER_BYTES) -> list[str]:
    """The lines of a message head (start line first) without line ends.

    Empty lines before the start line are skipped (RFC 9112, 2.2). A line
    ends at CRLF or LF; any other CR stays in the line, for the parsers to
    refuse. Raises LineTooLongError past ``max_line`` a line or
    ``max_head`` in all.
    """
    lines: list[str] = []
    total = 0
    while True:
        line = reader.read_line(max_line)
        total += len(line)
        if total > max_head:
            raise LineTooLongError(f"a head longer than {max_head} bytes")
        line = line[:-1]
        text = (line[:-1] if line.endswith(b"\r") else line).decode("latin-1")
        if text:
            lines.append(text)
        elif lines:
            return lines


def copy_body(reader: DeadlineReader, length: int, send: Callable[[bytes], None], *, dechunk: bool = False) -> None:
    """Pass a message body on as framed by ``length`` (see body_length).

    A chunked body's framing is checked and written out afresh (sizes in
    plain hex, no extensions, checked trailer fields); ``dechunk`` sends its
    data alone. Raises ProtocolError for a body cut short or badly framed.
    """
    if length == Framing.UNTIL_CLOSE:
        while data := reader.read_some(BULK_READ_SIZE):
            send(data)
    elif length == Framing.CHUNKED:
        _copy_chunks(reader, send, dechunk=dechunk)
    else:
        _copy_exactly(reader, length, send)


def _copy_chunks(reader: DeadlineReader, send: Callable[[bytes], None], *, dechunk: bool) -> None:
    while True:
        try:
            size = parse_chunk_size(reader.read_line(MAX_HEADER_LINE))
        except ValueError as error:
            raise ProtocolError(str(error)) from None
        if size == 0:
            break
        if not dechunk:
            send(b"%x\r\n" % size)
        _copy_exactly(reader, size, send)
        if reader.read(2) != b"\r\n":
            raise ProtocolError("a chunk longer than its size")
        if not dechunk:
            send(b"\r\n")
    trailer = read_trailer(reader)
    if not dechunk:
        send(b"0\r\n" + encode_head("", trailer)[2:])


def read_trailer(reader: DeadlineReader) -> Headers:
    """The trailer fields after a chunked body, up to the empty line.

    Every line ends at CRLF: only an empty line ends the section, and a
    line of spaces is refused like any other malformed field. Raises
    ProtocolError, or LineTooLongError past the limits of a request head.
    """
    lines: list[str] = []
    total = 0
    while True:
        line = reader.read_line(MAX_HEADER_LINE)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise LineTooLongError(f"trailer fields longer than {MAX_HEADER_BYTES} bytes")
        if not line.endswith(b"\r\n"):
            raise ProtocolError(f"a trailer line without CRLF {line[:40]!r}")
        if line == b"\r\n":
            break
        lines.append(line[:-2].decode("latin-1"))
    try:
        return parse_header_lines(lines)
    except ValueError as error:
        raise ProtocolError(f"trailer: {error}") from None


def _copy_exactly(reader: DeadlineReader, length: int, send: Callable[[bytes], None]) -> None:
    while length:
        data = reader.read_some(min(length, BULK_READ_SIZE))
        if not data:
            raise ProtocolError("closed in the middle of a body")
        send(data)
        length -= len(data)


# ---------------------------------------------------------------------------
# Proxy clients: the client side of SOCKS5, SOCKS4 and HTTP CONNECT
# ---------------------------------------------------------------------------

# dispatch speaks to an upstream proxy as a client. Each handshake is a
# generator of steps (bytes to send, bytes to receive) that is sent what it
# asked to receive and returns when the proxy has said yes: one description
# of each protocol serves the non-blocking connects that race, and the
# blocking ones of retests and UDP associations alike. No step reads past
# the proxy's reply: what follows is the target's.

MAX_SOCKS5_NAME = 255  # a SOCKS5 DOMAIN address has a one-byte length
SOCKS4A_NAME_FOLLOWS = b"\0\0\0\1"  # DST.IP 0.0.0.x: the host name follows the user id
MAX_PROXY_REPLY_HEAD = 16 * 1024  # an HTTP proxy's answers to CONNECT, heads only, 1xx ones too
# Interim (1xx) answers an HTTP proxy may send before its final one to
# CONNECT: a proxy that sends them without end must not hold the link.
MAX_INTERIM_ANSWERS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class SendStep:
    """Send all of ``data``."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiveStep:
    """Receive exactly ``size`` bytes."""

    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiveHeadStep:
    """Receive an HTTP head, up to and with its blank line, at most ``limit`` bytes."""

    limit: int


ClientStep = SendStep | ReceiveStep | ReceiveHeadStep
# Yields steps, is sent what a receive step got (b"" after a send), returns
# the address the proxy bound for the request, where it says.
ClientHandshake = Generator[ClientStep, bytes, tuple[str, int]]


def upstream_reply_error(reply: int) -> OSError:
    """The error of a SOCKS5 failure reply from an upstream proxy.

    Its refusal by the target is the target's answer, as a refusal here is
    (another link would get the same); the target unreachable or silent from
    there is the link's failure, as it is from a local address; the rest
    are the proxy's final word on this request.
    """
    if reply == Reply.CONNECTION_REFUSED:
        return ConnectionRefusedError(errno.ECONNREFUSED, "connection refused (the upstream proxy says)")
    if reply == Reply.NETWORK_UNREACHABLE:
        return OSError(errno.ENETUNREACH, "network unreachable (the upstream proxy says)")
    if reply == Reply.HOST_UNREACHABLE:
        return OSError(errno.EHOSTUNREACH, "host unreachable (the upstream proxy says)")
    if reply == Reply.TTL_EXPIRED:
        return TimeoutError(errno.ETIMEDOUT, "timed out (the upstream proxy says)")
    try:
        known = Reply(reply)
    except ValueError:
        return SocksError(Reply.GENERAL_FAILURE, f"the upstream proxy answered with unknown reply {reply}")
    return SocksError(known, f"{REPLY_MESSAGES[known]} (the upstream proxy says)")


def encode_auth_request(user: str, password: str) -> bytes:
    """An RFC 1929 request, VER ULEN UNAME PLEN PASSWD; ProxyLinkError if a field is too long."""
    fields = [user.encode(), password.encode()]
    if any(len(field) > MAX_AUTH_FIELD for field in fields):
        raise ProxyLinkError(
            Reply.GENERAL_FAILURE, f"a SOCKS5 user name or password has {MAX_AUTH_FIELD} bytes at most"
        )
    return bytes([AUTH_VERSION]) + b"".join(bytes([len(field)]) + field for field in fields)


def socks5_client(
    host: str, port: int, login: tuple[str, str] | None, command: Command = Command.CONNECT
) -> ClientHandshake:
    """The client side of a SOCKS5 request (RFC 1928, RFC 1929 for ``login``).

    Raises ProxyLinkError where the proxy refuses the login or does not speak
    SOCKS5, the error of its failure reply (upstream_reply_error), and
    SocksError for a name longer than SOCKS5 carries.
    """
    if not _is_ip(host) and len(host) > MAX_SOCKS5_NAME:
        raise SocksError(Reply.HOST_UNREACHABLE, f"a name of more than {MAX_SOCKS5_NAME} bytes cannot go to SOCKS5")
    methods = [Method.NO_AUTHENTICATION] + ([Method.USERNAME_PASSWORD] if login else [])
    yield SendStep(bytes([SOCKS5_VERSION, len(methods), *methods]))
    version, method = yield ReceiveStep(2)
    if version != SOCKS5_VERSION:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy does not speak SOCKS5 (version {version})")
    if method == Method.USERNAME_PASSWORD and login is not None:
        yield SendStep(encode_auth_request(*login))
        _, status = yield ReceiveStep(2)
        if status != AuthStatus.SUCCESS:
            raise ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy refused the login")
    elif method == Method.NO_ACCEPTABLE:
        wanted = "refused the login method" if login else "wants a login"
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy {wanted}")
    elif method != Method.NO_AUTHENTICATION:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy chose an unknown method {method}")
    yield SendStep(bytes([SOCKS5_VERSION, command, 0]) + encode_socks5_address(host, port))
    version, reply, _, atyp = yield ReceiveStep(4)
    if version != SOCKS5_VERSION:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy replied with version {version}")
    if reply != Reply.SUCCEEDED:
        raise upstream_reply_error(reply)
    return (yield from _socks5_bound_address(atyp))


def _socks5_bound_address(atyp: int) -> ClientHandshake:
    """Receive the rest of a SOCKS5 reply after its ATYP: BND.ADDR and BND.PORT."""
    if atyp == AddressType.IPV4:
        rest = yield ReceiveStep(4 + 2)
    elif atyp == AddressType.IPV6:
        rest = yield ReceiveStep(16 + 2)
    elif atyp == AddressType.DOMAIN:
        length = yield ReceiveStep(1)
        rest = length + (yield ReceiveStep(length[0] + 2))
    else:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy replied with address type {atyp}")
    try:
        return read_socks5_address(DeadlineReader(None, eof_message="short reply", data=bytes([atyp]) + rest))
    except SocksError as error:  # a bound name that is no name: the proxy's fault
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy's reply: {error}") from None


def socks4_client(host: str, port: int, user: str | None) -> ClientHandshake:
    """The client side of a SOCKS4 CONNECT; a name (not an IP address) is
    sent as SOCKS4a asks. Raises ProxyLinkError where the proxy does not
    speak SOCKS4 or refuses the user id, SocksError where it refuses the
    request (SOCKS4 does not say why)."""
    userid = (user or "").encode() + b"\0"
    if _is_ip(host):
        request = struct.pack("!BBH4s", SOCKS4_VERSION, Command.CONNECT, port, socket.inet_aton(host)) + userid
    else:
        request = struct.pack("!BBH4s", SOCKS4_VERSION, Command.CONNECT, port, SOCKS4A_NAME_FOLLOWS) + userid
        request += host.encode("ascii") + b"\0"
    yield SendStep(request)
    version, status, bound_port, bound_ip = struct.unpack("!BBH4s", (yield ReceiveStep(8)))
    if version != SOCKS4_REPLY_VERSION:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy does not speak SOCKS4 (version {version})")
    if status in (Socks4Reply.NO_IDENTD, Socks4Reply.IDENTD_MISMATCH):
        raise ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy refused the user id")
    if status != Socks4Reply.GRANTED:
        raise SocksError(Reply.GENERAL_FAILURE, "rejected or failed (the upstream SOCKS4 proxy says)")
    return socket.inet_ntoa(bound_ip), bound_port


def _final_answer() -> Generator[ClientStep, bytes, tuple[int, str]]:
    """Receive an HTTP proxy's answer to CONNECT: (status, reason) of its
    final one. Interim (1xx) answers before it, 100 Continue or 103 Early
    Hints with their fields, are read and passed over (RFC 9110, 15.2), at
    most MAX_INTERIM_ANSWERS of them in MAX_PROXY_REPLY_HEAD bytes in all. A
    101 Switching Protocols answers nothing CONNECT asks: the proxy breaks
    HTTP, as it does with an answer that is no HTTP."""
    received = 0
    for _ in range(MAX_INTERIM_ANSWERS + 1):
        if received >= MAX_PROXY_REPLY_HEAD:
            break
        answer = yield ReceiveHeadStep(MAX_PROXY_REPLY_HEAD - received)
        received += len(answer)
        try:
            _, status, reason = parse_status_line(answer.split(b"\r\n", 1)[0].decode("latin-1"))
        except ValueError as error:
            raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy does not speak HTTP ({error})") from None
        if status == HTTPStatus.SWITCHING_PROTOCOLS:
            raise ProxyLinkError(
                Reply.GENERAL_FAILURE, "the upstream proxy answered CONNECT with 101 Switching Protocols"
            )
        if not 100 <= status < 200:
            return status, reason
    raise ProxyLinkError(
        Reply.GENERAL_FAILURE,
        f"the upstream proxy's interim (1xx) answers to CONNECT go on past {MAX_INTERIM_ANSWERS} "
        f"answers or {MAX_PROXY_REPLY_HEAD} bytes",
    )


def http_connect_client(
    host: str, port: int, login: tuple[str, str] | None, via: Sequence[str] = ()
) -> ClientHandshake:
    """The client side of an HTTP CONNECT, with Basic proxy credentials for
    ``login``, and a Via field of each of ``via`` (the proxies the request
    came through, in order, this one last). Raises ProxyLinkError where the
    proxy refuses the login (407) or does not answer in HTTP (see
    _final_answer for its interim answers); any other refusal is the
    proxy's word on this request: 504 as a timeout, 403 as not allowed,
    others as a failure."""
    authority = _format_endpoint(host, port)
    head = [("Host", authority)]
    if login is not None:
        head.append(("Proxy-Authorization", basic_authorization(*login)))
    head += [("Via", value) for value in via]
    yield SendStep(encode_head(f"CONNECT {authority} HTTP/1.1", head))
    status, reason = yield from _final_answer()
    said = f"{status} {reason}".strip() + " (the upstream proxy says)"
    if 200 <= status < 300:
        return "0.0.0.0", 0  # an HTTP proxy does not say where it connected from
    if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
        raise ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy refused the login" if login else said)
    if status == HTTPStatus.GATEWAY_TIMEOUT:
        raise TimeoutError(errno.ETIMEDOUT, said)
    if status == HTTPStatus.FORBIDDEN:
        raise SocksError(Reply.NOT_ALLOWED, said)
    raise SocksError(Reply.GENERAL_FAILURE, said)


def basic_authorization(user: str, password: str) -> str:
    """The value of an Authorization or Proxy-Authorization header for a Basic login."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# ---------------------------------------------------------------------------
# Access: the allow-list and logins
# ---------------------------------------------------------------------------

# The clients allowed when no allow-list is given: this machine and the
# private networks it may be shared on.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598), as phone hotspots use
        "169.254.0.0/16",  # IPv4 link-local
        "::1/128",  # loopback
        "fc00::/7",  # unique local addresses
        "fe80::/10",  # link-local
    )
)
ALLOW_CACHE_SIZE = 4096  # client addresses whose allow-list answer is kept

# Targets that only this machine's own programs may reach through the proxy,
# unless --allow-target opens them: its loopback, the unspecified addresses
# (a connect to 0.0.0.0 reaches this machine), and the link-local networks,
# where a cloud's metadata service answers (169.254.169.254). A service bound
# there trusts its callers to be on this machine; a client from the LAN must
# not borrow the proxy's place (Squid refuses these too: to_localhost,
# link-local). This machine's other own addresses are refused alike.
HOST_ONLY_TARGETS = tuple(
    ipaddress.ip_network(network)
    for network in ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "::1/128", "::/128", "fe80::/10")
)
# Refused targets are logged at most this often: a client asking again and
# again cannot flood the log.
TARGET_REFUSAL_LOG_INTERVAL = 1.0


def credentials_match(known: Iterable[tuple[bytes, bytes]], user: bytes, password: bytes) -> bool:
    """Whether (user, password) is one of the ``known`` pairs.

    Every pair is compared, name and password alike, in constant time: how
    long it takes tells nothing about which user exists or how much of a
    secret was right.
    """
    matched = False
    for known_user, known_password in known:
        user_matches = hmac.compare_digest(user, known_user)
        password_matches = hmac.compare_digest(password, known_password)
        matched |= user_matches & password_matches
    return matched


def parse_credentials(text: str) -> tuple[str, str]:
    """Split ``USER:PASS`` (the password may hold colons) into (user, password).

    Raises ValueError, with a message that never holds the password, unless
    both are 1 to 255 bytes of UTF-8 as RFC 1929 requires.
    """
    user, colon, password = text.partition(":")
    if not colon:
        raise ValueError("expected USER:PASS")
    _encode_credential(user, password)
    return user, password


# The largest login file read: some thousands of users; /dev/zero is refused.
LOGIN_FILE_LIMIT = 1 << 20


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """The (user, password) pairs of a file of ``USER:PASS`` lines.

    Blank lines and lines starting with # are skipped. Raises ValueError
    naming the file and line, never a password, and for a file without a
    user: a login file that lets everyone in is a mistake, never a wish.
    """
    if not path:
        raise ValueError("the login file's path is empty")
    try:
        with open(path, "rb") as file:  # not only a regular file: <(...) in a shell is a pipe
            content = file.read(LOGIN_FILE_LIMIT + 1)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {_describe(error)}") from None
    if len(content) > LOGIN_FILE_LIMIT:
        raise ValueError(f"{path} is larger than {LOGIN_FILE_LIMIT:,} bytes: no login file")
    lines = content.splitlines()
    pairs = []
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}, line {number}: not UTF-8") from None
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            pairs.append(parse_credentials(line))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
    if not pairs:
        raise ValueError(f"{path} holds no USER:PASS line: a login file without a user would let everyone in")
    return pairs


def _encode_credential(user: str, password: str) -> tuple[bytes, bytes]:
    encoded = _as_bytes(user), _as_bytes(password)
    if not 1 <= len(encoded[0]) <= MAX_AUTH_FIELD:
        raise ValueError(f"a user name must be 1 to {MAX_AUTH_FIELD} bytes")
    if not 1 <= len(encoded[1]) <= MAX_AUTH_FIELD:
        raise ValueError(f"the password of user {user!r} must be 1 to {MAX_AUTH_FIELD} bytes")
    return encoded


def _as_bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _printable(name: bytes) -> str:
    """A client-chosen name, quoted and escaped so that it cannot forge log lines."""
    return repr(name.decode("utf-8", "backslashreplace"))


# Each connection asks this of its client and its target, mostly the same few.
@functools.lru_cache(maxsize=1024)
def _client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client's address as the allow-list sees it: IPv4 clients of a
    dual-stack listener arrive as ::ffff:a.b.c.d and are matched as IPv4."""
    ip = ipaddress.ip_address(host.partition("%")[0])  # no IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_multicast_or_broadcast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` names many hosts: no one address to connect or relay to."""
    return ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255")


@functools.lru_cache(maxsize=1024)
def _client_ip_text(host: str) -> str:
    """_client_ip(host) as text."""
    return str(_client_ip(host))


@functools.lru_cache(maxsize=1024)
def _is_loopback_client(host: str) -> bool:
    """Whether the client at ``host`` is on this machine's loopback."""
    return _client_ip(host).is_loopback


@functools.lru_cache(maxsize=1024)
def _is_host_only_target(host: str) -> bool:
    """Whether ``host`` is among HOST_ONLY_TARGETS."""
    ip = _client_ip(host)
    return any(ip in network for network in HOST_ONLY_TARGETS)


class AccessPolicy:
    """Who may use the proxy: the networks clients may come from, and the
    logins they must give (none when ``credentials`` is empty).

    ``allow`` holds networks (``"192.168.1.0/24"``, ``"fd00::/8"``, single
    addresses); None means PRIVATE_NETWORKS. ``allow_targets`` holds the
    networks of HOST_ONLY_TARGETS and of this machine's own addresses that
    every client may reach all the same (see refuses_target). Raises
    ValueError for a bad entry or credential.
    """

    def __init__(
        self,
        credentials: Mapping[str, str] | None = None,
        allow: Iterable[str] | None = None,
        allow_targets: Iterable[str] = (),
    ) -> None:
        self._credentials = [_encode_credential(user, password) for user, password in (credentials or {}).items()]
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
            list(PRIVATE_NETWORKS) if allow is None else [ipaddress.ip_network(a, strict=False) for a in allow]
        )
        self.allowed_targets = [ipaddress.ip_network(a, strict=False) for a in allow_targets]
        self._allows_by_host: dict[str, bool] = {}

    @property
    def requires_credentials(self) -> bool:
        """Whether clients must give a user name and password."""
        return bool(self._credentials)

    @property
    def users(self) -> int:
        """How many logins there are."""
        return len(self._credentials)

    def check_credentials(self, user: str | bytes, password: str | bytes) -> bool:
        """Whether ``user`` and ``password`` are accepted (always, without credentials)."""
        if not self._credentials:
            return True
        return credentials_match(self._credentials, _as_bytes(user), _as_bytes(password))

    def allows(self, host: str) -> bool:
        """Whether a client at IP address ``host`` may connect."""
        # Every accept asks, in the one accepting thread; the same few
        # clients ask again and again.
        allowed = self._allows_by_host.get(host)
        if allowed is None:
            try:
                ip = _client_ip(host)
            except ValueError:
                return False
            allowed = any(ip in network for network in self.allowed_networks)
            if len(self._allows_by_host) >= ALLOW_CACHE_SIZE:
                self._allows_by_host.clear()
            self._allows_by_host[host] = allowed
        return allowed

    def refuses_target(
        self,
        client: str,
        target: str,
        is_own: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool] = lambda ip: False,
    ) -> bool:
        """Whether a client at IP address ``client`` is refused the target
        IP address ``target``: one of HOST_ONLY_TARGETS or of this machine's
        own addresses (``is_own`` tells those), asked for by a client that is
        not on this machine itself (neither loopback nor an own address),
        unless ``allowed_targets`` holds it. IPv4 addresses in IPv6 form
        (``::ffff:127.0.0.1``) are judged as the IPv4 ones they carry."""
        if _is_loopback_client(client):
            return False
        ip = _client_ip(target)
        if self.allowed_targets and any(ip in network for network in self.allowed_targets):
            return False
        if not (_is_host_only_target(target) or is_own(ip)):
            return False
        return not is_own(_client_ip(client))


# ---------------------------------------------------------------------------
# Interfaces: this machine's interfaces, their usable addresses, default routes
# ---------------------------------------------------------------------------

# How often interface addresses are read again: DHCP renewals and new
# networks are seen within this, at the cost of one read per interval.
INTERFACE_REFRESH_INTERVAL = 2.0  # seconds


@dataclasses.dataclass(frozen=True)
class Interface:
    """A network interface as dispatch shows it and lets users name it.

    ``name`` is what dispatch shows and follows; ``aliases`` are other names
    that select it (on Windows its description and its adapter GUID);
    ``ips`` are its addresses, IPv6 ones without their scope.
    """

    name: str
    aliases: frozenset[str] = frozenset()
    ips: tuple[str, ...] = ()
    index: int | None = None


def read_interfaces(adapters: Iterable[Any], platform: str | None = None) -> list[Interface]:
    """Interfaces from ifaddr's adapters, those without an address included.

    On Windows, ifaddr gives an adapter's GUID as ``name``, its hardware
    description ("Intel(R) Wi-Fi 6 AX201") as ``nice_name``, and the name
    people know from Settings ("Wi-Fi") as each IP's ``nice_name``: that one
    is the interface's name, the other two select it too. An adapter without
    an address has no such name in ifaddr: its description names it until it
    has one. Elsewhere all of these are "eth0".
    """
    platform = platform or sys.platform
    interfaces = []
    for adapter in adapters:
        # ifaddr gives IPv6 addresses as (address, flowinfo, scope_id).
        ips = tuple(entry.ip[0] if isinstance(entry.ip, tuple) else entry.ip for entry in adapter.ips)
        name = adapter.ips[0].nice_name if platform == "win32" and adapter.ips else adapter.nice_name
        aliases = frozenset({adapter.nice_name, adapter.name} - {name})
        interfaces.append(Interface(name, aliases, ips, getattr(adapter, "index", None)))
    return interfaces


def find_interface(interfaces: Iterable[Interface], text: str, platform: str | None = None) -> Interface | None:
    """The interface ``text`` names: by its name first, then by an alias.

    Windows treats interface names without regard to case; others do not.
    """
    fold: Callable[[str], str] = str.casefold if (platform or sys.platform) == "win32" else str
    candidates = list(interfaces)
    wanted = fold(text)
    named = (i for i in candidates if fold(i.name) == wanted)
    aliased = (i for i in candidates if any(fold(alias) == wanted for alias in i.aliases))
    return next(named, None) or next(aliased, None)


@functools.cache
def _has_ifaddr() -> bool:
    """Whether the ifaddr package can be imported (asked once)."""
    try:
        import ifaddr  # noqa: F401
    except ImportError:
        return False
    return True


def _interfaces() -> list[Interface]:
    """Every interface and its addresses, from the ifaddr package."""
    try:
        import ifaddr
    except ImportError:
        raise AddressError(
            "interface names, 'start' without addresses and 'list' need the ifaddr package"
            " (pip install ifaddr); IP addresses work without it"
        ) from None
    interfaces = read_interfaces(ifaddr.get_adapters(include_unconfigured=True))
    _INTERFACE_INDEXES.update((i.name, i.index) for i in interfaces if i.index is not None)
    return interfaces


# The index of each interface by the name dispatch shows, as last read: on
# Windows the system's own lookup (if_nametoindex) knows none of those names.
_INTERFACE_INDEXES: dict[str, int] = {}


def _interface_index(name: str) -> int:
    """The index of interface ``name``; OSError(ENODEV) if there is none."""
    index = _INTERFACE_INDEXES.get(name)
    if index is not None:
        return index
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface {name}") from None


def _is_up(interface: str) -> bool:
    """Whether an interface is up; true where that cannot be told."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as state:
            return state.read().strip() != "down"
    except OSError:
        return True


def _is_usable_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can reach other hosts (not loopback or link-local)."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _with_usable_addresses(interface: Interface) -> Interface:
    """The interface with only the addresses that can reach other hosts, none while it is down."""
    if not _is_up(interface.name):
        return dataclasses.replace(interface, ips=())
    return dataclasses.replace(
        interface, ips=tuple(ip for ip in interface.ips if _is_usable_address(ipaddress.ip_address(ip)))
    )


def usable_interfaces() -> list[Interface]:
    """Every interface with its usable addresses (none for one that is down)."""
    return [_with_usable_addresses(interface) for interface in _interfaces()]


@functools.lru_cache(maxsize=1024)
def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return _client_ip(host).is_loopback  # ::ffff:127.0.0.1 too
    except ValueError:
        return False


# Default routes: which interfaces hold one, as ``dispatch list`` shows.


def _default_route_interfaces() -> set[str] | None:
    """Names of the interfaces holding a default route; None where that
    cannot be told (Windows, or a failure)."""
    if sys.platform == "darwin":
        return _macos_default_route_interfaces()
    if not sys.platform.startswith("linux"):
        return None
    found = set()
    try:
        with open("/proc/net/route") as routes:
            for line in list(routes)[1:]:
                fields = line.split()
                if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
                    found.add(fields[0])
        with open("/proc/net/ipv6_route") as routes:
            for line in routes:
                fields = line.split()
                if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
                    found.add(fields[9])
    except OSError:
        return None
    return found


# The absolute path: a launchd job's PATH is short.
MACOS_ROUTE_COMMAND = ("/sbin/route", "-n", "get", "default")


def _macos_default_route_interfaces(
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> set[str] | None:
    """The interface of macOS's default route, from ``route -n get default``."""
    try:
        result = run(list(MACOS_ROUTE_COMMAND), capture_output=True, text=True, timeout=2.0, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if result.returncode != 0:
        return None
    name = parse_route_get_default(result.stdout)
    # With no default route, route(8) says "not in table" on stderr and
    # prints no interface: there is none, which is known.
    return {name} if name else set()


def parse_route_get_default(output: str) -> str | None:
    """The interface named in the output of macOS ``route -n get default``."""
    for line in output.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == "interface":
            return value.strip() or None
    return None


# Addresses no machine holds (RFC 5737, RFC 3849): one that can be bound
# says that this system binds any address (Linux's ip_nonlocal_bind).
_NOBODYS_ADDRESSES = {socket.AF_INET: "203.0.113.254", socket.AF_INET6: "2001:db8:ffff::fe"}

OWN_ANSWERS_KEPT = 4096  # addresses whose is_own_address answer is kept

# Each answer, kept as long as the interfaces go unread (every datagram of a
# UDP association asks): {address: (own, until)}.
_own_answers: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, tuple[bool, float]] = {}


def is_own_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is an address of this machine, on any of its
    interfaces, a link or not, as they are (within INTERFACE_REFRESH_INTERVAL).

    The system's own answer: a socket can be bound to its addresses alone.
    Where it binds any address, the interfaces are read instead (with the
    ifaddr package; without it, no address counts as own there).
    """
    now = time.monotonic()
    known = _own_answers.get(ip)
    if known is not None and now < known[1]:
        return known[0]
    own = _is_own_address(ip)
    if len(_own_answers) >= OWN_ANSWERS_KEPT:
        _own_answers.clear()
    _own_answers[ip] = own, now + INTERFACE_REFRESH_INTERVAL
    return own


def _is_own_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.is_multicast:  # bound by those who listen to the group; nobody's own
        return False
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    if not _binds_any_address(family):
        return _can_bind(family, str(ip))
    try:
        return any(ipaddress.ip_address(own.partition("%")[0]) == ip for i in _interfaces() for own in i.ips)
    except (OSError, AddressError, ValueError):
        return False


@functools.cache
def _binds_any_address(family: socket.AddressFamily) -> bool:
    """Whether a socket of ``family`` can be bound to an address this machine does not have."""
    return _can_bind(family, _NOBODYS_ADDRESSES[family])


def _can_bind(family: socket.AddressFamily, ip: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def _interface_of(ip: str, interfaces: Iterable[Interface]) -> str | None:
    """The name of the interface holding ``ip``, if any."""
    wanted = ipaddress.ip_address(ip)
    for interface in interfaces:
        if any(ipaddress.ip_address(other) == wanted for other in interface.ips):
            return interface.name
    return None


# ---------------------------------------------------------------------------
# Links: local addresses and other proxies as links; interfaces followed as they change
# ---------------------------------------------------------------------------

# Weights are proportions: 1,000 is finer than any link needs, and a round of
# the balancer takes time in proportion to the sum of the weights.
MAX_WEIGHT = 1000
BACKUP = "backup"  # ADDRESS@backup: a link used only while no other is up
# A link's tier: a backup link is used only while no primary one is up.
Tier = Literal["primary", "backup"]
# An address its interface no longer holds is kept (its row, its counters)
# this long after it went, as long as the charts show its last traffic, in
# case it comes back; and at most GONE_ADDRESSES_KEPT_PER_LINK of them a link, the
# newest: IPv6 temporary addresses come and go every day, for ever.
GONE_ADDRESS_KEPT_SECONDS = 600.0  # seconds
GONE_ADDRESSES_KEPT_PER_LINK = 4


@dataclasses.dataclass(eq=False)
class LocalAddress:
    """One local address that outgoing connections may leave from.

    ``interface`` is the name of the interface holding it, where known:
    connections from it are bound to that device. A ``backup`` address is
    used only while no primary one of its family is up. Compared and hashed by
    identity: each is one place where counters and health are kept.
    """

    ip: str
    weight: int = 1
    interface: str | None = None
    backup: bool = False

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET or AF_INET6."""
        return _family_of(self.ip)

    @property
    def serves(self) -> frozenset[socket.AddressFamily]:
        """The families of targets connections from it reach: its own."""
        return frozenset({self.family})

    def describe(self) -> str:
        """The address and its interface, as logs show them."""
        return f"{self.ip} ({self.interface})" if self.interface else self.ip


class Link:
    """A way out as it was named: one IP address, or an interface whose usable
    addresses are followed as they change (a DHCP renewal, a new network).

    ``current`` are the addresses to use now; ``known`` keeps the addresses
    the link has had, by IP, so that counters survive an address going away
    and coming back, and ``gone_at`` when each of those no longer current
    went (monotonic seconds), until ``drop_gone()`` forgets it. ``weighted``
    says whether a weight was given, and ``backup`` whether the link is kept
    for when no primary link (of the family) is up.
    """

    def __init__(
        self,
        name: str,
        weight: int = 1,
        addresses: Iterable[LocalAddress] = (),
        *,
        is_interface: bool = False,
        weighted: bool = False,
        backup: bool = False,
    ) -> None:
        self.name = name
        self.weight = weight
        self.is_interface = is_interface
        self.weighted = weighted
        self.backup = backup
        self.current = list(addresses)
        for address in self.current:
            address.backup = backup
        self.known = {address.ip: address for address in self.current}
        self.gone_at: dict[str, float] = {}

    @property
    def tier(self) -> Tier:
        """Whether the link is kept for when no primary link is up."""
        return "backup" if self.backup else "primary"

    @classmethod
    def of_address(cls, address: LocalAddress, *, weighted: bool = False, backup: bool = False) -> Link:
        """A link of one fixed address."""
        return cls(address.ip, address.weight, [address], weighted=weighted, backup=backup)

    @classmethod
    def of_interface(
        cls, name: str, weight: int, ips: Sequence[str], *, weighted: bool = False, backup: bool = False
    ) -> Link:
        """A link that follows interface ``name``, holding ``ips`` for now."""
        link = cls(name, weight, is_interface=True, weighted=weighted, backup=backup)
        link.follow(ips)
        return link

    def follow(self, ips: Sequence[str], now: float | None = None) -> bool:
        """Make ``ips`` the current addresses; return whether they changed.
        ``now`` (monotonic seconds) is when those no longer current went."""
        before = [address.ip for address in self.current]
        known = dict(self.known)
        for ip in ips:
            if ip not in known:
                known[ip] = LocalAddress(ip, self.weight, self.name, self.backup)
        went = time.monotonic() if now is None else now
        gone_at = {ip: at for ip, at in self.gone_at.items() if ip not in ips}
        gone_at.update({ip: went for ip in before if ip not in ips and ip not in gone_at})
        # Assignments, not changes in place: readers in other threads see
        # the old dict and list or the new ones.
        self.known = known
        self.current = [known[ip] for ip in ips]
        self.gone_at = gone_at
        return before != list(ips)

    def drop_gone(self, in_use: Callable[[LocalAddress], bool], now: float | None = None) -> list[LocalAddress]:
        """Forget the gone addresses not ``in_use`` that went GONE_ADDRESS_KEPT_SECONDS
        seconds ago or more, and the oldest beyond GONE_ADDRESSES_KEPT_PER_LINK; return them."""
        now = time.monotonic() if now is None else now
        oldest_first = sorted(self.gone_at.items(), key=lambda item: item[1])
        excess = len(oldest_first) - GONE_ADDRESSES_KEPT_PER_LINK
        dropped = [
            self.known[ip]
            for index, (ip, went) in enumerate(oldest_first)
            if (index < excess or now - went >= GONE_ADDRESS_KEPT_SECONDS) and not in_use(self.known[ip])
        ]
        if dropped:
            gone = {address.ip for address in dropped}
            self.known = {ip: address for ip, address in self.known.items() if ip not in gone}
            self.gone_at = {ip: went for ip, went in self.gone_at.items() if ip not in gone}
        return dropped


# Upstream proxies as links ---------------------------------------------------
#
# An ADDRESS may name a proxy instead of a local address:
# SCHEME://[USER[:PASSWORD]@]HOST:PORT[+LINK][@WEIGHT|@backup], where LINK (an
# interface name or a local IP address) is the way the connection to the
# proxy leaves by, so that one proxy reached over three links is three links.
# "mptcp+": a bond to a dispatch --mptcp, subflows by every interface or +LINK+LINK.

PROXY_SCHEMES = ("socks5", "socks5h", "socks4", "socks4a", "http")
BOND_PREFIX = "mptcp+"
BONDED_SCHEMES = ("socks5", "socks5h", "http")
# Schemes whose proxy is given host names as they are (the others get the
# address dispatch resolved), and those that carry UDP.
NAME_PASSING_SCHEMES = frozenset({"socks5h", "socks4a", "http"})
UDP_SCHEMES = frozenset({"socks5", "socks5h"})


@dataclasses.dataclass(frozen=True)
class ProxyURL:
    """An upstream proxy as an ADDRESS names it. ``via`` is the interface
    name or local IP address the connection to it leaves by (None: as the
    routing table says); a bond's (``mptcp+``) are its ``bond``. The
    password is never shown: ``name`` leaves it out."""

    scheme: str
    host: str
    port: int
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    via: str | None = None
    bonded: bool = False
    bond: tuple[str, ...] = ()

    @property
    def passes_names(self) -> bool:
        """Whether target names go to the proxy as they are (else resolved here)."""
        return self.scheme in NAME_PASSING_SCHEMES

    @property
    def carries_udp(self) -> bool:
        """Whether the proxy can relay UDP (SOCKS5's UDP ASSOCIATE)."""
        return self.scheme in UDP_SCHEMES

    @property
    def carries_ipv6(self) -> bool:
        """Whether the proxy can be asked for an IPv6 target (SOCKS4 cannot)."""
        return not self.scheme.startswith("socks4")

    @property
    def login(self) -> tuple[str, str] | None:
        """(user, password) for SOCKS5 and HTTP proxies, where a user is given."""
        return (self.user, self.password or "") if self.user is not None else None

    @property
    def wants_password(self) -> bool:
        """Whether a user is given without the password its scheme sends
        (SOCKS4 sends a user id alone)."""
        return self.user is not None and self.password is None and not self.scheme.startswith("socks4")

    @property
    def name(self) -> str:
        """The link's name: the URL without the password, and the link it leaves by."""
        user = f"{urllib.parse.quote(self.user, safe='')}@" if self.user is not None else ""
        via = "".join(f"+{link}" for link in (self.bond if self.bonded else [self.via] if self.via else []))
        return f"{BOND_PREFIX * self.bonded}{self.scheme}://{user}{_format_endpoint(self.host, self.port)}{via}"


def _is_suffix(text: str) -> bool:
    """Whether ``text`` (after an ADDRESS's last '@') is a weight or 'backup'."""
    return text.lower() == BACKUP or _is_number(text)


def hide_password(text: str) -> str:
    """An ADDRESS as it may be shown: a proxy URL's password as ``***``."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        return text
    head, at, tail = rest.rpartition("@")
    suffix = ""
    if at and _is_suffix(tail):
        rest, suffix = head, "@" + tail
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    return f"{scheme}://{userinfo}{at}{host}{suffix}"


def _refuse_bad_suffix(text: str) -> None:
    """Raise the weight's AddressError where ``text`` is a proxy's URL with
    a suffix that is neither a weight nor 'backup' (``@-1``, ``@nan``).

    Where the URL before that '@' has no login, the text may as well be a
    login and a host without a port (``u:1234@h``): the message then shows
    it as a login, hidden, and names both readings.
    """
    head, at, tail = text.rpartition("@")
    if not at or ":" in tail or "/" in tail:
        return
    try:
        proxy, _ = parse_proxy_url(head)
    except AddressError:
        return
    weight = f"the weight must be a whole number from 1 to {MAX_WEIGHT}, or 'backup'"
    if proxy.user is not None:
        raise AddressError(f"{hide_password(head) + at + tail!r}: {weight}")
    raise AddressError(f"{hide_password(text)!r}: a proxy is SCHEME://HOST:PORT, and after it {weight}")


def parse_proxy_url(text: str) -> tuple[ProxyURL, str | None]:
    """Read a proxy ADDRESS: SCHEME://[USER[:PASSWORD]@]HOST:PORT[+LINK], then
    @WEIGHT or @backup; return the proxy and the text after '@' (None if none).

    USER and PASSWORD may be percent-encoded (an '@' or ':' in them must be).
    Raises AddressError, whose message never holds the password.
    """
    shown = hide_password(text)
    scheme, _, rest = text.partition("://")
    bonded, scheme = scheme.lower().startswith(BOND_PREFIX), scheme.lower().removeprefix(BOND_PREFIX)
    schemes = [BOND_PREFIX + name for name in BONDED_SCHEMES] if bonded else PROXY_SCHEMES
    if scheme not in (BONDED_SCHEMES if bonded else PROXY_SCHEMES):
        raise AddressError(f"{shown!r}: a proxy's scheme is one of {', '.join(schemes)}")
    suffix = None
    head, at, tail = rest.rpartition("@")
    if at and _is_suffix(tail):
        rest, suffix = head, tail
    userinfo, at, endpoint = rest.rpartition("@")
    endpoint, plus, via = endpoint.partition("+")
    try:
        host, port = _split_host_port(endpoint.rstrip("/"), None)
    except ValueError:
        _refuse_bad_suffix(text)
        raise AddressError(f"{shown!r}: a proxy is SCHEME://HOST:PORT, IPv6 hosts in brackets ([::1]:1080)") from None
    bond = tuple(via.split("+")) if bonded and plus else ()
    if plus and not all(bond or [via]):
        raise AddressError(f"{shown!r}: no link after '+': give an interface name or a local IP address")
    user = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        user = urllib.parse.unquote(user_text)
        password = urllib.parse.unquote(password_text) if colon else None
        if scheme.startswith("socks4") and password is not None:
            raise AddressError(f"{shown!r}: SOCKS4 has a user id but no password")
        if any(len(field.encode()) > MAX_AUTH_FIELD for field in (user, password or "")):
            raise AddressError(f"{shown!r}: a user name or password has {MAX_AUTH_FIELD} bytes at most")
    if _is_ip(host):
        host = str(ipaddress.ip_address(host))
    return ProxyURL(scheme, host, port, user, password, None if bonded else via or None, bonded, bond), suffix


@dataclasses.dataclass(eq=False)
class ProxyAddress(LocalAddress):
    """An upstream proxy as a link: connections through it are made by the
    proxy, asked over a connection to it. ``source`` is the local address
    the connection to the proxy is bound to, where the link names one, and
    ``interface`` the device it leaves by.
    """

    # No IP address: the link's name (proxy.name), made from ``proxy``, keys
    # its counters, health and rows where an address's IP does.
    ip: str = dataclasses.field(init=False, default="")
    proxy: ProxyURL = dataclasses.field(kw_only=True)
    source: LocalAddress | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.ip = self.proxy.name

    @property
    def family(self) -> socket.AddressFamily:
        """AF_UNSPEC: a proxy carries the families of ``serves``."""
        return socket.AF_UNSPEC

    @property
    def serves(self) -> frozenset[socket.AddressFamily]:
        """The families of targets it reaches, and AF_UNSPEC if it takes names."""
        families = {socket.AF_INET, socket.AF_INET6} if self.proxy.carries_ipv6 else {socket.AF_INET}
        if self.proxy.passes_names:
            families.add(socket.AF_UNSPEC)
        return frozenset(families)

    def describe(self) -> str:
        """The link's name."""
        return self.proxy.name


@dataclasses.dataclass(frozen=True)
class AddressSpec:
    """One ADDRESS argument: an IP literal or an interface name, its weight
    (None where none was given) and whether it is a backup link."""

    address: str
    weight: int | None = None
    backup: bool = False
    proxy: ProxyURL | None = None  # for an upstream proxy; ``address`` is then its name


def parse_address(text: str) -> AddressSpec:
    """Read an ADDRESS argument: ``ADDR``, ``ADDR@WEIGHT`` (1 to MAX_WEIGHT)
    or ``ADDR@backup``, where ADDR may be a proxy's URL (parse_proxy_url).

    The older ``ADDR/WEIGHT`` still works where it cannot be read as a
    network prefix: ``eth0/3`` does, ``10.0.0.1/24`` is refused with a hint.
    ADDR is not checked here. Raises AddressError naming the text.
    """
    if not text:
        raise AddressError("an empty ADDRESS: give an IP address or an interface name")
    if "://" in text:
        proxy, suffix = parse_proxy_url(text)
        if suffix is not None and suffix.lower() == BACKUP:
            return AddressSpec(proxy.name, backup=True, proxy=proxy)
        weight = _weight(hide_password(text), suffix) if suffix is not None else None
        return AddressSpec(proxy.name, weight, proxy=proxy)
    if "@" in text:
        address, *suffixes = text.split("@")
        if len(suffixes) > 1:
            raise AddressError(f"{text!r}: one '@' at most: ADDRESS@WEIGHT or ADDRESS@backup")
        if not address:
            raise AddressError(f"{text!r}: no address before '@'")
        if suffixes[0].lower() == BACKUP:
            return AddressSpec(address, backup=True)
        return AddressSpec(address, _weight(text, suffixes[0]))
    if "/" in text:
        address, _, suffix = text.rpartition("/")
        if not address:
            raise AddressError(f"{text!r}: no address before '/'")
        ip = address.partition("%")[0]  # an IPv6 zone is no part of the address
        if _is_ip(ip) and _is_number(suffix) and int(suffix) <= ipaddress.ip_address(ip).max_prefixlen:
            raise AddressError(f"{text!r} looks like a network prefix; for a weight write {address}@{suffix}")
        return AddressSpec(address, _weight(text, suffix))
    return AddressSpec(text)


def _weight(text: str, weight: str) -> int:
    if not _is_number(weight) or not 1 <= int(weight) <= MAX_WEIGHT:
        raise AddressError(f"{text!r}: the weight must be a whole number from 1 to {MAX_WEIGHT}, or 'backup'")
    return int(weight)


def usable_addresses() -> list[LocalAddress]:
    """Every usable address of every up interface, weight 1 each."""
    return [LocalAddress(ip, 1, i.name) for i in usable_interfaces() for ip in i.ips]


def _validate_link_address(ip: str) -> None:
    """Raise AddressError, saying why, if ``ip`` could never be a link's
    source address, on any machine: unspecified, multicast or link-local."""
    address = ipaddress.ip_address(ip)
    if address.is_unspecified:
        raise AddressError(
            f"{ip} is the unspecified address: it stands for any address, not for one link (the system "
            "would pick the way out); give an interface's name or one of its addresses"
        )
    if address.is_multicast:
        raise AddressError(
            f"{ip} is a multicast address: it names a group of receivers, and no connection can leave "
            "from it; give an interface's name or one of its addresses"
        )
    if address.is_link_local:
        raise AddressError(
            f"{ip} is a link-local address: it reaches only the hosts on its own network segment, never the "
            "internet (the interface has no address from a router or DHCP yet); give the interface's name to "
            "use its routable addresses as they come"
        )


def _validate_bindable(ip: str) -> None:
    """Raise AddressError unless ``ip`` can be a source address here."""
    _validate_link_address(ip)
    with socket.socket(_family_of(ip), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError as error:
            raise AddressError(f"{ip} is not an address of this machine ({_describe(error)})") from None


class _InterfaceTable:
    """The interfaces, read once when first needed while links are resolved."""

    def __init__(self) -> None:
        self._found: list[Interface] | None = None

    def read(self, *, required: bool) -> list[Interface]:
        """Every interface; none without ifaddr unless ``required``."""
        if self._found is None:
            try:
                self._found = _interfaces()
            except AddressError:
                if required:
                    raise
                return []  # without ifaddr, IP addresses are bound as sources only
        return self._found


def _require_interface(text: str, interfaces: _InterfaceTable) -> Interface:
    """The interface ``text`` names; AddressError naming the others if none."""
    known = interfaces.read(required=True)
    interface = find_interface(known, text)
    if interface is None:
        names = ", ".join(sorted(i.name for i in known)) or "none"
        hint = ""
        if sys.platform == "win32":
            hint = "; an adapter without an address yet goes by its description until it has one"
        raise AddressError(f"{text!r} is neither an IP address nor an interface (interfaces: {names}){hint}")
    return interface


def _no_password(proxy: ProxyURL) -> AddressError:
    return AddressError(
        f"{proxy.name!r}: no password for {proxy.user!r}: give it in the URL or in --upstream-auth-file"
    )


def _resolve_proxy(
    parsed: AddressSpec, proxy: ProxyURL, interfaces: _InterfaceTable, passwords: Mapping[str, str]
) -> Link:
    """The link of an upstream proxy: its password from ``passwords`` (by
    user) where the URL gives none, the link it is reached by looked up."""
    if proxy.wants_password:
        password = passwords.get(proxy.user or "")
        if password is None:
            raise _no_password(proxy)
        proxy = dataclasses.replace(proxy, password=password)
    source = None
    interface = None
    if proxy.bonded:
        proxy = dataclasses.replace(proxy, bond=tuple(_require_interface(name, interfaces).name for name in proxy.bond))
    elif proxy.via is not None and _is_ip(proxy.via):
        ip = str(ipaddress.ip_address(proxy.via))
        _validate_bindable(ip)
        source = LocalAddress(ip, 1, _interface_of(ip, interfaces.read(required=False)))
        interface = source.interface
    elif proxy.via is not None:
        interface = _require_interface(proxy.via, interfaces).name
    address = ProxyAddress(parsed.weight or 1, interface, proxy=proxy, source=source)
    return Link.of_address(address, weighted=parsed.weight is not None, backup=parsed.backup)


def _resolve_link(spec: str | LocalAddress, interfaces: _InterfaceTable, passwords: Mapping[str, str]) -> Link:
    """The link of one ADDRESS text or LocalAddress."""
    if isinstance(spec, LocalAddress):
        _validate_bindable(spec.ip)
        if spec.interface is None:
            spec.interface = _interface_of(spec.ip, interfaces.read(required=False))
        return Link.of_address(spec, weighted=spec.weight != 1, backup=spec.backup)
    parsed = parse_address(spec)
    if parsed.proxy is not None:
        return _resolve_proxy(parsed, parsed.proxy, interfaces, passwords)
    weight, weighted = parsed.weight or 1, parsed.weight is not None
    if _is_ip(parsed.address):
        ip = str(ipaddress.ip_address(parsed.address))
        _validate_bindable(ip)
        local = LocalAddress(ip, weight, _interface_of(ip, interfaces.read(required=False)))
        return Link.of_address(local, weighted=weighted, backup=parsed.backup)
    interface = _require_interface(parsed.address, interfaces)
    addresses = [ipaddress.ip_address(ip) for ip in interface.ips]
    if addresses and all(a.is_loopback and not _is_usable_address(a) for a in addresses):
        raise AddressError(
            f"{parsed.address!r} is the loopback interface: its addresses reach only this machine; "
            "name a link to the network (127.0.0.1, as an address, is taken to test with)"
        )
    ips = _with_usable_addresses(interface).ips
    return Link.of_interface(interface.name, weight, ips, weighted=weighted, backup=parsed.backup)


def resolve_links(specs: Iterable[str | LocalAddress] | None, passwords: Mapping[str, str] | None = None) -> list[Link]:
    """Turn ADDRESS texts (or LocalAddress objects) into links.

    An interface name becomes a link that follows the interface's usable
    addresses; it may have none for now (it waits for one). An IP address
    is looked up among the interfaces (with ifaddr, if installed) so that its
    connections can be bound to its device. A proxy's URL becomes a link of
    its own; ``passwords`` (by user name) are for the URLs that give a user
    but no password. None or an empty list means every interface with a
    usable address now. Raises AddressError.
    """
    specs = list(specs or [])
    if not specs:
        every = [Link.of_interface(i.name, 1, i.ips) for i in usable_interfaces() if i.ips]
        if not every:
            raise AddressError("no usable address on any interface; name one")
        return every
    interfaces = _InterfaceTable()
    links = [_resolve_link(spec, interfaces, passwords or {}) for spec in specs]
    given: dict[str, str] = {}
    for spec, link in zip(specs, links):
        text = spec.ip if isinstance(spec, LocalAddress) else hide_password(spec)
        for address in link.current:
            if address.ip in given:
                raise AddressError(
                    f"{given[address.ip]!r} and {text!r} both give {address.ip}: name each link once, "
                    "by its interface or by its address"
                )
            given[address.ip] = text
    return links


InterfaceReader = Callable[[], Iterable[Interface]]


class LinkSet:
    """The links connections are dispatched over, and the addresses they
    hold now.

    ``refresh()`` reads the interfaces again (``interface_reader`` returns
    each with its usable addresses: usable_interfaces unless a test passes
    its own) and gives each interface link what it holds now.
    """

    def __init__(self, links: Sequence[Link], interface_reader: InterfaceReader | None = None) -> None:
        self.links = list(links)
        self._interface_reader = interface_reader or usable_interfaces
        self.follows_interfaces = any(link.is_interface for link in self.links)
        if not self.follows_interfaces and not self.addresses:
            raise AddressError("no local address to dispatch to")

    @property
    def addresses(self) -> list[LocalAddress]:
        """The addresses connections are dispatched to now, each once."""
        return self._unique(address for link in self.links for address in link.current)

    def known_addresses(self) -> list[LocalAddress]:
        """Every address any link has had, each once."""
        return self._unique(address for link in self.links for address in link.known.values())

    @staticmethod
    def _unique(addresses: Iterable[LocalAddress]) -> list[LocalAddress]:
        seen: dict[str, LocalAddress] = {}
        for address in addresses:
            seen.setdefault(address.ip, address)
        return list(seen.values())

    def link_of(self, address: LocalAddress) -> Link | None:
        """The link that holds or held ``address``."""
        return next((link for link in self.links if link.known.get(address.ip) is address), None)

    def drop_gone(self, in_use: Callable[[LocalAddress], bool]) -> list[LocalAddress]:
        """Forget the addresses gone long enough (Link.drop_gone); return them."""
        dropped = [address for link in self.links for address in link.drop_gone(in_use)]
        for address in dropped:
            logger.debug("forgetting %s: gone a while, and nothing open through it", address.describe())
        return dropped

    def refresh(self) -> bool:
        """Read the interfaces and follow them; return whether any address changed."""
        if not self.follows_interfaces:
            return False
        try:
            found = list(self._interface_reader())
        except (OSError, AddressError) as error:
            logger.debug("cannot read the interfaces: %s", error)
            return False
        changed = False
        for link in self.links:
            if link.is_interface:
                interface = find_interface(found, link.name)
                changed |= self._follow(link, list(interface.ips) if interface else [])
        return changed

    @staticmethod
    def _follow(link: Link, ips: list[str]) -> bool:
        had = [address.ip for address in link.current]
        first = not link.known
        if not link.follow(ips):
            return False
        if not ips:
            logger.warning("%s has no usable address for now: skipped", link.name)
        elif first:
            logger.info("%s came up: %s", link.name, ", ".join(ips))
        elif not had:
            logger.info("%s is back: %s", link.name, ", ".join(ips))
        else:
            logger.info("%s now has %s (had %s)", link.name, ", ".join(ips), ", ".join(had))
        return True


# ---------------------------------------------------------------------------
# Health: failures, retests, checks; what is up and why not
# ---------------------------------------------------------------------------

DEFAULT_COOLDOWN = 30.0  # the longest wait between two retests of a link that failed
RETEST_FIRST = 1.0  # seconds from a failure to its first retest; doubles while it fails
DEFAULT_CHECK_INTERVAL = 10.0
CHECK_FAILURES_OUT = 3  # checks failed in a row that put a link out
CHECK_SUCCESSES_BACK = 2  # and passed in a row that bring it back

RETEST_POLL_INTERVAL = 0.25  # how often due retests are looked for
# Targets reached lately (by any link) that retests may try: one site that
# never answers through a link must not keep it out while it reaches others.
RECENT_TARGETS = 8
# A retest waits a few times what the connect that reached its target took
# through another link, at least RETEST_TIME_FLOOR seconds, and twice as long
# after each failed retest (up to the connect timeout): a site silent through
# one link costs its retest about what the site costs the other links, while
# a link that is only slower still gets the time it needs.
RETEST_TIME_FACTOR = 4
RETEST_TIME_FLOOR = 1.0

Target = tuple[str, int]  # (ip, port); a check's may be (name, port)
# What an address is, as stats() tells it: "up"; "down" while it is out after
# a failure of its link; "standby" for a backup while a primary is up; "gone"
# once its interface no longer holds it; "waiting" for an interface that has
# had no address yet. Health itself says "up" or "down".
LinkState = Literal["up", "down", "gone", "standby", "waiting"]
_HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_check_target(text: str) -> Target:
    """Split ``IP:PORT`` (``[IPv6]:PORT``) or ``NAME:PORT`` into (host,
    port); ValueError if malformed.

    A name is looked up through each link checked, each time.
    """
    try:
        host, port = _split_host_port(text, None)
    except ValueError:
        raise ValueError(
            f"{text!r}: a check target is IP:PORT or NAME:PORT, as 192.0.2.1:443 or [2001:db8::1]:443"
        ) from None
    if not _is_ip(host):
        labels = host.lower().removesuffix(".").split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"{text!r}: a check target is an IP address or a host name, and a port")
        return host.lower().rstrip("."), port
    return str(ipaddress.ip_address(host)), port


@dataclasses.dataclass(frozen=True)
class Retest:
    """A retest to run: a connect from ``address`` to ``target``, given up
    after ``timeout`` seconds (inf: no sooner than the connect timeout)."""

    address: LocalAddress
    target: Target
    timeout: float


@dataclasses.dataclass
class _Outage:
    """Why an address is out, and how it is tried again.

    An outage from a failed connect is retested at ``retest_at``, against
    ``target`` (what another link reached where this one failed, in
    ``took`` seconds if known) and the other targets known, each once a
    round (``tried``; ``testing``: the one under way); ``fresh``: a target
    was reached by another link since the last retest was handed out. One
    from failed checks has no target: passing checks end it."""

    reason: str
    target: Target | None
    retest_at: float = math.inf
    took: float | None = None
    delay: float = RETEST_FIRST
    failed_retests: int = 0
    tried: set[Target] = dataclasses.field(default_factory=set)
    testing: Target | None = None
    fresh: bool = False


@dataclasses.dataclass
class _CheckRecord:
    """The checks of one address: how many failed or passed in a row."""

    failed: int = 0
    passed: int = 0


def _can_ask_for(address: LocalAddress, host: str) -> bool:
    """Whether a connection from ``address`` can be asked for ``host``: an
    IP address of a family it serves, or a name where it takes names."""
    return (_family_of(host) if _is_ip(host) else socket.AF_UNSPEC) in address.serves


class Health:
    """Which local addresses are out after a failure of their link, and why;
    nobody waits to learn that a link is dark.

    A link whose connect failed where another link then got through is out:
    new connections avoid it. It is retested in the background, never by a
    client's connection: ``due_retests()`` hands out what to try through
    that link RETEST_FIRST seconds after the failure, then twice as long
    after each failed retest, at most ``cooldown`` apart; the first retest
    that gets through brings it back. Each round of retests tries the
    targets any link reached lately (the latest first), the last one the
    link itself reached, the ``check_targets``, and last the target another
    link reached where it failed; a site that never answers through one link
    (it blocks that provider) cannot keep the link out while it reaches the
    others. A target newly reached by another link is tried within
    RETEST_FIRST seconds, whatever the wait has grown to, and a retest gives
    up in about the time that target took the other links (RETEST_TIME_FACTOR).
    With checks (``check_round()``), a link that fails CHECK_FAILURES_OUT in a
    row is out until it passes CHECK_SUCCESSES_BACK in a row. ``clock``
    tells monotonic seconds; tests may pass their own.
    """

    def __init__(
        self,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
        check_targets: Sequence[Target] = (),
    ) -> None:
        self.cooldown = cooldown
        self.clock = clock
        self.check_targets = list(check_targets)
        self._lock = threading.Lock()
        self._outages: dict[LocalAddress, _Outage] = {}
        # Written without the lock on every connect (one assignment: atomic),
        # read under it when retests are handed out.
        self._reached: dict[LocalAddress, Target] = {}  # the last target each address reached
        # The targets reached lately, the oldest first, with the seconds the
        # connect that reached each took (None: not known); under the lock.
        self._recent: dict[Target, float | None] = {}
        self._checks: dict[LocalAddress, _CheckRecord] = {}
        self._all_failed_told = False

    def is_out(self, address: LocalAddress) -> bool:
        """Whether ``address`` is out."""
        return address in self._outages

    def forget(self, address: LocalAddress) -> None:
        """Forget ``address`` (gone for good): no more retests or checks of it."""
        with self._lock:
            self._outages.pop(address, None)
            self._checks.pop(address, None)
            self._reached.pop(address, None)

    def connected_through(
        self,
        address: LocalAddress,
        failed: Sequence[tuple[LocalAddress, OSError]] = (),
        target: Target | None = None,
        took: float | None = None,
    ) -> None:
        """Record that a connect through ``address`` got an answer (the
        target's, or its refusal) at ``target``, in ``took`` seconds if
        known, where the ``failed`` addresses could not: they are out, to be
        retested against it."""
        if target is not None and self._reached.get(address) != target:
            self._reached[address] = target
        # The usual case, a target known and no failure, takes no lock (a
        # look-up in a dict is atomic).
        if target is not None and target not in self._recent:
            self._note_reached(target, took)
        if not failed:
            return
        with self._lock:
            for down, error in failed:
                if down is not address:
                    self._put_out(down, _describe(error), target, took)

    def _note_reached(self, target: Target, took: float | None) -> None:
        """Keep ``target`` among the recent ones, and bring forward the
        retests of the outages that may try it: it is news about them."""
        with self._lock:
            if target in self._recent:
                return
            if len(self._recent) >= RECENT_TARGETS:
                del self._recent[next(iter(self._recent))]
            self._recent[target] = took
            soon = self.clock() + RETEST_FIRST
            for address, outage in self._outages.items():
                if outage.target is None or target in outage.tried or not _can_ask_for(address, target[0]):
                    continue
                outage.fresh = True
                if outage.retest_at != math.inf:  # else under way: the result brings the next one forward
                    outage.retest_at = min(outage.retest_at, soon)

    def sit_out(self, address: LocalAddress, error: OSError, target: Target | None = None) -> None:
        """Put ``address`` out after a failure that came after its connect
        (an upstream proxy refusing a request it was sent), to be retested
        against ``target``; None where the failure had no target (an
        upstream proxy's UDP association): a target reached lately, else
        the proxy's own port."""
        with self._lock:
            if target is None:
                latest = next(reversed(self._recent), None)
                own = (address.proxy.host, address.proxy.port) if isinstance(address, ProxyAddress) else None
                target = latest or next(iter(self.check_targets), own)
            self._put_out(address, _describe(error), target)

    def _put_out(self, address: LocalAddress, reason: str, target: Target | None, took: float | None = None) -> None:
        if address in self._outages:
            return
        retest_at = self.clock() + RETEST_FIRST if target else math.inf
        self._outages[address] = _Outage(reason, target, retest_at, took)
        again = f"retested in {RETEST_FIRST:g} s" if target else f"back after {CHECK_SUCCESSES_BACK} checks pass"
        logger.warning("sitting out: %s: %s; %s", address.describe(), reason, again)

    def due_retests(self) -> list[Retest]:
        """The retests to run now; each is handed out once, until its
        result comes back."""
        now = self.clock()
        with self._lock:
            due = []
            for address, outage in self._outages.items():
                if outage.target is not None and outage.retest_at <= now:
                    outage.retest_at = math.inf  # under way
                    outage.fresh = False
                    target = self._retest_target(address, outage, outage.target)
                    outage.testing = target
                    due.append(Retest(address, target, self._retest_timeout(outage, target)))
            return due

    def _retest_target(self, address: LocalAddress, outage: _Outage, failed_at: Target) -> Target:
        """The target of the next retest: the first of those it could reach
        (in the class's order, of its family) not tried yet this round."""
        others = dict.fromkeys([*reversed(self._recent), self._reached.get(address), *self.check_targets])
        targets = [
            *(t for t in others if t is not None and t != failed_at and _can_ask_for(address, t[0])),
            failed_at,
        ]
        untried = [target for target in targets if target not in outage.tried]
        if not untried:  # a new round
            outage.tried.clear()
            untried = targets
        outage.tried.add(untried[0])
        return untried[0]

    def _retest_timeout(self, outage: _Outage, target: Target) -> float:
        """Seconds the retest of ``target`` may take: a few times what the
        connect that reached it took, longer after each failed retest."""
        took = self._recent.get(target, outage.took if target == outage.target else None)
        if took is None:
            return math.inf
        return max(RETEST_TIME_FLOOR, RETEST_TIME_FACTOR * took) * 2.0 ** min(outage.failed_retests, 16)

    def retest_result(self, address: LocalAddress, error: OSError | None) -> None:
        """The outcome of a retest of ``address``: None if it got through."""
        with self._lock:
            outage = self._outages.get(address)
            if outage is None or outage.target is None:
                return
            if error is None:
                del self._outages[address]
                reached = _format_endpoint(*(outage.testing or outage.target))
                logger.info("back in use: %s (a retest reached %s)", address.describe(), reached)
                return
            outage.failed_retests += 1
            outage.delay = min(outage.delay * 2, max(self.cooldown, RETEST_FIRST))
            wait = RETEST_FIRST if outage.fresh else outage.delay
            outage.retest_at = self.clock() + wait
            outage.reason = _describe(error)
            logger.debug("retest of %s failed: %s; again in %g s", address.describe(), outage.reason, wait)

    def check_round(self, results: Mapping[LocalAddress, OSError | None], target: str) -> None:
        """Take a round of checks: for each address, None if it reached a
        check target, else the error.

        When every address failed, the check target is taken to be down
        rather than every link: they keep their state, and the log says so
        once."""
        with self._lock:
            if results and all(error is not None for error in results.values()):
                if not self._all_failed_told:
                    self._all_failed_told = True
                    logger.warning(
                        "every link failed its check of %s: the check target seems down; "
                        "the links keep their last state",
                        target,
                    )
                return
            if self._all_failed_told:
                self._all_failed_told = False
                logger.info("a link passed its check of %s again", target)
            for address, error in results.items():
                self._take_check(address, error, target)

    def _take_check(self, address: LocalAddress, error: OSError | None, target: str) -> None:
        record = self._checks.setdefault(address, _CheckRecord())
        if error is None:
            record.failed, record.passed = 0, record.passed + 1
            outage = self._outages.get(address)
            if outage is not None and record.passed >= CHECK_SUCCESSES_BACK:
                del self._outages[address]
                logger.info("back in use: %s (passed %d checks of %s)", address.describe(), record.passed, target)
            return
        record.failed, record.passed = record.failed + 1, 0
        if record.failed >= CHECK_FAILURES_OUT:
            self._put_out(address, f"failed {record.failed} checks of {target}: {_describe(error)}", None)

    def state(self, address: LocalAddress) -> tuple[LinkState, str | None]:
        """("up", None), or ("down", why) while ``address`` is out."""
        outage = self._outages.get(address)
        if outage is None:
            return "up", None
        if outage.target is None:
            return "down", outage.reason
        if outage.retest_at == math.inf:
            return "down", f"{outage.reason}; retesting now"
        return "down", f"{outage.reason}; retested in {max(0, math.ceil(outage.retest_at - self.clock()))} s"


# ---------------------------------------------------------------------------
# Choice: which local address a new connection gets
# ---------------------------------------------------------------------------

T = TypeVar("T")
K = TypeVar("K")


class WeightedRoundRobin(Generic[T]):
    """Smooth weighted round robin (as in nginx) over a fixed list of items.

    Over every run of sum(weights) consecutive calls to ``next()``, each item
    is returned exactly its weight times, spread out rather than in runs:
    weights 7 and 3 give A B A A A B A A B A, then the same again.
    Not thread safe: callers hold a lock.
    """

    def __init__(self, items: Sequence[T], weights: Sequence[int]) -> None:
        if len(items) != len(weights) or not items:
            raise ValueError("one positive weight per item, at least one item")
        if any(weight < 1 for weight in weights):
            raise ValueError("weights must be positive")
        self.items = list(items)
        self.weights = list(weights)
        self._current = [0] * len(items)
        self._total = sum(weights)

    @property
    def period(self) -> int:
        """How many calls make one full turn; after it, the state is as before."""
        return self._total

    def next(self) -> T:
        """The item whose turn it is: each comes up as often as its weight
        says, the turns spread out (nginx's smooth weighted round robin)."""
        best = 0
        for index, weight in enumerate(self.weights):
            self._current[index] += weight
            if self._current[index] > self._current[best]:
                best = index
        self._current[best] -= self._total
        return self.items[best]


class MeasuredChoice(Generic[T]):
    """Weighted least connections, with measured capacities as the weights.

    ``choose()`` returns the candidate with the smallest (open + 1) / capacity:
    the one that, given the new connection, has the least work queued per
    byte per second it can carry. For equal downloads started together this
    is the greedy rule that ends the last of them soonest (each goes where it
    would finish first): 24 over 1200/1200/400 kB/s gives 11/10/3.

    A capacity never measured counts as the best measured one (1 when none
    is): a new link gets a full share at once, and is measured under load.
    No link counts as less than PROBE_FLOOR of the best, so one whose figure
    is too low (it carried only light traffic) still gets connections under
    load, which measure it again. Capacities within SAME_WITHIN of a higher
    one count as that one, so links alike but measured a few per cent apart
    take turns. Ties go to the first tied candidate at or after a cursor that
    moves past each choice: with equal state, N choices over N candidates
    visit each once. Not thread safe: callers hold a lock.
    """

    PROBE_FLOOR = 0.1
    SAME_WITHIN = 0.1

    def __init__(self) -> None:
        self._cursor = 0

    def choose(
        self, candidates: Sequence[T], open_count: Callable[[T], int], capacity: Callable[[T], float | None]
    ) -> T:
        """The candidate for a new connection; ValueError if there is none."""
        if not candidates:
            raise ValueError("no candidate to choose from")
        if len(candidates) == 1:
            return candidates[0]
        capacities = self._assumed([capacity(candidate) for candidate in candidates])
        # Equal ratios of equal inputs are equal floats: == finds the ties.
        loads = [(open_count(candidate) + 1) / assumed for candidate, assumed in zip(candidates, capacities)]
        least = min(loads)
        start = self._cursor % len(candidates)
        index = next(i % len(loads) for i in range(start, start + len(loads)) if loads[i % len(loads)] == least)
        self._cursor = index + 1
        return candidates[index]

    @classmethod
    def _assumed(cls, measured: Sequence[float | None]) -> list[float]:
        """The capacities the choice works with (see the class's docstring)."""
        known = [capacity for capacity in measured if capacity is not None and capacity > 0]
        if not known:
            return [1.0] * len(measured)
        best = max(known)
        assumed = [
            best if capacity is None or capacity <= 0 else max(capacity, best * cls.PROBE_FLOOR)
            for capacity in measured
        ]
        heads: list[float] = []
        for capacity in sorted(set(assumed), reverse=True):
            if not heads or capacity < heads[-1] * (1 - cls.SAME_WITHIN):
                heads.append(capacity)
        # A capacity counts as the lowest head not below it: the group it fell in.
        return [min(head for head in heads if head >= capacity) for capacity in assumed]


# Public suffixes of more than one label that the generic rule below misses:
# a compact stand-in for the Public Suffix List, with the suffixes that hold
# most of the sites people open (country second levels, and hosting domains
# where every customer is a site of its own).
MULTI_LABEL_SUFFIXES = frozenset(
    {
        "me.uk",
        "ltd.uk",
        "plc.uk",
        "nhs.uk",
        "sch.uk",
        "police.uk",
        "id.au",
        "asn.au",
        "govt.nz",
        "school.nz",
        "geek.nz",
        "kiwi.nz",
        "ad.jp",
        "ed.jp",
        "gr.jp",
        "lg.jp",
        "gen.in",
        "firm.in",
        "ind.in",
        "nic.in",
        "res.in",
        "re.kr",
        "pe.kr",
        "mil.kr",
        "muni.il",
        "idf.il",
        "web.id",
        "sch.id",
        "my.id",
        "in.th",
        "mi.th",
        "gv.at",
        "github.io",
        "gitlab.io",
        "githubusercontent.com",
        "readthedocs.io",
        "blogspot.com",
        "appspot.com",
        "firebaseapp.com",
        "web.app",
        "herokuapp.com",
        "cloudfront.net",
        "s3.amazonaws.com",
        "elasticbeanstalk.com",
        "azurewebsites.net",
        "cloudapp.net",
        "azureedge.net",
        "trafficmanager.net",
        "netlify.app",
        "vercel.app",
        "pages.dev",
        "workers.dev",
        "fly.dev",
        "onrender.com",
        "glitch.me",
        "repl.co",
        "ngrok.io",
        "duckdns.org",
        "dyndns.org",
        "no-ip.org",
    }
)
# The generic rule: a two-letter country code under one of these is a public
# suffix (co.uk, com.au, ne.jp, or.at, go.kr, ac.za, edu.pl, gov.br ...).
GENERIC_SECOND_LEVELS = frozenset({"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go"})
_LONGEST_SUFFIX = max(suffix.count(".") + 1 for suffix in MULTI_LABEL_SUFFIXES)


def registrable_domain(host: str) -> str:
    """The site ``host`` belongs to: its registrable domain, lower case.

    www.example.co.uk and api.example.co.uk are both example.co.uk;
    a.user.github.io is user.github.io. An IP address is its own site; a
    name that is itself a public suffix, or has one label, stands for itself.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if _is_ip(name):
        return ipaddress.ip_address(name).compressed
    labels = name.split(".")
    for size in range(min(_LONGEST_SUFFIX, len(labels) - 1), 1, -1):
        suffix = labels[-size:]
        generic = size == 2 and len(suffix[1]) == 2 and suffix[1].isalpha() and suffix[0] in GENERIC_SECOND_LEVELS
        if generic or ".".join(suffix) in MULTI_LABEL_SUFFIXES:
            return ".".join(labels[-size - 1 :])
    return ".".join(labels[-2:])


class StickyTable(Generic[K]):
    """Which link each (client, site) went through, for ``seconds`` after last use.

    A site's servers often tie a login to the address they saw, so its
    connections keep leaving from one link. At most ``max_entries`` are kept,
    the least recently used dropped first: memory stays flat under a flood
    of names. Thread safe.
    """

    def __init__(self, seconds: float, max_entries: int = 4096) -> None:
        if seconds <= 0 or max_entries < 1:
            raise ValueError("seconds and max_entries must be positive")
        self.seconds = seconds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        # (client, site) -> (link, last use); least recently used first.
        self._entries: collections.OrderedDict[tuple[str, str], tuple[K, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, client: str, site: str, now: float) -> K | None:
        """The link ``client`` last used for ``site``, unless expired; a find is a use."""
        with self._lock:
            entry = self._entries.get((client, site))
            if entry is None:
                return None
            if now - entry[1] > self.seconds:
                del self._entries[client, site]
                return None
            self._entries[client, site] = (entry[0], now)
            self._entries.move_to_end((client, site))
            return entry[0]

    def put(self, client: str, site: str, key: K, now: float) -> None:
        """Record that ``client`` reaches ``site`` through link ``key``."""
        with self._lock:
            self._entries[client, site] = (key, now)
            self._entries.move_to_end((client, site))
            # Least recently used first: the expired ones, then the overflow.
            while self._entries:
                oldest_use = next(iter(self._entries.values()))[1]
                if now - oldest_use <= self.seconds and len(self._entries) <= self.max_entries:
                    break
                self._entries.popitem(last=False)


class Balance(enum.Enum):
    """How the balancer chooses."""

    MEASURED = "measured"  # least open work for the measured capacity
    ROUND_ROBIN = "round-robin"  # weighted round robin, weight 1 where none is given


# A Balance by its value, as the status tells it.
BalanceName = Literal["measured", "round-robin"]


@dataclasses.dataclass(frozen=True)
class Affinity:
    """Who asks for a connection to what: a client and the site of its
    target, for sticky sites."""

    client: str
    site: str


# Why a link takes fewer new connections than its health allows: "spent"
# (its data cap is reached: it serves only while no other link is up) or
# "barred" (it takes none: paused, closed, or its cap reached with
# --cap-action stop). None: it is held back by nothing.
Hold = Literal["spent", "barred"]


class Balancer:
    """Chooses the local address of each new connection, per address family.

    Addresses that are out (see Health) are skipped while others are left;
    backup addresses are used only while no primary one of the family is up.
    ``held`` tells the addresses held back apart from their health (see
    Hold): a "spent" one is used only while no other of the family is up, a
    "barred" one never; ``weight`` is each address's weight in turns (its
    own, unless changed while running: then ``rebuild()``).
    Among the rest, ``Balance.ROUND_ROBIN`` takes turns by weight, and
    ``Balance.MEASURED`` gives the connection to the address with the least
    open work for its ``capacity`` (bytes per second, None while unknown).
    With a ``sticky`` table, a client's connections to one site keep the
    address the site had while it can take them.

    Each address handed out counts as taken until ``release()``: open work
    is counted from the moment of the choice, so a burst of connections
    chosen at once spreads. Holds its lock for the choice alone.
    """

    def __init__(
        self,
        addresses: Sequence[LocalAddress],
        health: Health,
        *,
        balance: Balance = Balance.ROUND_ROBIN,
        capacity: Callable[[LocalAddress], float | None] = lambda address: None,
        sticky: StickyTable[LocalAddress] | None = None,
        held: Callable[[LocalAddress], Hold | None] = lambda address: None,
        weight: Callable[[LocalAddress], int] = lambda address: address.weight,
    ) -> None:
        self.health = health
        self.balance = balance
        self.held = held
        self.weight = weight
        self.capacity = capacity
        self.sticky = sticky
        self._lock = threading.Lock()
        self._taken: collections.Counter[LocalAddress] = collections.Counter()
        self._rounds: dict[tuple[socket.AddressFamily, bool], WeightedRoundRobin[LocalAddress]] = {}
        self._measured: dict[socket.AddressFamily, MeasuredChoice[LocalAddress]] = {}
        self._resolving = True
        self.rebuild(addresses)

    def rebuild(self, addresses: Sequence[LocalAddress]) -> None:
        """Choose from ``addresses`` from now on."""
        rounds = {}
        # AF_UNSPEC: the links given a target by name (upstream proxies that
        # take names), for a name that is not resolved here.
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNSPEC):
            for backup in (False, True):
                pool = [a for a in addresses if family in a.serves and a.backup == backup]
                if pool:
                    rounds[family, backup] = WeightedRoundRobin(pool, [self.weight(a) for a in pool])
        # Every connection asks for these: they are worked out here, once.
        families = frozenset(family for family, _ in rounds if family != socket.AF_UNSPEC)
        passes_names = any(family == socket.AF_UNSPEC for family, _ in rounds)
        with self._lock:
            self._rounds = rounds
            self._measured = {family: MeasuredChoice() for family, _ in rounds}
            self._resolving = any(socket.AF_UNSPEC not in a.serves for a in addresses)
            self._families, self._passes_names = families, passes_names

    @property
    def families(self) -> frozenset[socket.AddressFamily]:
        """The address families there are local addresses (or proxies) for."""
        return self._families

    @property
    def passes_names(self) -> bool:
        """Whether some link is given target names as they are (an upstream proxy)."""
        return self._passes_names

    @property
    def resolves_names(self) -> bool:
        """Whether some link needs a target's address, resolved here."""
        return self._resolving

    def taken(self, address: LocalAddress) -> int:
        """How many connections hold ``address`` now (connecting or open)."""
        return self._taken[address]

    def release(self, address: LocalAddress) -> None:
        """A connection given ``address`` has ended (or failed to connect)."""
        with self._lock:
            self._taken[address] -= 1
            if self._taken[address] <= 0:
                del self._taken[address]

    def next(self, family: socket.AddressFamily, affinity: Affinity | None = None) -> LocalAddress:
        """The local address for a new connection of ``family``.

        Raises SocksError(ADDRESS_TYPE_NOT_SUPPORTED) if the family has none,
        SocksError(NETWORK_UNREACHABLE) if every one is barred (see Hold).
        """
        chosen = self.choose(family, (), affinity)
        if chosen is None and any(f == family for f, _ in self._rounds):
            raise SocksError(
                Reply.NETWORK_UNREACHABLE, f"every {_family_name(family)} link is paused, closed or past its data cap"
            )
        if chosen is None:
            raise SocksError(
                Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"no {_family_name(family)} local address to dispatch to"
            )
        return chosen

    def choose(
        self,
        family: socket.AddressFamily,
        tried: Collection[LocalAddress] = (),
        affinity: Affinity | None = None,
        *,
        racing: bool = False,
    ) -> LocalAddress | None:
        """The address of ``family`` for a connection, other than the
        ``tried`` ones (it failed through them, or they are still
        connecting); None when no other is left. The address counts as taken
        until ``release()``. ``racing``: the tried ones are still connecting,
        slowly; another takes their place only if it is up and of the same
        tier (a slow primary is no reason to spend a backup's traffic)."""
        with self._lock:
            if racing:
                tiers = [(tried_address.backup, False, True) for tried_address in tried][:1]
                chosen = self._choose_by_tier(family, tried, affinity, tiers)
            else:
                chosen = self._choose_by_tier(family, tried, affinity)
            if chosen is not None:
                self._taken[chosen] += 1
        return chosen

    def stick(self, affinity: Affinity, address: LocalAddress) -> None:
        """Record that ``affinity``'s connection got through from ``address``."""
        if self.sticky is not None:
            self.sticky.put(affinity.client, affinity.site, address, self.health.clock())

    # The primaries that are up; else the backups that are; else the spent
    # ones that are; else, rather than fail, those that are out, in the same
    # order. (backup, spent, up only)
    _TIERS = (
        (False, False, True),
        (True, False, True),
        (False, True, True),
        (True, True, True),
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (True, True, False),
    )

    def _choose_by_tier(
        self,
        family: socket.AddressFamily,
        tried: Collection[LocalAddress],
        affinity: Affinity | None,
        tiers: Sequence[tuple[bool, bool, bool]] = _TIERS,
    ) -> LocalAddress | None:
        holds: dict[LocalAddress, Hold | None] = {}  # asked once for each address, as a tier needs it
        for backup, spent, up_only in tiers:
            rounds = self._rounds.get((family, backup))
            if rounds is None:
                continue
            hold = "spent" if spent else None
            candidates = []
            for address in rounds.items:
                if address in tried or (up_only and self.health.is_out(address)):
                    continue
                if address not in holds:
                    holds[address] = self.held(address)
                if holds[address] == hold:
                    candidates.append(address)
            if candidates:
                return self._pick(family, rounds, candidates, affinity)
        return None

    def _pick(
        self,
        family: socket.AddressFamily,
        rounds: WeightedRoundRobin[LocalAddress],
        candidates: list[LocalAddress],
        affinity: Affinity | None,
    ) -> LocalAddress:
        if affinity is not None and self.sticky is not None:
            kept = self.sticky.get(affinity.client, affinity.site, self.health.clock())
            if kept in candidates:
                return kept
        if self.balance == Balance.MEASURED:
            return self._measured[family].choose(candidates, self._taken.__getitem__, self.capacity)
        # One full period visits every address; skipping some keeps the
        # others in their weights' proportions.
        for _ in range(rounds.period):
            address = rounds.next()
            if address in candidates:
                return address
        return candidates[0]  # not reached: a full period visits every item


# ---------------------------------------------------------------------------
# Meter: per-address counters, rates and history
# ---------------------------------------------------------------------------

METER_INTERVAL = 2.0  # seconds between two samples of the counters
# Seconds between two looks of the capacity estimator at the counters: a
# burst of a second or two is seen as several ticks.
ESTIMATE_INTERVAL = 0.25
HISTORY_LENGTH = 300  # samples kept: ten minutes


@dataclasses.dataclass
class Counters:
    """What went through one local address."""

    connections: int = 0  # opened in all
    failed: int = 0  # connects through it that failed
    open: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclasses.dataclass(frozen=True)
class Sample:
    """What one address moved between two samples of the meter, and when."""

    up: int
    down: int
    opened: int  # connections
    at: float


@dataclasses.dataclass(frozen=True)
class Reading:
    """Counters and the rates each way (bytes per second) at one moment."""

    counters: Counters
    rate_up: float
    rate_down: float


class Meter:
    """Counts connections and bytes per local address, under a lock of its
    own that is held for a few additions at a time.

    ``sample()`` (every METER_INTERVAL, by the Dispatcher's background task)
    keeps the byte counts of the last HISTORY_LENGTH intervals; rates are
    measured against them. Reading changes nothing, so any number of readers
    see the same rates.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._counters: dict[LocalAddress, Counters] = {}
        self._history: collections.deque[tuple[float, dict[LocalAddress, tuple[int, int]]]] = collections.deque(
            [(clock(), {})], maxlen=HISTORY_LENGTH + 1
        )
        self._connections: dict[LocalAddress, int] = {}  # opened in all, at the last sample

    def _of(self, address: LocalAddress) -> Counters:
        counters = self._counters.get(address)
        if counters is None:
            counters = self._counters[address] = Counters()
        return counters

    def opened(self, address: LocalAddress) -> None:
        """Count a connection opened through ``address``."""
        with self._lock:
            counters = self._counters.get(address) or self._of(address)
            counters.connections += 1
            counters.open += 1

    def closed(self, address: LocalAddress) -> None:
        """Count the end of a connection opened through ``address``."""
        with self._lock:
            (self._counters.get(address) or self._of(address)).open -= 1

    def failed(self, address: LocalAddress) -> None:
        """Count a connect through ``address`` that failed."""
        with self._lock:
            self._of(address).failed += 1

    def add(self, address: LocalAddress, up: int, down: int) -> None:
        """Count bytes relayed through ``address``."""
        with self._lock:
            counters = self._counters.get(address) or self._of(address)
            counters.bytes_up += up
            counters.bytes_down += down

    def sample(self) -> dict[LocalAddress, Sample]:
        """Keep the byte counts of now, for rates and history; return what
        each address moved since the previous sample."""
        with self._lock:
            now = self.clock()
            counts = {address: (c.bytes_up, c.bytes_down) for address, c in self._counters.items()}
            connections = {address: c.connections for address, c in self._counters.items()}
            then, before = self._history[-1]
            opened_before, self._connections = self._connections, connections
            self._history.append((now, counts))
        return {
            address: Sample(
                up - before.get(address, (0, 0))[0],
                down - before.get(address, (0, 0))[1],
                connections[address] - opened_before.get(address, 0),
                now,
            )
            for address, (up, down) in counts.items()
        }

    def forget(self, address: LocalAddress) -> Counters:
        """Stop counting ``address`` (gone for good); return its counters.
        Its traffic leaves the history as the samples holding it age out."""
        with self._lock:
            return self._counters.pop(address, None) or Counters()

    def totals(self) -> tuple[float, dict[LocalAddress, tuple[int, int]]]:
        """The time, and the bytes (up, down) each address has moved until
        then; changes nothing. Both are read under the lock: a reader held
        up between the two would take a long interval's bytes for a short
        one's."""
        with self._lock:
            return self.clock(), {address: (c.bytes_up, c.bytes_down) for address, c in self._counters.items()}

    def read(self, address: LocalAddress) -> Reading:
        """The counters of ``address`` and its rates over the last interval or two."""
        with self._lock:
            counters = dataclasses.replace(self._counters.get(address) or Counters())
            now = self.clock()
            # The newest sample at least one interval old: rates of a whole
            # interval, never of a moment.
            then, counts = next(
                (sample for sample in reversed(self._history) if now - sample[0] >= METER_INTERVAL / 2),
                self._history[0],
            )
        up_then, down_then = counts.get(address, (0, 0))
        elapsed = max(now - then, 1e-6)
        return Reading(counters, (counters.bytes_up - up_then) / elapsed, (counters.bytes_down - down_then) / elapsed)

    def history(self, address: LocalAddress) -> tuple[list[float], list[float]]:
        """The rates up and down of ``address`` in each sampled interval, oldest first."""
        with self._lock:
            samples = list(self._history)
        up: list[float] = []
        down: list[float] = []
        for (before, old), (after, new) in zip(samples, samples[1:]):
            elapsed = max(after - before, 1e-6)
            old_up, old_down = old.get(address, (0, 0))
            new_up, new_down = new.get(address, (0, 0))
            up.append((new_up - old_up) / elapsed)
            down.append((new_down - old_down) / elapsed)
        return up, down


@dataclasses.dataclass
class _Tick:
    """What one link moved between two looks of the estimator."""

    moved: int  # bytes, the larger direction
    seconds: float
    open_through: int  # connections open at both of its ends


# Where a capacity comes from: measured in this run, remembered from an
# earlier one (the state file), or not measured at all.
CapacitySource = Literal["measured", "remembered", "not measured"]


class _LinkFigure:
    """The estimator's state for one link (see CapacityEstimator)."""

    def __init__(self) -> None:
        self.last_at: float | None = None  # time of the last sample
        self.run: collections.deque[_Tick] = collections.deque()  # the current run of loaded ticks
        self.run_moved, self.run_seconds = 0, 0.0  # what the run moved after its first tick, and in how long
        self.run_fresh = False  # the run's connections opened just before it: nothing waited
        self.run_measured = False  # the run has made a measurement
        self.opened_before_run = False  # the last tick that was no run's began with nothing open
        self.evidence_time = 0.0  # seconds of traffic the evidence so far covers
        # (evidence time, rate), of the last KEEP_SPAN of evidence time
        self.evidence: collections.deque[tuple[float, float]] = collections.deque()
        self.figure: float | None = None
        self.remembered = False  # the figure came from the state file and was not measured since
        self.measured_at: float | None = None
        self.logged: float | None = None  # the figure the log told last


class CapacityEstimator:
    """Estimates what each link can carry (bytes per second) from what it
    delivered while it was the bottleneck.

    The Dispatcher's sampler calls ``add()`` for every address every
    ESTIMATE_INTERVAL with what it moved since and the connections open
    through it. Ticks of traffic make runs. A run that began with new
    connections raises a link's figure at once (what a link delivered, it
    can carry); lowering it takes *measurements*, median rates over a second
    of a run with connections open, followed over a few seconds of traffic.
    A figure remembered from the state file stands until the link is
    measured, and ``to_keep()`` is the steadier figure to remember.
    ``estimate()`` is None until a link's first figure. Thread safe.
    """

    MIN_RATE = 32_000.0  # bytes per second (256 kbit/s): less is a trickle
    MAX_TICK = 1.0  # seconds; a longer tick is a gap in the samples, not traffic
    RISE_SPAN = 0.5  # seconds of a run (after its first tick) whose rate may raise a figure
    SPAN = 1.0  # seconds of a run's inside that make one measurement
    FOLLOW_SPAN = 3.0  # seconds of measured traffic whose median measurement is the figure
    KEEP_SPAN = 10.0  # seconds of measured traffic whose median measurement is kept for the next run
    REPLACE_SPAN = 1.0  # seconds of measurements that replace a remembered figure
    FASTER_BY = 0.25  # of the figure: a fresh run this much faster shows a link that got faster
    SMALL_SHARE = 0.125  # of the figure: below it, one connection's pace is the application's

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[LocalAddress, _LinkFigure] = {}

    def _of(self, address: LocalAddress) -> _LinkFigure:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _LinkFigure()
        return link

    def add(self, address: LocalAddress, sample: Sample, open_before: int, open_after: int) -> None:
        """Take one sample of ``address``: what it moved since its previous
        sample, with ``open_before`` connections open through it at the
        previous sample and ``open_after`` now."""
        open_through = min(open_before, open_after)
        # A tick is loaded when the link moved at least MIN_RATE in it (the
        # larger direction) with a connection open at one of its ends; a run
        # of loaded ticks is traffic, and any other tick ends the run. So a
        # trickle (a chat, a keep-alive), the quiet end of a burst and idle
        # time are never evidence; nor is a tick longer than MAX_TICK (the
        # clock jumped, the sampler was held up) or a clock that went back.
        with self._lock:
            link = self._of(address)
            last, link.last_at = link.last_at, sample.at
            if last is None:
                return
            seconds, moved = sample.at - last, max(sample.up, sample.down)
            loaded = (
                0 < seconds <= self.MAX_TICK and moved >= self.MIN_RATE * seconds and max(open_before, open_after) > 0
            )
            if not loaded:
                link.run.clear()
                link.run_moved, link.run_seconds = 0, 0.0
                link.opened_before_run = open_before == 0
                return
            if link.run:
                link.run_moved, link.run_seconds = link.run_moved + moved, link.run_seconds + seconds
            else:
                link.run_fresh = open_before == 0 or link.opened_before_run
                link.run_measured = False
            link.run.append(_Tick(moved, seconds, open_through))
            self._rise(link, sample.at)
            self._measure(link, sample.at)
            self._log_change(address, link)

    @staticmethod
    def _typical(ticks: Sequence[_Tick]) -> float:
        """The median of the ticks' rates: one tick the relay fell behind in,
        and the next that caught up, count for nothing."""
        # When the relay falls behind (a busy machine, a client that reads
        # slowly), the link's bytes wait in the kernel and pass in the next
        # tick, which alone reads as a faster link: a rate is never one tick's.
        rates = sorted(tick.moved / tick.seconds for tick in ticks)
        middle = len(rates) // 2
        return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2

    def _rise(self, link: _LinkFigure, now: float) -> None:
        # What a link delivers, it can carry: a fresh run raises the figure
        # at once. A run is fresh when its connections opened just before it
        # (none open before its first tick, or before the quiet tick they
        # opened in): nothing waited before it, so bytes the relay or the
        # kernel catch up on were delivered within it, and its rate so far
        # never reads high. A run that began with connections open (after a
        # stall, when the bytes the kernel held pass at once) may read high,
        # and once a run is measured its rate so far may be of a link that
        # got slower in it: those raise the figure by measurements only.
        if not link.run_fresh or link.run_measured:
            return
        rates = []
        if link.run_seconds >= self.RISE_SPAN - 1e-9:
            rates.append(link.run_moved / link.run_seconds)
        if link.run_seconds > 0 and link.run_seconds < link.run[-1].seconds * 2.5:
            # The whole short run, first tick and all: nothing waited before
            # it, so it never reads high, and a run too short for the rate
            # above still raises the figure some way: a burst of downloads
            # shorter than a second measures a link.
            first = link.run[0]
            rates.append((first.moved + link.run_moved) / (first.seconds + link.run_seconds))
        if not rates:
            return
        link.measured_at = now
        if link.figure is None or max(rates) > link.figure:
            if link.figure is not None and max(rates) > link.figure * (1 + self.FASTER_BY):
                link.evidence.clear()  # of the link before it got faster
            link.figure, link.remembered = max(rates), False

    def _measure(self, link: _LinkFigure, now: float) -> None:
        # Lowering a figure needs evidence that the link, not the
        # application, set the pace: a measurement is the median rate of the
        # ticks of at least SPAN inside a run, with connections open through
        # each. The run's inside: neither its first tick nor its newest,
        # which may turn out to be its last (they are partly idle).
        inside = list(link.run)[1:-1]
        seconds, fewest, ticks = 0.0, math.inf, []
        for tick in reversed(inside):
            if not tick.open_through:
                break
            seconds, fewest = seconds + tick.seconds, min(fewest, tick.open_through)
            ticks.append(tick)
            if seconds >= self.SPAN - 1e-9:
                break
        if seconds < self.SPAN - 1e-9:
            return
        # Keep the run short: what one measurement needs, and its first tick.
        while len(link.run) > 2 and sum(t.seconds for t in list(link.run)[2:-1]) >= self.SPAN:
            link.run.popleft()
        rate = self._typical(ticks)
        # Under SMALL_SHARE of the figure through one connection is that
        # application's pace (a stream, a slow server); through two or more
        # that all get so little, it is the link's.
        if link.figure is not None and rate < link.figure * self.SMALL_SHARE and fewest < 2:
            return
        link.evidence_time += link.run[-1].seconds
        link.run_measured = True
        link.evidence.append((link.evidence_time, rate))
        while link.evidence[0][0] <= link.evidence_time - self.KEEP_SPAN:
            link.evidence.popleft()
        followed = self._followed(link.evidence, link.evidence_time)
        link.measured_at = now
        # Evidence time counts traffic, not the clock, so that bursts of a few
        # seconds add up. Until it covers FOLLOW_SPAN the figure only rises;
        # a remembered figure is replaced once it covers REPLACE_SPAN.
        if link.figure is None or followed > link.figure:
            link.figure, link.remembered = followed, False
        elif link.remembered:
            if link.evidence_time >= self.REPLACE_SPAN - 1e-9:
                link.figure, link.remembered = followed, False
        elif link.evidence_time >= self.FOLLOW_SPAN - 1e-9:
            link.figure = followed

    @classmethod
    def _followed(cls, evidence: Sequence[tuple[float, float]], now: float) -> float:
        """The figure the measurements show (``evidence``, by evidence
        time, up to ``now``): the median of the last FOLLOW_SPAN, or the
        lowest of the last SPAN where all of those are above it."""
        # A link that got faster in a run shows within about two seconds, one
        # that got slower after about three of traffic, and a dip or a peak is
        # outvoted. Not their highest, as BBR's windowed maximum: a slow
        # link's ticks read a quarter off either way, so the highest of a few
        # seconds reads some ten per cent high, which takes a connection too
        # many (4 of 24, not 3, beside two links three times as fast).
        window = [rate for at, rate in evidence if at > now - cls.FOLLOW_SPAN + 1e-9]
        latest = [rate for at, rate in evidence if at > now - cls.SPAN + 1e-9]
        return max(statistics.median(window), min(latest))

    @staticmethod
    def _log_change(address: LocalAddress, link: _LinkFigure) -> None:
        """One debug line when the figure is a quarter off the one told last
        (or the first): a few steps that add up to a change are told too."""
        before, after = link.logged, link.figure
        if after is not None and (before is None or abs(after - before) > before / 4):
            link.logged = after
            logger.debug(
                "capacity of %s: %s -> %.0f kB/s",
                address.describe(),
                "not measured" if before is None else f"{before / 1000:.0f} kB/s",
                after / 1000,
            )

    def remember(self, address: LocalAddress, capacity: float) -> None:
        """Start ``address`` from ``capacity`` (bytes per second), kept from
        an earlier run, unless it has a figure already."""
        with self._lock:
            link = self._of(address)
            if link.figure is None and capacity > 0:
                link.figure, link.remembered, link.logged = capacity, True, capacity

    def estimate(self, address: LocalAddress) -> float | None:
        """What ``address`` can carry, in bytes per second; None while never measured."""
        with self._lock:
            link = self._links.get(address)
            return link.figure if link else None

    def to_keep(self, address: LocalAddress) -> float | None:
        """What to keep of ``address``'s capacity for the next run (bytes per
        second): the median of its recent measurements, or its figure while
        it has none (or its figure is still the remembered one)."""
        with self._lock:
            link = self._links.get(address)
            if link is None or link.figure is None:
                return None
            if link.remembered or not link.evidence:
                return link.figure
            # The median of KEEP_SPAN is steadier than the figure (the first
            # batch after a restart is split by kept figures alone), yet never
            # above every recent measurement: a link that got slower is not
            # kept at its old rate. One that got faster keeps its lower figure
            # until about half of KEEP_SPAN of traffic at its new rate.
            highest = max(rate for at, rate in link.evidence if at > link.evidence_time - self.FOLLOW_SPAN + 1e-9)
            return min(highest, statistics.median(rate for _, rate in link.evidence))

    def source(self, address: LocalAddress) -> tuple[float | None, CapacitySource | None, float | None]:
        """(figure, source, when): the figure, where it comes from
        ("measured", "remembered", or None without a figure) and the time it
        was last measured (the samples' clock; None if never)."""
        with self._lock:
            link = self._links.get(address)
            if link is None or link.figure is None:
                return None, None, None
            return link.figure, "remembered" if link.remembered else "measured", link.measured_at


# The state file: each link's last capacity, kept across runs.
STATE_FORMAT = "dispatch link capacities"  # what marks a state file as this program's
STATE_VERSION = 1
STATE_SAVE_INTERVAL = 60.0  # seconds between two writes of the state file while serving
# A state file for a few links is a few kB: a larger one is not read at all,
# so that no file can hold the start up or fill the memory.
STATE_FILE_LIMIT = 1024 * 1024
# Bytes per second: a figure above a terabyte a second is no link's, and
# one near the largest float would be a 300-digit figure in the tables.
STATE_CAPACITY_LIMIT = 1e12


def _read_regular_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` (or at the end of a
    symbolic link); raises OSError for any other kind of file, or one of
    more than ``limit`` bytes.

    A FIFO is opened without waiting for a writer (O_NONBLOCK), and a
    device (/dev/zero) is refused unread: either would hold the reader up."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(descriptor)  # open() has not taken it yet
        raise
    with open(descriptor, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes")
    return data


def _kept_capacity(entry: object) -> float | None:
    """The capacity of one link's entry in the state file; None unless it
    is a number above 0 and within STATE_CAPACITY_LIMIT."""
    capacity = entry.get("capacity") if isinstance(entry, dict) else None
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        return None
    # A comparison, not float(): an integer of 400 digits overflows a float.
    return float(capacity) if 0 < capacity <= STATE_CAPACITY_LIMIT else None


def read_state_part(path: str, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The state file at ``path`` and its part ``key`` (a JSON object): None
    where there is no such part, or where read_state finds the file
    unusable (it says so); a part that is no object is one warning."""
    try:
        data = json.loads(_read_regular_file(path, STATE_FILE_LIMIT).decode("utf-8"))
    except (OSError, ValueError, RecursionError, MemoryError):
        return None
    part = data.get(key) if isinstance(data, dict) and data.get("format") == STATE_FORMAT else None
    if part is not None and not isinstance(part, dict):
        logger.warning("state file %s: its %s is not an object, left out", path, key)
    return (data, part) if isinstance(part, dict) else None


def read_state(path: str) -> dict[str, float]:
    """The capacities (bytes per second) a state file keeps, by link key.

    A missing, unreadable (not a regular file, over STATE_FILE_LIMIT),
    corrupt or foreign file is one warning line and an empty result: a
    fresh start, never a refusal to start. Entries that are not a capacity
    are left out, with one warning line for them all."""
    try:
        data = json.loads(_read_regular_file(path, STATE_FILE_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        logger.warning("no state file at %s yet: every link starts not measured", path)
        return {}
    except (OSError, ValueError, RecursionError, MemoryError) as error:
        # ValueError: not UTF-8, not JSON, or an integer of too many
        # digits; RecursionError: brackets nested deeper than the parser goes.
        if isinstance(error, OSError):
            why = _describe(error)
        else:
            why = {RecursionError: "nested too deeply", MemoryError: "too large"}.get(type(error), str(error))
        logger.warning("state file %s unreadable (%s): every link starts not measured", path, why)
        return {}
    links = data.get("links") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or not isinstance(links, dict):
        logger.warning("%s is not a dispatch state file: every link starts not measured", path)
        return {}
    if data.get("version") != STATE_VERSION:
        logger.warning(
            "state file %s is of version %.40r, not %d: every link starts not measured",
            path,
            data.get("version"),
            STATE_VERSION,
        )
        return {}
    capacities = {}
    for key, entry in links.items():
        capacity = _kept_capacity(entry)
        if capacity is not None:
            capacities[key] = capacity
    if len(capacities) < len(links):
        left_out = len(links) - len(capacities)
        logger.warning(
            "state file %s: %d %s no capacity, left out",
            path,
            left_out,
            "entry holds" if left_out == 1 else "entries hold",
        )
    return capacities


def write_state(path: str, capacities: Mapping[str, float], more: Mapping[str, object] | None = None) -> None:
    """Write ``capacities`` (by link key) to the state file at ``path``,
    atomically: readers see the old file or the new one, never half of one;
    ``more`` are further entries of the file (the usage of capped links,
    the links' states), which readers of the capacities pass over. A
    symbolic link is written through, not replaced. Raises OSError."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    data = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "written": round(time.time(), 1),
        "links": {key: {"capacity": round(capacity, 1)} for key, capacity in sorted(capacities.items())},
        **(more or {}),
    }
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class LinkCapacities:
    """Each link's capacity measured from the meter, and the state file that
    keeps the figures across runs.

    ``measure()`` (every ESTIMATE_INTERVAL, by the Dispatcher's background
    task) gives ``estimator`` what each address moved since the last call,
    with the connections open through it then and now (``taken``).
    ``load()`` reads the state file once, as serving starts; ``save()``
    writes it where anything changed, each link's figure under its
    ``key()``, beside what ``more()`` gives (the usage of capped links, the
    links' states: read back by ``restore``). Keys for links besides
    ``links`` (a bond's interfaces) come from ``more_keys``.
    """

    def __init__(
        self,
        links: LinkSet,
        meter: Meter,
        estimator: CapacityEstimator,
        taken: Callable[[LocalAddress], int],
        state_file: str | None,
        *,
        more: Callable[[], dict[str, object]] = dict,
        restore: Callable[[str], None] = lambda state_file: None,
        more_keys: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.links = links
        self.meter = meter
        self.estimator = estimator
        self.taken = taken
        self.state_file = state_file
        self.more, self.restore, self.more_keys = more, restore, more_keys
        self._taken_before: dict[LocalAddress, int] = {}  # connections open at the estimator's last tick
        self._totals_before: dict[LocalAddress, tuple[int, int]] = {}  # bytes moved by then
        # What the state file kept, by key (read once serving, so that its
        # warnings reach the log); what this run measures is added.
        self._kept: dict[str, float] = {}
        self._written: dict[str, float] | None = None  # None until the state file was read
        self._more_written: dict[str, object] = {}  # what more() gave, as last written
        self._state_unwritable = False  # told once

    def key(self, address: LocalAddress) -> str:
        """What names ``address``'s link in the state file: the interface
        name (with " IPv6" for its IPv6 addresses) or the address."""
        link = self.links.link_of(address)
        if link is None or not link.is_interface:
            return address.ip
        return f"{link.name} IPv6" if address.family == socket.AF_INET6 else link.name

    def _keys(self) -> set[str]:
        """Every key that names one of this run's links."""
        keys: set[str] = set()
        for link in self.links.links:
            keys.update((link.name, f"{link.name} IPv6") if link.is_interface else link.known)
        keys.update(self.more_keys())
        return keys

    def load(self) -> None:
        """Read the state file, once: the figures of this run's links (any
        other's is dropped, not carried from file to file), and what
        ``restore`` reads of it."""
        if not self.state_file or self._written is not None:
            return
        keys = self._keys()
        self._kept = {key: figure for key, figure in read_state(self.state_file).items() if key in keys}
        self._written = dict(self._kept)
        self.restore(self.state_file)
        self._more_written = self.more()

    def of_interface(self, name: str) -> float | None:
        """What the interface ``name`` was measured to carry: as a link of
        this run, else as the state file kept it."""
        known = self.links.known_addresses()
        figures = [self.estimator.estimate(a) for a in known if a.interface == name and not isinstance(a, ProxyAddress)]
        measured = [figure for figure in figures if figure is not None]
        return max(measured) if measured else self._kept.get(name)

    def measure(self) -> None:
        """Give the estimator what each link moved since the last call, with
        the connections open through it then and now."""
        now, totals = self.meter.totals()
        taken = {address: self.taken(address) for address in self.links.known_addresses()}
        # Every address, those that have carried nothing too: the first
        # sample of an address only starts its clock.
        for address, open_now in taken.items():
            if address not in self._taken_before:  # new: start it from what an earlier run measured
                kept = self._kept.get(self.key(address))
                if kept is not None:
                    self.estimator.remember(address, kept)
            up, down = totals.get(address, (0, 0))
            up_before, down_before = self._totals_before.get(address, (0, 0))  # counted from 0
            sample = Sample(up - up_before, down - down_before, 0, now)
            self.estimator.add(address, sample, self._taken_before.get(address, 0), open_now)
        self._taken_before, self._totals_before = taken, totals

    def save(self) -> None:
        """Write each link's capacity, and ``more()``, to the state file if
        anything changed since it was read or last written. A file that
        cannot be written is one warning line."""
        if not self.state_file or self._written is None:
            return
        capacities = dict(self._kept)
        measured_at: dict[str, float] = {}
        for address in self.links.known_addresses():
            _, _, when = self.estimator.source(address)
            figure = self.estimator.to_keep(address)
            key = self.key(address)
            # Of two addresses a link has had, the one measured last speaks for it.
            when = -math.inf if when is None else when
            if figure is not None and when >= measured_at.get(key, -math.inf):
                capacities[key], measured_at[key] = figure, when
        more = self.more()
        if capacities == self._written and more == self._more_written:
            return
        try:
            write_state(self.state_file, capacities, more)
        except OSError as error:
            if not self._state_unwritable:
                self._state_unwritable = True
                logger.warning("cannot write the state file %s: %s", self.state_file, _describe(error))
            return
        if self._state_unwritable:
            self._state_unwritable = False
            logger.info("state file %s written again", self.state_file)
        self._written, self._more_written = capacities, more


# ---------------------------------------------------------------------------
# Data caps: what a link that costs money may carry, by period, kept across runs
# ---------------------------------------------------------------------------

# Sizes as phone plans and routers write them: kB, MB, GB, TB in powers of
# 1000, KiB, MiB, GiB, TiB in powers of 1024.
SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
CAP_WARNINGS = (75, 95)  # per cent of a cap: one log line each, per period
MAX_ROLLING_DAYS = 366
# Seconds between two writes of the state file while a capped link's usage
# changes: a crash loses at most this much of what it carried.
USAGE_SAVE_INTERVAL = 15.0
# What a link does once a cap is reached: join the backup tier, take no new
# connection, or take none and end those open too.
CapAction = Literal["backup", "stop", "stop-now"]
CAP_ACTIONS: tuple[CapAction, ...] = ("backup", "stop", "stop-now")


def parse_size(text: str) -> int:
    """Bytes of a size as ``--cap`` takes it (2GB, 200MB, 1.5GiB, 5000B);
    ValueError for anything else."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise ValueError(f"{text!r} is no size: a number and B, kB, MB, GB, TB (or KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


@dataclasses.dataclass(frozen=True)
class DataCap:
    """At most ``size`` bytes through ``link`` (both ways together) per period:
    a local day, a month from its ``first_day``, or a rolling window of
    ``days`` days (today and the days before it)."""

    link: str
    size: int
    period: Literal["day", "month", "rolling"]
    days: int = 1  # of a rolling window
    first_day: int = 1  # of the month's period; a shorter month starts on its last day

    def describe(self) -> str:
        """The cap as --cap writes it."""
        period = {"day": "day", "month": "month", "rolling": f"{self.days}d"}[self.period]
        first = f"@{self.first_day}" if self.period == "month" and self.first_day != 1 else ""
        return f"{self.link}={format_size(self.size)}/{period}{first}"

    def bounds(self, today: datetime.date) -> tuple[datetime.date, datetime.date]:
        """The first day of the period holding ``today``, and the first day after it."""
        if self.period == "day":
            return today, today + datetime.timedelta(days=1)
        if self.period == "rolling":
            return today - datetime.timedelta(days=self.days - 1), today + datetime.timedelta(days=1)
        start = self._month_start(today.year, today.month)
        if start > today:
            start = self._month_start(*_month_before(today.year, today.month))
        return start, self._month_start(*_month_after(start.year, start.month))

    def _month_start(self, year: int, month: int) -> datetime.date:
        last = (datetime.date(*_month_after(year, month), 1) - datetime.timedelta(days=1)).day
        return datetime.date(year, month, min(self.first_day, last))


def _month_before(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def _month_after(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def format_size(count: int) -> str:
    """A size as --cap takes it, in the largest unit it is a whole number
    of (powers of 1000 first), or in bytes."""
    for unit in ("TB", "GB", "MB", "kB", "TiB", "GiB", "MiB", "KiB"):
        if count and count % SIZE_UNITS[unit.lower()] == 0:
            return f"{count // SIZE_UNITS[unit.lower()]}{unit}"
    return f"{count}B"


def parse_cap(text: str) -> DataCap:
    """A ``--cap`` value: LINK=SIZE/PERIOD, PERIOD day, month (month@DAY: it
    starts on that day) or Nd (a rolling window of N days); ValueError
    saying what is wrong."""
    link, equals, rest = text.partition("=")
    size_text, slash, period_text = rest.partition("/")
    if not (link.strip() and equals and slash):
        raise ValueError(f"{text!r} is no cap: LINK=SIZE/PERIOD, as usb0=2GB/month, usb0=200MB/day, usb0=5GB/30d")
    size = parse_size(size_text)
    if size <= 0:
        raise ValueError(f"{text!r}: a cap of 0 lets nothing through; leave the link out instead")
    period, at, first = period_text.strip().lower().partition("@")
    if at and not (period == "month" and _is_number(first) and 1 <= int(first) <= 31):
        raise ValueError(f"{text!r}: only a month starts on a day, month@1 to month@31")
    if period in ("day", "month"):
        return DataCap(link.strip(), size, "month" if period == "month" else "day", first_day=int(first or 1))
    days = period[:-1]
    if not (period.endswith("d") and _is_number(days) and 1 <= int(days) <= MAX_ROLLING_DAYS):
        raise ValueError(f"{text!r}: the period is day, month, month@DAY or Nd (1 to {MAX_ROLLING_DAYS} days)")
    return DataCap(link.strip(), size, "rolling", days=int(days))


class CapReport(TypedDict):
    """Where one link stands against one cap, as the pages show it."""

    link: str
    cap: str  # as --cap wrote it
    cap_bytes: int
    used_bytes: int
    period_end: float  # the time it starts afresh (seconds since the epoch)
    reached: bool
    seconds_left: float | None  # until reached, at the link's rate now; None while it carries nothing


def cap_standing(cap: CapReport) -> str:
    """How far a cap is spent, as the log told it: "reached", "past 95 %",
    "past 75 %" (CAP_WARNINGS), or "" below them."""
    if cap["reached"]:
        return "reached"
    share = cap["used_bytes"] * 100 / cap["cap_bytes"]
    passed = [level for level in CAP_WARNINGS if share >= level]
    return f"past {passed[-1]} %" if passed else ""


def _local_midnight(day: datetime.date) -> float:
    """The time (seconds since the epoch) the local ``day`` begins."""
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


class DataBudget:
    """The bytes each capped link carried, by local day, and where it stands
    against its caps.

    Days are local, and only go forward: a clock set back (or a restart with
    a clock behind) counts on in the newest day seen, so no period starts
    afresh early. ``check()`` (every METER_INTERVAL, by the Dispatcher)
    logs the CAP_WARNINGS lines and the caps reached, and updates
    ``spent``: the links with a cap reached now. Thread safe.
    """

    def __init__(self, caps: Sequence[DataCap], clock: Callable[[], float] = time.time) -> None:
        self.caps = list(caps)
        self.clock = clock
        self._lock = threading.Lock()
        self._days: dict[str, dict[datetime.date, int]] = {cap.link: {} for cap in self.caps}
        self._newest = datetime.date.fromtimestamp(clock())
        self._told: dict[tuple[DataCap, datetime.date], int] = {}  # the highest level logged per period
        self.spent: frozenset[str] = frozenset()
        # The most days any cap looks back: older ones are forgotten.
        self._kept_days = max([31 if cap.period == "month" else cap.days for cap in self.caps] or [1])

    @property
    def links(self) -> frozenset[str]:
        """The names of the capped links."""
        return frozenset(self._days)

    def _today(self) -> datetime.date:
        self._newest = max(self._newest, datetime.date.fromtimestamp(self.clock()))
        return self._newest

    def add(self, link: str, count: int) -> None:
        """Count ``count`` bytes carried by ``link`` (either way) today."""
        days = self._days.get(link)
        if days is None or count <= 0:
            return
        with self._lock:
            today = self._today()
            days[today] = days.get(today, 0) + count

    def used(self, cap: DataCap) -> tuple[int, datetime.date, datetime.date]:
        """The bytes counted against ``cap`` in its period, and the period's bounds."""
        with self._lock:
            start, end = cap.bounds(self._today())
            return sum(n for day, n in self._days[cap.link].items() if start <= day < end), start, end

    def update_spent(self) -> set[str]:
        """Log each of a cap's CAP_WARNINGS and its reaching once a period,
        each level passed (in order, however many at once); update
        ``spent``; return the links newly spent."""
        spent: set[str] = set()
        for cap in self.caps:
            used, start, _ = self.used(cap)
            told = self._told.get((cap, start), 0)
            for level in (*CAP_WARNINGS, 100):
                if told < level and used * 100 >= cap.size * level:
                    self._told[cap, start] = level
                    if level < 100:
                        logger.warning("link %s used %d%% of its cap %s", cap.link, level, cap.describe())
                    else:
                        logger.warning(
                            "link %s reached its cap %s (%s used)", cap.link, cap.describe(), format_size(used)
                        )
            if used >= cap.size:
                spent.add(cap.link)
        newly, self.spent = spent - self.spent, frozenset(spent)
        return newly

    def reports(self) -> list[CapReport]:
        """Where each capped link stands against each of its caps."""
        reports: list[CapReport] = []
        for cap in self.caps:
            used, start, end = self.used(cap)
            if cap.period == "rolling":
                # A window frees the oldest day it holds as it moves on.
                with self._lock:
                    first = min((d for d, n in self._days[cap.link].items() if start <= d < end and n), default=start)
                end = first + datetime.timedelta(days=cap.days)
            reports.append(
                {
                    "link": cap.link,
                    "cap": cap.describe(),
                    "cap_bytes": cap.size,
                    "used_bytes": used,
                    "period_end": _local_midnight(end),
                    "reached": used >= cap.size,
                    "seconds_left": None,
                }
            )
        return reports

    def reset(self, link: str) -> bool:
        """Count ``link`` from zero; whether it is capped."""
        with self._lock:
            if link not in self._days:
                return False
            self._days[link] = {}
        self._told = {key: level for key, level in self._told.items() if key[0].link != link}
        return True

    def to_keep(self) -> dict[str, dict[str, int]]:
        """The days to keep in the state file: {link: {"YYYY-MM-DD": bytes}}."""
        with self._lock:
            oldest = self._today() - datetime.timedelta(days=self._kept_days)
            return {
                link: {day.isoformat(): n for day, n in sorted(days.items()) if day >= oldest and n}
                for link, days in self._days.items()
                if days
            }

    def restore(self, kept: Mapping[str, Mapping[datetime.date, int]]) -> None:
        """Count on from the days a state file kept (see read_usage)."""
        with self._lock:
            for link, days in kept.items():
                if link in self._days:
                    self._days[link] = dict(days)


def read_usage(path: str, today: datetime.date) -> dict[str, dict[datetime.date, int]]:
    """The bytes by link and day a state file keeps, if it was written on
    this machine; nothing, with one warning, for another machine's usage
    or days after ``today`` (a future period). A file read_state finds
    unusable gives nothing, quietly: it has said so."""
    found = read_state_part(path, "usage")
    if found is None:
        return {}
    data, usage = found
    if data.get("host") != socket.gethostname():
        logger.warning(
            "state file %s: the usage it keeps is of another machine (%.60r), ignored", path, data.get("host")
        )
        return {}
    kept: dict[str, dict[datetime.date, int]] = {}
    future = False
    unusable = 0
    for link, days in usage.items():
        if not isinstance(days, dict):
            unusable += 1
            continue
        for day_text, count in days.items():
            try:
                day = datetime.date.fromisoformat(day_text)
            except (TypeError, ValueError):
                unusable += 1
                continue
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                unusable += 1
                continue
            if day > today:
                future = True
                continue
            kept.setdefault(link, {})[day] = count
    if unusable:
        logger.warning("state file %s: usage entries left out, not a day and a byte count: %d", path, unusable)
    if future:
        logger.warning("state file %s: usage of days after today (%s), ignored", path, today.isoformat())
        return {}
    return kept


# ---------------------------------------------------------------------------
# Device binding: sockets that leave by the chosen link; the system's lookup
# ---------------------------------------------------------------------------

DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds
# Seconds a connect may go unanswered before the same connect starts from
# another link: a link that went dark costs a client this, not the timeout.
DEFAULT_HEDGE = 1.0


def _of_families(
    host: str, found: list[tuple[socket.AddressFamily, str]], families: Collection[socket.AddressFamily]
) -> list[tuple[socket.AddressFamily, str]]:
    """The addresses of the families wanted; SocksError if there is none."""
    targets = [(family, ip) for family, ip in found if family in families]
    if not targets:
        missing = _family_name(found[0][0]) if found else "IPv4"
        raise SocksError(
            Reply.ADDRESS_TYPE_NOT_SUPPORTED,
            f"{host} has only {missing} addresses and there is no {missing} local address to dispatch to",
        )
    return targets


def _resolve_target(
    host: str, port: int, families: Collection[socket.AddressFamily]
) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, ip) pairs to try for a target, in the resolver's order.

    A name is resolved here, keeping only the ``families`` there are local
    addresses for. Raises gaierror or SocksError(ADDRESS_TYPE_NOT_SUPPORTED).
    """
    if _is_ip(host):
        return [(_family_of(host), host)]
    # The name is ASCII already; as bytes it skips the idna codec, whose
    # errors are not OSErrors.
    infos = socket.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM)
    return _of_families(host, [(info[0], str(info[4][0])) for info in infos], families)


class _DeviceBindingRefusedError(OSError):
    """The system does not let this process bind sockets to a device."""


def _device_for(local: LocalAddress, ip: str) -> str | None:
    """The device a socket from ``local`` to ``ip`` is bound to, if any.

    None where devices cannot be bound, where the interface of ``local`` is
    not known, and for loopback targets: a socket bound to eth0 cannot reach
    127.0.0.1.
    """
    if not _CAN_BIND_TO_DEVICE or _is_loopback(ip):
        return None
    return local.interface


def _bind_to_device(sock: socket.socket, interface: str) -> None:
    """Make ``sock`` leave by ``interface`` whatever the routing table says.

    Raises _DeviceBindingRefusedError if the system does not allow it, and an
    OSError of the link (ENODEV) if the interface is gone.
    """
    try:
        if _SO_BINDTODEVICE is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
            return
        index = _interface_index(interface)
        if sys.platform == "win32":
            # The IPv4 option takes the index in network byte order, the IPv6
            # one in host order (as Chromium sets them).
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_UNICAST_IF, struct.pack("=I", index))
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_UNICAST_IF, struct.pack("!I", index))
            return
        if sock.family == socket.AF_INET6:
            level, option = socket.IPPROTO_IPV6, _IPV6_BOUND_IF
        else:
            level, option = socket.IPPROTO_IP, _IP_BOUND_IF
        if option is None:
            raise OSError(errno.ENOPROTOOPT, "binding to a device is not supported here")
        sock.setsockopt(level, option, index)
    except OSError as error:
        if error.errno in _NOT_PERMITTED_ERRNOS:
            raise _DeviceBindingRefusedError(error.errno, error.strerror) from None
        raise


# The firewall mark every socket that leaves by a link carries, once set
# (mark_sockets): the rules of transparent mode let marked traffic pass
# first, so that dispatch's own connections are never sent back to it.
_socket_mark: int | None = None


def mark_sockets(mark: int | None) -> None:
    """Give every socket opened for a link from now on the firewall mark
    ``mark`` (SO_MARK, which needs CAP_NET_ADMIN); None: no mark."""
    global _socket_mark
    _socket_mark = mark


def _marked(sock: socket.socket) -> None:
    if _socket_mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, _socket_mark)


def _socket_from(local: LocalAddress, kind: socket.SocketKind, device: str | None) -> socket.socket:
    """A socket of ``kind`` bound to ``local`` (and to ``device``, if given)."""
    stream = kind == socket.SOCK_STREAM
    sock = socket.socket(local.family, kind | (_SOCK_NONBLOCK if stream else 0))
    try:
        if stream:
            if not _SOCK_NONBLOCK:
                sock.setblocking(False)
            # A target that vanishes without a word must not hold a thread forever.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        _marked(sock)
        # Unprivileged SO_BINDTODEVICE (Linux 5.7+) is allowed on a socket
        # not bound to a device yet, as this new one is.
        if device is not None:
            _bind_to_device(sock, device)
        if stream and _IP_BIND_ADDRESS_NO_PORT is not None:
            # An IPPROTO_IP option that Linux applies to IPv6 sockets too.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((local.ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_by_device(
    family: socket.AddressFamily, kind: socket.SocketKind, device: str | None, protocol: int = 0
) -> socket.socket:
    """A non-blocking socket of ``kind`` (and ``protocol``: MPTCP for a
    bond), bound to ``device`` if given but to no address: it leaves where
    the routing table says (on that device)."""
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        _marked(sock)
        if device is not None:
            _bind_to_device(sock, device)
    except BaseException:
        sock.close()
        raise
    return sock


def _start_connect(local: LocalAddress, target: Target, device: str | None = None) -> socket.socket:
    """A non-blocking socket bound to ``local`` (and ``device``) whose
    connect to ``target`` is under way (or done)."""
    sock = _socket_from(local, socket.SOCK_STREAM, device)
    error = sock.connect_ex(target)
    if error and error not in _CONNECT_IN_PROGRESS:
        sock.close()
        raise OSError(error, os.strerror(error))
    return sock


def _start_connect_by_device(target: Target, device: str | None, protocol: int = 0) -> socket.socket:
    """A non-blocking socket, bound to ``device`` if given (not to an
    address), whose connect to ``target`` is under way."""
    sock = _socket_by_device(_family_of(target[0]), socket.SOCK_STREAM, device, protocol)
    error = sock.connect_ex(target)
    if error and error not in _CONNECT_IN_PROGRESS:
        sock.close()
        raise OSError(error, os.strerror(error))
    return sock


def _connect_from(local: LocalAddress, ip: str, port: int, timeout: float, device: str | None = None) -> socket.socket:
    """A non-blocking socket bound to ``local`` (and to ``device``, if
    given) and connected to (ip, port)."""
    sock = _start_connect(local, (ip, port), device)
    try:
        _wait_until(sock, selectors.EVENT_WRITE, time.monotonic() + timeout)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


def _shutdown_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already
        sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------
# Name servers: the system's DNS servers, per link, and its hosts file
# ---------------------------------------------------------------------------

# Where the system's resolver would send a query, read from the files and
# registry keys the platform keeps them in, so that dispatch can ask the
# same servers through each link itself (see the resolver below).

DNS_PORT = 53
SYSTEMD_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})  # systemd-resolved's local stub listeners
RESOLV_CONF = "etc/resolv.conf"
SYSTEMD_RESOLV_CONF = "run/systemd/resolve/resolv.conf"  # the stub's own upstream servers
# Per-link state of systemd-resolved (SERVERS=, set over D-Bus, by
# NetworkManager too) and of systemd-networkd (DNS=), one file per ifindex.
SYSTEMD_LINK_DIRS = ("run/systemd/resolve/netif", "run/systemd/netif/links")
WINDOWS_INTERFACES_KEY = r"SYSTEM\CurrentControlSet\Services\Tcpip\Parameters\Interfaces"


@dataclasses.dataclass(frozen=True)
class NameServer:
    """A DNS server: its address, port, and the link it belongs to (an
    interface name, or on Windows a local IP address of the adapter), whose
    queries go through that link only; None: any link."""

    ip: str
    port: int = DNS_PORT
    link: str | None = None

    @property
    def loopback(self) -> bool:
        """Whether the server is on this machine: asked without binding to a link."""
        return _is_loopback(self.ip)

    def describe(self) -> str:
        """The server as the log names it."""
        where = _format_endpoint(self.ip, self.port)
        return f"{where} (of {self.link})" if self.link else where

    def belongs_to(self, local: LocalAddress) -> bool:
        """Whether the server is of ``local``'s link."""
        return self.link is not None and self.link in (local.interface, local.ip)


def parse_name_server(text: str, link: str | None = None) -> NameServer:
    """``ADDRESS[:PORT]`` (``[IPv6]:PORT``, or a bare IPv6 address) as a
    NameServer; ValueError if malformed."""
    host, port = (text, DNS_PORT) if _is_ip(text) else _split_host_port(text, DNS_PORT)
    if not _is_ip(host):
        raise ValueError(f"{text!r}: a name server is an IP address, with a port if not 53")
    return NameServer(str(ipaddress.ip_address(host)), port, link)


def parse_dns_option(texts: Sequence[str] | None) -> tuple[list[NameServer] | None, bool]:
    """(servers, system) of the ``dns`` option: None asks the system's
    servers, ``["system"]`` the system's resolver, else ``ADDRESS[:PORT]``
    each; ValueError if malformed."""
    if texts is None:
        return None, False
    if "system" in texts:
        if len(texts) > 1:
            raise ValueError("--dns system leaves names to the system's resolver: it takes no server beside it")
        return None, True
    if not texts:
        raise ValueError("no name server given")
    return [parse_name_server(text) for text in texts], False


@dataclasses.dataclass(frozen=True)
class ResolvConf:
    """What resolv.conf says: name servers (addresses), search domains, ndots."""

    servers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1


def parse_resolv_conf(text: str) -> ResolvConf:
    """The nameserver, search (or domain) and ndots lines of resolv.conf;
    the rest, and what is malformed, is skipped as the system's resolver does."""
    servers: list[str] = []
    search: tuple[str, ...] = ()
    ndots = 1
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        keyword, values = words[0], words[1:]
        if keyword == "nameserver" and _is_ip(values[0].partition("%")[0]):
            servers.append(values[0])
        elif keyword in ("search", "domain"):
            search = tuple(value.rstrip(".").lower() for value in values if value != ".")
        elif keyword == "options":
            for option in values:
                name, _, value = option.partition(":")
                if name == "ndots" and value.isdigit():
                    ndots = min(int(value), 15)
    return ResolvConf(tuple(servers), search, ndots)


def parse_systemd_link_servers(text: str) -> list[tuple[str, int]]:
    """(address, port) of each server in a systemd link state file: its
    ``SERVERS=`` (resolved) or ``DNS=`` (networkd) line, entries such as
    ``192.0.2.1``, ``[2001:db8::1]:5353``, ``192.0.2.1:53#dns.example``."""
    found: list[tuple[str, int]] = []
    for line in text.splitlines():
        key, equals, value = line.strip().partition("=")
        if not equals or key not in ("SERVERS", "DNS"):
            continue
        for entry in value.split():
            entry = entry.partition("#")[0]
            try:
                server = parse_name_server(entry)
            except ValueError:
                continue
            found.append((server.ip, server.port))
    return found


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(1 << 20)
    except OSError:
        return None


def discover_name_servers(
    root: str = "/", interface_name: Callable[[int], str] = socket.if_indextoname
) -> tuple[list[NameServer], ResolvConf]:
    """The system's name servers, as Linux and macOS configure them, and
    its resolv.conf.

    resolv.conf names them; where it names only systemd-resolved's local
    stub, the stub's upstream servers are asked instead (through the links,
    which the stub would not do), each server systemd-resolved knows to be
    of one link marked as that link's. ``root`` and ``interface_name``
    (ifindex to name) are seams for tests.
    """
    conf = parse_resolv_conf(_read_text(os.path.join(root, RESOLV_CONF)) or "")
    if not conf.servers or not all(ip in SYSTEMD_STUBS for ip in conf.servers):
        return [parse_name_server(ip) for ip in conf.servers], conf
    upstream = parse_resolv_conf(_read_text(os.path.join(root, SYSTEMD_RESOLV_CONF)) or "")
    servers: list[NameServer] = []
    for directory in SYSTEMD_LINK_DIRS:
        with contextlib.suppress(OSError):
            for index in sorted(os.listdir(os.path.join(root, directory))):
                text = _read_text(os.path.join(root, directory, index))
                if not index.isdigit() or text is None:
                    continue
                try:
                    name = interface_name(int(index))
                except OSError:
                    continue  # the interface is gone
                servers += [NameServer(ip, port, name) for ip, port in parse_systemd_link_servers(text)]
    linked = {(server.ip, server.port) for server in servers}
    servers += [server for server in map(parse_name_server, upstream.servers) if (server.ip, server.port) not in linked]
    if not servers:  # nothing known of the stub's servers: ask the stub
        servers = [parse_name_server(ip) for ip in conf.servers]
    return _unique_servers(servers), dataclasses.replace(conf, search=conf.search or upstream.search)


def _unique_servers(servers: Iterable[NameServer]) -> list[NameServer]:
    return list(dict.fromkeys(servers))


# An adapter is its registry values by name, as winreg reads them: a string
# or a list of strings, as the adapter was set up; read loosely, checked here.
def windows_name_servers(adapters: Iterable[Mapping[str, Any]], global_servers: str = "") -> list[NameServer]:
    """The name servers of Windows adapters, from their registry values
    (``NameServer`` set by hand, else ``DhcpNameServer``; their addresses
    ``IPAddress`` and ``DhcpIPAddress``), each marked as the link of the
    adapter's addresses; ``global_servers`` (the Tcpip parameters' own
    ``NameServer``) are of any link."""
    servers: list[NameServer] = []
    for adapter in adapters:
        listed = str(adapter.get("NameServer") or "") or str(adapter.get("DhcpNameServer") or "")
        ips = adapter.get("IPAddress") or []
        ips = [ips] if isinstance(ips, str) else list(ips)
        ips.append(str(adapter.get("DhcpIPAddress") or ""))
        locals_ = [ip for ip in ips if _is_ip(ip) and ip != "0.0.0.0"]
        for entry in listed.replace(",", " ").split():
            if _is_ip(entry):
                servers += [NameServer(entry, DNS_PORT, local) for local in locals_] or [NameServer(entry)]
    servers += [NameServer(entry) for entry in global_servers.replace(",", " ").split() if _is_ip(entry)]
    return _unique_servers(servers)


def _windows_adapters() -> tuple[list[dict[str, Any]], str]:  # pragma: no cover - Windows only
    """The Tcpip interfaces' values from the registry, and the global NameServer."""
    if sys.platform != "win32":
        return [], ""
    import winreg

    adapters: list[dict[str, Any]] = []
    parameters = WINDOWS_INTERFACES_KEY.rsplit("\\", 1)[0]
    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, parameters) as key:
        try:
            global_servers = str(winreg.QueryValueEx(key, "NameServer")[0])
        except OSError:
            global_servers = ""
    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, WINDOWS_INTERFACES_KEY) as interfaces:
        for index in range(winreg.QueryInfoKey(interfaces)[0]):
            with winreg.OpenKey(interfaces, winreg.EnumKey(interfaces, index)) as key:
                values: dict[str, Any] = {}
                for name in ("NameServer", "DhcpNameServer", "IPAddress", "DhcpIPAddress"):
                    with contextlib.suppress(OSError):
                        values[name] = winreg.QueryValueEx(key, name)[0]
                adapters.append(values)
    return adapters, global_servers


def system_name_servers() -> tuple[list[NameServer], ResolvConf]:
    """The name servers this system uses, and its resolv.conf (search domains)."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        try:
            return windows_name_servers(*_windows_adapters()), ResolvConf()
        except OSError:
            return [], ResolvConf()
    return discover_name_servers()


def hosts_path() -> str:
    """Where this system's hosts file is."""
    if sys.platform == "win32":  # pragma: no cover - Windows only
        return os.path.join(os.environ.get("SYSTEMROOT", r"C:\Windows"), "System32", "drivers", "etc", "hosts")
    return "/etc/hosts"


def parse_hosts(text: str) -> dict[str, list[str]]:
    """The addresses of each name of a hosts file, in the file's order."""
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.partition("#")[0].split()
        if len(words) < 2 or not _is_ip(words[0].partition("%")[0]):
            continue
        for name in words[1:]:
            addresses = names.setdefault(name.rstrip(".").lower(), [])
            if words[0] not in addresses:
                addresses.append(words[0])
    return names


# ---------------------------------------------------------------------------
# Resolver: names through the links (a cache, the hedged query)
# ---------------------------------------------------------------------------

# A name is looked up by dispatch itself, with queries that leave through a
# link as connections do: by default the link chosen for the connection, so
# that the name and the traffic leave together (a CDN answers with the
# server nearest to where the query came from). A query left unanswered for
# DNS_HEDGE is sent through another link as well: a dark default route does
# not take names down with it.

DNS_HEDGE = 0.25  # seconds a query goes unanswered before another link asks too (at most the hedge)
# A query unanswered for DNS_RESEND seconds is sent again (one lost datagram
# must not lose the name), then after twice as long each time, until the
# lookup's time is up; an answer to any of the sends is taken.
DNS_RESEND = 1.0
DNS_ATTEMPT_TIMEOUT = 2.0  # seconds a query asked again by TCP (a truncated answer) is waited for
# Datagrams that answer nothing asked (another id, another question,
# malformed) one query takes before it is given up: a server, or anyone who
# can send from its address, flooding them cannot hold a lookup.
DNS_MAX_WRONG_ANSWERS = 64
DNS_LOG_INTERVAL = 1.0  # seconds between two "passed over" lines at least
DNS_CACHE_SIZE = 4096  # names and types kept; the least recently used go first
DNS_MAX_TTL = 86400  # seconds an answer is kept at most, whatever its TTL
# Seconds "no such name" or "no address" is kept at most: RFC 2308 takes the
# SOA's minimum, which may be hours; a name being set up must not stay
# missing that long.
DNS_NEGATIVE_TTL = 30
UDP_DNS_SIZE = 65535  # the most one DNS datagram carries
DNS_REFRESH = 30.0  # seconds between two readings of the system's servers and hosts file


@dataclasses.dataclass(frozen=True)
class NameAnswer:
    """What a name has of one record type: its addresses, or (none) why not.

    ``reply`` is the SOCKS reply a connection to it gets when it has none.
    """

    ips: tuple[str, ...] = ()
    error: str | None = None
    reply: Reply = Reply.HOST_UNREACHABLE
    # The name's servers said so (no such name, no address of the type):
    # the next search domain may have it. Otherwise a failure.
    negative: bool = False


@dataclasses.dataclass
class DnsCounts:
    """The DNS work of one link: queries sent (one sent again counts
    once), lookups the cache answered, queries that got no good answer
    (each once, however many datagrams it passed over)."""

    queries: int = 0
    cache_hits: int = 0
    failures: int = 0


class DnsCache:
    """Answers kept for their TTL, at most ``max_entries``, the least
    recently used dropped first. ``clock`` tells monotonic seconds."""

    def __init__(self, max_entries: int = DNS_CACHE_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: collections.OrderedDict[tuple[str, int], tuple[float, NameAnswer]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, rdtype: int) -> NameAnswer | None:
        """The answer kept for (name, rdtype), if it has not expired."""
        key = (name, rdtype)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, name: str, rdtype: int, answer: NameAnswer, ttl: float) -> None:
        """Keep ``answer`` for ``ttl`` seconds (none if 0)."""
        if ttl <= 0:
            return
        self._entries[name, rdtype] = (self.clock() + ttl, answer)
        self._entries.move_to_end((name, rdtype))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclasses.dataclass
class Resolution:
    """The addresses of a name, in the order to try them, and how the
    lookup went: the link whose query got the answer (None from the cache,
    the hosts file, a loopback server or the system's resolver), and the
    links whose queries went unanswered meanwhile."""

    targets: list[tuple[socket.AddressFamily, str]]
    answered_by: LocalAddress | None = None
    silent: list[LocalAddress] = dataclasses.field(default_factory=list)


@functools.lru_cache(maxsize=1)
def _has_dnspython() -> bool:
    try:
        import dns.message  # noqa: F401
    except ImportError:
        return False
    return True


# The record types of each family, in the order a name's addresses are tried.
_RDTYPES = ((socket.AF_INET, 1), (socket.AF_INET6, 28))  # A, AAAA
_RCODE_REPLIES = {
    2: "the name server failed (SERVFAIL)",
    5: "the name server refused (REFUSED)",
    4: "the name server does not do that (NOTIMP)",
    1: "the name server found the query malformed",
}

SocketOpener = Callable[[LocalAddress, str, Callable[[str | None], socket.socket]], socket.socket]


class _Lookup:
    """A lookup under way, which others asking the same wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: NameAnswer | None = None


class Resolver:
    """Looks names up for connections, through the links.

    ``servers``: the name servers to ask; None asks the system's (read
    again every DNS_REFRESH seconds), ``system=True`` leaves names to the
    system's resolver as the standard library does (so does a missing
    dnspython, with one log line). The hosts file is read first.

    A lookup asks through the link the connection got (``via``); an
    unanswered query is sent through the next link (and the next server)
    every ``hedge`` seconds, the first good answer winning, until
    ``timeout``; each query is sent again while unanswered (DNS_RESEND). A
    server of one link is asked through that link only, a loopback one
    without any. Answers are kept for their TTL (DnsCache); lookups of a
    name already under way wait for it instead of asking again.
    A link whose query went unanswered for ``evidence_after`` seconds while
    another got the same server's answer is out (``health``).
    """

    def __init__(
        self,
        servers: Sequence[NameServer] | None = None,
        system: bool = False,
        *,
        addresses: Callable[[], Sequence[LocalAddress]] = tuple,
        health: Health | None = None,
        hedge: float = DNS_HEDGE,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        evidence_after: float = DEFAULT_HEDGE,
        hosts_file: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        carried: Callable[[LocalAddress, int, int], None] = lambda address, up, down: None,
    ) -> None:
        self.system = system
        self.carried = carried  # hears the bytes of each query and answer, by link (the meter counts them)
        self.given = list(servers) if servers is not None else None
        self.addresses = addresses
        self.health = health
        self.hedge = hedge if hedge > 0 else math.inf
        self.timeout = timeout
        self.evidence_after = evidence_after
        self.hosts_file = hosts_file or hosts_path()
        self.clock = clock
        self.cache = DnsCache(clock=clock)
        self._lock = threading.Lock()
        self._lookups: dict[tuple[str, int], _Lookup] = {}
        self._counts: dict[LocalAddress, DnsCounts] = {}
        self._servers: list[NameServer] = []
        self._conf = ResolvConf()
        self._hosts: dict[str, list[str]] = {}
        self._read_at = -math.inf
        self._told_system = False
        self._unlogged_passed_over = 0
        self._passed_over_logged_at = -math.inf
        if not system and not _has_dnspython():
            self.system = True
            logger.warning(
                "the dnspython package is not installed: names are looked up by the system's "
                "resolver, whose queries leave by the default route only"
            )

    @property
    def through_links(self) -> bool:
        """Whether names are looked up through the links (else by the system)."""
        return not self.system

    def counts(self, address: LocalAddress) -> DnsCounts:
        """The DNS work of ``address``'s link so far (a copy)."""
        with self._lock:
            return dataclasses.replace(self._counts.get(address) or DnsCounts())

    def _carry(self, address: LocalAddress | None, up: int, down: int) -> None:
        if address is not None:
            self.carried(address, up, down)

    def _count(self, address: LocalAddress | None, field: str) -> None:
        if address is None:
            return
        with self._lock:
            counts = self._counts.setdefault(address, DnsCounts())
            setattr(counts, field, getattr(counts, field) + 1)

    def _log_passed_over(self, what: str, server: NameServer, name: str) -> None:
        """Log a datagram passed over, at most every DNS_LOG_INTERVAL
        seconds, with how many were passed over since the last such line."""
        with self._lock:
            self._unlogged_passed_over += 1
            now = time.monotonic()
            if now - self._passed_over_logged_at < DNS_LOG_INTERVAL:
                return
            others = self._unlogged_passed_over - 1
            self._unlogged_passed_over = 0
            self._passed_over_logged_at = now
        more = f" ({others} more passed over since the last such line)" if others else ""
        logger.info("passed over %s from %s for %s%s", what, server.describe(), name, more)

    def servers(self) -> list[NameServer]:
        """The servers asked now."""
        self._read_system()
        return list(self.given if self.given is not None else self._servers)

    def _read_system(self) -> None:
        """Read the hosts file and the system's servers, at most every DNS_REFRESH seconds."""
        now = self.clock()
        if now - self._read_at < DNS_REFRESH:
            return
        self._read_at = now
        self._hosts = parse_hosts(_read_text(self.hosts_file) or "")
        if self.given is None and not self.system:
            self._servers, self._conf = system_name_servers()
            if not self._servers and not self._told_system:
                self._told_system = True
                logger.warning("no name server is configured: names are looked up by the system's resolver")

    def resolve(
        self,
        host: str,
        families: Collection[socket.AddressFamily],
        via: LocalAddress | None,
        open_socket: SocketOpener,
        *,
        only_via: bool = False,
        timeout: float | None = None,
    ) -> Resolution:
        """The addresses of ``host`` of the ``families`` wanted.

        ``open_socket(local, server_ip, opener)`` opens a socket through
        ``local``'s link (the module's one device-binding path); with
        ``only_via``, no other link is asked (a check of that link).
        ``timeout``: seconds the lookup may take, if not the resolver's. Raises
        SocksError: HOST_UNREACHABLE for a name with no address,
        ADDRESS_TYPE_NOT_SUPPORTED for one with addresses of other families
        only, TTL_EXPIRED when no server answered.
        """
        if _is_ip(host):
            return Resolution([(_family_of(host), host)])
        self._read_system()
        name = host.rstrip(".").lower()
        known = self._hosts.get(name) or (["127.0.0.1", "::1"] if name == "localhost" else None)
        if known is not None:
            return Resolution(_of_families(host, [(_family_of(ip), ip) for ip in known], families))
        if self.system or (self.given is None and not self._servers):
            return Resolution(_resolve_target(host, 0, families))
        return self._lookup(host, name, families, via, open_socket, only_via, timeout or self.timeout)

    def _lookup(
        self,
        host: str,
        name: str,
        families: Collection[socket.AddressFamily],
        via: LocalAddress | None,
        open_socket: SocketOpener,
        only_via: bool,
        timeout: float,
    ) -> Resolution:
        import dns.exception
        import dns.name

        wanted = [rdtype for family, rdtype in _RDTYPES if family in families]
        if not wanted or self.cache.get(name, wanted[0]) is None:  # a name in the cache was checked already
            try:
                dns.name.from_text(name)
            except (dns.exception.DNSException, ValueError, UnicodeError):
                raise SocksError(Reply.HOST_UNREACHABLE, f"{host}: not a host name") from None
        resolution = Resolution([])
        answers: dict[int, NameAnswer] = {}
        for candidate in self._candidates(name):
            answers = self._answers(candidate, wanted, via, open_socket, resolution, only_via, timeout)
            if any(answer.ips for answer in answers.values()) or not all(a.negative for a in answers.values()):
                break  # found, or a failure that the next search domain would meet too
        found = [(family, ip) for family, rdtype in _RDTYPES if rdtype in answers for ip in answers[rdtype].ips]
        if not found:
            # A failure says more than "no address of this type" beside it.
            answer = min(answers.values(), key=lambda a: a.negative)
            raise SocksError(answer.reply, f"{host}: {answer.error}")
        resolution.targets = found
        return resolution

    def _candidates(self, name: str) -> list[str]:
        """The names to ask, search domains appended as resolv.conf says."""
        conf = self._conf
        if not conf.search or self.given is not None:
            return [name]
        searched = [f"{name}.{domain}" for domain in conf.search]
        return [name, *searched] if name.count(".") >= conf.ndots else [*searched, name]

    def _answers(
        self,
        name: str,
        wanted: list[int],
        via: LocalAddress | None,
        open_socket: SocketOpener,
        resolution: Resolution,
        only_via: bool,
        timeout: float,
    ) -> dict[int, NameAnswer]:
        """The answers for ``name`` of each record type: from the cache, from
        a lookup of the same under way, or asked now. ``only_via`` (a check
        of the link) asks now, through that link: it waits for no other's
        lookup, which could be stuck on another link."""
        if only_via:
            query = _HedgedQuery(self, name, wanted, via, open_socket, resolution)
            return query.run(self.plan(via, only_via=True), timeout)
        answers: dict[int, NameAnswer] = {}
        asking: dict[int, _Lookup] = {}
        waiting: dict[int, _Lookup] = {}
        with self._lock:
            for rdtype in wanted:
                cached = self.cache.get(name, rdtype)
                if cached is not None:
                    answers[rdtype] = cached
                elif (name, rdtype) in self._lookups:
                    waiting[rdtype] = self._lookups[name, rdtype]
                else:
                    asking[rdtype] = self._lookups[name, rdtype] = _Lookup()
        if not asking:
            self._count(via, "cache_hits")
        try:
            if asking:
                query = _HedgedQuery(self, name, list(asking), via, open_socket, resolution)
                answers.update(query.run(self.plan(via), timeout))
        finally:
            with self._lock:
                for rdtype, lookup in asking.items():
                    lookup.answer = answers.get(rdtype)
                    del self._lookups[name, rdtype]
                    lookup.done.set()
        for rdtype, lookup in waiting.items():
            lookup.done.wait(timeout)
            answers[rdtype] = lookup.answer or NameAnswer(
                error="no answer from the name servers", reply=Reply.TTL_EXPIRED
            )
        return answers

    def plan(self, via: LocalAddress | None, *, only_via: bool = False) -> list[tuple[NameServer, LocalAddress | None]]:
        """The queries of a lookup in the order they are sent: (server, the
        local address it is asked through, None for a loopback server).
        ``only_via``: through the link of ``via`` alone.

        The link of ``via`` first, then the others that are up, then those
        that are out; each link asks its own servers first, then those of any
        link; rank by rank: the first server through every link, then the
        second... A server of another link is not asked. Upstream proxies
        ask through the link their connections to the proxy leave by (see
        _query_socket).
        """
        addresses = [] if only_via and via is not None else list(self.addresses())
        links: dict[str, list[LocalAddress]] = {}
        ordered = ([via] if via is not None else []) + sorted(
            addresses, key=lambda a: self.health is not None and self.health.is_out(a)
        )
        for address in ordered:
            links.setdefault(_query_link(address), []).append(address)
        servers = self.servers()
        queues = [_link_queries(members, servers) for members in links.values()]
        if not queues:  # no link yet: loopback servers alone
            queues.append([(server, None) for server in servers if server.loopback])
        plan: list[tuple[NameServer, LocalAddress | None]] = []
        for rank in range(max(map(len, queues), default=0)):
            for queue_ in queues:
                if rank < len(queue_) and queue_[rank] not in plan:
                    plan.append(queue_[rank])
        return plan


def _query_link(address: LocalAddress) -> str:
    """The link a query through ``address`` leaves by, as plan() groups
    them: its interface (or its address); an upstream proxy's +LINK, or ""
    (where the routing table says) for one without."""
    if isinstance(address, ProxyAddress):
        return address.interface or (address.source.ip if address.source is not None else "")
    return address.interface or address.ip


def _query_families(address: LocalAddress) -> frozenset[socket.AddressFamily]:
    """The families of the servers a query through ``address`` can reach:
    its own; an upstream proxy's +LINK address's, or either where the
    query is bound to no address."""
    if not isinstance(address, ProxyAddress):
        return frozenset({address.family})
    if address.source is not None:
        return frozenset({address.source.family})
    return frozenset({socket.AF_INET, socket.AF_INET6})


def _query_socket(
    open_socket: SocketOpener, local: LocalAddress | None, server: NameServer, kind: socket.SocketKind
) -> socket.socket:
    """A non-blocking socket for a query to ``server`` through the link of
    ``local`` (None: on loopback, through no link), not connected yet.

    An upstream proxy as a link has no device of its own: the queries of
    its connections (for names it is not given as they are) leave as the
    connection to the proxy does, from its +LINK (its address, or its
    device), and without one where the routing table says, as the system
    would send them.
    """
    family = _family_of(server.ip)
    if isinstance(local, ProxyAddress):
        if local.source is None and local.interface is not None:
            return open_socket(local, server.ip, functools.partial(_socket_by_device, family, kind))
        local = local.source
    if local is None:
        return _socket_by_device(family, kind, None)
    return open_socket(local, server.ip, functools.partial(_socket_from, local, kind))


def _link_queries(
    members: Sequence[LocalAddress], servers: Sequence[NameServer]
) -> list[tuple[NameServer, LocalAddress | None]]:
    """The queries of one link (its local addresses ``members``): its own
    servers, then those of any link; a loopback one without the link."""
    own = [server for server in servers if any(server.belongs_to(a) for a in members)]
    anyones = [server for server in servers if server.link is None]
    queries: list[tuple[NameServer, LocalAddress | None]] = []
    for server in [*own, *anyones]:
        local = next((a for a in members if _family_of(server.ip) in _query_families(a)), None)
        if server.loopback:
            queries.append((server, None))
        elif local is not None:
            queries.append((server, local))
    return queries


@dataclasses.dataclass
class _Query:
    """One server asked through one link: its socket, the ids asked, when
    it is sent again, and how many datagrams it passed over."""

    server: NameServer
    local: LocalAddress | None
    sock: socket.socket
    started: float
    asked: dict[int, Any]  # query id: the dns.message.Message sent
    resend_at: float = math.inf
    sends: int = 1
    wrong: int = 0


class _HedgedQuery:
    """One lookup of a name's record types: the queries of Resolver.plan(),
    one more each hedge (at once after a failure), the first good answer of
    each type winning. A query unanswered is sent again after DNS_RESEND
    seconds, then twice as long each time, with the same ids: an answer to
    any of its sends is taken. Every answer that is not one (from another
    id, not a response to the question, malformed) is passed over, at most
    DNS_MAX_WRONG_ANSWERS of them a query; a truncated one is asked again
    by TCP through the same link. Nothing holds the lookup past its time."""

    def __init__(
        self,
        resolver: Resolver,
        name: str,
        rdtypes: list[int],
        via: LocalAddress | None,
        open_socket: SocketOpener,
        resolution: Resolution,
    ) -> None:
        self.resolver = resolver
        self.name = name
        self.rdtypes = rdtypes
        self.via = via
        self.open_socket = open_socket
        self.resolution = resolution
        self.answers: dict[int, NameAnswer] = {}
        self.failures: dict[int, NameAnswer] = {}
        self.pending: dict[socket.socket, _Query] = {}
        self.failed: list[tuple[LocalAddress, NameServer, OSError]] = []
        self.next_at = 0.0  # when the next query of the plan goes out
        self.deadline = math.inf
        self.last_error: tuple[NameServer, OSError] | None = None

    def run(self, plan: list[tuple[NameServer, LocalAddress | None]], timeout: float) -> dict[int, NameAnswer]:
        """Ask as ``plan`` says until every type has its answer, or ``timeout`` seconds
        (the queries sent again meanwhile)."""
        start = time.monotonic()
        deadline = self.deadline = start + timeout
        self.next_at = start
        with _selector() as self.selector:
            try:
                while self._unanswered() and time.monotonic() < deadline:
                    now = time.monotonic()
                    if plan and (now >= self.next_at or not self.pending):
                        self.next_at = now + self.resolver.hedge
                        self._ask(*plan.pop(0))
                        continue
                    if not self.pending:
                        break
                    resend_at = min(query.resend_at for query in self.pending.values())
                    until = min(deadline, resend_at, self.next_at if plan else math.inf)
                    for key, _ in self.selector.select(max(0.0, until - time.monotonic())):
                        if isinstance(key.fileobj, socket.socket) and key.fileobj in self.pending:
                            self._receive(self.pending[key.fileobj])
                    now = time.monotonic()
                    for query in list(self.pending.values()):
                        if query.resend_at <= now < deadline and self._unanswered():
                            self._resend(query)
            finally:
                self._end()
        silence = NameAnswer(
            error=f"no answer from the name servers in {time.monotonic() - start:.1f} s", reply=Reply.TTL_EXPIRED
        )
        if self.last_error is not None and not isinstance(self.last_error[1], TimeoutError):
            server, error = self.last_error
            silence = NameAnswer(error=f"no name server reached: {_describe(error)} ({server.describe()})")
        for rdtype in self.rdtypes:
            if rdtype not in self.answers:
                self.answers[rdtype] = self.failures.get(rdtype) or silence
        return self.answers

    def _unanswered(self) -> list[int]:
        return [rdtype for rdtype in self.rdtypes if rdtype not in self.answers]

    def _ask(self, server: NameServer, local: LocalAddress | None) -> None:
        import dns.message
        import dns.rdatatype

        try:
            sock = _query_socket(self.open_socket, local, server, socket.SOCK_DGRAM)
        except OSError as error:
            self._note_failure(server, local, error)
            return
        query = _Query(server, local, sock, time.monotonic(), {})
        query.resend_at = query.started + DNS_RESEND
        try:
            sock.setblocking(False)
            # Connected, the socket hears its server only: an answer from an
            # address that was not asked never reaches it.
            sock.connect((server.ip, server.port))
            for rdtype in self._unanswered():
                message = dns.message.make_query(self.name, dns.rdatatype.RdataType(rdtype))  # a random id
                query.asked[message.id] = message
                self.resolver._carry(local or self.via, sock.send(message.to_wire()), 0)
                self.resolver._count(local or self.via, "queries")
        except OSError as error:
            sock.close()
            self._note_failure(server, local, error)
            return
        if logger.isEnabledFor(logging.DEBUG):
            through = local.describe() if local else "loopback"
            logger.debug("asking %s for %s through %s", server.describe(), self.name, through)
        self.pending[sock] = query
        self.selector.register(sock, selectors.EVENT_READ)

    def _resend(self, query: _Query) -> None:
        """Send the questions of ``query`` still unanswered again, as they
        were (an answer to the first send is as good), and wait twice as
        long for the next time. Counted as queries once, when first sent."""
        query.sends += 1
        query.resend_at = time.monotonic() + DNS_RESEND * 2 ** (query.sends - 1)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("asking %s for %s again (send %d)", query.server.describe(), self.name, query.sends)
        try:
            for sent in query.asked.values():
                if sent.question[0].rdtype not in self.answers:
                    self.resolver._carry(query.local or self.via, query.sock.send(sent.to_wire()), 0)
        except OSError as error:
            self._fail(query, error)

    def _receive(self, query: _Query) -> None:
        import dns.exception
        import dns.flags
        import dns.message

        while query.sock in self.pending:
            if time.monotonic() >= self.deadline:
                return  # datagrams that keep coming must not hold the lookup past its time
            try:
                data = query.sock.recv(UDP_DNS_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # the server's port is closed (ICMP), the link went
                self._fail(query, error)
                return
            self.resolver._carry(query.local or self.via, 0, len(data))
            try:
                message = dns.message.from_wire(data)
            except dns.exception.DNSException as error:
                self._passed_over(query, f"a malformed answer ({error.__class__.__name__})")
                continue
            sent = query.asked.get(message.id)
            if sent is None or not sent.is_response(message):
                self._passed_over(query, "an answer to another query")
                continue
            del query.asked[message.id]
            if message.flags & dns.flags.TC:
                message = self._by_tcp(query, sent)
                if message is None:
                    continue
            self._take(query, sent, message)
            if not query.asked:
                self._close(query)

    def _by_tcp(self, query: _Query, sent: Any) -> Any:
        """Ask ``sent`` again by TCP through the same link: the UDP answer was truncated."""
        import dns.exception
        import dns.query

        server, local = query.server, query.local
        timeout = max(0.1, min(DNS_ATTEMPT_TIMEOUT, self.deadline - time.monotonic()))
        try:
            with _query_socket(self.open_socket, local, server, socket.SOCK_STREAM) as sock:
                error = sock.connect_ex((server.ip, server.port))
                if error and error not in _CONNECT_IN_PROGRESS:
                    raise OSError(error, os.strerror(error))
                _wait_until(sock, selectors.EVENT_WRITE, time.monotonic() + timeout)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
                return dns.query.tcp(sent, server.ip, timeout=timeout, sock=sock)
        except (OSError, dns.exception.DNSException) as error:
            self._passed_over(query, f"a truncated answer, and by TCP: {error or error.__class__.__name__}")
            return None

    def _take(self, query: _Query, sent: Any, message: Any) -> None:
        """Take a server's response to ``sent``: an answer, or the server's failure."""
        import dns.rcode

        rdtype = sent.question[0].rdtype
        rcode = message.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            answer, ttl = _read_answer(message, rdtype, sent.question[0].name)
            if rcode == dns.rcode.NXDOMAIN:
                answer = NameAnswer(error=f"no such name (NXDOMAIN from {query.server.describe()})", negative=True)
            self.resolver.cache.put(self.name, rdtype, answer, ttl)
            if rcode == dns.rcode.NXDOMAIN:  # no type has it: the other types are answered too
                for other in self._unanswered():
                    self.answers[other] = answer
                    self.resolver.cache.put(self.name, other, answer, ttl)
            self.answers[rdtype] = answer
            self._won(query)
            return
        reason = _RCODE_REPLIES.get(rcode, f"the name server answered {dns.rcode.to_text(rcode)}")
        self.failures[rdtype] = NameAnswer(error=f"{reason}: {query.server.describe()}")
        self._fail(query, OSError(errno.EPROTO, reason))

    def _won(self, query: _Query) -> None:
        """A good answer came: the queries of other links to the same server
        that went unanswered are the resolution's silent links; those silent
        for ``evidence_after``, and those that failed, are evidence against
        their links."""
        local = query.local
        if local is None:
            return
        self.resolution.answered_by = self.resolution.answered_by or local
        now = time.monotonic()
        against: list[tuple[LocalAddress, OSError]] = []
        for other in self.pending.values():
            if other.local is not None and other.local != local and other.server == query.server:
                if other.local not in self.resolution.silent:
                    self.resolution.silent.append(other.local)
                if now - other.started >= self.resolver.evidence_after:
                    against.append(
                        (
                            other.local,
                            TimeoutError(
                                errno.ETIMEDOUT, f"no DNS answer in {now - other.started:.1f} s; {local.ip} got one"
                            ),
                        )
                    )
        for failed_local, server, error in self.failed:
            if failed_local != local and server == query.server and _is_link_failure(error):
                against.append((failed_local, error))
                if failed_local not in self.resolution.silent:
                    self.resolution.silent.append(failed_local)
        if against and self.resolver.health is not None:
            self.resolver.health.connected_through(local, against, (query.server.ip, query.server.port))

    def _passed_over(self, query: _Query, what: str) -> None:
        """A datagram that answers nothing asked: logged (at most every
        DNS_LOG_INTERVAL), and past DNS_MAX_WRONG_ANSWERS the query is
        given up. The query counts as failed once, when it ends unanswered."""
        query.wrong += 1
        self.resolver._log_passed_over(what, query.server, self.name)
        if query.wrong >= DNS_MAX_WRONG_ANSWERS:
            self._fail(query, TimeoutError(errno.ETIMEDOUT, f"{query.wrong} datagrams, none an answer"))

    def _fail(self, query: _Query, error: OSError) -> None:
        self._close(query)
        self._note_failure(query.server, query.local, error)

    def _note_failure(self, server: NameServer, local: LocalAddress | None, error: OSError) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("asking %s for %s failed: %s", server.describe(), self.name, _describe(error))
        self.resolver._count(local or self.via, "failures")
        self.next_at = 0.0  # a failure is no reason to wait for the hedge
        self.last_error = (server, error)
        if local is not None:
            self.failed.append((local, server, error))

    def _close(self, query: _Query) -> None:
        if self.pending.pop(query.sock, None) is not None:
            self.selector.unregister(query.sock)
        query.sock.close()

    def _end(self) -> None:
        """Close the queries still waiting; those silent past the hedge, and
        those that got only datagrams passed over, count as failed (once)."""
        now = time.monotonic()
        for query in list(self.pending.values()):
            if now - query.started >= self.resolver.hedge or query.wrong:
                self.resolver._count(query.local or self.via, "failures")
                if query.local is not None and query.local not in self.resolution.silent:
                    self.resolution.silent.append(query.local)
            self._close(query)


def _read_answer(message: Any, rdtype: int, qname: Any) -> tuple[NameAnswer, float]:
    """The addresses of ``rdtype`` a response gives for ``qname`` (its
    CNAMEs followed), and the seconds they may be kept: the least TTL of
    the chain, or for none the negative TTL (RFC 2308: the SOA's own TTL or
    its minimum, whichever is less), at most DNS_NEGATIVE_TTL."""
    import dns.rdatatype

    name = qname
    ttls: list[float] = []
    for _ in range(16):  # a CNAME chain longer than this is a loop
        chained = next(
            (rrset for rrset in message.answer if rrset.name == name and rrset.rdtype == dns.rdatatype.CNAME), None
        )
        if chained is None:
            break
        ttls.append(chained.ttl)
        name = chained[0].target
    found = next((rrset for rrset in message.answer if rrset.name == name and rrset.rdtype == rdtype), None)
    if found is not None and len(found):
        ttl = min([*ttls, found.ttl, DNS_MAX_TTL])
        return NameAnswer(tuple(rdata.address for rdata in found)), ttl
    soa = next((rrset for rrset in message.authority if rrset.rdtype == dns.rdatatype.SOA), None)
    ttl = min(soa.ttl, soa[0].minimum, DNS_NEGATIVE_TTL) if soa is not None and len(soa) else 0
    family = "IPv6" if rdtype == 28 else "IPv4"
    return NameAnswer(error=f"no {family} address", negative=True), ttl


# ---------------------------------------------------------------------------
# Proxy links: connecting through another proxy, bonds' subflow counters
# ---------------------------------------------------------------------------

# A connection through a ProxyAddress connects to the proxy (from the link it
# is reached by), then runs the client handshake of its protocol (see the
# proxy clients, above). The race drives the handshake on its
# non-blocking socket; retests and UDP associations wait for it.


class _ProxyHandshake:
    """A client handshake with an upstream proxy on a non-blocking socket,
    taken as far as the socket allows at each ``advance()``. It never reads
    past the proxy's reply: what follows is the target's."""

    __slots__ = ("steps", "step", "pending", "received", "bound")

    def __init__(self, steps: ClientHandshake) -> None:
        self.steps = steps
        self.received = bytearray()
        self.bound: tuple[str, int] = ("0.0.0.0", 0)
        self.step = next(steps)
        self.pending = memoryview(self.step.data if isinstance(self.step, SendStep) else b"")

    @property
    def events(self) -> int:
        """What the socket must be ready for to go on."""
        return selectors.EVENT_WRITE if isinstance(self.step, SendStep) else selectors.EVENT_READ

    def advance(self, sock: socket.socket) -> bool:
        """Go on as far as ``sock`` allows; True once the proxy has said yes.

        Raises the error of the proxy's refusal, or ProxyLinkError where it
        hangs up or breaks its protocol.
        """
        while True:
            got = self._io(sock)
            if got is None:
                return False
            try:
                self.step = self.steps.send(got)
            except StopIteration as done:
                self.bound = done.value
                return True
            if isinstance(self.step, SendStep):
                self.pending = memoryview(self.step.data)

    def _io(self, sock: socket.socket) -> bytes | None:
        """The I/O of the step under way: what it received once done (b""
        for a send), None while the socket is not ready."""
        step = self.step
        try:
            if isinstance(step, SendStep):
                while self.pending:
                    self.pending = self.pending[sock.send(self.pending) :]
            elif isinstance(step, ReceiveStep):
                while len(self.received) < step.size:
                    self.received += self._some(sock.recv(step.size - len(self.received)))
            else:
                self._receive_head(sock, step.limit)
        except (BlockingIOError, InterruptedError):
            return None
        except ProxyLinkError:
            raise
        except OSError as error:
            raise ProxyLinkError(Reply.GENERAL_FAILURE, f"the upstream proxy: {_describe(error)}") from None
        got, self.received = bytes(self.received), bytearray()
        return got

    @staticmethod
    def _some(data: bytes) -> bytes:
        if not data:
            raise ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy hung up in its handshake")
        return data

    def _receive_head(self, sock: socket.socket, limit: int) -> None:
        """Receive up to the blank line that ends a head: what is there is
        peeked at, and only the head taken."""
        while True:
            peeked = self._some(sock.recv(limit - len(self.received), socket.MSG_PEEK))
            start = max(0, len(self.received) - 3)
            end = (bytes(self.received[start:]) + peeked).find(b"\r\n\r\n")
            if end >= 0:
                wanted = start + end + 4
                while len(self.received) < wanted:
                    self.received += self._some(sock.recv(wanted - len(self.received)))
                return
            if len(self.received) + len(peeked) >= limit:
                raise ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy's answer has no end")
            self.received += self._some(sock.recv(len(peeked)))


def _handshake_by(sock: socket.socket, steps: ClientHandshake, deadline: float) -> tuple[str, int]:
    """Run a client handshake on a non-blocking socket until ``deadline``;
    return the address the proxy bound."""
    handshake = _ProxyHandshake(steps)
    while not handshake.advance(sock):
        _wait_until(sock, handshake.events, deadline)
    return handshake.bound


def _proxy_steps(
    address: ProxyAddress, host: str, port: int, via: Sequence[str], command: Command = Command.CONNECT
) -> ClientHandshake:
    """The client handshake asking the proxy of ``address`` for (host, port);
    an HTTP proxy is told ``via`` (see http_connect_client)."""
    proxy = address.proxy
    if proxy.scheme.startswith("socks5"):
        return socks5_client(host, port, proxy.login, command)
    if proxy.scheme.startswith("socks4"):
        return socks4_client(host, port, proxy.user)
    return http_connect_client(host, port, proxy.login, via)


def _proxy_endpoint(address: ProxyAddress) -> Target:
    """The (ip, port) of the proxy of ``address``; its name is resolved here,
    to the family of the source address it is reached from, if any."""
    proxy = address.proxy
    families = {address.source.family} if address.source else {socket.AF_INET, socket.AF_INET6}
    try:
        return _resolve_target(proxy.host, proxy.port, families)[0][1], proxy.port
    except OSError as error:
        raise ProxyLinkError(Reply.HOST_UNREACHABLE, f"the upstream proxy {proxy.host}: {_describe(error)}") from None


def _proxy_unreachable(error: OSError) -> OSError:
    """The error of a connect to an upstream proxy that failed: the link's
    failure, whatever the OS called it (a refusal by the proxy's host is no
    answer of the target's)."""
    if isinstance(error, (ProxyLinkError, TimeoutError)):
        return error
    return ProxyLinkError(Reply.HOST_UNREACHABLE, f"the upstream proxy: {_describe(error)}")


# What each subflow of a bonded connection carried: the kernel fills an array
# of its own structs after a header (struct mptcp_subflow_data) the caller
# fills in first, which Python's getsockopt() cannot pass; libc's can. The
# counters are read while the connection is open: a closed subflow's are 0.
_SUBFLOW_DATA = struct.Struct("=IIII")  # size_subflow_data, num_subflows, size_kernel, size_user
_TCP_INFO_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked (sent), tcpi_bytes_received
_TCP_INFO_BYTES_AT = 120
_SUBFLOW_ADDRS_SIZE = 256  # struct mptcp_subflow_addrs: two sockaddr_storage
_MOST_SUBFLOWS_READ = 16


def _subflow_array(sock: socket.socket, option: int, element: int) -> list[bytes]:
    """The array ``option`` (MPTCP_TCPINFO, MPTCP_SUBFLOW_ADDRS) of ``sock``, an element a subflow."""
    import ctypes

    size = _SUBFLOW_DATA.size + element * _MOST_SUBFLOWS_READ
    buffer = ctypes.create_string_buffer(_SUBFLOW_DATA.pack(_SUBFLOW_DATA.size, 0, 0, element), size)
    length = ctypes.c_uint32(size)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.getsockopt(sock.fileno(), _SOL_MPTCP, option, buffer, ctypes.byref(length)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    _, count, _, stride = _SUBFLOW_DATA.unpack_from(buffer.raw)
    start = _SUBFLOW_DATA.size
    return [buffer.raw[start + i * stride : start + (i + 1) * stride] for i in range(min(count, _MOST_SUBFLOWS_READ))]


def subflow_counters(sock: socket.socket) -> dict[str, tuple[int, int]]:
    """Bytes each subflow of a Multipath TCP connection sent and received,
    by its local address; {} where the kernel does not tell (or off Linux)."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        infos = _subflow_array(sock, _MPTCP_TCPINFO, _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size)
        addresses = _subflow_array(sock, _MPTCP_SUBFLOW_ADDRS, _SUBFLOW_ADDRS_SIZE)
    except OSError:
        return {}
    counters: dict[str, tuple[int, int]] = {}
    for info, address in zip(infos, addresses):
        if len(info) < _TCP_INFO_BYTES_AT + _TCP_INFO_BYTES.size or len(address) < 24:
            continue
        family = struct.unpack_from("=H", address)[0]
        if family == socket.AF_INET:
            ip = socket.inet_ntop(socket.AF_INET, address[4:8])
        elif family == socket.AF_INET6:
            ip = socket.inet_ntop(socket.AF_INET6, address[8:24])
        else:
            continue
        if ipaddress.ip_address(ip).is_unspecified:  # a subflow closed already
            continue
        sent, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_AT)
        before = counters.get(ip, (0, 0))
        counters[ip] = (before[0] + sent, before[1] + received)
    return counters


class BondCounters:
    """What the connections through bonded links (``mptcp+``) were: whether
    each link's last one was Multipath TCP or fell back to TCP
    (``fallback``), and what each interface carried of them (``carried``:
    (up, down) bytes by interface name, by link)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fallback: dict[LocalAddress, bool] = {}
        self.carried: dict[LocalAddress, dict[str, tuple[int, int]]] = {}
        self._interface_names: dict[str, str] = {}  # by local IP address, as last read
        self._moved: dict[str, tuple[int, int]] = {}  # by local IP address, since taken

    def moved(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """Note what subflows moved lately (``counts``: (up, down) bytes by
        local IP address), for the rows of those addresses' links."""
        with self._lock:
            for ip, (up, down) in counts.items():
                before = self._moved.get(ip, (0, 0))
                self._moved[ip] = (before[0] + up, before[1] + down)

    def take_moved(self) -> dict[str, tuple[int, int]]:
        """What subflows moved since the last call, by local IP address."""
        with self._lock:
            moved, self._moved = self._moved, {}
        return moved

    def connected(self, address: LocalAddress, sock: socket.socket) -> None:
        """Note whether a connection through a bonded link is Multipath TCP
        or fell back to one TCP subflow (the proxy's side does not speak it,
        or a middlebox stripped the option): logged when that changes."""
        if not (isinstance(address, ProxyAddress) and address.proxy.bonded):
            return
        try:
            fallback = not sock.getsockopt(socket.IPPROTO_TCP, _TCP_IS_MPTCP)
        except OSError:
            fallback = True
        with self._lock:
            before = self.fallback.get(address)
            self.fallback[address] = fallback
        if fallback and before is not True:
            logger.warning(
                "bond %s: fallback to one TCP subflow (the proxy or the path does not speak MPTCP); "
                "it carries on as one link",
                address.describe(),
            )
        elif not fallback and before:
            logger.info("bond %s: Multipath TCP again", address.describe())

    def carried_by(self, address: LocalAddress, counters: Mapping[str, tuple[int, int]]) -> str:
        """Add what one connection's subflows carried (``counters``: (up,
        down) bytes by local IP address) to its bonded link's, by interface;
        return the shares as its log line says them ("eth0 61%, wlan0 39%")."""
        carried: dict[str, tuple[int, int]] = {}
        for ip, (up, down) in counters.items():
            name = self._interface_name(ip)
            before = carried.get(name, (0, 0))
            carried[name] = (before[0] + up, before[1] + down)
        with self._lock:
            totals = self.carried.setdefault(address, {})
            for name, (up, down) in carried.items():
                before = totals.get(name, (0, 0))
                totals[name] = (before[0] + up, before[1] + down)
        whole = sum(up + down for up, down in carried.values())
        shares = sorted(((up + down) / whole, name) for name, (up, down) in carried.items()) if whole else []
        return ", ".join(f"{name} {share:.0%}" for share, name in reversed(shares))

    def snapshot(self) -> tuple[dict[LocalAddress, bool], dict[LocalAddress, dict[str, tuple[int, int]]]]:
        """Copies of ``fallback`` and ``carried``, as they are now."""
        with self._lock:
            return dict(self.fallback), {address: dict(by_name) for address, by_name in self.carried.items()}

    def _interface_name(self, ip: str) -> str:
        """The interface holding ``ip`` (the address itself where none is known)."""
        name = self._interface_names.get(ip)
        if name is None:
            try:
                name = _interface_of(ip, _interfaces()) or ip
            except (OSError, AddressError):
                name = ip
            self._interface_names[ip] = name
        return name


def in_shares(counters: Mapping[str, tuple[int, int]], up: int, down: int) -> dict[str, tuple[int, int]]:
    """``up`` and ``down`` bytes shared out as ``counters`` (by local IP
    address, read last while the connection was open) share theirs."""
    seen_up, seen_down = sum(c[0] for c in counters.values()), sum(c[1] for c in counters.values())
    return {
        ip: (round(up * sent / seen_up) if seen_up else 0, round(down * received / seen_down) if seen_down else 0)
        for ip, (sent, received) in counters.items()
    }


def upstream_relay_address(proxy_ip: str, named: tuple[str, int]) -> Target:
    """Where datagrams go through a SOCKS5 proxy at ``proxy_ip`` whose UDP
    ASSOCIATE reply ``named`` its relay (RFC 1928, 7): that address, or the
    proxy's own where it names the unspecified one (0.0.0.0 or ::, as many
    proxies do). Raises ProxyLinkError, saying why, for a relay named by a
    name, at port 0, at a multicast or broadcast address, or on loopback by
    a proxy that is not on loopback itself: that would be this machine's
    own services, sent the clients' datagrams."""
    host, port = named
    try:
        relay = _client_ip(host)  # as an address of a client is read: ::ffff:127.0.0.1 is 127.0.0.1
    except ValueError:
        raise ProxyLinkError(
            Reply.GENERAL_FAILURE, f"the upstream proxy named its UDP relay by a name ({host!r}), not an address"
        ) from None
    why = ""
    if port == 0:
        why = "at port 0"
    elif relay.is_unspecified:
        return proxy_ip, port
    elif _is_multicast_or_broadcast(relay):
        why = "at a multicast or broadcast address"
    elif relay.is_loopback and not _client_ip(proxy_ip).is_loopback:
        why = "on this machine's loopback, while the proxy is not on loopback"
    if why:
        raise ProxyLinkError(
            Reply.GENERAL_FAILURE, f"the upstream proxy named its UDP relay {_format_endpoint(host, port)} {why}"
        )
    return str(relay), port  # as datagrams from it are told apart: ::ffff:a.b.c.d as a.b.c.d


def takes_absolute_form(local: LocalAddress) -> bool:
    """Whether connections for plain HTTP requests from ``local`` go to an
    HTTP proxy, which takes them in absolute form (no CONNECT)."""
    return isinstance(local, ProxyAddress) and local.proxy.scheme == "http"


def absolute_form_head(local: LocalAddress, host: str, port: int, head: bytes) -> bytes:
    """``head``, a request head in origin form for (host, port), as it goes
    out from ``local``: to an HTTP upstream proxy in absolute form
    (``GET http://host/path``) with the proxy's login; elsewhere as it is."""
    if not isinstance(local, ProxyAddress) or not takes_absolute_form(local):
        return head
    line, _, rest = head.partition(b"\r\n")
    method, path, version = line.split(b" ", 2)
    authority = f"[{host}]" if port == 80 and ":" in host else host if port == 80 else _format_endpoint(host, port)
    login = local.proxy.login
    if login is not None:
        rest = f"Proxy-Authorization: {basic_authorization(*login)}\r\n".encode() + rest
    return b" ".join([method, b"http://" + authority.encode("ascii") + path, version]) + b"\r\n" + rest


# ---------------------------------------------------------------------------
# Connect: the hedged connect with failover, and the lease
# ---------------------------------------------------------------------------

# A name's owner chooses how many addresses it has, and where: a connection
# tries the first MAX_CONNECT_ADDRESSES of them (as Squid's forward_max_tries),
# each for up to the connect timeout, and all of them, the lookup included,
# for CONNECT_TIMEOUTS_IN_ALL connect timeouts at most.
MAX_CONNECT_ADDRESSES = 25
CONNECT_TIMEOUTS_IN_ALL = 3


class _ClientHungUpError(ConnectionResetError):
    """The client left while its connection was being made: nothing more is tried."""

    def __init__(self) -> None:
        super().__init__(errno.ECONNRESET, "the client hung up while connecting")


class UpstreamLease:
    """An upstream socket and the local address it leaves from.

    Closing it (or leaving its ``with`` block) closes the socket and counts
    the connection closed, once.
    """

    __slots__ = ("sock", "local", "_release")

    def __init__(self, sock: socket.socket, local: LocalAddress, release: Callable[[UpstreamLease], None]) -> None:
        self.sock = sock
        self.local = local
        self._release: Callable[[UpstreamLease], None] | None = release

    def close(self) -> None:
        """Close the socket and count the connection closed; again does nothing."""
        release, self._release = self._release, None
        if release is not None:
            release(self)
            self.sock.close()

    def __enter__(self) -> UpstreamLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProxiedUdpLease(UpstreamLease):
    """A UDP socket whose datagrams go through an upstream SOCKS5 proxy: to
    its ``relay`` with the SOCKS5 UDP header, in the association that its TCP
    ``control`` connection holds open. ``passes_names``: target names go to
    the proxy as they are."""

    __slots__ = ("control", "relay", "passes_names")

    def __init__(self, lease: UpstreamLease, control: socket.socket, relay_address: Target, passes_names: bool) -> None:
        super().__init__(lease.sock, lease.local, lease._release or (lambda lease: None))
        self.control = control
        self.relay = relay_address
        self.passes_names = passes_names

    def send_to(self, data: bytes, host: str, port: int) -> None:
        """Send ``data`` to (host, port) through the proxy."""
        self.sock.sendto(encode_udp_header(host, port) + data, self.relay)

    def receive(self) -> tuple[bytes, Target]:
        """The next datagram from the proxy's relay and the target it came
        from; SocksError for one that is not a whole SOCKS5 UDP datagram,
        or not from the relay."""
        datagram, sender = self.sock.recvfrom(UDP_BUFFER_SIZE)
        if _split_host(sender) != self.relay:
            raise SocksError(Reply.GENERAL_FAILURE, "a datagram from another sender than the relay")
        fragment, host, port, data = parse_udp_datagram(datagram)
        if fragment:
            raise SocksError(Reply.GENERAL_FAILURE, "a fragment")
        return data, (host, port)

    def close(self) -> None:
        """Close the socket and the association."""
        super().close()
        self.control.close()


class Upstream:
    """Makes the connections to targets: from the address the balancer
    chooses, bound to its device, failing over to other addresses when a
    link fails, and racing another link when one is slow to answer. Every
    socket it hands out is in an UpstreamLease, and ``close_all()`` shuts
    down those still open (at shutdown).

    ``hedge``: seconds a connect may go unanswered before the same connect
    starts from another address, the first to get through winning (0: never).
    ``resolver`` looks names up (through the links); None leaves them to the
    system's resolver. ``access`` says which targets a client from another
    machine is refused (AccessPolicy.refuses_target); None refuses those of
    AccessPolicy().

    ``pseudonym`` is the name this proxy gives itself in the Via field of
    what it sends on (RFC 9110, 7.6.3): one of its own, made up for each
    Upstream, so that a request that comes back to it is known for a loop
    and nobody else's Via is taken for its own.
    """

    def __init__(
        self,
        balancer: Balancer,
        meter: Meter,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        hedge: float = DEFAULT_HEDGE,
        resolver: Resolver | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        self.balancer = balancer
        self.health = balancer.health
        self.meter = meter
        self.connect_timeout = connect_timeout
        self.hedge = hedge
        self.resolver = resolver or Resolver(system=True)
        self.pseudonym = f"dispatch-{os.urandom(4).hex()}"
        self.access = access or AccessPolicy()
        # Where the proxy listens, once it does: a client may ask for the
        # proxy itself (a page, in absolute form), which it reaches anyway.
        self.listening: Target | None = None
        self._unlogged_refusals = 0
        self._last_refusal_log = -math.inf
        self._device_binding_refused = False
        self._warned: set[str] = set()
        self._proxy_faults: dict[LocalAddress, str] = {}  # the last failure of each proxy link, told once
        self.bond_counters = BondCounters()
        self._lock = threading.Lock()
        # Each open socket: the address it leaves from, and the target's host as named.
        self._open: dict[socket.socket, tuple[LocalAddress, str]] = {}
        self._closing = False

    def connect(
        self,
        host: str,
        port: int,
        on_attempt: Callable[[LocalAddress], None] = lambda local: None,
        client: str | None = None,
        absolute_form: bool = False,
        hops: Sequence[str] = (),
        client_socket: socket.socket | None = None,
        site: str | None = None,
    ) -> UpstreamLease:
        """Connect to (host, port) from a dispatched local address.

        When the link of the chosen address fails (unreachable, down, timed
        out...) or is slow, other addresses of the family are tried, and
        those that failed are out once another one has got through. Each
        address of a name is tried in turn until one connects (a name may
        resolve to ::1 first while only 127.0.0.1 listens): the first
        MAX_CONNECT_ADDRESSES, each for up to the connect timeout, within
        CONNECT_TIMEOUTS_IN_ALL connect timeouts in all, the lookup
        included. ``on_attempt`` hears of each local address tried;
        ``client`` (an IP address) is who asks, for sticky sites and for the
        targets only this machine may reach (admit_target; None: this
        machine asks). ``absolute_form``: the connection is for plain HTTP
        requests, which an HTTP upstream proxy takes as they are (in
        absolute form) with no CONNECT. ``hops``: the Via of the request the
        connection is for, which an HTTP proxy's CONNECT carries on.
        ``client_socket``: the client's connection; when it hangs up,
        nothing more is tried (ConnectionResetError). ``site``: the name a
        connection to an address is for, where it is known (transparent
        mode), for sticky sites. Raises the last error.
        """
        deadline = time.monotonic() + CONNECT_TIMEOUTS_IN_ALL * self.connect_timeout
        affinity = None
        if client is not None and self.balancer.sticky is not None:
            affinity = Affinity(client, registrable_domain(site or host))
        families = self.balancer.families
        if not families:
            raise SocksError(Reply.NETWORK_UNREACHABLE, "no link has an address yet")
        error: OSError | None = None
        targets, first = self._allowed(client, (host, port), absolute_form, *self._targets(host, families, affinity))
        tried = 0
        try:
            for family, ip in targets[:MAX_CONNECT_ADDRESSES]:
                if time.monotonic() >= deadline:
                    break
                tried += 1
                lead, first = (first, None) if first is not None and family in first.serves else (None, first)
                race = _Race(self, family, (ip, port), affinity, on_attempt, host, absolute_form, first=lead, hops=hops)
                try:
                    return race.run(deadline, client_socket)
                except _ClientHungUpError:
                    raise
                except OSError as failure:
                    error = failure
                # No address reached this target: nothing says the links are to
                # blame (the target may be down), so none is made out.
        finally:
            if first is not None:
                self.balancer.release(first)
        if not targets:  # a name for the proxies that take names alone
            race = _Race(self, socket.AF_UNSPEC, (host, port), affinity, on_attempt, host, absolute_form, hops=hops)
            return race.run(deadline, client_socket)
        if time.monotonic() >= deadline:
            seconds = CONNECT_TIMEOUTS_IN_ALL * self.connect_timeout
            error = TimeoutError(
                errno.ETIMEDOUT, f"timed out: {tried} of {len(targets)} addresses tried in {seconds:g} s"
            )
        raise error or SocksError(Reply.HOST_UNREACHABLE)

    def _targets(
        self, host: str, families: Collection[socket.AddressFamily], affinity: Affinity | None
    ) -> tuple[list[tuple[socket.AddressFamily, str]], LocalAddress | None]:
        """The (family, ip) pairs to race for, and the link whose query
        found them (see _resolve_for_connect); none for a name that only
        upstream proxies that take names are given: where every link takes
        names, or where it cannot be resolved here (a name only the far end
        knows, as Tor's .onion)."""
        if _is_ip(host) or not self.balancer.passes_names:
            return self._resolve_for_connect(host, families, affinity)
        if not self.balancer.resolves_names:
            return [], None
        try:
            return self._resolve_for_connect(host, families, affinity)
        except OSError:
            return [], None

    def _allowed(
        self,
        client: str | None,
        target: Target,
        absolute_form: bool,
        targets: list[tuple[socket.AddressFamily, str]],
        first: LocalAddress | None,
    ) -> tuple[list[tuple[socket.AddressFamily, str]], LocalAddress | None]:
        """``targets``, the addresses of ``target`` (host, port), without
        those ``client`` is refused (for plain HTTP requests where
        ``absolute_form``), and ``first``; where that leaves none, ``first``
        is given back and the refusal raised (admit_target). A name that
        only an upstream proxy looks up (no targets) is its host's to judge."""
        host, port = target
        allowed = [(family, ip) for family, ip in targets if not self.refuses(client, ip, port, absolute_form)]
        if targets and not allowed:
            if first is not None:
                self.balancer.release(first)
            raise self._refusal(client, host, targets[0][1])
        return allowed, first

    def refuses(self, client: str | None, ip: str, port: int, absolute_form: bool = False) -> bool:
        """Whether ``client`` (an IP address; None: this machine) is refused
        the target (``ip``, ``port``): see AccessPolicy.refuses_target. The
        proxy itself (``listening``) is not refused plain HTTP requests
        (``absolute_form``: its pages): they reach it in origin form, which
        it answers only with its pages, and with a Via that stops it from
        passing them on. A tunnel to it (a CONNECT, SOCKS or HTTP) is
        refused: through it the client would speak to the proxy from this
        machine's own address, which may reach everything."""
        if client is None or not self.access.refuses_target(client, ip, is_own_address):
            return False
        return not (absolute_form and self._is_this_proxy(ip, port))

    def _is_this_proxy(self, ip: str, port: int) -> bool:
        """Whether a TCP connection to (``ip``, ``port``) reaches the listener."""
        if self.listening is None or port != self.listening[1]:
            return False
        listening, target = _client_ip(self.listening[0]), _client_ip(ip)
        if listening.is_unspecified:  # every address of this machine, of its family (:: takes IPv4 too)
            of_family = listening.version == 6 or target.version == 4
            return of_family and (target.is_loopback or is_own_address(target))
        return target == listening

    def admit_target(self, client: str | None, host: str, ip: str, port: int) -> None:
        """Raise SocksError(NOT_ALLOWED) if ``client`` is refused (``ip``,
        ``port``), ``ip`` the address of ``host`` as the client named it
        (see refuses); logged at most once every TARGET_REFUSAL_LOG_INTERVAL,
        with a count of the refusals passed over. Every way to a target asks
        here, or refuses(): a CONNECT, a forwarded request, a UDP datagram."""
        if self.refuses(client, ip, port):
            raise self._refusal(client, host, ip)

    def _refusal(self, client: str | None, host: str, ip: str) -> SocksError:
        """The error that refuses ``client`` the target ``ip`` (``host``), logged as admit_target says."""
        named = host if host == ip else f"{host} ({ip})"
        why = "only this machine may reach it (loopback, link-local or an address of its own)"
        with self._lock:
            self._unlogged_refusals += 1
            now = time.monotonic()
            told = now - self._last_refusal_log >= TARGET_REFUSAL_LOG_INTERVAL
            if told:
                others, self._unlogged_refusals = self._unlogged_refusals - 1, 0
                self._last_refusal_log = now
        if told:
            more = f" ({others} more refused since the last such line)" if others else ""
            logger.warning("refused %s the target %s: %s; --allow-target opens it%s", client, named, why, more)
        return SocksError(Reply.NOT_ALLOWED, f"{named}: {why}")

    def _resolve_for_connect(
        self, host: str, families: Collection[socket.AddressFamily], affinity: Affinity | None
    ) -> tuple[list[tuple[socket.AddressFamily, str]], LocalAddress | None]:
        """The addresses of ``host``, and the local address (taken from the
        balancer) whose link asked for them, for the connection to start
        from; None for an IP address or where names are not asked through
        the links. When that link's query went unanswered while another
        link's got through, the connection starts from another link."""
        if _is_ip(host) or not self.resolver.through_links:
            return self.resolver.resolve(host, families, None, self._with_device).targets, None
        family = socket.AF_INET if socket.AF_INET in families else socket.AF_INET6
        chosen = self.balancer.next(family, affinity)
        try:
            resolution = self.resolver.resolve(host, families, chosen, self._with_device)
        except BaseException:
            self.balancer.release(chosen)
            raise
        if chosen not in resolution.silent:
            return resolution.targets, chosen
        self.balancer.release(chosen)
        return resolution.targets, self.balancer.choose(family, resolution.silent, affinity, racing=True)

    def resolve(
        self, host: str, families: Collection[socket.AddressFamily], via: LocalAddress | None
    ) -> list[tuple[socket.AddressFamily, str]]:
        """The addresses of ``host`` of ``families``, asked through ``via``'s link first."""
        return self.resolver.resolve(host, families, via, self._with_device).targets

    def open_udp(self, family: socket.AddressFamily) -> UpstreamLease:
        """A UDP socket from a dispatched local address of ``family`` (or of
        the only family there is), bound to its device where the system
        allows it, unless the address is a loopback one."""
        families = self.balancer.families
        if family not in families and families:
            (family,) = families
        local = self._udp_link(family)
        if isinstance(local, ProxyAddress):
            try:
                return self._open_udp_through(local)
            except OSError as error:
                self.balancer.release(local)
                if isinstance(error, ProxyLinkError):
                    self.proxy_failed(local, error)
                if _is_link_failure(error):  # the next association goes by another link
                    self.meter.failed(local)
                    self.health.sit_out(local, error)
                raise
        # Datagrams may go to any target. Those from a loopback address go
        # to loopback ones, which a device-bound socket could not reach; the
        # address itself stands for them.
        try:
            sock = self._with_device(local, local.ip, functools.partial(_socket_from, local, socket.SOCK_DGRAM))
        except OSError:
            self.balancer.release(local)
            raise
        return self.lease(sock, local)

    def _udp_link(self, family: socket.AddressFamily) -> LocalAddress:
        """The link of a UDP association: the balancer's choice among those
        that carry UDP (no upstream proxy but SOCKS5 does). Raises
        SocksError(COMMAND_NOT_SUPPORTED) naming those that cannot."""
        unable: list[LocalAddress] = []
        local: LocalAddress | None = self.balancer.next(family)
        while isinstance(local, ProxyAddress) and not local.proxy.carries_udp:
            unable.append(local)
            self.balancer.release(local)
            local = self.balancer.choose(family, unable)
        if local is None:
            names = ", ".join(address.describe() for address in unable)
            raise SocksError(
                Reply.COMMAND_NOT_SUPPORTED, f"no link carries UDP: {names} cannot (only SOCKS5 proxies relay UDP)"
            )
        return local

    def _open_udp_through(self, address: ProxyAddress) -> ProxiedUdpLease:
        """A UDP association through the SOCKS5 proxy of ``address``: its
        own UDP ASSOCIATE, and a UDP socket from the address the TCP
        connection left from (a proxy may take datagrams only from there)."""
        control, relay_address = self.connect_through(
            address, "0.0.0.0", 0, time.monotonic() + self.connect_timeout, Command.UDP_ASSOCIATE
        )
        try:
            relay_ip, relay_port = upstream_relay_address(_split_host(control.getpeername())[0], relay_address)
            source = LocalAddress(_split_host(control.getsockname())[0], interface=address.interface)
            sock = (
                self._with_device(source, relay_ip, functools.partial(_socket_from, source, socket.SOCK_DGRAM))
                if address.interface is not None
                else _socket_from(source, socket.SOCK_DGRAM, None)
            )
        except BaseException:
            control.close()
            raise
        return ProxiedUdpLease(self.lease(sock, address), control, (relay_ip, relay_port), address.proxy.passes_names)

    def probe(self, local: LocalAddress, target: Target, timeout: float) -> OSError | None:
        """Connect from ``local`` to ``target`` and hang up, as a retest or a
        check does; None if the link got an answer (a refusal is one). A
        name is looked up through ``local``'s link alone."""
        try:
            deadline = time.monotonic() + timeout
            if not _is_ip(target[0]) and not (isinstance(local, ProxyAddress) and local.proxy.passes_names):
                resolution = self.resolver.resolve(
                    target[0],
                    local.serves - {socket.AF_UNSPEC},
                    local,
                    self._with_device,
                    only_via=True,
                    timeout=timeout,
                )
                target = (resolution.targets[0][1], target[1])
            if isinstance(local, ProxyAddress):
                opened, _ = self.connect_through(local, *target, deadline)
            else:
                connect = functools.partial(_connect_from, local, *target, max(0.0, deadline - time.monotonic()))
                opened = self._with_device(local, target[0], connect)
        except OSError as error:
            return None if _is_target_answer(error) else error
        opened.close()
        return None

    def open_attempt(self, local: LocalAddress, target: Target) -> socket.socket:
        """A socket from ``local`` whose connect to ``target`` is under way
        (to its proxy, for a ProxyAddress)."""
        if isinstance(local, ProxyAddress):
            return self._open_to_proxy(local)
        return self._with_device(local, target[0], functools.partial(_start_connect, local, target))

    def _open_to_proxy(self, address: ProxyAddress) -> socket.socket:
        """A socket whose connect to the proxy of ``address`` is under way,
        from its source address and device, where it names them."""
        target = _proxy_endpoint(address)
        source = address.source
        try:
            if address.proxy.bonded:
                return _start_connect_by_device(target, None, _IPPROTO_MPTCP)
            if source is not None:
                return self._with_device(source, target[0], functools.partial(_start_connect, source, target))
            if address.interface is not None:
                return self._with_device(address, target[0], functools.partial(_start_connect_by_device, target))
            return _start_connect_by_device(target, None)
        except OSError as error:
            raise _proxy_unreachable(error) from None

    def proxy_handshake(
        self,
        local: LocalAddress,
        host: str,
        target: Target,
        *,
        absolute_form: bool = False,
        hops: Sequence[str] = (),
    ) -> _ProxyHandshake | None:
        """The handshake that asks the proxy of ``local`` for the target (by
        ``host`` where it takes names, else by the address of ``target``);
        None for a local address, and for plain HTTP requests to an HTTP
        proxy. An HTTP proxy is told ``hops`` (the Via of the request the
        connection is for) and this proxy's pseudonym in Via."""
        if not isinstance(local, ProxyAddress):
            return None
        if absolute_form and takes_absolute_form(local):
            return None
        name = host if local.proxy.passes_names else target[0]
        return _ProxyHandshake(_proxy_steps(local, name, target[1], self.via_fields(hops)))

    def via_fields(self, hops: Sequence[str] = ()) -> list[str]:
        """The Via fields of a request sent on: ``hops``, the Via of the
        request as it came, and this proxy's own (RFC 9110, 7.6.3)."""
        return [*hops, f"1.1 {self.pseudonym}"]

    def connect_through(
        self, address: ProxyAddress, host: str, port: int, deadline: float, command: Command = Command.CONNECT
    ) -> tuple[socket.socket, tuple[str, int]]:
        """A socket through the proxy of ``address``, its handshake for
        ``command`` to (host, port) done by ``deadline``, and the address the
        proxy says it bound."""
        sock = self._open_to_proxy(address)
        try:
            try:
                _wait_until(sock, selectors.EVENT_WRITE, deadline)
            except TimeoutError:
                raise ProxyLinkError(Reply.TTL_EXPIRED, "the upstream proxy: timed out") from None
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise _proxy_unreachable(OSError(error, os.strerror(error)))
            bound = _handshake_by(sock, _proxy_steps(address, host, port, self.via_fields(), command), deadline)
        except BaseException:
            sock.close()
            raise
        return sock, bound

    def _with_device(
        self, local: LocalAddress, ip: str, open_socket: Callable[[str | None], socket.socket]
    ) -> socket.socket:
        """``open_socket(device)`` with the device of ``local`` for target
        ``ip``; without one where the system refuses it.

        Without the device, Linux routes by destination alone: a connection
        from the Wi-Fi's address may leave by the cable and be dropped.
        """
        if local.interface is None and _CAN_BIND_TO_DEVICE and not _is_loopback(ip):
            self._warn_once(
                "no-interface",
                "no interface is known for %s%s: its connections are bound to the source address only",
                local.ip,
                "" if _has_ifaddr() else " (the ifaddr package is not installed)",
            )
        if self._device_binding_refused:
            return open_socket(None)
        try:
            return open_socket(_device_for(local, ip))
        except _DeviceBindingRefusedError as refusal:
            self._device_binding_refused = True
            self._warn_once(
                "device-refused",
                "binding sockets to their interface is not permitted (%s): binding source "
                "addresses only, so connections may leave by the wrong link. To fix it, give "
                "dispatch CAP_NET_RAW (run it as root, or as a service with "
                "AmbientCapabilities=CAP_NET_RAW), or route by source address: ip rule add from "
                "ADDR table N, with a default route by that link in table N",
                refusal.strerror,
            )
            return open_socket(None)

    def proxy_failed(self, address: LocalAddress, error: OSError) -> None:
        """Log that an upstream proxy failed as a link (down, refusing the
        login), once until it fails otherwise or works again."""
        reason = _describe(error)
        with self._lock:
            if self._proxy_faults.get(address) == reason:
                return
            self._proxy_faults[address] = reason
        logger.warning("upstream proxy %s failed: %s", address.describe(), reason)

    def proxy_worked(self, address: LocalAddress) -> None:
        """A connection got through an upstream proxy: it is news if it had failed."""
        if address in self._proxy_faults:
            with self._lock:
                reason = self._proxy_faults.pop(address, None)
            if reason is not None:
                logger.info("upstream proxy %s works again (it had failed: %s)", address.describe(), reason)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)

    def lease(self, sock: socket.socket, local: LocalAddress, host: str = "") -> UpstreamLease:
        """Hand out ``sock``, connected from ``local`` (which the balancer
        gave) to ``host`` (as the client named it; "" for datagrams)."""
        with self._lock:
            if self._closing:
                _shutdown_quietly(sock)  # opened just as the proxy stopped
            else:
                self._open[sock] = local, host
        self.meter.opened(local)
        return UpstreamLease(sock, local, self._release)

    def _release(self, lease: UpstreamLease) -> None:
        with self._lock:
            self._open.pop(lease.sock, None)
        self.meter.closed(lease.local)
        self.balancer.release(lease.local)

    def close_all(self) -> None:
        """Shut down every open upstream socket, and each opened from now on."""
        with self._lock:
            self._closing = True
            for sock in self._open:
                _shutdown_quietly(sock)

    def close_through(self, addresses: Collection[LocalAddress], site: str | None = None) -> int:
        """Shut down the open upstream sockets leaving from ``addresses`` (to
        ``site`` alone, if given: a host name and the names under it, or an
        address); return how many."""
        site = None if site is None else site.lower().rstrip(".")

        def ends(host: str) -> bool:
            host = host.lower().rstrip(".")
            return site is None or host == site or host.endswith("." + site)

        with self._lock:
            ending = [sock for sock, (local, host) in self._open.items() if local in addresses and ends(host)]
            for sock in ending:
                _shutdown_quietly(sock)
        return len(ending)


class _Race:
    """One connect to a target, from the address the balancer gives; while
    it goes unanswered for ``hedge`` seconds, the same connect starts from
    another address of its tier that is up, and the first to get through wins.

    A link failure (unreachable, down, timed out) starts the next address at
    once when no other attempt is under way (the next one of any tier: a
    backup takes over from failed primaries), else at the next hedge. An
    answer from the target other than a connection (a refusal) ends the
    race: another link would get the same. The addresses that failed, and
    those still silent after ``hedge`` when another got through, are out
    (Health), retested in the background. The race ends at its deadline,
    and when the client hangs up.
    """

    def __init__(
        self,
        upstream: Upstream,
        family: socket.AddressFamily,
        target: Target,
        affinity: Affinity | None,
        on_attempt: Callable[[LocalAddress], None],
        host: str | None = None,
        absolute_form: bool = False,
        *,
        first: LocalAddress | None = None,
        hops: Sequence[str] = (),
    ) -> None:
        self.upstream = upstream
        self.hops = hops  # the Via of the request the connection is for
        self.first = first  # taken from the balancer already: the link that asked for the name
        self.balancer = upstream.balancer
        self.family = family
        self.target = target
        self.affinity = affinity
        self.on_attempt = on_attempt
        self.pending: dict[socket.socket, tuple[LocalAddress, float]] = {}  # socket: (address, started)
        # The target as named (upstream proxies that take names get it so).
        self.host = host or target[0]
        self.absolute_form = absolute_form
        self.handshakes: dict[socket.socket, _ProxyHandshake] = {}  # connected to a proxy, asking it
        self.tried: list[LocalAddress] = []
        self.failed: list[tuple[LocalAddress, OSError]] = []
        self.answer: OSError | None = None  # the target's, final
        self.client_socket: socket.socket | None = None  # watched for a hang-up while racing
        self.waiter = SocketWaiter()  # the attempts' sockets, and the client's

    def run(self, deadline: float = math.inf, client_socket: socket.socket | None = None) -> UpstreamLease:
        """Race until an address gets through; raise the last error if none
        does, TimeoutError at ``deadline``, and _ClientHungUpError when
        ``client_socket`` hangs up (or fails) meanwhile."""
        hedge = self.upstream.hedge or math.inf
        self.client_socket = client_socket
        try:
            if client_socket is not None:
                self.waiter.set(client_socket, selectors.EVENT_READ)
            self._start(self.first or self.balancer.next(self.family, self.affinity))
            hedge_at = time.monotonic() + hedge
            while self.answer is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                if not self.pending:
                    if not self._start_next():
                        break
                    hedge_at = time.monotonic() + hedge
                    continue
                won = self._wait(min(hedge_at, self._first_deadline(), deadline))
                if won is not None:
                    return won
                if time.monotonic() >= hedge_at:
                    hedge_at = time.monotonic() + hedge if self._start_next(racing=bool(self.pending)) else math.inf
        finally:
            for sock, (local, _) in list(self.pending.items()):
                self._drop(sock)
                self.balancer.release(local)
        raise self.answer or self.failed[-1][1]

    def _first_deadline(self) -> float:
        return min(started for _, started in self.pending.values()) + self.upstream.connect_timeout

    def _start(self, local: LocalAddress) -> None:
        self.tried.append(local)
        self.on_attempt(local)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connecting to %s from %s", _format_endpoint(*self.target), local.describe())
        try:
            sock = self.upstream.open_attempt(local, self.target)
        except OSError as error:
            self._fail(local, error)
            return
        self.pending[sock] = (local, time.monotonic())
        self.waiter.set(sock, selectors.EVENT_WRITE)

    def _start_next(self, *, racing: bool = False) -> bool:
        """Start from another address; False when none is left. ``racing``:
        beside the attempts still under way."""
        local = self.balancer.choose(self.family, self.tried, self.affinity, racing=racing)
        if local is not None:
            self._start(local)
        return local is not None

    def _wait(self, until: float) -> UpstreamLease | None:
        """Wait until ``until`` for the attempts; the lease of a winner, if
        one got through (even as the client hangs up: that is the relay's to see)."""
        client_ready = False
        for sock, _ in self.waiter.wait(max(0.0, until - time.monotonic())):
            if self.client_socket is not None and sock is self.client_socket:
                client_ready = True
                continue
            local, _ = self.pending[sock]
            try:
                through = self._advance(sock, local)
            except OSError as failure:
                self._drop(sock)
                self._fail(local, failure)
                continue
            if through:
                return self._win(sock, local)
        if client_ready and self.client_socket is not None:
            self._hear_client(self.client_socket)
        now = time.monotonic()
        for sock, (local, started) in list(self.pending.items()):
            if now >= started + self.upstream.connect_timeout:
                self._drop(sock)
                self._fail(local, TimeoutError(errno.ETIMEDOUT, "timed out"))
        return None

    def _hear_client(self, client_socket: socket.socket) -> None:
        """The client's socket is ready: raise _ClientHungUpError if it has
        hung up. Bytes it sent early stay where they are (for the relay),
        and from then on its end cannot be told apart: it is not watched."""
        try:
            early = client_socket.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            raise _ClientHungUpError() from None
        if not early:
            raise _ClientHungUpError()
        self.waiter.set(client_socket, 0)
        self.client_socket = None

    def _advance(self, sock: socket.socket, local: LocalAddress) -> bool:
        """Whether an attempt that is ready got through: connected, and past
        its proxy's handshake where it goes through one. Raises its error."""
        handshake = self.handshakes.get(sock)
        if handshake is None:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                failure = OSError(error, os.strerror(error))
                raise _proxy_unreachable(failure) if isinstance(local, ProxyAddress) else failure
            handshake = self.upstream.proxy_handshake(
                local, self.host, self.target, absolute_form=self.absolute_form, hops=self.hops
            )
            if handshake is None:
                return True
            self.handshakes[sock] = handshake
        if handshake.advance(sock):
            return True
        self.waiter.set(sock, handshake.events)
        return False

    def _fail(self, local: LocalAddress, error: OSError) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("connecting from %s failed: %s", local.describe(), _describe(error))
        self.upstream.meter.failed(local)
        self.balancer.release(local)
        if isinstance(error, ProxyLinkError):
            self.upstream.proxy_failed(local, error)
        if _is_link_failure(error):
            self.failed.append((local, error))
            return
        if _is_target_answer(error):
            self.upstream.health.connected_through(local, self.failed, self.target)
        self.answer = error

    def _forget(self, sock: socket.socket) -> None:
        """Stop watching an attempt's socket: it has won, or is dropped."""
        self.waiter.set(sock, 0)
        del self.pending[sock]
        self.handshakes.pop(sock, None)

    def _drop(self, sock: socket.socket) -> None:
        """Stop an attempt and close its socket. Its address stays taken:
        the caller gives it back (``balancer.release()``, or ``_fail()``)."""
        self._forget(sock)
        sock.close()

    def _win(self, sock: socket.socket, local: LocalAddress) -> UpstreamLease:
        now = time.monotonic()
        took = now - self.pending[sock][1]
        self._forget(sock)
        self.on_attempt(local)
        silent = [
            (other, TimeoutError(errno.ETIMEDOUT, f"no answer in {now - started:.1f} s; {local.ip} got through"))
            for other, started in self.pending.values()
            if now - started >= self.upstream.hedge
        ]
        for other_sock, (other, _) in list(self.pending.items()):
            self._drop(other_sock)
            self.balancer.release(other)
        self.upstream.health.connected_through(local, [*self.failed, *silent], self.target, took)
        self.upstream.bond_counters.connected(local, sock)
        if not (self.absolute_form and takes_absolute_form(local)):  # else the proxy has said nothing yet
            self.upstream.proxy_worked(local)
        if self.affinity is not None:
            self.balancer.stick(self.affinity, local)  # the site sticks to the link that got through
        return self.upstream.lease(sock, local, self.host)


# ---------------------------------------------------------------------------
# Relay: the two-way copy
# ---------------------------------------------------------------------------

RELAY_BUFFER_SIZE = 256 * 1024  # the most one recv() of the relay takes
# A direction switches to splice() once it has carried SPLICE_AFTER bytes: a
# bulk transfer, worth the pipe's two descriptors.
SPLICE_AFTER = 1024 * 1024
PIPE_SIZE = 1024 * 1024
STEPS_WITHOUT_POLL = 16  # receive-and-send rounds of one direction between polls


def relay(
    client: socket.socket,
    upstream: socket.socket,
    early: bytes = b"",
    count: Callable[[int, int], None] | None = None,
    idle_timeout: float | None = None,
) -> tuple[int, int]:
    """Copy bytes both ways until each side has closed; return (up, down).

    ``early`` is what the client sent before the relay began; it goes first.
    An EOF from one side is passed on as ``shutdown(SHUT_WR)`` to the other.
    Each direction has its own pending data, so a slow reader on one side
    never stops the other direction (no deadlock with echoing peers).
    ``count(up, down)`` is called as bytes go through, for live statistics.
    With an ``idle_timeout``, raises TimeoutError once nothing has moved
    either way for that many seconds.
    """
    for sock in (client, upstream):
        if sock.gettimeout() != 0:
            sock.setblocking(False)
    up, down = _Direction(client, upstream, early), _Direction(upstream, client)
    waiter = _PairWaiter(client, upstream)
    last_activity = time.monotonic()
    try:
        while not (up.done and down.done):
            wait = None
            if idle_timeout is not None:
                wait = last_activity + idle_timeout - time.monotonic()
                if wait <= 0:
                    raise TimeoutError(errno.ETIMEDOUT, f"idle for {idle_timeout:g} s")
            client_ready, upstream_ready = waiter.wait(up.reads | down.writes, down.reads | up.writes, wait)
            if idle_timeout is not None and (client_ready or upstream_ready):
                last_activity = time.monotonic()
            # A direction with nothing ready has nothing to do.
            moved_up = (
                up.step(client_ready, upstream_ready) if up.reads & client_ready or up.writes & upstream_ready else 0
            )
            moved_down = (
                down.step(upstream_ready, client_ready)
                if down.reads & upstream_ready or down.writes & client_ready
                else 0
            )
            if (moved_up or moved_down) and count is not None:
                count(moved_up, moved_down)
    finally:
        try:
            up.close()
        finally:
            down.close()
    return up.total, down.total


class _Direction:
    """One way of the copy: from ``src`` to ``dst``.

    Bytes are received into memory and sent on; on Linux a direction that
    has carried a lot moves them through a pipe with splice() instead, so
    bulk transfers skip the copies in and out of the process, and the pipe
    takes in more while ``dst`` is still taking what it holds. Short
    connections never pay for the pipe's two descriptors.
    """

    __slots__ = ("src", "dst", "pending", "pipe", "pipe_size", "in_pipe", "eof", "done", "total", "reads", "writes")

    def __init__(self, src: socket.socket, dst: socket.socket, early: bytes = b"") -> None:
        self.src = src
        self.dst = dst
        self.pending = memoryview(early)  # received, not yet sent (copy mode)
        self.pipe: tuple[int, int] | None = None
        self.pipe_size = 0
        self.in_pipe = 0  # received, not yet sent (splice mode)
        self.eof = False
        self.done = False
        self.total = 0
        # The events waited for on ``src`` and on ``dst``, kept up to date by
        # step(): the loop reads them at every turn.
        self.reads = 0
        self.writes = 0
        self._await()

    def _has_room(self) -> bool:
        if self.eof:
            return False
        return self.in_pipe < self.pipe_size if self.pipe else not self.pending

    def _await(self) -> None:
        """Set the events this direction waits for: to receive while it has
        room, to send while it holds bytes; none once it is done."""
        if self.done:
            self.reads = self.writes = 0
            return
        self.reads = selectors.EVENT_READ if self._has_room() else 0
        self.writes = selectors.EVENT_WRITE if (self.in_pipe if self.pipe else self.pending) else 0

    def step(self, src_events: int, dst_events: int) -> int:
        """Move what the ready events allow; return the bytes sent on."""
        if self.done:
            return 0
        readable = src_events & selectors.EVENT_READ
        writable = dst_events & selectors.EVENT_WRITE
        sent = 0
        # Go on while both sides keep up, rather than polling between every
        # receive and send: a bulk transfer makes fewer trips through poll.
        for _ in range(STEPS_WITHOUT_POLL):
            received = readable and self._has_room() and self._receive()
            # The receiver usually has room: try at once.
            moved = self._send() if (writable or received) and (self.in_pipe or self.pending) else 0
            sent += moved
            if not received or not moved:
                break
        if self.eof and not (self.in_pipe or self.pending):
            self.done = True
            if self.pipe:
                self.close()
            try:  # noqa: SIM105 (contextlib.suppress costs every connection three calls)
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._await()
        return sent

    def _receive(self) -> bool:
        """Receive what ``src`` has; return whether anything came."""
        if self.pipe is None and self.total >= SPLICE_AFTER and not self.pending:
            self.pipe, self.pipe_size = _open_pipe()
        try:
            if self.pipe:
                received = _splice(self.src.fileno(), self.pipe[1], self.pipe_size - self.in_pipe, flags=_SPLICE_FLAGS)
                self.in_pipe += received
            else:
                data = self.src.recv(RELAY_BUFFER_SIZE)
                self.pending = memoryview(data)
                received = len(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            received = 0  # a reset ends this direction like an EOF
        if not received:
            self.eof = True
        return bool(received)

    def _send(self) -> int:
        try:
            if self.pipe:
                sent = _splice(self.pipe[0], self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS)
                self.in_pipe -= sent
            else:
                sent = self.dst.send(self.pending)
                self.pending = self.pending[sent:]
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # The receiver is gone: what it has not taken can never arrive.
            self.pending = memoryview(b"")
            self.in_pipe = 0
            self.eof = True
            return 0
        self.total += sent
        return sent

    def close(self) -> None:
        """Release the pipe, if there is one."""
        if self.pipe:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


def _open_pipe() -> tuple[tuple[int, int] | None, int]:
    """A non-blocking pipe for splice() and its size; (None, 0) where there
    is none to have."""
    if not _CAN_SPLICE or _fcntl is None:
        return None, 0
    try:
        read_end, write_end = _pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, 0  # out of descriptors: copying works without them
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default size works too
        _fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
    try:
        return (read_end, write_end), int(_fcntl.fcntl(write_end, _F_GETPIPE_SZ))
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return None, 0


# ---------------------------------------------------------------------------
# Sessions: the session base, SOCKS and UDP; one log record per exchange
# ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ExchangeRecord:
    """What one exchange (a SOCKS request, an HTTP request) did, logged as
    one line when it ends; the log record carries it as ``exchange``."""

    client: str
    user: str | None = None
    target: str = "-"
    via: LocalAddress | None = None
    result: str = "ok"
    up: int = 0
    down: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    transparent: bool = False  # redirected by the firewall, not asked of the proxy
    shares: str = ""  # of a bonded connection: what each interface carried ("eth0 61%, wlan0 39%")

    @property
    def duration(self) -> float:
        """Seconds since the exchange started."""
        return time.monotonic() - self.started

    def log(self, level: int = logging.INFO) -> None:
        """Write the exchange's line: client, target, local address, result,
        bytes each way and duration."""
        who = f"{self.client} user {self.user}" if self.user else self.client
        via = self.via.describe() if self.via else "-"
        if self.transparent:
            via += " (transparent)"
        via = f"{via} ({self.shares})" if self.shares else via
        logger.log(
            level,
            "%s -> %s via %s: %s, %d B up, %d B down, %.2f s",
            who,
            self.target,
            via,
            self.result,
            self.up,
            self.down,
            self.duration,
            extra={"exchange": self},
        )


# What the local pages show, as Dispatcher.stats() and status() give it
# (and /stats.json serves it): the meter's counts and rates, health's state,
# the capacity and its source, the DNS work of the link.


class StatsRow(TypedDict):
    """One local address as ``Dispatcher.stats()`` tells it: its link, how
    it stands, what went through it, its capacity and its link's DNS work.
    stats_row() makes one."""

    ip: str | None  # an upstream proxy's name; None for an interface that has had no address yet
    interface: str | None
    link: str  # the link's name, as it was given
    weight: int
    tier: Tier
    # "up"; "down" while it is out after a failure of its link; "standby" for
    # a backup while a primary is up; "gone" once its interface no longer
    # holds it (its row kept a while); "waiting" for an interface with no address yet.
    state: LinkState
    reason: str | None  # why it is not up
    connections: int  # opened in all
    failed: int  # connects through it that failed
    open: int
    bytes_up: int
    bytes_down: int
    rate_up: float  # bytes per second, over the last interval or two (METER_INTERVAL)
    rate_down: float
    capacity: float | None  # bytes per second, None until known
    capacity_source: CapacitySource
    capacity_age: float | None  # seconds since last measured, None if not in this run
    dns_queries: int  # of its link
    dns_cache_hits: int
    dns_failures: int


# A row's values where nothing says otherwise: an idle link that is up, not measured.
_IDLE_ROW: StatsRow = {
    "ip": None,
    "interface": None,
    "link": "",
    "weight": 1,
    "tier": "primary",
    "state": "up",
    "reason": None,
    "connections": 0,
    "failed": 0,
    "open": 0,
    "bytes_up": 0,
    "bytes_down": 0,
    "rate_up": 0.0,
    "rate_down": 0.0,
    "capacity": None,
    "capacity_source": "not measured",
    "capacity_age": None,
    "dns_queries": 0,
    "dns_cache_hits": 0,
    "dns_failures": 0,
}


def stats_row(link: str, **fields: Any) -> StatsRow:
    """The StatsRow of an address of ``link`` (named its interface too,
    unless ``fields`` say): an idle link that is up and not measured, but
    for ``fields``. Raises TypeError for a name StatsRow has not."""
    unknown = sorted(fields.keys() - _IDLE_ROW.keys())
    if unknown:
        raise TypeError(f"StatsRow has no field {unknown[0]!r}")
    return cast(StatsRow, {**_IDLE_ROW, "link": link, "interface": link, **fields})


class Totals(TypedDict):
    """The counts and rates of all addresses, those forgotten once gone too."""

    connections: int
    failed: int
    bytes_up: int
    bytes_down: int
    rate_up: float
    rate_down: float


class AddressHistory(TypedDict):
    """An address's rates (bytes per second) in each sampled interval, oldest first."""

    rate_up: list[float]
    rate_down: list[float]


class History(TypedDict):
    """The rates of each address (by its ``ip``) over the last ten minutes."""

    interval: float  # seconds between two samples
    addresses: dict[str, AddressHistory]


class BondMember(TypedDict):
    """An interface in the bonds: carries subflows, or is a backup, and why."""

    interface: str
    role: Literal["subflows", "backup"]
    why: str


class BondCarried(TypedDict):
    """What a bond's subflows carried through one interface, in bytes."""

    interface: str
    bytes_up: int
    bytes_down: int


class BondStatus(TypedDict):
    """A bonded link (``mptcp+``): whether its last connection was Multipath
    TCP or fell back to one TCP subflow ("unknown" before the first), and
    what its subflows carried through each interface."""

    link: str
    mptcp: Literal["multipath", "fallback", "unknown"]
    members: list[BondMember]
    carried: list[BondCarried]


# A link's state as steered while dispatch runs: it takes new connections
# ("ready"), takes none while its open ones go on ("paused"), or takes none
# and its open ones were ended ("closed").
SteeredState = Literal["ready", "paused", "closed"]


class LinkReport(TypedDict):
    """How a link is steered now: its state and weight."""

    name: str  # as stats() names it
    state: SteeredState
    weight: int  # in turns (--balance round-robin)


class ControlError(Exception):
    """A change asked of the control API that is not made: ``status``
    (an HTTP status) and why, for the asker."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class LinkControl(Protocol):
    """What the control API (``/api/links``) steers: the links of a running dispatch."""

    def reports(self) -> list[LinkReport]:
        """Each link's state and weight."""

    def steer(self, name: str, request: object, who: str) -> str:
        """Make the change ``request`` (a JSON body: {"action": ...}) asks of
        the link ``name``, for ``who`` (the asker's address, for the log);
        return what changed, in a line. Raises ControlError."""


class Status(TypedDict):
    """Everything the status page shows, as ``Dispatcher.status()`` gives it."""

    version: str
    uptime: float  # seconds
    listening: str  # HOST:PORT
    balance: BalanceName
    open_connections: int  # clients
    refused: int
    totals: Totals
    addresses: list[StatsRow]
    history: History
    bonds: list[BondStatus]
    caps: list[CapReport]  # one per cap of each capped link
    links: list[LinkReport]  # one per link, as steered
    system_proxy: str  # whether this dispatch has set the user's proxy settings, and which


# Transparent connections go to addresses: the names devices looked up
# through dispatch's DNS answers (SiteNames) name them, for sticky sites
# and the log. At most this many addresses are kept.
SITE_NAMES_KEPT = 4096


class SiteNames:
    """Which name each address was given for, as DNS answers said, each
    kept for its answer's TTL: the last name given for an address wins."""

    def __init__(self, max_entries: int = SITE_NAMES_KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._names: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, ips: Iterable[str], name: str, ttl: float) -> None:
        """Name each of ``ips`` ``name`` for ``ttl`` seconds."""
        until = self.clock() + ttl
        with self._lock:
            for ip in ips:
                self._names[ip] = (name, until)
                self._names.move_to_end(ip)
            while len(self._names) > self.max_entries:
                self._names.popitem(last=False)

    def name_of(self, ip: str) -> str | None:
        """The name ``ip`` was last given for, while its TTL lasts."""
        with self._lock:
            entry = self._names.get(ip)
            if entry is None or entry[1] <= self.clock():
                return None
            return entry[0]


@dataclasses.dataclass(frozen=True)
class SessionContext:
    """What every session uses: who may do what, the way out, and the time
    a client has."""

    access: AccessPolicy
    upstream: Upstream
    handshake_timeout: float
    idle_timeout: float | None
    # Set when the proxy stops and closes the connections still open.
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    # What the local pages show (Dispatcher.status); None: no pages.
    status: Callable[[], Status] | None = None
    # Host names the pages answer to, besides localhost and the proxy's
    # own addresses (lower case, without a final dot).
    page_hosts: frozenset[str] = frozenset()
    # The names addresses were looked up by (transparent mode); None: none kept.
    names: SiteNames | None = None
    # The links the control API steers (/api/links); None: no API.
    control: LinkControl | None = None
    # Whether the API takes changes only with a login: a proxy that listens
    # beyond loopback is reached by other machines, and their web pages.
    control_needs_login: bool = False


# Seconds between two reads of a bonded connection's subflow counters.
SUBFLOW_READ_INTERVAL = 0.5


class Session:
    """One client connection, served by a subclass's ``serve()``.

    ``connection`` is non-blocking; ``reader`` has its first bytes.
    """

    def __init__(
        self,
        connection: socket.socket,
        client_address: tuple[Any, ...],
        reader: DeadlineReader,
        context: SessionContext,
    ) -> None:
        self.connection = connection
        self.client_address = client_address
        self.client = _format_endpoint(*_split_host(client_address))
        self.reader = reader
        self.context = context
        self.record = ExchangeRecord(self.client)
        self.cut = False
        # Whether the client's EOF while the connect is under way means it
        # left: a proxy's client waits for the reply before it sends more.
        self.eof_is_hang_up = True
        # A bonded connection's socket, and what its subflows carried by
        # local address, read every SUBFLOW_READ_INTERVAL while it relays.
        self._bond: socket.socket | None = None
        self._subflows: dict[str, tuple[int, int]] = {}
        self._subflows_due = 0.0

    def serve(self) -> None:
        """Serve the client to its end."""
        raise NotImplementedError

    def log(self, error: OSError | None = None) -> None:
        """Log the exchange, with how ``error`` (if any) ended it."""
        record = self.record
        if error is not None:
            record.result = self.describe_end(error)
            self.note_end()
        if self.cut:
            # A hang-up seen once the proxy stopping closed the client's
            # socket was its own doing, not the client's.
            result = record.result.removesuffix("client hung up").removesuffix(", ")
            record.result = "cut by shutdown" if result in ("ok", "") else f"{result}, cut by shutdown"
        record.log()

    def note_end(self) -> None:
        """Note, as the exchange's work ends, whether the proxy's stopping
        ended it: one that ended just before is not "cut", even if its line
        is written after."""
        self.cut = self.cut or self.context.stopping.is_set()

    def describe_end(self, error: OSError) -> str:
        """How ``error`` ended the exchange, as its log line says it."""
        if not isinstance(error, SocksError) and error.errno in _HANG_UP_ERRNOS:
            return "client hung up"  # an ordinary end, not a fault
        return _describe(error)

    def send(self, data: bytes) -> None:
        """Send a reply to the client within the handshake time."""
        _send_all_by(self.connection, data, time.monotonic() + self.context.handshake_timeout)

    def send_quietly(self, data: bytes) -> None:
        """Send a reply to a client that may have left already: the log line
        says why the request ended, so a failed send is not news."""
        try:  # noqa: SIM105 (contextlib.suppress costs every request three calls)
            self.send(data)
        except OSError:
            pass

    def count(self, up: int, down: int) -> None:
        """Count bytes relayed for this exchange, on its line and its local address."""
        self.record.up += up
        self.record.down += down
        if self.record.via is not None:
            self.context.upstream.meter.add(self.record.via, up, down)
        if self._bond is not None and time.monotonic() >= self._subflows_due:
            self._read_subflows(self._bond)

    def _read_subflows(self, sock: socket.socket) -> None:
        """Keep the most each subflow was seen to carry (a closed one reads
        0), and tell what each moved since the last read."""
        moved: dict[str, tuple[int, int]] = {}
        for ip, (up, down) in subflow_counters(sock).items():
            before = self._subflows.get(ip, (0, 0))
            self._subflows[ip] = (max(before[0], up), max(before[1], down))
            moved[ip] = (self._subflows[ip][0] - before[0], self._subflows[ip][1] - before[1])
        self.context.upstream.bond_counters.moved(moved)
        self._subflows_due = time.monotonic() + SUBFLOW_READ_INTERVAL

    def connect(
        self, host: str, port: int, *, absolute_form: bool = False, hops: Sequence[str] = (), site: str | None = None
    ) -> UpstreamLease:
        """Connect to the target; the record names each local address tried,
        and at last the one that got through. ``absolute_form``: for plain
        HTTP requests; ``hops``: the Via of an HTTP request; ``site``: the
        name of the site an address is for (see Upstream.connect). A client
        that hangs up meanwhile ends the attempts (as Squid's
        half_closed_clients off: a client that closes its sending side
        before its reply is taken to have left), except a plain HTTP
        request's client, which may close its side once its request is sent
        (HTTP/1.0 clients do), and a client that sent data ahead of its
        reply: both are served all the same."""
        client = _client_ip_text(self.client_address[0])
        return self.context.upstream.connect(
            host,
            port,
            on_attempt=self._via,
            client=client,
            absolute_form=absolute_form,
            hops=hops,
            client_socket=self.connection if self._eof_would_be_hang_up(absolute_form) else None,
            site=site,
        )

    def _eof_would_be_hang_up(self, absolute_form: bool) -> bool:
        """Whether the client's EOF before its reply means it left: not where
        it sent data ahead of the reply (early bytes the reader holds), for
        its EOF is then the end of what it has to send."""
        return self.eof_is_hang_up and not absolute_form and not self.reader.buffered

    def _via(self, local: LocalAddress) -> None:
        self.record.via = local

    def relay_through(self, lease: UpstreamLease) -> None:
        """Copy both ways between the client and ``lease``'s upstream
        socket, starting with what the client sent early. A bonded one's
        line says what each interface carried of it."""
        bonded = isinstance(lease.local, ProxyAddress) and lease.local.proxy.bonded
        self._bond = lease.sock if bonded else None
        try:
            relay(
                self.connection,
                lease.sock,
                early=self.reader.rest(),
                count=self.count,
                idle_timeout=self.context.idle_timeout,
            )
        finally:
            self.note_end()
            if bonded:
                self._bond_ended(lease)

    def _bond_ended(self, lease: UpstreamLease) -> None:
        """Share the bonded connection's bytes out by its subflows' counters
        (read last while it was open): on its line, its link's counters, and
        the rows of the addresses' links for what was not told yet."""
        self._read_subflows(lease.sock)
        counters = self.context.upstream.bond_counters
        shares = in_shares(self._subflows, self.record.up, self.record.down)
        told = self._subflows
        counters.moved(
            {ip: (max(0, up - told[ip][0]), max(0, down - told[ip][1])) for ip, (up, down) in shares.items()}
        )
        self.record.shares = counters.carried_by(lease.local, shares)


class SocksSession(Session):
    """One SOCKS4, 4a or 5 request: the handshake, the upstream connect or
    UDP association, the relay; one log line."""

    def serve(self) -> None:
        """Serve one SOCKS request to its end; log one line."""
        try:
            outcome = self.handshake()
            if isinstance(outcome, UdpAssociation):
                self.record.result = "ok, " + outcome.run()
                self.note_end()
            else:
                with outcome:
                    self.relay_through(outcome)
        except OSError as error:
            self.log(error)
        else:
            self.log()

    def handshake(self) -> UpstreamLease | UdpAssociation:
        """Read a request, connect upstream and reply; return the upstream
        lease, or the association of a UDP ASSOCIATE request.

        Raises SocksError after a failure reply, ProtocolError (no reply) for
        bytes that are not SOCKS, OSError if the client goes away.
        """
        version = self.reader.read_byte()
        if version == SOCKS5_VERSION:
            return self.socks5()
        if version == SOCKS4_VERSION:
            return self.socks4()
        raise ProtocolError(f"not a SOCKS request (first byte 0x{version:02x})")

    def socks5(self) -> UpstreamLease | UdpAssociation:
        """The rest of a SOCKS5 greeting, the login, the request."""
        methods = read_socks5_methods(self.reader)
        access = self.context.access
        wanted = Method.USERNAME_PASSWORD if access.requires_credentials else Method.NO_AUTHENTICATION
        if wanted not in methods:
            self.send(bytes([SOCKS5_VERSION, Method.NO_ACCEPTABLE]))
            raise SocksError(Reply.NOT_ALLOWED, "no acceptable authentication method")
        self.send(bytes([SOCKS5_VERSION, wanted]))
        if wanted == Method.USERNAME_PASSWORD:
            self.authenticate()
        try:
            request = read_socks5_request(self.reader)
            self.record.target = _format_endpoint(request.host, request.port)
            if request.command == Command.UDP_ASSOCIATE:
                association = self.udp_associate(request.host, request.port)
                self.send_quietly(encode_socks5_reply(Reply.SUCCEEDED, association.client_side.getsockname()))
                return association
        except OSError as error:
            self._reply_failure(SOCKS5_VERSION, error)
            raise
        return self.connect_and_reply(SOCKS5_VERSION, request)

    def authenticate(self) -> None:
        """The RFC 1929 sub-negotiation; raises SocksError (closing) on failure."""
        try:
            user, password = read_auth_request(self.reader)
        except OSError:
            self.send_quietly(bytes([AUTH_VERSION, AuthStatus.FAILURE]))
            raise
        self.record.user = _printable(user)
        if not self.context.access.check_credentials(user, password):
            self.send_quietly(bytes([AUTH_VERSION, AuthStatus.FAILURE]))
            raise SocksError(Reply.NOT_ALLOWED, "wrong user name or password")
        self.send_quietly(bytes([AUTH_VERSION, AuthStatus.SUCCESS]))

    def socks4(self) -> UpstreamLease:
        """A SOCKS4 or 4a request."""
        try:
            request = read_socks4_request(self.reader)
            self.record.target = _format_endpoint(request.host, request.port)
            if self.context.access.requires_credentials:
                raise SocksError(Reply.NOT_ALLOWED, "SOCKS4 cannot authenticate; use SOCKS5")
        except OSError as error:
            self._reply_failure(SOCKS4_VERSION, error)
            raise
        return self.connect_and_reply(SOCKS4_VERSION, request)

    def connect_and_reply(self, version: int, request: Request) -> UpstreamLease:
        """Connect to the target of a CONNECT request, then reply as
        ``version`` replies: succeeded, with BND the upstream socket's own
        address, or the failure's code (and raise it)."""
        try:
            if request.command != Command.CONNECT:
                raise SocksError(Reply.COMMAND_NOT_SUPPORTED, f"command {request.command} not supported")
            lease = self.connect(request.host, request.port)
        except OSError as error:
            self._reply_failure(version, error)
            raise
        try:
            bound = lease.sock.getsockname()
        except OSError:
            lease.close()
            raise
        self.send_quietly(self._encode_reply(version, Reply.SUCCEEDED, bound))
        return lease

    def _reply_failure(self, version: int, error: OSError) -> None:
        """Reply to the request that ``error`` ended with its code, as
        ``version`` replies; the caller raises it on. (A try block, not a
        context manager: every request passes through two of them.)"""
        self.note_end()  # before the reply, which the client may follow with a stop
        self.send_quietly(self._encode_reply(version, _reply_code(error)))

    @staticmethod
    def _encode_reply(version: int, reply: Reply, bound: tuple[Any, ...] = ("0.0.0.0", 0)) -> bytes:
        """``reply`` as ``version`` sends it (SOCKS4 has one code for every failure)."""
        if version == SOCKS4_VERSION:
            return encode_socks4_reply(_socks4_reply(reply), bound)
        return encode_socks5_reply(reply, bound)

    def udp_associate(self, host: str, port: int) -> UdpAssociation:
        """Open the sockets of a UDP association for this client.

        (host, port) is where the client says it will send from: its family
        chooses the family of the dispatched local address (IPv4 unless the
        client names an IPv6 address or only IPv6 is there), and a non-zero
        port is the only one the client may send from.
        """
        self.record.target = "UDP"
        family = socket.AF_INET6 if _is_ip(host) and ":" in host else socket.AF_INET
        lease = self.context.upstream.open_udp(family)
        self.record.via = lease.local
        # Datagrams come to the address the client reached the proxy at. An
        # IPv4 client of a dual-stack listener reached ::ffff:a.b.c.d, which
        # it cannot send to: it gets an IPv4 socket (and an IPv4 reply).
        family = self.connection.family
        proxy_ip = self.connection.getsockname()[0]
        client_ip = _split_host(self.client_address)[0]
        unmapped = _client_ip(proxy_ip)
        if family == socket.AF_INET6 and isinstance(unmapped, ipaddress.IPv4Address):
            family = socket.AF_INET
            proxy_ip = str(unmapped)
            client_ip = str(_client_ip(client_ip))
        try:
            client_side = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            lease.close()
            raise
        try:
            client_side.bind((proxy_ip, 0))
        except OSError:
            lease.close()
            client_side.close()
            raise
        return UdpAssociation(self, client_side, lease, client_ip, port or None)


class UdpAssociation:
    """One SOCKS5 UDP association: datagrams between one client and any targets.

    The client sends to ``client_side`` with the SOCKS5 UDP header naming the
    target; the data leaves from the lease's socket, bound to the dispatched
    local address, and what comes back is wrapped in a header naming its
    sender. Only the client that asked is heard: its IP address, and its port
    once known (given in the request, or learned from its first datagram).
    The association lasts as long as its TCP connection.
    """

    # Names resolved for one association are remembered, up to this many.
    max_names = 256

    def __init__(
        self,
        session: SocksSession,
        client_side: socket.socket,
        lease: UpstreamLease,
        client_ip: str,
        client_port: int | None,
    ) -> None:
        self.session = session
        self.client_side = client_side
        self.lease = lease
        self.upstream = lease.sock
        # Through an upstream proxy: its association's TCP connection.
        self.proxied = lease if isinstance(lease, ProxiedUdpLease) else None
        self.client_ip = client_ip
        self.client_port = client_port
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.dropped = 0
        self._names: dict[str, str] = {}

    def run(self) -> str:
        """Relay until the TCP connection closes; return a summary for the log."""
        connection = self.session.connection
        try:
            self.client_side.setblocking(False)
            self.upstream.setblocking(False)
            with _selector() as selector:
                for sock in (connection, self.client_side, self.upstream):
                    selector.register(sock, selectors.EVENT_READ)
                if self.proxied is not None:
                    selector.register(self.proxied.control, selectors.EVENT_READ)
                while True:
                    for key, _ in selector.select():
                        if key.fileobj is connection:
                            if not self._connection_open():
                                return self._summary()
                        elif self.proxied is not None and key.fileobj is self.proxied.control:
                            if not self._open(self.proxied.control):
                                return self._summary() + "; the upstream proxy ended the association"
                        elif key.fileobj is self.client_side:
                            self._from_client()
                        else:
                            self._from_target()
        finally:
            self.client_side.close()
            self.lease.close()

    def _summary(self) -> str:
        return f"{self.datagrams_up} datagrams up, {self.datagrams_down} down, {self.dropped} dropped"

    def _connection_open(self) -> bool:
        # The client has nothing more to say on the TCP connection; what it
        # sends anyway is ignored. Its EOF or reset ends the association.
        return self._open(self.session.connection)

    @staticmethod
    def _open(connection: socket.socket) -> bool:
        """Whether a TCP connection that holds an association is still open."""
        try:
            return bool(connection.recv(4096))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _from_client(self) -> None:
        try:
            datagram, source = self.client_side.recvfrom(UDP_BUFFER_SIZE)
        except OSError:
            return  # nothing there after all, or an ICMP error: no datagram
        source_ip, source_port = _split_host(source)
        if source_ip != self.client_ip or self.client_port not in (None, source_port):
            self.dropped += 1
            return
        try:
            fragment, host, port, data = parse_udp_datagram(datagram)
            # RFC 1928 lets a server that does not reassemble drop fragments.
            if fragment:
                raise SocksError(Reply.GENERAL_FAILURE, "fragment")
            self.client_port = source_port
            if self.proxied is not None and self.proxied.passes_names and not _is_ip(host):
                self.proxied.send_to(data, host, port)  # a name the proxy looks up: its host's to judge
            else:
                ip = self._resolve(host, port)
                self.session.context.upstream.admit_target(self.client_ip, host, ip, port)
                if self.proxied is not None:
                    self.proxied.send_to(data, ip, port)
                else:
                    self.upstream.sendto(data, (ip, port))
        except OSError:
            self.dropped += 1
            return
        self.datagrams_up += 1
        self.session.count(len(data), 0)

    def _from_target(self) -> None:
        try:
            data, source = self.upstream.recvfrom(UDP_BUFFER_SIZE) if self.proxied is None else self.proxied.receive()
        except SocksError:
            self.dropped += 1  # from the upstream's relay, but no datagram to pass on
            return
        except OSError:
            return  # nothing there after all, or an ICMP error: no datagram
        if self.client_port is None:
            self.dropped += 1  # the client has not spoken yet: nowhere to send it
            return
        try:
            header = encode_udp_header(*_split_host(source))
            self.client_side.sendto(header + data, (self.client_ip, self.client_port))
        except OSError:
            self.dropped += 1
            return
        self.datagrams_down += 1
        self.session.count(0, len(data))

    def _resolve(self, host: str, port: int) -> str:
        """The IP address to send to, of the upstream socket's family (of
        either, through an upstream proxy)."""
        ip = self._names.get(host)
        families = {self.upstream.family} if self.proxied is None else {socket.AF_INET, socket.AF_INET6}
        if ip is None:
            ip = self.session.context.upstream.resolve(host, families, self.lease.local)[0][1]
            if not _is_ip(host):
                if len(self._names) >= self.max_names:
                    self._names.clear()
                self._names[host] = ip
        if _family_of(ip) not in families:
            raise SocksError(Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        return ip


# ---------------------------------------------------------------------------
# Local pages: the status page, /stats.json, /metrics, /proxy.pac
# ---------------------------------------------------------------------------

# An HTTP request in origin form (GET /path) is for the proxy itself. Each
# function here takes plain data (Dispatcher.status(), or a host and port)
# and returns a response body; HttpProxySession sends it.


def format_bytes(count: float) -> str:
    """A byte count in decimal units: 812 B, 53.1 kB, 1.2 MB, 340 GB; past
    a million TB in three figures (1.23e+09 TB), never a line's worth."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        count /= 1000
        if count < 1000 or unit == "TB":
            break
    if count >= 1e6:
        return f"{count:.3g} {unit}"
    return f"{count:.1f} {unit}" if count < 100 else f"{count:.0f} {unit}"


def format_rate(bytes_per_second: float) -> str:
    """A rate in kB/s, as the status page and the tables show every rate
    and capacity: 1,204.5 kB/s; past a terabyte a second in three figures
    (1.23e+09 kB/s), not hundreds."""
    kilobytes = bytes_per_second / 1000
    return f"{kilobytes:,.1f} kB/s" if kilobytes < 1e9 else f"{kilobytes:.3g} kB/s"


def format_duration(seconds: float) -> str:
    """A duration in its two largest units: "42 s", "3 min 5 s", "2 h 4 min", "3 d 5 h"."""
    total = round(max(0.0, seconds))
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    units = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    for index, (amount, unit) in enumerate(units[:-1]):
        if amount:
            smaller, smaller_unit = units[index + 1]
            return f"{amount} {unit} {smaller} {smaller_unit}" if smaller else f"{amount} {unit}"
    return f"{secs} s"


LOCAL_PAGES = ("/", "/stats.json", "/metrics", "/proxy.pac")
# The control API: GET it for the links as steered, POST to CONTROL_PATH/NAME to change one.
CONTROL_PATH = "/api/links"
PAGE_CONTENT_TYPE = "text/html; charset=utf-8"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PAC_CONTENT_TYPE = "application/x-ns-proxy-autoconfig"

_KILO = 1000.0  # decimal units, as in "kB/s"
_HISTORY_SECONDS = 600.0  # the charts span the last 10 minutes
_MIN_TOP_KBS = 10.0  # an idle chart still gets a readable scale
_NICE_STEPS = (1.0, 2.0, 5.0, 10.0)
_CHART_W, _PLOT_TOP, _PLOT_BOTTOM, _CHART_H = 400, 18, 140, 160  # SVG user units
_NOW_X = 396  # the newest sample, inset so that its marker is not cut off
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")
_PATH_SHOWN = 200  # a 404 echoes at most this much of the path
PAGE_REFRESH = 2.0  # seconds between two updates of an open status page
# A page request's body is read and dropped up to this size; a longer one
# (or a chunked one) is refused, and the connection closed after the answer.
LOCAL_PAGE_BODY_LIMIT = 64 * 1024

_STYLE = """
:root{color-scheme:light dark;--fg:#1b1b1b;--bg:#fff;--mute:#666;--line:#ddd;--ok:#1a7f37;
--bad:#c62828;--warn:#9a6700}
@media (prefers-color-scheme:dark){:root{--fg:#e6e6e6;--bg:#15171a;--mute:#9aa0a6;--line:#333;
--ok:#4ac26b;--bad:#ff6b6b;--warn:#d4a72c}}
*{box-sizing:border-box}body{margin:0 auto;max-width:72rem;padding:.75rem;
font:15px/1.4 system-ui,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;justify-content:space-between;align-items:baseline;gap:1rem}
h1{font-size:1.3rem;margin:0 0 .4rem}#live,small,dt,th,svg text{color:var(--mute);fill:var(--mute)}
small{display:block;font-size:.8em}dd{margin:0}
.facts{display:flex;flex-wrap:wrap;gap:.2rem 1.2rem;margin:0 0 1rem}
.facts div{display:flex;gap:.35rem}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.35rem .45rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:.8em;font-weight:600}.n{text-align:right}tfoot td{font-weight:600}
.up{color:var(--ok)}.down,.gone{color:var(--bad)}.standby,.waiting{color:var(--warn)}
.k{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.4em}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr));gap:1rem;margin-top:1rem}
figure{margin:0}figcaption{font-weight:600;margin-bottom:.2rem}
svg{display:block;width:100%;height:auto;border:1px solid var(--line)}
svg line{stroke:var(--line)}svg text{font-size:11px}
.charts polyline{fill:none;stroke-width:1.5;stroke-linejoin:round;stroke-linecap:round}
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.2rem 1rem}
@media (max-width:52rem){thead{display:none}table,tbody,tfoot,tr,td{display:block}
tr{display:grid;grid-template-columns:1fr 1fr;column-gap:1.4rem;border:1px solid var(--line);
border-radius:.4rem;margin-bottom:.6rem;padding:.2rem .5rem}
td{border:0;padding:.15rem 0;text-align:right}td:empty{display:none}
td.link,td[data-label=State]{grid-column:1/-1;order:-1}td[data-label=Capacity]{grid-column:1/-1}
td::before{content:attr(data-label);float:left;margin-right:.5rem;color:var(--mute);font-weight:400}
td.link{text-align:left;border-bottom:1px solid var(--line);padding-bottom:.3rem}
td.link::before{content:none}svg text{font-size:15px}}
""" + "".join(f".s{i}{{stroke:{c};fill:{c};background:{c}}}" for i, c in enumerate(_PALETTE))

# The page is drawn here alone. Every PAGE_REFRESH seconds the script asks
# for the page again and puts each part marked data-part (facts, rows,
# totals, charts, legend) that changed in place of the old one: it holds no
# formatting, colour or scale of its own. The indicator (#live) tells in the
# words the page gives it whether the last update came.
_SCRIPT = """
(function () {
  "use strict";
  var live = document.getElementById("live");
  function swap(text) {  // every part found first: another page changes nothing
    var fresh = new DOMParser().parseFromString(text, "text/html");
    var parts = Array.prototype.map.call(document.querySelectorAll("[data-part]"), function (part) {
      var drawn = fresh.getElementById(part.id);
      if (!drawn) throw new Error("not the status page");
      return {part: part, drawn: drawn};
    });
    parts.forEach(function (each) {
      if (!each.drawn.isEqualNode(each.part)) each.part.replaceWith(document.importNode(each.drawn, true));
    });
  }
  function tick() {  // the next fetch waits for this one: no pile-up on a slow link
    fetch(location.href, {cache: "no-store"}).then(function (answer) {
      if (!answer.ok) throw new Error(answer.status);
      return answer.text();
    }).then(function (text) { swap(text); live.textContent = live.dataset.live; })
      .catch(function () { live.textContent = live.dataset.failed; })
      .then(function () { setTimeout(tick, live.dataset.every); });
  }
  setTimeout(tick, live.dataset.every);
  // The buttons ask the control API as any script must: a JSON POST.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-link]");
    if (!button) return;
    button.disabled = true;
    fetch("/api/links/" + encodeURIComponent(button.dataset.link), {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({action: button.dataset.action})
    }).then(function (answer) { return answer.json(); })
      .then(function (said) { live.textContent = said.changed || said.error; })
      .catch(function () { live.textContent = live.dataset.failed; })
      .then(function () { button.disabled = false; });
  });
})();
"""


def _csp_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Send as Content-Security-Policy with the status page: only its own style and script run.
STATUS_PAGE_CSP = (
    f"default-src 'none'; connect-src 'self'; img-src data:; style-src {_csp_source(_STYLE)}; "
    f"script-src {_csp_source(_SCRIPT)}; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# "snapshot" until the script's first update, then what the last one did
_LIVE = (
    f'<span id="live" data-every="{round(PAGE_REFRESH * 1000)}" data-live="live, every {PAGE_REFRESH:.0f} s" '
    'data-failed="no answer, retrying">snapshot</span>'
)


def plural(count: int, noun: str) -> str:
    """The count and the noun, plural unless the count is 1: "1 connection",
    "0 connections", "2 addresses"."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{count} {noun}s"


def _is_loopback_host(host: str) -> bool:
    """Whether a listener on ``host`` is reached from this machine alone."""
    return host.lower() == "localhost" or (_is_ip(host) and _client_ip(host).is_loopback)


def _json_line(value: object) -> bytes:
    """``value`` as one line of JSON, as the control API answers."""
    return json.dumps(value).encode() + b"\n"


def describe_capacity_source(row: StatsRow) -> str:
    """Where a stats() row's capacity comes from: "measured 5 s ago",
    "remembered" (from an earlier run, not measured since) or "not measured"."""
    source, age = row["capacity_source"], row["capacity_age"]
    if row["capacity"] is None or source == "not measured":
        return "not measured"
    if source == "measured" and age is not None:
        return f"measured {format_duration(age)} ago"
    return source


def _html_text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _facts(status: Status) -> dict[str, object]:
    totals = status["totals"]
    return {
        "version": status["version"],
        "uptime": format_duration(status["uptime"]),
        "listening": status["listening"],
        "balance": status["balance"],
        "clients": status["open_connections"],
        "refused": status["refused"],
        "connections": totals["connections"],
        "failed": totals["failed"],
        "system proxy": status["system_proxy"],
    } | {f"bond {bond['link']}": _bond_fact(bond) for bond in status["bonds"]}


def _bond_fact(bond: BondStatus) -> str:
    members = "; ".join(f"{member['interface']}: {member['why']}" for member in bond["members"])
    carried = ", ".join(f"{c['interface']} {format_bytes(c['bytes_up'] + c['bytes_down'])}" for c in bond["carried"])
    return f"{bond['mptcp']} ({members or 'no interface yet'})" + (f"; carried: {carried}" if carried else "")


@dataclasses.dataclass(frozen=True)
class _TableRow:
    """What one row of the table shows: an address's, or the totals'."""

    link: str
    where: str  # the address and its interface
    tier: str
    state: str
    reason: str
    open: int
    bytes_down: int
    bytes_up: int
    rate_down: float
    rate_up: float
    capacity: float | None
    capacity_note: str  # where the capacity comes from
    dns: tuple[int, int, int]  # queries, cache hits, failures


def _address_row(row: StatsRow) -> _TableRow:
    return _TableRow(
        row["link"],
        " \u00b7 ".join(filter(None, (row["ip"], row["interface"]))),
        row["tier"],
        row["state"],
        row["reason"] or "",
        row["open"],
        row["bytes_down"],
        row["bytes_up"],
        row["rate_down"],
        row["rate_up"],
        row["capacity"],
        "" if row["capacity"] is None else describe_capacity_source(row),
        (row["dns_queries"], row["dns_cache_hits"], row["dns_failures"]),
    )


def _totals_row(status: Status) -> _TableRow:
    rows, totals = status["addresses"], status["totals"]
    measured = [row["capacity"] for row in rows if row["capacity"] is not None]
    return _TableRow(
        "All links",
        "",
        "",
        "",
        "",
        sum(row["open"] for row in rows),
        totals["bytes_down"],
        totals["bytes_up"],
        totals["rate_down"],
        totals["rate_up"],
        sum(measured) if measured else None,
        "",
        (
            sum(row["dns_queries"] for row in rows),
            sum(row["dns_cache_hits"] for row in rows),
            sum(row["dns_failures"] for row in rows),
        ),
    )


@dataclasses.dataclass(frozen=True)
class _Cell:
    """One cell of the table, under its heading."""

    heading: str
    text: str
    note: str  # small, under the text
    css: str  # its class: "n" for a number (right-aligned, and its heading too)


def _cells(row: _TableRow) -> list[_Cell]:
    return [
        _Cell("Link", row.link, row.where, "link"),
        _Cell("Tier", row.tier, "", ""),
        _Cell("State", row.state, row.reason, row.state),
        _Cell("Open", str(row.open), "", "n"),
        _Cell("Down", format_bytes(row.bytes_down), "", "n"),
        _Cell("Up", format_bytes(row.bytes_up), "", "n"),
        _Cell("Down rate", format_rate(row.rate_down), "", "n"),
        _Cell("Up rate", format_rate(row.rate_up), "", "n"),
        _Cell(
            "Capacity", "not measured" if row.capacity is None else format_rate(row.capacity), row.capacity_note, "n"
        ),
        _Cell("DNS", " / ".join(str(count) for count in row.dns), "queries / cached / failed", "n"),
    ]


def _headings(cells: Sequence[_Cell]) -> str:
    """The table's head, from the cells of any of its rows."""
    return "".join(f'<th class="{"n" if cell.css == "n" else ""}">{cell.heading}</th>' for cell in cells)


def _row(row: _TableRow, colour: int | None) -> str:
    """One table row; ``colour`` marks an address's (the totals' has none)."""
    out, dot = [], "" if colour is None else f'<i class="k s{colour % len(_PALETTE)}"></i>'
    for position, cell in enumerate(_cells(row)):
        under = f"<small>{_html_text(cell.note)}</small>" if cell.note else ""
        lead = "" if position else dot
        out.append(f'<td class="{cell.css}" data-label="{cell.heading}">{lead}{_html_text(cell.text)}{under}</td>')
    return "<tr>" + "".join(out) + "</tr>"


def _nice_top(peak_kbs: float) -> float:
    """The chart's top in kB/s: the next 1, 2 or 5 times a power of ten."""
    if peak_kbs <= _MIN_TOP_KBS:
        return _MIN_TOP_KBS
    power = 10.0 ** math.floor(math.log10(peak_kbs))
    return next(step * power for step in _NICE_STEPS if step * power >= peak_kbs)


def _chart_y(rate: float, top: float) -> float:
    return _PLOT_BOTTOM - min(max(rate / _KILO / top, 0.0), 1.0) * (_PLOT_BOTTOM - _PLOT_TOP)


def _series(status: Status, key: Literal["rate_up", "rate_down"]) -> tuple[float, list[tuple[int, list[float]]]]:
    """The sample interval and, per address with samples, (its colour, its last 10 minutes)."""
    history = status["history"]
    interval = history["interval"]
    kept, per_ip = int(_HISTORY_SECONDS / interval) + 1, history["addresses"]
    series = []
    for colour, row in enumerate(status["addresses"]):
        rates = per_ip[row["ip"]][key][-kept:] if row["ip"] is not None and row["ip"] in per_ip else []
        if rates:
            series.append((colour, rates))
    return interval, series


def _chart(status: Status, key: Literal["rate_up", "rate_down"], title: str) -> str:
    interval, series = _series(status, key)
    top = _nice_top(max((max(values) for _, values in series), default=0.0) / _KILO)
    step, parts = _NOW_X * interval / _HISTORY_SECONDS, []
    for share in (0.0, 0.5, 1.0):
        at = _chart_y(share * top * _KILO, top)
        parts.append(
            f'<line x1="0" x2="{_CHART_W}" y1="{at:.1f}" y2="{at:.1f}"/>'
            f'<text x="2" y="{at - 3:.1f}">{share * top:.0f} kB/s</text>'
        )
    parts.append(f'<text x="2" y="156">10 min ago</text><text x="{_CHART_W - 2}" y="156" text-anchor="end">now</text>')
    if not series:
        parts.append(f'<text x="{_CHART_W // 2}" y="80" text-anchor="middle">no samples yet</text>')
    for colour, values in series:
        last, cls = len(values) - 1, f"s{colour % len(_PALETTE)}"
        points = " ".join(f"{_NOW_X - (last - j) * step:.1f},{_chart_y(v, top):.1f}" for j, v in enumerate(values))
        # the circle marks the newest sample, and alone shows a lone one
        parts.append(
            f'<polyline class="{cls}" points="{points}"/>'
            f'<circle class="{cls}" cx="{_NOW_X}" cy="{_chart_y(values[-1], top):.1f}" r="3"/>'
        )
    return (
        f'<figure><figcaption>{title}</figcaption><svg id="chart-{key}" data-part viewBox="0 0 '
        f'{_CHART_W} {_CHART_H}" role="img" aria-label="{title}">' + "".join(parts) + "</svg></figure>"
    )


def render_status_page(status: Status) -> str:
    """The whole status page for ``Dispatcher.status()``, table and charts drawn, and a script
    that fetches the page again every ``PAGE_REFRESH`` seconds and puts the parts that changed
    in place. Send with ``STATUS_PAGE_CSP``."""
    facts = "".join(f"<div><dt>{name}</dt><dd>{_html_text(value)}</dd></div>" for name, value in _facts(status).items())
    totals = _totals_row(status)
    rows = "".join(_row(_address_row(row), i) for i, row in enumerate(status["addresses"]))
    legend = "".join(
        f'<li><i class="k s{i % len(_PALETTE)}"></i>{_html_text(row["link"])}</li>'
        for i, row in enumerate(status["addresses"])
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<title>dispatch status</title><link rel="icon" href="data:,"><style>{_STYLE}</style>'
        f"</head><body><header><h1>dispatch</h1>{_LIVE}</header>"
        f'<dl class="facts" id="facts" data-part>{facts}</dl><table><thead><tr>{_headings(_cells(totals))}</tr></thead>'
        f'<tbody id="rows" data-part>{rows}</tbody>'
        f'<tfoot id="total" data-part>{_row(totals, None)}</tfoot></table><div class="charts">'
        f"{_chart(status, 'rate_down', 'Download rate, last 10 min')}"
        f"{_chart(status, 'rate_up', 'Upload rate, last 10 min')}</div>"
        f'<ul class="legend" id="legend" data-part>{legend}</ul>'
        f'<div id="steer" data-part>{_steering_part(status)}</div>'
        f'<div id="caps" data-part>{_caps_part(status)}</div><script>{_SCRIPT}</script>'
        "</body></html>\n"
    )


def _steering_part(status: Status) -> str:
    """Each link's state and weight, with a button that pauses or resumes it."""
    lines = []
    for link in status["links"]:
        action = "pause" if link["state"] == "ready" else "resume"
        lines.append(
            f"<li>{_html_text(link['name'])}: {link['state']}, weight {link['weight']} "
            f'<button type="button" data-link="{_html_text(link["name"])}" data-action="{action}">'
            f"{action.title()}</button></li>"
        )
    return f"<h2>Steering</h2><ul>{''.join(lines)}</ul>" if lines else ""


def _caps_part(status: Status) -> str:
    """One line per data cap: used of the cap, when it starts afresh, the time left at this rate."""
    lines = []
    for cap in status["caps"]:
        share = cap["used_bytes"] * 100 // cap["cap_bytes"]
        standing = f", {cap_standing(cap)}" if cap_standing(cap) and not cap["reached"] else ""
        ends = time.strftime("%Y-%m-%d %H:%M", time.localtime(cap["period_end"]))
        if cap["reached"]:
            left = "cap reached"
        elif cap["seconds_left"] is None:
            left = "idle"
        else:
            left = f"{format_duration(cap['seconds_left'])} left at this rate"
        lines.append(
            f"<li>{_html_text(cap['cap'])}: {format_bytes(cap['used_bytes'])} used ({share} %{standing}), {left}; "
            f"starts afresh {ends}</li>"
        )
    return f"<h2>Data caps</h2><ul>{''.join(lines)}</ul>" if lines else ""


# Prometheus metrics


def _link_up(row: StatsRow) -> int:
    return int(row["state"] in ("up", "standby"))


def _capacity_remembered(row: StatsRow) -> int | None:
    return None if row["capacity"] is None else int(row["capacity_source"] == "remembered")


# name, type, help, the value of a stats() row (None: no sample)
_PER_ADDRESS: tuple[tuple[str, str, str, Callable[[StatsRow], float | None]], ...] = (
    ("dispatch_bytes_sent_total", "counter", "Bytes sent upstream via the address.", lambda row: row["bytes_up"]),
    ("dispatch_bytes_received_total", "counter", "Bytes received via the address.", lambda row: row["bytes_down"]),
    (
        "dispatch_connections_opened_total",
        "counter",
        "Connections opened via the address.",
        lambda row: row["connections"],
    ),
    (
        "dispatch_connections_failed_total",
        "counter",
        "Connects via the address that failed.",
        lambda row: row["failed"],
    ),
    ("dispatch_open_connections", "gauge", "Upstream connections open via the address.", lambda row: row["open"]),
    ("dispatch_link_up", "gauge", "1 while the address is up (or a backup standing by), else 0.", _link_up),
    (
        "dispatch_link_capacity_bytes_per_second",
        "gauge",
        "Estimated bytes per second the address carries (the busier direction); absent until measured.",
        lambda row: row["capacity"],
    ),
    (
        "dispatch_link_capacity_age_seconds",
        "gauge",
        "Seconds since the capacity was last measured; absent until measured in this run.",
        lambda row: row["capacity_age"],
    ),
    (
        "dispatch_link_capacity_remembered",
        "gauge",
        "1 while the capacity is the one remembered from an earlier run, 0 once measured; absent without one.",
        _capacity_remembered,
    ),
    (
        "dispatch_dns_queries_total",
        "counter",
        "DNS queries sent through the address's link.",
        lambda row: row["dns_queries"],
    ),
    (
        "dispatch_dns_cache_hits_total",
        "counter",
        "Name lookups for connections of the address that the cache answered.",
        lambda row: row["dns_cache_hits"],
    ),
    (
        "dispatch_dns_failures_total",
        "counter",
        "DNS queries through the address's link that got no good answer.",
        lambda row: row["dns_failures"],
    ),
)


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _metric_family(name: str, kind: str, text: str, samples: Iterable[tuple[Mapping[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        pairs = ",".join(f'{key}="{_label_value(v)}"' for key, v in labels.items())
        lines.append(f"{name}{{{pairs}}} {_metric_number(value)}" if pairs else f"{name} {_metric_number(value)}")
    return lines


def _bond_metrics(bonds: list[BondStatus]) -> list[str]:
    """The bonds' families: the fallback of each bonded link, the role of each interface."""
    lines = _metric_family(
        "dispatch_bond_fallback",
        "gauge",
        "1 while a bonded link's last connection fell back to one TCP subflow, 0 while multipath.",
        [({"link": b["link"]}, int(b["mptcp"] == "fallback")) for b in bonds if b["mptcp"] != "unknown"],
    )
    lines += _metric_family(
        "dispatch_bond_member",
        "gauge",
        "Always 1; names an interface of the bonds and its role (subflows or backup).",
        [({"link": b["link"], "interface": m["interface"], "role": m["role"]}, 1) for b in bonds for m in b["members"]],
    )
    carried = [(b["link"], c) for b in bonds for c in b["carried"]]
    lines += _metric_family(
        "dispatch_bond_bytes_sent_total",
        "counter",
        "Bytes a bond's subflows sent through the interface.",
        [({"link": link, "interface": c["interface"]}, c["bytes_up"]) for link, c in carried],
    )
    return lines + _metric_family(
        "dispatch_bond_bytes_received_total",
        "counter",
        "Bytes a bond's subflows received through the interface.",
        [({"link": link, "interface": c["interface"]}, c["bytes_down"]) for link, c in carried],
    )


def render_metrics(status: Status) -> str:
    """``Dispatcher.status()`` in the Prometheus text format 0.0.4 (``METRICS_CONTENT_TYPE``);
    per-address series carry ``link`` and ``address`` (the local IP) labels."""
    rows = status["addresses"]
    lines = _metric_family(
        "dispatch_build_info", "gauge", "Always 1; the version is in the label.", [({"version": status["version"]}, 1)]
    )
    lines += _metric_family(
        "dispatch_uptime_seconds", "gauge", "Seconds since the proxy started.", [({}, status["uptime"])]
    )
    lines += _metric_family(
        "dispatch_link_info",
        "gauge",
        "Always 1; names the interface and tier.",
        [
            ({"link": r["link"], "address": r["ip"] or "", "interface": r["interface"] or "", "tier": r["tier"]}, 1)
            for r in rows
        ],
    )
    for name, kind, text, value_of in _PER_ADDRESS:
        samples = [({"link": r["link"], "address": r["ip"] or ""}, value_of(r)) for r in rows]
        lines += _metric_family(name, kind, text, [(labels, value) for labels, value in samples if value is not None])
    lines += _bond_metrics(status["bonds"]) if status["bonds"] else []
    caps = status["caps"]
    per_cap: tuple[tuple[str, str, Callable[[CapReport], float]], ...] = (
        ("dispatch_link_cap_bytes", "Bytes the link may carry in its cap's period.", lambda c: c["cap_bytes"]),
        ("dispatch_link_used_bytes", "Bytes the link carried in its cap's period so far.", lambda c: c["used_bytes"]),
        (
            "dispatch_link_cap_reset_timestamp_seconds",
            "When the cap's period starts afresh.",
            lambda c: c["period_end"],
        ),
    )
    for name, text, cap_value in per_cap if caps else ():  # no families without a cap, as without a link
        lines += _metric_family(
            name, "gauge", text, [({"link": c["link"], "cap": c["cap"]}, cap_value(c)) for c in caps]
        )
    lines += _metric_family(
        "dispatch_clients_refused_total", "counter", "Client connections refused.", [({}, status["refused"])]
    )
    lines += _metric_family(
        "dispatch_client_connections", "gauge", "Client connections open now.", [({}, status["open_connections"])]
    )
    return "\n".join(lines) + "\n"


# The PAC file

# Decides from the host string alone: dnsResolve, isResolvable or isInNet on a name would
# resolve every visited name on the client, outside the proxy, and leak it.
_PAC_SCRIPT = """\
// dispatch: local and private destinations go DIRECT, all else through the proxy.
var PROXY = __PROXY__, V4_LOCAL = [["0.0.0.0", 8], ["10.0.0.0", 8], ["100.64.0.0", 10],
  ["127.0.0.0", 8], ["169.254.0.0", 16], ["172.16.0.0", 12], ["192.168.0.0", 16]];
function v4(h) {
  var m = /^(\\d{1,3})\\.(\\d{1,3})\\.(\\d{1,3})\\.(\\d{1,3})$/.exec(h), n = 0, i;
  for (i = 1; m && i < 5; i++) { if (+m[i] > 255) return null; n = n * 256 + +m[i]; }
  return m ? n : null;
}
function v4Local(n) {
  for (var i = 0, size; i < V4_LOCAL.length; i++) {
    size = Math.pow(2, 32 - V4_LOCAL[i][1]);
    if (Math.floor(n / size) === Math.floor(v4(V4_LOCAL[i][0]) / size)) return true;
  }
  return false;
}
function v6(h) {  // eight numbers, or null when h is no IPv6 literal
  var m = /^(.*:)(\\d+\\.\\d+\\.\\d+\\.\\d+)$/.exec(h), n = m && v4(m[2]), halves, head, tail, i;
  if (m && n === null) return null;
  if (m) h = m[1] + Math.floor(n / 65536).toString(16) + ":" + (n % 65536).toString(16);
  halves = h.split("::");
  head = halves[0] ? halves[0].split(":") : [];
  tail = halves[1] ? halves[1].split(":") : [];
  i = 8 - head.length - tail.length;  // groups that "::" stands for
  if (halves.length > 2 || (halves.length === 1 ? i !== 0 : i < 1)) return null;
  for (; i > 0; i--) head.push("0");
  head = head.concat(tail);
  for (i = 0; i < 8; i++) {
    if (!/^[0-9a-f]{1,4}$/.test(head[i])) return null;
    head[i] = parseInt(head[i], 16);
  }
  return head;
}
function v6Local(g) {  // fe80::/10, fc00::/7, ::, ::1, and IPv4-mapped local addresses
  if ((g[0] & 0xffc0) === 0xfe80 || (g[0] & 0xfe00) === 0xfc00) return true;
  if (g[0] || g[1] || g[2] || g[3] || g[4]) return false;
  return g[5] === 0xffff ? v4Local(g[6] * 65536 + g[7]) : !g[5] && !g[6] && g[7] <= 1;
}
function FindProxyForURL(url, host) {
  var h = String(host).toLowerCase().replace(/^\\[/, "").replace(/\\]$/, ""), n = v4(h), g;
  if (h.indexOf(":") >= 0) {
    g = v6(h.replace(/%.*$/, ""));
    return g && v6Local(g) ? "DIRECT" : PROXY;
  }
  if (n !== null) return v4Local(n) ? "DIRECT" : PROXY;
  return h.indexOf(".") < 0 || /(^|\\.)localhost\\.?$/.test(h) ? "DIRECT" : PROXY;
}
"""
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+\Z")
_MAX_PORT = 65535


def render_pac(host: str, port: int) -> str:
    """A PAC file (``PAC_CONTENT_TYPE``) that sends all but local and private destinations to
    this proxy at ``host:port``, the address the client reached it on (IPv6 bare or bracketed).
    Raises ValueError for a host that is no name or IP literal, or a port out of range."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not 0 < port <= _MAX_PORT:
        raise ValueError(f"port out of range: {port}")
    if ":" in bare:
        endpoint = f"[{ipaddress.IPv6Address(bare).compressed}]:{port}"
    elif _HOST_NAME.match(bare):
        endpoint = f"{bare}:{port}"
    else:
        raise ValueError(f"not a host name or address: {host!r}")
    proxy = f"SOCKS5 {endpoint}; SOCKS {endpoint}; PROXY {endpoint}"
    return _PAC_SCRIPT.replace("__PROXY__", json.dumps(proxy))


def page_host(text: str) -> str:
    """A Host name the pages may answer to, as compared: a name in lower
    case without its final dot, or an IP address (IPv6 without brackets).
    Raises ValueError for anything else."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if _is_ip(bare):
        return str(ipaddress.ip_address(bare))
    name = bare.lower().rstrip(".")
    if not name or not _HOST_NAME.match(name):
        raise ValueError(f"{text!r} is not a host name or IP address")
    return name


def render_not_found(path: str) -> str:
    """A short 404 page for ``path`` (shown escaped, cut at 200 characters) linking to ``/``."""
    shown = path if len(path) <= _PATH_SHOWN else path[:_PATH_SHOWN] + "\u2026"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        "<title>404 Not Found</title></head><body><h1>404 Not Found</h1>"
        f'<p>Nothing here at <code>{_html_text(shown)}</code>.</p><p>See the <a href="/">status '
        'page</a>, <a href="/metrics">/metrics</a> or <a href="/proxy.pac">/proxy.pac</a>.</p>'
        "</body></html>\n"
    )


# ---------------------------------------------------------------------------
# HTTP proxy: forwarding, tunnels, and answering the local pages
# ---------------------------------------------------------------------------

# An origin may think for a while before it answers; a dead one must not
# hold a thread forever.
HTTP_RESPONSE_TIMEOUT = 120.0
# After a final response that came before the request body, how long the
# client may go on sending what nobody reads: closing at once, with its bytes
# unread, would reset the connection and could destroy the response.
UNREAD_BODY_LINGER = 2.0
PROXY_REALM = "dispatch"


class OriginError(HttpError):
    """The origin failed: it reset the connection, timed out, or sent what
    cannot be passed on. The client gets ``status`` if nothing was sent to
    it yet; the log line blames the origin, not the client."""


def _reset_connection(sock: socket.socket) -> None:
    """Close ``sock`` with a reset, not a FIN: the peer sees an abort, not
    an end (a response cut short must not look complete)."""
    linger = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    sock.close()


class _OriginReader(DeadlineReader):
    """Reads from an origin server: its reset or silence is an OriginError,
    never a "client hung up"."""

    def _receive(self, size: int) -> bytes:
        try:
            return super()._receive(size)
        except ConnectionError as error:
            raise OriginError(HTTPStatus.BAD_GATEWAY, f"the origin failed: {_describe(error)}") from None
        except TimeoutError:
            raise OriginError(HTTPStatus.GATEWAY_TIMEOUT, "the origin did not answer in time") from None


@dataclasses.dataclass
class _Origin:
    """A kept-alive connection to an origin server, for the next request there."""

    host: str
    port: int
    lease: UpstreamLease
    reader: DeadlineReader

    def reusable(self) -> bool:
        """Whether the origin is still quietly waiting for a request."""
        if self.reader.buffered:
            return False
        with _selector() as selector:
            selector.register(self.lease.sock, selectors.EVENT_READ)
            # Readable while idle means it closed (or babbles): not reusable.
            return not selector.select(0)


@dataclasses.dataclass(frozen=True)
class _ResponseHead:
    """A response's status line and header fields, as read from the origin."""

    version: str
    status: int
    reason: str
    headers: Headers


class HttpProxySession(Session):
    """Serves one client connection that speaks HTTP proxy.

    CONNECT opens a tunnel, relayed like a SOCKS connection. Any other
    method must carry an absolute http:// URL: the request goes to the
    origin in origin form and the response comes back, as many requests as
    the client sends on its kept-alive connection. The connection to an
    origin is kept for the next request to the same host. Every upstream
    connection is dispatched like any other. One log line per request.
    """

    def __init__(
        self,
        connection: socket.socket,
        client_address: tuple[Any, ...],
        reader: DeadlineReader,
        context: SessionContext,
    ) -> None:
        super().__init__(connection, client_address, reader, context)
        self.origin: _Origin | None = None
        self.responded = False
        # Set when a final response came before the request body was read.
        self.body_unread = False
        # Set when the client's connection was reset to pass an abort on.
        self.aborted = False
        # Between request heads, every read and write on the client waits
        # at most this long, as a blocking call. A head is read with the
        # socket non-blocking, so that its deadline holds for the whole head.
        self.connection.settimeout(context.handshake_timeout)

    def serve(self) -> None:
        """Serve requests until the client closes or a request ends the connection."""
        try:
            while self.serve_request():
                try:
                    if not self.reader.has_more():
                        return
                except OSError:
                    return  # an idle client timed out or went away
        finally:
            self._drop_origin()
            if self.body_unread and not self.aborted:
                self._discard_unread_body()

    def _discard_unread_body(self) -> None:
        """Close towards the client, and read what it still sends for a while."""
        deadline = time.monotonic() + UNREAD_BODY_LINGER
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(BULK_READ_SIZE):
                    return

    def serve_request(self) -> bool:
        """Serve one request; return whether the connection stays open."""
        self.record = ExchangeRecord(self.client)  # each request logs in for itself
        self.responded = False
        try:
            method, target, version, headers = self._read_request()
            self.record.target = target if method == "CONNECT" else f"{method} {target}"
            if target.startswith("/"):  # origin form: a request for the proxy itself
                return self._serve_local(method, target, version, headers)
            self._refuse_a_loop(headers)
            self._authorize(headers)
            if method == "CONNECT":
                self._tunnel(target, [value for name, value in headers if name.lower() == "via"])
                self.log()
                return False
            status, keep_alive = self._forward(method, target, version, headers)
        except OSError as error:
            if not self.responded and error.errno not in _HANG_UP_ERRNOS:
                status = _http_status(error)
                self.note_end()  # before the answer, which the client may follow with a stop
                self._send_error(status, _describe(error))
                self.record.result = f"{status.value} {_describe(error)}"
                self.log()
            else:
                self.log(error)
            return False
        self.record.result = str(status)
        self.log()
        return keep_alive

    def _read_request(self) -> tuple[str, str, str, Headers]:
        # The whole head must come in time, each request of a kept connection
        # anew: a client dripping a byte now and then must not hold a thread.
        self.reader.deadline = time.monotonic() + self.context.handshake_timeout
        self.connection.setblocking(False)
        try:
            lines = read_head(self.reader)
            method, target, version = parse_request_line(lines[0])
            return method, target, version, parse_header_lines(lines[1:])
        except LineTooLongError as error:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, str(error)) from None
        except ProtocolError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        except TimeoutError:
            raise HttpError(HTTPStatus.REQUEST_TIMEOUT, "the request did not come in time") from None
        except ValueError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        finally:
            self.reader.deadline = math.inf
            self.connection.settimeout(self.context.handshake_timeout)

    def _serve_local(self, method: str, target: str, version: str, headers: Headers) -> bool:
        """Answer a request for one of the local pages; return whether the
        connection stays open. A page served logs at debug level (a page
        open in a browser asks every 2 s), a refusal at info."""
        path = target.partition("?")[0]
        refusal, sent = self._read_body(headers)
        if refusal is None:
            if path == CONTROL_PATH or path.startswith(CONTROL_PATH + "/"):
                status, content_type, body, extra = self._control_api(method, path, headers, sent)
            else:
                status, content_type, body, extra = self._local_page(method, path, headers)
            keep_alive = keeps_alive(version, headers)
        else:
            status, content_type, extra = refusal, "text/plain; charset=utf-8", []
            why = (
                f"a page request carries no body of more than {LOCAL_PAGE_BODY_LIMIT} bytes, and none in chunks"
                if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                else "the request's body is malformed, or did not come in time"
            )
            body = f"{status.value} {status.phrase}: {why}\n".encode()
            keep_alive = False  # what is left of the body must not be read as a request
        head = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        head += [*extra, *([] if keep_alive else [("Connection", "close")])]
        self.responded = True
        self._send_down(encode_head(f"HTTP/1.1 {status.value} {status.phrase}", head))
        if method != "HEAD":
            self._send_down(body)
        self.record.result = str(status.value)
        self.record.log(logging.DEBUG if status == HTTPStatus.OK else logging.INFO)
        return keep_alive

    def _read_body(self, headers: Headers) -> tuple[HTTPStatus | None, bytes]:
        """Read the body of a page request (the control API's changes take
        one, no page does), so that it is never read as the next request.
        Returns (None, the body), or the status that refuses a body not read
        (chunked, too long, malformed)."""
        try:
            length = body_length(headers, request=True)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, b""
        if length == 0:
            return None, b""
        if not 0 < length <= LOCAL_PAGE_BODY_LIMIT:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b""
        self.reader.deadline = time.monotonic() + self.context.handshake_timeout
        self.connection.setblocking(False)
        parts: list[bytes] = []
        try:
            copy_body(self.reader, length, parts.append)
        except OSError:  # cut short, or too slow
            return HTTPStatus.BAD_REQUEST, b""
        finally:
            self.reader.deadline = math.inf
            self.connection.settimeout(self.context.handshake_timeout)
        return None, b"".join(parts)

    def _control_api(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> tuple[HTTPStatus, str, bytes, list[tuple[str, str]]]:
        """Answer the control API: ``GET /api/links`` (the links as steered
        and their traffic), ``POST /api/links/NAME`` with a JSON body (a
        change, see LinkControl). A change is never made by GET, nor by a
        request a web page could send unasked: it must be a POST of
        ``application/json`` (no form is), from no Origin but dispatch's own,
        for a Host the pages answer, and logged in where dispatch listens
        beyond loopback."""
        try:
            return self._control_answer(method, path, headers, body)
        except ControlError as error:
            extra = [("Allow", "GET, HEAD" if path == CONTROL_PATH else "POST")]
            if error.status == HTTPStatus.UNAUTHORIZED:
                extra = [("WWW-Authenticate", f'Basic realm="{PROXY_REALM}", charset="UTF-8"')]
            elif error.status != HTTPStatus.METHOD_NOT_ALLOWED:
                extra = []
            return error.status, "application/json", _json_line({"error": str(error)}), extra

    def _control_answer(
        self, method: str, path: str, headers: Headers, body: bytes
    ) -> tuple[HTTPStatus, str, bytes, list[tuple[str, str]]]:
        control, status_of = self.context.control, self.context.status
        if control is None or status_of is None:
            raise ControlError(HTTPStatus.NOT_FOUND, "no control API here (--no-page)")
        if not self._names_this_proxy(headers):
            raise ControlError(HTTPStatus.FORBIDDEN, "the Host header names no address of this proxy (see --page-host)")
        # One segment after /api/links/; a proxy link's name has its slashes
        # in it percent-encoded (socks5%3A%2F%2Fhost%3A1080).
        named = path[len(CONTROL_PATH) + 1 :]
        if path != CONTROL_PATH and (not named or "/" in named):
            raise ControlError(HTTPStatus.NOT_FOUND, f"no such API path: {path[:100]!r}")
        name = urllib.parse.unquote(named)
        if path == CONTROL_PATH:
            if method not in ("GET", "HEAD"):
                raise ControlError(
                    HTTPStatus.METHOD_NOT_ALLOWED, "GET /api/links; a change is a POST to /api/links/NAME"
                )
            self._control_login(headers)
            status = status_of()
            shown = {"links": status["links"], "addresses": status["addresses"], "caps": status["caps"]}
            return HTTPStatus.OK, "application/json", _json_line(shown), []
        if method != "POST":
            raise ControlError(HTTPStatus.METHOD_NOT_ALLOWED, "a change is a POST, never a GET")
        types = [value.partition(";")[0].strip().lower() for key, value in headers if key.lower() == "content-type"]
        if types != ["application/json"]:
            raise ControlError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "a change is sent as Content-Type: application/json")
        origins = [value.strip() for key, value in headers if key.lower() == "origin"]
        hosts = [value.strip() for key, value in headers if key.lower() == "host"]
        own = [f"http://{host}".lower() for host in hosts]
        if origins and [origin.lower() for origin in origins] != own:
            raise ControlError(HTTPStatus.FORBIDDEN, f"a change from another origin ({origins[0][:100]!r}) is refused")
        if self.context.control_needs_login and not self.context.access.requires_credentials:
            raise ControlError(
                HTTPStatus.FORBIDDEN,
                "dispatch listens beyond loopback: changes need a login (--auth or --auth-file)",
            )
        self._control_login(headers)
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ControlError(HTTPStatus.BAD_REQUEST, "the body is no JSON") from None
        who = _split_host(self.client_address)[0]
        return HTTPStatus.OK, "application/json", _json_line({"changed": control.steer(name, request, who)}), []

    def _control_login(self, headers: Headers) -> None:
        if not self._logged_in(headers, "authorization"):
            raise ControlError(HTTPStatus.UNAUTHORIZED, "log in")

    def _names_this_proxy(self, headers: Headers) -> bool:
        """Whether the request's Host names this proxy: localhost, a
        loopback address, the address the client reached, or a name given
        (``page_hosts``). A web page cannot make a browser send any of
        these, as it can for its own name pointed at 127.0.0.1 (DNS
        rebinding). A request without Host is no browser's."""
        hosts = [value.strip() for name, value in headers if name.lower() == "host"]
        if not hosts:
            return True
        if len(hosts) > 1:
            return False
        try:
            name = page_host(_split_host_port(hosts[0], 80)[0])
        except ValueError:
            return False
        if name == "localhost" or name in self.context.page_hosts:
            return True
        if not _is_ip(name):
            return False
        ip = _client_ip(name)
        return ip.is_loopback or ip == _client_ip(self.connection.getsockname()[0])

    def _local_page(
        self, method: str, path: str, headers: Headers
    ) -> tuple[HTTPStatus, str, bytes, list[tuple[str, str]]]:
        """(status, content type, body, more headers) of a local page."""
        status_of = self.context.status
        if status_of is None:
            return HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"404 Not Found\n", []
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            return HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", b"GET or HEAD\n", allow
        if path not in LOCAL_PAGES:
            return HTTPStatus.NOT_FOUND, PAGE_CONTENT_TYPE, render_not_found(path).encode(), []
        if path == "/proxy.pac":  # fetched by systems that ask for no login first
            host = str(_client_ip(self.connection.getsockname()[0]))
            return HTTPStatus.OK, PAC_CONTENT_TYPE, render_pac(host, self.connection.getsockname()[1]).encode(), []
        if not self._names_this_proxy(headers):
            body = b"403 Forbidden: the Host header names no address of this proxy (see --page-host)\n"
            return HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8", body, []
        if not self._logged_in(headers, "authorization"):
            challenge = [("WWW-Authenticate", f'Basic realm="{PROXY_REALM}", charset="UTF-8"')]
            return HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"401 Unauthorized: log in\n", challenge
        status = status_of()
        if path == "/stats.json":
            return HTTPStatus.OK, "application/json", json.dumps(status).encode(), []
        if path == "/metrics":
            return HTTPStatus.OK, METRICS_CONTENT_TYPE, render_metrics(status).encode(), []
        page = render_status_page(status).encode()
        return HTTPStatus.OK, PAGE_CONTENT_TYPE, page, [("Content-Security-Policy", STATUS_PAGE_CSP)]

    def _refuse_a_loop(self, headers: Headers) -> None:
        """Raise HttpError(508) for a request that has been through this
        proxy already: its Via names this proxy, so it came back by a chain
        of proxies that loops (as it would without end, each pass one more
        connection and thread, until the head grew past its limit)."""
        if self.context.upstream.pseudonym in _via_recipients(headers):
            raise HttpError(
                HTTPStatus.LOOP_DETECTED, "a forwarding loop: the request came back (its Via names this proxy)"
            )

    def _authorize(self, headers: Headers) -> None:
        """Raise HttpError(407) unless the request logs in to the proxy."""
        if not self._logged_in(headers, "proxy-authorization"):
            raise HttpError(HTTPStatus.PROXY_AUTHENTICATION_REQUIRED, "proxy credentials wanted")

    def _logged_in(self, headers: Headers, header: str) -> bool:
        """Whether the Basic login in ``header`` (Proxy-Authorization for the
        proxy, Authorization for its pages) is accepted; always, where no
        login is required. The user it names goes on the log line."""
        access = self.context.access
        if not access.requires_credentials:
            return True
        credentials = basic_credentials(headers, header)
        if credentials is not None:
            self.record.user = _printable(credentials[0].encode())
        return credentials is not None and access.check_credentials(*credentials)

    def describe_end(self, error: OSError) -> str:
        """How ``error`` ended the request: after the response began, with its status."""
        end = super().describe_end(error)
        return f"{self.record.result}, {end}" if self.responded else end

    def _send_error(self, status: HTTPStatus, detail: str) -> None:
        headers = []
        if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
            headers.append(("Proxy-Authenticate", f'Basic realm="{PROXY_REALM}"'))
        with contextlib.suppress(OSError):  # the client left; the log line says why the request failed
            self.connection.sendall(error_response(status, detail, headers))

    def _tunnel(self, target: str, hops: Sequence[str]) -> None:
        try:
            host, port = parse_connect_target(target)
        except ValueError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        self._drop_origin()
        with self.connect(host, port, hops=hops) as lease:
            self.responded = True
            with contextlib.suppress(OSError):  # the relay finds the client gone
                self.connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.relay_through(lease)

    def _forward(self, method: str, target: str, version: str, headers: Headers) -> tuple[int, bool]:
        """Send the request to its origin and the response back; return
        (status, whether the client connection stays open)."""
        try:
            host, port, path = parse_absolute_url(target)
            length = body_length(headers, request=True)
        except ValueError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        fields = _request_headers(host, port, version, headers, length, self.context.upstream.pseudonym)
        head = encode_head(f"{method} {path} HTTP/1.1", fields)
        origin = self._send_head(host, port, head, retryable=length == 0 and method in IDEMPOTENT_METHODS)
        # The expectation goes to the origin, whose 100 Continue or final
        # answer comes back (RFC 9110, 10.1.1). An HTTP/1.0 client's is
        # ignored (and not forwarded): it could not be answered with a 1xx.
        expects_continue = version == "HTTP/1.1" and "100-continue" in header_tokens(headers, "expect")
        if expects_continue and length != 0:
            early = self._await_continue(origin)
            if early is not None:
                self.body_unread = True
                return self._pass_response(origin, method, version, headers, early)
        try:
            copy_body(self.reader, length, lambda data: self._send_up(origin, data))
        except OriginError as error:
            self.body_unread = True  # the rest of it: the answer must not be lost to a reset
            if error.status != HTTPStatus.BAD_GATEWAY:
                raise  # it stopped taking the body for so long that no answer is coming
            # The origin closed while taking the body: it may have answered already (a 413).
            try:
                early = self._response_head(origin, version)
            except OSError:
                raise OriginError(HTTPStatus.BAD_GATEWAY, f"{error} during the request body") from None
            return self._pass_response(origin, method, version, headers, early)
        except ProtocolError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"request body: {error}") from None
        except TimeoutError:
            # Only the client's reads time out here: _send_up turns the
            # origin's into a 504.
            raise HttpError(HTTPStatus.REQUEST_TIMEOUT, "the request body did not come in time") from None
        return self._pass_response(origin, method, version, headers)

    def _await_continue(self, origin: _Origin) -> _ResponseHead | None:
        """Wait for the origin's 100 Continue (passed on) or for the client
        to send its body anyway; return the origin's final response head if
        that came first instead."""
        deadline = time.monotonic() + HTTP_RESPONSE_TIMEOUT
        with _selector() as selector:
            selector.register(self.connection, selectors.EVENT_READ, "client")
            selector.register(origin.lease.sock, selectors.EVENT_READ, "origin")
            while not self.reader.buffered:
                if origin.reader.buffered:
                    ready = {"origin"}
                else:
                    events = selector.select(max(0.0, deadline - time.monotonic()))
                    if not events:
                        raise OriginError(HTTPStatus.GATEWAY_TIMEOUT, "the origin did not answer in time")
                    ready = {key.data for key, _ in events}
                if "client" in ready:
                    return None
                response = self._next_head(origin, "HTTP/1.1")
                if response.status == HTTPStatus.CONTINUE:
                    return None
                if response.status >= 200:
                    return response
        return None

    def _next_head(self, origin: _Origin, version: str) -> _ResponseHead:
        """Read the origin's next response head; an interim (1xx) one is
        passed on to an HTTP/1.1 client, never to an HTTP/1.0 one (RFC
        9110, 15.2)."""
        try:
            lines = read_head(origin.reader, MAX_RESPONSE_HEADER_LINE, MAX_RESPONSE_HEADER_BYTES)
            response_version, status, reason = parse_status_line(lines[0])
            response_headers = parse_header_lines(lines[1:])
            # Upgrade is not forwarded: a 101 Switching Protocols answers nothing asked.
            if status == HTTPStatus.SWITCHING_PROTOCOLS or status < 100:
                raise ValueError(f"status {status}")
        except (ValueError, LineTooLongError) as error:
            raise OriginError(HTTPStatus.BAD_GATEWAY, f"bad response: {error}") from None
        if takes_absolute_form(origin.lease.local):
            self._take_proxy_answer(origin, status)
        if status < 200 and version == "HTTP/1.1":
            self._send_down(encode_head(f"HTTP/1.1 {status} {reason}", forwarded_headers(response_headers)))
        return _ResponseHead(response_version, status, reason, response_headers)

    def _response_head(self, origin: _Origin, version: str) -> _ResponseHead:
        """The origin's final response head, the interim ones passed on."""
        while (response := self._next_head(origin, version)).status < 200:
            pass
        return response

    def _pass_response(
        self, origin: _Origin, method: str, version: str, headers: Headers, early: _ResponseHead | None = None
    ) -> tuple[int, bool]:
        """Pass the origin's response on (its head read already if ``early``);
        return (status, whether the client stays)."""
        response = early or self._response_head(origin, version)
        status = response.status
        try:
            declared = body_length(response.headers, request=False)
        except ValueError as error:
            raise OriginError(HTTPStatus.BAD_GATEWAY, f"bad response: {error}") from None
        response_length = declared if response_has_body(method, status) else 0

        framed = response_length != Framing.UNTIL_CLOSE
        client_stays = keeps_alive(version, headers) and framed and not self.body_unread
        origin_stays = keeps_alive(response.version, response.headers) and framed and not self.body_unread
        # An HTTP/1.0 client cannot read chunks: it gets the bare data, ended
        # by the close, and no trailer fields.
        dechunk = version == "HTTP/1.0" and response_length == Framing.CHUNKED
        outgoing = forwarded_headers(response.headers)
        if dechunk:
            outgoing = [(name, value) for name, value in outgoing if name.lower() != "trailer"]
        else:
            outgoing += framing_headers(response.headers, declared)
        outgoing.append(("Via", f"{response.version[len('HTTP/') :]} {self.context.upstream.pseudonym}"))
        if not client_stays:
            outgoing.append(("Connection", "close"))
        self.responded = True
        self.record.result = str(status)  # what the log says if the client hangs up now
        self._send_down(encode_head(f"HTTP/1.1 {status} {response.reason}", outgoing))
        try:
            copy_body(origin.reader, response_length, self._send_down, dechunk=dechunk)
        except (ProtocolError, OriginError) as error:
            # Only the origin's side raises these: the client must see an
            # abort, not an end, or a cut body would look complete.
            self._drop_origin()
            self.aborted = True
            _reset_connection(self.connection)
            raise OriginError(HTTPStatus.BAD_GATEWAY, f"the response was cut short: {error}") from None
        if not origin_stays:
            self._drop_origin()
        return status, client_stays

    def _take_proxy_answer(self, origin: _Origin, status: int) -> None:
        """Take the status an HTTP upstream proxy answered a request with:
        its refusal of the login is the link's failure (a 502 here, never
        its challenge passed on; the link sits out until a retest gets
        through), anything else says it works."""
        proxy, upstream = origin.lease.local, self.context.upstream
        if status == HTTPStatus.PROXY_AUTHENTICATION_REQUIRED:
            refusal = ProxyLinkError(Reply.GENERAL_FAILURE, "the upstream proxy refused the login")
            upstream.proxy_failed(proxy, refusal)
            upstream.health.sit_out(proxy, refusal, (origin.host, origin.port))
            raise refusal
        upstream.proxy_worked(proxy)

    def _send_head(self, host: str, port: int, head: bytes, *, retryable: bool) -> _Origin:
        """Send a request head to (host, port); return the origin connection.

        A kept connection may have been closed by the origin just as the
        request went out: it then fails before any byte of the response.
        A ``retryable`` request (idempotent, without a body: nothing is lost
        and nothing is done twice) is then sent once more, on a new
        connection; any other gets a 502.
        """
        kept = self.origin
        origin = self._origin_for(host, port)
        if origin is not kept or not retryable:
            self._send_up(origin, absolute_form_head(origin.lease.local, host, port, head))
            return origin
        try:
            self._send_up(origin, absolute_form_head(origin.lease.local, host, port, head))
            if origin.reader.has_more():
                return origin
        except OriginError as error:
            if error.status != HTTPStatus.BAD_GATEWAY:
                raise
        self._drop_origin()
        origin = self._origin_for(host, port)
        self._send_up(origin, absolute_form_head(origin.lease.local, host, port, head))
        return origin

    def _origin_for(self, host: str, port: int) -> _Origin:
        """The kept connection to (host, port) if it is still good, else a new one."""
        origin = self.origin
        if origin is not None and (origin.host, origin.port) == (host, port) and origin.reusable():
            self.record.via = origin.lease.local
            return origin
        self._drop_origin()
        lease = self.connect(host, port, absolute_form=True)
        lease.sock.settimeout(HTTP_RESPONSE_TIMEOUT)
        reader = _OriginReader(lease.sock, eof_message="the origin closed before the response ended")
        self.origin = _Origin(host, port, lease, reader)
        return self.origin

    def _drop_origin(self) -> None:
        if self.origin is not None:
            self.origin.lease.close()
            self.origin = None

    def _send_up(self, origin: _Origin, data: bytes) -> None:
        try:
            origin.lease.sock.sendall(data)
        except TimeoutError:
            raise OriginError(HTTPStatus.GATEWAY_TIMEOUT, "the origin did not take the request in time") from None
        except OSError as error:
            raise OriginError(HTTPStatus.BAD_GATEWAY, f"the origin failed: {_describe(error)}") from None
        self.count(len(data), 0)

    def _send_down(self, data: bytes) -> None:
        self.connection.sendall(data)
        self.count(0, len(data))


def _via_recipients(headers: Headers) -> list[str]:
    """The received-by of each hop a message's Via fields name (RFC 9110,
    7.6.3: ``protocol received-by [comment]`` each), lowercased."""
    return [parts[1] for token in header_tokens(headers, "via") if len(parts := token.split()) > 1]


def _request_headers(host: str, port: int, version: str, headers: Headers, length: int, pseudonym: str) -> Headers:
    """The headers of a request as it goes to its origin: Host first, no
    hop-by-hop ones, its framing written afresh, no Expect from an HTTP/1.0
    client (ignored: RFC 9110, 10.1.1), and Via naming this proxy by ``pseudonym``."""
    authority = host if port == 80 else _format_endpoint(host, port)
    outgoing = [("Host", f"[{host}]" if port == 80 and ":" in host else authority)]
    dropped = {"host", "expect"} if version == "HTTP/1.0" else {"host"}
    outgoing += [(name, value) for name, value in forwarded_headers(headers) if name.lower() not in dropped]
    outgoing += framing_headers(headers, length)
    outgoing.append(("Via", f"{version[len('HTTP/') :]} {pseudonym}"))
    return outgoing


# ---------------------------------------------------------------------------
# Transparent sessions: redirected TCP connections, tproxy UDP flows
# ---------------------------------------------------------------------------

# Transparent mode's socket options that the socket module has no name for
# (linux/in.h, linux/in6.h): a socket that may be bound to an address of
# another machine and receive what TPROXY hands it, and the ancillary data
# that tells a datagram's original destination.
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75
# Seconds a UDP flow is kept with nothing moving either way (when there is
# no --idle-timeout): a game's or a call's flow goes on past pauses, and a
# DNS query's is forgotten soon enough.
UDP_FLOW_IDLE_TIMEOUT = 60.0
# The most UDP flows open at once: each holds two sockets and a thread.
MAX_UDP_FLOWS = 1024


# DNS (RFC 1035) as transparent mode answers it: devices ask some server on
# port 53, by UDP or TCP, and A and AAAA queries are answered by dispatch's
# own resolver (through the links, cached) with this TTL; any other query
# goes on to the server asked, as any datagram or connection does.
DNS_PORT = 53
# Seconds a DNS connection (RFC 7766) is kept waiting for its next query
# (when there is no --idle-timeout): long enough for a burst of lookups.
DNS_TCP_IDLE_TIMEOUT = 10.0
DNS_ANSWER_TTL = 60
DNS_TYPES = {1: socket.AF_INET, 28: socket.AF_INET6}  # A, AAAA
DNS_CLASS_IN = 1
DNS_NOERROR, DNS_SERVFAIL, DNS_NXDOMAIN = 0, 2, 3
# Ports whose protocols have the client speak first (HTTP, TLS): there the
# first bytes are waited for, up to this many seconds, for a site's name.
CLIENT_FIRST_PORTS = frozenset({80, 443, 8080, 8443})
SITE_PEEK_TIMEOUT = 1.0
SITE_PEEK_SIZE = 16384  # a TLS record at most


@dataclasses.dataclass(frozen=True)
class DnsQuery:
    """The one question of a DNS query: its id, name (lower case, no final
    dot), type and class, the question as sent, and its RD flag."""

    id: int
    name: str
    rdtype: int
    rdclass: int
    question: bytes
    recursion_desired: bool


def parse_dns_query(message: bytes) -> DnsQuery:
    """The question of a standard query of one question; ValueError otherwise."""
    if len(message) < 12:
        raise ValueError("shorter than a DNS header")
    ident, flags, questions = struct.unpack_from("!HHH", message)
    if flags & 0xF800 or questions != 1:  # QR 0 and OPCODE 0: a standard query
        raise ValueError("not a standard query of one question")
    labels, at = [], 12
    while True:
        if at >= len(message):
            raise ValueError("the name runs past the message")
        size = message[at]
        if size == 0:
            break
        if size > 63:
            raise ValueError("a compressed or too long label")
        labels.append(message[at + 1 : at + 1 + size])
        at += 1 + size
    if at + 5 > len(message):
        raise ValueError("no type and class")
    rdtype, rdclass = struct.unpack_from("!HH", message, at + 1)
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        raise ValueError("a name that is not ASCII") from None
    return DnsQuery(ident, name, rdtype, rdclass, message[12 : at + 5], bool(flags & 0x0100))


def dns_answer(query: DnsQuery, ips: Sequence[str], rcode: int = DNS_NOERROR, ttl: int = DNS_ANSWER_TTL) -> bytes:
    """The response to ``query``: its ``ips`` as records of its type, or ``rcode``."""
    flags = 0x8000 | 0x0080 | (0x0100 if query.recursion_desired else 0) | rcode  # QR, RA, RD as asked
    records = b""
    for ip in ips:
        data = socket.inet_pton(_family_of(ip), ip)
        records += struct.pack("!HHHIH", 0xC00C, query.rdtype, DNS_CLASS_IN, ttl, len(data)) + data
    return struct.pack("!HHHHHH", query.id, flags, 1, len(ips), 0, 0) + query.question + records


def address_query(message: bytes) -> DnsQuery | None:
    """The question of ``message`` if it asks for the addresses of a name
    (A or AAAA, class IN): what dispatch answers itself; None otherwise."""
    try:
        query = parse_dns_query(message)
    except ValueError:
        return None
    return query if query.rdtype in DNS_TYPES and query.rdclass == DNS_CLASS_IN else None


def answer_address_query(context: SessionContext, query: DnsQuery, record: ExchangeRecord) -> bytes:
    """The answer to an address query by dispatch's own resolver (through
    the links, cached); each address given is known by the name for the
    answer's TTL. ``record`` (the query's log line) is told the result."""
    rcode, ips = DNS_NOERROR, []
    try:
        # Both families: a name with addresses of the other one only exists.
        found = context.upstream.resolve(query.name, (socket.AF_INET, socket.AF_INET6), None)
        ips = [ip for family, ip in found if family == DNS_TYPES[query.rdtype]]
    except OSError as error:
        unknown = isinstance(error, SocksError) and error.reply == Reply.HOST_UNREACHABLE
        rcode = DNS_NXDOMAIN if unknown else DNS_SERVFAIL
        record.result = _describe(error)
    if ips and context.names is not None:
        context.names.remember(ips, query.name, DNS_ANSWER_TTL)
    record.result += f", {len(ips)} {'address' if len(ips) == 1 else 'addresses'}"
    return dns_answer(query, ips, rcode)


def dns_query_record(client: str, query: DnsQuery, server: Target) -> ExchangeRecord:
    """The log line of an address query dispatch answers for ``server``."""
    kind = "A" if query.rdtype == 1 else "AAAA"
    asked = _format_endpoint(*server)
    return ExchangeRecord(client, target=f"{query.name} ({kind}, asked of {asked})", transparent=True)


def tls_server_name(data: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello that starts ``data``; None
    if it has none or ``data`` is not one (or not all of it)."""
    try:
        if data[0] != 22 or data[5] != 1:  # a handshake record, a ClientHello
            return None
        at = 5 + 4 + 2 + 32  # record and handshake headers, version, random
        at += 1 + data[at]  # session id
        at += 2 + struct.unpack_from("!H", data, at)[0]  # cipher suites
        at += 1 + data[at]  # compression methods
        end = at + 2 + struct.unpack_from("!H", data, at)[0]
        at += 2
        while at + 4 <= end:
            kind, size = struct.unpack_from("!HH", data, at)
            if kind == 0:  # server_name: a list of (type, name); 0 is a host name
                if data[at + 6] == 0:
                    length = struct.unpack_from("!H", data, at + 7)[0]
                    return data[at + 9 : at + 9 + length].decode("ascii").lower() or None
                return None
            at += 4 + size
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def http_host(data: bytes) -> str | None:
    """The host of an HTTP/1 request head's Host field, without its port; None if there is none."""
    head = data.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            try:
                host = value.strip().decode("ascii").lower()
            except UnicodeDecodeError:
                return None
            host = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
            return host or None
    return None


def _needs_more(data: bytes) -> bool:
    """Whether ``data`` is the start of a TLS record or HTTP head that has more to come."""
    if data[:1] == b"\x16" and len(data) >= 5:
        return len(data) < 5 + int(struct.unpack_from("!H", data, 3)[0])
    return data[:1].isalpha() and b"\r\n\r\n" not in data


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a connection the firewall redirected here (nftables
    ``redirect``) was going: (ip, port), as the kernel's connection tracking
    kept it. Raises OSError where there is none to tell (ENOENT)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            return socket.inet_ntop(socket.AF_INET6, packed), port
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise
        raise SocksError(Reply.GENERAL_FAILURE, "no destination to go to: the connection was not redirected") from None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntop(socket.AF_INET, packed), port


class TransparentSession(Session):
    """A connection the firewall sent here (transparent mode): no handshake
    and nothing to reply; its target is where the client sent it
    (original_destination). From there it is any connection: dispatched,
    counted on its link, relayed, one log line marked "(transparent)"."""

    def serve(self) -> None:
        """Connect to the original destination and relay to the end; log one line."""
        self.record.transparent = True
        # Its client thinks itself connected, and may send its request and
        # close its sending side at once.
        self.eof_is_hang_up = False
        try:
            ip, port = original_destination(self.connection)
            self.record.target = _format_endpoint(ip, port)
            self.refuse_the_listener(ip, port)
            if port == DNS_PORT and self.context.upstream.resolver.through_links:
                self.serve_names(ip, port)
            else:
                site = self.site_name(ip, port)
                if site is not None:
                    self.record.target = f"{_format_endpoint(site, port)} ({ip})"
                with self.connect(ip, port, site=site) as lease:
                    self.relay_through(lease)
        except OSError as error:
            self.log(error)
        else:
            self.log()

    def serve_names(self, ip: str, port: int) -> None:
        """DNS over TCP (RFC 7766) to the server at ``ip``: each address
        query is answered by dispatch's own resolver (answer_address_query,
        one log line each), any other goes on to the server through a link,
        one at a time; a connection whose first message is no address query
        is relayed as it is. Ends when the client closes or waits too long."""
        idle = self.context.idle_timeout or DNS_TCP_IDLE_TIMEOUT
        server: tuple[UpstreamLease, DeadlineReader] | None = None
        answered = 0
        try:
            while (message := self.next_dns_message(idle)) is not None:
                query = address_query(message)
                if query is None and server is None and not answered:
                    framed = struct.pack("!H", len(message)) + message
                    self.reader = DeadlineReader(
                        self.connection, self.reader.deadline, data=framed + self.reader.rest()
                    )
                    with self.connect(ip, port) as lease:
                        self.relay_through(lease)
                    return
                if query is None:
                    if server is None:
                        lease = self.connect(ip, port)
                        server = lease, DeadlineReader(lease.sock, eof_message="the DNS server closed")
                    self.send_dns_message(self.ask_server(*server, message, idle), idle)
                    continue
                record = dns_query_record(self.client, query, (ip, port))
                self.send_dns_message(answer_address_query(self.context, query, record), idle)
                answered += 1
                record.log()
        finally:
            if server is not None:
                server[0].close()
            self.note_end()
        self.record.result = f"ok, {answered} answered here"

    def next_dns_message(self, idle: float) -> bytes | None:
        """The client's next DNS message (its two-byte length taken off);
        None once it closes, or sends nothing for ``idle`` seconds."""
        self.reader.deadline = time.monotonic() + idle
        try:
            if not self.reader.has_more():
                return None
            return self.reader.read(struct.unpack("!H", self.reader.read(2))[0])
        except TimeoutError:
            return None

    def send_dns_message(self, message: bytes, idle: float) -> None:
        """Send a DNS message to the client, framed by its length."""
        _send_all_by(self.connection, struct.pack("!H", len(message)) + message, time.monotonic() + idle)

    def ask_server(self, lease: UpstreamLease, server: DeadlineReader, message: bytes, idle: float) -> bytes:
        """Send ``message`` to the DNS server on ``lease`` and return its answer, counted on the link."""
        _send_all_by(lease.sock, struct.pack("!H", len(message)) + message, time.monotonic() + idle)
        server.deadline = time.monotonic() + self.context.upstream.connect_timeout
        answer = server.read(struct.unpack("!H", server.read(2))[0])
        self.count(len(message) + 2, len(answer) + 2)
        return answer

    def site_name(self, ip: str, port: int) -> str | None:
        """The name of the site at ``ip``: the one a DNS answer of dispatch's
        gave it for, or else (where the client speaks first) the one its
        first bytes name, a TLS ClientHello's SNI or an HTTP Host field."""
        known = self.context.names.name_of(ip) if self.context.names is not None else None
        if known is not None or port not in CLIENT_FIRST_PORTS:
            return known
        first = self.first_bytes()
        return tls_server_name(first) or http_host(first)

    def first_bytes(self) -> bytes:
        """What the client sends first, up to a whole TLS record or HTTP head
        (within SITE_PEEK_TIMEOUT), kept for the relay to send on as it came."""
        deadline = min(self.reader.deadline, time.monotonic() + SITE_PEEK_TIMEOUT)
        data = b""
        with contextlib.suppress(TimeoutError):
            while len(data) < SITE_PEEK_SIZE and (not data or _needs_more(data)):
                chunk = _recv_by(self.connection, SITE_PEEK_SIZE - len(data), deadline)
                if not chunk:
                    break
                data += chunk
        self.reader = DeadlineReader(self.connection, self.reader.deadline, data=data)
        return data

    def refuse_the_listener(self, ip: str, port: int) -> None:
        """Raise SocksError (and log a warning) if the destination is the
        listener itself: a connection that came to it without being
        redirected, or rules that redirect dispatch's own traffic, would
        otherwise connect to it again and again."""
        listener_ip, listener_port = _split_host(self.connection.getsockname())
        target = _client_ip(ip)
        if port != listener_port or not (
            target == _client_ip(listener_ip) or target.is_loopback or is_own_address(target)
        ):
            return
        logger.warning("refused %s: its target %s is the transparent listener itself", self.client, self.record.target)
        raise SocksError(Reply.NOT_ALLOWED, "the target is the transparent listener itself")


def _transparent_udp_socket(family: socket.AddressFamily, address: Target) -> socket.socket:
    """A UDP socket bound to ``address``, which may be another machine's
    (IP_TRANSPARENT), that is told each datagram's original destination."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def datagram_destination(ancillary: Iterable[tuple[int, int, bytes]]) -> Target | None:
    """The original destination of a datagram TPROXY handed over, from
    ``recvmsg``'s ancillary data (IP_ORIGDSTADDR, IPV6_ORIGDSTADDR); None
    if it does not say."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, packed = struct.unpack_from("!2xH4s", data)
            return socket.inet_ntop(socket.AF_INET, packed), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port, packed = struct.unpack_from("!2xH4x16s", data)
            return socket.inet_ntop(socket.AF_INET6, packed), port
    return None


class UdpFlow:
    """The datagrams between one client and one destination that TPROXY
    sent here: they leave from a dispatched local address (its link chosen
    as for a connection), and the answers go back to the client from the
    destination's own address and port (a transparent socket bound to it),
    so that the client's socket takes them. Ends after ``idle`` seconds with
    nothing moving, or at the proxy's stop; one log line."""

    def __init__(self, context: SessionContext, client: Target, destination: Target, idle: float) -> None:
        self.context = context
        self.client = client
        self.destination = destination
        self.idle = idle
        self.record = ExchangeRecord(_format_endpoint(*client), target=_format_endpoint(*destination), transparent=True)
        self.datagrams_up = self.datagrams_down = 0
        family = _family_of(destination[0])
        context.upstream.admit_target(str(_client_ip(client[0])), destination[0], destination[0], destination[1])
        self.lease = context.upstream.open_udp(family)
        self.record.via = self.lease.local
        try:
            self.answers = _transparent_udp_socket(family, destination)
        except BaseException:
            self.lease.close()
            raise
        self.last = time.monotonic()

    def send(self, data: bytes) -> None:
        """Send a datagram of the client's on to the destination."""
        host, port = self.destination
        try:
            if isinstance(self.lease, ProxiedUdpLease):
                self.lease.send_to(data, host, port)
            else:
                self.lease.sock.sendto(data, self.destination)
        except OSError:
            return  # a datagram lost, as UDP's are
        self.last = time.monotonic()
        self.datagrams_up += 1
        self.count(len(data), 0)

    def count(self, up: int, down: int) -> None:
        self.record.up += up
        self.record.down += down
        self.context.upstream.meter.add(self.lease.local, up, down)

    def run(self, ended: Callable[[UdpFlow], None]) -> None:
        """Pass the answers back until the flow is idle or the proxy stops;
        then close, call ``ended`` and log."""
        try:
            sock = self.lease.sock
            while not self.context.stopping.is_set():
                left = self.last + self.idle - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(left, 1.0))
                try:
                    if isinstance(self.lease, ProxiedUdpLease):
                        data, source = self.lease.receive()
                    else:
                        data, source = sock.recvfrom(UDP_BUFFER_SIZE)
                except TimeoutError:
                    continue
                if _split_host(source) != self.destination:
                    continue  # the flow is this destination's alone
                with contextlib.suppress(OSError):
                    self.answers.sendto(data, self.client)
                    self.last = time.monotonic()
                    self.datagrams_down += 1
                    self.count(0, len(data))
        except OSError as error:
            if not self.context.stopping.is_set():
                self.record.result = _describe(error)
        finally:
            self.answers.close()
            self.lease.close()
            ended(self)
        if self.context.stopping.is_set():
            self.record.result += ", cut by shutdown"
        self.record.result += f", {self.datagrams_up} datagrams up, {self.datagrams_down} down"
        self.record.log()


class TransparentUdp:
    """The tproxy UDP listener of one family on one port: each datagram's
    original destination (datagram_destination) and client pick its UdpFlow,
    opened for the first. The allow-list admits as for connections, and
    this machine's own addresses too; refusals are dropped datagrams."""

    def __init__(self, family: socket.AddressFamily, port: int, context: SessionContext, access: AccessPolicy) -> None:
        self.context = context
        self.access = access
        self.idle = context.idle_timeout or UDP_FLOW_IDLE_TIMEOUT
        self.socket = _transparent_udp_socket(family, ("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        self._flows: dict[tuple[Target, Target], UdpFlow] = {}
        self._lock = threading.Lock()
        self._wake_up, self._wake_up_sender = socket.socketpair()
        self._stopped = threading.Event()
        self._done = threading.Event()
        self._done.set()

    def serve_until_stopped(self) -> None:
        """Receive datagrams until stop()."""
        self._done.clear()
        try:
            with _selector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                selector.register(self._wake_up, selectors.EVENT_READ)
                while not self._stopped.is_set():
                    if any(key.fileobj is self.socket for key, _ in selector.select()):
                        self._receive()
        finally:
            self._done.set()

    def _receive(self) -> None:
        if sys.platform == "win32":  # no recvmsg; transparent mode is refused there anyway
            return
        try:
            data, ancillary, _flags, source = self.socket.recvmsg(UDP_BUFFER_SIZE, socket.CMSG_SPACE(28))
        except OSError:
            return
        destination = datagram_destination(ancillary)
        client = _split_host(source)
        if destination is None or not self._admits(client[0]):
            return
        if destination[1] == DNS_PORT and self._answers(data, client, destination):
            return
        key = (client, destination)
        with self._lock:
            flow = self._flows.get(key)
        if flow is None:
            flow = self._open(key)
            if flow is None:
                return
        flow.send(data)

    def _answers(self, data: bytes, client: Target, destination: Target) -> bool:
        """Answer a DNS query for an address (A, AAAA) by dispatch's own
        resolver, in a thread of its own; False for any other datagram, and
        where names are left to the system's resolver, whose queries carry no
        mark: with --local they would come back here, without end."""
        if not self.context.upstream.resolver.through_links:
            return False
        query = address_query(data)
        if query is None:
            return False
        answering = threading.Thread(
            target=self._answer, args=(query, client, destination), name="dispatch-dns-answer", daemon=True
        )
        answering.start()
        return True

    def _answer(self, query: DnsQuery, client: Target, destination: Target) -> None:
        """Answer ``query`` (answer_address_query) to the client from
        ``destination``, the server it asked; log one line."""
        record = dns_query_record(_format_endpoint(*client), query, destination)
        answer = answer_address_query(self.context, query, record)
        try:
            with _transparent_udp_socket(_family_of(destination[0]), destination) as answers:
                answers.sendto(answer, client)
        except OSError as error:
            record.result = _describe(error)
        record.log()

    def _admits(self, ip: str) -> bool:
        return self.access.allows(ip) or is_own_address(_client_ip(ip))

    def _open(self, key: tuple[Target, Target]) -> UdpFlow | None:
        """A new flow for (client, destination) with its thread; None where
        it cannot be had (refused, no link, too many), logged as a flow."""
        client, destination = key
        with self._lock:
            if len(self._flows) >= MAX_UDP_FLOWS:
                return None
        try:
            flow = UdpFlow(self.context, client, destination, self.idle)
        except OSError as error:
            record = ExchangeRecord(_format_endpoint(*client), target=_format_endpoint(*destination), transparent=True)
            record.result = _describe(error)
            record.log()
            return None
        with self._lock:
            self._flows[key] = flow
        threading.Thread(target=flow.run, args=(self._ended,), name="dispatch-udp-flow", daemon=True).start()
        return flow

    def _ended(self, flow: UdpFlow) -> None:
        with self._lock:
            if self._flows.get((flow.client, flow.destination)) is flow:
                del self._flows[(flow.client, flow.destination)]

    def flows(self) -> int:
        """How many flows are open now."""
        with self._lock:
            return len(self._flows)

    def stop(self) -> None:
        """Stop receiving; the flows end as the proxy's stopping is set."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._wake_up_sender.send(b"\0")
        self._done.wait()

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()
        self._wake_up.close()
        self._wake_up_sender.close()


# ---------------------------------------------------------------------------
# Firewall rules: transparent mode's nftables table, applied and undone
# ---------------------------------------------------------------------------

# The firewall mark of dispatch's own sockets in transparent mode: "disp" in
# ASCII, a number no distribution, VPN client or container runtime is known
# to use (they use small numbers and 0xca6c, 0x4000-style bits).
DEFAULT_MARK = 0x64697370
# One table holds every rule, so that one command replaces or removes them all.
NFT_FAMILY, NFT_TABLE = "inet", "dispatch"
NFT_TIMEOUT = 20.0  # seconds nft may take to apply or remove the table
CAP_NET_ADMIN = 12  # linux/capability.h: firewall rules, SO_MARK
# Destinations never redirected, besides this machine's own (fib: local),
# broadcast and multicast, and the LAN's own networks: loopback, link-local,
# multicast, the broadcast address.
NEVER_REDIRECTED = {
    "ip": ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255"),
    "ip6": ("::1", "fe80::/10", "ff00::/8"),
}
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
# UDP that TPROXY hands over is routed to this machine by a table of its
# own: the first free one from here ("di" in ASCII).
TPROXY_TABLE_FIRST = 0x6469


class FirewallError(ValueError):
    """Transparent mode cannot be had here, or its rules were not applied:
    the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class TransparentRules:
    """The firewall rules of transparent mode, for the ``lan`` interfaces'
    forwarded traffic (``{name: its networks}``) and, if ``local``, this
    machine's own programs': TCP is redirected to ``port`` (nftables
    ``redirect``), UDP handed to it by TPROXY, which needs its datagrams
    routed to this machine: they are marked ``mark`` + 1, and an ``ip rule``
    sends that mark to routing ``table``, whose one route is "local". dispatch's
    own traffic (``mark``) passes first, and so do destinations that are
    this machine, the LAN's own networks, loopback, link-local, multicast
    and broadcast. ``script()`` is the nftables table that ``dispatch rules``
    prints; ``apply()`` puts it and the route in place, replacing what a
    killed dispatch left, ``drain()`` stops redirecting for the grace period
    and ``remove()`` is the undo."""

    port: int
    lan: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    local: bool = False
    mark: int = DEFAULT_MARK
    table: int = TPROXY_TABLE_FIRST

    @property
    def route_mark(self) -> int:
        """The mark of datagrams TPROXY hands over, routed to this machine."""
        return self.mark + 1

    def script(self) -> str:
        """The nftables script, for ``nft -f``: one transaction."""
        table = f"{NFT_FAMILY} {NFT_TABLE}"
        port, routed = self.port, f"{self.route_mark:#x}"
        lines = [
            "#!/usr/sbin/nft -f",
            f"# dispatch transparent mode: TCP and UDP to port {port}; dispatch's own traffic carries mark "
            f"{self.mark:#x}; UDP handed over carries {routed}, which 'ip rule add fwmark {routed} lookup "
            f"{self.table}' and 'ip route add local default dev lo table {self.table}' (and ip -6) route here",
            # Creating the table first makes the delete succeed when there is
            # none: a table left behind is replaced, never doubled.
            f"table {table}",
            f"delete table {table}",
            f"table {table} {{",
        ]
        tproxy = f"tproxy ip to :{port}", f"tproxy ip6 to :{port}"
        if self.lan:
            names = "{ " + ", ".join(json.dumps(name) for name in self.lan) + " }"
            lines += self._chain("prerouting", "type nat hook prerouting priority dstnat")
            lines.insert(-1, f"\t\tiifname {names} meta l4proto tcp redirect to :{port}")
        if self.local:
            lines += self._chain("output", "type nat hook output priority -100")
            lines.insert(-1, f"\t\tmeta l4proto tcp redirect to :{port}")
        lines += self._chain("divert", "type filter hook prerouting priority mangle")
        for version, proxy in zip(("ipv4", "ipv6"), tproxy):
            udp = f"meta l4proto udp meta nfproto {version}"
            if self.lan:
                lines.insert(-1, f"\t\tiifname {names} {udp} {proxy} meta mark set {routed} accept")
            if self.local:  # this machine's own, routed back in by the output chain's mark
                lines.insert(-1, f'\t\tiifname "lo" meta mark {routed} {udp} {proxy} accept')
        if self.local:
            lines += self._chain("reroute", "type route hook output priority mangle")
            lines.insert(-1, f"\t\tmeta l4proto udp meta mark set {routed}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _chain(self, name: str, hook: str) -> list[str]:
        """A chain's head and the rules that let traffic pass as it is; it ends with "}"."""
        lines = [
            f"\tchain {name} {{",
            f"\t\t{hook}; policy accept;",
            f"\t\tmeta mark {self.mark:#x} return",
            "\t\tfib daddr type { local, broadcast, multicast } return",
        ]
        lan_networks = [network for networks in self.lan.values() for network in networks]
        for family, version in (("ip", 4), ("ip6", 6)):
            never = [*NEVER_REDIRECTED[family]]
            never += [n for n in lan_networks if ipaddress.ip_network(n).version == version]
            lines.append(f"\t\t{family} daddr {{ {', '.join(never)} }} return")
        return [*lines, "\t}"]

    def apply(self) -> TransparentRules:
        """Put the table in place in one transaction (``nft -f``), then the
        route of UDP in the first free routing table from ``table``; return
        the rules as applied. On any failure nothing is left applied, and
        FirewallError says the tool's own words."""
        self._remove_routes()  # a killed dispatch's
        applied = dataclasses.replace(self, table=_free_routing_table(self.table))
        _run_tool("nft", ["-f", "-"], applied.script())
        for version in ("-4", "-6"):
            try:
                _run_tool("ip", [version, "rule", "add", "fwmark", hex(self.route_mark), "lookup", str(applied.table)])
                _run_tool("ip", [version, "route", "add", "local", "default", "dev", "lo", "table", str(applied.table)])
            except FirewallError as error:
                if version == "-4":
                    applied.remove()
                    raise
                # A machine without IPv6 has no IPv6 datagrams to hand over.
                logger.warning("IPv6 UDP is not handed over: %s", error)
        return applied

    def drain(self) -> None:
        """Redirect nothing more, in one transaction, and keep the way of the
        connections redirected already: the kernel goes on translating their
        packets only while a NAT chain is hooked and a rule needs connection
        tracking, so until remove() the table keeps its NAT chains, each with
        a rule on established connections that changes nothing."""
        table = f"{NFT_FAMILY} {NFT_TABLE}"
        lines = [f"table {table}", f"delete table {table}", f"table {table} {{"]
        for name, hook, wanted in (
            ("prerouting", "type nat hook prerouting priority dstnat", bool(self.lan)),
            ("output", "type nat hook output priority -100", self.local),
        ):
            if wanted:
                lines.append(f"\tchain {name} {{ {hook}; policy accept; ct state established accept; }}")
        with contextlib.suppress(FirewallError):
            _run_tool("nft", ["-f", "-"], "\n".join([*lines, "}"]) + "\n")

    def remove(self) -> None:
        """Remove the table and the route of UDP, what there is of them."""
        with contextlib.suppress(FirewallError):
            _run_tool("nft", ["delete", "table", NFT_FAMILY, NFT_TABLE])
        self._remove_routes()

    def _remove_routes(self) -> None:
        """Remove every ip rule of the route mark, and the tables they route to."""
        for version in ("-4", "-6"):
            for table in _rule_tables(version, self.route_mark):
                with contextlib.suppress(FirewallError):
                    _run_tool("ip", [version, "rule", "del", "fwmark", hex(self.route_mark), "lookup", table])
                with contextlib.suppress(FirewallError):
                    _run_tool("ip", [version, "route", "flush", "table", table])


def _rule_tables(version: str, mark: int) -> list[str]:
    """The routing tables the ip rules of fwmark ``mark`` send to, one per rule."""
    try:
        listed = _run_tool("ip", [version, "rule", "show", "fwmark", hex(mark)])
    except FirewallError:
        return []
    return re.findall(r"lookup (\S+)", listed)


def _free_routing_table(first: int) -> int:
    """The first routing table from ``first`` that no route and no rule uses."""
    used: set[str] = set()
    for version in ("-4", "-6"):
        used.update(re.findall(r"\btable (\S+)", _run_tool("ip", [version, "route", "show", "table", "all"])))
        used.update(re.findall(r"\blookup (\S+)", _run_tool("ip", [version, "rule", "show"])))
    table = first
    while str(table) in used:
        table += 1
    return table


def _run_tool(tool: str, arguments: Sequence[str], script: str | None = None) -> str:
    """Run nft or ip; its output, or FirewallError with its message if it fails or is missing."""
    try:
        done = subprocess.run(
            [tool, *arguments], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise FirewallError(_TOOL_MISSING[tool]) from None
    except (OSError, subprocess.SubprocessError) as error:
        raise FirewallError(f"cannot run {tool}: {error}") from None
    if done.returncode:
        # nft marks where in a line it failed with a line of carets: the line itself says it.
        said = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip().strip("^~"))
        raise FirewallError(f"{tool} refused the rules: {said or f'exit status {done.returncode}'}")
    return done.stdout


_TOOL_MISSING = {
    tool: f"transparent mode applies its rules with {tool}, which is not installed: install the package "
    f"{package} (its name on Debian, Fedora and Arch)"
    for tool, package in (("nft", "nftables"), ("ip", "iproute2"))
}


def transparent_refusal(apply_rules: bool, platform: str | None = None) -> str | None:
    """Why transparent mode cannot run here (``platform``: sys.platform's
    kind of name), in one line; None if it can: Linux only, with
    CAP_NET_ADMIN, and nft and ip to apply the rules."""
    if (platform or sys.platform) != "linux":
        return (
            "--transparent works on Linux only; on macOS and Windows, --system-proxy points the "
            "system's proxy settings at dispatch, or give programs its PAC file (http://HOST:PORT/proxy.pac)"
        )
    if not _has_capability(CAP_NET_ADMIN):
        return (
            "--transparent needs the capability CAP_NET_ADMIN (root has it; a systemd unit can give it: "
            "dispatch service systemd ... --transparent PORT); 'dispatch rules' prints the firewall "
            "script for an administrator to apply"
        )
    for tool in ("nft", "ip") if apply_rules else ():
        if shutil.which(tool) is None:
            return _TOOL_MISSING[tool]
    return None


def _has_capability(number: int) -> bool:
    """Whether this process has the Linux capability ``number`` in effect."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def lan_networks(names: Iterable[str]) -> dict[str, list[str]]:
    """The networks of each LAN interface named, as its addresses give
    them; FirewallError for a name that is no interface here."""
    try:
        import ifaddr
    except ImportError:
        raise FirewallError("--lan needs the ifaddr package (pip install ifaddr)") from None
    adapters = {adapter.nice_name: adapter for adapter in ifaddr.get_adapters()}
    networks: dict[str, list[str]] = {}
    for name in names:
        adapter = adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(adapters)) or "none"
            raise FirewallError(f"--lan {name}: no such interface here (there are: {known})")
        found = []
        for entry in adapter.ips:
            ip = entry.ip[0] if isinstance(entry.ip, tuple) else entry.ip
            network = ipaddress.ip_network(f"{ip.partition('%')[0]}/{entry.network_prefix}", strict=False)
            if not network.is_link_local:
                found.append(str(network))
        networks[name] = list(dict.fromkeys(found))
    return networks


def require_forwarding() -> None:
    """FirewallError unless this machine forwards IPv4 (a gateway must)."""
    try:
        with open(IP_FORWARD, encoding="ascii") as setting:
            forwarding = setting.read().strip() == "1"
    except OSError:
        forwarding = False
    if not forwarding:
        raise FirewallError(
            "--lan makes this machine a gateway, which must forward: net.ipv4.ip_forward is off "
            "(sysctl -w net.ipv4.ip_forward=1)"
        )


# ---------------------------------------------------------------------------
# Desktop proxy settings: the user's proxy pointed here, saved first, put back
# ---------------------------------------------------------------------------

# ``dispatch start --system-proxy`` points the proxy settings of the user who
# runs it at this proxy, and puts back at stop what was there, every key. What
# was there is written to a file beside the state file before anything
# changes: a dispatch killed without stopping leaves the settings pointing at
# a dead port, and the next start puts the saved ones back first.

SYSTEM_PROXY_FILE = "system-proxy.json"  # the settings before, beside the state file
SYSTEM_PROXY_LOCK = "system-proxy.lock"  # held by the dispatch whose settings are set
SYSTEM_PROXY_FORMAT = "dispatch system proxy settings 1"
SYSTEM_PROXY_FILE_LIMIT = 1024 * 1024  # a file larger is no file dispatch wrote
# Destinations that go direct, as the PAC file sends them: this machine and
# the private networks (a printer, a router's page, a NAS).
PROXY_BYPASS = (
    "localhost",
    "127.0.0.0/8",
    "::1",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
)
SETTINGS_COMMAND_TIMEOUT = 10.0  # seconds for one gsettings, kwriteconfig or networksetup


class SystemProxyError(Exception):
    """What keeps the proxy settings from being set or put back, as one line."""


class ProxySettings:
    """The proxy settings of one kind of desktop, as named keys whose values
    are JSON values (None: the key is not set at all).

    A subclass says which keys it sets to what (``wanted``), reads and
    writes one key at a time, and tells running programs of a change. A
    write that fails raises SystemProxyError."""

    kind = ""  # what the saved file names it by
    description = ""  # what the banner and the pages call it

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        """The keys to set, in the order to set them (the switch that turns
        the proxy on last), for a proxy at ``host:port``."""
        raise NotImplementedError

    def read(self, key: str) -> Any:
        """The value of ``key`` now; None where it is not set."""
        raise NotImplementedError

    def write(self, key: str, value: Any) -> None:
        """Make ``key`` read ``value`` (None: not set)."""
        raise NotImplementedError

    def notify(self) -> None:
        """Tell running programs that the settings changed, where the
        desktop has a way; a failure is no error."""


def _run_settings_command(command: Sequence[str], what: str) -> str:
    """Run one settings command; its output, or SystemProxyError saying what failed."""
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=SETTINGS_COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise SystemProxyError(f"cannot run {command[0]} to {what}: {error}") from None
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise SystemProxyError(f"{os.path.basename(command[0])} could not {what}: {said[0] if said else 'failed'}")
    return result.stdout


def _desktop_user(environ: Mapping[str, str]) -> list[str]:
    """The words that run a settings command as the desktop's user: none
    for the user who runs dispatch; under sudo, the user who ran sudo, on
    their session bus. Raises SystemProxyError where that user has no
    session to reach."""
    user = environ.get("SUDO_USER")
    if sys.platform == "win32" or os.geteuid() != 0 or not user or user == "root":
        return []
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise SystemProxyError(f"run under sudo by {user!r}, a user this system does not know") from None
    runtime = f"/run/user/{account.pw_uid}"
    bus = os.path.join(runtime, "bus")
    if not os.path.exists(bus):
        raise SystemProxyError(
            f"run under sudo, the proxy settings to set are {user}'s, whose desktop session has no bus "
            f"({bus}): run 'dispatch start --system-proxy' as {user} in the desktop session"
        )
    return [
        "runuser",
        "-u",
        user,
        "--",
        "env",
        f"HOME={account.pw_dir}",
        f"XDG_RUNTIME_DIR={runtime}",
        f"DBUS_SESSION_BUS_ADDRESS=unix:path={bus}",
    ]


class GnomeProxySettings(ProxySettings):
    """GNOME, Cinnamon, MATE and Budgie: the gsettings schema
    org.gnome.system.proxy and its http, https and socks children. A value
    is the key's GVariant text, as ``gsettings get`` prints it."""

    kind = "gnome"
    description = "the desktop's proxy settings (gsettings org.gnome.system.proxy)"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._as_user = _desktop_user(environ)

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        wanted: dict[str, Any] = {}
        for child in ("http", "https", "socks"):
            wanted[f"org.gnome.system.proxy.{child} host"] = _gvariant_string(host)
            wanted[f"org.gnome.system.proxy.{child} port"] = str(port)
        wanted["org.gnome.system.proxy ignore-hosts"] = "[" + ", ".join(map(_gvariant_string, PROXY_BYPASS)) + "]"
        wanted["org.gnome.system.proxy mode"] = "'manual'"
        return wanted

    def _gsettings(self, *arguments: str) -> str:
        what = f"{arguments[0]} {' '.join(arguments[1:3])}"
        return _run_settings_command([*self._as_user, "gsettings", *arguments], what).strip()

    def read(self, key: str) -> Any:
        return self._gsettings("get", *key.split(" "))

    def write(self, key: str, value: Any) -> None:
        # Reset first: a key that was at its default is left at its default,
        # not written down with the default's value.
        self._gsettings("reset", *key.split(" "))
        if value is not None and self.read(key) != value:
            self._gsettings("set", *key.split(" "), value)


def _gvariant_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class KdeProxySettings(ProxySettings):
    """KDE Plasma 5 and 6: the [Proxy Settings] group of kioslaverc,
    written with kwriteconfig5 or kwriteconfig6 and read from the file
    (which tells a key not set from an empty one)."""

    kind = "kde"
    description = "KDE's proxy settings (kioslaverc)"
    group = "Proxy Settings"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._as_user = _desktop_user(environ)
        version = environ.get("KDE_SESSION_VERSION", "")
        names = ["kwriteconfig6", "kwriteconfig5"] if version != "5" else ["kwriteconfig5", "kwriteconfig6"]
        found = [name for name in names if shutil.which(name)]
        if not found:
            raise SystemProxyError("KDE's kwriteconfig5 or kwriteconfig6 is not installed (kde-cli-tools)")
        self._write_command = found[0]
        # Under sudo, the user's own file: words like "HOME=/home/al" among _as_user.
        home = next((word[5:] for word in self._as_user if word.startswith("HOME=")), os.path.expanduser("~"))
        config = None if self._as_user else environ.get("XDG_CONFIG_HOME")
        self.path = os.path.join(config or os.path.join(home, ".config"), "kioslaverc")
        self._bus = environ.get("DBUS_SESSION_BUS_ADDRESS")

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        shown = f"[{host}]" if ":" in host else host
        return {
            "httpProxy": f"http://{shown} {port}",
            "httpsProxy": f"http://{shown} {port}",
            "socksProxy": f"socks://{shown} {port}",
            "NoProxyFor": ",".join(PROXY_BYPASS),
            "ProxyType": "1",  # manual
        }

    def read(self, key: str) -> Any:
        try:
            with open(self.path, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise SystemProxyError(f"cannot read {self.path}: {error}") from None
        group = None
        for line in lines:
            if line.startswith("["):
                group = line.strip()[1:-1]
            elif group == self.group and line.partition("=")[0].strip() == key:
                return line.partition("=")[2]
        return None

    def write(self, key: str, value: Any) -> None:
        command = [*self._as_user, self._write_command, "--file", "kioslaverc", "--group", self.group, "--key", key]
        _run_settings_command([*command, "--delete"] if value is None else [*command, str(value)], f"set {key}")

    def notify(self) -> None:
        # What KDE's own settings page sends: running programs read kioslaverc again.
        if self._bus and shutil.which("dbus-send"):
            with contextlib.suppress(SystemProxyError):
                _run_settings_command(
                    [
                        *self._as_user,
                        "dbus-send",
                        "--session",
                        "--type=signal",
                        "/KIO/Scheduler",
                        "org.kde.KIO.Scheduler.reparseSlaveConfiguration",
                        "string:",
                    ],
                    "tell running programs",
                )


# networksetup's proxies of each network service: the name its -get and
# -set commands carry, and what dispatch points it at.
_MACOS_PROXIES = (("webproxy", "http"), ("securewebproxy", "http"), ("socksfirewallproxy", "socks"))


class MacProxySettings(ProxySettings):
    """macOS: the web, secure web and SOCKS proxies and the bypass domains
    of every enabled network service, through ``networksetup``. A proxy's
    value is {"enabled", "server", "port"}; the bypass domains a list."""

    kind = "macos"
    description = "the network services' proxies (networksetup)"

    def __init__(self) -> None:
        self.command = shutil.which("networksetup") or "/usr/sbin/networksetup"
        self._services: list[str] | None = None

    def _run(self, *arguments: str) -> str:
        output = _run_settings_command([self.command, *arguments], arguments[0].lstrip("-"))
        # networksetup says its errors on stdout, with status 0.
        if output.lstrip().startswith("**") or "Error" in output.split("\n", 1)[0]:
            if "admin" in output.lower():
                raise SystemProxyError(
                    "changing macOS's proxy settings needs an administrator: run 'sudo dispatch start "
                    "--system-proxy ...', or as a user of the admin group"
                )
            raise SystemProxyError(f"networksetup {arguments[0]} failed: {output.strip().splitlines()[0]}")
        return output

    def services(self) -> list[str]:
        """The enabled network services (a disabled one is starred)."""
        if self._services is None:
            lines = self._run("-listallnetworkservices").splitlines()
            self._services = [line for line in lines[1:] if line.strip() and not line.startswith("*")]
        return self._services

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        wanted: dict[str, Any] = {}
        for service in self.services():
            wanted[f"{service}\tproxybypassdomains"] = ["*.local", *PROXY_BYPASS]
            for name, _ in _MACOS_PROXIES:
                wanted[f"{service}\t{name}"] = {"enabled": True, "server": host, "port": port}
        return wanted

    def read(self, key: str) -> Any:
        service, name = key.split("\t")
        output = self._run(f"-get{name}", service)
        if name == "proxybypassdomains":
            if output.startswith("There aren't any"):
                return []
            return [line.strip() for line in output.splitlines() if line.strip()]
        fields = dict(line.partition(": ")[::2] for line in output.splitlines())
        port = fields.get("Port", "0").strip()
        return {
            "enabled": fields.get("Enabled", "No").strip() == "Yes",
            "server": fields.get("Server", "").strip(),
            "port": int(port) if port.isdigit() else 0,
        }

    def write(self, key: str, value: Any) -> None:
        service, name = key.split("\t")
        if name == "proxybypassdomains":
            self._run(f"-set{name}", service, *(value or ["Empty"]))
            return
        if value["server"]:
            self._run(f"-set{name}", service, value["server"], str(value["port"]))
        self._run(f"-set{name}state", service, "on" if value["enabled"] else "off")


WINDOWS_PROXY_KEY = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
# InternetSetOptionW's options: the settings changed, and running programs should read them again.
INTERNET_OPTION_SETTINGS_CHANGED = 39
INTERNET_OPTION_REFRESH = 37


class WindowsProxySettings(ProxySettings):
    """Windows: the per-user WinINET values under HKEY_CURRENT_USER's
    Internet Settings, which Edge, Chrome and most programs follow. A
    value is [registry type, data]."""

    kind = "windows"
    description = "the user's Internet Settings (WinINET)"

    def __init__(self, registry: Any = None, internet_set_option: Callable[..., object] | None = None) -> None:
        self.registry = __import__("winreg") if registry is None else registry
        self._set_option = internet_set_option

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        shown = f"[{host}]" if ":" in host else host
        servers = ";".join(f"{scheme}={shown}:{port}" for scheme in ("http", "https", "socks"))
        # WinINET matches the bypass list by wildcards, not networks.
        bypass = "localhost;127.*;10.*;172.16.*;172.17.*;172.18.*;172.19.*;172.2*;172.30.*;172.31.*;192.168.*;"
        bypass += "169.254.*;[::1];<local>"
        string, number = self.registry.REG_SZ, self.registry.REG_DWORD
        return {
            "ProxyServer": [string, servers],
            "ProxyOverride": [string, bypass],
            "AutoConfigURL": None,
            "ProxyEnable": [number, 1],
        }

    def read(self, key: str) -> Any:
        try:
            with self.registry.OpenKey(self.registry.HKEY_CURRENT_USER, WINDOWS_PROXY_KEY) as opened:
                data, kind = self.registry.QueryValueEx(opened, key)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise SystemProxyError(f"cannot read {key} of the Internet Settings: {_describe(error)}") from None
        return [kind, data]

    def write(self, key: str, value: Any) -> None:
        try:
            with self.registry.OpenKey(
                self.registry.HKEY_CURRENT_USER, WINDOWS_PROXY_KEY, 0, self.registry.KEY_SET_VALUE
            ) as opened:
                if value is None:
                    with contextlib.suppress(FileNotFoundError):
                        self.registry.DeleteValue(opened, key)
                else:
                    self.registry.SetValueEx(opened, key, 0, value[0], value[1])
        except OSError as error:
            raise SystemProxyError(f"cannot set {key} of the Internet Settings: {_describe(error)}") from None

    def notify(self) -> None:
        set_option = self._set_option
        if set_option is None:
            if sys.platform != "win32":
                return
            import ctypes

            set_option = ctypes.windll.wininet.InternetSetOptionW
        for option in (INTERNET_OPTION_SETTINGS_CHANGED, INTERNET_OPTION_REFRESH):
            with contextlib.suppress(OSError):
                set_option(None, option, None, 0)


# The desktops whose proxy settings live in gsettings' org.gnome.system.proxy,
# as XDG_CURRENT_DESKTOP names them (a colon-separated list).
GNOME_DESKTOPS = frozenset({"gnome", "unity", "cinnamon", "x-cinnamon", "mate", "budgie", "budgie-desktop", "pantheon"})


def desktop_proxy_settings(
    platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> tuple[ProxySettings | None, str]:
    """The proxy settings of this machine's desktop and their description;
    (None, why not) where there are none dispatch knows how to set."""
    try:
        if platform == "win32":
            settings: ProxySettings = WindowsProxySettings()
        elif platform == "darwin":
            settings = MacProxySettings()
        else:
            named = {name.lower() for name in environ.get("XDG_CURRENT_DESKTOP", "").split(":") if name}
            if named & GNOME_DESKTOPS:
                settings = GnomeProxySettings(environ)
            elif "kde" in named:
                settings = KdeProxySettings(environ)
            elif named:
                return None, f"the desktop {environ['XDG_CURRENT_DESKTOP']} has no proxy settings dispatch knows"
            else:
                return None, "no desktop here (XDG_CURRENT_DESKTOP is not set)"
    except SystemProxyError as error:
        return None, str(error)
    return settings, settings.description


def settings_kinds_here(platform: str = sys.platform) -> tuple[str, ...]:
    """The kinds of ProxySettings this system may have."""
    return {"win32": ("windows",), "darwin": ("macos",)}.get(platform, ("gnome", "kde"))


def proxy_settings_of(
    kind: str, platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> ProxySettings:
    """The settings a saved file names (``kind``), if this machine has them;
    raises SystemProxyError."""
    kinds: dict[str, Callable[[], ProxySettings]] = {
        "gnome": lambda: GnomeProxySettings(environ),
        "kde": lambda: KdeProxySettings(environ),
        "macos": MacProxySettings,
        "windows": WindowsProxySettings,
    }
    if kind not in settings_kinds_here(platform):
        raise SystemProxyError(f"settings of {kind!r}, which this system does not have")
    return kinds[kind]()


def shell_proxy_lines(host: str, port: int) -> list[str]:
    """The ``export`` lines that point a shell's programs at this proxy."""
    endpoint = f"{_format_endpoint(host, port)}"
    return [
        f"export http_proxy=http://{endpoint} https_proxy=http://{endpoint} all_proxy=socks5h://{endpoint}",
        f"export no_proxy={','.join(PROXY_BYPASS)}",
    ]


def proxy_host_for(listening: str) -> str:
    """The address the settings name for a proxy listening on ``listening``:
    loopback for every address (0.0.0.0, ::), the address itself otherwise."""
    if listening in ("0.0.0.0", ""):
        return "127.0.0.1"
    if listening == "::":
        return "::1"
    return listening


class _OwnerLock:
    """An exclusive lock on a file, held while the settings are this
    process's; the system releases it when the process ends, killed too."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = None

    def acquire(self) -> bool:
        """Take the lock; False if another process holds it."""
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            if sys.platform == "win32":
                import msvcrt

                file.seek(0)
                msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.close()
            return False
        self._file = file
        return True

    def owner(self) -> str:
        """The process id the lock file names, or "?"."""
        try:
            with open(self.path, encoding="utf-8") as file:
                return file.read(32).strip() or "?"
        except OSError:
            return "?"

    def write_owner(self) -> None:
        """Name this process in the lock file (who owns the settings)."""
        if self._file is not None and sys.platform != "win32":
            self._file.truncate(0)
            self._file.write(str(os.getpid()))
            self._file.flush()

    def release(self) -> None:
        """Let the lock go."""
        file, self._file = self._file, None
        if file is not None:
            if sys.platform != "win32":
                file.truncate(0)
            file.close()


def _write_saved(path: str, saved: dict[str, Any]) -> None:
    """Write the saved settings whole or not at all (a new file renamed
    over the old), on the disk before anything changes."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(saved, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _read_saved(path: str) -> dict[str, Any] | None:
    """The settings a file saved, checked; None where there is no file. A
    file that is not one dispatch wrote here (corrupt, too large, or of
    another system's settings) is moved aside with one warning, and nothing
    is taken from it."""
    try:
        with open(path, "rb") as file:
            data = file.read(SYSTEM_PROXY_FILE_LIMIT + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SystemProxyError(f"cannot read the saved proxy settings {path}: {_describe(error)}") from None
    try:
        saved = json.loads(data) if len(data) <= SYSTEM_PROXY_FILE_LIMIT else None
    except (ValueError, UnicodeDecodeError):
        saved = None
    valid = (
        isinstance(saved, dict)
        and saved.get("format") == SYSTEM_PROXY_FORMAT
        and saved.get("kind") in settings_kinds_here()
        and isinstance(saved.get("before"), dict)
    )
    if not valid or not isinstance(saved, dict):
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        logger.warning(
            "the saved proxy settings %s are not a file dispatch wrote: nothing is put back from them; "
            "they are kept as %s",
            path,
            aside,
        )
        return None
    return saved


class SystemProxy:
    """The proxy settings while this dispatch has them pointed at itself:
    what they were (``before``), saved in ``path``, and ``restore()``."""

    def __init__(self, settings: ProxySettings, path: str, lock: _OwnerLock, before: dict[str, Any]) -> None:
        self.settings = settings
        self.path = path
        self.before = before
        self._lock = lock
        self.set = True

    @property
    def describe(self) -> str:
        """What the pages and the banner say: set by this dispatch, and where."""
        return f"set by this dispatch: {self.settings.description}" if self.set else "not set (put back)"

    def restore(self) -> None:
        """Put every key back as it was; remove the saved file; let the lock go."""
        if not self.set:
            return
        try:
            _write_back(self.settings, self.before)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.set = False
        finally:
            self._lock.release()


def _write_back(settings: ProxySettings, before: Mapping[str, Any]) -> None:
    """Write ``before`` back, the switch first (keys in the reverse of the
    order they were set); each key is tried, and the first failure raised."""
    failures: list[SystemProxyError] = []
    for key in reversed(list(before)):
        try:
            settings.write(key, before[key])
        except SystemProxyError as error:
            failures.append(error)
    settings.notify()
    if failures:
        raise failures[0]


def _changed(settings: ProxySettings, key: str, value: Any) -> bool:
    """Whether ``key`` no longer reads ``value`` (or cannot be read):
    a write refused (no right to change it) changed nothing to undo."""
    try:
        return bool(settings.read(key) != value)
    except SystemProxyError:
        return True


def point_system_proxy(settings: ProxySettings, directory: str, host: str, port: int) -> SystemProxy:
    """Point ``settings`` at the proxy on ``host:port``, having saved what
    they were in ``directory`` (SYSTEM_PROXY_FILE); return the handle that
    puts them back. Another dispatch holding them, or a write that fails
    (what was written is put back first), raises SystemProxyError."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SYSTEM_PROXY_FILE)
    lock = _OwnerLock(os.path.join(directory, SYSTEM_PROXY_LOCK))
    if not lock.acquire():
        raise SystemProxyError(
            f"another dispatch (process {lock.owner()}) has set the system proxy and owns it: stop it first, "
            "or start this one without --system-proxy"
        )
    try:
        if os.path.exists(path):
            raise SystemProxyError(f"saved proxy settings are still in {path}: 'dispatch system-proxy --restore'")
        lock.write_owner()
        wanted = settings.wanted(host, port)
        before = {key: settings.read(key) for key in wanted}
        saved = {"format": SYSTEM_PROXY_FORMAT, "kind": settings.kind, "set": wanted, "before": before}
        try:
            _write_saved(path, saved)
        except OSError as error:
            raise SystemProxyError(f"cannot save the proxy settings to {path}: {_describe(error)}") from None
        written: dict[str, Any] = {}
        try:
            for key, value in wanted.items():
                written[key] = before[key]
                settings.write(key, value)
        except SystemProxyError as error:
            try:
                _write_back(settings, {key: value for key, value in written.items() if _changed(settings, key, value)})
            except SystemProxyError as undo:
                # The file stays: the next start, or --restore, tries again.
                raise SystemProxyError(f"{error}; putting back what was set failed too ({undo}): {path}") from None
            os.remove(path)
            raise
        settings.notify()
    except BaseException:
        lock.release()
        raise
    return SystemProxy(settings, path, lock, before)


def restore_saved_proxy(directory: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Put back the settings a dispatch saved in ``directory`` and left
    behind (it was killed, or the power went); return what was done, or
    None where nothing was saved. Nothing is done while the dispatch that
    saved them still runs. Raises SystemProxyError."""
    path = os.path.join(directory, SYSTEM_PROXY_FILE)
    if not os.path.exists(path):
        return None
    lock = _OwnerLock(os.path.join(directory, SYSTEM_PROXY_LOCK))
    if not os.path.isdir(directory) or not lock.acquire():
        return None
    try:
        saved = _read_saved(path)
        if saved is None:
            return None
        settings = proxy_settings_of(saved["kind"], environ=environ)
        _write_back(settings, saved["before"])
        os.remove(path)
    finally:
        lock.release()
    return f"put back the proxy settings saved by a dispatch that did not stop ({settings.description})"


def system_proxy_owner(directory: str) -> str | None:
    """The process id of the dispatch whose system proxy is set, if one is."""
    lock = _OwnerLock(os.path.join(directory, SYSTEM_PROXY_LOCK))
    if not os.path.isdir(directory):
        return None
    if lock.acquire():
        lock.release()
        return None
    return lock.owner()


def take_system_proxy(directory: str, wanted: bool, host: str, port: int) -> tuple[SystemProxy | None, list[str]]:
    """What ``dispatch start`` does with the proxy settings: put back what a
    dispatch that did not stop left set (every start does, saying so); if
    ``wanted``, point this user's settings at the proxy listening on
    ``host:port``. Returns the handle and the banner's lines; raises
    SystemProxyError where the wanted settings cannot be had."""
    try:
        left = restore_saved_proxy(directory)
    except SystemProxyError as error:
        if wanted:  # saving now would save the leftovers as the settings before
            raise SystemProxyError(f"cannot put back the settings a dispatch left: {error}") from None
        print(f"dispatch: warning: cannot put back the proxy settings a dispatch left: {error}", flush=True)
        logger.warning("cannot put back the proxy settings a dispatch left: %s", error)
        left = None
    if left:
        print(f"dispatch: {left}", flush=True)
        logger.info("%s", left)
    if not wanted:
        return None, []
    host = proxy_host_for(host)
    settings, why = desktop_proxy_settings()
    if settings is None:
        logger.warning("system proxy: nothing set: %s", why)
        shell = [f"  {line}" for line in shell_proxy_lines(host, port)]
        return None, [f"system proxy: nothing set: {why}; for a shell:", *shell]
    proxy = point_system_proxy(settings, directory, host, port)
    endpoint = _format_endpoint(host, port)
    return proxy, [f"system proxy: {proxy.describe}, pointed at {endpoint} (put back at stop)"]


def put_back_at_stop(system_proxy: SystemProxy) -> None:
    """What ``dispatch start`` does at its stop: put the settings back,
    saying so (a failure in one line on stderr: the file stays, for the
    next start or ``dispatch system-proxy --restore``)."""
    try:
        system_proxy.restore()
    except SystemProxyError as error:
        logger.error("could not put the proxy settings back: %s", error)
        tries = "'dispatch system-proxy --restore' tries again"
        print(f"dispatch: error: could not put the proxy settings back: {error}; {tries}", file=sys.stderr, flush=True)
        return
    print("dispatch: the proxy settings are put back as they were", flush=True)
    logger.info("the proxy settings are put back as they were")


def restore_by_hand(directory: str) -> list[str]:
    """``dispatch system-proxy --restore``: put back the settings saved in
    ``directory``; what was done. Raises SystemProxyError while a running
    dispatch owns them."""
    owner = system_proxy_owner(directory)
    if owner is not None:
        raise SystemProxyError(
            f"the dispatch of process {owner} has set the proxy settings, and puts them back at its stop"
        )
    done = restore_saved_proxy(directory)
    return [f"dispatch: {done or f'no saved proxy settings in {directory}: nothing to put back'}"]


def show_system_proxy(directory: str) -> list[str]:
    """``dispatch system-proxy --show``: the proxy settings now, and whether
    a dispatch set them. Raises SystemProxyError."""
    settings, why = desktop_proxy_settings()
    if settings is None:
        return [f"proxy settings: none that dispatch knows: {why}"]
    lines = [f"proxy settings: {settings.description}"]
    for key in settings.wanted("127.0.0.1", 1080):
        value = settings.read(key)
        lines.append(f"  {key.replace(chr(9), ': ')} = {value if isinstance(value, str) else json.dumps(value)}")
    saved, owner = os.path.join(directory, SYSTEM_PROXY_FILE), system_proxy_owner(directory)
    if owner is not None:
        lines.append(f"set by the dispatch of process {owner}; the settings before are saved in {saved}")
    elif os.path.exists(saved):
        lines.append(f"saved settings in {saved}, from a dispatch that did not stop: 'dispatch system-proxy --restore'")
    else:
        lines.append("set by no dispatch")
    return lines


# ---------------------------------------------------------------------------
# MPTCP endpoints: the kernel's subflow addresses for bonds, and their undo
# ---------------------------------------------------------------------------

# A bond's subflows leave by the addresses the kernel's path manager has as
# "subflow" endpoints. dispatch adds one per address of the bond's links,
# bound to its device (so that a subflow leaves by its link whatever the
# routing table says), through iproute2's ``ip mptcp``: it is there wherever
# MPTCP is, and speaks the generic netlink family that would otherwise take a
# netlink client of its own here. What is added is recorded first, in a file
# per network namespace, so that a run that was killed has its endpoints
# removed at the next start; an endpoint dispatch did not add is left alone.

# A link carries a bond's subflows while what it can carry is at least this
# share of what the links faster than it carry together; a slower one is a
# backup subflow only. The kernel's default scheduler sends on every subflow
# with room, and a slow link's queue then holds the bond back: measured with
# links of 1,200, 1,200 and 400 kB/s, one download over all three got 1,774
# kB/s, over the two fast ones 2,105 kB/s (tools/bond.py, medians of 5).
BOND_SHARE = 1 / 3
# The kernel takes at most 8 subflows per connection (MPTCP_PM_MAX_SUBFLOWS).
MPTCP_MAX_SUBFLOWS = 8
IP_COMMAND = "ip"
IP_COMMAND_TIMEOUT = 10.0  # seconds


@dataclasses.dataclass(frozen=True)
class BondRole:
    """What a link does in the bonds: carries subflows, or is a backup; and why."""

    interface: str
    backup: bool
    why: str


def choose_bond(capacities: Mapping[str, float | None]) -> list[BondRole]:
    """The role of each link (by interface name) from what it was measured
    to carry (None: not yet): a backup where it carries less than
    BOND_SHARE of what the faster links carry together, else a member."""
    measured = [figure for figure in capacities.values() if figure is not None]
    roles = []
    for name, capacity in capacities.items():
        if capacity is None:
            roles.append(BondRole(name, False, "not measured yet"))
            continue
        faster = sum(other for other in measured if other > capacity)
        carries = f"{format_bytes(capacity)}/s"
        if faster and capacity < BOND_SHARE * faster:
            why = f"backup: {carries} is under a third of the {format_bytes(faster)}/s of the faster links"
            roles.append(BondRole(name, True, why))
        else:
            roles.append(BondRole(name, False, f"subflows: carries {carries}"))
    return roles


def endpoint_record_path(port: int, state_file: str | None = None) -> str:
    """Where a dispatch listening on ``port`` records the endpoints it adds
    in this network namespace: beside its state file (the default one if
    none), one file per namespace (the endpoints are its own) and port."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    directory = os.path.dirname(os.path.abspath(state_file or default_state_path()))
    return os.path.join(directory, f"mptcp-endpoints-{namespace}-{port}.json")


def _is_running(pid: int) -> bool:
    """Whether a process ``pid`` is there (Linux; another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def abandoned_records(record: str) -> list[str]:
    """The records of endpoints beside ``record``, of this network namespace
    and another port, whose dispatch is no longer running: a run killed on
    one port leaves them to the next start on any port."""
    directory, name = os.path.split(os.path.abspath(record))
    prefix = name.rpartition("-")[0] + "-"
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".json") and n != name)
    except OSError:
        return []
    abandoned = []
    for other in names:
        try:
            with open(os.path.join(directory, other), encoding="utf-8") as file:
                pid = json.load(file).get("pid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pid, int) and pid != os.getpid() and not _is_running(pid):
            abandoned.append(os.path.join(directory, other))
    return abandoned


class MptcpEndpoints:
    """The MPTCP endpoints dispatch adds for its bonds, recorded in
    ``record`` before each change and removed by ``remove_all()`` (at stop)
    or ``clear_leftovers()`` (at the start after a run that was killed).

    ``follow(wanted)`` makes the endpoints dispatch added be those of
    ``wanted`` (address: (device, backup)) and raises the subflow limit to
    their number where it is lower. Without the right to (CAP_NET_ADMIN), it
    says once what to run instead, and bonds use what is configured.
    ``run`` runs a command as subprocess.run does (tests give their own).
    """

    def __init__(self, record: str, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> None:
        self.record = record
        self._run = run
        self._lock = threading.Lock()
        self.added: dict[str, tuple[int, str, bool]] = {}  # address: (id, device, backup)
        self._limit: tuple[int, int] | None = None  # the subflow limit (before, as set), where raised
        self._refused: str | None = None  # why it may not change them, once told

    def _ip(self, *arguments: str) -> str:
        """``ip mptcp ARGUMENTS``' output; OSError with its message if it fails."""
        try:
            done = self._run(
                [IP_COMMAND, *arguments], capture_output=True, text=True, timeout=IP_COMMAND_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise OSError(errno.ENOENT, f"{IP_COMMAND}: {error}") from None
        if done.returncode != 0:
            message = done.stderr.strip() or f"exit status {done.returncode}"
            refused = "not permitted" in message.lower() or "permission denied" in message.lower()
            raise OSError(errno.EPERM if refused else errno.EINVAL, message)
        return done.stdout

    def endpoints(self) -> dict[int, dict[str, Any]]:
        """The kernel's endpoints now, by id."""
        try:
            listed = json.loads(self._ip("-j", "mptcp", "endpoint", "show") or "[]")
            if not isinstance(listed, list):
                raise TypeError(f"a list was expected, not {type(listed).__name__}")
            return {int(entry["id"]): entry for entry in listed if isinstance(entry, dict) and "id" in entry}
        except (ValueError, TypeError) as error:
            raise OSError(errno.EINVAL, f"ip mptcp endpoint show: {error}") from None

    def subflow_limit(self) -> int:
        """The most subflows a connection may add, as the kernel has it."""
        words = self._ip("mptcp", "limits", "show").split()
        try:
            return int(words[words.index("subflows") + 1])
        except (ValueError, IndexError):
            raise OSError(errno.EINVAL, f"ip mptcp limits: no subflow limit in {' '.join(words)!r}") from None

    def _write_record(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.record)), exist_ok=True)
        endpoints = [
            {"id": ident, "address": address, "dev": device} for address, (ident, device, _) in self.added.items()
        ]
        if not endpoints and self._limit is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record)
            return
        with open(self.record, "w", encoding="utf-8") as file:
            json.dump({"endpoints": endpoints, "subflows": self._limit, "pid": os.getpid()}, file)
            file.write("\n")

    def clear_leftovers(self) -> None:
        """Remove what the record says a run before added and did not
        remove (it was killed): each endpoint that still has the recorded
        address, and the subflow limit it raised if nobody changed it since;
        the same for the records of runs on other ports that are gone."""
        with self._lock:
            for record in [self.record, *abandoned_records(self.record)]:
                self._clear_record(record)

    def _clear_record(self, record: str) -> None:
        try:
            with open(record, encoding="utf-8") as file:
                recorded = json.load(file)
            endpoints = {int(entry["id"]): str(entry["address"]) for entry in recorded.get("endpoints", [])}
            limit = recorded.get("subflows")
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            logger.warning("the record of MPTCP endpoints %s is unreadable (%s): removed", record, error)
            with contextlib.suppress(OSError):
                os.unlink(record)
            return
        try:
            present = self.endpoints()
            for ident, address in endpoints.items():
                if present.get(ident, {}).get("address") == address:
                    self._ip("mptcp", "endpoint", "delete", "id", str(ident))
                    logger.info("removed the MPTCP endpoint %s (id %d) a run before left", address, ident)
            if isinstance(limit, list) and len(limit) == 2 and self.subflow_limit() == int(limit[1]):
                self._ip("mptcp", "limits", "set", "subflows", str(int(limit[0])))
        except OSError as error:
            logger.warning("cannot remove the MPTCP endpoints a run before left: %s", error.strerror or error)
            return
        with contextlib.suppress(FileNotFoundError):  # another start took it first
            os.unlink(record)

    def follow(self, wanted: Mapping[str, tuple[str, bool]]) -> None:
        """Make the endpoints dispatch added those of ``wanted`` (address:
        (device, backup)): add what is missing (unless the kernel has that
        address already: not dispatch's), change a role, delete what is no
        longer wanted; raise the subflow limit to their number."""
        with self._lock:
            try:
                self._follow(wanted)
            except OSError as error:
                self._refuse(wanted, error)

    def _follow(self, wanted: Mapping[str, tuple[str, bool]]) -> None:
        present = self.endpoints()
        for address in [address for address in self.added if address not in wanted]:
            self._delete(address, present)
        taken = {entry.get("address") for entry in present.values()}
        for address, (device, backup) in wanted.items():
            had = self.added.get(address)
            if had is not None and had[1:] == (device, backup):
                continue
            if had is not None and had[1] == device:
                self._ip("mptcp", "endpoint", "change", "id", str(had[0]), "backup" if backup else "nobackup")
                self.added[address] = (had[0], device, backup)
                self._write_record()
                continue
            if had is not None:
                self._delete(address, present)
            elif address in taken:
                continue  # the system's own: left as it is
            ident = min(set(range(1, 256)) - set(present) - {entry[0] for entry in self.added.values()})
            self.added[address] = (ident, device, backup)
            self._write_record()  # recorded before it is made
            flags = ["subflow", "backup"] if backup else ["subflow"]
            try:
                self._ip("mptcp", "endpoint", "add", address, "id", str(ident), "dev", device, *flags)
            except OSError:
                del self.added[address]
                self._write_record()
                raise
            present[ident] = {"id": ident, "address": address}
            logger.info("MPTCP endpoint %s on %s added (%s)", address, device, "backup" if backup else "subflow")
        self._raise_limit(len(self.added))
        self._refused = None

    def _delete(self, address: str, present: Mapping[int, Mapping[str, Any]]) -> None:
        ident = self.added[address][0]
        if present.get(ident, {}).get("address") == address:
            self._ip("mptcp", "endpoint", "delete", "id", str(ident))
            logger.info("MPTCP endpoint %s removed", address)
        del self.added[address]
        self._write_record()

    def _raise_limit(self, wanted: int) -> None:
        wanted = min(wanted, MPTCP_MAX_SUBFLOWS)
        current = self.subflow_limit()
        if current >= wanted:
            return
        before = self._limit[0] if self._limit is not None else current
        self._limit = (before, wanted)
        self._write_record()
        self._ip("mptcp", "limits", "set", "subflows", str(wanted))
        logger.info("MPTCP subflow limit raised from %d to %d", current, wanted)

    def _refuse(self, wanted: Mapping[str, tuple[str, bool]], error: OSError) -> None:
        """Say once why the endpoints cannot be changed, and what to run."""
        why = error.strerror or str(error)
        if self._refused == why:
            return
        self._refused = why
        commands = [
            f"ip mptcp endpoint add {address} dev {device} subflow{' backup' if backup else ''}"
            for address, (device, backup) in wanted.items()
        ]
        commands.append(f"ip mptcp limits set subflows {min(len(wanted), MPTCP_MAX_SUBFLOWS)}")
        if error.errno == errno.EPERM:
            why += "; it needs CAP_NET_ADMIN"
        logger.warning(
            "cannot set the MPTCP endpoints (%s): bonds use those configured; as root, run: %s",
            why,
            "; ".join(commands),
        )

    def remove_all(self) -> None:
        """Remove every endpoint dispatch added, put the subflow limit back
        where it raised it, and remove the record."""
        with self._lock:
            if not self.added and self._limit is None:
                return  # nothing to undo: no need to ask the kernel
            try:
                present = self.endpoints()
                for address in list(self.added):
                    self._delete(address, present)
                if self._limit is not None and self.subflow_limit() == self._limit[1]:
                    self._ip("mptcp", "limits", "set", "subflows", str(self._limit[0]))
                self._limit = None
                self._write_record()
            except OSError as error:
                logger.warning("cannot remove the MPTCP endpoints: %s", error.strerror or error)


class Bonds:
    """The bonded links (``mptcp+``) among ``addresses``, and the endpoints
    their subflows leave by (Linux; recorded in ``record``).

    ``start(capacity)`` removes what a run that was killed left, and gives
    each address of the bonds' interfaces its endpoint, by the role
    choose_bond() gives the interface for what ``capacity(name)`` says it
    carries; ``follow(capacity)`` does so again as links come and go,
    ``stop()`` removes them. Raises AddressError where MPTCP is unavailable.
    """

    def __init__(self, addresses: Iterable[LocalAddress], record: str) -> None:
        self.links = [a for a in addresses if isinstance(a, ProxyAddress) and a.proxy.bonded]
        unavailable = mptcp_unavailable() if self.links else None
        if unavailable is not None:
            raise AddressError(f"{self.links[0].describe()!r}: {unavailable}")
        self.roles: list[BondRole] = []
        self.endpoints = MptcpEndpoints(record) if sys.platform.startswith("linux") else None
        # Bytes of bonds counted on the rows of their links as well (and their
        # rates over the last interval): the totals count them once.
        self.counted_twice = (0, 0)
        self.twice_rates = (0.0, 0.0)

    def interfaces(self) -> dict[str, Interface]:
        """The interfaces the bonds' subflows may leave by, with their
        usable addresses: those the bonds name, or else every one."""
        if not self.links:
            return {}
        try:
            found = {interface.name: interface for interface in usable_interfaces()}
        except (OSError, AddressError) as error:
            logger.debug("cannot read the interfaces: %s", error)
            return {}
        named = {name for bond in self.links for name in bond.proxy.bond}
        return {name: interface for name, interface in found.items() if interface.ips and (name in named or not named)}

    def start(self, capacity: Callable[[str], float | None]) -> None:
        """Remove what a run before left; set up the endpoints."""
        if self.endpoints is not None:
            self.endpoints.clear_leftovers()
        if self.links:
            self.follow(capacity)

    def follow(self, capacity: Callable[[str], float | None]) -> None:
        """Give each address of the bonds' interfaces its endpoint, as a
        subflow or a backup by what its interface carries."""
        interfaces = self.interfaces()
        roles = choose_bond({name: capacity(name) for name in interfaces})
        if [(r.interface, r.backup) for r in roles] != [(r.interface, r.backup) for r in self.roles]:
            for role in roles:
                logger.info("bond: %s: %s", role.interface, role.why)
        self.roles = roles
        if self.endpoints is not None:
            wanted = {ip: (role.interface, role.backup) for role in roles for ip in interfaces[role.interface].ips}
            self.endpoints.follow(wanted)

    def count_on_rows(
        self, moved: Mapping[str, tuple[int, int]], addresses: Iterable[LocalAddress], meter: Meter
    ) -> None:
        """Count what the subflows ``moved`` (up, down by local IP) through
        an address that is a link too on its row of ``meter``, so that its
        rates and capacity are true; ``counted_twice`` keeps the sum."""
        twice = (0, 0)
        for address in addresses if moved else []:
            up, down = moved.get(address.ip, (0, 0))
            if (up or down) and not isinstance(address, ProxyAddress):
                meter.add(address, up, down)
                twice = (twice[0] + up, twice[1] + down)
        self.counted_twice = (self.counted_twice[0] + twice[0], self.counted_twice[1] + twice[1])
        self.twice_rates = (twice[0] / METER_INTERVAL, twice[1] / METER_INTERVAL)

    def stop(self) -> None:
        """Remove the endpoints added."""
        if self.endpoints is not None:
            self.endpoints.remove_all()

    def status(
        self, fallback: Mapping[LocalAddress, bool], carried: Mapping[LocalAddress, Mapping[str, tuple[int, int]]]
    ) -> list[BondStatus]:
        """Each bonded link, whether its last connection fell back (by
        ``fallback``), the roles of the interfaces, and what its subflows
        carried through each (``carried``: (up, down) bytes by interface)."""
        members: list[BondMember] = [
            {"interface": role.interface, "role": "backup" if role.backup else "subflows", "why": role.why}
            for role in self.roles
        ]
        states: dict[bool | None, Literal["multipath", "fallback", "unknown"]] = {
            None: "unknown",
            False: "multipath",
            True: "fallback",
        }
        return [
            {
                "link": bond.describe(),
                "mptcp": states[fallback.get(bond)],
                "members": members,
                "carried": [
                    {"interface": name, "bytes_up": up, "bytes_down": down}
                    for name, (up, down) in sorted(carried.get(bond, {}).items())
                ],
            }
            for bond in self.links
        ]


# ---------------------------------------------------------------------------
# Server: admission, the first byte picks the session, the listener
# ---------------------------------------------------------------------------

# Descriptors the process needs besides connections (listener, log, resolver),
# and the descriptors one connection holds (client, upstream, and one spare
# for the resolver's socket while a name is being looked up). The splice()
# pipes of bulk transfers are not counted: without descriptors for them,
# the relay copies instead.
RESERVED_DESCRIPTORS = 64
DESCRIPTORS_PER_CONNECTION = 3
# Each connection is a thread: past some thousands, threads exhaust the
# machine before descriptors do, whatever the descriptor limit says.
MAX_CONNECTIONS_CEILING = 10_000
# Refusals (allow-list, too many connections) are logged at most this often,
# so that a flood of them cannot flood the log.
REFUSAL_LOG_INTERVAL = 1.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


def default_max_connections() -> int:
    """How many connections fit the descriptor limit (soft RLIMIT_NOFILE)."""
    if sys.platform == "win32":  # no such limit to fit
        return MAX_CONNECTIONS_CEILING
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CEILING
    fitting = (soft - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION
    return max(1, min(fitting, MAX_CONNECTIONS_CEILING))


class Admission:
    """Which clients are let in: those the allow-list admits, while fewer
    than ``max_connections`` are open. Keeps the open client sockets, so
    that shutdown can close them, and counts the refused."""

    def __init__(self, access: AccessPolicy, max_connections: int) -> None:
        self.access = access
        self.max_connections = max_connections
        self.refused = 0
        self._clients: set[socket.socket] = set()
        self._changed = threading.Condition()
        self._unlogged_refusals = 0
        self._last_refusal_log = -math.inf

    def admit(self, sock: socket.socket, client_address: tuple[Any, ...], own_too: bool = False) -> bool:
        """Keep a new client if the allow-list and the limit let it in;
        ``own_too``: a client at one of this machine's addresses is let in
        whatever the allow-list says."""
        own = own_too and is_own_address(_client_ip(client_address[0]))
        if not own and not self.access.allows(client_address[0]):
            self._refuse(client_address, "not in the allow-list")
            return False
        with self._changed:
            full = len(self._clients) >= self.max_connections
            if not full:
                self._clients.add(sock)
        if full:
            self._refuse(client_address, f"{self.max_connections} connections are open, the most allowed")
        return not full

    def _refuse(self, client_address: tuple[Any, ...], reason: str) -> None:
        with self._changed:
            self.refused += 1
            self._unlogged_refusals += 1
            now = time.monotonic()
            if now - self._last_refusal_log < REFUSAL_LOG_INTERVAL:
                return
            others = self._unlogged_refusals - 1
            self._unlogged_refusals = 0
            self._last_refusal_log = now
        more = f" ({others} more refused since the last such line)" if others else ""
        logger.warning("refused %s: %s%s", _format_endpoint(*_split_host(client_address)), reason, more)

    def release(self, sock: socket.socket) -> None:
        """Forget a client whose connection has ended."""
        with self._changed:
            self._clients.discard(sock)
            self._changed.notify_all()

    def open_connections(self) -> int:
        """How many client connections are open now."""
        with self._changed:
            return len(self._clients)

    def wait_until_none_open(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every client to be gone."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._clients, timeout=timeout)

    def close_all(self) -> None:
        """Shut down every client connection still open."""
        with self._changed:
            for sock in self._clients:
                _shutdown_quietly(sock)


# An HTTP request starts with its method, a token of letters, or with an
# empty line a client may send first (RFC 9112, 2.2); SOCKS starts with its
# version.
HTTP_FIRST_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
SESSIONS: dict[int, type[Session]] = {
    SOCKS4_VERSION: SocksSession,
    SOCKS5_VERSION: SocksSession,
    **{letter: HttpProxySession for letter in HTTP_FIRST_BYTES},
}


class ConnectionHandler(socketserver.StreamRequestHandler):
    """Serves one client connection: its first byte picks the session
    (SESSIONS; SocksSession, which refuses it, for anything else)."""

    server: _Server
    disable_nagle_algorithm = True

    def setup(self) -> None:
        # Not StreamRequestHandler's setup(): no session reads through files,
        # and making them costs a short connection a tenth of its time. They
        # are made if ever asked for (rfile, wfile).
        self.connection = self.request
        self.connection.setblocking(False)
        if not self.server.options_inherited:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A client that vanishes without a word must not hold a thread forever.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    @functools.cached_property
    def rfile(self) -> Any:  # type: ignore[override]
        """The connection as a buffered binary file, made when first used."""
        return self.connection.makefile("rb", self.rbufsize)

    @functools.cached_property
    def wfile(self) -> Any:  # type: ignore[override]
        """The connection as an unbuffered binary file, made when first used."""
        return self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        for made in ("wfile", "rfile"):
            if made in self.__dict__:
                with contextlib.suppress(OSError):
                    self.__dict__[made].close()

    def handle(self) -> None:
        context = self.server.context
        reader = DeadlineReader(self.connection, time.monotonic() + context.handshake_timeout)
        try:
            first = reader.peek_byte()
        except OSError as error:
            record = ExchangeRecord(_format_endpoint(*_split_host(self.client_address)), result=_describe(error))
            record.log()
            return
        session = SESSIONS.get(first, SocksSession)
        session(self.connection, self.client_address, reader, context).serve()


class TransparentHandler(ConnectionHandler):
    """Serves one connection the firewall redirected: a TransparentSession,
    with no first byte waited for (in some protocols the server speaks first)."""

    def handle(self) -> None:
        context = self.server.context
        reader = DeadlineReader(self.connection, time.monotonic() + context.handshake_timeout)
        TransparentSession(self.connection, self.client_address, reader, context).serve()


class _Server(socketserver.ThreadingTCPServer):
    """The listening socket; each connection is served by a daemon thread,
    one started for it or one idle after serving another."""

    allow_reuse_address = True  # on POSIX: a restart need not wait for TIME_WAIT
    # Whether accepted sockets have TCP_NODELAY and keep-alive from the
    # listener (server_activate), or need them set one by one.
    options_inherited = False
    daemon_threads = True
    # Connections are kept by Admission; the server need not keep a list of
    # its threads to join.
    block_on_close = False
    # Bursts of connections (a BitTorrent client starting) must not be
    # refused by a short accept queue.
    request_queue_size = 1024

    # Threads are reused: one that has served a connection waits a moment for
    # the next. Starting a thread costs more than serving a short connection
    # (a stack to map, and the accept loop waits until the thread runs).
    idle_thread_seconds = 1.0
    max_idle_threads = 64

    handler: type[ConnectionHandler] = ConnectionHandler
    # An IPv6 listener on every address (::) takes IPv4 clients too, as
    # ::ffff:a.b.c.d, wherever the system can.
    takes_ipv4_too = True

    def __init__(
        self, address: tuple[str, int], admission: Admission, context: SessionContext, mptcp: bool = False
    ) -> None:
        self.address_family = _family_of(address[0])
        self.admission = admission
        self.context = context
        self._waiting_requests: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._idle_threads = 0  # waiting for a request, not yet promised one
        self._idle_lock = threading.Lock()
        self._idle_dismissed = False  # stopped: a thread that has served leaves
        # stop() wakes the accept loop through this socket pair, so the loop
        # has no timer to wake on, and stopping takes no poll interval.
        self._wake_up, self._wake_up_sender = socket.socketpair()
        self._stop_requested = False
        self._loop_lock = threading.Lock()  # orders a stop and a loop starting
        self._loop_thread: int | None = None
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._close_when_done = False
        try:
            super().__init__(address, self.handler, bind_and_activate=not mptcp)
        except BaseException:
            self._close_wake_up()
            raise
        if mptcp:
            # The far end of bonds: clients' subflows join here, and a plain
            # TCP client is served as ever (the kernel falls back).
            self.socket.close()
            try:
                self.socket = socket.socket(self.address_family, self.socket_type, _IPPROTO_MPTCP)
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                self._close_wake_up()
                raise

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Said, not left to the system (Windows, the BSDs and Linux with
            # bindv6only take IPv6 alone): the proxy knows what reaches it.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.takes_ipv4_too else 1)
        # Windows lets another program bind a port that has SO_REUSEADDR and
        # take its clients; SO_EXCLUSIVEADDRUSE keeps the port this proxy's.
        if _EXCLUSIVE_PORTS:
            self.allow_reuse_address = False
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_EXCLUSIVEADDRUSE, 1)
        super().server_bind()

    def server_activate(self) -> None:
        # Set once here, for every connection accepted (see
        # ConnectionHandler.setup); a listener that refuses them (MPTCP on
        # kernels before 5.17) has them set on each connection instead.
        self.options_inherited = _ACCEPTED_SOCKETS_INHERIT_OPTIONS
        if self.options_inherited:
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                self.options_inherited = False
        super().server_activate()

    def serve_until_stopped(self) -> None:
        """Accept clients until stop() is called; return at once if it was.

        A loop of its own rather than serve_forever(), which looks for a stop
        only every poll interval (a stop waits for it, an idle proxy wakes up
        for it) and deadlocks on a shutdown() from its own thread (a signal
        or log handler)."""
        with self._loop_lock:
            if self._stop_requested:
                return
            self._loop_done.clear()
            self._loop_thread = threading.get_ident()
        try:
            waiter = _PairWaiter(self.socket, self._wake_up)
            while not self._stop_requested:
                waiting, _ = waiter.wait(selectors.EVENT_READ, selectors.EVENT_READ, None)
                if waiting and not self._stop_requested:
                    self._accept()
        finally:
            self._dismiss_idle_threads()
            self._loop_done.set()
            if self._close_when_done:
                self.server_close()

    def _dismiss_idle_threads(self) -> None:
        """The threads waiting for a next connection leave now, and those
        serving one once it ends. In the loop's thread, after the loop:
        not under process_request's hold of the lock (a signal handler)."""
        with self._idle_lock:
            self._idle_dismissed = True
            for _ in range(self._idle_threads):
                self._waiting_requests.put((None, None))  # never blocks
            self._idle_threads = 0

    def _accept(self) -> None:
        """Take the client that waits as handle_request() does, by the steps
        socketserver documents for it: get_request(), verify_request(),
        process_request(), and handle_error() for what that raises; without
        the selector handle_request() makes for each call, as the loop's own
        select() has just said that a client waits."""
        try:
            request, client_address = self.get_request()
        except OSError:  # gone before it was taken
            return
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def stop(self) -> None:
        """Stop accepting: once serve_until_stopped() has returned, or will
        return as soon as the caller (its own thread) is back in it. The
        idle threads leave then, the others once they have served."""
        with self._loop_lock:
            self._stop_requested = True
        with contextlib.suppress(OSError):  # closed already: nothing is waiting
            self._wake_up_sender.send(b"\0")
        if self._loop_thread != threading.get_ident():
            self._loop_done.wait()

    def server_close(self) -> None:
        with self._loop_lock:
            if not self._loop_done.is_set() and self._loop_thread == threading.get_ident():
                # Called from inside the loop (a signal handler): the sockets
                # are closed once it returns, not under a select() that still
                # waits on them.
                self._close_when_done = True
                return
        super().server_close()
        self._close_wake_up()

    def _close_wake_up(self) -> None:
        self._wake_up.close()
        self._wake_up_sender.close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Called in the accepting thread before a handler thread exists or a
        # byte is read: a refused client costs nothing but the accept.
        return self.admission.admit(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        # Every accepted socket ends here, served, refused or failed. It is
        # closed without TCPServer's shutdown(SHUT_WR) first: the descriptor
        # is this process's alone (nothing forks), so close() sends the FIN,
        # and a relay has shut that side already.
        self.admission.release(request)
        self.close_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to an idle thread, or start a new one."""
        with self._idle_lock:
            if self._idle_threads:
                self._idle_threads -= 1
                self._waiting_requests.put((request, client_address))
                return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve connections in this thread until none comes for a while."""
        while request is not None:  # None: dismissed by stop()
            super().process_request_thread(request, client_address)
            with self._idle_lock:
                if self._idle_dismissed or self._idle_threads >= self.max_idle_threads:
                    return
                self._idle_threads += 1
            try:
                request, client_address = self._waiting_requests.get(timeout=self.idle_thread_seconds)
            except queue.Empty:
                with self._idle_lock:
                    # A request may have been promised to an idle thread just now.
                    try:
                        request, client_address = self._waiting_requests.get_nowait()
                    except queue.Empty:
                        self._idle_threads -= 1
                        return

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Ordinary faults are handled by the sessions; what gets here is a bug.
        logger.exception("unexpected error serving %s", _format_endpoint(*_split_host(client_address)))


class _TransparentServer(_Server):
    """The listener of transparent mode, for one address family on every
    address: what the firewall redirects comes to the address of the
    interface it came in by (loopback, for this machine's own programs).
    The allow-list admits as ever; this machine's own addresses too, for
    its own programs' connections, which come from the address of a link."""

    handler = TransparentHandler

    # The IPv4 listener has the IPv4 port: the original destination is
    # read by each family's own option.
    takes_ipv4_too = False

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.admission.admit(request, client_address, own_too=True)


# ---------------------------------------------------------------------------
# Steering: links held back while dispatch runs (data caps, paused, closed)
# ---------------------------------------------------------------------------

# What the control API (and ``dispatch link``) may ask of a link.
LINK_ACTIONS = ("pause", "resume", "close", "weight", "reset-usage")


def read_link_states(path: str) -> dict[str, tuple[SteeredState, int | None]]:
    """The links' states and weights a state file keeps (``"steered"``: by
    link name, ``{"state": "paused", "weight": 3}``), those steered away
    from "ready" and their weight alone; an unusable entry is left out,
    with one warning for them all. A file read_state finds unusable gives
    nothing, quietly: it has said so."""
    found = read_state_part(path, "steered")
    if found is None:
        return {}
    steered = found[1]
    kept: dict[str, tuple[SteeredState, int | None]] = {}
    for name, entry in steered.items():
        state = entry.get("state", "ready") if isinstance(entry, dict) else None
        weight = entry.get("weight") if isinstance(entry, dict) else None
        weight_usable = weight is None or (type(weight) is int and 1 <= weight <= MAX_WEIGHT)
        if state in ("ready", "paused", "closed") and weight_usable:
            kept[name] = state, weight
    if len(kept) < len(steered):
        logger.warning("state file %s: %d unusable link states left out", path, len(steered) - len(kept))
    return kept


class LinkSteering:
    """What holds the running links back apart from their health, and the
    control API's changes (a LinkControl).

    The data caps are counted against what each link carries (a
    DataBudget); once one is reached, ``cap_action`` (see CapAction) holds
    the link back. A link may be paused (no new connection; those open go
    on), closed (and those open are ended), resumed, given another weight;
    its usage counted anew. ``held`` and ``weight_of`` are the Balancer's
    (see Hold). The states and weights are kept in the state file; each
    change calls ``changed`` (which writes it). It becomes the ``held`` and
    ``weight`` of ``upstream``'s balancer. Raises ValueError for a cap of a
    link that is not among ``links``."""

    def __init__(self, links: LinkSet, upstream: Upstream, budget: DataBudget, cap_action: str) -> None:
        names = [link.name for link in links.links]
        unknown = sorted(budget.links - set(names))
        if unknown:
            raise ValueError(f"caps: no link is named {hide_password(unknown[0])} (the links: {', '.join(names)})")
        self.links = links
        self.upstream = upstream
        self.budget = budget
        self.cap_action = cap_action
        upstream.balancer.held, upstream.balancer.weight = self.held, self.weight_of  # it steers that balancer
        self.changed: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._states: dict[str, SteeredState] = {}  # those not "ready"
        self._weights: dict[str, int] = {}  # those changed while running

    def link_name(self, address: LocalAddress) -> str:
        """The name of ``address``'s link, as stats() and --cap say it."""
        link = self.links.link_of(address)
        return link.name if link else address.ip

    def held(self, address: LocalAddress) -> Hold | None:
        """Why ``address`` takes fewer new connections than its health allows."""
        if not self._states and not self.budget.spent:
            return None  # the usual case, asked by every connection: no link's name is needed
        name = self.link_name(address)
        if name in self._states:
            return "barred"
        if not self.budget.spent or name not in self.budget.spent:
            return None
        return "spent" if self.cap_action == "backup" else "barred"

    def weight_of(self, address: LocalAddress) -> int:
        """``address``'s weight in turns: its link's, as changed while running."""
        return self._weights.get(self.link_name(address), address.weight)

    def reports(self) -> list[LinkReport]:
        """Each link's state and weight."""
        return [
            {
                "name": link.name,
                "state": self._states.get(link.name, "ready"),
                "weight": self._weights.get(link.name, link.weight),
            }
            for link in self.links.links
        ]

    def steer(self, name: str, request: object, who: str) -> str:
        """Make the change ``request`` asks (see LinkControl); log it with
        ``who`` asked. Raises ControlError, with nothing changed, for a
        link not named so, an action not known, a weight not from 1 to
        MAX_WEIGHT, a body that is not one of these."""
        link = next((link for link in self.links.links if link.name == name), None)
        if link is None:
            raise ControlError(HTTPStatus.NOT_FOUND, f"no link is named {name[:100]!r}")
        action, weight, site = self._parse(request)
        with self._lock:
            before = self._states.get(name, "ready")
            if action == "pause" or (action == "close" and site is None):
                self._states[name] = "paused" if action == "pause" else "closed"
            elif action == "resume":
                self._states.pop(name, None)
            elif action == "weight" and weight is not None:
                self._weights[name] = weight
            elif action == "reset-usage" and not self.budget.reset(name):
                raise ControlError(HTTPStatus.CONFLICT, f"link {name} has no data cap")
        if action == "close":
            ended = self.upstream.close_through(list(link.known.values()), site)
            ended_text = plural(ended, "connection")
            if site is None:
                line = f"link {name} closed ({ended_text} ended)"
            else:
                line = f"link {name}: {ended_text} to {site} ended"
        elif action == "weight":
            self.upstream.balancer.rebuild(self.links.addresses)
            line = f"link {name} has weight {weight}"
            if self.upstream.balancer.balance is Balance.MEASURED:
                line += " (weights count with --balance round-robin)"
        elif action == "reset-usage":
            self.budget.update_spent()
            line = f"link {name} counts its usage from zero"
        else:
            after = self._states.get(name, "ready")
            line = f"link {name} {'resumed' if after == 'ready' else after}"
            if after == before:
                line = f"link {name} was {'ready' if after == 'ready' else after} already"
        logger.info("%s from %s", line, who)
        self.changed()
        return line

    @staticmethod
    def _parse(request: object) -> tuple[str, int | None, str | None]:
        """(action, weight, site) of a control API body; raises ControlError."""
        if not isinstance(request, dict) or not isinstance(request.get("action"), str):
            raise ControlError(HTTPStatus.BAD_REQUEST, 'the body is one JSON object: {"action": ...}')
        action = request["action"]
        if action not in LINK_ACTIONS:
            raise ControlError(HTTPStatus.BAD_REQUEST, f"no action {action[:40]!r}: {', '.join(LINK_ACTIONS)}")
        allowed = {"action", *({"weight": ["weight"], "close": ["site"]}.get(action, []))}
        extra = sorted(set(request) - allowed)
        if extra:
            raise ControlError(HTTPStatus.BAD_REQUEST, f"{action} takes no {str(extra[0])[:40]!r}")
        weight, site = request.get("weight"), request.get("site")
        if action == "weight" and not (type(weight) is int and 1 <= weight <= MAX_WEIGHT):
            raise ControlError(HTTPStatus.BAD_REQUEST, f"the weight is a whole number from 1 to {MAX_WEIGHT}")
        if site is not None and not (isinstance(site, str) and site and (_is_host_name(site) or _is_ip(site))):
            raise ControlError(HTTPStatus.BAD_REQUEST, f"{str(site)[:100]!r} is no host name or address")
        return action, weight, site

    def restore_states(self, state_file: str) -> None:
        """Steer the links as the state file at ``state_file`` kept them
        (see read_link_states); say so for each link held back."""
        names = {link.name for link in self.links.links}
        for name, (state, weight) in read_link_states(state_file).items():
            if name not in names:
                continue
            with self._lock:
                if state != "ready":
                    self._states[name] = state
                if weight is not None:
                    self._weights[name] = weight
            if state != "ready":
                logger.warning("link %s is %s, as it was left (dispatch link %s resume)", name, state, name)
        if self._weights:
            self.upstream.balancer.rebuild(self.links.addresses)

    def count(self, samples: Mapping[LocalAddress, Sample]) -> None:
        """Count what each link carried (the meter's ``samples``) against
        its caps; under "stop-now", end the connections open through a link
        that has just reached one."""
        if not self.budget.caps:
            return
        for address, sample in samples.items():
            self.budget.add(self.link_name(address), sample.up + sample.down)
        newly = self.budget.update_spent()
        if newly and self.cap_action == "stop-now":
            self.upstream.close_through(
                [a for link in self.links.links if link.name in newly for a in link.known.values()]
            )

    def cap_reports(self, rows: Sequence[StatsRow]) -> list[CapReport]:
        """Where each capped link stands, with the time left at its rate in ``rows`` (stats())."""
        reports = self.budget.reports()
        for report in reports:
            rate = sum(row["rate_up"] + row["rate_down"] for row in rows if row["link"] == report["link"])
            left = max(0, report["cap_bytes"] - report["used_bytes"])
            report["seconds_left"] = left / rate if rate > 0 else None
        return reports

    def to_keep(self) -> dict[str, object]:
        """The state file's entries for the steering: the usage of the
        capped links and the machine's name; the links steered."""
        kept: dict[str, object] = {}
        if self.budget.caps:
            kept.update(host=socket.gethostname(), usage=self.budget.to_keep())
        with self._lock:
            steered: dict[str, dict[str, object]] = {name: {"state": state} for name, state in self._states.items()}
            for name, weight in self._weights.items():
                steered.setdefault(name, {})["weight"] = weight
        if steered:
            kept["steered"] = steered
        return kept

    def restore(self, state_file: str) -> None:
        """Go on from what the state file at ``state_file`` kept: the usage
        (see read_usage), the links' states and weights."""
        if self.budget.caps:
            self.budget.restore(read_usage(state_file, datetime.date.fromtimestamp(time.time())))
            self.budget.update_spent()
        self.restore_states(state_file)


# ---------------------------------------------------------------------------
# Options: every option of a Dispatcher, validated as a whole
# ---------------------------------------------------------------------------

DEFAULT_GRACE = 5.0
# The longest duration a Dispatcher takes (a week): longer ones would
# overflow what poll() and socket timeouts take (about 24 days).
MAX_DURATION = 7 * 24 * 3600.0
# After the grace period, how long shutdown() waits for the sessions to see
# their sockets closed and write their log lines.
CLOSE_TIMEOUT = 2.0
GRACE_POLL = 0.1  # how often a grace period looks whether it was cut short
START_POLL = 0.1  # how often start() looks whether the server thread ended before serving


def listen_address_problem(host: str) -> str | None:
    """What is wrong with ``host`` as an address to listen on (an IP
    address or a name), in one line; None if nothing.

    The system reads "" and "0" (and "127.1") as addresses too, the first
    two as every address: what is meant is written out."""
    if not host:
        return "an empty address: write 0.0.0.0 (or ::) to listen on every address"
    if _is_ip(host):
        ip = ipaddress.ip_address(host.partition("%")[0])
        if _is_multicast_or_broadcast(ip):
            return f"{host!r} is a multicast or broadcast address: no client connects to it"
        return None
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None  # a name, looked up when the proxy listens
    return f"{host!r} is a short form of {socket.inet_ntoa(packed)}: write it out"


def _holds(value: object, kind: Any) -> bool:
    """Whether ``value`` is of the annotated type ``kind``: a class, None,
    a union, Sequence[X] (any iterable but text or a mapping; each entry an
    X), Mapping[K, V] or Literal. An int is no bool and a bool no int; an
    int is a float."""
    origin = getattr(kind, "__origin__", None)
    arguments: tuple[Any, ...] = getattr(kind, "__args__", ())
    if kind is None or kind is type(None):
        return value is None
    if origin is Literal:
        return value in arguments
    if isinstance(kind, types.UnionType) or origin is typing.Union:
        return any(_holds(value, member) for member in arguments)
    if origin in (Sequence, collections.abc.Sequence):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            return False
        return all(_holds(entry, arguments[0]) for entry in value)
    if origin in (Mapping, collections.abc.Mapping):
        return isinstance(value, Mapping) and all(
            _holds(key, arguments[0]) and _holds(entry, arguments[1]) for key, entry in value.items()
        )
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    """The annotated type ``kind`` as an error message says it."""
    if isinstance(kind, type):
        return kind.__name__
    return re.sub(r"\b(?:typing|collections\.abc|dispatch)\.", "", str(kind).replace("NoneType", "None"))


def _seconds(default: float | None, *, zero_is_off: bool = False) -> Any:
    """A DispatcherOptions field of seconds: positive (or 0, which turns it
    off, where ``zero_is_off``) and at most MAX_DURATION."""
    return dataclasses.field(default=default, metadata={"seconds": "0 or more" if zero_is_off else "positive"})


@dataclasses.dataclass(frozen=True)
class DispatcherOptions:
    """Everything a Dispatcher is told, each option documented here once,
    validated as a whole when made: what is wrong raises ValueError
    (AddressError for an ADDRESS's form) naming the option. Collections are
    kept as tuples and read-only mappings, so that the options stay as
    checked. What depends on this machine (which interfaces exist, whether
    the port is free) is found out when the Dispatcher is made.
    """

    # ``ADDRESS[@WEIGHT|@backup]`` texts (IP literals, interface names or
    # upstream proxies' URLs, see parse_proxy_url) or LocalAddress objects;
    # None means every usable address.
    addresses: Sequence[str | LocalAddress] | None = None
    host: str = "127.0.0.1"  # where the proxy listens
    port: int = 1080  # 0 picks a free one: Dispatcher.address tells which
    connect_timeout: float = _seconds(DEFAULT_CONNECT_TIMEOUT)  # to connect upstream
    handshake_timeout: float = _seconds(DEFAULT_HANDSHAKE_TIMEOUT)  # a client's whole handshake
    # The longest wait between two retests of a link that failed (the first
    # is a second after the failure).
    cooldown: float = _seconds(DEFAULT_COOLDOWN)
    idle_timeout: float | None = _seconds(None)  # a relay with nothing moving either way is closed; None never
    max_connections: int | None = None  # clients open at once, more are refused; None: default_max_connections()
    # {user: password}: SOCKS5 clients must log in (RFC 1929), HTTP clients
    # send Proxy-Authorization, and SOCKS4 clients, which cannot, are
    # refused. Passwords stay out of the options' repr, and so out of logs
    # and tracebacks.
    credentials: Mapping[str, str] | None = dataclasses.field(default=None, repr=False)
    # The networks ("192.168.1.0/24", "fd00::/8", single addresses) clients
    # may connect from; None means PRIVATE_NETWORKS, ["0.0.0.0/0", "::/0"] anyone.
    allow: Sequence[str] | None = None
    # Networks a client from another machine may reach although they are
    # this machine's own (see AccessPolicy.refuses_target): ["127.0.0.0/8"].
    allow_targets: Sequence[str] = ()
    # Serve the local pages (the status page, /stats.json, /metrics,
    # /proxy.pac) and the control API to requests in origin form (GET /) on
    # the proxy's port; False answers them 404. All but /proxy.pac answer
    # only a Host that names localhost, a loopback address, the address the
    # client reached or one of ``page_hosts`` (DNS rebinding).
    pages: bool = True
    page_hosts: Sequence[str] = ()
    # "measured" or "round-robin"; None: measured unless an address has a
    # weight (balance_for).
    balance: str | None = None
    sticky: float | None = _seconds(None, zero_is_off=True)  # seconds a client's site keeps its link; None off
    # "HOST:PORT" targets every link is tested against every ``check_interval`` seconds.
    checks: Sequence[str] = ()
    check_interval: float = _seconds(DEFAULT_CHECK_INTERVAL)
    hedge: float = _seconds(DEFAULT_HEDGE, zero_is_off=True)  # a connect unanswered this long is raced; 0 never
    # The name servers to ask, "ADDRESS[:PORT]" each; None asks the
    # system's, through the links; ["system"] leaves names to the system's resolver.
    dns: Sequence[str] | None = None
    # {user: password} for the proxies' URLs that give a user and no
    # password (kept out of the process list, and out of the repr).
    upstream_passwords: Mapping[str, str] | None = dataclasses.field(default=None, repr=False)
    # Where each link's capacity, the usage of capped links and the links'
    # states are kept across runs (read at the start, written every so
    # often and at shutdown); None keeps nothing.
    state_file: str | None = None
    # A port (Linux) where connections and datagrams the firewall redirects
    # are served, on every address of both families; every socket that
    # leaves by a link then carries the firewall mark ``mark``. With
    # ``apply_rules``, TransparentRules are put in place at the start for
    # the ``lan`` interfaces' forwarded traffic and, if ``local``, this
    # machine's own, and removed at shutdown (FirewallError if refused).
    transparent: int | None = None
    lan: Sequence[str] = ()
    local: bool = False
    apply_rules: bool = False
    mark: int = DEFAULT_MARK
    # Listen with Multipath TCP, as the far end of clients' bonds (mptcp+
    # links); plain TCP clients are served as ever.
    mptcp: bool = False
    # "LINK=SIZE/PERIOD" data caps (see parse_cap), LINK as stats() names
    # it, and what a link does once one is reached: "backup", "stop" (no new
    # connection) or "stop-now" (and those open are ended), until the period
    # starts afresh.
    caps: Sequence[str] = ()
    cap_action: str = "backup"

    def __post_init__(self) -> None:
        self._validate_types()
        self._validate_settings()
        self._keep_collections()

    def _validate_types(self) -> None:
        """Each option against its annotation (the durations are checked
        with their range); a sequence kept as a tuple, read once (a
        generator), and logins given as pairs as a mapping."""
        kinds = _option_types()
        for field in dataclasses.fields(self):
            name, kind = field.name, kinds[field.name]
            given = value = getattr(self, name)
            if isinstance(value, os.PathLike):  # a pathlib.Path as state_file
                value = os.fspath(value)
            elif name in _LOGIN_OPTIONS and isinstance(value, Iterable) and not isinstance(value, (str, Mapping)):
                with contextlib.suppress(TypeError, ValueError):  # (user, password) pairs, as read_auth_file gives
                    value = dict(value)
            elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, tuple)):
                value = tuple(value)  # a generator is read once, here
            if value is not given:
                self._keep(name, value)
            if name not in _DURATION_OPTIONS and not _holds(value, kind):
                shown = value if isinstance(given, collections.abc.Iterator) else given  # read once: as kept
                got = repr(shown) if field.repr else f"a {type(given).__name__}, not shown (passwords)"
                raise ValueError(f"{name} must be {_type_name(kind)}; got {got}")

    def balance_for(self, links: Iterable[Link]) -> Balance:
        """The balance asked for; without one, round robin where a link was
        given a weight (the weights then say the shares), else measured."""
        if self.balance is not None:
            return Balance(self.balance)
        return Balance.ROUND_ROBIN if any(link.weighted for link in links) else Balance.MEASURED

    def check_targets(self, addresses: Iterable[LocalAddress]) -> list[Target]:
        """The check targets, as (host, port); one warning line where no
        address has the family of any of them (a name may have either)."""
        targets = [parse_check_target(check) for check in self.checks]
        families = {_family_of(host) for host, _ in targets if _is_ip(host)}
        named = any(not _is_ip(host) for host, _ in targets)
        if targets and not named and not any(families & address.serves for address in addresses):
            logger.warning("no link has an address of the checks' family: nothing is checked for now")
        return targets

    def _validate_settings(self) -> None:
        """The durations against their range, the port, the limit, the strategy."""
        for field in dataclasses.fields(self):
            seconds = getattr(self, field.name)
            if "seconds" not in field.metadata or (seconds is None and field.default is None):  # None: off
                continue
            kind = field.metadata["seconds"]
            number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            if not (number and 0 <= seconds <= MAX_DURATION and (seconds > 0 or kind == "0 or more")):
                raise ValueError(f"{field.name} must be {kind}, at most {MAX_DURATION:g} seconds; got {seconds!r}")
        problem = listen_address_problem(self.host)
        if problem is not None:
            raise ValueError(f"host: {problem}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be a port number, 0 to 65535 (0: any free one); got {self.port!r}")
        if self.max_connections is not None and not self.max_connections >= 1:
            raise ValueError(f"max_connections must be at least 1; got {self.max_connections!r}")
        balances = [balance.value for balance in Balance]
        if self.balance is not None and self.balance not in balances:
            raise ValueError(f"balance must be {' or '.join(map(repr, balances))}; got {self.balance!r}")
        if self.cap_action not in CAP_ACTIONS:
            raise ValueError(f"cap_action must be {' or '.join(map(repr, CAP_ACTIONS))}; got {self.cap_action!r}")
        self._validate_modes()

    def _validate_modes(self) -> None:
        """Transparent mode's options together, the mark, MPTCP where it is had."""
        if self.transparent is not None and not 0 <= self.transparent <= 65535:
            raise ValueError(f"transparent must be a port number, 0 to 65535; got {self.transparent!r}")
        if self.transparent and self.transparent == self.port:
            raise ValueError(f"transparent: port {self.port} is the proxy's own port; give each its own")
        if self.transparent is None and (self.lan or self.local or self.apply_rules):
            raise ValueError("lan, local and apply_rules are for transparent mode: give transparent a port")
        if self.apply_rules and not (self.lan or self.local):
            raise ValueError("apply_rules needs something to redirect: lan interfaces, or local")
        if not 0 < self.mark < 2**32 - 1:  # the next number marks UDP handed over
            raise ValueError(f"mark must be 1 to {2**32 - 2}; got {self.mark!r}")
        unavailable = mptcp_unavailable() if self.mptcp else None
        if unavailable is not None:
            raise ValueError(f"mptcp: {unavailable}")

    def _keep_collections(self) -> None:
        """Keep each mapping as a read-only copy (the sequences are tuples
        by now, see _validate_types), each entry checked; page hosts as
        compared."""
        if self.addresses is not None:
            self._each("addresses", lambda address: isinstance(address, str) and parse_address(address), self.addresses)
        self._each("checks", parse_check_target, self.checks)
        self._keep("page_hosts", tuple(self._each("page_hosts", page_host, self.page_hosts)))
        if self.allow is not None:
            self._each("allow", lambda network: ipaddress.ip_network(network, strict=False), self.allow)
        self._each("allow_targets", lambda network: ipaddress.ip_network(network, strict=False), self.allow_targets)
        self._each("dns", parse_dns_option, [self.dns])
        for name in ("credentials", "upstream_passwords"):
            logins = getattr(self, name)
            if logins is not None:
                self._keep(name, types.MappingProxyType(dict(logins)))
        self._each("credentials", lambda login: _encode_credential(*login), (self.credentials or {}).items())
        periods = [(cap.link, cap.period) for cap in self._each("caps", parse_cap, self.caps)]
        for link, period in periods:
            if periods.count((link, period)) > 1:
                raise ValueError(
                    f"caps: link {link} has two caps per {'rolling window' if period == 'rolling' else period}"
                )

    def _keep(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: what is kept is set once, here

    @staticmethod
    def _each(name: str, validate: Callable[[T], K], values: Iterable[T]) -> list[K]:
        """``validate`` of each value; its ValueError is raised again naming the
        option (an AddressError as it is: it names the ADDRESS)."""
        try:
            return [validate(value) for value in values]
        except AddressError:
            raise
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


# The options of logins: a mapping, or (user, password) pairs.
_LOGIN_OPTIONS = frozenset({"credentials", "upstream_passwords"})
# The options of seconds, whose range check checks their type too.
_DURATION_OPTIONS = frozenset(field.name for field in dataclasses.fields(DispatcherOptions) if field.metadata)


@functools.cache
def _option_types() -> dict[str, Any]:
    """The annotation of each of DispatcherOptions' options, as types."""
    return typing.get_type_hints(DispatcherOptions)


# ---------------------------------------------------------------------------
# Dispatcher: the library face
# ---------------------------------------------------------------------------


class BackgroundTasks:
    """Functions run every so often in one daemon thread, from ``start()``
    until ``stop()``. A task that raises is logged and runs again next time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: list[tuple[float, Callable[[], object]]] = []
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, interval: float, task: Callable[[], object]) -> None:
        """Run ``task`` every ``interval`` seconds once started."""
        self._tasks.append((interval, task))

    def start(self) -> None:
        """Start the thread, if there is anything to run and it is not running."""
        if self._tasks and self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        due = [time.monotonic() + interval for interval, _ in self._tasks]
        while not self._stopped.wait(max(0.0, min(due) - time.monotonic())):
            now = time.monotonic()
            for index, (interval, task) in enumerate(self._tasks):
                if now >= due[index]:
                    due[index] = now + interval
                    try:
                        task()
                    except Exception:  # one bad turn must not stop the others
                        logger.exception("background task %s failed", getattr(task, "__name__", task))


def _addresses_named(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of ``host``, an IP address or localhost (or a name
    under .localhost, RFC 6761); none for any other name, which is not
    looked up: a lookup could hold up the start."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        ip = _client_ip(name)
    except ValueError:
        return []
    if ip.is_unspecified:  # a connection to 0.0.0.0 or :: reaches this machine's loopback
        return [ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")]
    return [ip]


def reaches_listener(proxy: ProxyURL, host: str, port: int) -> bool:
    """Whether a connection to the upstream ``proxy`` would come back to a
    proxy of this machine listening on (host, port): the same port, and the
    same address, or any address of this machine where (host, port) is every
    address's (0.0.0.0 for IPv4 ones, :: for both). Port 0 is never one: the
    system picks a free port at the start, which nobody could name before."""
    if port == 0 or proxy.port != port:
        return False
    try:
        listening = [_client_ip(host)]
    except ValueError:
        listening = _addresses_named(host)
    for ip in _addresses_named(proxy.host):
        for own in listening:
            if own.is_unspecified and (own.version == 6 or ip.version == 4) and (ip.is_loopback or is_own_address(ip)):
                return True
            if ip == own:
                return True
    return False


class Dispatcher:
    """A dispatching SOCKS and HTTP proxy: it listens, gives each new
    connection a link, and keeps the links followed, measured and tested.

    It takes what DispatcherOptions takes (``addresses``, ``host`` and
    ``port`` by position, every option by name), or one DispatcherOptions
    as ``options=`` (then nothing else: TypeError); ``.options`` is what it
    runs with. While it serves, a background thread follows the interfaces'
    addresses, samples the meter, measures capacities and keeps the state
    file (LinkCapacities), and starts retests and checks. Raises ValueError
    for an option out of its range or malformed, AddressError for an address
    this machine cannot use or an upstream proxy that is this proxy itself
    (see reaches_listener), and OSError if it cannot listen::

        with Dispatcher(["10.0.0.2@7", "10.0.0.3@3"], port=1080) as proxy:
            proxy.serve_forever()
    """

    def __init__(self, *arguments: Any, options: DispatcherOptions | None = None, **keywords: Any) -> None:
        if options is None:
            options = DispatcherOptions(*arguments, **keywords)
        elif arguments or keywords:
            raise TypeError("Dispatcher takes its options either as options= or as arguments, not both")
        self._set_up(options)

    def _set_up(self, options: DispatcherOptions) -> None:
        self.options = options
        rules = self._transparent_rules(options)
        self.links = LinkSet(resolve_links(self._link_specs(options), options.upstream_passwords))
        for address in self.links.addresses:
            if isinstance(address, ProxyAddress) and reaches_listener(address.proxy, options.host, options.port):
                where = _format_endpoint(options.host, options.port)
                raise AddressError(
                    f"{address.describe()} is this proxy's own address ({where}): every connection "
                    "through it would come back here, without end"
                )
        self._check_targets = options.check_targets(self.links.addresses)
        self._checking = threading.Lock()  # held while a round of checks is under way
        self.health = Health(options.cooldown, check_targets=self._check_targets)
        self.capacity = CapacityEstimator()
        self.balancer = Balancer(
            self.links.addresses,
            self.health,
            balance=options.balance_for(self.links.links),
            capacity=self.capacity.estimate,
            sticky=StickyTable(options.sticky) if options.sticky else None,
        )
        self.meter = Meter()
        # What the addresses forgotten once gone carried: still in the totals.
        self._forgotten = dict.fromkeys(("connections", "failed", "bytes_up", "bytes_down"), 0)
        self.resolver = Resolver(
            *parse_dns_option(options.dns),
            addresses=lambda: self.links.addresses,
            health=self.health,
            hedge=min(DNS_HEDGE, options.hedge),
            timeout=options.connect_timeout,
            evidence_after=options.hedge or DEFAULT_HEDGE,
            carried=self.meter.add,  # the data caps count DNS too
        )
        self.access = AccessPolicy(options.credentials, options.allow, options.allow_targets)
        self.upstream = Upstream(
            self.balancer, self.meter, options.connect_timeout, options.hedge, self.resolver, self.access
        )
        budget = DataBudget([parse_cap(cap) for cap in options.caps])
        self.steering = LinkSteering(self.links, self.upstream, budget, options.cap_action)
        limit = default_max_connections() if options.max_connections is None else options.max_connections
        self.admission = Admission(self.access, limit)
        self.context = SessionContext(
            self.access,
            self.upstream,
            options.handshake_timeout,
            options.idle_timeout,
            status=self.status if options.pages else None,
            page_hosts=frozenset(options.page_hosts),
            names=SiteNames() if options.transparent is not None else None,
            control=self.steering if options.pages else None,
            control_needs_login=not _is_loopback_host(options.host),
        )
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        # A Dispatcher serves once: "new", then "starting" (start()'s thread
        # on its way), "serving", and "stopped" from the first shutdown().
        self._life = "new"
        # Reentrant: shutdown() may come from a signal or log handler in a
        # thread that holds it (starting up).
        self._life_lock = threading.RLock()
        self._server = _Server((options.host, options.port), self.admission, self.context, options.mptcp)
        try:
            self._set_up_listening(options, rules)
        except BaseException:
            self._server.server_close()
            raise

    def _set_up_listening(self, options: DispatcherOptions, rules: TransparentRules | None) -> None:
        """What needs the listener's address: the bonds' record, the state
        kept, the background tasks, transparent mode's listeners."""
        self.upstream.listening = self.address
        self._transparent_servers: list[_Server | TransparentUdp] = []
        self._rules: TransparentRules | None = None
        # The user's proxy settings while this dispatch has them pointed at
        # itself (``dispatch start --system-proxy``); the pages say so.
        self.system_proxy: SystemProxy | None = None
        self.bonds = Bonds(self.links.addresses, endpoint_record_path(self.address[1], options.state_file))
        self.capacities = LinkCapacities(
            self.links,
            self.meter,
            self.capacity,
            self.balancer.taken,
            options.state_file,
            more=self.steering.to_keep,
            restore=self.steering.restore,
            more_keys=self.bonds.interfaces,
        )
        self.tasks = BackgroundTasks("dispatch-tasks")
        if self.links.follows_interfaces:
            self.tasks.add(INTERFACE_REFRESH_INTERVAL, self._follow_interfaces)
        self.tasks.add(METER_INTERVAL, self.sample_meter)
        self.tasks.add(ESTIMATE_INTERVAL, self.capacities.measure)
        if options.state_file:
            self.steering.changed = self.capacities.save
            self.tasks.add(USAGE_SAVE_INTERVAL if options.caps else STATE_SAVE_INTERVAL, self.capacities.save)
        self.tasks.add(RETEST_POLL_INTERVAL, self._retest)
        if self._check_targets:
            self.tasks.add(options.check_interval, self._check)
        if self.bonds.links:
            self.tasks.add(INTERFACE_REFRESH_INTERVAL, self._follow_bonds)
        if options.transparent is not None:
            self._set_up_transparent(options.transparent, options.mark, rules)

    @staticmethod
    def _link_specs(options: DispatcherOptions) -> Sequence[str | LocalAddress] | None:
        """The ADDRESSes to resolve: those given, or without any, every
        interface but the LAN's (where connections come from, not a way out)."""
        if options.addresses or not options.lan:
            return options.addresses
        return [i.name for i in usable_interfaces() if i.ips and i.name not in options.lan] or None

    def _set_up_transparent(self, port: int, mark: int, rules: TransparentRules | None) -> None:
        """Listen for redirected connections, apply the ``rules`` (if any) for
        the port listened on, and mark the sockets out; on a failure, close
        every listener and raise."""
        try:
            self._listen_transparent(port)
            if rules is not None:
                self._rules = dataclasses.replace(rules, port=self.transparent_port or 0)
                self._rules.apply()
        except BaseException:
            for server in [self._server, *self._transparent_servers]:
                server.server_close()
            raise
        mark_sockets(mark)

    @staticmethod
    def _transparent_rules(options: DispatcherOptions) -> TransparentRules | None:
        """The rules to apply, once all that keeps them from working here
        was looked for (FirewallError); None where none are to be applied."""
        if options.transparent is None:
            return None
        refusal = transparent_refusal(options.apply_rules)
        if refusal is not None:
            raise FirewallError(refusal)
        networks = lan_networks(options.lan)
        if options.lan:
            require_forwarding()
        if not options.apply_rules:
            return None
        return TransparentRules(options.transparent, networks, options.local, options.mark)

    def _listen_transparent(self, port: int) -> None:
        """Listen for redirected connections and datagrams on every IPv4
        address and, where there is IPv6, every IPv6 one, on one port
        (``port`` 0: a free one)."""
        first = _TransparentServer(("0.0.0.0", port), self.admission, self.context)
        self._transparent_servers.append(first)
        port = first.server_address[1]
        self._transparent_servers.append(TransparentUdp(socket.AF_INET, port, self.context, self.access))
        try:
            self._transparent_servers.append(_TransparentServer(("::", port), self.admission, self.context))
            self._transparent_servers.append(TransparentUdp(socket.AF_INET6, port, self.context, self.access))
        except OSError as error:
            if error.errno not in _errnos("EAFNOSUPPORT", "EADDRNOTAVAIL"):
                raise

    @property
    def transparent_port(self) -> int | None:
        """The port of the transparent listener; None without one."""
        if not self._transparent_servers:
            return None
        return int(self._transparent_servers[0].socket.getsockname()[1])

    def _follow_bonds(self) -> None:
        self.bonds.follow(self.capacities.of_interface)

    def _follow_interfaces(self) -> None:
        if self.links.refresh():
            self.balancer.rebuild(self.links.addresses)
        for address in self.links.drop_gone(lambda address: self.meter.read(address).counters.open > 0):
            self.health.forget(address)
            counters = self.meter.forget(address)
            for key in self._forgotten:
                self._forgotten[key] += getattr(counters, key)

    def sample_meter(self) -> None:
        """Sample the meter for its rates and history, and count what each
        capped link carried against its caps (the background task does
        every METER_INTERVAL). What bonds' subflows moved through an address
        that is a link too counts on its row, so that its rates and capacity
        are true (and once in the totals)."""
        self.bonds.count_on_rows(self.upstream.bond_counters.take_moved(), self.links.addresses, self.meter)
        self.steering.count(self.meter.sample())

    def _retest(self) -> None:
        """Start the retests that are due, each in a thread of its own."""
        for retest in self.health.due_retests():
            try:
                threading.Thread(
                    target=self._run_retest,
                    args=(retest,),
                    name=f"dispatch-retest-{retest.address.ip}",
                    daemon=True,
                ).start()
            except RuntimeError as error:  # no thread to be had now: the retest is due again later
                self.health.retest_result(retest.address, OSError(errno.EAGAIN, str(error)))

    def _run_retest(self, retest: Retest) -> None:
        address = retest.address
        try:
            error = self.upstream.probe(address, retest.target, min(retest.timeout, self.upstream.connect_timeout))
        except Exception as failure:  # a retest lost would keep the link out for good
            logger.exception("the retest of %s failed", address.describe())
            error = OSError(errno.EIO, f"the retest failed: {failure!r}")
        self.health.retest_result(address, error)

    def _check(self) -> None:
        """Check every address against the check targets, in a thread of its
        own; a round still under way is not doubled."""
        if self._checking.acquire(blocking=False):
            try:
                threading.Thread(target=self._check_round, name="dispatch-checks", daemon=True).start()
            except RuntimeError:
                self._checking.release()

    def _check_round(self) -> None:
        try:
            timeout = min(self.options.check_interval, self.upstream.connect_timeout)
            pairs = [
                (a, t)
                for a in self.links.addresses
                for t in self._check_targets
                if not _is_ip(t[0]) or _family_of(t[0]) in a.serves
            ]
            outcomes: dict[tuple[LocalAddress, Target], OSError | None] = {}

            def check(address: LocalAddress, target: Target) -> None:
                try:
                    outcomes[address, target] = self.upstream.probe(address, target, timeout)
                except Exception as failure:  # told, and counted as a failed check
                    logger.exception("the check of %s failed", address.describe())
                    outcomes[address, target] = OSError(errno.EIO, f"the check failed: {failure!r}")

            # Every probe at once: a round takes one timeout, however many targets.
            threads = [threading.Thread(target=check, args=pair, daemon=True) for pair in pairs]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + timeout + 1
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            results: dict[LocalAddress, OSError | None] = {}
            for address, target in pairs:
                error = outcomes.get((address, target), TimeoutError(errno.ETIMEDOUT, "no answer"))
                if error is None or results.get(address, error) is not None:
                    results[address] = error  # one target reached is a pass
            named = ", ".join(_format_endpoint(*target) for target in self._check_targets)
            self.health.check_round(results, named)
        finally:
            self._checking.release()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the proxy listens on."""
        return _split_host(self._server.server_address)

    @property
    def addresses(self) -> list[LocalAddress]:
        """The local addresses connections are dispatched to now."""
        return self.links.addresses

    @property
    def max_connections(self) -> int:
        """The most client connections open at once."""
        return self.admission.max_connections

    @property
    def refused(self) -> int:
        """How many clients were refused (allow-list, limit)."""
        return self.admission.refused

    @property
    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The networks clients may connect from."""
        return self.access.allowed_networks

    @property
    def requires_credentials(self) -> bool:
        """Whether clients must give a user name and password."""
        return self.access.requires_credentials

    def allows(self, host: str) -> bool:
        """Whether a client at IP address ``host`` may connect."""
        return self.access.allows(host)

    def check_credentials(self, user: str | bytes, password: str | bytes) -> bool:
        """Whether ``user`` and ``password`` are accepted (always, without credentials)."""
        return self.access.check_credentials(user, password)

    def open_connections(self) -> int:
        """How many client connections are open now."""
        return self.admission.open_connections()

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` is called (from any thread, a signal
        handler included); at once if it was called before (a signal came
        first). Raises RuntimeError if this Dispatcher serves already."""
        with self._life_lock:
            if self._life == "stopped":
                return
            if self._life != "new":
                raise RuntimeError("this Dispatcher serves already")
            self._life = "starting"
        self._serve()

    def _serve(self) -> None:
        """Start the background work and serve, unless shutdown() came first;
        under the lock, so that a shutdown() meanwhile stops all it started."""
        with self._life_lock:
            if self._life == "stopped":
                return
            self._life = "serving"
            self.capacities.load()
            self.capacities.measure()  # starts each link's clock, from its remembered figure
            self.bonds.start(self.capacities.of_interface)
            self.tasks.start()
            for server in self._transparent_servers:
                threading.Thread(target=server.serve_until_stopped, name="dispatch-transparent", daemon=True).start()
            if self._life == "stopped":  # by a handler in this thread, meanwhile: it stopped what had started
                self.tasks.stop()
                self.bonds.stop()
                return
        self._serving.set()
        try:
            self._server.serve_until_stopped()
        finally:
            self._serving.clear()

    def start(self) -> Dispatcher:
        """Serve in a background thread; return self once it serves.

        Raises what ended that thread if it ended before serving, and
        RuntimeError if it serves already or was shut down (each Dispatcher
        serves once)."""
        failures: list[Exception] = []

        def serve() -> None:
            try:
                self._serve()
            except Exception as failure:  # raised by start(), in the caller's thread
                failures.append(failure)

        with self._life_lock:
            if self._life == "stopped":
                raise RuntimeError("this Dispatcher was shut down: make a new one to serve again")
            if self._life != "new":
                raise RuntimeError("this Dispatcher serves already")
            self._life = "starting"
            thread = self._thread = threading.Thread(target=serve, name="dispatch-server", daemon=True)
            thread.start()
        while not self._serving.wait(START_POLL):
            if not thread.is_alive():
                thread.join()
                if failures:
                    raise failures[0]
                if self._life == "stopped":
                    raise RuntimeError("this Dispatcher was shut down before it served")
                raise RuntimeError("the server thread ended before serving")
        return self

    def shutdown(self, grace: float = 0.0, cut_short: threading.Event | None = None) -> None:
        """Stop accepting, give open connections up to ``grace`` seconds to
        finish (less if ``cut_short`` is set meanwhile), then close them.
        Safe to call more than once; ValueError for a ``grace`` that is not
        0 or more seconds, before anything stops."""
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MAX_DURATION:
            raise ValueError(f"grace must be 0 or more, at most {MAX_DURATION:g} seconds; got {grace!r}")
        with self._life_lock:
            self._life = "stopped"
            thread, self._thread = self._thread, None
        self._server.stop()
        # Not started yet (a handler in start()'s thread): it will find the stop and return.
        if thread is not None and thread is not threading.current_thread() and thread.ident is not None:
            thread.join()
        self._server.server_close()
        for server in self._transparent_servers:
            server.stop()
            server.server_close()
        rules, self._rules = self._rules, None
        if rules is not None:
            rules.drain()
        self.tasks.stop()
        self.capacities.save()
        deadline = time.monotonic() + grace
        while not self.admission.wait_until_none_open(min(GRACE_POLL, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or (cut_short is not None and cut_short.is_set()):
                break
        self.context.stopping.set()
        self.upstream.close_all()
        self.admission.close_all()
        # The sessions now see their sockets closed; let them log it.
        self.admission.wait_until_none_open(CLOSE_TIMEOUT)
        # What they carried since the last sample counts against the caps,
        # and is kept (the save above keeps what came before, should the
        # grace period be cut by a kill).
        self.sample_meter()
        self.capacities.save()
        if rules is not None:
            rules.remove()
        if self._transparent_servers:
            mark_sockets(None)
        self.bonds.stop()

    def stats(self) -> list[StatsRow]:
        """A StatsRow for each local address a link holds or held lately,
        and for each interface that has had no address yet. Reading changes
        nothing: every reader sees the same."""
        current = self.links.addresses
        primaries_up = {f for a in current if not a.backup and not self.health.is_out(a) for f in a.serves}
        rows: list[StatsRow] = []
        for address in self.links.known_addresses():
            reading = self.meter.read(address)
            state, reason = self.health.state(address) if address in current else ("gone", "address gone")
            if state == "up" and address.backup and address.serves & primaries_up:
                state, reason = "standby", "a primary link is up"
            link = self.links.link_of(address)
            capacity, source, measured_at = self.capacity.source(address)
            dns = self.resolver.counts(address)
            row = stats_row(
                link.name if link else address.ip,
                ip=address.ip,
                interface=address.interface,
                weight=self.steering.weight_of(address),
                tier=link.tier if link else "primary",
                state=state,
                reason=reason,
                **dataclasses.asdict(reading.counters),
                rate_up=reading.rate_up,
                rate_down=reading.rate_down,
                capacity=capacity,
                capacity_source=source or "not measured",
                capacity_age=None if measured_at is None else max(0.0, self.meter.clock() - measured_at),
                dns_queries=dns.queries,
                dns_cache_hits=dns.cache_hits,
                dns_failures=dns.failures,
            )
            rows.append(row)
        for link in self.links.links:
            if not link.known:
                rows.append(
                    stats_row(link.name, weight=link.weight, tier=link.tier, state="waiting", reason="no address yet")
                )
        return rows

    def status(self) -> Status:
        """Everything a status page shows: version, uptime, where it listens,
        open and refused clients, totals (with what addresses forgotten once
        gone carried), ``stats()`` as "addresses", and the
        rates of each address over the last ten minutes as "history"."""
        rows, forgotten = self.stats(), self._forgotten
        twice, twice_rates = self.bonds.counted_twice, self.bonds.twice_rates
        totals: Totals = {
            "connections": sum(row["connections"] for row in rows) + forgotten["connections"],
            "failed": sum(row["failed"] for row in rows) + forgotten["failed"],
            "bytes_up": sum(row["bytes_up"] for row in rows) + forgotten["bytes_up"] - twice[0],
            "bytes_down": sum(row["bytes_down"] for row in rows) + forgotten["bytes_down"] - twice[1],
            "rate_up": max(0.0, sum((row["rate_up"] for row in rows), 0.0) - twice_rates[0]),
            "rate_down": max(0.0, sum((row["rate_down"] for row in rows), 0.0) - twice_rates[1]),
        }
        history: dict[str, AddressHistory] = {}
        for address in self.links.known_addresses():
            up, down = self.meter.history(address)
            history[address.ip] = {"rate_up": up, "rate_down": down}
        return {
            "version": __version__,
            "uptime": time.monotonic() - self._started,
            "listening": _format_endpoint(*self.address),
            "balance": "measured" if self.balancer.balance is Balance.MEASURED else "round-robin",
            "open_connections": self.open_connections(),
            "refused": self.refused,
            "totals": totals,
            "addresses": rows,
            "history": {"interval": METER_INTERVAL, "addresses": history},
            "bonds": self.bonds.status(*self.upstream.bond_counters.snapshot()),
            "caps": self.steering.cap_reports(rows),
            "links": self.steering.reports(),
            "system_proxy": self.system_proxy.describe if self.system_proxy else "not set",
        }

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------
# Service units: systemd, launchd, Task Scheduler
# ---------------------------------------------------------------------------

SERVICE_SYSTEMS = ("systemd", "launchd", "windows")
DESCRIPTION = "dispatch: a SOCKS proxy that balances connections across network links"
SERVICE_LOG_FILE = "/var/log/dispatch/dispatch.log"
SERVICE_STATE_FILE = "/var/lib/dispatch/state.json"  # systemd's StateDirectory=dispatch
LAUNCHD_LABEL = "org.dispatch.proxy"
TASK_NAME = "dispatch"


def service_unit(
    system: str,
    start_args: Sequence[str],
    executable: Sequence[str],
    *,
    user: str | None = None,
    home: str | None = None,
) -> str:
    """The text of a service definition that runs ``dispatch start ARGS``.

    ``system`` is "systemd" (a unit file), "launchd" (a LaunchAgent plist) or
    "windows" (Task Scheduler XML, for ``schtasks /Create /XML``).
    ``executable`` is the command that runs dispatch: ["/usr/local/bin/
    dispatch"] or [sys.executable, "/path/dispatch.py"]. ``user``: systemd
    runs as this account (default: a dynamic user); Windows starts at this
    user's logon (default: any user's). ``home``: where launchd logs go
    (default: this user's home). Raises ValueError for what the system could
    not carry.
    """
    if system not in SERVICE_SYSTEMS:
        choices = ", ".join(SERVICE_SYSTEMS)
        raise ValueError(f"{system!r}: not a service system; choose one of {choices}")
    if not executable:
        raise ValueError("no command to run dispatch with")
    if system != "systemd" and _carries_option(start_args, "--transparent"):
        raise ValueError(transparent_refusal(False, "darwin" if system == "launchd" else "win32") or "")
    for argument in (*executable, *start_args, user or "", home or ""):
        if not argument.isprintable():
            raise ValueError(f"{argument!r}: a control character cannot go into a service definition")
        if hide_password(argument) != argument:
            raise ValueError(
                f"{hide_password(argument)!r}: a password would be readable in the service definition;"
                " give the user alone (socks5://USER@HOST:PORT) and its password in --upstream-auth-file"
            )
    if _carries_option(start_args, "--auth"):
        raise ValueError(
            "--auth: a password would be readable in the service definition; give the users and their"
            " passwords in --auth-file"
        )
    if system == "systemd" and _carries_option(start_args, "--system-proxy"):
        raise ValueError(
            "--system-proxy: a system service runs in no user's desktop session, whose proxy settings it "
            "would set; run 'dispatch start --system-proxy' in the session (launchd and windows units may carry it)"
        )
    if system == "windows":
        _validate_task_arguments(start_args, executable)
    if system == "systemd":
        return _systemd_unit(start_args, executable, user)
    if system == "launchd":
        return _launchd_plist(start_args, executable, home)
    return _task_xml(start_args, executable, user)


# systemd ----------------------------------------------------------------------

# Characters that make systemd split, unquote or unescape a word.
_SYSTEMD_SPECIAL = frozenset(" \t\"'\\;")
# systemd refuses an executable path holding these, quoted or not.
_SYSTEMD_EXECUTABLE_REFUSES = frozenset("\"'\\")
# Where home directories live; ProtectHome=yes hides them from the service.
_HOME_ROOTS = ("/home/", "/root/", "/run/user/")


def _systemd_word(argument: str, *, executable: bool = False) -> str:
    """One ExecStart word that systemd reads back as ``argument``.

    Specifiers apply to every word (% is written %%); environment variables
    are expanded in arguments only ($ is written $$), not in the executable.
    """
    text = argument.replace("%", "%%")
    if not executable:
        text = text.replace("$", "$$")
    if text and not _SYSTEMD_SPECIAL.intersection(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _carries_option(arguments: Sequence[str], option: str) -> bool:
    """Whether argparse would read ``option`` among ``arguments``.

    argparse takes "--option=VALUE" and unambiguous abbreviations ("--log").
    """
    for argument in arguments:
        if argument == "--":
            return False
        name = argument.partition("=")[0]
        if name.startswith("--") and len(name) > len("--") and option.startswith(name):
            return True
    return False


def _systemd_unit(start_args: Sequence[str], executable: Sequence[str], user: str | None) -> str:
    program = executable[0]
    if not os.path.isabs(program) or _SYSTEMD_EXECUTABLE_REFUSES.intersection(program):
        raise ValueError(f"{program!r}: systemd needs an absolute path to the program, without quotes or backslashes")
    command = [*executable, "start"]
    # A dynamic user has no home: the default log and state file would be
    # under /, which ProtectSystem=strict keeps read-only.
    if not _carries_option(start_args, "--log-file"):
        command += ["--log-file", SERVICE_LOG_FILE]
    if not _carries_option(start_args, "--state-file") and not _carries_option(start_args, "--no-state"):
        command += ["--state-file", SERVICE_STATE_FILE]
    command += start_args
    words = [_systemd_word(program, executable=True)]
    words += [_systemd_word(argument) for argument in command[1:]]
    account = f"User={user}" if user else "DynamicUser=yes"
    capabilities = "CAP_NET_RAW CAP_NET_BIND_SERVICE"
    why = "# CAP_NET_RAW: SO_BINDTODEVICE, which makes each connection leave by the link\n"
    why += "# it was given; CAP_NET_BIND_SERVICE: listening on a port below 1024."
    if any(argument.lower().startswith(BOND_PREFIX) for argument in start_args):
        capabilities += " CAP_NET_ADMIN"
        why += "\n# CAP_NET_ADMIN: the MPTCP endpoints the bonds' subflows leave by (ip mptcp)."
    if _carries_option(start_args, "--transparent"):
        if "CAP_NET_ADMIN" not in capabilities:
            capabilities += " CAP_NET_ADMIN"
        why += "\n# CAP_NET_ADMIN (--transparent): the firewall rules, marks, TPROXY sockets."
    before = ""
    if _carries_option(start_args, "--mptcp"):
        before = "# The far end of bonds: the kernel takes 2 more subflows per connection\n"
        before += '# unless told more (ip mptcp limits); "+" runs it as root, before the drop.\n'
        before += f"ExecStartPre=+ip mptcp limits set subflows {MPTCP_MAX_SUBFLOWS}\n"
    protect_home = "ProtectHome=yes"
    if any(path.startswith(_HOME_ROOTS) for path in executable):
        protect_home = "# The program lives under a home directory: it is left readable.\nProtectHome=read-only"
    return f"""\
# dispatch as a system service: /etc/systemd/system/dispatch.service
[Unit]
Description={DESCRIPTION}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={" ".join(words)}
{before}Restart=on-failure
RestartSec=2
{account}
{why}
AmbientCapabilities={capabilities}
CapabilityBoundingSet={capabilities}
NoNewPrivileges=yes
ProtectSystem=strict
{protect_home}
PrivateTmp=yes
StateDirectory=dispatch
LogsDirectory=dispatch
# AF_NETLINK: ifaddr lists the interfaces with getifaddrs(), which asks the
# kernel over a netlink socket.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
# Each relayed connection holds two descriptors.
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""


# launchd ----------------------------------------------------------------------


def _launchd_plist(start_args: Sequence[str], executable: Sequence[str], home: str | None) -> str:
    import plistlib

    # launchd expands no "~": the log paths must be absolute.
    logs = os.path.join(home or os.path.expanduser("~"), "Library", "Logs", "dispatch")
    job = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [*executable, "start", *start_args],
        "RunAtLoad": True,
        # Started again after a crash, not after a clean stop (launchctl).
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": os.path.join(logs, "stdout.log"),
        "StandardErrorPath": os.path.join(logs, "stderr.log"),
    }
    return plistlib.dumps(job).decode("utf-8")


# the Windows Task Scheduler ---------------------------------------------------

_TASK_NAMESPACE = "http://schemas.microsoft.com/windows/2004/02/mit/task"
_BUILTIN_USERS = "S-1-5-32-545"  # the well-known SID of BUILTIN\Users

# Task Scheduler restarts a task only when it fails to start, not when the
# program exits (MS-TSCH 2.5.4.2), so the logon trigger also repeats every
# minute; with MultipleInstancesPolicy IgnoreNew a repeat while dispatch
# runs does nothing, and one after it ended starts it again.
_TASK_SETTINGS = (
    ("MultipleInstancesPolicy", "IgnoreNew"),
    ("DisallowStartIfOnBatteries", "false"),
    ("StopIfGoingOnBatteries", "false"),
    ("Enabled", "true"),
    ("ExecutionTimeLimit", "PT0S"),  # no limit; the default stops it after 72 h
    ("Priority", "5"),  # the normal priority class; the default 7 is below normal
)
_TASK_REPEAT_EVERY = "PT1M"  # the shortest repetition and restart interval
_TASK_RESTART_COUNT = "255"  # the most the schema allows


def _windows_quote(argument: str, *, force: bool = False) -> str:
    """``argument`` as the C runtime and CommandLineToArgvW read it back."""
    if argument and not force and not any(c in argument for c in ' \t"'):
        return argument
    quoted, backslashes = ['"'], 0
    for character in argument:
        if character == "\\":
            backslashes += 1
            continue
        # Backslashes count only before a quote: double them there.
        quoted.append("\\" * (backslashes * 2 + 1 if character == '"' else backslashes))
        quoted.append(character)
        backslashes = 0
    quoted.append("\\" * (backslashes * 2) + '"')
    return "".join(quoted)


def _windows_command_line(arguments: Sequence[str]) -> str:
    return " ".join(_windows_quote(argument) for argument in arguments)


def _validate_task_arguments(start_args: Sequence[str], executable: Sequence[str]) -> None:
    """Raise ValueError for a '%' that Task Scheduler would read as part of
    a variable (%NAME%, expanded when the task starts, with no escape).
    The argument is not shown: it may hold a password."""
    if any("%" in part for part in executable):
        raise ValueError("the program's path holds '%', which Task Scheduler expands; move dispatch elsewhere")
    for number, argument in enumerate(start_args, 1):
        if "%" in argument:
            raise ValueError(
                f"start argument {number} holds '%', which Task Scheduler expands (%NAME%) when the task "
                "starts: give a password holding '%' with --auth-file, and paths without '%'"
            )


def _task_xml(start_args: Sequence[str], executable: Sequence[str], user: str | None) -> str:
    from xml.etree import ElementTree

    def _element(parent: ElementTree.Element, tag: str, text: str | None = None) -> ElementTree.Element:
        child = ElementTree.SubElement(parent, tag)
        child.text = text
        return child

    # The namespace is written as a plain attribute so that ElementTree adds
    # no prefix and no process-wide namespace registration is needed.
    task = ElementTree.Element("Task", {"version": "1.2", "xmlns": _TASK_NAMESPACE})
    task.append(
        ElementTree.Comment(
            f" Register: schtasks /Create /TN {TASK_NAME} /XML dispatch.xml /F "
            f" Stop: schtasks /End /TN {TASK_NAME} (it starts again within a minute"
            f" unless also disabled: schtasks /Change /TN {TASK_NAME} /DISABLE) "
        )
    )
    info = _element(task, "RegistrationInfo")
    _element(info, "Description", DESCRIPTION)
    trigger = _element(_element(task, "Triggers"), "LogonTrigger")
    _element(trigger, "Enabled", "true")
    repetition = _element(trigger, "Repetition")
    _element(repetition, "Interval", _TASK_REPEAT_EVERY)
    _element(repetition, "StopAtDurationEnd", "false")
    principal = _element(_element(task, "Principals"), "Principal")
    principal.set("id", "Author")
    if user:
        _element(trigger, "UserId", user)
        _element(principal, "UserId", user)
        _element(principal, "LogonType", "InteractiveToken")
    else:
        # Each user who logs on runs it in their own session.
        _element(principal, "GroupId", _BUILTIN_USERS)
    _element(principal, "RunLevel", "LeastPrivilege")
    settings = _element(task, "Settings")
    for tag, value in _TASK_SETTINGS:
        _element(settings, tag, value)
    restart = _element(settings, "RestartOnFailure")
    _element(restart, "Interval", _TASK_REPEAT_EVERY)
    _element(restart, "Count", _TASK_RESTART_COUNT)
    actions = _element(task, "Actions")
    actions.set("Context", "Author")
    run = _element(actions, "Exec")
    _element(run, "Command", executable[0])
    arguments = [*executable[1:], "start", *start_args]
    _element(run, "Arguments", _windows_command_line(arguments))
    ElementTree.indent(task)
    text = ElementTree.tostring(task, encoding="unicode")
    # ASCII only, other characters as references, and no XML declaration:
    # the file then reads the same whether the shell that redirected the
    # output wrote it as UTF-8, UTF-16 (PowerShell 5) or the ANSI code page.
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii") + "\n"


# ---------------------------------------------------------------------------
# Reports: tables of the links and their traffic
# ---------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[str]], right_aligned: Collection[int] = (), indent: str = "") -> str:
    """Rows of cells (the first a header) as aligned columns, two spaces
    apart; the columns numbered in ``right_aligned`` line up on the right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        indent
        + "  ".join(
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    )


# NetworkManager's GENERAL.METERED (in the C locale), as ``dispatch list`` says it.
_METERED = {
    "yes": "yes",
    "no": "no",
    "yes (guessed)": "guessed yes",
    "no (guessed)": "guessed no",
    "unknown": "unknown",
}
# Windows' cost of a connection (NetworkCostType, from its network list manager), said so.
_WINDOWS_COSTS = {"Unrestricted": "no", "Fixed": "yes", "Variable": "yes", "Unknown": "unknown"}
# Each connection profile's adapter GUID and cost, asked of Windows PowerShell
# (its WinRT types give the network list manager's costs without a COM binding).
WINDOWS_COSTS_SCRIPT = (
    "[void][Windows.Networking.Connectivity.NetworkInformation,Windows.Networking.Connectivity,"
    "ContentType=WindowsRuntime]; foreach ($p in [Windows.Networking.Connectivity.NetworkInformation]"
    "::GetConnectionProfiles()) { if ($p.NetworkAdapter) { '{0} {1}' -f "
    "$p.NetworkAdapter.NetworkAdapterId, $p.GetConnectionCost().NetworkCostType } }"
)
METERED_TIMEOUT = 10.0  # seconds nmcli or PowerShell may take to answer


def _run_for_output(command: Sequence[str]) -> str | None:
    """What ``command`` prints, in the C locale; None if it fails (or is not there)."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=METERED_TIMEOUT, env={**os.environ, "LC_ALL": "C"}
        )
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None
    return done.stdout if done.returncode == 0 else None


def metered(interfaces: Sequence[Interface]) -> dict[str, str]:
    """Whether the network of each of ``interfaces`` (by name) costs by the
    byte, as the system says: on Linux, NetworkManager's "yes", "no",
    "guessed yes", "guessed no" or "unknown"; on Windows, the connection's
    cost ("yes" for a fixed or variable one, "no", "unknown"); "?" where it
    cannot be told (no NetworkManager, no connection profile, another system)."""
    said = dict.fromkeys((interface.name for interface in interfaces), "?")
    if sys.platform.startswith("linux"):
        for name in said:
            output = _run_for_output(["nmcli", "-g", "GENERAL.METERED", "device", "show", name])
            said[name] = "?" if output is None else _METERED.get(output.strip(), "?")
    elif sys.platform == "win32":
        output = _run_for_output(["powershell", "-NoProfile", "-NonInteractive", "-Command", WINDOWS_COSTS_SCRIPT])
        costs = dict(line.split(None, 1) for line in (output or "").splitlines() if len(line.split()) == 2)
        costs = {guid.upper(): cost.strip() for guid, cost in costs.items()}
        for interface in interfaces:
            for alias in interface.aliases:
                if alias.upper() in costs:
                    said[interface.name] = _WINDOWS_COSTS.get(costs[alias.upper()], "?")
    return said


def metered_without_cap(links: Sequence[Link], capped: Collection[str]) -> list[str]:
    """A line for each metered interface among the primary ``links`` with
    no data cap (none of the links named in ``capped``), suggesting one."""
    asked = {link.name for link in links if link.is_interface and not link.backup and link.name not in capped}
    said = metered([interface for interface in _interfaces() if interface.name in asked]) if asked else {}
    return [
        f"link {name} is metered (the system says {costs}): a data cap (--cap {name}=SIZE/month) "
        f"or {name}@backup keeps it from carrying more than it should"
        for name, costs in said.items()
        if costs in ("yes", "guessed yes")
    ]


def _list_interfaces(out: TextIO) -> int:
    defaults = _default_route_interfaces()
    rows = [("INTERFACE", "ADDRESS", "USABLE", "DEFAULT ROUTE", "METERED")]
    interfaces = _interfaces()
    said = metered(interfaces)
    for interface in interfaces:
        up = _is_up(interface.name)
        route = "?" if defaults is None else ("yes" if interface.name in defaults else "")
        costs = said[interface.name]
        if not interface.ips:
            rows.append((interface.name, "-", "no address" if up else "no address (down)", route, costs))
        for ip in interface.ips:
            usable = up and _is_usable_address(ipaddress.ip_address(ip))
            reason = "yes" if usable else ("no (down)" if not up else _why_unusable(ip))
            rows.append((interface.name, ip, reason, route, costs))
    print(format_table(rows), file=out)
    return 0


def _why_unusable(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if address.is_loopback:
        return "no (loopback)"
    if address.is_link_local:
        return "no (link-local)"
    return "no"


def _address_table(links: Sequence[Link]) -> str:
    rows = [("ADDRESS", "INTERFACE", "WEIGHT", "TIER")]
    for link in links:
        weight = str(link.weight) if not link.backup else "-"
        for address in link.current:
            rows.append((address.ip, address.interface or "-", weight, link.tier))
        if not link.current:
            rows.append(("(waiting for an address)", link.name, weight, link.tier))
    return format_table(rows, indent="  ")


def format_stats(rows: Sequence[StatsRow]) -> str:
    """The rows of ``Dispatcher.stats()`` as a table, one line per local address."""
    header = (
        "ADDRESS",
        "INTERFACE",
        "WEIGHT",
        "STATE",
        "OPEN",
        "TOTAL",
        "DOWN",
        "UP",
        "RATE DOWN",
        "RATE UP",
        "CAPACITY",
        "FROM",
    )
    table = [header] + [
        (
            row["ip"] or "-",
            row["interface"] or "-",
            str(row["weight"]),
            row["state"],
            str(row["open"]),
            str(row["connections"]),
            format_bytes(row["bytes_down"]),
            format_bytes(row["bytes_up"]),
            format_rate(row["rate_down"]),
            format_rate(row["rate_up"]),
            "-" if row["capacity"] is None else format_rate(row["capacity"]),
            describe_capacity_source(row),
        )
        for row in rows
    ]
    return format_table(table, right_aligned=range(4, len(header) - 1))


# ---------------------------------------------------------------------------
# Control client: dispatch link, a change asked of a running dispatch
# ---------------------------------------------------------------------------


class ControlClientError(Exception):
    """A change a running dispatch did not make, or could not be asked: why, in a line."""


def steer_link(
    address: tuple[str, int],
    name: str,
    request: Mapping[str, object],
    login: tuple[str, str] | None = None,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> str:
    """Ask the dispatch listening at ``address`` to make the change
    ``request`` (the control API's body, {"action": ...}) of its link
    ``name``, logged in as ``login`` (user, password); return what it says
    changed. Raises ControlClientError: nothing listens there, the link
    or the change is refused."""
    host, port = address
    body = json.dumps(dict(request)).encode()
    head = [("Host", _format_endpoint(host, port)), ("Content-Type", "application/json")]
    head += [("Content-Length", str(len(body))), ("Connection", "close")]
    if login is not None:
        token = base64.b64encode(b":".join(_encode_credential(*login))).decode()
        head.append(("Authorization", f"Basic {token}"))
    path = f"{CONTROL_PATH}/{urllib.parse.quote(name, safe='')}"
    where = _format_endpoint(host, port)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(encode_head(f"POST {path} HTTP/1.1", head) + body)
            answer = b""
            while len(answer) <= LOCAL_PAGE_BODY_LIMIT and (data := sock.recv(65536)):
                answer += data
    except OSError as error:
        raise ControlClientError(f"no dispatch answers at {where}: {_describe(error)}") from None
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    try:
        code = int(status_line.split()[1])
        said = json.loads(payload.decode("utf-8"))
    except (IndexError, ValueError):
        raise ControlClientError(f"what answers at {where} is no dispatch ({status_line[:60]!r})") from None
    text = said.get("changed" if code == HTTPStatus.OK else "error") if isinstance(said, dict) else None
    if not isinstance(text, str):
        raise ControlClientError(f"what answers at {where} is no dispatch (HTTP {code})")
    if code != HTTPStatus.OK:
        raise ControlClientError(f"refused ({code}): {text}")
    return text


# ---------------------------------------------------------------------------
# Arguments: the command line's values, each parsed and validated
# ---------------------------------------------------------------------------


def _port(text: str) -> int:
    if not _is_number(text) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def _listen_address(text: str) -> str:
    """An address to listen on, as --ip takes it (listen_address_problem)."""
    problem = listen_address_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


DAY = 24 * 3600.0
# The range of each duration option, in seconds; those starting at 0 take 0
# for "off". Every wait stays within what poll() and socket timeouts take
# (milliseconds in a C int: about 24 days), and nothing in the background
# runs so often that it keeps a CPU busy while the proxy is idle.
DURATION_RANGES: dict[str, tuple[float, float]] = {
    "--connect-timeout": (0.1, 600.0),
    "--handshake-timeout": (0.1, 3600.0),
    "--idle-timeout": (1.0, 7 * DAY),
    "--grace": (0.0, 3600.0),
    "--cooldown": (1.0, DAY),
    "--sticky": (0.0, 7 * DAY),
    "--check-interval": (1.0, DAY),
    "--hedge": (0.0, 600.0),
    "--stats": (0.1, DAY),
}


def _duration(option: str) -> Callable[[str], float]:
    """The argument type of a duration option: seconds within DURATION_RANGES[option]."""
    low, high = DURATION_RANGES[option]

    def seconds(text: str) -> float:
        value = _number(text)
        if low == 0 and not 0 <= value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
        if low > 0 and not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
        if not low <= value <= high:
            span = f"from {low:g} to {high:g}" if low else f"up to {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {span} seconds")
        return value

    return seconds


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive(text: str) -> int:
    if not _is_number(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _user_password(text: str) -> tuple[str, str]:
    try:
        return parse_credentials(text)
    except ValueError as error:
        # The text is not repeated: it may hold a password.
        raise argparse.ArgumentTypeError(str(error)) from None


def _validated_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the text as given once ``parse`` takes
    it, and says ``parse``'s ValueError as the argument's error."""

    def validated(text: str) -> str:
        try:
            parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return validated


_dns_server = _validated_by(lambda text: parse_dns_option([text]))
_cap = _validated_by(parse_cap)
_health_check_target = _validated_by(parse_check_target)


def _page_host(text: str) -> str:
    try:
        return page_host(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP network or address") from None


def _mark(text: str) -> int:
    try:
        mark = int(text, 0)
    except ValueError:
        mark = 0
    if not 0 < mark < 2**32 - 1:  # the next number marks UDP handed over
        raise argparse.ArgumentTypeError(f"{text!r} is not a firewall mark (1 to 0xfffffffe)")
    return mark


# ---------------------------------------------------------------------------
# Command line: dispatch list|start|rules|service|system-proxy|link; main()
# ---------------------------------------------------------------------------


def _setup_logging(debug: bool, log_file: str | None) -> str:
    """Send logs to stdout (with -d and no file, or ``--log-file -``) or a
    file; return where they go."""
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    # A record need not carry what no line of this format shows: finding the
    # caller's file and line alone took a tenth of a short connection's time.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    formatter = LogLineFormatter()
    if log_file == "-" or (debug and not log_file):
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        where = "stdout"
    else:
        where = log_file or default_log_path()
        directory = os.path.dirname(os.path.abspath(where))
        if not log_file:
            os.makedirs(directory, exist_ok=True)
        elif not os.path.isdir(directory):
            # A mistyped path makes no directories: it is told, at once.
            raise FileNotFoundError(errno.ENOENT, f"no directory {directory}")
        handler = AppendingFileHandler(where)
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    return where


def _summary(dispatcher: Dispatcher, seconds: float) -> str:
    stats = dispatcher.stats()
    totals = dispatcher.status()["totals"]  # the addresses forgotten once gone too
    connections, up, down = totals["connections"], totals["bytes_up"], totals["bytes_down"]
    refused = f", {dispatcher.refused} refused" if dispatcher.refused else ""
    lines = [
        f"dispatch: stopped after {format_duration(seconds)}: {plural(connections, 'connection')}, "
        f"{format_bytes(up)} up, {format_bytes(down)} down{refused}"
    ]
    for row in stats:
        capacity = "not measured"
        if row["capacity"] is not None:
            capacity = f"capacity {format_rate(row['capacity'])} ({describe_capacity_source(row)})"
        lines.append(
            f"  {row['ip'] or row['link']} ({row['interface'] or '-'}): {plural(row['connections'], 'connection')}, "
            f"{row['open']} open, {format_bytes(row['bytes_down'])} down, {capacity}"
        )
    return "\n".join(lines)


def _shown(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a
    value echoed in a message cannot break its line or drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(message: str, status: int = 2) -> int:
    """Print ``dispatch: error: MESSAGE`` as one line on stderr; return
    ``status``, the exit status (2, a usage error, unless told)."""
    print(f"dispatch: error: {_shown(message)}", file=sys.stderr)
    return status


def _credentials(args: argparse.Namespace) -> dict[str, str]:
    """The users of --auth and --auth-file; raises ValueError."""
    pairs = list(args.auth or [])
    if args.auth_file is not None:
        pairs += read_auth_file(args.auth_file)
    users: dict[str, str] = {}
    for user, password in pairs:
        if user in users:
            raise ValueError(f"user {user!r} is given more than once")
        users[user] = password
    return users


def _validate_start_arguments(args: argparse.Namespace) -> dict[str, str]:
    """Validate what ``start`` can of its arguments without this
    machine's interfaces (``dispatch service`` validates them too): the form
    of every ADDRESS, IP addresses that no link could use, the --dns
    servers together, and the logins. Returns the users; raises
    AddressError or ValueError."""
    for text in args.addresses:
        spec = parse_address(text)
        if _is_ip(spec.address):
            _validate_link_address(spec.address)
        if spec.proxy is not None:
            _validate_proxy_link(spec.proxy, args.upstream_auth_file)
    parse_dns_option(args.dns)  # each --dns alone was read already: "system" beside a server is not
    if args.transparent is None and (args.lan or args.local or args.apply_rules):
        raise ValueError("--lan, --local and --apply-rules are for transparent mode: give --transparent PORT")
    if args.apply_rules and not (args.lan or args.local):
        raise ValueError("--apply-rules needs something to redirect: --lan IFACE (repeatable), --local, or both")
    return _credentials(args)


def _validate_proxy_link(proxy: ProxyURL, password_file: str | None) -> None:
    """Validate what can be validated of an upstream proxy's ADDRESS anywhere:
    the link it is reached by (as any link's address), that link's family
    against the proxy's address, and that a user without a password has a
    file to find it in. Raises AddressError."""
    if proxy.via is not None and _is_ip(proxy.via):
        _validate_link_address(proxy.via)
        if _is_ip(proxy.host) and _family_of(proxy.via) != _family_of(proxy.host):
            raise AddressError(
                f"{proxy.name!r}: {proxy.host} cannot be reached from {proxy.via}, an address of the other "
                "IP version; give a link of its version, or an interface name"
            )
    if proxy.wants_password and not password_file:
        raise _no_password(proxy)


def _upstream_passwords(args: argparse.Namespace) -> dict[str, str]:
    """The passwords of --upstream-auth-file, by user; raises ValueError."""
    passwords: dict[str, str] = {}
    for user, password in read_auth_file(args.upstream_auth_file) if args.upstream_auth_file else []:
        if user in passwords:
            raise ValueError(f"user {user!r} is given more than once in {args.upstream_auth_file}")
        passwords[user] = password
    return passwords


def _print_stats(dispatcher: Dispatcher, started: float, title: str = "after") -> None:
    print(f"{title} {time.monotonic() - started:.0f} s:")
    print(format_stats(dispatcher.stats()), flush=True)
    for cap in dispatcher.status()["caps"]:
        share = cap["used_bytes"] * 100 // cap["cap_bytes"]
        standing = f", {cap_standing(cap)}" if cap_standing(cap) else ""
        print(f"cap {cap['cap']}: {format_bytes(cap['used_bytes'])} used ({share} %{standing})", flush=True)
    if dispatcher.system_proxy is not None:
        print(f"system proxy: {dispatcher.system_proxy.describe}", flush=True)


def _start(args: argparse.Namespace) -> int:
    descriptor_limit = raise_descriptor_limit()
    cpus = run_on_one_cpu()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # main() may be called by a program that goes on: it gets both back.
    try:
        return _serve(args, descriptor_limit)
    finally:
        sys.setswitchinterval(switch_interval)
        if cpus is not None and sys.platform == "linux":
            os.sched_setaffinity(0, cpus)


class _HeldRecords(logging.Handler):
    """Warnings logged before the log is set up (while the Dispatcher is
    built, say that dnspython is missing): held for the banner, which
    prints and logs them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Log the records held after all (once this handler is off the
        logger): where start stops before its banner, to the log or,
        without one yet, the terminal."""
        for record in self.records:
            logger.handle(record)


def _serve(args: argparse.Namespace, descriptor_limit: int | None) -> int:
    """Start the proxy as the command line says, serve until a signal, stop."""
    held = _HeldRecords()
    logger.addHandler(held)
    try:
        dispatcher = _build_dispatcher(args)
    except _StartError as refusal:
        logger.removeHandler(held)
        held.replay()
        return _error(str(refusal))
    finally:
        logger.removeHandler(held)
    try:
        where = _setup_logging(args.debug, args.log_file)
    except OSError as error:
        dispatcher.shutdown()
        held.replay()
        return _error(f"cannot write the log: {_describe(error)}")
    warnings = [f"{record.levelname.lower()}: {record.getMessage()}" for record in held.records]
    directory = os.path.dirname(os.path.abspath(args.state_file or default_state_path()))
    try:
        system_proxy, told = take_system_proxy(directory, args.system_proxy, *dispatcher.address)
    except SystemProxyError as error:
        dispatcher.shutdown()
        held.replay()
        logger.error("system proxy: %s", error)
        return _error(f"system proxy: {error}")
    dispatcher.system_proxy = system_proxy
    banner = _banner(dispatcher, args, descriptor_limit) + warnings + told
    if system_proxy is None:
        return _serve_until_signalled(dispatcher, args, banner, where)
    return _serve_until_signalled(dispatcher, args, banner, where, functools.partial(put_back_at_stop, system_proxy))


def _system_proxy_command(args: argparse.Namespace) -> int:
    """``dispatch system-proxy --show|--restore``."""
    directory = os.path.dirname(os.path.abspath(args.state_file or default_state_path()))
    try:
        print("\n".join(restore_by_hand(directory) if args.restore else show_system_proxy(directory)))
    except SystemProxyError as error:
        return _error(str(error))
    return 0


def _link_command(args: argparse.Namespace) -> int:
    """``dispatch link NAME ACTION``: 0 and what changed, or 1 and why not."""
    request: dict[str, object] = {"action": args.action}
    if (args.action == "weight") != (args.value is not None) or (args.site is not None and args.action != "close"):
        return _error("weight takes a number (dispatch link usb0 weight 3), and only close takes --site")
    if args.value is not None:
        request["weight"] = args.value
    if args.site is not None:
        request["site"] = args.site
    try:
        login = read_auth_file(args.auth_file)[0] if args.auth_file else None
        if login is None and os.environ.get("DISPATCH_AUTH"):
            login = parse_credentials(os.environ["DISPATCH_AUTH"])
    except ValueError as error:
        return _error(f"the login: {error}")
    try:
        print(steer_link((args.ip, args.port), args.name, request, login))
    except ControlClientError as error:
        print(f"dispatch link: {error}", file=sys.stderr)
        return 1
    return 0


class _StartError(Exception):
    """What keeps ``start`` from starting, as the one line it prints."""


# ``start``'s arguments are the Dispatcher's options (DispatcherOptions), by
# the same name but for these;
_OPTION_OF_ARGUMENT = {
    "ip": "host",
    "allow_target": "allow_targets",
    "page_host": "page_hosts",
    "check": "checks",
    "cap": "caps",
}
# these are read into an option: logins from their files, --no-state;
_READ_INTO_OPTIONS = {
    "auth": "credentials",
    "auth_file": "credentials",
    "upstream_auth_file": "upstream_passwords",
    "no_state": "state_file",
}
# and these are the command line's own, with why.
_COMMAND_LINE_ONLY = {
    "command": "which command runs",
    "debug": "a library's caller sets up logging (the dispatch logger)",
    "log_file": "a library's caller sets up logging (the dispatch logger)",
    "stats": "printed by the command line: format_stats(Dispatcher.stats())",
    "grace": "the argument of Dispatcher.shutdown()",
    "system_proxy": "the desktop's settings are the command line's to change (take_system_proxy)",
}


def _start_options(args: argparse.Namespace) -> DispatcherOptions:
    """The Dispatcher's options as ``start``'s arguments give them; raises
    AddressError or ValueError."""
    users = _validate_start_arguments(args)
    given = {
        _OPTION_OF_ARGUMENT.get(dest, dest): value
        for dest, value in vars(args).items()
        if dest not in _COMMAND_LINE_ONLY and dest not in _READ_INTO_OPTIONS
    }
    given.update(
        page_hosts=args.page_host or (),
        sticky=args.sticky or None,  # 0: off
        credentials=users,
        upstream_passwords=_upstream_passwords(args),
        state_file=None if args.no_state else args.state_file or default_state_path(),
    )
    return DispatcherOptions(**given)


def _build_dispatcher(args: argparse.Namespace) -> Dispatcher:
    """The Dispatcher ``start``'s arguments ask for, listening; raises
    _StartError saying why there is none."""
    try:
        return Dispatcher(options=_start_options(args))
    except (AddressError, ValueError) as error:
        raise _StartError(str(error)) from None
    except OSError as error:
        where = _format_endpoint(args.ip, args.port)
        why = _describe(error)
        if error.errno in _errnos("EADDRINUSE", "WSAEADDRINUSE"):
            why = f"port {args.port} is in use (by another dispatch, or another program)"
        raise _StartError(f"cannot listen on {where}: {why}") from None


def _banner(dispatcher: Dispatcher, args: argparse.Namespace, descriptor_limit: int | None) -> list[str]:
    """What ``start`` prints, and logs, as it starts: where it listens, the
    links, who may connect, the limits, the pages; a warning where anyone on
    the private networks may use the proxy."""
    host, port = dispatcher.address
    users = dispatcher.access.users
    allowed = ", ".join(str(network) for network in dispatcher.allowed_networks)
    default = "" if args.allow else " (loopback and private networks)"
    idle = f"{args.idle_timeout:g} s" if args.idle_timeout else "off"
    fits = f" (descriptor limit {descriptor_limit})" if descriptor_limit is not None else ""
    endpoint = _format_endpoint(host, port)
    pages = "status page: off"
    if args.pages:
        pages = f"status page: http://{endpoint}/ (also /stats.json, /metrics, /proxy.pac)"
    lines = [
        f"dispatch {__version__}: SOCKS4/4a/5 and HTTP proxy on {endpoint}",
        "dispatching to:",
        _address_table(dispatcher.links.links),
        f"clients allowed from: {allowed}{default}",
        f"login: {plural(users, 'user')}, SOCKS5 and HTTP (SOCKS4 refused)" if users else "login: none",
        f"limits: {plural(dispatcher.max_connections, 'connection')} at once{fits}, "
        f"handshake {args.handshake_timeout:g} s, idle timeout {idle}, grace {args.grace:g} s",
        pages,
    ]
    if dispatcher.transparent_port is not None:
        applied = "off (see: dispatch rules)"
        if args.apply_rules:
            redirected = [f"forwarded from {', '.join(args.lan)}"] if args.lan else []
            redirected += ["this machine's own"] if args.local else []
            applied = f"table {NFT_FAMILY} {NFT_TABLE} applied: TCP and UDP {' and '.join(redirected)}"
        lines.append(
            f"transparent: port {dispatcher.transparent_port} (TCP and UDP), mark {args.mark:#x}; "
            f"firewall rules {applied}"
        )
    if not args.allow and not users and not _is_loopback(host):
        lines.append(
            f"warning: anyone on this machine's private networks can use the proxy on "
            f"{endpoint}; add --auth or --auth-file, or narrow it with --allow"
        )
    return lines


def _print_banner(dispatcher: Dispatcher, banner: list[str], log_where: str) -> None:
    """Print the banner and where the log goes; log the banner too."""
    print("\n".join(banner))
    print(f"log: {log_where}", flush=True)
    # The log tells each start apart: what ran, where, over which links.
    endpoint = _format_endpoint(*dispatcher.address)
    logger.info("dispatch %s started: listening on %s; dispatching to:", __version__, endpoint)
    for line in [*banner[2].splitlines(), *banner[3:]]:
        (logger.warning if line.startswith(("warning:", "error:")) else logger.info)("%s", line)


def _nothing() -> None:
    pass


def _serve_until_signalled(
    dispatcher: Dispatcher,
    args: argparse.Namespace,
    banner: list[str],
    log_where: str,
    at_stop: Callable[[], None] = lambda: None,
) -> int:
    """Print the banner, serve until Ctrl-C or SIGTERM, give the open
    connections the grace period (cut short by a second signal), print the
    summary and do ``at_stop`` (with the signals still held: a third cannot
    cut it short); returns the exit status."""
    started = time.monotonic()
    try:
        with _StopSignals() as stop:
            try:
                return _serve_and_stop(dispatcher, args, banner, log_where, stop, started)
            finally:
                at_stop()
                at_stop = _nothing  # done: not again below
    finally:
        at_stop()  # if the signals could not be taken


def _serve_and_stop(
    dispatcher: Dispatcher,
    args: argparse.Namespace,
    banner: list[str],
    log_where: str,
    stop: _StopSignals,
    started: float,
) -> int:
    """_serve_until_signalled's work, the stop signals held."""
    try:
        _print_banner(dispatcher, banner, log_where)
        for line in metered_without_cap(dispatcher.links.links, dispatcher.steering.budget.links):
            logger.warning("%s", line)
        try:
            dispatcher.start()
        except Exception as failure:  # one line, exit status 1: a service manager restarts it
            why = _describe(failure) if isinstance(failure, OSError) else str(failure) or type(failure).__name__
            logger.error("cannot serve: %s", why)
            return _error(f"cannot serve: {why}", 1)
        _serve_until(stop, dispatcher, args.stats, started)
        still_open = dispatcher.open_connections()
        if still_open:
            print(
                f"dispatch: stopping; {plural(still_open, 'open connection')} "
                f"{'gets' if still_open == 1 else 'get'} up to {args.grace:g} s to finish "
                "(Ctrl-C again to close them now)",
                flush=True,
            )
        logger.info("stopping with %s", plural(still_open, "open connection"))
    finally:
        dispatcher.shutdown(args.grace, cut_short=stop.hurry)
    if stop.hurry.is_set() and still_open:
        print("dispatch: a second signal: every connection closed at once", flush=True)
        logger.info("a second signal: every connection closed at once")
    if args.stats:
        _print_stats(dispatcher, started, "at the end, after")
    print(_summary(dispatcher, time.monotonic() - started), flush=True)
    logger.info("stopped")
    return 0


def _serve_until(stop: _StopSignals, dispatcher: Dispatcher, every: float | None, started: float) -> None:
    """Wait for a stop, printing the stats table ``every`` so many seconds."""
    next_stats = started + (every or 0)
    while not stop.wait(min(0.5, every or 0.5)):
        if every and time.monotonic() >= next_stats:
            _print_stats(dispatcher, started)
            next_stats += every


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake told in one line and a pointer to --help
    rather than the whole usage block."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes arguments it could not place, an upstream's URL too.
        message = " ".join(hide_password(word) for word in message.split(" "))
        self.exit(2, f"dispatch: error: {_shown(message)} (see: {self.prog} --help)\n")


def _add_seconds(group: Any, flag: str, help_text: str, default: float | None = None) -> None:
    """Add a duration option to ``group``: seconds within DURATION_RANGES[flag]."""
    group.add_argument(flag, type=_duration(flag), default=default, metavar="SECONDS", help=help_text)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="dispatch",
        description="A SOCKS proxy that balances connections across network interfaces.",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="write debug logs to stdout")
    parser.add_argument("-V", "--version", action="version", version=f"dispatch {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{list,start,link,rules,service,system-proxy}"
    )
    commands.add_parser("list", help="list the interfaces and their addresses")
    start = commands.add_parser(
        "start",
        help="start the proxy",
        description="Start the proxy over the links given. An ADDRESS is an IP address or an interface name "
        "(followed as its addresses change, waited for while it has none), or another proxy's URL, "
        "socks5://[USER[:PASS]@]HOST:PORT[+LINK] (socks5h, socks4, socks4a, http; mptcp+ for a bond); "
        "then @WEIGHT (10.0.0.2@7) or @backup (usb0@backup). Without one, every usable address is used.",
        epilog="Each option's long story is in the docs/ pages that README.md lists.",
    )
    start.add_argument(
        "addresses", nargs="*", metavar="ADDRESS[@WEIGHT|@backup]", help="a link: an address, an interface, a proxy"
    )
    listening = start.add_argument_group("listening and access")
    listening.add_argument(
        "--ip",
        type=_listen_address,
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 or :: for all)",
    )
    listening.add_argument("--port", type=_port, default=1080, help="port to listen on (default 1080)")
    listening.add_argument(
        "--auth",
        action="append",
        type=_user_password,
        metavar="USER:PASS",
        help="require this login (repeatable; SOCKS4 is then refused)",
    )
    listening.add_argument("--auth-file", metavar="PATH", help="require a login from this file: one USER:PASS a line")
    listening.add_argument(
        "--allow",
        action="append",
        type=_network,
        metavar="CIDR",
        help="serve clients of this network only (repeatable; default: private ones)",
    )
    listening.add_argument(
        "--allow-target",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="let the LAN's clients reach this network of this machine (repeatable)",
    )
    links = start.add_argument_group("links and balancing")
    links.add_argument(
        "--balance",
        choices=[balance.value for balance in Balance],
        help="how a connection's link is chosen: measured (the least open work for what each link was "
        "measured to carry; the default without weights) or round-robin (in turn, by the weights; "
        "the default when any ADDRESS has one)",
    )
    _add_seconds(
        links, "--sticky", "keep a site's connections on one link while used within SECONDS (default off)", default=0.0
    )
    links.add_argument(
        "--state-file",
        metavar="PATH",
        help=f"keep each link's capacity and usage here across restarts (default {default_state_path()})",
    )
    links.add_argument("--no-state", action="store_true", help="keep no state file: every start measures afresh")
    links.add_argument(
        "--upstream-auth-file",
        metavar="PATH",
        help="the passwords of upstream proxies' users: one USER:PASS a line",
    )
    links.add_argument(
        "--cap",
        action="append",
        type=_cap,
        default=[],
        metavar="LINK=SIZE/PERIOD",
        help="a data cap (repeatable): usb0=2GB/month, usb0=200MB/day, usb0=5GB/30d",
    )
    links.add_argument(
        "--cap-action",
        choices=CAP_ACTIONS,
        default="backup",
        help="what a link past its cap does (default backup)",
    )
    health = start.add_argument_group("health and failover")
    _add_seconds(
        health,
        "--connect-timeout",
        f"give up a connect through a link after this long (default {DEFAULT_CONNECT_TIMEOUT:g})",
        default=DEFAULT_CONNECT_TIMEOUT,
    )
    _add_seconds(
        health,
        "--hedge",
        f"race a connect unanswered this long through another link (default {DEFAULT_HEDGE:g})",
        default=DEFAULT_HEDGE,
    )
    _add_seconds(
        health,
        "--cooldown",
        f"the longest wait between a failed link's retests (default {DEFAULT_COOLDOWN:g})",
        default=DEFAULT_COOLDOWN,
    )
    health.add_argument(
        "--check",
        action="append",
        type=_health_check_target,
        default=[],
        metavar="HOST:PORT",
        help="test every link by a connect to this target (repeatable)",
    )
    _add_seconds(
        health,
        "--check-interval",
        f"how often --check tests each link (default {DEFAULT_CHECK_INTERVAL:g})",
        default=DEFAULT_CHECK_INTERVAL,
    )
    names = start.add_argument_group("names")
    names.add_argument(
        "--dns",
        action="append",
        type=_dns_server,
        metavar="ADDRESS[:PORT]",
        help="a name server to ask through the links (repeatable), or 'system'",
    )
    system = start.add_argument_group("the system around it: transparent mode, desktop switch, bond")
    _add_transparent_arguments(system)
    system.add_argument(
        "--apply-rules",
        action="store_true",
        help="with --transparent: set the firewall rules while it runs",
    )
    system.add_argument(
        "--system-proxy",
        action="store_true",
        help="point this user's proxy settings here while it runs",
    )
    system.add_argument(
        "--mptcp",
        action="store_true",
        help="listen with Multipath TCP: the server end of bonds (Linux)",
    )
    pages = start.add_argument_group("pages, statistics and logs")
    pages.add_argument(
        "--no-page",
        dest="pages",
        action="store_false",
        help="serve no status page, /stats.json, /metrics, PAC or API",
    )
    pages.add_argument(
        "--page-host",
        action="append",
        type=_page_host,
        metavar="NAME",
        help="also show the pages to this host name (repeatable)",
    )
    _add_seconds(pages, "--stats", "print each link's traffic this often, and at the end")
    pages.add_argument("--log-file", metavar="PATH", help=f"log here (default {default_log_path()}; -: stdout)")
    pages.add_argument(
        "-d", "--debug", action="store_true", default=argparse.SUPPRESS, help="write debug logs to stdout"
    )
    limits = start.add_argument_group("limits")
    _add_seconds(
        limits,
        "--handshake-timeout",
        f"close a client whose handshake takes longer (default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
        default=DEFAULT_HANDSHAKE_TIMEOUT,
    )
    _add_seconds(limits, "--idle-timeout", "close a connection idle this long (default: never)")
    limits.add_argument(
        "--max-connections",
        type=_positive,
        metavar="N",
        help="refuse new clients while N are open (default: what fits)",
    )
    _add_seconds(
        limits,
        "--grace",
        f"at a stop, how long open connections may go on (default {DEFAULT_GRACE:g})",
        default=DEFAULT_GRACE,
    )
    rules = commands.add_parser(
        "rules",
        help="print the firewall rules of transparent mode (nftables)",
        description="Print the nftables script that sends TCP to dispatch's transparent port: "
        "what --apply-rules applies. Apply it with: nft -f FILE; remove it with: "
        f"nft delete table {NFT_FAMILY} {NFT_TABLE}",
    )
    _add_transparent_arguments(rules, required=True)
    service = commands.add_parser(
        "service",
        help="print a service definition that runs 'dispatch start' at boot or logon",
        description="Print a systemd unit, a launchd plist or a Windows Task Scheduler task that "
        "runs 'dispatch start' with the arguments given, restarted if it fails.",
    )
    service.add_argument("system", choices=SERVICE_SYSTEMS)
    service.add_argument("start_arguments", nargs=argparse.REMAINDER, metavar="START ARGUMENTS")
    system_proxy = commands.add_parser(
        "system-proxy",
        help="show this user's proxy settings, or put back those a dispatch saved",
        description="Show this user's proxy settings, or put back the ones 'dispatch start --system-proxy' "
        "saved before it changed them (it does at stop, and the next start does after a crash).",
    )
    what = system_proxy.add_mutually_exclusive_group(required=True)
    what.add_argument("--show", action="store_true", help="print the proxy settings as they are now")
    what.add_argument("--restore", action="store_true", help="put back the saved proxy settings")
    system_proxy.add_argument(
        "--state-file",
        metavar="PATH",
        help=f"the state file 'start' was given; the settings are saved beside it (default {default_state_path()})",
    )
    link = commands.add_parser(
        "link",
        help="pause, resume, close or weigh a link of a running dispatch, or count its usage from zero",
        description="Ask the dispatch running at --ip and --port (through its control API) to change one "
        "of its links: pause (no new connection; open ones go on), resume, close (and its open "
        "connections are ended; with --site, only those to that site, the link kept as it was), "
        "weight N, reset-usage (of its data caps). The login, if it asks one: --auth-file or "
        "DISPATCH_AUTH=USER:PASS.",
    )
    link.add_argument("--ip", default="127.0.0.1", help="where dispatch listens (default 127.0.0.1)")
    link.add_argument("--port", type=_port, default=1080, help="its port (default 1080)")
    link.add_argument("--auth-file", metavar="PATH", help="the login to send: the file's first USER:PASS line")
    link.add_argument("--site", metavar="NAME", help="with close: end only the connections to this site")
    link.add_argument("name", metavar="NAME", help="the link, as the status page and --stats name it")
    link.add_argument("action", choices=LINK_ACTIONS)
    link.add_argument("value", nargs="?", type=_positive, metavar="N", help="the weight, for weight")
    return parser


def _add_transparent_arguments(options: argparse._ActionsContainer, required: bool = False) -> None:
    """The options of transparent mode, which ``start`` and ``rules`` share."""
    options.add_argument(
        "--transparent",
        type=_port,
        required=required,
        metavar="PORT",
        help="serve what the firewall redirects to PORT (Linux)",
    )
    options.add_argument(
        "--lan",
        action="append",
        default=[],
        metavar="IFACE",
        help="redirect what this LAN interface forwards (repeatable)",
    )
    options.add_argument("--local", action="store_true", help="redirect this machine's own programs")
    options.add_argument(
        "--mark",
        type=_mark,
        default=DEFAULT_MARK,
        help=f"the firewall mark of dispatch's own traffic (default {DEFAULT_MARK:#x})",
    )


def _print_rules(args: argparse.Namespace) -> int:
    """``dispatch rules``: the script of TransparentRules, on stdout."""
    if not (args.lan or args.local):
        return _error("say what to redirect: --lan IFACE (repeatable), --local, or both")
    if args.transparent == 0:  # start may take 0 (a free port, which its rules then name); a script may not
        return _error("rules need the port to redirect to: --transparent 1 to 65535")
    try:
        rules = TransparentRules(args.transparent, lan_networks(args.lan), args.local, args.mark)
    except FirewallError as error:
        return _error(str(error))
    print(rules.script(), end="")
    return 0


def _print_service(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # Arguments with a mistake fail now, not at every boot, as start would
    # refuse them. Help goes to stderr: stdout is the unit, often redirected
    # into its file.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            parsed = parser.parse_args(["start", *args.start_arguments])
        except SystemExit as exit_:
            if exit_.code == 0:  # start's --help or --version: no unit to print
                return _error("'dispatch service' prints no help of start into a unit; see: dispatch start --help")
            raise
    executable = [sys.executable, os.path.abspath(__file__)]
    try:
        _validate_start_arguments(parsed)
        unit = service_unit(args.system, args.start_arguments, executable)
    except (AddressError, ValueError) as error:
        return _error(str(error))
    print(unit, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``dispatch [-d] {list,start,rules,service,system-proxy,link} ...``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "service":
        return _print_service(parser, args)
    if args.command == "rules":
        return _print_rules(args)
    if args.command == "list":
        try:
            return _list_interfaces(sys.stdout)
        except AddressError as error:
            return _error(str(error))
    if args.command == "system-proxy":
        return _system_proxy_command(args)
    if args.command == "link":
        return _link_command(args)
    return _start(args)


if __name__ == "__main__":
    raise SystemExit(main())
