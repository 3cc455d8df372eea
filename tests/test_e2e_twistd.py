"""The real ``twistd iotd`` process: start, serve, bad config, SIGTERM."""

import json
import os
import signal
import subprocess
import sys

import dbutil
from daemon_process import ROOT, TWISTD, DaemonProcess


def test_daemon_serves_and_stops_cleanly_on_sigterm(tmp_path):
    d = DaemonProcess(tmp_path).start()
    try:
        status, body = d.request("GET", "/healthz")
        assert status == 200 and body["status"] == "ok"
        key = d.admin_key
        assert key not in d.log()  # the key is never logged, only the path
        assert "admin.key" in d.log()
        status, _ = d.request("PUT", "/api/v1/devices/e2e", {"tags": ["t"]}, key=key)
        assert status == 201
        status, stored = d.request("POST", "/api/v1/devices/e2e/readings", {"data": {"v": 1}}, key=key)
        assert status == 201
    finally:
        code = d.stop(signal.SIGTERM)
    assert code == 0
    # Data survives; the bootstrap key is not replaced on the next start.
    d2 = DaemonProcess(tmp_path, port=d.port).start()
    try:
        assert d2.admin_key == key
        status, body = d2.request("GET", "/api/v1/devices/E2E", key=key)
        assert status == 200 and body["tags"] == ["t"]
        # The acknowledged reading is replayed after the restart: same id, same body.
        assert replay_readings(d2, "e2e", key) == [stored]
    finally:
        assert d2.stop() == 0


def replay_readings(d: DaemonProcess, device: str, key: str) -> list[dict]:
    """The bodies a reading socket replays from the beginning (its first frame)."""
    from websockets.sync.client import connect

    url = (d.url.replace("http://", "ws://") + f"/api/v1/devices/{device}/readings/socket"
           f"?auth={key}&after=1970-01-01T00:00:00Z")
    with connect(url, open_timeout=10, close_timeout=2, proxy=None) as ws:
        return [event["body"] for event in json.loads(ws.recv(10))]


def test_bad_config_exits_nonzero_with_one_line(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[http]\nlisten = tcp:0\nbogus = 1\n")
    out = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", str(ini)], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert lines == [f"iotd: config error: {ini}: [http] bogus: unknown key"]


def test_busy_port_aborts_start(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = DaemonProcess(tmp_path, port=port)
        out = subprocess.run([TWISTD, "--nodaemon", "--pidfile=", "iotd", "-c", d.ini], cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Address already in use" in out.stdout + out.stderr


def test_admin_cli_is_installed(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "iotd-admin")
    ini = tmp_path / "i.ini"
    ini.write_text(f"[iotd]\ndata_dir = {tmp_path / 'data'}\n" + dbutil.store_ini(tmp_path / "data"))
    out = subprocess.run([exe, "-c", str(ini), "key", "create", "--role", "read_only"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and len(out.stdout.strip()) == 64
    out = subprocess.run([exe, "-c", str(ini), "backup", str(tmp_path / "copy.sqlite3")],
                         capture_output=True, text=True, timeout=60)
    if dbutil.current() == "postgresql":  # a PostgreSQL store is backed up with its own tool
        assert out.returncode == 2 and "pg_dump" in out.stderr and len(out.stderr.splitlines()) == 1
        assert not (tmp_path / "copy.sqlite3").exists()
        return
    assert out.returncode == 0
    import sqlite3

    conn = sqlite3.connect(tmp_path / "copy.sqlite3")
    assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1
