"""DeviceLink across two real ``twistd iotd`` nodes (one PostgreSQL database, one Redis).

A link made on node a is listed by node b with its node, and deleted through b (a's port
closes); a node killed with SIGKILL loses its links from b's listing within 30 s.
(In one process: tests/test_devicelink_cluster.py.)
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cluster_nodes import Nodes, wait_for

pytestmark = pytest.mark.postgresql_only

EXTRA = "allowed_device_networks = 127.0.0.0/8\nport_range = 31340-31359\n"


class EchoServer:
    """A TCP echo device on 127.0.0.1 in a thread."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self):
        self.sock.close()


def listing(node, key):
    status, body = node.request("GET", "/api/v1/devicelink", key=key)
    assert status == 200, body
    return body["items"]


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def test_a_link_made_on_a_is_listed_by_b_and_deleted_through_b(tmp_path, echo):
    with Nodes(tmp_path, extra=EXTRA) as nodes:
        key = nodes.admin_key
        a, b = nodes["a"], nodes["b"]
        assert a.request("PUT", "/api/v1/devices/plc", {"host": "127.0.0.1", "ports": {"default": echo.port}},
                         key=key)[0] == 201
        status, link = a.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=key)
        assert status == 201 and link["node"] == "a" and link["host"] == "a.example"
        client = socket.create_connection(("127.0.0.1", link["port"]), timeout=5)
        try:
            client.sendall(b"through a")
            assert client.recv(100) == b"through a"
            items = listing(b, key)  # the create answer came after the row's commit
            assert [(i["token"], i["node"], i["host"], i["port"]) for i in items] == [
                (link["token"], "a", "a.example", link["port"])]
            status, one = b.request("GET", f"/api/v1/devicelink/{link['token']}", key=key)
            assert status == 200 and one["node"] == "a"
            # b's own link is listed by both, each with its node.
            status, mine = b.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"}, key=key)
            assert status == 201 and mine["node"] == "b"
            for node in (a, b):
                assert sorted((i["token"], i["node"]) for i in listing(node, key)) == sorted(
                    [(link["token"], "a"), (mine["token"], "b")])
            assert b.request("DELETE", f"/api/v1/devicelink/{link['token']}", key=key)[0] == 204
            client.settimeout(5)
            try:
                got = client.recv(100)
            except ConnectionResetError:
                got = b""
            assert got == b""  # a closed the client's connection
        finally:
            client.close()
        with pytest.raises(ConnectionRefusedError):  # a's link port is closed
            socket.create_connection(("127.0.0.1", link["port"]), timeout=5).close()
        for node in (a, b):
            assert [i["token"] for i in listing(node, key)] == [mine["token"]]
        assert b.request("DELETE", f"/api/v1/devicelink/{link['token']}", key=key)[0] == 404
        assert a.request("DELETE", f"/api/v1/devicelink/{mine['token']}", key=key)[0] == 204
        assert listing(a, key) == [] and listing(b, key) == []




def test_a_killed_nodes_links_leave_the_listing_within_30_s(tmp_path, echo):
    with Nodes(tmp_path, extra=EXTRA) as nodes:
        key = nodes.admin_key
        a, b = nodes["a"], nodes["b"]
        assert a.request("PUT", "/api/v1/devices/plc", {"host": "127.0.0.1", "ports": {"default": echo.port}},
                         key=key)[0] == 201
        status, link = a.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=key)
        assert status == 201
        status, mine = b.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"}, key=key)
        assert status == 201
        assert len(listing(b, key)) == 2
        nodes.kill("a")
        killed = time.monotonic()
        wait_for(lambda: [i["token"] for i in listing(b, key)] == [mine["token"]], 30,
                 "a's link leaves b's listing", every=0.5)
        assert time.monotonic() - killed <= 30
        assert b.request("GET", f"/api/v1/devicelink/{link['token']}", key=key)[0] == 404
        assert b.request("DELETE", f"/api/v1/devicelink/{link['token']}", key=key)[0] == 404
        # A restarted a deletes its stale row and lists b's link.
        a.start()
        nodes.wait_all_up()
        assert [(i["token"], i["node"]) for i in listing(a, key)] == [(mine["token"], "b")]
