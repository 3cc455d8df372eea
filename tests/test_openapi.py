"""``GET /api/v1/openapi.json``: the document matches the route table, is valid OpenAPI 3.1,
and schemathesis finds nothing wrong with the live ``twistd iotd`` against it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def test_schemathesis_finds_nothing_against_the_live_daemon(tmp_path):
    with DaemonProcess(tmp_path) as d:
        out = subprocess.run(
            [SCHEMATHESIS, "run", f"{d.url}/api/v1/openapi.json", "--checks", CHECKS,
             "--max-examples", str(EXAMPLES), "--header", f"Authorization: Bearer {d.admin_key}",
             "--no-color", "--seed", "1"],
            capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
        report = out.stdout + out.stderr
        assert out.returncode == 0, report[-20000:]
        assert "No issues found" in report or "passed" in report, report[-5000:]
