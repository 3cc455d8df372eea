"""A private Mosquitto broker for a test (its own port, config and password file), and paho devices.

``Mosquitto(tmp_path).start()`` runs ``mosquitto -c <its config>`` on a free
127.0.0.1 port, in memory (nothing persists across :meth:`Mosquitto.stop`);
``users={"name": "password"}`` and ``acl="..."`` turn on a password file
(made with ``mosquitto_passwd``) and an ACL file.  ``Device`` is a real paho
client (its own network thread) publishing as a device would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from paho.mqtt import client as paho

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, workdir: Any, users: dict[str, str] | None = None, acl: str | None = None,
                 port: int | None = None, conf: str | None = None):
        self.dir = os.path.join(str(workdir), "mosquitto")
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        lines = [f"listener {self.port} 127.0.0.1", "persistence false",
                 # the broker queues what devices publish while iotd is away: not capped at 1,000
                 "max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100",
                 f"log_dest file {os.path.join(self.dir, 'mosquitto.log')}", "log_type error",
                 "log_type warning", "log_type notice"]
        if conf is not None:  # a given config (the README's), its paths and port made this test's own
            lines = [conf.replace("listener 1883", f"listener {self.port} 127.0.0.1")
                     .replace("/etc/mosquitto/passwd", os.path.join(self.dir, "passwd"))
                     .replace("/etc/mosquitto/iotd.acl", os.path.join(self.dir, "acl")),
                     f"persistence_location {self.dir}/",
                     f"log_dest file {os.path.join(self.dir, 'mosquitto.log')}"]
        if os.geteuid() == 0:
            lines.append("user root")  # (as root it would run as user mosquitto: the test's files are root's)
        if users:
            pwfile = os.path.join(self.dir, "passwd")
            open(pwfile, "w").close()
            for name, password in users.items():
                subprocess.run([PASSWD, "-b", pwfile, name, password], check=True, capture_output=True)
            os.chmod(pwfile, 0o600)
            if conf is None:
                lines += ["allow_anonymous false", f"password_file {pwfile}"]
        elif conf is None:
            lines.append("allow_anonymous true")
        if acl is not None:
            aclfile = os.path.join(self.dir, "acl")
            with open(aclfile, "w") as f:
                f.write(acl)
            os.chmod(aclfile, 0o600)
            if conf is None:
                lines.append(f"acl_file {aclfile}")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen: " + self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "mosquitto.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Device:
    """A paho client as a device: ``publish`` waits for the broker's PUBACK; ``received`` collects."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None,
                 will: tuple[str, bytes] | None = None, subscribe: str | None = None):
        self.received: list[tuple[str, bytes]] = []
        self.arrived = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311)
        if username:
            self.client.username_pw_set(username, password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if subscribe:
            self.client.subscribe(subscribe, qos=1)
            assert self._subscribed.wait(10), "no SUBACK"

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.arrived:
            self.received.append((message.topic, message.payload))
            self.arrived.notify_all()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, wait: bool = True) -> Any:
        info = self.client.publish(topic, payload, qos=qos)
        if wait:
            info.wait_for_publish(10)
            assert info.is_published(), f"broker did not acknowledge {topic}"
        return info

    def wait_received(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """Vanish without DISCONNECT (the broker publishes the will)."""
        self.client.loop_stop()
        self.client.socket().close()
