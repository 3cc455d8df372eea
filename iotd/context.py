"""The :class:`Context` every job and handler reaches: config, clock, store, keys, registry, events.

A neutral module: the web layer, the websocket jobs and the relay may all
import it without importing each other.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class Context:
    """What handlers reach: config, clock, store, keys, registry, events, cluster.

    A job's own service is not here: each job builds it and closes its routes
    over it (see :mod:`iotd.tap`).
    """

    config: Any
    reactor: Any
    store: Any
    keys: Any
    registry: Any
    events: Any
    cluster: Any = attrs.field(factory=lambda: _single())  # iotd.cluster.node.Cluster
    # component -> fn() -> its state ("ok" or why not): /healthz shows each, "degraded" unless ok
    health: dict[str, Any] = attrs.Factory(dict)


def _single() -> Any:
    from iotd.cluster.node import single

    return single()
