"""TLS: an ``ssl:`` endpoint serves HTTPS, checked by a client that verifies a test CA
with service-identity (Twisted's ``optionsForClientTLS``)."""

import datetime
import json

import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from conftest import make_config, start_daemon, stop_daemon
from daemon_process import free_port


def make_ca_and_cert(tmp_path):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iotd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca.public_bytes(serialization.Encoding.PEM)


@pytest_twisted.ensureDeferred
async def test_https_with_verified_test_ca(tmp_path):
    ca_pem = make_ca_and_cert(tmp_path)
    port = free_port()
    cfg = make_config(tmp_path, {"http": {
        "listen": f"ssl:{port}:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"}})
    d = await start_daemon(cfg)
    try:
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca_pem))
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy))
        resp = await client.get(f"https://localhost:{port}/healthz")
        assert resp.code == 200
        assert json.loads(await resp.content())["status"] == "ok"
        resp = await client.get(f"https://localhost:{port}/api/v1/devices",
                                headers={"Authorization": f"Bearer {d.admin_key}"})
        assert resp.code == 200
        # A client that trusts another CA refuses the server.
        (tmp_path / "other").mkdir()
        other = make_ca_and_cert(tmp_path / "other")
        strict = treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(
            trustRoot=ssl.Certificate.loadPEM(other))))
        try:
            await strict.get(f"https://localhost:{port}/healthz")
            refused = False
        except Exception:
            refused = True
        assert refused
    finally:
        await stop_daemon(d)
