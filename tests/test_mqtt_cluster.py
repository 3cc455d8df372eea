"""Several nodes on one broker: a shared subscription, so each message is ingested by exactly one node."""

from __future__ import annotations

import json

import pytest

from cluster_nodes import Nodes, wait_for
from mosquitto import Device, Mosquitto
from test_mqtt_twistd import stored_readings

pytestmark = pytest.mark.postgresql_only  # several nodes share a PostgreSQL store


def stored_count(node) -> float:
    status, text = node.request_text("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith('iotd_mqtt_messages_total{outcome="stored"}'):
            return float(line.split()[-1])
    return 0.0


def test_two_nodes_share_the_subscription_and_store_each_message_once(tmp_path):
    with Mosquitto(tmp_path) as broker, Nodes(tmp_path, extra=f"[mqtt]\nbroker = {broker.endpoint}\n") as nodes:
        a, b = nodes["a"], nodes["b"]
        for node in (a, b):  # each its own session: iotd-a, iotd-b
            wait_for(lambda: node.request("GET", "/healthz")[1].get("mqtt") == "ok", 20, "node connected")
        assert a.request("PUT", "/api/v1/devices/SHARED-1", {}, key=nodes.admin_key)[0] == 201
        wait_for(lambda: b.request("GET", "/api/v1/devices/SHARED-1", key=nodes.admin_key)[0] == 200, 10,
                 "the device known to node b")
        dev = Device(broker.port, "SHARED-1")
        infos = [dev.publish("iotd/default/SHARED-1/readings", json.dumps({"data": {"n": n}}), 1, wait=False)
                 for n in range(200)]
        for info in infos:
            info.wait_for_publish(20)
        wait_for(lambda: len(stored_readings(a, "SHARED-1")) >= 200, 30, "every reading stored")
        got = stored_readings(a, "SHARED-1")
        assert sorted(got) == list(range(200))  # once each
        assert stored_count(a) > 0 and stored_count(b) > 0 and stored_count(a) + stored_count(b) == 200
        dev.close()
