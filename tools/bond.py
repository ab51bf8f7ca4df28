#!/usr/bin/env python3
"""Bond benchmark: one download through an MPTCP bond, against one TCP download and a batch.

    python tools/bond.py --rounds 3 --setup rules

The network lab (netlab.py: three uplinks shaped to 1,200, 1,200 and 400 kB/s)
with a dispatch started with ``--mptcp`` on its server, as a VPS would run it.
Each round, in the client namespace:

* a batch of 24 downloads of 1 MB, each its own connection, all started
  together, through ``dispatch start`` over the three uplinks (measured
  balancing), after one warm-up batch; the state file keeps what it measured;
* one download of 24 MB through the server's dispatch as a plain upstream
  link (``socks5h://...+dlab-up1``): one TCP connection over one link;
* one download of 24 MB through the bond (``mptcp+socks5h://...``), which takes
  its choice of links from that state file (the slow link a backup);
* the same with ``--no-state``: no figures, every link carries subflows.

It prints kB/s of payload for each (the median over rounds, and every round)
and the client dispatch's CPU time per MB for the plain link and the bond.
Needs Linux, root, iproute2 and MPTCP in the kernel.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netlab  # noqa: E402

DISPATCH = os.path.join(os.path.dirname(HERE), "dispatch.py")
CLIENT_PORT = 1080
SERVER_PORT = 1090
LOGIN = ("bond", "bench")
SIZE = 24_000_000
BATCH = 24


def start(lab: netlab.Lab, where: str, arguments: Sequence[str], port: int, log: str) -> subprocess.Popen[str]:
    """``dispatch start`` in a namespace; returns once it serves."""
    argv = [sys.executable, DISPATCH, "start", "--port", str(port), "--log-file", log, *arguments]
    process = lab.popen(where, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in iter(process.stdout.readline, ""):
        if line.startswith("log:"):
            break
    host = lab.service_address if where == "server" else "127.0.0.1"
    if not lab.wait_for_port(port, host=host, which=where):
        raise RuntimeError(f"dispatch did not start: {process.communicate(timeout=10)}")
    return process


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)


def endpoints(lab: netlab.Lab) -> list[str]:
    """The MPTCP endpoints of the client namespace, one line each."""
    return lab.run_in_client(["ip", "mptcp", "endpoint", "show"]).stdout.splitlines()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def download(lab: netlab.Lab, size: int) -> float:
    """Fetch ``size`` bytes from the lab's web server through the client's
    dispatch (SOCKS5); return the seconds it took."""
    with netlab.netns(lab.client_ns):
        sock = socket.create_connection(("127.0.0.1", CLIENT_PORT), timeout=60)
    started = time.monotonic()
    with sock:
        target = socket.inet_aton(lab.service_address) + netlab.HTTP_PORT.to_bytes(2, "big")
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + target)
        answer = b""
        while len(answer) < 12:
            answer += sock.recv(12 - len(answer))
        if answer[3] != 0:
            raise RuntimeError(f"refused: {answer!r}")
        sock.sendall(f"GET /file?size={size} HTTP/1.0\r\nHost: lab\r\n\r\n".encode())
        received = 0
        while chunk := sock.recv(1 << 16):
            received += len(chunk)
        if received < size:
            raise RuntimeError(f"only {received} of {size} bytes")
    return time.monotonic() - started


def batch(lab: netlab.Lab, count: int, size: int) -> float:
    """``count`` downloads of ``size`` bytes started together; seconds until the last ends."""
    started = time.monotonic()
    threads = [threading.Thread(target=download, args=(lab, size)) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def one_round(lab: netlab.Lab, scratch: str, number: int) -> dict[str, float]:
    state = os.path.join(scratch, f"state{number}.json")
    log = os.path.join(scratch, f"client{number}.log")
    uplinks = [link.client_ifname for link in lab.uplinks]
    direct = start(lab, "client", ["--state-file", state, *uplinks], CLIENT_PORT, log)
    batch(lab, BATCH, SIZE // BATCH)  # warm-up: measures the links
    figures = {"batch": SIZE / batch(lab, BATCH, SIZE // BATCH)}
    stop(direct)
    server = f"{':'.join(LOGIN)}@{lab.service_address}:{SERVER_PORT}"
    for name, address, state_option in (
        ("tcp", f"socks5h://{server}+{uplinks[0]}", ["--no-state"]),
        ("bond", f"mptcp+socks5h://{server}", ["--state-file", state]),
        ("every", f"mptcp+socks5h://{server}", ["--no-state"]),
    ):
        client = start(lab, "client", [*state_option, address], CLIENT_PORT, log)
        deadline = time.monotonic() + 10
        while name != "tcp" and time.monotonic() < deadline and len(endpoints(lab)) < len(uplinks):
            time.sleep(0.1)  # the endpoints are added as the bond starts
        before = cpu_seconds(client.pid)
        seconds = download(lab, SIZE)
        figures[name] = SIZE / seconds
        figures[f"{name} cpu"] = (cpu_seconds(client.pid) - before) / (SIZE / 1e6)
        stop(client)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--setup", choices=netlab.SETUPS, default="rules")
    args = parser.parse_args(argv)
    with netlab.Lab(name="dlab-bond", setup=args.setup) as lab, tempfile.TemporaryDirectory() as scratch:
        lab.start_http_server(size=SIZE)
        lab.run_in_server(["ip", "mptcp", "limits", "set", "subflows", "8"], check=True)
        arguments = ["--mptcp", "--ip", lab.service_address, "--allow", "198.51.100.0/24"]
        arguments += ["--allow-target", f"{lab.service_address}/32", "--auth", ":".join(LOGIN), "--no-state"]
        server = start(lab, "server", arguments, SERVER_PORT, os.path.join(scratch, "server.log"))
        rounds = [one_round(lab, scratch, number) for number in range(args.rounds)]
        stop(server)
    links = sum(link.rate for link in lab.uplinks) * 0.956
    print(f"setup {args.setup}, {args.rounds} rounds; the links' sum of payload {links / 1000:,.0f} kB/s")
    for key, label in (
        ("bond", "one download through the bond"),
        ("every", "one download through the bond, every link a subflow"),
        ("tcp", "one TCP download (a plain upstream link)"),
        ("batch", f"a batch of {BATCH} downloads, measured balancing"),
    ):
        values = [figures[key] for figures in rounds]
        every = ", ".join(f"{value / 1000:,.0f}" for value in values)
        median = statistics.median(values)
        print(f"{label}: {median / 1000:,.0f} kB/s ({median / links:.0%} of the sum; rounds {every})")
    for key in ("tcp cpu", "bond cpu"):
        values = [figures[key] * 1000 for figures in rounds]
        print(f"client dispatch CPU, {key.split()[0]}: {statistics.median(values):.1f} ms per MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
