"""kill -9 during concurrent ingest loses no acknowledged event and leaves a consistent store."""

import json
import signal
import threading
import time
import urllib.request

import dbutil
from daemon_process import DaemonProcess


def ingest_until(d, key, stop, acked, worker):
    n = 0
    while not stop.is_set():
        batch = [{"data": {"w": worker, "n": n + i}} for i in range(1 + n % 5)]
        body = json.dumps(batch if len(batch) > 1 else batch[0]).encode()
        req = urllib.request.Request(d.url + "/api/v1/devices/k9/readings", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                out = json.loads(resp.read())
                if resp.status == 201:
                    acked.extend(e["id"] for e in (out if isinstance(out, list) else [out]))
        except OSError:
            return  # the daemon died under us: whatever was not acknowledged may be lost
        n += len(batch)


def test_acknowledged_events_survive_kill_9(tmp_path):
    d = DaemonProcess(tmp_path).start()
    key = d.admin_key
    assert d.request("PUT", "/api/v1/devices/k9", {}, key=key)[0] == 201
    stop, acked = threading.Event(), []
    workers = [threading.Thread(target=ingest_until, args=(d, key, stop, acked, w)) for w in range(6)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    stop.set()
    for w in workers:
        w.join(10)
    assert len(acked) > 50, "the load did not get going"

    d2 = DaemonProcess(tmp_path, port=d.port).start()
    try:
        assert d2.admin_key == key
        conn = dbutil.connect(dbutil.target(tmp_path / "data" / "iotd.sqlite3"))
        try:
            if conn.dialect == "sqlite":
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = {row[0] for row in conn.execute("SELECT id FROM events")}
        finally:
            conn.close()
        missing = set(acked) - stored
        assert not missing, f"{len(missing)} acknowledged events lost"
        # and the daemon keeps working on the recovered store
        status, body = d2.request("POST", "/api/v1/devices/k9/readings", {"data": {"after": 1}}, key=key)
        assert status == 201 and body["id"] > max(acked)
    finally:
        assert d2.stop() == 0


def test_queued_and_sent_commands_survive_kill_9(tmp_path):
    ini = "[push]\ncommand_timeout = 600\n"
    d = DaemonProcess(tmp_path, ini).start()
    key = d.admin_key
    assert d.request("PUT", "/api/v1/devices/door", {"pushId": 99}, key=key)[0] == 201
    ids = [d.request("POST", "/api/v1/devices/door/commands", {"endpoint": "open_door", "body": {"n": n}}, key=key)[1]["id"]
           for n in range(3)]
    with urllib.request.urlopen(d.url + "/push?deviceId=99", timeout=10) as resp:
        assert json.loads(resp.read())["body"] == {"n": 0}  # answered only after "sent" was committed
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)

    d2 = DaemonProcess(tmp_path, ini, port=d.port).start()
    try:
        states = [d2.request("GET", f"/api/v1/commands/{i}", key=key)[1]["status"] for i in ids]
        assert states == ["sent", "queued", "queued"]
    finally:
        assert d2.stop() == 0
