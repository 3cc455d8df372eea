"""Keys never reach a log; a key is found by its SHA-256 digest, which is all the store holds."""

import hashlib
import dbutil

import pytest_twisted
from daemon_process import DaemonProcess

from iotd.auth import hash_key


def test_keys_never_appear_in_the_log(tmp_path):
    d = DaemonProcess(tmp_path).start()
    try:
        key = d.admin_key
        status, body = d.request("POST", "/api/v1/api-keys", {"name": "second", "role": "read_only"}, key=key)
        second = body["key"]
        d.request("GET", f"/api/v1/devices?auth={key}")
        d.request("GET", f"/api/v1/devices?token={second}")
        d.request("GET", f"/api/v1/devices?auth={'a' * 64}")  # a wrong key is not logged either
        d.request("GET", "/api/v1/devices", key=second)
    finally:
        d.stop()
    log = d.log()
    assert "GET /api/v1/devices?auth=REDACTED" in log
    for secret in (key, second, "a" * 64, hash_key(key)):
        assert secret not in log


@pytest_twisted.ensureDeferred
async def test_a_key_is_found_by_its_sha256_digest_which_is_all_the_store_holds(daemon):
    status, body = await daemon.request("POST", "/api/v1/api-keys", {"name": "probe", "role": "read_only"})
    key, key_id = body["key"], body["id"]
    conn = dbutil.connect(daemon.ctx.config)
    try:
        row = conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    finally:
        conn.close()
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()
    assert digest in row
    assert not any(isinstance(v, str) and key in v.lower() for v in row)
    assert (await daemon.request("GET", "/api/v1/devices", key=key))[0] == 200
    assert (await daemon.request("GET", "/api/v1/devices", key=key.upper()))[0] == 200
    for i in (0, 31, 63):  # one hex digit off anywhere
        wrong = key[:i] + ("0" if key[i] != "0" else "1") + key[i + 1:]
        assert (await daemon.request("GET", "/api/v1/devices", key=wrong))[0] == 401
    for bad in (digest, key[:63], key + "0", "g" + key[1:], key[:32]):  # the digest itself is no key
        status, body = await daemon.request("GET", "/api/v1/devices", key=bad)
        assert status == 401 and body["error"]["code"] == "unauthorized"
