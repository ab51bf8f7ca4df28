"""Specifications of dispatch, tested end to end over loopback.

A real PySocks client talks to a real Dispatcher, which connects to real
servers on 127.0.0.x and ::1. Pure parts (address parsing, the balancer, the
errno mapping, the handshake reader) have unit tests of their own.

The tests are grouped in the order of the module's sections, each group
under a banner named as its section (test_layout.py holds them to that).
Their helpers and fixtures are in conftest.py. Beside this file: test_lab.py (the network lab,
which needs root), test_browser.py (the status page in Chromium) and
test_layout.py (the module's sections keep their order).
"""

from __future__ import annotations

import argparse
import base64
import configparser
import contextlib
import dataclasses
import datetime
import errno
import ipaddress
import itertools
import json
import logging
import math
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import threading
import time
import types
import typing
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import h11
import pytest
import socks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dispatch
from conftest import (
    HERE,
    LOGIN,
    MICROSOCKS,
    TIMEOUT,
    DnsServer,
    FakeClock,
    FakeInterfaces,
    Listening,
    Server,
    UdpServer,
    UpstreamServer,
    client_through,
    closed_by_proxy,
    curl,
    echo,
    exchanges,
    free_port,
    has_ipv6_loopback,
    http_exchange,
    needs_ipv6,
    peers_seen,
    proxy_url,
    raw_client,
    read_all,
    read_request_head,
    read_response,
    recv_exactly,
    recv_until,
    refusal_lines,
    refused_port,
    round_trip,
    run_cli,
    sample_status,
    socks4_request,
    socks5_code_for,
    socks5_reply,
    socks5_request,
    status_row,
    udp_associate,
    udp_client,
    udp_socket,
    unanswered_address,
    unanswered_addresses,
    wait_for,
    wait_until_all_closed,
)
from dispatch import Dispatcher, Reply, WeightedRoundRobin


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_mptcp_is_refused_off_linux_in_one_line(platform: str) -> None:
    assert dispatch.mptcp_unavailable(platform) == (
        "MPTCP (mptcp+ links, --mptcp) needs Linux: this system has no Multipath TCP dispatch can use"
    )


@pytest.mark.parametrize(
    ("enabled", "named"),
    [("0\n", "net.mptcp.enabled is 0 (sysctl -w net.mptcp.enabled=1)"), (None, "net.mptcp.enabled is missing")],
)
def test_mptcp_is_refused_where_the_kernel_has_it_off_naming_the_sysctl(
    enabled: str | None, named: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sysctl = tmp_path / "enabled"
    if enabled is not None:
        sysctl.write_text(enabled)
    monkeypatch.setattr(dispatch, "_MPTCP_SYSCTL", str(sysctl))
    why = dispatch.mptcp_unavailable("linux")
    assert why is not None and named in why
    sysctl.write_text("1\n")
    assert dispatch.mptcp_unavailable("linux") is None


# ---------------------------------------------------------------------------
# Platform start-up: descriptors, one CPU, signals, the log
# ---------------------------------------------------------------------------


class FakeLimits:
    """Stands in for the resource module: one descriptor limit, and a system
    that may refuse a soft limit above some figure (as macOS above OPEN_MAX)."""

    RLIMIT_NOFILE = 7

    def __init__(self, soft: int, hard: int, unlimited: int, refused_above: int | None) -> None:
        self.RLIM_INFINITY = unlimited
        self.limits = (soft, hard)
        self.refused_above = refused_above

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refused_above is not None and limits[0] > self.refused_above:
            raise ValueError("not allowed to raise the current limit")
        self.limits = limits


MACOS_UNLIMITED = 2**63 - 1


@pytest.mark.parametrize(
    "soft, hard, unlimited, refused_above, raised_to, limits_after",
    [
        (1024, 20000, -1, None, 20000, (20000, 20000)),  # Linux: up to the hard limit
        (4096, 4096, -1, None, 4096, (4096, 4096)),  # nothing to raise
        (-1, -1, -1, None, None, (-1, -1)),  # no limit at all
        (256, MACOS_UNLIMITED, MACOS_UNLIMITED, 10240, 10240, (10240, MACOS_UNLIMITED)),  # macOS
        (256, 24576, MACOS_UNLIMITED, 10240, 10240, (10240, 24576)),  # a hard limit above OPEN_MAX
        (256, 8192, MACOS_UNLIMITED, 4096, 256, (256, 8192)),  # refused all the way: stays
    ],
)
def test_descriptor_limit_is_raised_as_far_as_the_system_allows(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    unlimited: int,
    refused_above: int | None,
    raised_to: int | None,
    limits_after: tuple[int, int],
) -> None:
    limits = FakeLimits(soft, hard, unlimited, refused_above)
    monkeypatch.setitem(sys.modules, "resource", limits)
    assert dispatch.raise_descriptor_limit() == raised_to
    assert limits.limits == limits_after


def test_cli_serves_on_one_cpu_with_a_long_gil_interval_and_gives_both_back(tmp_path: object) -> None:
    """What the command line changes for the process while it serves, and
    gives back when main() returns, for a program that goes on."""
    interval = sys.getswitchinterval()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    main_thread = threading.get_native_id()  # affinity is per thread on Linux
    seen: list[Any] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        seen.append(sys.getswitchinterval())
        seen.append(os.sched_getaffinity(main_thread) if cpus is not None else None)

    assert run_cli(["127.0.0.1"], use, os.path.join(str(tmp_path), "d.log")) == 0
    assert seen[0] == pytest.approx(dispatch.GIL_SWITCH_INTERVAL)
    if cpus is not None:
        if dispatch.PORTABLE:  # one CPU is a Linux-only speed-up, switched off with the others
            assert seen[1] == cpus
        else:
            assert len(seen[1]) == 1 and seen[1] <= cpus
        assert os.sched_getaffinity(0) == cpus
    assert sys.getswitchinterval() == interval


@pytest.mark.parametrize("portable", [False, True])
def test_the_socket_waiters_say_which_socket_is_ready_for_what(portable: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """SocketWaiter and the relay's pair waiter, by poll() and (portable, as on
    Windows) by select(): ready sockets with the events asked of them, none
    past the timeout, a socket set to 0 no longer waited on even once its
    peer has hung up. Private names: the waiters' choice of poll()."""
    if portable:
        monkeypatch.setattr(dispatch, "_new_poll", None)
    read, write = dispatch.selectors.EVENT_READ, dispatch.selectors.EVENT_WRITE
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        waiter = dispatch.SocketWaiter()
        waiter.set(a, read)
        waiter.set(c, read | write)
        assert waiter.wait(0.01) == [(c, write)]
        b.sendall(b"x")
        assert sorted(waiter.wait(1.0), key=lambda ready: ready[0] is c) == [(a, read), (c, write)]
        waiter.set(c, 0)
        d.close()
        assert waiter.wait(0.01) == [(a, read)]
        waiter.set(a, 0)
        began = time.monotonic()
        assert waiter.wait(0.05) == [] and time.monotonic() - began >= 0.04
        e, f = socket.socketpair()
        with e, f:
            pair = dispatch._PairWaiter(a, e)
            assert pair.wait(read, read, 0.01) == (read, 0)
            f.sendall(b"y")
            assert pair.wait(0, read | write, 1.0) == (0, read | write)
            assert pair.wait(0, 0, 0.01) == (0, 0)


def test_log_lines_read_as_the_standard_formatters_and_reach_the_file_whole(tmp_path: Any) -> None:
    """LogLineFormatter writes what Formatter("%(asctime)s %(levelname)s
    %(message)s") writes, exceptions too; AppendingFileHandler's lines from
    many threads at once each arrive whole, and none is lost."""
    standard = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    ours = dispatch.LogLineFormatter()
    for created in (0.0, 1_700_000_000.123, 1_700_000_000.999, 1_700_000_001.5):
        record = logging.LogRecord("dispatch", logging.INFO, __file__, 1, "a -> %s: %d B", ("b", 3), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)
    try:
        raise ValueError("broken")
    except ValueError:
        failed = logging.LogRecord("dispatch", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert ours.format(failed) == standard.format(failed) and "ValueError: broken" in ours.format(failed)
    path = tmp_path / "dispatch.log"
    handler = dispatch.AppendingFileHandler(str(path))
    handler.setFormatter(ours)
    log = logging.getLogger("dispatch.test-appending")
    log.addHandler(handler)
    log.propagate = False

    def write(thread: int) -> None:
        for number in range(500):
            log.warning("thread %d line %d %s", thread, number, "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.removeHandler(handler)
    handler.close()
    handler.emit(logging.LogRecord("dispatch", logging.INFO, __file__, 1, "after close", (), None))  # no error
    lines = path.read_text().splitlines()
    assert len(lines) == 4000
    assert all(re.fullmatch(r"\S+ \S+ WARNING thread \d line \d+ x{200}", line) for line in lines)
    assert {tuple(line.split()[4:7:2]) for line in lines} == {(str(t), str(n)) for t in range(8) for n in range(500)}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_log_that_cannot_be_written_is_told_once_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    handler = dispatch.AppendingFileHandler("/dev/full")
    try:
        for n in range(5):
            handler.handle(logging.LogRecord("dispatch", logging.INFO, __file__, 1, "line %d", (n,), None))
    finally:
        handler.close()
    assert capsys.readouterr().err == "dispatch: cannot write the log /dev/full: No space left on device\n"


def test_loopback_is_known_in_its_ipv4_mapped_form_too() -> None:
    assert dispatch._is_loopback("::ffff:127.0.0.1") and dispatch._is_loopback("::1")
    assert not dispatch._is_loopback("::ffff:192.0.2.1")


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG_STATE_HOME is the XDG systems'")
def test_a_relative_xdg_state_home_is_ignored_as_the_spec_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
    assert dispatch.default_state_path() == "/home/alice/.local/state/dispatch/state.json"
    monkeypatch.setenv("XDG_STATE_HOME", "/var/alice")
    assert dispatch.default_log_path() == "/var/alice/dispatch/dispatch.log"


# ---------------------------------------------------------------------------
# Errors: reply codes, and the errno mapping
# ---------------------------------------------------------------------------


# Private pure helpers, unit-tested: every errno they name is mapped.


@pytest.mark.parametrize(
    "error, reply",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "unreachable"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.ENETDOWN, "down"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "no route"), Reply.HOST_UNREACHABLE),
        (OSError(errno.EHOSTDOWN, "host down"), Reply.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), Reply.HOST_UNREACHABLE),
        (TimeoutError("timed out"), Reply.TTL_EXPIRED),
        (OSError(errno.ETIMEDOUT, "timed out"), Reply.TTL_EXPIRED),
        (OSError(errno.EACCES, "denied"), Reply.GENERAL_FAILURE),
        (OSError("no errno"), Reply.GENERAL_FAILURE),
    ],
)
def test_reply_code_maps_os_errors(error: OSError, reply: Reply) -> None:
    assert dispatch._reply_code(error) == reply


@pytest.mark.parametrize(
    "error, of_link",
    [
        (OSError(errno.ENETUNREACH, "unreachable"), True),
        (OSError(errno.ENETDOWN, "down"), True),
        (OSError(errno.EHOSTUNREACH, "no route"), True),
        (OSError(errno.EADDRNOTAVAIL, "address gone"), True),
        (OSError(errno.ENODEV, "no device"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False),
        (OSError(errno.EACCES, "denied"), False),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), False),
        (dispatch.SocksError(Reply.HOST_UNREACHABLE), False),
    ],
)
def test_link_failures_are_told_from_the_targets_answer(error: OSError, of_link: bool) -> None:
    assert dispatch._is_link_failure(error) is of_link
    assert dispatch._is_target_answer(error) is (error.errno == errno.ECONNREFUSED)


# ---------------------------------------------------------------------------
# Deadline I/O: the reader with a deadline
# ---------------------------------------------------------------------------


class Chunks:
    """A stand-in socket that hands out prepared chunks, as much of each as
    asked for, and counts what it gave."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = [chunk for chunk in chunks if chunk]
        self.given = 0

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            return b""
        data, rest = self.chunks[0][:size], self.chunks[0][size:]
        if rest:
            self.chunks[0] = rest
        else:
            self.chunks.pop(0)
        self.given += len(data)
        return data


def test_deadline_reader_keeps_bytes_beyond_the_handshake() -> None:
    reader = dispatch.DeadlineReader(Chunks(b"\x05\x01", b"\x00user\0early", b"more"))  # type: ignore[arg-type]
    assert reader.read(3) == b"\x05\x01\x00"
    assert reader.read_until_nul(1024) == b"user"
    assert reader.rest() == b"early"
    assert reader.read(4) == b"more"


def test_deadline_reader_receives_no_more_than_its_window() -> None:
    stream = Chunks(b"\x05\x01\x00" + b"x" * 5000)
    reader = dispatch.DeadlineReader(stream)  # type: ignore[arg-type]
    assert reader.read(3) == b"\x05\x01\x00"
    assert stream.given == dispatch.HANDSHAKE_WINDOW
    with pytest.raises(dispatch.ProtocolError):
        reader.read_until_nul(1024)
    assert stream.given == 3 + 1025


def test_deadline_reader_caps_a_missing_nul() -> None:
    reader = dispatch.DeadlineReader(Chunks(b"x" * 600, b"y" * 600, b"\0"))  # type: ignore[arg-type]
    with pytest.raises(dispatch.ProtocolError, match="no NUL within 1024 bytes"):
        reader.read_until_nul(1024)


def test_deadline_reader_raises_on_eof() -> None:
    reader = dispatch.DeadlineReader(Chunks(b"\x05"))  # type: ignore[arg-type]
    with pytest.raises(dispatch.ProtocolError, match="client closed"):
        reader.read(2)


# ---------------------------------------------------------------------------
# Wire formats: SOCKS, UDP; the parsers' properties, any bytes at all
# ---------------------------------------------------------------------------


# SOCKS and SOCKS5 UDP ------------------------------------------------------


def test_socks5_address_round_trip() -> None:
    for host in ("192.0.2.1", "2001:db8::1", "example.com"):
        encoded = dispatch.encode_socks5_address(host, 443)
        reader = dispatch.DeadlineReader(Chunks(encoded))  # type: ignore[arg-type]
        assert dispatch.read_socks5_address(reader) == (host, 443)


@pytest.mark.parametrize(
    "name",
    ["@", ".", "..", "a..b", ".a", "a.test..", "*.test", "back\\slash.test", "a" * 64 + ".test"],
)
def test_a_socks_name_that_names_no_host_is_refused_with_reply_04(name: str) -> None:
    """ "@" and "." would be looked up as the DNS root, and "\\" read as an escape."""
    encoded = bytes([dispatch.AddressType.DOMAIN, len(name)]) + name.encode() + b"\0\x50"
    with pytest.raises(dispatch.SocksError, match="is not a host name") as refusal:
        dispatch.read_socks5_address(dispatch.DeadlineReader(Chunks(encoded)))  # type: ignore[arg-type]
    assert refusal.value.reply == Reply.HOST_UNREACHABLE
    with pytest.raises(ValueError, match="bad host"):
        dispatch.parse_connect_target(f"{name}:443")
    with pytest.raises(ValueError, match="bad host"):
        dispatch.parse_absolute_url(f"http://{name}/")


@pytest.mark.parametrize(
    "name", ["localhost", "example.com.", "_dmarc.example", "xn--bcher-kva.example", "a" * 63 + ".test", "::1"]
)
def test_a_socks_name_may_be_any_host_name(name: str) -> None:
    encoded = bytes([dispatch.AddressType.DOMAIN, len(name)]) + name.encode() + b"\0\x50"
    assert dispatch.read_socks5_address(dispatch.DeadlineReader(Chunks(encoded))) == (name, 80)  # type: ignore[arg-type]


def test_udp_datagram_round_trip() -> None:
    for host in ("192.0.2.1", "2001:db8::1", "example.com"):
        datagram = dispatch.encode_udp_header(host, 53) + b"payload"
        assert dispatch.parse_udp_datagram(datagram) == (0, host, 53, b"payload")
    assert dispatch.parse_udp_datagram(b"\0\0\x02\x01\x7f\0\0\x01\0\x35")[0] == 2
    with pytest.raises(dispatch.ProtocolError, match="truncated"):
        dispatch.parse_udp_datagram(b"\0\0\0\x01\x7f\0")
    with pytest.raises(dispatch.SocksError):
        dispatch.parse_udp_datagram(b"\0\0\0\x09rest")


# Properties: round trips, and any bytes at all -----------------------------

chunks_strategy = st.lists(st.binary(min_size=1, max_size=64), max_size=12)
# Host names: labels of 1 to 63 letters, digits, "-" and "_", as many as SOCKS carries.
label_strategy = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=63)
name_strategy = st.lists(label_strategy, min_size=1, max_size=8).map(".".join).filter(lambda name: len(name) <= 255)
host_strategy = st.one_of(st.ip_addresses().map(str), name_strategy)
port_strategy = st.integers(0, 65535)


def same_host(parsed: str, sent: str) -> bool:
    """IP addresses compare as addresses (inet_ntop and ipaddress may spell
    an IPv4-mapped one differently), names as text; the encoder tells which
    was sent."""
    if dispatch.encode_socks5_address(sent, 0)[0] != dispatch.AddressType.DOMAIN:
        return ipaddress.ip_address(parsed) == ipaddress.ip_address(sent)
    return parsed == sent


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in zip(points, points[1:])]


@settings(max_examples=200, deadline=None)
@given(chunks=chunks_strategy, sizes=st.lists(st.integers(0, 40), max_size=12))
def test_deadline_reader_reads_the_stream_as_sent(chunks: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(chunks)
    source = Chunks(*chunks)
    reader = dispatch.DeadlineReader(source)  # type: ignore[arg-type]
    offset = 0
    for size in sizes:
        if offset + size > len(stream):
            with pytest.raises(dispatch.ProtocolError):
                reader.read(size)
            return
        assert reader.read(size) == stream[offset : offset + size]
        offset += size
    # What the reader kept, then what it never took, is the rest of the stream.
    assert reader.rest() + b"".join(source.chunks) == stream[offset:]


@settings(max_examples=200, deadline=None)
@given(command=st.integers(0, 255), host=host_strategy, port=port_strategy, cuts=st.lists(st.integers(0, 300)))
def test_socks5_request_round_trips(command: int, host: str, port: int, cuts: list[int]) -> None:
    data = bytes([5, command, 0]) + dispatch.encode_socks5_address(host, port)
    reader = dispatch.DeadlineReader(Chunks(*split_at(data + b"payload", cuts)))  # type: ignore[arg-type]
    request = dispatch.read_socks5_request(reader)
    assert (request.command, request.port) == (command, port)
    assert same_host(request.host, host)
    assert reader.read(7) == b"payload"


@settings(max_examples=200, deadline=None)
@given(
    command=st.integers(0, 255),
    ip=st.ip_addresses(v=4).filter(lambda ip: not (ip.packed[:3] == b"\0\0\0" and ip.packed[3])),
    port=port_strategy,
    user_id=st.binary(max_size=dispatch.MAX_SOCKS4_FIELD).filter(lambda b: b"\0" not in b),
    name=st.one_of(st.none(), name_strategy),
    cuts=st.lists(st.integers(0, 2100)),
)
def test_socks4_request_round_trips(
    command: int, ip: Any, port: int, user_id: bytes, name: str | None, cuts: list[int]
) -> None:
    packed = b"\0\0\0\x07" if name else ip.packed
    data = struct.pack("!BH4s", command, port, packed) + user_id + b"\0"
    data += name.encode() + b"\0" if name else b""
    source = Chunks(*split_at(data + b"early", cuts))
    reader = dispatch.DeadlineReader(source)  # type: ignore[arg-type]
    request = dispatch.read_socks4_request(reader)
    assert request == dispatch.Request(command, name or str(ip), port)
    # What came with the request is kept, in order: kept and not yet taken
    # make "early" again.
    assert reader.rest() + b"".join(source.chunks) == b"early"


@settings(max_examples=200, deadline=None)
@given(user=st.binary(max_size=255), password=st.binary(max_size=255), cuts=st.lists(st.integers(0, 520)))
def test_auth_request_round_trips(user: bytes, password: bytes, cuts: list[int]) -> None:
    data = bytes([1, len(user)]) + user + bytes([len(password)]) + password
    reader = dispatch.DeadlineReader(Chunks(*split_at(data, cuts)))  # type: ignore[arg-type]
    assert dispatch.read_auth_request(reader) == (user, password)


# The longest message each parser reads, whatever the client sends; it
# receives no more than that and one HANDSHAKE_WINDOW ahead.
PARSER_BOUNDS = {
    dispatch.read_socks5_methods: 1 + 255,
    dispatch.read_socks5_address: 1 + 1 + 255 + 2,
    dispatch.read_socks5_request: 3 + 1 + 1 + 255 + 2,
    dispatch.read_socks4_request: 7 + 2 * (dispatch.MAX_SOCKS4_FIELD + 1),
    dispatch.read_auth_request: 1 + 1 + 255 + 1 + 255,
}


@pytest.mark.parametrize("parser", list(PARSER_BOUNDS), ids=lambda parser: parser.__name__)
@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=600), st.binary(min_size=1000, max_size=3000)), cuts=st.lists(st.integers()))
def test_parsers_take_any_bytes_without_surprise(parser: Callable[..., Any], data: bytes, cuts: list[int]) -> None:
    """Any bytes give a value or a SocksError (the reply to send), never
    another exception, and are read no further than the protocol allows."""
    stream = Chunks(*split_at(data, cuts))
    with contextlib.suppress(dispatch.SocksError):
        parser(dispatch.DeadlineReader(stream))  # type: ignore[arg-type]
    assert stream.given <= PARSER_BOUNDS[parser] + dispatch.HANDSHAKE_WINDOW


# ---------------------------------------------------------------------------
# HTTP framing: request and status lines, fields, bodies; against h11
# ---------------------------------------------------------------------------


def test_parse_request_line() -> None:
    assert dispatch.parse_request_line("GET http://h/ HTTP/1.1") == ("GET", "http://h/", "HTTP/1.1")
    assert dispatch.parse_request_line("VERSION-CONTROL /r HTTP/1.1")[0] == "VERSION-CONTROL"  # RFC 3253
    for bad in ("GET http://h/", "GET  http://h/ HTTP/1.1", "G3T / HTTP/1.1", "GET / HTTP/2", "GET / HTTP/1.1 x"):
        with pytest.raises(ValueError):
            dispatch.parse_request_line(bad)
    for target in ("/\xc3\xa9", "/\xa0x", "/\x7fx", "/a\tb"):  # read as latin-1: UTF-8, NBSP, DEL, a tab
        with pytest.raises(ValueError):
            dispatch.parse_request_line(f"GET {target} HTTP/1.1")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://example.com/a?b=c", ("example.com", 80, "/a?b=c")),
        ("http://example.com", ("example.com", 80, "/")),
        ("HTTP://example.com:8080?q", ("example.com", 8080, "/?q")),
        ("http://[2001:db8::1]:81/x#frag", ("2001:db8::1", 81, "/x")),
        ("http://[2001:db8::1]/", ("2001:db8::1", 80, "/")),
    ],
)
def test_parse_absolute_url(url: str, expected: tuple[str, int, str]) -> None:
    assert dispatch.parse_absolute_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["/path", "https://h/", "http://", "http://h:0/", "http://h:99999/", "http://u@h/", "http://[::1/", "http://h:x/"],
)
def test_parse_absolute_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        dispatch.parse_absolute_url(url)


def test_parse_connect_target() -> None:
    assert dispatch.parse_connect_target("example.com:443") == ("example.com", 443)
    assert dispatch.parse_connect_target("[::1]:8443") == ("::1", 8443)
    for bad in ("example.com", "example.com:", ":443", "[::1]"):
        with pytest.raises(ValueError):
            dispatch.parse_connect_target(bad)


def test_parse_header_lines() -> None:
    assert dispatch.parse_header_lines(["Host: a", "X-Empty:", "X-Sp:  v \t"]) == [
        ("Host", "a"),
        ("X-Empty", ""),
        ("X-Sp", "v"),
    ]
    for bad in ("No colon", "Name : v", " folded: v", ": v", "X: a\rb", "X: a\x00b", "X: a\r", "X(y): v"):
        with pytest.raises(ValueError):
            dispatch.parse_header_lines([bad])


def test_parse_status_line_keeps_an_empty_reason() -> None:
    assert dispatch.parse_status_line("HTTP/1.1 200 ") == ("HTTP/1.1", 200, "")
    assert dispatch.parse_status_line("HTTP/1.1 404 Not Found") == ("HTTP/1.1", 404, "Not Found")
    for bad in ("HTTP/1.x 200 OK", "HTTP/1.1 2000 OK", "HTTP/1.1 200 O\rK", "HTTP/1.1 200 \x00"):
        with pytest.raises(ValueError):
            dispatch.parse_status_line(bad)


@pytest.mark.parametrize(
    "headers, request_, expected",
    [
        ([], True, 0),
        ([], False, dispatch.Framing.UNTIL_CLOSE),
        ([("Content-Length", "12")], True, 12),
        ([("Content-Length", "12"), ("content-length", "12")], False, 12),
        ([("Content-Length", "5, 5")], True, 5),
        ([("Transfer-Encoding", " Chunked\t")], True, dispatch.Framing.CHUNKED),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "3")], False, dispatch.Framing.CHUNKED),
    ],
)
def test_body_length(headers: list[tuple[str, str]], request_: bool, expected: int) -> None:
    assert dispatch.body_length(headers, request_) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "1"), ("Content-Length", "2")],
        [("Content-Length", "-1")],
        [("Content-Length", "1"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "gzip")],
        [("Content-Length", "5, 6")],
        [("Content-Length", "+5")],
        [("Content-Length", "\xb2")],  # a digit to str.isdigit(), not to HTTP
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "chunked\x0b")],
        [("Transfer-Encoding", "\x0cchunked")],
        [("Transfer-Encoding", "chunked\xa0")],
        [("Transfer-Encoding", "")],
        [("Transfer-Encoding", "chunked,")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
    ],
)
def test_body_length_rejects_ambiguous_requests(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        dispatch.body_length(headers, request=True)


@pytest.mark.parametrize(
    "headers, length, framing",
    [
        ([("Content-Length", "5, 5")], 5, [("Content-Length", "5")]),
        (
            [("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
            dispatch.Framing.CHUNKED,
            [("Transfer-Encoding", "chunked")],
        ),
        ([("Content-Length", "0")], 0, [("Content-Length", "0")]),
        ([], dispatch.Framing.UNTIL_CLOSE, []),
    ],
)
def test_framing_is_written_out_afresh(headers: list[tuple[str, str]], length: int, framing: list[Any]) -> None:
    assert dispatch.body_length(headers, request=False) == length
    assert dispatch.framing_headers(headers, length) == framing


def test_response_has_body() -> None:
    assert dispatch.response_has_body("GET", 200)
    assert not dispatch.response_has_body("HEAD", 200)
    assert not any(dispatch.response_has_body("GET", status) for status in (100, 103, 204, 304))


def test_parse_chunk_size() -> None:
    assert dispatch.parse_chunk_size(b"1a\r\n") == 26
    assert dispatch.parse_chunk_size(b"0;name=value\r\n") == 0
    for bad in (b"\r\n", b"x1\r\n", b"-1\r\n", b"1" * 17 + b"\r\n", b"5\n", b" 5\r\n", b"5 \r\n", b"5\r\r\n"):
        with pytest.raises(ValueError):
            dispatch.parse_chunk_size(bad)


def test_forwarded_headers_drop_hop_by_hop_ones() -> None:
    headers = [
        ("Connection", "close, X-Mine"),
        ("X-Mine", "1"),
        ("Keep-Alive", "5"),
        ("Proxy-Connection", "k"),
        ("Proxy-Authorization", "Basic x"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Upgrade", "h2c"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]
    # Trailer is end to end (RFC 9110, 6.6.2); the framing is written afresh.
    assert dispatch.forwarded_headers(headers) == [("Trailer", "X"), ("Accept", "*/*")]


def test_keeps_alive() -> None:
    assert dispatch.keeps_alive("HTTP/1.1", [])
    assert not dispatch.keeps_alive("HTTP/1.1", [("Connection", "Keep-Alive, Close")])
    assert not dispatch.keeps_alive("HTTP/1.0", [("Connection", "keep-alive")])


def test_basic_credentials() -> None:
    def header(raw: bytes) -> list[tuple[str, str]]:
        return [("Proxy-Authorization", "Basic " + base64.b64encode(raw).decode())]

    assert dispatch.basic_credentials(header(b"alice:pa:ss")) == ("alice", "pa:ss")
    assert dispatch.basic_credentials(header(b"no colon")) is None
    assert dispatch.basic_credentials([("Proxy-Authorization", "Basic !!!")]) is None
    assert dispatch.basic_credentials([("Proxy-Authorization", "Bearer abc")]) is None
    assert dispatch.basic_credentials([]) is None


def test_error_response_is_complete() -> None:
    response = dispatch.error_response(HTTPStatus.BAD_GATEWAY, "connection refused")
    assert response == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 36\r\nConnection: close\r\n\r\n502 Bad Gateway: connection refused\n"
    )


# HTTP framing against h11, the oracle --------------------------------------
# For every message, valid or mangled, dispatch either refuses it or reads
# the same message as h11 does: the same head, the same body, the same bytes
# left for the next message. Valid messages (written by h11) it reads.

NEXT_REQUEST = b"GET http://example.com/next HTTP/1.1\r\nHost: example.com\r\n\r\n"


@dataclasses.dataclass
class Framed:
    """One message as a reader framed it."""

    fields: list[tuple[str, str]]
    body: bytes
    trailer: list[tuple[str, str]]
    rest: bytes


def dispatch_reads(data: bytes, request: bool) -> Framed | None:
    """The message at the start of ``data`` as the HTTP proxy reads it (a
    request, or the response to a GET); None if it refuses it. ``fields``
    and ``trailer`` are what it passes on."""
    reader = dispatch.DeadlineReader(None, data=data)
    sent: list[bytes] = []
    try:
        if request:
            lines = dispatch.read_head(reader)
            dispatch.parse_request_line(lines[0])
        else:
            lines = dispatch.read_head(reader, dispatch.MAX_RESPONSE_HEADER_LINE, dispatch.MAX_RESPONSE_HEADER_BYTES)
            status = dispatch.parse_status_line(lines[0])[1]
        headers = dispatch.parse_header_lines(lines[1:])
        declared = dispatch.body_length(headers, request)
        length = declared if request or dispatch.response_has_body("GET", status) else 0
        dispatch.copy_body(reader, length, sent.append)
    except (ValueError, dispatch.SocksError):
        return None
    fields = dispatch.forwarded_headers(headers) + dispatch.framing_headers(headers, declared)
    # One framing only (RFC 9112, 6.2): the next hop cannot choose another.
    assert sum(name.lower() in ("content-length", "transfer-encoding") for name, _ in fields) <= 1
    # What it sends on is read by h11 in turn: written out cleanly.
    out = h11_reads(dispatch.encode_head(lines[0], fields) + b"".join(sent), request, eof=length < 0)
    assert out is not None, "h11 refuses what dispatch sends on"
    forwarded = Framed(fields, out.body, out.trailer, reader.rest())
    assert (out.fields, out.rest) == (fields, b"")
    return forwarded


def as_text(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in fields]


def h11_reads(data: bytes, request: bool, eof: bool = True) -> Framed | None:
    """The message at the start of ``data`` as h11 reads it; None if it refuses it."""
    connection = h11.Connection(h11.SERVER if request else h11.CLIENT)
    if not request:
        connection.send(h11.Request(method="GET", target="/", headers=[("Host", "example.com")]))
        connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    if eof:
        connection.receive_data(b"")
    fields: list[tuple[str, str]] = []
    body = b""
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, (h11.Request, h11.Response)):
                fields = as_text(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailer = as_text(event.headers.raw_items())
                return Framed(fields, body, trailer, connection.trailing_data[0])
            else:
                return None  # wants more, or closed: the message was cut short
    except h11.RemoteProtocolError:
        return None


def hop_free(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fields as a proxy passes them on, framing aside."""
    return [(name.lower(), value) for name, value in dispatch.forwarded_headers(fields)]


def agree(data: bytes, request: bool) -> Framed | None:
    """Check dispatch against h11 on ``data``; return what dispatch read."""
    ours = dispatch_reads(data, request)
    if ours is None:
        return None
    theirs = h11_reads(data, request)
    assert theirs is not None, "dispatch reads what h11 refuses"
    assert (ours.body, ours.rest) == (theirs.body, theirs.rest)
    assert hop_free(ours.fields) == hop_free(theirs.fields)
    assert hop_free(ours.trailer) == hop_free(theirs.trailer)
    return ours


plain_value = st.text(alphabet=string.ascii_letters + string.digits + " -_.;=/", max_size=12)
field_name = st.sampled_from(["X-A", "x-b", "Accept", "Trailer", "Expect", "Cache-Control"])
mangled_value = st.tuples(
    plain_value, st.sampled_from(["\r", "\x00", "\x0b", "\x0c", "\x7f", "\t", "\xa0", "\xff"]), plain_value
).map("".join)
content_length = st.integers(0, 30).flatmap(
    lambda n: st.sampled_from(
        [
            str(n),
            f"{n}, {n}",
            f"{n},{n}",
            f"0{n}",
            f"{n}, {n + 1}",
            f"+{n}",
            f"{n}\x0b",
            f"{n} {n}",
            f"{n}\xb2",
            "-1",
            "",
        ]
    )
)
transfer_encoding = st.sampled_from(
    [
        "chunked",
        "Chunked",
        "CHUNKED",
        "chunked\x0b",
        "\x0cchunked",
        "chunked\xa0",
        "gzip, chunked",
        "chunked, chunked",
        "identity",
        "chunked,",
        ", chunked",
        "chunk ed",
        "",
    ]
)
field = st.one_of(
    st.tuples(field_name, plain_value),
    st.tuples(field_name, mangled_value),
    st.tuples(st.just("Content-Length"), content_length),
    st.tuples(st.just("Transfer-Encoding"), transfer_encoding),
    st.tuples(st.sampled_from(["X A", "X-A ", " X-A", "X\x00A", "X(A)"]), plain_value),
)
line_end = st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r", b" \r\n", b"\r\r\n", b""])
size_line = st.sampled_from([b"%x", b"%X", b"0%x", b"%x;ext=1", b'%x;a="b c"', b"%x ", b" %x", b"%x\t", b"%x;\x00"])
trailer_line = st.sampled_from([b"X-T: 1", b"x-u:  two ", b"   ", b"\tX-T: 1", b"X-T 1", b"X-T: a\x00b", b""])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """A chunked body, its framing sometimes mangled."""
    body = b""
    for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4)):
        size = len(data) + draw(st.sampled_from([0] * 8 + [-1, 1]))
        body += draw(size_line).replace(b"%x", b"%x" % size).replace(b"%X", b"%X" % size) + draw(line_end)
        body += data + draw(line_end)
    body += b"0" + draw(line_end)
    for line in draw(st.lists(trailer_line, max_size=2)):
        body += line + draw(line_end)
    return body + draw(line_end)


@st.composite
def raw_messages(draw: st.DrawFn, request: bool) -> bytes:
    """A message as anyone may write it: valid or mangled in its head, its
    framing, its body, with the next request behind it. Most say they are
    chunked or of a length, for the body to be framed by them."""
    if request:
        start = b"POST http://example.com/p HTTP/1.1"
    else:
        status = draw(st.sampled_from([200, 200, 200, 204, 304, 404]))
        reason = draw(st.sampled_from([b"OK", b"", b"Not Found", b"O\rK", b"\x00"]))
        start = b"HTTP/1.%d %d %s" % (draw(st.integers(0, 1)), status, reason)
    framing = draw(st.sampled_from(["chunked", "length", "any"]))
    if framing == "chunked":
        body = draw(chunked_bodies())
        framing_fields = [("Transfer-Encoding", draw(st.one_of(st.just("chunked"), transfer_encoding)))]
    else:
        body = draw(st.binary(max_size=40))
        length = len(body) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        framing_fields = [("Content-Length", str(max(length, 0)))] if framing == "length" else []
    fields = [*framing_fields, *draw(st.lists(field, max_size=3))]
    fields = draw(st.permutations(fields))
    if request:
        fields = [("Host", "example.com"), *fields]
    head = start + draw(line_end)
    for name, value in fields:
        head += f"{name}: {value}".encode("latin-1") + draw(line_end)
    return head + b"\r\n" + body + NEXT_REQUEST


@st.composite
def valid_messages(draw: st.DrawFn, request: bool) -> bytes:
    """A valid message, written by h11: Content-Length or chunked, with trailer fields."""
    data = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
    names = draw(st.lists(st.sampled_from(["X-A", "x-b", "Accept", "Trailer"]), max_size=3))
    fields = [(name, draw(plain_value).strip()) for name in names]
    chunked = draw(st.booleans())
    fields.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(sum(map(len, data)))))
    connection = h11.Connection(h11.CLIENT if request else h11.SERVER)
    if request:
        head = connection.send(
            h11.Request(method="PUT", target="http://example.com/p", headers=[("Host", "example.com"), *fields])
        )
    else:
        connection.receive_data(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        connection.next_event()
        connection.next_event()
        head = connection.send(h11.Response(status_code=200, headers=fields))
    trailer = [("X-T", draw(plain_value).strip())] if chunked and draw(st.booleans()) else []
    parts = [connection.send(h11.Data(data=chunk)) for chunk in data]
    end = connection.send(h11.EndOfMessage(headers=trailer))
    return b"".join([head or b"", *[part or b"" for part in parts], end or b""]) + NEXT_REQUEST


@pytest.mark.parametrize("request_", [True, False], ids=["request", "response"])
@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_framing_agrees_with_h11_or_is_refused(request_: bool, data: st.DataObject) -> None:
    agree(data.draw(raw_messages(request_)), request_)


CHUNKED_REQUEST = b"POST http://example.com/p HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"5\r\nhello\r\n0\r\n   \r\n\r\n",  # a line of spaces in the trailer section
        b"5\r\nhello\r\n0\r\n \r\nX: 1\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",  # padding around the size
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # a size line ended by LF alone
        b"5\r\nhello\n0\r\n\r\n",  # chunk data ended by LF alone
        b"5\r\nhello \r\n0\r\n\r\n",
        b"5\r\nhello\r\r\n0\r\n\r\n",
        b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n",
    ],
)
@pytest.mark.parametrize("start", [CHUNKED_REQUEST, CHUNKED_RESPONSE], ids=["request", "response"])
def test_chunked_bodies_that_smuggle_are_refused(start: bytes, body: bytes) -> None:
    assert agree(start + body + NEXT_REQUEST, start is CHUNKED_REQUEST) is None


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: chunked\x0b",
        b"Transfer-Encoding: \x0cchunked",
        b"Transfer-Encoding: chunked\xa0",
        b"Transfer-Encoding: chunked,",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5, 6",
        b"X-A: a\rb",
        b"X-A: \x00",
    ],
)
@pytest.mark.parametrize("request_", [True, False], ids=["request", "response"])
def test_ambiguous_framing_fields_are_refused(request_: bool, fields: bytes) -> None:
    start = CHUNKED_REQUEST if request_ else CHUNKED_RESPONSE
    head = start.replace(b"Transfer-Encoding: chunked\r\n", fields + b"\r\n")
    assert agree(head + b"5\r\nhello\r\n0\r\n\r\n" + NEXT_REQUEST, request_) is None


@pytest.mark.parametrize("request_", [True, False], ids=["request", "response"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_valid_messages_are_read_as_h11_reads_them(request_: bool, data: st.DataObject) -> None:
    message = data.draw(valid_messages(request_))
    ours = agree(message, request_)
    assert ours is not None and ours.rest == NEXT_REQUEST


# ---------------------------------------------------------------------------
# Access: logins and the allow-list
# ---------------------------------------------------------------------------


def test_credentials_match_exact_pairs_only() -> None:
    known = [(b"alice", b"pw1"), (b"bob", b"pw2")]
    assert dispatch.credentials_match(known, b"alice", b"pw1")
    assert dispatch.credentials_match(known, b"bob", b"pw2")
    for user, password in [(b"alice", b"pw2"), (b"bob", b"pw1"), (b"alice", b"pw"), (b"", b""), (b"eve", b"pw1")]:
        assert not dispatch.credentials_match(known, user, password)


@settings(max_examples=200, deadline=None)
@given(
    known=st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(min_size=1, max_size=8), max_size=4),
    user=st.binary(max_size=8),
    password=st.binary(max_size=8),
)
def test_credentials_match_is_exact_lookup(known: dict[bytes, bytes], user: bytes, password: bytes) -> None:
    expected = known.get(user) == password
    assert dispatch.credentials_match(list(known.items()), user, password) == expected
    for known_user, known_password in known.items():
        assert dispatch.credentials_match(list(known.items()), known_user, known_password)


def test_parse_credentials() -> None:
    assert dispatch.parse_credentials("alice:pa:ss") == ("alice", "pa:ss")
    for text in ("no colon", ":s3cret", "alice:", "u" * 256 + ":pw-9f3k", "alice:" + "p" * 256):
        with pytest.raises(ValueError) as error:
            dispatch.parse_credentials(text)
        password = text.partition(":")[2]
        assert not password or password not in str(error.value)  # never echoed


def test_dispatcher_checks_credentials_only_when_it_has_some() -> None:
    with Dispatcher(["127.0.0.1"], port=0, credentials={"alice": "s3cret"}) as proxy:
        assert proxy.requires_credentials
        assert proxy.check_credentials("alice", "s3cret")
        assert not proxy.check_credentials("alice", "s3cre")
        assert not proxy.check_credentials("bob", "s3cret")
        assert not proxy.check_credentials("bob", "")
    with Dispatcher(["127.0.0.1"], port=0) as open_proxy:
        assert not open_proxy.requires_credentials


def test_default_allow_list_is_loopback_and_private_networks() -> None:
    with Dispatcher(["127.0.0.1"], port=0) as proxy:
        for ip in (
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.20",
            "100.64.0.7",
            "169.254.1.1",
            "::1",
            "fd12:3456::1",
            "fe80::1%eth0",
            "::ffff:192.168.1.5",
        ):
            assert proxy.allows(ip), ip
        for ip in ("8.8.8.8", "172.32.0.1", "192.169.0.1", "100.128.0.1", "2001:db8::1", "::ffff:8.8.8.8", "junk"):
            assert not proxy.allows(ip), ip


def test_ipv4_mapped_clients_match_ipv4_entries() -> None:
    with Dispatcher(["127.0.0.1"], port=0, allow=["192.0.2.0/24"]) as proxy:
        assert proxy.allows("::ffff:192.0.2.9")
        assert proxy.allows("192.0.2.9")
        assert not proxy.allows("::ffff:198.51.100.1")
    with Dispatcher(["127.0.0.1"], port=0, allow=["0.0.0.0/0", "::/0"]) as proxy:
        assert proxy.allows("203.0.113.1") and proxy.allows("2001:db8::1")


# Targets only this machine may reach: its own addresses, as a test says.
OWN_ADDRESSES = {ipaddress.ip_address("192.168.1.20"), ipaddress.ip_address("2001:db8::20")}


def own_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip in OWN_ADDRESSES


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1",
        "127.0.0.2",
        "::1",
        "0.0.0.0",
        "::",
        "169.254.169.254",  # a cloud's metadata service
        "169.254.1.1",
        "fe80::1",
        "fe80::1%eth0",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "192.168.1.20",
        "2001:db8::20",
        "::ffff:192.168.1.20",
    ],
)
def test_targets_only_this_machine_may_reach_are_refused_to_other_machines(target: str) -> None:
    policy = dispatch.AccessPolicy()
    for client in ("192.168.1.5", "::ffff:192.168.1.5", "fd00::5", "203.0.113.9"):
        assert policy.refuses_target(client, target, own_address), client


def test_other_targets_are_not_refused() -> None:
    policy = dispatch.AccessPolicy()
    for target in ("192.168.1.7", "10.0.0.1", "8.8.8.8", "2001:db8::21", "224.0.0.251", "::ffff:8.8.8.8"):
        assert not policy.refuses_target("192.168.1.5", target, own_address), target


def test_clients_on_this_machine_may_reach_its_own_targets() -> None:
    policy = dispatch.AccessPolicy()
    for client in ("127.0.0.1", "127.0.0.9", "::1", "::ffff:127.0.0.1", "192.168.1.20", "2001:db8::20"):
        for target in ("127.0.0.1", "::1", "169.254.169.254", "192.168.1.20"):
            assert not policy.refuses_target(client, target, own_address), (client, target)


def test_allow_target_opens_its_networks_to_every_client_and_no_more() -> None:
    policy = dispatch.AccessPolicy(allow_targets=["127.0.0.0/8", "192.168.1.20"])
    for target in ("127.0.0.1", "127.1.2.3", "::ffff:127.0.0.1", "192.168.1.20"):
        assert not policy.refuses_target("192.168.1.5", target, own_address), target
    for target in ("::1", "169.254.169.254", "2001:db8::20"):
        assert policy.refuses_target("192.168.1.5", target, own_address), target


# ---------------------------------------------------------------------------
# Interfaces: this machine's addresses, default routes, Windows names
# ---------------------------------------------------------------------------


MACOS_ROUTE_OUTPUT = """\
   route to: default
destination: default
       mask: default
    gateway: 192.168.1.1
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING>
"""


@pytest.mark.parametrize(
    "stdout, returncode, expected",
    [(MACOS_ROUTE_OUTPUT, 0, {"en0"}), ("", 0, set()), ("", 1, None), ("  interface: \n", 0, set())],
)
def test_macos_default_route_is_read_from_route(stdout: str, returncode: int, expected: set[str] | None) -> None:
    def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        assert command == ["/sbin/route", "-n", "get", "default"] and options["timeout"] > 0
        return subprocess.CompletedProcess(command, returncode, stdout, "")

    assert dispatch._macos_default_route_interfaces(run) == expected


def test_macos_default_route_is_unknown_when_route_fails() -> None:
    def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(command, 2.0)

    assert dispatch._macos_default_route_interfaces(run) is None


def test_own_addresses_are_every_address_of_this_machine_and_no_other() -> None:
    own = [ipaddress.ip_address(address.ip) for address in dispatch.usable_addresses()]
    assert all(map(dispatch.is_own_address, own))
    assert dispatch.is_own_address(ipaddress.ip_address("127.0.0.1"))
    for other in ("198.51.100.77", "224.0.0.1", "2001:db8:ffff::77"):
        assert not dispatch.is_own_address(ipaddress.ip_address(other)), other


def _windows_adapters() -> list[Any]:
    """Adapters as ifaddr builds them on Windows: the GUID as the name, the
    hardware description as nice_name, the name from Settings on each IP."""
    from ifaddr._shared import IP, Adapter

    return [
        Adapter(
            "{4F3A1C2E-0B7D-4E59-9A51-2C6E8D0F1A11}",
            "Intel(R) Wi-Fi 6 AX201 160MHz",
            [IP("127.0.0.2", 8, "Wi-Fi")],
            index=12,
        ),
        Adapter(
            "{9C1D7B20-5E3F-4A8C-B6D2-7F0E1A2B3C44}",
            "Realtek USB GbE Family Controller",
            [IP("127.0.0.3", 8, "Ethernet 2"), IP(("fd00::3", 0, 0), 64, "Ethernet 2")],
            index=7,
        ),
        Adapter("{11AA22BB-33CC-44DD-55EE-66FF77008899}", "Bluetooth Device (Personal Area Network)", [], index=5),
    ]


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as Windows shows it: its platform name and its adapters
    (with loopback addresses, usable here)."""
    import ifaddr

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ifaddr, "get_adapters", lambda include_unconfigured=False: _windows_adapters())
    # Private name: the filter that leaves loopback addresses out (they are
    # what this test machine can bind).
    monkeypatch.setattr(dispatch, "_is_usable_address", lambda ip: True)


def test_windows_interfaces_are_named_as_in_settings_and_found_by_any_name(windows: None) -> None:
    interfaces = dispatch.read_interfaces(_windows_adapters())
    assert [(i.name, i.ips) for i in interfaces] == [
        ("Wi-Fi", ("127.0.0.2",)),
        ("Ethernet 2", ("127.0.0.3", "fd00::3")),
        ("Bluetooth Device (Personal Area Network)", ()),  # no address: no friendly name yet
    ]
    wifi = interfaces[0]
    for text in ("Wi-Fi", "wi-fi", "Intel(R) Wi-Fi 6 AX201 160MHz", "{4F3A1C2E-0B7D-4E59-9A51-2C6E8D0F1A11}"):
        assert dispatch.find_interface(interfaces, text) is wifi
    assert dispatch.find_interface(interfaces, "Wi-Fi 2") is None


def test_interface_names_are_matched_exactly_outside_windows() -> None:
    interfaces = [dispatch.Interface("eth0", ips=("192.0.2.2",))]
    assert dispatch.find_interface(interfaces, "eth0", platform="linux") is interfaces[0]
    assert dispatch.find_interface(interfaces, "ETH0", platform="linux") is None


# ---------------------------------------------------------------------------
# Links: addresses, interface links following them as they change, proxies as links
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.2", ("10.0.0.2", None, False)),
        ("10.0.0.2@7", ("10.0.0.2", 7, False)),
        ("10.0.0.2/33", ("10.0.0.2", 33, False)),  # no IPv4 prefix is that long
        ("eth0/7", ("eth0", 7, False)),  # the older form, for names
        ("fdaa:bbcc:ddee:0:1:2:3:4@3", ("fdaa:bbcc:ddee:0:1:2:3:4", 3, False)),
        ("fdaa:bbcc:ddee:0:1:2:3:4", ("fdaa:bbcc:ddee:0:1:2:3:4", None, False)),
        ("wlan0@12", ("wlan0", 12, False)),
        ("usb0@backup", ("usb0", None, True)),
        ("10.0.0.3@Backup", ("10.0.0.3", None, True)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int | None, bool]) -> None:
    spec = dispatch.parse_address(text)
    assert (spec.address, spec.weight, spec.backup) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.2@0", "the weight must be a whole number from 1 to 1000, or 'backup'"),
        ("10.0.0.2@-1", "the weight must be"),
        ("10.0.0.2@x", "the weight must be"),
        ("10.0.0.2@", "the weight must be"),
        ("eth0@1001", "the weight must be"),
        ("eth0@²", "the weight must be"),
        ("eth0/1.5", "the weight must be"),
        ("@3", "no address before '@'"),
        ("", "an empty ADDRESS"),
        ("eth0@backup@2", "one '@' at most"),
        ("eth0@2@backup", "one '@' at most"),
        ("192.0.2.2/24", "'192.0.2.2/24' looks like a network prefix; for a weight write 192.0.2.2@24"),
        ("10.0.0.1/7", "for a weight write 10.0.0.1@7"),
        ("fe80::1/64", "for a weight write fe80::1@64"),
    ],
)
def test_parse_address_rejects_bad_weights_and_prefixes(text: str, message: str) -> None:
    with pytest.raises(dispatch.AddressError, match=re.escape(message)):
        dispatch.parse_address(text)


def test_literal_address_is_mapped_to_its_interface() -> None:
    (link,) = dispatch.resolve_links(["127.0.0.1@4"])
    (address,) = link.current
    assert (address.ip, address.weight, address.interface) == ("127.0.0.1", 4, "lo")


def test_address_not_on_this_machine_is_refused() -> None:
    with pytest.raises(dispatch.AddressError, match="not an address of this machine"):
        Dispatcher(["203.0.113.9"], port=0)


def test_interface_links_follow_address_changes(log: pytest.LogCaptureFixture) -> None:
    reader = FakeInterfaces(wlan0=["10.0.0.5"])
    links = dispatch.LinkSet(
        [
            dispatch.Link.of_interface("wlan0", 1, ["10.0.0.5"]),
            dispatch.Link.of_address(dispatch.LocalAddress("10.9.0.1")),
        ],
        interface_reader=reader,
    )
    balancer = dispatch.Balancer(links.addresses, dispatch.Health())
    wlan = balancer.next(socket.AF_INET)
    assert (wlan.ip, wlan.interface) == ("10.0.0.5", "wlan0")
    reader.interfaces["wlan0"] = ["10.0.0.7"]  # DHCP gave another address
    assert {balancer.next(socket.AF_INET).ip for _ in range(4)} == {"10.0.0.5", "10.9.0.1"}
    assert reader.reads == 0  # not before the refresh
    assert links.refresh()
    balancer.rebuild(links.addresses)
    assert {balancer.next(socket.AF_INET).ip for _ in range(4)} == {"10.0.0.7", "10.9.0.1"}
    assert reader.reads == 1
    assert "wlan0 now has 10.0.0.7 (had 10.0.0.5)" in log.text
    assert not links.refresh()  # nothing changed since
    known = {address.ip: address for address in links.known_addresses()}
    assert known["10.0.0.5"] is wlan  # the old address is kept, with its counters
    assert known["10.0.0.7"].interface == "wlan0"
    assert [a.ip for a in links.addresses] == ["10.0.0.7", "10.9.0.1"]


def test_interface_without_address_is_skipped_until_it_comes_back(log: pytest.LogCaptureFixture) -> None:
    reader = FakeInterfaces(usb0=["10.0.0.5", "fd00::5"])
    links = dispatch.LinkSet(
        [
            dispatch.Link.of_interface("usb0", 1, ["10.0.0.5", "fd00::5"]),
            dispatch.Link.of_address(dispatch.LocalAddress("fd00::9")),
        ],
        interface_reader=reader,
    )
    balancer = dispatch.Balancer(links.addresses, dispatch.Health())
    del reader.interfaces["usb0"]  # unplugged
    for _ in range(3):
        if links.refresh():
            balancer.rebuild(links.addresses)
        assert balancer.next(socket.AF_INET6).ip == "fd00::9"
    assert log.text.count("usb0 has no usable address for now: skipped") == 1
    assert balancer.families == {socket.AF_INET6}
    with pytest.raises(dispatch.SocksError, match="no IPv4 local address"):
        balancer.next(socket.AF_INET)
    reader.interfaces["usb0"] = ["10.0.0.6"]
    assert links.refresh()
    balancer.rebuild(links.addresses)
    assert balancer.next(socket.AF_INET).ip == "10.0.0.6"
    assert "usb0 is back: 10.0.0.6" in log.text


def test_an_interface_seen_with_an_address_for_the_first_time_came_up(log: pytest.LogCaptureFixture) -> None:
    reader = FakeInterfaces(wlan0=[])
    links = dispatch.LinkSet([dispatch.Link.of_interface("wlan0", 1, [])], interface_reader=reader)
    assert links.addresses == []
    reader.interfaces["wlan0"] = ["10.0.0.6"]
    assert links.refresh()
    assert "wlan0 came up: 10.0.0.6" in log.text
    assert "is back" not in log.text


def test_interface_name_follows_its_address_end_to_end(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, fake_interfaces: FakeInterfaces
) -> None:
    fake_interfaces.interfaces["fake0"] = ["127.0.0.2"]
    proxy = make_proxy(["fake0"])
    assert peers_seen(proxy, peer_server, 2) == ["127.0.0.2"] * 2
    fake_interfaces.interfaces["fake0"] = ["127.0.0.3"]
    deadline = time.monotonic() + TIMEOUT
    while peers_seen(proxy, peer_server, 1) != ["127.0.0.3"] and time.monotonic() < deadline:
        pass
    assert peers_seen(proxy, peer_server, 2) == ["127.0.0.3"] * 2
    rows = {row["ip"]: row for row in proxy.stats()}
    assert rows["127.0.0.2"]["connections"] >= 2
    assert rows["127.0.0.2"]["interface"] == rows["127.0.0.3"]["interface"] == "fake0"
    assert (rows["127.0.0.2"]["state"], rows["127.0.0.3"]["state"]) == ("gone", "up")


def test_gone_addresses_are_forgotten_after_a_while_and_a_few_at_most_are_kept() -> None:
    link = dispatch.Link.of_interface("wlan0", 1, ["fd00::1"])
    # Addresses that come and go faster than GONE_ADDRESS_KEPT_SECONDS, 120 times.
    for n in range(2, 122):
        link.follow([f"fd00::{n:x}"], now=n * 60.0)
        link.drop_gone(lambda address: False, now=n * 60.0)
    assert len(link.known) == 1 + dispatch.GONE_ADDRESSES_KEPT_PER_LINK
    assert set(link.known) == {f"fd00::{n:x}" for n in range(121 - dispatch.GONE_ADDRESSES_KEPT_PER_LINK, 122)}
    # Gone long enough ago, they are all forgotten; the current one stays.
    later = 121 * 60.0 + dispatch.GONE_ADDRESS_KEPT_SECONDS
    assert [a.ip for a in link.drop_gone(lambda address: False, now=later)] == [
        f"fd00::{n:x}" for n in range(121 - dispatch.GONE_ADDRESSES_KEPT_PER_LINK, 121)
    ]
    assert list(link.known) == ["fd00::79"] and link.gone_at == {}


def test_a_gone_address_in_use_is_kept_and_one_back_is_no_longer_gone() -> None:
    link = dispatch.Link.of_interface("wlan0", 1, ["10.0.0.5"])
    held = link.known["10.0.0.5"]
    link.follow(["10.0.0.6"], now=0.0)
    assert link.drop_gone(lambda address: address is held, now=1e6) == []
    assert link.gone_at == {"10.0.0.5": 0.0}
    link.follow(["10.0.0.5"], now=10.0)  # back, the same address and counters
    assert link.known["10.0.0.5"] is held and link.gone_at == {"10.0.0.6": 10.0}


def test_forgotten_gone_addresses_leave_the_rows_and_keep_their_counts_in_the_totals(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    peer_server: Server,
    fake_interfaces: FakeInterfaces,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "GONE_ADDRESS_KEPT_SECONDS", 0.0)
    fake_interfaces.interfaces["fake0"] = ["127.0.1.1"]
    proxy = make_proxy(["fake0"])
    held = client_through(proxy, (echo_server.host, echo_server.port))  # open through 127.0.1.1
    for n in range(2, 12):
        fake_interfaces.interfaces["fake0"] = [f"127.0.1.{n}"]
        assert wait_for(lambda ip=f"127.0.1.{n}": peers_seen(proxy, peer_server, 1) == [ip])
    assert wait_for(lambda: {row["ip"] for row in proxy.stats()} == {"127.0.1.1", "127.0.1.11"})
    assert round_trip(held, b"still open") == b"still open"
    held.close()
    assert wait_for(lambda: [row["ip"] for row in proxy.stats()] == ["127.0.1.11"])
    totals = proxy.status()["totals"]
    assert totals["connections"] >= 11  # the held one, and at least one through each of the others
    assert totals["bytes_up"] >= len(b"still open")
    assert sum(row["connections"] for row in proxy.stats()) < totals["connections"]


def test_windows_friendly_names_start_the_proxy(
    windows: None, peer_server: Server, make_proxy: Callable[..., Dispatcher]
) -> None:
    proxy = make_proxy(["Wi-Fi@3", "Ethernet 2"])
    rows = {row["ip"]: row for row in proxy.stats()}
    assert (rows["127.0.0.2"]["interface"], rows["127.0.0.2"]["weight"]) == ("Wi-Fi", 3)
    assert rows["127.0.0.3"]["interface"] == rows["fd00::3"]["interface"] == "Ethernet 2"
    # Weights 3 and 1, smoothly: A A B A.
    assert peers_seen(proxy, peer_server, 4) == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.2"]


def test_an_interface_without_an_address_is_waited_for(
    make_proxy: Callable[..., Dispatcher],
    peer_server: Server,
    fake_interfaces: FakeInterfaces,
    log: pytest.LogCaptureFixture,
) -> None:
    fake_interfaces.interfaces["fake0"] = []  # Wi-Fi not joined yet
    proxy = make_proxy(["fake0"])
    (row,) = proxy.stats()
    assert (row["ip"], row["link"], row["state"], row["reason"]) == (None, "fake0", "waiting", "no address yet")
    request = socks5_request(peer_server.host, peer_server.port)
    assert socks5_code_for(proxy, request) == Reply.NETWORK_UNREACHABLE  # no address yet
    fake_interfaces.interfaces["fake0"] = ["127.0.0.2"]  # joined
    assert wait_for(lambda: proxy.addresses != [])
    assert peers_seen(proxy, peer_server, 2) == ["127.0.0.2"] * 2
    assert "fake0 came up: 127.0.0.2" in log.text
    assert [(row["ip"], row["state"]) for row in proxy.stats()] == [("127.0.0.2", "up")]


def test_an_interface_and_one_of_its_addresses_name_the_two_arguments(fake_interfaces: FakeInterfaces) -> None:
    fake_interfaces.interfaces["fake0"] = ["127.0.0.2"]
    with pytest.raises(dispatch.AddressError, match=r"'fake0' and '127\.0\.0\.2@3' both give 127\.0\.0\.2"):
        dispatch.resolve_links(["fake0", "127.0.0.2@3"])


@pytest.mark.parametrize("ip", ["169.254.10.20", "fe80::1"])
def test_a_link_local_address_is_refused_with_the_reason(ip: str) -> None:
    with pytest.raises(dispatch.AddressError, match="is a link-local address: it reaches only the hosts"):
        dispatch.resolve_links([ip])


# ---------------------------------------------------------------------------
# Health: failures, retests, checks
# ---------------------------------------------------------------------------


def three_addresses(
    clock: FakeClock, weights: tuple[int, ...] = (1, 1, 1)
) -> tuple[dispatch.Balancer, list[dispatch.LocalAddress]]:
    addresses = [dispatch.LocalAddress(f"10.0.0.{n}", w) for n, w in zip((1, 2, 3), weights)]
    return dispatch.Balancer(addresses, dispatch.Health(30.0, clock)), addresses


RETEST_TARGET = ("203.0.113.80", 443)


def sit_out(health: dispatch.Health, *addresses: dispatch.LocalAddress) -> None:
    health.connected_through(dispatch.LocalAddress("10.9.9.9"), [(a, TimeoutError()) for a in addresses], RETEST_TARGET)


def test_failed_address_sits_out_until_a_retest_gets_through(log: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    balancer, addresses = three_addresses(clock)
    health = balancer.health
    dark, live, _ = addresses
    health.connected_through(live, [(dark, TimeoutError("timed out"))], RETEST_TARGET)
    assert "sitting out: 10.0.0.1: timed out; retested in 1 s" in log.text
    assert [health.state(a)[0] for a in addresses] == ["down", "up", "up"]
    assert health.state(dark)[1] == "timed out; retested in 1 s"
    picks = [balancer.next(socket.AF_INET).ip for _ in range(20)]
    assert "10.0.0.1" not in picks
    assert picks.count("10.0.0.2") == picks.count("10.0.0.3") == 10
    # Retests, never a client, try it: 1 s after the failure, then twice as
    # long after each failed retest, at most the cooldown (30 s) apart.
    waits = []
    for _ in range(7):
        waited = 0.0
        while not (due := health.due_retests()):
            clock.now += 0.5
            waited += 0.5
        assert due == [dispatch.Retest(dark, RETEST_TARGET, math.inf)]  # how long it took: not known
        assert health.due_retests() == []  # handed out once
        assert str(health.state(dark)[1]).endswith("; retesting now")
        health.retest_result(dark, OSError(errno.EHOSTUNREACH, "No route to host"))
        waits.append(waited)
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert health.state(dark) == ("down", "No route to host; retested in 30 s")
    assert "10.0.0.1" not in {balancer.next(socket.AF_INET).ip for _ in range(6)}
    clock.now += 30
    assert [retest.target for retest in health.due_retests()] == [RETEST_TARGET]
    health.retest_result(dark, None)
    assert "back in use: 10.0.0.1 (a retest reached 203.0.113.80:443)" in log.text
    assert health.state(dark) == ("up", None)
    assert "10.0.0.1" in {balancer.next(socket.AF_INET).ip for _ in range(3)}


def retest_targets(health: dispatch.Health, clock: FakeClock, address: dispatch.LocalAddress, count: int) -> list:
    """The targets of the next ``count`` retests of ``address``, each failing."""
    targets = []
    for _ in range(count):
        while not (due := health.due_retests()):
            clock.now += 0.5
        (retest,) = due
        assert retest.address is address
        targets.append(retest.target)
        health.retest_result(address, TimeoutError(errno.ETIMEDOUT, "timed out"))
    return targets


def test_retests_try_the_sites_other_links_reached_before_the_one_that_failed(log: pytest.LogCaptureFixture) -> None:
    """A site that never answers through one link (it blocks that provider)
    must not keep the link out while it reaches everything else."""
    clock = FakeClock()
    balancer, (blocked, cable, phone) = three_addresses(clock)
    health = balancer.health
    other_site, third_site = ("198.51.100.7", 443), ("198.51.100.8", 80)
    health.connected_through(cable, [], other_site)  # what the other links reach
    health.connected_through(phone, [], third_site)
    health.connected_through(cable, [(blocked, TimeoutError())], RETEST_TARGET)
    # Each round: the sites reached lately, the latest first, then the one
    # it failed at.
    assert retest_targets(health, clock, blocked, 6) == [
        third_site,
        other_site,
        RETEST_TARGET,
        third_site,
        other_site,
        RETEST_TARGET,
    ]
    clock.now += 60
    assert [retest.target for retest in health.due_retests()] == [third_site]
    health.retest_result(blocked, OSError(errno.ETIMEDOUT, "timed out"))
    clock.now += 60
    assert [retest.target for retest in health.due_retests()] == [other_site]
    health.retest_result(blocked, None)  # another site answers: back
    assert not health.is_out(blocked)
    assert "back in use: 10.0.0.1 (a retest reached 198.51.100.7:443)" in log.text


def test_retests_try_what_the_link_itself_reached_and_the_check_targets() -> None:
    clock = FakeClock()
    blocked, live = dispatch.LocalAddress("10.0.0.1"), dispatch.LocalAddress("10.0.0.2")
    check = ("192.0.2.53", 53)
    health = dispatch.Health(30.0, clock, check_targets=[check, ("2001:db8::53", 53)])
    own_site = ("198.51.100.9", 22)
    health.connected_through(blocked, [], own_site)  # before: it reached this one
    health.connected_through(live, [(blocked, TimeoutError())], RETEST_TARGET)
    # Its own site, the check target, then the site it failed at (the IPv6
    # check target is no target for an IPv4 address).
    assert retest_targets(health, clock, blocked, 6) == [own_site, check, RETEST_TARGET] * 2


def test_retests_of_an_upstream_proxy_take_turns_with_targets_it_can_be_asked_for() -> None:
    """An upstream proxy is a link like any other: a site that never answers
    through it does not keep it out. A SOCKS4 proxy is asked for no IPv6
    target, and no name where it resolves none."""
    clock = FakeClock()
    live = dispatch.LocalAddress("10.0.0.2")
    proxy, _ = dispatch.parse_proxy_url("socks4://192.0.2.80:1080")
    upstream = dispatch.ProxyAddress(proxy=proxy)
    health = dispatch.Health(30.0, clock, check_targets=[("2001:db8::53", 53)])
    other_site, named_site = ("198.51.100.7", 443), ("example.net", 443)
    health.connected_through(live, [], other_site)
    health.connected_through(live, [], named_site)
    health.connected_through(live, [(upstream, TimeoutError())], RETEST_TARGET)
    assert retest_targets(health, clock, upstream, 4) == [other_site, RETEST_TARGET] * 2


def test_with_no_other_target_known_retests_keep_to_the_one_that_failed() -> None:
    clock = FakeClock()
    balancer, (blocked, live, _) = three_addresses(clock)
    balancer.health.connected_through(live, [(blocked, TimeoutError())], RETEST_TARGET)
    assert retest_targets(balancer.health, clock, blocked, 4) == [RETEST_TARGET] * 4


def test_a_retest_waits_a_few_times_what_the_other_link_took_and_longer_after_each_failure() -> None:
    """Not the whole connect timeout: a site silent through one link costs
    its retest about what it costs the others, and a slower link still gets
    more time each round."""
    clock = FakeClock()
    blocked, live = dispatch.LocalAddress("10.0.0.1"), dispatch.LocalAddress("10.0.0.2")
    health = dispatch.Health(30.0, clock)
    far_site = ("198.51.100.7", 443)
    health.connected_through(live, [], far_site, took=0.4)
    health.connected_through(live, [(blocked, TimeoutError())], RETEST_TARGET, took=0.01)
    timeouts = []
    for _ in range(6):
        while not (due := health.due_retests()):
            clock.now += 0.5
        (retest,) = due
        timeouts.append((retest.target, retest.timeout))
        health.retest_result(blocked, TimeoutError(errno.ETIMEDOUT, "timed out"))
    # Four times what the connect took, at least 1 s; twice as long after
    # each failed retest (the Dispatcher stops at the connect timeout).
    assert timeouts == [
        (far_site, 1.6),
        (RETEST_TARGET, 2.0),
        (far_site, 6.4),
        (RETEST_TARGET, 8.0),
        (far_site, 25.6),
        (RETEST_TARGET, 32.0),
    ]


def test_a_site_another_link_reaches_brings_the_retest_of_a_link_out_forward() -> None:
    clock = FakeClock()
    balancer, (blocked, cable, _) = three_addresses(clock)
    health = balancer.health
    health.connected_through(cable, [(blocked, TimeoutError())], RETEST_TARGET, took=0.05)
    # Only the site it failed at is known: the retests back off (1, 2, 4, 8 s).
    assert retest_targets(health, clock, blocked, 4) == [RETEST_TARGET] * 4
    assert health.state(blocked) == ("down", "timed out; retested in 16 s")
    # Another link reaches a new site: it is tried within 1 s, not 16.
    new_site = ("198.51.100.7", 443)
    health.connected_through(cable, [], new_site, took=0.05)
    assert health.state(blocked) == ("down", "timed out; retested in 1 s")
    clock.now += 1
    assert health.due_retests() == [dispatch.Retest(blocked, new_site, 16.0)]
    # One reached while a retest is under way makes the next one due in 1 s too.
    newer_site = ("198.51.100.8", 443)
    health.connected_through(cable, [], newer_site, took=0.05)
    health.retest_result(blocked, TimeoutError(errno.ETIMEDOUT, "timed out"))
    assert health.state(blocked) == ("down", "timed out; retested in 1 s")
    clock.now += 1
    assert [retest.target for retest in health.due_retests()] == [newer_site]
    # A site reached again, or one of a family it cannot be asked for, is no news.
    health.retest_result(blocked, TimeoutError(errno.ETIMEDOUT, "timed out"))
    health.connected_through(cable, [], new_site, took=0.05)
    health.connected_through(cable, [], ("2001:db8::7", 443), took=0.05)
    assert health.state(blocked) == ("down", "timed out; retested in 30 s")


def test_checks_take_a_link_out_after_three_failures_and_back_after_two(log: pytest.LogCaptureFixture) -> None:
    balancer, (wifi, cable, phone) = three_addresses(FakeClock())
    health = balancer.health
    dark = OSError(errno.ETIMEDOUT, "timed out")
    for _ in range(2):
        health.check_round({wifi: dark, cable: None, phone: None}, "192.0.2.9:443")
    assert health.state(wifi) == ("up", None)  # two failures: not yet
    health.check_round({wifi: dark, cable: None, phone: None}, "192.0.2.9:443")
    assert health.state(wifi) == ("down", "failed 3 checks of 192.0.2.9:443: timed out")
    assert health.due_retests() == []  # checks, not retests, bring it back
    health.check_round({wifi: None, cable: None, phone: None}, "192.0.2.9:443")
    assert health.is_out(wifi)
    health.check_round({wifi: None, cable: None, phone: None}, "192.0.2.9:443")
    assert not health.is_out(wifi)
    assert "back in use: 10.0.0.1 (passed 2 checks of 192.0.2.9:443)" in log.text


def test_when_every_link_fails_its_check_the_target_is_blamed_once(log: pytest.LogCaptureFixture) -> None:
    balancer, addresses = three_addresses(FakeClock())
    health = balancer.health
    down = OSError(errno.ETIMEDOUT, "timed out")
    for _ in range(5):
        health.check_round(dict.fromkeys(addresses, down), "192.0.2.9:443")
    assert [health.state(a)[0] for a in addresses] == ["up", "up", "up"]  # serving on the last state
    assert log.text.count("every link failed its check of 192.0.2.9:443") == 1
    health.check_round({addresses[0]: None, addresses[1]: down, addresses[2]: down}, "192.0.2.9:443")
    assert "a link passed its check of 192.0.2.9:443 again" in log.text


# ---------------------------------------------------------------------------
# Choice: weighted round robin, measured balancing, sticky sites, tiers
# ---------------------------------------------------------------------------


# Weighted round robin ------------------------------------------------------


def test_weighted_round_robin_is_smooth_and_exact() -> None:
    rounds = WeightedRoundRobin(["A", "B"], [7, 3])
    picks = [rounds.next() for _ in range(100)]
    assert "".join(picks[:10]) == "ABAAABAABA"
    for start in range(len(picks) - 9):
        assert picks[start : start + 10].count("A") == 7


def test_weighted_round_robin_three_links() -> None:
    rounds = WeightedRoundRobin(["cable", "wifi", "phone"], [3, 3, 1])
    picks = [rounds.next() for _ in range(70)]
    for start in range(len(picks) - 6):
        window = picks[start : start + 7]
        assert (window.count("cable"), window.count("wifi"), window.count("phone")) == (3, 3, 1)
    # Smooth: never more than two picks of one link in a row here.
    assert all(len({picks[i], picks[i + 1], picks[i + 2]}) > 1 for i in range(len(picks) - 2))


def test_weighted_round_robin_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        WeightedRoundRobin(["A"], [0])
    with pytest.raises(ValueError):
        WeightedRoundRobin([], [])


# Links sitting out ---------------------------------------------------------


def test_when_every_address_sits_out_they_are_tried_anyway_in_turn() -> None:
    balancer, addresses = three_addresses(FakeClock())
    sit_out(balancer.health, *addresses)
    picks = [balancer.next(socket.AF_INET).ip for _ in range(6)]
    assert sorted(picks) == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.3"]


def test_sitting_out_keeps_the_others_in_proportion() -> None:
    balancer, (cable, wifi, phone) = three_addresses(FakeClock(), weights=(3, 3, 1))
    balancer.health.connected_through(phone, [(wifi, TimeoutError())], RETEST_TARGET)
    picks = [balancer.next(socket.AF_INET) for _ in range(40)]
    assert (picks.count(cable), picks.count(phone)) == (30, 10)


def test_choose_skips_tried_and_sitting_out_addresses() -> None:
    balancer, (first, second, third) = three_addresses(FakeClock())
    sit_out(balancer.health, second)
    assert balancer.choose(socket.AF_INET, [first]) is third
    # Sitting out, but the only one left: tried anyway.
    assert balancer.choose(socket.AF_INET, [first, third]) is second
    assert balancer.choose(socket.AF_INET, [first, second, third]) is None
    assert balancer.choose(socket.AF_INET6, []) is None


# Measured balancing, sticky sites, tiers -----------------------------------

KB = 1000  # rates in kB/s, as the lab counts them
TICK = dispatch.ESTIMATE_INTERVAL


class Ticks:
    """Feeds one link's samples to an estimator as the Dispatcher's sampler
    does: every TICK, the bytes moved since, the connections open then and now."""

    def __init__(
        self, estimator: dispatch.CapacityEstimator | None = None, link: dispatch.LocalAddress | None = None
    ) -> None:
        self.estimator = estimator or dispatch.CapacityEstimator()
        self.link = link or dispatch.LocalAddress("10.0.0.1")
        self.now, self.open = 0.0, 0
        self.estimator.add(self.link, dispatch.Sample(0, 0, 0, self.now), 0, 0)

    def run(self, rate: float, seconds: float, open_count: int = 1, up: float = 0.0) -> float | None:
        """``seconds`` of ``rate`` (bytes per second, down; ``up`` the other
        way) through ``open_count`` connections; returns the estimate."""
        for _ in range(round(seconds / TICK)):
            self.tick(rate * TICK, open_count, up * TICK)
        return self.estimator.estimate(self.link)

    def tick(self, moved: float, open_after: int, up: float = 0.0, seconds: float = TICK) -> None:
        self.now += seconds
        self.estimator.add(self.link, dispatch.Sample(int(up), int(moved), 0, self.now), self.open, open_after)
        self.open = open_after

    def burst(self, rate: float, seconds: float, open_count: int = 3) -> float | None:
        """A burst as a batch of downloads makes it: connections open partway
        into a tick, run ``seconds`` at ``rate``, end partway into another,
        and stay open idle (keep-alive) for a while."""
        self.tick(rate * TICK * 0.4, open_count)
        self.run(rate, seconds, open_count)
        self.tick(rate * TICK * 0.3, open_count)
        self.run(0, 2.0, open_count)  # open, idle
        self.tick(0, 0)
        return self.estimator.estimate(self.link)

    @property
    def source(self) -> str | None:
        return self.estimator.source(self.link)[1]


def test_capacity_is_unknown_until_two_ticks_of_traffic_and_takes_the_larger_direction() -> None:
    ticks = Ticks()
    assert ticks.run(0, 60, open_count=0) is None  # idle: no evidence
    assert ticks.run(1200 * KB, 0.25, up=100 * KB) is None  # one tick is not enough
    assert ticks.run(1200 * KB, 0.25, up=100 * KB) == pytest.approx(1200 * KB)
    ticks = Ticks()
    assert ticks.run(100 * KB, 1, up=900 * KB) == pytest.approx(900 * KB)  # an upload measures too


@pytest.mark.parametrize("seconds", [1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("rate", [400 * KB, 1200 * KB, 50_000 * KB])
def test_a_burst_of_a_second_or_more_measures_a_link(seconds: float, rate: float) -> None:
    ticks = Ticks()
    assert ticks.burst(rate, seconds) == pytest.approx(rate, rel=0.01)
    assert ticks.source == "measured"


def test_a_burst_shorter_than_a_second_raises_a_figure_some_way() -> None:
    ticks = Ticks()
    ticks.burst(400 * KB, 3)
    assert 0.6 * 1200 * KB <= (ticks.burst(1200 * KB, 0.25) or 0) <= 1200 * KB


def test_new_connections_that_moved_little_in_their_first_tick_still_measure_a_short_burst() -> None:
    ticks = Ticks()
    ticks.burst(500 * KB, 3)
    ticks.tick(5_000, 4)  # they opened at the very end of a tick
    assert ticks.run(2000 * KB, 0.5, 4) == pytest.approx(2000 * KB)


def test_bytes_the_relay_caught_up_on_do_not_read_as_a_faster_link() -> None:
    """The relay stalls for a quarter second now and then; what waited in
    the kernel passes in the next one."""
    ticks = Ticks()
    ticks.burst(1200 * KB, 2)
    for _ in range(20):
        ticks.run(1200 * KB, 0.75, 4)
        ticks.run(200 * KB, 0.25, 4)  # stalled, but still loaded
        ticks.run(2200 * KB, 0.25, 4)
    assert ticks.estimator.estimate(ticks.link) == pytest.approx(1200 * KB)
    ticks.run(0, 0.5, 4)  # stalled long enough to end the run
    ticks.run(1200 * KB + 600 * KB / TICK, TICK, 4)  # then all of it at once
    assert ticks.run(1200 * KB, 0.5, 4) == pytest.approx(1200 * KB)


def test_a_link_that_got_faster_shows_within_a_second_of_traffic() -> None:
    ticks = Ticks()
    ticks.burst(400 * KB, 3)
    assert ticks.run(1200 * KB, 0.75) == pytest.approx(1200 * KB, rel=0.01)


def test_a_link_that_got_faster_in_the_middle_of_a_run_shows_within_two_seconds() -> None:
    ticks = Ticks()
    ticks.run(400 * KB, 5, 4)
    assert ticks.run(1200 * KB, 2, 4) == pytest.approx(1200 * KB, rel=0.01)


@pytest.mark.parametrize("seconds", [1.0, 1.5, 2.0, 3.0])
def test_a_link_that_got_faster_between_bursts_keeps_its_new_figure(seconds: float) -> None:
    """The measurements of the slower link before are no vote against it."""
    ticks = Ticks()
    for _ in range(3):
        ticks.burst(400 * KB, 3)
    assert ticks.burst(1200 * KB, seconds) == pytest.approx(1200 * KB, rel=0.01)


def test_a_slow_link_whose_ticks_read_a_quarter_off_is_not_read_high() -> None:
    """The relay samples a slow link's ticks up to a quarter short, and
    what it missed passes in the next tick; through bursts of one to three
    seconds the figure stays within a few per cent of the rate. Read ten
    per cent high, a slow link beside two three times as fast takes 4
    downloads of 24 rather than 3, which end the batch late."""
    figures = []
    for seed in range(10):
        ticks, noise, late = Ticks(), random.Random(seed), 0.0
        for _ in range(12):
            ticks.tick(400 * KB * TICK * 0.4, 3)
            for _ in range(noise.randint(4, 12)):
                missed = noise.uniform(0, 0.25)
                ticks.tick(400 * KB * TICK * (1 - missed + late), 3)
                late = missed
            ticks.tick(400 * KB * TICK * (0.3 + late), 3)
            ticks.run(0, 1.0, 3)  # the quiet end
            ticks.tick(0, 0)
            late = 0.0
        figures.append(ticks.estimator.estimate(ticks.link))
    assert figures == [pytest.approx(400 * KB, rel=0.05)] * 10


@pytest.mark.parametrize("open_count", [1, 3, 12])
def test_a_link_that_got_slower_shows_within_five_seconds_of_traffic(open_count: int) -> None:
    ticks = Ticks()
    ticks.burst(1200 * KB, 3)
    assert ticks.run(400 * KB, 2, open_count) == pytest.approx(1200 * KB)  # a dip is not yet a change
    assert ticks.run(400 * KB, 3, open_count) == pytest.approx(400 * KB, rel=0.01)


def test_a_link_that_got_slower_in_the_middle_of_a_long_run_is_followed_steadily() -> None:
    """Downloads that began when the link was fast go on after it slowed:
    the run's rate so far is still above the figure, which is no sign of a
    faster link, so the figure stays the median of the slower link's
    measurements, each a quarter off its rate at times."""
    for seed in range(10):
        ticks, noise, late, figures = Ticks(), random.Random(seed), 0.0, []
        for rate, seconds in ((1200 * KB, 20), (400 * KB, 8)):
            for _ in range(round(seconds / TICK)):
                missed = noise.uniform(0, 0.25)
                ticks.tick(rate * TICK * (1 - missed + late), 6)
                late = missed
                figures.append(ticks.estimator.estimate(ticks.link))
        assert figures[-16:] == [pytest.approx(400 * KB, rel=0.05)] * 16, seed


def test_a_slower_link_shows_over_bursts_of_a_second_or_two() -> None:
    """The traffic of short bursts adds up: idle time between them neither
    counts nor resets what they showed."""
    ticks = Ticks()
    ticks.burst(1200 * KB, 3)
    figures = [ticks.burst(400 * KB, 1.5) for _ in range(5)]
    assert figures[0] == pytest.approx(1200 * KB)
    assert figures[-1] == pytest.approx(400 * KB, rel=0.01)


def test_a_link_that_stays_alike_keeps_its_figure_through_noise() -> None:
    ticks, noise = Ticks(), random.Random(7)
    ticks.burst(1200 * KB, 3)
    for _ in range(400):
        ticks.run(1200 * KB * noise.uniform(0.85, 1.0), TICK, 4)
    assert 1100 * KB <= (ticks.estimator.estimate(ticks.link) or 0) <= 1200 * KB


def test_the_quiet_end_of_a_burst_lowers_nothing() -> None:
    """A batch's downloads end at different moments while their connections
    stay open (keep-alive): the link is quiet, which says nothing of what it
    can carry."""
    ticks = Ticks()
    ticks.run(1150 * KB, 3, 10)
    ticks.run(700 * KB, 0.25, 10)  # most downloads ended
    ticks.run(300 * KB, 0.25, 10)
    ticks.run(80 * KB, 0.25, 10)
    assert ticks.run(0, 600, 10) == pytest.approx(1150 * KB)
    ticks.tick(0, 0)
    assert ticks.run(0, 3600, 0) == pytest.approx(1150 * KB)  # idle time changes nothing


@pytest.mark.parametrize("rate", [1 * KB, 20 * KB, 31 * KB])
def test_a_trickle_neither_measures_nor_lowers_a_link(rate: float) -> None:
    ticks = Ticks()
    assert ticks.run(rate, 120, 2) is None  # a chat, a keep-alive
    ticks.burst(1200 * KB, 2)
    assert ticks.run(rate, 120, 2) == pytest.approx(1200 * KB)


def test_one_slow_stream_is_the_applications_pace_but_many_are_the_links() -> None:
    ticks = Ticks()
    ticks.burst(4000 * KB, 2)
    assert ticks.run(150 * KB, 60, 1) == pytest.approx(4000 * KB)  # a video's pace, far under the figure
    assert ticks.run(150 * KB, 6, 4) == pytest.approx(150 * KB, rel=0.01)  # four all that slow: the link


def test_short_connections_never_open_at_a_tick_measure_nothing() -> None:
    ticks = Ticks()
    assert ticks.run(5000 * KB, 30, 0) is None  # each opened and closed between two ticks


@pytest.mark.parametrize("jump", [-5.0, -TICK, 0.0, 3.0, 3600.0])
def test_a_clock_that_jumps_is_no_evidence(jump: float) -> None:
    ticks = Ticks()
    ticks.burst(1200 * KB, 2)
    ticks.run(1200 * KB, 1, 2)
    ticks.tick(1200 * KB * TICK + max(jump, 0) * 1200 * KB, 2, seconds=jump)  # what moved meanwhile, and more
    assert ticks.estimator.estimate(ticks.link) == pytest.approx(1200 * KB)
    assert ticks.run(400 * KB, 6, 2) == pytest.approx(400 * KB, rel=0.01)  # and it measures on


def test_a_remembered_figure_stands_until_the_link_is_measured() -> None:
    ticks = Ticks()
    ticks.estimator.remember(ticks.link, 1200 * KB)
    assert (ticks.estimator.estimate(ticks.link), ticks.source) == (1200 * KB, "remembered")
    ticks.run(0, 600, 0)
    ticks.run(10 * KB, 60, 1)  # a trickle is no measurement
    assert (ticks.estimator.estimate(ticks.link), ticks.source) == (1200 * KB, "remembered")
    figure = ticks.burst(500 * KB, 2.5)
    assert (figure, ticks.source) == (pytest.approx(500 * KB, rel=0.01), "measured")
    ticks.estimator.remember(ticks.link, 3000 * KB)  # a figure of this run is not overwritten
    assert ticks.estimator.estimate(ticks.link) == pytest.approx(500 * KB, rel=0.01)


def test_a_higher_rate_replaces_a_remembered_figure_at_once() -> None:
    ticks = Ticks()
    ticks.estimator.remember(ticks.link, 400 * KB)
    assert ticks.run(1200 * KB, 0.75) == pytest.approx(1200 * KB)
    assert ticks.source == "measured"


def test_a_change_of_more_than_a_quarter_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    ticks = Ticks()

    def told() -> list[tuple[str, float]]:
        found = (
            re.fullmatch(r"capacity of 10\.0\.0\.1: (.*) -> (\d+) kB/s", record.getMessage())
            for record in caplog.records
        )
        return [(match[1], float(match[2])) for match in found if match]

    with caplog.at_level(logging.DEBUG, logger="dispatch"):
        ticks.burst(1200 * KB, 2)
        assert told()[0][0] == "not measured" and told()[-1][1] == 1200
        lines = len(told())
        ticks.run(1250 * KB, 2, 3)  # a few per cent: nothing to tell
        assert len(told()) == lines
        ticks.run(400 * KB, 6, 3)
    assert told()[-1][1] == 400
    for (before, after), (_, earlier) in zip(told()[1:], told()):
        assert before == f"{earlier:.0f} kB/s" and abs(after - earlier) > earlier / 4


def short_connections(
    choice: dispatch.MeasuredChoice[str], capacities: dict[str, float | None], count: int
) -> list[str]:
    """Connections one after another, each closed before the next."""
    return [choice.choose(list(capacities), lambda _: 0, capacities.__getitem__) for _ in range(count)]


def allocate(choice: dispatch.MeasuredChoice[str], capacities: dict[str, float | None], count: int) -> Counter[str]:
    """Connections opened together, none closed: how many each link got."""
    opened: Counter[str] = Counter()
    for _ in range(count):
        opened[choice.choose(list(capacities), opened.__getitem__, capacities.__getitem__)] += 1
    return opened


@pytest.mark.parametrize(
    "capacities",
    [{"a": None, "b": None, "c": None}, {"a": 5e6, "b": 5e6, "c": 5e6}, {"a": 5.0e6, "b": 4.7e6, "c": 5.2e6}],
)
def test_measured_choice_takes_turns_over_links_alike(capacities: dict[str, float | None]) -> None:
    assert short_connections(dispatch.MeasuredChoice(), capacities, 6) == ["a", "b", "c", "a", "b", "c"]


def test_measured_choice_gives_equal_downloads_where_they_finish_soonest() -> None:
    capacities: dict[str, float | None] = {"a": 1200 * KB, "b": 1200 * KB, "c": 400 * KB}
    opened = allocate(dispatch.MeasuredChoice(), capacities, 24)
    assert sorted(opened.values()) == [3, 10, 11]
    finish = max(opened[link] / (capacity or 1) for link, capacity in capacities.items())
    best = min(
        max(n / (c or 1) for n, c in zip(split, capacities.values()))
        for split in itertools.product(range(25), repeat=3)
        if sum(split) == 24
    )
    assert finish == pytest.approx(best)


def test_an_unmeasured_link_counts_as_the_best_and_a_low_one_still_gets_some() -> None:
    opened = allocate(dispatch.MeasuredChoice(), {"a": 1200 * KB, "b": None, "c": 400 * KB}, 24)
    assert abs(opened["a"] - opened["b"]) <= 1 and opened["c"] == 3
    # "b" carried only light traffic; the connections it gets measure it again.
    assert allocate(dispatch.MeasuredChoice(), {"a": 1200 * KB, "b": 40 * KB}, 24)["b"] >= 1


@pytest.mark.parametrize(
    ("host", "site"),
    [
        ("www.example.co.uk", "example.co.uk"),
        ("api.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("WWW.Example.COM.", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("localhost", "localhost"),
        ("cdn.shop.com.au", "shop.com.au"),
        ("www.yahoo.co.jp", "yahoo.co.jp"),
        ("m.naver.co.kr", "naver.co.kr"),
        ("shop.example.com.br", "example.com.br"),
        ("www.example.me.uk", "example.me.uk"),
        ("docs.user.github.io", "user.github.io"),
        ("github.io", "github.io"),
        ("a.b.cloudfront.net", "b.cloudfront.net"),
        ("img.bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
        ("www.example.de", "example.de"),
        ("93.184.216.34", "93.184.216.34"),
        ("2001:DB8::0:1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
    ],
)
def test_a_site_is_the_registrable_domain(host: str, site: str) -> None:
    assert dispatch.registrable_domain(host) == site


def test_sticky_table_expires_and_stays_bounded() -> None:
    table: dispatch.StickyTable[str] = dispatch.StickyTable(seconds=60, max_entries=4096)
    table.put("10.0.0.5", "example.com", "wlan0", now=0.0)
    assert table.get("10.0.0.5", "example.com", now=50.0) == "wlan0"  # a use: the clock restarts
    assert table.get("10.0.0.6", "example.com", now=50.0) is None  # per client
    assert table.get("10.0.0.5", "example.com", now=110.5) is None
    for number in range(50_000):  # a flood of names
        table.put("c", f"site{number}.example", "eth0", now=200 + number / 1000)
    assert len(table) == 4096
    assert table.get("c", "site49999.example", now=250.0) == "eth0"
    assert table.get("c", "site0.example", now=250.0) is None


def test_backups_carry_nothing_while_a_primary_is_up() -> None:
    clock = FakeClock()
    wifi, cable = dispatch.LocalAddress("10.0.0.1"), dispatch.LocalAddress("10.0.0.2")
    phone, phone2 = dispatch.LocalAddress("10.0.0.3", backup=True), dispatch.LocalAddress("10.0.0.4", backup=True)
    balancer = dispatch.Balancer([wifi, cable, phone, phone2], dispatch.Health(30.0, clock))
    assert {balancer.next(socket.AF_INET).ip for _ in range(10)} == {"10.0.0.1", "10.0.0.2"}
    sit_out(balancer.health, wifi)
    assert {balancer.next(socket.AF_INET).ip for _ in range(10)} == {"10.0.0.2"}
    sit_out(balancer.health, cable)
    # No primary up: the backups, balanced among themselves.
    assert Counter(balancer.next(socket.AF_INET).ip for _ in range(10)) == {"10.0.0.3": 5, "10.0.0.4": 5}
    # A connection that failed through the only primary up goes to a backup.
    balancer.health.retest_result(wifi, None)
    assert balancer.choose(socket.AF_INET, [wifi]) in (phone, phone2)


def test_a_sticky_site_keeps_its_link_while_it_is_up() -> None:
    links = [dispatch.LocalAddress(f"10.0.0.{n}") for n in (1, 2, 3)]
    balancer = dispatch.Balancer(links, dispatch.Health(30.0, FakeClock()), sticky=dispatch.StickyTable(600))
    bank = dispatch.Affinity("192.168.1.5", "bank.example")

    def connect(affinity: dispatch.Affinity) -> dispatch.LocalAddress:
        chosen = balancer.next(socket.AF_INET, affinity)
        balancer.stick(affinity, chosen)  # as a connect that got through from it does
        return chosen

    first = connect(bank)
    others = [connect(dispatch.Affinity("192.168.1.5", f"s{n}.example")) for n in range(6)]
    assert len(set(others)) == 3  # different sites still spread
    assert [connect(bank) for _ in range(5)] == [first] * 5
    sit_out(balancer.health, first)  # its link failed: the site moves, and sticks there
    moved = connect(bank)
    assert moved is not first
    balancer.health.retest_result(first, None)
    assert [connect(bank) for _ in range(3)] == [moved] * 3


def test_a_connection_counts_from_the_moment_it_is_given_an_address() -> None:
    """A burst chosen before any connect ends spreads by capacity."""
    links = {dispatch.LocalAddress(f"10.0.0.{n}"): rate * KB for n, rate in ((1, 1200), (2, 1200), (3, 400))}
    balancer = dispatch.Balancer(
        list(links), dispatch.Health(), balance=dispatch.Balance.MEASURED, capacity=links.__getitem__
    )
    burst = Counter(balancer.next(socket.AF_INET).ip for _ in range(24))
    assert sorted(burst.values()) == [3, 10, 11]
    for address in links:
        for _ in range(burst[address.ip]):
            balancer.release(address)
        assert balancer.taken(address) == 0


# The evidence that measured balancing is good: a fluid model of three links
# that share their rate equally among their open downloads, with the
# estimator fed as the Dispatcher's sampler feeds it.

DOWNLOADS = 24
RATES = (1200 * KB, 1200 * KB, 400 * KB)
SWAPPED = (400 * KB, 1200 * KB, 1200 * KB)  # uplink 1 1200->400, uplink 3 400->1200


class FluidLinks:
    def __init__(self, rates: Sequence[float], estimator: dispatch.CapacityEstimator, noise: float) -> None:
        self.rates = list(rates)
        self.estimator = estimator
        self.links = [dispatch.LocalAddress(f"10.0.0.{n}") for n in range(len(rates))]
        self.now, self.next_sample = 0.0, TICK
        self.delivered = [0.0] * len(rates)
        self.open_before = [0] * len(rates)  # downloads open on each link at the last sample
        self.random, self.noise = random.Random(1), noise
        self.factors = self.draw()
        for link in self.links:
            estimator.add(link, dispatch.Sample(0, 0, 0, 0.0), 0, 0)

    def draw(self) -> list[float]:
        return [1 + self.random.uniform(-self.noise, self.noise) for _ in self.rates]

    def sample(self, open_now: Sequence[int]) -> None:
        for index, link in enumerate(self.links):
            sample = dispatch.Sample(0, round(self.delivered[index]), 0, self.next_sample)
            self.estimator.add(link, sample, self.open_before[index], open_now[index])
        self.delivered, self.open_before = [0.0] * len(self.rates), list(open_now)
        self.factors = self.draw()
        self.next_sample += TICK

    def idle(self, seconds: float) -> None:
        while self.next_sample <= self.now + seconds:
            self.sample([0] * len(self.rates))
        self.now += seconds

    def run(self, placement: Sequence[int], size: float) -> float:
        """One download of ``size`` bytes per entry of ``placement`` (its
        link), all at once; the seconds until the last is done."""
        started, remaining = self.now, dict.fromkeys(range(len(placement)), size)
        while remaining:
            sharing = Counter(placement[download] for download in remaining)
            speed = {link: self.rates[link] * self.factors[link] / count for link, count in sharing.items()}
            step = min(self.next_sample - self.now, *(left / speed[placement[d]] for d, left in remaining.items()))
            for link, count in sharing.items():
                self.delivered[link] += speed[link] * step * count
            for download in list(remaining):
                remaining[download] -= speed[placement[download]] * step
                if remaining[download] <= 1e-9 * size:
                    del remaining[download]
            self.now += step
            if self.now >= self.next_sample - 1e-9:
                open_now = Counter(placement[download] for download in remaining)
                self.sample([open_now[index] for index in range(len(self.rates))])
        return self.now - started


def batch_share(links: FluidLinks, balancer: dispatch.Balancer, size: float) -> float:
    """One batch placed by ``balancer``, then a pause; its rate as a share of the links' sum."""
    chosen = [balancer.next(socket.AF_INET) for _ in range(DOWNLOADS)]
    seconds = links.run([links.links.index(address) for address in chosen], size)
    for address in chosen:
        balancer.release(address)
    links.idle(1.0)
    return DOWNLOADS * size / seconds / sum(links.rates)


@pytest.mark.parametrize("noise", [0.0, 0.1])
@pytest.mark.parametrize(
    ("warm_up", "size"),
    [
        (250_000, 2_000_000),
        (250_000, 250_000),
        (500_000, 500_000),
        (1_000_000, 250_000),
        (2_000_000, 1_000_000),
    ],
)
def test_measured_balancing_reaches_85_percent_of_the_sum_after_a_short_batch(
    noise: float, warm_up: float, size: float
) -> None:
    """After one batch (however short) on the links' rates, before and after
    they change, the next batch gets 85 % of their sum; round robin does not."""
    shares = {}
    for balance in dispatch.Balance:
        links = FluidLinks(RATES, dispatch.CapacityEstimator(), noise)
        balancer = dispatch.Balancer(links.links, dispatch.Health(), balance=balance, capacity=links.estimator.estimate)
        batch_share(links, balancer, warm_up)
        before = batch_share(links, balancer, size)
        links.rates = list(SWAPPED)
        batch_share(links, balancer, warm_up)
        shares[balance] = (before, batch_share(links, balancer, size))
    measured, round_robin = shares[dispatch.Balance.MEASURED], shares[dispatch.Balance.ROUND_ROBIN]
    assert min(measured) >= 0.85, measured
    assert max(round_robin) < 0.65, round_robin


def test_measured_balancing_splits_by_a_remembered_figure_from_the_first_batch() -> None:
    links = FluidLinks(RATES, dispatch.CapacityEstimator(), 0.0)
    for link, rate in zip(links.links, RATES):
        links.estimator.remember(link, rate)
    balancer = dispatch.Balancer(
        links.links, dispatch.Health(), balance=dispatch.Balance.MEASURED, capacity=links.estimator.estimate
    )
    assert batch_share(links, balancer, 500_000) >= 0.85


def test_a_race_beside_a_slow_primary_never_spends_a_backup() -> None:
    primary, other = dispatch.LocalAddress("10.0.0.1"), dispatch.LocalAddress("10.0.0.2")
    backup = dispatch.LocalAddress("10.0.0.3", backup=True)
    balancer = dispatch.Balancer([primary, other, backup], dispatch.Health(30.0, FakeClock()))
    assert balancer.choose(socket.AF_INET, [primary], racing=True) is other
    assert balancer.choose(socket.AF_INET, [primary, other], racing=True) is None  # slow, not failed
    assert balancer.choose(socket.AF_INET, [primary, other]) is backup  # failed: the backup takes over


def test_a_check_round_tests_each_address_against_the_targets_of_its_family(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = ["127.0.0.2", "127.0.0.3", *(["::1"] if has_ipv6_loopback() else [])]
    targets = [f"127.0.0.1:{refused_port()}", f"127.0.0.1:{echo_server.port}"]  # a refusal is an answer too
    proxy = make_proxy(addresses, checks=targets, check_interval=0.2)
    rounds: list[dict[str, Any]] = []
    monkeypatch.setattr(
        proxy.health, "check_round", lambda results, named: rounds.append({a.ip: e for a, e in results.items()})
    )
    assert wait_for(lambda: len(rounds) >= 2)
    assert rounds[0] == {"127.0.0.2": None, "127.0.0.3": None}  # ::1 has no IPv6 target: not checked


def test_a_check_by_name_looks_the_name_up_through_each_link_checked(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns_server.names["check.test"] = ["127.0.0.1"]
    proxy = make_proxy(
        ["127.0.0.2", "127.0.0.3"],
        checks=[f"check.test:{echo_server.port}", f"gone.test:{echo_server.port}"],
        check_interval=0.2,
        dns=[dns_server.address],
    )
    rounds: list[dict[str, Any]] = []
    monkeypatch.setattr(
        proxy.health, "check_round", lambda results, named: rounds.append({a.ip: e for a, e in results.items()})
    )
    assert wait_for(lambda: len(rounds) >= 1)
    assert rounds[0] == {"127.0.0.2": None, "127.0.0.3": None}  # one target reached is a pass
    assert dns_server.asked("check.test") and dns_server.asked("gone.test")
    rows = {row["ip"]: row for row in proxy.stats()}
    assert rows["127.0.0.2"]["dns_queries"] + rows["127.0.0.3"]["dns_queries"] >= 1


# Balancing, end to end -----------------------------------------------------


def test_weights_7_3_interleave_end_to_end(make_proxy: Callable[..., Dispatcher], peer_server: Server) -> None:
    proxy = make_proxy(["127.0.0.2@7", "127.0.0.3@3"])
    seen = []
    for _ in range(30):
        with client_through(proxy, (peer_server.host, peer_server.port)) as client:
            seen.append(read_all(client).decode())
    a, b = "127.0.0.2", "127.0.0.3"
    assert seen[:10] == [a, b, a, a, a, b, a, a, b, a]
    for start in range(len(seen) - 10 + 1):
        window = seen[start : start + 10]
        assert (window.count(a), window.count(b)) == (7, 3)
    stats = {row["ip"]: row for row in proxy.stats()}
    assert (stats[a]["connections"], stats[b]["connections"]) == (21, 9)


def test_each_family_has_its_own_rotation(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, peer_server6: Server
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3", "::1"])
    seen = []
    for target in [peer_server, peer_server6, peer_server, peer_server6, peer_server]:
        with client_through(proxy, (target.host, target.port)) as client:
            seen.append(read_all(client).decode())
    assert seen == ["127.0.0.2", "::1", "127.0.0.3", "::1", "127.0.0.2"]


def connect_peer(proxy: Dispatcher, host: str, port: int) -> str:
    """The source address a peer-reporting server sees through an HTTP CONNECT tunnel."""
    with raw_client(proxy) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        reader = dispatch.DeadlineReader(sock)
        assert dispatch.read_head(reader)[0] == "HTTP/1.1 200 Connection established"
        return (reader.rest() + read_all(sock)).decode()


def test_a_sticky_site_leaves_by_one_link_whatever_the_protocol(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, origin: str, fake_names: dict[str, list[str]]
) -> None:
    for name in ("www.bank.test", "api.bank.test", *(f"s{n}.test" for n in range(6))):
        fake_names[name] = ["127.0.0.1"]
    proxy = make_proxy(["127.0.0.2", "127.0.0.3", "127.0.0.4"], sticky=600)
    target = ("www.bank.test", peer_server.port)
    with client_through(proxy, target, rdns=True) as client:  # SOCKS5, by name
        link = read_all(client).decode()
    for _ in range(3):
        with client_through(proxy, ("api.bank.test", peer_server.port), rdns=True) as client:
            assert read_all(client).decode() == link  # www. and api. are one site
        with client_through(proxy, ("api.bank.test", peer_server.port), socks.SOCKS4, rdns=True) as client:
            assert read_all(client).decode() == link  # SOCKS4a
        assert connect_peer(proxy, "api.bank.test", peer_server.port) == link  # HTTP CONNECT
    status, _, body = http_exchange(
        proxy, f"GET http://www.bank.test:{origin.rpartition(':')[2]}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert status == 200 and f"peer {link}:" in body.decode()  # plain HTTP
    others = set()
    for n in range(6):  # other sites still spread
        with client_through(proxy, (f"s{n}.test", peer_server.port), rdns=True) as client:
            others.add(read_all(client).decode())
    assert others == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    with client_through(proxy, ("127.0.0.1", peer_server.port)) as client:  # an IP is its own site
        by_ip = read_all(client).decode()
    with client_through(proxy, ("127.0.0.1", peer_server.port), socks.SOCKS4) as client:
        assert read_all(client).decode() == by_ip


def test_a_backup_link_carries_connections_only_while_no_primary_is_up(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, fake_interfaces: FakeInterfaces
) -> None:
    # 198.51.100.99 is not an address here: binding it fails as when a link went away.
    fake_interfaces.interfaces.update(wan0=["127.0.0.2"], usb0=["127.0.0.3"])
    proxy = make_proxy(["wan0", "usb0@backup"])
    assert peers_seen(proxy, peer_server, 4) == ["127.0.0.2"] * 4
    rows = {row["ip"]: row for row in proxy.stats()}
    assert (rows["127.0.0.3"]["tier"], rows["127.0.0.3"]["state"]) == ("backup", "standby")
    fake_interfaces.interfaces["wan0"] = ["198.51.100.99"]  # the primary's address is gone
    assert wait_for(lambda: [a.ip for a in proxy.addresses] == ["198.51.100.99", "127.0.0.3"])
    assert peers_seen(proxy, peer_server, 4) == ["127.0.0.3"] * 4  # the backup, once the primary failed
    assert {row["ip"]: row["state"] for row in proxy.stats()}["127.0.0.3"] == "up"
    fake_interfaces.interfaces["wan0"] = ["127.0.0.2"]  # the primary is back
    assert wait_for(lambda: peers_seen(proxy, peer_server, 1) == ["127.0.0.2"])
    assert peers_seen(proxy, peer_server, 3) == ["127.0.0.2"] * 3


def measure_by_hand(proxy: Dispatcher, clock: FakeClock, client: socket.socket, rounds: int = 4) -> None:
    """Move 500 kB each way through an echo server a tick, on ``clock``, and
    take the sampler's turns (its background task stopped)."""

    def moved_down() -> int:
        return sum(down for _, down in proxy.meter.totals()[1].values())

    for _ in range(rounds):
        expected = moved_down() + 500_000
        client.sendall(b"x" * 500_000)
        assert recv_exactly(client, 500_000) == b"x" * 500_000
        # The relay counts what it passed on just after passing it.
        assert wait_for(lambda: moved_down() >= expected)  # noqa: B023 (called before the loop goes on)
        clock.now += dispatch.ESTIMATE_INTERVAL
        proxy.capacities.measure()


def test_stats_show_each_links_capacity_and_open_connections(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    assert proxy.status()["balance"] == "measured"  # no weights given
    proxy.tasks.stop()  # the sampler's turns are taken here, on the test's clock
    proxy.meter.clock = clock = FakeClock()
    proxy.capacities.measure()
    assert {row["capacity_source"] for row in proxy.stats()} == {"not measured"}
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        measure_by_hand(proxy, clock, client, rounds=3)
        clock.now += 5
        row = next(row for row in proxy.stats() if row["open"] == 1)
    assert row["capacity"] == pytest.approx(2_000_000)  # what it carried: 500 kB a quarter second
    assert (row["capacity_source"], row["capacity_age"]) == ("measured", 5.0)
    assert dispatch.describe_capacity_source(row) == "measured 5 s ago"
    assert make_proxy(["127.0.0.2@2", "127.0.0.3"]).status()["balance"] == "round-robin"


# ---------------------------------------------------------------------------
# Meter: counters, rates, history, the state file
# ---------------------------------------------------------------------------


def test_meter_readings_change_nothing_and_history_keeps_each_interval() -> None:
    clock = FakeClock()
    meter = dispatch.Meter(clock)
    link = dispatch.LocalAddress("10.0.0.1")
    meter.opened(link)
    meter.add(link, 4000, 8000)
    clock.now += dispatch.METER_INTERVAL
    meter.sample()
    meter.add(link, 2000, 0)
    clock.now += dispatch.METER_INTERVAL
    readings = [meter.read(link) for _ in range(3)]
    assert readings[0] == readings[1] == readings[2]
    assert (readings[0].rate_up, readings[0].rate_down) == (1000, 0)  # the last interval
    assert readings[0].counters == dispatch.Counters(connections=1, open=1, bytes_up=6000, bytes_down=8000)
    meter.sample()
    up, down = meter.history(link)
    assert (up, down) == ([2000, 1000], [4000, 0])


# The state file ------------------------------------------------------------


def warnings_of(log: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in log.records if record.levelno == logging.WARNING]


def test_state_file_keeps_each_links_capacity(tmp_path: Any, log: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "deeper" / "state.json")  # the directory is made
    dispatch.write_state(path, {"wlan0": 1_200_000.0, "10.0.0.2": 400_000.5, "wlan0 IPv6": 900_000.0})
    assert dispatch.read_state(path) == {"wlan0": 1_200_000.0, "10.0.0.2": 400_000.5, "wlan0 IPv6": 900_000.0}
    assert os.listdir(tmp_path / "deeper") == ["state.json"]  # no temporary file left behind
    assert warnings_of(log) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\xff\xfe\x00garbage",
        b'{"format": "dispatch link capacities", "version": 1, "links": [1, 2]}',
    ],
)
def test_a_corrupt_state_file_is_one_warning_and_a_fresh_start(
    tmp_path: Any, log: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert dispatch.read_state(str(path)) == {}
    assert len(warnings_of(log)) == 1 and str(path) in warnings_of(log)[0]
    assert "\n" not in warnings_of(log)[0]


@pytest.mark.parametrize(
    "data",
    [
        [1, 2, 3],
        {"links": {"wlan0": {"capacity": 5}}},
        {"format": "something else", "version": 1, "links": {}},
        {"format": "dispatch link capacities", "version": 99, "links": {"wlan0": {"capacity": 5}}},
    ],
)
def test_a_foreign_state_file_is_one_warning_and_a_fresh_start(
    tmp_path: Any, log: pytest.LogCaptureFixture, data: object
) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    assert dispatch.read_state(str(path)) == {}
    assert len(warnings_of(log)) == 1


def test_unusable_entries_of_a_state_file_are_left_out_with_one_warning(
    tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    links = {
        "a": {"capacity": 5.5},
        "b": {"capacity": -1},
        "c": {"capacity": "fast"},
        "d": 7,
        "e": {"capacity": True},
        "f": {},
        "g": {"capacity": 1e308},  # no link's: a 300-digit figure in the tables
        "h": {"capacity": 10**400},  # overflows a float
        "i": {"capacity": dispatch.STATE_CAPACITY_LIMIT},
    }
    path.write_text(json.dumps({"format": "dispatch link capacities", "version": 1, "links": links}))
    assert dispatch.read_state(str(path)) == {"a": 5.5, "i": dispatch.STATE_CAPACITY_LIMIT}
    (warning,) = warnings_of(log)
    assert warning == f"state file {path}: 7 entries hold no capacity, left out"


def hostile_state_file(kind: str, path: Any) -> None:
    """Make ``path`` a state file that a hostile user could leave there."""
    if kind == "a 401-digit capacity":
        link = '"127.0.0.1": {"capacity": ' + "9" * 401 + "}"
        path.write_text('{"format": "dispatch link capacities", "version": 1, "links": {' + link + "}}")
    elif kind == "200 KB of [":
        path.write_text("[" * 200_000)
    elif kind == "over the size limit":
        links = {f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}": {"capacity": 1e6} for n in range(30_000)}
        path.write_text(json.dumps({"format": "dispatch link capacities", "version": 1, "links": links}))
        assert path.stat().st_size > dispatch.STATE_FILE_LIMIT
    elif kind == "a symbolic link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a directory":
        path.mkdir()


def start_in_time(proxy: Dispatcher) -> list[BaseException]:
    """Call ``proxy.start()`` in a thread; fail unless it returns or raises
    within TIMEOUT; return what it raised."""
    raised: list[BaseException] = []

    def start() -> None:
        try:
            proxy.start()
        except BaseException as error:
            raised.append(error)

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(TIMEOUT)
    assert not starting.is_alive(), "start() neither served nor raised"
    return raised


@pytest.mark.skipif(sys.platform == "win32", reason="no FIFO, no /dev/zero")
@pytest.mark.parametrize(
    "kind",
    [
        "a 401-digit capacity",
        "200 KB of [",
        "over the size limit",
        "a symbolic link to /dev/zero",
        "a FIFO",
        "a directory",
    ],
)
def test_a_hostile_state_file_is_one_warning_and_the_proxy_serves(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any, log: pytest.LogCaptureFixture, kind: str
) -> None:
    path = tmp_path / "state.json"
    hostile_state_file(kind, path)
    proxy = make_proxy(["127.0.0.1"], state_file=str(path), start=False)
    assert start_in_time(proxy) == []
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"served") == b"served"
    assert proxy.stats()[0]["capacity_source"] == "not measured"
    (warning,) = warnings_of(log)
    assert str(path) in warning


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("kind", ["a symbolic link to /dev/zero", "a FIFO", "a directory", "over the size limit"])
def test_a_state_file_of_the_wrong_kind_leaves_no_descriptor_open(tmp_path: Any, kind: str) -> None:
    path = tmp_path / "state.json"
    hostile_state_file(kind, path)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            dispatch._read_regular_file(str(path), dispatch.STATE_FILE_LIMIT)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need a privilege on Windows")
def test_a_state_file_that_is_a_symbolic_link_is_written_through(tmp_path: Any) -> None:
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "state.json"
    link = tmp_path / "state.json"
    link.symlink_to(target)
    dispatch.write_state(str(link), {"127.0.0.2": 1.5})
    assert link.is_symlink() and dispatch.read_state(str(target)) == {"127.0.0.2": 1.5}
    assert sorted(path.name for path in (tmp_path / "kept").iterdir()) == ["state.json"]  # no temporary left


def test_a_state_file_keeps_only_the_links_of_this_run(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any
) -> None:
    """Figures for links this run does not have are dropped, not written
    back: a file of foreign keys does not follow the proxy from run to run."""
    state = str(tmp_path / "state.json")
    foreign = {f"10.9.{n >> 8}.{n & 255}": 5.0 for n in range(5000)}
    dispatch.write_state(state, {"127.0.0.2": 1.0, "wlan9": 3.0, **foreign})
    proxy = make_proxy(["127.0.0.2"], state_file=state)
    proxy.tasks.stop()
    proxy.meter.clock = clock = FakeClock()
    proxy.capacities.measure()
    assert proxy.stats()[0]["capacity"] == 1.0
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        measure_by_hand(proxy, clock, client)
    proxy.capacities.save()
    assert list(dispatch.read_state(state)) == ["127.0.0.2"]


def test_link_capacities_measure_from_the_meter_and_keep_the_figures_beside_more(tmp_path: Any) -> None:
    """Each link's figure is measured from the meter's totals and kept
    under its key, beside what ``more`` gives; a key of no link of this
    run is dropped; what ``restore`` reads is read once, at the load."""
    state = str(tmp_path / "state.json")
    dispatch.write_state(state, {"wan0": 2_000_000.0, "wlan9": 3.0, "bond0": 5.0}, {"steered": {"wan0": {}}})
    link = dispatch.Link.of_interface("wan0", 1, ["10.0.0.2", "fd00::2"])
    clock, restored = FakeClock(), []
    meter = dispatch.Meter(clock)
    capacities = dispatch.LinkCapacities(
        dispatch.LinkSet([link]),
        meter,
        dispatch.CapacityEstimator(),
        lambda address: 1,  # a connection open through each
        state,
        more=lambda: {"usage": {"wan0": 1}},
        restore=restored.append,
        more_keys=lambda: ["bond0"],
    )
    ipv4, ipv6 = link.current
    assert (capacities.key(ipv4), capacities.key(ipv6)) == ("wan0", "wan0 IPv6")
    capacities.load()
    capacities.load()
    assert restored == [state]
    capacities.measure()  # starts the clocks, from the kept figure
    assert capacities.of_interface("wan0") == 2_000_000.0 and capacities.of_interface("bond0") == 5.0
    for _ in range(12):  # three seconds at 4 MB/s down through the IPv6 address
        meter.add(ipv6, 0, int(4_000_000 * dispatch.ESTIMATE_INTERVAL))
        clock.now += dispatch.ESTIMATE_INTERVAL
        capacities.measure()
    assert capacities.of_interface("wan0") == pytest.approx(4_000_000)
    capacities.save()
    assert dispatch.read_state(state) == {"wan0": 2_000_000.0, "wan0 IPv6": pytest.approx(4_000_000), "bond0": 5.0}
    with open(state, encoding="utf-8") as file:
        assert json.load(file)["usage"] == {"wan0": 1}


def test_a_missing_state_file_is_one_warning(tmp_path: Any, log: pytest.LogCaptureFixture) -> None:
    assert dispatch.read_state(str(tmp_path / "none.json")) == {}
    assert len(warnings_of(log)) == 1 and "none.json" in warnings_of(log)[0]


def test_a_restart_starts_from_the_capacity_kept_at_stop(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any
) -> None:
    state = str(tmp_path / "state.json")
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], state_file=state)
    proxy.tasks.stop()
    proxy.meter.clock = clock = FakeClock()
    proxy.capacities.measure()
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        measure_by_hand(proxy, clock, client)
    measured = {row["ip"]: row["capacity"] for row in proxy.stats() if row["capacity"] is not None}
    assert len(measured) == 1
    proxy.shutdown()
    assert dispatch.read_state(state) == pytest.approx(measured)
    again = make_proxy(["127.0.0.2", "127.0.0.3"], state_file=state)
    rows = {row["ip"]: row for row in again.stats()}
    for ip, row in rows.items():
        if ip in measured:
            assert (row["capacity"], row["capacity_source"], row["capacity_age"]) == (
                pytest.approx(measured[ip]),
                "remembered",
                None,
            )
            assert dispatch.describe_capacity_source(row) == "remembered"
        else:
            assert (row["capacity"], row["capacity_source"]) == (None, "not measured")


def test_a_remembered_capacity_is_replaced_once_the_link_is_measured(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any
) -> None:
    state = str(tmp_path / "state.json")
    dispatch.write_state(state, {"127.0.0.2": 1.0})
    proxy = make_proxy(["127.0.0.2"], state_file=state)
    proxy.tasks.stop()
    proxy.meter.clock = clock = FakeClock()
    proxy.capacities.measure()
    assert proxy.stats()[0]["capacity"] == 1.0
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        measure_by_hand(proxy, clock, client)
    assert proxy.stats()[0]["capacity_source"] == "measured" and proxy.stats()[0]["capacity"] > 1000
    proxy.capacities.save()
    assert dispatch.read_state(state)["127.0.0.2"] == pytest.approx(proxy.stats()[0]["capacity"])


@pytest.mark.parametrize("seed", range(5))
def test_the_capacity_kept_for_a_restart_is_not_the_highest_of_noisy_measurements(
    make_proxy: Callable[..., Dispatcher], tmp_path: Any, seed: int
) -> None:
    """A slow link whose ticks read up to a fifth off its rate either way (as
    a busy relay samples them) through a long batch is kept within a few per
    cent of its rate: kept ten per cent high, it takes a connection too many
    in the first batch after a restart."""
    state = str(tmp_path / "state.json")
    proxy = make_proxy(["127.0.0.2"], state_file=state)
    proxy.tasks.stop()
    (address,) = proxy.links.known_addresses()
    ticks, noise = Ticks(proxy.capacity, address), random.Random(seed)
    ticks.tick(400 * KB * TICK * 0.4, 3)
    for _ in range(40):  # ten seconds through three downloads
        ticks.tick(400 * KB * TICK * noise.uniform(0.8, 1.2), 3)
    ticks.tick(0, 0)
    proxy.capacities.save()
    assert dispatch.read_state(state)["127.0.0.2"] == pytest.approx(400 * KB, rel=0.05)


def test_an_unwritable_state_file_is_one_warning_and_serving_goes_on(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    state = str(tmp_path / "file" / "state.json")
    proxy = make_proxy(["127.0.0.2"], state_file=state)
    proxy.tasks.stop()
    proxy.meter.clock = clock = FakeClock()
    proxy.capacities.measure()
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        measure_by_hand(proxy, clock, client, rounds=3)
        proxy.capacities.save()
        clock.now += 1
        measure_by_hand(proxy, clock, client, rounds=3)
        proxy.capacities.save()
        assert round_trip(client, b"still served") == b"still served"
    unwritable = [line for line in warnings_of(log) if "cannot write the state file" in line]
    assert len(unwritable) == 1 and state in unwritable[0]


def test_a_dispatcher_without_a_state_file_writes_none(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    proxy = make_proxy(["127.0.0.2"])
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        round_trip(client, b"x" * 100_000)
    proxy.shutdown()
    assert os.listdir(tmp_path) == []


def test_stats_count_connections_and_bytes_per_address(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2@2", "127.0.0.3"])
    for payload in (b"a" * 10, b"b" * 20, b"c" * 30):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            round_trip(client, payload)
    wait_until_all_closed(proxy)
    rows = {row["ip"]: row for row in proxy.stats()}
    keys = ("ip", "interface", "weight", "state", "connections", "open", "bytes_down")
    assert {key: rows["127.0.0.2"][key] for key in keys} == {
        "ip": "127.0.0.2",
        "interface": None,
        "weight": 2,
        "state": "up",
        "connections": 2,
        "open": 0,
        "bytes_down": 40,
    }
    assert rows["127.0.0.2"]["bytes_up"] == 40
    assert (rows["127.0.0.3"]["connections"], rows["127.0.0.3"]["bytes_down"]) == (1, 20)


def test_a_stats_row_is_an_idle_link_that_is_up_but_for_what_is_given() -> None:
    row = dispatch.stats_row("wlan0", ip="10.0.0.2", open=2)
    assert set(row) == set(typing.get_type_hints(dispatch.StatsRow))
    assert (row["link"], row["interface"], row["ip"], row["open"]) == ("wlan0", "wlan0", "10.0.0.2", 2)
    assert (row["state"], row["tier"], row["weight"], row["connections"]) == ("up", "primary", 1, 0)
    assert (row["capacity"], row["capacity_source"]) == (None, "not measured")
    assert dispatch.stats_row("wlan0")["ip"] is None
    with pytest.raises(TypeError, match="StatsRow has no field 'colour'"):
        dispatch.stats_row("wlan0", colour=1)


def test_stats_count_bytes_live_during_a_transfer(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        payload = os.urandom(200_000)
        client.sendall(payload)
        assert recv_exactly(client, len(payload)) == payload
        assert wait_for(lambda: proxy.stats()[0]["bytes_down"] >= len(payload))
        (row,) = proxy.stats()
        assert (row["open"], row["bytes_up"], row["bytes_down"]) == (1, len(payload), len(payload))


def test_stats_rates_cover_the_last_interval_and_readers_share_them(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"r" * 100_000) == b"r" * 100_000
    wait_until_all_closed(proxy)
    (first,) = proxy.stats()
    (second,) = proxy.stats()  # another reader: the first took nothing away
    assert first["rate_up"] > 0
    assert second["rate_up"] == pytest.approx(first["rate_up"], rel=0.2)
    assert first["rate_down"] == pytest.approx(first["rate_up"])
    # Once a whole interval has passed with nothing moving, the rates are 0.
    assert wait_for(lambda: proxy.stats()[0]["rate_up"] == 0, timeout=4 * dispatch.METER_INTERVAL)


# ---------------------------------------------------------------------------
# Data caps: sizes, periods, usage kept, links past their cap
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("200MB", 200_000_000),
        ("2GB", 2_000_000_000),
        ("1.5kB", 1500),
        ("5000B", 5000),
        ("1KiB", 1024),
        ("2GiB", 2 << 30),
    ],
)
def test_cap_sizes_are_powers_of_1000_and_of_1024_for_kib_mib_gib(text: str, size: int) -> None:
    assert dispatch.parse_size(text) == size


def test_cap_periods_are_local_days_months_from_their_first_day_and_rolling_windows() -> None:
    day = datetime.date(2026, 3, 10)
    bounds = {text: dispatch.parse_cap(f"usb0=2GB/{text}").bounds(day) for text in ("day", "month", "month@15", "30d")}
    assert bounds["day"] == (day, datetime.date(2026, 3, 11))
    assert bounds["month"] == (datetime.date(2026, 3, 1), datetime.date(2026, 4, 1))
    assert bounds["month@15"] == (datetime.date(2026, 2, 15), datetime.date(2026, 3, 15))
    assert bounds["30d"] == (datetime.date(2026, 2, 9), datetime.date(2026, 3, 11))
    # A month too short for its first day starts on its last.
    assert dispatch.parse_cap("usb0=1GB/month@31").bounds(datetime.date(2026, 3, 5)) == (
        datetime.date(2026, 2, 28),
        datetime.date(2026, 3, 31),
    )


def at_local(day: datetime.date, hour: int = 12) -> float:
    return time.mktime((day.year, day.month, day.day, hour, 0, 0, 0, 0, -1))


def test_a_cap_is_told_at_75_and_95_per_cent_once_and_spends_the_link_at_100(log: pytest.LogCaptureFixture) -> None:
    budget = dispatch.DataBudget(
        [dispatch.parse_cap("usb0=1000B/day")], clock=lambda: at_local(datetime.date(2026, 3, 10))
    )
    for count in (700, 60, 10, 200, 5, 100):
        budget.add("usb0", count)
        budget.update_spent()
    assert warnings_of(log) == [
        "link usb0 used 75% of its cap usb0=1kB/day",
        "link usb0 used 95% of its cap usb0=1kB/day",
        "link usb0 reached its cap usb0=1kB/day (1075B used)",
    ]
    assert budget.spent == {"usb0"}
    (report,) = budget.reports()
    assert (report["used_bytes"], report["reached"]) == (1075, True)
    assert report["period_end"] == at_local(datetime.date(2026, 3, 11), 0)


def test_a_period_starts_afresh_at_its_end_and_never_early_when_the_clock_goes_back() -> None:
    now = [at_local(datetime.date(2026, 3, 14), 23)]
    budget = dispatch.DataBudget([dispatch.parse_cap("usb0=1000B/month@15")], clock=lambda: now[0])
    budget.add("usb0", 1000)
    assert budget.update_spent() == {"usb0"}
    now[0] = at_local(datetime.date(2026, 3, 15), 1)  # the new period
    budget.update_spent()
    assert budget.spent == frozenset()
    budget.add("usb0", 600)
    now[0] = at_local(datetime.date(2026, 3, 14), 23)  # the clock set back: still the new period
    budget.add("usb0", 500)
    assert budget.update_spent() == {"usb0"} and budget.reports()[0]["used_bytes"] == 1100


def test_usage_is_kept_in_the_state_file_beside_the_capacities(tmp_path: Any, log: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "state.json")
    today = datetime.date.today()
    usage = {"usb0": {today.isoformat(): 1234}}
    dispatch.write_state(path, {"usb0": 1e6}, {"host": socket.gethostname(), "usage": usage})
    assert dispatch.read_state(path) == {"usb0": 1e6}  # an older reader's view: the capacities
    assert dispatch.read_usage(path, today) == {"usb0": {today: 1234}}
    assert warnings_of(log) == []


@pytest.mark.parametrize(
    ("host", "days_ahead", "warned"),
    [("elsewhere.example", 0, "of another machine"), (None, 1, "usage of days after today")],
)
def test_usage_of_another_machine_or_a_future_period_is_ignored_with_one_warning(
    tmp_path: Any, log: pytest.LogCaptureFixture, host: str | None, days_ahead: int, warned: str
) -> None:
    path = str(tmp_path / "state.json")
    today = datetime.date.today()
    day = today + datetime.timedelta(days=days_ahead)
    dispatch.write_state(path, {}, {"host": host or socket.gethostname(), "usage": {"usb0": {day.isoformat(): 9}}})
    assert dispatch.read_usage(path, today) == {}
    assert len(warnings_of(log)) == 1 and warned in warnings_of(log)[0]


@pytest.mark.parametrize(
    ("usage", "kept_by", "warned"),
    [
        (
            {"usb0": {"TODAY": 1.5e9, "2020-13-01": 5, "YESTERDAY": 7}},
            "usb0",
            "usage entries left out, not a day and a byte count: 2",
        ),
        ({"usb0": "lots", "wlan0": {"YESTERDAY": 7}}, "wlan0", "usage entries left out, not a day and a byte count: 1"),
        ("zzz", None, "its usage is not an object, left out"),
    ],
)
def test_usage_entries_that_are_no_usage_are_left_out_with_one_warning(
    tmp_path: Any, log: pytest.LogCaptureFixture, usage: Any, kept_by: str | None, warned: str
) -> None:
    path = str(tmp_path / "state.json")
    today = datetime.date.today()
    yesterday = today - datetime.timedelta(days=1)
    text = json.dumps(usage).replace("YESTERDAY", yesterday.isoformat()).replace("TODAY", today.isoformat())
    dispatch.write_state(path, {}, {"host": socket.gethostname(), "usage": json.loads(text)})
    assert dispatch.read_usage(path, today) == ({kept_by: {yesterday: 7}} if kept_by else {})
    assert len(warnings_of(log)) == 1 and warned in warnings_of(log)[0]


def fill_links(proxy: Dispatcher, echo_server: Server, count: int, size: int) -> None:
    """``count`` connections in turn, each echoing ``size`` bytes, and
    ended: the proxy has counted all they carried."""
    for _ in range(count):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"c" * size) == b"c" * size
    assert wait_for(lambda: all(row["open"] == 0 for row in proxy.stats()))


def caps_counted(proxy: Dispatcher) -> list[dispatch.CapReport]:
    """The caps' reports once the meter has counted what the links carried
    (the background task samples it every METER_INTERVAL; a test need not
    wait for that)."""
    proxy.sample_meter()
    return proxy.status()["caps"]


def cap_reached(proxy: Dispatcher) -> bool:
    return all(report["reached"] for report in caps_counted(proxy))


@pytest.mark.parametrize("action", ["backup", "stop"])
def test_a_link_past_its_cap_takes_no_new_connection_while_another_link_is_up(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, peer_server: Server, action: str
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], caps=["127.0.0.3=10kB/day"], cap_action=action)
    fill_links(proxy, echo_server, 4, 6000)  # 24 kB through each
    assert wait_for(lambda: cap_reached(proxy))
    assert peers_seen(proxy, peer_server, 6) == ["127.0.0.2"] * 6
    assert proxy.status()["caps"][0]["used_bytes"] >= 20_000


@pytest.mark.parametrize(("action", "served"), [("backup", True), ("stop", False)])
def test_a_link_past_its_cap_serves_when_no_other_is_up_only_as_a_backup(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, action: str, served: bool
) -> None:
    proxy = make_proxy(["127.0.0.2"], caps=["127.0.0.2=5kB/day"], cap_action=action)
    fill_links(proxy, echo_server, 1, 6000)
    assert wait_for(lambda: cap_reached(proxy))
    if served:
        fill_links(proxy, echo_server, 1, 100)
    else:
        request = socks5_request(echo_server.host, echo_server.port)
        assert socks5_code_for(proxy, request) == dispatch.Reply.NETWORK_UNREACHABLE


def test_cap_action_stop_now_ends_the_links_open_connections(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2"], caps=["127.0.0.2=5kB/day"], cap_action="stop-now")
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        client.sendall(b"n" * 6000)
        assert recv_exactly(client, 6000) == b"n" * 6000  # open still
        assert wait_for(lambda: cap_reached(proxy))
        assert closed_by_proxy(client)


def test_usage_survives_a_restart_through_the_state_file(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any
) -> None:
    state = str(tmp_path / "state.json")
    first = make_proxy(["127.0.0.2"], caps=["127.0.0.2=1MB/month"], state_file=state)
    fill_links(first, echo_server, 1, 30_000)
    assert wait_for(lambda: caps_counted(first)[0]["used_bytes"] >= 60_000)
    first.shutdown()  # writes the state file
    again = make_proxy(["127.0.0.2"], caps=["127.0.0.2=1MB/month"], state_file=state)
    assert again.status()["caps"][0]["used_bytes"] >= 60_000


def test_usage_carried_since_the_last_sample_is_counted_and_kept_at_shutdown(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, tmp_path: Any
) -> None:
    """No meter sample between the traffic and the stop: shutdown counts it."""
    state = str(tmp_path / "state.json")
    first = make_proxy(["127.0.0.2"], caps=["127.0.0.2=1MB/month"], state_file=state)
    first.tasks.stop()  # no sample from here on but shutdown's own
    fill_links(first, echo_server, 1, 30_000)
    assert first.status()["caps"][0]["used_bytes"] == 0  # not sampled yet
    first.shutdown()
    again = make_proxy(["127.0.0.2"], caps=["127.0.0.2=1MB/month"], state_file=state)
    assert again.status()["caps"][0]["used_bytes"] >= 60_000


def test_a_capped_link_serves_again_when_its_period_rolls_over(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, peer_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2"], caps=["127.0.0.2=5kB/day"], cap_action="stop")
    budget = proxy.steering.budget
    today = datetime.date.fromtimestamp(budget.clock())
    fill_links(proxy, echo_server, 1, 6000)
    assert wait_for(lambda: cap_reached(proxy))
    request = socks5_request(peer_server.host, peer_server.port)
    assert socks5_code_for(proxy, request) == dispatch.Reply.NETWORK_UNREACHABLE
    budget.clock = lambda: at_local(today + datetime.timedelta(days=1), 0) + 1  # just past midnight
    proxy.sample_meter()  # the next sample finds the new period
    assert peers_seen(proxy, peer_server, 1) == ["127.0.0.2"]
    (report,) = proxy.status()["caps"]
    assert not report["reached"] and report["period_end"] == at_local(today + datetime.timedelta(days=2), 0)


def test_a_sticky_site_on_a_link_held_back_moves_to_another(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, fake_names: dict[str, list[str]]
) -> None:
    fake_names["www.shop.test"] = ["127.0.0.1"]
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], sticky=600)
    target = ("www.shop.test", peer_server.port)
    with client_through(proxy, target, rdns=True) as client:
        stuck = read_all(client).decode()
    other = ({"127.0.0.2", "127.0.0.3"} - {stuck}).pop()
    proxy.steering.steer(stuck, {"action": "pause"}, "a test")
    for _ in range(3):
        with client_through(proxy, target, rdns=True) as client:
            assert read_all(client).decode() == other


def test_each_cap_is_on_the_page_in_stats_json_in_metrics_and_in_the_stats_lines(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = make_proxy(["127.0.0.2"], caps=["127.0.0.2=100kB/day", "127.0.0.2=1MB/month"])
    fill_links(proxy, echo_server, 1, 40_000)  # 80 kB both ways
    assert wait_for(lambda: caps_counted(proxy)[0]["used_bytes"] >= 80_000)
    day, month = proxy.status()["caps"]
    assert (day["cap"], day["cap_bytes"], day["reached"]) == ("127.0.0.2=100kB/day", 100_000, False)
    assert (month["cap"], month["used_bytes"]) == ("127.0.0.2=1MB/month", day["used_bytes"])
    _, _, body = http_get(proxy.address, "/stats.json")
    assert json.loads(body)["caps"][1]["cap_bytes"] == 1_000_000
    _, _, page = http_get(proxy.address, "/")
    assert (
        "<h2>Data caps</h2>" in page.decode() and "127.0.0.2=100kB/day: 80.0 kB used (80 %, past 75 %)" in page.decode()
    )
    _, _, metrics = http_get(proxy.address, "/metrics")
    lines = metrics.decode().splitlines()
    assert 'dispatch_link_cap_bytes{link="127.0.0.2",cap="127.0.0.2=1MB/month"} 1000000' in lines
    assert f'dispatch_link_used_bytes{{link="127.0.0.2",cap="127.0.0.2=100kB/day"}} {day["used_bytes"]}' in lines
    assert any(line.startswith("dispatch_link_cap_reset_timestamp_seconds{") for line in lines)
    dispatch._print_stats(proxy, time.monotonic())
    out = capsys.readouterr().out
    assert (
        "cap 127.0.0.2=100kB/day: 80.0 kB used (80 %, past 75 %)" in out
        and "cap 127.0.0.2=1MB/month: 80.0 kB used (8 %)" in out
    )


def test_a_cap_counts_the_links_dns_queries_and_answers_too(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer
) -> None:
    proxy = make_proxy(["127.0.0.1"], dns=[dns_server.address], caps=["127.0.0.1=1MB/day"])
    assert socks5_code_for(proxy, socks5_request("nosuch.test", 80)) == dispatch.Reply.HOST_UNREACHABLE
    assert dns_server.asked("nosuch.test")
    proxy.sample_meter()  # now, rather than in up to 2 s
    used = proxy.status()["caps"][0]["used_bytes"]
    assert used >= 2 * len("nosuch.test") + 2 * 12  # a query and its answer: each a header and the name at least


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["--cap", "usb0=0GB/day"], "a cap of 0"),
        (["--cap", "usb0=2XB/month"], "is no size"),
        (["--cap", "usb0=2GB/week"], "the period is"),
        (["--cap", "usb0=2GB/day", "--cap", "usb0=3GB/day"], "two caps per day"),
        (["--cap", "nosuch0=2GB/day"], "no link is named nosuch0"),
    ],
)
def test_a_bad_cap_is_one_line_and_exit_2(arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = dispatch.main(["start", "--port", "0", "--no-state", *arguments, "127.0.0.1"])
    except SystemExit as exit_:
        status = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status == 2 and said in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # usage, and the error


# ---------------------------------------------------------------------------
# Device binding: sockets that leave by the chosen link
# ---------------------------------------------------------------------------


def test_device_is_bound_except_for_loopback_targets() -> None:
    # A private pure helper, unit-tested: the one place that picks the device.
    local = dispatch.LocalAddress("192.0.2.2", interface="eth0")
    expected = "eth0" if dispatch._CAN_BIND_TO_DEVICE else None
    assert dispatch._device_for(local, "203.0.113.80") == expected
    assert dispatch._device_for(local, "2001:db8::1") == expected
    assert dispatch._device_for(local, "127.0.0.1") is None
    assert dispatch._device_for(local, "127.9.9.9") is None
    assert dispatch._device_for(local, "::1") is None
    assert dispatch._device_for(dispatch.LocalAddress("192.0.2.2"), "203.0.113.80") is None


class WindowsSocket:
    """A socket that records the options set on it and connects nowhere:
    what the Windows path does, seen on any system."""

    def __init__(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, *args: object) -> None:
        self.family = family
        self.options: list[tuple[int, int, object]] = []
        self.bound: tuple[Any, ...] | None = None

    def setsockopt(self, level: int, option: int, value: object) -> None:
        self.options.append((level, option, value))

    def setblocking(self, flag: bool) -> None:
        pass

    def bind(self, address: tuple[Any, ...]) -> None:
        self.bound = address

    def connect_ex(self, address: tuple[Any, ...]) -> int:
        return errno.EINPROGRESS

    def close(self) -> None:
        pass


@pytest.fixture
def windows_sockets(windows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets as on Windows: recording ones, bound to devices the Windows way."""
    monkeypatch.setattr(dispatch, "_INTERFACE_INDEXES", {})
    monkeypatch.setattr(dispatch, "_SO_BINDTODEVICE", None)
    monkeypatch.setattr(dispatch, "_CAN_BIND_TO_DEVICE", True)
    dispatch.resolve_links(["Wi-Fi"])  # reads the adapters, and their indexes
    monkeypatch.setattr(dispatch.socket, "socket", WindowsSocket)


def _unicast_if_options(sock: object) -> list[tuple[int, int, object]]:
    assert isinstance(sock, WindowsSocket)
    return [(level, option, value) for level, option, value in sock.options if option == 31]


def test_windows_ipv4_connection_leaves_by_its_interface_index_in_network_order(windows_sockets: None) -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    local = dispatch.LocalAddress("127.0.0.2", interface="Wi-Fi")
    sock = upstream.open_attempt(local, ("203.0.113.80", 443))
    assert _unicast_if_options(sock) == [(socket.IPPROTO_IP, 31, (12).to_bytes(4, "big"))]  # IP_UNICAST_IF
    assert sock.bound == ("127.0.0.2", 0)  # type: ignore[attr-defined]


def test_windows_ipv6_connection_leaves_by_its_interface_index_in_host_order(windows_sockets: None) -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    local = dispatch.LocalAddress("fd00::3", interface="Ethernet 2")
    sock = upstream.open_attempt(local, ("2001:db8::80", 443))
    assert _unicast_if_options(sock) == [(socket.IPPROTO_IPV6, 31, (7).to_bytes(4, sys.byteorder))]


def test_windows_loopback_target_is_not_bound_to_an_interface(windows_sockets: None) -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    local = dispatch.LocalAddress("127.0.0.2", interface="Wi-Fi")
    assert _unicast_if_options(upstream.open_attempt(local, ("127.0.0.1", 443))) == []


def non_loopback_address() -> dispatch.LocalAddress | None:
    for address in dispatch.usable_addresses():
        if address.family == socket.AF_INET:
            return address
    return None


def test_loopback_target_is_reached_from_another_interfaces_address(
    make_proxy: Callable[..., Dispatcher], peer_server: Server
) -> None:
    """A socket bound to eth0 cannot reach 127.0.0.1: no device for loopback."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("no IPv4 address outside loopback here")
    proxy = make_proxy([address.ip])
    assert proxy.addresses[0].interface == address.interface
    with client_through(proxy, (peer_server.host, peer_server.port)) as client:
        assert read_all(client).decode() == address.ip


def test_refused_device_binding_warns_once_and_binds_the_source(
    make_proxy: Callable[..., Dispatcher],
    peer_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
) -> None:
    attempts = []

    def refuse(sock: socket.socket, interface: str) -> None:
        attempts.append(interface)
        raise dispatch._DeviceBindingRefusedError(errno.EPERM, "Operation not permitted")

    # Private: the one device-binding path has no public seam, and root
    # (which runs these tests) is never refused.
    monkeypatch.setattr(dispatch, "_device_for", lambda local, ip: "lo")
    monkeypatch.setattr(dispatch, "_bind_to_device", refuse)
    proxy = make_proxy(["127.0.0.2"])
    for _ in range(3):
        with client_through(proxy, (peer_server.host, peer_server.port)) as client:
            assert read_all(client) == b"127.0.0.2"
    assert attempts == ["lo"]  # not tried again after the refusal
    warnings = [r.message for r in log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not permitted" in warnings[0]
    assert "CAP_NET_RAW" in warnings[0] and "ip rule add from ADDR table N" in warnings[0]


# ---------------------------------------------------------------------------
# Name servers: resolv.conf, systemd-resolved, Windows adapters, the hosts file
# ---------------------------------------------------------------------------


STUB_RESOLV_CONF = """\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
nameserver 127.0.0.53
options edns0 trust-ad
search home.arpa
"""
SYSTEMD_UPSTREAMS = """\
# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 192.168.1.1
nameserver 10.8.0.1
nameserver 9.9.9.9
search home.arpa corp.example
"""


def write_files(root: Any, files: dict[str, str]) -> str:
    for path, text in files.items():
        os.makedirs(os.path.join(str(root), os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(str(root), path), "w") as file:
            file.write(text)
    return str(root)


def test_resolv_conf_gives_servers_search_domains_and_ndots() -> None:
    conf = dispatch.parse_resolv_conf(
        "# a comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0 ; scoped\nnameserver not-an-ip\n"
        "domain old.example\nsearch a.example b.example.\noptions timeout:1 ndots:2\n"
    )
    assert conf == dispatch.ResolvConf(("192.0.2.53", "fe80::1%eth0"), ("a.example", "b.example"), 2)


def test_discovery_takes_the_servers_of_resolv_conf_for_any_link(tmp_path: Any) -> None:
    root = write_files(tmp_path, {"etc/resolv.conf": "nameserver 192.0.2.53\nnameserver 2001:db8::53\n"})
    servers, conf = dispatch.discover_name_servers(root)
    assert servers == [dispatch.NameServer("192.0.2.53"), dispatch.NameServer("2001:db8::53")]
    assert conf.search == ()


def test_discovery_behind_the_systemd_stub_asks_its_upstreams_each_through_its_link(tmp_path: Any) -> None:
    root = write_files(
        tmp_path,
        {
            "etc/resolv.conf": STUB_RESOLV_CONF,
            "run/systemd/resolve/resolv.conf": SYSTEMD_UPSTREAMS,
            # Set over D-Bus (NetworkManager), and by systemd-networkd.
            "run/systemd/resolve/netif/3": "# This is private data. Do not parse.\nLLMNR=yes\nSERVERS=192.168.1.1\n",
            "run/systemd/netif/links/7": "# This is private data. Do not parse.\nADMIN_STATE=configured\n"
            "DNS=10.8.0.1 [2001:db8::35]:5353#dns.corp.example\n",
            "run/systemd/netif/links/9": "DNS=192.0.2.9\n",  # an interface gone since
        },
    )
    names = {3: "wlan0", 7: "tun0"}

    def interface_name(index: int) -> str:
        if index not in names:
            raise OSError(errno.ENXIO, "no such device")
        return names[index]

    servers, conf = dispatch.discover_name_servers(root, interface_name)
    assert servers == [
        dispatch.NameServer("192.168.1.1", 53, "wlan0"),
        dispatch.NameServer("10.8.0.1", 53, "tun0"),
        dispatch.NameServer("2001:db8::35", 5353, "tun0"),
        dispatch.NameServer("9.9.9.9"),
    ]
    assert conf.search == ("home.arpa",)


def test_discovery_asks_the_stub_itself_when_its_upstreams_are_unknown(tmp_path: Any) -> None:
    root = write_files(tmp_path, {"etc/resolv.conf": STUB_RESOLV_CONF})
    servers, _ = dispatch.discover_name_servers(root)
    assert servers == [dispatch.NameServer("127.0.0.53")]
    assert servers[0].loopback


def test_windows_adapters_give_each_adapters_servers_to_its_link() -> None:
    adapters = [  # the values of HKLM\\...\\Tcpip\\Parameters\\Interfaces\\{GUID}, as winreg reads them
        {"EnableDHCP": 1, "DhcpIPAddress": "192.168.1.23", "DhcpNameServer": "192.168.1.1 192.168.1.2"},
        {
            "EnableDHCP": 0,
            "IPAddress": ["10.0.0.5"],
            "NameServer": "10.0.0.1,10.0.0.2",
            "DhcpNameServer": "10.9.9.9",
        },  # set by hand: the DHCP server's is not used
        {"EnableDHCP": 1, "DhcpIPAddress": "0.0.0.0", "DhcpNameServer": ""},  # unplugged
    ]
    assert dispatch.windows_name_servers(adapters, global_servers="9.9.9.9") == [
        dispatch.NameServer("192.168.1.1", 53, "192.168.1.23"),
        dispatch.NameServer("192.168.1.2", 53, "192.168.1.23"),
        dispatch.NameServer("10.0.0.1", 53, "10.0.0.5"),
        dispatch.NameServer("10.0.0.2", 53, "10.0.0.5"),
        dispatch.NameServer("9.9.9.9"),
    ]


def test_hosts_file_gives_each_names_addresses_in_order() -> None:
    hosts = dispatch.parse_hosts(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n192.0.2.7 Pinned.Example pinned # kept\n#10.0.0.1 gone\n"
    )
    assert hosts == {
        "localhost": ["127.0.0.1", "::1"],
        "ip6-localhost": ["::1"],
        "pinned.example": ["192.0.2.7"],
        "pinned": ["192.0.2.7"],
    }


# ---------------------------------------------------------------------------
# Resolver: names through the links, the cache, the query plan
# ---------------------------------------------------------------------------


def test_unresolvable_name_gets_reply_04(proxy: Dispatcher) -> None:
    # An empty label fails in the resolver itself: no DNS query leaves.
    assert socks5_code_for(proxy, socks5_request("bad..name", 80)) == Reply.HOST_UNREACHABLE


@needs_ipv6
def test_name_tries_each_address_until_one_connects(
    make_proxy: Callable[..., Dispatcher], fake_names: dict[str, list[str]], echo_server: Server
) -> None:
    """A name may resolve to ::1 first while only 127.0.0.1 listens."""
    fake_names["dual.test"] = ["::1", "127.0.0.1"]
    proxy = make_proxy(["127.0.0.1", "::1"])
    with client_through(proxy, ("dual.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"second try") == b"second try"


def test_name_of_a_family_without_local_address_gets_reply_08(
    proxy: Dispatcher, fake_names: dict[str, list[str]], log: pytest.LogCaptureFixture
) -> None:
    fake_names["six.test"] = ["::1"]
    assert socks5_code_for(proxy, socks5_request("six.test", 80)) == Reply.ADDRESS_TYPE_NOT_SUPPORTED
    proxy.shutdown()
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == "six.test:80"]
    assert exchange.result == "six.test has only IPv6 addresses and there is no IPv6 local address to dispatch to"


# The --dns option, the cache, the query plan -------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (None, (None, False)),
        (["system"], (None, True)),
        (
            ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "2001:db8::54"],
            (
                [
                    dispatch.NameServer("192.0.2.53"),
                    dispatch.NameServer("192.0.2.54", 5353),
                    dispatch.NameServer("2001:db8::53"),
                    dispatch.NameServer("2001:db8::54"),
                ],
                False,
            ),
        ),
    ],
)
def test_dns_option_names_servers_or_the_system(texts: list[str] | None, expected: Any) -> None:
    assert dispatch.parse_dns_option(texts) == expected


@pytest.mark.parametrize("text", ["dns.example", "192.0.2.1:0", "192.0.2.1:99999", "[::1", "system,1.1.1.1"])
def test_bad_dns_option_is_one_line_and_exit_2(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["start", "--dns", text])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) <= 2  # usage, and the error


def test_dns_system_takes_no_server_beside_it() -> None:
    with pytest.raises(ValueError, match="system"):
        dispatch.parse_dns_option(["system", "192.0.2.53"])


def test_dns_cache_keeps_answers_for_their_ttl_and_drops_the_least_recently_used() -> None:
    clock = FakeClock()
    cache = dispatch.DnsCache(max_entries=2, clock=clock)
    one, two, three = (dispatch.NameAnswer((f"192.0.2.{n}",)) for n in (1, 2, 3))
    cache.put("one.test", 1, one, 60)
    cache.put("two.test", 1, two, 10)
    cache.put("zero.test", 1, three, 0)  # a TTL of 0 is not kept
    assert cache.get("one.test", 1) == one  # now the most recently used
    cache.put("three.test", 1, three, 60)
    assert (cache.get("two.test", 1), cache.get("one.test", 1), len(cache)) == (None, one, 2)
    clock.now += 60
    assert cache.get("one.test", 1) is None and cache.get("three.test", 1) is None


def local(ip: str, interface: str | None = None) -> dispatch.LocalAddress:
    return dispatch.LocalAddress(ip, interface=interface)


def test_query_plan_asks_through_the_chosen_link_first_each_link_its_own_servers_first() -> None:
    wlan, cable, cable6 = local("192.168.1.23", "wlan0"), local("10.0.0.5", "eth0"), local("2001:db8::5", "eth0")
    servers = [
        dispatch.NameServer("192.168.1.1", 53, "wlan0"),
        dispatch.NameServer("9.9.9.9"),
        dispatch.NameServer("2001:db8::53"),
        dispatch.NameServer("127.0.0.53"),
    ]
    resolver = dispatch.Resolver(servers, addresses=lambda: [wlan, cable, cable6])
    assert resolver.plan(cable) == [
        (servers[1], cable),
        (servers[0], wlan),  # each link's first: eth0 chosen, wlan0 its own
        (servers[2], cable6),
        (servers[1], wlan),
        (servers[3], None),  # loopback: no link
    ]


# Names through the links, end to end against a DNS server on loopback ------


def test_socks5_name_is_asked_of_the_name_server_by_the_proxy(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    dns_server.names["echo.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    with client_through(proxy, ("echo.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"by name") == b"by name"
    assert [(q[0], q[1], q[2]) for q in dns_server.asked("echo.test")] == [("echo.test", "A", "udp")]


def test_query_plan_sends_an_upstream_proxys_queries_by_its_link_or_by_the_routing_table() -> None:
    proxy = dispatch.parse_proxy_url("socks5://203.0.113.7:1080")[0]
    over_cable = dispatch.ProxyAddress(interface="eth0", proxy=dataclasses.replace(proxy, via="eth0"))
    routed, other = (dispatch.ProxyAddress(proxy=dataclasses.replace(proxy, host=f"203.0.113.{n}")) for n in (7, 8))
    cable = local("10.0.0.5", "eth0")
    servers = [dispatch.NameServer("9.9.9.9"), dispatch.NameServer("2001:db8::53")]
    resolver = dispatch.Resolver(servers, addresses=lambda: [cable, over_cable, routed, other])
    assert resolver.plan(routed) == [
        (servers[0], routed),
        (servers[0], cable),  # the proxies without a link share the routing table's way
        (servers[1], routed),
        (servers[1], over_cable),  # bound to no address: either family
    ]
    assert resolver.plan(over_cable, only_via=True) == [(servers[0], over_cable), (servers[1], over_cable)]


def test_socks5_names_of_no_host_get_reply_04_and_no_query(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    proxy = make_proxy(dns=[dns_server.address])
    with pytest.raises(socks.GeneralProxyError, match="0x04: Host unreachable"):
        client_through(proxy, ("@", echo_server.port), rdns=True)
    for name in (b".", b"a..test"):  # PySocks sends no such name
        request = bytes([5, 1, 0, 3, len(name)]) + name + struct.pack("!H", echo_server.port)
        assert socks5_code_for(proxy, request) == Reply.HOST_UNREACHABLE
    for request in (f"CONNECT .:{echo_server.port} HTTP/1.1\r\n\r\n", "GET http://bad..name/ HTTP/1.1\r\n\r\n"):
        assert http_exchange(proxy, request.encode())[0] == HTTPStatus.BAD_REQUEST
    assert dns_server.queries == []


def test_socks4a_name_is_asked_of_the_name_server(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    dns_server.names["four.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    with client_through(proxy, ("four.test", echo_server.port), socks.SOCKS4, rdns=True) as client:
        assert round_trip(client, b"4a") == b"4a"
    assert dns_server.asked("four.test")


def test_http_connect_and_absolute_form_names_are_asked_of_the_name_server(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, origin: str
) -> None:
    dns_server.names["tunnel.test"] = dns_server.names["origin.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    port = int(origin.rpartition(":")[2])
    status, _, body = http_exchange(
        proxy, f"GET http://origin.test:{port}/page HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n".encode()
    )
    assert (status, b"GET /page" in body) == (200, True)
    with raw_client(proxy) as sock:
        sock.sendall(f"CONNECT tunnel.test:{port} HTTP/1.1\r\nHost: tunnel.test:{port}\r\n\r\n".encode())
        assert recv_exactly(sock, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert dns_server.asked("origin.test") and dns_server.asked("tunnel.test")


def test_udp_datagram_to_a_name_is_asked_of_the_name_server(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, udp_echo: UdpServer
) -> None:
    dns_server.names["udp.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    tcp, relay_address = udp_associate(proxy, 0)
    with tcp, udp_socket() as sock:
        sock.sendto(b"\0\0\0" + dispatch.encode_socks5_address("udp.test", udp_echo.port) + b"named", relay_address)
        assert sock.recv(65535) == dispatch.encode_udp_header("127.0.0.1", udp_echo.port) + b"named"
    assert dns_server.asked("udp.test")


@needs_ipv6
def test_a_name_is_asked_for_each_family_there_are_local_addresses_for(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server6: Server
) -> None:
    dns_server.names["dual.test"] = ["127.77.0.1", "::1"]  # only ::1 listens: the IPv4 address is tried first
    proxy = make_proxy(["127.0.0.1", "::1"], dns=[dns_server.address])
    with client_through(proxy, ("dual.test", echo_server6.port), rdns=True) as client:
        assert round_trip(client, b"both") == b"both"
    assert sorted(q[1] for q in dns_server.asked("dual.test")) == ["A", "AAAA"]
    only4 = make_proxy(["127.0.0.1"], dns=[dns_server.address])
    dns_server.names["four-only.test"] = ["127.0.0.1", "::1"]
    assert socks5_code_for(only4, socks5_request("four-only.test", refused_port())) == Reply.CONNECTION_REFUSED
    assert [q[1] for q in dns_server.asked("four-only.test")] == ["A"]


def test_many_connections_to_one_name_make_one_query(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    """24 connections of a download manager at once: one query, the rest
    wait for it or take it from the cache."""
    dns_server.names["mirror.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    results: list[bytes] = []

    def fetch() -> None:
        with client_through(proxy, ("mirror.test", echo_server.port), rdns=True) as client:
            results.append(round_trip(client, b"part"))

    threads = [threading.Thread(target=fetch) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == [b"part"] * 24
    assert len(dns_server.asked("mirror.test")) == 1
    (row,) = proxy.stats()
    assert (row["dns_queries"], row["dns_failures"]) == (1, 0)
    assert 1 <= row["dns_cache_hits"] <= 23


def test_no_such_name_is_kept_briefly_and_gets_reply_04(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(dns=[dns_server.address])
    for _ in range(2):
        assert socks5_code_for(proxy, socks5_request("missing.test", 80)) == Reply.HOST_UNREACHABLE
    assert len(dns_server.asked("missing.test")) == 1  # the negative answer was kept (RFC 2308)
    proxy.shutdown()
    results = [e.result for e in exchanges(log) if e.target == "missing.test:80"]
    assert results == ["missing.test: no such name (NXDOMAIN from " + dns_server.address + ")"] * 2


def test_truncated_answer_is_asked_again_by_tcp(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    dns_server.names["big.test"] = ["127.0.0.1"]
    dns_server.behaviour["big.test"] = "truncated"
    proxy = make_proxy(dns=[dns_server.address])
    with client_through(proxy, ("big.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"tcp") == b"tcp"
    assert [q[2] for q in dns_server.asked("big.test")] == ["udp", "tcp"]


@pytest.mark.parametrize(
    ("how", "reply", "status", "result"),
    [
        ("nxdomain", Reply.HOST_UNREACHABLE, 502, "no such name"),
        ("servfail", Reply.HOST_UNREACHABLE, 502, "the name server failed (SERVFAIL)"),
        ("refused", Reply.HOST_UNREACHABLE, 502, "the name server refused (REFUSED)"),
        ("malformed", Reply.TTL_EXPIRED, 504, "no answer from the name servers"),
        ("wrong-id", Reply.TTL_EXPIRED, 504, "no answer from the name servers"),
        ("other-question", Reply.TTL_EXPIRED, 504, "no answer from the name servers"),
        ("other-source", Reply.TTL_EXPIRED, 504, "no answer from the name servers"),
        ("silent", Reply.TTL_EXPIRED, 504, "no answer from the name servers"),
    ],
)
def test_bad_answers_end_in_the_right_reply_and_one_log_line(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    log: pytest.LogCaptureFixture,
    how: str,
    reply: Reply,
    status: int,
    result: str,
) -> None:
    dns_server.names["hostile.test"] = dns_server.names["hostile-http.test"] = ["127.0.0.1"]
    dns_server.behaviour["hostile.test"] = dns_server.behaviour["hostile-http.test"] = how
    proxy = make_proxy(dns=[dns_server.address], connect_timeout=1.0)
    threads = threading.active_count()
    assert socks5_code_for(proxy, socks5_request("hostile.test", 80)) == reply
    answer = http_exchange(proxy, b"GET http://hostile-http.test/ HTTP/1.1\r\nHost: hostile-http.test\r\n\r\n")
    assert answer[0] == status
    assert wait_for(lambda: threading.active_count() <= threads)
    proxy.shutdown()
    (socks_line,) = [e for e in exchanges(log) if e.target == "hostile.test:80"]
    assert socks_line.result.startswith(f"hostile.test: {result}")
    assert not [record for record in log.records if record.exc_info]


@pytest.mark.parametrize("cap", ["reached", "never reached"])
def test_a_flood_of_wrong_answers_holds_no_lookup_past_its_time_and_is_one_failure(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
    cap: str,
) -> None:
    """The server floods answers with a wrong id for TIMEOUT seconds: the
    query gives up after DNS_MAX_WRONG_ANSWERS of them, and without that
    cap the lookup still ends at its time."""
    if cap == "never reached":
        monkeypatch.setattr(dispatch, "DNS_MAX_WRONG_ANSWERS", math.inf)
    dns_server.behaviour["flooded.test"] = "flood"
    proxy = make_proxy(dns=[dns_server.address], connect_timeout=1.0)
    started = time.monotonic()
    assert socks5_code_for(proxy, socks5_request("flooded.test", 80)) == Reply.TTL_EXPIRED
    assert time.monotonic() - started < 1.0 + TIMEOUT / 2  # the flood goes on for TIMEOUT
    (row,) = proxy.stats()
    assert (row["dns_queries"], row["dns_failures"]) == (1, 1)
    passed_over = [record.message for record in log.records if record.message.startswith("passed over")]
    assert 1 <= len(passed_over) <= 2  # at most one a second
    assert passed_over[0].startswith(f"passed over an answer to another query from {dns_server.address}")


def test_a_name_server_that_answers_late_is_waited_for_while_the_connect_timeout_lasts(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    """The server answers the first query only, 2.5 s late: the query is
    sent again meanwhile, and the first send's answer is taken."""
    dns_server.names["late.test"] = ["127.0.0.1"]
    dns_server.behaviour["late.test"] = "late"
    proxy = make_proxy(dns=[dns_server.address], connect_timeout=20.0)
    with client_through(proxy, ("late.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"late") == b"late"
    assert len(dns_server.asked("late.test")) >= 2
    (row,) = proxy.stats()
    assert (row["dns_queries"], row["dns_failures"]) == (1, 0)


def test_a_lost_query_is_sent_again(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    dns_server.names["lossy.test"] = ["127.0.0.1"]
    dns_server.behaviour["lossy.test"] = "drop-first"
    proxy = make_proxy(dns=[dns_server.address])
    started = time.monotonic()
    with client_through(proxy, ("lossy.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"again") == b"again"
    assert time.monotonic() - started >= dispatch.DNS_RESEND
    assert len(dns_server.asked("lossy.test")) == 2


def test_a_name_server_that_is_not_there_gets_reply_04_at_once(
    make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = dispatch._format_endpoint(*closed.getsockname())
    proxy = make_proxy(dns=[nowhere])
    started = time.monotonic()
    assert socks5_code_for(proxy, socks5_request("anything.test", 80)) == Reply.HOST_UNREACHABLE
    # The port's refusal (ICMP) is heard: the attempt is not waited out.
    assert time.monotonic() - started < dispatch.DNS_ATTEMPT_TIMEOUT
    proxy.shutdown()
    (exchange,) = [e for e in exchanges(log) if e.target == "anything.test:80"]
    assert exchange.result == f"anything.test: no name server reached: Connection refused ({nowhere})"


def test_a_silent_server_is_hedged_to_the_next_before_its_attempt_times_out(
    make_proxy: Callable[..., Dispatcher], make_server: Callable[..., Server], echo_server: Server
) -> None:
    silent, answering = DnsServer(), DnsServer()
    try:
        silent.behaviour["hedged.test"] = "silent"
        answering.names["hedged.test"] = ["127.0.0.1"]
        proxy = make_proxy(dns=[silent.address, answering.address])
        started = time.monotonic()
        with client_through(proxy, ("hedged.test", echo_server.port), rdns=True) as client:
            assert round_trip(client, b"hedged") == b"hedged"
        assert time.monotonic() - started < dispatch.DNS_ATTEMPT_TIMEOUT  # after DNS_HEDGE, not the timeout
        assert silent.asked("hedged.test") and answering.asked("hedged.test")
    finally:
        silent.close()
        answering.close()


@pytest.fixture
def servers_through_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name servers on loopback are asked through each link (from its
    address) as remote ones are, not once without a link.

    Private seam: on loopback every server is a local one."""
    monkeypatch.setattr(dispatch.NameServer, "loopback", property(lambda server: False))


def test_a_link_whose_queries_go_unanswered_while_another_links_are_answered_is_put_out(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    peer_server: Server,
    servers_through_links: None,
    log: pytest.LogCaptureFixture,
) -> None:
    dns_server.silent_to = {"127.0.0.2"}
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], balance="round-robin", hedge=0.1, dns=[dns_server.address])
    seen = []
    for n in range(4):
        dns_server.names[f"n{n}.test"] = ["127.0.0.1"]
        with client_through(proxy, (f"n{n}.test", peer_server.port), rdns=True) as client:
            seen.append(read_all(client).decode())
    assert seen == ["127.0.0.3"] * 4  # the silent link's first lookup went through the other
    assert {q[3] for q in dns_server.asked("n0.test")} == {"127.0.0.2", "127.0.0.3"}
    assert {q[3] for q in dns_server.queries[2:]} == {"127.0.0.3"}  # once out, it is not asked again
    rows = {row["ip"]: row for row in proxy.stats()}
    assert rows["127.0.0.2"]["state"] == "down"
    assert rows["127.0.0.2"]["dns_failures"] >= 1 and rows["127.0.0.3"]["dns_failures"] == 0
    sat_out = r"sitting out: 127\.0\.0\.2( \([^)]*\))?: no DNS answer in 0\.\d s; 127\.0\.0\.3 got one"
    assert re.search(sat_out, log.text)


def test_a_dead_name_server_is_not_a_dead_link(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, servers_through_links: None
) -> None:
    dns_server.behaviour["dead.test"] = "silent"
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], hedge=0.1, connect_timeout=1.0, dns=[dns_server.address])
    assert socks5_code_for(proxy, socks5_request("dead.test", 80)) == Reply.TTL_EXPIRED
    assert {q[3] for q in dns_server.asked("dead.test")} == {"127.0.0.2", "127.0.0.3"}
    assert [row["state"] for row in proxy.stats()] == ["up", "up"]


def test_the_systems_servers_and_search_domains_are_used_by_default(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conf = dispatch.ResolvConf((dns_server.address,), ("corp.test",), 1)
    servers = [dispatch.parse_name_server(dns_server.address)]
    monkeypatch.setattr(dispatch, "system_name_servers", lambda: (servers, conf))
    dns_server.names["intranet.corp.test"] = ["127.0.0.1"]
    proxy = make_proxy()
    with client_through(proxy, ("intranet", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"searched") == b"searched"
    assert [q[0] for q in dns_server.queries] == ["intranet.corp.test"]  # fewer dots than ndots: searched first


def test_hosts_file_is_read_before_any_server(tmp_path: Any, dns_server: DnsServer) -> None:
    hosts = write_files(tmp_path, {"hosts": "192.0.2.7 pinned.test\n"})
    resolver = dispatch.Resolver(
        [dispatch.parse_name_server(dns_server.address)], hosts_file=os.path.join(hosts, "hosts")
    )
    resolution = resolver.resolve("Pinned.Test", {socket.AF_INET}, None, lambda local, ip, opener: opener(None))
    assert resolution.targets == [(socket.AF_INET, "192.0.2.7")]
    assert dns_server.queries == []


def test_dns_system_leaves_names_to_the_system_resolver(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    fake_names: dict[str, list[str]],
    echo_server: Server,
) -> None:
    fake_names["system.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=["system"])
    with client_through(proxy, ("system.test", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"as today") == b"as today"
    assert proxy.stats()[0]["dns_queries"] == 0


def test_without_dnspython_names_go_to_the_system_resolver_and_the_log_says_so_once(
    make_proxy: Callable[..., Dispatcher],
    dns_server: DnsServer,
    fake_names: dict[str, list[str]],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(dispatch, "_has_dnspython", lambda: False)
    fake_names["plain.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    for _ in range(2):
        with client_through(proxy, ("plain.test", echo_server.port), rdns=True) as client:
            assert round_trip(client, b"stdlib") == b"stdlib"
    assert dns_server.queries == []
    assert len([r for r in log.records if "dnspython package is not installed" in r.message]) == 1


def test_dns_counts_are_on_the_page_in_stats_json_and_in_metrics(
    make_proxy: Callable[..., Dispatcher], dns_server: DnsServer, echo_server: Server
) -> None:
    dns_server.names["counted.test"] = ["127.0.0.1"]
    proxy = make_proxy(dns=[dns_server.address])
    for _ in range(2):
        with client_through(proxy, ("counted.test", echo_server.port), rdns=True) as client:
            round_trip(client, b"x")
    assert socks5_code_for(proxy, socks5_request("nothing.test", 80)) == Reply.HOST_UNREACHABLE
    (row,) = json.loads(http_exchange(proxy, b"GET /stats.json HTTP/1.0\r\n\r\n")[2])["addresses"]
    assert (row["dns_queries"], row["dns_cache_hits"], row["dns_failures"]) == (2, 1, 0)
    metrics = http_exchange(proxy, b"GET /metrics HTTP/1.0\r\n\r\n")[2].decode()
    assert re.search(r'^dispatch_dns_queries_total\{[^}]*address="127\.0\.0\.1"[^}]*\} 2$', metrics, re.M)
    assert re.search(r"^dispatch_dns_cache_hits_total\{[^}]*\} 1$", metrics, re.M)
    assert re.search(r"^dispatch_dns_failures_total\{[^}]*\} 0$", metrics, re.M)
    page = http_exchange(proxy, b"GET / HTTP/1.0\r\n\r\n")[2].decode()
    assert "DNS" in page and ">2 / 1 / 0<" in page


# ---------------------------------------------------------------------------
# Proxy links: other proxies as links
# ---------------------------------------------------------------------------


def echoed(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` to an echo server and read as much back, without a
    half-close (pproxy ends both directions at the first EOF)."""
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("socks5://10.0.0.9:1080", ("socks5", "10.0.0.9", 1080, None, None, None, None, False)),
        (
            "socks5h://al:s%40cret@proxy.example:1080@3",
            ("socks5h", "proxy.example", 1080, "al", "s@cret", None, 3, False),
        ),
        ("socks4a://me@[2001:db8::1]:1080+eth0", ("socks4a", "2001:db8::1", 1080, "me", None, "eth0", None, False)),
        (
            "http://u:p:w@127.0.0.1:3128+192.168.1.20@backup",
            ("http", "127.0.0.1", 3128, "u", "p:w", "192.168.1.20", None, True),
        ),
        ("SOCKS5://[::1]:9050+Ethernet 2@7", ("socks5", "::1", 9050, None, None, "Ethernet 2", 7, False)),
    ],
)
def test_parse_proxy_address(text: str, expected: tuple[Any, ...]) -> None:
    spec = dispatch.parse_address(text)
    proxy = spec.proxy
    assert proxy is not None
    got = (proxy.scheme, proxy.host, proxy.port, proxy.user, proxy.password, proxy.via, spec.weight, spec.backup)
    assert got == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://10.0.0.9:21", "a proxy's scheme is one of socks5, socks5h, socks4, socks4a, http"),
        ("socks5://10.0.0.9", "a proxy is SCHEME://HOST:PORT"),
        ("socks5://al:hunter2@10.0.0.9:99999", "a proxy is SCHEME://HOST:PORT"),
        ("socks4://al:hunter2@10.0.0.9:1080", "SOCKS4 has a user id but no password"),
        ("socks5://al:hunter2@10.0.0.9:1080+", "no link after '+'"),
        ("socks5://al:hunter2@10.0.0.9:1080@0", "the weight must be a whole number"),
        ("mptcp+socks4://al@10.0.0.9:1080", "a proxy's scheme is one of mptcp+socks5, mptcp+socks5h, mptcp+http"),
        ("mptcp+socks5h://al:hunter2@10.0.0.9:1080+eth0+", "no link after '+'"),
    ],
)
def test_parse_proxy_address_rejects_without_showing_the_password(text: str, message: str) -> None:
    with pytest.raises(dispatch.AddressError, match=re.escape(message)) as refused:
        dispatch.parse_address(text)
    assert "hunter2" not in str(refused.value)


def test_a_bonded_proxys_address_names_its_links_and_hides_its_password() -> None:
    spec = dispatch.parse_address("mptcp+socks5h://al:hunter2@vps.example:1080+eth0+wlan0@backup")
    proxy = spec.proxy
    assert proxy is not None and spec.backup
    assert (proxy.scheme, proxy.host, proxy.port, proxy.bonded, proxy.bond, proxy.via, proxy.password) == (
        "socks5h",
        "vps.example",
        1080,
        True,
        ("eth0", "wlan0"),
        None,
        "hunter2",
    )
    assert spec.address == proxy.name == "mptcp+socks5h://al@vps.example:1080+eth0+wlan0"
    every = dispatch.parse_address("mptcp+http://vps.example:3128").proxy
    assert every is not None and (every.bonded, every.bond, every.name) == (True, (), "mptcp+http://vps.example:3128")


def mptcp_or_skip() -> None:
    why = dispatch.mptcp_unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("multipath", [True, False])
def test_a_bond_to_a_dispatch_is_multipath_or_a_logged_and_shown_fallback(
    multipath: bool, make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    """A bond over loopback alone (+lo: no endpoint to add) to a dispatch
    with a login: with --mptcp the connection is Multipath TCP; without it,
    it falls back to TCP and still works, said once and shown."""
    mptcp_or_skip()
    far = make_proxy(credentials={"al": "hunter2"}, mptcp=multipath)
    bond = f"mptcp+socks5h://al:hunter2@127.0.0.1:{far.address[1]}+lo"
    near = make_proxy([bond])
    for _ in range(2):
        with client_through(near, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"bonded") == b"bonded"
    (shown,) = near.status()["bonds"]
    assert (shown["link"], shown["mptcp"], shown["members"]) == (
        "mptcp+socks5h://al@127.0.0.1:" + str(far.address[1]) + "+lo",
        "multipath" if multipath else "fallback",
        [],
    )
    fallbacks = [r for r in log.records if "fallback to one TCP subflow" in r.getMessage()]
    assert len(fallbacks) == (0 if multipath else 1)
    metrics = dispatch.render_metrics(near.status())
    assert f'dispatch_bond_fallback{{link="{shown["link"]}"}} {0 if multipath else 1}' in metrics
    page = dispatch.render_status_page(near.status())
    shown_state = "multipath" if multipath else "fallback"
    assert f"<dt>bond {shown['link']}</dt><dd>{shown_state} (no interface yet)" in page
    assert "hunter2" not in json.dumps(near.status()) + metrics + page + log.text


def test_bonds_of_each_scheme_are_links_beside_a_direct_one_and_keep_sticky_sites(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    mptcp_or_skip()
    far = make_proxy(mptcp=True)
    links = ["127.0.0.2", *(f"mptcp+{scheme}://127.0.0.1:{far.address[1]}+lo" for scheme in dispatch.BONDED_SCHEMES)]
    spread = make_proxy(links, balance="round-robin")
    for _ in range(len(links)):
        with client_through(spread, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"spread") == b"spread"
    assert {row["link"]: row["connections"] for row in spread.stats()} == dict.fromkeys(links, 1)
    assert [bond["mptcp"] for bond in spread.status()["bonds"]] == ["multipath"] * 3
    sticky = make_proxy(links, balance="round-robin", sticky=60)
    for _ in range(4):
        with client_through(sticky, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"sticky") == b"sticky"
    assert sorted(row["connections"] for row in sticky.stats()) == [0, 0, 0, 4]


def bonded_download(make_proxy: Callable[..., Dispatcher], size: int, *links: str) -> tuple[Dispatcher, Dispatcher]:
    """A download of ``size`` bytes through a dispatch whose links are
    ``links`` and a bond over loopback to a dispatch with --mptcp: (far, near)."""
    mptcp_or_skip()
    target = Server(lambda conn: conn.sendall(b"x" * size))
    try:
        far = make_proxy(mptcp=True)
        near = make_proxy([*links, f"mptcp+socks5://127.0.0.1:{far.address[1]}+lo"])
        with client_through(near, (target.host, target.port)) as client:
            assert len(read_all(client)) == size
        wait_until_all_closed(near)
    finally:
        target.close()
    return far, near


def test_a_bonded_connections_line_and_the_status_say_what_each_interface_carried(
    make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture
) -> None:
    size = 3_000_000
    far, near = bonded_download(make_proxy, size)
    (line,) = [r.getMessage() for r in log.records if " via mptcp+" in r.getMessage()]
    assert f"via mptcp+socks5://127.0.0.1:{far.address[1]}+lo (lo 100%): ok, " in line
    (carried,) = near.status()["bonds"][0]["carried"]
    assert (carried["interface"], carried["bytes_down"]) == ("lo", size)
    metrics = dispatch.render_metrics(near.status())
    assert (
        f'dispatch_bond_bytes_received_total{{link="mptcp+socks5://127.0.0.1:{far.address[1]}+lo",interface="lo"}}'
        in metrics
    )


def test_what_a_bond_carried_through_an_address_that_is_a_link_too_counts_on_its_row_and_once_in_the_totals(
    make_proxy: Callable[..., Dispatcher],
) -> None:
    size = 3_000_000
    far, near = bonded_download(make_proxy, size, "127.0.0.1@backup")
    bond = f"mptcp+socks5://127.0.0.1:{far.address[1]}+lo"
    near.sample_meter()
    status = near.status()
    rows = {row["link"]: row for row in status["addresses"]}
    assert rows[bond]["bytes_down"] == size
    assert size <= rows["127.0.0.1"]["bytes_down"] <= size * 1.02  # the subflow's own count
    assert status["totals"]["bytes_down"] == size


def test_a_dispatch_with_mptcp_serves_multipath_and_plain_tcp_clients(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    mptcp_or_skip()
    proxy = make_proxy(mptcp=True)
    assert proxy._server.socket.proto == dispatch._IPPROTO_MPTCP
    with client_through(proxy, (echo_server.host, echo_server.port)) as plain:
        assert round_trip(plain, b"plain") == b"plain"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, dispatch._IPPROTO_MPTCP) as multipath:
        multipath.settimeout(TIMEOUT)
        multipath.connect(proxy.address)
        multipath.sendall(b"\x05\x01\x00" + socks5_request(echo_server.host, echo_server.port))
        assert recv_exactly(multipath, 2) == b"\x05\x00"
        assert socks5_reply(multipath)[0] == Reply.SUCCEEDED
        assert multipath.getsockopt(socket.IPPROTO_TCP, dispatch._TCP_IS_MPTCP) == 1
        assert round_trip(multipath, b"multipath") == b"multipath"


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 Connection established\r\nVia: 1.1 upstream\r\n\r\n",
        b"\x05\x00\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90",  # method, then success bound to 127.0.0.1:8080
    ],
)
def test_handshake_with_an_upstream_leaves_the_targets_first_bytes_unread(reply: bytes) -> None:
    """A target that speaks first (SSH, SMTP): its banner may arrive in the
    same segment as the proxy's reply, and must stay for the relay.
    Private: the non-blocking handshake driver has no public seam."""
    steps = dispatch.http_connect_client if reply.startswith(b"HTTP") else dispatch.socks5_client
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(reply + b"SSH-2.0-target\r\n")
        bound = dispatch._handshake_by(ours, steps("192.0.2.7", 22, None), time.monotonic() + TIMEOUT)
        assert theirs.recv(4096).startswith(b"CONNECT 192.0.2.7:22 " if reply.startswith(b"HTTP") else b"\x05")
        ours.setblocking(True)
        assert ours.recv(4096) == b"SSH-2.0-target\r\n"
    assert bound == (("0.0.0.0", 0) if reply.startswith(b"HTTP") else ("127.0.0.1", 8080))


def test_http_upstreams_interim_answers_to_connect_are_passed_over(
    make_proxy: Callable[..., Dispatcher], make_server: Callable[..., Server]
) -> None:
    """RFC 9110, 15.2: 1xx answers, with fields or none, before the 200."""

    def upstream_proxy(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        echo(conn)  # the tunnel's far end: the upstream itself echoes

    upstream = make_server(upstream_proxy)
    proxy = make_proxy([f"http://127.0.0.1:{upstream.port}"])
    for _ in range(2):
        with client_through(proxy, ("127.0.0.1", refused_port())) as client:
            assert echoed(client, b"after the interim answers") == b"after the interim answers"
    with raw_client(proxy) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:7 HTTP/1.1\r\n\r\n")
        assert recv_exactly(sock, 39) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert echoed(sock, b"by CONNECT too") == b"by CONNECT too"


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 100_000, "the upstream proxy's interim (1xx) answers to CONNECT go on"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "the upstream proxy answered CONNECT with 101"),
    ],
    ids=["endless-1xx", "101"],
)
def test_http_upstream_that_answers_connect_with_1xx_alone_is_put_out_in_one_line(
    make_proxy: Callable[..., Dispatcher],
    make_server: Callable[..., Server],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
    answer: bytes,
    line: str,
) -> None:
    def upstream_proxy(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(answer)  # until dispatch hangs up, for the endless ones

    upstream = make_server(upstream_proxy)
    url = f"http://127.0.0.1:{upstream.port}"
    proxy = make_proxy([url, "127.0.0.2"], balance="round-robin")
    for _ in range(4):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"by the other link") == b"by the other link"
    rows = {row["link"]: row for row in proxy.stats()}
    assert rows[url]["state"] == "down" and line in rows[url]["reason"]
    assert rows["127.0.0.2"]["connections"] == 4
    wait_until_all_closed(proxy)
    proxy.shutdown()
    assert log.text.count(f"upstream proxy {url} failed: {line}") == 1
    assert "Traceback" not in log.text


@pytest.mark.parametrize("kind", ["pproxy-http", "microsocks"])
def test_target_that_speaks_first_is_heard_through_an_upstream(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    peer_server: Server,
    kind: str,
) -> None:
    proxy = make_proxy([make_upstream(kind).url])
    for _ in range(3):
        with client_through(proxy, (peer_server.host, peer_server.port)) as client:
            assert read_all(client) == b"127.0.0.1"


def test_proxy_link_is_named_by_its_url_without_the_password() -> None:
    (link,) = dispatch.resolve_links(["socks5://al:hunter2@127.0.0.1:1080@2"])
    assert (link.name, link.weight, link.weighted) == ("socks5://al@127.0.0.1:1080", 2, True)
    assert "hunter2" not in repr(link.current[0])


def test_proxy_password_comes_from_the_password_file_by_user() -> None:
    (link,) = dispatch.resolve_links(["socks5://al@127.0.0.1:1080"], {"al": "hunter2"})
    address = link.current[0]
    assert isinstance(address, dispatch.ProxyAddress)
    assert address.proxy.login == ("al", "hunter2")
    with pytest.raises(dispatch.AddressError, match="no password for 'al'"):
        dispatch.resolve_links(["socks5://al@127.0.0.1:1080"])


def test_proxy_reached_by_an_address_not_of_this_machine_is_refused() -> None:
    with pytest.raises(dispatch.AddressError, match="not an address of this machine"):
        dispatch.resolve_links(["socks5://127.0.0.1:1080+198.51.100.99"])


@pytest.mark.parametrize("kind", ["pproxy-socks5", "pproxy-http", "microsocks", "dante"])
@pytest.mark.parametrize("login", [None, ("al", "pw")], ids=["no login", "login"])
def test_socks_client_reaches_its_target_through_an_upstream_proxy(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    kind: str,
    login: tuple[str, str] | None,
    log: pytest.LogCaptureFixture,
) -> None:
    if kind == "dante" and login:
        pytest.skip("Dante logs in system accounts only")
    upstream = make_upstream(kind, login)
    proxy = make_proxy([upstream.url])
    for _ in range(3):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"through " + kind.encode()) == b"through " + kind.encode()
    proxy.shutdown()
    (row,) = proxy.stats()
    assert (row["link"], row["connections"], row["failed"]) == (upstream.url.replace(":pw@", "@"), 3, 0)
    assert {exchange.via.describe() for exchange in exchanges(log) if exchange.via} == {row["link"]}


def test_socks4_upstream_is_given_addresses_resolved_here(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    upstream = make_upstream("dante")
    proxy = make_proxy([upstream.url.replace("socks5://", "socks4://")])
    for host in ("127.0.0.1", "localhost"):
        with client_through(proxy, (host, echo_server.port), rdns=True) as client:
            assert echoed(client, b"four") == b"four"


def test_socks4a_upstream_is_given_the_name(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    fake_names: dict[str, list[str]],
    log: pytest.LogCaptureFixture,
) -> None:
    """Neither pproxy nor Dante takes SOCKS4a names: the upstream here is
    another dispatch, which does; its log line shows what it was asked for."""
    fake_names["far.test"] = ["127.0.0.1"]
    upstream = make_proxy(["127.0.0.1"])
    proxy = make_proxy([f"socks4a://127.0.0.1:{upstream.address[1]}"])
    with client_through(proxy, ("far.test", echo_server.port), rdns=True) as client:
        assert echoed(client, b"four a") == b"four a"
    wait_until_all_closed(upstream)
    asked = [exchange.target for exchange in exchanges(log) if exchange.via and exchange.via.ip == "127.0.0.1"]
    assert asked == [f"far.test:{echo_server.port}"]


@needs_ipv6
def test_upstream_proxy_on_an_ipv6_address(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    upstream = make_upstream("microsocks", host="::1")
    assert upstream.url.startswith("socks5://[::1]:")
    proxy = make_proxy([upstream.url])
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert echoed(client, b"six") == b"six"


def test_stalled_upstream_costs_a_client_one_hedge_not_the_timeout(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    make_server: Callable[..., Server],
    echo_server: Server,
) -> None:
    """A proxy that takes the connection and never answers its handshake is
    raced by another link after --hedge, as a dark link is."""
    released = threading.Event()
    silent = make_server(lambda conn: released.wait(TIMEOUT))
    stalled = f"socks5://127.0.0.1:{silent.port}"
    proxy = make_proxy([stalled, make_upstream("microsocks").url], balance="round-robin", hedge=0.3)
    started = time.monotonic()
    try:
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            waited = time.monotonic() - started
            assert echoed(client, b"raced") == b"raced"
    finally:
        released.set()
    assert proxy.upstream.hedge <= waited < proxy.upstream.connect_timeout
    rows = {row["link"]: row for row in proxy.stats()}
    assert rows[stalled]["state"] == "down" and rows[stalled]["reason"].startswith("no answer in 0.")


def test_checks_go_through_upstream_proxies(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    working, stopped = make_upstream("microsocks"), make_upstream("pproxy-socks5")
    stopped.stop()
    proxy = make_proxy([working.url, stopped.url], checks=[f"127.0.0.1:{echo_server.port}"], check_interval=0.1)

    def states() -> dict[str, str]:
        return {row["link"]: row["state"] for row in proxy.stats()}

    assert wait_for(lambda: states() == {working.url: "up", stopped.url: "down"})
    assert "failed 3 checks of 127.0.0.1:" in {row["link"]: row for row in proxy.stats()}[stopped.url]["reason"]


def test_measured_balancing_and_sticky_sites_treat_upstreams_as_links(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    first, second = make_upstream("microsocks"), make_upstream("pproxy-socks5")
    measured = make_proxy([first.url, second.url], balance="measured")
    for _ in range(6):
        with client_through(measured, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"m") == b"m"
    assert sorted(row["connections"] for row in measured.stats()) == [3, 3]
    sticky = make_proxy([first.url, second.url], balance="round-robin", sticky=60)
    for _ in range(4):
        with client_through(sticky, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"s") == b"s"
    assert sorted(row["connections"] for row in sticky.stats()) == [0, 4]


def test_http_connect_client_reaches_its_target_through_an_upstream_proxy(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    proxy = make_proxy([make_upstream("pproxy-http").url, make_upstream("microsocks").url])
    for _ in range(2):
        with raw_client(proxy) as client:
            client.sendall(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n\r\n".encode())
            assert read_request_head(client).startswith(b"HTTP/1.1 200 ")
            assert echoed(client, b"tunnelled") == b"tunnelled"
    assert sorted(row["connections"] for row in proxy.stats()) == [1, 1]


def test_connections_spread_over_upstreams_and_local_links_by_weight(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    first, second = make_upstream("microsocks"), make_upstream("pproxy-socks5")
    proxy = make_proxy([f"{first.url}@2", second.url, "127.0.0.2"])
    for _ in range(8):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"spread") == b"spread"
    counts = {row["link"]: row["connections"] for row in proxy.stats()}
    assert counts == {first.url: 4, second.url: 2, "127.0.0.2": 2}


def test_stopped_upstream_fails_over_within_the_hedge_and_sits_out(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
) -> None:
    stopped, running = make_upstream("microsocks"), make_upstream("pproxy-socks5", ("al", "pw"))
    # A hedge far above a connect on a busy machine: a wait for it would show.
    proxy = make_proxy([stopped.url, running.url], balance="round-robin", hedge=4.0)
    stopped.stop()
    waits = []
    for _ in range(6):
        started = time.monotonic()
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            waits.append(time.monotonic() - started)
            assert echoed(client, b"failover") == b"failover"
    assert max(waits) < proxy.upstream.hedge  # a refused connect to the proxy fails over at once
    rows = {row["link"]: row for row in proxy.stats()}
    assert rows[stopped.url]["state"] == "down" and rows[stopped.url]["connections"] == 0
    assert rows["socks5://al@" + running.url.partition("@")[2]]["connections"] == 6
    assert log.text.count(f"upstream proxy {stopped.url} failed: the upstream proxy: Connection refused") == 1
    assert log.text.count(f"sitting out: {stopped.url}: ") == 1


def test_refused_login_is_a_link_failure_logged_once_without_the_password(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
) -> None:
    strict = make_upstream("microsocks", ("al", "right"))
    wrong = strict.url.replace(":right@", ":hunter2@")
    proxy = make_proxy([wrong, "127.0.0.2"], balance="round-robin")
    for _ in range(4):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"by the other link") == b"by the other link"
    name = wrong.replace(":hunter2", "")
    rows = {row["link"]: row for row in proxy.stats()}
    assert rows[name]["state"] == "down" and "refused the login" in rows[name]["reason"]
    assert rows["127.0.0.2"]["connections"] == 4
    assert log.text.count(f"upstream proxy {name} failed: the upstream proxy refused the login") == 1
    assert "hunter2" not in log.text


def test_refused_login_of_the_only_link_gets_a_failure_reply(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
) -> None:
    strict = make_upstream("pproxy-http", ("al", "right"))
    proxy = make_proxy([strict.url.replace(":right@", ":hunter2@")])
    for _ in range(2):
        assert socks5_code_for(proxy, socks5_request("127.0.0.1", echo_server.port)) == Reply.GENERAL_FAILURE
        status, _, _ = http_exchange(proxy, f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n\r\n".encode())
        assert status == HTTPStatus.BAD_GATEWAY
    wait_until_all_closed(proxy)
    proxy.shutdown()
    assert log.text.count("failed: the upstream proxy refused the login") == 1
    assert [exchange.result for exchange in exchanges(log)].count("the upstream proxy refused the login") == 2
    assert "hunter2" not in log.text


def test_target_refusal_through_an_upstream_is_the_targets_answer(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    log: pytest.LogCaptureFixture,
) -> None:
    upstream = make_upstream("microsocks")
    proxy = make_proxy([upstream.url, "127.0.0.2"], balance="round-robin")
    assert socks5_code_for(proxy, socks5_request("127.0.0.1", refused_port())) == Reply.CONNECTION_REFUSED
    rows = {row["link"]: row for row in proxy.stats()}
    assert (rows[upstream.url]["failed"], rows["127.0.0.2"]["failed"]) == (1, 0)  # not tried elsewhere
    assert [row["state"] for row in rows.values()] == ["up", "up"]
    assert "upstream proxy" not in log.text.replace("(the upstream proxy says)", "")


def test_socks5h_upstream_is_given_the_name(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    resolve = dispatch.Resolver.resolve

    def recording(self: dispatch.Resolver, host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        return resolve(self, host, *args, **kwargs)

    # The one resolver of every upstream connect, seen from outside.
    monkeypatch.setattr(dispatch.Resolver, "resolve", recording)
    upstream = make_upstream("microsocks")
    proxy = make_proxy([upstream.url.replace("socks5://", "socks5h://")])
    with client_through(proxy, ("localhost", echo_server.port), rdns=True) as client:
        assert echoed(client, b"named") == b"named"
    assert "localhost" not in asked  # microsocks resolved it


def test_socks5_upstream_is_given_the_address_resolved_here(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    fake_names: dict[str, list[str]],
) -> None:
    fake_names["only-here.test"] = ["127.0.0.1"]  # microsocks cannot resolve it
    proxy = make_proxy([make_upstream("microsocks").url])
    with client_through(proxy, ("only-here.test", echo_server.port), rdns=True) as client:
        assert echoed(client, b"resolved here") == b"resolved here"


def test_socks5_upstreams_names_are_asked_of_the_name_server_and_counted_on_its_row(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    dns_server: DnsServer,
    echo_server: Server,
) -> None:
    dns_server.names["upstream.test"] = ["127.0.0.1", "::1"]  # microsocks cannot resolve it
    upstream = make_upstream("microsocks")
    proxy = make_proxy([upstream.url], dns=[dns_server.address])
    for _ in range(2):
        with client_through(proxy, ("upstream.test", echo_server.port), rdns=True) as client:
            assert echoed(client, b"asked here") == b"asked here"
    asked = dns_server.asked("upstream.test")
    assert sorted((kind, transport) for _, kind, transport, _ in asked) == [("A", "udp"), ("AAAA", "udp")]
    (row,) = proxy.stats()
    assert (row["link"], row["dns_queries"], row["dns_cache_hits"], row["dns_failures"]) == (
        upstream.url,
        len(asked),
        1,
        0,
    )


def test_name_not_resolvable_here_goes_to_the_upstream_that_takes_names(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Tor's .onion names: a local link cannot reach them, a socks5h upstream can."""
    resolve = dispatch.Resolver.resolve

    def unknown_here(self: dispatch.Resolver, host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            raise dispatch.SocksError(dispatch.Reply.HOST_UNREACHABLE, "localhost: no such name")
        return resolve(self, host, *args, **kwargs)

    # The one resolver of every upstream connect (whose localhost is loopback).
    monkeypatch.setattr(dispatch.Resolver, "resolve", unknown_here)
    upstream = make_upstream("pproxy-socks5")
    proxy = make_proxy(["127.0.0.2", upstream.url.replace("socks5://", "socks5h://") + "@backup"])
    with client_through(proxy, ("localhost", echo_server.port), rdns=True) as client:
        assert echoed(client, b"far name") == b"far name"
    with client_through(proxy, ("127.0.0.1", echo_server.port)) as client:  # an address: the local link
        assert echoed(client, b"near") == b"near"
    rows = {row["link"]: row["connections"] for row in proxy.stats()}
    assert list(rows.values()) == [1, 1]


def test_name_too_long_for_a_socks5_upstream_gets_a_failure_reply(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    log: pytest.LogCaptureFixture,
) -> None:
    """SOCKS4a carries names of any length; HTTP refuses those DNS cannot carry (400)."""
    proxy = make_proxy([make_upstream("microsocks").url.replace("socks5://", "socks5h://")])
    name = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".test"  # 261 bytes
    with raw_client(proxy) as sock:
        sock.sendall(socks4_request("", 443, host=name))
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
    status, _, _ = http_exchange(proxy, f"CONNECT {name}:443 HTTP/1.1\r\n\r\n".encode())
    assert status == HTTPStatus.BAD_REQUEST
    wait_until_all_closed(proxy)
    socks4a, http = [e.result for e in exchanges(log) if e.target == f"{name}:443"]
    assert socks4a == "a name of more than 255 bytes cannot go to SOCKS5" and http.startswith("400 bad host")
    assert "Traceback" not in log.text


def test_plain_http_goes_through_a_socks_upstream_as_a_tunnel(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    origin: str,
) -> None:
    proxy = make_proxy([make_upstream("microsocks").url])
    assert curl("-x", proxy_url(proxy), origin + "/hello").startswith("GET /hello")


def test_plain_http_goes_to_an_http_upstream_in_absolute_form_with_its_login(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    origin: str,
) -> None:
    upstream = make_upstream("pproxy-http", ("al", "pw"))
    proxy = make_proxy([upstream.url])
    assert curl("-x", proxy_url(proxy), origin + "/a", origin + "/b").count("GET /") == 2
    (row,) = proxy.stats()
    assert row["connections"] == 1  # one kept connection, no CONNECT


def test_plain_http_refused_login_at_an_http_upstream_is_a_bad_gateway_logged_once(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    origin: str,
    log: pytest.LogCaptureFixture,
) -> None:
    strict = make_upstream("pproxy-http", ("al", "right"))
    wrong = strict.url.replace(":right@", ":hunter2@")
    proxy = make_proxy([wrong, "127.0.0.2"], balance="round-robin")
    request = f"GET {origin}/page HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    status, headers, _ = http_exchange(proxy, request)
    assert status == HTTPStatus.BAD_GATEWAY
    assert "proxy-authenticate" not in {name.lower() for name in headers}
    assert [http_exchange(proxy, request)[0] for _ in range(3)] == [HTTPStatus.OK] * 3  # by the other link
    name = wrong.replace(":hunter2", "")
    assert {row["link"]: row["state"] for row in proxy.stats()} == {name: "down", "127.0.0.2": "up"}
    assert log.text.count("failed: the upstream proxy refused the login") == 1
    assert "hunter2" not in log.text


def test_plain_http_request_line_to_an_http_upstream(
    make_proxy: Callable[..., Dispatcher],
    make_server: Callable[..., Server],
) -> None:
    """What an HTTP upstream is sent, as it sees it."""
    heads: list[bytes] = []

    def upstream_proxy(conn: socket.socket) -> None:
        heads.append(read_request_head(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    upstream = make_server(upstream_proxy)
    proxy = make_proxy([f"http://al:pw@127.0.0.1:{upstream.port}"])
    status, _, body = http_exchange(proxy, b"GET http://example.test:8080/x?y HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert (status, body) == (200, b"ok")
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == "GET http://example.test:8080/x?y HTTP/1.1"
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'al:pw').decode()}" in lines


def udp_associate_code(proxy: Dispatcher) -> int:
    """The reply code to a UDP ASSOCIATE from anywhere (0.0.0.0:0)."""
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request("0.0.0.0", 0, command=3))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        return socks5_reply(sock)[0]


def test_udp_goes_through_a_socks5_upstreams_own_association(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    udp_echo: UdpServer,
    log: pytest.LogCaptureFixture,
) -> None:
    upstream = make_upstream("dante")
    proxy = make_proxy([upstream.url])
    with udp_client(proxy) as client:
        for index in range(20):
            payload = b"datagram %d" % index
            client.sendto(payload, (udp_echo.host, udp_echo.port))
            assert client.recvfrom(65535) == (payload, (udp_echo.host, udp_echo.port))
    proxy.shutdown()
    (row,) = proxy.stats()
    assert row["bytes_up"] == row["bytes_down"] == sum(len(b"datagram %d" % i) for i in range(20))
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == "UDP"]
    assert exchange.via.describe() == upstream.url


def test_udp_through_a_stopped_upstream_is_refused_and_logged_once(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    log: pytest.LogCaptureFixture,
) -> None:
    upstream = make_upstream("dante")
    proxy = make_proxy([upstream.url])
    upstream.stop()
    for _ in range(2):
        assert udp_associate_code(proxy) == Reply.HOST_UNREACHABLE
    assert log.text.count(f"upstream proxy {upstream.url} failed: the upstream proxy: Connection refused") == 1


def test_udp_through_a_stopped_upstream_puts_it_out_and_the_next_associations_go_by_another_link(
    make_proxy: Callable[..., Dispatcher], make_upstream: Callable[..., UpstreamServer], log: pytest.LogCaptureFixture
) -> None:
    upstream = make_upstream("dante")
    proxy = make_proxy([upstream.url, "127.0.0.1"], balance="round-robin")
    upstream.stop()
    codes = []
    for _ in range(6):
        codes.append(udp_associate_code(proxy))
    assert codes.count(Reply.SUCCEEDED) >= 5  # one failure at most: the link is out after it
    assert f"sitting out: {upstream.url}: the upstream proxy: Connection refused" in log.text
    (row,) = [row for row in proxy.stats() if row["link"] == upstream.url]
    assert (row["state"], row["failed"]) == ("down", 1)


@pytest.mark.parametrize(
    ("proxy_ip", "named", "relay"),
    [
        ("203.0.113.5", ("0.0.0.0", 5000), ("203.0.113.5", 5000)),  # the proxy's own address
        ("203.0.113.5", ("::", 5000), ("203.0.113.5", 5000)),
        ("203.0.113.5", ("198.51.100.7", 5001), ("198.51.100.7", 5001)),  # a relay host of its own
        ("127.0.0.1", ("127.0.0.1", 5002), ("127.0.0.1", 5002)),  # a proxy on loopback, its relay there too
        ("::1", ("127.0.0.1", 5003), ("127.0.0.1", 5003)),
        # A proxy on a dual-stack socket names its IPv4 address mapped: the
        # datagrams come from the IPv4 one, and are told apart by it.
        ("127.0.0.1", ("::ffff:127.0.0.1", 5004), ("127.0.0.1", 5004)),
    ],
)
def test_upstream_relay_address_is_the_one_named_or_the_proxys_own(
    proxy_ip: str, named: tuple[str, int], relay: tuple[str, int]
) -> None:
    assert dispatch.upstream_relay_address(proxy_ip, named) == relay


@pytest.mark.parametrize(
    ("named", "why"),
    [
        (("127.0.0.1", 5000), "127.0.0.1:5000 on this machine's loopback, while the proxy is not on loopback"),
        (("127.9.9.9", 5000), "127.9.9.9:5000 on this machine's loopback"),
        (("::1", 5000), "[::1]:5000 on this machine's loopback"),
        (("::ffff:127.0.0.1", 5000), "[::ffff:127.0.0.1]:5000 on this machine's loopback"),
        (("198.51.100.7", 0), "198.51.100.7:0 at port 0"),
        (("0.0.0.0", 0), "0.0.0.0:0 at port 0"),
        (("224.0.0.1", 5000), "224.0.0.1:5000 at a multicast or broadcast address"),
        (("255.255.255.255", 5000), "255.255.255.255:5000 at a multicast or broadcast address"),
        (("relay.example", 5000), "by a name ('relay.example'), not an address"),
    ],
)
def test_upstream_relay_address_refuses_loopback_from_a_proxy_elsewhere(named: tuple[str, int], why: str) -> None:
    with pytest.raises(dispatch.ProxyLinkError, match=re.escape(f"the upstream proxy named its UDP relay {why}")):
        dispatch.upstream_relay_address("203.0.113.5", named)


def test_udp_through_an_upstream_that_names_no_usable_relay_is_refused_in_one_line(
    make_proxy: Callable[..., Dispatcher], make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    def upstream_proxy(conn: socket.socket) -> None:
        assert recv_exactly(conn, 3) == b"\x05\x01\x00"
        conn.sendall(b"\x05\x00")
        recv_exactly(conn, 10)  # UDP ASSOCIATE 0.0.0.0:0
        conn.sendall(b"\x05\x00\x00" + dispatch.encode_socks5_address("relay.example", 5000))
        conn.recv(1)  # held open until dispatch hangs up

    upstream = make_server(upstream_proxy)
    url = f"socks5://127.0.0.1:{upstream.port}"
    proxy = make_proxy([url])
    for _ in range(2):
        assert udp_associate_code(proxy) == Reply.GENERAL_FAILURE
    wait_until_all_closed(proxy)
    proxy.shutdown()
    assert log.text.count(f"upstream proxy {url} failed: the upstream proxy named its UDP relay by a name") == 1
    assert "Traceback" not in log.text


def test_udp_through_an_upstream_relay_named_mapped_comes_back_and_what_it_cannot_pass_is_counted(
    make_proxy: Callable[..., Dispatcher], make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    """A proxy on a dual-stack socket names its relay ::ffff:127.0.0.1; the
    relay answers each datagram with a fragment (dropped, and counted so)
    and then the datagram itself."""
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    relay.settimeout(TIMEOUT)

    def upstream_proxy(conn: socket.socket) -> None:
        assert recv_exactly(conn, 3) == b"\x05\x01\x00"
        conn.sendall(b"\x05\x00")
        recv_exactly(conn, 10)  # UDP ASSOCIATE 0.0.0.0:0
        conn.sendall(b"\x05\x00\x00" + dispatch.encode_socks5_address("::ffff:127.0.0.1", relay.getsockname()[1]))
        datagram, sender = relay.recvfrom(65535)
        relay.sendto(b"\x00\x00\x01" + datagram[3:], sender)  # a fragment
        relay.sendto(datagram, sender)
        conn.recv(1)  # held open until dispatch hangs up

    with relay:
        proxy = make_proxy([f"socks5://127.0.0.1:{make_server(upstream_proxy).port}"])
        with udp_client(proxy) as client:
            client.sendto(b"through", ("192.0.2.9", 7))
            assert client.recvfrom(65535) == (b"through", ("192.0.2.9", 7))
        wait_until_all_closed(proxy)
    (exchange,) = [e for e in exchanges(log) if e.target == "UDP"]
    assert exchange.result == "ok, 1 datagrams up, 1 down, 1 dropped"


def test_udp_through_an_http_upstream_is_refused_and_the_log_says_why(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    log: pytest.LogCaptureFixture,
) -> None:
    upstream = make_upstream("pproxy-http")
    proxy = make_proxy([upstream.url])
    assert udp_associate_code(proxy) == Reply.COMMAND_NOT_SUPPORTED
    wait_until_all_closed(proxy)
    proxy.shutdown()
    (exchange,) = exchanges(log)
    assert exchange.result == f"no link carries UDP: {upstream.url} cannot (only SOCKS5 proxies relay UDP)"


def test_udp_takes_the_link_that_carries_it(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    udp_sender: UdpServer,
) -> None:
    proxy = make_proxy([make_upstream("pproxy-http").url, "127.0.0.3"])
    for _ in range(3):
        with udp_client(proxy) as client:
            client.sendto(b"who am I", (udp_sender.host, udp_sender.port))
            assert client.recv(100) == b"127.0.0.3"


def test_proxy_reached_by_a_chosen_local_address(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
) -> None:
    """Dante here takes clients from 127.0.0.2 alone: the link by 127.0.0.2
    gets through, the one by 127.0.0.3 is refused."""
    upstream = make_upstream("dante", clients="127.0.0.2/32")
    proxy = make_proxy([f"{upstream.url}+127.0.0.2", f"{upstream.url}+127.0.0.3"], balance="round-robin")
    for _ in range(4):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"by .2") == b"by .2"
    rows = {row["link"]: row for row in proxy.stats()}
    assert rows[f"{upstream.url}+127.0.0.2"]["connections"] == 4
    assert rows[f"{upstream.url}+127.0.0.3"]["state"] == "down"


def test_proxy_retest_brings_a_restarted_upstream_back(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
) -> None:
    flaky = make_upstream("microsocks")
    proxy = make_proxy([flaky.url, "127.0.0.2"], balance="round-robin")
    flaky.stop()
    for _ in range(2):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert echoed(client, b"x") == b"x"
    again = UpstreamServer(
        "microsocks", [MICROSOCKS, "-i", "127.0.0.1", "-p", str(flaky.port)], flaky.url, flaky.port, flaky.output
    )
    try:
        assert wait_for(lambda: f"back in use: {flaky.url} (a retest reached 127.0.0.1:{echo_server.port})" in log.text)
        for _ in range(2):  # in turns: one of them goes through it
            with client_through(proxy, (echo_server.host, echo_server.port)) as client:
                assert echoed(client, b"x") == b"x"
        assert f"upstream proxy {flaky.url} works again" in log.text
    finally:
        again.stop()


def test_passwords_of_upstreams_never_show(
    make_proxy: Callable[..., Dispatcher],
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    log: pytest.LogCaptureFixture,
) -> None:
    upstream = make_upstream("microsocks", ("al", "hunter2"))
    proxy = make_proxy([upstream.url, upstream.url.replace(":hunter2@", ":hunter3@") + "+127.0.0.2"])
    for _ in range(4):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            echoed(client, b"secret?")
    shown = [
        log.text,
        json.dumps(proxy.stats()),
        dispatch.format_stats(proxy.stats()),
        *(
            http_exchange(proxy, f"GET {page} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())[2].decode()
            for page in ("/", "/stats.json", "/metrics")
        ),
    ]
    for text in shown:
        assert "hunter" not in text
    assert "socks5://al@127.0.0.1" in shown[3]


# ---------------------------------------------------------------------------
# Connect: reply codes of connect errors, failover
# ---------------------------------------------------------------------------


# Reply codes of connect errors ---------------------------------------------


def test_refused_target_gets_reply_05(proxy: Dispatcher) -> None:
    assert socks5_code_for(proxy, socks5_request("127.0.0.1", refused_port())) == Reply.CONNECTION_REFUSED


def test_unreachable_network_gets_reply_03(proxy: Dispatcher) -> None:
    # TCP to a multicast group fails with ENETUNREACH before any packet leaves.
    assert socks5_code_for(proxy, socks5_request("224.0.0.1", 80)) == Reply.NETWORK_UNREACHABLE


def test_connect_timeout_gets_reply_06(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(connect_timeout=0.3)
    with unanswered_address() as (host, port):
        assert socks5_code_for(proxy, socks5_request(host, port)) == Reply.TTL_EXPIRED


# A name with many addresses -----------------------------------------------


def targets_tried(log: pytest.LogCaptureFixture) -> list[str]:
    """The targets of the connects started so far, as the debug log names them."""
    return [match[1] for r in log.records if (match := re.match(r"connecting to (\S+) from ", r.getMessage()))]


def test_a_name_with_many_addresses_has_the_first_25_tried(
    make_proxy: Callable[..., Dispatcher], fake_names: dict[str, list[str]], log: pytest.LogCaptureFixture
) -> None:
    port = refused_port()
    fake_names["many.test"] = [f"127.67.0.{n}" for n in range(1, 41)]
    proxy = make_proxy()
    log.set_level(logging.DEBUG, logger="dispatch")
    assert socks5_code_for(proxy, socks5_request("many.test", port)) == Reply.CONNECTION_REFUSED
    assert targets_tried(log) == [f"127.67.0.{n}:{port}" for n in range(1, dispatch.MAX_CONNECT_ADDRESSES + 1)]


def test_a_name_with_many_silent_addresses_is_given_up_after_three_connect_timeouts(
    make_proxy: Callable[..., Dispatcher], fake_names: dict[str, list[str]], log: pytest.LogCaptureFixture
) -> None:
    """Each address waits out the connect timeout (1 s): 12 would take 12 s."""
    ips = [f"127.66.0.{n}" for n in range(1, 13)]
    fake_names["silent.test"] = ips
    proxy = make_proxy(connect_timeout=1.0)
    with unanswered_addresses(ips) as port:
        started = time.monotonic()
        assert socks5_code_for(proxy, socks5_request("silent.test", port)) == Reply.TTL_EXPIRED
        assert time.monotonic() - started < dispatch.CONNECT_TIMEOUTS_IN_ALL * 1.0 + TIMEOUT / 2
    proxy.shutdown()
    (exchange,) = [e for e in exchanges(log) if e.target == f"silent.test:{port}"]
    assert re.fullmatch(r"timed out: [1-4] of 12 addresses tried in 3 s", exchange.result)


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("protocol", ["socks5", "http"])
def test_a_client_that_hangs_up_while_connecting_stops_the_attempts(
    make_proxy: Callable[..., Dispatcher],
    fake_names: dict[str, list[str]],
    log: pytest.LogCaptureFixture,
    protocol: str,
    ending: str,
) -> None:
    """A connect timeout of 20 s, and 5 silent addresses: the proxy learns
    at once that nobody waits any more, and tries nothing further."""
    ips = [f"127.66.0.{n}" for n in range(1, 6)]
    fake_names["silent.test"] = ips
    proxy = make_proxy(connect_timeout=20.0)
    log.set_level(logging.DEBUG, logger="dispatch")
    with unanswered_addresses(ips) as port:
        request = {
            "socks5": b"\x05\x01\x00" + socks5_request("silent.test", port),
            "http": f"CONNECT silent.test:{port} HTTP/1.1\r\nHost: silent.test:{port}\r\n\r\n".encode(),
        }[protocol]
        with raw_client(proxy) as sock:
            sock.sendall(request)
            assert wait_for(lambda: targets_tried(log) == [f"127.66.0.1:{port}"])
            if ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert wait_for(lambda: proxy.open_connections() == 0)
        assert targets_tried(log) == [f"127.66.0.1:{port}"]
    proxy.shutdown()
    (exchange,) = [e for e in exchanges(log) if e.target == f"silent.test:{port}"]
    assert exchange.result == "client hung up"


def test_a_plain_http_request_whose_client_closes_its_side_after_it_is_served_after_a_slow_connect(
    make_proxy: Callable[..., Dispatcher], origin: str, fake_names: dict[str, list[str]]
) -> None:
    """An HTTP/1.0 client may close its sending side once its request is
    sent: while the first address of the name is silent, that is no hang-up."""
    port = int(origin.rsplit(":", 1)[1])
    fake_names["slow.test"] = ["127.66.0.9", "127.0.0.1"]
    proxy = make_proxy(connect_timeout=1.0)
    with socket.socket() as full:
        full.bind(("127.66.0.9", port))
        full.listen(0)
        with socket.create_connection(("127.66.0.9", port), timeout=TIMEOUT), raw_client(proxy) as sock:
            sock.sendall(f"GET http://slow.test:{port}/seen HTTP/1.0\r\nHost: slow.test:{port}\r\n\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
            status, _, _ = read_response(sock)
    assert status == 200


@pytest.mark.parametrize("protocol", ["socks5", "socks4", "http"])
def test_a_client_that_sends_data_ahead_and_closes_its_side_during_a_slow_connect_is_served(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, fake_names: dict[str, list[str]], protocol: str
) -> None:
    """Its EOF ends what it has to send, not its wait for the answer: the
    data reaches the target however long the connect takes."""
    fake_names["slow.test"] = ["127.66.0.9", echo_server.host]
    proxy = make_proxy(connect_timeout=1.0)
    port = echo_server.port
    request, replied = {
        "socks5": (b"\x05\x01\x00" + socks5_request("slow.test", port), b"\x05\x00\x05\x00"),
        "socks4": (socks4_request("", port, host="slow.test"), b"\x00\x5a"),
        "http": (f"CONNECT slow.test:{port} HTTP/1.1\r\nHost: slow.test:{port}\r\n\r\n".encode(), b""),
    }[protocol]
    with socket.socket() as full:
        full.bind(("127.66.0.9", port))
        full.listen(0)
        with socket.create_connection(("127.66.0.9", port), timeout=TIMEOUT), raw_client(proxy) as sock:
            sock.sendall(request + b"sent ahead")
            sock.shutdown(socket.SHUT_WR)
            if protocol == "http":
                assert read_response(sock)[::2] == (200, b"sent ahead")
            else:
                reply = recv_exactly(sock, {"socks5": 12, "socks4": 8}[protocol])
                assert reply.startswith(replied)
                assert read_all(sock) == b"sent ahead"


@needs_ipv6
def test_ipv6_target_without_ipv6_local_address_gets_reply_08(proxy: Dispatcher, log: pytest.LogCaptureFixture) -> None:
    assert socks5_code_for(proxy, socks5_request("::1", 80)) == Reply.ADDRESS_TYPE_NOT_SUPPORTED
    proxy.shutdown()
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == "[::1]:80"]
    assert exchange.result == "no IPv6 local address to dispatch to"


@needs_ipv6
def test_socks4_without_ipv4_local_address_gets_5b(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(["::1"])
    with raw_client(proxy) as sock:
        sock.sendall(socks4_request(echo_server.host, echo_server.port))
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
    proxy.shutdown()
    target = f"{echo_server.host}:{echo_server.port}"
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == target]
    assert exchange.result == "no IPv4 local address to dispatch to"


# Targets only this machine may reach ---------------------------------------


def test_a_client_of_another_machine_is_refused_this_machines_own_targets_by_address_and_by_name(
    proxy: Dispatcher, echo_server: Server, fake_names: dict[str, list[str]], log: pytest.LogCaptureFixture
) -> None:
    """Clients of another machine come only in the lab (test_lab.py); here,
    as Session.connect asks for one."""
    fake_names["rebound.example"] = ["127.0.0.1"]
    for host, named in (("127.0.0.1", "127.0.0.1"), ("rebound.example", "rebound.example (127.0.0.1)")):
        with pytest.raises(dispatch.SocksError) as refusal:
            proxy.upstream.connect(host, echo_server.port, client="192.0.2.50")
        assert refusal.value.reply == Reply.NOT_ALLOWED
        assert str(refusal.value).startswith(f"{named}: only this machine may reach it")
    assert "refused 192.0.2.50 the target 127.0.0.1: only this machine may reach it" in log.text
    assert proxy.balancer.taken(proxy.links.addresses[0]) == 0  # nothing held
    with proxy.upstream.connect("rebound.example", echo_server.port, client="127.0.0.1") as lease:
        assert lease.sock.getpeername()[:2] == (echo_server.host, echo_server.port)


def test_a_client_of_another_machine_may_ask_for_the_proxy_itself(make_proxy: Callable[..., Dispatcher]) -> None:
    """A browser set to use the proxy asks it for its own pages in absolute
    form; a tunnel to it is refused (through it, the client would speak to
    the proxy from this machine's own address)."""
    for host in ("127.0.0.1", "0.0.0.0"):
        proxy = make_proxy(host=host, allow=["127.0.0.0/8"])
        port = proxy.address[1]
        with proxy.upstream.connect("127.0.0.1", port, client="192.0.2.50", absolute_form=True) as lease:
            lease.sock.settimeout(TIMEOUT)
            lease.sock.sendall(b"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(lease.sock)[0] == 200
        with pytest.raises(dispatch.SocksError, match="only this machine may reach it"):
            proxy.upstream.connect("127.0.0.1", port, client="192.0.2.50")
        with pytest.raises(dispatch.SocksError):
            proxy.upstream.connect("127.0.0.1", refused_port(), client="192.0.2.50", absolute_form=True)


@pytest.mark.parametrize(
    ("listening", "target", "itself"),
    [
        ("0.0.0.0", "127.0.0.1", True),
        ("0.0.0.0", "::1", False),  # 0.0.0.0 takes IPv4 alone: another program's port
        ("::", "::1", True),
        ("::", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
    ],
)
def test_only_the_listeners_own_family_and_address_are_the_proxy_itself(
    listening: str, target: str, itself: bool
) -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    upstream.listening = (listening, 1080)
    assert upstream.refuses("192.0.2.50", target, 1080, absolute_form=True) is not itself
    assert upstream.refuses("192.0.2.50", target, 1080)  # a tunnel, or a datagram
    assert upstream.refuses("192.0.2.50", target, 1081, absolute_form=True)


def test_a_name_with_an_address_of_this_machine_among_others_is_given_the_others() -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    targets = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "192.0.2.7"), (socket.AF_INET6, "::1")]
    target = ("rebound.example", 80)
    assert upstream._allowed("192.168.1.5", target, False, targets, None) == ([targets[1]], None)
    assert upstream._allowed("127.0.0.1", target, False, targets, None) == (targets, None)


def test_refused_targets_are_logged_at_most_once_a_second_with_a_count(
    monkeypatch: pytest.MonkeyPatch, log: pytest.LogCaptureFixture
) -> None:
    upstream = dispatch.Upstream(dispatch.Balancer([], dispatch.Health()), dispatch.Meter())
    for _ in range(5):
        with pytest.raises(dispatch.SocksError):
            upstream.admit_target("192.168.1.5", "localhost", "127.0.0.1", 80)
    monkeypatch.setattr(dispatch, "TARGET_REFUSAL_LOG_INTERVAL", 0.0)
    with pytest.raises(dispatch.SocksError):
        upstream.admit_target("192.168.1.5", "169.254.169.254", "169.254.169.254", 80)
    lines = [record.message for record in log.records if record.message.startswith("refused ")]
    assert lines == [
        "refused 192.168.1.5 the target localhost (127.0.0.1): only this machine may reach it (loopback, "
        "link-local or an address of its own); --allow-target opens it",
        "refused 192.168.1.5 the target 169.254.169.254: only this machine may reach it (loopback, "
        "link-local or an address of its own); --allow-target opens it (4 more refused since the last such line)",
    ]


# Failover, end to end ------------------------------------------------------


def test_link_failure_fails_over_and_the_address_is_retested_not_tried_by_clients(
    make_proxy: Callable[..., Dispatcher],
    peer_server: Server,
    fake_interfaces: FakeInterfaces,
    log: pytest.LogCaptureFixture,
) -> None:
    # 198.51.100.99 is not an address of this machine: binding it fails with
    # EADDRNOTAVAIL, as when an interface loses its address.
    fake_interfaces.interfaces.update(gone0=["198.51.100.99"], fake1=["127.0.0.3"])
    proxy = make_proxy(["gone0", "fake1"], cooldown=1.5)
    log.set_level(logging.DEBUG, logger="dispatch")
    assert peers_seen(proxy, peer_server, 4) == ["127.0.0.3"] * 4
    assert log.text.count("sitting out: 198.51.100.99 (gone0): ") == 1
    assert "retested in 1 s" in log.text
    # The background retests try it, 1 s after the failure, then at most
    # the cooldown apart; clients keep going by the other link.
    assert wait_for(lambda: log.text.count("retest of 198.51.100.99 (gone0) failed") >= 2)
    assert peers_seen(proxy, peer_server, 2) == ["127.0.0.3"] * 2
    rows = {row["ip"]: row for row in proxy.stats()}
    assert (rows["198.51.100.99"]["connections"], rows["198.51.100.99"]["failed"]) == (0, 1)  # one client's try
    assert rows["198.51.100.99"]["state"] == "down"


def test_failure_through_every_address_makes_none_sit_out(
    make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture
) -> None:
    """A target no link can reach says nothing against the links."""
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    for _ in range(2):
        # TCP to a multicast group fails with ENETUNREACH from any address.
        assert socks5_code_for(proxy, socks5_request("224.0.0.1", 80)) == Reply.NETWORK_UNREACHABLE
    assert "sitting out" not in log.text
    assert [row["state"] for row in proxy.stats()] == ["up", "up"]


def test_a_link_out_after_one_silent_site_is_back_by_a_retest_of_a_site_it_reaches(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], connect_timeout=0.3, cooldown=2)
    blocked, live = proxy.addresses
    with unanswered_address() as silent:
        # Silent through 127.0.0.2 where 127.0.0.3 got an answer: out.
        proxy.health.connected_through(live, [(blocked, TimeoutError())], silent)
        assert proxy.health.is_out(blocked)
        # A client reaches another site, by the other link.
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"reached") == b"reached"
        # The retests of the silent site fail; one of the site reached gets through.
        assert wait_for(lambda: not proxy.health.is_out(blocked))
    assert f"back in use: 127.0.0.2 (a retest reached 127.0.0.1:{echo_server.port})" in log.text


def test_a_link_out_after_a_silent_site_is_retested_first_at_a_site_another_link_reached(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    """The first retest, 1 s after the failure, goes to the site reached
    since, not to the silent one for the whole connect timeout (5 s)."""
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    blocked, live = proxy.addresses
    with unanswered_address() as silent:
        proxy.health.connected_through(live, [(blocked, TimeoutError())], silent)
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"reached") == b"reached"
        reached = time.monotonic()
        assert wait_for(lambda: not proxy.health.is_out(blocked))
        assert time.monotonic() - reached < 4


def test_a_site_reached_while_a_link_is_out_brings_its_next_retest_forward(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    """Retests of the only site known fail further and further apart (1,
    2, 4, then 8 s); a site reached by another link is tried within about
    a second, not after the 8 s."""
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], connect_timeout=0.5)
    log.set_level(logging.DEBUG, logger="dispatch")
    blocked, live = proxy.addresses
    with unanswered_address() as silent:
        proxy.health.connected_through(live, [(blocked, TimeoutError())], silent)
        failed = re.compile(r"retest of 127\.0\.0\.2( \(lo\))? failed")
        assert wait_for(lambda: len(failed.findall(log.text)) >= 3, TIMEOUT * 2)
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"reached") == b"reached"
        reached = time.monotonic()
        assert wait_for(lambda: not proxy.health.is_out(blocked))
        assert time.monotonic() - reached < 4
    assert f"back in use: 127.0.0.2 (a retest reached 127.0.0.1:{echo_server.port})" in log.text


def test_a_retest_that_raises_is_logged_and_runs_again(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    dark, live = proxy.addresses
    probe = proxy.upstream.probe
    raised: list[bool] = []

    def probe_failing_once(local: dispatch.LocalAddress, target: tuple[str, int], timeout: float) -> OSError | None:
        if not raised:
            raised.append(True)
            raise OverflowError("timeout is too large")
        return probe(local, target, timeout)

    monkeypatch.setattr(proxy.upstream, "probe", probe_failing_once)
    proxy.health.connected_through(live, [(dark, TimeoutError())], (echo_server.host, echo_server.port))
    assert wait_for(lambda: not proxy.health.is_out(dark))
    assert raised == [True]
    assert re.search(r"the retest of 127\.0\.0\.2( \(lo\))? failed", log.text)
    assert "back in use: 127.0.0.2" in log.text


def test_a_check_that_raises_is_logged_as_a_failed_check(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy(["127.0.0.2"], start=False, checks=[f"{echo_server.host}:{echo_server.port}"])

    def probe_raising(local: dispatch.LocalAddress, target: tuple[str, int], timeout: float) -> OSError | None:
        raise OverflowError("timeout is too large")

    monkeypatch.setattr(proxy.upstream, "probe", probe_raising)
    # One round in this thread, as the background task starts it (private: it has no public seam).
    assert proxy._checking.acquire(blocking=False)
    proxy._check_round()
    assert re.search(r"the check of 127\.0\.0\.2( \(lo\))? failed", log.text)
    assert "Traceback" in log.text  # the exception itself is in the log, once
    assert not proxy._checking.locked()


def test_refusal_is_the_targets_answer_not_a_failover(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    assert socks5_code_for(proxy, socks5_request("127.0.0.1", refused_port())) == Reply.CONNECTION_REFUSED
    # Only the first address was tried: one failed connect, none through the other.
    tried = {row["ip"]: (row["failed"], row["connections"]) for row in proxy.stats()}
    assert tried == {"127.0.0.2": (1, 0), "127.0.0.3": (0, 0)}


# ---------------------------------------------------------------------------
# Relay: half-closes, bulk, byte-exact copies
# ---------------------------------------------------------------------------


def test_client_half_close_is_passed_on(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    """The client finishes sending; the server still answers after that EOF."""

    def answer_after_eof(conn: socket.socket) -> None:
        received = read_all(conn)
        conn.sendall(b"got %d bytes" % len(received))

    server = make_server(answer_after_eof)
    with client_through(proxy, (server.host, server.port)) as client:
        assert round_trip(client, b"x" * 1000) == b"got 1000 bytes"


def test_server_half_close_is_passed_on(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    """The server finishes first; the client can still send, and is heard."""
    heard: list[bytes] = []

    def speak_first(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        heard.append(read_all(conn))

    server = make_server(speak_first)
    with client_through(proxy, (server.host, server.port)) as client:
        assert read_all(client) == b"banner"
        client.sendall(b"after your EOF")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    assert wait_for(lambda: bool(heard))
    assert heard == [b"after your EOF"]


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_megabytes_each_way_arrive_intact(
    splice: bool, proxy: Dispatcher, echo_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bulk transfers move to splice() on Linux; both ways of copying are exact."""
    # Private: the platform probe has no public face, and only it chooses the copy.
    if splice and not dispatch._CAN_SPLICE:
        pytest.skip("splice() is Linux only")
    monkeypatch.setattr(dispatch, "_CAN_SPLICE", splice)
    payload = os.urandom(8 * 1024 * 1024)
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        received = bytearray()

        def receive() -> None:
            received.extend(read_all(client))

        reader = threading.Thread(target=receive)
        reader.start()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT * 3)
    assert len(received) == len(payload)
    assert received == payload
    (row,) = proxy.stats()
    assert row["bytes_up"] == row["bytes_down"] == len(payload)


def test_different_payloads_each_way(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    down = os.urandom(3 * 1024 * 1024 + 7)
    up = os.urandom(2 * 1024 * 1024 + 3)
    heard: list[bytes] = []

    def exchange(conn: socket.socket) -> None:
        sender = threading.Thread(target=lambda: (conn.sendall(down), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        heard.append(read_all(conn))
        sender.join()

    server = make_server(exchange)
    with client_through(proxy, (server.host, server.port)) as client:
        sender = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(socket.SHUT_WR)))
        sender.start()
        assert read_all(client) == down
        sender.join()
    assert wait_for(lambda: bool(heard))
    assert heard == [up]


def chunked(rng: random.Random, data: bytes) -> list[bytes]:
    chunks, offset = [], 0
    while offset < len(data):
        size = rng.choice([1, 7, 1000, 65536, 300_000])
        chunks.append(data[offset : offset + size])
        offset += size
    return chunks


def send_then_half_close(sock: socket.socket, chunks: list[bytes]) -> None:
    for chunk in chunks:
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def test_random_payloads_with_half_closes_arrive_byte_exact(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    """Who half-closes first, and when, varies: each byte arrives, in order."""
    rng = random.Random(1929)
    sizes = [0, 1, 2, 1000, 65535, 65536, 65537, 262_144, 1_000_003]
    cases = []
    for _ in range(24):
        up = rng.randbytes(rng.choice(sizes))
        down = rng.randbytes(rng.choice(sizes))
        order = rng.choice(["server first", "client first", "together"])
        cases.append((up, chunked(rng, up), down, chunked(rng, down), order))
    current: list[Any] = []
    heard: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        _, _, _, down_chunks, order = current[0]
        if order == "server first":
            send_then_half_close(conn, down_chunks)
            heard.append(read_all(conn))
        elif order == "client first":
            heard.append(read_all(conn))
            send_then_half_close(conn, down_chunks)
        else:
            sender = threading.Thread(target=send_then_half_close, args=(conn, down_chunks))
            sender.start()
            heard.append(read_all(conn))
            sender.join(TIMEOUT)

    server = make_server(serve)
    for index, case in enumerate(cases):
        up, up_chunks, down, _, order = case
        current[:] = [case]
        with client_through(proxy, (server.host, server.port)) as client:
            if order == "server first":
                received = read_all(client)
                send_then_half_close(client, up_chunks)
            elif order == "client first":
                send_then_half_close(client, up_chunks)
                received = read_all(client)
            else:
                sender = threading.Thread(target=send_then_half_close, args=(client, up_chunks))
                sender.start()
                received = read_all(client)
                sender.join(TIMEOUT)
            assert received == down, f"case {index} ({order}): down"
            assert wait_for(lambda: len(heard) == index + 1)  # noqa: B023 (awaited here)
            assert heard[index] == up, f"case {index} ({order}): up"
    assert wait_for(lambda: proxy.open_connections() == 0)
    (row,) = proxy.stats()
    assert row["bytes_up"] == sum(len(case[0]) for case in cases)
    assert row["bytes_down"] == sum(len(case[2]) for case in cases)


# ---------------------------------------------------------------------------
# Sessions: SOCKS and UDP; one record per exchange
# ---------------------------------------------------------------------------


# SOCKS5, SOCKS4 and 4a -----------------------------------------------------


def test_socks5_connects_to_an_ipv4_target(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"hello") == b"hello"


@needs_ipv6
def test_socks5_connects_to_an_ipv6_target(make_proxy: Callable[..., Dispatcher], echo_server6: Server) -> None:
    proxy = make_proxy(["::1"])
    with client_through(proxy, ("::1", echo_server6.port)) as client:
        assert round_trip(client, b"over six") == b"over six"


def test_socks5_resolves_domain_name_at_proxy(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, ("localhost", echo_server.port), rdns=True) as client:
        assert round_trip(client, b"by name") == b"by name"


def test_socks4_connects(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port), socks.SOCKS4) as client:
        assert round_trip(client, b"four") == b"four"


def test_socks4a_resolves_name_at_proxy(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, ("localhost", echo_server.port), socks.SOCKS4, rdns=True) as client:
        assert round_trip(client, b"four a") == b"four a"


def test_success_reply_carries_the_upstream_local_address(
    make_proxy: Callable[..., Dispatcher], peer_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2"])
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(socks5_request(peer_server.host, peer_server.port))
        code, host, port = socks5_reply(sock)
        assert (code, host) == (Reply.SUCCEEDED, "127.0.0.2")
        assert port != 0
        assert read_all(sock) == b"127.0.0.2"


def test_socks4_success_reply_carries_the_upstream_local_address(
    make_proxy: Callable[..., Dispatcher], peer_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.3"])
    with raw_client(proxy) as sock:
        sock.sendall(socks4_request(peer_server.host, peer_server.port))
        version, code, port, ip = struct.unpack("!BBH4s", recv_exactly(sock, 8))
        assert (version, code, socket.inet_ntoa(ip)) == (0, 0x5A, "127.0.0.3")
        assert port != 0


def test_unknown_command_gets_reply_07(proxy: Dispatcher, echo_server: Server) -> None:
    for command in (2, 9):  # BIND, nonsense
        request = socks5_request(echo_server.host, echo_server.port, command=command)
        assert socks5_code_for(proxy, request) == Reply.COMMAND_NOT_SUPPORTED


def test_unknown_address_type_gets_reply_08(proxy: Dispatcher) -> None:
    assert socks5_code_for(proxy, b"\x05\x01\x00\x07rest") == Reply.ADDRESS_TYPE_NOT_SUPPORTED


def test_no_acceptable_method_gets_05_ff_and_close(proxy: Dispatcher) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x01\x02")  # username/password only
        assert recv_exactly(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""


def test_host_name_with_control_characters_gets_reply_04(proxy: Dispatcher, log: pytest.LogCaptureFixture) -> None:
    """A name is written to the log: one that could forge log lines is refused."""
    forged = "x\n2026-01-01 00:00:00 INFO forged"
    request = bytes([5, 1, 0, 3, len(forged)]) + forged.encode() + b"\x00\x50"
    assert socks5_code_for(proxy, request) == Reply.HOST_UNREACHABLE
    proxy.shutdown()
    assert "forged" not in log.text  # the words of the log are the point: no line was forged
    assert "host name is not printable ASCII" in [exchange.result for exchange in exchanges(log)]


def test_socks4_failures_get_5b(proxy: Dispatcher, echo_server: Server) -> None:
    requests = [
        socks4_request("127.0.0.1", refused_port()),
        socks4_request(echo_server.host, echo_server.port, command=2),
        socks4_request("", 80, host="bad..name"),
    ]
    for request in requests:
        with raw_client(proxy) as sock:
            sock.sendall(request)
            assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
            assert sock.recv(1) == b""


def test_handshake_split_into_single_bytes(proxy: Dispatcher, echo_server: Server) -> None:
    with raw_client(proxy) as sock:
        for byte in b"\x05\x01\x00":
            sock.send(bytes([byte]))
            time.sleep(0.01)  # separate segments: the splitting is the point
        assert recv_exactly(sock, 2) == b"\x05\x00"
        for byte in socks5_request(echo_server.host, echo_server.port):
            sock.send(bytes([byte]))
            time.sleep(0.01)
        assert socks5_reply(sock)[0] == Reply.SUCCEEDED
        assert round_trip(sock, b"split") == b"split"


def test_socks4a_split_into_single_bytes(proxy: Dispatcher, echo_server: Server) -> None:
    with raw_client(proxy) as sock:
        for byte in socks4_request("", echo_server.port, host="localhost"):
            sock.send(bytes([byte]))
            time.sleep(0.005)
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5a"
        assert round_trip(sock, b"split 4a") == b"split 4a"


def test_socks5_handshake_merged_with_first_payload(proxy: Dispatcher, echo_server: Server) -> None:
    with raw_client(proxy) as sock:
        request = socks5_request(echo_server.host, echo_server.port)
        sock.sendall(b"\x05\x01\x00" + request + b"early payload")
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert socks5_reply(sock)[0] == Reply.SUCCEEDED
        assert round_trip(sock, b" and more") == b"early payload and more"


def test_a_socks5_connection_enters_no_context_manager_of_contextlib(
    proxy: Dispatcher, echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    """A SOCKS5 CONNECT, its relay and its log line run in the proxy's thread
    without contextlib's context managers: each costs every connection a few
    Python calls, and a short connection's cost is mostly such calls. Every
    function a thread started meanwhile enters is noted; the proxy's thread
    is the one that runs dispatch's code."""
    entered: list[tuple[int, str]] = []

    def note(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            entered.append((threading.get_ident(), frame.f_code.co_filename))

    threading.setprofile(note)
    try:
        with raw_client(proxy) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request(echo_server.host, echo_server.port))
            assert socks5_reply(sock)[0] == Reply.SUCCEEDED
            assert round_trip(sock, b"ping") == b"ping"
        assert wait_for(lambda: len(exchanges(log)) == 1)
    finally:
        threading.setprofile(None)
    seen = entered[:]
    proxy_threads = {thread for thread, filename in seen if filename == dispatch.__file__}
    assert len(proxy_threads) == 1
    assert not [name for thread, name in seen if thread in proxy_threads and name.endswith("contextlib.py")]


def test_socks4a_request_merged_with_first_payload(proxy: Dispatcher, echo_server: Server) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(socks4_request("", echo_server.port, host="localhost") + b"early")
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5a"
        assert round_trip(sock, b"") == b"early"


@pytest.mark.parametrize("socks4a", [False, True])
def test_socks4_field_without_nul_is_refused_at_the_cap(proxy: Dispatcher, echo_server: Server, socks4a: bool) -> None:
    cap = dispatch.MAX_SOCKS4_FIELD
    with raw_client(proxy) as sock:
        if socks4a:
            sock.sendall(struct.pack("!BBH4s", 4, 1, echo_server.port, b"\0\0\0\1") + b"user\0" + b"h" * (cap + 1))
        else:
            sock.sendall(struct.pack("!BBH4s", 4, 1, echo_server.port, b"\x7f\0\0\1") + b"u" * (cap + 1))
        # The proxy read exactly up to the cap and the byte past it: its
        # close is a clean EOF, not a reset for unread bytes.
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
        assert sock.recv(1) == b""


def test_socks4_fields_up_to_the_cap_are_served(proxy: Dispatcher, echo_server: Server) -> None:
    cap = dispatch.MAX_SOCKS4_FIELD
    with raw_client(proxy) as sock:
        sock.sendall(struct.pack("!BBH4s", 4, 1, echo_server.port, b"\x7f\0\0\1") + b"u" * cap + b"\0")
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5a"
        assert round_trip(sock, b"long id") == b"long id"


def test_login_lets_a_known_user_through(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(credentials=dict([LOGIN, ("bob", "other")]))
    with client_through(proxy, (echo_server.host, echo_server.port), login=LOGIN) as client:
        assert round_trip(client, b"logged in") == b"logged in"
    proxy.shutdown()
    target = f"{echo_server.host}:{echo_server.port}"
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == target]
    assert exchange.user == "'alice'"
    assert LOGIN[1] not in log.text


def test_login_required_refuses_a_client_without_one_with_05_ff(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(credentials=dict([LOGIN]))
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x01\x00")  # "no authentication" only
        assert recv_exactly(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""


@pytest.mark.parametrize("user, password", [("alice", "not-her-pass"), ("mallory", LOGIN[1]), ("alic", LOGIN[1])])
def test_wrong_login_gets_status_1_and_close(
    make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture, user: str, password: str
) -> None:
    proxy = make_proxy(credentials=dict([LOGIN]))
    with raw_client(proxy) as sock:
        sock.sendall(b"\x05\x02\x00\x02")
        assert recv_exactly(sock, 2) == b"\x05\x02"
        sock.sendall(bytes([1, len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        assert recv_exactly(sock, 2) == b"\x01\x01"
        assert sock.recv(1) == b""
    proxy.shutdown()
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.user == repr(user)]
    assert (exchange.target, exchange.result) == ("-", "wrong user name or password")
    assert password not in log.text


def test_socks4_is_refused_when_a_login_is_required(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    proxy = make_proxy(credentials=dict([LOGIN]))
    for request in (
        socks4_request(echo_server.host, echo_server.port),
        socks4_request("", echo_server.port, host="localhost"),
    ):
        with raw_client(proxy) as sock:
            sock.sendall(request)
            assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
            assert sock.recv(1) == b""


# The record of an exchange -------------------------------------------------


@pytest.mark.parametrize(
    "record, line",
    [
        (
            dispatch.ExchangeRecord(
                "127.0.0.1:50000",
                target="127.0.0.1:7",
                via=dispatch.LocalAddress("127.0.0.1", interface="lo"),
                up=5,
                down=5,
            ),
            "127.0.0.1:50000 -> 127.0.0.1:7 via 127.0.0.1 (lo): ok, 5 B up, 5 B down, ",
        ),
        (
            dispatch.ExchangeRecord(
                "[::1]:50000",
                user="'alice'",
                target="GET http://h/a",
                via=dispatch.LocalAddress("127.0.0.2"),
                result="200",
                up=70,
                down=120,
            ),
            "[::1]:50000 user 'alice' -> GET http://h/a via 127.0.0.2: 200, 70 B up, 120 B down, ",
        ),
        (
            dispatch.ExchangeRecord("127.0.0.1:50000", result="timed out"),
            "127.0.0.1:50000 -> - via -: timed out, 0 B up, 0 B down, ",
        ),
    ],
    ids=["socks", "http-with-user", "no-request"],
)
def test_exchange_record_is_logged_as_one_line(
    record: dispatch.ExchangeRecord, line: str, log: pytest.LogCaptureFixture
) -> None:
    """Client, user, target, local address, result, bytes each way, duration;
    the record itself rides along as ``exchange``."""
    record.log()
    (logged,) = log.records
    assert logged.levelno == logging.INFO
    assert logged.exchange is record  # type: ignore[attr-defined]
    assert re.fullmatch(re.escape(line) + r"\d+\.\d\d s", logged.getMessage())


def test_one_log_record_per_connection_tells_what_it_did(
    proxy: Dispatcher, echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        client_port = client.getsockname()[1]
        assert round_trip(client, b"12345") == b"12345"
    wait_until_all_closed(proxy)  # the relay has ended: the record says "ok", not "cut by shutdown"
    proxy.shutdown()
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.client == f"127.0.0.1:{client_port}"]
    assert (exchange.user, exchange.target) == (None, f"127.0.0.1:{echo_server.port}")
    assert exchange.via is proxy.addresses[0]  # 127.0.0.1 (lo): literal addresses have their interface
    assert (exchange.result, exchange.up, exchange.down) == ("ok", 5, 5)


def test_reset_client_is_a_log_line_not_a_traceback(
    proxy: Dispatcher, echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    client = client_through(proxy, (echo_server.host, echo_server.port))
    client.sendall(b"x" * 1000)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    assert wait_for(lambda: proxy.open_connections() == 0)
    assert not [record for record in log.records if record.exc_info]
    target = f"127.0.0.1:{echo_server.port}"
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == target]
    assert exchange.via is proxy.addresses[0]


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset, as a client killed mid-transfer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_hangs_up_mid_response_is_an_ordinary_end(
    proxy: Dispatcher, origin: str, log: pytest.LogCaptureFixture
) -> None:
    sock = raw_client(proxy)
    sock.sendall(f"GET {origin}/big HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    _reset(sock)
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result == "200, client hung up"


def test_a_client_that_resets_during_the_handshake_hung_up(proxy: Dispatcher, log: pytest.LogCaptureFixture) -> None:
    sock = raw_client(proxy)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    _reset(sock)
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result == "client hung up"


# SOCKS5 UDP ASSOCIATE ------------------------------------------------------


def test_udp_associate_echoes_many_datagrams(proxy: Dispatcher, udp_echo: UdpServer) -> None:
    with udp_client(proxy) as client:
        for index in range(200):
            payload = b"datagram %d " % index + os.urandom(index)
            client.sendto(payload, (udp_echo.host, udp_echo.port))
            assert client.recvfrom(65535) == (payload, (udp_echo.host, udp_echo.port))
    wait_until_all_closed(proxy)
    (row,) = proxy.stats()
    assert row["bytes_up"] == row["bytes_down"] == sum(len(b"datagram %d " % i) + i for i in range(200))


def test_udp_leaves_from_the_dispatched_addresses(make_proxy: Callable[..., Dispatcher], udp_sender: UdpServer) -> None:
    proxy = make_proxy(["127.0.0.2@2", "127.0.0.3"])
    seen = []
    for _ in range(6):
        with udp_client(proxy) as client:
            answers = set()
            for _ in range(3):
                client.sendto(b"who am I", (udp_sender.host, udp_sender.port))
                answers.add(client.recv(100).decode())
            (address,) = answers  # one association, one local address
            seen.append(address)
    assert seen == ["127.0.0.2", "127.0.0.3", "127.0.0.2"] * 2


def test_udp_resolves_names_at_the_proxy(proxy: Dispatcher, udp_echo: UdpServer) -> None:
    tcp, relay_address = udp_associate(proxy, 0)
    with tcp, udp_socket() as sock:
        sock.sendto(b"\0\0\0" + dispatch.encode_socks5_address("localhost", udp_echo.port) + b"named", relay_address)
        data = sock.recv(65535)
    assert data == dispatch.encode_udp_header("127.0.0.1", udp_echo.port) + b"named"


def test_udp_fragments_are_dropped(proxy: Dispatcher, udp_echo: UdpServer) -> None:
    with udp_socket() as sock:
        tcp, relay_address = udp_associate(proxy, sock.getsockname()[1])
        with tcp:
            header = dispatch.encode_socks5_address(udp_echo.host, udp_echo.port)
            sock.sendto(b"\0\0\x01" + header + b"fragment", relay_address)
            sock.sendto(b"\0\0\0" + header + b"whole", relay_address)
            assert sock.recv(65535).endswith(b"whole")
    assert udp_echo.received == [b"whole"]


def test_udp_from_another_client_is_ignored(
    proxy: Dispatcher, udp_echo: UdpServer, log: pytest.LogCaptureFixture
) -> None:
    header = b"\0\0\0" + dispatch.encode_socks5_address(udp_echo.host, udp_echo.port)
    other_ip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_ip.bind(("127.0.0.5", 0))
    with udp_socket() as client, udp_socket() as other_port, other_ip:
        tcp, relay_address = udp_associate(proxy, 0)  # the port is learned from the first datagram
        with tcp:
            client.sendto(header + b"first", relay_address)
            assert client.recv(65535).endswith(b"first")
            other_port.sendto(header + b"other port", relay_address)
            other_ip.sendto(header + b"other address", relay_address)
            client.sendto(header + b"second", relay_address)
            assert client.recv(65535).endswith(b"second")
    wait_until_all_closed(proxy)  # ended by its client, not cut by the shutdown below
    proxy.shutdown()
    assert udp_echo.received == [b"first", b"second"]
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == "UDP"]
    assert exchange.via is proxy.addresses[0]  # 127.0.0.1 (lo)
    assert exchange.result == "ok, 2 datagrams up, 2 down, 2 dropped"


def test_udp_association_ends_with_its_tcp_connection(proxy: Dispatcher, udp_echo: UdpServer) -> None:
    with udp_socket() as sock:
        tcp, relay_address = udp_associate(proxy, sock.getsockname()[1])
        header = b"\0\0\0" + dispatch.encode_socks5_address(udp_echo.host, udp_echo.port)
        sock.sendto(header + b"ping", relay_address)
        assert sock.recv(65535).endswith(b"ping")
        assert proxy.stats()[0]["open"] == 1
        tcp.close()
        wait_until_all_closed(proxy)
        assert proxy.stats()[0]["open"] == 0
        # The relay port is closed: the kernel answers with ICMP port unreachable.
        sock.connect(relay_address)
        sock.send(header + b"late")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(65535)


@needs_ipv6
def test_udp_associate_on_a_dual_stack_listener_answers_ipv4_clients_in_ipv4(
    make_proxy: Callable[..., Dispatcher], udp_echo: UdpServer
) -> None:
    proxy = make_proxy(host="::")
    port = proxy.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00" + socks5_request("0.0.0.0", 0, command=3))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert socks5_reply(sock)[:2] == (Reply.SUCCEEDED, "127.0.0.1")
    with socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.set_proxy(socks.SOCKS5, "127.0.0.1", port)
        client.settimeout(TIMEOUT)
        client.sendto(b"over IPv4", (udp_echo.host, udp_echo.port))
        assert client.recvfrom(65536)[0] == b"over IPv4"


# ---------------------------------------------------------------------------
# Local pages: the status page, /stats.json, /metrics, /proxy.pac
# ---------------------------------------------------------------------------


def test_page_holds_table_and_chart_without_javascript() -> None:
    page = dispatch.render_status_page(sample_status())
    text = re.sub(r"<script>.*?</script>|<style>.*?</style>", "", page, flags=re.S)
    for expected in (
        "wlan0",
        "192.168.1.20",
        "usb0",
        "timed out; tried again in 4 s",
        "enp3s0",
        "2001:db8::20",
        "standby",
        "backup",
        "1.2 GB",
        "5.3 MB",
        "1,523.5 kB/s",
        "12.3 kB/s",
        "2,500.0 kB/s",
        "not measured",
        "1 h 2 min",
        "0.2.0",
        "All links",
        "kB/s",
        "measured 1 min 4 s ago",
        "900.0 kB/s",
        "remembered",
        "3,400.0 kB/s",
    ):
        assert expected in text, expected
    assert text.count("<polyline") == 4  # two links with history, two charts
    assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "")


def test_page_headings_are_its_cells_and_its_rates_the_tables() -> None:
    status = sample_status()
    page = dispatch.render_status_page(status)
    headings = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    for row in re.findall(r"<tr>(<td.*?)</tr>", page):
        assert re.findall(r'data-label="([^"]*)"', row) == headings
    table = dispatch.format_stats(status["addresses"])
    for rate in ("1,523.5 kB/s", "12.3 kB/s", "2,500.0 kB/s"):
        assert f">{rate}<" in page and rate in table


def test_page_loads_nothing_from_elsewhere() -> None:
    page = dispatch.render_status_page(sample_status())
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_page_escapes_link_names_and_reasons() -> None:
    evil = status_row(
        "192.168.1.9", '<script>alert("x")</script>&', reason="<b>'why'</b>", state="down", interface="<i>"
    )
    status = sample_status() | {"addresses": [evil], "history": {"interval": 2.0, "addresses": {}}}
    page = dispatch.render_status_page(status)
    assert "<script>alert" not in page and "<b>'why'" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert page.count("<script>") == 1


def test_page_with_no_history_says_so() -> None:
    page = dispatch.render_status_page(sample_status() | {"history": {"interval": 2.0, "addresses": {}}})
    assert page.count(">no samples yet<") == 2 and "<polyline" not in page


def test_page_marks_a_lone_sample() -> None:
    status = sample_status(points=1)
    status["history"]["addresses"]["10.42.0.7"] = {"rate_down": [], "rate_up": []}
    page = dispatch.render_status_page(status)
    points = re.findall(r'<polyline class="s0" points="([^"]*)"', page)
    marks = re.findall(r'<circle class="s0" cx="396" cy="([^"]*)" r="3"/>', page)
    assert points == [f"396.0,{y}" for y in marks] and len(marks) == 2  # at "now", both charts


def test_page_spans_ten_minutes_of_history_on_a_round_scale() -> None:
    page = dispatch.render_status_page(sample_status(points=400))  # the oldest are left out
    points = re.findall(r'<polyline class="s0" points="([^"]*)"', page)
    xs = [float(p.split(",")[0]) for p in points[0].split()]
    assert len(xs) == 301 and xs[0] == 0.0 and xs[-1] == 396.0
    assert ">2000 kB/s<" in page and ">1000 kB/s<" in page  # peak 1600 kB/s down
    assert ">20 kB/s<" in page  # peak 18 kB/s up


def test_page_csp_allows_exactly_its_own_style_and_script() -> None:
    page = dispatch.render_status_page(sample_status())
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        assert body is not None
        assert dispatch._csp_source(body.group(1)) in dispatch.STATUS_PAGE_CSP.split(directive)[1]


def metric_families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}


def metric_samples(family: Any) -> dict[tuple[str, str], float]:
    return {(s.labels["link"], s.labels["address"]): s.value for s in family.samples}


def test_metrics_parse_with_the_expected_families_and_values() -> None:
    families = metric_families(dispatch.render_metrics(sample_status()))
    # the parser names a counter family without its _total suffix
    assert {name: f.type for name, f in families.items()} == {
        "dispatch_build_info": "gauge",
        "dispatch_uptime_seconds": "gauge",
        "dispatch_link_info": "gauge",
        "dispatch_bytes_sent": "counter",
        "dispatch_bytes_received": "counter",
        "dispatch_connections_opened": "counter",
        "dispatch_connections_failed": "counter",
        "dispatch_open_connections": "gauge",
        "dispatch_link_up": "gauge",
        "dispatch_link_capacity_bytes_per_second": "gauge",
        "dispatch_link_capacity_age_seconds": "gauge",
        "dispatch_link_capacity_remembered": "gauge",
        "dispatch_dns_queries": "counter",
        "dispatch_dns_cache_hits": "counter",
        "dispatch_dns_failures": "counter",
        "dispatch_clients_refused": "counter",
        "dispatch_client_connections": "gauge",
    }
    assert all(f.documentation for f in families.values())
    wlan, usb, wired = ("wlan0", "192.168.1.20"), ("usb0", "10.42.0.7"), ("enp3s0", "2001:db8::20")
    assert metric_samples(families["dispatch_bytes_sent"]) == {wlan: 5_300_000, usb: 812_000, wired: 0}
    assert metric_samples(families["dispatch_bytes_received"])[wlan] == 1_234_567_890
    assert metric_samples(families["dispatch_connections_failed"])[usb] == 9
    assert metric_samples(families["dispatch_link_up"]) == {wlan: 1, usb: 0, wired: 1}  # standing by is up
    # capacity is left out where there is none; its age where it was not measured in this run
    assert metric_samples(families["dispatch_link_capacity_bytes_per_second"]) == {wlan: 2_500_000, usb: 900_000}
    assert metric_samples(families["dispatch_link_capacity_age_seconds"]) == {wlan: 64.2}
    assert metric_samples(families["dispatch_link_capacity_remembered"]) == {wlan: 0, usb: 1}
    assert metric_samples(families["dispatch_dns_queries"]) == {wlan: 31, usb: 0, wired: 0}
    assert metric_samples(families["dispatch_dns_cache_hits"])[wlan] == 89
    assert all(s.name.endswith("_total") for s in families["dispatch_bytes_sent"].samples)
    (build,) = families["dispatch_build_info"].samples
    assert (build.labels, build.value) == ({"version": "0.2.0"}, 1)


def test_metrics_escape_label_values() -> None:
    name = 'we"ird\\link\nname'
    text = dispatch.render_metrics(sample_status() | {"addresses": [status_row("10.0.0.1", name, capacity=1.5)]})
    assert 'link="we\\"ird\\\\link\\nname"' in text
    families = metric_families(text)
    assert metric_samples(families["dispatch_link_capacity_bytes_per_second"]) == {(name, "10.0.0.1"): 1.5}


PAC_PROXY = "SOCKS5 192.168.1.20:1080; SOCKS 192.168.1.20:1080; PROXY 192.168.1.20:1080"


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes every name lookup in this process fail, and records the attempts."""
    attempts: list[str] = []

    def refuse(name: object, *args: object, **kwargs: object) -> Any:
        attempts.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, "lookups are not allowed in this test")

    for lookup in ("gethostbyname", "gethostbyname_ex", "getaddrinfo", "gethostbyaddr"):
        monkeypatch.setattr(socket, lookup, refuse)
    return attempts


@pytest.fixture
def pac(no_dns: list[str]) -> Any:
    from pypac.parser import PACFile

    return PACFile(dispatch.render_pac("192.168.1.20", 1080))


@pytest.mark.parametrize(
    "host",
    [
        "www.example.com",
        "example.com",
        "a.b.c.d.example",
        "8.8.8.8",
        "1.1.1.1",
        "172.32.0.1",
        "100.128.0.1",
        "192.169.0.1",
        "11.0.0.1",
        "2606:4700::1111",
        "[2606:4700::1111]",
        "2001:db8::1",
        "::ffff:8.8.8.8",
        "fec0::1",
        "localhost.example.com",
        "999.1.1.1",
    ],
)
def test_pac_sends_public_destinations_to_the_proxy(pac: Any, no_dns: list[str], host: str) -> None:
    assert pac.find_proxy_for_url(f"https://{host}/path", host) == PAC_PROXY
    assert no_dns == []


@pytest.mark.parametrize(
    "host",
    [
        "intranet",
        "localhost",
        "LOCALHOST",
        "app.localhost",
        "127.0.0.1",
        "127.255.0.9",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "192.168.255.255",
        "100.64.0.1",
        "100.127.255.254",
        "169.254.1.1",
        "0.0.0.0",
        "::1",
        "[::1]",
        "0:0:0:0:0:0:0:1",
        "fe80::1",
        "fe80::1%eth0",
        "febf::1",
        "fd00::1",
        "fc00::1",
        "::ffff:192.168.1.1",
        "::",
    ],
)
def test_pac_sends_local_and_private_destinations_direct(pac: Any, no_dns: list[str], host: str) -> None:
    assert pac.find_proxy_for_url(f"http://{host}/", host) == "DIRECT"
    assert no_dns == []


def test_pac_decides_from_the_host_string_alone() -> None:
    text = dispatch.render_pac("proxy.lan", 1080)
    for name in ("dnsResolve", "isResolvable", "isInNet", "myIpAddress", "dnsDomainIs"):
        assert name not in text


def test_pac_brackets_an_ipv6_proxy_host(no_dns: list[str]) -> None:
    from pypac.parser import PACFile

    for host in ("::1", "[::1]", "0:0::1"):
        pac = PACFile(dispatch.render_pac(host, 1080))
        expected = "SOCKS5 [::1]:1080; SOCKS [::1]:1080; PROXY [::1]:1080"
        assert pac.find_proxy_for_url("http://example.com/", "example.com") == expected
    assert no_dns == []


@pytest.mark.parametrize(
    "host, port", [("a b", 1080), ('x";alert(1);"', 1080), ("host", 0), ("host", 70000), ("[zz::1]", 1080)]
)
def test_pac_refuses_a_host_or_port_it_cannot_write(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        dispatch.render_pac(host, port)


@pytest.mark.parametrize(
    "count, text",
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (53_140, "53.1 kB"),
        (812_000, "812 kB"),
        (1_200_000, "1.2 MB"),
        (340_000_000_000, "340 GB"),
        (5e15, "5000 TB"),
        (1e308, "1e+296 TB"),  # three figures, not three hundred
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert dispatch.format_bytes(count) == text


def test_page_script_holds_no_figure_colour_or_unit_of_its_own() -> None:
    # Every number, colour, scale and unit on the page comes drawn from here.
    assert not re.search(r"\d|kB|#[0-9a-f]|\bs\b", dispatch._SCRIPT), dispatch._SCRIPT


# ---------------------------------------------------------------------------
# HTTP proxy: forwarding, tunnels, and answering the local pages
# ---------------------------------------------------------------------------


def test_curl_gets_through_the_http_proxy(make_proxy: Callable[..., Dispatcher], origin: str) -> None:
    proxy = make_proxy(["127.0.0.2"])
    body = curl("-x", proxy_url(proxy), origin + "/path?q=1")
    assert body.startswith("GET /path?q=1\npeer 127.0.0.2:")
    assert f"host: {origin[len('http://') :]}" in body
    assert "via: 1.1 dispatch" in body


def test_curl_keeps_the_client_connection_for_several_requests(
    make_proxy: Callable[..., Dispatcher], origin: str, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(["127.0.0.2@2", "127.0.0.3"])
    out = curl("-x", proxy_url(proxy), origin + "/one", origin + "/two", origin + "/chunked")
    first, second = out.split("GET /two\n")
    # The second request reused the upstream connection: same address, same port.
    assert first.split("\n")[1] == second.split("\n")[0] == first.split("\n")[1]
    assert out.endswith("hello chunked world")
    clients = {exchange.client for exchange in exchanges(log) if exchange.target.startswith("GET ")}
    assert len(clients) == 1  # one client connection carried all three
    (row,) = [row for row in proxy.stats() if row["ip"] == "127.0.0.2"]
    assert row["connections"] == 1


def test_requests_to_different_hosts_on_one_connection(
    make_proxy: Callable[..., Dispatcher], origin: str, make_origin: Callable[[], str]
) -> None:
    other = make_origin().replace("127.0.0.1", "localhost")
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    with raw_client(proxy) as sock:
        for base in (origin, other, origin):
            sock.sendall(f"GET {base}/x HTTP/1.1\r\nHost: ignored\r\n\r\n".encode())
            status, _, body = read_response(sock)
            assert status == 200
            assert body.startswith(b"GET /x\npeer 127.0.0.")
            assert f"\nhost: {base.split('//')[1]}".encode() in body
    assert sum(row["connections"] for row in proxy.stats()) == 3


def test_curl_tunnels_with_connect(make_proxy: Callable[..., Dispatcher], origin: str) -> None:
    proxy = make_proxy(["127.0.0.3"])
    body = curl("-p", "-x", proxy_url(proxy), origin + "/tunnelled")
    assert body.startswith("GET /tunnelled\npeer 127.0.0.3:")
    assert "via:" not in body  # a tunnel carries the client's own bytes


def test_connect_relays_bytes_sent_right_behind_the_request(proxy: Dispatcher, echo_server: Server) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n\r\nearly bytes".encode())
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert recv_exactly(sock, len(established)) == established
        assert round_trip(sock, b" and late") == b"early bytes and late"


def test_urllib_through_proxy_handler(proxy: Dispatcher, origin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)  # or urllib would skip the proxy for loopback
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy_url(proxy)}))
    with opener.open(origin + "/chunked", timeout=TIMEOUT) as response:
        assert response.read() == b"hello chunked world"
    payload = os.urandom(300_000)
    with opener.open(urllib.request.Request(origin + "/post", data=payload), timeout=TIMEOUT) as response:
        assert response.read() == payload
    with opener.open(origin + "/seen", timeout=TIMEOUT) as response:
        assert b"via: 1.1 dispatch" in response.read()


def test_chunked_request_body_is_passed_on(proxy: Dispatcher, origin: str) -> None:
    request = (
        f"POST {origin}/post HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n7;ext=1\r\n chunks\r\n0\r\nX-Trailer: t\r\n\r\n"
    ).encode()
    assert http_exchange(proxy, request)[2] == b"hello chunks"


def test_204_and_304_responses_have_no_body(proxy: Dispatcher, origin: str) -> None:
    with raw_client(proxy) as sock:
        for status in (204, 304):
            sock.sendall(f"GET {origin}/{status} HTTP/1.1\r\n\r\n".encode())
            assert read_response(sock)[::2] == (status, b"")
        sock.sendall(f"GET {origin}/after HTTP/1.1\r\n\r\n".encode())
        assert read_response(sock)[2].startswith(b"GET /after")


def test_head_response_has_no_body(proxy: Dispatcher, origin: str) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"HEAD {origin}/ HTTP/1.1\r\n\r\nGET {origin}/next HTTP/1.1\r\n\r\n".encode())
        reader = dispatch.DeadlineReader(sock)
        head = dispatch.read_head(reader)
        assert head[0] == "HTTP/1.1 200 OK" and "Content-Length: 1000" in head
        assert dispatch.read_head(reader)[0] == "HTTP/1.1 200 OK"  # the next response at once


def test_response_ended_by_close_closes_the_client_connection(proxy: Dispatcher, origin: str) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(f"GET {origin}/close HTTP/1.1\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    assert (status, headers["connection"], body) == (200, "close", b"until the end")


def test_hop_by_hop_headers_are_removed(proxy: Dispatcher, origin: str) -> None:
    request = (
        f"GET {origin}/headers HTTP/1.1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic dTpw\r\n"
        "TE: trailers\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\n\r\n"
    ).encode()
    status, headers, body = http_exchange(proxy, request)
    seen = body.decode().split("\n")[2:]
    names = {line.split(":")[0] for line in seen}
    hop_by_hop = {"connection", "x-hop", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}
    assert names.isdisjoint(hop_by_hop)
    assert "x-end-to-end: kept" in seen
    # The origin's own hop-by-hop headers do not reach the client either.
    assert "keep-alive" not in headers and "x-private" not in headers


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # neither absolute nor origin form
        b"GET http://127.0.0.1/ HTTP/1.1 extra\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/2.0\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET ftp://127.0.0.1/ HTTP/1.1\r\n\r\n",
        b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x",  # cut short
        b"GET http://127.0.0.1/\xc3\xa9 HTTP/1.1\r\n\r\n",  # a target not in ASCII
        b"CONNECT " + b".".join([b"a" * 63] * 4) + b":80 HTTP/1.1\r\n\r\n",  # a name of 255 characters
        b"GET http://" + b".".join([b"a" * 63] * 4) + b"/ HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_request_gets_400(proxy: Dispatcher, request_bytes: bytes) -> None:
    with raw_client(proxy) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        status, headers, body = read_response(sock)
    assert (status, headers["connection"]) == (400, "close")
    assert body.startswith(b"400 Bad Request: ")


def test_an_empty_line_before_the_first_request_is_skipped(proxy: Dispatcher, origin: str) -> None:
    """RFC 9112, 2.2: a server skips at least one empty line before a request."""
    with raw_client(proxy) as sock:
        sock.sendall(f"\r\nGET {origin}/after-crlf HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert read_response(sock)[0] == 200


def test_proxy_keeps_serving_after_a_malformed_request(proxy: Dispatcher, origin: str) -> None:
    for _ in range(3):
        assert http_exchange(proxy, b"BREW coffee HTTP/1.1\r\n\r\n")[0] == 400
    assert curl("-x", proxy_url(proxy), origin + "/fine").startswith("GET /fine")


def test_oversized_header_gets_431(proxy: Dispatcher) -> None:
    long_line = b"X-Big: " + b"a" * dispatch.MAX_HEADER_LINE + b"\r\n"
    assert http_exchange(proxy, b"GET http://127.0.0.1/ HTTP/1.1\r\n" + long_line + b"\r\n")[0] == 431
    many = b"X-Some: " + b"b" * 4000 + b"\r\n"
    assert http_exchange(proxy, b"GET http://127.0.0.1/ HTTP/1.1\r\n" + many * 20 + b"\r\n")[0] == 431


def test_slowly_dripped_request_head_gets_408_in_handshake_time(
    make_proxy: Callable[..., Dispatcher], origin: str
) -> None:
    proxy = make_proxy(handshake_timeout=0.5)
    head = f"GET {origin}/ HTTP/1.1\r\nX-Slow: {'a' * 1000}\r\n\r\n".encode()
    answer = b""
    with raw_client(proxy) as slow:
        started = time.monotonic()
        slow.settimeout(0.1)  # one byte each 0.1 s, well within the timeout of a single read
        for index in range(len(head)):
            if index == 3:
                assert http_exchange(proxy, f"GET {origin}/other HTTP/1.1\r\n\r\n".encode())[0] == 200
            if time.monotonic() - started > 5:
                break
            try:
                slow.send(head[index : index + 1])
                answer = slow.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
        slow.settimeout(TIMEOUT)
        with contextlib.suppress(OSError):
            answer += read_all(slow)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed < 3


def test_slow_request_body_gets_408(make_proxy: Callable[..., Dispatcher], origin: str) -> None:
    proxy = make_proxy(handshake_timeout=0.5)
    request = f"POST {origin}/ HTTP/1.1\r\nContent-Length: 10\r\n\r\nhalf".encode()
    assert http_exchange(proxy, request)[0] == 408


def test_unreachable_origin_gets_502(proxy: Dispatcher) -> None:
    status, _, body = http_exchange(proxy, f"GET http://127.0.0.1:{refused_port()}/ HTTP/1.1\r\n\r\n".encode())
    assert status == 502
    status, _, body = http_exchange(proxy, f"CONNECT 127.0.0.1:{refused_port()} HTTP/1.1\r\n\r\n".encode())
    assert (status, body) == (502, b"502 Bad Gateway: Connection refused\n")


def test_origin_connect_timeout_gets_504(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(connect_timeout=0.3)
    with unanswered_address() as (host, port):
        status = http_exchange(proxy, f"GET http://{host}:{port}/ HTTP/1.1\r\n\r\n".encode())[0]
    assert status == 504


def test_origin_slow_to_answer_gets_504(
    proxy: Dispatcher, silent_origin: tuple[Server, threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "HTTP_RESPONSE_TIMEOUT", 0.5)
    server, _ = silent_origin
    request = f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode()
    assert http_exchange(proxy, request)[0] == 504


def test_request_on_a_kept_origin_connection_closed_by_the_origin_is_retried(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    heads_per_connection: list[int] = []

    def answer_once_then_close(conn: socket.socket) -> None:
        """Answer one request as if keeping the connection, then close on the next."""
        heads_per_connection.append(0)
        read_request_head(conn)
        heads_per_connection[-1] += 1
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_request_head(conn)
        heads_per_connection[-1] += 1

    server = make_server(answer_once_then_close)
    request = f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode()
    with raw_client(proxy) as client:
        for _ in range(3):
            client.sendall(request)
            assert read_response(client)[0::2] == (200, b"ok")
    assert len(server.connections) == 3
    # The kept connections were used again, met the origin's close, and the
    # requests went out once more on new ones.
    assert heads_per_connection[:2] == [2, 2]


def raw_origin(make_server: Callable[..., Server], response: bytes) -> tuple[Server, list[bytes]]:
    """An origin that reads one request head, answers ``response`` as given
    and closes; the list gets each head it read."""
    heads: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        heads.append(read_request_head(conn))
        conn.sendall(response)
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            read_all(conn)  # whatever else the proxy sends, until it closes

    return make_server(serve), heads


def test_a_post_is_never_sent_twice(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    heads: list[bytes] = []

    def answer_once_then_close(conn: socket.socket) -> None:
        """Answer one request as if keeping the connection, then read the next and close."""
        heads.append(read_request_head(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        heads.append(read_request_head(conn))

    server = make_server(answer_once_then_close)
    url = f"http://127.0.0.1:{server.port}"
    with raw_client(proxy) as client:
        client.sendall(f"GET {url}/ HTTP/1.1\r\n\r\n".encode())
        assert read_response(client)[0] == 200
        client.sendall(f"POST {url}/charge-card HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode())
        status, _, body = read_response(client)
    # The origin may have charged the card before it closed: the client
    # learns that the request failed, and the origin saw it once.
    assert status == 502 and body.startswith(b"502 Bad Gateway: ")
    assert sum(head.startswith(b"POST /charge-card ") for head in heads) == 1


def test_curl_gets_the_origins_early_refusal_of_an_expected_body(
    proxy: Dispatcher, make_server: Callable[..., Server], tmp_path: Any
) -> None:
    heads: list[bytes] = []

    def refuse_at_once(conn: socket.socket) -> None:
        """Answer the head with 413 and close, as a server with an upload limit does."""
        heads.append(read_request_head(conn))
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")

    server = make_server(refuse_at_once)
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(4_000_000))
    out = curl(
        "-x",
        proxy_url(proxy),
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{upload}",
        "-w",
        " %{http_code}",
        f"http://127.0.0.1:{server.port}/upload",
    )
    assert out == "too large 413"
    assert b"\r\nExpect: 100-continue\r\n" in heads[0]  # the expectation went to the origin


def test_expect_100_continue_comes_from_the_origin(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    def continue_then_echo(conn: socket.socket) -> None:
        head = read_request_head(conn)
        assert b"\r\nExpect: 100-continue\r\n" in head
        conn.sendall(b"HTTP/1.1 100 Continue\r\nX-From: origin\r\n\r\n")
        body = recv_exactly(conn, 5)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\n" + body)

    server = make_server(continue_then_echo)
    with raw_client(proxy) as client:
        client.sendall(
            f"PUT http://127.0.0.1:{server.port}/f HTTP/1.1\r\n".encode()
            + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        reader = dispatch.DeadlineReader(client)
        assert dispatch.read_head(reader) == ["HTTP/1.1 100 Continue", "X-From: origin"]
        client.sendall(b"hello")
        assert dispatch.read_head(reader)[0] == "HTTP/1.1 201 Created"
        assert reader.read(5) == b"hello"


def test_curl_uploads_with_expect_100_continue(proxy: Dispatcher, origin: str, tmp_path: Any) -> None:
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(2_000_000).hex().encode())
    out = curl("-x", proxy_url(proxy), "-H", "Expect: 100-continue", "--data-binary", f"@{upload}", origin + "/post")
    assert out.encode() == upload.read_bytes()


def test_a_body_sent_without_waiting_for_100_continue_is_forwarded(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    head_came = threading.Event()

    def ignore_the_expectation(conn: socket.socket) -> None:
        """An origin that knows nothing of Expect: it waits for the body."""
        read_request_head(conn)
        head_came.set()
        body = recv_exactly(conn, 5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)

    server = make_server(ignore_the_expectation)
    with raw_client(proxy) as client:
        client.sendall(
            f"PUT http://127.0.0.1:{server.port}/f HTTP/1.1\r\n".encode()
            + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        assert head_came.wait(TIMEOUT)
        client.sendall(b"hello")  # as curl does after a second without an answer
        assert read_response(client)[0::2] == (200, b"hello")


def test_expect_100_continue_to_an_unreachable_origin_gets_502_first(proxy: Dispatcher) -> None:
    request = f"POST http://127.0.0.1:{refused_port()}/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    with raw_client(proxy) as client:
        client.sendall(request.encode())
        status, headers, _ = read_response(client)
    assert (status, headers["connection"]) == (502, "close")


def test_an_http10_client_gets_no_interim_response_and_its_expect_is_ignored(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    server, heads = raw_origin(
        make_server,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    request = f"POST http://127.0.0.1:{server.port}/ HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
    with raw_client(proxy) as client:
        client.sendall(request.encode())
        answer = read_all(client)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")
    assert b"Expect" not in heads[0]


def test_an_origin_reset_mid_body_resets_the_client(
    proxy: Dispatcher, make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    client_has_part = threading.Event()

    def reset_mid_body(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\npart")  # a body ended by the close
        client_has_part.wait(TIMEOUT)
        _reset(conn)

    server = make_server(reset_mid_body)
    with raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
        recv_until(client, b"part")
        client_has_part.set()
        with pytest.raises(ConnectionResetError):
            read_all(client)
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result.startswith("200, the response was cut short: the origin failed")


def test_curl_sees_a_response_cut_by_an_origin_reset_as_an_error(
    proxy: Dispatcher, make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + b"p" * 100_000

    def passed_on() -> bool:
        return sum(row["bytes_down"] for row in proxy.stats()) >= len(response)

    def reset_mid_body(conn: socket.socket) -> None:
        """Send a body ended by the close, and reset once the proxy passed it on."""
        read_request_head(conn)
        conn.sendall(response)
        wait_for(passed_on)
        _reset(conn)

    server = make_server(reset_mid_body)
    done = subprocess.run(
        ["curl", "-sS", "-o", os.devnull, "-x", proxy_url(proxy), f"http://127.0.0.1:{server.port}/file"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert done.returncode != 0, "curl took the cut file for a whole one"  # directly, curl fails too
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result.startswith("200, the response was cut short: the origin failed")


def test_curl_http10_sees_a_cut_chunked_response_as_an_error(
    proxy: Dispatcher, make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server, _ = raw_origin(make_server, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    done = subprocess.run(
        ["curl", "-sS", "--http1.0", "-x", proxy_url(proxy), f"http://127.0.0.1:{server.port}/"],
        capture_output=True,
        timeout=TIMEOUT * 2,
    )
    assert done.returncode != 0  # directly, curl fails on the cut chunks too
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result == ("200, the response was cut short: the origin closed before the response ended")


@pytest.mark.parametrize(
    "field",
    [
        b"X-A: a\rb",
        b"X-A: a\x00b",
        b"X-A: a\r",
        b"Transfer-Encoding: chunked\x0b",
        b"Transfer-Encoding: \x0cchunked",
        b"Transfer-Encoding: chunked\xa0",
        b"Content-Length: 1, 2",
    ],
)
def test_request_with_a_mangled_field_gets_400(proxy: Dispatcher, origin: str, field: bytes) -> None:
    request = f"POST {origin}/ HTTP/1.1\r\n".encode() + field + b"\r\n\r\n0\r\n\r\n"
    with raw_client(proxy) as client:
        client.sendall(request)
        status, headers, _ = read_response(client)
        assert (status, headers["connection"]) == (400, "close")
        assert closed_by_proxy(client)


@pytest.mark.parametrize(
    "field",
    [
        b"X-A: a\rb",
        b"X-A: a\x00b",
        b"Transfer-Encoding: chunked\x0b",
        b"Transfer-Encoding: chunked\xa0",
        b"Content-Length: 1, 2",
    ],
)
def test_response_with_a_mangled_field_gets_502(
    proxy: Dispatcher, make_server: Callable[..., Server], field: bytes
) -> None:
    server, _ = raw_origin(make_server, b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 2\r\n\r\nok")
    status, _, body = http_exchange(proxy, f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
    assert status == 502 and body.startswith(b"502 Bad Gateway: bad response: ")


@pytest.mark.parametrize("size_line", [b"5\n", b"5 \r\n", b" 5\r\n", b"5\t;x=1\r\n"])
def test_chunk_size_line_without_crlf_or_with_padding_gets_400(
    proxy: Dispatcher, origin: str, size_line: bytes
) -> None:
    request = f"POST {origin}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    status, _, body = http_exchange(proxy, request + size_line + b"hello\r\n0\r\n\r\n")
    assert status == 400 and body.startswith(b"400 Bad Request: request body: bad chunk size line")


def test_a_line_of_spaces_does_not_end_the_trailer_section(proxy: Dispatcher, origin: str) -> None:
    smuggled = f"GET {origin}/smuggled HTTP/1.1\r\n\r\n"
    request = f"POST {origin}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n   \r\n{smuggled}\r\n"
    with raw_client(proxy) as client:
        client.sendall(request.encode())
        status, _, body = read_response(client)
        assert status == 400 and b"trailer" in body
        assert closed_by_proxy(client)  # and the bytes after it were never a request


def test_chunked_body_is_written_out_cleanly(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    received: list[bytes] = []

    def take_body(conn: socket.socket) -> None:
        head = read_request_head(conn)
        body = b""
        while not body.endswith(b"\r\n\r\n"):
            body += conn.recv(65536)
        received.append(head + body)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = make_server(take_body)
    request = (
        f"POST http://127.0.0.1:{server.port}/ HTTP/1.1\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        '00005;ext="a b"\r\nhello\r\n0\r\nX-Sum:  5 \r\n\r\n'
    )
    assert http_exchange(proxy, request.encode())[0] == 204
    head, _, body = received[0].partition(b"\r\n\r\n")
    assert b"\r\nTrailer: X-Sum\r\n" in head + b"\r\n"  # end to end (RFC 9110, 6.6.2)
    assert body == b"5\r\nhello\r\n0\r\nX-Sum: 5\r\n\r\n"


def test_response_with_length_and_chunked_loses_the_length(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    server, _ = raw_origin(
        make_server,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    )
    with raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
        reader = dispatch.DeadlineReader(client)
        headers = dispatch.parse_header_lines(dispatch.read_head(reader)[1:])
        names = [name.lower() for name, _ in headers]
        assert "content-length" not in names and ("Transfer-Encoding", "chunked") in headers
        assert ("Trailer", "X-T") in headers
        assert reader.read(len(b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n")) == b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"


def test_repeated_content_length_is_passed_on_as_one(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    server, heads = raw_origin(make_server, b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok")
    request = f"PUT http://127.0.0.1:{server.port}/ HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello".encode()
    with raw_client(proxy) as client:
        client.sendall(request)
        reader = dispatch.DeadlineReader(client)
        lines = dispatch.read_head(reader)
    assert [line for line in lines if line.lower().startswith("content-length")] == ["Content-Length: 2"]
    assert heads[0].count(b"Content-Length") == 1 and b"\r\nContent-Length: 5\r\n" in heads[0]


def test_an_empty_reason_phrase_keeps_its_space(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    server, _ = raw_origin(make_server, b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok")
    with raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
        assert recv_exactly(client, len(b"HTTP/1.1 200 \r\n")) == b"HTTP/1.1 200 \r\n"


def test_a_response_head_as_big_as_real_sites_send_gets_through(
    proxy: Dispatcher, make_server: Callable[..., Server]
) -> None:
    policy = "default-src 'self'; " + "script-src https://cdn.example " * 400  # over 12 KB on one line
    cookies = "".join(f"Set-Cookie: c{index}={'v' * 3000}\r\n" for index in range(20))  # 60 KB of head
    server, _ = raw_origin(
        make_server,
        f"HTTP/1.1 200 OK\r\nContent-Security-Policy: {policy}\r\n{cookies}Content-Length: 2\r\n\r\nok".encode(),
    )
    status, headers, body = http_exchange(proxy, f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
    assert (status, headers["content-security-policy"], body) == (200, policy.strip(), b"ok")


def test_a_response_head_past_its_limit_gets_502(proxy: Dispatcher, make_server: Callable[..., Server]) -> None:
    line = "X-Big: " + "a" * dispatch.MAX_RESPONSE_HEADER_LINE
    server, _ = raw_origin(make_server, f"HTTP/1.1 200 OK\r\n{line}\r\nContent-Length: 2\r\n\r\nok".encode())
    status = http_exchange(proxy, f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())[0]
    assert status == 502


def test_an_origin_reset_during_the_request_body_is_the_origins_failure(
    proxy: Dispatcher, make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    def reset_after_the_head(conn: socket.socket) -> None:
        read_request_head(conn)
        _reset(conn)

    server = make_server(reset_after_the_head)
    body = b"b" * 8_000_000
    request = f"POST http://127.0.0.1:{server.port}/ HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with raw_client(proxy) as client:
        client.sendall(request)
        with contextlib.suppress(OSError):  # the proxy may stop reading before the end
            client.sendall(body)
        status, _, answer = read_response(client)
    assert status == 502 and b"during the request body" in answer
    wait_until_all_closed(proxy)
    (exchange,) = exchanges(log)
    assert exchange.result.startswith("502 the origin failed") and "hung up" not in exchange.result


class H11Origin:
    """An origin built on h11: it records each request it reads (or the
    protocol error it met) and answers ``200 ok``."""

    def __init__(self, make_server: Callable[..., Server]) -> None:
        self.requests: list[tuple[str, Framed]] = []
        self.errors: list[str] = []
        self.server = make_server(self.serve)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def serve(self, conn: socket.socket) -> None:
        connection = h11.Connection(h11.SERVER)
        fields: list[tuple[str, str]] = []
        target, body = "", b""
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(conn.recv(65536))
                elif isinstance(event, h11.Request):
                    target, fields, body = event.target.decode(), as_text(event.headers.raw_items()), b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.requests.append((target, Framed(fields, body, as_text(event.headers.raw_items()), b"")))
                    answer = h11.Response(status_code=200, headers=[("Content-Length", "2")])
                    conn.sendall(connection.send(answer) + connection.send(h11.Data(data=b"ok")))
                    conn.sendall(connection.send(h11.EndOfMessage()) or b"")
                    connection.start_next_cycle()
                else:
                    return
        except h11.RemoteProtocolError as error:
            if connection.their_state is not h11.IDLE:
                self.errors.append(str(error))


def end_to_end(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fields as they should arrive, leaving aside those a proxy writes itself."""
    own = {"host", "via", "connection", "content-length", "transfer-encoding"}
    return [(name, value) for name, value in hop_free(fields) if name not in own]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_requests_reach_an_h11_origin_as_h11_reads_them_or_get_400(
    proxy: Dispatcher, make_server: Callable[..., Server], data: st.DataObject
) -> None:
    origin = H11Origin(make_server)
    message = data.draw(raw_messages(True)).replace(b"http://example.com", origin.url.encode())
    with contextlib.closing(origin.server), raw_client(proxy) as client:  # see the responses' test
        answer = round_trip(client, message)
    statuses = response_statuses(answer)
    if statuses[0] == 400:
        assert not origin.requests  # nothing reached the origin whole
        return
    expected = h11_reads(message, request=True)
    assert expected is not None, "forwarded what h11 refuses"
    assert not origin.errors
    target, first = origin.requests[0]
    assert (target, first.body, end_to_end(first.fields)) == ("/p", expected.body, end_to_end(expected.fields))
    assert hop_free(first.trailer) == hop_free(expected.trailer)
    if expected.rest == NEXT_REQUEST:  # the next request starts where h11 says it does
        assert statuses == [200, 200] and origin.requests[1][0] == "/next"


def response_statuses(answer: bytes) -> list[int]:
    """The status of each response in ``answer``, all framed by Content-Length."""
    reader = dispatch.DeadlineReader(None, data=answer)
    statuses = []
    while reader.has_more():
        lines = dispatch.read_head(reader)
        fields = {name.lower(): value for name, value in dispatch.parse_header_lines(lines[1:])}
        reader.read(int(fields["content-length"]))
        statuses.append(int(lines[0].split()[1]))
    return statuses


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_responses_reach_the_client_as_h11_reads_them_or_get_502_or_a_reset(
    proxy: Dispatcher, make_server: Callable[..., Server], data: st.DataObject
) -> None:
    message = data.draw(raw_messages(False))
    server, _ = raw_origin(make_server, message)
    # Each example's origin goes with it: 300 of them open at once would
    # take descriptors past what select() takes (DISPATCH_PORTABLE=1).
    with contextlib.closing(server), raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        try:
            answer = read_all(client)
        except ConnectionResetError:
            return  # an abort passed on: the client knows the response is not whole
    if answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"\r\n\r\n502 Bad Gateway: " in answer:
        return
    expected = h11_reads(message, request=False)
    assert expected is not None, "passed on what h11 refuses"
    received = h11_reads(answer, request=False)
    assert received is not None, "h11 refuses what the client got"
    assert (received.body, end_to_end(received.fields)) == (expected.body, end_to_end(expected.fields))
    assert hop_free(received.trailer) == hop_free(expected.trailer)


def test_credentials_are_required_when_set(
    make_proxy: Callable[..., Dispatcher], origin: str, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(credentials={"alice": "s3cret"})
    request = f"GET {origin}/ HTTP/1.1\r\n".encode()
    status, headers, _ = http_exchange(proxy, request + b"\r\n")
    assert (status, headers["proxy-authenticate"]) == (407, 'Basic realm="dispatch"')
    wrong = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:guess") + b"\r\n\r\n"
    assert http_exchange(proxy, request + wrong)[0] == 407
    assert curl("-x", proxy_url(proxy), "-U", "alice:s3cret", origin + "/in").startswith("GET /in")
    assert curl("-p", "-x", proxy_url(proxy), "-U", "alice:s3cret", origin + "/tunnel").startswith("GET /tunnel")
    proxy.shutdown()
    # Both the forwarded request and the tunnel name the user; the password never shows.
    users = {exchange.target: exchange.user for exchange in exchanges(log)}
    assert users[f"GET {origin}/in"] == users[origin[len("http://") :]] == "'alice'"
    assert "s3cret" not in log.text


def test_one_log_record_per_http_request(
    make_proxy: Callable[..., Dispatcher], origin: str, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(["127.0.0.2"])
    curl("-x", proxy_url(proxy), origin + "/a", origin + "/b")
    proxy.shutdown()
    requests = [exchange for exchange in exchanges(log) if exchange.target.startswith("GET ")]
    assert [exchange.target for exchange in requests] == [f"GET {origin}/a", f"GET {origin}/b"]
    assert [(exchange.via.describe(), exchange.result) for exchange in requests] == [("127.0.0.2", "200")] * 2


def test_responses_carry_via_and_a_refused_login_names_its_user(
    make_proxy: Callable[..., Dispatcher], origin: str, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(credentials={"alice": "s3cret"})
    request = f"GET {origin}/ HTTP/1.1\r\n".encode()
    login = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n\r\n"
    status, headers, _ = http_exchange(proxy, request + login)
    assert (status, headers["via"]) == (200, f"1.1 {proxy.upstream.pseudonym}")  # RFC 9110, 7.6.3
    wrong = b"Proxy-Authorization: Basic " + base64.b64encode(b"mallory:guess") + b"\r\n\r\n"
    assert http_exchange(proxy, request + wrong)[0] == 407
    proxy.shutdown()
    refused = [exchange for exchange in exchanges(log) if exchange.result.startswith("407")]
    assert [exchange.user for exchange in refused] == ["'mallory'"]
    assert "guess" not in log.text


def test_request_that_names_this_proxy_in_its_via_is_refused_as_a_loop(
    proxy: Dispatcher, origin: str, log: pytest.LogCaptureFixture
) -> None:
    own = f"Via: 1.0 upstream.example, 1.1 {proxy.upstream.pseudonym}\r\n"
    for request in (f"GET {origin}/x HTTP/1.1\r\n{own}\r\n", f"CONNECT 127.0.0.1:7 HTTP/1.1\r\n{own}\r\n"):
        status, _, body = http_exchange(proxy, request.encode())
        assert (status, body) == (
            508,
            b"508 Loop Detected: a forwarding loop: the request came back (its Via names this proxy)\n",
        )
    another_dispatch = f"GET {origin}/x HTTP/1.1\r\nVia: 1.1 dispatch-00000000\r\n\r\n"
    assert http_exchange(proxy, another_dispatch.encode())[0] == 200
    wait_until_all_closed(proxy)
    proxy.shutdown()
    assert [exchange.result[:3] for exchange in exchanges(log)] == ["508", "508", "200"]


def test_two_proxies_each_others_upstream_end_a_request_after_one_round(
    make_proxy: Callable[..., Dispatcher], origin: str, log: pytest.LogCaptureFixture
) -> None:
    """Each proxy names itself in Via, on requests and on CONNECT, and
    passes on the Via a CONNECT came with: the request that comes back is
    refused. Connections are capped, so that a loop not found would end."""
    port = free_port()
    second = make_proxy([f"http://127.0.0.1:{port}"], max_connections=50)
    first = make_proxy([f"http://127.0.0.1:{second.address[1]}"], port=port, max_connections=50)
    assert http_exchange(first, f"GET {origin}/x HTTP/1.1\r\n\r\n".encode())[0] == 508
    assert http_exchange(first, b"CONNECT 127.0.0.1:7 HTTP/1.1\r\n\r\n")[0] == 502
    for proxy in (first, second):
        wait_until_all_closed(proxy)
        proxy.shutdown()
    results = [exchange.result for exchange in exchanges(log)]
    # Through the first, the second, and back to the first, which refuses it.
    assert (
        len(results) == 6
        and results.count("508 a forwarding loop: the request came back (its Via names this proxy)") == 2
    )


# Answering the local pages -------------------------------------------------


def http_get(
    address: tuple[str, int], path: str, headers: str = "", host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the proxy's own port, as a browser visits a web
    server: by default, with the address in the Host header."""
    if host is None:
        host = f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n".encode())
        return read_response(sock)


STATUS_TYPES = (
    dispatch.Status,
    dispatch.Totals,
    dispatch.History,
    dispatch.AddressHistory,
    dispatch.StatsRow,
    dispatch.BondStatus,
    dispatch.BondMember,
    dispatch.BondCarried,
    dispatch.CapReport,
    dispatch.LinkReport,
)


def json_faults(value: Any, hint: Any, where: str = "status") -> list[str]:
    """Where parsed JSON ``value`` differs from the type ``hint`` (a TypedDict,
    nested): a key missing or not of the type, a value of another type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if typing.is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is no object"]
        hints = typing.get_type_hints(hint)
        assert hints.keys() == hint.__required_keys__ | hint.__optional_keys__
        faults = [f"{where}: no {key}" for key in sorted(hint.__required_keys__ - value.keys())]
        faults += [f"{where}: {key} is not in {hint.__name__}" for key in sorted(value.keys() - hints.keys())]
        for key in sorted(value.keys() & hints.keys()):
            faults += json_faults(value[key], hints[key], f"{where}.{key}")
        return faults
    if origin in (typing.Union, types.UnionType):
        branches = [json_faults(value, branch, where) for branch in args]
        return [] if any(not faults for faults in branches) else [f"{where}: {value!r} is not {hint}"]
    if origin is typing.Literal:
        return [] if any(type(value) is type(arg) and value == arg for arg in args) else [f"{where}: {value!r}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is no list"]
        return [fault for i, item in enumerate(value) for fault in json_faults(item, args[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {value!r} is no object"]
        return [fault for key, item in value.items() for fault in json_faults(item, args[1], f"{where}[{key!r}]")]
    if hint in (int, float, str, type(None)):  # exactly: JSON tells 1 from 1.0, and a bool is no int
        return [] if type(value) is hint else [f"{where}: {value!r} is not {hint.__name__}"]
    raise TypeError(f"{where}: no check for {hint}")


def test_the_json_check_finds_missing_extra_and_mistyped_fields() -> None:
    status = json.loads(json.dumps(sample_status()))
    assert json_faults(status, dispatch.Status) == []
    status["addresses"][0]["colour"] = "red"
    del status["totals"]["failed"]
    status["history"]["addresses"]["10.42.0.7"]["rate_up"][0] = "fast"
    status["addresses"][1]["state"] = "asleep"
    status["addresses"][2]["connections"] = 1.0
    status["uptime"] = None
    assert json_faults(status, dispatch.Status) == [
        "status.addresses[0]: colour is not in StatsRow",
        "status.addresses[1].state: 'asleep'",
        "status.addresses[2].connections: 1.0 is not int",
        "status.history.addresses['10.42.0.7'].rate_up[0]: 'fast' is not float",
        "status.totals: no failed",
        "status.uptime: None is not float",
    ]


def test_stats_json_of_a_running_proxy_is_exactly_the_typed_status(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, fake_interfaces: FakeInterfaces, tmp_path: Any
) -> None:
    state = str(tmp_path / "state.json")
    dispatch.write_state(state, {"127.0.0.2": 2_000_000.0})
    fake_interfaces.interfaces["fake0"] = []  # a row waiting for an address
    proxy = make_proxy(["127.0.0.2", "127.0.0.3@backup", "fake0"], state_file=state)
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"traffic") == b"traffic"
    wait_until_all_closed(proxy)
    proxy.meter.sample()  # rates in the history now, rather than in up to 2 s
    code, _, body = http_get(proxy.address, "/stats.json")
    served = json.loads(body)
    assert code == 200 and json_faults(served, dispatch.Status) == []
    rows = served["addresses"]
    # Every kind of row and value is in it: None and a number, each state here.
    assert {(row["ip"], row["state"]) for row in rows} == {
        ("127.0.0.2", "up"),
        ("127.0.0.3", "standby"),
        (None, "waiting"),
    }
    assert {row["capacity_source"] for row in rows} == {"remembered", "not measured"}
    assert served["history"]["addresses"]["127.0.0.2"]["rate_up"]


def test_the_pages_page_names_every_field_of_stats_json() -> None:
    with open(os.path.join(os.path.dirname(__file__), "docs", "pages.md"), encoding="utf-8") as file:
        page = file.read()
    described = re.search(r"^- `/stats\.json`:.*?(?=^- |^$)", page, re.M | re.S)
    assert described is not None
    named = set(re.findall(r"`(?:dispatch\.)?(\w+)`", described.group(0)))
    for typed in STATUS_TYPES:
        assert typed.__name__ in named
        missing = set(typing.get_type_hints(typed)) - named
        assert not missing, f"{typed.__name__}: {sorted(missing)}"


def test_the_proxys_port_serves_its_pages(proxy: Dispatcher, echo_server: Server) -> None:
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"traffic") == b"traffic"
    wait_until_all_closed(proxy)
    proxy.meter.sample()  # a point in the history now, rather than in up to 2 s
    status, headers, body = http_get(proxy.address, "/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert headers["content-security-policy"] == dispatch.STATUS_PAGE_CSP
    page = body.decode()
    assert ">127.0.0.1<" in page and "lo" in page and "<polyline" in page
    status, headers, body = http_get(proxy.address, "/stats.json?fresh")
    assert (status, headers["content-type"]) == (200, "application/json")
    served = json.loads(body)
    assert served.keys() == proxy.status().keys()
    assert [(row["ip"], row["bytes_up"]) for row in served["addresses"]] == [("127.0.0.1", 7)]
    status, headers, body = http_get(proxy.address, "/metrics")
    assert (status, headers["content-type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert metric_samples(metric_families(body.decode())["dispatch_bytes_sent"]) == {("127.0.0.1", "127.0.0.1"): 7}
    status, headers, body = http_get(proxy.address, "/proxy.pac")
    assert (status, headers["content-type"]) == (200, "application/x-ns-proxy-autoconfig")
    port = proxy.address[1]
    assert f'"SOCKS5 127.0.0.1:{port}; SOCKS 127.0.0.1:{port}; PROXY 127.0.0.1:{port}"' in body.decode()
    status, headers, body = http_get(proxy.address, "/nothing<here>")
    assert status == 404 and b'<a href="/">' in body and b"&lt;here&gt;" in body


def test_pages_ask_for_the_login_but_the_pac_file_does_not(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(credentials={"alice": "s3cret"})
    for path in ("/", "/stats.json", "/metrics"):
        status, headers, body = http_get(proxy.address, path)
        assert (status, headers["www-authenticate"]) == (401, 'Basic realm="dispatch", charset="UTF-8"')
        assert b"alice" not in body and b"s3cret" not in body
    wrong = "Authorization: Basic " + base64.b64encode(b"alice:guess").decode() + "\r\n"
    assert http_get(proxy.address, "/metrics", wrong)[0] == 401
    login = "Authorization: Basic " + base64.b64encode(b"alice:s3cret").decode() + "\r\n"
    for path in ("/", "/stats.json", "/metrics"):
        status, _, body = http_get(proxy.address, path, login)
        assert status == 200 and b"s3cret" not in body and b"alice" not in body
    assert http_get(proxy.address, "/proxy.pac")[0] == 200


def test_no_page_answers_404(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(pages=False)
    for path in ("/", "/stats.json", "/metrics", "/proxy.pac"):
        assert http_get(proxy.address, path)[0] == 404


def test_a_client_outside_the_allow_list_gets_no_page(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(allow=["10.0.0.0/8"])
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /stats.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_by_proxy(sock)


def test_the_page_keeps_the_connection_for_the_next_request(proxy: Dispatcher) -> None:
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        for path in ("/stats.json", "/metrics", "/"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            reader = dispatch.DeadlineReader(sock)
            lines = dispatch.read_head(reader)
            headers = {name.lower(): value for name, value in dispatch.parse_header_lines(lines[1:])}
            assert lines[0] == "HTTP/1.1 200 OK"
            assert len(reader.read(int(headers["content-length"]))) == int(headers["content-length"])
            assert not reader.buffered


@pytest.mark.parametrize("host", ["rebound.example", "rebound.example:1080", "127.0.0.1.nip.io", "", "[::1"])
def test_pages_refuse_a_host_that_names_no_address_of_the_proxy(proxy: Dispatcher, host: str) -> None:
    """A web page that points its own name at 127.0.0.1 (DNS rebinding) must
    not read the pages: the browser sends that name as Host."""
    for path in ("/", "/stats.json", "/metrics"):
        status, _, body = http_get(proxy.address, path, host=host)
        assert status == 403
        assert body == b"403 Forbidden: the Host header names no address of this proxy (see --page-host)\n"
        assert b"127.0.0.1" not in body


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.:1080", "127.0.0.1", "127.0.0.1:9", "127.5.6.7", "[::1]:80"])
def test_pages_answer_localhost_and_loopback_hosts(proxy: Dispatcher, host: str) -> None:
    assert http_get(proxy.address, "/stats.json", host=host)[0] == 200


def test_pages_answer_a_host_given_as_a_page_host(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(page_hosts=["Router.LAN", "[fd00::7]"])
    assert http_get(proxy.address, "/metrics", host="router.lan:1080")[0] == 200
    assert http_get(proxy.address, "/metrics", host="[fd00::7]:1080")[0] == 200
    assert http_get(proxy.address, "/metrics", host="other.lan")[0] == 403


def test_pages_answer_the_address_the_client_reached(
    make_proxy: Callable[..., Dispatcher], fake_interfaces: FakeInterfaces
) -> None:
    """As a phone on the LAN asks http://192.168.1.5:1080/: here 127.0.0.9,
    which the proxy listens on, stands for the LAN address."""
    proxy = make_proxy(host="0.0.0.0", allow=["127.0.0.0/8"])
    port = proxy.address[1]
    assert http_get(("127.0.0.9", port), "/stats.json", host=f"127.0.0.9:{port}")[0] == 200
    # Not a loopback address, nor the one reached: refused.
    assert http_get(("127.0.0.9", port), "/stats.json", host=f"192.0.2.7:{port}")[0] == 403


def test_the_pac_file_answers_any_host(proxy: Dispatcher) -> None:
    """Systems fetch it by whatever name they were given, and it holds only the proxy's address."""
    status, _, body = http_get(proxy.address, "/proxy.pac", host="wpad.lan")
    assert status == 200 and b"SOCKS5 127.0.0.1:" in body


def test_cli_page_host_reaches_the_pages(tmp_path: Any) -> None:
    answers: list[int] = []

    def use(running: Listening, stop: Callable[[], None]) -> None:
        answers.append(http_get(running.address, "/", host="dispatch.home.arpa")[0])
        answers.append(http_get(running.address, "/", host="elsewhere.example")[0])

    arguments = ["--page-host", "dispatch.home.arpa", "127.0.0.1"]
    assert run_cli(arguments, use, str(tmp_path / "log")) == 0
    assert answers == [200, 403]


def test_cli_bad_page_host_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["start", "--page-host", "a b", "127.0.0.1"])
    assert exit_.value.code == 2
    assert "argument --page-host: 'a b' is not a host name or IP address" in capsys.readouterr().err


def page_exchange(proxy: Dispatcher, request: bytes) -> list[bytes]:
    """Send ``request`` on one connection; the status line of each response, until the proxy closes."""
    statuses = []
    with raw_client(proxy) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reader = dispatch.DeadlineReader(sock)
        with contextlib.suppress(ConnectionResetError, dispatch.ProtocolError):
            while reader.has_more():
                lines = dispatch.read_head(reader)
                headers = {name.lower(): value for name, value in dispatch.parse_header_lines(lines[1:])}
                reader.read(int(headers["content-length"]))
                statuses.append(lines[0].encode())
    return statuses


@pytest.mark.parametrize(
    "method, path", [("POST", "/"), ("POST", "/stats.json"), ("PUT", "/nothing"), ("GET", "/metrics")]
)
def test_a_page_requests_body_is_never_read_as_the_next_request(
    proxy: Dispatcher, echo_server: Server, log: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    smuggled = f"GET http://{echo_server.host}:{echo_server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
        + smuggled
        + b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    statuses = page_exchange(proxy, request)
    assert len(statuses) == 2 and statuses[1] == b"HTTP/1.1 200 OK"  # the body was dropped, the next one served
    assert [record.target for record in exchanges(log) if "http://" in record.target] == []
    assert not echo_server.connections


@pytest.mark.parametrize(
    "framing, status",
    [
        (b"Transfer-Encoding: chunked\r\n", b"HTTP/1.1 413 Request Entity Too Large"),
        (b"Content-Length: 1000000\r\n", b"HTTP/1.1 413 Request Entity Too Large"),
        (b"Content-Length: x\r\n", b"HTTP/1.1 400 Bad Request"),
    ],
)
def test_a_page_request_with_a_body_it_does_not_read_is_refused_and_closed(
    proxy: Dispatcher, echo_server: Server, framing: bytes, status: bytes
) -> None:
    smuggled = f"GET http://{echo_server.host}:{echo_server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    request = b"POST / HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n" + b"0\r\n\r\n" + smuggled
    assert page_exchange(proxy, request) == [status]
    assert not echo_server.connections


# ---------------------------------------------------------------------------
# Transparent sessions: DNS answers, site names
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("rdtype", "ips"), [("A", ["192.0.2.7", "192.0.2.8"]), ("AAAA", ["2001:db8::7"])])
def test_a_dns_query_is_answered_with_its_addresses_as_dnspython_reads_them(rdtype: str, ips: list[str]) -> None:
    import dns.message

    asked = dns.message.make_query("WWW.Example.test", rdtype)
    query = dispatch.parse_dns_query(asked.to_wire())
    assert (query.name, query.rdtype, query.recursion_desired) == ("www.example.test", asked.question[0].rdtype, True)
    answer = dns.message.from_wire(dispatch.dns_answer(query, ips))
    assert answer.id == asked.id and answer.rcode() == 0 and answer.question == asked.question
    assert [str(item) for rrset in answer.answer for item in rrset] == ips
    assert {rrset.ttl for rrset in answer.answer} == {dispatch.DNS_ANSWER_TTL}
    nothing = dns.message.from_wire(dispatch.dns_answer(query, [], dispatch.DNS_NXDOMAIN))
    assert (nothing.rcode(), nothing.answer) == (3, [])


@pytest.mark.parametrize(
    "message",
    [b"", b"\x00" * 11, bytes.fromhex("1234 8180 0001 0000 0000 0000") + b"\x00\x00\x01\x00\x01", b"\x12\x34" * 6],
)
def test_what_is_no_standard_query_of_one_question_is_not_parsed_as_one(message: bytes) -> None:
    with pytest.raises(ValueError):
        dispatch.parse_dns_query(message)


@pytest.mark.parametrize(("rdtype", "answered"), [("A", True), ("AAAA", True), ("MX", False), ("TXT", False)])
def test_only_address_queries_are_answered_by_dispatch(rdtype: str, answered: bool) -> None:
    import dns.message

    query = dispatch.address_query(dns.message.make_query("example.test", rdtype).to_wire())
    assert (query is not None) == answered
    assert dispatch.address_query(b"\x12\x34" * 6) is None  # no query at all: relayed as it came


def client_hello(server_hostname: str | None) -> bytes:
    """The first bytes a TLS client sends, as Python's ssl module writes them."""
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = server_hostname is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing, server_hostname=server_hostname).do_handshake()
    return outgoing.read()


def test_a_tls_client_hello_names_its_server_and_a_part_of_one_names_none() -> None:
    hello = client_hello("Video.Example.test")
    assert dispatch.tls_server_name(hello) == "video.example.test"
    assert dispatch.tls_server_name(client_hello(None)) is None
    assert dispatch.tls_server_name(hello[:40]) is None
    assert dispatch.tls_server_name(b"GET / HTTP/1.1\r\n\r\n") is None


@pytest.mark.parametrize(
    ("head", "host"),
    [
        (b"GET / HTTP/1.1\r\nHost: Example.test\r\n\r\n", "example.test"),
        (b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: example.test:8080\r\n\r\n", "example.test"),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "2001:db8::1"),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: body.test", None),
    ],
)
def test_an_http_request_head_names_its_host(head: bytes, host: str | None) -> None:
    assert dispatch.http_host(head) == host


def test_site_names_are_kept_for_their_ttl_the_last_one_given_winning() -> None:
    clock = FakeClock()
    names = dispatch.SiteNames(max_entries=2, clock=clock)
    names.remember(["192.0.2.7"], "a.test", 60)
    names.remember(["192.0.2.7", "192.0.2.8"], "b.test", 30)
    assert names.name_of("192.0.2.7") == "b.test"
    clock.now += 31
    assert names.name_of("192.0.2.7") is None
    names.remember(["192.0.2.9"], "c.test", 60)
    names.remember(["192.0.2.10"], "d.test", 60)
    assert names.name_of("192.0.2.9") == "c.test" and names.name_of("192.0.2.8") is None  # two kept at most


# ---------------------------------------------------------------------------
# Firewall rules: transparent mode's nftables table
# ---------------------------------------------------------------------------


def rules_script(**fields: Any) -> str:
    options: dict[str, Any] = {"port": 1082, "lan": {"lan0": ["10.99.0.0/24", "fd00:99::/64"]}, "local": True}
    return dispatch.TransparentRules(**{**options, **fields}).script()


def chain_lines(script: str, name: str) -> list[str]:
    """The rules of chain ``name`` in ``script``, one a line, without the chain's head."""
    lines = [line.strip() for line in script.splitlines()]
    start = lines.index(f"chain {name} {{")
    return lines[start + 2 : lines.index("}", start)]


def test_rules_replace_a_table_left_behind_in_one_transaction() -> None:
    lines = rules_script().splitlines()
    body = [line for line in lines if not line.startswith("#")]
    assert body[:3] == ["table inet dispatch", "delete table inet dispatch", "table inet dispatch {"]
    assert sum(line.startswith("table ") for line in lines) == 2  # the one to replace, and the new one


@pytest.mark.parametrize("chain", ["prerouting", "output"])
def test_rules_let_dispatchs_own_mark_pass_before_anything_else(chain: str) -> None:
    rules = chain_lines(rules_script(mark=0x10), chain)
    assert rules[0] == "meta mark 0x10 return"
    assert rules[-1].endswith("meta l4proto tcp redirect to :1082")
    assert all(rule.endswith(" return") for rule in rules[:-1])


@pytest.mark.parametrize("chain", ["prerouting", "output"])
def test_rules_never_redirect_this_machine_loopback_link_local_multicast_broadcast_or_the_lans_networks(
    chain: str,
) -> None:
    rules = chain_lines(rules_script(), chain)
    assert "fib daddr type { local, broadcast, multicast } return" in rules
    v4 = "ip daddr { 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 255.255.255.255, 10.99.0.0/24 } return"
    assert v4 in rules
    assert "ip6 daddr { ::1, fe80::/10, ff00::/8, fd00:99::/64 } return" in rules


def test_rules_redirect_the_lans_forwarded_tcp_and_this_machines_only_as_asked() -> None:
    lan_only = rules_script(local=False)
    assert 'iifname { "lan0" } meta l4proto tcp redirect to :1082' in chain_lines(lan_only, "prerouting")
    assert "chain output" not in lan_only
    local_only = rules_script(lan={})
    assert "chain prerouting" not in local_only and "chain output" in local_only


def test_rules_hand_udp_to_tproxy_marked_for_the_route_to_this_machine() -> None:
    script = rules_script(mark=0x10, table=300)
    divert = chain_lines(script, "divert")
    assert divert[0] == "meta mark 0x10 return"  # dispatch's own datagrams pass first
    udp = "meta l4proto udp meta nfproto ipv4 tproxy ip to :1082"
    assert f'iifname {{ "lan0" }} {udp} meta mark set 0x11 accept' in divert
    assert f'iifname "lo" meta mark 0x11 {udp} accept' in divert  # this machine's own, routed back in
    assert chain_lines(script, "reroute")[-1] == "meta l4proto udp meta mark set 0x11"
    assert "'ip rule add fwmark 0x11 lookup 300'" in script.splitlines()[1]


def test_dispatch_rules_prints_the_script_of_local(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["rules", "--transparent", "1082", "--local", "--mark", "0x10"]) == 0
    assert capsys.readouterr().out == dispatch.TransparentRules(1082, {}, True, 0x10).script()


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["rules", "--transparent", "1082"], "say what to redirect: --lan IFACE (repeatable), --local, or both"),
        (["rules", "--transparent", "1082", "--lan", "no-such-lan0"], "--lan no-such-lan0: no such interface here"),
        (["rules", "--transparent", "1082", "--local", "--mark", "0"], "'0' is not a firewall mark"),
        (["start", "--lan", "eth0"], "--lan, --local and --apply-rules are for transparent mode"),
        (["start", "--transparent", "0", "--apply-rules"], "--apply-rules needs something to redirect"),
    ],
)
def test_transparent_mode_options_out_of_place_are_one_line_and_exit_2(
    arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.suppress(SystemExit):
        assert dispatch.main(arguments) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1, err


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_transparent_mode_is_refused_on_macos_and_windows_pointing_to_the_system_proxy_and_pac_file(
    platform: str,
) -> None:
    said = dispatch.transparent_refusal(apply_rules=False, platform=platform)
    assert said is not None and said.startswith("--transparent works on Linux only")
    assert "--system-proxy points the system's proxy settings at dispatch" in said and "proxy.pac" in said


# ---------------------------------------------------------------------------
# Desktop proxy settings: pointed here, saved first, put back
# ---------------------------------------------------------------------------


class GSettings:
    """The real gsettings, on the test's own keyfile (see own_desktop_settings)."""

    schema = "org.gnome.system.proxy"

    def __call__(self, *arguments: str) -> str:
        return subprocess.run(["gsettings", *arguments], capture_output=True, text=True, check=True).stdout.strip()

    def every_key(self) -> str:
        """Every key of the proxy schemas and its value, as gsettings lists them."""
        return self("list-recursively", self.schema)

    def keyfile(self) -> dict[str, dict[str, str]]:
        """The keys written down (those not at their default), by group."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(os.path.join(os.environ["XDG_CONFIG_HOME"], "glib-2.0", "settings", "keyfile"))
        return {group: dict(parser[group]) for group in parser.sections() if parser[group]}

    def proxy(self) -> tuple[str, str]:
        """The HTTP proxy the settings name."""
        return self("get", f"{self.schema}.http", "host").strip("'"), self("get", f"{self.schema}.http", "port")


@pytest.fixture
def gnome(monkeypatch: pytest.MonkeyPatch) -> GSettings:
    """A GNOME desktop whose proxy settings point at another proxy, with a
    bypass list of its own: what --system-proxy must put back exactly."""
    if shutil.which("gsettings") is None:
        pytest.skip("gsettings is not installed (apt-get install libglib2.0-bin gsettings-desktop-schemas)")
    if subprocess.run(["gsettings", "list-keys", GSettings.schema], capture_output=True).returncode != 0:
        pytest.skip("the schema org.gnome.system.proxy is not installed (apt-get install gsettings-desktop-schemas)")
    monkeypatch.setenv("XDG_CURRENT_DESKTOP", "ubuntu:GNOME")
    gsettings = GSettings()
    gsettings("set", GSettings.schema, "mode", "manual")
    gsettings("set", f"{GSettings.schema}.http", "host", "proxy.example")
    gsettings("set", f"{GSettings.schema}.http", "port", "3128")
    gsettings("set", GSettings.schema, "ignore-hosts", "['intranet.example', '10.0.0.0/8']")
    return gsettings


def start_script(script: Callable[[list[str]], subprocess.Popen], *arguments: str) -> tuple[subprocess.Popen, int, str]:
    """``dispatch start ARGUMENTS 127.0.0.1`` on a free port, as a user runs
    it; returns the process, its port and what it printed up to its log line."""
    port = refused_port()
    process = script(["start", "--port", str(port), *arguments, "127.0.0.1"])
    assert process.stdout is not None
    lines = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if line.startswith("log:"):
            break
    return process, port, "".join(lines)


def stop_script(process: subprocess.Popen) -> str:
    """SIGTERM; what it printed until it ended, with status 0 and nothing on stderr."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=TIMEOUT)
    assert (process.returncode, err) == (0, "")
    return out


def run_dispatch(*arguments: str) -> subprocess.CompletedProcess[str]:
    """``python dispatch.py ARGUMENTS`` to its end."""
    command = [sys.executable, os.path.join(HERE, "dispatch.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT * 3, check=False)


def test_system_proxy_points_gnome_settings_here_and_puts_every_key_back(
    gnome: GSettings, script: Callable[[list[str]], subprocess.Popen], origin: str
) -> None:
    """While it runs, a program that reads the settings reaches the origin
    through them, and /stats.json and --stats say they are set; at stop every key is
    as it was (the other proxy, its bypass list), and a key that was at its
    default is at its default again, not written down."""
    every_key, keyfile = gnome.every_key(), gnome.keyfile()
    process, port, banner = start_script(script, "--system-proxy", "--stats", "3600")
    assert "system proxy: set by this dispatch" in banner
    assert gnome.proxy() == ("127.0.0.1", str(port))
    assert gnome("get", f"{GSettings.schema}.socks", "port") == str(port)
    assert gnome("get", GSettings.schema, "mode") == "'manual'"
    assert "'192.168.0.0/16'" in gnome("get", GSettings.schema, "ignore-hosts")
    host, named_port = gnome.proxy()
    request = f"GET {origin}/through-the-settings HTTP/1.1\r\nHost: {origin[7:]}\r\n\r\n".encode()
    status, _, body = http_exchange(Listening((host, int(named_port))), request)
    assert (status, body.split(b"\n")[0]) == (200, b"GET /through-the-settings")
    _, _, stats = http_get(("127.0.0.1", port), "/stats.json")
    assert json.loads(stats)["system_proxy"].startswith("set by this dispatch")
    out = stop_script(process)
    assert "system proxy: set by this dispatch" in out  # the last --stats table's line
    assert out.rstrip().endswith("dispatch: the proxy settings are put back as they were")
    assert (gnome.every_key(), gnome.keyfile()) == (every_key, keyfile)


# What a GIO program (GTK, GNOME's own) is told to use for a URI: its proxies.
GIO_LOOKUP = """
import sys
from gi.repository import Gio
print(" ".join(Gio.ProxyResolver.get_default().lookup(sys.argv[1], None)))
"""


def gio_python() -> str | None:
    """A Python with GIO's bindings (python3-gi), and GIO's GNOME proxy
    resolver (glib-networking), if this machine has them."""
    for python in {"/usr/bin/python3", shutil.which("python3") or ""} - {""}:
        probe = "from gi.repository import Gio; assert 'Gnome' in type(Gio.ProxyResolver.get_default()).__name__"
        if os.path.exists(python) and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    return None


def test_gio_programs_follow_the_system_proxy_while_it_runs(
    gnome: GSettings, script: Callable[[list[str]], subprocess.Popen]
) -> None:
    python = gio_python()
    if python is None:
        pytest.skip("no GIO proxy resolver to ask (apt-get install python3-gi glib-networking)")

    def proxies(uri: str) -> str:
        return subprocess.run([python, "-c", GIO_LOOKUP, uri], capture_output=True, text=True, check=True).stdout

    assert proxies("http://example.com/") == "http://proxy.example:3128\n"
    process, port, _ = start_script(script, "--system-proxy")
    assert proxies("http://example.com/") == f"http://127.0.0.1:{port}\n"
    assert proxies("https://example.com/") == f"http://127.0.0.1:{port}\n"
    assert proxies("http://192.168.1.1/") == "direct://\n"
    stop_script(process)
    assert proxies("http://example.com/") == "http://proxy.example:3128\n"


def test_system_proxy_killed_is_put_back_by_the_next_start(
    gnome: GSettings, script: Callable[[list[str]], subprocess.Popen]
) -> None:
    """A dispatch killed (SIGKILL) leaves the settings on its dead port; the
    next start puts the first settings back, says so, and does not save the
    leftovers as the settings before: after its own stop the first ones are back."""
    every_key = gnome.every_key()
    killed, port, _ = start_script(script, "--system-proxy")
    killed.kill()
    killed.wait()
    assert gnome.proxy() == ("127.0.0.1", str(port))
    process, second_port, banner = start_script(script, "--system-proxy")
    assert "put back the proxy settings saved by a dispatch that did not stop" in banner
    assert gnome.proxy() == ("127.0.0.1", str(second_port))
    stop_script(process)
    assert gnome.every_key() == every_key


def test_system_proxy_restore_by_hand_and_show(
    gnome: GSettings, script: Callable[[list[str]], subprocess.Popen]
) -> None:
    every_key = gnome.every_key()
    killed, port, _ = start_script(script, "--system-proxy")
    killed.kill()
    killed.wait()
    shown = run_dispatch("system-proxy", "--show")
    assert shown.returncode == 0
    assert f"org.gnome.system.proxy.http port = {port}" in shown.stdout
    assert "from a dispatch that did not stop: 'dispatch system-proxy --restore'" in shown.stdout
    restored = run_dispatch("system-proxy", "--restore")
    assert (restored.returncode, restored.stderr) == (0, "")
    assert "put back the proxy settings" in restored.stdout
    assert gnome.every_key() == every_key
    again = run_dispatch("system-proxy", "--restore")
    assert "nothing to put back" in again.stdout
    assert "set by no dispatch" in run_dispatch("system-proxy", "--show").stdout


def test_second_dispatch_with_system_proxy_refuses_in_one_line(
    gnome: GSettings, script: Callable[[list[str]], subprocess.Popen]
) -> None:
    """The first one owns the settings: the second exits 2, a --restore by
    hand refuses too, and the first still puts them back at its stop."""
    every_key = gnome.every_key()
    first, port, _ = start_script(script, "--system-proxy")
    second = run_dispatch("start", "--port", str(refused_port()), "--system-proxy", "127.0.0.1")
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1
    assert f"another dispatch (process {first.pid}) has set the system proxy" in second.stderr
    assert run_dispatch("system-proxy", "--restore").returncode == 2
    assert gnome.proxy() == ("127.0.0.1", str(port))
    stop_script(first)
    assert gnome.every_key() == every_key


def test_system_proxy_without_a_desktop_sets_nothing_and_prints_shell_lines(
    script: Callable[[list[str]], subprocess.Popen],
) -> None:
    process, port, banner = start_script(script, "--system-proxy")
    assert "system proxy: nothing set: no desktop here (XDG_CURRENT_DESKTOP is not set); for a shell:" in banner
    assert f"export http_proxy=http://127.0.0.1:{port} https_proxy=http://127.0.0.1:{port}" in banner
    assert "export no_proxy=localhost,127.0.0.0/8," in banner
    stop_script(process)


def test_system_proxy_write_failing_halfway_is_undone_and_start_exits_2(
    gnome: GSettings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gsettings refuses the last key (the mode, locked down as dconf can):
    the keys already set are put back, nothing saved is left, and start
    says why in one line."""
    every_key, keyfile = gnome.every_key(), gnome.keyfile()
    (tmp_path / "bin").mkdir()
    refusing = tmp_path / "bin" / "gsettings"
    refusing.write_text(
        '#!/bin/sh\nif [ "$1 $3" != "get mode" ] && [ "$3" = mode ]; then\n'
        '  echo "The key is not writable" >&2; exit 1\nfi\n'
        f'exec {shutil.which("gsettings")} "$@"\n'
    )
    refusing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    refused = run_dispatch("start", "--port", str(refused_port()), "--system-proxy", "127.0.0.1")
    assert (refused.returncode, refused.stdout) == (2, "")
    why = "gsettings could not reset org.gnome.system.proxy mode: The key is not writable"
    assert refused.stderr == f"dispatch: error: system proxy: {why}\n"
    assert (gnome.every_key(), gnome.keyfile()) == (every_key, keyfile)
    assert not os.path.exists(os.path.join(os.environ["XDG_STATE_HOME"], "dispatch", dispatch.SYSTEM_PROXY_FILE))


class RecordedSettings(dispatch.ProxySettings):
    """Proxy settings kept in a dict, each write recorded; the first write
    of a key in ``failing`` fails, as a settings program that gives up would."""

    kind = "gnome"
    description = "recorded settings"

    def __init__(self, values: dict[str, Any], failing: Sequence[str] = ()) -> None:
        self.values = values
        self.failing = set(failing)
        self.writes: list[tuple[str, Any]] = []
        self.notified = 0

    def wanted(self, host: str, port: int) -> dict[str, Any]:
        return {"server": f"{host}:{port}", "bypass": "localhost", "enabled": 1}

    def read(self, key: str) -> Any:
        return self.values.get(key)

    def write(self, key: str, value: Any) -> None:
        self.writes.append((key, value))
        if key in self.failing:
            self.failing.remove(key)
            raise dispatch.SystemProxyError(f"cannot set {key}")
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value

    def notify(self) -> None:
        self.notified += 1


def test_system_proxy_write_failing_halfway_is_undone(tmp_path: Any) -> None:
    settings = RecordedSettings({"server": "other:3128"}, failing=["enabled"])
    with pytest.raises(dispatch.SystemProxyError, match="cannot set enabled"):
        dispatch.point_system_proxy(settings, str(tmp_path), "127.0.0.1", 1080)
    assert settings.values == {"server": "other:3128"}
    assert settings.writes[-2:] == [("bypass", None), ("server", "other:3128")]
    assert not os.path.exists(tmp_path / dispatch.SYSTEM_PROXY_FILE)


def test_system_proxy_saves_before_it_changes_anything(tmp_path: Any) -> None:
    """The file holds every key's value before (None: not set) by the time
    the first key is written, and is gone once they are put back."""
    seen: list[Any] = []

    class Watched(RecordedSettings):
        def write(self, key: str, value: Any) -> None:
            with open(tmp_path / dispatch.SYSTEM_PROXY_FILE) as saved:
                seen.append(json.load(saved)["before"])
            super().write(key, value)

    settings = Watched({"server": "other:3128", "enabled": 0})
    proxy = dispatch.point_system_proxy(settings, str(tmp_path), "127.0.0.1", 1080)
    assert settings.values == {"server": "127.0.0.1:1080", "bypass": "localhost", "enabled": 1}
    assert seen[0] == {"server": "other:3128", "bypass": None, "enabled": 0}
    proxy.restore()
    assert settings.values == {"server": "other:3128", "enabled": 0}
    assert settings.notified == 2
    assert not os.path.exists(tmp_path / dispatch.SYSTEM_PROXY_FILE)


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "something else", "before": {}}', b"\xff" * 10])
def test_corrupt_saved_proxy_settings_are_kept_aside_with_one_warning(
    gnome: GSettings, tmp_path: Any, log: pytest.LogCaptureFixture, content: bytes
) -> None:
    every_key = gnome.every_key()
    (tmp_path / dispatch.SYSTEM_PROXY_FILE).write_bytes(content)
    assert dispatch.restore_saved_proxy(str(tmp_path)) is None
    assert gnome.every_key() == every_key
    warnings = [record.message for record in log.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not a file dispatch wrote: nothing is put back" in warnings[0]
    (aside,) = tmp_path.glob(f"{dispatch.SYSTEM_PROXY_FILE}.unreadable-*")
    assert aside.read_bytes() == content
    assert not (tmp_path / dispatch.SYSTEM_PROXY_FILE).exists()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows' settings are this system's own")
def test_saved_settings_of_another_system_are_kept_aside_with_one_warning(
    tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    saved = {"format": dispatch.SYSTEM_PROXY_FORMAT, "kind": "windows", "set": {}, "before": {"ProxyEnable": None}}
    (tmp_path / dispatch.SYSTEM_PROXY_FILE).write_text(json.dumps(saved))
    assert dispatch.restore_saved_proxy(str(tmp_path)) is None
    assert [record.levelno for record in log.records] == [logging.WARNING]
    (aside,) = tmp_path.glob(f"{dispatch.SYSTEM_PROXY_FILE}.unreadable-*")
    assert json.loads(aside.read_text()) == saved


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="sudo's user is looked for only as root")
def test_system_proxy_under_sudo_without_the_users_session_refuses_with_the_reason() -> None:
    settings, why = dispatch.desktop_proxy_settings("linux", {"XDG_CURRENT_DESKTOP": "GNOME", "SUDO_USER": "nobody"})
    assert settings is None
    assert "run under sudo, the proxy settings to set are nobody's" in why


def test_system_proxy_names_loopback_for_every_address() -> None:
    assert [dispatch.proxy_host_for(host) for host in ("0.0.0.0", "::", "192.168.1.2")] == [
        "127.0.0.1",
        "::1",
        "192.168.1.2",
    ]


def test_system_proxy_chooses_the_settings_by_the_desktop() -> None:
    def kind(desktop: str) -> str | None:
        settings, _ = dispatch.desktop_proxy_settings("linux", {"XDG_CURRENT_DESKTOP": desktop})
        return settings.kind if settings else None

    assert [kind(name) for name in ("GNOME", "X-Cinnamon", "MATE", "Budgie:GNOME", "sway", "")] == [
        "gnome",
        "gnome",
        "gnome",
        "gnome",
        None,
        None,
    ]


@pytest.mark.skipif(shutil.which("kwriteconfig5") is None, reason="kwriteconfig5 is not installed (kde-cli-tools)")
def test_system_proxy_sets_kde_settings_with_kwriteconfig_and_puts_them_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kioslaverc as KDE's settings page leaves it, another proxy set; a
    key that was not there is not there again after. Running programs are
    told each time by the signal KDE's settings page sends (a dbus-send
    stand-in records it)."""
    (tmp_path / "bin").mkdir()
    signals = tmp_path / "signals"
    (tmp_path / "bin" / "dbus-send").write_text(f'#!/bin/sh\necho "$*" >> {signals}\n')
    (tmp_path / "bin" / "dbus-send").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path / 'no-bus'}")
    kioslaverc = os.path.join(os.environ["XDG_CONFIG_HOME"], "kioslaverc")
    before = "[Proxy Settings]\nProxyType=1\nhttpProxy=http://proxy.example 3128\n\n[Other]\nkept=yes\n"
    with open(kioslaverc, "w") as file:
        file.write(before)
    settings, _ = dispatch.desktop_proxy_settings(
        "linux", {**os.environ, "XDG_CURRENT_DESKTOP": "KDE", "KDE_SESSION_VERSION": "5"}
    )
    assert isinstance(settings, dispatch.KdeProxySettings)
    proxy = dispatch.point_system_proxy(settings, str(tmp_path / "state"), "127.0.0.1", 1080)
    assert settings.read("httpProxy") == "http://127.0.0.1 1080"
    assert settings.read("socksProxy") == "socks://127.0.0.1 1080"
    assert settings.read("NoProxyFor").startswith("localhost,127.0.0.0/8,")
    proxy.restore()
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(kioslaverc)
    assert {group: dict(parser[group]) for group in parser.sections()} == {
        "Proxy Settings": {"ProxyType": "1", "httpProxy": "http://proxy.example 3128"},
        "Other": {"kept": "yes"},
    }
    told = "--session --type=signal /KIO/Scheduler org.kde.KIO.Scheduler.reparseSlaveConfiguration string:\n"
    assert signals.read_text() == told * 2


class FakeRegistry:
    """winreg as the Windows settings use it, on a dict of HKCU's Internet
    Settings values: {name: (data, type)}."""

    HKEY_CURRENT_USER = "HKCU"
    KEY_SET_VALUE = 2
    REG_SZ = 1
    REG_DWORD = 4

    def __init__(self, values: dict[str, tuple[Any, int]]) -> None:
        self.values = values

    @contextlib.contextmanager
    def OpenKey(self, root: str, path: str, reserved: int = 0, access: int = 0) -> Any:  # noqa: N802 - winreg's name
        assert (root, path) == ("HKCU", dispatch.WINDOWS_PROXY_KEY)
        yield self

    def QueryValueEx(self, key: Any, name: str) -> tuple[Any, int]:  # noqa: N802
        if name not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return self.values[name]

    def SetValueEx(self, key: Any, name: str, reserved: int, kind: int, data: Any) -> None:  # noqa: N802
        self.values[name] = (data, kind)

    def DeleteValue(self, key: Any, name: str) -> None:  # noqa: N802
        if name not in self.values:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        del self.values[name]


def test_system_proxy_on_windows_sets_wininet_values_tells_programs_and_puts_them_back(tmp_path: Any) -> None:
    """Another proxy and a PAC URL before; dispatch's servers while it runs
    (the PAC URL removed), running programs told by InternetSetOptionW
    (settings changed, then refresh); every value and its type back after."""
    before = {
        "ProxyEnable": (1, FakeRegistry.REG_DWORD),
        "ProxyServer": ("other.example:8080", FakeRegistry.REG_SZ),
        "AutoConfigURL": ("http://wpad.example/proxy.pac", FakeRegistry.REG_SZ),
        "MigrateProxy": (1, FakeRegistry.REG_DWORD),
    }
    registry, told = FakeRegistry(dict(before)), []
    settings = dispatch.WindowsProxySettings(registry, lambda *arguments: told.append(arguments))
    proxy = dispatch.point_system_proxy(settings, str(tmp_path), "127.0.0.1", 1080)
    assert registry.values["ProxyServer"] == (
        "http=127.0.0.1:1080;https=127.0.0.1:1080;socks=127.0.0.1:1080",
        FakeRegistry.REG_SZ,
    )
    assert registry.values["ProxyEnable"] == (1, FakeRegistry.REG_DWORD)
    assert "192.168.*" in registry.values["ProxyOverride"][0] and "<local>" in registry.values["ProxyOverride"][0]
    assert "AutoConfigURL" not in registry.values
    assert told == [(None, 39, None, 0), (None, 37, None, 0)]
    proxy.restore()
    assert registry.values == before
    assert told[2:] == [(None, 39, None, 0), (None, 37, None, 0)]


def test_windows_is_chosen_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "winreg", FakeRegistry({}))
    settings, description = dispatch.desktop_proxy_settings("win32", {})
    assert isinstance(settings, dispatch.WindowsProxySettings)
    assert description == "the user's Internet Settings (WinINET)"


# A stand-in for macOS's networksetup: its state in a JSON file, its answers
# in the real tool's output format (networksetup(8)).
FAKE_NETWORKSETUP = r"""#!/usr/bin/env python3
import json, os, sys
path = os.environ["FAKE_NETWORKSETUP_STATE"]
state = json.load(open(path))
command, args = sys.argv[1], sys.argv[2:]
with open(path + ".log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
if command == "-listallnetworkservices":
    print("An asterisk (*) denotes that a network service is disabled.")
    for name in state["services"]:
        print(("*" if name in state["disabled"] else "") + name)
    sys.exit(0)
if command.startswith("-set") and os.environ.get("FAKE_NETWORKSETUP_NO_ADMIN"):
    print("** Error: Command requires admin privileges.")
    sys.exit(0)
service = args[0]
if service not in state["services"]:
    print(f"** Error: The parameters were not valid.")
    sys.exit(4)
settings = state["services"][service]
kinds = ("webproxy", "securewebproxy", "socksfirewallproxy")
for kind in kinds:
    proxy = settings[kind]
    if command == f"-get{kind}":
        print(f"Enabled: {'Yes' if proxy['enabled'] else 'No'}")
        print(f"Server: {proxy['server']}")
        print(f"Port: {proxy['port']}")
        print("Authenticated Proxy Enabled: 0")
    elif command == f"-set{kind}":
        proxy.update(server=args[1], port=int(args[2]), enabled=True)
    elif command == f"-set{kind}state":
        proxy["enabled"] = args[1] == "on"
if command == "-getproxybypassdomains":
    domains = settings["bypass"]
    print("\n".join(domains) if domains else f"There aren't any bypass domains set on {service}.")
elif command == "-setproxybypassdomains":
    settings["bypass"] = [] if args[1:] == ["Empty"] else args[1:]
json.dump(state, open(path, "w"))
"""


@pytest.fixture
def networksetup(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fake networksetup first on PATH; its state file (JSON) as a Path:
    Wi-Fi with a web proxy of its own and bypass domains, Ethernet without,
    and a disabled service that must not be touched."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "networksetup").write_text(FAKE_NETWORKSETUP)
    (tools / "networksetup").chmod(0o755)
    off = {"enabled": False, "server": "", "port": 0}
    state = {
        "services": {
            "Wi-Fi": {
                "webproxy": {"enabled": True, "server": "proxy.example", "port": 3128},
                "securewebproxy": {"enabled": False, "server": "proxy.example", "port": 3129},
                "socksfirewallproxy": off,
                "bypass": ["*.local", "169.254/16"],
            },
            "Ethernet": {"webproxy": off, "securewebproxy": off, "socksfirewallproxy": off, "bypass": []},
            "Bluetooth PAN": {"webproxy": off, "securewebproxy": off, "socksfirewallproxy": off, "bypass": []},
        },
        "disabled": ["Bluetooth PAN"],
    }
    path = tmp_path / "networksetup.json"
    path.write_text(json.dumps(state))
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NETWORKSETUP_STATE", str(path))
    return path


def test_system_proxy_on_macos_sets_every_enabled_service_and_puts_each_back(networksetup: Any, tmp_path: Any) -> None:
    before = json.loads(networksetup.read_text())
    settings, _ = dispatch.desktop_proxy_settings("darwin", {})
    assert isinstance(settings, dispatch.MacProxySettings)
    proxy = dispatch.point_system_proxy(settings, str(tmp_path / "state"), "127.0.0.1", 1080)
    during = json.loads(networksetup.read_text())["services"]
    for service in ("Wi-Fi", "Ethernet"):
        for kind in ("webproxy", "securewebproxy", "socksfirewallproxy"):
            assert during[service][kind] == {"enabled": True, "server": "127.0.0.1", "port": 1080}
        assert "192.168.0.0/16" in during[service]["bypass"]
    assert during["Bluetooth PAN"] == before["services"]["Bluetooth PAN"]
    proxy.restore()
    # networksetup cannot empty a proxy's server: one that had none is off again, naming dispatch.
    expected = json.loads(json.dumps(before))
    for service in ("Wi-Fi", "Ethernet"):
        for kind, proxy_before in before["services"][service].items():
            if kind != "bypass" and not proxy_before["server"]:
                expected["services"][service][kind] = {"enabled": False, "server": "127.0.0.1", "port": 1080}
    assert json.loads(networksetup.read_text()) == expected


def test_system_proxy_on_macos_without_an_administrator_says_what_to_run(
    networksetup: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = networksetup.read_text()
    monkeypatch.setenv("FAKE_NETWORKSETUP_NO_ADMIN", "1")
    settings, _ = dispatch.desktop_proxy_settings("darwin", {})
    assert settings is not None
    with pytest.raises(dispatch.SystemProxyError, match="needs an administrator: run 'sudo dispatch start"):
        dispatch.point_system_proxy(settings, str(tmp_path), "127.0.0.1", 1080)
    assert networksetup.read_text() == before
    assert not os.path.exists(tmp_path / dispatch.SYSTEM_PROXY_FILE)


def test_status_page_and_stats_json_say_whether_the_system_proxy_is_set(proxy: Dispatcher, tmp_path: Any) -> None:
    assert json.loads(http_get(proxy.address, "/stats.json")[2])["system_proxy"] == "not set"
    proxy.system_proxy = dispatch.point_system_proxy(RecordedSettings({}), str(tmp_path), *proxy.address)
    page = http_get(proxy.address, "/")[2].decode()
    assert "<dt>system proxy</dt><dd>set by this dispatch: recorded settings</dd>" in page
    proxy.system_proxy.restore()


def test_system_proxy_goes_into_launchd_and_windows_units_not_systemd() -> None:
    executable = ["/usr/local/bin/dispatch"]
    for system in ("launchd", "windows"):
        assert "--system-proxy" in dispatch.service_unit(system, ["--system-proxy"], executable)
    with pytest.raises(ValueError, match="--system-proxy: a system service runs in no user's desktop session"):
        dispatch.service_unit("systemd", ["--system-proxy"], executable)


# ---------------------------------------------------------------------------
# MPTCP endpoints: which interfaces carry a bond's subflows, and the right to add them
# ---------------------------------------------------------------------------


def test_a_link_under_a_third_of_the_faster_ones_is_a_backup_of_the_bond() -> None:
    roles = dispatch.choose_bond({"eth0": 1_200_000, "wlan0": 1_200_000, "usb0": 400_000, "wwan0": None})
    assert [(role.interface, role.backup) for role in roles] == [
        ("eth0", False),
        ("wlan0", False),
        ("usb0", True),
        ("wwan0", False),
    ]
    assert roles[2].why == "backup: 400 kB/s is under a third of the 2.4 MB/s of the faster links"
    assert roles[3].why == "not measured yet"
    # Faster again: it joins.
    assert not any(role.backup for role in dispatch.choose_bond({"eth0": 1_200_000, "usb0": 900_000}))


def test_without_the_right_to_add_endpoints_the_commands_to_run_are_said_once(
    tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    asked: list[list[str]] = []

    def ip(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        asked.append(argv)
        if "add" in argv:
            return subprocess.CompletedProcess(argv, 2, "", "Error: Operation not permitted.\n")
        out = "[]" if "endpoint" in argv else "add_addr_accepted 0 subflows 2 \n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    record = str(tmp_path / "endpoints.json")
    endpoints = dispatch.MptcpEndpoints(record, run=ip)
    wanted = {"192.0.2.2": ("eth0", False), "198.51.100.2": ("wlan0", False), "203.0.113.2": ("usb0", True)}
    for _ in range(2):
        endpoints.follow(wanted)
    (warning,) = [r.getMessage() for r in log.records if "MPTCP endpoints" in r.getMessage()]
    assert "CAP_NET_ADMIN" in warning and "Operation not permitted" in warning
    assert warning.endswith(
        "as root, run: ip mptcp endpoint add 192.0.2.2 dev eth0 subflow; "
        "ip mptcp endpoint add 198.51.100.2 dev wlan0 subflow; "
        "ip mptcp endpoint add 203.0.113.2 dev usb0 subflow backup; ip mptcp limits set subflows 3"
    )
    assert endpoints.added == {} and not os.path.exists(record)
    assert ["ip", "mptcp", "endpoint", "add", "192.0.2.2", "id", "1", "dev", "eth0", "subflow"] in asked


class KernelEndpoints:
    """``ip mptcp`` as the kernel answers it, kept in a dict: endpoints by
    id and the subflow limit; what it was asked, in order."""

    def __init__(self, subflows: int = 2) -> None:
        self.endpoints: dict[int, dict[str, Any]] = {}
        self.subflows = subflows
        self.asked: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.asked.append(argv)
        words, out = argv[argv.index("mptcp") + 1 :], ""
        if words[:2] == ["endpoint", "show"]:
            out = json.dumps(list(self.endpoints.values()))
        elif words[:2] == ["endpoint", "add"]:
            entry = {"address": words[2], "id": int(words[4]), "dev": words[6], "subflow": True}
            self.endpoints[entry["id"]] = entry | ({"backup": True} if "backup" in words else {})
        elif words[:2] == ["endpoint", "change"]:
            entry = self.endpoints[int(words[3])]
            entry.pop("backup", None)
            entry.update({"backup": True} if words[4] == "backup" else {})
        elif words[:2] == ["endpoint", "delete"]:
            del self.endpoints[int(words[3])]
        elif words[:2] == ["limits", "show"]:
            out = f"add_addr_accepted 0 subflows {self.subflows} \n"
        elif words[:2] == ["limits", "set"]:
            self.subflows = int(words[3])
        return subprocess.CompletedProcess(argv, 0, out, "")


def test_a_backup_of_the_bond_carries_subflows_again_once_its_figures_say_it_would_help(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    interfaces = [dispatch.Interface("eth0", ips=("192.0.2.2",)), dispatch.Interface("usb0", ips=("203.0.113.2",))]
    monkeypatch.setattr(dispatch, "usable_interfaces", lambda: interfaces)
    bond = dispatch.parse_address("mptcp+socks5h://127.0.0.1:9+eth0+usb0").proxy
    assert bond is not None
    kernel = KernelEndpoints()
    bonds = dispatch.Bonds([dispatch.ProxyAddress(proxy=bond)], str(tmp_path / "endpoints.json"))
    bonds.endpoints = dispatch.MptcpEndpoints(str(tmp_path / "endpoints.json"), run=kernel)
    measured = {"eth0": 1_200_000.0, "usb0": 300_000.0}
    bonds.start(measured.get)
    roles = {entry["dev"]: entry.get("backup", False) for entry in kernel.endpoints.values()}
    assert roles == {"eth0": False, "usb0": True}
    measured["usb0"] = 900_000.0  # a better signal: it would add to the bond now
    bonds.follow(measured.get)
    assert {entry["dev"]: entry.get("backup", False) for entry in kernel.endpoints.values()} == {
        "eth0": False,
        "usb0": False,
    }
    assert ["ip", "mptcp", "endpoint", "change", "id", "2", "nobackup"] in kernel.asked
    assert [role.why for role in bonds.roles] == ["subflows: carries 1.2 MB/s", "subflows: carries 900 kB/s"]
    bonds.stop()
    assert kernel.endpoints == {} and kernel.subflows == 2


def test_the_endpoints_of_a_run_killed_on_another_port_go_at_the_next_start_and_only_theirs(tmp_path: Any) -> None:
    kernel = KernelEndpoints()
    kernel.endpoints[200] = {"address": "10.0.0.1", "id": 200, "signal": True}  # the system's own
    killed = dispatch.MptcpEndpoints(str(tmp_path / "mptcp-endpoints-7-1080.json"), run=kernel)
    killed.follow({"192.0.2.2": ("eth0", False), "198.51.100.2": ("wlan0", False), "203.0.113.2": ("usb0", True)})
    assert (len(kernel.endpoints), kernel.subflows) == (4, 3)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    records = {name: tmp_path / f"mptcp-endpoints-{name}.json" for name in ("7-1080", "7-1081", "8-1080")}
    recorded = json.loads(records["7-1080"].read_text())
    records["7-1080"].write_text(json.dumps(recorded | {"pid": int(ended.stdout)}))  # the run was killed
    running = {"endpoints": [{"id": 9, "address": "10.9.9.9", "dev": "eth9"}], "subflows": None, "pid": os.getppid()}
    records["7-1081"].write_text(json.dumps(running))  # a dispatch still running on another port
    records["8-1080"].write_text(json.dumps(recorded | {"pid": int(ended.stdout)}))  # another namespace's
    kernel.endpoints[9] = {"address": "10.9.9.9", "id": 9, "dev": "eth9", "subflow": True}
    dispatch.MptcpEndpoints(str(tmp_path / "mptcp-endpoints-7-1090.json"), run=kernel).clear_leftovers()
    assert set(kernel.endpoints) == {9, 200} and kernel.subflows == 2
    assert [name for name, path in records.items() if path.exists()] == ["7-1081", "8-1080"]


def test_a_dispatch_without_bonds_asks_nothing_of_ip_mptcp(
    make_proxy: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch, log: pytest.LogCaptureFixture
) -> None:
    """Where iproute2 is missing or has no ``mptcp`` (busybox), a dispatch
    that bonds nothing says nothing of it, at start or stop."""
    monkeypatch.setattr(dispatch, "IP_COMMAND", "/nonexistent/ip")
    make_proxy(["127.0.0.1"]).shutdown()
    assert [r.getMessage() for r in log.records if "MPTCP" in r.getMessage()] == []


@pytest.mark.parametrize("shown", ["not json", '[{"id": "x"}]', "{}"])
def test_an_ip_command_that_answers_nonsense_is_one_warning_not_a_traceback(
    shown: str, tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    def ip(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        out = shown if "endpoint" in argv else "add_addr_accepted 0 subflows \n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    endpoints = dispatch.MptcpEndpoints(str(tmp_path / "endpoints.json"), run=ip)
    endpoints.follow({"192.0.2.2": ("eth0", False)})
    endpoints.remove_all()
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith("cannot set the MPTCP endpoints (ip mptcp ")
    assert len(warnings) <= 2 and all("ip mptcp" in warning for warning in warnings)


# ---------------------------------------------------------------------------
# Server: admission, limits, timeouts, threads, descriptors, hostile clients
# ---------------------------------------------------------------------------


# The first byte picks the session ------------------------------------------


def test_proxy_keeps_serving_after_failures(proxy: Dispatcher, echo_server: Server) -> None:
    for _ in range(3):
        socks5_code_for(proxy, socks5_request("127.0.0.1", refused_port()))
        with raw_client(proxy) as sock:
            sock.sendall(b"\x16\x03\x01")  # a TLS hello: neither SOCKS nor HTTP
            assert sock.recv(1) == b""
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"still here") == b"still here"


def test_a_client_that_cannot_be_handed_to_a_thread_is_closed_and_the_next_served(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy()
    serve = proxy._server.process_request
    failures = []

    def no_thread_once(request: Any, client_address: Any) -> None:
        if not failures:
            failures.append(client_address)
            raise RuntimeError("can't start new thread")
        serve(request, client_address)

    monkeypatch.setattr(proxy._server, "process_request", no_thread_once)
    with raw_client(proxy) as refused, contextlib.suppress(ConnectionResetError):
        assert refused.recv(1) == b""
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"next") == b"next"
    assert len(failures) == 1 and "unexpected error serving" in log.text
    wait_until_all_closed(proxy)  # the one never served was let go too


# Admission: the allow-list and the most connections ------------------------


def test_client_outside_the_allow_list_is_refused_before_the_handshake(
    make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(allow=["10.0.0.0/8", "fd00::/8"])
    with raw_client(proxy) as sock:
        port = sock.getsockname()[1]
        assert closed_by_proxy(sock)  # no "05 00": nothing was read
    assert wait_for(lambda: bool(refusal_lines(log)))
    assert refusal_lines(log) == [f"refused 127.0.0.1:{port}: not in the allow-list"]
    assert proxy.refused == 1


def test_allow_list_admits_a_listed_address(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    proxy = make_proxy(allow=["127.0.0.2"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(TIMEOUT)
        sock.connect(proxy.address)
        sock.sendall(b"\x05\x01\x00" + socks5_request(echo_server.host, echo_server.port))
        assert recv_exactly(sock, 2) == b"\x05\x00"
        assert socks5_reply(sock)[0] == Reply.SUCCEEDED
        assert round_trip(sock, b"listed") == b"listed"
    with raw_client(proxy) as sock:  # from 127.0.0.1
        assert closed_by_proxy(sock)


def test_clients_beyond_max_connections_are_refused_at_once(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(max_connections=2)
    first = client_through(proxy, (echo_server.host, echo_server.port))
    second = client_through(proxy, (echo_server.host, echo_server.port))
    for _ in range(5):
        with raw_client(proxy) as extra:
            started = time.monotonic()
            assert closed_by_proxy(extra)
            assert time.monotonic() - started < 3.0  # not after the handshake time (10 s)
    assert wait_for(lambda: proxy.refused == 5)
    lines = refusal_lines(log)
    assert 1 <= len(lines) <= 2  # at most one a second
    assert "2 connections are open, the most allowed" in lines[0]
    first.close()
    assert wait_for(lambda: proxy.open_connections() == 1)
    with client_through(proxy, (echo_server.host, echo_server.port)) as third:
        assert round_trip(third, b"room again") == b"room again"
    second.close()


# Timeouts ------------------------------------------------------------------


def test_stalled_handshake_is_cut_off_while_others_are_served(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(handshake_timeout=0.5)
    with raw_client(proxy) as staller:
        staller_port = staller.getsockname()[1]
        staller.sendall(b"\x05")  # and nothing more
        started = time.monotonic()
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"served meanwhile") == b"served meanwhile"
        assert closed_by_proxy(staller)
        assert 0.4 < time.monotonic() - started < TIMEOUT
    proxy.shutdown()
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.client == f"127.0.0.1:{staller_port}"]
    assert (exchange.target, exchange.via, exchange.result) == ("-", None, "timed out")


def test_dripping_handshake_is_cut_off_at_the_deadline(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(handshake_timeout=0.5)
    with raw_client(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01")
        try:
            while time.monotonic() - started < TIMEOUT:
                sock.sendall(b"u")  # a user id that never ends, byte by byte
                time.sleep(0.1)  # the dripping is the point
        except OSError:
            pass
        assert recv_exactly(sock, 8)[:2] == b"\x00\x5b"
        assert time.monotonic() - started < TIMEOUT / 2  # at the deadline, not when the dripping stops


def test_idle_relay_is_closed_after_the_idle_timeout(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(idle_timeout=0.5)
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        for tick in range(6):  # busy for longer than the timeout: kept open
            if tick:
                time.sleep(0.2)  # a pause shorter than the timeout
            client.sendall(b"tick")
            assert recv_exactly(client, 4) == b"tick"
        last_activity = time.monotonic()
        assert closed_by_proxy(client)
        assert 0.4 < time.monotonic() - last_activity < TIMEOUT
    proxy.shutdown()
    target = f"{echo_server.host}:{echo_server.port}"
    (exchange,) = [exchange for exchange in exchanges(log) if exchange.target == target]
    assert (exchange.result, exchange.up, exchange.down) == ("idle for 0.5 s", 24, 24)


# Threads and descriptors ---------------------------------------------------


def serving_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if "process_request_thread" in t.name}


def test_threads_are_reused_and_then_released(proxy: Dispatcher, echo_server: Server) -> None:
    # Private: the listener's thread pool has no public face. Its idle time
    # is set here so that the wait for idle threads to end below does not
    # depend on the default.
    proxy._server.idle_thread_seconds = 1.0
    earlier = serving_threads()  # other proxies' idle threads, on their way out
    seen: set[str] = set()
    for index in range(20):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"%d" % index) == b"%d" % index
            seen |= serving_threads() - earlier
        # The thread logs the connection before it is idle again. Private:
        # open_connections() is 0 a moment before the thread is idle, and a
        # connection in that moment would start another thread.
        assert wait_for(lambda: proxy._server._idle_threads > 0)
    assert len(seen) == 1  # one thread served all twenty, one after another
    assert wait_for(lambda: not seen & serving_threads())


def need_descriptors(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"the descriptor limit is below the {wanted} this test needs")


def test_more_than_1024_connections_open_at_once(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    if dispatch.PORTABLE:
        pytest.skip("select(), the portable path, cannot watch a descriptor numbered past 1024 on Linux")
    count = 1100
    # Each connection holds four descriptors in this process: client, the
    # proxy's two sockets, and the echo server's.
    need_descriptors(4 * count + 200)
    proxy = make_proxy()  # after the raise: its default limit follows it
    with contextlib.ExitStack() as open_clients:
        clients = []
        for index in range(count):
            client = open_clients.enter_context(client_through(proxy, (echo_server.host, echo_server.port)))
            client.sendall(b"%d;" % index)
            clients.append(client)
        assert max(client.fileno() for client in clients) > 1024
        assert proxy.open_connections() == count
        for index, client in enumerate(clients):
            expected = b"%d;" % index
            assert recv_exactly(client, len(expected)) == expected


def test_default_max_connections_fits_the_descriptor_limit() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    expected = min((soft - 64) // 3, dispatch.MAX_CONNECTIONS_CEILING)
    assert dispatch.default_max_connections() == expected
    with Dispatcher(["127.0.0.1"], port=0) as proxy:
        assert proxy.max_connections == expected


# Hostile clients -----------------------------------------------------------


def open_descriptors() -> int:
    """Descriptors open in this process; 0 where /proc cannot tell (not Linux)."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def hostile_cases(rng: random.Random, target: tuple[str, int]) -> list[bytes]:
    """Random, truncated, oversized, mutated and foreign handshakes."""
    host, port = target
    request5 = socks5_request(host, port)
    valid = [
        b"\x05\x01\x00" + request5,
        b"\x05\x01\x02\x01"
        + bytes([len(LOGIN[0])])
        + LOGIN[0].encode()
        + bytes([len(LOGIN[1])])
        + LOGIN[1].encode()
        + request5,
        socks4_request(host, port),
        socks4_request("", port, host=host),
    ]
    foreign = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's start
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ]
    cases = list(valid) + foreign
    for _ in range(250):
        kind = rng.randrange(6)
        base = rng.choice(valid)
        if kind == 0:
            cases.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            cases.append(bytes([rng.choice([4, 5])]) + rng.randbytes(rng.randrange(0, 300)))
        elif kind == 2:
            cases.append(base[: rng.randrange(len(base))])
        elif kind == 3:
            mutated = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(bytes(mutated))
        elif kind == 4:
            oversized = [
                b"\x05\xff" + bytes(range(255)) + rng.randbytes(100),
                b"\x05\x01\x00\x05\x01\x00\x03\xff" + b"n" * 255 + b"\x00\x50",
                b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * rng.randrange(1000, 5000),
                b"\x04\x01\x00\x50\x00\x00\x00\x01u\0" + b"h" * rng.randrange(1000, 5000),
                b"\x05\x01\x02\x01\xff" + b"a" * 255 + b"\xff" + b"p" * 255,
            ]
            cases.append(rng.choice(oversized))
        else:
            cases.append(base + rng.randbytes(rng.randrange(1, 2000)))
    return cases


def play(proxy: Dispatcher, payload: bytes, ending: str) -> None:
    """Send ``payload`` and end as told; the proxy must answer or close."""
    with raw_client(proxy) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            return  # closed on us already: that is an answer
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if ending == "half-close":
            try:
                sock.shutdown(socket.SHUT_WR)
                read_all(sock)  # a timeout here fails the test: a client left hanging
            except (ConnectionResetError, BrokenPipeError):
                pass
            except OSError as error:
                if error.errno != errno.ENOTCONN:  # reset before the shutdown
                    raise


@pytest.mark.parametrize("login", [False, True], ids=["open", "login"])
def test_hostile_clients_get_a_reply_or_a_close(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    loopback_guard: None,
    log: pytest.LogCaptureFixture,
    login: bool,
) -> None:
    proxy = make_proxy(credentials=dict([LOGIN]) if login else None)
    threads, descriptors = threading.active_count(), open_descriptors()
    rng = random.Random(1928 + login)
    for payload in hostile_cases(rng, (echo_server.host, echo_server.port)):
        play(proxy, payload, rng.choice(["half-close", "half-close", "close", "reset"]))
    with client_through(proxy, (echo_server.host, echo_server.port), login=LOGIN if login else None) as client:
        assert round_trip(client, b"still serving") == b"still serving"
    assert wait_for(lambda: proxy.open_connections() == 0)
    assert wait_for(lambda: threading.active_count() <= threads), threading.enumerate()
    assert wait_for(lambda: open_descriptors() <= descriptors)
    assert not [record for record in log.records if record.exc_info]
    assert "unexpected error" not in log.text


class RecordingSocket:
    """Stands in for a listening socket; keeps the options set on it."""

    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []
        self.bound: tuple[str, int] | None = None

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def bind(self, address: tuple[str, int]) -> None:
        self.bound = address

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1080)


class RefusingSocket(RecordingSocket):
    """A listening socket that takes no TCP option (MPTCP before Linux 5.17)."""

    def setsockopt(self, level: int, option: int, value: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    def listen(self, backlog: int) -> None:
        pass


@pytest.mark.parametrize("refused", [False, True])
def test_a_listener_that_refuses_tcp_options_has_them_set_on_each_connection(
    refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Private names: the listener's activation step, on a stand-in socket."""
    monkeypatch.setattr(dispatch, "_ACCEPTED_SOCKETS_INHERIT_OPTIONS", True)
    server = object.__new__(dispatch._Server)
    server.socket = RefusingSocket() if refused else RecordingSocket()  # type: ignore[assignment]
    server.socket.listen = lambda backlog: None  # type: ignore[method-assign]
    server.server_activate()
    assert server.options_inherited is not refused


@pytest.mark.parametrize("windows_ports", [True, False])
def test_the_listening_port_is_shared_with_nobody_on_windows(
    windows_ports: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows lets a second program bind a port that has SO_REUSEADDR;
    SO_EXCLUSIVEADDRUSE is what keeps it. Private names: the platform's
    choice, simulated, and the listener's bind step."""
    monkeypatch.setattr(dispatch, "_EXCLUSIVE_PORTS", windows_ports)
    server = object.__new__(dispatch._Server)
    server.socket = RecordingSocket()  # type: ignore[assignment]
    server.server_address = ("127.0.0.1", 1080)
    server.server_bind()
    options = server.socket.options  # type: ignore[attr-defined]
    reuse = (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    exclusive = (socket.SOL_SOCKET, dispatch._SO_EXCLUSIVEADDRUSE, 1)
    assert options == ([exclusive] if windows_ports else [reuse])
    assert getattr(socket, "SO_EXCLUSIVEADDRUSE", -5) == dispatch._SO_EXCLUSIVEADDRUSE


def test_a_second_proxy_on_the_same_port_is_refused(make_proxy: Callable[..., Dispatcher]) -> None:
    first = make_proxy()
    with pytest.raises(OSError) as refused:
        Dispatcher(["127.0.0.1"], port=first.address[1])
    assert refused.value.errno == errno.EADDRINUSE


# ---------------------------------------------------------------------------
# Steering: links paused, closed, weighed while dispatch runs; the control API
# ---------------------------------------------------------------------------


def api_post(
    proxy: Dispatcher,
    path: str,
    body: object,
    content_type: str = "application/json",
    more_headers: str = "",
    host: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` (JSON unless bytes) to the proxy's own port, as a script would."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    host = host or f"127.0.0.1:{proxy.address[1]}"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
    head += f"Content-Length: {len(data)}\r\nConnection: close\r\n{more_headers}\r\n"
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + data)
        code, headers, answer = read_response(sock)
    assert headers["content-type"] == "application/json"
    return code, headers, json.loads(answer)


def link_states(proxy: Dispatcher) -> dict[str, tuple[str, int]]:
    return {link["name"]: (link["state"], link["weight"]) for link in proxy.status()["links"]}


def run_link(port: int, *arguments: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``dispatch link`` (as a user types it) against the dispatch on ``port``: (status, stdout, stderr)."""
    status = dispatch.main(["link", "--port", str(port), *arguments])
    out, err = capsys.readouterr()
    return status, out, err


def test_dispatch_link_pause_takes_new_connections_off_the_link_and_lets_open_ones_go_on(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    peer_server: Server,
    capsys: pytest.CaptureFixture[str],
    log: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], balance="round-robin")
    with contextlib.ExitStack() as stack:
        open_ones = [stack.enter_context(client_through(proxy, (echo_server.host, echo_server.port))) for _ in range(2)]
        status, out, err = run_link(proxy.address[1], "127.0.0.3", "pause", capsys=capsys)
        assert (status, out, err) == (0, "link 127.0.0.3 paused\n", "")
        assert peers_seen(proxy, peer_server, 4) == ["127.0.0.2"] * 4
        assert [round_trip(client, b"still") for client in open_ones] == [b"still"] * 2
    assert "link 127.0.0.3 paused from 127.0.0.1" in log.messages
    assert link_states(proxy)["127.0.0.3"] == ("paused", 1)
    status, out, _ = run_link(proxy.address[1], "127.0.0.3", "resume", capsys=capsys)
    assert (status, out) == (0, "link 127.0.0.3 resumed\n")
    assert sorted(peers_seen(proxy, peer_server, 4)) == ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2


def test_dispatch_link_close_ends_the_links_open_connections_and_takes_no_new_one(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, peer_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = make_proxy(["127.0.0.2"])
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        client.sendall(b"before")
        assert recv_exactly(client, 6) == b"before"  # open still
        status, out, _ = run_link(proxy.address[1], "127.0.0.2", "close", capsys=capsys)
        assert (status, out) == (0, "link 127.0.0.2 closed (1 connection ended)\n")
        assert closed_by_proxy(client)
    request = socks5_request(peer_server.host, peer_server.port)
    assert socks5_code_for(proxy, request) == dispatch.Reply.NETWORK_UNREACHABLE


def test_dispatch_link_close_with_a_site_ends_only_that_sites_connections(
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    fake_names: dict[str, list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_names.update({"download.stuck.test": [echo_server.host], "fine.test": [echo_server.host]})
    proxy = make_proxy(["127.0.0.2"])
    stuck = client_through(proxy, ("download.stuck.test", echo_server.port), rdns=True)
    with stuck, client_through(proxy, ("fine.test", echo_server.port), rdns=True) as fine:
        stuck.sendall(b"open")
        assert recv_exactly(stuck, 4) == b"open"
        status, out, _ = run_link(proxy.address[1], "--site", "stuck.test", "127.0.0.2", "close", capsys=capsys)
        assert (status, out) == (0, "link 127.0.0.2: 1 connection to stuck.test ended\n")
        assert closed_by_proxy(stuck)
        assert round_trip(fine, b"on") == b"on"
    assert link_states(proxy)["127.0.0.2"] == ("ready", 1)


def test_dispatch_link_weight_changes_the_links_share_of_turns(
    make_proxy: Callable[..., Dispatcher], peer_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"], balance="round-robin")
    status, out, _ = run_link(proxy.address[1], "127.0.0.3", "weight", "3", capsys=capsys)
    assert (status, out) == (0, "link 127.0.0.3 has weight 3\n")
    assert Counter(peers_seen(proxy, peer_server, 8)) == {"127.0.0.2": 2, "127.0.0.3": 6}
    assert {row["ip"]: row["weight"] for row in proxy.stats()} == {"127.0.0.2": 1, "127.0.0.3": 3}


def test_dispatch_link_reset_usage_counts_a_capped_link_from_zero(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = make_proxy(["127.0.0.2"], caps=["127.0.0.2=5kB/day"], cap_action="stop")
    fill_links(proxy, echo_server, 1, 6000)
    assert wait_for(lambda: cap_reached(proxy))
    status, out, _ = run_link(proxy.address[1], "127.0.0.2", "reset-usage", capsys=capsys)
    assert (status, out) == (0, "link 127.0.0.2 counts its usage from zero\n")
    assert proxy.status()["caps"][0]["used_bytes"] == 0
    fill_links(proxy, echo_server, 1, 100)  # it serves again


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["nosuch0", "pause"], "refused (404): no link is named 'nosuch0'"),
        (["127.0.0.1", "reset-usage"], "refused (409): link 127.0.0.1 has no data cap"),
    ],
)
def test_dispatch_link_says_in_one_line_why_nothing_changed(
    proxy: Dispatcher, arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_link(proxy.address[1], *arguments, capsys=capsys)
    assert (status, out, err) == (1, "", f"dispatch link: {said}\n")
    assert link_states(proxy) == {"127.0.0.1": ("ready", 1)}


def test_dispatch_link_with_no_dispatch_there_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = refused_port()
    status, out, err = run_link(port, "usb0", "pause", capsys=capsys)
    assert status == 1 and out == "" and err.startswith(f"dispatch link: no dispatch answers at 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1


def test_dispatch_link_logs_in_with_dispatch_auth_or_an_auth_file(
    make_proxy: Callable[..., Dispatcher],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = make_proxy(credentials=dict([LOGIN]))
    status, _, err = run_link(proxy.address[1], "127.0.0.1", "pause", capsys=capsys)
    assert (status, err) == (1, "dispatch link: refused (401): log in\n")
    login_file = tmp_path / "login"
    login_file.write_text(":".join(LOGIN) + "\n")
    status, out, _ = run_link(proxy.address[1], "--auth-file", str(login_file), "127.0.0.1", "pause", capsys=capsys)
    assert (status, out) == (0, "link 127.0.0.1 paused\n")
    monkeypatch.setenv("DISPATCH_AUTH", ":".join(LOGIN))
    status, out, _ = run_link(proxy.address[1], "127.0.0.1", "resume", capsys=capsys)
    assert (status, out) == (0, "link 127.0.0.1 resumed\n")


@pytest.mark.parametrize(
    ("arguments", "said"),
    [(["usb0", "weight"], "weight takes a number"), (["--site", "x.example", "usb0", "pause"], "only close takes")],
)
def test_a_bad_dispatch_link_is_one_line_and_exit_2(
    arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_link(1080, *arguments, capsys=capsys)
    assert status == 2 and out == "" and said in err and len(err.splitlines()) == 1


def test_the_control_api_lists_the_links_as_the_page_shows_them(proxy: Dispatcher) -> None:
    code, headers, body = http_get(proxy.address, "/api/links")
    answer = json.loads(body)
    assert code == 200 and headers["content-type"] == "application/json"
    assert answer["links"] == [{"name": "127.0.0.1", "state": "ready", "weight": 1}]
    assert [row["ip"] for row in answer["addresses"]] == ["127.0.0.1"] and answer["caps"] == []


@pytest.mark.parametrize(
    ("send", "code"),
    [
        ("GET", 405),  # no change by GET, ever
        ({"content_type": "application/x-www-form-urlencoded"}, 415),  # a form a web page posts
        ({"content_type": "text/plain"}, 415),
        ({"more_headers": "Origin: http://evil.example\r\n"}, 403),
        ({"more_headers": "Origin: null\r\n"}, 403),
        ({"host": "evil.example"}, 403),  # a name pointed at 127.0.0.1 (DNS rebinding)
    ],
)
def test_the_control_api_refuses_a_change_a_web_page_could_send(
    proxy: Dispatcher, send: Any, code: int, log: pytest.LogCaptureFixture
) -> None:
    if send == "GET":
        got, _, body = http_get(proxy.address, "/api/links/127.0.0.1?action=pause")
        assert json.loads(body)["error"]
    else:
        got, _, answer = api_post(proxy, "/api/links/127.0.0.1", {"action": "pause"}, **send)
        assert answer["error"]
    assert got == code
    assert link_states(proxy) == {"127.0.0.1": ("ready", 1)}


def test_the_control_api_takes_a_change_from_dispatchs_own_page(proxy: Dispatcher) -> None:
    origin = f"Origin: http://127.0.0.1:{proxy.address[1]}\r\n"
    code, _, answer = api_post(proxy, "/api/links/127.0.0.1", {"action": "pause"}, more_headers=origin)
    assert (code, answer) == (200, {"changed": "link 127.0.0.1 paused"})


def test_a_proxy_link_is_steered_by_the_name_the_page_shows(
    make_proxy: Callable[..., Dispatcher], make_upstream: Callable[..., UpstreamServer]
) -> None:
    """Its name has slashes: the API and ``dispatch link`` take it percent-encoded."""
    url = make_upstream("microsocks").url
    proxy = make_proxy([url, "127.0.0.1"])
    assert dispatch.steer_link(proxy.address, url, {"action": "pause"}) == f"link {url} paused"
    assert link_states(proxy)[url] == ("paused", 1)
    path = "/api/links/" + urllib.parse.quote(url, safe="")
    assert api_post(proxy, path, {"action": "resume"})[::2] == (200, {"changed": f"link {url} resumed"})


def test_the_control_api_of_a_dispatch_listening_beyond_loopback_takes_changes_only_with_a_login(
    make_proxy: Callable[..., Dispatcher],
) -> None:
    open_proxy = make_proxy(host="0.0.0.0")
    code, _, answer = api_post(open_proxy, "/api/links/127.0.0.1", {"action": "pause"})
    assert code == 403 and "changes need a login" in answer["error"]
    assert link_states(open_proxy) == {"127.0.0.1": ("ready", 1)}
    guarded = make_proxy(host="0.0.0.0", credentials=dict([LOGIN]))
    assert api_post(guarded, "/api/links/127.0.0.1", {"action": "pause"})[0] == 401
    token = base64.b64encode(":".join(LOGIN).encode()).decode()
    login = f"Authorization: Basic {token}\r\n"
    assert api_post(guarded, "/api/links/127.0.0.1", {"action": "pause"}, more_headers=login)[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "code", "said"),
    [
        ("/api/links/nosuch0", {"action": "pause"}, 404, "no link is named"),
        ("/api/links/127.0.0.1", {"action": "explode"}, 400, "no action 'explode'"),
        ("/api/links/127.0.0.1", {"action": "weight"}, 400, "the weight is a whole number"),
        ("/api/links/127.0.0.1", {"action": "weight", "weight": 0}, 400, "the weight is a whole number"),
        ("/api/links/127.0.0.1", {"action": "weight", "weight": "3"}, 400, "the weight is a whole number"),
        ("/api/links/127.0.0.1", {"action": "weight", "weight": True}, 400, "the weight is a whole number"),
        ("/api/links/127.0.0.1", {"action": "weight", "weight": 1001}, 400, "the weight is a whole number"),
        ("/api/links/127.0.0.1", {"action": "pause", "weight": 2}, 400, "pause takes no 'weight'"),
        ("/api/links/127.0.0.1", {"action": "close", "site": "a b"}, 400, "is no host name"),
        ("/api/links/127.0.0.1", ["pause"], 400, "one JSON object"),
        ("/api/links/127.0.0.1", b"{pause", 400, "the body is no JSON"),
        ("/api/links/127.0.0.1", b"\xff\xfe", 400, "the body is no JSON"),
        ("/api/links", {"action": "pause"}, 405, "a change is a POST to /api/links/NAME"),
        ("/api/links/127.0.0.1/more", {"action": "pause"}, 404, "no such API path"),
    ],
)
def test_a_bad_control_api_call_is_a_4xx_with_a_json_error_and_changes_nothing(
    proxy: Dispatcher, path: str, body: object, code: int, said: str
) -> None:
    got, _, answer = api_post(proxy, path, body)
    assert got == code and said in answer["error"]
    assert link_states(proxy) == {"127.0.0.1": ("ready", 1)}


def test_links_stay_paused_and_weighed_across_a_restart_and_the_start_says_so(
    make_proxy: Callable[..., Dispatcher], tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    state = str(tmp_path / "state.json")
    first = make_proxy(["127.0.0.2", "127.0.0.3"], state_file=state)
    assert api_post(first, "/api/links/127.0.0.2", {"action": "pause"})[0] == 200
    assert api_post(first, "/api/links/127.0.0.3", {"action": "weight", "weight": 4})[0] == 200
    assert json.loads((tmp_path / "state.json").read_text())["steered"] == {
        "127.0.0.2": {"state": "paused"},
        "127.0.0.3": {"weight": 4},
    }
    first.shutdown()
    again = make_proxy(["127.0.0.2", "127.0.0.3"], state_file=state)
    assert link_states(again) == {"127.0.0.2": ("paused", 1), "127.0.0.3": ("ready", 4)}
    assert "link 127.0.0.2 is paused, as it was left (dispatch link 127.0.0.2 resume)" in warnings_of(log)


def test_link_states_in_a_state_file_that_are_unusable_are_left_out_with_one_warning(
    tmp_path: Any, log: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "state.json")
    steered = {"a": {"state": "paused"}, "b": {"state": "melted"}, "c": {"weight": -1}, "d": "paused"}
    dispatch.write_state(path, {}, {"steered": steered})
    assert dispatch.read_link_states(path) == {"a": ("paused", None)}
    assert warnings_of(log) == [f"state file {path}: 3 unusable link states left out"]


# ---------------------------------------------------------------------------
# Dispatcher: the library face, shutdown
# ---------------------------------------------------------------------------


def test_dispatcher_is_a_context_manager_on_a_free_port(echo_server: Server) -> None:
    with Dispatcher(["127.0.0.1"], port=0) as proxy:
        host, port = proxy.address
        assert (host, port != 0) == ("127.0.0.1", True)
        proxy.start()
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"lib") == b"lib"
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


def test_start_raises_what_ended_the_server_thread_before_it_served(
    make_proxy: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = make_proxy(start=False)

    def no_thread() -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(proxy.capacities, "measure", no_thread)
    (raised,) = start_in_time(proxy)
    assert isinstance(raised, RuntimeError) and str(raised) == "can't start new thread"


def test_shutdown_before_serving_makes_serve_forever_return_at_once(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(start=False)
    proxy.shutdown()
    proxy.serve_forever()  # returns: a stopped proxy stays stopped


def test_a_dispatcher_serves_once(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    proxy = make_proxy()
    with pytest.raises(RuntimeError, match="serves already"):
        proxy.start()
    with pytest.raises(RuntimeError, match="serves already"):
        proxy.serve_forever()
    assert [t.name for t in threading.enumerate()].count("dispatch-server") == 1
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"once") == b"once"
    proxy.shutdown()
    with pytest.raises(RuntimeError, match="was shut down: make a new one to serve again"):
        proxy.start()


def test_a_shutdown_racing_a_start_leaves_nothing_running() -> None:
    """start() in one thread, shutdown() in another at once: shutdown stops
    whatever start got going, and start raises if it did not serve."""
    before = set(threading.enumerate())
    for _ in range(50):
        proxy = Dispatcher(["127.0.0.1"], port=0)
        outcome: list[object] = []

        def start(proxy: Dispatcher = proxy, outcome: list[object] = outcome) -> None:
            try:
                outcome.append(proxy.start())
            except RuntimeError as error:
                outcome.append(error)

        starting = threading.Thread(target=start)
        starting.start()
        proxy.shutdown()
        starting.join(TIMEOUT)
        (result,) = outcome
        assert result is proxy or "shut down before it served" in str(result)
        with pytest.raises(OSError):
            socket.create_connection(proxy.address, timeout=1).close()
    for thread in set(threading.enumerate()) - before:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), thread.name


@pytest.mark.parametrize("grace", [math.nan, -1.0, "5", None])
def test_shutdown_refuses_a_bad_grace_before_anything_stops(
    make_proxy: Callable[..., Dispatcher], echo_server: Server, grace: Any
) -> None:
    proxy = make_proxy()
    with pytest.raises(ValueError, match="grace must be 0 or more"):
        proxy.shutdown(grace=grace)
    with client_through(proxy, (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"still serving") == b"still serving"


def test_a_dispatcher_that_fails_after_listening_leaves_the_port_free(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    listened: list[int] = []

    def refused(port: int, state_file: str | None) -> str:
        listened.append(port)  # it listens on it by now
        raise OSError(errno.EACCES, "refused")

    monkeypatch.setattr(dispatch, "endpoint_record_path", refused)
    with pytest.raises(OSError, match="refused"):
        Dispatcher(["127.0.0.1"], port=0, state_file=str(tmp_path / "state.json"))
    with socket.socket() as again:
        again.bind(("127.0.0.1", listened[0]))  # the port is free again


def test_shutdown_lets_no_idle_thread_linger(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    """Threads that wait for the next connection leave at shutdown, not
    after their idle second."""
    before = set(threading.enumerate())
    proxy = make_proxy()
    clients = [client_through(proxy, (echo_server.host, echo_server.port)) for _ in range(20)]
    for client in clients:
        assert round_trip(client, b"x") == b"x"
        client.close()
    deadline = time.monotonic() + TIMEOUT
    while proxy.open_connections() and time.monotonic() < deadline:
        time.sleep(0.01)
    proxy.shutdown()
    lingering = [t for t in set(threading.enumerate()) - before if (t.join(0.3), t.is_alive())[1]]
    assert lingering == []


STOPPED_WHILE_STARTING = """
import signal, sys, time
sys.path.insert(0, sys.argv[1])
import dispatch
proxy = dispatch.Dispatcher(["127.0.0.1"], port=0)
load = proxy.capacities.load
proxy.capacities.load = lambda: (time.sleep(0.5), load())  # the signal lands while it starts up
signal.signal(signal.SIGALRM, lambda *_: proxy.shutdown())
signal.setitimer(signal.ITIMER_REAL, 0.1)
proxy.serve_forever()
print("returned", [t.name for t in dispatch.threading.enumerate() if t.name.startswith("dispatch")], flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (Unix)")
def test_a_signal_handler_stopping_serve_forever_while_it_starts_up_stops_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_STARTING, HERE], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert (done.stdout, done.stderr) == ("returned []\n", "")


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (Unix)")
def test_a_signal_handler_can_stop_serve_forever(make_proxy: Callable[..., Dispatcher]) -> None:
    proxy = make_proxy(start=False)
    previous = signal.signal(signal.SIGALRM, lambda *_: proxy.shutdown())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        proxy.serve_forever()  # in this (the main) thread, until the handler runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=1).close()


def test_shutdown_from_the_accepting_thread_does_not_wait_for_itself(make_proxy: Callable[..., Dispatcher]) -> None:
    """A log handler may stop the proxy from the thread that accepts (here on
    a refusal, which that thread logs): shutdown() must not wait for the loop
    it is called from."""
    proxy = make_proxy(allow=["192.0.2.1"])
    stopped_in: list[threading.Thread] = []
    stopped = threading.Event()

    class StopOnRefusal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("refused"):
                stopped_in.append(threading.current_thread())
                proxy.shutdown()
                stopped.set()

    dispatch.logger.addHandler(StopOnRefusal())  # removed after the test by restore_logger
    socket.create_connection(proxy.address, timeout=TIMEOUT).close()
    assert stopped.wait(TIMEOUT)
    (serving,) = stopped_in
    serving.join(TIMEOUT)
    assert not serving.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=1).close()


def test_a_response_cut_by_shutdown_is_logged_so_not_as_a_hang_up(
    proxy: Dispatcher, make_server: Callable[..., Server], log: pytest.LogCaptureFixture
) -> None:
    def answer_in_part(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npart")
        conn.recv(1)  # until the proxy closes

    server = make_server(answer_in_part)
    with raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/big HTTP/1.1\r\n\r\n".encode())
        recv_until(client, b"part")
        proxy.shutdown()
    (exchange,) = [e for e in exchanges(log) if e.target == f"GET http://127.0.0.1:{server.port}/big"]
    assert exchange.result.startswith("200, ") and exchange.result.endswith(", cut by shutdown")
    assert "client hung up" not in exchange.result


@pytest.mark.parametrize(("kind", "logged"), [("http", "200, cut by shutdown"), ("socks", "cut by shutdown")])
def test_a_hang_up_seen_once_stopping_closed_the_client_is_logged_as_the_cut(
    proxy: Dispatcher, log: pytest.LogCaptureFixture, kind: str, logged: str
) -> None:
    """Stopping closes the client's socket: the reset the session sees then is the proxy's doing."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        made = {"http": dispatch.HttpProxySession, "socks": dispatch.SocksSession}[kind]
        session = made(ours, ("192.0.2.7", 5000), dispatch.DeadlineReader(ours), proxy.context)
        if isinstance(session, dispatch.HttpProxySession):
            session.record.result, session.responded = "200", True  # the response had begun
        session.cut = True
        session.log(ConnectionResetError(errno.ECONNRESET, "reset"))
    (exchange,) = [e for e in exchanges(log) if e.client == "192.0.2.7:5000"]
    assert exchange.result == logged


def test_shutdown_closes_open_connections(proxy: Dispatcher, echo_server: Server) -> None:
    client = client_through(proxy, (echo_server.host, echo_server.port))
    client.sendall(b"ping")
    assert recv_exactly(client, 4) == b"ping"
    proxy.shutdown()
    assert client.recv(1) == b""
    client.close()


def test_shutdown_wakes_a_request_waiting_for_its_origin(
    proxy: Dispatcher, silent_origin: tuple[Server, threading.Event]
) -> None:
    server, asked = silent_origin
    with raw_client(proxy) as client:
        client.sendall(f"GET http://127.0.0.1:{server.port}/ HTTP/1.1\r\n\r\n".encode())
        assert asked.wait(TIMEOUT)
        started = time.monotonic()
        proxy.shutdown()
        assert time.monotonic() - started < 5
        assert proxy.open_connections() == 0  # the serving thread saw the close
        # The client sees its connection closed, perhaps right after a 502
        # (when the origin's connection was closed first).
        with contextlib.suppress(ConnectionResetError):
            answer = read_all(client)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 502 ")


@pytest.mark.parametrize(
    ("upstream", "listening", "loops"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", True),
        ("LOCALHOST.", "::1", True),
        ("proxy.localhost", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", True),  # a connection to 0.0.0.0 reaches this machine
        ("127.0.0.2", "0.0.0.0", True),  # every address of this machine listens
        ("::1", "::", True),
        ("127.0.0.1", "::", True),  # :: takes IPv4 clients too
        ("::1", "0.0.0.0", False),  # 0.0.0.0 takes IPv4 clients only
        ("127.0.0.2", "127.0.0.1", False),
        ("192.0.2.1", "0.0.0.0", False),  # not an address of this machine
        ("proxy.example", "127.0.0.1", False),  # names are not looked up at the start
    ],
)
def test_an_upstream_proxy_that_reaches_this_proxys_own_listener_is_known(
    upstream: str, listening: str, loops: bool
) -> None:
    proxy = dispatch.ProxyURL("http", upstream, 3128)
    assert dispatch.reaches_listener(proxy, listening, 3128) is loops
    assert not dispatch.reaches_listener(proxy, listening, 3129)


def test_a_proxy_named_as_its_own_upstream_is_refused_before_it_listens(
    make_proxy: Callable[..., Dispatcher],
) -> None:
    with socket.socket() as taken:  # held: a proxy that went on to listen would fail otherwise
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        for scheme in ("http", "socks5"):
            with pytest.raises(
                dispatch.AddressError,
                match=re.escape(f"{scheme}://localhost:{port} is this proxy's own address (127.0.0.1:{port})"),
            ):
                make_proxy([f"{scheme}://localhost:{port}"], port=port, start=False)


# ---------------------------------------------------------------------------
# Service units: systemd, launchd, Task Scheduler
# ---------------------------------------------------------------------------


def test_service_refuses_a_password_in_its_definition(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["service", "systemd", "socks5://al:hunter2@10.0.0.9:1080"]) == 2
    err = capsys.readouterr().err
    assert "socks5://al:***@10.0.0.9:1080" in err and "--upstream-auth-file" in err
    assert "hunter2" not in err


@pytest.mark.parametrize("system", dispatch.SERVICE_SYSTEMS)
@pytest.mark.parametrize("login", [["--auth", "bob:SEKRETPW"], ["--auth=bob:SEKRETPW"]])
def test_service_refuses_a_login_password_in_its_definition(
    system: str, login: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch.main(["service", system, *login, "eth0"]) == 2
    assert capsys.readouterr() == (
        "",
        "dispatch: error: --auth: a password would be readable in the service definition; give the users and "
        "their passwords in --auth-file\n",
    )


def test_service_carries_an_upstream_with_its_password_file(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--upstream-auth-file", "/etc/dispatch/upstream", "socks5://al@10.0.0.9:1080+eth0@2"]
    assert dispatch.main(["service", "systemd", *arguments]) == 0
    assert "--upstream-auth-file /etc/dispatch/upstream socks5://al@10.0.0.9:1080+eth0@2" in capsys.readouterr().out


def test_service_systemd_unit_runs_dispatch_start_and_verifies(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch.main(["service", "systemd", "--port", "1081", "wlan0@3", "usb0@backup"]) == 0
    unit = capsys.readouterr().out
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == (
        f"ExecStart={sys.executable} {dispatch.__file__} start --log-file /var/log/dispatch/dispatch.log "
        "--state-file /var/lib/dispatch/state.json --port 1081 wlan0@3 usb0@backup"
    )
    expected = {
        "Restart=on-failure",
        "After=network-online.target",
        "AmbientCapabilities=CAP_NET_RAW CAP_NET_BIND_SERVICE",
    }
    assert expected <= set(unit.splitlines())
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    path = tmp_path / "dispatch.service"
    path.write_text(unit)
    checked = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "dispatch.service" not in checked.stderr


def test_service_systemd_with_transparent_gives_cap_net_admin_not_root(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["service", "systemd", "--transparent", "1082", "--lan", "eth1", "--apply-rules", "wlan0"]
    assert dispatch.main(arguments) == 0
    unit = capsys.readouterr().out.splitlines()
    assert "AmbientCapabilities=CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_NET_ADMIN" in unit
    assert "CapabilityBoundingSet=CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_NET_ADMIN" in unit
    assert "DynamicUser=yes" in unit and not any(line.startswith("User=") for line in unit)


@pytest.mark.parametrize("system", ["launchd", "windows"])
def test_service_elsewhere_refuses_transparent_in_one_line(system: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["service", system, "--transparent", "1082", "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dispatch: error: --transparent works on Linux only") and err.count("\n") == 1


def test_service_systemd_lets_a_bond_set_its_endpoints_and_raises_an_mptcp_servers_subflow_limit(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch.main(["service", "systemd", "--mptcp", "eth0", "mptcp+socks5h://vps.example:1080@backup"]) == 0
    unit = capsys.readouterr().out.splitlines()
    assert "AmbientCapabilities=CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_NET_ADMIN" in unit
    assert "CapabilityBoundingSet=CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_NET_ADMIN" in unit
    assert unit[unit.index("ExecStartPre=+ip mptcp limits set subflows 8") - 3].startswith("ExecStart=")
    assert dispatch.main(["service", "systemd", "eth0"]) == 0
    plain = capsys.readouterr().out
    assert "CAP_NET_ADMIN" not in plain and "ExecStartPre" not in plain
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    path = tmp_path / "dispatch.service"
    path.write_text("\n".join(unit) + "\n")
    checked = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "dispatch.service" not in checked.stderr


def test_service_systemd_quotes_what_systemd_would_split(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["--log-file", "/var/log/my logs/d.log", "--no-state", "Ethernet 2", "wlan0@3"]
    assert dispatch.main(["service", "systemd", *arguments]) == 0
    (exec_start,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.endswith('start --log-file "/var/log/my logs/d.log" --no-state "Ethernet 2" wlan0@3')


def test_service_launchd_plist_parses(capsys: pytest.CaptureFixture[str]) -> None:
    import plistlib

    assert dispatch.main(["service", "launchd", "en0", "en1@backup"]) == 0
    job = plistlib.loads(capsys.readouterr().out.encode())
    assert job["ProgramArguments"] == [sys.executable, dispatch.__file__, "start", "en0", "en1@backup"]
    assert (job["RunAtLoad"], job["KeepAlive"]) == (True, {"SuccessfulExit": False})
    assert job["StandardErrorPath"].endswith("/Library/Logs/dispatch/stderr.log")


def _windows_argv(line: str) -> list[str]:
    """Split a command line as CommandLineToArgvW does (2n backslashes and a
    quote: n backslashes, the quote toggles; 2n+1: n backslashes and a quote)."""
    arguments, current, quoted, backslashes, started = [], "", False, 0, False
    for character in line + " ":
        if character == "\\":
            backslashes += 1
            continue
        if character == '"':
            current += "\\" * (backslashes // 2)
            if backslashes % 2:
                current += '"'
            else:
                quoted = not quoted
            started, backslashes = True, 0
            continue
        current += "\\" * backslashes
        backslashes = 0
        if character in " \t" and not quoted:
            if started or current:
                arguments.append(current)
            current, started = "", False
        else:
            current += character
            started = True
    return arguments


def test_service_windows_task_quotes_paths_with_spaces() -> None:
    from xml.etree import ElementTree

    python = r"C:\Program Files\Python311\python.exe"
    module = r"C:\Users\Ann Lee\dispatch\dispatch.py"
    task = dispatch.service_unit("windows", ["Wi-Fi@3", "Ethernet 2", "--log-file", "C:\\logs dir\\"], [python, module])
    namespace = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    root = ElementTree.fromstring(task)
    assert root.findtext("t:Actions/t:Exec/t:Command", namespaces=namespace) == python
    arguments = root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=namespace)
    assert arguments is not None and arguments.startswith('"C:\\Users\\Ann Lee\\dispatch\\dispatch.py" start')
    assert _windows_argv(arguments) == [module, "start", "Wi-Fi@3", "Ethernet 2", "--log-file", "C:\\logs dir\\"]
    assert root.find("t:Triggers/t:LogonTrigger", namespace) is not None
    assert root.findtext("t:Settings/t:RestartOnFailure/t:Count", namespaces=namespace) == "255"


def test_service_refuses_start_arguments_that_would_fail_at_every_boot(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["service", "systemd", "--port", "70000"])
    assert exit_.value.code == 2
    assert "is not a port number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["eth0@0"], "'eth0@0': the weight must be a whole number from 1 to 1000"),
        (["10.0.0.1/24"], "'10.0.0.1/24' looks like a network prefix"),
        (["a@b@c"], "'a@b@c': one '@' at most"),
        ([""], "an empty ADDRESS"),
        (["224.0.0.1"], "224.0.0.1 is a multicast address"),
        (["--auth-file", ""], "the login file's path is empty"),
        (["--auth-file", os.devnull], "holds no USER:PASS line"),
        (["--ip", "0"], "'0' is a short form of 0.0.0.0"),
        (["--idle-timeout", "2592000"], "'2592000' is out of range"),
        (["--dns", "system", "--dns", "192.0.2.53"], "--dns system leaves names to the system's resolver"),
        (["--dns", "ns.example"], "a name server is an IP address"),
        (["--check", "check.example"], "a check target is IP:PORT or NAME:PORT"),
        (["socks5://10.0.0.9:1080+224.0.0.1"], "224.0.0.1 is a multicast address"),
        (["socks5://10.0.0.9:1080+::"], ":: is the unspecified address"),
        (["socks5://[2001:db8::9]:1080+10.0.0.1"], "2001:db8::9 cannot be reached from 10.0.0.1"),
        (["socks5://al@10.0.0.9:1080"], "'socks5://al@10.0.0.9:1080': no password for 'al'"),
        (["socks5://al:pw@10.0.0.9:1080@nan"], "'socks5://al:***@10.0.0.9:1080@nan': the weight must be"),
    ],
)
def test_service_refuses_what_start_refuses(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = dispatch.main(["service", "systemd", *arguments])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("dispatch: error: ") and message in line


@pytest.mark.parametrize("asked", [["--help"], ["-h"], ["--hel"], ["-dh"]])
def test_service_puts_no_help_into_a_unit(asked: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["service", "systemd", "eth0", *asked]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (
        "dispatch: error: 'dispatch service' prints no help of start into a unit; see: dispatch start --help"
    )


def test_service_windows_refuses_a_percent_sign_with_a_hint_and_without_the_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert dispatch.main(["service", "windows", "--log-file", "C:\\logs\\50%OFF%x.log", "Wi-Fi"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line == (
        "dispatch: error: start argument 2 holds '%', which Task Scheduler expands (%NAME%) when the task "
        "starts: give a password holding '%' with --auth-file, and paths without '%'"
    )
    with pytest.raises(ValueError, match="the program's path holds '%'"):
        dispatch.service_unit("windows", ["Wi-Fi"], [r"C:\100%\python.exe", "dispatch.py"])
    # systemd and launchd take it as it is.
    assert "50%%OFF%%x" in dispatch.service_unit("systemd", ["--log-file", "/var/log/50%OFF%x"], ["/usr/bin/dispatch"])


# Options: as keyword arguments or one DispatcherOptions, checked in one place


def test_dispatcher_takes_its_options_as_keyword_arguments(
    make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    given: dict[str, Any] = {
        "connect_timeout": 2.0,
        "handshake_timeout": 3.0,
        "cooldown": 4.0,
        "idle_timeout": 5.0,
        "max_connections": 6,
        "credentials": {"alice": "s3cret"},
        "allow": ["127.0.0.0/8"],
        "allow_targets": ["169.254.169.254"],
        "pages": False,
        "page_hosts": ["Dispatch.Home.Arpa."],
        "balance": "round-robin",
        "sticky": 60.0,
        "checks": ["192.0.2.1:443"],
        "check_interval": 20.0,
        "hedge": 0.5,
        "dns": ["system"],
    }
    proxy = make_proxy(**given)
    # Page host names are kept as the pages compare them.
    kept = given | {"page_hosts": ["dispatch.home.arpa"]}
    assert proxy.options == dispatch.DispatcherOptions(["127.0.0.1"], port=0, **kept)
    assert (proxy.max_connections, proxy.upstream.connect_timeout, proxy.upstream.hedge) == (6, 2.0, 0.5)
    assert proxy.context.page_hosts == {"dispatch.home.arpa"} and proxy.context.status is None
    assert proxy.balancer.balance == dispatch.Balance.ROUND_ROBIN
    with client_through(proxy, (echo_server.host, echo_server.port), login=("alice", "s3cret")) as client:
        assert round_trip(client, b"keywords") == b"keywords"


def test_dispatcher_takes_one_options_object(make_proxy: Callable[..., Dispatcher], echo_server: Server) -> None:
    options = dispatch.DispatcherOptions(["127.0.0.1"], port=0, credentials={"alice": "s3cret"}, max_connections=3)
    proxy = Dispatcher(options=options).start()
    try:
        assert proxy.options is options
        assert (proxy.max_connections, proxy.requires_credentials) == (3, True)
        with client_through(proxy, (echo_server.host, echo_server.port), login=("alice", "s3cret")) as client:
            assert round_trip(client, b"options") == b"options"
    finally:
        proxy.shutdown()


def test_dispatcher_refuses_options_and_arguments_together() -> None:
    options = dispatch.DispatcherOptions(["127.0.0.1"], port=0)
    with pytest.raises(TypeError, match="either as options= or as arguments"):
        Dispatcher(["127.0.0.1"], options=options)
    with pytest.raises(TypeError, match="either as options= or as arguments"):
        Dispatcher(options=options, hedge=0.0)


def test_dispatcher_takes_what_the_options_take_by_position_and_name() -> None:
    with Dispatcher(["127.0.0.1"], "127.0.0.1", 0, hedge=0.5) as proxy:
        assert proxy.options == dispatch.DispatcherOptions(["127.0.0.1"], "127.0.0.1", 0, hedge=0.5)
    with pytest.raises(TypeError, match="no_such_option"):
        Dispatcher(["127.0.0.1"], port=0, no_such_option=1)


# Options the command line does not give, with why (none yet: each is an argument of ``start``).
LIBRARY_ONLY: dict[str, str] = {}


def test_start_arguments_and_the_options_are_in_step() -> None:
    """Every argument of ``start`` gives an option or is the command line's
    own; every option is given by an argument or is the library's alone."""
    parser = dispatch._build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    start = commands.choices["start"]
    dests = {action.dest for action in start._actions if not isinstance(action, argparse._HelpAction)}
    fields = {field.name for field in dataclasses.fields(dispatch.DispatcherOptions)}
    own, read_into, renamed = dispatch._COMMAND_LINE_ONLY, dispatch._READ_INTO_OPTIONS, dispatch._OPTION_OF_ARGUMENT
    given = {read_into.get(dest) or renamed.get(dest, dest) for dest in dests - own.keys()}
    assert given <= fields, "arguments that give no option"
    assert fields - given == LIBRARY_ONLY.keys(), "options no argument gives"
    assert (own.keys() - {"command"}) | read_into.keys() | renamed.keys() <= dests, "arguments that are no more"
    assert all(own.values()) and all(LIBRARY_ONLY.values()), "each with why"


def test_the_default_balance_is_round_robin_where_a_link_has_a_weight() -> None:
    weighted = dispatch.Link.of_address(dispatch.LocalAddress("10.0.0.2"), weighted=True)
    plain = dispatch.Link.of_address(dispatch.LocalAddress("10.0.0.3"))
    options = dispatch.DispatcherOptions()
    assert options.balance_for([plain, weighted]) is dispatch.Balance.ROUND_ROBIN
    assert options.balance_for([plain]) is dispatch.Balance.MEASURED
    chosen = dispatch.DispatcherOptions(balance="measured")
    assert chosen.balance_for([weighted]) is dispatch.Balance.MEASURED


def test_checks_no_link_can_make_are_one_warning(log: pytest.LogCaptureFixture) -> None:
    options = dispatch.DispatcherOptions(checks=["192.0.2.1:443"])
    assert options.check_targets([dispatch.LocalAddress("::1")]) == [("192.0.2.1", 443)]
    (warning,) = warnings_of(log)
    assert warning == "no link has an address of the checks' family: nothing is checked for now"
    log.clear()
    options.check_targets([dispatch.LocalAddress("127.0.0.1")])
    dispatch.DispatcherOptions(checks=["example.com:443"]).check_targets([dispatch.LocalAddress("::1")])
    assert warnings_of(log) == []


def test_options_keep_what_they_were_given_as_checked() -> None:
    checks = ["192.0.2.1:443"]
    users = {"alice": "s3cret"}
    options = dispatch.DispatcherOptions(checks=checks, page_hosts=iter(["A.example."]), credentials=users)
    checks.append("not a target")
    users["mallory"] = "x"
    assert options.checks == ("192.0.2.1:443",)
    assert options.page_hosts == ("a.example",)  # a generator, read once, as the pages compare it
    assert dict(options.credentials or {}) == {"alice": "s3cret"}
    with pytest.raises(TypeError):
        options.credentials["mallory"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.port = 1  # type: ignore[misc]
    assert "s3cret" not in repr(dispatch.DispatcherOptions(credentials=users, upstream_passwords={"al": "s3cret"}))
    pairs = dispatch.DispatcherOptions(credentials=[("alice", "s3cret")])  # as read_auth_file gives them
    assert dict(pairs.credentials or {}) == {"alice": "s3cret"}
    assert dispatch.DispatcherOptions(state_file=pathlib.Path("/var/lib/dispatch/state.json")).state_file == (
        str(pathlib.Path("/var/lib/dispatch/state.json"))
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("connect_timeout", 0, "connect_timeout must be positive, at most 604800 seconds; got 0"),
        ("handshake_timeout", -1.0, "handshake_timeout must be positive, at most 604800 seconds; got -1.0"),
        ("cooldown", math.nan, "cooldown must be positive, at most 604800 seconds; got nan"),
        ("check_interval", math.inf, "check_interval must be positive, at most 604800 seconds; got inf"),
        ("idle_timeout", 0.0, "idle_timeout must be positive, at most 604800 seconds; got 0.0"),
        ("hedge", -0.5, "hedge must be 0 or more, at most 604800 seconds; got -0.5"),
        ("sticky", 8 * 24 * 3600.0, "sticky must be 0 or more, at most 604800 seconds; got 691200.0"),
        ("connect_timeout", "5", "connect_timeout must be positive, at most 604800 seconds; got '5'"),
        ("hedge", None, "hedge must be 0 or more, at most 604800 seconds; got None"),
        ("port", 65536, "port must be a port number, 0 to 65535 (0: any free one); got 65536"),
        ("port", -1, "port must be a port number, 0 to 65535 (0: any free one); got -1"),
        ("max_connections", 0, "max_connections must be at least 1; got 0"),
        ("balance", "fastest", "balance must be 'measured' or 'round-robin'; got 'fastest'"),
        ("checks", ["192.0.2.1"], "checks: '192.0.2.1': a check target is IP:PORT or NAME:PORT"),
        ("page_hosts", ["no spaces"], "page_hosts: 'no spaces' is not a host name or IP address"),
        ("allow", ["10.0.0.0/33"], "allow: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
        ("allow_targets", ["localhost"], "allow_targets: 'localhost' does not appear to be an IPv4 or IPv6 network"),
        ("dns", [], "dns: no name server given"),
        ("dns", ["system", "192.0.2.53"], "dns: --dns system leaves names to the system's resolver"),
        ("credentials", {"": "s3cret"}, "credentials: a user name must be 1 to 255 bytes"),
        ("credentials", {"alice": ""}, "credentials: the password of user 'alice' must be 1 to 255 bytes"),
        ("credentials", {"alice": 1}, "credentials must be Mapping[str, str] | None; got a dict, not shown"),
        ("host", "", "host: an empty address: write 0.0.0.0 (or ::) to listen on every address"),
        ("host", "0", "host: '0' is a short form of 0.0.0.0: write it out"),
        ("host", "224.0.0.1", "host: '224.0.0.1' is a multicast or broadcast address: no client connects to it"),
        ("host", "255.255.255.255", "host: '255.255.255.255' is a multicast or broadcast address"),
        ("host", "ff02::1", "host: 'ff02::1' is a multicast or broadcast address"),
        ("host", None, "host must be str; got None"),
        ("port", True, "port must be int; got True"),
        ("pages", "no", "pages must be bool; got 'no'"),
        ("max_connections", 1.5, "max_connections must be int | None; got 1.5"),
        ("transparent", True, "transparent must be int | None; got True"),
        ("allow", "10.0.0.0/8", "allow must be Sequence[str] | None; got '10.0.0.0/8'"),
        ("dns", [1], "dns must be Sequence[str] | None; got [1]"),
        ("state_file", b"/tmp/state.json", "state_file must be str | None; got b'/tmp/state.json'"),
    ],
)
def test_each_bad_option_is_a_value_error_naming_it(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as from_options:
        dispatch.DispatcherOptions(["127.0.0.1"], **{option: value})
    assert str(from_options.value).startswith(message)
    with pytest.raises(ValueError) as from_arguments:
        Dispatcher(["127.0.0.1"], **{"port": 0, option: value})
    assert str(from_arguments.value) == str(from_options.value)  # told by the same check


def test_a_malformed_address_is_an_address_error_of_the_options() -> None:
    with pytest.raises(dispatch.AddressError, match="weight"):
        dispatch.DispatcherOptions(["10.0.0.2@0"])


# ---------------------------------------------------------------------------
# Reports: the stats table
# ---------------------------------------------------------------------------


def test_stats_table_shows_a_huge_figure_in_three_figures() -> None:
    row = status_row("10.0.0.2", "eth0", capacity=1e308, capacity_source="remembered", rate_down=2.5e15)
    table = dispatch.format_stats([row])  # type: ignore[list-item]
    assert "1e+305 kB/s" in table and "2.5e+12 kB/s" in table
    assert max(len(line) for line in table.splitlines()) < 150


def test_stats_table_format() -> None:
    rows = [
        {
            "ip": "192.168.1.20",
            "interface": "wlan0",
            "weight": 3,
            "state": "up",
            "open": 12,
            "connections": 340,
            "bytes_down": 1_234_567_890,
            "bytes_up": 45_600_000,
            "rate_down": 1_204_500.0,
            "rate_up": 30_000.0,
            "capacity": 1_250_000.0,
            "capacity_source": "measured",
            "capacity_age": 3.4,
        },
        {
            "ip": "10.0.0.2",
            "interface": None,
            "weight": 1,
            "state": "sitting out",
            "open": 0,
            "connections": 7,
            "bytes_down": 999,
            "bytes_up": 0,
            "rate_down": 0.0,
            "rate_up": 0.0,
            "capacity": 400_000.0,
            "capacity_source": "remembered",
            "capacity_age": None,
        },
        {
            "ip": None,
            "interface": "usb0",
            "weight": 1,
            "state": "waiting",
            "open": 0,
            "connections": 0,
            "bytes_down": 0,
            "bytes_up": 0,
            "rate_down": 0.0,
            "rate_up": 0.0,
            "capacity": None,
            "capacity_source": "not measured",
            "capacity_age": None,
        },
    ]
    assert dispatch.format_stats(rows).splitlines() == [
        "ADDRESS       INTERFACE  WEIGHT  STATE        OPEN  TOTAL    DOWN       UP     RATE DOWN    RATE UP"
        "      CAPACITY  FROM",
        "192.168.1.20  wlan0      3       up             12    340  1.2 GB  45.6 MB  1,204.5 kB/s  30.0 kB/s"
        "  1,250.0 kB/s  measured 3 s ago",
        "10.0.0.2      -          1       sitting out     0      7   999 B      0 B      0.0 kB/s   0.0 kB/s"
        "    400.0 kB/s  remembered",
        "-             usb0       1       waiting         0      0     0 B      0 B      0.0 kB/s   0.0 kB/s"
        "             -  not measured",
    ]


# ---------------------------------------------------------------------------
# Command line: dispatch list and start, their arguments, logs, signals
# ---------------------------------------------------------------------------


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dispatch {dispatch.__version__}"


def test_cli_list_shows_interfaces(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("INTERFACE")
    assert any(line.split()[:3] == ["lo", "127.0.0.1", "no"] for line in out.splitlines()[1:])


@pytest.fixture
def network_manager(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An nmcli first on PATH, as NetworkManager's answers GENERAL.METERED:
    what the file named as the device in the folder returned holds ("yes
    (guessed)"), in the C locale only (in another, its words are translated);
    no file: no such device."""
    said = tmp_path / "metered"
    said.mkdir()
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nmcli"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$LC_ALL" = C ] || { echo ja; exit 0; }\n'
        '[ "$1 $2 $3 $4" = "-g GENERAL.METERED device show" ] || exit 2\n'
        f'cat "{said}/$5" 2>/dev/null || {{ echo "Error: Device \'$5\' not found." >&2; exit 10; }}\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    return said


def test_cli_list_shows_whether_each_interface_is_metered_as_network_manager_says(
    fake_interfaces: FakeInterfaces, network_manager: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_interfaces.interfaces.update(usb0=["127.0.0.2"], wlan0=["127.0.0.3"], eth0=["127.0.0.4"], tun0=["127.0.0.5"])
    for name, said in (("usb0", "yes"), ("wlan0", "no (guessed)"), ("eth0", "unknown")):
        (network_manager / name).write_text(said + "\n")
    assert dispatch.main(["list"]) == 0
    rows = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    assert rows[0][-1] == "METERED"
    assert {row[0]: row[-1] for row in rows[1:]} == {
        "usb0": "yes",
        "wlan0": "guessed no",
        "eth0": "unknown",
        "tun0": "?",
    }


def test_cli_start_suggests_a_cap_for_a_metered_link_that_has_none(
    fake_interfaces: FakeInterfaces, network_manager: Any, tmp_path: Any
) -> None:
    fake_interfaces.interfaces.update(usb0=["127.0.0.2"], wwan0=["127.0.0.3"], wlan0=["127.0.0.4"], eth0=["127.0.0.5"])
    for name in ("usb0", "wwan0", "wlan0"):
        (network_manager / name).write_text("yes (guessed)\n")
    log_file = tmp_path / "d.log"
    links = ["usb0", "wwan0@backup", "wlan0", "eth0", "--cap", "wlan0=1GB/month", "--no-state"]
    assert run_cli(links, lambda running, stop: None, str(log_file)) == 0
    told = [line.partition("WARNING ")[2] for line in log_file.read_text().splitlines() if "metered" in line]
    assert told == [
        "link usb0 is metered (the system says guessed yes): a data cap (--cap usb0=SIZE/month) "
        "or usb0@backup keeps it from carrying more than it should"
    ]


def test_cli_start_prints_and_logs_what_it_found_while_it_was_built(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning logged while the Dispatcher is made, before the log is set
    up (dnspython missing), reaches the log file and the banner, once."""
    monkeypatch.setattr(dispatch, "_has_dnspython", lambda: False)
    log_file = tmp_path / "d.log"
    assert run_cli(["127.0.0.1", "--no-state"], lambda running, stop: None, str(log_file)) == 0
    printed = capsys.readouterr()
    told = "the dnspython package is not installed: names are looked up by the system's resolver"
    assert [line for line in printed.out.splitlines() if told in line] == [
        f"warning: {told}, " + ("whose queries leave by the default route only")
    ]
    assert told not in printed.err
    assert len([line for line in log_file.read_text().splitlines() if "WARNING" in line and told in line]) == 1


def test_cli_start_gives_the_dispatcher_the_options_its_arguments_say(tmp_path: Any) -> None:
    arguments = ["start", "--ip", "::1", "--port", "0", "--connect-timeout", "2", "--cooldown", "4"]
    arguments += ["--handshake-timeout", "3", "--idle-timeout", "5", "--max-connections", "6"]
    arguments += ["--auth", "alice:s3cret", "--allow", "10.0.0.0/8", "--no-page", "--page-host", "Dispatch.Home.Arpa"]
    arguments += ["--allow-target", "127.0.0.0/8", "--allow-target", "fe80::1"]
    arguments += ["--balance", "round-robin", "--check", "192.0.2.1:443", "--check-interval", "20", "--hedge", "0"]
    arguments += ["--dns", "192.0.2.53", "--state-file", str(tmp_path / "state.json"), "127.0.0.1@2"]
    options = dispatch._start_options(dispatch._build_parser().parse_args(arguments))
    assert options == dispatch.DispatcherOptions(
        ["127.0.0.1@2"],
        "::1",
        0,
        connect_timeout=2.0,
        handshake_timeout=3.0,
        cooldown=4.0,
        idle_timeout=5.0,
        max_connections=6,
        credentials={"alice": "s3cret"},
        allow=["10.0.0.0/8"],
        allow_targets=["127.0.0.0/8", "fe80::1/128"],
        pages=False,
        page_hosts=["dispatch.home.arpa"],
        balance="round-robin",
        sticky=None,  # --sticky 0, the default: off
        checks=["192.0.2.1:443"],
        check_interval=20.0,
        hedge=0.0,
        dns=["192.0.2.53"],
        upstream_passwords={},
        state_file=str(tmp_path / "state.json"),
    )
    no_state = dispatch._start_options(dispatch._build_parser().parse_args(["start", "--no-state"]))
    assert no_state.state_file is None and no_state.addresses == () and no_state.credentials == {}


def test_cli_the_loopback_interface_is_no_link(capsys: pytest.CaptureFixture[str]) -> None:
    """Its addresses are never usable: a proxy over it would wait for ever."""
    interfaces = dispatch._interfaces()
    loopback = [i.name for i in interfaces if i.ips and all(ipaddress.ip_address(ip).is_loopback for ip in i.ips)]
    if not loopback:
        pytest.skip("no loopback interface here")
    assert dispatch.main(["start", "--port", "0", loopback[0]]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dispatch: error: {loopback[0]!r} is the loopback interface: its addresses reach only")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["no-such-interface0"], "is neither an IP address nor an interface"),
        (["127.0.0.1@0"], "the weight must be a whole number from 1 to 1000"),
        (["127.0.0.1@many"], "the weight must be a whole number from 1 to 1000"),
        (["127.0.0.1@1001"], "the weight must be a whole number from 1 to 1000"),
        (["--port", "0", "--log-file", "/proc/no/such/dir/x.log", "127.0.0.1"], "cannot write the log"),
        (["203.0.113.9"], "203.0.113.9 is not an address of this machine"),
        (["127.0.0.1", "127.0.0.1@2"], "'127.0.0.1' and '127.0.0.1@2' both give 127.0.0.1"),
        (["--port", "70000", "127.0.0.1"], "is not a port number"),
        (["--ip", "203.0.113.9", "--port", "0", "127.0.0.1"], "cannot listen on 203.0.113.9:0"),
        (["192.0.2.2/24"], "'192.0.2.2/24' looks like a network prefix; for a weight write 192.0.2.2@24"),
        (["eth0@backup@2"], "one '@' at most"),
        (["fe80::1"], "fe80::1 is a link-local address"),
        (["--stats", "soon", "127.0.0.1"], "argument --stats: 'soon' is not a positive number of seconds"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = dispatch.main(["start", *arguments])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    (line,) = err.splitlines()  # no usage block, no traceback
    assert line.startswith("dispatch: error: ")
    if "argument" in message:  # argparse's own: it points to --help
        assert line.endswith("--help)")


def test_cli_start_refuses_its_own_address_as_an_upstream_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert dispatch.main(["start", "--no-state", "--port", str(port), f"http://127.0.0.1:{port}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"dispatch: error: http://127.0.0.1:{port} is this proxy's own address (127.0.0.1:{port}): "
        "every connection through it would come back here, without end"
    )


@pytest.mark.parametrize("bonding", [["mptcp+socks5h://127.0.0.1:9+lo"], ["--mptcp", "127.0.0.1"]])
def test_cli_start_refuses_a_bond_or_mptcp_where_the_kernel_has_it_off_in_one_line(
    bonding: list[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sysctl = tmp_path / "enabled"
    sysctl.write_text("0\n")
    monkeypatch.setattr(dispatch, "_MPTCP_SYSCTL", str(sysctl))
    assert dispatch.main(["start", "--no-state", "--port", "0", *bonding]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dispatch: error: ")
    assert line.endswith("MPTCP is switched off: net.mptcp.enabled is 0 (sysctl -w net.mptcp.enabled=1)")


# What a script that vendors dispatch.py runs: "python -S" leaves out
# site-packages, so only the standard library can be imported.
STANDARD_LIBRARY_ONLY = """
import io, socket, sys, contextlib
import dispatch
assert "ifaddr" not in sys.modules
with dispatch.Dispatcher(["127.0.0.1"], port=0).start() as proxy:
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(b"\\x05\\x01\\x00\\x05\\x01\\x00\\x01" + socket.inet_aton("127.0.0.1")
                     + int(sys.argv[1]).to_bytes(2, "big"))
        reply = b""
        while len(reply) < 12:
            reply += sock.recv(12 - len(reply))
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        echoed = b"".join(iter(lambda: sock.recv(100), b""))
print("reply", reply[:6].hex(), "echo", echoed.decode())
for argv in (["start", "lo"], ["start"], ["list"]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = dispatch.main(argv)
    print(" ".join(argv), status, err.getvalue().strip())
"""


def test_proxies_ip_addresses_with_the_standard_library_only(echo_server: Server) -> None:
    done = subprocess.run(
        [sys.executable, "-S", "-c", STANDARD_LIBRARY_ONLY, str(echo_server.port)],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "reply 050005000001 echo ping"  # no auth; granted, IPv4
    # Interface names need ifaddr: each of these says so in one line, exit 2.
    needs = "need the ifaddr package (pip install ifaddr); IP addresses work without it"
    assert [line.split(" dispatch: error: ")[0] for line in lines[1:]] == ["start lo 2", "start 2", "list 2"]
    assert all(line.endswith(needs) for line in lines[1:]), lines
    assert "Traceback" not in done.stderr


def test_cli_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert dispatch.main(["start", "--port", port, "127.0.0.1"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in capsys.readouterr().err


def test_cli_start_serves_until_sigterm(
    echo_server: Server, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome: list[bytes] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port)) as client:
            outcome.append(round_trip(client, b"via the CLI"))

    log_file = os.path.join(str(tmp_path), "dispatch.log")
    assert run_cli(["127.0.0.1@2"], use, log_file) == 0
    assert outcome == [b"via the CLI"]
    out = capsys.readouterr().out
    assert re.search(r"proxy on 127\.0\.0\.1:\d+", out)
    assert f"log: {log_file}" in out
    assert "stopped after" in out and "1 connection, 11 B up, 11 B down" in out
    with open(log_file) as log:
        assert re.search(r"via 127\.0\.0\.1 \(\w+\): ok, 11 B up, 11 B down", log.read())


def test_cli_upstream_password_comes_from_a_file_and_never_shows(
    make_upstream: Callable[..., UpstreamServer],
    echo_server: Server,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream = make_upstream("microsocks", ("al", "hunter2"))
    passwords = tmp_path / "upstream-passwords"
    passwords.write_text("# the upstream proxies' logins\nal:hunter2\n")
    outcome: list[bytes] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port)) as client:
            outcome.append(echoed(client, b"by the file"))

    log_file = str(tmp_path / "dispatch.log")
    address = upstream.url.replace(":hunter2@", "@")
    assert run_cli(["--upstream-auth-file", str(passwords), address], use, log_file) == 0
    assert outcome == [b"by the file"]
    out = capsys.readouterr().out
    assert address in out and "hunter2" not in out
    with open(log_file) as log:
        written = log.read()
    assert f"via {address}: ok, 11 B up, 11 B down" in written and "hunter2" not in written


def test_cli_upstream_without_its_password_is_refused_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert dispatch.main(["start", "--port", "0", "socks5://al@127.0.0.1:1080"]) == 2
    assert "'socks5://al@127.0.0.1:1080': no password for 'al'" in capsys.readouterr().err


def test_cli_refuses_an_upstream_reached_from_an_address_of_the_other_ip_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert dispatch.main(["start", "--port", "0", "socks5://[::1]:1080+127.0.0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "::1 cannot be reached from 127.0.0.1, an address of the other IP version" in line


@pytest.mark.parametrize("suffix", ["-1", "nan", "inf", "1e400"])
def test_cli_names_a_bad_weight_of_an_upstream_without_showing_its_port_as_a_password(
    suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch.main(["start", "--port", "0", f"socks5://al:hunter2@127.0.0.1:1080@{suffix}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"'socks5://al:***@127.0.0.1:1080@{suffix}': the weight must be a whole number" in line


def test_cli_hides_a_numeric_password_of_an_upstream_without_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["start", "--port", "0", "socks5://al:1234@vps"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "'socks5://al:***@vps'" in line and "1234" not in line


def test_cli_hides_an_upstream_password_in_an_argument_it_does_not_take(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["list", "socks5://al:hunter2@10.0.0.9:1080"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "unrecognized arguments: socks5://al:***@10.0.0.9:1080" in line and "hunter2" not in line


@pytest.mark.parametrize(
    ("options", "capacity"),
    [
        ([], 777_000.0),
        (["--state-file", "OTHER"], 555_000.0),
        (["--no-state"], None),
    ],
)
def test_cli_starts_from_the_state_file_unless_told_not_to(
    tmp_path: Any, options: list[str], capacity: float | None
) -> None:
    default, other = dispatch.default_state_path(), str(tmp_path / "other.json")
    assert default.startswith(os.environ["XDG_STATE_HOME"]) or sys.platform != "linux"
    dispatch.write_state(default, {"127.0.0.1": 777_000.0})
    dispatch.write_state(other, {"127.0.0.1": 555_000.0})
    rows: list[dict[str, Any]] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        rows.extend(json.loads(http_get(running.address, "/stats.json")[2])["addresses"])

    log_file = str(tmp_path / "d.log")
    assert run_cli([*(other if option == "OTHER" else option for option in options), "127.0.0.1"], use, log_file) == 0
    assert rows[0]["capacity"] == capacity
    assert rows[0]["capacity_source"] == ("not measured" if capacity is None else "remembered")


def test_cli_starts_afresh_with_one_warning_from_a_corrupt_state_file(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b'{"format": "dispatch link capaci')
    rows: list[dict[str, Any]] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        rows.extend(json.loads(http_get(running.address, "/stats.json")[2])["addresses"])

    log_file = str(tmp_path / "d.log")
    assert run_cli(["--state-file", str(state), "127.0.0.1"], use, log_file) == 0
    assert rows[0]["capacity_source"] == "not measured"
    with open(log_file) as log:
        warnings = [line for line in log if " WARNING " in line]
    assert len(warnings) == 1 and f"state file {state} unreadable" in warnings[0]
    assert capsys.readouterr().err == ""


def test_cli_debug_logs_each_connect_attempt(echo_server: Server, tmp_path: object) -> None:
    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"debug") == b"debug"

    log_file = os.path.join(str(tmp_path), "debug.log")
    assert run_cli(["-d", "127.0.0.1"], use, log_file) == 0
    with open(log_file) as log:
        text = log.read()
    assert f"DEBUG connecting to 127.0.0.1:{echo_server.port} from 127.0.0.1" in text


def test_script_runs_and_stops_on_ctrl_c(
    echo_server: Server, script: Callable[[list[str]], subprocess.Popen], tmp_path: object
) -> None:
    """``python dispatch.py start`` as a user runs it, stopped by SIGINT."""
    port = refused_port()
    log_file = os.path.join(str(tmp_path), "run.log")
    process = script(["start", "--port", str(port), "--log-file", log_file, "127.0.0.1"])
    assert process.stdout is not None
    first = process.stdout.readline()
    assert f"proxy on 127.0.0.1:{port}" in first
    for line in iter(process.stdout.readline, ""):
        if line.startswith("log:"):
            break
    with client_through(Listening(("127.0.0.1", port)), (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"ctrl-c") == b"ctrl-c"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0
    assert "stopped after" in out
    assert err == ""


@pytest.mark.skipif(sys.platform == "win32", reason="no FIFO")
def test_script_with_a_fifo_as_its_state_file_serves_and_stops_on_sigterm(
    echo_server: Server, script: Callable[[list[str]], subprocess.Popen], tmp_path: Any
) -> None:
    """A FIFO would block the reader until something writes to it: it is
    passed over with one warning, and the proxy serves and stops."""
    port, state, log_file = refused_port(), tmp_path / "state.json", tmp_path / "run.log"
    os.mkfifo(state)
    process = script(
        ["start", "--port", str(port), "--state-file", str(state), "--log-file", str(log_file), "127.0.0.1"]
    )
    assert process.stdout is not None
    for line in iter(process.stdout.readline, ""):
        if line.startswith("log:"):
            break
    with client_through(Listening(("127.0.0.1", port)), (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"fifo") == b"fifo"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=TIMEOUT)
    assert (process.returncode, err) == (0, "")
    warnings = [line for line in log_file.read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and f"state file {state} unreadable (not a regular file)" in warnings[0]


def test_cli_ends_with_one_line_and_status_1_when_serving_fails_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    def no_thread(self: dispatch.LinkCapacities) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(dispatch.LinkCapacities, "measure", no_thread)
    log_file = str(tmp_path / "d.log")
    assert dispatch.main(["start", "--port", str(refused_port()), "--log-file", log_file, "127.0.0.1"]) == 1
    assert capsys.readouterr().err == "dispatch: error: cannot serve: can't start new thread\n"


def test_cli_prints_stats_periodically_and_at_the_end(
    echo_server: Server, script: Callable[[list[str]], subprocess.Popen], tmp_path: object
) -> None:
    port = refused_port()
    process = script(
        [
            "start",
            "--port",
            str(port),
            "--stats",
            "0.2",
            "--log-file",
            os.path.join(str(tmp_path), "run.log"),
            "127.0.0.2@3",
        ]
    )
    assert process.stdout is not None
    for line in iter(process.stdout.readline, ""):
        if line.startswith("ADDRESS  "):
            break  # the first table: the proxy is serving
    with client_through(Listening(("127.0.0.1", port)), (echo_server.host, echo_server.port)) as client:
        assert round_trip(client, b"x" * 5000) == b"x" * 5000
    for line in iter(process.stdout.readline, ""):
        if line.startswith("127.0.0.2 ") and line.split()[5] == "1":
            break  # a table that shows the connection
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert (process.returncode, err) == (0, "")
    lines = out.splitlines()
    last = max(index for index, line in enumerate(lines) if line.startswith("ADDRESS  "))
    final_table = lines[last : last + 2]
    assert final_table[0].split()[:6] == ["ADDRESS", "INTERFACE", "WEIGHT", "STATE", "OPEN", "TOTAL"]
    assert final_table[1].split()[:10] == ["127.0.0.2", "-", "3", "up", "0", "1", "5.0", "kB", "5.0", "kB"]
    assert "stopped after" in out


def test_cli_grace_keeps_relays_flowing_then_closes_them(
    echo_server: Server, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    auth_file = tmp_path / "users"
    auth_file.write_text("# who may use it\n\n{}:{}\n".format(*LOGIN))
    grace = 2.0  # room for the exchange below on a busy machine
    closed_after: list[float] = []
    log_file = str(tmp_path / "dispatch.log")

    def stopping_logged() -> bool:
        with open(log_file) as log:
            return "stopping with" in log.read()

    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port), login=LOGIN) as client:
            client.sendall(b"before")
            assert recv_exactly(client, 6) == b"before"
            stopped_at = time.monotonic()  # before the signal: the grace period cannot start earlier
            stop()
            # The open connections are counted once the stop is seen; a probe
            # below made before that would be counted as one of them.
            assert wait_for(stopping_logged)

            def refuses_new_clients() -> bool:
                try:
                    socket.create_connection(running.address, timeout=TIMEOUT).close()
                except (ConnectionRefusedError, ConnectionResetError):
                    return True  # reset: it was in the queue of the listener closed
                return False

            assert wait_for(refuses_new_clients)
            client.sendall(b"during")  # the grace period: still relayed
            assert recv_exactly(client, 6) == b"during"
            assert closed_by_proxy(client)
            closed_after.append(time.monotonic() - stopped_at)

    status = run_cli(["--grace", str(grace), "--auth-file", str(auth_file), "127.0.0.1"], use, log_file)
    assert status == 0
    assert grace <= closed_after[0] < TIMEOUT
    out = capsys.readouterr().out
    assert "login: 1 user, SOCKS5 and HTTP (SOCKS4 refused)" in out
    assert "1 open connection gets up to 2 s to finish" in out
    assert "stopped after" in out and "1 connection, 12 B up, 12 B down" in out
    with open(log_file) as log:
        text = log.read()
    assert "user 'alice' -> 127.0.0.1" in text
    assert LOGIN[1] not in text
    # Every start is told in the log: version, where, over which links.
    assert re.search(rf"INFO dispatch {re.escape(dispatch.__version__)} started: listening on 127\.0\.0\.1:\d+", text)
    assert re.search(r"INFO +127\.0\.0\.1 +lo +1 +primary\n", text)
    # The relay the grace period ran out on was cut, and says so.
    assert re.search(r"user 'alice' -> 127\.0\.0\.1:\d+ via 127\.0\.0\.1 \(lo\): cut by shutdown", text)


def test_cli_warns_when_exposed_without_login(
    echo_server: Server, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = str(tmp_path / "dispatch.log")

    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"lan") == b"lan"

    assert run_cli(["--ip", "0.0.0.0", "127.0.0.1"], use, log_file) == 0
    out = capsys.readouterr().out
    assert "clients allowed from: 127.0.0.0/8, 10.0.0.0/8" in out
    assert "(loopback and private networks)" in out
    assert "warning: anyone on this machine's private networks can use the proxy" in out
    limit = dispatch.default_max_connections()
    assert f"limits: {limit} connections at once (descriptor limit " in out
    with open(log_file) as log:
        text = log.read()
    assert "WARNING warning: anyone" in text
    assert f"limits: {limit} connections at once" in text


@pytest.mark.parametrize(
    "arguments",
    [
        ["--ip", "0.0.0.0", "--auth", "{}:{}".format(*LOGIN)],
        ["--ip", "0.0.0.0", "--allow", "192.168.1.0/24"],
        ["--ip", "127.0.0.1"],
    ],
)
def test_cli_does_not_warn_when_guarded_or_on_loopback(
    arguments: list[str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = str(tmp_path / "dispatch.log")
    assert run_cli([*arguments, "127.0.0.1"], lambda running, stop: None, log_file) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    assert LOGIN[1] not in out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        (b"alice:%s\nbob\n", "line 2: expected USER:PASS"),
        (b"# users\n\n:%s\n", "line 3: a user name must be 1 to 255"),
        (b"alice:%s\nalice:%s2\n", "user 'alice' is given more than once"),
        (b"alice:%s\n\xff\xfe:x\n", "line 2: not UTF-8"),
    ],
)
def test_cli_bad_auth_file_exits_2_naming_the_line_not_the_password(
    content: bytes | None, message: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    if content is not None:
        path.write_bytes(content.replace(b"%s", LOGIN[1].encode()))
    assert dispatch.main(["start", "--port", "0", "--auth-file", str(path), "127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert LOGIN[1] not in err


def test_cli_bad_auth_option_does_not_echo_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["start", "--auth", "alice" + LOGIN[1], "127.0.0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "expected USER:PASS" in err
    assert LOGIN[1] not in err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--allow", "10.0.0.0/33"], "is not an IP network or address"),
        (["--allow-target", "localhost"], "is not an IP network or address"),
        (["--max-connections", "0"], "is not a positive whole number"),
        (["--idle-timeout", "-1"], "is not a positive number of seconds"),
        (["--handshake-timeout", "nan"], "is not a positive number of seconds"),
        (["--grace", "-1"], "is not a number of seconds"),
    ],
)
def test_cli_bad_limits_exit_2(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["start", *arguments, "127.0.0.1"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def start_error_line(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``dispatch start ARGUMENTS 127.0.0.1`` writes when it
    refuses them with exit status 2 (argparse exits; dispatch's own checks
    return the status)."""
    status: object
    try:
        status = dispatch.main(["start", "--port", "0", *arguments, "127.0.0.1"])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dispatch: error: ")
    return line


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--idle-timeout", "2592000"], "argument --idle-timeout: '2592000' is out of range: from 1 to 604800 seconds"),
        (["--handshake-timeout", "2592000"], "argument --handshake-timeout: '2592000' is out of range"),
        (["--connect-timeout", "1e7"], "argument --connect-timeout: '1e7' is out of range: from 0.1 to 600 seconds"),
        (["--connect-timeout", "0.001"], "argument --connect-timeout: '0.001' is out of range"),
        (["--cooldown", "1e300"], "argument --cooldown: '1e300' is out of range"),
        (["--grace", "1e9"], "argument --grace: '1e9' is out of range: up to 3600 seconds"),
        (["--sticky", "1e9"], "argument --sticky: '1e9' is out of range"),
        (["--hedge", "1e9"], "argument --hedge: '1e9' is out of range"),
        (["--stats", "1e9"], "argument --stats: '1e9' is out of range"),
        (["--check-interval", "0.001"], "argument --check-interval: '0.001' is out of range: from 1 to 86400 seconds"),
    ],
)
def test_cli_durations_out_of_range_exit_2_with_one_line(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in start_error_line(arguments, capsys)


def test_cli_durations_at_the_ends_of_their_ranges_are_taken() -> None:
    parser = dispatch._build_parser()
    for option, (low, high) in dispatch.DURATION_RANGES.items():
        for seconds in (low, high):
            args = parser.parse_args(["start", option, f"{seconds:g}"])
            assert getattr(args, option[2:].replace("-", "_")) == seconds


@pytest.mark.parametrize("option", ["idle_timeout", "handshake_timeout", "connect_timeout", "cooldown", "hedge"])
def test_dispatcher_refuses_a_duration_that_would_overflow(option: str) -> None:
    with pytest.raises(ValueError, match=f"{option} must be .*at most 604800 seconds"):
        Dispatcher(["127.0.0.1"], port=0, **{option: 30 * 24 * 3600.0})


@pytest.mark.parametrize("content", [b"", b"# no users yet\n\n   # none\n"])
def test_cli_login_file_without_a_user_exits_2(
    content: bytes, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    path.write_bytes(content)
    assert dispatch.main(["start", "--port", "0", "--auth-file", str(path), "127.0.0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"dispatch: error: {path} holds no USER:PASS line: a login file without a user would let everyone in"
    )


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_cli_login_file_without_end_is_refused_unread(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["start", "--port", "0", "--auth-file", "/dev/zero", "127.0.0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dispatch: error: /dev/zero is larger than {dispatch.LOGIN_FILE_LIMIT:,} bytes: no login file"
    ]


def test_cli_odd_ports_and_a_password_in_a_cap_error_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "'١٠٨٠' is not a port number" in start_error_line(["--port", "١٠٨٠"], capsys)  # Arabic-Indic digits
    line = start_error_line(["--transparent", "28446", "--port", "28446", "--local"], capsys)
    assert "transparent: port 28446 is the proxy's own port" in line
    cap = "socks5h://u:s3cret@127.0.0.9:9050=1GB/day"
    assert dispatch.main(["start", "--port", "0", "--cap", cap, "socks5h://u:s3cret@127.0.0.1:9050"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "no link is named socks5h://u:***@127.0.0.9:9050" in line and "s3cret" not in line
    assert dispatch.main(["rules", "--transparent", "0", "--local"]) == 2
    assert capsys.readouterr().err == "dispatch: error: rules need the port to redirect to: --transparent 1 to 65535\n"


def test_cli_login_file_with_an_empty_path_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["start", "--port", "0", "--auth-file", "", "127.0.0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["dispatch: error: the login file's path is empty"]


def test_cli_login_file_dev_null_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    if not os.path.exists(os.devnull):
        pytest.skip(f"no {os.devnull} here")
    assert dispatch.main(["start", "--port", "0", "--auth-file", os.devnull, "127.0.0.1"]) == 2
    assert "holds no USER:PASS line" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ip, message",
    [
        ("", "argument --ip: an empty address: write 0.0.0.0 (or ::) to listen on every address"),
        ("0", "argument --ip: '0' is a short form of 0.0.0.0: write it out"),
        ("127.1", "argument --ip: '127.1' is a short form of 127.0.0.1: write it out"),
    ],
)
def test_cli_listen_address_that_means_every_address_unsaid_exits_2(
    ip: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        dispatch.main(["start", "--ip", ip, "--port", "0", "127.0.0.1"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line


@pytest.mark.parametrize(
    "address, why",
    [
        ("224.0.0.1", "224.0.0.1 is a multicast address"),
        ("ff02::1", "ff02::1 is a multicast address"),
        ("0.0.0.0", "0.0.0.0 is the unspecified address"),
        ("::", ":: is the unspecified address"),
        ("0.0.0.0@3", "0.0.0.0 is the unspecified address"),
    ],
)
def test_cli_multicast_and_unspecified_addresses_are_no_links(
    address: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dispatch.main(["start", "--port", "0", address]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dispatch: error: {why}")


def test_cli_error_shows_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    path = "/no/such\ndispatch: error: forged\x1b[2J"
    assert dispatch.main(["start", "--port", "0", "--auth-file", path, "127.0.0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("dispatch: error: cannot read /no/such\\ndispatch: error: forged\\x1b[2J: ")


def test_cli_log_file_in_a_missing_directory_exits_2_and_makes_none(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "new" / "dir"
    assert dispatch.main(["start", "--port", "0", "--log-file", str(missing / "x.log"), "127.0.0.1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"dispatch: error: cannot write the log: no directory {missing}"
    assert not (tmp_path / "new").exists()


def test_cli_list_marks_interfaces_without_an_address(windows: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["list"]) == 0
    rows = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["INTERFACE", "ADDRESS", "USABLE", "DEFAULT ROUTE", "METERED"],
        ["Wi-Fi", "127.0.0.2", "yes", "?", "?"],  # Windows: the default route and the cost are not read
        ["Ethernet 2", "127.0.0.3", "yes", "?", "?"],
        ["Ethernet 2", "fd00::3", "yes", "?", "?"],
        ["Bluetooth Device (Personal Area Network)", "-", "no address", "?", "?"],
    ]


def test_cli_list_shows_the_cost_windows_gives_each_connection(
    windows: None, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "powershell"  # Windows PowerShell, as it answers dispatch's question
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *GetConnectionProfiles*) ;; *) exit 2;; esac\n'
        "echo '{4F3A1C2E-0B7D-4E59-9A51-2C6E8D0F1A11} Variable'\n"
        "echo '{9c1d7b20-5e3f-4a8c-b6d2-7f0e1a2b3c44} Unrestricted'\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert dispatch.main(["list"]) == 0
    rows = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    assert {row[0]: row[-1] for row in rows[1:]} == {
        "Wi-Fi": "yes",
        "Ethernet 2": "no",
        "Bluetooth Device (Personal Area Network)": "?",  # no connection profile
    }


def test_cli_starts_with_windows_names(windows: None, echo_server: Server, tmp_path: Any) -> None:
    outcome: list[bytes] = []

    def use(running: Any, stop: Callable[[], None]) -> None:
        with client_through(running, (echo_server.host, echo_server.port)) as client:
            outcome.append(round_trip(client, b"through Wi-Fi"))

    assert run_cli(["Wi-Fi@3", "Ethernet 2"], use, str(tmp_path / "dispatch.log")) == 0
    assert outcome == [b"through Wi-Fi"]


def test_cli_logs_to_stdout_with_a_dash(script: Callable[[list[str]], subprocess.Popen]) -> None:
    port = refused_port()
    process = script(["start", "--port", str(port), "--log-file", "-", "127.0.0.1"])
    assert process.stdout is not None
    lines = []
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if " INFO dispatch " in line and "started: listening on" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=TIMEOUT)
    assert (process.returncode, err) == (0, "")
    assert "log: stdout" in "".join(lines)
    assert re.search(r" INFO stopping with 0 open connections\n", out)


def test_cli_second_ctrl_c_closes_every_connection_at_once(
    script: Callable[[list[str]], subprocess.Popen], echo_server: Server, tmp_path: Any
) -> None:
    port = refused_port()
    log_file = str(tmp_path / "dispatch.log")
    process = script(["start", "--port", str(port), "--grace", "60", "--log-file", log_file, "127.0.0.1"])
    assert process.stdout is not None
    for line in iter(process.stdout.readline, ""):
        if line.startswith("log:"):
            break
    with client_through(Listening(("127.0.0.1", port)), (echo_server.host, echo_server.port)) as client:
        client.sendall(b"held")
        assert recv_exactly(client, 4) == b"held"
        process.send_signal(signal.SIGINT)
        for line in iter(process.stdout.readline, ""):
            if line.startswith("dispatch: stopping; 1 open connection gets up to 60 s"):
                break
        asked = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT)
        assert time.monotonic() - asked < 5  # not the 60 s of grace
        assert closed_by_proxy(client)
    assert (process.returncode, err) == (0, "")
    assert "dispatch: a second signal: every connection closed at once" in out
    with open(log_file) as log:
        assert re.search(r"-> 127\.0\.0\.1:\d+ via 127\.0\.0\.1 \(lo\): cut by shutdown, 4 B up, 4 B down", log.read())


# A Python signal handler runs in the main thread between any two of its
# steps, inside Event.wait() with the event's lock held too; a handler that
# set the event there waited for that lock for ever (a CLI that ignored
# Ctrl-C, now and then). The locks are held here on purpose.
SIGNALLED_WHILE_HELD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import dispatch
with dispatch._StopSignals() as stop:
    with stop.stopping._cond:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100000))
    print("stopping", stop.wait(5), flush=True)
    with stop.hurry._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100000))
    print("hurry", stop.hurry.wait(5), flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # the handler before is back: the default ends the process
"""


def test_a_stop_signal_landing_while_the_stop_event_is_held_still_stops() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNALLED_WHILE_HELD, HERE], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert (done.stdout, done.stderr) == ("stopping True\nhurry True\n", "")
    assert done.returncode == -signal.SIGTERM


HUNG_UP = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import dispatch
if sys.argv[2] == "nohup":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
with dispatch._StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGHUP)
    print("stopping", stop.wait(1), flush=True)
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):  # the second, and more: nothing happens
        os.kill(os.getpid(), signum)
    print("hurry", stop.hurry.wait(5), "still here", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP (Windows)")
@pytest.mark.parametrize(("how", "stops"), [("terminal", True), ("nohup", False)])
def test_sighup_stops_as_sigterm_does_unless_ignored_and_more_signals_change_nothing(how: str, stops: bool) -> None:
    done = subprocess.run([sys.executable, "-c", HUNG_UP, HERE, how], capture_output=True, text=True, timeout=TIMEOUT)
    # Under nohup, SIGINT and SIGTERM are the first and second; else SIGHUP was.
    assert (done.stdout, done.stderr) == (f"stopping {stops}\nhurry True still here\n", "")
    assert done.returncode == 0


def test_stop_signals_outside_the_main_thread_raise_and_leave_nothing_running() -> None:
    raised: list[BaseException] = []

    def enter() -> None:
        try:
            with dispatch._StopSignals():
                pass
        except ValueError as error:
            raised.append(error)

    before = set(threading.enumerate())
    helper = threading.Thread(target=enter)
    helper.start()
    helper.join(TIMEOUT)
    assert [type(error) for error in raised] == [ValueError]  # as signal.signal() raises there
    assert set(threading.enumerate()) == before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sticky", "-1"], "argument --sticky: '-1' is not a number of seconds (0 or more)"),
        (["--check", "nohost"], "a check target is IP:PORT"),
        (["--check", "10.0.0.1:99999"], "a check target is IP:PORT"),
        (["--check", "bad..name:443"], "a check target is an IP address or a host name, and a port"),
        (["--check-interval", "0"], "argument --check-interval: '0' is not a positive number of seconds"),
        (["--hedge", "soon"], "argument --hedge: 'soon' is not a number of seconds"),
        (["--balance", "fastest"], "argument --balance: invalid choice: 'fastest'"),
        (["eth0@backup@2"], "one '@' at most"),
    ],
)
def test_cli_bad_balancing_arguments_exit_2_with_one_line(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in start_error_line(arguments, capsys)


def test_cli_start_help_says_which_balance_applies_when(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dispatch.main(["start", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "measured (the least open work for what each link was measured to carry; the default without weights)" in text
    )
    assert "round-robin (in turn, by the weights; the default when any ADDRESS has one)" in text


def test_cli_start_help_puts_every_option_in_a_group_a_user_scans(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dispatch.main(["start", "--help"])
    text = capsys.readouterr().out
    usage, _, body = text.partition("\n\n")
    grouped: dict[str, list[str]] = {}
    for heading, lines in re.findall(r"^(\S[^\n]*):\n((?: [^\n]*\n?)*)", body, re.M):
        grouped[heading] = re.findall(r"^ {2}(-[-\w]+)", lines, re.M)
    assert list(grouped)[2:] == [
        "listening and access",
        "links and balancing",
        "health and failover",
        "names",
        "the system around it: transparent mode, desktop switch, bond",
        "pages, statistics and logs",
        "limits",
    ]
    assert list(grouped.values())[1] == ["-h"]  # nothing left in argparse's own list
    listed = [option for options in list(grouped.values())[2:] for option in options]
    assert sorted(listed) == sorted(set(re.findall(r"\[(-[-\w]+)", usage)) - {"-h"})


def test_cli_start_banner_says_the_version_dispatch_V_says(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        dispatch.main(["-V"])
    version = capsys.readouterr().out.strip()
    assert run_cli(["127.0.0.1"], lambda running, stop: None, str(tmp_path / "dispatch.log")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(rf"{re.escape(version)}: SOCKS4/4a/5 and HTTP proxy on 127\.0\.0\.1:\d+", first)
