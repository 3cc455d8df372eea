"""A restart of the real ``twistd iotd`` keeps queued and sent commands."""

from __future__ import annotations

import json
import signal
import urllib.request

from daemon_process import DaemonProcess


def device_call(d: DaemonProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(d.url + path, data=body, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


def test_restart_keeps_queued_and_sent_commands(tmp_path):
    ini = "[push]\ncommand_timeout = 600\n"
    d = DaemonProcess(tmp_path, ini).start()
    try:
        key = d.admin_key
        assert d.request("PUT", "/api/v1/devices/gate", {"pushId": 478435}, key=key)[0] == 201
        ids = []
        for n in range(3):
            status, body = d.request("POST", "/api/v1/devices/gate/commands",
                                     {"endpoint": "load_objects", "body": {"n": n}}, key=key)
            assert status == 201
            ids.append(body["id"])
        status, raw = device_call(d, "GET", "/push?deviceId=478435&uuid=abc")
        assert status == 200 and json.loads(raw) == {"endpoint": "load_objects", "body": {"n": 0}}
    finally:
        assert d.stop(signal.SIGTERM) == 0

    d2 = DaemonProcess(tmp_path, ini, port=d.port).start()  # same data_dir, same config
    try:
        states = [d2.request("GET", f"/api/v1/commands/{i}", key=key)[1] for i in ids]
        assert [(c["status"], c["attempts"]) for c in states] == [("sent", 1), ("queued", 0), ("queued", 0)]
        assert states[0]["sentAt"] is not None
        # The sent one is still in flight (command_timeout 600 s): nothing new goes out ...
        assert device_call(d2, "GET", "/push?deviceId=478435") == (200, b"")
        # ... its result is accepted after the restart, and the next command follows.
        status, raw = device_call(d2, "POST", "/result?deviceId=478435&endpoint=load_objects",
                                  json.dumps({"response": json.dumps({"ok": 1})}).encode())
        assert (status, raw) == (200, b"")
        done = d2.request("GET", f"/api/v1/commands/{ids[0]}", key=key)[1]
        assert done["status"] == "done" and done["response"] == {"ok": 1}
        status, raw = device_call(d2, "GET", "/push?deviceId=478435")
        assert json.loads(raw) == {"endpoint": "load_objects", "body": {"n": 1}}
    finally:
        assert d2.stop(signal.SIGTERM) == 0
