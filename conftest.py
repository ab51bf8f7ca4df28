"""Helpers and fixtures of dispatch's tests: servers, proxies, clients, logs, fakes.

Fixtures (``make_proxy``, ``make_server``, ``make_origin``, ``script``,
``log``, ...) are found by pytest; the plain helpers and classes here
(``client_through``, ``raw_client``, ``TIMEOUT``, ``Server``, ...) are
imported by the test modules: ``from conftest import ...``.

Every server binds port 0 on loopback and is closed after its test; no
test depends on a fixed port being free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import logging
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import socks

import dispatch
from dispatch import Dispatcher, Reply


HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10.0


# Servers the proxy connects to ---------------------------------------------


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


class Server:
    """A TCP server on loopback running ``serve(conn)`` per connection in a
    thread; on a free port, or on ``port`` (in a lab's namespace)."""

    def __init__(self, serve: Callable[[socket.socket], None], host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(2048)
        self.host, self.port = self.listener.getsockname()[:2]
        self.serve = serve
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        with conn, contextlib.suppress(OSError):
            self.serve(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def echo(conn: socket.socket) -> None:
    """Echo everything, then half-close when the client has."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def tell_peer(conn: socket.socket) -> None:
    """Write the connection's source address, then close."""
    conn.sendall(conn.getpeername()[0].encode())


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Start TCP servers on a free loopback port: ``make_server(serve, host)``;
    close them all after the test."""
    started: list[Server] = []

    def make(serve: Callable[[socket.socket], None], host: str = "127.0.0.1") -> Server:
        server = Server(serve, host)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def echo_server(make_server: Callable[..., Server]) -> Server:
    return make_server(echo)


@pytest.fixture
def peer_server(make_server: Callable[..., Server]) -> Server:
    return make_server(tell_peer)


@pytest.fixture
def echo_server6(make_server: Callable[..., Server]) -> Server:
    """The echo server on ::1; the test is skipped where there is no IPv6 loopback."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    return make_server(echo, host="::1")


@pytest.fixture
def peer_server6(make_server: Callable[..., Server]) -> Server:
    """The peer server on ::1; the test is skipped where there is no IPv6 loopback."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) here")
    return make_server(tell_peer, host="::1")


class Origin(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 origin server with keep-alive, for the proxy to forward to.

    GET /chunked answers in chunks, GET /close with a body ended by closing,
    GET /big with 8 MB, GET /204 and /304 with no body; any other GET tells what it saw; POST
    echoes the body (Content-Length or chunked).
    """

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif self.path == "/big":
            self._answer(b"b" * 8_000_000)
        elif self.path in ("/204", "/304"):
            self.send_response(int(self.path[1:]))
            self.end_headers()
        else:
            lines = [f"{self.command} {self.path}", f"peer {self.client_address[0]}:{self.client_address[1]}"]
            lines += [f"{name.lower()}: {value}" for name, value in self.headers.items()]
            hop_by_hop = [("Keep-Alive", "timeout=5"), ("Connection", "X-Private"), ("X-Private", "1")]
            self._answer("\n".join(lines).encode(), hop_by_hop)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            # A body cut short (the proxy refused the rest) ends like the last chunk.
            while (line := self.rfile.readline()) and (size := int(line.split(b";")[0], 16)):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(body)

    def _answer(self, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OriginServer(http.server.ThreadingHTTPServer):
    """Serves Origin; a client that hangs up early (as some tests make the
    proxy do) is not an error worth a traceback in the test output."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def make_origin() -> Iterator[Callable[[], str]]:
    """Start HTTP origins (Origin) on a free loopback port; each call returns
    a base URL. They are all stopped after the test."""
    started: list[OriginServer] = []

    def make() -> str:
        server = OriginServer(("127.0.0.1", 0), Origin)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def origin(make_origin: Callable[[], str]) -> str:
    """An HTTP origin on loopback; its base URL."""
    return make_origin()


@pytest.fixture
def silent_origin(make_server: Callable[..., Server]) -> tuple[Server, threading.Event]:
    """An origin that takes requests and never answers; the event tells that one came."""
    asked = threading.Event()

    def serve(conn: socket.socket) -> None:
        while conn.recv(65536):
            asked.set()

    return make_server(serve), asked


class UdpServer:
    """A UDP server on loopback (or ``host``): answers each datagram with
    ``answer(data, sender)`` and keeps what it received."""

    def __init__(self, answer: Callable[[bytes, tuple[str, int]], bytes], host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        self.received: list[bytes] = []
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, sender = self.sock.recvfrom(65535)
                self.received.append(data)
                self.sock.sendto(self.answer(data, sender), sender)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpServer]:
    server = UdpServer(lambda data, sender: data)
    yield server
    server.close()


@pytest.fixture
def udp_sender() -> Iterator[UdpServer]:
    """Answers with the IP address the datagram came from."""
    server = UdpServer(lambda data, sender: sender[0].encode())
    yield server
    server.close()


FLOOD = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
reply, to, end = bytes.fromhex(sys.argv[2]), (sys.argv[3], int(sys.argv[4])), time.monotonic() + float(sys.argv[5])
while time.monotonic() < end:
    try:
        sock.sendto(reply, to)
    except OSError:
        pass
"""


class DnsServer:
    """A DNS server on UDP and TCP (one port), answering from a table with
    dnspython's message API, and misbehaving on demand.

    ``names``: {name: [address, ...]}, A and AAAA records by the addresses'
    family; a name not there is NXDOMAIN. ``behaviour``: {name: how}, how
    one of "nxdomain", "servfail", "refused", "truncated" (over UDP: the
    flag and no records; over TCP: the whole answer), "malformed",
    "wrong-id", "other-question", "other-source" (sent from another port),
    "silent", "flood" (wrong-id answers from another process, as fast as it
    can send them, until the server closes or for TIMEOUT), "drop-first" (no answer to the first query of a name
    and type), "late" (the first query's answer after ``late_by`` seconds,
    none to the others). Queries from the addresses in ``silent_to`` get no answer.
    ``queries``: (name, type, transport, source address) heard.
    """

    ttl = 60
    late_by = 2.5

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(50):  # a UDP port whose TCP twin is free too
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((host, port))
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind((host, self.udp.getsockname()[1]))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
        self.tcp.listen(16)
        self.host, self.port = host, self.udp.getsockname()[1]
        self.names: dict[str, list[str]] = {}
        self.behaviour: dict[str, str] = {}
        self.silent_to: set[str] = set()
        self.queries: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()
        self._stray = socket.socket(family, socket.SOCK_DGRAM)
        self._floods: list[subprocess.Popen] = []
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=serve, daemon=True) for serve in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    @property
    def address(self) -> str:
        """The server as --dns names it."""
        return dispatch._format_endpoint(self.host, self.port)

    def asked(self, name: str, transport: str | None = None) -> list[tuple[str, str, str, str]]:
        """The queries heard for ``name`` (over ``transport``, if given)."""
        with self._lock:
            return [q for q in self.queries if q[0] == name and transport in (None, q[2])]

    def answer(self, data: bytes, transport: str, source: str) -> bytes | None:
        """The bytes to send back for the query ``data``; None for no answer."""
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        with self._lock:
            self.queries.append((name, dns.rdatatype.to_text(question.rdtype), transport, source))
            first = [q[:2] for q in self.queries].count(self.queries[-1][:2]) == 1
        how = self.behaviour.get(name, "")
        if how == "silent" or source in self.silent_to or (how, first) in {("drop-first", True), ("late", False)}:
            return None
        if how == "malformed":
            return data[:2] + b"\x81\x80\x00\x01\x00\x05\x00\x00\x00\x00\xc0"  # five records promised, none there
        response = dns.message.make_response(query)
        if how == "other-question":
            response = dns.message.make_response(dns.message.make_query("other.test", question.rdtype))
            response.id = query.id
        if how in ("wrong-id", "flood"):
            response.id = (query.id + 1) % 65536
        rcodes = {"nxdomain": dns.rcode.NXDOMAIN, "servfail": dns.rcode.SERVFAIL, "refused": dns.rcode.REFUSED}
        if how in rcodes:
            response.set_rcode(rcodes[how])
        elif how == "truncated" and transport == "udp":
            response.flags |= dns.flags.TC
        elif name not in self.names:
            response.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.from_text("test.", 300, "IN", "SOA", "ns.test. admin.test. 1 60 60 60 5")
            response.authority.append(soa)
        else:
            family = "AAAA" if question.rdtype == dns.rdatatype.AAAA else "A"
            ips = [ip for ip in self.names[name] if (":" in ip) == (family == "AAAA")]
            if ips:
                response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", family, *ips))
        return response.to_wire()

    def _serve_udp(self) -> None:
        while not self._closed.is_set():
            try:
                data, sender = self.udp.recvfrom(65535)
            except OSError:
                return
            try:
                reply = self.answer(data, "udp", sender[0])
                if reply is not None:
                    how = self.behaviour.get(self.queries[-1][0], "")
                    if how == "flood":
                        self._flood(reply, sender)
                        continue
                    if how == "late":
                        threading.Thread(target=self._send_late, args=(reply, sender), daemon=True).start()
                        continue
                    (self._stray if how == "other-source" else self.udp).sendto(reply, sender)
            except Exception:  # a query this server cannot read: no answer, as a real one
                continue

    def _flood(self, reply: bytes, sender: tuple[str, int]) -> None:
        # Another process, from this server's socket: a thread of this one
        # would share the interpreter with the proxy and flood no faster than it reads.
        arguments = [str(self.udp.fileno()), reply.hex(), sender[0], str(sender[1]), str(TIMEOUT)]
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, *arguments], pass_fds=[self.udp.fileno()])
        with self._lock:
            self._floods.append(flood)

    def _send_late(self, reply: bytes, sender: tuple[str, int]) -> None:
        if not self._closed.wait(self.late_by):
            with contextlib.suppress(OSError):
                self.udp.sendto(reply, sender)

    def _serve_tcp(self) -> None:
        while not self._closed.is_set():
            try:
                conn, sender = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(conn, sender[0]), daemon=True).start()

    def _serve_connection(self, conn: socket.socket, source: str) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                (size,) = struct.unpack("!H", recv_exactly(conn, 2))
                reply = self.answer(recv_exactly(conn, size), "tcp", source)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except (OSError, AssertionError):
                return

    def close(self) -> None:
        """Stop serving and free the port (a fixed one too, for the next server)."""
        self._closed.set()
        with self._lock:
            for flood in self._floods:
                flood.kill()
                flood.wait()
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):  # an unconnected socket says ENOTCONN, and wakes its reader
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(TIMEOUT)
        for sock in (self.udp, self.tcp, self._stray):
            sock.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


def refused_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def unanswered_address() -> Iterator[tuple[str, int]]:
    """A loopback address where a connect hangs until it times out."""
    with unanswered_addresses(["127.0.0.1"]) as port:
        yield "127.0.0.1", port


@contextlib.contextmanager
def unanswered_addresses(ips: Sequence[str]) -> Iterator[int]:
    """A port where a connect to any of the loopback addresses ``ips``
    hangs until it times out.

    A listener whose accept queue is full drops new SYNs.
    """
    port = 0
    with contextlib.ExitStack() as stack:
        for ip in ips:
            full = stack.enter_context(socket.socket())
            full.bind((ip, port))
            full.listen(0)
            port = full.getsockname()[1]
            stack.enter_context(socket.create_connection((ip, port), timeout=TIMEOUT))
        yield port


# Proxies -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_state_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dispatch start`` keeps its state file (and log) under XDG_STATE_HOME
    by default: each test has its own, so that no test starts from what
    another measured, and the user's is never touched."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def own_desktop_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the user's proxy settings: no desktop is named (a
    test that wants one names it), gsettings keeps its keys in the test's
    own file (the keyfile backend under its own XDG_CONFIG_HOME, where
    kwriteconfig writes too), and no session bus or sudo user is known."""
    for name in ("XDG_CURRENT_DESKTOP", "KDE_SESSION_VERSION", "SUDO_USER", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GSETTINGS_BACKEND", "keyfile")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """Undo what the command line or a test does to the logger (handlers
    added, no propagation), so that caplog sees the records of later tests."""
    logger = dispatch.logger
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., Dispatcher]]:
    """Make Dispatchers on a free loopback port, serving in the background
    unless ``start=False``; shut them all down after the test.

    A shutdown that hangs fails the test rather than hanging the run.
    """
    made: list[Dispatcher] = []

    def make(addresses: list[str] | None = None, *, start: bool = True, **options: object) -> Dispatcher:
        options.setdefault("port", 0)
        proxy = Dispatcher(["127.0.0.1"] if addresses is None else addresses, **options)
        made.append(proxy)
        return proxy.start() if start else proxy

    yield make
    hung = []
    for proxy in made:
        stopping = threading.Thread(target=proxy.shutdown, daemon=True)
        stopping.start()
        stopping.join(TIMEOUT)
        if stopping.is_alive():
            hung.append(proxy.address)
    assert not hung, f"shutdown() hung for the proxies on {hung}"


@pytest.fixture
def proxy(make_proxy: Callable[..., Dispatcher]) -> Dispatcher:
    return make_proxy()


@dataclasses.dataclass(frozen=True)
class Listening:
    """Where a proxy that runs elsewhere (main() in this process, a script)
    listens: all that client_through needs of it."""

    address: tuple[str, int]


def run_script(arguments: list[str], popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> subprocess.Popen:
    """``python dispatch.py ARGUMENTS`` as a user runs it, output in pipes.

    The process is killed after a deadline, which also ends its output: a test
    reading it line by line can never wait forever.
    """
    process = popen(
        [sys.executable, os.path.join(HERE, "dispatch.py"), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(TIMEOUT * 6, process.kill)
    watchdog.daemon = True
    watchdog.start()
    return process


@pytest.fixture
def script() -> Iterator[Callable[[list[str]], subprocess.Popen]]:
    """Run ``python dispatch.py ARGUMENTS`` (run_script); what still runs
    after the test is killed, and its pipes are closed."""
    started: list[subprocess.Popen] = []

    def run(arguments: list[str]) -> subprocess.Popen:
        process = run_script(arguments)
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def run_cli(arguments: list[str], use: Callable[[Listening, Callable[[], None]], None], log_file: str) -> int:
    """Run ``dispatch start`` in this process on a free port; once it handles
    SIGTERM, call ``use(running, stop)`` from another thread (``running.address`` is
    where it listens, ``stop()`` sends SIGTERM, also sent after ``use``);
    return the exit status."""
    port = refused_port()
    running = Listening(("127.0.0.1", port))
    failures: list[BaseException] = []
    stopped: list[bool] = []

    def stop() -> None:
        if not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    def stoppable() -> bool:
        # The proxy listens before it handles SIGTERM, which must not reach
        # the default handler: that would end the test run.
        return getattr(signal.getsignal(signal.SIGTERM), "__name__", "") == "on_stop_signal"

    def drive() -> None:
        if not wait_for(stoppable):
            failures.append(AssertionError("the proxy never got ready to stop"))
            return
        try:
            use(running, stop)
        except BaseException as failure:
            failures.append(failure)
        finally:
            stop()

    helper = threading.Thread(target=drive)
    helper.start()
    status = dispatch.main(["start", "--port", str(port), "--log-file", log_file, *arguments])
    helper.join(TIMEOUT)
    if failures:
        raise failures[0]
    return status


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until_all_closed(proxy: Dispatcher) -> None:
    assert wait_for(lambda: proxy.open_connections() == 0)


# Upstream proxies nobody here wrote ----------------------------------------

DANTED = "/usr/sbin/danted"
MICROSOCKS = shutil.which("microsocks") or "/usr/bin/microsocks"


class UpstreamServer:
    """A proxy server of another project, run as a process on a free
    loopback port: ``url`` names it as an ADDRESS (with its login)."""

    def __init__(self, kind: str, argv: list[str], url: str, port: int, output: str, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.url = url
        self.host = host
        self.port = port
        self.output = output  # what it writes, in a file: a pipe nobody reads could fill and stop it
        with open(output, "wb") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not self.accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(output, errors="replace") as written:
                    raise RuntimeError(f"{kind} did not start: {written.read().strip()[-500:]}")
            time.sleep(0.02)

    def accepts(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Kill it: connections to its port are refused from now on."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        # Dante's child processes hold the listening socket a moment longer,
        # accepting and resetting connections in the meantime.
        wait_for(lambda: not self.accepts())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server of another project."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def dante_config(port: int, host: str = "127.0.0.1", clients: str = "127.0.0.0/8") -> str:
    """A danted.conf: no login, CONNECT and UDP ASSOCIATE for ``clients``."""
    return "\n".join(
        [
            "logoutput: stderr",
            f"internal: {host} port = {port}",
            f"external: {host}",
            "socksmethod: none",
            "clientmethod: none",
            "user.privileged: root",
            "user.unprivileged: nobody",
            f"client pass {{ from: {clients} to: 0.0.0.0/0 }}",
            "client block { from: 0.0.0.0/0 to: 0.0.0.0/0 }",
            "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }",
            "",
        ]
    )


@pytest.fixture
def make_upstream(tmp_path: Any) -> Iterator[Callable[..., UpstreamServer]]:
    """Start upstream proxies: ``make_upstream(kind, login=None)``, kind one
    of "pproxy-socks5", "pproxy-socks4", "pproxy-http", "microsocks", "dante";
    each on a free loopback port (of ``host``), stopped after the test. Dante has no logins of its own
    (it checks system accounts); a kind that is not installed is skipped."""
    started: list[UpstreamServer] = []

    def make(
        kind: str, login: tuple[str, str] | None = None, *, clients: str = "127.0.0.0/8", host: str = "127.0.0.1"
    ) -> UpstreamServer:
        port = free_port(host)
        secret = f"{login[0]}:{login[1]}" if login else ""
        scheme = {"pproxy-http": "http", "pproxy-socks4": "socks4"}.get(kind, "socks5")
        endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        url = f"{scheme}://{secret + '@' if login else ''}{endpoint}"
        if kind.startswith("pproxy"):
            listen = f"{scheme}://{endpoint}" + (f"#{secret}" if login else "")
            # --auth 0: every connection logs in, not only an address's first.
            argv = [sys.executable, "-m", "pproxy", "-l", listen, "--auth", "0"]
        elif kind == "microsocks":
            if not os.path.exists(MICROSOCKS):
                pytest.skip("microsocks is not installed")
            argv = [MICROSOCKS, "-i", host, "-p", str(port)]
            argv += ["-u", login[0], "-P", login[1]] if login else []
        elif kind == "dante":
            if not os.path.exists(DANTED) or os.geteuid() != 0:
                pytest.skip("Dante (danted) is not installed, or this is not root")
            config = tmp_path / f"danted-{port}.conf"
            config.write_text(dante_config(port, clients=clients))
            argv = [DANTED, "-f", str(config), "-p", str(tmp_path / f"danted-{port}.pid"), "-N", "1"]
        else:
            raise ValueError(kind)
        try:
            server = UpstreamServer(kind, argv, url, port, str(tmp_path / f"{kind}-{port}.out"), host)
        except RuntimeError as error:
            if kind == "dante":
                pytest.skip(str(error))
            raise
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# Clients -------------------------------------------------------------------


def client_through(
    proxy: Dispatcher | Listening,
    target: tuple[str, int],
    kind: int = socks.SOCKS5,
    rdns: bool = False,
    login: tuple[str, str] | None = None,
) -> socks.socksocket:
    """A PySocks socket connected to ``target`` through ``proxy``."""
    family = socket.AF_INET6 if ":" in proxy.address[0] else socket.AF_INET
    client = socks.socksocket(family, socket.SOCK_STREAM)
    username, password = login or (None, None)
    client.set_proxy(kind, *proxy.address, rdns=rdns, username=username, password=password)
    client.settimeout(TIMEOUT)
    client.connect(target)
    return client


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return all that comes back."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    return read_all(sock)


def raw_client(proxy: Dispatcher) -> socket.socket:
    """A plain socket connected to the proxy, for hand-written handshakes."""
    sock = socket.create_connection(proxy.address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"got {len(data)} of {size} bytes")
        data += chunk
    return data


def recv_until(sock: socket.socket, end: bytes) -> bytes:
    """Receive until what came ends with ``end``; all of it."""
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed before {end!r}, after {len(data)} bytes")
        data += chunk
    return data


def closed_by_proxy(sock: socket.socket) -> bool:
    """Whether the proxy closes ``sock`` (EOF or reset) with nothing more to say."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def peers_seen(proxy: Dispatcher, server: Server, count: int) -> list[str]:
    """What ``server`` (tell_peer) sees as the source of ``count`` connections in turn."""
    seen = []
    for _ in range(count):
        with client_through(proxy, (server.host, server.port)) as client:
            seen.append(read_all(client).decode())
    return seen


def socks5_request(host: str, port: int, command: int = 1) -> bytes:
    return bytes([5, command, 0]) + dispatch.encode_socks5_address(host, port)


def socks5_reply(sock: socket.socket) -> tuple[int, str, int]:
    """Read a SOCKS5 reply; return (code, bound host, bound port)."""
    version, code, _, atyp = recv_exactly(sock, 4)
    assert version == 5
    size = {1: 4, 4: 16}[atyp]
    host = socket.inet_ntop(socket.AF_INET if atyp == 1 else socket.AF_INET6, recv_exactly(sock, size))
    (port,) = struct.unpack("!H", recv_exactly(sock, 2))
    return code, host, port


def socks4_request(ip: str, port: int, command: int = 1, host: str | None = None) -> bytes:
    packed = socket.inet_aton("0.0.0.1" if host else ip)
    request = struct.pack("!BBH4s", 4, command, port, packed) + b"user\0"
    return request + (host.encode() + b"\0" if host else b"")


def socks5_code_for(proxy: Dispatcher, request: bytes) -> int:
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(request)
        code, _, _ = socks5_reply(sock)
        assert sock.recv(1) == b""  # the proxy closes after a failure
        return code


LOGIN = ("alice", "s3cret-pass")


def proxy_url(proxy: Dispatcher) -> str:
    return f"http://127.0.0.1:{proxy.address[1]}"


def curl(*arguments: str) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), *arguments], capture_output=True, text=True, timeout=TIMEOUT * 2
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response framed by Content-Length (or by the close)."""
    reader = dispatch.DeadlineReader(sock)
    lines = dispatch.read_head(reader, dispatch.MAX_RESPONSE_HEADER_LINE, dispatch.MAX_RESPONSE_HEADER_BYTES)
    status = int(lines[0].split()[1])
    headers = {name.lower(): value for name, value in dispatch.parse_header_lines(lines[1:])}
    if status in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = reader.read(int(headers["content-length"]))
    else:
        body = reader.rest() + read_all(sock)
    assert not reader.buffered
    return status, headers, body


def http_exchange(proxy: Dispatcher, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with raw_client(proxy) as sock:
        sock.sendall(request)
        return read_response(sock)


def read_request_head(conn: socket.socket) -> bytes:
    """Read a request head from ``conn``; b"" if it closed first."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = conn.recv(1)
        if not chunk:
            return b""
        head += chunk
    return head


def udp_client(proxy: Dispatcher) -> socks.socksocket:
    client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    client.set_proxy(socks.SOCKS5, *proxy.address)
    client.settimeout(TIMEOUT)
    return client


def udp_associate(proxy: Dispatcher, client_port: int) -> tuple[socket.socket, tuple[str, int]]:
    """A raw UDP ASSOCIATE naming ``client_port``; return the TCP socket and the relay address."""
    sock = raw_client(proxy)
    sock.sendall(b"\x05\x01\x00" + socks5_request("0.0.0.0", client_port, command=3))
    assert recv_exactly(sock, 2) == b"\x05\x00"
    code, host, port = socks5_reply(sock)
    assert code == Reply.SUCCEEDED
    return sock, (host, port)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    return sock


# Logs ----------------------------------------------------------------------


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """What dispatch logs from INFO up, for the whole test.

    ``exchanges(log)`` gives the record of each exchange; ``log.text`` is for
    the lines whose words are the behaviour (warnings, refusals, secrets
    that must not show).
    """
    caplog.set_level(logging.INFO, logger="dispatch")
    return caplog


def exchanges(log: pytest.LogCaptureFixture) -> list[dispatch.ExchangeRecord]:
    """The ExchangeRecord of each exchange logged so far, in order."""
    return [record.exchange for record in log.records if hasattr(record, "exchange")]


def refusal_lines(log: pytest.LogCaptureFixture) -> list[str]:
    return [record.message for record in log.records if record.message.startswith("refused ")]


# Fakes ---------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeInterfaces:
    """Stands in for the interface reader; counts how often it is read."""

    def __init__(self, **interfaces: list[str]) -> None:
        self.interfaces = interfaces
        self.reads = 0

    def __call__(self) -> list[dispatch.Interface]:
        self.reads += 1
        return [dispatch.Interface(name, ips=tuple(ips)) for name, ips in self.interfaces.items()]


@pytest.fixture
def fake_interfaces(monkeypatch: pytest.MonkeyPatch) -> FakeInterfaces:
    """Interfaces as a test says; loopback addresses count as usable.

    Private names: a Dispatcher resolves and follows interfaces through the
    module's own reader (it has no seam like LinkSet's ``interface_reader``),
    so that reader and its filters are replaced.
    """
    reader = FakeInterfaces()
    monkeypatch.setattr(dispatch, "_interfaces", reader)
    monkeypatch.setattr(dispatch, "_is_up", lambda name: True)
    monkeypatch.setattr(dispatch, "_is_usable_address", lambda ip: True)
    monkeypatch.setattr(dispatch, "INTERFACE_REFRESH_INTERVAL", 0.05)
    return reader


@pytest.fixture(autouse=True)
def no_system_name_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test asks this machine's name servers: a proxy left to find them
    finds none and leaves names to the system's resolver (which fake_names
    answers); tests of the resolver name their own server on loopback.

    Private seam: discovery itself is tested with recorded files."""
    monkeypatch.setattr(dispatch, "system_name_servers", lambda: ([], dispatch.ResolvConf()))


@pytest.fixture
def fake_names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the proxy's resolver answers with the given addresses, in order.

    /etc/hosts differs between machines (``localhost`` may or may not have
    ::1), so names with a known answer are made up here.
    """
    names: dict[str, list[str]] = {}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list[tuple]:
        key = host.decode() if isinstance(host, bytes) else host
        if key not in names:
            return real_getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in names[key]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


@pytest.fixture
def loopback_guard(monkeypatch: pytest.MonkeyPatch, echo_server: Server) -> None:
    """Fuzzed requests name any target: let the proxy connect to the echo
    server's address only, refusing the rest before any lookup or packet.

    Every target of a connect, a name or an address, goes through
    Resolver.resolve, so nothing leaves for an address the fuzzing made up.
    """
    resolve = dispatch.Resolver.resolve

    def guarded(resolver: dispatch.Resolver, host: str, *args: Any, **kwargs: Any) -> Any:
        if host != echo_server.host:
            raise dispatch.SocksError(Reply.NOT_ALLOWED, "not a target of this test")
        return resolve(resolver, host, *args, **kwargs)

    monkeypatch.setattr(dispatch.Resolver, "resolve", guarded)


# A status as Dispatcher.status() gives it, for the pages -------------------


COUNTED = ("connections", "failed", "bytes_up", "bytes_down", "rate_up", "rate_down")


def status_row(ip: str, link: str, **fields: Any) -> dict[str, Any]:
    """One stats() row: an idle link that is up, unless fields say otherwise."""
    return dict(dispatch.stats_row(link, ip=ip, **fields))


def wave(count: int, scale: float, phase: float) -> list[float]:
    return [scale * (1 + math.sin(i / 9 + phase)) for i in range(count)]


def sample_status(step: int = 0, points: int = 150) -> dict[str, Any]:
    """A status as Dispatcher.status() gives it; a later ``step`` has grown
    counters, a fourth link (cell0) and an uptime one hour longer per step."""
    rows = [
        status_row(
            "192.168.1.20",
            "wlan0",
            weight=3,
            connections=120 + step,
            failed=2,
            open=3,
            bytes_up=5_300_000,
            bytes_down=1_234_567_890 + step * 10**9,
            rate_up=12_345.0,
            rate_down=1_523_456.0,
            capacity=2_500_000.0,
            capacity_source="measured",
            capacity_age=64.2,
            dns_queries=31,
            dns_cache_hits=89,
            dns_failures=1,
        ),
        status_row(
            "10.42.0.7",
            "usb0",
            state="down",
            reason="timed out; tried again in 4 s",
            connections=40,
            failed=9,
            bytes_up=812_000,
            bytes_down=99_000_000,
            capacity=900_000.0,
            capacity_source="remembered",
        ),
        status_row("2001:db8::20", "enp3s0", tier="backup", state="standby", reason="a primary link is up"),
    ]
    history = {
        "192.168.1.20": {"rate_down": wave(points, 800_000, step), "rate_up": wave(points, 9_000, step)},
        "10.42.0.7": {"rate_down": wave(points // 2, 200_000, 2), "rate_up": wave(points // 2, 3_000, 3)},
    }
    if step:
        rows.append(
            status_row(
                "172.20.10.2", "cell0", open=2, bytes_down=2_000_000 * step, rate_down=300_000.0, capacity=900_000.0
            )
        )
        history["172.20.10.2"] = {"rate_down": wave(10, 300_000, 4), "rate_up": wave(10, 2000, 5)}
    return {
        "version": "0.2.0",
        "uptime": 3725.0 + 3600 * step,
        "listening": "127.0.0.1:1080",
        "balance": "measured",
        "open_connections": 4,
        "refused": 1,
        "totals": {key: sum(row[key] for row in rows) for key in COUNTED},
        "addresses": rows,
        "history": {"interval": 2.0, "addresses": history},
        "bonds": [],
        "caps": [],
        "links": [],
        "system_proxy": "not set",
    }


# What the browser and the network lab need, or a skip ----------------------


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def import_netlab() -> Any:
    """tools/netlab.py, the network lab."""
    sys.path.insert(0, os.path.join(HERE, "tools"))
    try:
        import netlab
    finally:
        sys.path.pop(0)
    return netlab


def netlab_or_skip() -> Any:
    """tools/netlab.py where a lab can be built here; otherwise the test
    skips, saying why (it needs Linux, root, and iproute2's ip netns and tc)."""
    netlab = import_netlab()
    available, reason = netlab.Lab.available()
    if not available:
        pytest.skip(reason)
    return netlab
