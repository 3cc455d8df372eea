"""Key and registry changes made on one node reach the others within a second.

A key write (create, revoke) publishes ``keys``; the other nodes read the key
changes at once (:meth:`iotd.auth.KeyRing.poll_now`) -- revoked keys' sockets
close with 4401 through the ring's revoke listeners, as on one node.  Their
half-second revision poll is the backstop for a lost message and for
``iotd-admin``.

A device or stream write publishes ``registry`` with what changed; the other
nodes read that one row again (:meth:`iotd.registry.Registry.reload_device`,
``reload_stream``), a deleted device running the delete listeners there too
(its links close, its queued commands are cancelled -- idempotently).
Without a bus (one node) the messages go nowhere.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from iotd.logs import Logger

log = Logger()


def propagate(cluster: Any, keys: Any, registry: Any) -> None:
    keys.add_write_listener(lambda revision: cluster.publish("keys", {"rev": revision}))
    cluster.subscribe("keys", lambda node, message: _track(keys.poll_now(), "keys"))

    registry.add_change_listener(
        lambda what, tenant, ident: cluster.publish("registry", {"what": what, "tenant": tenant, "id": ident}))

    def changed(node: str, message: dict[str, Any]) -> None:
        what, tenant, ident = message.get("what"), message.get("tenant"), message.get("id")
        if not (isinstance(tenant, str) and isinstance(ident, str)):
            log.warn("bus: dropped a malformed registry message from {node}", node=node)
            return
        if what == "device":
            _track(defer.Deferred.fromCoroutine(registry.reload_device(tenant, ident)), "registry")
        elif what == "stream":
            _track(defer.Deferred.fromCoroutine(registry.reload_stream(tenant, ident)), "registry")

    cluster.subscribe("registry", changed)


def _track(d: defer.Deferred, what: str) -> None:
    d.addErrback(lambda f: log.warn("bus: applying a {what} change failed: {error}", what=what,
                                    error=f.getErrorMessage()))
