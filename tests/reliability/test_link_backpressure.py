"""A DeviceLink whose device stops reading slows the client; the daemon's memory stays flat."""

import socket
import threading
import time

from daemon_process import DaemonProcess


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_stalled_device_pushes_back_on_the_client(tmp_path):
    device = socket.socket()
    device.bind(("127.0.0.1", 0))
    device.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(device.accept()[0]), daemon=True).start()
    # The device is on loopback, which a link reaches only when allowed explicitly.
    d = DaemonProcess(tmp_path, extra="[devicelink]\nport_range = 31400-31409\n"
                                      "allowed_device_networks = 127.0.0.0/8\n").start()
    try:
        key = d.admin_key
        d.request("PUT", "/api/v1/devices/slow", {"host": "127.0.0.1", "ports": {"default": device.getsockname()[1]}}, key=key)
        status, link = d.request("POST", "/api/v1/devicelink/slow", {"protocol": "tcp"}, key=key)
        assert status == 201
        base = rss_kib(d.proc.pid)
        client = socket.create_connection(("127.0.0.1", link["port"]))
        client.settimeout(0.5)
        chunk = b"x" * (1 << 20)
        offered = sent = 0
        deadline = time.monotonic() + 20
        stalls = 0
        while offered < 300 * (1 << 20) and time.monotonic() < deadline:
            try:
                n = client.send(chunk)
                sent += n
                stalls = 0
            except socket.timeout:
                stalls += 1
                if stalls >= 4:  # two seconds without progress: the daemon pushed back
                    break
            offered += len(chunk)
        grown = rss_kib(d.proc.pid) - base
        # Kernel buffers on both legs hold a few MiB; the daemon holds a bounded amount more.
        assert sent < 64 * (1 << 20), f"{sent >> 20} MiB went in although the device reads nothing"
        assert stalls >= 4, "the client was never slowed down"
        assert grown < 48 * 1024, f"daemon RSS grew by {grown // 1024} MiB"
        assert d.request("GET", "/healthz")[0] == 200
        client.close()
    finally:
        d.stop()
        device.close()
        for s in accepted:
            s.close()
