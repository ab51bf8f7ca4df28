"""The status page and the PAC file in a real browser: headless Chromium.

Skipped where Chromium is not installed (apt-get install chromium).
"""

from __future__ import annotations

import contextlib
import html.parser
import http.server
import itertools
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dispatch
from conftest import (
    CHROMIUM,
    Server,
    client_through,
    exchanges,
    needs_chromium,
    round_trip,
    sample_status,
    wait_for,
)
from dispatch import Dispatcher

pytestmark = needs_chromium

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-default-browser-check",
    "--hide-scrollbars",
    # Scripts run 5 s of virtual time: the page's first update (at 2 s) is in the dump.
    "--virtual-time-budget=5000",
    # Chromium calls home (update, accounts) despite the flags above: with every
    # name failing to resolve in the browser, none of that leaves the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
SCREENSHOTS = os.environ.get("DISPATCH_SCREENSHOTS")  # a folder to keep them in (docs/status-page.png is one)


def run_chromium(tmp_path: Any, *arguments: str) -> str:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


class PageServer(http.server.ThreadingHTTPServer):
    """Serves the status page of sample_status(step), a step of ``steps`` for
    each request (a negative one is a failure); records each request's path
    and Sec-Fetch-Mode (navigate: the browser loaded the page)."""

    daemon_threads = True

    def __init__(self, steps: Iterator[int]) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.requests: list[tuple[str, str]] = []
        self.steps = steps


class PageHandler(http.server.BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Sec-Fetch-Mode", "")))
        step = next(self.server.steps)
        code, kind, body = (
            (503, "text/plain", "busy")
            if step < 0
            else (200, dispatch.PAGE_CONTENT_TYPE, dispatch.render_status_page(sample_status(step)))
        )
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Security-Policy", dispatch.STATUS_PAGE_CSP)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_server(request: pytest.FixtureRequest) -> Iterator[PageServer]:
    steps = {
        "newer": itertools.count(0),
        "same": itertools.repeat(0),
        "failing first": itertools.chain([0, -1], itertools.count(1)),
        "failing": itertools.chain([0], itertools.repeat(-1)),
    }
    server = PageServer(steps[getattr(request, "param", "newer")])
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class Markup(html.parser.HTMLParser):
    """Markup as start tags (attributes sorted, an empty class left out), texts
    and end tags, so that the page as served and Chromium's DOM compare."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.events: list[tuple[str, ...]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("start", tag, *sorted(f"{k}={v or ''}" for k, v in attrs if v or k != "class")))

    def handle_endtag(self, tag: str) -> None:
        self.events.append(("end", tag))

    def handle_data(self, data: str) -> None:
        self.events.append(("text", data))


def redrawn_part(page: str) -> list[tuple[str, ...]]:
    """Facts, table, charts and legend: all that updates put in place."""
    return Markup(page[page.index('<dl class="facts"') : page.index("<script>")]).events


def live_says(dom: str) -> str:
    """What the page's live indicator says."""
    said = re.search(r'<span id="live"[^>]*>([^<]*)</span>', dom)
    assert said is not None
    return said.group(1)


@pytest.mark.parametrize("page_server", ["same"], indirect=True)
def test_browser_keeps_the_page_exactly_as_served_while_nothing_changes(tmp_path: Any, page_server: PageServer) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{page_server.server_port}/")
    assert live_says(dom) == "live, every 2 s" and len(page_server.requests) >= 2
    assert redrawn_part(dom) == redrawn_part(dispatch.render_status_page(sample_status()))


def test_browser_updates_the_page_in_place_with_the_parts_drawn_anew(tmp_path: Any, page_server: PageServer) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{page_server.server_port}/")
    paths, modes = zip(*page_server.requests)
    assert set(paths) == {"/"} and len(paths) >= 2  # the page alone: nothing else is fetched
    assert modes[0] == "navigate" and "navigate" not in modes[1:]  # loaded once, never again
    assert live_says(dom) == "live, every 2 s"
    # Exactly as drawn for a later status: grown counters, a new link (cell0), its colour, its lines.
    drawn = [redrawn_part(dispatch.render_status_page(sample_status(step))) for step in range(1, len(paths))]
    assert redrawn_part(dom) in drawn
    uptime = re.search(r"<dt>uptime</dt><dd>([^<]*)<", dom)
    assert uptime is not None and re.fullmatch(r"[2-9] h 2 min", uptime.group(1))
    for link in ("wlan0", "usb0", "enp3s0", "cell0"):  # cell0 comes only with an update
        assert dom.count(f"></i>{link}<") == 2, link  # its row and the legend
    assert dom.count("<polyline") == 6  # three links with history, two charts


@pytest.mark.parametrize("page_server", ["failing first"], indirect=True)
def test_browser_keeps_polling_after_a_failed_fetch(tmp_path: Any, page_server: PageServer) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{page_server.server_port}/")
    assert len(page_server.requests) >= 3
    assert live_says(dom) == "live, every 2 s" and "cell0" in dom


@pytest.mark.parametrize("page_server", ["failing"], indirect=True)
def test_browser_says_when_updates_fail_and_keeps_the_last_page(tmp_path: Any, page_server: PageServer) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{page_server.server_port}/")
    assert len(page_server.requests) >= 2
    assert live_says(dom) == "no answer, retrying"
    assert redrawn_part(dom) == redrawn_part(dispatch.render_status_page(sample_status()))


def test_browser_shows_a_running_proxys_traffic_without_a_reload(
    tmp_path: Any,
    make_proxy: Callable[..., Dispatcher],
    echo_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn_first: list[str] = []
    status = Dispatcher.status

    def traffic_after_the_first_page(proxy: Dispatcher) -> dispatch.Status:
        # The first page is drawn before the traffic, the first update after it.
        seen = status(proxy)
        if not drawn_first:
            drawn_first.append(dispatch.render_status_page(seen))
            for _ in range(3):
                with client_through(proxy, (echo_server.host, echo_server.port)) as client:
                    assert round_trip(client, b"x" * 50_000) == b"x" * 50_000
            # The page's own connection (and any Chromium opens ahead) stays
            # open: it is the relayed ones that must have ended.
            assert wait_for(lambda: sum(row["open"] for row in proxy.stats()) == 0)
            proxy.meter.sample()
        return seen

    monkeypatch.setattr(Dispatcher, "status", traffic_after_the_first_page)
    proxy = make_proxy(["127.0.0.2"])
    dom = run_chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{proxy.address[1]}/")
    (first,) = drawn_first
    assert "<dt>connections</dt><dd>0</dd>" in first and "150 kB" not in first
    assert live_says(dom) == "live, every 2 s"
    assert "<dt>connections</dt><dd>3</dd>" in dom  # a fact,
    assert re.search(r'<td class="n" data-label="Down">150 kB</td>', dom)  # a row,
    assert re.search(r'<polyline class="s0" points="[^"]*,(?!140\.0)[^"]*"', dom)  # a line off the floor


def test_browser_shows_a_running_proxys_links_and_charts(
    tmp_path: Any, make_proxy: Callable[..., Dispatcher], echo_server: Server
) -> None:
    proxy = make_proxy(["127.0.0.2@2", "127.0.0.3"])
    for _ in range(3):
        with client_through(proxy, (echo_server.host, echo_server.port)) as client:
            assert round_trip(client, b"x" * 50_000) == b"x" * 50_000
    proxy.meter.sample()  # a sample in the history now, rather than in up to 2 s
    url = f"http://127.0.0.1:{proxy.address[1]}/"
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert live_says(dom) == "live, every 2 s"  # the first update came
    for link in ("127.0.0.2", "127.0.0.3"):
        assert dom.count(f"></i>{link}<") == 2, link  # its row and the legend
    assert dom.count("<polyline") == 4 and ">no samples yet<" not in dom  # two links, two charts
    for name, size in (("narrow", "412,900"), ("wide", "1200,900")):
        shot = os.path.join(SCREENSHOTS or str(tmp_path), f"status-{name}.png")
        run_chromium(tmp_path, f"--screenshot={shot}", f"--window-size={size}", url)
        with open(shot, "rb") as png:
            head = png.read(24)
        assert head.startswith(b"\x89PNG") and int.from_bytes(head[16:20], "big") == int(size.split(",")[0])


def test_browser_takes_the_pac_file_and_leaves_names_to_the_proxy(
    tmp_path: Any,
    make_proxy: Callable[..., Dispatcher],
    origin: str,
    fake_names: dict[str, list[str]],
    log: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_names["www.example.test"] = ["127.0.0.1"]  # for the proxy's resolver alone
    answers = socket.getaddrinfo

    def test_names_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        # Chromium also calls home through the PAC's proxy: those names must
        # not be looked up either.
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in fake_names and not dispatch._is_ip(name):
            raise socket.gaierror(socket.EAI_NONAME, "not a name of this test")
        return answers(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", test_names_only)
    proxy = make_proxy()
    port = origin.rpartition(":")[2]
    dom = run_chromium(
        tmp_path,
        f"--proxy-pac-url=http://127.0.0.1:{proxy.address[1]}/proxy.pac",
        "--dump-dom",
        f"http://www.example.test:{port}/page",
    )
    assert "GET /page" in dom  # the origin's answer, through the proxy
    targets = [exchange.target for exchange in exchanges(log)]
    assert f"www.example.test:{port}" in targets or f"GET http://www.example.test:{port}/page" in targets


class DevTools:
    """Headless Chromium driven over its DevTools pipe (--remote-debugging-pipe:
    it reads commands on descriptor 3 and answers on 4, each a JSON message
    ended by a NUL byte), with one page open at ``url``."""

    def __init__(self, tmp_path: Any, url: str) -> None:
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()

        def onto_3_and_4() -> None:
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        flags = [flag for flag in CHROMIUM_FLAGS if not flag.startswith("--virtual-time-budget")]
        profile = tmp_path / f"profile-{time.monotonic_ns()}"
        command = [CHROMIUM, *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(3, 4), preexec_fn=onto_3_and_4
        )
        os.close(to_browser)
        os.close(from_browser)
        self._next = itertools.count(1)
        self._unread = b""
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.send("Page.navigate", self.session, url=url)
        loaded = f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        assert wait_for(lambda: self.evaluate(loaded) is True), f"{url} did not load"

    def send(self, method: str, session: str | None = None, **params: Any) -> Any:
        """Send one command; return its result (events on the way are passed
        over), None for an error of a page that was changing."""
        number = next(self._next)
        message = {"id": number, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            while b"\0" not in self._unread:
                chunk = os.read(self._answers, 65536)
                assert chunk, "Chromium closed its DevTools pipe"
                self._unread += chunk
            line, _, self._unread = self._unread.partition(b"\0")
            answer = json.loads(line)
            if answer.get("id") == number:
                if "context was destroyed" in answer.get("error", {}).get("message", ""):
                    return None
                assert "error" not in answer, answer
                return answer["result"]
        raise AssertionError(f"no answer to {method}")

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (awaited if a promise)."""
        result = self.send("Runtime.evaluate", self.session, expression=expression, awaitPromise=True)
        assert result is None or "exceptionDetails" not in result, result
        return None if result is None else result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError, AssertionError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


# Click the button of a link that asks for ACTION, once the page shows it;
# then wait until the page, updated, shows that link in its new state.
CLICK_THE_LINKS_BUTTON = """
new Promise(function (done, fail) {
  var link = LINK, action = ACTION, clicked = false, started = Date.now();
  (function look() {
    var button = document.querySelector('button[data-link="' + link + '"]');
    if (button && !clicked && button.dataset.action === action) { button.click(); clicked = true; }
    else if (button && clicked && button.dataset.action !== action) return done(button.parentNode.textContent);
    if (Date.now() - started > 60000) return fail(new Error("the page never showed it"));
    setTimeout(look, 50);
  })();
})
"""


def click_the_links_button(link: str, action: str) -> str:
    return CLICK_THE_LINKS_BUTTON.replace("LINK", json.dumps(link)).replace("ACTION", json.dumps(action))


def test_browser_pauses_and_resumes_a_link_by_its_button(
    tmp_path: Any, make_proxy: Callable[..., Dispatcher], log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(["127.0.0.2", "127.0.0.3"])
    browser = DevTools(tmp_path, f"http://127.0.0.1:{proxy.address[1]}/")
    try:
        shown = browser.evaluate(click_the_links_button("127.0.0.3", "pause"))
        assert shown == "127.0.0.3: paused, weight 1 Resume"
        assert [link["state"] for link in proxy.status()["links"]] == ["ready", "paused"]
        shown = browser.evaluate(click_the_links_button("127.0.0.3", "resume"))
        assert shown == "127.0.0.3: ready, weight 1 Pause"
        assert [link["state"] for link in proxy.status()["links"]] == ["ready", "ready"]
    finally:
        browser.close()
    assert "link 127.0.0.3 paused from 127.0.0.1" in log.messages
