#!/usr/bin/env python3
"""Download-manager benchmark for dispatch, standard library only.

A small "download manager" fetches one file with K parallel connections: the
file is cut into chunks (1 MB by default) put in a shared queue, and every
connection keeps taking the next chunk and fetching it with an HTTP Range
request over a keep-alive connection, like real download managers do.  A
connection may go straight to the server (optionally bound to a source
address and/or a device) or through a SOCKS5 proxy (a tiny CONNECT client is
implemented here).  Everything is time-bounded: connect and read timeouts on
every socket, a retry limit per chunk and an overall deadline.

``bench`` (the default command) builds the network lab (tools/netlab.py),
once per routing setup, and measures per round:

  single    one link alone: direct download bound to uplink 1
  sum       three direct downloads in parallel, each bound (SO_BINDTODEVICE
            and source address) to its own uplink; their rates summed
  dispatch  through ``dispatch.py start`` run in the client namespace with
            weights matching the link rates, K connections

then prints kB/s (1 kB = 1000 bytes) side by side, the ratio to the sum, and
medians.  ``fetch`` runs a single download (inside a namespace with --netns).

``batch`` compares dispatch's balancing modes (the BATCH_MODES table: measured,
weighted with weights matching the rates, round robin) per routing setup: in
each mode, with dispatch running, one warm-up batch and one measured batch of
equal downloads started together (24 of 2 MB, one connection each; aggregate =
bytes / time until the last ends), then two uplinks change rates
(Lab.set_rate: uplink 1 1200->400, uplink 3 400->1200 kB/s), again one warm-up
and one measured batch.  A mode whose options dispatch lacks is skipped.

``scenarios`` runs one dispatch per mode and round through batches of several
lengths, rate changes and restarts (the SCENARIO table) and prints each
batch's share of the links' sum, and at a restart what the state file kept;
``--steps`` runs only the steps whose label contains one of its parts, with
the batches each starts from.

Examples (as root, from the project directory)::

    python tools/download.py bench --rounds 3
    python tools/download.py bench --setups metrics --rounds 1
    python tools/download.py batch --setups rules --modes weighted
    python tools/download.py scenarios --modes measured --steps restart
    python tools/download.py fetch --netns dlab-client --bind-dev dlab-up2 \\
        http://203.0.113.80:8080/file?size=5000000
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netlab  # noqa: E402  (sibling module)

CHUNK = 1_000_000
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
MAX_ATTEMPTS = 6  # per chunk, before the download gives up on it
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# Connections: direct or through SOCKS5
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Route:
    """How connections are made: namespace, binding, optional SOCKS5 proxy."""

    ns: str | None = None
    bind_addr: str | None = None
    bind_dev: str | None = None
    socks: tuple[str, int] | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = READ_TIMEOUT


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise ConnectionError("connection closed during SOCKS handshake")
        data += piece
    return data


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """SOCKS5 CONNECT (RFC 1928) without authentication on a connected socket."""
    sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
    version, method = _recv_exact(sock, 2)
    if version != 5 or method != 0:
        raise ConnectionError(f"SOCKS5 proxy refused no-auth (method {method:#x})")
    try:
        ip = ipaddress.ip_address(host)
        atyp, addr = (1, ip.packed) if ip.version == 4 else (4, ip.packed)
    except ValueError:
        atyp, addr = 3, bytes([len(host.encode())]) + host.encode()
    sock.sendall(bytes([5, 1, 0, atyp]) + addr + struct.pack("!H", port))
    version, reply, _, atyp = _recv_exact(sock, 4)
    if version != 5 or reply != 0:
        raise ConnectionError(f"SOCKS5 CONNECT failed, reply code {reply}")
    length = {1: 4, 4: 16}.get(atyp) or _recv_exact(sock, 1)[0]
    _recv_exact(sock, length + 2)  # bound address and port: unused


def connect(route: Route, host: str, port: int) -> socket.socket:
    """Open a TCP connection to host:port following ``route``."""
    if route.socks:
        sock = netlab.open_connection(
            *route.socks, ns=route.ns, bind_addr=route.bind_addr, bind_dev=route.bind_dev, timeout=route.connect_timeout
        )
        try:
            socks5_connect(sock, host, port)  # still under the connect timeout
        except BaseException:
            sock.close()
            raise
    else:
        sock = netlab.open_connection(
            host, port, ns=route.ns, bind_addr=route.bind_addr, bind_dev=route.bind_dev, timeout=route.connect_timeout
        )
    sock.settimeout(route.read_timeout)
    return sock


# --------------------------------------------------------------------------- #
# HTTP range requests
# --------------------------------------------------------------------------- #


class HttpConnection:
    """A keep-alive HTTP/1.1 connection doing Range GETs of one URL."""

    def __init__(self, route: Route, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        self.route = route
        self.sock = connect(route, self.host, self.port)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()

    def get_range(
        self, start: int, end: int, deadline: float, sink: Progress | None = None
    ) -> tuple[bytes, int | None]:
        """GET bytes [start, end]; returns (body, total size from Content-Range)."""
        request = (
            f"GET {self.target} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Range: bytes={start}-{end}\r\nUser-Agent: dispatch-bench\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        status, headers = self._read_head()
        if status != 206:
            raise ConnectionError(f"HTTP status {status}, expected 206")
        length = int(headers["content-length"])
        total = headers.get("content-range", "").rpartition("/")[2]
        body = bytearray()
        while len(body) < length:
            if time.monotonic() > deadline:
                raise TimeoutError("overall deadline reached")
            piece = self.reader.read1(min(65_536, length - len(body)))
            if not piece:
                raise ConnectionError("server closed mid-body")
            body += piece
            if sink:
                sink.add(len(piece))
        return bytes(body), int(total) if total.isdigit() else None

    def _read_head(self) -> tuple[int, dict[str, str]]:
        status_line = self.reader.readline(8192).decode("latin-1")
        if not status_line:
            raise ConnectionError("connection closed")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        for _ in range(100):
            line = self.reader.readline(8192).decode("latin-1").strip()
            if not line:
                return status, headers
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        raise ConnectionError("too many header lines")


# --------------------------------------------------------------------------- #
# The download manager
# --------------------------------------------------------------------------- #


class Progress:
    """Bytes received on the wire (including chunks later retried)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.received += n


@dataclass
class Result:
    size: int
    done_bytes: int = 0  # bytes of completed chunks
    elapsed: float = 0.0
    complete: bool = False
    errors: list[str] = field(default_factory=list)
    corrupt_chunks: int = 0

    @property
    def rate(self) -> float:
        """File bytes per second (completed chunks only)."""
        return self.done_bytes / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        errors = f", {len(self.errors)} errors (first: {self.errors[0]})" if self.errors else ""
        return (
            f"{self.done_bytes}/{self.size} bytes in {self.elapsed:.2f}s = {self.rate / 1000:.0f} kB/s, {state}{errors}"
        )


def probe_size(route: Route, url: str) -> int:
    """Learn the file size with a one-byte range request (as download managers do)."""
    conn = HttpConnection(route, url)
    try:
        _, total = conn.get_range(0, 0, time.monotonic() + route.read_timeout)
    finally:
        conn.close()
    if total is None:
        raise ConnectionError("server did not report the size in Content-Range")
    return total


def download(
    url: str,
    route: Route,
    connections: int = 12,
    chunk: int = CHUNK,
    deadline: float = 60.0,
    size: int | None = None,
    verify: bool = False,
) -> Result:
    """Fetch ``url`` with ``connections`` parallel range-request workers.

    The clock starts before the size probe and stops when the last chunk is
    in (or at ``deadline`` seconds).  A failed chunk goes back to the queue
    for another connection, up to MAX_ATTEMPTS times.
    """
    started = time.monotonic()
    end_by = started + deadline
    result = Result(size=size or 0)
    try:
        if size is None:
            result.size = size = probe_size(route, url)
    except OSError as exc:
        result.errors.append(f"size probe: {exc}")
        result.elapsed = time.monotonic() - started
        return result
    chunks: queue.Queue[tuple[int, int, int]] = queue.Queue()
    for start in range(0, size, chunk):
        chunks.put((start, min(start + chunk, size) - 1, 0))
    lock = threading.Lock()
    reference = netlab.GeneratedFile(size) if verify else None
    progress = Progress()
    remaining = [chunks.qsize()]  # chunks not yet done nor abandoned
    all_done = threading.Event()

    def finish_chunk(ok_bytes: int) -> None:
        with lock:
            result.done_bytes += ok_bytes
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    def worker() -> None:
        conn: HttpConnection | None = None
        while not all_done.is_set() and time.monotonic() < end_by:
            try:
                start, end, attempts = chunks.get(timeout=0.2)
            except queue.Empty:
                continue  # others may still requeue a failed chunk
            try:
                if conn is None:
                    conn = HttpConnection(route, url)
                body, _ = conn.get_range(start, end, end_by, progress)
                if reference and body != reference.read(start, len(body)):
                    with lock:
                        result.corrupt_chunks += 1
                finish_chunk(len(body))
            except (OSError, ValueError, KeyError, IndexError) as exc:
                with lock:
                    result.errors.append(f"{type(exc).__name__}: {exc}")
                if conn:
                    conn.close()
                conn = None
                if attempts + 1 < MAX_ATTEMPTS and time.monotonic() < end_by:
                    chunks.put((start, end, attempts + 1))
                else:
                    finish_chunk(0)  # abandoned
        if conn:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    all_done.wait(max(0.0, end_by - time.monotonic()))
    result.elapsed = time.monotonic() - started
    result.complete = result.done_bytes == size
    for thread in threads:  # they stop within a read timeout at worst
        thread.join(timeout=READ_TIMEOUT + 1)
    return result


# --------------------------------------------------------------------------- #
# Benchmark
# --------------------------------------------------------------------------- #


@dataclass
class Round:
    single: float
    links: list[float]
    dispatch: float | None
    dispatch_note: str
    dispatch_split: dict[int, int]  # rx bytes per uplink during the dispatch run

    @property
    def total(self) -> float:
        return sum(self.links)


def _size_for(rate: float, seconds: float, chunk: int) -> int:
    """A file size that takes about ``seconds`` at ``rate``, whole chunks."""
    return max(chunk, round(rate * seconds / chunk) * chunk)


def dispatch_available(dispatch: str) -> tuple[bool, str]:
    if not os.path.exists(dispatch):
        return False, f"{dispatch} does not exist"
    proc = subprocess.run([sys.executable, dispatch, "start", "--help"], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        return False, f"'dispatch.py start --help' failed: {proc.stderr.strip()[-300:]}"
    return True, ""


def run_dispatch(lab: netlab.Lab, args: argparse.Namespace, size: int) -> tuple[float | None, str, dict[int, int]]:
    """Start dispatch in the client namespace, download through it, stop it."""
    spec = [f"{link.client_addr}@{w}" for link, w in zip(lab.uplinks, _weights(lab))]
    argv = [sys.executable, args.dispatch, "start", "--ip", "127.0.0.1", "--port", str(args.proxy_port), *spec]
    log = open(args.dispatch_log, "a")  # noqa: SIM115 (open while dispatch runs; closed below)
    log.write(f"\n=== {lab.setup}: {' '.join(argv)}\n")
    log.flush()
    proc = lab.client_popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT_DIR)
    try:
        if not lab.wait_for_port(args.proxy_port, timeout=10):
            return None, f"dispatch not listening (exit {proc.poll()}, see {args.dispatch_log})", {}
        route = Route(ns=lab.client_ns, socks=("127.0.0.1", args.proxy_port))
        before = lab.counters()
        res = download(
            lab.http_url(path=f"/d?size={size}"),
            route,
            args.connections,
            args.chunk,
            args.deadline,
            size=size,
            verify=args.verify,
        )
        after = lab.counters()
        split = {i: after[i].rx_bytes - before[i].rx_bytes for i in after}
        return res.rate, res.summary(), split
    finally:
        _stop(proc)
        log.close()


def bench_round(lab: netlab.Lab, args: argparse.Namespace, use_dispatch: bool, why_not: str) -> Round:
    rates = [link.rate for link in lab.uplinks]
    first = lab.uplinks[0]
    single_size = _size_for(first.rate, args.seconds, args.chunk)
    route = Route(ns=lab.client_ns, bind_addr=first.client_addr, bind_dev=first.client_ifname)
    single = download(
        lab.http_url(path=f"/s?size={single_size}"),
        route,
        args.connections,
        args.chunk,
        args.deadline,
        size=single_size,
        verify=args.verify,
    )
    print(f"    single (uplink 1): {single.summary()}", flush=True)

    # Three managers in parallel, each pinned (device + address) to one uplink.
    results: list[Result | None] = [None] * len(lab.uplinks)

    def one(i: int) -> None:
        link = lab.uplinks[i]
        size = _size_for(link.rate, args.seconds, args.chunk)
        r = Route(ns=lab.client_ns, bind_addr=link.client_addr, bind_dev=link.client_ifname)
        per_link = max(1, args.connections // len(lab.uplinks))
        results[i] = download(
            lab.http_url(path=f"/l{i}?size={size}"),
            r,
            per_link,
            args.chunk,
            args.deadline,
            size=size,
            verify=args.verify,
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(lab.uplinks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.deadline + 30)
    links = [r.rate if r else 0.0 for r in results]
    for link, r in zip(lab.uplinks, results):
        print(f"    uplink {link.index} alone-in-parallel: {r.summary() if r else 'hung'}", flush=True)

    dispatch_rate, note, split = None, why_not, {}
    if use_dispatch:
        dispatch_size = _size_for(sum(rates), args.seconds, args.chunk)
        dispatch_rate, note, split = run_dispatch(lab, args, dispatch_size)
        print(f"    dispatch: {note}; rx bytes per uplink {split}", flush=True)
    return Round(single.rate, links, dispatch_rate, note, split)


def _kb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1000:.0f}"


def print_table(setup: str, rounds: list[Round]) -> None:
    print(f"\n== setup {setup!r} (kB/s, 1 kB = 1000 B) ==")
    header = (
        f"{'round':>6} {'single':>8} "
        + " ".join(f"{'link' + str(i + 1):>7}" for i in range(len(rounds[0].links)))
        + f" {'sum':>7} {'dispatch':>9} {'disp/sum':>9} {'single/sum':>10}"
    )
    print(header)

    def row(label: str, single: float, links: list[float], dispatch: float | None) -> str:
        total = sum(links)
        ratio = "n/a" if dispatch is None or not total else f"{dispatch / total:.2f}"
        return (
            f"{label:>6} {_kb(single):>8} "
            + " ".join(f"{_kb(v):>7}" for v in links)
            + f" {_kb(total):>7} {_kb(dispatch):>9} {ratio:>9} "
            f"{single / total if total else 0:>10.2f}"
        )

    for n, r in enumerate(rounds, 1):
        print(row(str(n), r.single, r.links, r.dispatch))
    dispatch = [r.dispatch for r in rounds if r.dispatch is not None]
    print(
        row(
            "median",
            statistics.median(r.single for r in rounds),
            [statistics.median(r.links[i] for r in rounds) for i in range(len(rounds[0].links))],
            statistics.median(dispatch) if dispatch else None,
        )
    )


def bench(args: argparse.Namespace) -> int:
    ok, reason = netlab.Lab.available()
    if not ok:
        print(f"cannot build the lab: {reason}")
        return 2
    use_dispatch, why_not = dispatch_available(args.dispatch)
    if not use_dispatch:
        print(f"dispatch column skipped: {why_not}")
    overall_end = time.monotonic() + args.time_limit
    for setup in args.setups:
        with netlab.Lab(name=args.name, setup=setup, rates=args.rates) as lab:
            lab.start_http_server(port=netlab.HTTP_PORT, lifetime=args.time_limit + 60)
            print(f"\n-- setup {setup}: lab up, rates {[link.rate // 1000 for link in lab.uplinks]} kB/s", flush=True)
            rounds = []
            for n in range(args.rounds):
                if time.monotonic() > overall_end:
                    print("  time limit reached, stopping")
                    break
                print(f"  round {n + 1}", flush=True)
                rounds.append(bench_round(lab, args, use_dispatch, why_not))
            if rounds:
                print_table(setup, rounds)
    return 0


# --------------------------------------------------------------------------- #
# Batch: balancing modes side by side, before and after the links change
# --------------------------------------------------------------------------- #

# How dispatch is started in each mode, from the lab: the one table of mode
# arguments.  "measured" and "round-robin" need ``--balance``; a dispatch
# without it is detected from ``start --help`` and the mode is skipped.
BATCH_MODES = {
    "measured": lambda lab: [*(link.client_ifname for link in lab.uplinks), "--balance", "measured"],
    "weighted": lambda lab: [
        f"{link.client_ifname}@{weight}" for link, weight in zip(lab.uplinks, _weights(lab), strict=True)
    ],
    "round-robin": lambda lab: [*(link.client_ifname for link in lab.uplinks), "--balance", "round-robin"],
}
# Uplink index -> kB/s once the links change: the fast uplink 1 becomes slow
# and the slow uplink 3 fast, so that weights set for the old rates are wrong.
DEFAULT_CHANGE = "1:400,3:1200"
# Set during a batch after that: uplink 1 gets fast again.
DEFAULT_MID_CHANGE = "1:1200"


def _weights(lab: netlab.Lab) -> list[int]:
    """Weights in proportion to the rates the lab was built with (3, 3, 1)."""
    slowest = min(link.rate for link in lab.uplinks)
    return [max(1, round(link.rate / slowest)) for link in lab.uplinks]


def _change_arg(text: str) -> dict[int, int]:
    """'1:400,3:1200' (uplink:kB/s) -> {1: 400000, 3: 1200000}."""
    change = {}
    for item in text.split(","):
        index, _, kbps = item.partition(":")
        change[int(index)] = int(float(kbps) * 1000)
    return change


@dataclass
class BatchResult:
    """Equal downloads started together, one connection each."""

    count: int
    size: int
    done: int = 0  # downloads complete
    received: int = 0  # bytes, including those of downloads that failed
    elapsed: float = 0.0  # seconds until the last download ended
    errors: list[str] = field(default_factory=list)
    split: dict[int, int] = field(default_factory=dict)  # rx bytes per uplink

    @property
    def rate(self) -> float:
        return self.received / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.done == self.count

    def summary(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE ({self.done}/{self.count})"
        errors = f", {len(self.errors)} errors (first: {self.errors[0]})" if self.errors else ""
        split = " ".join(f"{index}:{value / 1e6:.1f}" for index, value in self.split.items())
        return (
            f"{self.received / 1e6:.1f} MB in {self.elapsed:.1f}s = "
            f"{self.rate / 1000:.0f} kB/s, {state}; MB per uplink {split}{errors}"
        )


def batch_download(url: str, route: Route, count: int, size: int, deadline: float) -> BatchResult:
    """``count`` downloads of ``size`` bytes of ``url``, each on its own
    connection, all released at once; the clock stops when the last ends."""
    result = BatchResult(count, size)
    lock = threading.Lock()
    progress = Progress()
    ready = threading.Barrier(count + 1)
    ended: list[float] = []
    started = [0.0]

    def one() -> None:
        conn: HttpConnection | None = None
        try:
            ready.wait(timeout=CONNECT_TIMEOUT)
            conn = HttpConnection(route, url)
            body, _ = conn.get_range(0, size - 1, started[0] + deadline, progress)
            with lock:
                result.done += len(body) == size
        except (OSError, ValueError, KeyError, IndexError, threading.BrokenBarrierError) as exc:
            with lock:
                result.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn:
                conn.close()
            with lock:
                ended.append(time.monotonic())

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    started[0] = time.monotonic()
    try:
        ready.wait(timeout=CONNECT_TIMEOUT)
    except threading.BrokenBarrierError:
        result.errors.append("the downloads did not all start")
    for thread in threads:  # each ends by the deadline plus a read timeout
        thread.join(timeout=max(0.0, started[0] + deadline + READ_TIMEOUT - time.monotonic()))
    result.received = progress.received
    result.elapsed = (max(ended) if len(ended) == count else time.monotonic()) - started[0]
    return result


def _start_dispatch(
    lab: netlab.Lab, args: argparse.Namespace, mode: str, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen | None, str]:
    argv = [
        sys.executable,
        args.dispatch,
        "start",
        "--ip",
        "127.0.0.1",
        "--port",
        str(args.proxy_port),
        *BATCH_MODES[mode](lab),
        *extra,
    ]
    with open(args.dispatch_log, "a") as log:
        log.write(f"\n=== {lab.setup} {mode}: {' '.join(argv)}\n")
        log.flush()
        proc = lab.client_popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT_DIR)
    if lab.wait_for_port(args.proxy_port, timeout=10):
        return proc, ""
    _stop(proc)
    return None, f"dispatch not listening (exit {proc.poll()}, see {args.dispatch_log})"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _one_batch(lab: netlab.Lab, args: argparse.Namespace, label: str, size: int | None = None) -> BatchResult:
    route = Route(ns=lab.client_ns, socks=("127.0.0.1", args.proxy_port))
    size = size or args.size
    before = lab.counters()
    result = batch_download(lab.http_url(path=f"/batch?size={size}"), route, args.count, size, args.deadline)
    after = lab.counters()
    result.split = {i: after[i].rx_bytes - before[i].rx_bytes for i in after}
    print(f"      {label:<18} {result.summary()}", flush=True)
    return result


def batch_mode(lab: netlab.Lab, args: argparse.Namespace, mode: str) -> tuple[float | None, float | None, str]:
    """One mode: warm up, measure, change the rates, warm up, measure again.

    Returns the two aggregate rates (None where a batch did not complete) and
    a note.  The lab's rates are put back before returning.
    """
    original = {link.index: link.rate for link in lab.uplinks}
    # Each round starts afresh, not from what the last one left in a state file.
    proc, note = _start_dispatch(lab, args, mode, ["--no-state"] if args.state_supported else [])
    if proc is None:
        return None, None, note
    rates: list[float | None] = [None, None]
    try:
        for n, phase in enumerate(("before", "after")):
            if phase == "after":
                for index, rate in args.change.items():
                    lab.set_rate(index, rate)
            _one_batch(lab, args, f"{phase}: warm-up")
            result = _one_batch(lab, args, f"{phase}: measured")
            rates[n] = result.rate if result.complete else None
            if proc.poll() is not None:
                note = f"dispatch exited ({proc.returncode}, see {args.dispatch_log})"
                break
    finally:
        _stop(proc)
        for index, rate in original.items():
            if lab.uplink(index).rate != rate:
                lab.set_rate(index, rate)
    return rates[0], rates[1], note


def _mode_support(dispatch: str) -> dict[str, str]:
    """Why each mode cannot run with this dispatch ('' if it can)."""
    proc = subprocess.run([sys.executable, dispatch, "start", "--help"], capture_output=True, text=True, timeout=20)
    probe = netlab.Lab()  # plans only, for the mode arguments
    missing = {}
    for mode, arguments in BATCH_MODES.items():
        options = [arg for arg in arguments(probe) if arg.startswith("--")]
        absent = [option for option in options if option not in proc.stdout]
        missing[mode] = f"dispatch has no {', '.join(absent)} option" if absent else ""
    return missing


def _has_option(dispatch: str, option: str) -> bool:
    """Whether ``dispatch start`` has ``option``."""
    proc = subprocess.run([sys.executable, dispatch, "start", "--help"], capture_output=True, text=True, timeout=20)
    return option in proc.stdout


def _cell(rates: list[float], total: float, runs: int) -> str:
    if not rates:
        return "n/a"
    median = statistics.median(rates)
    failed = f" [{runs - len(rates)} failed]" if len(rates) < runs else ""
    return f"{median / 1000:.0f} ({median / total:.0%}){failed}"


def print_batch_table(
    setup: str,
    args: argparse.Namespace,
    sums: tuple[float, float],
    results: dict[str, list[tuple[float | None, float | None, str]]],
) -> None:
    rounds = max((len(runs) for runs in results.values()), default=0)
    print(
        f"\n== setup {setup!r}: {args.count} downloads of {args.size / 1000:.0f} kB at once; "
        f"links' sum {sums[0] / 1000:.0f} kB/s, after change {sums[1] / 1000:.0f} kB/s; "
        f"median of {rounds} round(s); kB/s (% of the sum) =="
    )
    print(f"{'mode':<12} | {'before':>20} | {'after change':>20} | note")
    for mode, runs in results.items():
        before = [run[0] for run in runs if run[0] is not None]
        after = [run[1] for run in runs if run[1] is not None]
        notes = sorted({run[2] for run in runs if run[2]})
        print(
            f"{mode:<12} | {_cell(before, sums[0], len(runs)):>20} | "
            f"{_cell(after, sums[1], len(runs)):>20} | {'; '.join(notes)}"
        )
    print("(tbf shapes the wire rate: TCP goodput tops out near 95 % of the sum)")


def batch(args: argparse.Namespace) -> int:
    ok, reason = netlab.Lab.available()
    if not ok:
        print(f"cannot build the lab: {reason}")
        return 2
    if not os.path.exists(args.dispatch):
        print(f"{args.dispatch} does not exist")
        return 2
    unsupported = _mode_support(args.dispatch)
    modes = [mode for mode in args.modes if not unsupported[mode]]
    for mode in args.modes:
        if unsupported[mode]:
            print(f"mode {mode} skipped: {unsupported[mode]}")
    args.state_supported = _has_option(args.dispatch, "--no-state")
    overall_end = time.monotonic() + args.time_limit
    for setup in args.setups:
        with netlab.Lab(name=args.name, setup=setup) as lab:
            lab.start_http_server(port=netlab.HTTP_PORT, lifetime=args.time_limit + 600)
            before_sum = sum(link.rate for link in lab.uplinks)
            after_sum = sum(args.change.get(link.index, link.rate) for link in lab.uplinks)
            print(
                f"\n-- setup {setup}: rates {[link.rate // 1000 for link in lab.uplinks]} kB/s, then {args.change}",
                flush=True,
            )
            results: dict[str, list[tuple[float | None, float | None, str]]] = {mode: [] for mode in args.modes}
            for mode in args.modes:
                if unsupported[mode]:
                    results[mode].append((None, None, unsupported[mode]))
            for n in range(args.rounds):
                if time.monotonic() > overall_end:
                    print("  time limit reached, stopping")
                    break
                for mode in modes:
                    print(f"  round {n + 1}, {mode}", flush=True)
                    results[mode].append(batch_mode(lab, args, mode))
            print_batch_table(setup, args, (before_sum, after_sum), results)
    return 0


# --------------------------------------------------------------------------- #
# Scenarios: batches of several lengths, rate changes, restarts
# --------------------------------------------------------------------------- #

SHORT = 250_000
# One run of dispatch per mode and round, the steps in this order.  Each step:
# (label, download size, what happens first, whether it has a target).
# "change" sets the --change rates between two batches; "rise-mid" sets the
# --mid-change rates --mid seconds into the batch (a rise: in this lab,
# lowering a tbf under load stalls its flows for longer than the read
# timeout, which measures tc rather than dispatch); "restart" stops dispatch
# (which writes its state file) and starts it again with the same file;
# "cold" starts it with a state file that does not exist yet.
SCENARIO = (
    ("cold start, no state", 500_000, "", False),
    ("0.25 MB", 250_000, "", True),
    ("0.5 MB", 500_000, "", True),
    ("1 MB", 1_000_000, "", True),
    ("2 MB", 2_000_000, "", True),
    ("changed: 1st short", SHORT, "change", False),
    ("changed: next 0.5 MB", 500_000, "", True),
    ("changed: next 1 MB", 1_000_000, "", True),
    ("restart, state: 0.5 MB", 500_000, "restart", True),
    ("rise mid-batch: 2 MB", 2_000_000, "rise-mid", False),
    ("after it: 0.5 MB", 500_000, "", True),
    ("restart, no state: 0.5 MB", 500_000, "cold", False),
)


def _needed_steps(selected: Sequence[str]) -> list[bool]:
    """Which SCENARIO steps run when only the steps whose label contains
    one of ``selected`` are wanted (all when none is given): those, and
    the batches before each back to the rate change, restart or cold
    start it follows, which measure what it starts from."""
    if not selected:
        return [True] * len(SCENARIO)
    needed = [False] * len(SCENARIO)
    for step, (label, _, _, _) in enumerate(SCENARIO):
        if any(text in label for text in selected):
            needed[step] = True
            back = step
            while back > 0 and SCENARIO[back][2] not in ("change", "cold"):
                back -= 1
                needed[back] = True
    return needed


def _saved_capacities(path: str) -> str:
    """What a state file keeps, in kB/s, for the output."""
    try:
        with open(path, encoding="utf-8") as file:
            links = json.load(file).get("links", {})
        return ", ".join(f"{key} {entry['capacity'] / 1000:.0f}" for key, entry in sorted(links.items()))
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:
        return f"unreadable ({error})"


def _state_args(args: argparse.Namespace, path: str) -> list[str]:
    """-d (the estimates' changes go to the log) and the state file, where supported."""
    return ["-d", *(["--state-file", path] if args.state_supported else [])]


def _set_rates(lab: netlab.Lab, rates: dict[int, int]) -> None:
    for index, rate in rates.items():
        if lab.uplink(index).rate != rate:
            lab.set_rate(index, rate)


def scenario_run(
    lab: netlab.Lab, args: argparse.Namespace, mode: str, state_dir: str
) -> tuple[list[float | None], str]:
    """One mode through SCENARIO; the share of the links' sum of each step
    (None where a batch did not complete) and a note."""
    original = {link.index: link.rate for link in lab.uplinks}
    state = os.path.join(state_dir, f"{mode}-state.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state)
    proc, note = _start_dispatch(lab, args, mode, _state_args(args, state))
    shares: list[float | None] = []
    if proc is None:
        return [None] * len(SCENARIO), note
    try:
        for (label, size, before, _), needed in zip(SCENARIO, _needed_steps(args.steps)):
            timer = None
            if not needed:  # its rate changes still apply: the later steps expect them
                if before == "change":
                    _set_rates(lab, args.change)
                elif before == "rise-mid":
                    _set_rates(lab, args.mid_change)
                shares.append(None)
                continue
            if before == "change":
                _set_rates(lab, args.change)
            elif before == "rise-mid":
                timer = threading.Timer(args.mid, _set_rates, (lab, args.mid_change))
                timer.start()
            elif before in ("restart", "cold"):
                _stop(proc)
                if before == "restart" and args.state_supported:
                    print(f"    saved at the restart (kB/s): {_saved_capacities(state)}", flush=True)
                if before == "cold":
                    state = os.path.join(state_dir, f"{mode}-fresh-state.json")
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(state)
                proc, note = _start_dispatch(lab, args, mode, _state_args(args, state))
                if proc is None:
                    break
            result = _one_batch(lab, args, label, size)
            if timer is not None:
                timer.join()
            # Of the rates at the end: a batch under way when they rose is
            # held to the new sum.
            rates_sum = sum(link.rate for link in lab.uplinks)
            shares.append(result.rate / rates_sum if result.complete else None)
            if proc.poll() is not None:
                note = f"dispatch exited ({proc.returncode}, see {args.dispatch_log})"
                break
    finally:
        if proc is not None:
            _stop(proc)
        _set_rates(lab, original)
    shares += [None] * (len(SCENARIO) - len(shares))
    return shares, note


def _share_cell(values: list[float | None]) -> str:
    done = [value for value in values if value is not None]
    if not done:
        return "n/a"
    failed = f" [{len(values) - len(done)} failed]" if len(done) < len(values) else ""
    return f"{statistics.median(done):.0%}{failed}"


def scenarios(args: argparse.Namespace) -> int:
    ok, reason = netlab.Lab.available()
    if not ok:
        print(f"cannot build the lab: {reason}")
        return 2
    unsupported = _mode_support(args.dispatch)
    modes = [mode for mode in args.modes if not unsupported[mode]]
    args.state_supported = _has_option(args.dispatch, "--state-file")
    if not args.state_supported:
        print("this dispatch has no --state-file: restarts start without a state")
    overall_end = time.monotonic() + args.time_limit
    results: dict[str, list[list[float | None]]] = {mode: [] for mode in modes}
    notes: dict[str, set[str]] = {mode: set() for mode in modes}
    with (
        tempfile.TemporaryDirectory(prefix="dispatch-scenarios-") as state_dir,
        netlab.Lab(name=args.name, setup=args.setup) as lab,
    ):
        lab.start_http_server(port=netlab.HTTP_PORT, lifetime=args.time_limit + 600)
        print(
            f"-- setup {args.setup}: rates {[link.rate // 1000 for link in lab.uplinks]} kB/s; "
            f"between batches {args.change}; {args.mid:g} s into one {args.mid_change}",
            flush=True,
        )
        for n in range(args.rounds):
            if time.monotonic() > overall_end:
                print("  time limit reached, stopping")
                break
            for mode in modes:
                print(f"  round {n + 1}, {mode}", flush=True)
                shares, note = scenario_run(lab, args, mode, state_dir)
                results[mode].append(shares)
                if note:
                    notes[mode].add(note)
    rounds = max((len(runs) for runs in results.values()), default=0)
    print(
        f"\n== {args.count} downloads at once per batch; share of the links' sum (median of "
        f"{rounds} round(s)); * = a batch with a target =="
    )
    print(f"{'batch':<28} | " + " | ".join(f"{mode:>11}" for mode in modes))
    for step, ((label, _, _, target), needed) in enumerate(zip(SCENARIO, _needed_steps(args.steps))):
        if not needed:
            continue
        cells = [_share_cell([run[step] for run in results[mode]]) for mode in modes]
        print(f"{label + (' *' if target else ''):<28} | " + " | ".join(f"{cell:>11}" for cell in cells))
    for mode in modes:
        for note in sorted(notes[mode]):
            print(f"{mode}: {note}")
    return 0


def fetch(args: argparse.Namespace) -> int:
    socks = None
    if args.socks:
        host, _, port = args.socks.rpartition(":")
        socks = (host.strip("[]"), int(port))
    route = Route(ns=args.netns, bind_addr=args.bind_addr, bind_dev=args.bind_dev, socks=socks)
    result = download(args.url, route, args.connections, args.chunk, args.deadline, verify=args.verify)
    print(result.summary())
    if result.corrupt_chunks:
        print(f"{result.corrupt_chunks} chunks did not match the generated content")
    return 0 if result.complete and not result.corrupt_chunks else 1


def lab_arguments(parser: argparse.ArgumentParser, name: str, port: int, time_limit: float) -> None:
    """The options of a command that builds a lab and runs dispatch in it."""
    parser.add_argument("--name", default=name, help="lab name (namespace prefix)")
    parser.add_argument("--dispatch", default=os.path.join(PROJECT_DIR, "dispatch.py"))
    parser.add_argument("--proxy-port", type=int, default=port)
    parser.add_argument("--dispatch-log", default=f"/tmp/{name}-dispatch.log")
    parser.add_argument(
        "--time-limit", type=float, default=time_limit, help="no new round starts after this many seconds"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connections", "-k", type=int, default=12)
        p.add_argument("--chunk", type=int, default=CHUNK, help="bytes per range request")
        p.add_argument("--deadline", type=float, default=60.0, help="seconds allowed per download")
        p.add_argument("--verify", action="store_true", help="check the bytes against the lab's generated content")

    b = sub.add_parser("bench", help="build the lab and compare single/sum/dispatch (default)")
    common(b)
    b.add_argument(
        "--setups", type=lambda s: s.split(","), default=list(netlab.SETUPS), help="comma-separated: rules,metrics"
    )
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument(
        "--seconds", type=float, default=20.0, help="size files to last about this long at the expected rate"
    )
    b.add_argument(
        "--rates",
        type=netlab._rates_arg,
        default=list(netlab.DEFAULT_RATES),
        help="uplink rates in kB/s, comma-separated",
    )
    lab_arguments(b, "dlab-bench", 11080, 900.0)

    t = sub.add_parser(
        "batch", help="build the lab and compare balancing modes, before and after two links change rates"
    )
    t.add_argument(
        "--setups", type=lambda s: s.split(","), default=list(netlab.SETUPS), help="comma-separated: rules,metrics"
    )
    t.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=list(BATCH_MODES),
        help=f"comma-separated: {','.join(BATCH_MODES)}",
    )
    t.add_argument("--rounds", type=int, default=1, help="rounds per mode; the median is shown")
    t.add_argument("--size", type=int, default=2_000_000, help="bytes per download")
    t.add_argument("--count", type=int, default=24, help="downloads per batch, started together")
    t.add_argument(
        "--change",
        type=_change_arg,
        default=_change_arg(DEFAULT_CHANGE),
        help=f"uplink:kB/s to set after the first measurement (default {DEFAULT_CHANGE})",
    )
    t.add_argument("--deadline", type=float, default=150.0, help="seconds allowed per batch")
    lab_arguments(t, "dlab-batch", 11081, 1800.0)

    s = sub.add_parser(
        "scenarios",
        help="build the lab and compare balancing modes over batches of several lengths, rate changes and restarts",
    )
    s.add_argument("--setup", default="rules", choices=list(netlab.SETUPS))
    s.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=list(BATCH_MODES),
        help=f"comma-separated: {','.join(BATCH_MODES)}",
    )
    s.add_argument("--rounds", type=int, default=3, help="rounds per mode; the median is shown")
    s.add_argument("--count", type=int, default=24, help="downloads per batch, started together")
    s.add_argument(
        "--change",
        type=_change_arg,
        default=_change_arg(DEFAULT_CHANGE),
        help=f"uplink:kB/s the links change to between two batches (default {DEFAULT_CHANGE})",
    )
    s.add_argument(
        "--mid-change",
        type=_change_arg,
        default=_change_arg(DEFAULT_MID_CHANGE),
        help=f"uplink:kB/s set during a batch, later (default {DEFAULT_MID_CHANGE})",
    )
    s.add_argument("--mid", type=float, default=3.0, help="seconds into its batch the mid-batch change comes")
    s.add_argument("--deadline", type=float, default=150.0, help="seconds allowed per batch")
    s.add_argument(
        "--steps",
        type=lambda text: [part for part in text.split(",") if part],
        default=[],
        help="comma-separated parts of step labels (e.g. restart): only those steps, and the "
        "batches each starts from, run",
    )
    lab_arguments(s, "dlab-scen", 11082, 3600.0)

    f = sub.add_parser("fetch", help="download one URL and print the rate")
    common(f)
    f.add_argument("url")
    f.add_argument("--netns", help="create the sockets in this network namespace")
    f.add_argument("--bind-addr")
    f.add_argument("--bind-dev", help="SO_BINDTODEVICE")
    f.add_argument("--socks", help="SOCKS5 proxy HOST:PORT (in the same namespace)")

    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["bench"]))
    if args.command == "fetch":
        return fetch(args)
    if args.command in ("batch", "scenarios"):
        unknown = set(args.modes) - set(BATCH_MODES)
        if unknown:
            parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}")
        return batch(args) if args.command == "batch" else scenarios(args)
    if args.command in (None, "bench"):
        if args.command is None:
            args = parser.parse_args(["bench"])
        return bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
