#!/usr/bin/env python3
"""Speed-and-scale benchmark: dispatch side by side with direct connections and peer proxies.

    python tools/bench.py                       # full run, every installed proxy
    python tools/bench.py --quick               # small sizes, a minute or so
    python tools/bench.py --only dispatch,dante --rounds 5 --json out.json
    python tools/bench.py --transparent --rounds 3  # a phone through transparent mode, in the network lab
    python tools/bench.py --veth --tests cconns,bulk  # across a veth pair between two namespaces (root)
    python tools/bench.py --loopback-netns --tests cconns  # loopback in a namespace, go-dispatch-proxy too

By default everything runs on 127.0.0.1: the benchmark starts its own target
servers (a bulk source/sink and an echo server, in a separate process) and every
proxy that is installed -- dispatch (``dispatch.py`` next to this ``tools``
directory), Dante (``danted``), pproxy, microsocks and go-dispatch-proxy.  A
proxy that is not installed is skipped with a line saying so.  The only
dependency is the Python standard library.

``--veth`` runs the proxies, the direct client and the load generators in one
network namespace, the target servers in another, joined by one unshaped veth
pair (``tools/netlab.py``); every proxy's one link is the address of its near
end.  go-dispatch-proxy (``--go-dispatch-proxy PATH``: a binary, or a source
checkout or bare git repository that ``go build`` builds into the work
directory) takes as its link only an address of an interface other than lo, so
on plain loopback it is skipped; ``--loopback-netns`` measures loopback with it:
everything in the first namespace of that pair, the targets and every proxy's
link on the veth end's address, the traffic through lo.

One more column is a reference rather than a peer: ``splice_relay.c`` (built with
``cc`` where there is one), the least a relay can do: two threads per connection,
each a blocking splice() loop.  What it reaches is what this machine gives any
relay; dispatch's ratio to it shows what dispatch's own work costs.

Measures, run in alternating rounds (each round visits every target in turn,
starting one further along each time, so noise and the place in the order hit
them all alike); the report shows the median over rounds:

* bulk throughput, download and upload, 1 and 4 parallel streams (MB/s, 10^6 B);
* short connections per second, 8 in parallel (connect, SOCKS5 handshake,
  16-byte echo, close);
* handshake latency: p50/p99 of connect + SOCKS5 + one echo round trip, over
  sequential connections, and the same minus the direct figure ("added");
* connections held: proxy RSS per held connection (N connections, 1 KB each way),
  and the seconds until the proxy's threads and descriptors (but pipes kept for
  reuse) are back to idle after the client closes them all;
* a burst of short connections through dispatch only, counting successes.

``--transparent`` measures instead, in the network lab (Linux, root, nft), a
phone on the gateway's LAN with no proxy setting beside a SOCKS5 client on
the gateway, taking turns: short connections per second and a batch of
downloads over the lab's three shaped links.

The load generators run in forked worker processes, so they do not share a GIL
with the target servers; CPU use of proxy, load generator and target server is
reported per measurement to show which one was the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import importlib.util
import ipaddress
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
DISPATCH = REPO / "dispatch.py"
SPLICE_RELAY_SOURCE = REPO / "tools" / "splice_relay.c"
LOADGEN_SOURCE = REPO / "tools" / "loadgen.c"
PEERS = ("dante", "pproxy", "microsocks", "go-dispatch-proxy")
REFERENCES = ("splice-relay",)
PROXY_NAMES = ("dispatch", "dispatch-before", "dispatch-paged", "dispatch-upstream", *PEERS, *REFERENCES)
# dispatch-paged: dispatch while a client polls its status page this often.
PAGE_POLL_INTERVAL = 0.1

IO_TIMEOUT = 10.0  # any single socket operation
BUFFER_SIZE = 1 << 20  # bulk send/recv buffer: large, so the generator is not syscall-bound
PING = b"0123456789abcdef"  # short-connection payload
HELD_PAYLOAD = b"h" * 1024  # each held connection carries 1 KB each way
CLK_TCK = os.sysconf("SC_CLK_TCK")

Address = tuple[str, int]
Figures = dict[str, float]
WaitForGo = Callable[[], None]


@dataclass(frozen=True)
class Site:
    """Where a run happens: the address the proxies listen on, the one link
    they send from, and the address of the target servers; the network
    namespaces of proxies and targets (None: this process's own)."""

    listen: str = LOOPBACK
    link: str = LOOPBACK
    target_host: str = LOOPBACK
    proxy_ns: str | None = None
    target_ns: str | None = None

    def in_proxy_ns(self, command: list[str]) -> list[str]:
        """``command`` run in the proxies' namespace, with its view of /sys."""
        return ["ip", "netns", "exec", self.proxy_ns, *command] if self.proxy_ns else command

    def in_target_ns(self, command: list[str]) -> list[str]:
        """``command`` run in the target servers' namespace."""
        return ["ip", "netns", "exec", self.target_ns, *command] if self.target_ns else command

    def describe(self) -> str:
        """One line for the report: where the figures were measured."""
        if self.target_ns is None:
            return f"on loopback: proxies and targets on {self.target_host}"
        if self.target_ns == self.proxy_ns:
            return (
                f"on loopback in namespace {self.proxy_ns}: proxies' link and targets on {self.target_host}, "
                f"a veth end's address"
            )
        return (
            f"across a veth pair: proxies and load generators in namespace {self.proxy_ns} (link {self.link}), "
            f"target servers in {self.target_ns} ({self.target_host})"
        )


ON_LOOPBACK = Site()


def entered(ns: str | None) -> contextlib.AbstractContextManager[None]:
    """The calling thread in network namespace ``ns`` for a while (None: where it is)."""
    if ns is None:
        return contextlib.nullcontext()
    import netlab

    return netlab.netns(ns)


# --------------------------------------------------------------------------------------
# Raw SOCKS5 client
# --------------------------------------------------------------------------------------


class SocksError(Exception):
    """The proxy refused or garbled the SOCKS5 exchange."""


@dataclass(frozen=True)
class Route:
    """How to reach a target: directly (proxy None) or through a SOCKS5 proxy."""

    proxy: Address | None = None
    pipelined: bool = False  # greeting and CONNECT request in one write


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes or raise ConnectionError on early EOF."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"EOF after {got} of {size} bytes")
        got += n
    return bytes(buf)


def socks5_handshake(sock: socket.socket, dst: Address, pipelined: bool) -> None:
    """Negotiate "no authentication" and CONNECT to an IPv4 ``dst``."""
    greeting = b"\x05\x01\x00"
    request = b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + dst[1].to_bytes(2, "big")
    if pipelined:
        # Saves a round trip; method reply and the head of the CONNECT reply are
        # then read together.
        sock.sendall(greeting + request)
        head = recv_exact(sock, 6)
        method, head = head[:2], head[2:]
    else:
        sock.sendall(greeting)
        method = recv_exact(sock, 2)
    if method != b"\x05\x00":
        raise SocksError(f"method reply {method!r}")
    if not pipelined:
        sock.sendall(request)
        head = recv_exact(sock, 4)
    if head[0] != 5 or head[1] != 0:
        raise SocksError(f"CONNECT reply code {head[1]}")
    address_length = {1: 4, 4: 16}.get(head[3]) or recv_exact(sock, 1)[0]
    recv_exact(sock, address_length + 2)  # bound address and port: unused


def open_stream(route: Route, dst: Address, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A connected TCP socket to ``dst``, through the route's proxy if any."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(route.proxy or dst)
        if route.proxy:
            socks5_handshake(sock, dst, route.pipelined)
    except BaseException:
        sock.close()
        raise
    return sock


def echo_exchange(route: Route, dst: Address) -> int:
    """Short connection to the echo server, which the client closes first.

    Returns the perf_counter_ns() time at which the echo had arrived.
    """
    with open_stream(route, dst) as sock:
        sock.sendall(PING)
        if recv_exact(sock, len(PING)) != PING:
            raise SocksError("echo mismatch")
        return time.perf_counter_ns()


def reply_exchange(route: Route, dst: Address) -> int:
    """Short connection to the reply-and-close server; returns when the reply arrived.

    The server closes first, so TIME_WAIT lands on the server's fixed port rather
    than on the proxy's outgoing ephemeral ports: a proxy that binds its outgoing
    sockets to an address (Dante, microsocks -b) would otherwise run out of ports
    after ~28,000 connections in a minute and fail every measurement after that.
    """
    with open_stream(route, dst) as sock:
        sock.sendall(PING)
        if recv_exact(sock, len(PING)) != PING:
            raise SocksError("reply mismatch")
        arrived = time.perf_counter_ns()
        if sock.recv(1):  # the end of the exchange: the close passed through the proxy
            raise SocksError("data after the reply")
        return arrived


# --------------------------------------------------------------------------------------
# Target servers (run in their own process)
# --------------------------------------------------------------------------------------
#
# Bulk protocol: the client sends b"D" or b"U" plus an 8-byte big-endian size.
# "D": the server sends that many bytes and closes.  "U": the server reads that
# many bytes and answers with the 8-byte count it received.  (No half-close: some
# proxies close both directions when the client shuts down its sending side.)


def listening_socket(host: str = LOOPBACK, backlog: int = 4096) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def send_count(sock: socket.socket, size: int, chunk: memoryview) -> None:
    """sendall ``size`` bytes taken from a preallocated buffer."""
    full, rest = divmod(size, len(chunk))
    for _ in range(full):
        sock.sendall(chunk)
    if rest:
        sock.sendall(chunk[:rest])


def read_head(sock: socket.socket) -> bytes:
    """An HTTP response's head, and what came behind it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the head")
        head += chunk
    return head


def drain(sock: socket.socket, chunk: memoryview, limit: int | None = None) -> int:
    """recv_into until EOF or ``limit`` bytes; return the byte count."""
    total = 0
    while limit is None or total < limit:
        want = len(chunk) if limit is None else min(len(chunk), limit - total)
        n = sock.recv_into(chunk, want)
        if not n:
            break
        total += n
    return total


def serve_bulk_client(conn: socket.socket) -> None:
    chunk = memoryview(bytearray(BUFFER_SIZE))
    with conn, contextlib.suppress(OSError):
        conn.settimeout(IO_TIMEOUT)
        header = recv_exact(conn, 9)
        size = int.from_bytes(header[1:], "big")
        if header[:1] == b"D":
            send_count(conn, size, chunk)
        else:
            conn.sendall(drain(conn, chunk, size).to_bytes(8, "big"))


def bulk_accept_loop(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_bulk_client, args=(conn,), daemon=True).start()


class EchoProtocol(asyncio.Protocol):
    """Echo everything back; close when the peer half-closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class ReplyProtocol(asyncio.Protocol):
    """Send the PING back once it is complete, then close (a tiny HTTP/1.0, say)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.received = b""

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(PING):
            self.transport.write(self.received)
            self.transport.close()


async def serve_small(echo: socket.socket, reply: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(EchoProtocol, sock=echo), await loop.create_server(ReplyProtocol, sock=reply)]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def target_server_main(bulk: socket.socket, echo: socket.socket, reply: socket.socket) -> None:
    """Entry point of the target-server process."""
    threading.Thread(target=bulk_accept_loop, args=(bulk,), daemon=True).start()
    asyncio.run(serve_small(echo, reply))


# --------------------------------------------------------------------------------------
# Child processes: registry, proxies, /proc readings
# --------------------------------------------------------------------------------------

FORK = multiprocessing.get_context("fork")


class Children:
    """Every process this benchmark starts, so that all are killed on any exit."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        atexit.register(self.stop_all)

    def stop_all(self) -> None:
        for proc in self.popens:
            # Proxies run in their own session; the group also holds danted's children.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for proc in self.popens:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=3)
        for process in self.processes:
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
        self.popens.clear()
        self.processes.clear()


@dataclass(frozen=True)
class Servers:
    bulk: Address
    echo: Address
    reply: Address
    pid: int


def start_target_servers(children: Children, site: Site = ON_LOOPBACK) -> Servers:
    """Start the bulk, echo and reply servers in a process of their own, on
    the site's target address (a socket stays in the namespace it was made in)."""
    with entered(site.target_ns):
        listeners = [listening_socket(site.target_host) for _ in range(3)]
    process = FORK.Process(target=target_server_main, args=tuple(listeners), daemon=True)
    process.start()
    children.processes.append(process)
    bulk, echo, reply = (listener.getsockname() for listener in listeners)
    for listener in listeners:
        listener.close()  # the child holds its own copies
    assert process.pid is not None
    return Servers(bulk, echo, reply, pid=process.pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Unavailable(Exception):  # noqa: N818 (a reason to skip, not a fault)
    """The proxy is not installed here."""


DANTE_CONFIG = """\
logoutput: stderr
internal: {ip} port = {port}
external: {link}
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: error }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: error }}
"""


def require(program: str, hint: str) -> str:
    path = shutil.which(program)
    if not path:
        raise Unavailable(f"{program} not found ({hint})")
    return path


# Another dispatch.py (an earlier version, say) measured in the same run as
# the one beside this directory: the "dispatch-before" column (--before PATH).
BEFORE: list[Path] = []


def dispatch_before_command(port: int, workdir: Path, site: Site) -> list[str]:
    if not BEFORE:
        raise Unavailable("no --before PATH given")
    return dispatch_command(port, workdir, site, BEFORE[0], "dispatch-before.log")


def dispatch_command(
    port: int, workdir: Path, site: Site = ON_LOOPBACK, module: Path = DISPATCH, log: str = "dispatch.log"
) -> list[str]:
    if not module.exists():
        raise Unavailable(f"{module} not found")
    return [
        sys.executable,
        str(module),
        "start",
        "--ip",
        site.listen,
        "--port",
        str(port),
        "--log-file",
        str(workdir / log),
        site.link,
    ]


def dante_command(port: int, workdir: Path, site: Site) -> list[str]:
    danted = require("danted", "apt-get install dante-server")
    config = workdir / "danted.conf"
    config.write_text(DANTE_CONFIG.format(ip=site.listen, port=port, link=site.link))
    return [danted, "-f", str(config), "-p", str(workdir / "danted.pid")]


def pproxy_command(port: int, workdir: Path, site: Site) -> list[str]:
    # pproxy has no outgoing address: it leaves by the route to the target.
    listen = ["-l", f"socks5://{site.listen}:{port}"]
    # Run the module with our interpreter when possible: a pyenv shim would add a
    # shell process between us and the proxy, and we read the proxy's /proc entries.
    if importlib.util.find_spec("pproxy"):
        return [sys.executable, "-m", "pproxy", *listen]
    return [require("pproxy", "pip install pproxy"), *listen]


def microsocks_command(port: int, workdir: Path, site: Site) -> list[str]:
    # -b: bind outgoing sockets to the link, as dispatch and Dante are told to.
    microsocks = require("microsocks", "apt-get install microsocks")
    return [microsocks, "-i", site.listen, "-p", str(port), "-b", site.link]


def dispatch_upstream_command(port: int, workdir: Path, site: Site) -> list[str]:
    """dispatch whose one link is a microsocks of its own: what an upstream
    proxy as a link costs, beside "microsocks" (clients straight to it)."""
    upstream_port = free_port()
    upstream = subprocess.Popen(
        site.in_proxy_ns(microsocks_command(upstream_port, workdir, site)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    atexit.register(upstream.kill)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((site.listen, upstream_port), timeout=1).close()
            break
        except OSError:
            if upstream.poll() is not None or time.monotonic() > deadline:
                raise Unavailable("microsocks did not start") from None
            time.sleep(0.05)
    command = dispatch_command(port, workdir, site, log="dispatch-upstream.log")
    return [*command[:-1], f"socks5://{site.listen}:{upstream_port}"]


def build_c(source: Path, workdir: Path) -> Path:
    """``source`` compiled into ``workdir``; Unavailable without a compiler."""
    compiler = require("cc", "apt-get install gcc")
    program = workdir / source.stem
    build = subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(program), str(source)], capture_output=True, text=True
    )
    if build.returncode:
        last_line = (build.stderr.strip().splitlines() or ["no message"])[-1]
        raise Unavailable(f"{source.name} did not build: {last_line}")
    return program


def splice_relay_command(port: int, workdir: Path, site: Site) -> list[str]:
    if not sys.platform.startswith("linux"):
        raise Unavailable("splice() is Linux only")
    return [str(build_c(SPLICE_RELAY_SOURCE, workdir)), site.listen, str(port)]


# The go-dispatch-proxy to measure (--go-dispatch-proxy PATH): a program, a
# program's name on PATH, a source checkout or a bare git repository.
GO_DISPATCH_PROXY = ["go-dispatch-proxy"]


def build_go(source: Path, workdir: Path) -> Path:
    """go-dispatch-proxy built from ``source`` (a checkout, or a bare git
    repository whose HEAD is taken) into ``workdir``, offline."""
    go = require("go", "apt-get install golang-go")
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        tree, archive = workdir / "go-dispatch-proxy-source", workdir / "go-dispatch-proxy.tar"
        tree.mkdir(exist_ok=True)
        for step in (
            [require("git", "apt-get install git"), "--git-dir", str(source), "archive", "-o", str(archive), "HEAD"],
            [require("tar", "apt-get install tar"), "-x", "-f", str(archive), "-C", str(tree)],
        ):
            run = subprocess.run(step, capture_output=True, text=True)
            if run.returncode:
                raise Unavailable(f"{source}: {step[0]} failed: {run.stderr.strip()}")
        source = tree
    if not (source / "go.mod").is_file():
        raise Unavailable(f"{source} has no go.mod: not a go-dispatch-proxy source")
    program = workdir / "go-dispatch-proxy"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    if not any(env.get(name) for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(workdir / "go-cache")
    print(f"building go-dispatch-proxy from {source}", file=sys.stderr, flush=True)
    build = subprocess.run(
        [go, "build", "-o", str(program), "."], cwd=source, env=env, capture_output=True, text=True, timeout=900
    )
    if build.returncode:
        last_line = (build.stderr.strip().splitlines() or ["no message"])[-1]
        raise Unavailable(f"go build in {source} failed: {last_line}")
    return program


def go_dispatch_proxy_command(port: int, workdir: Path, site: Site) -> list[str]:
    """go-dispatch-proxy listening on the site's address, its one link the
    site's; -quiet, as the other peers log only errors."""
    if ipaddress.ip_address(site.link).is_loopback:
        # It finds the link's interface among those that are up and not
        # loopback, and exits when there is none.
        raise Unavailable("it takes no loopback address as its link; measure it with --veth or --loopback-netns")
    given = Path(GO_DISPATCH_PROXY[0])
    if given.is_dir():
        program = str(build_go(given, workdir))
    else:
        program = require(GO_DISPATCH_PROXY[0], "--go-dispatch-proxy PATH: a program or a source checkout")
    return [program, "-lhost", site.listen, "-lport", str(port), "-quiet", site.link]


PROXY_COMMANDS: dict[str, Callable[[int, Path, Site], list[str]]] = {
    "dispatch": dispatch_command,
    "dispatch-before": dispatch_before_command,
    "dispatch-paged": lambda port, workdir, site: dispatch_command(port, workdir, site, log="dispatch-paged.log"),
    "dispatch-upstream": dispatch_upstream_command,
    "dante": dante_command,
    "pproxy": pproxy_command,
    "microsocks": microsocks_command,
    "go-dispatch-proxy": go_dispatch_proxy_command,
    "splice-relay": splice_relay_command,
}


@dataclass
class Target:
    """Something to measure: "direct" (no proxy) or a running proxy."""

    name: str
    route: Route
    pid: int | None = None  # proxy process (root of its process tree)
    log: Path | None = None


def wait_until_serving(target: Target, proc: subprocess.Popen[bytes], echo: Address, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited with {proc.returncode}: {log_tail(target.log)}")
        try:
            echo_exchange(target.route, echo)
            return
        except (OSError, SocksError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name} not serving after {timeout} s: {error}") from error
            time.sleep(0.1)


def accepts_pipelining(target: Target, echo: Address) -> bool:
    """Whether the proxy copes with greeting + request in one write."""
    try:
        with open_stream(Route(target.route.proxy, pipelined=True), echo, timeout=2.0) as sock:
            sock.sendall(PING)
            return recv_exact(sock, len(PING)) == PING
    except (OSError, SocksError):
        return False


def log_tail(path: Path | None, lines: int = 5) -> str:
    if not path or not path.exists():
        return ""
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_proxy(name: str, workdir: Path, echo: Address, children: Children, site: Site) -> Target:
    port = free_port()
    command = site.in_proxy_ns(PROXY_COMMANDS[name](port, workdir, site))
    log = workdir / f"{name}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    children.popens.append(proc)
    target = Target(name, Route((site.listen, port)), proc.pid, log)
    wait_until_serving(target, proc, echo)
    target.route = Route((site.listen, port), pipelined=accepts_pipelining(target, echo))
    return target


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (danted forks helper processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process tree, including its children that exited and were reaped."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(map(int, fields[11:15]))  # utime, stime, cutime, cstime
    return total / CLK_TCK


@dataclass(frozen=True)
class Usage:
    """Processes, resident memory, threads and descriptors of a process tree."""

    processes: int
    rss_kb: int
    pss_kb: int  # proportional: shared pages split between processes (fair for danted)
    threads: int
    fds: int
    pipes: int  # of the descriptors


def tree_usage(root: int) -> Usage:
    processes = rss = pss = threads = fds = pipes = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            status = read_kv(f"/proc/{pid}/status")
            rss += int(status["VmRSS"].split()[0])
            threads += int(status["Threads"])
            pss += int(read_kv(f"/proc/{pid}/smaps_rollup")["Pss"].split()[0])
            descriptors = os.listdir(f"/proc/{pid}/fd")
            fds += len(descriptors)
            for fd in descriptors:
                with contextlib.suppress(OSError):
                    pipes += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
            processes += 1
    return Usage(processes, rss, pss, threads, fds, pipes)


def read_kv(path: str) -> dict[str, str]:
    """A /proc file of "Key: value" lines."""
    return dict(line.split(":", 1) for line in Path(path).read_text().splitlines() if ":" in line)


def tcp_connections(root: int) -> int:
    """Descriptors of the process tree that are TCP sockets other than listeners."""
    with open("/proc/net/tcp") as table:
        next(table)
        connected = {fields[9] for fields in map(str.split, table) if fields[3] != "0A"}
    count = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    count += link.startswith("socket:[") and link[8:-1] in connected
    return count


def time_wait_ports() -> int:
    """Local address:port pairs held by TCP sockets in TIME_WAIT (state 06).

    For 60 s these ports cannot be taken by bind(); TIME_WAIT sockets of one
    server port (many of them, from the reply server) count once.
    """
    with open("/proc/net/tcp") as table:
        next(table)
        return len({fields[1] for fields in map(str.split, table) if fields[3] == "06"})


# --------------------------------------------------------------------------------------
# Load generators (run in forked worker processes)
# --------------------------------------------------------------------------------------


class WorkerError(Exception):
    """A worker process failed or missed the deadline."""


def _worker_entry(
    index: int, function: Callable[..., dict[str, Any]], args: tuple[Any, ...], messages: Any, go: Any, timeout: float
) -> None:
    def wait_for_go() -> None:
        messages.put(("ready", index, None))
        if not go.wait(timeout):
            raise WorkerError("no start signal")

    try:
        messages.put(("done", index, function(*args, wait_for_go)))
    except BaseException as error:  # reported to the parent, which decides
        messages.put(("error", index, f"{type(error).__name__}: {error}"))


def _next_message(messages: Any, deadline: float) -> tuple[str, int, Any]:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise WorkerError("deadline passed")
    try:
        kind, index, payload = messages.get(timeout=remaining)
    except Exception as error:  # queue.Empty
        raise WorkerError("deadline passed") from error
    if kind == "error":
        raise WorkerError(f"worker {index}: {payload}")
    return kind, index, payload


@dataclass
class WorkerRun:
    results: list[dict[str, Any]]
    wall: float  # seconds from the start signal to the last result
    cpu: dict[str, float]  # CPU seconds of watched process trees over that span

    def span(self) -> float:
        """Time from the first worker's start to the last worker's end."""
        return max(r["end"] for r in self.results) - min(r["start"] for r in self.results)

    def cpu_percent(self) -> dict[str, float]:
        client = sum(r["cpu"] for r in self.results)
        usage = {**self.cpu, "client": client}
        return {role: 100.0 * seconds / self.wall for role, seconds in usage.items()}


def run_workers(
    jobs: Sequence[tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]],
    watch: Mapping[str, int | None],
    timeout: float,
) -> WorkerRun:
    """Fork one process per job; start them together once all are set up.

    Each job function receives ``wait_for_go`` as its last argument and calls it
    when its setup is done; it returns a dict with "start", "end" (monotonic
    times) and "cpu" (its own CPU seconds over the timed part).
    """
    messages, go = FORK.Queue(), FORK.Event()
    processes = [
        FORK.Process(target=_worker_entry, daemon=True, args=(i, fn, args, messages, go, timeout))
        for i, (fn, args) in enumerate(jobs)
    ]
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.start()
        for _ in processes:
            _next_message(messages, deadline)
        cpu_before = {role: tree_cpu_seconds(pid) for role, pid in watch.items() if pid}
        started = time.monotonic()
        go.set()
        results = [_next_message(messages, deadline)[2] for _ in processes]
        wall = time.monotonic() - started
        cpu = {role: tree_cpu_seconds(pid) - cpu_before[role] for role, pid in watch.items() if pid}
        return WorkerRun(results, wall, cpu)
    finally:
        for process in processes:
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join(timeout=2)


def transfer(sock: socket.socket, op: bytes, size: int, chunk: memoryview) -> None:
    """One bulk stream; raises if the byte count is wrong."""
    sock.sendall(op + size.to_bytes(8, "big"))
    if op == b"D":
        received = drain(sock, chunk)
    else:
        send_count(sock, size, chunk)
        received = int.from_bytes(recv_exact(sock, 8), "big")
    if received != size:
        raise WorkerError(f"transferred {received} of {size} bytes")


def bulk_worker(
    route: Route, dst: Address, op: bytes, size: int, streams: int, wait_for_go: WaitForGo
) -> dict[str, Any]:
    """``streams`` parallel bulk transfers of ``size`` bytes each, one thread each."""
    sockets = [open_stream(route, dst) for _ in range(streams)]
    start = threading.Event()
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def stream(sock: socket.socket) -> None:
        chunk = memoryview(bytearray(BUFFER_SIZE))
        start.wait()
        began = time.monotonic()
        try:
            with sock:
                transfer(sock, op, size, chunk)
            spans.append((began, time.monotonic()))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    wait_for_go()
    cpu = time.process_time()
    start.set()
    for thread in threads:
        thread.join()  # bounded: every socket operation has a timeout
    if errors:
        raise errors[0]
    return {"start": min(s[0] for s in spans), "end": max(s[1] for s in spans), "cpu": time.process_time() - cpu}


Exchange = Callable[[Route, Address], int]


def churn_worker(
    exchange: Exchange, route: Route, dst: Address, threads: int, duration: float, count: int, wait_for_go: WaitForGo
) -> dict[str, Any]:
    """Short connections from ``threads`` threads, for ``duration`` s or ``count`` total."""
    tickets = itertools.count()  # next() on it is atomic under the GIL
    ok = Counter[str]()
    lock = threading.Lock()
    start = threading.Event()
    stop_at = [0.0]

    def loop() -> None:
        done, failures = 0, Counter[str]()
        start.wait()
        while time.monotonic() < stop_at[0] and (not count or next(tickets) < count):
            try:
                exchange(route, dst)
                done += 1
            except (OSError, SocksError) as error:
                failures[type(error).__name__ if not isinstance(error, SocksError) else str(error)] += 1
        with lock:
            ok["ok"] += done
            ok.update({f"error: {k}": v for k, v in failures.items()})

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    wait_for_go()
    began, cpu = time.monotonic(), time.process_time()
    stop_at[0] = began + duration
    start.set()
    for worker in workers:
        worker.join()
    return {"start": began, "end": time.monotonic(), "cpu": time.process_time() - cpu, "counts": dict(ok)}


def latency_worker(route: Route, dst: Address, samples: int, wait_for_go: WaitForGo) -> dict[str, Any]:
    """Sequential short connections; microseconds from connect() to the reply."""
    reply_exchange(route, dst)  # warm up (first connection may pay for lazy setup)
    wait_for_go()
    began, cpu = time.monotonic(), time.process_time()
    durations = []
    for _ in range(samples):
        began_ns = time.perf_counter_ns()
        durations.append((reply_exchange(route, dst) - began_ns) / 1000)
    return {"start": began, "end": time.monotonic(), "cpu": time.process_time() - cpu, "durations": durations}


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    vs_direct: bool = True  # a ratio against the direct figure makes sense


MEASURES = [
    Measure("down1", "download 1 stream", "MB/s"),
    Measure("down4", "download 4 streams", "MB/s"),
    Measure("up1", "upload 1 stream", "MB/s"),
    Measure("up4", "upload 4 streams", "MB/s"),
    Measure("conns", "short conns/s, 8 parallel", "conn/s"),
    Measure("cconns", "short conns/s, C client", "conn/s", vs_direct=False),
    Measure("cconns_us", "CPU per short conn", "us", vs_direct=False),
    Measure("cconns_user_us", "  of it user", "us", vs_direct=False),
    Measure("cconns_sys_us", "  of it system", "us", vs_direct=False),
    Measure("cconns_syscalls", "system calls per short conn", "", vs_direct=False),
    Measure("lat50", "connect+echo p50", "us"),
    Measure("lat99", "connect+echo p99", "us"),
    Measure("added50", "added latency p50", "us", vs_direct=False),
    Measure("added99", "added latency p99", "us", vs_direct=False),
    Measure("rss_idle", "RSS idle", "MB", vs_direct=False),
    Measure("held_kb", "RSS per held conn", "KB", vs_direct=False),
    Measure("held_pss_kb", "PSS per held conn", "KB", vs_direct=False),
    Measure("release_s", "release after close", "s", vs_direct=False),
]
CPU_MEASURES = ("down1", "down4", "up1", "up4", "conns", "lat50")


@dataclass
class Settings:
    rounds: int
    size: int
    duration: float
    parallel: int
    client_procs: int
    latency_samples: int
    held: int
    burst: int
    release_timeout: float
    c_count: int = 4000  # short connections per round of the C client


@dataclass
class Bench:
    """Shared state of one benchmark run."""

    settings: Settings
    servers: Servers
    targets: list[Target]
    figures: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loadgen: Path | None = None  # the C client, built where there is a compiler
    c_echo: Address | None = None  # its echo server
    site: Site = ON_LOOPBACK

    def watch(self, target: Target) -> dict[str, int | None]:
        return {"proxy": target.pid, "server": self.servers.pid}

    def record(self, target: Target, values: Figures) -> None:
        for key, value in values.items():
            self.figures.setdefault(key, {}).setdefault(target.name, []).append(value)


def with_cpu(key: str, run: WorkerRun) -> Figures:
    return {f"{key}@{role}": percent for role, percent in run.cpu_percent().items()}


def measure_bulk(bench: Bench, target: Target, key: str) -> Figures:
    op = b"D" if key.startswith("down") else b"U"
    streams = int(key[-1])
    per_stream = bench.settings.size // streams
    # Generous deadline: 50 MB/s would be far below anything sensible here.
    timeout = 30 + bench.settings.size / 50e6
    run = run_workers(
        [(bulk_worker, (target.route, bench.servers.bulk, op, per_stream, streams))], bench.watch(target), timeout
    )
    return {key: per_stream * streams / run.span() / 1e6, **with_cpu(key, run)}


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def churn(
    bench: Bench, target: Target, exchange: Exchange, dst: Address, duration: float, count: int
) -> tuple[WorkerRun, Counter[str]]:
    """``parallel`` short-connection loops spread over ``client_procs`` processes."""
    s = bench.settings
    threads = split(s.parallel, s.client_procs)
    counts = split(count, s.client_procs) if count else [0] * s.client_procs
    jobs = [(churn_worker, (exchange, target.route, dst, n, duration, c)) for n, c in zip(threads, counts) if n]
    run = run_workers(jobs, bench.watch(target), timeout=duration + 60)
    totals = Counter[str]()
    for result in run.results:
        totals.update(result["counts"])
    return run, totals


def note_errors(bench: Bench, target: Target, what: str, counts: Counter[str]) -> None:
    errors = {k: v for k, v in counts.items() if k != "ok"}
    if errors:
        bench.notes.append(f"{target.name} {what}: {errors}")


def measure_conns(bench: Bench, target: Target, key: str) -> Figures:
    run, counts = churn(bench, target, reply_exchange, bench.servers.reply, bench.settings.duration, count=0)
    note_errors(bench, target, "short conns", counts)
    return {key: counts["ok"] / run.span(), **with_cpu(key, run)}


def measure_latency(bench: Bench, target: Target, key: str) -> Figures:
    samples = bench.settings.latency_samples
    run = run_workers(
        [(latency_worker, (target.route, bench.servers.reply, samples))],
        bench.watch(target),
        timeout=60 + samples * 0.05,
    )
    durations = run.results[0]["durations"]
    return {
        "lat50": statistics.median(durations),
        "lat99": statistics.quantiles(durations, n=100)[98],
        **with_cpu(key, run),
    }


def open_held(target: Target, echo: Address, count: int, deadline: float) -> list[socket.socket]:
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"opened only {len(held)} of {count} in time")
            sock = open_stream(target.route, echo)
            held.append(sock)
            sock.sendall(HELD_PAYLOAD)
            recv_exact(sock, len(HELD_PAYLOAD))
    except BaseException:
        close_all(held)
        raise
    return held


def close_all(sockets: Iterable[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def is_released(pid: int, idle: Usage, idle_tcp: int) -> bool:
    now = tree_usage(pid)
    if now.processes <= idle.processes:
        # Pipes kept for reuse are left out: Go's splice keeps a pool of them
        # that its garbage collector empties, whenever it runs.
        return now.threads <= idle.threads and now.fds - now.pipes <= idle.fds - idle.pipes
    # A pre-forking proxy (danted) keeps the helper processes it spawned, each with
    # its own thread and descriptors: count only the connections then.
    return tcp_connections(pid) <= idle_tcp


def wait_for_release(pid: int, idle: Usage, idle_tcp: int, timeout: float) -> float | None:
    """Seconds until threads and descriptors are back to idle, or None on timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if is_released(pid, idle, idle_tcp):
            return time.monotonic() - began
        time.sleep(0.02)
    return None


def measure_held(bench: Bench, target: Target, key: str) -> Figures:
    assert target.pid is not None
    count = bench.settings.held
    idle, idle_tcp = tree_usage(target.pid), tcp_connections(target.pid)
    held = open_held(target, bench.servers.echo, count, deadline=time.monotonic() + 120)
    try:
        time.sleep(0.2)  # let a lazily-spawning proxy (danted) settle
        loaded = tree_usage(target.pid)
    finally:
        close_all(held)
    released = wait_for_release(target.pid, idle, idle_tcp, bench.settings.release_timeout)
    now = tree_usage(target.pid)
    if released is None:
        bench.notes.append(
            f"{target.name} not back to idle after {bench.settings.release_timeout} s: "
            f"threads {idle.threads}->{now.threads}, fds {idle.fds}->{now.fds} (pipes {idle.pipes}->{now.pipes}), "
            f"TCP sockets {idle_tcp}->{tcp_connections(target.pid)}"
        )
    elif now.processes > idle.processes:
        bench.notes.append(
            f"{target.name} kept {now.processes - idle.processes} more processes "
            f"after the held test; its release time counts TCP sockets only"
        )
    elif now.pipes > idle.pipes:
        bench.notes.append(
            f"{target.name} kept {now.pipes - idle.pipes} more pipes after the held test; "
            f"its release time leaves them out"
        )
    return {
        "rss_idle": idle.rss_kb / 1024,
        "held_kb": (loaded.rss_kb - idle.rss_kb) / count,
        "held_pss_kb": (loaded.pss_kb - idle.pss_kb) / count,
        "release_s": released if released is not None else float("nan"),
    }


def tree_times(root: int) -> tuple[float, float]:
    """User and system CPU seconds of a process tree, reaped children included."""
    user = system = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def count_syscalls(pids: Sequence[int]) -> subprocess.Popen[str] | None:
    """perf counting the system calls of ``pids`` until it gets SIGINT; None without perf."""
    perf = shutil.which("perf")
    if perf is None or not sys.platform.startswith("linux"):
        return None
    command = [perf, "stat", "-x,", "-e", "syscalls:sys_enter_*", "-p", ",".join(map(str, pids))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # perf attaches
    return proc if proc.poll() is None else None


def syscalls_counted(proc: subprocess.Popen[str]) -> int | None:
    proc.send_signal(signal.SIGINT)
    try:
        _, report = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    counts = [int(line.split(",")[0]) for line in report.splitlines() if line.split(",")[0].isdigit()]
    return sum(counts) if counts else None


def run_loadgen(bench: Bench, target: Target, count: int) -> tuple[int, int, float]:
    """``count`` short connections of the C client through ``target``: (succeeded, failed, seconds)."""
    proxy, echo = target.route.proxy, bench.c_echo
    assert proxy is not None and bench.loadgen is not None and echo is not None
    mode = "pipelined" if target.route.pipelined else "sequential"
    command = [str(bench.loadgen), "socks5", *map(str, proxy), *map(str, echo), str(count)]
    run = subprocess.run(
        [*command, str(bench.settings.parallel), mode], capture_output=True, text=True, timeout=60 + count * 0.01
    )
    words = run.stdout.split()
    if run.returncode or len(words) < 6:
        raise WorkerError(f"loadgen: {run.stderr.strip() or run.stdout.strip()}")
    return int(words[1]), int(words[3]), float(words[5])


def measure_c_conns(bench: Bench, target: Target, key: str) -> Figures:
    """Short connections by the C client: connect, SOCKS5, a 4-byte echo, the
    server's close; connections per second and the proxy's CPU per connection.
    System calls are counted in a run of their own: perf's counters on every
    new thread or process (microsocks, Dante) would cost far more than the calls."""
    assert target.pid is not None
    user_before, system_before = tree_times(target.pid)
    ok, failed, seconds = run_loadgen(bench, target, bench.settings.c_count)
    user_after, system_after = tree_times(target.pid)
    if failed:
        bench.notes.append(f"{target.name} C short conns: {failed} of {ok + failed} failed")
    per = 1e6 / ok if ok else float("nan")
    user, system = (user_after - user_before) * per, (system_after - system_before) * per
    figures = {key: ok / seconds, "cconns_us": user + system, "cconns_user_us": user, "cconns_sys_us": system}
    perf = count_syscalls(process_tree(target.pid))
    if perf is not None:
        counted, _, _ = run_loadgen(bench, target, max(100, bench.settings.c_count // 4))
        syscalls = syscalls_counted(perf)
        if syscalls is not None and counted:
            figures["cconns_syscalls"] = syscalls / counted
    return figures


# A round: each test visits every target in turn, so drifting noise hits all alike.
@dataclass(frozen=True)
class Test:
    family: str  # what --tests selects
    key: str
    run: Callable[[Bench, Target, str], Figures]
    proxies_only: bool = False


TESTS = [
    Test("bulk", "down1", measure_bulk),
    Test("bulk", "down4", measure_bulk),
    Test("bulk", "up1", measure_bulk),
    Test("bulk", "up4", measure_bulk),
    Test("conns", "conns", measure_conns),
    Test("cconns", "cconns", measure_c_conns, proxies_only=True),
    Test("latency", "lat50", measure_latency),
    Test("held", "held", measure_held, proxies_only=True),
]
FAMILIES = tuple(dict.fromkeys(t.family for t in TESTS))


def run_round(bench: Bench, number: int, families: Sequence[str]) -> None:
    # Each round starts one target further along: the place in the order
    # counts too (the proxy measured right after the direct transfer got 5-8 %
    # less on a one-stream download, round after round, whichever code it ran).
    shift = number % len(bench.targets)
    targets = [*bench.targets[shift:], *bench.targets[:shift]]
    for test in (t for t in TESTS if t.family in families):
        key, proxies_only = test.key, test.proxies_only
        for target in targets:
            if proxies_only and target.pid is None:
                continue
            try:
                bench.record(target, test.run(bench, target, key))
            except (OSError, SocksError, WorkerError, TimeoutError) as error:
                bench.notes.append(f"round {number} {key} {target.name}: {type(error).__name__}: {error}")
        print(f"  round {number}: {key} done", file=sys.stderr, flush=True)
    add_latency_deltas(bench)


def add_latency_deltas(bench: Bench) -> None:
    """Added latency of this round: proxy figure minus the direct one."""
    for percentile in ("50", "99"):
        per_target = bench.figures.get(f"lat{percentile}", {})
        direct = per_target.get("direct", [None])[-1]
        for target in bench.targets:
            values = per_target.get(target.name)
            if target.pid and values and direct is not None and values[-1] is not None:
                bench.record(target, {f"added{percentile}": values[-1] - direct})


def run_burst(bench: Bench, target: Target) -> dict[str, Any]:
    count = bench.settings.burst
    time_wait = time_wait_ports()
    # Client closes first, through one local address: TIME_WAIT piles up on
    # dispatch's outgoing ports, which it must reuse to get them all through.
    run, counts = churn(bench, target, echo_exchange, bench.servers.echo, duration=3600.0, count=count)
    note_errors(bench, target, "burst", counts)
    return {
        "target": target.name,
        "attempted": count,
        "ok": counts["ok"],
        "seconds": run.span(),
        "time_wait_before": time_wait,
        "counts": dict(counts),
    }


# --------------------------------------------------------------------------------------
# Names: connections by name against by address (--names)
# --------------------------------------------------------------------------------------
#
# dispatch looks names up itself, through its links, and keeps the answers for their
# TTL. This measures what that costs a client: short connections per second by IP
# address, by one name (the cache answers), and by a new name each time (one query
# each), against a DNS server on loopback that answers every name of bench.test.

NAMES_DOMAIN = "bench.test"


def dns_server_main(sock: socket.socket) -> None:
    """Answer every A query under NAMES_DOMAIN with 127.0.0.1 (TTL 300), others NXDOMAIN."""
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    while True:
        data, sender = sock.recvfrom(65535)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        response = dns.message.make_response(query)
        question = query.question[0]
        if not question.name.to_text().rstrip(".").endswith(NAMES_DOMAIN):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", "A", LOOPBACK))
        sock.sendto(response.to_wire(), sender)


def socks5_by_name(sock: socket.socket, host: str, port: int) -> None:
    """Negotiate "no authentication" and CONNECT to (host, port), host a name."""
    name = host.encode()
    sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    head = recv_exact(sock, 6)
    if head[:2] != b"\x05\x00" or head[2:4] != b"\x05\x00":
        raise SocksError(f"reply {head!r}")
    size = {1: 4, 4: 16}.get(head[5])
    recv_exact(sock, (recv_exact(sock, 1)[0] if size is None else size) + 2)  # the bound address: unused


def parallel_rate(exchange: Callable[[], None], threads: int, duration: float) -> tuple[float, int]:
    """``exchange()`` run over and over in ``threads`` threads for ``duration``
    seconds: those that got through per second, and how many failed
    (OSError, SocksError)."""
    done, failed = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def loop() -> None:
        ok = bad = 0
        while time.monotonic() < stop_at:
            try:
                exchange()
                ok += 1
            except (OSError, SocksError):
                bad += 1
        with lock:
            done[0] += ok
            failed[0] += bad

    began = time.monotonic()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return done[0] / (time.monotonic() - began), failed[0]


def names_rate(
    proxy: Address, echo: Address, host: Callable[[], str], threads: int, duration: float
) -> tuple[float, int]:
    """Short connections per second (and failures) to ``host()`` through ``proxy``."""

    def exchange() -> None:
        with socket.create_connection(proxy, timeout=IO_TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks5_by_name(sock, host(), echo[1])
            sock.sendall(PING)
            if recv_exact(sock, len(PING)) != PING:
                raise SocksError("echo mismatch")

    return parallel_rate(exchange, threads, duration)


def names_benchmark(rounds: int, duration: float, threads: int) -> str:
    """Connections per second by address, by a cached name and by new names; medians of rounds."""
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="dispatch-names-") as tmp:
            servers = start_target_servers(children)
            dns_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dns_sock.bind((LOOPBACK, 0))
            process = FORK.Process(target=dns_server_main, args=(dns_sock,), daemon=True)
            process.start()
            children.processes.append(process)
            dns_port = dns_sock.getsockname()[1]
            dns_sock.close()
            port = free_port()
            command = [*dispatch_command(port, Path(tmp)), "--dns", f"{LOOPBACK}:{dns_port}"]
            with (Path(tmp) / "dispatch.out").open("wb") as out:
                proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            children.popens.append(proc)
            target = Target("dispatch", Route((LOOPBACK, port)), proc.pid, None)
            wait_until_serving(target, proc, servers.echo)
            fresh = itertools.count()
            cases: dict[str, Callable[[], str]] = {
                "by address": lambda: LOOPBACK,
                "by name, cached": lambda: f"cached.{NAMES_DOMAIN}",
                "by name, a new one each": lambda: f"n{next(fresh)}.{NAMES_DOMAIN}",
            }
            figures: dict[str, list[float]] = {case: [] for case in cases}
            failures = Counter[str]()
            for number in range(rounds):
                print(f"names: round {number + 1} of {rounds}", file=sys.stderr)
                order = list(cases.items())
                for case, host in (
                    order[number % len(order) :] + order[: number % len(order)]
                ):  # each goes first in turn
                    rate, failed = names_rate((LOOPBACK, port), servers.echo, host, threads, duration)
                    figures[case].append(rate)
                    failures[case] += failed
    finally:
        children.stop_all()
    lines = [
        f"connections per second through dispatch, {threads} in parallel, "
        f"median of {rounds} rounds of {duration:g} s ({machine_line()})"
    ]
    for case, rates in figures.items():
        lines.append(
            f"  {case:<26}{statistics.median(rates):>9.0f}/s"
            + (f"  ({failures[case]} failed)" if failures[case] else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Transparent mode: a phone on the lab's LAN beside a SOCKS client (Linux, root, nft)
# --------------------------------------------------------------------------------------

TRANSPARENT_PORT = 1082  # inside the lab's client namespace
LAB_SOCKS_PORT = 1080


def lab_stream(ns: str, dst: Address, socks: bool) -> socket.socket:
    """A TCP connection to ``dst`` made in namespace ``ns``: through dispatch's
    SOCKS port there (``socks``), or plain, for the firewall to redirect."""
    import netlab

    with netlab.netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if socks:
            sock.connect((LOOPBACK, LAB_SOCKS_PORT))
            socks5_handshake(sock, dst, pipelined=False)
        else:
            sock.connect(dst)
    except BaseException:
        sock.close()
        raise
    return sock


def lab_rate(open_one: Callable[[], socket.socket], threads: int, duration: float) -> tuple[float, int]:
    """Short connections per second (and failures), each reading the lab's
    peer-echo answer to its end."""

    def exchange() -> None:
        with open_one() as sock:
            drain(sock, memoryview(bytearray(256)))

    return parallel_rate(exchange, threads, duration)


def lab_batch(open_one: Callable[[], socket.socket], count: int, size: int) -> float:
    """``count`` HTTP downloads of ``size`` bytes started together: bytes per
    second of payload for the whole batch (NaN if any failed)."""
    got: list[int] = []
    request = f"GET /file?size={size} HTTP/1.0\r\nHost: lab\r\n\r\n".encode()

    def download() -> None:
        try:
            with open_one() as sock:
                sock.sendall(request)
                head = read_head(sock)
                body = len(head.partition(b"\r\n\r\n")[2])
                got.append(body + drain(sock, memoryview(bytearray(BUFFER_SIZE))))
        except OSError:
            got.append(-1)

    began = time.monotonic()
    workers = [threading.Thread(target=download) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if got != [size] * count:
        return math.nan
    return count * size / (time.monotonic() - began)


def transparent_benchmark(rounds: int, duration: float, threads: int, count: int, size: int) -> str:
    """A phone's short connections per second and a batch of its downloads
    through dispatch's transparent mode, beside a SOCKS client's on the
    gateway itself, in the same rounds (medians)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import netlab

    available, reason = netlab.Lab.available()
    if not available or shutil.which("nft") is None:
        return f"transparent: skipped: {reason or 'nft is not installed (apt-get install nftables)'}"
    lab = netlab.Lab(name="dbench-t", phone=True)
    with lab, tempfile.TemporaryDirectory(prefix="dispatch-transparent-") as tmp:
        lab.start_peer_echo()
        lab.start_http_server(size=size)
        log = Path(tmp) / "dispatch.log"
        uplinks = [link.client_ifname for link in lab.uplinks]
        command = [sys.executable, str(DISPATCH), "start", "--no-state", "--port", str(LAB_SOCKS_PORT)]
        command += ["--log-file", str(log), "--transparent", str(TRANSPARENT_PORT), "--lan", netlab.LAN_IFNAME]
        command += ["--apply-rules", *uplinks]
        proc = lab.client_popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not lab.wait_for_port(LAB_SOCKS_PORT):
            return f"transparent: dispatch did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
        echo = (lab.service_address, netlab.PEER_ECHO_PORT)
        http = (lab.service_address, netlab.HTTP_PORT)
        clients: dict[str, Callable[[Address], socket.socket]] = {
            "SOCKS5 client on the gateway": lambda dst: lab_stream(lab.client_ns, dst, socks=True),
            "phone, transparent": lambda dst: lab_stream(lab.phone_ns, dst, socks=False),
        }
        rates: dict[str, list[float]] = {name: [] for name in clients}
        batches: dict[str, list[float]] = {name: [] for name in clients}
        failures = Counter[str]()
        lab_batch(lambda: clients["phone, transparent"](http), count, size)  # measures the links
        for each in range(rounds):
            print(f"transparent: round {each + 1} of {rounds}", file=sys.stderr)
            order = list(clients.items())
            for name, open_to in order[each % 2 :] + order[: each % 2]:
                rate, failed = lab_rate(functools.partial(open_to, echo), threads, duration)
                rates[name].append(rate)
                failures[name] += failed
                batches[name].append(lab_batch(functools.partial(open_to, http), count, size))
        proc.terminate()
        proc.wait(IO_TIMEOUT)
    links = sum(link.rate for link in lab.uplinks)
    lines = [
        f"through dispatch in the network lab (links of {', '.join(f'{link.rate // 1000:,}' for link in lab.uplinks)}"
        f" kB/s), median of {rounds} rounds ({machine_line()})",
        f"  {'client':<30}{'connections/s':>15}{f'{count} x {size // 1000:,} kB, kB/s':>24}{'of the links':>14}",
    ]
    for name in clients:
        batch = median(batches[name])
        share = f"{batch / links:.0%}" if batch is not None else "-"
        lines.append(
            f"  {name:<30}{statistics.median(rates[name]):>15.0f}{number(None if batch is None else batch / 1000):>24}"
            f"{share:>14}" + (f"  ({failures[name]} failed)" if failures[name] else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def median(values: Sequence[float | None] | None) -> float | None:
    clean = [v for v in values or () if v is not None and v == v]  # drop None and NaN
    return statistics.median(clean) if clean else None


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def figures_table(bench: Bench) -> str:
    names = [t.name for t in bench.targets]
    proxies = [n for n in names if n != "direct"]
    main = "dispatch" if "dispatch" in names else None
    peers = [p for p in proxies if p != main]
    header = ["measure", *names]
    header += [f"{p}/direct" for p in proxies]
    header += [f"{main}/{p}" for p in peers] if main else []
    rows = []
    for m in MEASURES:
        med = {n: median(bench.figures.get(m.key, {}).get(n)) for n in names}
        row = [f"{m.label} {m.unit}", *(number(med[n]) for n in names)]
        row += [ratio(med[p], med["direct"]) if m.vs_direct else "-" for p in proxies]
        row += [ratio(med[main], med[p]) for p in peers] if main else []
        rows.append(row)
    return table(header, rows)


def cpu_table(bench: Bench) -> str:
    names = [t.name for t in bench.targets]
    rows = []
    for key in CPU_MEASURES:
        label = next(m.label for m in MEASURES if m.key == key)
        cells = []
        for name in names:
            parts = [median(bench.figures.get(f"{key}@{role}", {}).get(name)) for role in ("proxy", "client", "server")]
            cells.append("/".join("-" if p is None else f"{p:.0f}" for p in parts))
        rows.append([label, *cells])
    return table(["CPU % of one core: proxy/load generator/target server", *names], rows)


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def describe_settings(s: Settings) -> str:
    return (
        f"{s.rounds} alternating rounds (medians shown); bulk {s.size / 2**20:.0f} MiB per "
        f"transfer (4 streams share it); short conns {s.parallel} parallel in {s.client_procs} "
        f"processes for {s.duration:g} s; latency {s.latency_samples} sequential; "
        f"{s.held} held connections"
    )


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def report(bench: Bench, burst: dict[str, Any] | None, load_before: str) -> str:
    modes = ", ".join(f"{t.name} {'pipelined' if t.route.pipelined else 'sequential'}" for t in bench.targets if t.pid)
    parts = [
        machine_line(),
        bench.site.describe(),
        f"load average (1/5/15 min) before: {load_before}, after: {load_average()} "
        f"(other work on the machine skews every figure)",
        describe_settings(bench.settings),
        f"SOCKS5 handshake (greeting+request in one write where the proxy accepts it): {modes}",
        "",
        figures_table(bench),
        "",
        cpu_table(bench),
    ]
    if burst:
        parts += [
            "",
            f"burst through {burst['target']}: {burst['ok']}/{burst['attempted']} "
            f"succeeded in {burst['seconds']:.1f} s ({burst['ok'] / burst['seconds']:.0f}/s; "
            f"{burst['time_wait_before']} local ports held in TIME_WAIT before)",
        ]
    if bench.notes:
        parts += ["", "notes:", *(f"  {n}" for n in bench.notes)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    suffix = text[-1:].upper()
    try:
        return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1G, 256M or 1048576") from None


def choice_list(choices: Sequence[str], ignore: Sequence[str] = ()) -> Callable[[str], list[str]]:
    """Parser of a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip() and n.strip() not in ignore]
        unknown = set(names) - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {', '.join(choices)}")
        return names

    return parse


QUICK = {"rounds": 2, "size": 64 * 2**20, "duration": 1.0, "latency": 300, "held": 300, "burst": 3000, "c_count": 1000}
FULL = {"rounds": 3, "size": 2**30, "duration": 5.0, "latency": 2000, "held": 3000, "burst": 30000, "c_count": 4000}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
    )
    parser.add_argument("--rounds", type=int, help=f"alternating rounds (default {FULL['rounds']})")
    parser.add_argument("--size", type=parse_size, help="bytes per bulk transfer (default 1G)")
    parser.add_argument("--duration", type=float, help="seconds per short-connection run (default 5)")
    parser.add_argument("--latency", type=int, help="sequential connections for latency (default 2000)")
    parser.add_argument("--held", type=int, help="connections held open at once (default 3000)")
    parser.add_argument("--burst", type=int, help="short connections in the dispatch burst, 0 to skip (default 30000)")
    parser.add_argument("--parallel", type=int, default=8, help="parallel short connections (default 8)")
    parser.add_argument("--c-count", type=int, help="short connections a round of the C client makes (default 4000)")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="processes the parallel short connections are spread over (default 2)",
    )
    parser.add_argument(
        "--release-timeout",
        type=float,
        default=30.0,
        help="give up waiting for a proxy to release held resources (default 30 s)",
    )
    parser.add_argument(
        "--only",
        type=choice_list(PROXY_NAMES, ignore=["direct"]),
        default=list(PROXY_NAMES),
        help="comma-separated proxies to measure (direct is always measured)",
    )
    parser.add_argument(
        "--tests",
        type=choice_list(FAMILIES),
        default=list(FAMILIES),
        help=f"comma-separated tests to run (default {','.join(FAMILIES)})",
    )
    parser.add_argument("--json", type=Path, help="save raw figures to this file")
    parser.add_argument(
        "--names",
        action="store_true",
        help="only compare dispatch's connections by name and by address (the DNS cache)",
    )
    parser.add_argument(
        "--transparent",
        action="store_true",
        help="only compare a phone through transparent mode with a SOCKS client, in the network lab "
        "(Linux, root, nft): short connections per second and a batch of downloads",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="PATH",
        help="also measure this dispatch.py (an earlier version), as dispatch-before",
    )
    parser.add_argument(
        "--go-dispatch-proxy",
        default=GO_DISPATCH_PROXY[0],
        metavar="PATH",
        help="the go-dispatch-proxy to measure: a program, or a source checkout or bare git repository "
        "to build with go (default: go-dispatch-proxy on PATH)",
    )
    parser.add_argument(
        "--veth",
        action="store_true",
        help="measure across a veth pair between two network namespaces (Linux, root, iproute2): "
        "proxies and clients in one, the target servers in the other",
    )
    parser.add_argument(
        "--loopback-netns",
        action="store_true",
        help="measure on loopback inside a network namespace of its own, with a veth end's address as "
        "the link and the targets' address, which go-dispatch-proxy takes where it refuses 127.0.0.1",
    )
    args = parser.parse_args(argv)
    if args.veth and args.loopback_netns:
        parser.error("choose one of --veth and --loopback-netns")
    if (args.veth or args.loopback_netns) and (args.names or args.transparent):
        parser.error("--veth and --loopback-netns go with the side-by-side tests, not with --names or --transparent")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit; children (proxies too) inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def poll_page(proxy: Address, interval: float) -> None:
    """GET the status page from the proxy's port every ``interval`` seconds, as
    the page left open in a browser does (its script asks for the page again),
    but 20 times as often."""
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"  # a name the pages answer
    while True:
        try:
            with socket.create_connection(proxy, timeout=IO_TIMEOUT) as sock:
                while True:
                    sock.sendall(request)
                    head = read_head(sock)
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    body = head.split(b"\r\n\r\n", 1)[1]
                    while len(body) < length:
                        body += sock.recv(65536)
                    time.sleep(interval)
        except (OSError, ValueError, IndexError):
            time.sleep(interval)


def start_targets(names: Sequence[str], workdir: Path, echo: Address, children: Children, site: Site) -> list[Target]:
    targets = [Target("direct", Route())]
    for name in names:
        try:
            targets.append(start_proxy(name, workdir, echo, children, site))
            if name == "dispatch-paged":
                threading.Thread(
                    target=poll_page, args=(targets[-1].route.proxy, PAGE_POLL_INTERVAL), daemon=True
                ).start()
        except Unavailable as reason:
            print(f"skipping {name}: {reason}", flush=True)
        except RuntimeError as error:
            print(f"skipping {name}: failed to start: {error}", flush=True)
    return targets


def wait_for_time_wait(limit: int = 2000, timeout: float = 65.0) -> None:
    """Let TIME_WAIT sockets of an earlier run expire: they hold ephemeral ports."""
    deadline = time.monotonic() + timeout
    while (count := time_wait_ports()) > limit and time.monotonic() < deadline:
        print(f"waiting for {count} ports held in TIME_WAIT to expire", file=sys.stderr, flush=True)
        time.sleep(5)


def start_c_load(bench: Bench, workdir: Path, children: Children, args: argparse.Namespace) -> None:
    """Build the C client and start its echo server; without a compiler the
    C test is left out with a line (the Python client's "conns" remains)."""
    try:
        bench.loadgen = build_c(LOADGEN_SOURCE, workdir)
    except Unavailable as reason:
        print(f"skipping the C short-connection test: {reason}", flush=True)
        args.tests.remove("cconns")
        return
    site = bench.site
    echo = subprocess.Popen(
        site.in_target_ns([str(bench.loadgen), "echo", site.target_host]),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    children.popens.append(echo)
    assert echo.stdout is not None
    bench.c_echo = (site.target_host, int(echo.stdout.readline()))


def side_by_side(args: argparse.Namespace, settings: Settings, site: Site, children: Children) -> None:
    """Every proxy and test asked for, in alternating rounds; the report printed."""
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
        wait_for_time_wait()
        load_before = load_average()
        servers = start_target_servers(children, site)
        targets = start_targets(args.only, Path(tmp), servers.echo, children, site)
        bench = Bench(settings, servers, targets, site=site)
        if "cconns" in args.tests:
            start_c_load(bench, Path(tmp), children, args)
        for number in range(1, settings.rounds + 1):
            run_round(bench, number, args.tests)
        dispatch = next((t for t in targets if t.name == "dispatch"), None)
        burst = None
        if dispatch and settings.burst:
            # Last: its TIME_WAIT sockets would make the peers' bind() fail.
            print(f"burst: {settings.burst} short connections through dispatch", file=sys.stderr)
            try:
                burst = run_burst(bench, dispatch)
            except WorkerError as error:
                bench.notes.append(f"burst: {error}")
        print(report(bench, burst, load_before), flush=True)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": machine_line(),
                        "site": site.describe(),
                        "load_before": load_before,
                        "load_after": load_average(),
                        "settings": vars(settings),
                        "targets": {t.name: {"pipelined": t.route.pipelined} for t in targets},
                        "figures": bench.figures,
                        "burst": burst,
                        "notes": bench.notes,
                    },
                    indent=1,
                )
            )


@contextlib.contextmanager
def lab_site(across: bool) -> Iterator[Site]:
    """Two network namespaces joined by one unshaped veth pair, for as long as
    the context lasts: the calling thread (and every process and thread it
    starts) is in the proxies' namespace; the targets in the other
    (``across``) or beside the proxies on the veth end's address. Both
    namespaces are torn down at the end, on an error or Ctrl-C too."""
    import netlab

    lab = netlab.Lab(name=f"dbench{os.getpid()}", rates=[0])
    with lab, netlab.netns(lab.client_ns):
        link = lab.uplinks[0]
        if across:
            yield Site(LOOPBACK, link.client_addr, link.server_addr, lab.client_ns, lab.server_ns)
        else:
            yield Site(LOOPBACK, link.client_addr, link.client_addr, lab.client_ns, lab.client_ns)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.names:
        print(names_benchmark(args.rounds, args.duration, args.parallel), flush=True)
        return 0
    if args.transparent:
        print(transparent_benchmark(args.rounds, args.duration, args.parallel, 12, 2_000_000), flush=True)
        return 0
    if args.before:
        BEFORE.append(args.before.resolve())
    GO_DISPATCH_PROXY[0] = args.go_dispatch_proxy
    in_lab = args.veth or args.loopback_netns
    if in_lab:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import netlab

        available, reason = netlab.Lab.available()
        if not available:
            print(f"{'--veth' if args.veth else '--loopback-netns'}: skipped: {reason}", flush=True)
            return 0
    settings = Settings(
        args.rounds,
        args.size,
        args.duration,
        args.parallel,
        args.client_procs,
        args.latency,
        args.held,
        args.burst,
        args.release_timeout,
        args.c_count,
    )
    raise_fd_limit()
    # SIGTERM should unwind like Ctrl-C, so that the finallys kill the
    # children and remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with lab_site(across=args.veth) if in_lab else contextlib.nullcontext(ON_LOOPBACK) as site:
            children = Children()
            try:
                side_by_side(args, settings, site, children)
            finally:
                children.stop_all()
    except KeyboardInterrupt:
        print("interrupted; every process and namespace it started is gone", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
