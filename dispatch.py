"""dispatch: a SOCKS proxy that balances connections across network links.

Each new connection is given one local address by weighted round robin and all
of its traffic leaves through that address's interface, so several links (a
cable, a Wi-Fi, a phone hotspot) add up for clients that open many connections:
download managers, BitTorrent clients, browsers.

The protocol, as served (RFC 1928 and the SOCKS4/4a papers)::

    client -> proxy   05 NMETHODS METHODS...          SOCKS5 greeting
    proxy  -> client  05 00                           "no authentication"
    client -> proxy   05 01 00 ATYP DST.ADDR DST.PORT  CONNECT request
    proxy  -> client  05 REP 00 ATYP BND.ADDR BND.PORT after the upstream connect
    ... then bytes are copied both ways until each side has closed.

SOCKS4 sends ``04 01 DST.PORT DST.IP USERID 00`` (4a: DST.IP 0.0.0.x and the
host name after the user id) and gets ``00 5A|5B DST.PORT DST.IP``.

Only the standard library is needed to proxy through IP addresses; the
``ifaddr`` package is needed for interface names and ``dispatch list``.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import errno
import ipaddress
import logging
import os
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Dispatcher",
    "LocalAddress",
    "Link",
    "WeightedRoundRobin",
    "SocksError",
    "AddressError",
    "parse_address",
    "usable_addresses",
    "usable_interface_addresses",
    "resolve_links",
    "main",
]

logger = logging.getLogger("dispatch")

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SOCKS4_VERSION = 4
SOCKS5_VERSION = 5


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


REPLY_MESSAGES = {
    Reply.SUCCEEDED: "succeeded",
    Reply.GENERAL_FAILURE: "general failure",
    Reply.NOT_ALLOWED: "connection not allowed by ruleset",
    Reply.NETWORK_UNREACHABLE: "network unreachable",
    Reply.HOST_UNREACHABLE: "host unreachable",
    Reply.CONNECTION_REFUSED: "connection refused",
    Reply.TTL_EXPIRED: "timed out",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class Socks4Reply(enum.IntEnum):
    """SOCKS4 reply codes; SOCKS4 has one code for every kind of failure."""

    GRANTED = 0x5A
    REJECTED = 0x5B


# The errno names of each reply, looked up by name so that every platform's
# numbers are right (Windows spells some of them WSAE...).
_ERRNO_REPLIES = {
    Reply.CONNECTION_REFUSED: ("ECONNREFUSED", "WSAECONNREFUSED"),
    Reply.NETWORK_UNREACHABLE: ("ENETUNREACH", "ENETDOWN", "WSAENETUNREACH", "WSAENETDOWN"),
    Reply.HOST_UNREACHABLE: ("EHOSTUNREACH", "EHOSTDOWN", "WSAEHOSTUNREACH", "WSAEHOSTDOWN"),
    Reply.TTL_EXPIRED: ("ETIMEDOUT", "WSAETIMEDOUT"),
}
_REPLY_BY_ERRNO = {
    getattr(errno, name): reply
    for reply, names in _ERRNO_REPLIES.items()
    for name in names
    if hasattr(errno, name)
}

# Linux lets a socket bound to an address with port 0 defer choosing the port
# until connect(), when the destination is known. Without it, the kernel must
# pick a port unique for the address alone and runs out after ~28,000
# connections in TIME_WAIT. Python exposes the name from 3.12 on.
_IP_BIND_ADDRESS_NO_PORT = getattr(
    socket, "IP_BIND_ADDRESS_NO_PORT", 24 if sys.platform.startswith("linux") else None
)

# Errors of a connect that are the link's fault, not the target's answer: the
# connection is tried again through another address. A refusal (ECONNREFUSED)
# is the target's answer: another link would get the same.
_LINK_FAILURE_ERRNO_NAMES = (
    "ENETUNREACH", "ENETDOWN", "EHOSTUNREACH", "EADDRNOTAVAIL", "ENODEV",
    "WSAENETUNREACH", "WSAENETDOWN", "WSAEHOSTUNREACH", "WSAEADDRNOTAVAIL",
)
_LINK_FAILURE_ERRNOS = frozenset(
    getattr(errno, name) for name in _LINK_FAILURE_ERRNO_NAMES if hasattr(errno, name)
)
# Errors that prove a packet went out and the target answered.
_TARGET_ANSWER_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ECONNREFUSED", "WSAECONNREFUSED") if hasattr(errno, name)
)
# Errors of SO_BINDTODEVICE when the process may not use it.
_NOT_PERMITTED_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EPERM", "EACCES") if hasattr(errno, name)
)

# Binding a socket to a device makes it leave by that device whatever the
# routing table says: Linux SO_BINDTODEVICE (an interface name), macOS
# IP_BOUND_IF / IPV6_BOUND_IF (an interface index). Windows routes by the
# source address, so the bound address is enough there.
_SO_BINDTODEVICE = getattr(
    socket, "SO_BINDTODEVICE", 25 if sys.platform.startswith("linux") else None
)
_IP_BOUND_IF = getattr(socket, "IP_BOUND_IF", 25 if sys.platform == "darwin" else None)
_IPV6_BOUND_IF = getattr(socket, "IPV6_BOUND_IF", 125 if sys.platform == "darwin" else None)
_CAN_BIND_TO_DEVICE = _SO_BINDTODEVICE is not None or _IP_BOUND_IF is not None

DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds
DEFAULT_COOLDOWN = 30.0  # seconds an address sits out after a link failure
# How often interface addresses are read again, at most: DHCP renewals and
# new networks are seen within this, at the cost of one read per interval.
INTERFACE_REFRESH_INTERVAL = 2.0  # seconds

RELAY_BUFFER_SIZE = 256 * 1024
MAX_NAME_LENGTH = 255  # a SOCKS5 domain name has a one-byte length
MAX_SOCKS4_FIELD = 1024  # cap on a SOCKS4 user id or SOCKS4a host name


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class SocksError(OSError):
    """A request that gets a failure reply; ``reply`` is the SOCKS5 code."""

    def __init__(self, reply: Reply, message: str | None = None) -> None:
        super().__init__(message or REPLY_MESSAGES[reply])
        self.reply = reply


class ProtocolError(SocksError):
    """Bytes that are not the protocol: the connection is closed."""

    def __init__(self, message: str) -> None:
        super().__init__(Reply.GENERAL_FAILURE, message)


class AddressError(ValueError):
    """A local address given on the command line or to Dispatcher is unusable."""


def _reply_code(error: OSError) -> Reply:
    """Map the OS error of a failed upstream connect to a SOCKS5 reply code."""
    if isinstance(error, SocksError):
        return error.reply
    if isinstance(error, socket.gaierror):
        return Reply.HOST_UNREACHABLE
    if isinstance(error, TimeoutError):
        return Reply.TTL_EXPIRED
    return _REPLY_BY_ERRNO.get(error.errno, Reply.GENERAL_FAILURE)


def _is_link_failure(error: OSError) -> bool:
    """Whether a failed upstream connect is the fault of the local link
    (unreachable, down, address gone, timed out), so that another local
    address may succeed where this one failed."""
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
        return "timed out"
    return error.strerror or str(error)


# ---------------------------------------------------------------------------
# Protocol helpers
# ---------------------------------------------------------------------------


class HandshakeReader:
    """Reads the handshake from a client socket, message by message.

    It receives what the client has sent so far in one call and keeps what
    lies beyond the handshake (a client may send its first payload right
    behind the request) so that the relay can pass it on: nothing is stranded.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self) -> None:
        data = self._sock.recv(4096)
        if not data:
            raise ProtocolError("client closed during the handshake")
        self._buffer += data

    def read(self, size: int) -> bytes:
        """Return exactly ``size`` bytes, or raise ProtocolError on EOF."""
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_byte(self) -> int:
        """Return one byte as an integer."""
        return self.read(1)[0]

    def read_until_nul(self, limit: int) -> bytes:
        """Return the bytes before the next NUL, which is consumed.

        Raises ProtocolError if no NUL comes within ``limit`` bytes, without
        buffering more than the limit from the client.
        """
        while True:
            end = self._buffer.find(b"\0", 0, limit + 1)
            if end >= 0:
                data = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return data
            if len(self._buffer) > limit:
                raise ProtocolError(f"no NUL within {limit} bytes")
            self._fill()

    def rest(self) -> bytes:
        """Return and forget what was received beyond the handshake."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def read_socks5_address(reader: HandshakeReader) -> tuple[str, int]:
    """Read ATYP, DST.ADDR and DST.PORT; return (host, port).

    Raises SocksError(ADDRESS_TYPE_NOT_SUPPORTED) for an unknown ATYP.
    """
    atyp = reader.read_byte()
    if atyp == AddressType.IPV4:
        host = socket.inet_ntop(socket.AF_INET, reader.read(4))
    elif atyp == AddressType.IPV6:
        host = socket.inet_ntop(socket.AF_INET6, reader.read(16))
    elif atyp == AddressType.DOMAIN:
        name = reader.read(reader.read_byte())
        host = _decode_name(name)
    else:
        raise SocksError(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"unknown address type {atyp}")
    (port,) = struct.unpack("!H", reader.read(2))
    return host, port


def encode_socks5_address(host: str, port: int) -> bytes:
    """Encode ATYP, ADDR and PORT as they stand in a SOCKS5 request or reply."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        return bytes([AddressType.DOMAIN, len(name)]) + name + struct.pack("!H", port)
    atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
    return bytes([atyp]) + ip.packed + struct.pack("!H", port)


def _decode_name(name: bytes) -> str:
    if not name:
        raise SocksError(Reply.HOST_UNREACHABLE, "empty host name")
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise SocksError(Reply.HOST_UNREACHABLE, "host name is not ASCII") from None


def _split_host(address: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) of a socket address of any family."""
    return address[0], address[1]


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------
# Local addresses and the balancer
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LocalAddress:
    """One local address that outgoing connections may leave from.

    ``interface`` is the name of the interface holding it, where known:
    connections from it are bound to that device. Counters are kept per
    address for ``Dispatcher.stats()``. ``sitting_out_until`` is set (a
    ``time.monotonic()`` value) while the address sits out after a link failure.
    """

    ip: str
    weight: int = 1
    interface: str | None = None
    connections: int = 0
    open_connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    sitting_out_until: float | None = None

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET or AF_INET6."""
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    def describe(self) -> str:
        """The address and its interface, as logs show them."""
        return f"{self.ip} ({self.interface})" if self.interface else self.ip

    def sitting_out(self, now: float) -> bool:
        """Whether the address sits out at time ``now``."""
        return self.sitting_out_until is not None and now < self.sitting_out_until


class Link:
    """A way out as it was named: one IP address, or an interface whose usable
    addresses are followed as they change (a DHCP renewal, a new network).

    ``current`` are the addresses to use now; ``known`` keeps every address
    the link has had, by IP, so that counters survive an address going away
    and coming back.
    """

    def __init__(
        self, name: str, weight: int = 1, addresses: Iterable[LocalAddress] = (), *, is_interface: bool = False
    ) -> None:
        self.name = name
        self.weight = weight
        self.is_interface = is_interface
        self.current = list(addresses)
        self.known = {address.ip: address for address in self.current}

    @classmethod
    def of_address(cls, address: LocalAddress) -> Link:
        """A link of one fixed address."""
        return cls(address.ip, address.weight, [address])

    @classmethod
    def of_interface(cls, name: str, weight: int, ips: Sequence[str]) -> Link:
        """A link that follows interface ``name``, holding ``ips`` for now."""
        link = cls(name, weight, is_interface=True)
        link.follow(ips)
        return link

    def follow(self, ips: Sequence[str]) -> bool:
        """Make ``ips`` the current addresses; return whether they changed."""
        before = [address.ip for address in self.current]
        self.current = []
        for ip in ips:
            if ip not in self.known:
                self.known[ip] = LocalAddress(ip, self.weight, self.name)
            self.current.append(self.known[ip])
        return before != list(ips)

    def describe(self) -> str:
        """The link's name and its current addresses, as logs show them."""
        ips = ", ".join(address.ip for address in self.current) or "no usable address"
        return f"{self.name} ({ips})" if self.is_interface else self.name


class WeightedRoundRobin:
    """Smooth weighted round robin (as in nginx) over a fixed list of items.

    Over every run of sum(weights) consecutive calls to ``next()``, each item
    is returned exactly its weight times, spread out rather than in runs:
    weights 7 and 3 give A B A A B A A B A A, then the same again.
    Not thread safe: callers hold a lock.
    """

    def __init__(self, items: Sequence[Any], weights: Sequence[int]) -> None:
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

    def next(self) -> Any:
        """Return the next item."""
        best = 0
        for index, weight in enumerate(self.weights):
            self._current[index] += weight
            if self._current[index] > self._current[best]:
                best = index
        self._current[best] -= self._total
        return self.items[best]


InterfaceReader = Callable[[], dict[str, list[str]]]


class Balancer:
    """Chooses the local address of each new connection, per address family.

    Addresses sitting out after a link failure are skipped while others are
    left; the links that follow an interface are read again at most every
    INTERFACE_REFRESH_INTERVAL seconds, when a connection asks for an address.
    ``read_interfaces`` returns the usable addresses of each interface by
    name and ``clock`` tells monotonic seconds; tests may pass their own.
    """

    def __init__(
        self,
        links: Sequence[Link | LocalAddress],
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        read_interfaces: InterfaceReader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.links = [link if isinstance(link, Link) else Link.of_address(link) for link in links]
        if not any(link.current for link in self.links):
            raise AddressError("no local address to dispatch to")
        self.cooldown = cooldown
        self._read_interfaces = read_interfaces or usable_interface_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._follows = any(link.is_interface for link in self.links)
        self._next_refresh = clock() + INTERFACE_REFRESH_INTERVAL
        self._rounds: dict[socket.AddressFamily, WeightedRoundRobin] = {}
        self._rebuild()

    def _rebuild(self) -> None:
        self._rounds = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            pool = [address for address in self.addresses if address.family == family]
            if pool:
                self._rounds[family] = WeightedRoundRobin(pool, [a.weight for a in pool])

    @property
    def addresses(self) -> list[LocalAddress]:
        """The addresses connections are dispatched to now, each once."""
        seen: dict[str, LocalAddress] = {}
        for link in self.links:
            for address in link.current:
                seen.setdefault(address.ip, address)
        return list(seen.values())

    @property
    def families(self) -> frozenset[socket.AddressFamily]:
        """The address families there are local addresses for."""
        with self._lock:
            self._refresh_if_due()
            return frozenset(self._rounds)

    def _refresh_if_due(self) -> None:
        now = self._clock()
        if not self._follows or now < self._next_refresh:
            return
        self._next_refresh = now + INTERFACE_REFRESH_INTERVAL
        try:
            found = self._read_interfaces()
        except (OSError, AddressError) as error:
            logger.debug("cannot read the interfaces: %s", error)
            return
        changed = False
        for link in self.links:
            if not link.is_interface:
                continue
            had = [address.ip for address in link.current]
            if not link.follow(found.get(link.name, [])):
                continue
            changed = True
            if not link.current:
                logger.warning("%s has no usable address for now: skipped", link.name)
            elif not had:
                logger.info("%s is back: %s", link.name, ", ".join(a.ip for a in link.current))
            else:
                logger.info("%s now has %s (had %s)", link.name,
                            ", ".join(a.ip for a in link.current), ", ".join(had))
        if changed:
            self._rebuild()

    def next(self, family: socket.AddressFamily) -> LocalAddress:
        """The local address for a new connection of ``family``.

        Raises SocksError(ADDRESS_TYPE_NOT_SUPPORTED) if the family has none.
        """
        with self._lock:
            self._refresh_if_due()
            rounds = self._rounds.get(family)
            if rounds is None:
                name = "IPv6" if family == socket.AF_INET6 else "IPv4"
                raise SocksError(
                    Reply.ADDRESS_TYPE_NOT_SUPPORTED,
                    f"no {name} local address to dispatch to",
                )
            chosen = self._pick(rounds, ())
            # With nothing excluded, _pick always finds one.
            return chosen if chosen is not None else rounds.next()

    def alternative(self, family: socket.AddressFamily, tried: Collection[LocalAddress]) -> LocalAddress | None:
        """Another address of ``family`` for a connection that failed through
        the ``tried`` ones, or None when every address has been tried."""
        with self._lock:
            rounds = self._rounds.get(family)
            return None if rounds is None else self._pick(rounds, tried)

    def _pick(self, rounds: WeightedRoundRobin, exclude: Collection[LocalAddress]) -> LocalAddress | None:
        now = self._clock()
        # One full period visits every address; skipping some keeps the
        # others in their weights' proportions.
        for _ in range(rounds.period):
            address = rounds.next()
            if address not in exclude and not address.sitting_out(now):
                return address
        # A full period leaves the rotation as it was. Every address left is
        # sitting out: try them anyway, in turn, rather than fail.
        for _ in range(rounds.period):
            address = rounds.next()
            if address not in exclude:
                return address
        return None

    def reached(self, address: LocalAddress, failed: Sequence[tuple[LocalAddress, OSError]] = ()) -> None:
        """Record that ``address`` reached a target the ``failed`` addresses
        could not: they sit out for the cooldown, and ``address``, if it was
        sitting out, is back."""
        with self._lock:
            now = self._clock()
            for down, error in failed:
                if down is address:
                    continue
                down.sitting_out_until = now + self.cooldown
                logger.warning(
                    "sitting out for %g s: %s: %s", self.cooldown, down.describe(), _describe(error)
                )
            if address.sitting_out_until is not None:
                address.sitting_out_until = None
                logger.info("back in use: %s", address.describe())

    def opened(self, address: LocalAddress) -> None:
        """Count a connection made through ``address``."""
        with self._lock:
            address.connections += 1
            address.open_connections += 1

    def closed(self, address: LocalAddress) -> None:
        """Count the end of a connection made through ``address``."""
        with self._lock:
            address.open_connections -= 1

    def add_bytes(self, address: LocalAddress, up: int, down: int) -> None:
        """Count bytes relayed through ``address``."""
        with self._lock:
            address.bytes_up += up
            address.bytes_down += down

    def stats(self) -> list[dict[str, Any]]:
        """A snapshot of the counters of every address each link has had."""
        with self._lock:
            known: dict[str, LocalAddress] = {}
            for link in self.links:
                for address in link.known.values():
                    known.setdefault(address.ip, address)
            return [
                {
                    "ip": address.ip,
                    "interface": address.interface,
                    "weight": address.weight,
                    "connections": address.connections,
                    "open": address.open_connections,
                    "bytes_up": address.bytes_up,
                    "bytes_down": address.bytes_down,
                }
                for address in known.values()
            ]


def parse_address(text: str) -> tuple[str, int]:
    """Split ``ADDRESS[@WEIGHT]`` or ``ADDRESS/WEIGHT`` into (address, weight).

    ADDRESS is an IPv4 or IPv6 literal or an interface name; it is not checked
    here. Raises AddressError for a weight that is not a positive integer.
    """
    address, weight_text = text, "1"
    if "@" in text:
        address, _, weight_text = text.rpartition("@")
    elif "/" in text:
        address, _, weight_text = text.rpartition("/")
    if not address:
        raise AddressError(f"{text!r}: no address before the weight")
    if not weight_text.isdigit() or int(weight_text) < 1:
        raise AddressError(f"{text!r}: the weight must be a positive whole number")
    return address, int(weight_text)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can reach other hosts (not loopback or link-local)."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def _interfaces() -> dict[str, list[str]]:
    """Each interface's addresses, by name, from the ifaddr package."""
    try:
        import ifaddr
    except ImportError:
        raise AddressError(
            "interface names and 'dispatch list' need the ifaddr package (pip install ifaddr)"
        ) from None
    interfaces: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        ips = interfaces.setdefault(adapter.nice_name, [])
        for entry in adapter.ips:
            # ifaddr gives IPv6 addresses as (address, flowinfo, scope_id).
            ip = entry.ip[0] if isinstance(entry.ip, tuple) else entry.ip
            ips.append(ip)
    return interfaces


def _is_up(interface: str) -> bool:
    """Whether an interface is up; true where that cannot be told."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as state:
            return state.read().strip() != "down"
    except OSError:
        return True


def usable_interface_addresses() -> dict[str, list[str]]:
    """The usable addresses of each interface that is up, by name."""
    found: dict[str, list[str]] = {}
    for name, ips in _interfaces().items():
        if _is_up(name):
            found[name] = [ip for ip in ips if _is_usable(ipaddress.ip_address(ip))]
    return found


def usable_addresses() -> list[LocalAddress]:
    """Every usable address of every up interface, weight 1 each."""
    return [
        LocalAddress(ip, 1, name) for name, ips in usable_interface_addresses().items() for ip in ips
    ]


def _is_ip_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def _has_ifaddr() -> bool:
    try:
        import ifaddr  # noqa: F401
    except ImportError:
        return False
    return True


def _check_bindable(ip: str) -> None:
    """Raise AddressError unless ``ip`` is an address of this machine."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError as error:
            raise AddressError(f"{ip} is not an address of this machine ({_describe(error)})") from None


def _interface_of(ip: str, interfaces: dict[str, list[str]]) -> str | None:
    """The name of the interface holding ``ip``, if any."""
    wanted = ipaddress.ip_address(ip)
    for name, ips in interfaces.items():
        if any(ipaddress.ip_address(other) == wanted for other in ips):
            return name
    return None


def resolve_links(specs: Iterable[str | LocalAddress] | None) -> list[Link]:
    """Turn ``ADDRESS[@WEIGHT]`` texts (or LocalAddress objects) into links.

    An interface name becomes a link that follows the interface's usable
    addresses; it may have none for now. An IP address is looked up among
    the interfaces (with ifaddr, if installed) so that its connections can be
    bound to its device. None or an empty list means every interface with a
    usable address now. Raises AddressError.
    """
    specs = list(specs or [])
    if not specs:
        links = [Link.of_interface(name, 1, ips) for name, ips in usable_interface_addresses().items() if ips]
        if not links:
            raise AddressError("no usable address on any interface; name one")
        return links
    links: list[Link] = []
    interfaces: dict[str, list[str]] | None = None

    def read_interfaces(required: bool) -> dict[str, list[str]]:
        nonlocal interfaces
        if interfaces is None:
            try:
                interfaces = _interfaces()
            except AddressError:
                if required:
                    raise
                return {}  # without ifaddr, IP addresses are bound as sources only
        return interfaces

    for spec in specs:
        if isinstance(spec, LocalAddress):
            _check_bindable(spec.ip)
            if spec.interface is None:
                spec.interface = _interface_of(spec.ip, read_interfaces(required=False))
            links.append(Link.of_address(spec))
            continue
        name, weight = parse_address(spec)
        if _is_ip(name):
            ip = str(ipaddress.ip_address(name))
            _check_bindable(ip)
            interface = _interface_of(ip, read_interfaces(required=False))
            links.append(Link.of_address(LocalAddress(ip, weight, interface)))
            continue
        known = read_interfaces(required=True)
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise AddressError(f"{name!r} is neither an IP address nor an interface (interfaces: {names})")
        up = _is_up(name)
        ips = [ip for ip in known[name] if up and _is_usable(ipaddress.ip_address(ip))]
        links.append(Link.of_interface(name, weight, ips))
    seen = set()
    for address in (address for link in links for address in link.current):
        if address.ip in seen:
            raise AddressError(f"{address.ip} is given more than once")
        seen.add(address.ip)
    if not seen:
        raise AddressError("none of the interfaces given has a usable address")
    return links


# ---------------------------------------------------------------------------
# Server and handler
# ---------------------------------------------------------------------------


def _resolve_target(
    host: str, port: int, families: frozenset[socket.AddressFamily]
) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, ip) pairs to try for a target, in order.

    A name is resolved here, keeping only the families there are local
    addresses for. Raises gaierror or SocksError(HOST_UNREACHABLE).
    """
    if _is_ip(host):
        return [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    # The name is ASCII already; as bytes it skips the idna codec, whose
    # errors are not OSErrors.
    infos = socket.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM)
    targets = [(info[0], info[4][0]) for info in infos if info[0] in families]
    if not targets:
        raise SocksError(
            Reply.HOST_UNREACHABLE,
            f"{host} has no address of a family there is a local address for",
        )
    return targets


class _DeviceBindingRefused(OSError):
    """The system does not let this process bind sockets to a device."""


def _device_for(local: LocalAddress, ip: str) -> str | None:
    """The device a connection from ``local`` to ``ip`` is bound to, if any.

    None where devices cannot be bound, where the interface of ``local`` is
    not known, and for loopback targets: a socket bound to eth0 cannot reach
    127.0.0.1.
    """
    if not _CAN_BIND_TO_DEVICE or _is_ip_loopback(ip):
        return None
    return local.interface


def _bind_to_device(sock: socket.socket, interface: str) -> None:
    """Make ``sock`` leave by ``interface`` whatever the routing table says.

    Raises _DeviceBindingRefused if the system does not allow it, and an
    OSError of the link (ENODEV) if the interface is gone.
    """
    try:
        if _SO_BINDTODEVICE is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
            return
        try:
            index = socket.if_nametoindex(interface)
        except OSError:
            raise OSError(errno.ENODEV, f"no interface {interface}") from None
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_BOUND_IF, index)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BOUND_IF, index)
    except OSError as error:
        if error.errno in _NOT_PERMITTED_ERRNOS:
            raise _DeviceBindingRefused(error.errno, error.strerror) from None
        raise


def _connect_from(
    local: LocalAddress, ip: str, port: int, timeout: float, device: str | None = None
) -> socket.socket:
    """A socket bound to ``local`` (and to ``device``, if given) and
    connected to (ip, port)."""
    sock = socket.socket(local.family, socket.SOCK_STREAM)
    try:
        # Before bind: unprivileged SO_BINDTODEVICE (Linux 5.7+) is only
        # allowed on a socket that is not bound yet.
        if device is not None:
            _bind_to_device(sock, device)
        if _IP_BIND_ADDRESS_NO_PORT is not None and local.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((local.ip, 0))
        sock.settimeout(timeout)
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def relay(
    client: socket.socket,
    upstream: socket.socket,
    early: bytes = b"",
    count: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Copy bytes both ways until each side has closed; return (up, down).

    ``early`` is what the client sent before the relay began; it goes first.
    An EOF from one side is passed on as ``shutdown(SHUT_WR)`` to the other.
    Each direction has its own pending data, so a slow reader on one side
    never stops the other direction (no deadlock with echoing peers).
    ``count(up, down)`` is called as bytes go through, for live statistics.
    """
    client.setblocking(False)
    upstream.setblocking(False)
    directions = [_Direction(client, upstream), _Direction(upstream, client)]
    directions[0].pending = memoryview(early)
    with _selector() as selector:
        registered: dict[socket.socket, int] = {}
        while not all(direction.done for direction in directions):
            wanted: dict[socket.socket, int] = {}
            for direction in directions:
                if direction.done:
                    continue
                if direction.pending:
                    wanted[direction.dst] = wanted.get(direction.dst, 0) | selectors.EVENT_WRITE
                else:
                    wanted[direction.src] = wanted.get(direction.src, 0) | selectors.EVENT_READ
            for sock in (client, upstream):
                events = wanted.get(sock, 0)
                if registered.get(sock, 0) == events:
                    continue
                if not events:
                    selector.unregister(sock)
                elif sock in registered and registered[sock]:
                    selector.modify(sock, events)
                else:
                    selector.register(sock, events)
                registered[sock] = events
            ready = {key.fileobj: events for key, events in selector.select()}
            for index, direction in enumerate(directions):
                if direction.done:
                    continue
                moved = direction.step(ready.get(direction.src, 0), ready.get(direction.dst, 0))
                if moved and count is not None:
                    if index == 0:
                        count(moved, 0)
                    else:
                        count(0, moved)
    return directions[0].total, directions[1].total


def _selector() -> selectors.BaseSelector:
    # poll needs no descriptor of its own (epoll does) and has no 1024 limit
    # (select does); Windows has neither poll nor epoll.
    if hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.DefaultSelector()


class _Direction:
    """One way of the copy: from ``src`` to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending = memoryview(b"")
        self.eof = False
        self.done = False
        self.total = 0

    def step(self, src_events: int, dst_events: int) -> int:
        """Move what the ready events allow; return the bytes sent on."""
        sent = 0
        if self.pending and dst_events & selectors.EVENT_WRITE:
            sent += self._send()
        elif not self.pending and src_events & selectors.EVENT_READ:
            try:
                data = self.src.recv(RELAY_BUFFER_SIZE)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError:
                data = b""  # a reset counts as the end of this direction
            if data:
                self.pending = memoryview(data)
                sent += self._send()
            else:
                self.eof = True
        if self.eof and not self.pending:
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return sent

    def _send(self) -> int:
        try:
            sent = self.dst.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # The receiver is gone: what it has not taken can never arrive.
            self.pending = memoryview(b"")
            self.eof = True
            return 0
        self.pending = self.pending[sent:]
        self.total += sent
        return sent


class _Server(socketserver.ThreadingTCPServer):
    """The listening socket; one daemon thread serves each connection."""

    allow_reuse_address = True
    daemon_threads = True
    # Connections are tracked by the Dispatcher; the server need not keep a
    # list of its threads to join.
    block_on_close = False
    # Bursts of connections (a BitTorrent client starting) must not be
    # refused by a short accept queue.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.dispatcher = dispatcher
        super().__init__(address, SocksHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Ordinary faults are handled in SocksHandler; what gets here is a bug.
        logger.exception("unexpected error serving %s", _format_endpoint(*_split_host(client_address)))


class SocksHandler(socketserver.StreamRequestHandler):
    """Serves one client: the SOCKS handshake, the upstream connect, the relay.

    A subclass may override ``connect_upstream`` to change how the upstream
    connection is made.
    """

    server: _Server
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.dispatcher = self.server.dispatcher
        self.timeout = self.dispatcher.handshake_timeout
        super().setup()
        self.reader = HandshakeReader(self.connection)
        self.started = time.monotonic()
        self.target = "-"
        self.local: LocalAddress | None = None
        self.up = 0
        self.down = 0

    def handle(self) -> None:
        client = _format_endpoint(*_split_host(self.client_address))
        result = "ok"
        self.dispatcher._track(self.connection, True)
        try:
            upstream = self.handshake()
            with upstream:
                self.relay(upstream)
        except OSError as error:
            result = _describe(error)
        finally:
            self.dispatcher._track(self.connection, False)
            via = self.local.describe() if self.local else "-"
            logger.info(
                "%s -> %s via %s: %s, %d B up, %d B down, %.2f s",
                client, self.target, via, result, self.up, self.down,
                time.monotonic() - self.started,
            )

    def handshake(self) -> socket.socket:
        """Read a request, connect upstream and reply; return the upstream socket.

        Raises SocksError after a failure reply, ProtocolError (no reply) for
        bytes that are not SOCKS, OSError if the client goes away.
        """
        version = self.reader.read_byte()
        if version == SOCKS5_VERSION:
            return self.socks5()
        if version == SOCKS4_VERSION:
            return self.socks4()
        raise ProtocolError(f"not a SOCKS request (first byte 0x{version:02x})")

    def socks5(self) -> socket.socket:
        methods = self.reader.read(self.reader.read_byte())
        if Method.NO_AUTHENTICATION not in methods:
            self.wfile.write(bytes([SOCKS5_VERSION, Method.NO_ACCEPTABLE]))
            raise SocksError(Reply.NOT_ALLOWED, "no acceptable authentication method")
        self.wfile.write(bytes([SOCKS5_VERSION, Method.NO_AUTHENTICATION]))
        version, command, _reserved = self.reader.read(3)
        try:
            if version != SOCKS5_VERSION:
                raise SocksError(Reply.GENERAL_FAILURE, f"request version {version}, not 5")
            host, port = read_socks5_address(self.reader)
            self.target = _format_endpoint(host, port)
            if command != Command.CONNECT:
                raise SocksError(Reply.COMMAND_NOT_SUPPORTED, f"command {command} not supported")
            upstream = self.connect_upstream(host, port)
        except SocksError as error:
            self._socks5_reply(error.reply)
            raise
        except OSError as error:
            self._socks5_reply(_reply_code(error))
            raise
        self._socks5_reply(Reply.SUCCEEDED, upstream.getsockname())
        return upstream

    def _socks5_reply(self, reply: Reply, bound: tuple[Any, ...] = ("0.0.0.0", 0)) -> None:
        try:
            self.wfile.write(bytes([SOCKS5_VERSION, reply, 0]) + encode_socks5_address(*_split_host(bound)))
        except OSError:
            pass  # the client left; the log line says why the request failed

    def socks4(self) -> socket.socket:
        command = self.reader.read_byte()
        port, packed_ip = struct.unpack("!H4s", self.reader.read(6))
        self.reader.read_until_nul(MAX_SOCKS4_FIELD)  # the user id, unused
        ip = socket.inet_ntoa(packed_ip)
        if packed_ip[:3] == b"\0\0\0" and packed_ip[3] != 0:
            # SOCKS4a: the host name follows, to be resolved here.
            host = _decode_name(self.reader.read_until_nul(MAX_SOCKS4_FIELD))
        else:
            host = ip
        self.target = _format_endpoint(host, port)
        try:
            if command != Command.CONNECT:
                raise SocksError(Reply.COMMAND_NOT_SUPPORTED, f"command {command} not supported")
            upstream = self.connect_upstream(host, port)
        except OSError:
            self._socks4_reply(Socks4Reply.REJECTED)
            raise
        bound_host, bound_port = _split_host(upstream.getsockname())
        bound_ip = bound_host if upstream.family == socket.AF_INET else "0.0.0.0"
        self._socks4_reply(Socks4Reply.GRANTED, bound_port, bound_ip)
        return upstream

    def _socks4_reply(self, reply: Socks4Reply, port: int = 0, ip: str = "0.0.0.0") -> None:
        try:
            self.wfile.write(struct.pack("!BBH4s", 0, reply, port, socket.inet_aton(ip)))
        except OSError:
            pass

    def connect_upstream(self, host: str, port: int) -> socket.socket:
        """Connect to the target from a dispatched local address.

        When the link of the chosen address fails (unreachable, down, timed
        out...), the other addresses of the family are tried in turn, and
        those that failed sit out once another one has reached the target.
        Each address of a name is tried in turn until one connects (a name
        may resolve to ::1 first while only 127.0.0.1 listens); a connection
        takes one local address per family. Raises the last error.
        """
        balancer = self.dispatcher.balancer
        chosen: dict[socket.AddressFamily, LocalAddress] = {}
        error: OSError = SocksError(Reply.HOST_UNREACHABLE)
        for family, ip in _resolve_target(host, port, balancer.families):
            if family not in chosen:
                chosen[family] = balancer.next(family)
            local: LocalAddress | None = chosen[family]
            failed: list[tuple[LocalAddress, OSError]] = []
            while local is not None:
                self.local = local
                try:
                    upstream = self.dispatcher.open_upstream(local, ip, port)
                except OSError as failure:
                    error = failure
                    if _is_link_failure(failure):
                        failed.append((local, failure))
                        local = balancer.alternative(family, [down for down, _ in failed])
                        continue
                    if _is_target_answer(failure):
                        balancer.reached(local, failed)
                    chosen[family] = local
                    break
                balancer.reached(local, failed)
                balancer.opened(local)
                return upstream
            # No address reached this target: nothing says the links are to
            # blame (the target may be down), so none is made to sit out.
        raise error

    def relay(self, upstream: socket.socket) -> None:
        """Copy both ways, starting with what the client sent early."""
        local = self.local
        balancer = self.dispatcher.balancer

        def count(up: int, down: int) -> None:
            self.up += up
            self.down += down
            if local is not None:
                balancer.add_bytes(local, up, down)

        try:
            relay(self.connection, upstream, early=self.reader.rest(), count=count)
        finally:
            if local is not None:
                balancer.closed(local)


# ---------------------------------------------------------------------------
# Dispatcher: the public API
# ---------------------------------------------------------------------------


class Dispatcher:
    """A dispatching SOCKS proxy.

    ``addresses`` are ``ADDRESS[@WEIGHT]`` texts (IP literals or interface
    names) or LocalAddress objects; None means every usable address.
    ``port=0`` picks a free port: ``.address`` tells which.

        with Dispatcher(["10.0.0.2@7", "10.0.0.3@3"], port=1080) as proxy:
            proxy.serve_forever()

    Raises AddressError for an unusable address and OSError if it cannot listen.
    """

    def __init__(
        self,
        addresses: Iterable[str | LocalAddress] | None = None,
        host: str = "127.0.0.1",
        port: int = 1080,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        handshake_timeout: float = 10.0,
        cooldown: float = DEFAULT_COOLDOWN,
    ) -> None:
        self.balancer = Balancer(resolve_links(addresses), cooldown=cooldown)
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self._device_binding_refused = False
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._server = _Server((host, port), self)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the proxy listens on."""
        return _split_host(self._server.server_address)

    @property
    def addresses(self) -> list[LocalAddress]:
        """The local addresses connections are dispatched to."""
        return self.balancer.addresses

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` is called from another thread."""
        self._serving.set()
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._serving.clear()

    def start(self) -> Dispatcher:
        """Serve in a background thread; return self."""
        self._thread = threading.Thread(target=self.serve_forever, name="dispatch-server", daemon=True)
        self._thread.start()
        self._serving.wait()
        return self

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting, give open connections up to ``grace`` seconds to
        finish, then close them. Safe to call more than once."""
        if self._serving.is_set():
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._server.server_close()
        deadline = time.monotonic() + grace
        while self.open_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._connections_lock:
            for sock in self._connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def open_upstream(self, local: LocalAddress, ip: str, port: int) -> socket.socket:
        """A socket from ``local`` connected to (ip, port), bound to the
        device of ``local`` where the system allows it.

        Without the device, Linux routes by destination alone: a connection
        from the Wi-Fi's address may leave by the cable and be dropped.
        """
        device = None if self._device_binding_refused else _device_for(local, ip)
        if local.interface is None and _CAN_BIND_TO_DEVICE and not _is_ip_loopback(ip):
            self._warn_once(
                "no-interface",
                "no interface is known for %s%s: its connections are bound to the source address only",
                local.ip,
                "" if _has_ifaddr() else " (the ifaddr package is not installed)",
            )
        try:
            return _connect_from(local, ip, port, self.connect_timeout, device)
        except _DeviceBindingRefused as refusal:
            self._device_binding_refused = True
            self._warn_once(
                "device-refused",
                "binding sockets to their interface is not permitted (%s): binding source "
                "addresses only, so connections may leave by the wrong link. To fix it, give "
                "dispatch CAP_NET_RAW (run it as root, or setcap cap_net_raw+ep on the Python "
                "binary), or route by source address: ip rule add from ADDR table N, with a "
                "default route by that link in table N",
                refusal.strerror,
            )
            return _connect_from(local, ip, port, self.connect_timeout)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._warned_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)

    def open_connections(self) -> int:
        """How many client connections are open now."""
        with self._connections_lock:
            return len(self._connections)

    def stats(self) -> list[dict[str, Any]]:
        """Per local address: ip, interface, weight, connections (total and
        open) and bytes each way."""
        return self.balancer.stats()

    def _track(self, sock: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(sock)
            else:
                self._connections.discard(sock)

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def default_log_path() -> str:
    """Where logs go without ``-d``: the platform's usual place for them."""
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
        return os.path.join(base, "dispatch", "Logs", "dispatch.log")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Logs", "dispatch", "dispatch.log")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "dispatch", "dispatch.log")


def _default_route_interfaces() -> set[str]:
    """Names of the interfaces holding a default route (Linux only)."""
    found = set()
    try:
        with open("/proc/net/route") as routes:
            for line in list(routes)[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000" and fields[7] == "00000000":
                    found.add(fields[0])
        with open("/proc/net/ipv6_route") as routes:
            for line in routes:
                fields = line.split()
                if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
                    found.add(fields[9])
    except OSError:
        pass
    return found


def _list_interfaces(out: Any) -> int:
    interfaces = _interfaces()
    defaults = _default_route_interfaces()
    rows = [("INTERFACE", "ADDRESS", "USABLE", "DEFAULT ROUTE")]
    for name, ips in interfaces.items():
        up = _is_up(name)
        for ip in ips or ["-"]:
            usable = ip != "-" and up and _is_usable(ipaddress.ip_address(ip))
            reason = "yes" if usable else ("no (down)" if not up else "no")
            route = "yes" if name in defaults else ("?" if not sys.platform.startswith("linux") else "")
            rows.append((name, ip, reason, route))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    return 0


def _address_table(links: Sequence[Link]) -> str:
    rows = [("ADDRESS", "INTERFACE", "WEIGHT")]
    for link in links:
        interface = link.name if link.is_interface else None
        for address in link.current:
            rows.append((address.ip, address.interface or "-", str(link.weight)))
        if not link.current:
            rows.append(("(none for now)", interface or "-", str(link.weight)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def _setup_logging(debug: bool, log_file: str | None) -> str:
    """Send logs to stdout (debug) or a file; return where they go."""
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    if debug and not log_file:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        where = "stdout"
    else:
        where = log_file or default_log_path()
        os.makedirs(os.path.dirname(os.path.abspath(where)), exist_ok=True)
        handler = logging.FileHandler(where)
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    return where


def _summary(dispatcher: Dispatcher, seconds: float) -> str:
    stats = dispatcher.stats()
    connections = sum(row["connections"] for row in stats)
    up = sum(row["bytes_up"] for row in stats)
    down = sum(row["bytes_down"] for row in stats)
    return (
        f"dispatch: stopped after {seconds:.0f} s: {connections} connections, "
        f"{up} B up, {down} B down"
    )


def _start(args: argparse.Namespace) -> int:
    try:
        dispatcher = Dispatcher(
            args.addresses, args.ip, args.port,
            connect_timeout=args.connect_timeout, cooldown=args.cooldown,
        )
    except AddressError as error:
        print(f"dispatch: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = _format_endpoint(args.ip, args.port)
        print(f"dispatch: error: cannot listen on {where}: {_describe(error)}", file=sys.stderr)
        return 2
    try:
        where = _setup_logging(args.debug, args.log_file)
    except OSError as error:
        print(f"dispatch: error: cannot write the log: {_describe(error)}", file=sys.stderr)
        return 2
    host, port = dispatcher.address
    print(f"dispatch {__version__}: SOCKS4/4a/5 proxy on {_format_endpoint(host, port)}")
    print("dispatching to:")
    print(_address_table(dispatcher.balancer.links))
    print(f"log: {where}", flush=True)
    logger.info("listening on %s", _format_endpoint(host, port))

    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    started = time.monotonic()
    dispatcher.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        dispatcher.shutdown()
    print(_summary(dispatcher, time.monotonic() - started), flush=True)
    logger.info("stopped")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatch",
        description="A SOCKS proxy that balances connections across network interfaces.",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="write debug logs to stdout")
    parser.add_argument("-V", "--version", action="version", version=f"dispatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,start}")
    commands.add_parser("list", help="list the interfaces and their addresses")
    start = commands.add_parser(
        "start",
        help="start the proxy",
        description="Start the proxy. Each ADDRESS is an IP address or an interface "
        "name, with an optional weight: 10.0.0.2@7, wlan0@3 or 10.0.0.2/7. "
        "An interface's addresses are followed as they change. "
        "With none, every interface with a usable address is used with weight 1.",
    )
    start.add_argument(
        "-d", "--debug", action="store_true", default=argparse.SUPPRESS, help="write debug logs to stdout"
    )
    start.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=_port, default=1080, help="port to listen on (default 1080)")
    start.add_argument(
        "--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
        help="give up connecting upstream after this long (default 5)",
    )
    start.add_argument(
        "--cooldown", type=_seconds, default=DEFAULT_COOLDOWN, metavar="SECONDS",
        help="after a link failure, leave the address out for this long (default 30)",
    )
    start.add_argument("--log-file", metavar="PATH", help=f"log here (default {default_log_path()})")
    start.add_argument("addresses", nargs="*", metavar="ADDRESS[@WEIGHT]")
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``dispatch [-d] {list,start} ...``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "list":
        try:
            return _list_interfaces(sys.stdout)
        except AddressError as error:
            print(f"dispatch: error: {error}", file=sys.stderr)
            return 2
    return _start(args)


if __name__ == "__main__":
    raise SystemExit(main())
