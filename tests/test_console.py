"""The web console, end to end: Playwright driving Debian's Chromium against a real ``twistd iotd``.

One daemon and one browser per module (per store backend); each test has its own browser context
(so its own sessionStorage) and its own devices.  The tests find things as a screen reader does
(labels, roles, accessible names, text) and wait with Playwright's auto-waiting ``expect``, never
with sleeps; each flow saves a screenshot under its tmp dir.  Every test also fails on any
JavaScript error or console error of its page.
"""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import threading
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser

import pytest

from console_helpers import CHROMIUM, TIMEOUT_MS, Errors, PushDevice, launch, shot
from daemon_process import DaemonProcess, request

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the header tests still run
    sync_playwright = None

# CI sets IOTD_REQUIRE_BROWSER=1 (.ci/run): there a missing browser fails the tests instead of skipping them.
REQUIRED = os.environ.get("IOTD_REQUIRE_BROWSER") == "1"
MISSING = sync_playwright is None or not os.path.exists(CHROMIUM)
needs_browser = pytest.mark.skipif(MISSING and not REQUIRED,
                                   reason="needs playwright (PyPI) and Debian's chromium at /usr/bin/chromium")
CSP = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:"
if sync_playwright is not None:
    expect.set_options(timeout=TIMEOUT_MS)


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            while data := self.request.recv(4096):
                self.request.sendall(data)
        except OSError:  # iotd reset the link
            pass


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def echo():
    """A TCP device on loopback that echoes what it gets (the link tests dial it)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def iotd(tmp_path_factory, backend):
    d = DaemonProcess(tmp_path_factory.mktemp("console"), extra=(
        "[devicelink]\nport_range = 32100-32199\nallowed_device_networks = 127.0.0.0/8\n")).start(timeout=90)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        (pytest.fail if REQUIRED else pytest.skip)("needs playwright (PyPI) and Debian's chromium at /usr/bin/chromium")
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


class Console:
    """A browser tab on the console of ``iotd``, recording every JavaScript error."""

    def __init__(self, page, iotd):
        self.page = page
        self.iotd = iotd
        self.errors = Errors(page)

    def open(self, path: str = "/") -> None:
        self.page.goto(self.iotd.url + path)

    def sign_in(self, key: str) -> None:
        self.open()
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("button", name="Sign out")).to_be_visible()

    def live(self):
        """Wait until the view's sockets are subscribed (what happens next arrives live)."""
        expect(self.page.get_by_text("Live updates: on")).to_be_visible()

    def row(self, identifier: str):
        return self.page.locator(f'tr[data-device="{identifier}"]')


@pytest.fixture
def console(browser, iotd):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    tab = Console(context.new_page(), iotd)
    try:
        yield tab
    finally:
        context.close()
    unexpected = tab.errors.unexpected()
    assert not unexpected, f"JavaScript errors on the page: {unexpected}"


def put_device(iotd, identifier: str, **fields) -> None:
    status, body = iotd.request("PUT", f"/api/v1/devices/{identifier}", fields, key=iotd.admin_key)
    assert status in (200, 201), body


def new_key(iotd, role: str, **extra) -> str:
    status, body = iotd.request("POST", "/api/v1/api-keys", {"name": f"console {role}", "role": role, **extra},
                                key=iotd.admin_key)
    assert status == 201, body
    return body["key"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def raw_get(iotd, path: str, headers: dict | None = None, method: str = "GET"):
    """``(status, headers, body)`` of one GET (or ``method``), redirects not followed."""
    req = urllib.request.Request(iotd.url + path, headers=headers or {}, method=method)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# -- serving ------------------------------------------------------------------------------------


class Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs)
            self._in_script = True
        self.inline += [name for name in attrs if name.startswith("on") or name == "style"]

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(data)


def test_console_is_served_with_the_spec_headers(iotd):
    status, headers, _ = raw_get(iotd, "/")
    assert status == 302 and headers["Location"] == "/console/"
    status, headers, _ = raw_get(iotd, "/console")
    assert status == 301 and headers["Location"] == "/console/"
    for path, kind in (("/console/", "text/html"), ("/console/app.js", "text/javascript"),
                       ("/console/console.css", "text/css")):
        status, headers, body = raw_get(iotd, path)
        assert status == 200 and headers["Content-Type"].startswith(kind), path
        assert headers["Content-Security-Policy"] == CSP
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-cache"
        etag = headers["ETag"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
        status, again, body2 = raw_get(iotd, path, {"If-None-Match": etag})
        assert status == 304 and body2 == b"" and again["ETag"] == etag
        status, again, body2 = raw_get(iotd, path, {"If-None-Match": f'"other", W/{etag}'})
        assert status == 304  # a weak or listed tag matches too
        status, again, body2 = raw_get(iotd, path, method="HEAD")
        assert status == 200 and body2 == b"" and int(again["Content-Length"]) == len(body)
    # no inline script anywhere: every <script> has a src, no on* handler or style attribute
    _, _, page = raw_get(iotd, "/console/")
    parser = Scripts()
    parser.feed(page.decode())
    assert parser.scripts and all(s.get("src") for s in parser.scripts) and parser.inline == []
    # anything else under /console/ is the API's JSON 404, with the same headers; writes are 405
    for path in ("/console/nope.js", "/console/../iotd.ini", "/console/%2e%2e/data/admin.key",
                 "/console/__init__.py"):
        status, headers, body = raw_get(iotd, path)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found", path
        assert headers["Content-Security-Policy"] == CSP
    status, body = iotd.request("POST", "/console/", {})
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_console_false_turns_it_off(tmp_path):
    d = DaemonProcess(tmp_path, extra="console = false\n").start(timeout=90)  # goes into [http]
    try:
        for path in ("/console/", "/console/app.js", "/"):
            status, body = request(d.url, "GET", path)
            assert status == 404 and body["error"]["code"] == "not_found", path
        assert request(d.url, "GET", "/healthz")[0] == 200
    finally:
        d.stop()


def test_api_keys_self_shows_the_presented_key(iotd):
    key = new_key(iotd, "read_only", permissions=["readings:create"])
    status, body = iotd.request("GET", "/api/v1/api-keys/self", key=key)
    assert status == 200
    assert (body["role"], body["permissions"], body["name"]) == ("read_only", ["readings:create"], "console read_only")
    assert "key" not in body and "key_hash" not in body
    status, body = iotd.request("GET", "/api/v1/api-keys/self", key="0" * 64)
    assert status == 401 and body["error"]["code"] == "unauthorized"


# -- flows in the browser -----------------------------------------------------------------------


@needs_browser
def test_sign_in_lists_devices_and_sign_out_forgets_the_key(console, iotd, tmp_path):
    put_device(iotd, "LIST-01", name="Lobby sensor", tags=["building-a"])
    put_device(iotd, "LIST-02", name="Roof sensor", tags=["building-b"])
    console.sign_in(iotd.admin_key)
    page = console.page
    link = page.get_by_role("link", name="LIST-01", exact=True)
    expect(link).to_be_visible()
    expect(console.row("LIST-01")).to_contain_text("Lobby sensor")
    expect(console.row("LIST-01")).to_contain_text("building-a")
    expect(console.row("LIST-01").locator(".state")).to_have_text("offline")
    expect(page.get_by_role("status")).to_contain_text("Signed in as admin")
    # the key is in sessionStorage only
    assert page.evaluate("sessionStorage.getItem('iotd.apiKey')") == iotd.admin_key
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    # filters: by tag (REST) and by text (this page)
    page.get_by_label("Tag").fill("building-b")
    page.get_by_role("button", name="Apply").click()
    expect(console.row("LIST-02")).to_be_visible()
    expect(console.row("LIST-01")).to_have_count(0)
    page.get_by_label("Tag").fill("")
    page.get_by_role("button", name="Apply").click()
    page.get_by_label("Filter").fill("lobby")
    expect(console.row("LIST-01")).to_be_visible()
    expect(console.row("LIST-02")).to_be_hidden()
    shot(page, tmp_path, "devices")
    link.click()
    expect(page.get_by_role("heading", name=re.compile("^LIST-01"))).to_be_visible()
    expect(page.locator('dd[data-field="name"]')).to_have_text("Lobby sensor")
    expect(page.locator('dd[data-field="transport"]')).to_have_text("push (polls)")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.get_by_label("API key")).to_be_visible()


@needs_browser
def test_a_push_poll_turns_the_dot_online_without_reload(console, iotd, tmp_path):
    put_device(iotd, "PUSH-01", name="Gate", pushId=700001)
    console.sign_in(iotd.admin_key)
    page = console.page
    expect(console.row("PUSH-01").locator(".state")).to_have_text("offline")
    console.live()
    page.evaluate("window.notReloaded = true")
    assert PushDevice(iotd.url, 700001).poll() is None  # nothing queued: the empty 200
    expect(console.row("PUSH-01").locator(".state")).to_have_text("online")
    expect(console.row("PUSH-01").locator("td").nth(3)).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d "))  # last seen
    expect(page.get_by_role("status")).to_have_text("PUSH-01 is online")
    assert page.evaluate("window.notReloaded") is True
    shot(page, tmp_path, "push-online")


@needs_browser
def test_queue_a_command_from_the_form_and_see_the_answer(console, iotd, tmp_path):
    put_device(iotd, "CMD-01", name="Door", pushId=700002)
    device = PushDevice(iotd.url, 700002)
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_role("link", name="CMD-01", exact=True).click()
    console.live()
    page.get_by_label("Endpoint").fill("load_objects")
    page.get_by_label("Body").fill('{"object": "users"}')
    page.get_by_role("button", name="Queue command").click()
    row = page.locator("tr[data-command]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("queued")
    command = device.poll()
    assert command == {"verb": "POST", "endpoint": "load_objects", "body": {"object": "users"}}
    expect(row).to_contain_text("sent")
    device.answer("load_objects", {"users": [{"id": 1, "name": "Walter White"}]})
    expect(row.locator(".status")).to_have_text("done")
    expect(row.locator("td.response")).to_contain_text('"name":"Walter White"')
    expect(page.get_by_role("status")).to_contain_text("done")
    # with Wait the request is held until the device has answered (200 with the finished command)
    page.get_by_label("Endpoint").fill("get_configuration.fcgi")
    page.get_by_label("Body").fill("")
    page.get_by_label("Verb").select_option("GET")
    page.get_by_label("Wait (s)").fill("30")
    page.get_by_role("button", name="Queue command").click()
    expect(page.get_by_role("button", name="Queue command")).to_be_disabled()  # waiting for the answer
    second, deadline = None, time.monotonic() + TIMEOUT_MS / 1000
    while second is None and time.monotonic() < deadline:  # queued once the held request reached iotd
        second = device.poll()
    assert second == {"verb": "GET", "endpoint": "get_configuration.fcgi"}
    device.answer("get_configuration.fcgi", {"general": {"beep_enabled": "1"}})
    expect(page.get_by_role("button", name="Queue command")).to_be_enabled()
    expect(row).to_have_count(2)
    expect(row.first.locator(".status")).to_have_text("done")
    expect(row.first.locator("td.response")).to_contain_text('"beep_enabled":"1"')
    # a body that is not JSON is refused here, with a message; nothing is queued
    page.get_by_label("Body").fill("{not json")
    page.get_by_role("button", name="Queue command").click()
    expect(page.get_by_role("alert").filter(has_text="Body is not JSON")).to_be_visible()
    # the API's own refusal is shown as it comes (Chromium logs the 422 it asked for)
    console.errors.allow(r"Failed to load resource: the server responded with a status of 422")
    page.get_by_label("Body").fill("")
    page.get_by_label("Endpoint").fill("no/slashes")
    page.get_by_role("button", name="Queue command").click()
    expect(page.get_by_role("alert").filter(has_text="422")).to_be_visible()
    expect(row).to_have_count(2)
    # a queued command can be cancelled (the device has not polled it yet)
    page.get_by_label("Endpoint").fill("reboot")
    page.get_by_label("Wait (s)").fill("0")
    page.get_by_role("button", name="Queue command").click()
    expect(row).to_have_count(3)
    expect(row.first.locator(".status")).to_have_text("queued")
    page.get_by_role("button", name=re.compile(r"^Cancel command \d+$")).click()
    expect(row.first.locator(".status")).to_have_text("cancelled")
    status, listed = iotd.request("GET", "/api/v1/devices/CMD-01/commands?status=cancelled", key=iotd.admin_key)
    assert [c["endpoint"] for c in listed["items"]] == ["reboot"]
    shot(page, tmp_path, "command")


@needs_browser
def test_readings_update_the_chart_and_the_table_live(console, iotd, tmp_path):
    put_device(iotd, "READ-01", name="Boiler")
    iotd.request("POST", "/api/v1/devices/READ-01/readings", {"data": {"temperature": 20.5}}, key=iotd.admin_key)
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_role("link", name="READ-01", exact=True).click()
    console.live()
    chart = page.get_by_role("img", name=re.compile(r"^temperature: 1 reading in the last 15 minutes"))
    expect(chart).to_be_visible()  # the REST history
    for value in (21.5, 21.7):
        status, _ = iotd.request("POST", "/api/v1/devices/READ-01/readings",
                                 {"data": {"temperature": value, "door": "open"}}, key=iotd.admin_key)
        assert status == 201
    expect(page.get_by_role("img", name=re.compile(
        r"^temperature: 3 readings in the last 15 minutes, latest 21\.7"))).to_be_visible()
    expect(page.locator("figure.chart")).to_have_count(1)  # "door" is no number: no chart
    expect(page.locator("figure.chart figcaption")).to_contain_text("temperature 21.7")
    rows = page.locator("tr[data-reading]")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text('"temperature":21.7')  # newest on top
    expect(rows.last).to_contain_text('"temperature":20.5')
    # packets too
    iotd.request("POST", "/api/v1/devices/READ-01/packets", {"payload": {"raw": 1}}, key=iotd.admin_key)
    expect(page.locator("tr[data-packet]")).to_contain_text('{"raw":1}')
    shot(page, tmp_path, "readings")


@needs_browser
def test_open_a_tcp_link_use_it_and_close_it(console, iotd, echo, tmp_path):
    put_device(iotd, "LINK-01", name="PLC", host="127.0.0.1", ports={"default": echo})
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_role("link", name="LINK-01", exact=True).click()
    page.get_by_role("button", name="Open link").click()
    item = page.locator("ul.links li[data-token]")
    expect(item).to_have_count(1)
    address = item.locator(".address").inner_text()
    host, port = address.rsplit(":", 1)
    token = item.get_attribute("data-token")
    expect(item.locator("code.token")).to_have_text(token)
    status, body = iotd.request("GET", "/api/v1/devicelink", key=iotd.admin_key)
    assert [(link["token"], link["port"]) for link in body["items"]] == [(token, int(port))]
    # the links page: bytes each way, refreshed without reload
    page.get_by_role("link", name="Links", exact=True).click()
    link_row = page.locator(f'tr[data-token="{token}"]')
    expect(link_row).to_contain_text("LINK-01")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
        expect(link_row.locator(".bytes-up")).to_have_text("5 B")
        expect(link_row.locator(".bytes-down")).to_have_text("5 B")
        expect(link_row.locator(".idle")).to_have_text(re.compile(r"^\d+ (s|min)$"))
        shot(page, tmp_path, "links")
        page.get_by_role("link", name="LINK-01", exact=True).click()
        page.get_by_role("button", name="Close link").click()  # (a client's FIN would close it too)
        expect(item).to_have_count(0)
        expect(page.get_by_role("status")).to_contain_text(f"Link {address} closed")
        assert closed_by_peer(client)  # iotd dropped the client (DELETE aborts both sockets)
    assert iotd.request("GET", "/api/v1/devicelink", key=iotd.admin_key)[1]["items"] == []
    shot(page, tmp_path, "link-closed")


@needs_browser
def test_a_read_only_key_sees_no_write_controls(console, iotd, echo, tmp_path):
    put_device(iotd, "RO-01", name="Meter", host="127.0.0.1", ports={"default": echo}, pushId=700003)
    status, link = iotd.request("POST", "/api/v1/devicelink/RO-01", {"protocol": "tcp"}, key=iotd.admin_key)
    assert status == 201
    iotd.request("POST", "/api/v1/devices/RO-01/commands", {"endpoint": "reboot"}, key=iotd.admin_key)
    console.sign_in(new_key(iotd, "read_only"))
    page = console.page
    expect(page.locator("#whoami")).to_contain_text("read_only")
    expect(console.row("RO-01").locator("td").last).to_have_text("1")  # unfinished commands
    page.get_by_role("link", name="RO-01", exact=True).click()
    expect(page.locator("tr[data-command]")).to_contain_text("reboot")  # it may read them
    expect(page.locator("ul.links li[data-token]")).to_have_count(1)
    for name in ("Queue command", "Open link", "Close link", "Cancel command"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)
    expect(page.get_by_label("Endpoint")).to_have_count(0)
    expect(page.get_by_label("Body")).to_have_count(0)
    shot(page, tmp_path, "read-only-device")
    page.get_by_role("link", name="Links", exact=True).click()
    expect(page.locator(f'tr[data-token="{link["token"]}"]')).to_be_visible()
    expect(page.get_by_role("button", name="Close link")).to_have_count(0)
    iotd.request("DELETE", f"/api/v1/devicelink/{link['token']}", key=iotd.admin_key)


@needs_browser
def test_a_bad_key_shows_the_api_error(console, iotd, tmp_path):
    console.errors.allow(r"Failed to load resource: the server responded with a status of 401")
    page = console.page
    for bad in ("0" * 64, "not-a-key"):
        status, body = iotd.request("GET", "/api/v1/api-keys/self", key=bad)
        assert status == 401
        console.open()
        page.get_by_label("API key").fill(bad)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text(f"401 {body['error']['code']}: {body['error']['message']}")
        expect(page.get_by_role("status")).to_contain_text("Sign-in failed")
        expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
        assert page.evaluate("sessionStorage.length") == 0
    page.get_by_label("API key").fill("ключ")  # not even a header value: refused before sending
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("ASCII")
    shot(page, tmp_path, "bad-key")


@needs_browser
def test_the_event_tail_follows_the_tenant_and_pauses(console, iotd, tmp_path):
    put_device(iotd, "EVT-01", name="Probe")
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_role("link", name="Events", exact=True).click()
    console.live()
    ingest = lambda kind, body: iotd.request("POST", f"/api/v1/devices/EVT-01/{kind}", body, key=iotd.admin_key)
    ingest("packets", {"payload": {"n": 1}})
    ingest("readings", {"data": {"humidity": 40}})
    rows = page.locator("tr[data-kind]")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("EVT-01")
    page.get_by_role("button", name="Pause").click()
    ingest("readings", {"data": {"humidity": 41}})
    expect(page.get_by_role("button", name="Resume (1 new)")).to_be_visible()
    expect(rows).to_have_count(2)
    page.get_by_role("button", name=re.compile("^Resume")).click()
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text('"humidity":41')
    shot(page, tmp_path, "events")


@needs_browser
def test_phone_width(console, iotd, tmp_path):
    put_device(iotd, "PHONE-01", name="Small screen")
    page = console.page
    page.set_viewport_size({"width": 390, "height": 844})
    console.sign_in(iotd.admin_key)
    page.get_by_role("link", name="PHONE-01", exact=True).click()
    expect(page.get_by_role("button", name="Queue command")).to_be_visible()
    # the page itself never scrolls sideways (wide tables scroll inside their box)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, tmp_path, "phone")


@needs_browser
def test_grants_decide_the_controls(console, iotd, tmp_path):
    put_device(iotd, "GRANT-01", name="Turnstile", tags=["lobby"])
    console.sign_in(new_key(iotd, "read_only", permissions=["commands:create"]))
    page = console.page
    page.get_by_role("link", name="GRANT-01", exact=True).click()
    expect(page.get_by_role("button", name="Queue command")).to_be_visible()
    expect(page.get_by_role("button", name="Open link")).to_have_count(0)
    page.get_by_role("button", name="Sign out").click()
    console.sign_in(new_key(iotd, "group", groups=["lobby"]))
    expect(console.row("GRANT-01")).to_be_visible()
    expect(page.locator("tr[data-device]")).to_have_count(1)  # only its groups' devices
    page.get_by_role("link", name="Events", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("needs an admin or read_only key")
    shot(page, tmp_path, "group-events")


@needs_browser
def test_the_device_list_pages_through_the_rest_list(console, iotd, tmp_path):
    for n in range(51):
        put_device(iotd, f"PG-{n:03d}", tags=["paged"])
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_label("Tag").fill("paged")
    page.get_by_role("button", name="Apply").click()
    rows = page.locator("tr[data-device]")
    expect(rows).to_have_count(50)
    expect(rows.first).to_have_attribute("data-device", "PG-000")
    expect(page.get_by_role("button", name="Previous page")).to_be_disabled()
    page.get_by_role("button", name="Next page").click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-device", "PG-050")
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    page.get_by_role("button", name="Previous page").click()
    expect(rows).to_have_count(50)
    shot(page, tmp_path, "paged")


@needs_browser
def test_a_revoked_key_signs_the_console_out(console, iotd, tmp_path):
    console.errors.allow(r"Failed to load resource: the server responded with a status of 401")
    status, created = iotd.request("POST", "/api/v1/api-keys", {"name": "soon gone", "role": "read_only"},
                                   key=iotd.admin_key)
    assert status == 201
    console.sign_in(created["key"])
    page = console.page
    console.live()  # the devices page makes no REST call by itself: the socket's 4401 tells
    assert iotd.request("DELETE", f"/api/v1/api-keys/{created['id']}", key=iotd.admin_key)[0] == 204
    expect(page.get_by_label("API key")).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("401 unauthorized")
    assert page.evaluate("sessionStorage.length") == 0
    shot(page, tmp_path, "revoked")


@needs_browser
def test_hostile_text_is_shown_as_text(console, iotd, tmp_path):
    console.errors.allow(r"Failed to load resource: the server responded with a status of 404")
    ident = 'Q?#%"<1'
    html = '<img src=x onerror="window.pwned=1">'
    put_device(iotd, urllib.parse.quote(ident, safe=""), name=html, tags=["<b>t</b>"])
    console.sign_in(iotd.admin_key)
    page = console.page
    page.get_by_label("Tag").fill("<b>t</b>")  # (the module's other devices fill the first page)
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("tr[data-device]")).to_have_count(1)
    expect(page.locator("tr[data-device]")).to_contain_text("<b>t</b>")
    page.get_by_role("link", name=ident.upper(), exact=True).click()
    expect(page.locator('dd[data-field="name"]')).to_have_text(html)
    status, _ = iotd.request("POST", f"/api/v1/devices/{urllib.parse.quote(ident, safe='')}/readings",
                             {"data": {"note": html, "v": 1}}, key=iotd.admin_key)
    assert status == 201
    expect(page.locator("tr[data-reading]")).to_contain_text(json.dumps(html))
    assert page.evaluate("window.pwned") is None and page.locator("img").count() == 0
    # an unknown device: the API's 404, as it comes
    page.goto(iotd.url + "/console/#/devices/NO-SUCH")
    expect(page.get_by_role("alert")).to_contain_text("404 not_found")
    shot(page, tmp_path, "hostile")


def test_the_key_is_never_logged(iotd):
    """Runs after the flows above (same daemon): websocket URLs carried the key, the log has none."""
    log = iotd.log()
    assert iotd.admin_key not in log and iotd.admin_key.upper() not in log
    if sync_playwright is not None and os.path.exists(CHROMIUM):
        assert "(subscribe) opened" in log  # the console's sockets were there (with the key in their URL)
