"""Every Prometheus metric iotd exposes, defined once.

Jobs import the objects they update from here; ``/metrics`` renders the
default registry.  Names follow the Prometheus conventions (``_total`` for
counters).
"""

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily


class HotCounter:
    """A labelled counter for the reactor thread's hot paths, exposed like a ``Counter``.

    ``labels(*values)`` gives a child whose ``inc`` adds to a plain int: no
    lock and no method chain (a ``prometheus_client`` child takes a lock and
    checks its labels on every ``inc``: a tenth of an idle push poll's own
    work).  Only the reactor thread may increment it; ``/metrics`` reads the
    ints when it renders.  The label values must be a small fixed set.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry=REGISTRY):
        self._name, self._doc, self._labelnames = name, documentation, labelnames
        self._children: dict[tuple[str, ...], _HotChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> "_HotChild":
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes {len(self._labelnames)} label values")
            child = self._children[values] = _HotChild()
        return child

    def collect(self):
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family

    def describe(self):
        return [CounterMetricFamily(self._name, self._doc, labels=self._labelnames)]


class _HotChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


# push
polls = HotCounter("iotd_push_polls_total", "GET /push polls answered", ("outcome",))
results = Counter("iotd_push_results_total", "POST /result requests", ["outcome"])
commands = Counter("iotd_commands_total", "Command state transitions", ["state"])
commands_by_state = Gauge("iotd_commands_in_state", "Commands by current state", ["state"])

# devicelink
links_open = Gauge("iotd_links_open", "Open device links", ["protocol"])
links_total = Counter("iotd_links_total", "Device links opened", ["protocol"])
link_failures = Counter("iotd_link_failures_total", "Device link failures", ["reason"])
relayed_bytes = Counter("iotd_relayed_bytes_total", "Bytes relayed", ["protocol", "direction"])
relayed_datagrams = Counter("iotd_relayed_datagrams_total", "Datagrams relayed", ["direction"])

# websockets
ws_connections = Gauge("iotd_websocket_connections", "Open websocket connections", ["kind"])
ws_slow_dropped = Counter("iotd_websocket_slow_dropped_total", "Websocket clients cut as too slow", ["kind"])
events_published = Counter("iotd_events_published_total", "Events committed and published", ["kind"])
events_delivered = HotCounter("iotd_events_delivered_total", "Event frames delivered to websockets", ("kind",))

# http / auth
http_requests = HotCounter("iotd_http_requests_total", "HTTP requests answered", ("status",))
auth_failures = Counter("iotd_auth_failures_total", "Requests refused for a missing or bad key")

# site-store (HTTP connection limits, store health)
http_connections_closed = Counter("iotd_http_connections_closed_total",
                                  "HTTP connections cut by a limit", ["reason"])
store_writes_refused = Counter("iotd_store_writes_refused_total",
                               "Store writes refused with 503 (queue full, disk full, file missing)", ["reason"])
store_health = Gauge("iotd_store_health", "1 for the store's current health state", ["state"])

# keys
key_lookups = Counter("iotd_key_lookups_total",
                      "Unknown API keys looked up in the store before a 401", ["outcome"])

# cluster
bus_messages = Counter("iotd_bus_messages_total", "Messages on the bus between nodes", ["direction", "topic"])
bus_up = Gauge("iotd_bus_up", "1 while the bus between nodes is connected")
holes_filled = Counter("iotd_event_holes_filled_total",
                       "Events read from the store because the bus did not bring them in order")
leader = Gauge("iotd_leader", "1 while this node is the leader (runs the sweeps)")
replays_pruned = Counter("iotd_replays_pruned_total",
                         "Socket replays whose after lay before what retention kept (history was missed)", ["kind"])

# mqtt
mqtt_messages = Counter("iotd_mqtt_messages_total", "MQTT messages from devices, by what became of them",
                        ["outcome"])
mqtt_up = Gauge("iotd_mqtt_up", "1 while the connection to the MQTT broker is up")
mqtt_commands = Counter("iotd_mqtt_commands_total", "Commands published to MQTT devices", ["outcome"])


def labelled(metric, cache: dict):
    """``metric.labels(str(value))`` for a one-label metric, looked up once per value (a hot
    path's counters: ``labels`` costs more than the ``inc``).  ``cache`` is the caller's dict; it
    holds one child per value, and the values are a small fixed set (statuses, kinds)."""
    def child(value):
        c = cache.get(value)
        if c is None:
            c = cache[value] = metric.labels(str(value))
        return c
    return child


http_request_status = labelled(http_requests, {})  # by the status code, an int
events_published_kind = labelled(events_published, {})
events_delivered_kind = labelled(events_delivered, {})
