"""DeviceLink across nodes, in one process: rows in the store, the merged listing, the liveness
filter, stale rows at start, dead nodes' rows, and the close forwarded over the bus.

(Two real nodes over Redis: tests/test_devicelink_nodes.py.)
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock

from conftest import make_config, start_daemon, stop_daemon
from iotd.cluster.node import single
from iotd.relay.forward import CloseForwarder, CloseTimeout
from iotd.relay.link import Link
from iotd.relay.reaper import DeadNodeReaper
from iotd.relay.rows import LinkRows
from iotd.store import links as linksql
from iotd.store import nodes as nodesql
from iotd.store import open_sync, run_in_transaction


@pytest.fixture
def daemon_config():
    return {"devicelink": {"port_range": "31320-31329", "allowed_device_networks": "127.0.0.0/8",
                           "public_host": "here.example"}}


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@pytest.fixture
def echo_server():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def remote_doc(token, node, device="PLC", port=40001):
    return {"token": token, "device": device, "protocol": "tcp", "port": port, "devicePort": 502,
            "timeout": 0, "source": None, "encrypted": False, "createdAt": "2024-01-01T00:00:00.000Z",
            "lastActivity": "2024-01-01T00:00:00.000Z", "bytesUp": 7, "bytesDown": 9, "node": node,
            "host": f"{node}.example"}


async def put_row(d, token, node, tenant="default", created_us=1):
    await d.ctx.store.write(linksql.upsert, [(token, node, tenant, created_us, remote_doc(token, node))])


async def make_alive(d, node, seen=None):
    """A heartbeat row of ``node`` (fresh by default), and this daemon's heartbeat reads it."""
    await d.ctx.store.write(nodesql.beat, node, 1, int((seen or time.time()) * 1e6), True, {})
    await d.top.getServiceNamed("core").heartbeat.beat()


def row(d, token):
    return d.ctx.store.read(linksql.get, token)


# -- rows of this node's links ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_link_has_a_row_from_its_create_answer_until_its_delete(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    key = "ab" * 32
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {
        "protocol": "tcp", "encrypt": {"key": key, "initializationVector": "cd" * 16}})
    assert status == 201 and link["node"] == daemon.ctx.cluster.node and link["host"] == "here.example"
    found = await row(daemon, link["token"])  # committed before the answer
    assert found is not None
    (token, node, tenant, created_us, doc), _seen = found
    assert (token, node, tenant) == (link["token"], daemon.ctx.cluster.node, "default")
    assert doc["node"] == node and doc["port"] == link["port"] and doc["host"] == "here.example"
    assert key not in json.dumps(doc) and "encrypt" not in doc and doc["encrypted"] is True
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert [(i["token"], i["node"]) for i in listing["items"]] == [(link["token"], node)]
    status, one = await daemon.request("GET", f"/api/v1/devicelink/{link['token']}")
    assert status == 200 and one["token"] == link["token"] and one["node"] == node
    assert (await daemon.request("DELETE", f"/api/v1/devicelink/{link['token']}"))[0] == 204
    assert await row(daemon, link["token"]) is None  # deleted before the answer
    assert (await daemon.request("GET", f"/api/v1/devicelink/{link['token']}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_a_link_that_closes_by_itself_loses_its_row(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "udp"})
    assert status == 201 and await row(daemon, link["token"]) is not None
    status, _ = await daemon.request("DELETE", "/api/v1/devices/plc")
    assert status == 204
    for _ in range(100):
        if await row(daemon, link["token"]) is None:
            break
        await deferLater(0.02)
    assert await row(daemon, link["token"]) is None


def deferLater(seconds):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_starting_node_deletes_its_own_stale_rows_and_keeps_others(tmp_path):
    cfg = make_config(tmp_path, {"cluster": {"node": "n1"}})
    conn = open_sync(cfg)
    try:
        run_in_transaction(conn, linksql.upsert, [("stale-own", "n1", "default", 1, remote_doc("stale-own", "n1")),
                                                  ("theirs", "n2", "default", 2, remote_doc("theirs", "n2"))])
    finally:
        conn.close()
    d = await start_daemon(cfg)
    try:
        assert await row(d, "stale-own") is None
        assert (await row(d, "theirs"))[0][1] == "n2"
    finally:
        await stop_daemon(d)


# -- the listing of every live node ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listing_merges_live_nodes_rows_and_hides_dead_nodes(daemon, echo_server):
    daemon.ctx.cluster.clustered = True  # (as with a bus: other nodes' rows are read)
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    status, mine = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"})
    assert status == 201
    await put_row(daemon, "t-live", "other", created_us=1)
    await put_row(daemon, "t-dead", "ghost", created_us=2)
    await put_row(daemon, "t-tenant", "other", tenant="elsewhere", created_us=3)
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert [i["token"] for i in listing["items"]] == [mine["token"]]  # "other" is not alive yet
    await make_alive(daemon, "other")
    await make_alive(daemon, "ghost", seen=time.time() - 60)  # its heartbeat is old: dead
    assert daemon.ctx.cluster.alive("other") and not daemon.ctx.cluster.alive("ghost")
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    got = [(i["token"], i["node"]) for i in listing["items"]]
    assert got == [("t-live", "other"), (mine["token"], daemon.ctx.cluster.node)]  # oldest first
    assert listing["items"][0]["bytesUp"] == 7 and listing["items"][0]["host"] == "other.example"
    status, one = await daemon.request("GET", "/api/v1/devicelink/t-live")
    assert status == 200 and one["node"] == "other"
    assert (await daemon.request("GET", "/api/v1/devicelink/t-dead"))[0] == 404
    assert (await daemon.request("GET", "/api/v1/devicelink/t-tenant"))[0] == 404
    assert (await daemon.request("DELETE", "/api/v1/devicelink/t-dead"))[0] == 404
    # A key of the other tenant sees its link only; a group key only its groups' devices.
    other = await daemon.new_key("admin", tenant="elsewhere")
    status, listing = await daemon.request("GET", "/api/v1/devicelink", key=other)
    assert [i["token"] for i in listing["items"]] == ["t-tenant"]
    await daemon.put_device("tagged", host="127.0.0.1", ports={"default": 1}, tags=["g1"])
    await daemon.ctx.store.write(linksql.upsert, [("t-tagged", "other", "default", 4,
                                                   remote_doc("t-tagged", "other", device="TAGGED"))])
    grouped = await daemon.new_key("group", groups=["g1"], permissions=["deviceLink:read", "deviceLink:delete"])
    status, listing = await daemon.request("GET", "/api/v1/devicelink", key=grouped)
    assert status == 200 and [i["token"] for i in listing["items"]] == ["t-tagged"]
    assert (await daemon.request("GET", "/api/v1/devicelink/t-live", key=grouped))[0] == 404
    assert (await daemon.request("DELETE", "/api/v1/devicelink/t-live", key=grouped))[0] == 404
    assert (await daemon.request("GET", "/api/v1/devicelink/t-tagged", key=grouped))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_row_of_this_node_without_its_link_is_not_listed(daemon):
    daemon.ctx.cluster.clustered = True
    await put_row(daemon, "t-stale", daemon.ctx.cluster.node)
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert listing["items"] == []
    assert (await daemon.request("GET", "/api/v1/devicelink/t-stale"))[0] == 404


# -- DELETE of another node's link, forwarded ------------------------------------------


class FakeOwner:
    """Plays node ``other`` on the daemon's channel: answers close requests (or not)."""

    def __init__(self, d, result="closed"):
        self.channel = d.ctx.cluster.channel
        self.result = result
        self.asked = []
        self.channel.publish = self.publish

    def publish(self, topic, message):
        self.asked.append((topic, message))
        if self.result is None or message.get("op") != "close":
            return
        answer = {"op": "closed", "rid": message["rid"], "to": "local-test", "result": self.result}
        answer["to"] = self.channel.node
        text = json.dumps({"n": "other", "m": answer})
        reactor.callLater(0.01, self.channel.received, topic, text)


@pytest_twisted.ensureDeferred
async def test_delete_of_another_nodes_link_is_forwarded_and_answered(daemon):
    daemon.ctx.cluster.clustered = True
    await make_alive(daemon, "other")
    await put_row(daemon, "t-far", "other")
    owner = FakeOwner(daemon, "closed")
    assert (await daemon.request("DELETE", "/api/v1/devicelink/t-far"))[0] == 204
    [(topic, message)] = owner.asked
    assert topic == "links" and message["op"] == "close" and message["to"] == "other"
    assert message["token"] == "t-far" and message["tenant"] == "default" and message["rid"]
    owner.result = "unknown"
    assert (await daemon.request("DELETE", "/api/v1/devicelink/t-far"))[0] == 404
    owner.result = "failed"
    status, body = await daemon.request("DELETE", "/api/v1/devicelink/t-far")
    assert status == 503 and body["error"]["code"] == "node_failed"


@pytest_twisted.ensureDeferred
async def test_delete_of_another_nodes_link_without_an_answer_is_504(daemon):
    daemon.ctx.cluster.clustered = True
    await make_alive(daemon, "other")
    await put_row(daemon, "t-far", "other")
    FakeOwner(daemon, None)
    daemon.top.getServiceNamed("devicelink").directory.forwarder.timeout = 0.3
    started = time.monotonic()
    status, body = await daemon.request("DELETE", "/api/v1/devicelink/t-far")
    assert status == 504 and body["error"]["code"] == "node_timeout"
    assert time.monotonic() - started >= 0.3


@pytest_twisted.ensureDeferred
async def test_a_close_request_from_the_bus_closes_a_link_here_and_answers(daemon, echo_server):
    await daemon.put_device("plc", host="127.0.0.1", ports={"default": echo_server})
    status, link = await daemon.request("POST", "/api/v1/devicelink/plc", {"protocol": "tcp"})
    channel = daemon.ctx.cluster.channel
    sent = []
    channel.publish = lambda topic, message: sent.append((topic, message))
    me = daemon.ctx.cluster.node
    wrong_tenant = {"op": "close", "rid": "r0", "to": me, "token": link["token"], "tenant": "elsewhere"}
    channel.received("links", json.dumps({"n": "other", "m": wrong_tenant}))
    close = {"op": "close", "rid": "r1", "to": me, "token": link["token"], "tenant": "default"}
    channel.received("links", json.dumps({"n": "other", "m": close}))
    for _ in range(200):
        if len(sent) == 2:
            break
        await deferLater(0.01)
    assert sent == [("links", {"op": "closed", "rid": "r0", "to": "other", "result": "unknown"}),
                    ("links", {"op": "closed", "rid": "r1", "to": "other", "result": "closed"})]
    assert await row(daemon, link["token"]) is None  # the answer came after the row's delete
    assert daemon.top.getServiceNamed("devicelink").manager.get(link["token"]) is None
    status, listing = await daemon.request("GET", "/api/v1/devicelink")
    assert listing["items"] == []


# -- units on a Clock --------------------------------------------------------------------


class FakeStore:
    """Records writes; each returns a Deferred fired at once (or failed while ``down``)."""

    def __init__(self):
        self.writes = []
        self.down = False
        self.rows = {}

    def write(self, fn, *args, size=0):
        if self.down:
            return defer.fail(RuntimeError("store down"))
        self.writes.append((fn.__name__, args))
        return defer.succeed(0)

    def read(self, fn, *args):
        if fn is linksql.nodes:
            return defer.succeed(sorted(self.rows))
        raise AssertionError(fn)


def a_link(clock, token="tok-1"):
    return Link(token=token, tenant="t", device="D", protocol="tcp", device_host="127.0.0.1",
                device_port=1, timeout_ms=0, source=None, encrypted=False, clock=clock)


def test_rows_refresh_only_changed_links_and_retry_failed_writes():
    clock, store = Clock(), FakeStore()
    rows = LinkRows(store, clock, "n1", refresh_every=5)
    link = a_link(clock)
    rows.opened(link)
    assert [w[0] for w in store.writes] == ["upsert"]
    [(token, node, tenant, created_us, doc)] = store.writes[0][1][0]
    assert (token, node, tenant, doc["node"], doc["bytesUp"]) == ("tok-1", "n1", "t", "n1", 0)
    defer.ensureDeferred(rows.start())  # deletes n1's stale rows, starts the refresh
    assert store.writes[-1] == ("delete_node", ("n1",))
    store.writes.clear()
    clock.advance(5)
    assert store.writes == []  # nothing changed
    link.relayed_up(10)
    clock.advance(4.9)
    assert store.writes == []  # not before the refresh
    clock.advance(0.1)
    [(name, (written,))] = store.writes
    assert name == "upsert" and written[0][4]["bytesUp"] == 10
    store.writes.clear()
    clock.advance(5)
    assert store.writes == []
    store.down = True
    link.relayed_down(3)
    clock.advance(5)  # fails: retried
    store.down = False
    clock.advance(5)
    [(name, (written,))] = store.writes
    assert name == "upsert" and written[0][4]["bytesDown"] == 3
    store.writes.clear()
    store.down = True
    link.close("deleted")  # the delete fails: retried by the next refresh
    store.down = False
    assert store.writes == []
    clock.advance(5)
    assert store.writes == [("delete", (["tok-1"], "n1"))]
    store.writes.clear()
    clock.advance(5)
    assert store.writes == []
    rows.stop()


def test_reaper_deletes_rows_of_a_node_dead_for_30_seconds_only():
    clock, store = Clock(), FakeStore()
    cluster = single("me")
    store.rows = {"me": 1, "x": 1, "y": 1}
    cluster.live.add("y")
    reaper = DeadNodeReaper(store, clock, cluster, every=10, dead_after=30)
    reaper.start()
    clock.advance(10)  # x first seen dead at t=10
    clock.advance(10)
    clock.advance(10)
    assert store.writes == []
    cluster.live.add("x")  # back: starts over
    clock.advance(10)
    cluster.live.discard("x")
    clock.advance(10)  # dead since t=50
    clock.advance(20)
    assert store.writes == []
    clock.advance(10)  # t=80: dead for 30 s
    assert store.writes == [("delete_node", ("x",))]
    reaper.stop()


class Pair:
    """Two clusters joined by a fake bus that delivers every publish to the other node (later)."""

    def __init__(self, clock):
        self.clock = clock
        self.a, self.b = single("a"), single("b")
        for me, other in ((self.a, self.b), (self.b, self.a)):
            me.channel.publish = self._sender(me, other)
        self.drop = False

    def _sender(self, me, other):
        def publish(topic, message):
            if not self.drop:
                text = json.dumps({"n": me.node, "m": message})
                self.clock.callLater(0.001, other.channel.received, topic, text)
        return publish


def test_forward_protocol_between_two_nodes():
    clock = Clock()
    pair = Pair(clock)
    closed = []

    def close_on_b(token, tenant):
        closed.append((token, tenant))
        return defer.succeed("closed" if token == "known" else "unknown")

    asker = CloseForwarder(pair.a, clock, lambda t, n: defer.succeed("unknown"), timeout=5)
    CloseForwarder(pair.b, clock, close_on_b, timeout=5)
    results = []
    asker.ask("b", "known", "t").addBoth(results.append)
    asker.ask("b", "other", "t").addBoth(results.append)
    clock.advance(0.01)
    clock.advance(0.01)
    assert results == ["closed", "unknown"] and closed == [("known", "t"), ("other", "t")]
    assert asker.pending() == 0
    pair.drop = True
    asker.ask("b", "known", "t").addBoth(results.append)
    clock.advance(4.9)
    assert len(results) == 2
    clock.advance(0.2)
    assert results[2].check(CloseTimeout) and asker.pending() == 0


def test_forward_ignores_other_nodes_messages_and_drops_malformed_ones():
    clock = Clock()
    cluster = single("a")
    calls = []
    fwd = CloseForwarder(cluster, clock, lambda t, n: calls.append((t, n)) or defer.succeed("closed"))
    sent = []
    cluster.channel.publish = lambda topic, message: sent.append(message)
    for message in ([1, 2], "x", {"op": "close"}, {"op": "nope", "to": "a"}, {"op": "close", "to": "a", "rid": "r"},
                    {"op": "close", "to": "a", "rid": 5, "token": "t", "tenant": "n"},
                    {"op": "closed", "to": "a", "rid": "r", "result": "maybe"},
                    {"op": "close", "to": "a", "rid": "r", "token": "x" * 300, "tenant": "n"},
                    {"op": "close", "to": "b", "rid": "r", "token": "t", "tenant": "n"},  # for b
                    {"op": "closed", "to": "a", "rid": "unknown-rid", "result": "closed"}):
        cluster.channel.received("links", json.dumps({"n": "b", "m": message}))
    cluster.channel.received("links", "not json")
    assert calls == [] and sent == [] and fwd.pending() == 0


def test_a_node_is_alive_when_in_cluster_live_or_its_heartbeat_row_is_fresh():
    from iotd.cluster.nodes import DEAD_AFTER
    from iotd.relay.directory import LinkDirectory

    clock = Clock()
    clock.advance(1000)
    cluster = single("me")
    directory = LinkDirectory(None, None, None, cluster, clock)
    cluster.live.add("x")
    assert directory._alive("x", None)
    assert not directory._alive("y", None)
    assert directory._alive("y", int((1000 - DEAD_AFTER + 1) * 1e6))
    assert not directory._alive("y", int((1000 - DEAD_AFTER - 1) * 1e6))
