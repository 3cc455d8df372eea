"""``GET /api/v1/openapi.json``: the document matches the route table, is valid OpenAPI 3.1,
and schemathesis finds nothing wrong with the live ``twistd iotd`` against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest_twisted
from openapi_spec_validator import validate

from daemon_process import DaemonProcess
from iotd.web.openapi_doc import document

SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")
EXAMPLES = 15
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def route_table(daemon) -> tuple[set[tuple[str, str]], set[str]]:
    """``({(METHOD, /path/{param})}, {websocket paths})`` from the live daemon's Klein app."""
    site = daemon.top.getServiceNamed("http-0").factory
    app = site.resource._app._app
    operations, sockets = set(), set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        if rule.endpoint.startswith("ws_"):
            sockets.add(path)
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operations.add((method, path))
    return operations, sockets


@pytest_twisted.ensureDeferred
async def test_the_document_covers_every_route_and_nothing_else(daemon):
    status, served = await daemon.request("GET", "/api/v1/openapi.json", key="")
    assert status == 200 and served == document()
    validate(served)  # OpenAPI 3.1, by openapi-spec-validator
    operations, sockets = route_table(daemon)
    documented = {(m.upper(), p) for p, ops in served["paths"].items() for m in ops}
    assert operations - documented == set(), "routes the document lacks"
    assert documented - operations == set(), "document entries without a route"
    assert set(served["x-websockets"]) == sockets
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{([^}]+)}", path)), (method, path)
            assert op["responses"], (method, path)


CONFIG = """
[dictionaries.devices]
values = ["GATE-01", "gate-02", "B-1"]
[dictionaries.tags]
values = ["north", "south"]
[dictionaries.streams]
values = ["s1"]
[parameters]
"path.identifier" = { dictionary = "devices", probability = 0.6 }
"path.tag" = { dictionary = "tags", probability = 0.6 }
"path.stream_id" = { dictionary = "streams", probability = 0.6 }
"""


def seed(d: DaemonProcess) -> None:
    """Devices, a stream, events and a command for schemathesis to find (else most cases are 404s)."""
    key = d.admin_key
    for ident, tags in (("GATE-01", ["north"]), ("GATE-02", ["north", "south"]), ("B-1", ["south"])):
        status, _ = d.request("PUT", f"/api/v1/devices/{ident}", {"tags": tags, "host": "192.0.2.10",
                                                                 "ports": {"default": 502}}, key=key)
        assert status == 201
        status, _ = d.request("POST", f"/api/v1/devices/{ident}/packets", [{"payload": {"n": n}} for n in range(30)], key=key)
        assert status == 201
        status, _ = d.request("POST", f"/api/v1/devices/{ident}/readings", [{"data": {"t": n}} for n in range(30)], key=key)
        assert status == 201
    assert d.request("PUT", "/api/v1/streams/s1", {"devices": ["B-1"], "tags": ["north"]}, key=key)[0] == 201
    assert d.request("POST", "/api/v1/devices/GATE-01/commands", {"endpoint": "reboot"}, key=key)[0] == 201


def operations_of(har: dict, document: dict) -> dict[tuple[str, str], int]:
    """How many requests the HAR holds per documented operation."""
    patterns = []
    for path, ops in document["paths"].items():
        regex = re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path)) + "$")
        patterns.extend(((m.upper(), path), regex) for m in ops)
    patterns.sort(key=lambda p: p[0][1].count("{"))  # literal paths before templated ones
    counts = {op: 0 for op, _ in patterns}
    for entry in har["log"]["entries"]:
        method, path = entry["request"]["method"], urlsplit(entry["request"]["url"]).path
        for op, regex in patterns:
            if op[0] == method and regex.match(path):
                counts[op] += 1
                break
    return counts


def test_schemathesis_finds_nothing_against_the_live_daemon(tmp_path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    har_path, json_path = tmp_path / "run.har", tmp_path / "run.json"
    with DaemonProcess(tmp_path) as d:
        seed(d)
        out = subprocess.run(
            [SCHEMATHESIS, "--config-file", str(config), "run", f"{d.url}/api/v1/openapi.json",
             "--checks", CHECKS, "--max-examples", str(2 * EXAMPLES),
             "--header", f"Authorization: Bearer {d.admin_key}", "--no-color", "--seed", "1",
             "--report", "har,json", "--report-har-path", str(har_path), "--report-json-path", str(json_path)],
            capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
        report = out.stdout + out.stderr
        assert out.returncode == 0, report[-20000:]
        assert "failed" not in report.split("SUMMARY")[-1], report[-5000:]
        assert "Traceback" not in d.log(), d.log()[-5000:]
    doc = document()
    tested = set(json.loads(json_path.read_text())["valid_rates"])
    # schemathesis leaves out the document's own URL (the first test checks that one)
    assert tested == {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops} - {
        "GET /api/v1/openapi.json"}
    # Operations without any input (no parameter, no body) have one possible request; every
    # other operation got at least EXAMPLES requests.
    counts = operations_of(json.loads(har_path.read_text()), doc)
    with_input = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
                  if op.get("parameters") or op.get("requestBody")}
    low = {op: n for op, n in counts.items() if op in with_input and n < EXAMPLES}
    assert not low, low
