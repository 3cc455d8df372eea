"""Hostile input at the door (spec 00 "Limits and hostile input", issue 12 items 3 and 4).

Undecodable header bytes, URL escapes, Host headers and query values are a
400 JSON error, never a 500 or HTML (raw sockets: an HTTP client library would
refuse to send such bytes).  A JSON body holding a lone surrogate, NaN,
Infinity, a number beyond a double or nesting deeper than 64 is a 422 naming
the field on every REST body, and nothing is stored: afterwards the device
list and the replay sockets answer exactly as before.
"""

from __future__ import annotations

import json
import socket
import dbutil
import time
from typing import Any

import pytest
import pytest_twisted

from ws_helpers import Client, in_thread, ws_url

WS_HEAD = [b"Upgrade: websocket", b"Connection: Upgrade",
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"]


# -- raw HTTP ---------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return strict_json(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers.get(b'content-type')} {self.body[:300]!r}>"


def strict_json(raw: bytes) -> Any:
    """Parse as a strict client would: UTF-8, no NaN/Infinity, no lone surrogates."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    value = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def _parse(data: bytes) -> Answer | None:
    """The complete answer in ``data``, or None while more must be read."""
    if b"\r\n\r\n" not in data:
        return None
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        body, pos = b"", 0
        while True:
            end = rest.find(b"\r\n", pos)
            if end < 0:
                return None
            size = int(rest[pos:end].split(b";")[0], 16)
            if size == 0:
                return Answer(status, headers, body)
            if len(rest) < end + 2 + size + 2:
                return None
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
    length = int(headers.get(b"content-length", b"0"))
    if len(rest) < length:
        return None
    return Answer(status, headers, rest[:length])


async def raw(daemon, request_line: bytes, *headers: bytes, body: bytes = b"",
              host: bytes | None = None) -> Answer:
    """Send one request byte for byte over a fresh socket; its answer."""
    lines = [request_line, b"Host: " + (host if host is not None else b"127.0.0.1:%d" % daemon.port)]
    lines += list(headers)
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    payload = b"\r\n".join(lines) + b"\r\n\r\n" + body

    def run() -> Answer:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
            s.sendall(payload)
            data, deadline = b"", time.monotonic() + 10
            while time.monotonic() < deadline:
                answer = _parse(data)
                if answer is not None:
                    return answer
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            answer = _parse(data)
            assert answer is not None, f"no complete answer: {data[:300]!r}"
            return answer

    return await in_thread(run)


def bearer(daemon) -> bytes:
    return b"Authorization: Bearer " + daemon.admin_key.encode()


def assert_json_error(answer: Answer, status: int, code: str | None = None, mentions: str = "") -> None:
    assert answer.status == status, answer
    assert answer.headers.get(b"content-type", b"").startswith(b"application/json"), answer
    error = answer.json()["error"]
    assert isinstance(error["message"], str) and error["message"], answer
    if code is not None:
        assert error["code"] == code, answer
    assert mentions.lower() in error["message"].lower(), answer


# -- what a user would see: the store, the list, the replay -----------------------------


def stored(daemon) -> dict[str, list]:
    conn = dbutil.connect(daemon.ctx.config)
    try:
        return {
            "events": conn.execute("SELECT id, kind, device, data FROM events ORDER BY id").fetchall(),
            "devices": conn.execute("SELECT tenant, identifier, doc FROM devices ORDER BY identifier").fetchall(),
            "streams": conn.execute("SELECT tenant, id, doc FROM streams ORDER BY id").fetchall(),
            "keys": conn.execute("SELECT id, name FROM api_keys ORDER BY id").fetchall(),
            "commands": conn.execute("SELECT id FROM commands ORDER BY id").fetchall(),
        }
    finally:
        conn.close()


class Baseline:
    """What the daemon holds before a hostile request: it must hold exactly that after."""

    def __init__(self, daemon, devices: Any, packet: dict, reading: dict):
        self.daemon, self.devices, self.packet, self.reading = daemon, devices, packet, reading
        self.store = stored(daemon)

    async def unchanged(self) -> None:
        daemon = self.daemon
        assert stored(daemon) == self.store
        answer = await raw(daemon, b"GET /api/v1/devices HTTP/1.1", bearer(daemon), b"Connection: close")
        assert answer.status == 200 and answer.json() == self.devices, answer
        for part, event, body in (("readings", "reading_added", self.reading),
                                  ("packets", "packet_added", self.packet)):
            client = await Client.open(ws_url(daemon, f"/api/v1/{part}/socket", auth=daemon.admin_key,
                                              after="2000-01-01T00:00:00Z"))
            try:
                assert await client.recv_json() == [{"event": event, "body": body}]
                await client.silent(0.1)
            finally:
                await client.close()


@pytest_twisted.async_yield_fixture
async def baseline(daemon):
    await daemon.put_device("t1", name="Sensor", tags=["building-a"])
    status, packet = await daemon.request("POST", "/api/v1/devices/t1/packets", {"payload": {"n": 1}})
    assert status == 201, packet
    status, reading = await daemon.request("POST", "/api/v1/devices/t1/readings",
                                           {"data": {"temperature": 21.5}, "packet_id": packet["id"]})
    assert status == 201, reading
    status, devices = await daemon.request("GET", "/api/v1/devices")
    assert status == 200
    yield Baseline(daemon, devices, packet, reading)


async def post_raw(daemon, method: str, path: str, body: str | bytes) -> tuple[int, Any]:
    return await daemon.request(method, path, raw=body.encode() if isinstance(body, str) else body)


# -- item 4: undecodable header bytes, URLs, Host, query values ---------------------------


@pytest_twisted.ensureDeferred
async def test_key_headers_that_are_not_utf8_are_a_400_json_error(daemon, baseline):
    for line in (b"Authorization: Bearer \xff\xfe", b"token: \xff", b"ithings-token: \xff\xfe"):
        answer = await raw(daemon, b"GET /api/v1/devices HTTP/1.1", line, b"Connection: close")
        assert_json_error(answer, 400, "invalid_header", "not UTF-8")
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_content_type_that_is_not_utf8_is_a_400_json_error_and_nothing_is_stored(daemon, baseline):
    body = b'{"data": {"t": 1}}'
    answer = await raw(daemon, b"POST /api/v1/devices/t1/readings HTTP/1.1", bearer(daemon),
                       b"Content-Type: \xff", b"Connection: close", body=body)
    assert_json_error(answer, 400, "invalid_header", "content-type")
    # a device that does not exist: still a JSON 4xx, never a 500
    answer = await raw(daemon, b"POST /api/v1/devices/x/readings HTTP/1.1", bearer(daemon),
                       b"Content-Type: \xff", b"Connection: close", body=body)
    assert answer.status in (400, 404) and "error" in answer.json(), answer
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_an_upgrade_header_that_is_not_utf8_is_a_400_json_error(daemon, baseline):
    answer = await raw(daemon, b"GET /api/v1/packets/socket HTTP/1.1", bearer(daemon), b"Upgrade: \xff",
                       b"Connection: close")
    assert_json_error(answer, 400, "invalid_header", "upgrade")
    answer = await raw(daemon, b"GET /api/v1/packets/socket HTTP/1.1", bearer(daemon), b"Upgrade: \xff",
                       b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                       b"Sec-WebSocket-Version: 13")
    assert_json_error(answer, 400, "invalid_header", "upgrade")
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_token_header_that_is_not_utf8_on_the_ithings_connect_url_is_a_400_json_error(daemon, baseline):
    path = b"GET /api/v1/system/common/websocket/connect HTTP/1.1"
    for name in (b"token", b"ithings-token"):
        answer = await raw(daemon, path, name + b": \xff", b"Connection: close")
        assert_json_error(answer, 400, "invalid_header", "not UTF-8")
        answer = await raw(daemon, path, name + b": \xff", *WS_HEAD)
        assert_json_error(answer, 400, "invalid_header", "not UTF-8")
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_an_origin_that_is_not_utf8_is_a_400_json_error_on_rest_and_socket_urls(daemon, baseline):
    answer = await raw(daemon, b"GET /api/v1/devices HTTP/1.1", bearer(daemon), b"Origin: \xff",
                       b"Connection: close")
    assert_json_error(answer, 400, mentions="origin")
    answer = await raw(daemon, b"GET /api/v1/packets/socket HTTP/1.1", bearer(daemon), b"Origin: \xff",
                       *WS_HEAD)
    assert_json_error(answer, 400, mentions="origin")
    await baseline.unchanged()


@pytest.mark.parametrize("request_line", [
    b"GET /api/v1/devices/%ff HTTP/1.1",
    b"PUT /api/v1/devices/%ff HTTP/1.1",
    b"POST /api/v1/devices/%ed%a0%80/readings HTTP/1.1",  # an escaped lone surrogate
    b"GET /api/v1/devices/%c3/packets/socket HTTP/1.1",
    b"DELETE /api/v1/streams/%fe%ff HTTP/1.1",
])
@pytest_twisted.ensureDeferred
async def test_a_url_escape_that_is_not_utf8_is_a_400_json_error(daemon, baseline, request_line):
    answer = await raw(daemon, request_line, bearer(daemon), b"Content-Type: application/json",
                       b"Connection: close", body=b'{"data": {}}' if request_line.startswith(b"P") else b"")
    assert_json_error(answer, 400, "invalid_url", "not UTF-8")
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_host_header_that_is_not_utf8_is_a_400_json_error(daemon, baseline):
    for host in (b"\xff", b"caf\xe9.example"):
        answer = await raw(daemon, b"GET /api/v1/devices HTTP/1.1", bearer(daemon), b"Connection: close",
                           host=host)
        assert_json_error(answer, 400, "invalid_url", "host")
    await baseline.unchanged()


QUERY_ROUTES = [
    ("GET", "/api/v1/devices?limit=%ff", "limit"),
    ("GET", "/api/v1/devices?after=%ff", "after"),
    ("GET", "/api/v1/devices?tag=%ff", "tag"),
    ("GET", "/api/v1/api-keys?limit=%ff", "limit"),
    ("GET", "/api/v1/api-keys?after=%ff", "after"),
    ("GET", "/api/v1/devices/t1/commands?limit=%ff", "limit"),
    ("GET", "/api/v1/devices/t1/commands?after=%ff", "after"),
    ("GET", "/api/v1/devices/t1/commands?status=%ff", "status"),
    ("POST", "/api/v1/devices/t1/commands?wait=%ff", "wait"),
    ("GET", "/api/v1/devices/t1/readings/socket?after=%ff", "after"),
    ("GET", "/api/v1/devices/t1/readings/socket?preload=%ff", "preload"),
]


@pytest.mark.parametrize("method,path,name", QUERY_ROUTES, ids=[f"{m} {p}" for m, p, _ in QUERY_ROUTES])
@pytest_twisted.ensureDeferred
async def test_a_query_value_that_is_not_utf8_is_a_400_json_error(daemon, baseline, method, path, name):
    answer = await raw(daemon, f"{method} {path} HTTP/1.1".encode(), bearer(daemon),
                       b"Content-Type: application/json", b"Connection: close",
                       body=b'{"endpoint": "x"}' if method == "POST" else b"")
    assert_json_error(answer, 400, mentions=f"query parameter {name}")
    await baseline.unchanged()


@pytest.mark.parametrize("route", ["GET /api/v1/devices", "PUT /api/v1/devices/t2", "GET /api/v1/api-keys",
                                   "POST /api/v1/devices/t1/readings", "GET /api/v1/readings/socket",
                                   "GET /api/v1/system/common/websocket/connect"])
@pytest_twisted.ensureDeferred
async def test_a_key_in_the_query_that_is_not_utf8_is_a_400_json_error(daemon, baseline, route):
    method, path = route.split()
    answer = await raw(daemon, f"{method} {path}?auth=%ff%fe HTTP/1.1".encode(), b"Connection: close",
                       b"Content-Type: application/json",
                       body=b'{"data": {}}' if method in ("PUT", "POST") else b"")
    assert_json_error(answer, 400, mentions="query parameter auth")
    await baseline.unchanged()


# -- item 3: poison in JSON bodies ------------------------------------------------------------

SURROGATE = '"\\ud800"'  # the JSON text a hostile client sends: a lone surrogate escape


@pytest.mark.parametrize("body,field", [
    ('{"name": ' + SURROGATE + '}', "name"),
    ('{"name": "ok", "tags": ["building-a", ' + SURROGATE + ']}', "tags[1]"),
    ('{"fields": {"serial": ' + SURROGATE + '}}', "fields.serial"),
    ('{"fields": {' + SURROGATE + ': 1}}', "fields.<key>"),
    ('{"fields": {"n": NaN}}', "fields.n"),
    ('{"host": "10.0.0.1", "ports": {"default": 1e400}}', "ports.default"),
])
@pytest_twisted.ensureDeferred
async def test_a_poisoned_device_is_422_naming_the_field_and_is_not_stored(daemon, baseline, body, field):
    for identifier in ("t1", "new-device"):  # replacing one, and creating one
        status, answer = await post_raw(daemon, "PUT", f"/api/v1/devices/{identifier}", body)
        assert status == 422 and answer["error"]["code"] == "invalid_body", answer
        assert answer["error"]["message"].startswith(field + ":"), answer
        assert "\ud800" not in answer["error"]["message"]
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_poisoned_stream_is_422_and_is_not_stored(daemon, baseline):
    status, answer = await post_raw(daemon, "PUT", "/api/v1/streams/s1", '{"devices": [' + SURROGATE + "]}")
    assert status == 422 and answer["error"]["message"].startswith("devices[0]:"), answer
    status, answer = await daemon.request("GET", "/api/v1/streams/s1")
    assert status == 404
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_poisoned_key_name_is_422_and_no_key_is_made(daemon, baseline):
    status, answer = await post_raw(daemon, "POST", "/api/v1/api-keys",
                                    '{"name": "x\\udc00", "role": "read_only"}')
    assert status == 422 and answer["error"]["message"].startswith("name:"), answer
    status, keys = await daemon.request("GET", "/api/v1/api-keys")
    assert status == 200 and all(k["name"] != "x\udc00" for k in keys["items"])
    await baseline.unchanged()


@pytest.mark.parametrize("body,field", [
    ('{"endpoint": "set_configuration.fcgi", "body": {"a": ' + SURROGATE + '}}', "body.a"),
    ('{"endpoint": "set_configuration.fcgi", "body": [1, Infinity]}', "body[1]"),
    ('{"endpoint": "set_configuration.fcgi", "body": ' + SURROGATE + '}', "body"),
])
@pytest_twisted.ensureDeferred
async def test_a_poisoned_command_body_is_422_and_nothing_is_queued(daemon, baseline, body, field):
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/commands", body)
    assert status == 422 and answer["error"]["message"].startswith(field + ":"), answer
    status, listed = await daemon.request("GET", "/api/v1/devices/t1/commands")
    assert status == 200 and listed["items"] == []
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_a_poisoned_link_request_is_422(daemon, baseline):
    status, answer = await post_raw(daemon, "POST", "/api/v1/devicelink/t1",
                                    '{"protocol": "tcp", "devicePort": 1, "source": {"host": '
                                    + SURROGATE + ', "port": 1}}')
    assert status == 422 and answer["error"]["message"].startswith("source.host:"), answer
    status, links = await daemon.request("GET", "/api/v1/devicelink")
    assert status == 200 and links["items"] == []
    await baseline.unchanged()


POISONED_READINGS = [
    ('{"data": {"t": NaN}}', "data.t"),
    ('{"data": {"t": Infinity}}', "data.t"),
    ('{"data": {"t": -Infinity}}', "data.t"),
    ('{"data": {"t": 1e400}}', "data.t"),
    ('{"data": {"t": -1' + "0" * 400 + '}}', "data.t"),  # an integer beyond a double
    ('{"data": {"t": 1' + "0" * 5000 + '}}', "data.t"),  # beyond Python's int() digit limit too
    ('{"data": {"t": ' + SURROGATE + '}}', "data.t"),
    ('{"data": {"list": [1, 2, "ok\\udfff"]}}', "data.list[2]"),
    ('{"data": {' + SURROGATE + ': 1}}', "data.<key>"),
    ('{"data": {"t": 1}, "meta": {"gw": ' + SURROGATE + '}}', "meta.gw"),
    ('{"data": {"t": 1}, "meta": {"rssi": NaN}}', "meta.rssi"),
    ('{"data": {"t": 1}, "location": {"type": "Point", "coordinates": [NaN, 1.0]}}', "location.coordinates[0]"),
    ('{"data": {"t": 1}, "location": {"type": "Point", "coordinates": [1e400, 1.0]}}', "location.coordinates[0]"),
    ('{"data": {"t": 1}, "measured_at": ' + SURROGATE + '}', "measured_at"),
    ('{"data": {"t": 1}, "packet_id": 1e400}', "packet_id"),
]


@pytest.mark.parametrize("body,field", POISONED_READINGS, ids=[f for _, f in POISONED_READINGS])
@pytest_twisted.ensureDeferred
async def test_a_poisoned_reading_is_422_naming_the_field_and_nothing_is_stored(daemon, baseline, body, field):
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", body)
    assert status == 422 and answer["error"]["code"] == "invalid_body", answer
    assert answer["error"]["message"].startswith(field + ":"), answer
    # in a batch, after good items: the item is named, and the good items are not stored either
    batch = '[{"data": {"ok": 1}}, {"data": {"ok": 2}}, ' + body + "]"
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", batch)
    assert status == 422 and answer["error"]["message"].startswith(f"item 2: {field}:"), answer
    await baseline.unchanged()


@pytest.mark.parametrize("body,field", [
    ('{"payload": {"v": NaN}, "payload_encoding": "json"}', "payload.v"),
    ('{"payload": [1, 2, 1e999]}', "payload[2]"),
    ('{"payload": ' + SURROGATE + ', "payload_encoding": "utf8"}', "payload"),
    ('{"payload": "0aff", "payload_encoding": "binary", "meta": {"gw": ' + SURROGATE + '}}', "meta.gw"),
    ('{"payload": "x", "interface": ' + SURROGATE + '}', "interface"),
])
@pytest_twisted.ensureDeferred
async def test_a_poisoned_packet_is_422_naming_the_field_and_nothing_is_stored(daemon, baseline, body, field):
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/packets", body)
    assert status == 422 and answer["error"]["message"].startswith(field + ":"), answer
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/packets", "[" + body + "]")
    assert status == 422 and answer["error"]["message"].startswith(f"item 0: {field}:"), answer
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_an_ota_report_with_a_poisoned_detail_is_422(daemon, baseline):
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/ota",
                                    '{"status": 1, "step": 1, "detail": ' + SURROGATE + "}")
    assert status == 422 and answer["error"]["message"].startswith("detail:"), answer
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_raw_utf8_encoded_surrogates_in_a_body_are_422_too(daemon, baseline):
    # b"\xed\xa0\x80" is how a lone surrogate looks when a client encodes it "as UTF-8"
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings",
                                    b'{"data": {"t": "\xed\xa0\x80"}}')
    assert status in (400, 422) and answer["error"]["code"] in ("invalid_json", "invalid_body"), answer
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_error_messages_never_echo_the_bad_value_and_cut_long_field_names(daemon, baseline):
    long_key = "k" * 5000
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings",
                                    '{"data": {"' + long_key + '": {"x": NaN}}}')
    assert status == 422, answer
    message = answer["error"]["message"]
    assert message.startswith("data." + "k" * 40 + "….x: "), message
    assert len(message) < 400, message
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings",
                                    '{"data": {"t": 123456789e400}}')
    assert status == 422 and "123456789" not in answer["error"]["message"], answer
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings",
                                    '{"data": {"t": 1}, "' + "z" * 5000 + '": 1}')
    assert status == 422 and len(answer["error"]["message"]) < 200, answer
    await baseline.unchanged()


@pytest_twisted.ensureDeferred
async def test_nesting_deeper_than_64_is_422_and_not_stored(daemon, baseline):
    def nested(depth: int) -> str:
        return '{"data": ' + '{"x": ' * depth + "1" + "}" * depth + "}"

    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", nested(900))
    assert status == 422 and "deeper than 64" in answer["error"]["message"], answer
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", nested(70))
    assert status == 422 and answer["error"]["message"].startswith("data.x.x"), answer
    await baseline.unchanged()
    status, answer = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", nested(60))
    assert status == 201, answer  # 62 levels with the body and data: within the limit


@pytest_twisted.ensureDeferred
async def test_a_reading_holds_at_most_1000_data_keys(daemon, baseline):
    status, answer = await daemon.request("POST", "/api/v1/devices/t1/readings",
                                          {"data": {f"k{i}": i for i in range(1001)}})
    assert status == 422 and "1000" in answer["error"]["message"], answer
    status, answer = await daemon.request("POST", "/api/v1/devices/t1/readings",
                                          [{"data": {"a": 1}}, {"data": {f"k{i}": i for i in range(1001)}}])
    assert status == 422 and answer["error"]["message"].startswith("item 1: data"), answer
    await baseline.unchanged()
    status, answer = await daemon.request("POST", "/api/v1/devices/t1/readings",
                                          {"data": {f"k{i}": i for i in range(1000)}})
    assert status == 201 and len(answer["data"]) == 1000


@pytest_twisted.ensureDeferred
async def test_good_non_ascii_text_and_big_finite_numbers_are_stored_as_sent(daemon, baseline):
    data = {"name": "Größe 😀", "big": 1.7976931348623157e308, "int": 2**1023, "neg": -1e-300,
            "ü-key": True}
    text = json.dumps({"data": data})[:-2] + ', "pair": "\\ud83d\\ude00"}}'  # a valid escaped pair
    status, body = await post_raw(daemon, "POST", "/api/v1/devices/t1/readings", text)
    assert status == 201 and body["data"] == {**data, "pair": "😀"}, body
    client = await Client.open(ws_url(daemon, "/api/v1/readings/socket", auth=daemon.admin_key,
                                      after=baseline.reading["inserted_at"]))
    try:
        assert await client.recv_json() == [{"event": "reading_added", "body": body}]
    finally:
        await client.close()


# -- the backstop: an answer never carries invalid JSON ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_answers_stay_valid_json_even_if_a_bad_value_got_past_the_door(daemon, baseline):
    # Bypass the REST door on purpose, as a bug elsewhere might.
    await daemon.ctx.registry.put("default", "evil", {"name": "x\ud800", "fields": {"n": float("nan")}})
    answer = await raw(daemon, b"GET /api/v1/devices HTTP/1.1", bearer(daemon), b"Connection: close")
    assert answer.status == 200, answer
    evil = [d for d in answer.json()["items"] if d["identifier"] == "EVIL"]
    assert evil and evil[0]["name"] == "x\ufffd" and evil[0]["fields"] == {"n": None}
    answer = await raw(daemon, b"GET /api/v1/devices/evil HTTP/1.1", bearer(daemon), b"Connection: close")
    assert answer.status == 200 and answer.json()["name"] == "x\ufffd", answer


@pytest_twisted.ensureDeferred
async def test_an_event_with_a_bad_value_that_got_past_the_door_is_stored_sendable(daemon, baseline):
    # Another writer (not REST ingest) appends an event holding poison: it is stored replaced.
    [event] = await daemon.ctx.events.append(
        [("default", "reading", "T1", {"data": {"t": float("inf"), "s": "a\udc80b"}, "meta": {}})])
    client = await Client.open(ws_url(daemon, "/api/v1/readings/socket", auth=daemon.admin_key,
                                      after=baseline.reading["inserted_at"]))
    try:
        [item] = await client.recv_json()
        assert item["body"]["id"] == event.id
        assert item["body"]["data"] == {"t": None, "s": "a\ufffdb"}
    finally:
        await client.close()
    [row] = [r for r in stored(daemon)["events"] if r[0] == event.id]
    assert strict_json(row[3].encode("utf-8"))["data"] == {"t": None, "s": "a\ufffdb"}
