"""``[mqtt] broker`` as TLS (with trustRoots) and as a unix socket, against a real Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import pytest_twisted

from conftest import make_config, start_daemon, stop_daemon
from mosquitto import Mosquitto, free_port
from push_helpers import LogLines
from ws_helpers import eventually, in_thread, until


def make_ca_and_server(folder) -> tuple[str, str, str]:
    """A CA and a server certificate for localhost / 127.0.0.1 (openssl)."""
    ca_key, ca, key, csr, cert = (os.path.join(folder, n) for n in ("ca.key", "ca.pem", "server.key",
                                                                     "server.csr", "server.pem"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=iotd test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext = os.path.join(folder, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", ext)
    return ca, cert, key


async def one_reading_arrives(daemon, broker_port: int, identifier: str) -> None:
    from mosquitto import Device

    await daemon.put_device(identifier)
    await eventually(lambda: daemon.top.getServiceNamed("mqtt").state == "ok", timeout=15)
    dev = await in_thread(Device, broker_port, identifier)
    try:
        await in_thread(dev.publish, f"iotd/default/{identifier}/readings", json.dumps({"data": {"via": 1}}))
        async def stored():
            return (await daemon.request("GET", f"/api/v1/devices/{identifier}/readings?limit=5"))[1]["items"]

        assert [r["data"] for r in await until(stored, bool)] == [{"via": 1}]
    finally:
        await in_thread(dev.close)


@pytest.fixture
def tls_broker(tmp_path):
    ca, cert, key = make_ca_and_server(str(tmp_path))
    broker = Mosquitto(tmp_path)
    tls_port = free_port()
    with open(broker.conf, "a") as f:  # a second listener: TLS (the plain one is for the test's device)
        f.write(f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n")
    with broker:
        yield broker, tls_port, ca


@pytest_twisted.ensureDeferred
async def test_a_tls_broker_with_trust_roots(tmp_path, tls_broker):
    broker, tls_port, ca = tls_broker
    daemon = await start_daemon(make_config(tmp_path, {"mqtt": {
        "broker": f"tls:host=localhost:port={tls_port}:trustRoots={ca}", "client_id": "iotd-tls"}}))
    try:
        await one_reading_arrives(daemon, broker.port, "TLS-1")
    finally:
        await stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_a_tls_broker_iotd_does_not_trust_is_not_used(tmp_path, tls_broker):
    broker, tls_port, _ = tls_broker
    with LogLines() as log:
        daemon = await start_daemon(make_config(tmp_path, {"mqtt": {
            "broker": f"tls:host=localhost:port={tls_port}", "client_id": "iotd-untrusted"}}))  # system roots
        try:
            await eventually(lambda: any("mqtt: cannot connect to tls:localhost" in line
                                         and "certificate verify failed" in line for line in log.lines), timeout=15)
            status, body = await daemon.request("GET", "/healthz")
            assert status == 200 and body["mqtt"] != "ok"
        finally:
            await stop_daemon(daemon)


@pytest_twisted.ensureDeferred
async def test_a_broker_on_a_unix_socket(tmp_path):
    path = os.path.join(str(tmp_path), "mqtt.sock")
    broker = Mosquitto(tmp_path)
    with open(broker.conf, "a") as f:
        f.write(f"listener 0 {path}\n")
    with broker:
        daemon = await start_daemon(make_config(tmp_path, {"mqtt": {"broker": f"unix:path={path}",
                                                                    "client_id": "iotd-unix"}}))
        try:
            await one_reading_arrives(daemon, broker.port, "UNIX-1")
        finally:
            await stop_daemon(daemon)
