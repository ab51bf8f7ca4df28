"""dispatch over real links: three shaped uplinks in network namespaces.

tools/netlab.py builds the lab (Linux, root, iproute2); elsewhere these
tests skip, saying why. dispatch runs inside the lab's client namespace as a
user runs it, and the SOCKS clients are made there too; the servers run in
the server namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import socks

import dispatch
from conftest import (
    MICROSOCKS,
    TIMEOUT,
    DnsServer,
    Server,
    UdpServer,
    echo,
    free_port,
    import_netlab,
    netlab_or_skip,
    read_all,
    read_response,
    recv_exactly,
    round_trip,
    run_script,
    socks4_request,
    socks5_reply,
    socks5_request,
    tell_peer,
    wait_for,
)
from dispatch import Reply


LAB_PROXY_PORT = 1080  # inside the client namespace, where nothing else listens
LAB_DOWNLOAD_SIZE = 60_000


def build_lab(setup: str) -> Iterator[Any]:
    netlab = netlab_or_skip()
    lab = netlab.Lab(name=f"dlab-t{os.getpid() % 100000}{setup[0]}", setup=setup)
    with lab:
        lab.start_peer_echo()
        lab.start_http_server(size=LAB_DOWNLOAD_SIZE)
        yield lab


@pytest.fixture(scope="module")
def metrics_lab() -> Iterator[Any]:
    """One default route per uplink with metrics, no rules: the usual desktop."""
    if dispatch.PORTABLE:
        pytest.skip("routes by metric need binding to the device, which DISPATCH_PORTABLE switches off")
    yield from build_lab("metrics")


@pytest.fixture(scope="module")
def rules_lab() -> Iterator[Any]:
    """Source-address policy rules: binding the address alone picks the uplink."""
    yield from build_lab("rules")


class LabProxy:
    """``dispatch start`` running in a lab's client namespace."""

    def __init__(
        self, lab: Any, arguments: list[str], log_file: str, port: int = LAB_PROXY_PORT, where: str = "client"
    ) -> None:
        self.lab = lab
        self.log_file = log_file
        self.address = ("127.0.0.1", port)
        popen = lab.server_popen if where == "server" else lab.client_popen
        self.process = run_script(["start", "--port", str(port), "--log-file", log_file, *arguments], popen)
        assert self.process.stdout is not None
        self.banner = []
        for line in iter(self.process.stdout.readline, ""):
            self.banner.append(line)
            if line.startswith("log:"):
                break
        else:
            raise AssertionError(f"dispatch did not start: {self.process.communicate(timeout=TIMEOUT)}")

    def client(self, port: int, timeout: float = TIMEOUT, host: str | None = None) -> socks.socksocket:
        """A PySocks socket in the client namespace, connected through dispatch
        to the lab's server (or to ``host``, a name dispatch looks up)."""
        with import_netlab().netns(self.lab.client_ns):
            client = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        client.set_proxy(socks.SOCKS5, *self.address, rdns=host is not None)
        client.settimeout(timeout)
        try:
            client.connect((host or self.lab.service_address, port))
        except BaseException:
            client.close()
            raise
        return client

    def peer(self, host: str | None = None) -> str:
        """The source address the lab's peer-echo server sees (reached by ``host``, if given)."""
        with self.client(import_netlab().PEER_ECHO_PORT, host=host) as client:
            return read_all(client).decode().strip()

    def download(self, size: int, *, half_close: bool = True) -> int:
        """Fetch ``size`` bytes from the lab's HTTP server; return the body
        length. ``half_close=False`` keeps sending open until the end (some
        proxies end both directions at the client's EOF)."""
        with self.client(import_netlab().HTTP_PORT) as client:
            request = f"GET /file?size={size} HTTP/1.0\r\nHost: lab\r\n\r\n"
            if half_close:
                response = round_trip(client, request.encode())
            else:
                client.sendall(request.encode())
                response = read_all(client)
        head, _, body = response.partition(b"\r\n\r\n")
        return len(body) if head.split(b" ")[1:2] == [b"200"] else -1

    def log(self) -> str:
        with open(self.log_file) as log:
            return log.read()

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=TIMEOUT)
        assert (self.process.returncode, err) == (0, "")
        return out


@pytest.fixture
def lab_proxy(tmp_path: Any) -> Iterator[Callable[..., LabProxy]]:
    started: list[LabProxy] = []

    def start(lab: Any, *arguments: str, port: int = LAB_PROXY_PORT) -> LabProxy:
        proxy = LabProxy(lab, list(arguments), os.path.join(str(tmp_path), f"lab{len(started)}.log"), port)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.stop()


# Targets only the proxy's own machine may reach -----------------------------


@pytest.fixture(scope="class")
def shared(rules_lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """dispatch in the client namespace, shared (``--ip 0.0.0.0``) with a
    client in the server namespace: another machine. On the proxy's
    machine, a TCP and a UDP echo server (``echo``, ``udp``) listen on
    every address; on the other machine, a UDP echo server (``far_udp``)
    and a name server naming ``rebound.test`` 127.0.0.1. Two proxies
    share uplink 1's address: ``proxy`` as it comes, ``opened`` with
    ``--allow-target`` for loopback and uplink 2's address."""
    netlab = import_netlab()
    with netlab.netns(rules_lab.client_ns):
        echo_server = Server(echo, "0.0.0.0")
        udp_server = UdpServer(lambda data, sender: data, "0.0.0.0")
        ports = [free_port("0.0.0.0") for _ in range(2)]
    with netlab.netns(rules_lab.server_ns):
        far_udp = UdpServer(lambda data, sender: data, rules_lab.service_address)
        names = DnsServer(rules_lab.service_address)
    names.names["rebound.test"] = ["127.0.0.1"]
    uplink_1 = f"{rules_lab.uplink(1).server_addr}/{rules_lab.uplink(1).prefixlen}"  # both ends
    arguments = ["--ip", "0.0.0.0", "--allow", uplink_1, "--dns", f"{names.host}:{names.port}", "--no-state"]
    arguments.append(rules_lab.uplink(1).client_addr)
    opening = ["--allow-target", "127.0.0.0/8", "--allow-target", rules_lab.uplink(2).client_addr]
    logs = tmp_path_factory.mktemp("targets")
    proxies = [
        LabProxy(rules_lab, [*arguments, *more], str(logs / f"{port}.log"), port)
        for port, more in zip(ports, [[], opening])
    ]
    try:
        yield SimpleNamespace(
            lab=rules_lab, echo=echo_server, udp=udp_server, far_udp=far_udp, proxy=proxies[0], opened=proxies[1]
        )
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in (echo_server, udp_server, far_udp, names):
            server.close()


class TestLabTargetsOfThisMachine:
    """A client on another machine asks a shared dispatch for services of
    the proxy's own machine (see the ``shared`` fixture)."""

    @staticmethod
    def client(shared: SimpleNamespace, proxy: LabProxy) -> socket.socket:
        """A TCP connection from the other machine to ``proxy``."""
        with import_netlab().netns(shared.lab.server_ns):
            return socket.create_connection((shared.lab.uplink(1).client_addr, proxy.address[1]), timeout=TIMEOUT)

    def own_targets(self, shared: SimpleNamespace) -> list[str]:
        """Addresses of the proxy's machine: loopback, the address the
        client reached, one of a link not in use, and the cloud's metadata
        service (link-local)."""
        lab = shared.lab
        return ["127.0.0.1", "127.0.0.2", lab.uplink(1).client_addr, lab.uplink(2).client_addr, "169.254.169.254"]

    def socks5_code(self, shared: SimpleNamespace, proxy: LabProxy, host: str, port: int) -> int:
        with self.client(shared, proxy) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request(host, port))
            return socks5_reply(sock)[0]

    def test_socks5_is_refused_them_by_address_and_by_name(self, shared: SimpleNamespace) -> None:
        port = shared.echo.port
        for host in [*self.own_targets(shared), "localhost", "rebound.test"]:
            assert self.socks5_code(shared, shared.proxy, host, port) == Reply.NOT_ALLOWED, host
        line = f"refused {shared.lab.uplink(1).server_addr} the target "
        assert wait_for(lambda: line in shared.proxy.log())
        assert "only this machine may reach it" in shared.proxy.log()

    def test_socks4_and_4a_are_refused_them(self, shared: SimpleNamespace) -> None:
        port = shared.echo.port
        requests = [socks4_request(ip, port) for ip in self.own_targets(shared)]
        requests.append(socks4_request("", port, host="localhost"))
        for request in requests:
            with self.client(shared, shared.proxy) as sock:
                sock.sendall(request)
                assert recv_exactly(sock, 8)[:2] == b"\x00\x5b", request

    def test_http_get_and_connect_are_refused_them_with_403(self, shared: SimpleNamespace) -> None:
        port = shared.echo.port
        for host in ["127.0.0.1", "localhost", shared.lab.uplink(2).client_addr]:
            for request in (
                f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n",
                f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n",
            ):
                with self.client(shared, shared.proxy) as sock:
                    sock.sendall(request.encode())
                    assert read_response(sock)[0] == 403, request

    def test_a_udp_datagram_to_them_is_dropped_and_allow_target_lets_it_through(self, shared: SimpleNamespace) -> None:
        own = (shared.lab.uplink(2).client_addr, shared.udp.port)
        far = (shared.lab.service_address, shared.far_udp.port)
        for proxy, dropped in ((shared.proxy, 1), (shared.opened, 0)):
            with import_netlab().netns(shared.lab.server_ns):
                client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
                client.set_proxy(socks.SOCKS5, shared.lab.uplink(1).client_addr, proxy.address[1])
                client.settimeout(TIMEOUT)
                with client:
                    client.sendto(b"to its own", own)
                    # Relayed in order: once this one is back, the first was dealt with.
                    client.sendto(b"far", far)
                    answers = [client.recvfrom(65535)[0]]
                    while answers[-1] != b"far":
                        answers.append(client.recvfrom(65535)[0])
            if dropped:
                assert answers == [b"far"] and shared.udp.received == []
            # Opened, it is sent: from the link's device, no answer of this
            # machine's own comes back to it; where the device is not bound
            # (DISPATCH_PORTABLE), the answer comes back as any other.
            line = re.compile(rf"{2 - dropped} datagrams up, \d+ down, {dropped} dropped")
            assert wait_for(lambda: line.search(proxy.log()) is not None)  # noqa: B023 (waited for here, in this turn)

    def test_allow_target_opens_what_it_names_to_other_machines_and_no_more(self, shared: SimpleNamespace) -> None:
        with self.client(shared, shared.opened) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request("127.0.0.1", shared.echo.port))
            assert socks5_reply(sock)[0] == Reply.SUCCEEDED
            assert round_trip(sock, b"opened") == b"opened"
        own = shared.lab.uplink(3).client_addr
        assert self.socks5_code(shared, shared.opened, own, shared.echo.port) == Reply.NOT_ALLOWED

    def test_the_proxy_itself_is_not_refused(self, shared: SimpleNamespace) -> None:
        """A browser set to use the proxy asks it for its pages in absolute form."""
        reached = f"{shared.lab.uplink(1).client_addr}:{shared.proxy.address[1]}"
        with self.client(shared, shared.proxy) as sock:
            sock.sendall(f"GET http://{reached}/stats.json HTTP/1.1\r\nHost: {reached}\r\n\r\n".encode())
            status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["listening"] == f"0.0.0.0:{shared.proxy.address[1]}"

    def test_a_tunnel_to_the_proxy_itself_is_refused(self, shared: SimpleNamespace) -> None:
        """Through a tunnel to itself the client would speak to the proxy
        from this machine's own address, and be given its loopback."""
        port = shared.proxy.address[1]
        for host in (shared.lab.uplink(1).client_addr, "127.0.0.1", "localhost"):
            assert self.socks5_code(shared, shared.proxy, host, port) == Reply.NOT_ALLOWED, host
            with self.client(shared, shared.proxy) as sock:
                sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
                assert read_response(sock)[0] == 403, host

    def test_other_targets_are_reached_as_ever(self, shared: SimpleNamespace) -> None:
        lab = shared.lab
        with self.client(shared, shared.proxy) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exactly(sock, 2) == b"\x05\x00"
            sock.sendall(socks5_request(lab.service_address, import_netlab().PEER_ECHO_PORT))
            assert socks5_reply(sock)[0] == Reply.SUCCEEDED
            assert read_all(sock).decode().strip() == lab.uplink(1).client_addr


def test_lab_uplink_counters_show_each_link_carries_its_share(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Without binding to the device, uplinks 2 and 3 do not work at all here."""
    proxy = lab_proxy(metrics_lab, "--balance", "round-robin", *(link.client_addr for link in metrics_lab.uplinks))
    before = metrics_lab.counters()
    sizes: list[int | str] = []

    def download_six() -> None:
        for _ in range(6):
            try:
                sizes.append(proxy.download(LAB_DOWNLOAD_SIZE))
            except OSError as error:
                sizes.append(repr(error))

    # Five at a time: the lab's HTTP server has socketserver's accept queue
    # of 5, and connections beyond it may be closed unanswered.
    threads = [threading.Thread(target=download_six) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    after = metrics_lab.counters()
    assert sizes == [LAB_DOWNLOAD_SIZE] * 30
    share = 10 * LAB_DOWNLOAD_SIZE
    for index in (1, 2, 3):
        received = after[index].rx_bytes - before[index].rx_bytes
        # Payload plus TCP/IP and Ethernet headers, a few percent more.
        assert share <= received <= share * 1.15, f"uplink {index} received {received} B"
    # Each connection's log line is written once its relay has ended.
    deadline = time.monotonic() + TIMEOUT
    while (log := proxy.log()).count(": ok,") < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    for link in metrics_lab.uplinks:
        assert log.count(f"via {link.client_addr} ({link.client_ifname}): ok") == 10


@pytest.mark.parametrize("lab_name", ["metrics_lab", "rules_lab"])
def test_lab_interface_names_work(
    lab_name: str, request: pytest.FixtureRequest, lab_proxy: Callable[..., LabProxy]
) -> None:
    lab = request.getfixturevalue(lab_name)
    proxy = lab_proxy(lab, *(link.client_ifname for link in lab.uplinks))
    seen = [proxy.peer() for _ in range(6)]
    addresses = [link.client_addr for link in lab.uplinks]
    assert seen == addresses * 2


def test_lab_start_without_addresses_uses_every_uplink(metrics_lab: Any, lab_proxy: Callable[..., LabProxy]) -> None:
    proxy = lab_proxy(metrics_lab)
    banner = "".join(proxy.banner)
    for link in metrics_lab.uplinks:
        assert f"{link.client_addr}  {link.client_ifname}" in banner
    seen = [proxy.peer() for _ in range(6)]
    assert sorted(seen) == sorted([link.client_addr for link in metrics_lab.uplinks] * 2)


def test_lab_dark_link_costs_a_client_one_hedge_and_comes_back_by_a_retest(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Without --check: a connection that meets the dark link waits one
    --hedge (2 s here), not the connect timeout (5 s); a retest brings the
    link back."""
    dark = metrics_lab.uplink(1)
    hedge = 2.0  # far above a connection's own time on a busy machine, and below the connect timeout
    links = (link.client_addr for link in metrics_lab.uplinks)
    proxy = lab_proxy(metrics_lab, "--balance", "round-robin", "--cooldown", "2", "--hedge", f"{hedge:g}", *links)
    metrics_lab.darken(1)
    try:
        durations, seen = [], []
        for _ in range(9):
            started = time.monotonic()
            seen.append(proxy.peer())
            durations.append(time.monotonic() - started)
        assert max(durations) < hedge + 1.0 < dispatch.DEFAULT_CONNECT_TIMEOUT, durations
        assert 1 <= len([d for d in durations if d >= hedge]) <= 2, durations
        assert dark.client_addr not in seen
        assert set(seen) == {metrics_lab.uplink(2).client_addr, metrics_lab.uplink(3).client_addr}
        assert re.search(
            rf"sitting out: {re.escape(dark.client_addr)} \({dark.client_ifname}\): no answer in 2\.\d s", proxy.log()
        )
    finally:
        metrics_lab.restore(1)
    # No client tries it: a retest (at most 2 s apart here) brings it back.
    assert wait_for(lambda: f"back in use: {dark.client_addr} ({dark.client_ifname}) (a retest reached" in proxy.log())
    deadline = time.monotonic() + TIMEOUT
    while proxy.peer() != dark.client_addr:
        assert time.monotonic() < deadline, "the restored link was not used again"


def lab_status(proxy: LabProxy) -> dict[str, Any]:
    """``/stats.json`` of a dispatch running in the lab."""
    with import_netlab().netns(proxy.lab.client_ns):
        sock = socket.create_connection(proxy.address, timeout=TIMEOUT)
    with sock:
        host = f"{proxy.address[0]}:{proxy.address[1]}"  # as a browser names it
        sock.sendall(f"GET /stats.json HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return json.loads(read_response(sock)[2])


LAB_UPSTREAM_PORT = 1081  # inside the server namespace, where nothing else listens


@contextlib.contextmanager
def microsocks_on_server(lab: Any) -> Generator[str, None, None]:
    """microsocks serving on the lab's server address, as long as the block
    runs; its URL (socks5://). Skips where microsocks is not installed."""
    if not os.path.exists(MICROSOCKS):
        pytest.skip("microsocks is not installed")
    upstream = lab.server_popen(
        [MICROSOCKS, "-i", lab.service_address, "-p", str(LAB_UPSTREAM_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert lab.wait_for_port(LAB_UPSTREAM_PORT, host=lab.service_address, which="server")
        yield f"socks5://{lab.service_address}:{LAB_UPSTREAM_PORT}"
    finally:
        upstream.kill()
        upstream.wait()


def test_lab_one_upstream_proxy_reached_over_each_link_is_three_links(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """microsocks on the server, named once per uplink (+IFACE): each
    connection to it leaves by its own uplink, so the three carry a share
    each (without binding to the device, uplinks 2 and 3 would carry none)."""
    with microsocks_on_server(metrics_lab) as url:
        links = [f"{url}+{link.client_ifname}" for link in metrics_lab.uplinks]
        proxy = lab_proxy(metrics_lab, "--balance", "round-robin", *links)
        before = metrics_lab.counters()
        sizes = [proxy.download(LAB_DOWNLOAD_SIZE, half_close=False) for _ in range(6)]
        assert sizes == [LAB_DOWNLOAD_SIZE] * 6
        after = metrics_lab.counters()
        for index in (1, 2, 3):
            received = after[index].rx_bytes - before[index].rx_bytes
            assert 2 * LAB_DOWNLOAD_SIZE <= received <= 2 * LAB_DOWNLOAD_SIZE * 1.2, f"uplink {index}: {received} B"
        rows = {row["link"]: row["connections"] for row in lab_status(proxy)["addresses"]}
        assert rows == dict.fromkeys(links, 2)


def test_lab_an_upstream_elsewhere_that_names_a_loopback_udp_relay_is_refused(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """A SOCKS5 upstream on the server whose UDP ASSOCIATE reply names
    127.0.0.1: the clients' datagrams would go to a service on the proxy's
    own machine. The association is refused, and the log says why once."""
    netlab = import_netlab()
    with netlab.netns(metrics_lab.client_ns):
        service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # what such datagrams would reach
    with netlab.netns(metrics_lab.server_ns):
        listener = socket.create_server((metrics_lab.service_address, 0))
    service.bind(("127.0.0.1", 0))
    relay = socket.inet_aton("127.0.0.1") + service.getsockname()[1].to_bytes(2, "big")

    def upstream_proxy() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn, contextlib.suppress(OSError):
                conn.settimeout(TIMEOUT)
                recv_exactly(conn, 3)  # 05 01 00
                conn.sendall(b"\x05\x00")
                recv_exactly(conn, 10)  # UDP ASSOCIATE 0.0.0.0:0
                conn.sendall(b"\x05\x00\x00\x01" + relay)
                conn.recv(1)  # until dispatch hangs up

    serving = threading.Thread(target=upstream_proxy, daemon=True)
    serving.start()
    url = f"socks5://{metrics_lab.service_address}:{listener.getsockname()[1]}"
    try:
        proxy = lab_proxy(metrics_lab, url)
        for _ in range(2):
            with netlab.netns(metrics_lab.client_ns):
                sock = socket.create_connection(proxy.address, timeout=TIMEOUT)
            with sock:
                sock.sendall(b"\x05\x01\x00" + socks5_request("0.0.0.0", 0, command=3))
                assert recv_exactly(sock, 2) == b"\x05\x00"
                assert socks5_reply(sock)[0] == Reply.GENERAL_FAILURE
        line = f"upstream proxy {url} failed: the upstream proxy named its UDP relay 127.0.0.1:"
        assert wait_for(lambda: line in proxy.log())
        assert proxy.log().count(line) == 1
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        serving.join(TIMEOUT)
        service.close()


def lab_downloads(proxy: LabProxy, count: int, size: int) -> list[int]:
    """``count`` downloads of ``size`` bytes started together; their lengths."""
    sizes: list[int] = []
    threads = [threading.Thread(target=lambda: sizes.append(proxy.download(size))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 6)
    return sizes


def test_lab_measured_balancing_learns_each_links_capacity(rules_lab: Any, lab_proxy: Callable[..., LabProxy]) -> None:
    """Links of 1,200, 1,200 and 400 kB/s, no weights: a batch of downloads
    measures them, and the next batch gives the slow link fewer."""
    proxy = lab_proxy(rules_lab, *(link.client_ifname for link in rules_lab.uplinks))
    assert lab_downloads(proxy, 5, 3_000_000) == [3_000_000] * 5  # five: the lab server's accept queue
    rows = {row["interface"]: row for row in lab_status(proxy)["addresses"]}
    capacities = [rows[link.client_ifname]["capacity"] for link in rules_lab.uplinks]
    # Near each link's rate (a busy machine reads some of it late), and the
    # slow link well below the two fast ones: what the next batch goes by.
    for capacity, rate in zip(capacities, (1200, 1200, 400)):
        assert capacity is not None and 0.5 * rate * 1000 <= capacity <= 1.2 * rate * 1000, capacities
    assert capacities[2] < 0.6 * min(capacities[:2]), capacities
    before = {name: row["connections"] for name, row in rows.items()}
    assert lab_downloads(proxy, 5, 300_000) == [300_000] * 5
    after = {row["interface"]: row["connections"] - before[row["interface"]] for row in lab_status(proxy)["addresses"]}
    assert after[rules_lab.uplink(3).client_ifname] <= 1 < after[rules_lab.uplink(1).client_ifname], after


def connections_per_link(proxy: LabProxy) -> dict[str, int]:
    return {row["interface"]: row["connections"] for row in lab_status(proxy)["addresses"]}


def batch_split(proxy: LabProxy, count: int, size: int) -> list[int]:
    """``count`` downloads of ``size`` started together: how many each uplink got."""
    before = connections_per_link(proxy)
    assert lab_downloads(proxy, count, size) == [size] * count
    after = connections_per_link(proxy)
    return [after[link.client_ifname] - before[link.client_ifname] for link in proxy.lab.uplinks]


def over_soonest(split: Sequence[int], rates: Sequence[float]) -> float:
    """How many times as long as the soonest possible a batch of equal
    downloads split so over links of ``rates`` takes: its slowest link's time
    over the time of the whole batch on all the links at once."""
    return max(count / rate for count, rate in zip(split, rates)) / (sum(split) / sum(rates))


def test_lab_a_short_batch_after_a_short_one_goes_where_it_finishes_soonest(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Links of 1,200, 1,200 and 400 kB/s: one batch of 24 downloads of
    250 kB (two seconds) measures them, and the next splits about 11/10/3
    rather than 8/8/8 (which takes 2.3 times as long as the soonest split);
    after the first and third swap rates, again one short batch is enough.
    Half again the soonest leaves room for a busy machine's measurements."""
    proxy = lab_proxy(rules_lab, *(link.client_ifname for link in rules_lab.uplinks))
    batch_split(proxy, 24, 250_000)
    split = batch_split(proxy, 24, 250_000)
    assert over_soonest(split, (1200, 1200, 400)) < 1.5, split
    try:
        rules_lab.set_rate(1, 400_000)
        rules_lab.set_rate(3, 1_200_000)
        batch_split(proxy, 24, 250_000)  # on the old figures: uplink 1 takes long
        split = batch_split(proxy, 24, 250_000)
        assert over_soonest(split, (400, 1200, 1200)) < 1.5, split
    finally:
        rules_lab.set_rate(1, 1_200_000)
        rules_lab.set_rate(3, 400_000)
    rows = {row["interface"]: row for row in lab_status(proxy)["addresses"]}
    assert all(rows[link.client_ifname]["capacity_source"] == "measured" for link in rules_lab.uplinks)


def test_lab_a_restart_splits_the_first_batch_by_the_capacities_kept(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], tmp_path: Any
) -> None:
    state = str(tmp_path / "state.json")
    interfaces = [link.client_ifname for link in rules_lab.uplinks]
    proxy = lab_proxy(rules_lab, "--state-file", state, *interfaces)
    batch_split(proxy, 24, 250_000)
    proxy.stop()  # writes the state file
    kept = dispatch.read_state(state)
    for name, rate in zip(interfaces, (1200, 1200, 400)):
        assert 0.7 * rate * 1000 <= kept[name] <= 1.1 * rate * 1000, kept
    again = lab_proxy(rules_lab, "--state-file", state, *interfaces)
    assert {row["capacity_source"] for row in lab_status(again)["addresses"]} == {"remembered"}
    first, second, slow = batch_split(again, 24, 250_000)
    assert slow <= 4 and min(first, second) >= 9, (first, second, slow)


def test_lab_checks_find_a_dark_link_and_bring_it_back_without_clients(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    dark = metrics_lab.uplink(1)
    check = f"{metrics_lab.service_address}:{import_netlab().PEER_ECHO_PORT}"
    proxy = lab_proxy(
        metrics_lab,
        "--check",
        check,
        "--check-interval",
        "1",
        "--hedge",
        "0.5",
        "--balance",
        "round-robin",
        *(link.client_addr for link in metrics_lab.uplinks),
    )
    back = f"back in use: {dark.client_addr} ({dark.client_ifname}) ("
    # Dark with no client around: the checks alone take it out.
    metrics_lab.darken(1)
    try:
        assert wait_for(lambda: f"failed 3 checks of {check}" in proxy.log())
    finally:
        metrics_lab.restore(1)
    restored = time.monotonic()
    assert wait_for(lambda: back + "passed 2 checks" in proxy.log())
    assert time.monotonic() - restored < 8
    # Dark for 6 s while clients come: 30 connections, all through, none slow.
    metrics_lab.darken(1)
    darkened = time.monotonic()
    try:
        durations, seen = [], []
        while len(durations) < 30:
            started = time.monotonic()
            seen.append(proxy.peer())
            durations.append(time.monotonic() - started)
            time.sleep(max(0.0, darkened + 6 * len(durations) / 30 - time.monotonic()))  # over the 6 s
        # At most one hedge (0.5 s) each, with room for a busy machine: none
        # waits the connect timeout (5 s).
        assert max(durations) < 2.0, durations
        assert dark.client_addr not in seen
    finally:
        metrics_lab.restore(1)
    restored = time.monotonic()
    # Within 8 s it carries connections again, and no client tried it first.
    assert wait_for(lambda: proxy.log().count(back) == 2)
    assert time.monotonic() - restored < 8
    assert dark.client_addr in [proxy.peer() for _ in range(3)]


@contextlib.contextmanager
def web_server_silent_through(lab: Any, uplink: Any) -> Iterator[None]:
    """As a site that blocks one provider: the lab's web server never
    answers through ``uplink`` while the block runs (its answers from the
    web port to the uplink's address go nowhere); the peer-echo server
    answers as ever."""
    rule = ["to", f"{uplink.client_addr}/32", "ipproto", "tcp", "sport", str(import_netlab().HTTP_PORT), "blackhole"]
    if lab.run_in_server(["ip", "rule", "add", *rule]).returncode != 0:
        pytest.skip("ip rule cannot match a port here (Linux 4.17 or later can)")
    try:
        yield
    finally:
        lab.run_in_server(["ip", "rule", "del", *rule])


def test_lab_a_site_silent_through_one_link_keeps_it_out_only_until_a_retest_reaches_another_site(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    netlab = import_netlab()
    blocked = metrics_lab.uplink(1)
    with web_server_silent_through(metrics_lab, blocked):
        proxy = lab_proxy(
            metrics_lab,
            "--cooldown",
            "2",
            "--connect-timeout",
            "2",
            "--hedge",
            "0.5",
            "--balance",
            "round-robin",
            *(link.client_addr for link in metrics_lab.uplinks),
        )
        sat_out = f"sitting out: {blocked.client_addr} ({blocked.client_ifname}): "
        while sat_out not in proxy.log():
            assert proxy.download(1000) == 1000  # through another link when uplink 1 is silent
        out = time.monotonic()
        # Another site, reached by the other links meanwhile.
        assert blocked.client_addr not in {proxy.peer() for _ in range(2)}
        back = (
            f"back in use: {blocked.client_addr} ({blocked.client_ifname}) (a retest reached "
            f"{metrics_lab.service_address}:{netlab.PEER_ECHO_PORT})"
        )
        assert wait_for(lambda: back in proxy.log())
        assert time.monotonic() - out < 8  # the first retest, 1 s after the failure
        assert blocked.client_addr in {proxy.peer() for _ in range(6)}


def test_lab_after_a_fresh_start_on_a_site_silent_through_one_link_it_is_back_soon_after_traffic_to_another(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """With the defaults (a 5 s connect timeout, a 1 s hedge), the first site
    never answers through uplink 1; traffic goes on to a site it reaches. A
    retest goes there and brings it back within a few seconds, instead of
    waiting out the silent site."""
    netlab = import_netlab()
    blocked = metrics_lab.uplink(1)
    with web_server_silent_through(metrics_lab, blocked):
        proxy = lab_proxy(metrics_lab, "--balance", "round-robin", *(link.client_addr for link in metrics_lab.uplinks))
        sat_out = f"sitting out: {blocked.client_addr} ({blocked.client_ifname}): "
        while sat_out not in proxy.log():
            assert proxy.download(1000) == 1000
        assert blocked.client_addr not in {proxy.peer() for _ in range(2)}
        reached = time.monotonic()
        back = (
            f"back in use: {blocked.client_addr} ({blocked.client_ifname}) (a retest reached "
            f"{metrics_lab.service_address}:{netlab.PEER_ECHO_PORT})"
        )
        assert wait_for(lambda: back in proxy.log())
        assert time.monotonic() - reached < 4


def test_lab_a_backup_link_carries_traffic_only_while_both_primaries_are_dark(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    one, two, three = (metrics_lab.uplink(n).client_addr for n in (1, 2, 3))
    proxy = lab_proxy(metrics_lab, "--cooldown", "2", "--connect-timeout", "2", one, two, f"{three}@backup")
    assert set(proxy.peer() for _ in range(6)) == {one, two}
    metrics_lab.darken(1)
    metrics_lab.darken(2)
    try:
        assert [proxy.peer() for _ in range(6)] == [three] * 6  # every one succeeds, through the backup
    finally:
        metrics_lab.restore(1)
        metrics_lab.restore(2)
    assert wait_for(lambda: proxy.log().count("(a retest reached") >= 2)
    assert set(proxy.peer() for _ in range(6)) == {one, two}  # the backup is idle again
    rows = {row["ip"]: row for row in lab_status(proxy)["addresses"]}
    assert (rows[three]["tier"], rows[three]["state"], rows[three]["connections"]) == ("backup", "standby", 6)


# Data caps, in the lab -----------------------------------------------------


def batches_until(proxy: LabProxy, done: Callable[[], bool], most: int = 20) -> int:
    """Batches of 12 downloads started together, one after another until
    ``done()``, at most ``most``; return how many."""
    for count in range(1, most + 1):
        assert lab_downloads(proxy, 12, LAB_DOWNLOAD_SIZE) == [LAB_DOWNLOAD_SIZE] * 12
        if done():
            return count
    raise AssertionError(f"not done after {most} batches")


@pytest.mark.parametrize("action", ["backup", "stop"])
def test_lab_a_cap_reached_in_a_batch_of_downloads_moves_new_connections_off_the_link(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], action: str
) -> None:
    names = [link.client_ifname for link in rules_lab.uplinks]
    capped = names[2]
    proxy = lab_proxy(rules_lab, "--no-state", "--cap", f"{capped}=300kB/day", "--cap-action", action, *names)
    batches_until(proxy, lambda: lab_status(proxy)["caps"][0]["reached"])
    before = connections_per_link(proxy)
    assert lab_downloads(proxy, 12, LAB_DOWNLOAD_SIZE) == [LAB_DOWNLOAD_SIZE] * 12
    after = connections_per_link(proxy)
    moved = {name: after[name] - before[name] for name in names}
    assert moved[capped] == 0 and sum(moved.values()) == 12, moved
    (cap,) = lab_status(proxy)["caps"]
    assert cap["used_bytes"] >= 300_000 and cap["cap"] == f"{capped}=300kB/day"
    log = proxy.log()
    told = [
        f"link {capped} used 75% of its cap",
        f"link {capped} used 95% of its cap",
        f"link {capped} reached its cap",
    ]
    assert [log.count(line) for line in told] == [1, 1, 1]
    assert log.index(told[0]) < log.index(told[1]) < log.index(told[2])


def test_lab_usage_of_a_capped_link_survives_sigkill_losing_at_most_a_few_seconds(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], tmp_path: Any
) -> None:
    """The state file is written within USAGE_SAVE_INTERVAL of the usage
    changing: a dispatch killed then starts again from what it wrote."""
    state = tmp_path / "state.json"
    link = rules_lab.uplink(1).client_ifname
    arguments = ["--state-file", str(state), "--cap", f"{link}=1GB/month", link]
    proxy = lab_proxy(rules_lab, *arguments)
    for _ in range(10):
        assert proxy.download(LAB_DOWNLOAD_SIZE) == LAB_DOWNLOAD_SIZE
    assert wait_for(lambda: lab_status(proxy)["caps"][0]["used_bytes"] >= 10 * LAB_DOWNLOAD_SIZE)
    used = lab_status(proxy)["caps"][0]["used_bytes"]

    def kept() -> int:
        usage = json.loads(state.read_text()).get("usage", {}) if state.exists() else {}
        return sum(usage.get(link, {}).values())

    assert wait_for(lambda: kept() >= used, timeout=dispatch.USAGE_SAVE_INTERVAL + TIMEOUT)
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.communicate(timeout=TIMEOUT)
    again = lab_proxy(rules_lab, *arguments)
    assert lab_status(again)["caps"][0]["used_bytes"] >= used


# Steering a running dispatch, in the lab ----------------------------------


def dispatch_link(proxy: LabProxy, *arguments: str) -> tuple[int, str, str]:
    """``dispatch link ARGUMENTS`` run by a user beside the lab's dispatch: (status, stdout, stderr)."""
    process = run_script(["link", "--port", str(proxy.address[1]), *arguments], proxy.lab.client_popen)
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def test_lab_dispatch_link_pauses_resumes_weighs_and_closes_a_link_of_a_running_dispatch(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    names = [link.client_ifname for link in rules_lab.uplinks]
    proxy = lab_proxy(rules_lab, "--no-state", "--balance", "round-robin", *names)
    assert dispatch_link(proxy, names[2], "pause") == (0, f"link {names[2]} paused\n", "")
    paused = batch_split(proxy, 6, LAB_DOWNLOAD_SIZE)
    assert paused[2] == 0 and sum(paused) == 6, paused
    assert dispatch_link(proxy, names[2], "resume") == (0, f"link {names[2]} resumed\n", "")
    assert dispatch_link(proxy, names[0], "weight", "4") == (0, f"link {names[0]} has weight 4\n", "")
    assert batch_split(proxy, 12, LAB_DOWNLOAD_SIZE) == [8, 2, 2]
    # A long download through the slow link, ended by its close.
    assert dispatch_link(proxy, names[0], "pause")[0] == dispatch_link(proxy, names[1], "pause")[0] == 0
    got: list[int] = []
    downloading = threading.Thread(target=lambda: got.append(proxy.download(50 * LAB_DOWNLOAD_SIZE)))
    downloading.start()
    assert wait_for(lambda: {row["interface"]: row["open"] for row in lab_status(proxy)["addresses"]}[names[2]] == 1)
    status, out, _ = dispatch_link(proxy, names[2], "close")
    assert (status, out) == (0, f"link {names[2]} closed (1 connection ended)\n")
    downloading.join(TIMEOUT)
    assert got and got[0] < 50 * LAB_DOWNLOAD_SIZE, got  # cut short
    assert [link["state"] for link in lab_status(proxy)["links"]] == ["paused", "paused", "closed"]
    assert f"link {names[2]} closed (1 connection ended) from 127.0.0.1" in proxy.log()


def test_lab_dispatch_link_refuses_in_one_line_and_exit_1(rules_lab: Any, lab_proxy: Callable[..., LabProxy]) -> None:
    link = rules_lab.uplink(1).client_ifname
    proxy = lab_proxy(rules_lab, "--no-state", link)
    assert dispatch_link(proxy, "nosuch0", "pause") == (
        1,
        "",
        "dispatch link: refused (404): no link is named 'nosuch0'\n",
    )
    status, out, err = dispatch_link(proxy, "--port", str(LAB_PROXY_PORT + 1), link, "pause")
    assert (status, out) == (1, "") and err.startswith("dispatch link: no dispatch answers at 127.0.0.1:")


# Names through the links, in the lab ---------------------------------------


@pytest.fixture
def lab_dns(metrics_lab: Any) -> Iterator[DnsServer]:
    """A DNS server for the lab's names on the server side (the lab's
    service address, port 53), as an ISP's would be."""
    with import_netlab().netns(metrics_lab.server_ns):
        server = DnsServer(metrics_lab.service_address, 53)
    yield server
    server.close()


def fresh_name(server: DnsServer, lab: Any, prefix: str = "n") -> str:
    """A name no lookup has asked yet (the cache cannot answer it), of the lab's server."""
    name = f"{prefix}{random.randrange(10**9)}.lab.test"
    server.names[name] = [lab.service_address]
    return name


def test_lab_a_dark_default_link_costs_a_client_asking_by_name_no_more_than_the_hedge(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer
) -> None:
    """The client's default route is the first link: the system's resolver
    would wait out its timeouts there. dispatch's queries go through the
    links and, unanswered, through another one after DNS_HEDGE."""
    dark = metrics_lab.uplink(1)
    proxy = lab_proxy(
        metrics_lab,
        "--balance",
        "round-robin",
        "--dns",
        lab_dns.address,
        *(link.client_addr for link in metrics_lab.uplinks),
    )
    metrics_lab.darken(1)
    try:
        durations, seen = [], []
        for _ in range(9):  # three rounds of the round robin: the dark link is chosen three times
            name = fresh_name(lab_dns, metrics_lab)
            started = time.monotonic()
            seen.append(proxy.peer(name))
            durations.append(time.monotonic() - started)
    finally:
        metrics_lab.restore(1)
    assert max(durations) < dispatch.DEFAULT_HEDGE + 0.5, durations
    assert dark.client_addr not in seen
    assert {source for _, _, _, source in lab_dns.queries} == set(seen)  # the dark link's never arrived
    rows = {row["ip"]: row for row in lab_status(proxy)["addresses"]}
    assert rows[dark.client_addr]["dns_queries"] >= 1 and rows[dark.client_addr]["state"] == "up"


@pytest.fixture
def lab_resolv_conf(metrics_lab: Any, lab_dns: DnsServer) -> Iterator[str]:
    """The lab's DNS server as the client's system name server: ``ip netns
    exec`` mounts /etc/netns/NAMESPACE/resolv.conf over /etc/resolv.conf."""
    directory = f"/etc/netns/{metrics_lab.client_ns}"
    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/resolv.conf", "w") as conf:
        conf.write(f"nameserver {metrics_lab.service_address}\noptions timeout:2 attempts:2\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_lab_names_asked_of_the_systems_name_server_survive_a_dark_default_link(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer, lab_resolv_conf: str
) -> None:
    """As a new user runs it: no --dns, the system's server reached by the
    default route, which is the first link, dark."""
    proxy = lab_proxy(metrics_lab, "--balance", "round-robin", *(link.client_addr for link in metrics_lab.uplinks))
    metrics_lab.darken(1)
    try:
        durations = []
        for _ in range(6):
            name = fresh_name(lab_dns, metrics_lab)
            started = time.monotonic()
            assert proxy.peer(name) != metrics_lab.uplink(1).client_addr
            durations.append(time.monotonic() - started)
    finally:
        metrics_lab.restore(1)
    assert max(durations) < dispatch.DEFAULT_HEDGE + 0.5, durations


def test_lab_queries_leave_by_the_link_chosen_for_the_connection(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer
) -> None:
    proxy = lab_proxy(
        metrics_lab,
        "--balance",
        "round-robin",
        "--dns",
        lab_dns.address,
        *(link.client_ifname for link in metrics_lab.uplinks),
    )
    pairs = []
    for _ in range(6):
        name = fresh_name(lab_dns, metrics_lab)
        peer = proxy.peer(name)
        pairs.append(({source for _, _, _, source in lab_dns.asked(name)}, peer))
    assert all(sources == {peer} for sources, peer in pairs), pairs
    assert {peer for _, peer in pairs} == {link.client_addr for link in metrics_lab.uplinks}


def test_lab_truncated_answer_is_asked_again_by_tcp_through_the_same_link(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer
) -> None:
    proxy = lab_proxy(metrics_lab, "--dns", lab_dns.address, *(link.client_ifname for link in metrics_lab.uplinks))
    name = fresh_name(lab_dns, metrics_lab)
    lab_dns.behaviour[name] = "truncated"
    peer = proxy.peer(name)
    assert [(transport, source) for _, _, transport, source in lab_dns.asked(name)] == [("udp", peer), ("tcp", peer)]


@pytest.mark.parametrize(
    ("how", "reply", "asked", "sends"),
    [
        ("nxdomain", Reply.HOST_UNREACHABLE, 1, 1),  # the name's servers have spoken: no other link asks
        ("servfail", Reply.HOST_UNREACHABLE, 3, 1),  # the server failed: asked through each link
        ("silent", Reply.TTL_EXPIRED, 3, 3),  # sent again after 1 s and 3 s of the connect timeout's 5
    ],
)
def test_lab_bad_answers_end_in_the_right_reply_each_link_asked_again_only_while_unanswered(
    metrics_lab: Any,
    lab_proxy: Callable[..., LabProxy],
    lab_dns: DnsServer,
    how: str,
    reply: Reply,
    asked: int,
    sends: int,
) -> None:
    proxy = lab_proxy(metrics_lab, "--dns", lab_dns.address, *(link.client_ifname for link in metrics_lab.uplinks))
    name = fresh_name(lab_dns, metrics_lab, how)
    lab_dns.behaviour[name] = how
    with pytest.raises(socks.GeneralProxyError) as failure:
        proxy.peer(name)
    assert f"0x{reply:02x}" in str(failure.value)
    sources = [source for _, _, _, source in lab_dns.asked(name)]
    assert len(set(sources)) == asked and max(map(sources.count, sources)) <= sends, sources
    assert "Traceback" not in proxy.log()


def test_lab_a_check_by_name_looks_it_up_through_each_link_and_finds_the_dark_one(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer
) -> None:
    dark = metrics_lab.uplink(1)
    name = fresh_name(lab_dns, metrics_lab, "check")
    check = f"{name}:{import_netlab().PEER_ECHO_PORT}"
    proxy = lab_proxy(
        metrics_lab,
        "--dns",
        lab_dns.address,
        "--check",
        check,
        "--check-interval",
        "1",
        *(link.client_addr for link in metrics_lab.uplinks),
    )
    assert wait_for(lambda: {q[3] for q in lab_dns.asked(name)} == {link.client_addr for link in metrics_lab.uplinks})
    metrics_lab.darken(1)
    try:
        assert wait_for(
            lambda: f"sitting out: {dark.client_addr} ({dark.client_ifname}): failed 3 checks of {check}" in proxy.log()
        )
    finally:
        metrics_lab.restore(1)
    assert wait_for(lambda: f"back in use: {dark.client_addr} ({dark.client_ifname}) (passed 2 checks" in proxy.log())


def test_lab_names_for_a_socks5_upstream_are_asked_by_its_link_or_by_the_default_route(
    metrics_lab: Any, lab_proxy: Callable[..., LabProxy], lab_dns: DnsServer
) -> None:
    """microsocks on the server takes addresses (socks5://): dispatch looks
    names up for it, each query leaving as the connection to the proxy
    does: by the uplink its +LINK names, by the default route (the first
    uplink) without one."""
    with microsocks_on_server(metrics_lab) as url:
        source = {f"{url}+{link.client_ifname}": link.client_addr for link in metrics_lab.uplinks[1:]}
        source[url] = metrics_lab.uplink(1).client_addr
        proxy = lab_proxy(metrics_lab, "--balance", "round-robin", "--dns", lab_dns.address, *source)
        names = [fresh_name(lab_dns, metrics_lab) for _ in range(6)]
        for name in names:
            assert proxy.peer(name) == metrics_lab.service_address  # microsocks's own connection
        assert wait_for(lambda: all(f" -> {name}:" in proxy.log() for name in names))  # logged as they end
        log = proxy.log()
        links = [re.findall(rf" -> {re.escape(name)}:\d+ via (\S+):", log) for name in names]
        assert sorted(link for (link,) in links) == sorted([*source] * 2)
        for name, (link,) in zip(names, links):
            assert {q[3] for q in lab_dns.asked(name)} == {source[link]}, (name, link)
        rows = {row["link"]: row["dns_queries"] for row in lab_status(proxy)["addresses"]}
        assert all(rows[link] >= 2 for link in source), rows


# Transparent mode: a phone on the LAN, this machine's own programs ---------

LAB_TRANSPARENT_PORT = 1082  # inside the client namespace, where nothing else listens
TRANSPARENT = ("--transparent", str(LAB_TRANSPARENT_PORT), "--apply-rules")


@pytest.fixture(scope="module")
def phone_lab() -> Iterator[Any]:
    """The rules lab with a phone on the client's LAN (dlab-lan), its
    default route through the client, which forwards."""
    netlab = netlab_or_skip()
    if shutil.which("nft") is None:
        pytest.skip("transparent mode needs nft (apt-get install nftables)")
    lab = netlab.Lab(name=f"dlab-t{os.getpid() % 100000}p", phone=True)
    with lab:
        lab.start_peer_echo()
        lab.start_http_server(size=LAB_DOWNLOAD_SIZE)
        yield lab


def phone_connection(lab: Any, port: int, ns: str | None = None) -> socket.socket:
    """A plain TCP connection (no proxy) from the phone (or namespace
    ``ns``) to the lab's server."""
    return import_netlab().open_connection(lab.service_address, port, ns=ns or lab.phone_ns, timeout=TIMEOUT)


def phone_peer(lab: Any, ns: str | None = None) -> str:
    """The source address the lab's peer-echo server sees for a plain
    connection from the phone (or from namespace ``ns``)."""
    with phone_connection(lab, import_netlab().PEER_ECHO_PORT, ns) as sock:
        return read_all(sock).decode().strip()


def phone_download(lab: Any, size: int) -> int:
    """A plain HTTP download of ``size`` bytes from the phone; the body's length."""
    with phone_connection(lab, import_netlab().HTTP_PORT) as sock:
        response = round_trip(sock, f"GET /file?size={size} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    return len(body) if head.split(b" ")[1:2] == [b"200"] else -1


def tables(lab: Any) -> list[str]:
    """The nftables tables of the lab's client, and its ip rules of a firewall mark (IPv4 and IPv6)."""
    listed = lab.run_in_client(["nft", "list", "tables"], check=True).stdout.splitlines()
    for version in ("-4", "-6"):
        listed += [rule for rule in lab.run_in_client(["ip", version, "rule"], check=True).stdout.splitlines()]
    return [line.split(":", 1)[-1].strip() for line in listed if line.startswith("table") or "fwmark" in line]


APPLIED = ["table inet dispatch", *["from all fwmark 0x64697371 lookup 25705"] * 2]  # the ip rule: IPv4, IPv6


def log_lines_of(proxy: LabProxy, count: int, text: str) -> list[str]:
    """The log's lines holding ``text``, once there are ``count`` (each is written as its connection ends)."""
    assert wait_for(lambda: proxy.log().count(text) >= count), proxy.log()
    return [line for line in proxy.log().splitlines() if text in line]


def test_lab_a_phone_without_a_proxy_is_spread_over_the_uplinks_and_each_connection_logged(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--balance", "round-robin", "--no-state")
    assert tables(phone_lab) == APPLIED
    seen = [phone_peer(phone_lab) for _ in range(6)]
    assert sorted(seen) == sorted(link.client_addr for link in phone_lab.uplinks for _ in range(2))
    netlab = import_netlab()
    lines = log_lines_of(proxy, 6, "(transparent): ok")
    for link in phone_lab.uplinks:
        where = f" -> {phone_lab.service_address}:{netlab.PEER_ECHO_PORT} via {link.client_addr} ({link.client_ifname})"
        assert len([line for line in lines if f"{netlab.PHONE_ADDRESS}:" in line and where in line]) == 2, lines
    rows = {row["interface"]: row["connections"] for row in lab_status(proxy)["addresses"]}
    assert rows == {link.client_ifname: 2 for link in phone_lab.uplinks}
    with netlab.netns(phone_lab.client_ns):
        sock = socket.create_connection(proxy.address, timeout=TIMEOUT)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        metrics = read_response(sock)[2].decode()
    for link in phone_lab.uplinks:
        opened = rf'^dispatch_connections_opened_total\{{[^}}]*address="{re.escape(link.client_addr)}"[^}}]*\}} 2$'
        assert re.search(opened, metrics, re.M), metrics


def phone_batch(proxy: LabProxy, count: int, size: int) -> tuple[list[int], float]:
    """``count`` plain downloads of ``size`` from the phone started together:
    how many each uplink got, and the bytes per second of the whole batch."""
    before = connections_per_link(proxy)
    sizes: list[int] = []
    threads = [threading.Thread(target=lambda: sizes.append(phone_download(proxy.lab, size))) for _ in range(count)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 6)
    seconds = time.monotonic() - started
    assert sizes == [size] * count
    after = connections_per_link(proxy)
    return [after[link.client_ifname] - before[link.client_ifname] for link in proxy.lab.uplinks], sum(sizes) / seconds


def test_lab_a_batch_of_phone_downloads_is_split_by_measured_capacity(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Links of 1,200, 1,200 and 400 kB/s: a batch of 24 plain downloads
    from the phone measures them, and the next are split near the soonest
    split, as a SOCKS client's batch is (see the short batch test), and
    take the links' sum as the SOCKS client's do: within 5 %, the medians
    of three rounds each, taken in turns."""
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--no-state")
    phone_batch(proxy, 24, 250_000)
    phone_rates, socks_rates = [], []
    for _ in range(3):
        split, rate = phone_batch(proxy, 24, 250_000)
        assert over_soonest(split, (1200, 1200, 400)) < 1.5, split
        phone_rates.append(rate)
        started = time.monotonic()
        assert lab_downloads(proxy, 24, 250_000) == [250_000] * 24
        socks_rates.append(24 * 250_000 / (time.monotonic() - started))
    phone, socks = statistics.median(phone_rates), statistics.median(socks_rates)
    print(f"batch of 24 x 250 kB, kB/s: phone {phone / 1000:.0f}, SOCKS client {socks / 1000:.0f}")
    assert phone >= 0.95 * socks, (phone_rates, socks_rates)


def test_lab_a_phones_udp_is_answered_from_the_address_it_sent_to_and_leaves_by_the_uplinks(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    netlab = import_netlab()
    with netlab.netns(phone_lab.server_ns):
        echo = UdpServer(lambda data, sender: data + b" from " + sender[0].encode(), phone_lab.service_address)
    arguments = ["--lan", "dlab-lan", "--local", "--balance", "round-robin", "--idle-timeout", "1", "--no-state"]
    proxy = lab_proxy(phone_lab, *TRANSPARENT, *arguments)
    try:
        answers = []
        for ns in [phone_lab.phone_ns] * 3 + [phone_lab.client_ns] * 3:
            with netlab.netns(ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.settimeout(TIMEOUT)
                sock.sendto(b"ping", (echo.host, echo.port))
                data, sender = sock.recvfrom(100)
                assert sender == (echo.host, echo.port)
                answers.append(data.decode())
    finally:
        echo.close()
    uplinks = [link.client_addr for link in phone_lab.uplinks]
    assert sorted(answers) == sorted(f"ping from {ip}" for ip in uplinks * 2)
    lines = log_lines_of(proxy, 6, "(transparent): ok, 1 datagrams up, 1 down")
    assert len([line for line in lines if line.split()[3].startswith(f"{netlab.PHONE_ADDRESS}:")]) == 3, lines


@pytest.fixture
def phone_dns(phone_lab: Any) -> Iterator[DnsServer]:
    """A DNS server for the lab's names on the server side (the lab's
    service address, port 53), as an ISP's would be."""
    with import_netlab().netns(phone_lab.server_ns):
        server = DnsServer(phone_lab.service_address, 53)
    yield server
    server.close()


def phone_dns_query(lab: Any, server: str, name: str, rdtype: str = "A") -> Any:
    """The answer to a DNS query for ``name`` the phone sends by UDP to ``server`` port 53."""
    import dns.message

    with import_netlab().netns(lab.phone_ns):
        sock = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(TIMEOUT)
        sock.sendto(dns.message.make_query(name, rdtype).to_wire(), (server, 53))
        data, sender = sock.recvfrom(65535)
    assert sender[:2] == (server, 53)  # from the server asked
    return dns.message.from_wire(data)


def test_lab_a_phones_dns_query_to_any_server_is_answered_through_the_links_and_names_its_connections(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy], phone_dns: DnsServer
) -> None:
    """The phone asks a server that is not there (192.0.2.53): dispatch
    answers, having asked its own --dns server through an uplink; the
    phone's next connection to the address is logged by the name."""
    name = fresh_name(phone_dns, phone_lab)
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--dns", phone_dns.address, "--no-state")
    answer = phone_dns_query(phone_lab, "192.0.2.53", name)
    assert [str(item) for rrset in answer.answer for item in rrset] == [phone_lab.service_address]
    assert {source for *_, source in phone_dns.asked(name)} <= {link.client_addr for link in phone_lab.uplinks}
    assert phone_dns_query(phone_lab, "192.0.2.53", f"nx{name}").rcode() == 3  # NXDOMAIN
    assert phone_peer(phone_lab) in {link.client_addr for link in phone_lab.uplinks}
    netlab = import_netlab()
    where = f"-> {name}:{netlab.PEER_ECHO_PORT} ({phone_lab.service_address}) via "
    assert log_lines_of(proxy, 1, where)
    assert log_lines_of(proxy, 1, f"-> {name} (A, asked of 192.0.2.53:53) via - (transparent): ok, 1 address")


def dns_over_tcp(sock: socket.socket, name: str, rdtype: str) -> Any:
    """The answer to a DNS query for ``name`` sent on the TCP connection ``sock`` (RFC 7766 framing)."""
    import dns.message

    wire = dns.message.make_query(name, rdtype).to_wire()
    sock.sendall(len(wire).to_bytes(2, "big") + wire)
    return dns.message.from_wire(recv_exactly(sock, int.from_bytes(recv_exactly(sock, 2), "big")))


def test_lab_a_phones_dns_queries_over_tcp_are_answered_through_the_links_and_others_go_on_to_the_server(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy], phone_dns: DnsServer
) -> None:
    """Over TCP as over UDP: address queries to a server that is not there
    (192.0.2.53) are answered, several on one connection; on a connection
    to the lab's server, an address query is answered here and a TXT query
    goes on to the server through an uplink, as does a connection whose
    first query is not for addresses."""
    netlab = import_netlab()
    name, other = fresh_name(phone_dns, phone_lab), fresh_name(phone_dns, phone_lab)
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--dns", phone_dns.address, "--no-state")
    uplinks = {link.client_addr for link in phone_lab.uplinks}
    with netlab.open_connection("192.0.2.53", 53, ns=phone_lab.phone_ns, timeout=TIMEOUT) as sock:
        answer = dns_over_tcp(sock, name, "A")
        assert [str(item) for rrset in answer.answer for item in rrset] == [phone_lab.service_address]
        answer = dns_over_tcp(sock, name, "AAAA")
        assert answer.rcode() == 0 and answer.answer == []
    with netlab.open_connection(phone_lab.service_address, 53, ns=phone_lab.phone_ns, timeout=TIMEOUT) as sock:
        answer = dns_over_tcp(sock, other, "A")
        assert [str(item) for rrset in answer.answer for item in rrset] == [phone_lab.service_address]
        assert dns_over_tcp(sock, other, "TXT").rcode() == 0
    with netlab.open_connection(phone_lab.service_address, 53, ns=phone_lab.phone_ns, timeout=TIMEOUT) as sock:
        assert dns_over_tcp(sock, name, "MX").rcode() == 0
    asked = phone_dns.asked(name, "tcp") + phone_dns.asked(other, "tcp")
    assert sorted(rdtype for _, rdtype, _, _ in asked) == ["MX", "TXT"], phone_dns.queries
    assert {source for *_, source in asked} <= uplinks
    assert {source for *_, source in phone_dns.asked(name, "udp")} <= uplinks  # the resolver's own queries
    assert log_lines_of(proxy, 1, f"-> {name} (A, asked of 192.0.2.53:53) via - (transparent): ok, 1 address")
    assert log_lines_of(proxy, 1, "-> 192.0.2.53:53 via - (transparent): ok, 2 answered here")


def client_hello(server_name: str) -> bytes:
    """The first bytes a TLS client sends to ``server_name``: its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with contextlib.suppress(ssl.SSLWantReadError):
        ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name).do_handshake()
    return bytes(outgoing.read())


def test_lab_a_phones_https_connection_to_an_address_is_named_by_its_tls_server_name(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """No DNS answer named the address: the ClientHello's SNI names it,
    and what the phone sent reaches the server as it was."""
    netlab = import_netlab()
    with netlab.netns(phone_lab.server_ns):
        server = Server(echo, phone_lab.service_address, 443)
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--no-state")
    hello = client_hello("www.site.test")
    try:
        with phone_connection(phone_lab, 443) as sock:
            assert round_trip(sock, hello) == hello
    finally:
        server.close()
    assert log_lines_of(proxy, 1, f"-> www.site.test:443 ({phone_lab.service_address}) via ")


def test_lab_a_phones_connections_stick_to_a_link_by_site_name_not_by_address(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Six sites behind one address (as a CDN's), named by their TLS
    server names (on port 8443, where clients speak first too), each asked
    twice in turns: each site keeps one link (--sticky), and the sites are
    spread over the links as sites, not kept on one link as one address
    would be."""
    netlab = import_netlab()
    with netlab.netns(phone_lab.server_ns):
        server = Server(tell_peer, phone_lab.service_address, 8443)
    lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--balance", "round-robin", "--sticky", "600", "--no-state")
    sites = [f"www.site{n}.test" for n in range(6)]
    seen: dict[str, list[str]] = {site: [] for site in sites}
    try:
        for site in sites * 2:
            with phone_connection(phone_lab, 8443) as sock:
                sock.sendall(client_hello(site))
                seen[site].append(read_all(sock).decode())
    finally:
        server.close()
    assert all(len(set(links)) == 1 for links in seen.values()), seen
    assert len({links[0] for links in seen.values()}) == len(phone_lab.uplinks), seen


def test_lab_this_machines_own_programs_are_balanced_and_dispatchs_connections_are_not_sent_back_to_it(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """--local redirects every TCP connection the client's programs open,
    dispatch's own too but for their firewall mark: without it each
    connection out would come back to dispatch, without end."""
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--local", "--balance", "round-robin", "--no-state")
    seen = [phone_peer(phone_lab, phone_lab.client_ns) for _ in range(6)]
    assert sorted(seen) == sorted(link.client_addr for link in phone_lab.uplinks for _ in range(2))
    lines = log_lines_of(proxy, 6, "(transparent): ok")
    assert len(lines) == 6, lines  # one line for each, none for a connection of dispatch's own
    assert proxy.peer() in seen  # a SOCKS client of the same dispatch, as ever


def test_lab_a_dark_uplink_costs_a_phone_connection_no_more_than_the_hedge(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    hedge = 2.0  # far above a connection's own time on a busy machine, and below the connect timeout
    arguments = ["--lan", "dlab-lan", "--balance", "round-robin", "--hedge", f"{hedge:g}", "--no-state"]
    lab_proxy(phone_lab, *TRANSPARENT, *arguments)
    phone_lab.darken(1)
    try:
        durations, seen = [], []
        for _ in range(6):
            started = time.monotonic()
            seen.append(phone_peer(phone_lab))
            durations.append(time.monotonic() - started)
    finally:
        phone_lab.restore(1)
    assert max(durations) < hedge + 1.0 < dispatch.DEFAULT_CONNECT_TIMEOUT, durations
    assert phone_lab.uplink(1).client_addr not in seen


@pytest.fixture(scope="module")
def phone6_lab() -> Iterator[Any]:
    """The phone lab with IPv6 beside IPv4 on every link, and a TCP server
    telling each client its address (``peer``) and a UDP echo server on the
    IPv6 service address."""
    netlab = netlab_or_skip()
    if shutil.which("nft") is None:
        pytest.skip("transparent mode needs nft (apt-get install nftables)")
    with netlab.Lab(name=f"dlab-t{os.getpid() % 100000}6", phone=True, ipv6=True) as lab:
        with netlab.netns(lab.server_ns):
            lab.peer = Server(tell_peer, lab.service_address6)
            lab.udp = UdpServer(lambda data, sender: data + b" from " + sender[0].encode(), lab.service_address6)
        try:
            yield lab
        finally:
            lab.peer.close()
            lab.udp.close()


def test_lab_a_phones_and_this_machines_ipv6_tcp_and_udp_are_spread_over_the_uplinks(
    phone6_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    lab = phone6_lab
    arguments = ["--lan", "dlab-lan", "--local", "--balance", "round-robin", "--idle-timeout", "1", "--no-state"]
    proxy = lab_proxy(lab, *TRANSPARENT, *arguments)
    netlab = import_netlab()
    uplinks = [lab.client_addr6(link.index) for link in lab.uplinks]
    seen, answers = [], []
    for ns in [lab.phone_ns] * 3 + [lab.client_ns] * 3:
        with netlab.open_connection(lab.peer.host, lab.peer.port, ns=ns, timeout=TIMEOUT) as sock:
            seen.append(read_all(sock).decode().strip())
        with netlab.netns(ns):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(TIMEOUT)
            sock.sendto(b"ping", (lab.udp.host, lab.udp.port))
            data, sender = sock.recvfrom(100)
            assert sender[:2] == (lab.udp.host, lab.udp.port)
            answers.append(data.decode().removeprefix("ping from "))
    assert sorted(seen) == sorted(uplinks * 2)
    assert sorted(answers) == sorted(uplinks * 2)
    lines = log_lines_of(proxy, 12, "(transparent): ok")
    assert len([line for line in lines if line.split()[3].startswith(f"[{netlab.PHONE_ADDRESS6}]:")]) == 6, lines


def test_lab_a_phones_dns_query_over_ipv6_is_answered_through_the_links_and_names_its_connections(
    phone6_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """An AAAA query to an IPv6 server that is not there (2001:db8:53::53)
    is answered from that address; the phone's next IPv6 connection to the
    address given is logged by the name."""
    lab, netlab = phone6_lab, import_netlab()
    with netlab.netns(lab.server_ns):
        server = DnsServer(lab.service_address6, 53)
    try:
        name = f"v6{random.randrange(10**9)}.lab.test"
        server.names[name] = [lab.service_address6]
        proxy = lab_proxy(lab, *TRANSPARENT, "--lan", "dlab-lan", "--dns", server.address, "--no-state")
        answer = phone_dns_query(lab, "2001:db8:53::53", name, "AAAA")
        assert [str(item) for rrset in answer.answer for item in rrset] == [lab.service_address6]
        assert {source for *_, source in server.asked(name)} <= {lab.client_addr6(link.index) for link in lab.uplinks}
        with netlab.open_connection(lab.peer.host, lab.peer.port, ns=lab.phone_ns, timeout=TIMEOUT) as sock:
            assert read_all(sock).decode().strip() in {lab.client_addr6(link.index) for link in lab.uplinks}
    finally:
        server.close()
    assert log_lines_of(proxy, 1, f"-> {name}:{lab.peer.port} ({lab.service_address6}) via ")
    assert log_lines_of(proxy, 1, f"-> {name} (AAAA, asked of [2001:db8:53::53]:53) via - (transparent): ok, 1 address")


def test_lab_a_connection_to_the_transparent_port_itself_is_refused_with_a_log_line(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    netlab = import_netlab()
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--no-state")
    sock = netlab.open_connection(netlab.LAN_ADDRESS, LAB_TRANSPARENT_PORT, ns=phone_lab.phone_ns, timeout=TIMEOUT)
    with sock:
        assert read_all(sock) == b""
    itself = f"{netlab.LAN_ADDRESS}:{LAB_TRANSPARENT_PORT}"
    assert wait_for(lambda: f"-> {itself} via - (transparent): the target is the transparent listener" in proxy.log())
    assert f"WARNING refused {netlab.PHONE_ADDRESS}:" in proxy.log()


def test_lab_sigterm_leaves_no_table_and_after_sigkill_the_next_start_leaves_one_and_its_stop_none(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--local", "--no-state")
    assert tables(phone_lab) == APPLIED
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(TIMEOUT) == 0
    assert tables(phone_lab) == []
    killed = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--no-state")
    killed.process.kill()
    killed.process.wait(TIMEOUT)
    assert tables(phone_lab) == APPLIED  # left behind
    again = lab_proxy(phone_lab, *TRANSPARENT, "--local", "--no-state")
    assert tables(phone_lab) == APPLIED
    ruleset = phone_lab.run_in_client(["nft", "list", "ruleset"], check=True).stdout
    assert "chain output" in ruleset and "chain prerouting" not in ruleset  # this start's rules alone
    assert phone_peer(phone_lab, phone_lab.client_ns) in {link.client_addr for link in phone_lab.uplinks}
    again.stop()
    assert tables(phone_lab) == []


def test_lab_a_phones_download_under_way_at_sigterm_ends_within_the_grace_period(
    phone_lab: Any, lab_proxy: Callable[..., LabProxy]
) -> None:
    """Stopping redirects nothing more at once, and a phone's download
    already flowing goes on to its end within --grace, logged as any ended
    connection; then the table goes."""
    netlab = import_netlab()
    size = 1_000_000  # 2.5 s on the slowest link
    proxy = lab_proxy(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", "--grace", "60", "--no-state")
    with phone_connection(phone_lab, netlab.HTTP_PORT) as sock:
        sock.sendall(f"GET /file?size={size} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
        first = sock.recv(65536)
        assert first.split(b" ")[1] == b"200"
        proxy.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "redirect" not in phone_lab.run_in_client(["nft", "list", "ruleset"]).stdout)
        body = (first + read_all(sock)).partition(b"\r\n\r\n")[2]
    assert len(body) == size
    assert proxy.process.wait(TIMEOUT) == 0
    assert tables(phone_lab) == []
    line = log_lines_of(proxy, 1, f" -> lab:{netlab.HTTP_PORT} ({phone_lab.service_address}) via ")[0]  # its Host
    assert "(transparent): ok," in line and "cut by shutdown" not in line, line


def refusal(lab: Any, *arguments: str, wrapper: Sequence[str] = ()) -> tuple[int, str]:
    """``dispatch start ARGUMENTS`` in the lab's client, run under
    ``wrapper``: its exit status and its stderr, which it must end at once."""
    command = [*wrapper, sys.executable, os.path.join(os.path.dirname(__file__), "dispatch.py")]
    done = lab.run_in_client([*command, "start", "--no-state", *arguments], timeout=TIMEOUT * 3)
    assert done.stdout == ""
    return done.returncode, done.stderr


def test_lab_transparent_mode_without_cap_net_admin_says_so_in_one_line(phone_lab: Any) -> None:
    wrapper = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    status, said = refusal(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", wrapper=wrapper)
    assert status == 2
    assert said.count("\n") == 1 and said.startswith(
        "dispatch: error: --transparent needs the capability CAP_NET_ADMIN"
    )
    assert "'dispatch rules' prints the firewall script" in said
    assert tables(phone_lab) == []


def test_lab_apply_rules_without_nft_names_the_package_in_one_line(phone_lab: Any, tmp_path: Any) -> None:
    wrapper = ["env", f"PATH={tmp_path}"]  # a PATH with no nft on it
    status, said = refusal(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", wrapper=wrapper)
    assert status == 2
    assert said.count("\n") == 1 and "nft, which is not installed: install the package nftables" in said
    assert tables(phone_lab) == []


def test_lab_rules_nft_refuses_leave_nothing_applied_and_say_nfts_words_in_one_line(
    phone_lab: Any, tmp_path: Any
) -> None:
    """nft (the real one) is handed the script with one more rule, for a
    chain that is not there: it refuses the whole transaction, so neither
    the table nor the ip rule of UDP is left."""
    nft = tmp_path / "nft"
    nft.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -f ]; then\n'
        f"  {{ cat; echo 'add rule inet dispatch no_such_chain accept'; }} | {shutil.which('nft')} -f -\n"
        "  exit $?\n"
        "fi\n"
        f'exec {shutil.which("nft")} "$@"\n'
    )
    nft.chmod(0o755)
    wrapper = ["env", f"PATH={tmp_path}:{os.environ['PATH']}"]
    status, said = refusal(phone_lab, *TRANSPARENT, "--lan", "dlab-lan", wrapper=wrapper)
    assert status == 2
    assert said.count("\n") == 1 and said.startswith("dispatch: error: nft refused the rules: /dev/stdin:"), said
    assert said.endswith(
        "Error: Could not process rule: No such file or directory; add rule inet dispatch no_such_chain accept\n"
    )
    assert tables(phone_lab) == []


def test_lab_a_lan_that_is_no_interface_is_refused_in_one_line(phone_lab: Any) -> None:
    status, said = refusal(phone_lab, *TRANSPARENT, "--lan", "dlab-nope")
    assert status == 2
    assert said.count("\n") == 1 and said.startswith("dispatch: error: --lan dlab-nope: no such interface here")
    assert tables(phone_lab) == []


def test_lab_a_lan_without_forwarding_is_refused_in_one_line(phone_lab: Any) -> None:
    phone_lab.set_forwarding(False)
    try:
        status, said = refusal(phone_lab, *TRANSPARENT, "--lan", "dlab-lan")
    finally:
        phone_lab.set_forwarding(True)
    assert status == 2
    assert said.count("\n") == 1 and "net.ipv4.ip_forward is off" in said
    assert tables(phone_lab) == []


# Bonds: one connection over every link, MPTCP to a dispatch on the server ----


def mptcp_or_skip(lab: Any) -> None:
    """Skip where this kernel cannot bond, saying what is missing."""
    why = dispatch.mptcp_unavailable()
    if why is not None:
        pytest.skip(why)
    if shutil.which("ip") is None or lab.run_in_client(["ip", "mptcp", "limits"]).returncode != 0:
        pytest.skip("iproute2's 'ip mptcp' is missing or the kernel has no MPTCP path manager")


BOND_SERVER_PORT = 1090  # inside the server namespace, where nothing else listens
BOND_LOGIN = ("bond", "s3cret")


@pytest.fixture
def bond_server(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Callable[..., str]]:
    """dispatch on the lab's server (a VPS), with a login, reached by the
    client's uplinks; ``--mptcp`` unless told otherwise. Gives its URL with
    the password, as the client names it (scheme ``mptcp+socks5h``)."""
    started: list[LabProxy] = []

    def start(lab: Any, *, mptcp: bool = True) -> str:
        mptcp_or_skip(lab)
        # The kernel's default on a server: 2 more subflows per connection; a recipe raises it.
        lab.run_in_server(["ip", "mptcp", "limits", "set", "subflows", "8"], check=True)
        arguments = [
            "--ip",
            lab.service_address,
            "--allow",
            "198.51.100.0/24",
            "--allow-target",
            f"{lab.service_address}/32",
            "--auth",
            ":".join(BOND_LOGIN),
            "--no-state",
        ]
        log_file = os.path.join(str(tmp_path), f"server{len(started)}.log")
        server = LabProxy(lab, [*arguments, *(["--mptcp"] if mptcp else [])], log_file, BOND_SERVER_PORT, "server")
        started.append(server)
        user, password = BOND_LOGIN
        return f"mptcp+socks5h://{user}:{password}@{lab.service_address}:{BOND_SERVER_PORT}"

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop()


def mptcp_endpoints(lab: Any) -> dict[str, dict[str, Any]]:
    """The kernel's MPTCP endpoints in the lab's client namespace, by address."""
    listed = json.loads(lab.run_in_client(["ip", "-j", "mptcp", "endpoint", "show"], check=True).stdout or "[]")
    return {entry["address"]: entry for entry in listed}


def timed_download(proxy: LabProxy, size: int) -> float:
    """One download of ``size`` bytes through ``proxy``; its rate in bytes per second."""
    started = time.monotonic()
    assert proxy.download(size) == size
    return size / (time.monotonic() - started)


LAB_BOND_SIZE = 24_000_000
# What TCP carries of a link's wire rate (tbf counts Ethernet headers; see netlab).
LAB_PAYLOAD_SHARE = 0.956


@pytest.mark.parametrize("lab_name", ["rules_lab", "metrics_lab"])
def test_lab_one_download_through_a_bond_gets_three_quarters_of_the_links_sum(
    request: pytest.FixtureRequest,
    lab_name: str,
    lab_proxy: Callable[..., LabProxy],
    bond_server: Callable[..., str],
    tmp_path: Any,
) -> None:
    """A batch of downloads through the three uplinks measures them (the
    state file keeps it); then one connection through the bond to the
    server's dispatch gets three quarters of the three links' sum, where
    one TCP connection gets one link: the slow link is a backup subflow,
    the two fast ones carry it. The endpoints go at the stop."""
    lab = request.getfixturevalue(lab_name)
    url = bond_server(lab)
    state = str(tmp_path / "state.json")
    uplinks = [link.client_ifname for link in lab.uplinks]
    direct = lab_proxy(lab, "--state-file", state, *uplinks)
    assert lab_downloads(direct, 6, 2_000_000) == [2_000_000] * 6  # measures the links
    started = time.monotonic()
    assert lab_downloads(direct, 24, LAB_BOND_SIZE // 24) == [LAB_BOND_SIZE // 24] * 24
    batch = LAB_BOND_SIZE / (time.monotonic() - started)
    single = timed_download(direct, LAB_BOND_SIZE // 4)
    direct.stop()
    bonded = lab_proxy(lab, "--state-file", state, url)
    roles = {link.client_addr: (link.client_ifname, link.index == 3) for link in lab.uplinks}
    assert wait_for(lambda: len(mptcp_endpoints(lab)) == 3), bonded.log()
    endpoints = mptcp_endpoints(lab)
    assert {address: (entry["dev"], entry.get("backup", False)) for address, entry in endpoints.items()} == roles
    rate = timed_download(bonded, LAB_BOND_SIZE)
    links_sum = sum(link.rate for link in lab.uplinks) * LAB_PAYLOAD_SHARE
    print(
        f"{lab_name}: one download through the bond {rate / 1000:,.0f} kB/s, one TCP download "
        f"{single / 1000:,.0f} kB/s, a batch of 24 by measured balancing {batch / 1000:,.0f} kB/s; "
        f"the links' sum {links_sum / 1000:,.0f} kB/s"
    )
    (bond,) = lab_status(bonded)["bonds"]
    carried = {c["interface"]: c["bytes_down"] for c in bond["carried"]}
    (line,) = [
        line
        for line in bonded.log().splitlines()
        if f"{lab.service_address}:{import_netlab().HTTP_PORT} via mptcp+" in line
    ]
    print(f"{lab_name}: carried by interface {carried}; {line.partition(' via ')[2]}")
    assert rate >= 0.75 * links_sum
    assert "fallback" not in bonded.log()
    assert LAB_BOND_SIZE < sum(carried.values()) < LAB_BOND_SIZE + 1000  # and the response's head
    assert min(carried[uplinks[0]], carried[uplinks[1]]) > 0.3 * LAB_BOND_SIZE
    assert re.search(r"\(dlab-up[12] \d+%, dlab-up[12] \d+%(, dlab-up3 \d+%)?\): ok", line), line
    bonded.stop()
    assert mptcp_endpoints(lab) == {}


def test_lab_a_bonds_endpoints_follow_its_links_leave_others_alone_and_go_after_a_kill(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], bond_server: Callable[..., str]
) -> None:
    """The bond's endpoints: one per address of the interfaces it names,
    added at the start; an interface that gets its address later gets one
    then; the system's own endpoint (for uplink 3) is left as it is. A
    dispatch killed with SIGKILL leaves its endpoints, and the next start
    (on any port) removes them, and only them."""
    lab = rules_lab
    url = bond_server(lab)
    late = "dlab-late"  # an interface with no address yet
    lab.run_in_client(["ip", "link", "add", late, "type", "veth", "peer", "name", f"{late}-p"], check=True)
    own = lab.uplink(3).client_addr
    lab.run_in_client(["ip", "mptcp", "endpoint", "add", own, "id", "200", "signal"], check=True)
    try:
        names = "+".join(link.client_ifname for link in lab.uplinks)
        killed = lab_proxy(lab, "--no-state", f"{url}+{names}+{late}")
        first, second = lab.uplink(1).client_addr, lab.uplink(2).client_addr
        assert wait_for(lambda: set(mptcp_endpoints(lab)) == {first, second, own}), killed.log()
        for end in (late, f"{late}-p"):
            lab.run_in_client(["ip", "link", "set", end, "up"], check=True)
        lab.run_in_client(["ip", "addr", "add", "10.77.0.2/24", "dev", late], check=True)
        assert wait_for(lambda: "10.77.0.2" in mptcp_endpoints(lab)), killed.log()
        assert mptcp_endpoints(lab)["10.77.0.2"]["dev"] == late
        assert mptcp_endpoints(lab)[own] == {"address": own, "id": 200, "signal": True}
        killed.process.kill()
        killed.process.wait(TIMEOUT)
        assert set(mptcp_endpoints(lab)) == {first, second, own, "10.77.0.2"}
        # The next start, on another port: it removes them all the same.
        after = lab_proxy(lab, "--no-state", lab.uplink(1).client_ifname, port=LAB_PROXY_PORT + 1)
        assert wait_for(lambda: set(mptcp_endpoints(lab)) == {own}), after.log()
        assert "a run before left" in after.log()
        after.stop()
        assert set(mptcp_endpoints(lab)) == {own}
    finally:
        lab.run_in_client(["ip", "link", "del", late])
        lab.run_in_client(["ip", "mptcp", "endpoint", "flush"])


def test_lab_a_bond_without_cap_net_admin_says_once_what_to_run_and_uses_the_endpoints_there_are(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], bond_server: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """dispatch run without CAP_NET_ADMIN (setpriv takes it away): it cannot
    add the bond's endpoints, says so once with the commands to run, and the
    bond uses the endpoint an administrator configured (uplink 2's)."""
    lab = rules_lab
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed here")
    url = bond_server(lab)
    configured = lab.uplink(2)
    lab.run_in_client(
        ["ip", "mptcp", "endpoint", "add", configured.client_addr, "dev", configured.client_ifname, "subflow"],
        check=True,
    )
    bare = lab.client_popen
    without = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    monkeypatch.setattr(lab, "client_popen", lambda argv, **kwargs: bare([*without, *argv], **kwargs))
    try:
        names = "+".join(link.client_ifname for link in lab.uplinks)
        proxy = lab_proxy(lab, "--no-state", f"{url}+{names}")
        for _ in range(2):
            assert proxy.download(3_000_000) == 3_000_000
        (warning,) = [line for line in proxy.log().splitlines() if "cannot set the MPTCP endpoints" in line]
        assert "Operation not permitted; it needs CAP_NET_ADMIN" in warning
        for link in (lab.uplink(1), lab.uplink(3)):
            assert f"ip mptcp endpoint add {link.client_addr} dev {link.client_ifname} subflow" in warning
        (bond,) = lab_status(proxy)["bonds"]
        assert {c["interface"]: c["bytes_down"] > 1_000_000 for c in bond["carried"]}.get(configured.client_ifname)
        proxy.stop()
        assert set(mptcp_endpoints(lab)) == {configured.client_addr}  # the administrator's, left alone
    finally:
        lab.run_in_client(["ip", "mptcp", "endpoint", "flush"])


@contextlib.contextmanager
def mptcp_stripped(lab: Any) -> Iterator[None]:
    """A middlebox on the way to the lab's server: the MPTCP option is taken
    out of the SYNs that reach it (nftables writes NOPs over it)."""
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed here: no middlebox to strip MPTCP")
    lab.run_in_server(["nft", "add", "table", "inet", "dlab_strip"], check=True)
    try:
        chain = "{ type filter hook input priority -300 ; }"
        lab.run_in_server(["nft", "add", "chain", "inet", "dlab_strip", "input", chain], check=True)
        rule = ["tcp", "dport", str(BOND_SERVER_PORT), "tcp", "flags", "syn", "reset", "tcp", "option", "mptcp"]
        lab.run_in_server(["nft", "add", "rule", "inet", "dlab_strip", "input", *rule], check=True)
        yield
    finally:
        lab.run_in_server(["nft", "delete", "table", "inet", "dlab_strip"])


@pytest.mark.parametrize("stripped_by", ["a server without --mptcp", "a middlebox"])
def test_lab_a_bond_where_the_server_or_the_path_has_no_mptcp_falls_back_to_one_tcp_subflow_said_once(
    stripped_by: str, rules_lab: Any, lab_proxy: Callable[..., LabProxy], bond_server: Callable[..., str]
) -> None:
    url = bond_server(rules_lab, mptcp=stripped_by == "a middlebox")
    with mptcp_stripped(rules_lab) if stripped_by == "a middlebox" else contextlib.nullcontext():
        proxy = lab_proxy(rules_lab, "--no-state", url)
        assert [proxy.download(LAB_DOWNLOAD_SIZE) for _ in range(2)] == [LAB_DOWNLOAD_SIZE] * 2
    (bond,) = lab_status(proxy)["bonds"]
    assert bond["mptcp"] == "fallback"
    assert proxy.log().count("fallback to one TCP subflow") == 1
    assert "s3cret" not in proxy.log() + json.dumps(lab_status(proxy))


def test_lab_a_link_going_dark_mid_download_costs_the_bond_a_stall_and_is_used_again(
    rules_lab: Any, lab_proxy: Callable[..., LabProxy], bond_server: Callable[..., str]
) -> None:
    """One 24 MB download through a bond of uplinks 1 and 2: uplink 2 goes
    dark a quarter of the way, and comes back at half way. The download goes
    on over uplink 1 while uplink 2 is dark, to its last byte, and the bond's
    next download goes over uplink 2 again.

    How long the stall lasts and whether the dark subflow of the same
    connection carries again are the kernel's: its MPTCP retransmission
    timer backs off with the dark subflow's, one stall in twenty-odd runs
    is over ten seconds, and a subflow marked stale is not always tried again
    (mptcp_net-next issue 348). Both are printed; what dispatch keeps is that
    the download lives through it and the bond keeps the link."""
    lab = rules_lab
    url = bond_server(lab)
    proxy = lab_proxy(lab, "--no-state", f"{url}+{lab.uplink(1).client_ifname}+{lab.uplink(2).client_ifname}")
    assert wait_for(lambda: len(mptcp_endpoints(lab)) == 2), proxy.log()
    received, longest_gap, received_while_dark, dark = 0, 0.0, 0, False
    try:
        with proxy.client(import_netlab().HTTP_PORT, timeout=60) as client:
            client.sendall(f"GET /file?size={LAB_BOND_SIZE} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
            last = time.monotonic()
            response = bytearray()
            while chunk := client.recv(1 << 16):
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now
                response += chunk
                received += len(chunk)
                if dark:
                    received_while_dark += len(chunk)
                if LAB_BOND_SIZE // 4 < received < LAB_BOND_SIZE // 2 and not dark and not received_while_dark:
                    lab.darken(2)
                    dark = True
                elif received > LAB_BOND_SIZE // 2 and dark:
                    lab.restore(2)
                    dark = False
    finally:
        lab.restore(2)
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    assert (head.split(b" ")[1:2], len(body)) == ([b"200"], LAB_BOND_SIZE)
    assert received_while_dark > LAB_BOND_SIZE // 8  # the quarter to the half went by uplink 1 alone
    assert mptcp_endpoints(lab).keys() == {lab.uplink(1).client_addr, lab.uplink(2).client_addr}
    before = lab.counters()[2].rx_bytes
    assert proxy.download(LAB_BOND_SIZE // 4) == LAB_BOND_SIZE // 4
    carried_after = lab.counters()[2].rx_bytes - before
    print(f"dark link: longest stall {longest_gap:.2f} s; the next download's {carried_after:,} B by uplink 2")
    assert carried_after > LAB_BOND_SIZE // 16
