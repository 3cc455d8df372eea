"""Keys never reach a log; keys are compared by hash in constant time."""

import hmac

from daemon_process import DaemonProcess

from iotd.auth import KeyRing, hash_key


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


class _Clock:
    def seconds(self):
        return 1000.0


def test_lookup_compares_hashes_in_constant_time(monkeypatch):
    ring = KeyRing(store=None, clock=_Clock())
    secret = "ab" * 32
    ring._apply(1, [{"id": "k1", "tenant": "t", "name": "n", "role": "admin", "groups": [],
                     "permissions": [], "key_hash": hash_key(secret), "created_at": 0, "expires_at": None}])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert ring.authenticate(secret).id == "k1"
    assert calls == [(hash_key(secret), hash_key(secret))]
    assert ring.authenticate("cd" * 32) is None
    assert ring.authenticate("not hex") is None
