"""MQTT bench: devices publishing through a real Mosquitto into the real ``twistd iotd``.

Processes (all on loopback, started by :func:`run`): a private Mosquitto
(in memory, ``max_inflight_messages 1000``, unbounded queue); the daemon
(``twistd iotd`` with ``[mqtt] broker`` pointing at it, SQLite); a publisher
(``--publish``: one paho client as the device, QoS 1); a listener
(``--listen``): a websocket client on the device's readings socket (iotd), or
a plain paho subscriber of the device's topic (the peer: the broker alone).
Each message carries its sequence number and its send time (``time.time()``,
one clock for every process on the machine).

Rows (the peer gets exactly the same messages from the same publisher, in
the same run; rounds alternate iotd / peer; medians of 3 rounds, min-max):

* ``mqtt_ingest_qos1``: events/s from the first publish until the last
  message is in iotd's store (the newest reading over REST), N messages
  published as fast as the device's paho client goes (1,000 in flight);
  peer: Mosquitto delivering the same N to one plain QoS 1 subscriber --
  the broker alone, the ceiling.
* ``mqtt_ws_latency_p99``: ms from publish to the websocket frame at 1,000
  messages/s open loop (p50 beside it); peer: publish to the plain
  subscriber's on_message, same rate.

``python bench/mqtt.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import (Daemon, free_port, http, machine, median, percentile, spread,  # noqa: E402
                     stop_process, today)

PY = sys.executable
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEVICE = "BENCH-MQTT"
TOPIC = f"iotd/default/{DEVICE}/readings"


class Broker:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="iotd-bench-mqtt-")
        self.port = free_port()
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 1000\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # listening once a connect succeeds
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto does not listen on {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class Iotd(Daemon):
    """The real daemon (:class:`_common.Daemon`) as a client of ``broker``, with the bench's device."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(f"[mqtt]\nbroker = tcp:host=127.0.0.1:port={broker.port}\nclient_id = iotd-bench\n",
                         name="mqtt")
        self.start()
        deadline = time.monotonic() + 30
        while http("GET", self.url("/healthz"))[1].get("mqtt") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("iotd did not connect to the broker: " + self.tail())
            time.sleep(0.05)
        self.call("PUT", f"/api/v1/devices/{DEVICE}", {})

    def newest(self) -> int:
        items = self.call("GET", f"/api/v1/devices/{DEVICE}/readings?limit=1").get("items")
        return items[0]["data"]["n"] if items else -1


# -- the child programs ---------------------------------------------------------------


def publish_main(spec: dict) -> None:
    """The device: ``n`` QoS 1 messages, at ``rate``/s (0: as fast as paho goes); prints when it started."""
    from paho.mqtt import client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-device")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", spec["port"])
    client.loop_start()
    n, rate = spec["n"], spec["rate"]
    start = time.time()
    infos = []
    for i in range(n):
        if rate:
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        infos.append(client.publish(TOPIC, json.dumps({"data": {"n": i, "t": time.time()}}), qos=1))
    for info in infos:
        info.wait_for_publish(60)
    print(json.dumps({"start": start, "published": sum(1 for i in infos if i.is_published())}), flush=True)
    client.disconnect()
    client.loop_stop()


def listen_main(spec: dict) -> None:
    """Receive ``n`` messages (websocket or MQTT); print ``[(n, recv - sent)]`` and the last arrival."""
    n = spec["n"]
    got: dict[int, float] = {}
    last = [0.0]

    def take(data: dict) -> None:
        now = time.time()
        got.setdefault(data["n"], now - data["t"])
        last[0] = now

    if spec["kind"] == "ws":
        from websockets.sync.client import connect

        with connect(spec["url"], max_size=None, ping_interval=None, proxy=None) as ws:
            print("ready", flush=True)
            deadline = time.monotonic() + spec["timeout"]
            while len(got) < n and time.monotonic() < deadline:
                try:
                    frame = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                except TimeoutError:
                    break
                for event in frame if isinstance(frame, list) else [frame]:
                    take(event["body"]["data"])
    else:
        import threading

        from paho.mqtt import client as paho

        done = threading.Event()
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")

        def on_message(c: Any, u: Any, message: Any) -> None:
            take(json.loads(message.payload)["data"])
            if len(got) >= n:
                done.set()

        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect("127.0.0.1", spec["port"])
        client.loop_start()
        client.subscribe(TOPIC, qos=1)
        subscribed.wait(10)
        print("ready", flush=True)
        done.wait(spec["timeout"])
        client.loop_stop()
    print(json.dumps({"lat": [got[k] for k in sorted(got)], "last": last[0], "count": len(got)}), flush=True)


def _child(mode: str, spec: dict) -> subprocess.Popen:
    return subprocess.Popen([PY, __file__, mode, json.dumps(spec)], stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# -- one round -------------------------------------------------------------------------


def ingest_round(peer: bool, n: int) -> float:
    """Events/s: iotd (first publish -> last message committed) or the broker alone (-> last delivered)."""
    broker = Broker()
    iotd = None if peer else Iotd(broker)
    try:
        listener = None
        if peer:
            listener = _child("--listen", {"kind": "mqtt", "port": broker.port, "n": n, "timeout": 120})
            assert listener.stdout.readline().strip() == "ready"
        publisher = _child("--publish", {"port": broker.port, "n": n, "rate": 0})
        if peer:
            got = _result(listener)
            started = _result(publisher)["start"]
            assert got["count"] == n, f"the subscriber got {got['count']} of {n}"
            return n / (got["last"] - started)
        deadline = time.monotonic() + 120
        while iotd.newest() != n - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("iotd did not store every message")
            time.sleep(0.01)
        done = time.time()
        started = _result(publisher)["start"]
        return n / (done - started)
    finally:
        if iotd is not None:
            iotd.stop()
        broker.stop()


def latency_round(peer: bool, n: int, rate: int) -> dict:
    broker = Broker()
    iotd = None if peer else Iotd(broker)
    try:
        if peer:
            spec = {"kind": "mqtt", "port": broker.port, "n": n, "timeout": n / rate + 30}
        else:
            spec = {"kind": "ws", "n": n, "timeout": n / rate + 30,
                    "url": f"ws://127.0.0.1:{iotd.port}/api/v1/devices/{DEVICE}/readings/socket?auth={iotd.key}"}
        listener = _child("--listen", spec)
        assert listener.stdout.readline().strip() == "ready"
        publisher = _child("--publish", {"port": broker.port, "n": n, "rate": rate})
        _result(publisher)
        got = _result(listener)
        lat = [x * 1000 for x in got["lat"][n // 5:]]  # after a fifth of warm-up
        return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "count": got["count"]}
    finally:
        if iotd is not None:
            iotd.stop()
        broker.stop()


def run(quick: bool = False) -> list[dict]:
    rounds = 1 if quick else 3
    n_ingest = 3000 if quick else 10000
    rate, seconds = 1000, (3 if quick else 10)
    ingest: dict[str, list[float]] = {"iotd": [], "peer": []}
    lat: dict[str, list[dict]] = {"iotd": [], "peer": []}
    for _ in range(rounds):  # alternating, each on a fresh broker (and daemon)
        ingest["iotd"].append(ingest_round(False, n_ingest))
        ingest["peer"].append(ingest_round(True, n_ingest))
        lat["iotd"].append(latency_round(False, rate * seconds, rate))
        lat["peer"].append(latency_round(True, rate * seconds, rate))
    iotd_rate, peer_rate = median(ingest["iotd"]), median(ingest["peer"])
    p99 = {k: median(r["p99"] for r in v) for k, v in lat.items()}
    p50 = {k: median(r["p50"] for r in v) for k, v in lat.items()}
    stamp = {"machine": machine(), "date": today()}
    return [
        {**stamp, "name": "mqtt_ingest_qos1", "unit": "events/s", "iotd": round(iotd_rate),
         "peer_name": "mosquitto -> 1 subscriber (the broker alone)", "peer": round(peer_rate),
         "ratio": round(iotd_rate / peer_rate, 3), "messages": n_ingest, "runs": rounds,
         "spread": spread(ingest["iotd"]), "peer_spread": spread(ingest["peer"])},
        {**stamp, "name": "mqtt_ws_latency_p99", "unit": "ms", "iotd": round(p99["iotd"], 2),
         "peer_name": "mosquitto -> 1 subscriber (the broker alone)", "peer": round(p99["peer"], 2),
         "ratio": round(p99["peer"] / p99["iotd"], 3) if p99["iotd"] else None,
         "p50": round(p50["iotd"], 2), "peer_p50": round(p50["peer"], 2), "rate": rate,
         "messages": rate * seconds, "runs": rounds,
         "spread": spread([r["p99"] for r in lat["iotd"]]), "peer_spread": spread([r["p99"] for r in lat["peer"]])},
    ]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--publish":
        return publish_main(json.loads(sys.argv[2]))
    if len(sys.argv) > 2 and sys.argv[1] == "--listen":
        return listen_main(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
