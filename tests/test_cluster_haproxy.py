"""The README's cluster example works: etc/cluster/haproxy.cfg in front of two real nodes.

The HAProxy config is the file the README shows, with only its addresses
replaced by this test's free ports; the node configs parse as they are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from cluster_nodes import Nodes, Socket, wait_for
import daemon_process
from daemon_process import ROOT, free_port

from iotd import config as configmod

pytestmark = pytest.mark.postgresql_only
ETC = os.path.join(ROOT, "etc", "cluster")


def test_the_example_node_configs_are_valid():
    for name in ("a", "b"):
        cfg = configmod.load(os.path.join(ETC, f"node-{name}.ini"))
        assert cfg.cluster.node == name and cfg.cluster.bus.startswith("redis://")
        assert cfg.store.url.startswith("postgresql://")


class HAProxy:
    def __init__(self, workdir, a_port: int, b_port: int):
        self.port = free_port()
        with open(os.path.join(ETC, "haproxy.cfg")) as f:
            text = f.read()
        assert "127.0.0.1:8081" in text and "127.0.0.1:8082" in text and "bind 127.0.0.1:8080" in text
        text = (text.replace("127.0.0.1:8081", f"127.0.0.1:{a_port}")
                .replace("127.0.0.1:8082", f"127.0.0.1:{b_port}")
                .replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{self.port}"))
        self.cfg = os.path.join(str(workdir), "haproxy.cfg")
        with open(self.cfg, "w") as f:
            f.write(text)
        self.proc = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-db", "-f", self.cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, key: str | None = None):
        try:
            return daemon_process.request(self.url, method, path, body, key)
        except OSError:
            return None, None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_haproxy_in_front_spreads_requests_carries_websockets_and_leaves_out_a_dead_node(tmp_path):
    with Nodes(tmp_path) as nodes:
        proxy = HAProxy(tmp_path, nodes["a"].port, nodes["b"].port)
        try:
            key = nodes.admin_key
            wait_for(lambda: proxy.request("GET", "/healthz")[0] == 200, 10, "haproxy answers")
            seen = {proxy.request("GET", "/healthz")[1]["node"] for _ in range(6)}
            assert seen == {"a", "b"}  # round robin over both nodes
            assert proxy.request("PUT", "/api/v1/devices/hp1", {}, key=key)[0] == 201
            for name in ("a", "b"):  # a registry change reaches the other node over the bus (within 1 s)
                wait_for(lambda name=name: nodes[name].request("GET", "/api/v1/devices/HP1", key=key)[0] == 200,
                         1.0, f"{name} knows hp1")
            # Websockets through the proxy, on whichever node it picks: every event reaches both.
            sockets = [Socket(proxy, "/api/v1/devices/hp1/packets/socket", key) for _ in range(2)]
            time.sleep(0.3)
            acked = [proxy.request("POST", "/api/v1/devices/hp1/packets", {"payload": {"n": n}}, key=key)
                     for n in range(10)]
            assert all(status == 201 for status, _ in acked)
            for s in sockets:
                wait_for(lambda s=s: len(s.bodies()) == 10, 10, "10 events through haproxy")
                assert [b["id"] for b in s.bodies()] == [body["id"] for _, body in acked]
                s.close()
            # Node a dies: after the health checks mark it down, every request is answered by b.
            nodes.kill("a")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                answers = [proxy.request("GET", "/api/v1/devices/HP1", key=key)[0] for _ in range(4)]
                if answers == [200] * 4:
                    break
                time.sleep(0.5)
            assert answers == [200] * 4
            assert {proxy.request("GET", "/healthz")[1]["node"] for _ in range(4)} == {"b"}
        finally:
            proxy.stop()
