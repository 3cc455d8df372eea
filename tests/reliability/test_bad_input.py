"""Bad input never gets a 5xx or a traceback, and never hurts the daemon.

Hypothesis throws random JSON, wrong types, huge numbers, deep nesting,
lone surrogates, NaN/Infinity and random bytes at every REST endpoint of one
real daemon process; raw garbage goes to the HTTP port.  After every request
the device and key lists still answer strictly valid JSON (nothing poisonous
was stored).
"""

import json
import socket
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_process import DaemonProcess

ENDPOINTS = [
    ("PUT", "/api/v1/devices/fuzz-{n}"),
    ("POST", "/api/v1/devices/fuzz/packets"),
    ("POST", "/api/v1/devices/fuzz/readings"),
    ("POST", "/api/v1/devices/fuzz/ota"),
    ("POST", "/api/v1/api-keys"),
    ("PUT", "/api/v1/streams/s{n}"),
    ("POST", "/api/v1/devicelink/fuzz"),
    ("POST", "/api/v1/devices/fuzz/commands"),
    ("POST", "/result?deviceId={n}"),
    ("GET", "/push?deviceId={n}"),
    ("GET", "/api/v1/devices?limit={n}"),
    ("DELETE", "/api/v1/devicelink/{n}"),
    ("DELETE", "/api/v1/api-keys/{n}"),
]

# what json.dumps turns into a lone surrogate escape, NaN, Infinity or an overflowing number
poison = st.sampled_from(["\ud800", "x\udc00y", "\udfff", float("nan"), float("inf"), float("-inf"), 2**1100])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40) | poison,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["protocol", "devicePort", "data", "payload", "payload_encoding", "role", "name",
                         "tags", "ports", "pushId", "encrypt", "source", "endpoint", "verb", "body",
                         "response", "error", "status", "step", "devices", "x", "meta", "fields",
                         "location", "detail", "\ud800"]) | st.text(max_size=8),
        children, max_size=6),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    # the link test relays to devices on loopback, which an empty allowed_device_networks refuses
    d = DaemonProcess(tmp_path_factory.mktemp("fuzz"),
                      "[devicelink]\nallowed_device_networks = 127.0.0.0/8\n").start()
    d.request("PUT", "/api/v1/devices/fuzz", {"host": "127.0.0.1", "ports": {"default": 9}}, key=d.admin_key)
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log()


def send(d, method, path, body: bytes, key=True):
    req = urllib.request.Request(d.url + path, data=body if method != "GET" else None, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {d.admin_key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def check(status, raw, ctype):
    assert status < 500, raw
    assert b"Traceback" not in raw and b"<html" not in raw.lower()
    if status >= 400 and raw:
        assert json.loads(raw)["error"] if "json" in (ctype or "") else True


def strict_json(raw: bytes):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def lists_still_answer(d) -> None:
    """What was stored can be sent again: the lists are 200 and strictly valid JSON."""
    for path in ("/api/v1/devices?limit=1000", "/api/v1/api-keys?limit=1000"):
        status, raw, _ = send(d, "GET", path, b"")
        assert status == 200, raw
        strict_json(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), value=json_values, n=st.integers(-(2**64), 2**64))
def test_random_json_everywhere(proc, endpoint, value, n):
    method, path = endpoint
    check(*send(proc, method, path.format(n=n), json.dumps(value).encode()))
    lists_still_answer(proc)


leaf = st.text(max_size=20) | poison
tree = st.dictionaries(st.text(max_size=8) | st.just("\ud800"), json_values, max_size=4)
# bodies the handlers accept in shape, so the poison reaches as far as it can
SHAPED = [
    ("PUT", "/api/v1/devices/fuzz-{n}", st.fixed_dictionaries(
        {}, optional={"name": leaf, "tags": st.lists(leaf, max_size=3), "fields": tree})),
    ("POST", "/api/v1/devices/fuzz/readings", st.fixed_dictionaries(
        {"data": tree}, optional={"meta": tree, "measured_at": leaf})),
    ("POST", "/api/v1/devices/fuzz/packets", st.fixed_dictionaries(
        {"payload": json_values}, optional={"meta": tree, "interface": leaf})),
    ("POST", "/api/v1/api-keys", st.fixed_dictionaries({"name": leaf, "role": st.just("read_only")})),
    ("POST", "/api/v1/devices/fuzz/commands", st.fixed_dictionaries({"endpoint": st.just("x"), "body": tree})),
    ("PUT", "/api/v1/streams/s{n}", st.fixed_dictionaries({"devices": st.lists(leaf, max_size=3)})),
]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), n=st.integers(0, 10**6))
def test_poison_in_well_shaped_bodies_is_refused_and_never_stored(proc, data, n):
    method, path, bodies = data.draw(st.sampled_from(SHAPED))
    check(*send(proc, method, path.format(n=n), json.dumps(data.draw(bodies)).encode()))
    lists_still_answer(proc)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=300))
def test_random_bytes_everywhere(proc, endpoint, raw):
    method, path = endpoint
    check(*send(proc, method, path.format(n=1), raw))


def test_deep_nesting_and_huge_numbers(proc):
    deep = b"[" * 100000 + b"]" * 100000
    check(*send(proc, "POST", "/api/v1/devices/fuzz/readings", deep))
    nested = {"data": {}}
    cur = nested["data"]
    for _ in range(900):
        cur["x"] = {}
        cur = cur["x"]
    check(*send(proc, "POST", "/api/v1/devices/fuzz/readings", json.dumps(nested).encode()))
    check(*send(proc, "POST", "/api/v1/devices/fuzz/readings", b'{"data": {"n": 1' + b"0" * 5000 + b"}}"))
    check(*send(proc, "PUT", "/api/v1/devices/big", b'{"pushId": 1' + b"0" * 30 + b"}"))
    assert proc.request("GET", "/healthz")[0] == 200


def test_raw_garbage_on_the_http_port(proc):
    payloads = [b"\x00\xff" * 500, b"GET / HTTP/9.9\r\n\r\n", b"POST /result?deviceId=1 HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"\r\n" * 1000,
                b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
                b"POST /api/v1/devices/x/readings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(65536)
            except OSError:
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    assert proc.request("GET", "/healthz")[0] == 200


def test_oversized_headers_are_refused(proc):
    status, raw, _ = send(proc, "GET", "/api/v1/devices", b"", key=True)
    assert status == 200
    req = urllib.request.Request(proc.url + "/api/v1/devices")
    for i in range(200):
        req.add_header(f"X-H{i}", "v" * 200)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (ConnectionError, urllib.error.URLError):
        status = 400  # the connection was closed on us, which is a refusal too
    assert status == 400
    assert proc.request("GET", "/healthz")[0] == 200


def test_raw_garbage_on_link_ports(proc, tmp_path):
    """Random bytes and datagrams through TCP and UDP links, and a flood of connects, leave the daemon healthy."""
    import os as _os

    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()
    udp_dev = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_dev.bind(("127.0.0.1", 0))
    key = proc.admin_key
    proc.request("PUT", "/api/v1/devices/sink", {"host": "127.0.0.1", "ports": {"default": echo.getsockname()[1]}}, key=key)
    status, tcp_link = proc.request("POST", "/api/v1/devicelink/sink", {"protocol": "tcp"}, key=key)
    assert status == 201
    status, udp_link = proc.request("POST", "/api/v1/devicelink/sink",
                                    {"protocol": "udp", "devicePort": udp_dev.getsockname()[1]}, key=key)
    assert status == 201
    with socket.create_connection(("127.0.0.1", tcp_link["port"]), timeout=5) as c:
        c.sendall(_os.urandom(200_000))
    for _ in range(20):  # later connections to the same TCP link are refused, not served
        try:
            with socket.create_connection(("127.0.0.1", tcp_link["port"]), timeout=1) as c:
                c.sendall(b"\x00" * 10)
        except OSError:
            pass
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for size in (0, 1, 1500, 9000, 65507):
        u.sendto(_os.urandom(size), ("127.0.0.1", udp_link["port"]))
    u.close()
    echo.close()
    udp_dev.close()
    assert proc.request("GET", "/healthz")[0] == 200
    status, body = proc.request("GET", "/api/v1/devicelink", key=key)
    assert status == 200
