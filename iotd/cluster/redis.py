"""The channel between nodes over Redis pub/sub, through txredisapi (Twisted-native, as Synapse does it).

Two connections, both re-established for ever (txredisapi's ClientService
backs off up to :data:`MAX_DELAY` seconds):

- the *subscriber* (``PSUBSCRIBE <prefix>*``) hands each message to
  :meth:`Channel.received`; each time it is subscribed again the channel's
  up listeners run, since messages sent while it was away are lost (the
  users fill from the store);
- the *publisher* sends ``PUBLISH <prefix><topic> <json>``.  While it is not
  connected a message is dropped and counted, never queued: every user of the
  channel has the store as its backstop.  Messages written but not yet
  answered by Redis are bounded by :data:`MAX_IN_FLIGHT_BYTES`; past it a
  message is dropped (and counted) too, so a stalled Redis cannot grow this
  process.

Channel names begin with ``iotd:<cluster id>:`` -- the cluster id is a random
value kept in the store (schema 5) -- so clusters sharing one Redis (Redis
pub/sub ignores the database number) never hear each other.  The database
number of the URL is selected on the publisher all the same.

The URL's password is used, never logged.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import txredisapi
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS

from iotd import metrics
from iotd.cluster.channel import Channel
from iotd.logs import Logger

MAX_DELAY = 2.0  # seconds between two connection attempts, at most
CONNECT_TIMEOUT = 5.0
MAX_IN_FLIGHT_BYTES = 8 << 20


def parse_url(url: str) -> dict[str, Any]:
    """``redis://[user:password@]host[:port][/db]`` (``rediss://`` for TLS) as connection arguments."""
    parts = urllib.parse.urlsplit(url)
    db = parts.path.strip("/")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": int(db) if db else 0,
        "username": urllib.parse.unquote(parts.username) if parts.username else None,
        "password": urllib.parse.unquote(parts.password) if parts.password else None,
        "tls": parts.scheme == "rediss",
    }


def safe_url(url: str) -> str:
    """The URL without its password, for logs and ``/healthz``."""
    args = parse_url(url)
    scheme = "rediss" if args["tls"] else "redis"
    return f"{scheme}://{args['host']}:{args['port']}/{args['db']}"


class _Publisher(txredisapi.RedisFactory):
    """The publishing connection's factory: tells the channel when it connects and disconnects."""

    iotd_channel: "RedisChannel"

    def addConnection(self, conn):
        super().addConnection(conn)
        self.iotd_channel._update()

    def delConnection(self, conn):
        super().delConnection(conn)
        self.iotd_channel._update()


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.factory.iotd_channel._subscriber_ready(self))
        return d

    def messageReceived(self, pattern, channel, message):
        self.factory.iotd_channel._message(channel, message)

    def connectionLost(self, why):
        self.factory.iotd_channel._subscriber_lost(self)
        super().connectionLost(why)


class RedisChannel(Channel):
    log = Logger()
    kind = "redis"

    def __init__(self, node: str, url: str, reactor: Any) -> None:
        super().__init__(node)
        self.url = url
        self.where = safe_url(url)
        self._args = parse_url(url)
        self._reactor = reactor
        self.prefix = "iotd:"
        self.state = "connecting"
        self._publisher: txredisapi.RedisFactory | None = None
        self._subscriber: txredisapi.SubscriberFactory | None = None
        self._sub_conn: Any = None
        self._in_flight = 0

    def set_cluster_id(self, cluster_id: str) -> None:
        """Name the channels after the store's cluster id (before :meth:`start`)."""
        self.prefix = f"iotd:{cluster_id}:"

    def _endpoint(self) -> Any:
        args = self._args
        endpoint = HostnameEndpoint(self._reactor, args["host"], args["port"], timeout=CONNECT_TIMEOUT)
        if args["tls"]:
            endpoint = wrapClientTLS(optionsForClientTLS(args["host"]), endpoint)
        return endpoint

    async def start(self) -> None:
        args = self._args
        publisher = _Publisher(self.where, args["db"], 1, isLazy=True,
                                            password=args["password"], username=args["username"],
                                            replyTimeout=10, convertNumbers=False)
        publisher.iotd_channel = self
        publisher.maxDelay = MAX_DELAY
        publisher.initialDelay = 0.2
        publisher.deferred.addErrback(lambda _: None)  # an auth error is logged by the protocol
        publisher.startConnecting(self._endpoint())
        self._publisher = publisher
        subscriber = txredisapi.SubscriberFactory(isLazy=True)
        subscriber.protocol = _Subscriber
        subscriber.password, subscriber.username = args["password"], args["username"]
        subscriber.maxDelay = MAX_DELAY
        subscriber.initialDelay = 0.2
        subscriber.iotd_channel = self
        subscriber.deferred.addErrback(lambda _: None)
        subscriber.startConnecting(self._endpoint())
        self._subscriber = subscriber
        self.log.info("bus: connecting to {where} as node {node}", where=self.where, node=self.node)

    async def stop(self) -> None:
        for factory in (self._subscriber, self._publisher):
            if factory is not None:
                try:
                    await factory.disconnect()
                except Exception:
                    pass
        self._set_state("down")

    # -- subscriber -------------------------------------------------------------

    def _subscriber_ready(self, conn: Any) -> None:
        d = conn.psubscribe(self.prefix + "*")

        def subscribed(_: Any) -> None:
            self._sub_conn = conn
            self._update()

        d.addCallbacks(subscribed, lambda f: self.log.warn("bus: subscribing failed: {error}",
                                                           error=f.getErrorMessage()))

    def _subscriber_lost(self, conn: Any) -> None:
        if self._sub_conn is conn:
            self._sub_conn = None
        self._update()

    def _message(self, channel: Any, message: Any) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if not isinstance(channel, str) or not channel.startswith(self.prefix) or not isinstance(message, str):
            return
        self.received(channel[len(self.prefix):], message)

    # -- publisher --------------------------------------------------------------

    def _publisher_conn(self) -> Any:
        factory = self._publisher
        if factory is None:
            return None
        for conn in factory.pool:
            if conn.connected:
                return conn
        return None

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        self.send(topic, self.encode(message))

    def send(self, topic: str, text: str) -> None:
        conn = self._publisher_conn()
        size = len(text)
        if conn is None or self._in_flight + size > MAX_IN_FLIGHT_BYTES:
            metrics.bus_messages.labels("dropped", topic).inc()
            self._update()
            return
        self._in_flight += size
        metrics.bus_messages.labels("out", topic).inc()
        d = conn.publish(self.prefix + topic, text)

        def done(result: Any) -> None:
            self._in_flight -= size
            if isinstance(result, Exception):
                self.log.debug("bus: a publish failed: {error}", error=result)

        d.addBoth(done)

    # -- state ------------------------------------------------------------------

    def _update(self) -> None:
        up = self._sub_conn is not None and self._sub_conn.connected and self._publisher_conn() is not None
        if up and self.state != "ok":
            self._set_state("ok")
            self._came_up()
        elif not up and self.state == "ok":
            self._set_state("down")

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        metrics.bus_up.set(1 if state == "ok" else 0)
        if state == "ok":
            self.log.info("bus: connected to {where}", where=self.where)
        elif previous == "ok":
            self.log.warn("bus: lost {where}; serving on, filling from the store", where=self.where)

